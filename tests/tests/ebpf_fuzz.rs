//! Differential fuzzing of the eBPF programs against the TUN datapath, through
//! `BPF_PROG_TEST_RUN`: random frames and mutations of the receive-policy table's frames and of
//! the captured corpus (`tests/corpus/`), for both formats.
//!
//! - `tc_decap` and `xdp_decap`: for every frame the kernel would hand the TUN datapath's socket
//!   (`overlay_tests::fuzz::kernel_view`), the program's verdict and the one counter it moves are
//!   the TUN decision function's (`codec::receive`) on that datagram, and an accepted frame leaves
//!   the program as its Ethernet header followed by exactly the inner packet the TUN datapath
//!   writes (then padding, which the stack trims by the inner length); a frame the kernel would
//!   deliver elsewhere is passed untouched and uncounted; a frame the kernel drops is never
//!   accepted (passed, or refused: a stranger as a stranger, a peer's as unparsed or malformed).
//! - `tc_encap`: a packet to a peer's container is encapsulated for the peer the TUN datapath's
//!   table names, and, when it is a whole IPv4 packet (all the stack routes into the device),
//!   its outer headers are valid and addressed to that peer and what follows them is byte for
//!   byte what the TUN codec sends; any other packet is passed to the TUN, counted as not IPv4 or
//!   without a peer.
//! - No program ever fails (`DecapError`, `EncapError`).
//!
//! Counters are read every `BATCH` runs and must equal the counts the oracle expects; a batch
//! that disagrees is replayed one frame at a time to name the frame.
//!
//! Bounded by `OVERLAY_FUZZ_SECONDS` (default 15, what `cargo xtask test` runs) and
//! `OVERLAY_FUZZ_PACKETS` (runs per program and format; no bound by default); seeded by
//! `OVERLAY_FUZZ_SEED`. `cargo xtask fuzz` sets them. Mismatching frames are written to
//! `target/ebpf-fuzz/`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_agent::dataplane::{
    ebpf::{EbpfDataplane, PeerRoute},
    tun::{PeerTable, codec},
};
use overlay_common::{
    CounterSlot,
    maps::{Config, Encap},
    net::{Mac, Subnet},
    policy::Refusal,
    programs, wire,
};
use overlay_tests::{
    fuzz::{self, KernelView, PEER2, PEER2_SUBNET, Rng},
    receive_cases::{self, PEER, PEER_SUBNET, PEER_VTEP, checksum, host_config},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
/// Runs between two readings of the counters (each reading is one system call per slot).
const BATCH: usize = 2048;
/// Mismatches kept (and written out) before the run stops looking for more.
const MAX_MISMATCHES: usize = 20;

/// What one run of one program must do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// Pass the frame unchanged, count nothing.
    Untouched,
    /// Refuse, counting this.
    Refuse(CounterSlot),
    /// The kernel drops it: pass it untouched, or refuse it with this counter.
    NotAccepted(CounterSlot),
    /// Decapsulate to this inner packet.
    Decap(Vec<u8>),
    /// Pass to the TUN, counting this.
    ToTun(CounterSlot),
    /// Encapsulate for `peer`; `payload` is what must follow the outer UDP header, when the
    /// TUN codec sends the packet.
    Encap {
        peer: Ipv4Addr,
        payload: Option<Vec<u8>>,
        header_len: usize,
    },
}

struct Program {
    name: &'static str,
    encap: Encap,
    runs: u64,
    accepted: u64,
    refused: u64,
    untouched: u64,
}

struct Host {
    encap: Encap,
    cfg: Config,
    dp: EbpfDataplane,
    table: PeerTable,
    seeds: Vec<Vec<u8>>,
}

fn routes() -> BTreeMap<Subnet, PeerRoute> {
    [
        (PEER, PEER_SUBNET, PEER_VTEP),
        (PEER2, PEER2_SUBNET, [0x0e, 0xfa, 198, 18, 0, 3]),
    ]
    .into_iter()
    .map(|(ip, (net, len), mac)| {
        let subnet = Subnet::new(net, len).unwrap();
        (
            subnet,
            PeerRoute {
                subnet,
                public_ip: ip,
                vtep_mac: Mac(mac),
                kernel_decap: true,
            },
        )
    })
    .collect()
}

impl Host {
    fn new(encap: Encap) -> Self {
        let cfg = host_config(encap);
        let mut dp = EbpfDataplane::load(None).unwrap();
        dp.configure(&cfg).unwrap();
        let routes = routes();
        for r in routes.values() {
            dp.upsert_peer(*r).unwrap();
        }
        let mut seeds: Vec<Vec<u8>> = receive_cases::cases(encap)
            .into_iter()
            .map(|c| c.frame)
            .collect();
        match fuzz::corpus(encap) {
            Ok(captured) => seeds.extend(captured.into_iter().map(|(_, f)| f)),
            Err(e) => println!(
                "ebpf_fuzz: no captured corpus at {}: {e}",
                fuzz::corpus_dir(encap).display()
            ),
        }
        Self {
            encap,
            cfg,
            dp,
            table: PeerTable::new(&routes),
            seeds,
        }
    }

    fn format(&self) -> codec::Format {
        match self.encap {
            Encap::Vxlan => codec::Format::Vxlan {
                vni: self.cfg.vni,
                local_mac: self.cfg.vtep_mac,
            },
            _ => codec::Format::Udp,
        }
    }

    /// What the TUN datapath decides for `frame`, as a decap program must do it.
    fn decap_oracle(&self, frame: &[u8]) -> Want {
        match fuzz::kernel_view(&self.cfg, frame) {
            KernelView::Elsewhere => Want::Untouched,
            KernelView::Dropped { sender, outer } => {
                let refusal = if !self.table.is_peer(Ipv4Addr::from(sender)) {
                    Refusal::NotPeer
                } else if outer.ip_options || outer.fragment {
                    Refusal::Unparsed
                } else {
                    Refusal::Malformed
                };
                Want::NotAccepted(refusal.counter())
            }
            KernelView::Datagram {
                sender,
                outer,
                payload,
            } => match codec::receive(
                &self.cfg,
                &self.table,
                Ipv4Addr::from(sender),
                outer,
                &payload,
            ) {
                Ok((at, info)) => Want::Decap(payload[at..at + info.total_len].to_vec()),
                Err(r) => Want::Refuse(r.counter()),
            },
        }
    }

    /// What the TUN datapath does with `packet` read from the overlay device.
    fn encap_oracle(&self, packet: &[u8]) -> Want {
        if packet[0] >> 4 != 4 {
            return Want::ToTun(CounterSlot::EncapNotIpv4);
        }
        let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        let Some(route) = self.table.lookup(dst) else {
            return Want::ToTun(CounterSlot::EncapNoPeer);
        };
        let whole = codec::parse_ipv4(packet).is_ok_and(|i| i.total_len == packet.len());
        let payload = whole.then(|| {
            let mut out = vec![0u8; packet.len() + codec::MAX_FORMAT_HEADER];
            let n = codec::encapsulate(&self.format(), route.vtep_mac.0, packet, &mut out)
                .expect("a whole IPv4 packet encapsulates");
            out.truncate(n);
            out
        });
        Want::Encap {
            peer: route.public_ip,
            payload,
            header_len: self.format().header_len(),
        }
    }
}

/// The counter a run must move, if it is known before the run.
fn slot_of(want: &Want, verdict: i32, program: &str) -> Option<CounterSlot> {
    let refused = if program == programs::XDP_DECAP {
        verdict == XDP_DROP
    } else {
        verdict == TC_ACT_SHOT
    };
    match want {
        Want::Untouched => None,
        Want::Refuse(s) => Some(*s),
        Want::NotAccepted(s) => refused.then_some(*s),
        Want::Decap(_) => Some(CounterSlot::DecapToStack),
        Want::ToTun(s) => Some(*s),
        Want::Encap { .. } => Some(CounterSlot::Encapsulated),
    }
}

/// Whether `verdict` and `out` are what `want` asks of `program` on `input`; the reason if not.
fn check(program: &str, want: &Want, input: &[u8], verdict: i32, out: &[u8]) -> Result<(), String> {
    let xdp = program == programs::XDP_DECAP;
    let (pass, drop) = if xdp {
        (XDP_PASS, XDP_DROP)
    } else {
        (TC_ACT_OK, TC_ACT_SHOT)
    };
    let untouched = verdict == pass && out == input;
    match want {
        Want::Untouched | Want::ToTun(_) if untouched => Ok(()),
        Want::Refuse(_) if verdict == drop => Ok(()),
        Want::NotAccepted(_) if untouched || verdict == drop => Ok(()),
        Want::Decap(inner) if verdict == pass => {
            if out.len() < wire::ETH_LEN + inner.len()
                || out[..wire::ETH_LEN] != input[..wire::ETH_LEN]
                || out[wire::ETH_LEN..wire::ETH_LEN + inner.len()] != inner[..]
            {
                return Err(format!(
                    "decapsulated to {out:02x?}, the TUN to {inner:02x?}"
                ));
            }
            Ok(())
        }
        Want::Encap {
            peer,
            payload,
            header_len,
        } if verdict == TC_ACT_REDIRECT => {
            let outer_len = wire::ETH_LEN + wire::IPV4_MIN_LEN + wire::UDP_LEN;
            if out.len() < outer_len {
                return Err(format!("encapsulated to {out:02x?}"));
            }
            let ip = &out[wire::ETH_LEN..];
            let udp = &ip[wire::IPV4_MIN_LEN..];
            let problems = [
                (out[12..14] != wire::ETH_P_IP.to_be_bytes(), "ethertype"),
                (ip[0] != 0x45, "version/IHL"),
                (
                    usize::from(u16::from_be_bytes([ip[2], ip[3]])) != ip.len(),
                    "total length",
                ),
                (ip[6] & 0x40 == 0, "DF"),
                (ip[9] != wire::IPPROTO_UDP, "protocol"),
                (checksum(&ip[..wire::IPV4_MIN_LEN]) != 0, "header checksum"),
                (ip[12..16] != receive_cases::ME.octets(), "source"),
                (ip[16..20] != peer.octets(), "destination"),
                (
                    usize::from(u16::from_be_bytes([udp[4], udp[5]])) != udp.len(),
                    "UDP length",
                ),
                (
                    payload
                        .as_ref()
                        .is_some_and(|p| !same_payload(&out[outer_len..], p, *header_len)),
                    "payload (not what the TUN codec sends)",
                ),
            ];
            match problems.iter().find(|(bad, _)| *bad) {
                Some((_, what)) => Err(format!("{what} wrong in {out:02x?}")),
                None => Ok(()),
            }
        }
        _ => Err(format!("verdict {verdict}, expected {want:?}")),
    }
}

/// `BPF_PROG_TEST_RUN` takes a TC program's first 14 bytes for an Ethernet header and puts the
/// skb's network header after them; the TUN device's skb has it at the packet's start. So under
/// the harness the encap program's room opens 14 bytes later than on the device, and the inner
/// packet's first 14 bytes come out overwritten by the end of the room.
const HARNESS_SHIFT: usize = wire::ETH_LEN;

/// Whether `out` (what follows the outer UDP header) is the TUN codec's `want`, but for the 14
/// bytes the harness moves (`HARNESS_SHIFT`).
fn same_payload(out: &[u8], want: &[u8], header_len: usize) -> bool {
    let skip = header_len + HARNESS_SHIFT;
    out.len() == want.len()
        && out[..header_len] == want[..header_len]
        && out[skip..] == want[skip..]
}

/// The packet counts, one per slot, in `CounterSlot::ALL`'s (index) order.
fn counters(dp: &EbpfDataplane) -> Vec<u64> {
    dp.counters()
        .unwrap()
        .iter()
        .map(|(_, c)| c.packets)
        .collect()
}

/// The slots whose counts differ, with the difference.
fn moved(before: &[u64], after: &[u64]) -> Vec<(CounterSlot, u64)> {
    CounterSlot::ALL
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a != b)
        .map(|(s, (b, a))| (*s, a - b))
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

struct Mismatch {
    program: &'static str,
    encap: Encap,
    input: Vec<u8>,
    what: String,
}

/// Runs `inputs` through `program`, checking each against its oracle and the batch's counters;
/// a batch whose counters disagree is replayed one input at a time.
fn run_batch(
    host: &mut Host,
    stats: &mut Program,
    inputs: &[(Vec<u8>, Want)],
    mismatches: &mut Vec<Mismatch>,
) {
    let program = stats.name;
    let before = counters(&host.dp);
    let mut expected = vec![0u64; CounterSlot::ALL.len()];
    for (input, want) in inputs {
        let (verdict, out) = host
            .dp
            .test_run(program, input)
            .unwrap_or_else(|e| panic!("{program} failed to run on {input:02x?}: {e}"));
        stats.runs += 1;
        if let Err(what) = check(program, want, input, verdict, &out)
            && mismatches.len() < MAX_MISMATCHES
        {
            mismatches.push(Mismatch {
                program,
                encap: host.encap,
                input: input.clone(),
                what,
            });
        }
        match want {
            Want::Decap(_) | Want::Encap { .. } => stats.accepted += 1,
            Want::Untouched => stats.untouched += 1,
            _ => stats.refused += 1,
        }
        if let Some(slot) = slot_of(want, verdict, program) {
            expected[slot.index() as usize] += 1;
        }
    }
    let got = moved(&before, &counters(&host.dp));
    let expected = moved(&vec![0; expected.len()], &expected);
    if got == expected {
        return;
    }
    for (input, want) in inputs {
        let before = counters(&host.dp);
        let (verdict, _) = host.dp.test_run(program, input).unwrap();
        let got = moved(&before, &counters(&host.dp));
        let want_slot: Vec<(CounterSlot, u64)> = slot_of(want, verdict, program)
            .map(|s| (s, 1))
            .into_iter()
            .collect();
        if got != want_slot && mismatches.len() < MAX_MISMATCHES {
            mismatches.push(Mismatch {
                program,
                encap: host.encap,
                input: input.clone(),
                what: format!("counted {got:?}, expected {want_slot:?} ({want:?})"),
            });
        }
    }
}

fn the_programs_agree_with_the_tun_datapath_on_random_and_mutated_frames() {
    let seconds = env_u64("OVERLAY_FUZZ_SECONDS").unwrap_or(15);
    let target = env_u64("OVERLAY_FUZZ_PACKETS");
    let seed = env_u64("OVERLAY_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    println!(
        "ebpf_fuzz: seed {seed} (OVERLAY_FUZZ_SEED), {seconds} s, {} runs per program and format",
        target.map_or("unbounded".to_owned(), |t| t.to_string())
    );
    let mut rng = Rng::new(seed);
    let mut hosts = [Host::new(Encap::Udp), Host::new(Encap::Vxlan)];
    for h in &hosts {
        println!("ebpf_fuzz: {:?}: {} seed frames", h.encap, h.seeds.len());
    }
    let mut stats: Vec<Program> = hosts
        .iter()
        .flat_map(|h| {
            [programs::TC_DECAP, programs::XDP_DECAP, programs::TC_ENCAP].map(|name| Program {
                name,
                encap: h.encap,
                runs: 0,
                accepted: 0,
                refused: 0,
                untouched: 0,
            })
        })
        .collect();
    let mut mismatches = Vec::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let done = |stats: &[Program]| target.is_some_and(|t| stats.iter().all(|p| p.runs >= t));
    while Instant::now() < deadline && !done(&stats) && mismatches.len() < MAX_MISMATCHES {
        for (i, host) in hosts.iter_mut().enumerate() {
            let frames: Vec<(Vec<u8>, Want)> = (0..BATCH)
                .map(|_| {
                    let frame = if rng.below(8) == 0 {
                        fuzz::random_frame(&mut rng)
                    } else {
                        let seed = rng.pick(&host.seeds).clone();
                        fuzz::mutate(&mut rng, host.encap, &seed, &host.seeds)
                    };
                    // The test harness refuses frames shorter than an Ethernet + IPv6 header.
                    let mut frame = frame;
                    frame.resize(frame.len().max(wire::ETH_LEN + 40), 0);
                    let want = host.decap_oracle(&frame);
                    (frame, want)
                })
                .collect();
            let packets: Vec<(Vec<u8>, Want)> = (0..BATCH)
                .map(|_| {
                    let p = fuzz::overlay_packet(&mut rng);
                    let want = host.encap_oracle(&p);
                    (p, want)
                })
                .collect();
            for p in &mut stats[i * 3..i * 3 + 2] {
                run_batch(host, p, &frames, &mut mismatches);
            }
            run_batch(host, &mut stats[i * 3 + 2], &packets, &mut mismatches);
        }
    }
    let elapsed = start.elapsed();
    println!(
        "ebpf_fuzz: {:.1} s, {} mismatches",
        elapsed.as_secs_f64(),
        mismatches.len()
    );
    for p in &stats {
        println!(
            "ebpf_fuzz: {:<10} {:<5} {:>9} runs ({:.0}/s): {} accepted, {} refused, {} passed untouched",
            p.name,
            format!("{:?}", p.encap),
            p.runs,
            p.runs as f64 / elapsed.as_secs_f64(),
            p.accepted,
            p.refused,
            p.untouched
        );
    }
    for h in &hosts {
        let c = counters(&h.dp);
        for slot in [CounterSlot::DecapError, CounterSlot::EncapError] {
            assert_eq!(c[slot.index() as usize], 0, "{:?}: {slot:?} moved", h.encap);
        }
    }
    if !mismatches.is_empty() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf-fuzz");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, m) in mismatches.iter().enumerate() {
            let path = dir.join(format!("{}-{:?}-{i}.frame", m.program, m.encap));
            std::fs::write(&path, &m.input).unwrap();
            let what: String = m.what.chars().take(400).collect();
            println!(
                "mismatch {i}: {} {:?}: {what} (input in {})",
                m.program,
                m.encap,
                path.display()
            );
        }
        panic!(
            "{} mismatches between the eBPF programs and the TUN datapath",
            mismatches.len()
        );
    }
    assert!(
        stats.iter().all(|p| p.accepted > 0 && p.runs > p.accepted),
        "a program saw only accepted or only refused input: the fuzzer is too weak"
    );
}

overlay_tests::test_main!(root the_programs_agree_with_the_tun_datapath_on_random_and_mutated_frames);
