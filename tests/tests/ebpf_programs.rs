//! The programs on crafted and random packets through `BPF_PROG_TEST_RUN`: every malformed,
//! foreign or hostile packet is dropped or passed as documented and counted, and nothing a peer
//! or a stranger sends makes a program fail.

use std::net::Ipv4Addr;

use overlay_agent::dataplane::ebpf::{EbpfDataplane, EbpfError, PeerRoute};
use overlay_common::{
    CounterSlot, PEER_COUNTERS_MAP,
    maps::{Config, ENDPOINTS_MAP, Encap, Endpoint, MAX_ENDPOINTS, MAX_PEERS, PEERS_MAP},
    net::{Mac, Subnet},
    programs,
};
use overlay_tests::receive_cases::{inner_ping, ipv4, l4_checksum};

const TC_ACT_OK: i32 = 0;
/// Ethernet + IPv6 header: shorter IP frames are refused by BPF_PROG_TEST_RUN, not by our code.
const MIN_TEST_RUN_FRAME: usize = 14 + 40;
const TC_ACT_SHOT: i32 = 2;
const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
const PEER_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 2, 2);
const MY_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 2);
const MY_VTEP: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 1];
const PEER_VTEP: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 2];

fn dataplane(encap: Encap) -> EbpfDataplane {
    let mut dp = EbpfDataplane::load(None).unwrap();
    dp.configure(&config(encap)).unwrap();
    dp.upsert_peer(PeerRoute {
        subnet: net("172.16.2.0/24"),
        public_ip: PEER,
        vtep_mac: Mac(PEER_VTEP),
        kernel_decap: true,
    })
    .unwrap();
    dp
}

fn config(encap: Encap) -> Config {
    Config {
        encap: encap as u8,
        local_ip: ME.octets(),
        subnet: [172, 16, 1, 0],
        subnet_prefix_len: 24,
        underlay_ifindex: 1,
        port: if encap == Encap::Vxlan { 8472 } else { 8285 },
        vni: 1,
        vtep_mac: MY_VTEP,
        ..Config::default()
    }
}

fn net(s: &str) -> Subnet {
    s.parse().unwrap()
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x80, 0x00];
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn ether(payload: &[u8]) -> Vec<u8> {
    let mut e = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    e.extend_from_slice(payload);
    e
}

fn udp_format(outer_src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    ether(&ipv4(outer_src, ME, 17, &udp(8285, inner)))
}

fn vxlan_format(outer_src: Ipv4Addr, vni: u32, dst_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0];
    vx.extend_from_slice(&(vni << 8).to_be_bytes());
    vx.extend_from_slice(&dst_mac);
    vx.extend_from_slice(&PEER_VTEP);
    vx.extend_from_slice(&[0x08, 0x00]);
    vx.extend_from_slice(inner);
    ether(&ipv4(outer_src, ME, 17, &udp(8472, &vx)))
}

fn decap_case(
    dp: &mut EbpfDataplane,
    packet: &[u8],
    verdict: i32,
    slot: Option<CounterSlot>,
) -> Vec<u8> {
    let before = dp.counters().unwrap();
    let (v, out) = dp.test_run(programs::TC_DECAP, packet).unwrap();
    assert_eq!(v, verdict, "verdict for {packet:02x?}");
    let after = dp.counters().unwrap();
    let moved: Vec<CounterSlot> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.1.packets != b.1.packets)
        .map(|(_, a)| a.0)
        .collect();
    assert_eq!(
        moved,
        slot.into_iter().collect::<Vec<_>>(),
        "counters for {packet:02x?}"
    );
    out
}

fn decap_udp_format_checks_sender_and_strips_headers() {
    let mut dp = dataplane(Encap::Udp);
    let inner = inner_ping(PEER_CONTAINER, MY_CONTAINER);

    let out = decap_case(
        &mut dp,
        &udp_format(PEER, &inner),
        TC_ACT_OK,
        Some(CounterSlot::DecapToStack),
    );
    assert_eq!(&out[14..], &inner[..], "inner packet after decap");
    assert_eq!(&out[12..14], &[0x08, 0x00]);

    // Not a peer, and a peer claiming another subnet's address.
    decap_case(
        &mut dp,
        &udp_format(STRANGER, &inner),
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotPeer),
    );
    let spoofed = inner_ping(Ipv4Addr::new(172, 16, 9, 9), MY_CONTAINER);
    decap_case(
        &mut dp,
        &udp_format(PEER, &spoofed),
        TC_ACT_SHOT,
        Some(CounterSlot::DropSpoofed),
    );

    // Truncated inner header, garbage inner version.
    decap_case(
        &mut dp,
        &udp_format(PEER, &inner[..10]),
        TC_ACT_SHOT,
        Some(CounterSlot::DropMalformed),
    );
    let mut v6 = inner.clone();
    v6[0] = 0x60;
    decap_case(
        &mut dp,
        &udp_format(PEER, &v6),
        TC_ACT_SHOT,
        Some(CounterSlot::DropMalformed),
    );

    // Outer IP options and first fragments from a peer are refused (the TUN datapath refuses
    // them too: one receive policy); later fragments and other traffic are not ours and are not
    // counted.
    let mut with_options = udp_format(PEER, &inner);
    with_options[14] = 0x46;
    with_options.splice(34..34, [1, 1, 1, 1]);
    decap_case(
        &mut dp,
        &with_options,
        TC_ACT_SHOT,
        Some(CounterSlot::DropUnparsed),
    );
    let mut first_fragment = udp_format(PEER, &inner);
    first_fragment[20] = 0x20;
    decap_case(
        &mut dp,
        &first_fragment,
        TC_ACT_SHOT,
        Some(CounterSlot::DropUnparsed),
    );
    let mut later_fragment = udp_format(PEER, &inner);
    later_fragment[20] = 0x00;
    later_fragment[21] = 0x10;
    decap_case(&mut dp, &later_fragment, TC_ACT_OK, None);
    let other_port = ether(&ipv4(PEER, ME, 17, &udp(53, &inner)));
    decap_case(&mut dp, &other_port, TC_ACT_OK, None);
    let tcp = ether(&ipv4(PEER, ME, 6, &[0; 20]));
    decap_case(&mut dp, &tcp, TC_ACT_OK, None);
    let arp = [
        vec![0xff; 6],
        vec![2, 0, 0, 0, 0, 2],
        vec![0x08, 0x06],
        vec![0; 28],
    ]
    .concat();
    decap_case(&mut dp, &arp, TC_ACT_OK, None);
}

fn decap_vxlan_format_checks_vni_and_mac() {
    let mut dp = dataplane(Encap::Vxlan);
    let inner = inner_ping(PEER_CONTAINER, MY_CONTAINER);
    let out = decap_case(
        &mut dp,
        &vxlan_format(PEER, 1, MY_VTEP, &inner),
        TC_ACT_OK,
        Some(CounterSlot::DecapToStack),
    );
    assert_eq!(&out[14..], &inner[..]);
    decap_case(
        &mut dp,
        &vxlan_format(PEER, 2, MY_VTEP, &inner),
        TC_ACT_SHOT,
        Some(CounterSlot::DropBadVxlan),
    );
    decap_case(
        &mut dp,
        &vxlan_format(PEER, 1, PEER_VTEP, &inner),
        TC_ACT_SHOT,
        Some(CounterSlot::DropBadVxlan),
    );
    decap_case(
        &mut dp,
        &vxlan_format(STRANGER, 1, MY_VTEP, &inner),
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotPeer),
    );
    let mut no_flag = vxlan_format(PEER, 1, MY_VTEP, &inner);
    no_flag[42] = 0;
    decap_case(
        &mut dp,
        &no_flag,
        TC_ACT_SHOT,
        Some(CounterSlot::DropBadVxlan),
    );
    let truncated = vxlan_format(PEER, 1, MY_VTEP, &inner);
    decap_case(
        &mut dp,
        &truncated[..60],
        TC_ACT_SHOT,
        Some(CounterSlot::DropMalformed),
    );
}

fn random_packets_never_fail_a_program() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for encap in [Encap::Udp, Encap::Vxlan] {
        let mut dp = dataplane(encap);
        let mut refused = 0;
        let valid = match encap {
            Encap::Vxlan => {
                vxlan_format(PEER, 1, MY_VTEP, &inner_ping(PEER_CONTAINER, MY_CONTAINER))
            }
            _ => udp_format(PEER, &inner_ping(PEER_CONTAINER, MY_CONTAINER)),
        };
        for i in 0..3000 {
            // Half fully random, half a valid packet with random bytes flipped and a random cut,
            // which reaches deeper into the parser.
            let packet: Vec<u8> = if i % 2 == 0 {
                let len = 14 + (next() % 200) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut p = valid.clone();
                for _ in 0..(1 + next() % 4) {
                    let at = (next() as usize) % p.len();
                    p[at] = next() as u8;
                }
                // Cut anywhere from the end of the outer IP header on.
                p.truncate(34 + (next() as usize) % (p.len() - 33));
                p
            };
            for program in [programs::TC_DECAP, programs::TC_ENCAP, programs::XDP_DECAP] {
                let (verdict, _) = match dp.test_run(program, &packet) {
                    Ok(r) => r,
                    // The kernel's test harness itself refuses frames shorter than the minimal
                    // header of their ethertype (pskb_may_pull in bpf_prog_test_run_skb).
                    Err(_) if packet.len() < MIN_TEST_RUN_FRAME => {
                        refused += 1;
                        continue;
                    }
                    Err(e) => panic!("{program} refused {packet:02x?}: {e}"),
                };
                // TC: ok, shot, redirect; XDP: drop (1), pass (2).
                let allowed: &[i32] = if program == programs::XDP_DECAP {
                    &[1, 2]
                } else {
                    &[TC_ACT_OK, TC_ACT_SHOT, 7]
                };
                assert!(
                    allowed.contains(&verdict),
                    "{program}: verdict {verdict} for {packet:02x?}"
                );
            }
        }
        assert!(
            refused < 1000,
            "{refused} of 6000 runs refused by the harness: test too weak"
        );
        let errors: u64 = dp
            .counters()
            .unwrap()
            .iter()
            .filter(|(s, _)| matches!(s, CounterSlot::DecapError))
            .map(|(_, c)| c.packets)
            .sum();
        assert_eq!(errors, 0, "{encap:?}: decap helper errors on random input");
    }
}

fn xdp_decap_applies_the_same_checks() {
    const XDP_DROP: i32 = 1;
    const XDP_PASS: i32 = 2;
    let mut dp = dataplane(Encap::Udp);
    let inner = inner_ping(PEER_CONTAINER, MY_CONTAINER);
    let (verdict, out) = dp
        .test_run(programs::XDP_DECAP, &udp_format(PEER, &inner))
        .unwrap();
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(&out[14..], &inner[..], "inner packet after XDP decap");
    assert_eq!(
        &out[..14],
        &udp_format(PEER, &inner)[..14],
        "Ethernet header kept"
    );
    let (verdict, _) = dp
        .test_run(programs::XDP_DECAP, &udp_format(STRANGER, &inner))
        .unwrap();
    assert_eq!(verdict, XDP_DROP);
    let spoofed = inner_ping(Ipv4Addr::new(172, 16, 9, 9), MY_CONTAINER);
    let (verdict, _) = dp
        .test_run(programs::XDP_DECAP, &udp_format(PEER, &spoofed))
        .unwrap();
    assert_eq!(verdict, XDP_DROP);
}

fn verdict_of(dp: &mut EbpfDataplane, packet: &[u8]) -> i32 {
    dp.test_run(programs::TC_DECAP, packet).unwrap().0
}

fn peer_updates_keep_the_sender_set_exact() {
    let mut dp = dataplane(Encap::Udp);
    let to_me = |src| udp_format(PEER, &inner_ping(src, MY_CONTAINER));
    let second = net("172.16.3.0/24");
    let second_src = Ipv4Addr::new(172, 16, 3, 9);

    // The same lease again, with another VTEP MAC: the peer stays accepted.
    dp.upsert_peer(PeerRoute {
        subnet: net("172.16.2.0/24"),
        public_ip: PEER,
        vtep_mac: Mac([2, 0, 0, 0, 0, 9]),
        kernel_decap: true,
    })
    .unwrap();
    assert_eq!(verdict_of(&mut dp, &to_me(PEER_CONTAINER)), TC_ACT_OK);

    // Two subnets on one address; one goes: the other's traffic is still accepted.
    dp.upsert_peer(PeerRoute {
        subnet: second,
        public_ip: PEER,
        vtep_mac: Mac(PEER_VTEP),
        kernel_decap: true,
    })
    .unwrap();
    dp.remove_peer(net("172.16.2.0/24")).unwrap();
    assert_eq!(verdict_of(&mut dp, &to_me(second_src)), TC_ACT_OK);
    assert_eq!(
        verdict_of(&mut dp, &to_me(PEER_CONTAINER)),
        TC_ACT_SHOT,
        "removed subnet"
    );

    // The subnet moves to another host: the old address, holding nothing now, is a stranger.
    dp.upsert_peer(PeerRoute {
        subnet: second,
        public_ip: STRANGER,
        vtep_mac: Mac(PEER_VTEP),
        kernel_decap: true,
    })
    .unwrap();
    let before = dp.counters().unwrap();
    assert_eq!(verdict_of(&mut dp, &to_me(second_src)), TC_ACT_SHOT);
    let after = dp.counters().unwrap();
    let not_peer = |c: &[(CounterSlot, overlay_common::Counter)]| {
        c.iter()
            .find(|(s, _)| *s == CounterSlot::DropNotPeer)
            .unwrap()
            .1
            .packets
    };
    assert_eq!(not_peer(&after) - not_peer(&before), 1);
    let from_new_home = udp_format(STRANGER, &inner_ping(second_src, MY_CONTAINER));
    assert_eq!(verdict_of(&mut dp, &from_new_home), TC_ACT_OK);
}

fn decap_refuses_to_relay_and_checks_strangers_first() {
    let mut dp = dataplane(Encap::Udp);
    // A peer (or someone spoofing one) aiming past this host's containers.
    let elsewhere = inner_ping(PEER_CONTAINER, Ipv4Addr::new(192, 0, 2, 1));
    decap_case(
        &mut dp,
        &udp_format(PEER, &elsewhere),
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotLocal),
    );
    // Fragments and IP options from strangers are dropped like any stranger's packet.
    let inner = inner_ping(PEER_CONTAINER, MY_CONTAINER);
    let mut fragment = udp_format(STRANGER, &inner);
    fragment[20] = 0x20;
    decap_case(
        &mut dp,
        &fragment,
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotPeer),
    );
    let mut options = udp_format(STRANGER, &inner);
    options[14] = 0x46;
    options.splice(34..34, [1, 1, 1, 1]);
    decap_case(
        &mut dp,
        &options,
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotPeer),
    );
}

/// At and beyond the maps' capacity: the entry that does not fit is refused with
/// `EbpfError::Full`, naming the map, and every entry already there stays, in the kernel's maps
/// as in what the agent reads back.
fn full_maps_refuse_the_newcomer_and_keep_every_entry() {
    let mut dp = dataplane(Encap::Udp);
    // dataplane() programmed one peer; fill the rest, each with its own address, so the trie
    // and the address table fill together.
    let route = |i: u32| PeerRoute {
        subnet: Subnet::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap(),
        public_ip: Ipv4Addr::from(0xc613_0000 + i),
        vtep_mac: Mac::default(),
        kernel_decap: true,
    };
    for i in 1..MAX_PEERS {
        dp.upsert_peer(route(i)).unwrap();
    }
    // A new host: it does not fit. Its counters are made first (a host the programs accept
    // always has counters), so that is the map that says so.
    match dp.upsert_peer(route(MAX_PEERS)) {
        Err(EbpfError::Full { map, capacity, .. }) => {
            assert_eq!((map, capacity), (PEER_COUNTERS_MAP, MAX_PEERS));
        }
        other => panic!("a peer beyond capacity: {other:?}"),
    }
    // A second subnet of a known host: its address fits (it is there), the subnet does not,
    // and the address is left as it was.
    let second = PeerRoute {
        subnet: net("10.255.255.0/24"),
        ..route(7)
    };
    match dp.upsert_peer(second) {
        Err(EbpfError::Full { map, .. }) => assert_eq!(map, PEERS_MAP),
        other => panic!("a subnet beyond capacity: {other:?}"),
    }
    let (_, programmed) = dp.programmed().unwrap();
    assert_eq!(programmed.len(), MAX_PEERS as usize);
    for i in [1, 7, MAX_PEERS - 1] {
        assert!(programmed.contains(&route(i)), "peer {i} lost");
    }
    assert!(!programmed.iter().any(|p| p.subnet == second.subnet));
    // Room again, the refused one fits.
    dp.remove_peer(route(1).subnet).unwrap();
    dp.upsert_peer(second).unwrap();

    let mut endpoints = dp.take_endpoints().unwrap();
    let ep = Endpoint {
        host_ifindex: 1,
        ..Endpoint::default()
    };
    for i in 0..MAX_ENDPOINTS {
        endpoints
            .upsert(Ipv4Addr::from(0xac10_0100 + i), ep)
            .unwrap();
    }
    match endpoints.upsert(Ipv4Addr::from(0xac11_0000), ep) {
        Err(EbpfError::Full { map, capacity, .. }) => {
            assert_eq!((map, capacity), (ENDPOINTS_MAP, MAX_ENDPOINTS));
        }
        other => panic!("an endpoint beyond capacity: {other:?}"),
    }
    // Replacing one that is there still works on a full map.
    endpoints.upsert(Ipv4Addr::from(0xac10_0100), ep).unwrap();
    assert_eq!(endpoints.entries().unwrap().len(), MAX_ENDPOINTS as usize);
}

/// A TCP segment to a peer's container, its checksum complete, or left to offload (the field
/// holds the pseudo-header sum, as a veth-attached container sends it). From 8.0.0.2: the
/// harness takes the packet's bytes 12..14 for an ethertype (see `fuzz::overlay_packet`).
fn tcp_segment(unfinished: bool) -> Vec<u8> {
    const SRC: Ipv4Addr = Ipv4Addr::new(8, 0, 0, 2);
    let mut tcp = vec![0u8; 20];
    tcp[12] = 0x50;
    tcp[13] = 0x18;
    tcp.extend_from_slice(&[0x5a; 40]);
    let field = if unfinished {
        overlay_common::wire::pseudo_header_sum(
            SRC.octets(),
            PEER_CONTAINER.octets(),
            6,
            tcp.len() as u16,
        )
    } else {
        l4_checksum(SRC, PEER_CONTAINER, 6, &mut tcp, 16)
    };
    tcp[16..18].copy_from_slice(&field.to_be_bytes());
    ipv4(SRC, PEER_CONTAINER, 6, &tcp)
}

/// `program` on `packet`: its verdict and the slots it counted in.
fn run(dp: &mut EbpfDataplane, program: &'static str, packet: &[u8]) -> (i32, Vec<CounterSlot>) {
    let before = dp.counters().unwrap();
    let verdict = dp.test_run(program, packet).unwrap().0;
    let after = dp.counters().unwrap();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((_, b), (_, a))| a.packets != b.packets)
        .map(|((s, _), _)| *s)
        .collect();
    (verdict, moved)
}

/// udp towards flanneld's proxy, which copies datagrams to its TUN as they are: a segment whose
/// checksum was left to offload is redirected to the finishing device (EncapFinishing), a
/// finished one is encapsulated at once; towards a peer that decapsulates in its kernel, or
/// without a finishing device, everything is encapsulated at once. After the detour,
/// `tc_encap_finished` encapsulates what comes in with its Ethernet header, and drops what it
/// cannot send (nothing may reach the finishing device's stack).
fn encap_finishes_offloaded_segments_for_flanneld_only() {
    const TC_ACT_REDIRECT: i32 = 7;
    let mut dp = dataplane(Encap::Udp);
    dp.configure(&Config {
        finish_ifindex: 1,
        ..config(Encap::Udp)
    })
    .unwrap();
    let flanneld = |dp: &mut EbpfDataplane, kernel_decap| {
        dp.upsert_peer(PeerRoute {
            subnet: net("172.16.2.0/24"),
            public_ip: PEER,
            vtep_mac: Mac::default(),
            kernel_decap,
        })
        .unwrap()
    };
    flanneld(&mut dp, false);
    let unfinished = tcp_segment(true);
    let finished = tcp_segment(false);
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &unfinished),
        (TC_ACT_REDIRECT, vec![CounterSlot::EncapFinishing])
    );
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &finished),
        (TC_ACT_REDIRECT, vec![CounterSlot::Encapsulated])
    );
    // ICMP carries no offloaded checksum (40 bytes: the harness's shortest frame).
    let ping = ipv4(Ipv4Addr::new(8, 0, 0, 2), PEER_CONTAINER, 1, &[0; 40]);
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &ping),
        (TC_ACT_REDIRECT, vec![CounterSlot::Encapsulated])
    );
    flanneld(&mut dp, true);
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &unfinished),
        (TC_ACT_REDIRECT, vec![CounterSlot::Encapsulated])
    );
    flanneld(&mut dp, false);
    dp.configure(&config(Encap::Udp)).unwrap();
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &unfinished),
        (TC_ACT_REDIRECT, vec![CounterSlot::Encapsulated]),
        "no finishing device: nothing to redirect to"
    );
    // After the detour: the packet with the Ethernet header tc_encap pushed.
    let (verdict, out) = dp
        .test_run(programs::TC_ENCAP_FINISHED, &ether(&finished))
        .unwrap();
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        &out[14 + 20 + 8..],
        &finished[..],
        "the inner packet, whole"
    );
    let stranger = ipv4(MY_CONTAINER, Ipv4Addr::new(172, 16, 9, 2), 6, &[0; 20]);
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP_FINISHED, &ether(&stranger)),
        (TC_ACT_SHOT, vec![CounterSlot::EncapNoPeer])
    );
}

/// Each peer host's traffic as its counters show it: a packet sent, one received, one refused,
/// each charged to that host once, with the inner packet's length; a stranger's is charged to
/// no one; the host's counters go when its last subnet does.
fn per_peer_counters_charge_each_outcome_to_its_peer() {
    let mut dp = dataplane(Encap::Udp);
    let of = |dp: &EbpfDataplane| -> overlay_common::PeerCounters {
        let all = dp.peer_counters().unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].0, PEER);
        all[0].1
    };
    assert_eq!(of(&dp), Default::default(), "a new peer starts at zero");
    // From 8.0.0.2: the harness reads bytes 12..14 as the ethertype (see `tcp_segment`).
    let out = ipv4(Ipv4Addr::new(8, 0, 0, 2), PEER_CONTAINER, 1, &[0; 40]);
    assert_eq!(
        run(&mut dp, programs::TC_ENCAP, &out).1,
        vec![CounterSlot::Encapsulated]
    );
    let c = of(&dp);
    assert_eq!((c.tx.packets, c.tx.bytes), (1, out.len() as u64));
    let inner = inner_ping(PEER_CONTAINER, MY_CONTAINER);
    decap_case(
        &mut dp,
        &udp_format(PEER, &inner),
        TC_ACT_OK,
        Some(CounterSlot::DecapToStack),
    );
    let c = of(&dp);
    assert_eq!((c.rx.packets, c.rx.bytes), (1, inner.len() as u64));
    let spoofed = udp_format(
        PEER,
        &inner_ping(Ipv4Addr::new(172, 16, 9, 9), MY_CONTAINER),
    );
    decap_case(
        &mut dp,
        &spoofed,
        TC_ACT_SHOT,
        Some(CounterSlot::DropSpoofed),
    );
    decap_case(
        &mut dp,
        &udp_format(STRANGER, &inner),
        TC_ACT_SHOT,
        Some(CounterSlot::DropNotPeer),
    );
    let c = of(&dp);
    assert_eq!(
        (
            c.tx.packets,
            c.rx.packets,
            c.rx_dropped.packets,
            c.tx_dropped.packets
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(
        c.rx_dropped.bytes,
        spoofed.len() as u64,
        "a drop counts the whole frame"
    );
    dp.remove_peer(net("172.16.2.0/24")).unwrap();
    assert!(dp.peer_counters().unwrap().is_empty());
}

overlay_tests::test_main!(
    root per_peer_counters_charge_each_outcome_to_its_peer,
    root encap_finishes_offloaded_segments_for_flanneld_only,
    root decap_udp_format_checks_sender_and_strips_headers,
    root decap_vxlan_format_checks_vni_and_mac,
    root random_packets_never_fail_a_program,
    root xdp_decap_applies_the_same_checks,
    root peer_updates_keep_the_sender_set_exact,
    root decap_refuses_to_relay_and_checks_strangers_first,
    root full_maps_refuse_the_newcomer_and_keep_every_entry,
);
