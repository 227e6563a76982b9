//! The receive policy as one table of cases, run against both datapaths: the eBPF programs
//! through `BPF_PROG_TEST_RUN` (TC and XDP) and the TUN datapath's decision function
//! (`tests/tests/receive_policy.rs`). Each case expects one verdict and one counter, the same on
//! every datapath.
//!
//! The host judging is `ME` (198.18.0.1, subnet 172.16.1.0/24 in the Network 172.16.0.0/12); its
//! one peer is `PEER` (198.18.0.2, holding 172.16.2.0/24); `STRANGER` is no peer.

use std::net::Ipv4Addr;

use overlay_common::{
    maps::{Config, Encap},
    policy::{Outer, Refusal},
    wire,
};

/// This host's underlay address.
pub const ME: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The one peer's public address.
pub const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// An address that is no peer's.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
/// The peer's subnet.
pub const PEER_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 2, 0), 24);
/// This host's subnet.
pub const MY_SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 1, 0), 24);
/// A container behind the peer.
pub const PEER_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 2, 2);
/// A container of this host's.
pub const MY_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 1, 2);
/// A third host's container: the target of a relay attempt.
pub const THIRD_CONTAINER: Ipv4Addr = Ipv4Addr::new(172, 16, 3, 2);
/// This host's VtepMAC.
pub const MY_VTEP: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 1];
/// The peer's VtepMAC.
pub const PEER_VTEP: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 2];
/// The VNI.
pub const VNI: u32 = 1;
/// The overlay MTU of a 1500-byte underlay, for the size case.
pub const MTU: usize = 1500 - wire::VXLAN_ENCAP_LEN;

/// What a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Decapsulated (the eBPF programs count `DecapToStack`: no endpoint is known here).
    Accept,
    /// Refused, counted under the refusal's counter.
    Refuse(Refusal),
}

/// One datagram and its verdict.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it is.
    pub name: String,
    /// The whole Ethernet frame as it reaches the underlay interface.
    pub frame: Vec<u8>,
    /// The verdict, on every datapath (for a frame the kernel drops before any UDP socket, the
    /// eBPF hooks' verdict; the TUN datapath never sees it).
    pub expect: Expect,
}

impl Case {
    /// What a UDP socket on the overlay port would hand the TUN datapath for this frame, as the
    /// kernel does it: the sender, how the outer packet arrived (a first fragment stands for the
    /// datagram reassembled from it), and the UDP payload trimmed to the UDP length. `None` for
    /// a frame the kernel drops first (bad outer checksum or lengths).
    pub fn as_datagram(&self) -> Option<(Ipv4Addr, Outer, &[u8])> {
        let ip = &self.frame[wire::ETH_LEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[0] >> 4 != 4
            || checksum(&ip[..ihl]) != 0
            || tot_len > ip.len()
            || tot_len < ihl + wire::UDP_LEN
        {
            return None;
        }
        let udp = &ip[ihl..tot_len];
        let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
        if udp_len < wire::UDP_LEN || udp_len > udp.len() {
            return None;
        }
        let sender = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let frag = u16::from_be_bytes([ip[6], ip[7]]);
        let outer = Outer {
            ip_options: ihl != wire::IPV4_MIN_LEN,
            fragment: frag & 0x3fff != 0,
        };
        Some((sender, outer, &udp[wire::UDP_LEN..udp_len]))
    }
}

/// Rewrites the outer IPv4 header of `frame` with `edit`, then fixes its total length and
/// checksum, so the kernel would take it.
fn edit_outer(frame: &mut Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) {
    edit(frame);
    let ip = &mut frame[wire::ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = ip.len() as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    set_ipv4_checksum(&mut ip[..ihl]);
}

/// This host's program config for `encap`, as `OverlaySpec::program_config` builds it.
pub fn host_config(encap: Encap) -> Config {
    Config {
        local_ip: ME.octets(),
        underlay_ifindex: 1,
        vni: if encap == Encap::Vxlan { VNI } else { 0 },
        port: port(encap),
        encap: encap as u8,
        vtep_mac: MY_VTEP,
        subnet_prefix_len: MY_SUBNET.1,
        subnet: MY_SUBNET.0.octets(),
        ..Config::default()
    }
}

/// flannel's port for the format.
pub fn port(encap: Encap) -> u16 {
    if encap == Encap::Vxlan { 8472 } else { 8285 }
}

/// The TCP/UDP checksum of `segment` (its checksum field, at `at`, counted as zero) under the
/// IPv4 pseudo-header.
pub fn l4_checksum(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    segment: &mut [u8],
    at: usize,
) -> u16 {
    segment[at..at + 2].fill(0);
    let mut buf = Vec::with_capacity(12 + segment.len());
    buf.extend_from_slice(&src.octets());
    buf.extend_from_slice(&dst.octets());
    buf.extend_from_slice(&[0, protocol]);
    buf.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    buf.extend_from_slice(segment);
    checksum(&buf)
}

/// RFC 1071 checksum.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sets the checksum of the IPv4 `header` (all of it, options included) to what its bytes hold.
pub fn set_ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let c = checksum(header);
    header[10..12].copy_from_slice(&c.to_be_bytes());
}

/// An IPv4 packet with a valid header.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    set_ipv4_checksum(&mut ip);
    ip.extend_from_slice(payload);
    ip
}

/// An ICMP echo request from `src` to `dst`.
pub fn inner_ping(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(src, dst, 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
}

/// The format's UDP payload around `inner`, addressed to `dst_mac` (vxlan).
pub fn payload(encap: Encap, vni: u32, dst_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    match encap {
        Encap::Vxlan => {
            let mut vx = vec![0u8; wire::VXLAN_FORMAT_HEADER];
            vx[wire::vxlan::FLAGS] = wire::VXLAN_FLAG_VNI;
            vx[wire::vxlan::VNI].copy_from_slice(&vni.to_be_bytes()[1..4]);
            vx[wire::vxlan::INNER_DST_MAC].copy_from_slice(&dst_mac);
            vx[wire::vxlan::INNER_SRC_MAC].copy_from_slice(&PEER_VTEP);
            vx[wire::vxlan::INNER_ETHERTYPE].copy_from_slice(&wire::ETH_P_IP.to_be_bytes());
            vx.extend_from_slice(inner);
            vx
        }
        _ => inner.to_vec(),
    }
}

/// The Ethernet frame of a datagram from `outer_src` to this host's overlay port.
pub fn frame(encap: Encap, outer_src: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut udp = vec![0x80, 0x00];
    udp.extend_from_slice(&port(encap).to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut e = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    e.extend_from_slice(&ipv4(outer_src, ME, wire::IPPROTO_UDP, &udp));
    e
}

/// Every case for the format `encap`.
pub fn cases(encap: Encap) -> Vec<Case> {
    let good = inner_ping(PEER_CONTAINER, MY_CONTAINER);
    let wrap = |inner: &[u8]| payload(encap, VNI, MY_VTEP, inner);
    let mut cases = Vec::new();
    let mut add = |name: &str, frame: Vec<u8>, expect: Expect| {
        cases.push(Case {
            name: format!("{encap:?}: {name}"),
            frame,
            expect,
        })
    };
    add("valid", frame(encap, PEER, &wrap(&good)), Expect::Accept);
    add(
        "a non-peer sender",
        frame(encap, STRANGER, &wrap(&good)),
        Expect::Refuse(Refusal::NotPeer),
    );
    add(
        "a spoofed inner source",
        frame(
            encap,
            PEER,
            &wrap(&inner_ping(THIRD_CONTAINER, MY_CONTAINER)),
        ),
        Expect::Refuse(Refusal::Spoofed),
    );
    add(
        "a non-local inner destination (relay to a third host)",
        frame(
            encap,
            PEER,
            &wrap(&inner_ping(PEER_CONTAINER, THIRD_CONTAINER)),
        ),
        Expect::Refuse(Refusal::NotLocal),
    );
    add(
        "a non-local inner destination (relay outside the Network)",
        frame(
            encap,
            PEER,
            &wrap(&inner_ping(PEER_CONTAINER, Ipv4Addr::new(192, 0, 2, 1))),
        ),
        Expect::Refuse(Refusal::NotLocal),
    );
    if encap == Encap::Vxlan {
        let mut no_flag = wrap(&good);
        no_flag[wire::vxlan::FLAGS] = 0;
        add(
            "VXLAN flags without the VNI bit",
            frame(encap, PEER, &no_flag),
            Expect::Refuse(Refusal::BadVxlan),
        );
        add(
            "another VNI",
            frame(encap, PEER, &payload(encap, VNI + 1, MY_VTEP, &good)),
            Expect::Refuse(Refusal::BadVxlan),
        );
        add(
            "a wrong inner destination MAC",
            frame(encap, PEER, &payload(encap, VNI, PEER_VTEP, &good)),
            Expect::Refuse(Refusal::BadVxlan),
        );
        let mut arp = wrap(&good);
        arp[wire::vxlan::INNER_ETHERTYPE].copy_from_slice(&0x0806u16.to_be_bytes());
        add(
            "an inner ARP frame",
            frame(encap, PEER, &arp),
            Expect::Refuse(Refusal::BadVxlan),
        );
        add(
            "a VXLAN header cut short",
            frame(encap, PEER, &wrap(&good)[..10]),
            Expect::Refuse(Refusal::Malformed),
        );
    }
    add(
        "a truncated inner header",
        frame(encap, PEER, &wrap(&good[..12])),
        Expect::Refuse(Refusal::Malformed),
    );
    add(
        "an inner total length beyond the datagram",
        frame(encap, PEER, &wrap(&good[..good.len() - 1])),
        Expect::Refuse(Refusal::Malformed),
    );
    let mut v6 = good.clone();
    v6[0] = 0x60;
    add(
        "an inner IPv6 version",
        frame(encap, PEER, &wrap(&v6)),
        Expect::Refuse(Refusal::Malformed),
    );
    let mut short_ihl = good.clone();
    short_ihl[0] = 0x44;
    add(
        "an inner IHL below 5",
        frame(encap, PEER, &wrap(&short_ihl)),
        Expect::Refuse(Refusal::Malformed),
    );
    // Inner IP options are the containers' business: accepted.
    let mut opts = good.clone();
    opts[0] = 0x46;
    opts.splice(20..20, [1, 1, 1, 1]);
    let total = opts.len() as u16;
    opts[2..4].copy_from_slice(&total.to_be_bytes());
    set_ipv4_checksum(&mut opts[..24]);
    add(
        "inner IP options",
        frame(encap, PEER, &wrap(&opts)),
        Expect::Accept,
    );
    // Outer IP options and fragments: refused from a peer, a stranger is refused as a stranger.
    for (who, sender, expect) in [
        ("a peer", PEER, Expect::Refuse(Refusal::Unparsed)),
        ("a stranger", STRANGER, Expect::Refuse(Refusal::NotPeer)),
    ] {
        let mut options = frame(encap, sender, &wrap(&good));
        edit_outer(&mut options, |f| {
            f[wire::ETH_LEN] = 0x46;
            f.splice(34..34, [1, 1, 1, 1]); // four NOPs
        });
        add(&format!("outer IP options from {who}"), options, expect);
        let mut fragment = frame(encap, sender, &wrap(&good));
        edit_outer(&mut fragment, |f| f[wire::ETH_LEN + 6] = 0x20); // MF: a first fragment
        add(&format!("a first fragment from {who}"), fragment, expect);
    }
    // What lies past the UDP datagram is not the datagram's: an inner packet claiming one byte
    // more than the datagram holds stays malformed with a byte appended to the frame.
    let mut past = frame(encap, PEER, &wrap(&good[..good.len() - 1]));
    past.push(0);
    add(
        "an inner packet reaching past the UDP datagram",
        past,
        Expect::Refuse(Refusal::Malformed),
    );
    // An outer header the kernel would drop: the eBPF hooks refuse it themselves (a stranger's
    // as a stranger's); no UDP socket ever sees it.
    for (who, sender, expect) in [
        ("a peer", PEER, Expect::Refuse(Refusal::Malformed)),
        ("a stranger", STRANGER, Expect::Refuse(Refusal::NotPeer)),
    ] {
        let mut bad = frame(encap, sender, &wrap(&good));
        bad[wire::ETH_LEN + 10] ^= 0xff;
        add(&format!("a bad outer IP checksum from {who}"), bad, expect);
    }
    // Found by the eBPF fuzzer (tests/tests/ebpf_fuzz.rs): an outer version other than 4 under
    // an IPv4 ethertype is dropped by the kernel, so the eBPF decap must not judge its payload
    // (it accepted it when the rest was valid).
    for (who, sender, expect) in [
        ("a peer", PEER, Expect::Refuse(Refusal::Malformed)),
        ("a stranger", STRANGER, Expect::Refuse(Refusal::NotPeer)),
    ] {
        let mut v5 = frame(encap, sender, &wrap(&good));
        edit_outer(&mut v5, |f| f[wire::ETH_LEN] = 0x55);
        add(&format!("an outer IP version 5 from {who}"), v5, expect);
    }
    // Found by the eBPF fuzzer: a datagram shorter than its format's header, with bytes past
    // its UDP length, is malformed; the eBPF decap read those bytes as the rest of the header.
    let mut cut = frame(encap, PEER, &wrap(&good));
    if encap == Encap::Vxlan {
        cut[wire::ETH_LEN + wire::IPV4_MIN_LEN + wire::UDP_LEN + wire::vxlan::FLAGS] = 0;
    }
    let udp_len = (wire::UDP_LEN + 4) as u16;
    cut[wire::ETH_LEN + wire::IPV4_MIN_LEN + 4..][..2].copy_from_slice(&udp_len.to_be_bytes());
    add(
        "a datagram of 4 bytes, a bad header past its UDP length",
        cut,
        Expect::Refuse(Refusal::Malformed),
    );
    // Bigger than the MTU: accepted (see overlay_common::policy: a GSO super-packet looks the same).
    let big = ipv4(PEER_CONTAINER, MY_CONTAINER, 17, &vec![0u8; MTU + 100]);
    add(
        "an inner packet bigger than the MTU",
        frame(encap, PEER, &wrap(&big)),
        Expect::Accept,
    );
    cases
}
