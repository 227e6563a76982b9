//! Encapsulation on the overlay device's egress.
//!
//! The overlay device is a TUN (L3, no Ethernet header), because the host's routing must look
//! like flannel's (`flannel0` / `flannel.<VNI>` holding the Network route). bpf_redirect_neigh
//! drops skbs without a MAC header, so one is pushed first with bpf_skb_change_head; then
//! bpf_skb_adjust_room makes room for the outer headers with the ENCAP flags, which keeps GSO
//! super-packets whole (the underlay device segments them as UDP tunnel packets).
//!
//! A packet from a container usually leaves its checksum to offload (CHECKSUM_PARTIAL) or is a
//! GSO batch; the skb keeps that state across the tunnel, and the NIC or the receiver's kernel
//! finishes it. flanneld's udp proxy cannot: it copies each datagram to its TUN as it is, so over
//! veth or virtio (where no NIC finishes anything) its containers would drop every such segment.
//! For a udp peer without [`PEER_KERNEL_DECAP`], such a packet takes a detour first: out of the
//! finishing device, a veth without checksum offload, where the kernel completes the checksum and
//! segments the batch, and back in at its peer, where `tc_encap_finished` encapsulates it.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{
    CounterSlot,
    maps::{Encap, PEER_KERNEL_DECAP},
    wire::{ETH_LEN, ETH_P_IP, is_unfinished_checksum, l4_checksum_offset, pseudo_header_sum},
};

use crate::{CONFIG, Outcome, PEERS, wire};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the length of the inner L2 header, in the flags' top byte.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Where the packet starts: the overlay TUN's egress has no Ethernet header, the finishing
/// device's ingress has the one `tc_encap` pushed before the detour.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the IPv4 header (`tc_encap`, on the TUN).
    Ip,
    /// At an Ethernet header (`tc_encap_finished`, after the detour).
    Ethernet,
}

pub fn try_encap(ctx: &TcContext, start: Start) -> Result<Outcome, i64> {
    // Whatever the finishing device's ingress cannot encapsulate goes nowhere: its stack would
    // only drop it as addressed to another host.
    let pass = match start {
        Start::Ip => TC_ACT_OK as i32,
        Start::Ethernet => TC_ACT_SHOT as i32,
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Outcome::not_ours(pass));
    };
    let encap = Encap::from_u8(cfg.encap);
    if encap == Encap::None {
        return Ok(Outcome::not_ours(pass));
    }
    let l3 = match start {
        Start::Ip => 0,
        Start::Ethernet => ETH_LEN,
    };
    let ver_ihl: u8 = ctx.load(l3)?;
    if ver_ihl >> 4 != 4 {
        return Ok(Outcome::new(CounterSlot::EncapNotIpv4, pass));
    }
    let tos: u8 = ctx.load(l3 + 1)?;
    let dst: [u8; 4] = ctx.load(l3 + 16)?;
    let Some(peer) = PEERS.get(Key::new(32, dst)) else {
        // Passed on to the TUN device: the userspace path answers or forwards it.
        return Ok(Outcome::new(CounterSlot::EncapNoPeer, pass));
    };
    let peer = *peer;
    // The inner packet as the container sent it, before any header is pushed.
    let inner_len = ctx.len() - l3 as u32;

    if start == Start::Ip {
        // SAFETY: the helper takes the program's own skb pointer.
        let ret = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) };
        if ret != 0 {
            return Err(ret);
        }
        if encap == Encap::Udp
            && cfg.finish_ifindex != 0
            && peer.flags & PEER_KERNEL_DECAP == 0
            && needs_finishing(ctx, ETH_LEN, ver_ihl, dst)?
        {
            // The finishing device's receive path reads the ethertype of the header
            // bpf_skb_change_head left zeroed (the direct path writes it with the outer headers).
            ctx.store(12, &ETH_P_IP.to_be_bytes(), 0)?;
            // SAFETY: as above.
            let action = unsafe { bpf_redirect(cfg.finish_ifindex, 0) };
            // Charged to the peer when tc_encap_finished sends the finished segments.
            return Ok(Outcome::new(CounterSlot::EncapFinishing, action as i32));
        }
    }

    let overhead = encap.overhead();
    let ip_len = (inner_len + overhead).min(u32::from(u16::MAX)) as u16;
    // SAFETY: the helpers take the program's own skb pointer.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let src_port = wire::flow_src_port(hash);

    let mut flags = u64::from(
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_FIXED_GSO,
    );
    if encap == Encap::Vxlan {
        flags |= u64::from(BPF_F_ADJ_ROOM_ENCAP_L2_ETH) | encap_l2(ETH_LEN as u64);
    }
    ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)?;

    match encap {
        Encap::Vxlan => ctx.store(
            0,
            &wire::vxlan_headers(cfg, &peer, tos, ip_len, src_port),
            0,
        )?,
        _ => ctx.store(0, &wire::udp_headers(cfg, &peer, tos, ip_len, src_port), 0)?,
    }

    let action = unsafe { bpf_redirect_neigh(cfg.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if action != i64::from(TC_ACT_REDIRECT) {
        return Ok(Outcome::new(CounterSlot::EncapError, TC_ACT_SHOT as i32)
            .for_peer(peer.public_ip, inner_len));
    }
    Ok(Outcome::new(CounterSlot::Encapsulated, action as i32).for_peer(peer.public_ip, inner_len))
}

/// Whether the IPv4 packet at `l3` (whose first byte and destination the caller read already) is
/// a GSO batch, or TCP/UDP whose checksum was left to offload (the field holds the pseudo-header
/// sum, [`is_unfinished_checksum`]). Fragments carry a finished checksum or none; UDP may have
/// none (0).
#[inline(always)]
fn needs_finishing(ctx: &TcContext, l3: usize, ver_ihl: u8, dst: [u8; 4]) -> Result<bool, i64> {
    // SAFETY: the program's own context; gso_size is a readable __sk_buff field.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        return Ok(true);
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let protocol: u8 = ctx.load(l3 + 9)?;
    let Some(field_at) = l4_checksum_offset(protocol) else {
        return Ok(false);
    };
    let frag: [u8; 2] = ctx.load(l3 + 6)?;
    if u16::from_be_bytes(frag) & 0x3fff != 0 || ihl < 20 {
        return Ok(false);
    }
    let total: [u8; 2] = ctx.load(l3 + 2)?;
    let total = u16::from_be_bytes(total);
    let Some(l4_len) = total.checked_sub(ihl as u16) else {
        return Ok(false);
    };
    // ihl is at most 60: the bound keeps the verifier's idea of the offset small.
    let at = l3 + (ihl & 0x3c) + field_at;
    let field: [u8; 2] = ctx.load(at)?;
    let field = u16::from_be_bytes(field);
    if protocol == overlay_common::wire::IPPROTO_UDP && field == 0 {
        return Ok(false);
    }
    let src: [u8; 4] = ctx.load(l3 + 12)?;
    Ok(is_unfinished_checksum(
        field,
        pseudo_header_sum(src, dst, protocol, l4_len),
    ))
}
