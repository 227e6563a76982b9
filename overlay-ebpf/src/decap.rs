//! Decapsulation on the underlay interface's ingress, by TC (default) or XDP (`--decap xdp`).
//!
//! VXLAN and flannel's udp format carry no authentication: flannel accepts whatever reaches its
//! port. Here a packet must come from a known peer's public IP, and its inner source must lie in a
//! subnet that peer holds; everything else is counted and dropped. The checks are shared by both
//! hooks through [`Packet`], which reads bytes the same way (a bounded copy) on either.

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
};

use crate::{CONFIG, ENDPOINTS, Outcome, PEER_ADDRS, PEERS, wire};

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

/// What to do with a packet on the underlay.
pub enum Verdict {
    /// Not an overlay packet of ours (or one we leave to the stack): pass, count if `Some`.
    Pass(Option<CounterSlot>),
    /// Ours and unacceptable: drop and count.
    Drop(CounterSlot),
    /// Ours and valid: strip `strip` bytes after the Ethernet header; the inner packet is for
    /// `inner_dst`.
    Decap { strip: usize, inner_dst: [u8; 4] },
}

#[inline(always)]
pub fn classify<P: Packet>(pkt: &P) -> Verdict {
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::Pass(None);
    };
    let encap = Encap::from_u8(cfg.encap);
    if encap == Encap::None {
        return Verdict::Pass(None);
    }
    // Anything we cannot read far enough is not an overlay packet of ours.
    let Ok(eth_type) = pkt.read::<[u8; 2]>(12) else {
        return Verdict::Pass(None);
    };
    if u16::from_be_bytes(eth_type) != wire::ETH_P_IP {
        return Verdict::Pass(None);
    }
    let Ok(ip) = pkt.read::<[u8; 20]>(wire::ETH_LEN) else {
        return Verdict::Pass(None);
    };
    if ip[9] != wire::IPPROTO_UDP || ip[16..20] != cfg.local_ip {
        return Verdict::Pass(None);
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        // A later fragment has no UDP header to look at: whoever reassembles it decides.
        return Verdict::Pass(None);
    }
    let Ok(ports) = pkt.read::<[u8; 4]>(wire::ETH_LEN + (ihl & 0x3c)) else {
        return Verdict::Pass(None);
    };
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.port {
        return Verdict::Pass(None);
    }
    // Ours from here on. Strangers first, whatever the packet's shape.
    let outer_src: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    if PEER_ADDRS.get_ptr(outer_src).is_none() {
        return Verdict::Drop(CounterSlot::DropNotPeer);
    }
    if ihl != 20 || frag & 0x2000 != 0 {
        // IP options or a first fragment from a peer: rare on an overlay (the MTU prevents
        // fragments), left to the stack, where the userspace path, if it runs, sees the
        // reassembled datagram; without it they are lost.
        return Verdict::Pass(Some(CounterSlot::PassUnparsed));
    }
    let inner = wire::ETH_LEN
        + match encap {
            Encap::Vxlan => {
                let Ok(vx) = pkt.read::<[u8; 22]>(wire::ETH_LEN + 28) else {
                    return Verdict::Drop(CounterSlot::DropMalformed);
                };
                let vni = cfg.vni.to_be_bytes();
                let vxlan_ok = vx[0] & wire::VXLAN_FLAG_VNI != 0
                    && vx[4..7] == vni[1..4]
                    && vx[8..14] == cfg.vtep_mac
                    && u16::from_be_bytes([vx[20], vx[21]]) == wire::ETH_P_IP;
                if !vxlan_ok {
                    return Verdict::Drop(CounterSlot::DropBadVxlan);
                }
                wire::VXLAN_ENCAP_LEN
            }
            _ => wire::UDP_ENCAP_LEN,
        };
    let Ok(inner_ip) = pkt.read::<[u8; 20]>(inner) else {
        return Verdict::Drop(CounterSlot::DropMalformed);
    };
    if inner_ip[0] >> 4 != 4 || inner_ip[0] & 0x0f < 5 {
        return Verdict::Drop(CounterSlot::DropMalformed);
    }
    let inner_src = [inner_ip[12], inner_ip[13], inner_ip[14], inner_ip[15]];
    match PEERS.get(Key::new(32, inner_src)) {
        Some(owner) if owner.public_ip == outer_src => {}
        _ => return Verdict::Drop(CounterSlot::DropSpoofed),
    }
    let inner_dst = [inner_ip[16], inner_ip[17], inner_ip[18], inner_ip[19]];
    if !in_subnet(inner_dst, cfg.subnet, cfg.subnet_prefix_len) {
        return Verdict::Drop(CounterSlot::DropNotLocal);
    }
    Verdict::Decap {
        strip: inner - wire::ETH_LEN,
        inner_dst,
    }
}

#[inline(always)]
fn in_subnet(addr: [u8; 4], subnet: [u8; 4], prefix_len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(subnet) & mask
}

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

pub fn try_tc_decap(ctx: &TcContext) -> Result<Outcome, i64> {
    let (strip, inner_dst) = match classify(ctx) {
        Verdict::Pass(slot) => return Ok(Outcome { slot, action: PASS }),
        Verdict::Drop(slot) => return Ok(Outcome::new(slot, DROP)),
        Verdict::Decap { strip, inner_dst } => (strip, inner_dst),
    };
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
            return Ok(Outcome::new(CounterSlot::DecapError, DROP));
        }
        return Ok(Outcome::new(CounterSlot::DecapDelivered, action as i32));
    }
    // The outer frame was addressed to this host, so the stack takes the inner packet as its own
    // and routes it (to the docker bridge).
    Ok(Outcome::new(CounterSlot::DecapToStack, PASS))
}

pub fn try_xdp_decap(ctx: &XdpContext) -> Result<Outcome, i64> {
    const PASS: i32 = xdp_action::XDP_PASS as i32;
    const DROP: i32 = xdp_action::XDP_DROP as i32;
    let strip = match classify(ctx) {
        Verdict::Pass(slot) => return Ok(Outcome { slot, action: PASS }),
        Verdict::Drop(slot) => return Ok(Outcome::new(slot, DROP)),
        Verdict::Decap { strip, .. } => strip,
    };
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
    Ok(Outcome::new(CounterSlot::DecapToStack, PASS))
}
