//! Maps shared by the programs and the agent: names, keys and values.
//!
//! Addresses are stored as `[u8; 4]` in network byte order, exactly as they sit in the packet, so
//! neither side converts and no endianness bug can hide in between.

use bytemuck::{Pod, Zeroable};

/// LPM trie: peer subnet -> [`Peer`]. Key: aya's `lpm_trie::Key<[u8; 4]>` (prefix length, then
/// the network address).
pub const PEERS_MAP: &str = "PEERS";
/// Hash: peer public IP -> [`PeerAddr`]. Decapsulation accepts packets only from these.
pub const PEER_ADDRS_MAP: &str = "PEER_ADDRS";
/// Hash: local container IP -> [`Endpoint`], for delivering decapsulated packets straight into the
/// container with `bpf_redirect_peer`.
pub const ENDPOINTS_MAP: &str = "ENDPOINTS";
/// Array with one [`Config`].
pub const CONFIG_MAP: &str = "CONFIG";

/// Capacity of the peer maps: flannel clusters are hundreds to a few thousand hosts.
pub const MAX_PEERS: u32 = 16384;
/// Capacity of the local endpoints map: containers on one host.
pub const MAX_ENDPOINTS: u32 = 4096;

/// Wire format of the overlay.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// Not configured yet: the programs pass everything.
    None = 0,
    /// flannel's `udp` backend: the inner IPv4 packet is the whole UDP payload.
    Udp = 1,
    /// flannel's `vxlan` backend (RFC 7348): VXLAN header and inner Ethernet frame.
    Vxlan = 2,
}

impl Encap {
    /// Bytes added in front of the inner IPv4 packet (outer IPv4 + UDP [+ VXLAN + inner
    /// Ethernet]): what the overlay MTU is the underlay's minus.
    pub const fn overhead(self) -> u32 {
        match self {
            Encap::None => 0,
            Encap::Udp => crate::wire::UDP_ENCAP_LEN as u32,
            Encap::Vxlan => crate::wire::VXLAN_ENCAP_LEN as u32,
        }
    }

    /// Bytes the format puts in front of the inner packet inside the UDP payload.
    pub const fn format_header(self) -> usize {
        match self {
            Encap::Vxlan => crate::wire::VXLAN_FORMAT_HEADER,
            _ => crate::wire::UDP_FORMAT_HEADER,
        }
    }

    /// The value stored in [`Config::encap`].
    pub const fn from_u8(v: u8) -> Encap {
        match v {
            1 => Encap::Udp,
            2 => Encap::Vxlan,
            _ => Encap::None,
        }
    }
}

/// [`Config::flags`]: deliver decapsulated packets through the host stack (netfilter FORWARD,
/// docker's rules) instead of straight into the container.
pub const FLAG_DELIVER_VIA_STACK: u8 = 1;

/// [`Config::flags`]: count no per-peer traffic (`--peer-counters=false`); the per-outcome
/// counters are kept. What the per-peer counters cost is the bench's comparison of the two.
pub const FLAG_NO_PEER_COUNTERS: u8 = 2;

/// The host's own settings; one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// This host's address on the underlay interface: the outer source, and the only outer
    /// destination decapsulated. Not the lease's PublicIP, which differs behind NAT.
    pub local_ip: [u8; 4],
    /// Interface index of the underlay interface (where encapsulated packets leave).
    pub underlay_ifindex: u32,
    /// VXLAN network identifier (vxlan only).
    pub vni: u32,
    /// Overlay UDP port, host byte order.
    pub port: u16,
    /// An [`Encap`] as u8.
    pub encap: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// This host's VTEP MAC (vxlan only): the inner destination MAC peers use for us.
    pub vtep_mac: [u8; 6],
    /// Prefix length of [`Config::subnet`].
    pub subnet_prefix_len: u8,
    /// Explicit padding to the 4-byte alignment.
    pub _pad: [u8; 1],
    /// This host's leased subnet: decapsulated packets must be addressed inside it, so a peer
    /// (or someone spoofing one) cannot use this host as a relay to anywhere else.
    pub subnet: [u8; 4],
    /// Interface index of the finishing device (udp only; 0: none): where `tc_encap` sends a
    /// packet whose checksum or segmentation was left to offload when its receiver needs it done
    /// (see [`PEER_KERNEL_DECAP`]).
    pub finish_ifindex: u32,
}

/// Where a peer subnet lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Peer {
    /// The peer host's public IPv4 address (outer destination).
    pub public_ip: [u8; 4],
    /// The peer's VTEP MAC (vxlan only): the inner destination MAC.
    pub vtep_mac: [u8; 6],
    /// `PEER_*` bits.
    pub flags: u8,
    /// Explicit padding to the 4-byte alignment.
    pub _pad: [u8; 1],
}

/// [`Peer::flags`]: the peer decapsulates in its kernel, which keeps a packet's offload state
/// (a TCP/UDP checksum left to the NIC, a GSO batch) across the tunnel. Without it (flanneld's
/// udp proxy, which copies each datagram to its TUN device as it is), such a packet must be
/// finished before it is encapsulated: over veth or virtio no NIC ever finishes it, and the
/// receiving container drops the segment. (vxlan receivers are kernels, or the TUN datapath,
/// which finishes what it receives: only udp needs this.)
pub const PEER_KERNEL_DECAP: u8 = 1;

/// Value of the peer address set. Counts references so two subnets of one host can share it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PeerAddr {
    /// Number of peer subnets announced by this address.
    pub subnets: u32,
}

/// A local container, for direct delivery.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// Interface index of the container's host-side veth (bpf_redirect_peer goes to its peer).
    pub host_ifindex: u32,
    /// The container interface's MAC.
    pub mac: [u8; 6],
    /// The bridge's MAC, as the source of frames the container receives.
    pub bridge_mac: [u8; 6],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): repr(C), no padding (bytemuck::Pod derived), every bit pattern valid.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::PeerAddr {}
    unsafe impl aya::Pod for super::Endpoint {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_side() {
        assert_eq!(core::mem::size_of::<Config>(), 32);
        assert_eq!(core::mem::size_of::<Peer>(), 12);
        assert_eq!(core::mem::size_of::<Endpoint>(), 16);
    }

    #[test]
    fn overheads_match_flannel_mtus() {
        assert_eq!(1500 - Encap::Udp.overhead(), 1472);
        assert_eq!(1500 - Encap::Vxlan.overhead(), 1450);
    }
}
