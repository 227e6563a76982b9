//! flannel's two wire formats, as one set of lengths and offsets: the eBPF programs build and
//! parse them, the TUN datapath's codec does the same in user space, the agent derives the MTU
//! from them, and the tests craft packets with them.
//!
//! - `udp`: outer IPv4 + UDP (port 8285); the inner IPv4 packet is the whole UDP payload.
//! - `vxlan` (RFC 7348): outer IPv4 + UDP (port 8472) + an 8-byte VXLAN header (flags 0x08, VNI
//!   in bytes 4..7) + an inner Ethernet header (destination: the receiver's VtepMAC) in front of
//!   the inner IPv4 packet.

/// An Ethernet header.
pub const ETH_LEN: usize = 14;
/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// The shortest IPv4 header (no options).
pub const IPV4_MIN_LEN: usize = 20;
/// The longest IPv4 header (IHL 15).
pub const IPV4_MAX_LEN: usize = 60;
/// A UDP header.
pub const UDP_LEN: usize = 8;
/// A VXLAN header.
pub const VXLAN_LEN: usize = 8;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// VXLAN flags byte: "VNI present" (RFC 7348 section 5).
pub const VXLAN_FLAG_VNI: u8 = 0x08;

/// Offsets inside the vxlan format's UDP payload (VXLAN header, then inner Ethernet).
pub mod vxlan {
    /// The flags byte.
    pub const FLAGS: usize = 0;
    /// The 24-bit VNI, big-endian.
    pub const VNI: core::ops::Range<usize> = 4..7;
    /// The inner Ethernet destination: the receiver's VtepMAC.
    pub const INNER_DST_MAC: core::ops::Range<usize> = 8..14;
    /// The inner Ethernet source: the sender's VtepMAC.
    pub const INNER_SRC_MAC: core::ops::Range<usize> = 14..20;
    /// The inner ethertype.
    pub const INNER_ETHERTYPE: core::ops::Range<usize> = 20..22;
}

/// Bytes a format puts in front of the inner packet inside the UDP payload: nothing for udp,
/// the VXLAN header and the inner Ethernet header for vxlan.
pub const UDP_FORMAT_HEADER: usize = 0;
/// See [`UDP_FORMAT_HEADER`].
pub const VXLAN_FORMAT_HEADER: usize = VXLAN_LEN + ETH_LEN;
/// The longest format header: the headroom a forwarder keeps in front of an inner packet.
pub const MAX_FORMAT_HEADER: usize = VXLAN_FORMAT_HEADER;

/// Outer headers of the `udp` format after the Ethernet header: IPv4 + UDP.
pub const UDP_ENCAP_LEN: usize = IPV4_MIN_LEN + UDP_LEN + UDP_FORMAT_HEADER;
/// Outer headers of the `vxlan` format after the Ethernet header: IPv4 + UDP + VXLAN + inner
/// Ethernet. Also the MTU overhead flannel uses for vxlan (50).
pub const VXLAN_ENCAP_LEN: usize = IPV4_MIN_LEN + UDP_LEN + VXLAN_FORMAT_HEADER;

/// RFC 1071 checksum of the 20-byte IPv4 header `ip` starts with: with the checksum field zero,
/// the value to put there; over a header as received, zero when it is intact.
#[inline(always)]
pub fn ipv4_header_checksum(ip: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < IPV4_MIN_LEN {
        sum += u32::from(u16::from_be_bytes([ip[i], ip[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Where an IPv4 TCP or UDP header keeps its checksum, from the start of that header.
#[inline(always)]
pub const fn l4_checksum_offset(protocol: u8) -> Option<usize> {
    match protocol {
        IPPROTO_TCP => Some(16),
        IPPROTO_UDP => Some(6),
        _ => None,
    }
}

/// The folded (not complemented) sum of the IPv4 pseudo-header: both addresses, the protocol and
/// the TCP/UDP length. What a checksum left to offload holds until a NIC finishes it.
#[inline(always)]
pub fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], protocol: u8, l4_len: u16) -> u16 {
    let mut sum = u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([dst[0], dst[1]]))
        + u32::from(u16::from_be_bytes([dst[2], dst[3]]))
        + u32::from(protocol)
        + u32::from(l4_len);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Whether a TCP/UDP checksum field holds only the pseudo-header sum (or its complement, as some
/// senders leave it): a checksum left to offload and never finished. The one rule by which the
/// eBPF encap decides a packet needs finishing and the TUN datapath finishes what it receives;
/// a finished checksum matches by chance once in 32768 packets, which costs that packet the
/// finishing path, nothing more.
#[inline(always)]
pub fn is_unfinished_checksum(field: u16, pseudo: u16) -> bool {
    field == pseudo || field == !pseudo
}

/// The vxlan format's header in front of an inner IPv4 packet: the VXLAN header (the "VNI
/// present" flag, `vni`) and the inner Ethernet header from `src_mac` to `dst_mac` (the
/// receiver's VtepMAC). The one writer of it, for the eBPF encap and the TUN codec.
#[inline(always)]
pub fn vxlan_format_header(
    vni: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> [u8; VXLAN_FORMAT_HEADER] {
    let mut h = [0u8; VXLAN_FORMAT_HEADER];
    h[vxlan::FLAGS] = VXLAN_FLAG_VNI;
    let vni = vni.to_be_bytes();
    h[4] = vni[1];
    h[5] = vni[2];
    h[6] = vni[3];
    h[8..14].copy_from_slice(&dst_mac);
    h[14..20].copy_from_slice(&src_mac);
    h[20..22].copy_from_slice(&ETH_P_IP.to_be_bytes());
    h
}
