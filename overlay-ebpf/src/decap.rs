//! Decapsulation on the underlay interface's ingress, by TC (default) or XDP (`--decap xdp`).
//!
//! VXLAN and flannel's udp format carry no authentication: flannel accepts whatever reaches its
//! port. Here every overlay packet is judged by the receive policy the TUN datapath shares
//! (`overlay_common::policy`): a known peer sent it, its inner source is that peer's, its inner
//! destination is local. This module only finds the payload, on either hook through [`Packet`]
//! (a bounded copy on both), and moves the accepted inner packet on.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action,
    },
    helpers::{bpf_redirect_peer, bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    CounterSlot,
    maps::{Encap, FLAG_DELIVER_VIA_STACK},
    policy::{self, Datagram, Outer, Peers},
    wire,
};

use crate::{CONFIG, ENDPOINTS, Outcome, PEER_ADDRS, PEERS};

/// Reading packet bytes by copy, on either hook.
pub trait Packet {
    fn read<T: Copy>(&self, offset: usize) -> Result<T, i64>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, i64> {
        self.load(offset)
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, i64> {
        let mut value = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes into `value` or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset as u32,
                value.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        if ret != 0 {
            return Err(ret);
        }
        // SAFETY: initialised by the helper.
        Ok(unsafe { value.assume_init() })
    }
}

/// The UDP payload of an overlay packet, as the shared receive policy reads it.
struct Payload<'a, P: Packet> {
    pkt: &'a P,
    /// Where the payload starts in the packet.
    start: usize,
    len: usize,
}

impl<P: Packet> Datagram for Payload<'_, P> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        // The packet goes on past the datagram (padding, bytes past the UDP length): those are
        // not the datagram's, as `Datagram::read` promises.
        if offset + N > self.len {
            return None;
        }
        self.pkt.read::<[u8; N]>(self.start + offset).ok()
    }
}

/// The peer maps, as the shared receive policy asks them.
struct MapPeers;

impl Peers for MapPeers {
    #[inline(always)]
    fn is_peer(&self, addr: [u8; 4]) -> bool {
        PEER_ADDRS.get_ptr(addr).is_some()
    }

    #[inline(always)]
    fn owner(&self, inner: [u8; 4]) -> Option<[u8; 4]> {
        PEERS.get(Key::new(32, inner)).map(|p| p.public_ip)
    }
}

/// What to do with a packet on the underlay.
pub enum Verdict {
    /// Not an overlay packet of ours: pass, uncounted.
    Pass,
    /// Ours and refused by the receive policy: drop and count (for `sender`, when it is a peer).
    Drop { slot: CounterSlot, sender: [u8; 4] },
    /// Ours and accepted from `sender`: strip `strip` bytes after the Ethernet header; the inner
    /// packet is for `inner_dst`.
    Decap {
        strip: usize,
        inner_dst: [u8; 4],
        sender: [u8; 4],
    },
}

/// The mechanics of the hook: is this an overlay packet addressed to us, and where is its UDP
/// payload. Whether it is acceptable is [`policy::judge`]'s, shared with the TUN datapath.
///
/// `gso`: the skb is a GSO super-packet (a peer's eBPF encap keeps them whole across a veth),
/// whose outer lengths understate its size.
#[inline(always)]
pub fn classify<P: Packet>(pkt: &P, pkt_len: usize, gso: bool) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    if Encap::from_u8(cfg.encap) == Encap::None {
        return Verdict::Pass;
    }
    // Anything we cannot read far enough is not an overlay packet of ours.
    let Ok(eth_type) = pkt.read::<[u8; 2]>(12) else {
        return Verdict::Pass;
    };
    if u16::from_be_bytes(eth_type) != wire::ETH_P_IP {
        return Verdict::Pass;
    }
    let Ok(ip) = pkt.read::<[u8; wire::IPV4_MIN_LEN]>(wire::ETH_LEN) else {
        return Verdict::Pass;
    };
    if ip[9] != wire::IPPROTO_UDP || ip[16..20] != cfg.local_ip {
        return Verdict::Pass;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        // A later fragment has no UDP header to look at: it is not recognisably ours. Its first
        // fragment was refused below, so the stack cannot reassemble it either.
        return Verdict::Pass;
    }
    let udp_at = wire::ETH_LEN + (ihl & 0x3c);
    let Ok(udp) = pkt.read::<[u8; wire::UDP_LEN]>(udp_at) else {
        return Verdict::Pass;
    };
    if u16::from_be_bytes([udp[2], udp[3]]) != cfg.port {
        return Verdict::Pass;
    }
    let start = udp_at + wire::UDP_LEN;
    // The datagram as a UDP socket would get it: the kernel drops a packet whose outer version,
    // header checksum or lengths are wrong, and trims what follows the UDP length (Ethernet padding, or
    // bytes smuggled past the datagram). A super-packet is taken whole. An outer header the
    // kernel would drop leaves nothing to judge: a stranger is still refused as one, a peer's
    // packet as malformed.
    let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let end = if gso {
        pkt_len
    } else if ip[0] >> 4 == 4
        && wire::ipv4_header_checksum(&ip) == 0
        && wire::ETH_LEN + tot_len <= pkt_len
        && udp_len >= wire::UDP_LEN
        && udp_at + udp_len <= wire::ETH_LEN + tot_len
    {
        udp_at + udp_len
    } else {
        start
    };
    let payload = Payload {
        pkt,
        start,
        len: end.saturating_sub(start),
    };
    let outer = Outer {
        ip_options: ihl != wire::IPV4_MIN_LEN,
        fragment: frag & 0x2000 != 0,
    };
    let sender = [ip[12], ip[13], ip[14], ip[15]];
    match policy::judge(cfg, &MapPeers, sender, outer, &payload) {
        Err(refusal) => Verdict::Drop {
            slot: refusal.counter(),
            sender,
        },
        // No options (the policy refused them), so the payload starts at a fixed offset.
        Ok(accepted) => Verdict::Decap {
            strip: wire::IPV4_MIN_LEN + wire::UDP_LEN + accepted.inner,
            inner_dst: accepted.dst,
            sender,
        },
    }
}

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

pub fn try_tc_decap(ctx: &TcContext) -> Result<Outcome, i64> {
    // SAFETY: the program's own skb; gso_size is a plain field of __sk_buff.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let len = ctx.len();
    let (strip, inner_dst, sender) = match classify(ctx, len as usize, gso) {
        Verdict::Pass => return Ok(Outcome::not_ours(PASS)),
        Verdict::Drop { slot, sender } => return Ok(Outcome::new(slot, DROP).for_peer(sender, len)),
        Verdict::Decap {
            strip,
            inner_dst,
            sender,
        } => (strip, inner_dst, sender),
    };
    let inner_len = len.saturating_sub((wire::ETH_LEN + strip) as u32);
    // FIXED_GSO keeps gso_size: it counts payload, which decapsulation does not change.
    ctx.adjust_room(
        -(strip as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )?;
    let deliver_direct = CONFIG
        .get(0)
        .is_some_and(|c| c.flags & FLAG_DELIVER_VIA_STACK == 0);
    if deliver_direct && let Some(ep) = ENDPOINTS.get_ptr(inner_dst) {
        // SAFETY: a valid map value pointer from the lookup.
        let ep = unsafe { *ep };
        let mut macs = [0u8; 12];
        macs[0..6].copy_from_slice(&ep.mac);
        macs[6..12].copy_from_slice(&ep.bridge_mac);
        ctx.store(0, &macs, 0)?;
        // Straight into the container's namespace, skipping the host's routing and bridge.
        // SAFETY: plain helper call; the kernel checks the ifindex.
        let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) };
        if action != i64::from(TC_ACT_REDIRECT) {
            return Ok(Outcome::new(CounterSlot::DecapError, DROP).for_peer(sender, len));
        }
        return Ok(
            Outcome::new(CounterSlot::DecapDelivered, action as i32).for_peer(sender, inner_len)
        );
    }
    // The outer frame was addressed to this host, so the stack takes the inner packet as its own
    // and routes it (to the docker bridge).
    Ok(Outcome::new(CounterSlot::DecapToStack, PASS).for_peer(sender, inner_len))
}

pub fn try_xdp_decap(ctx: &XdpContext) -> Result<Outcome, i64> {
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    let len = ctx.data_end() - ctx.data();
    let (strip, sender) = match classify(ctx, len, false) {
        Verdict::Pass => return Ok(Outcome::not_ours(PASS)),
        Verdict::Drop { slot, sender } => {
            return Ok(Outcome::new(slot, DROP).for_peer(sender, len as u32));
        }
        Verdict::Decap { strip, sender, .. } => (strip, sender),
    };
    let inner_len = len.saturating_sub(wire::ETH_LEN + strip) as u32;
    // Move the Ethernet header forward over the outer headers, then drop what is in front.
    let mut eth: [u8; wire::ETH_LEN] = ctx.read(0)?;
    // SAFETY: helpers on the program's own context; they check bounds.
    unsafe {
        let ret = bpf_xdp_store_bytes(
            ctx.ctx,
            strip as u32,
            eth.as_mut_ptr().cast(),
            wire::ETH_LEN as u32,
        );
        if ret != 0 {
            return Err(ret);
        }
        let ret = bpf_xdp_adjust_head(ctx.ctx, strip as i32);
        if ret != 0 {
            return Err(i64::from(ret));
        }
    }
    // Before GRO, so the stack aggregates the inner flows; it routes them to the bridge.
    Ok(Outcome::new(CounterSlot::DecapToStack, PASS).for_peer(sender, inner_len))
}
