//! The eBPF fuzzer's frames and its model of the kernel (`tests/tests/ebpf_fuzz.rs`): random and
//! mutated underlay frames and overlay-device packets, seeded from the receive-policy table and
//! the captured corpus (`tests/corpus/`), and what the Linux receive path hands the TUN
//! datapath's UDP socket for a frame, so that the eBPF decap's verdict can be compared with the
//! TUN datapath's decision function on the same frame.

use std::{net::Ipv4Addr, path::PathBuf};

use overlay_common::{
    maps::{Config, Encap},
    policy::Outer,
    wire,
};

use crate::receive_cases::{
    self, MY_CONTAINER, PEER, PEER_CONTAINER, STRANGER, THIRD_CONTAINER, checksum,
};

/// A second peer (so a spoofed source can be another peer's container, not only a stranger's).
pub const PEER2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The second peer's subnet.
pub const PEER2_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 4, 0), 24);
/// A container behind the second peer.
pub const PEER2_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 4, 9);

/// xorshift64*: small, deterministic, so a run is repeated by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift never leaves it).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// What the kernel does with an underlay frame, as far as the TUN datapath's socket (bound to
/// the underlay address and the format's port) is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelView {
    /// A valid packet that is not for the socket (another protocol, address or port, a later
    /// fragment): the kernel delivers or forwards it elsewhere, so a decap program must pass it
    /// untouched and uncounted.
    Elsewhere,
    /// Dropped by the kernel before any socket (an outer header it refuses: version, IHL,
    /// lengths, header checksum, UDP length); the TUN datapath never sees it.
    Dropped {
        /// The outer source.
        sender: [u8; 4],
        /// The outer packet's options and fragment flags as they stand in its header.
        outer: Outer,
    },
    /// Delivered to the socket: the sender, how it arrived, and the UDP payload.
    Datagram {
        /// The outer source.
        sender: [u8; 4],
        /// Options, fragment (a first fragment stands for the datagram reassembled from it).
        outer: Outer,
        /// The UDP payload, trimmed to the UDP length.
        payload: Vec<u8>,
    },
}

/// What `ip_rcv` and `udp_rcv` do with `frame` for the host `cfg` describes. The outer UDP
/// checksum is not modelled: a wrong non-zero one is dropped by the kernel but not by the eBPF
/// decap (a documented difference, docs/architecture.md), so the model hands the datagram to the
/// socket and both datapaths judge the same payload.
pub fn kernel_view(cfg: &Config, frame: &[u8]) -> KernelView {
    if frame.len() < wire::ETH_LEN + wire::IPV4_MIN_LEN
        || u16::from_be_bytes([frame[12], frame[13]]) != wire::ETH_P_IP
    {
        return KernelView::Elsewhere;
    }
    let ip = &frame[wire::ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let sender = [ip[12], ip[13], ip[14], ip[15]];
    let outer = Outer {
        ip_options: ihl != wire::IPV4_MIN_LEN,
        fragment: frag & 0x2000 != 0,
    };
    let dropped = KernelView::Dropped { sender, outer };
    // ip_rcv_core.
    if ip[0] >> 4 != 4
        || ihl < wire::IPV4_MIN_LEN
        || ihl > ip.len()
        || checksum(&ip[..ihl]) != 0
        || tot_len > ip.len()
        || tot_len < ihl
    {
        return dropped;
    }
    if ip[9] != wire::IPPROTO_UDP || ip[16..20] != cfg.local_ip || frag & 0x1fff != 0 {
        return KernelView::Elsewhere;
    }
    // __udp4_lib_rcv, on the packet trimmed to its total length.
    let udp = &ip[ihl..tot_len];
    if udp.len() < wire::UDP_LEN {
        return dropped;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    // A first fragment's UDP length is the whole datagram's: it is judged as the datagram
    // reassembled from it, which the policy refuses for being a fragment whatever it holds.
    let udp_len = if outer.fragment {
        udp_len.clamp(wire::UDP_LEN, udp.len())
    } else {
        udp_len
    };
    if udp_len < wire::UDP_LEN || udp_len > udp.len() {
        return dropped;
    }
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.port {
        return KernelView::Elsewhere;
    }
    KernelView::Datagram {
        sender,
        outer,
        payload: udp[wire::UDP_LEN..udp_len].to_vec(),
    }
}

/// Sets the outer IPv4 total length, UDP length and header checksum of `frame` to what its
/// bytes hold, so that a mutation deep in the payload is not refused for its outer header.
pub fn fix_outer(frame: &mut [u8]) {
    if frame.len() < wire::ETH_LEN + wire::IPV4_MIN_LEN {
        return;
    }
    let ip = &mut frame[wire::ETH_LEN..];
    let ihl = (usize::from(ip[0] & 0x0f) * 4).max(wire::IPV4_MIN_LEN);
    if ihl > ip.len() {
        return;
    }
    let total = ip.len().min(usize::from(u16::MAX)) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    if ip.len() >= ihl + wire::UDP_LEN {
        let udp_len = (ip.len() - ihl).min(usize::from(u16::MAX)) as u16;
        ip[ihl + 4..ihl + 6].copy_from_slice(&udp_len.to_be_bytes());
    }
    receive_cases::set_ipv4_checksum(&mut ip[..ihl]);
}

/// Addresses worth writing into a packet: the hosts, their containers, and the edges of the
/// subnets.
const ADDRESSES: [Ipv4Addr; 11] = [
    PEER,
    PEER2,
    STRANGER,
    receive_cases::ME,
    PEER_CONTAINER,
    PEER2_CONTAINER,
    MY_CONTAINER,
    THIRD_CONTAINER,
    Ipv4Addr::new(172, 16, 1, 255),
    Ipv4Addr::new(172, 16, 2, 0),
    Ipv4Addr::UNSPECIFIED,
];

/// Bytes worth writing anywhere.
const INTERESTING: [u8; 10] = [0, 1, 0x08, 0x20, 0x40, 0x45, 0x46, 0x7f, 0x80, 0xff];

/// Offsets of the outer and inner addresses of a frame of `encap`.
fn address_offsets(encap: Encap) -> [usize; 4] {
    let inner = wire::ETH_LEN
        + wire::IPV4_MIN_LEN
        + wire::UDP_LEN
        + if encap == Encap::Vxlan {
            wire::VXLAN_FORMAT_HEADER
        } else {
            0
        };
    [
        wire::ETH_LEN + 12,
        wire::ETH_LEN + 16,
        inner + 12,
        inner + 16,
    ]
}

/// `seed` changed by one to six random edits: bytes flipped or set to telling values,
/// addresses swapped, cuts, growths, splices from `others`; then, half the time, its outer
/// lengths and checksum made consistent again.
pub fn mutate(rng: &mut Rng, encap: Encap, seed: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut p = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        if p.is_empty() {
            p.push(0);
        }
        match rng.below(9) {
            0 | 1 => {
                let at = rng.below(p.len());
                p[at] ^= 1 << rng.below(8);
            }
            2 => {
                let at = rng.below(p.len());
                p[at] = *rng.pick(&INTERESTING);
            }
            3 | 4 => {
                let at = *rng.pick(&address_offsets(encap));
                let addr = rng.pick(&ADDRESSES).octets();
                if at + 4 <= p.len() {
                    p[at..at + 4].copy_from_slice(&addr);
                }
            }
            5 => p.truncate(rng.below(p.len() + 1)),
            6 => {
                let n = 1 + rng.below(64);
                p.extend((0..n).map(|_| rng.bits() as u8));
            }
            7 => {
                let at = rng.below(p.len());
                let n = 1 + rng.below(8);
                if rng.below(2) == 0 {
                    p.drain(at..(at + n).min(p.len()));
                } else {
                    p.splice(at..at, (0..n).map(|_| rng.bits() as u8));
                }
            }
            _ => {
                let other = rng.pick(others);
                let at = rng.below(p.len().min(other.len()).max(1));
                p.truncate(at);
                p.extend_from_slice(other.get(at..).unwrap_or_default());
            }
        }
    }
    if rng.below(2) == 0 {
        fix_outer(&mut p);
    }
    p
}

/// Fully random bytes after a random Ethernet header of type IPv4 (mostly) or anything.
pub fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = wire::ETH_LEN + rng.below(300);
    let mut p: Vec<u8> = (0..len).map(|_| rng.bits() as u8).collect();
    if rng.below(4) != 0 {
        p[12..14].copy_from_slice(&wire::ETH_P_IP.to_be_bytes());
    }
    p
}

/// The committed corpus of captured frames of `encap` (`tests/corpus/<udp|vxlan>/*.frame`, each
/// one whole Ethernet frame as it crossed the underlay), in file name order.
pub fn corpus(encap: Encap) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let dir = corpus_dir(encap);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "frame"));
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p)?;
            Ok((p.display().to_string(), bytes))
        })
        .collect()
}

/// Where the captured frames of `encap` are kept in the tree.
pub fn corpus_dir(encap: Encap) -> PathBuf {
    let name = if encap == Encap::Vxlan {
        "vxlan"
    } else {
        "udp"
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

/// The shortest frame of type IPv4 `BPF_PROG_TEST_RUN` takes: its Ethernet header and an IPv4
/// header.
pub const TEST_RUN_MIN_IPV4: usize = wire::ETH_LEN + wire::IPV4_MIN_LEN;

/// An inner packet as the overlay device's egress sees it (no Ethernet header): a valid IPv4
/// header from an address whose first octets are 8.0 (below) to one of `ADDRESSES`, random protocol, TOS and
/// payload, and then, half the time, mutated.
///
/// Its bytes 12 and 13 (the source's first two octets) are always 08 00: `BPF_PROG_TEST_RUN`
/// takes the packet's first 14 bytes for an Ethernet header and sets the skb's protocol from
/// them, and `bpf_skb_adjust_room` refuses any protocol but IPv4 and IPv6; on the real device
/// the TUN sets ETH_P_IP. The encap program reads the source only for a TCP/UDP pseudo-header
/// sum (whether a udp peer's packet needs finishing). It is never shorter than
/// `TEST_RUN_MIN_IPV4`.
pub fn overlay_packet(rng: &mut Rng) -> Vec<u8> {
    let src = Ipv4Addr::new(8, 0, rng.bits() as u8, rng.bits() as u8);
    let dst = *rng.pick(&ADDRESSES);
    let dst = if rng.below(3) == 0 {
        let o = dst.octets();
        Ipv4Addr::new(o[0], o[1], o[2], rng.bits() as u8)
    } else {
        dst
    };
    let payload: Vec<u8> = (0..TEST_RUN_MIN_IPV4 - wire::IPV4_MIN_LEN + rng.below(200))
        .map(|_| rng.bits() as u8)
        .collect();
    let mut p = receive_cases::ipv4(src, dst, rng.bits() as u8, &payload);
    p[1] = rng.bits() as u8;
    receive_cases::set_ipv4_checksum(&mut p[..wire::IPV4_MIN_LEN]);
    if rng.below(2) == 0 {
        for _ in 0..1 + rng.below(4) {
            match rng.below(3) {
                0 => {
                    let at = rng.below(p.len());
                    p[at] = rng.bits() as u8;
                }
                1 => p.truncate(wire::IPV4_MIN_LEN + rng.below(p.len())),
                _ => p.extend((0..1 + rng.below(16)).map(|_| rng.bits() as u8)),
            }
        }
    }
    // The harness pulls an IPv4 header after the 14 bytes it takes for Ethernet.
    p.resize(p.len().max(TEST_RUN_MIN_IPV4), 0);
    p[12..14].copy_from_slice(&wire::ETH_P_IP.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receive_cases::{Expect, cases, host_config};

    /// The model agrees with the table's own reading of its frames.
    #[test]
    fn the_kernel_model_reads_the_table_as_the_table_does() {
        for encap in [Encap::Udp, Encap::Vxlan] {
            let cfg = host_config(encap);
            for case in cases(encap) {
                let view = kernel_view(&cfg, &case.frame);
                match case.as_datagram() {
                    Some((sender, outer, payload)) => assert_eq!(
                        view,
                        KernelView::Datagram {
                            sender: sender.octets(),
                            outer,
                            payload: payload.to_vec()
                        },
                        "{}",
                        case.name
                    ),
                    None => assert!(
                        matches!(view, KernelView::Dropped { .. }) && case.expect != Expect::Accept,
                        "{}",
                        case.name
                    ),
                }
            }
        }
    }

    #[test]
    fn fixing_the_outer_header_makes_a_mutated_frame_whole() {
        let cfg = host_config(Encap::Udp);
        let case = &cases(Encap::Udp)[0];
        let mut grown = case.frame.clone();
        grown.extend_from_slice(&[1, 2, 3]);
        // Bytes past the UDP length are not the datagram's...
        let KernelView::Datagram { payload, .. } = kernel_view(&cfg, &grown) else {
            panic!("a frame with trailing bytes is dropped");
        };
        assert_eq!(payload.len(), case.as_datagram().unwrap().2.len());
        // ...until the outer lengths say they are.
        fix_outer(&mut grown);
        let KernelView::Datagram { payload, .. } = kernel_view(&cfg, &grown) else {
            panic!("a fixed frame is dropped");
        };
        assert_eq!(payload.len(), case.as_datagram().unwrap().2.len() + 3);
    }
}
