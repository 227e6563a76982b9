//! The receive policy: what an overlay datagram must be for this host to decapsulate it.
//!
//! One definition, called by the eBPF decap (on the packet in the kernel, through
//! [`Datagram`] over the skb or XDP buffer) and by the TUN forwarder (on the payload its UDP
//! socket received), so the two datapaths accept and refuse exactly the same datagrams and count
//! each refusal under the same [`CounterSlot`]. The datapaths keep only the mechanics: finding
//! the UDP payload and its sender, and moving the inner packet on.
//!
//! In order, so the cheapest and least revealing check comes first:
//! 1. the sender is a peer's public address ([`Refusal::NotPeer`]), whatever the datagram holds;
//! 2. the outer packet was one whole datagram without IP options ([`Refusal::Unparsed`]):
//!    flannel's formats are never fragmented when the MTU in subnet.env is right, and the eBPF
//!    hooks cannot reassemble, so both datapaths refuse what would need it;
//! 3. vxlan: the "VNI present" flag, this host's VNI, this host's VtepMAC as the inner destination
//!    and an IPv4 inner ethertype ([`Refusal::BadVxlan`]);
//! 4. an IPv4 inner header that fits the datagram ([`Refusal::Malformed`]);
//! 5. the inner source lies in a subnet the sender holds ([`Refusal::Spoofed`]);
//! 6. the inner destination lies in this host's subnet ([`Refusal::NotLocal`]): this host is no
//!    relay, neither to other hosts' containers nor to whatever it can route to.
//!
//! What the policy does not judge is size: an inner packet longer than the overlay MTU is
//! accepted by both datapaths. A receiver cannot tell it from a sender's GSO super-packet (which
//! the eBPF encap keeps whole, legitimately far above the MTU), and what a container's interface
//! can take is enforced by the kernel after the datapath (veth drops non-GSO packets above its
//! MTU; routing answers "fragmentation needed").

use crate::{
    CounterSlot,
    maps::{Config, Encap},
    net::in_subnet,
    wire,
};

/// Bytes of a UDP payload, read by copy: a slice in user space, the packet in the kernel.
pub trait Datagram {
    /// The payload's length in bytes.
    fn len(&self) -> usize;
    /// `N` bytes at `offset` of the payload, `None` past its end.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
    /// Whether the payload is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Datagram for [u8] {
    #[inline(always)]
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// The peers, as the policy needs them.
pub trait Peers {
    /// Whether `addr` is some peer's public address.
    fn is_peer(&self, addr: [u8; 4]) -> bool;
    /// The public address of the peer whose subnet holds `inner`, if any.
    fn owner(&self, inner: [u8; 4]) -> Option<[u8; 4]>;
}

/// How the outer packet arrived, as far as the datapath's mechanics can tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outer {
    /// The outer IPv4 header carried options.
    pub ip_options: bool,
    /// The outer packet was (or was reassembled from) a fragment.
    pub fragment: bool,
}

/// Why a datagram was refused; each is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The sender is no peer's public address.
    NotPeer,
    /// A peer's datagram that was fragmented or had IP options.
    Unparsed,
    /// vxlan: wrong flags, VNI, inner destination MAC or inner ethertype.
    BadVxlan,
    /// Too short for its headers, or not a valid IPv4 inner header.
    Malformed,
    /// The inner source is not in a subnet the sender holds.
    Spoofed,
    /// The inner destination is not in this host's subnet.
    NotLocal,
}

impl Refusal {
    /// Every refusal, in the policy's order.
    pub const ALL: [Refusal; 6] = [
        Refusal::NotPeer,
        Refusal::Unparsed,
        Refusal::BadVxlan,
        Refusal::Malformed,
        Refusal::Spoofed,
        Refusal::NotLocal,
    ];

    /// The counter both datapaths count this refusal under.
    pub const fn counter(self) -> CounterSlot {
        match self {
            Refusal::NotPeer => CounterSlot::DropNotPeer,
            Refusal::Unparsed => CounterSlot::DropUnparsed,
            Refusal::BadVxlan => CounterSlot::DropBadVxlan,
            Refusal::Malformed => CounterSlot::DropMalformed,
            Refusal::Spoofed => CounterSlot::DropSpoofed,
            Refusal::NotLocal => CounterSlot::DropNotLocal,
        }
    }

    /// Its position in [`Refusal::ALL`], for per-reason counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A datagram the policy accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Where the inner IPv4 packet starts in the payload (the format's header length).
    pub inner: usize,
    /// The inner packet's length (its IPv4 total length; what follows is padding).
    pub inner_len: usize,
    /// The inner IPv4 header's length (IHL * 4).
    pub header_len: usize,
    /// The inner protocol number.
    pub protocol: u8,
    /// The inner source.
    pub src: [u8; 4],
    /// The inner destination: a local address.
    pub dst: [u8; 4],
}

/// Judges one datagram from `sender` whose UDP payload is `payload`, for the host `cfg`
/// describes.
#[inline(always)]
pub fn judge<D: Datagram + ?Sized, P: Peers>(
    cfg: &Config,
    peers: &P,
    sender: [u8; 4],
    outer: Outer,
    payload: &D,
) -> Result<Accepted, Refusal> {
    if !peers.is_peer(sender) {
        return Err(Refusal::NotPeer);
    }
    if outer.ip_options || outer.fragment {
        return Err(Refusal::Unparsed);
    }
    let inner = match Encap::from_u8(cfg.encap) {
        Encap::Vxlan => {
            // Length first: a datagram too short for the header is malformed whatever bytes lie
            // past its end (in the kernel's packet they are still there to read).
            if payload.len() < wire::VXLAN_FORMAT_HEADER {
                return Err(Refusal::Malformed);
            }
            let Some(vx) = payload.read::<{ wire::VXLAN_FORMAT_HEADER }>(0) else {
                return Err(Refusal::Malformed);
            };
            let vni = cfg.vni.to_be_bytes();
            let ok = vx[wire::vxlan::FLAGS] & wire::VXLAN_FLAG_VNI != 0
                && vx[wire::vxlan::VNI] == vni[1..4]
                && vx[wire::vxlan::INNER_DST_MAC] == cfg.vtep_mac
                && vx[wire::vxlan::INNER_ETHERTYPE] == wire::ETH_P_IP.to_be_bytes();
            if !ok {
                return Err(Refusal::BadVxlan);
            }
            wire::VXLAN_FORMAT_HEADER
        }
        _ => wire::UDP_FORMAT_HEADER,
    };
    let Some(ip) = payload.read::<{ wire::IPV4_MIN_LEN }>(inner) else {
        return Err(Refusal::Malformed);
    };
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let available = payload.len().saturating_sub(inner);
    if ip[0] >> 4 != 4
        || header_len < wire::IPV4_MIN_LEN
        || total_len < header_len
        || total_len > available
    {
        return Err(Refusal::Malformed);
    }
    let src = [ip[12], ip[13], ip[14], ip[15]];
    if peers.owner(src) != Some(sender) {
        return Err(Refusal::Spoofed);
    }
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    if !in_subnet(dst, cfg.subnet, cfg.subnet_prefix_len) {
        return Err(Refusal::NotLocal);
    }
    Ok(Accepted {
        inner,
        inner_len: total_len,
        header_len,
        protocol: ip[9],
        src,
        dst,
    })
}
