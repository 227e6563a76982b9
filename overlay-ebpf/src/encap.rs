//! Encapsulation on the overlay device's egress.
//!
//! The overlay device is a TUN (L3, no Ethernet header), because the host's routing must look
//! like flannel's (`flannel0` / `flannel.<VNI>` holding the Network route). bpf_redirect_neigh
//! drops skbs without a MAC header, so one is pushed first with bpf_skb_change_head; then
//! bpf_skb_adjust_room makes room for the outer headers with the ENCAP flags, which keeps GSO
//! super-packets whole (the underlay device segments them as UDP tunnel packets).

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_get_hash_recalc, bpf_redirect_neigh, bpf_skb_change_head},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{CounterSlot, maps::Encap, wire::ETH_LEN};

use crate::{CONFIG, Outcome, PEERS, wire};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the length of the inner L2 header, in the flags' top byte.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

pub fn try_encap(ctx: &TcContext) -> Result<Outcome, i64> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Outcome::not_ours(TC_ACT_OK as i32));
    };
    let encap = Encap::from_u8(cfg.encap);
    if encap == Encap::None {
        return Ok(Outcome::not_ours(TC_ACT_OK as i32));
    }
    // L3 device: the packet starts with the IP header.
    let ver_ihl: u8 = ctx.load(0)?;
    if ver_ihl >> 4 != 4 {
        return Ok(Outcome::new(CounterSlot::EncapNotIpv4, TC_ACT_OK as i32));
    }
    let tos: u8 = ctx.load(1)?;
    let dst: [u8; 4] = ctx.load(16)?;
    let Some(peer) = PEERS.get(Key::new(32, dst)) else {
        // Passed on to the TUN device: the userspace path answers or forwards it.
        return Ok(Outcome::new(CounterSlot::EncapNoPeer, TC_ACT_OK as i32));
    };
    let peer = *peer;

    let inner_len = ctx.len();
    let overhead = encap.overhead();
    let ip_len = (inner_len + overhead).min(u32::from(u16::MAX)) as u16;
    // SAFETY: the helpers take the program's own skb pointer.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let src_port = wire::flow_src_port(hash);

    let ret = unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_LEN as u32, 0) };
    if ret != 0 {
        return Err(ret);
    }
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
        return Ok(Outcome::new(CounterSlot::EncapError, TC_ACT_SHOT as i32));
    }
    Ok(Outcome::new(CounterSlot::Encapsulated, action as i32))
}
