//! Outer headers of flannel's two wire formats, built on the stack and written with one store.

use overlay_common::{
    maps::{Config, Peer},
    wire::{
        ETH_LEN, ETH_P_IP, IPPROTO_UDP, IPV4_MIN_LEN, UDP_ENCAP_LEN, UDP_LEN, VXLAN_ENCAP_LEN,
        ipv4_header_checksum, vxlan_format_header,
    },
};

/// Maps a flow hash onto the ephemeral port range as the kernel's `udp_flow_src_port` does, so
/// receivers spread flows over queues (RSS) and ECMP paths like they do for kernel tunnels.
#[inline(always)]
pub fn flow_src_port(hash: u32) -> u16 {
    const MIN: u64 = 32768;
    const MAX: u64 = 61000;
    (((u64::from(hash) * (MAX - MIN)) >> 32) + MIN) as u16
}

/// Ethernet + outer IPv4 + UDP in front of the inner packet. The Ethernet addresses stay zero:
/// bpf_redirect_neigh fills them from the neighbour table.
#[inline(always)]
pub fn udp_headers(cfg: &Config, peer: &Peer, tos: u8, ip_len: u16, src_port: u16) -> [u8; 42] {
    let mut h = [0u8; ETH_LEN + UDP_ENCAP_LEN];
    write_eth_ip_udp(&mut h, cfg, peer, tos, ip_len, src_port);
    h
}

/// Ethernet + outer IPv4 + UDP + VXLAN + inner Ethernet in front of the inner packet.
#[inline(always)]
pub fn vxlan_headers(cfg: &Config, peer: &Peer, tos: u8, ip_len: u16, src_port: u16) -> [u8; 64] {
    let mut h = [0u8; ETH_LEN + VXLAN_ENCAP_LEN];
    write_eth_ip_udp(&mut h, cfg, peer, tos, ip_len, src_port);
    h[ETH_LEN + IPV4_MIN_LEN + UDP_LEN..].copy_from_slice(&vxlan_format_header(
        cfg.vni,
        peer.vtep_mac,
        cfg.vtep_mac,
    ));
    h
}

#[inline(always)]
fn write_eth_ip_udp(h: &mut [u8], cfg: &Config, peer: &Peer, tos: u8, ip_len: u16, src_port: u16) {
    h[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = &mut h[ETH_LEN..ETH_LEN + IPV4_MIN_LEN];
    ip[0] = 0x45;
    ip[1] = tos;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    // ID 0 with DF: an atomic datagram (RFC 6864). The MTU in subnet.env keeps inner packets small
    // enough that the outer one never needs fragmenting.
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&cfg.local_ip);
    ip[16..20].copy_from_slice(&peer.public_ip);
    let csum = ipv4_header_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut h[ETH_LEN + IPV4_MIN_LEN..ETH_LEN + IPV4_MIN_LEN + UDP_LEN];
    udp[0..2].copy_from_slice(&src_port.to_be_bytes());
    udp[2..4].copy_from_slice(&cfg.port.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len.wrapping_sub(IPV4_MIN_LEN as u16)).to_be_bytes());
    // UDP checksum 0 (allowed over IPv4): nothing for a NIC's checksum offload to get wrong.
}
