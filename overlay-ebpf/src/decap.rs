//! Decapsulation on the underlay interface's ingress.
//!
//! VXLAN and flannel's udp format carry no authentication: flannel accepts whatever reaches its
//! port. Here a packet must come from a known peer's public IP, and its inner source must lie in a
//! subnet that peer holds; everything else is counted and dropped.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::bpf_redirect_peer,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use overlay_common::{
    CounterSlot,
    maps::{Encap, FLAG_DELIVER_VIA_STACK},
};

use crate::{CONFIG, ENDPOINTS, Outcome, PEER_ADDRS, PEERS, wire};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

pub fn try_decap(ctx: &TcContext) -> Result<Outcome, i64> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Outcome::not_ours(PASS));
    };
    let encap = Encap::from_u8(cfg.encap);
    if encap == Encap::None {
        return Ok(Outcome::not_ours(PASS));
    }
    // Anything we cannot read far enough is not an overlay packet of ours.
    let Ok(eth_type) = ctx.load::<[u8; 2]>(12) else {
        return Ok(Outcome::not_ours(PASS));
    };
    if u16::from_be_bytes(eth_type) != wire::ETH_P_IP {
        return Ok(Outcome::not_ours(PASS));
    }
    let Ok(ip) = ctx.load::<[u8; 20]>(wire::ETH_LEN) else {
        return Ok(Outcome::not_ours(PASS));
    };
    if ip[9] != wire::IPPROTO_UDP || ip[16..20] != cfg.public_ip {
        return Ok(Outcome::not_ours(PASS));
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        // A later fragment has no UDP header to look at: whoever reassembles it decides.
        return Ok(Outcome::not_ours(PASS));
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(wire::ETH_LEN + ihl) else {
        return Ok(Outcome::not_ours(PASS));
    };
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.port {
        return Ok(Outcome::not_ours(PASS));
    }
    // Ours from here on.
    if ihl != 20 || frag & 0x2000 != 0 {
        // IP options or a first fragment: rare on an overlay, left to the stack (where the
        // userspace path, if it runs, sees the reassembled datagram).
        return Ok(Outcome::new(CounterSlot::PassUnparsed, PASS));
    }
    let outer_src: [u8; 4] = [ip[12], ip[13], ip[14], ip[15]];
    if PEER_ADDRS.get_ptr(outer_src).is_none() {
        return Ok(Outcome::new(CounterSlot::DropNotPeer, DROP));
    }

    let inner = wire::ETH_LEN
        + match encap {
            Encap::Vxlan => {
                let Ok(vx) = ctx.load::<[u8; 22]>(wire::ETH_LEN + 28) else {
                    return Ok(Outcome::new(CounterSlot::DropMalformed, DROP));
                };
                let vni = cfg.vni.to_be_bytes();
                let vxlan_ok = vx[0] & wire::VXLAN_FLAG_VNI != 0
                    && vx[4..7] == vni[1..4]
                    && vx[8..14] == cfg.vtep_mac
                    && u16::from_be_bytes([vx[20], vx[21]]) == wire::ETH_P_IP;
                if !vxlan_ok {
                    return Ok(Outcome::new(CounterSlot::DropBadVxlan, DROP));
                }
                wire::VXLAN_ENCAP_LEN
            }
            _ => wire::UDP_ENCAP_LEN,
        };
    let Ok(inner_ip) = ctx.load::<[u8; 20]>(inner) else {
        return Ok(Outcome::new(CounterSlot::DropMalformed, DROP));
    };
    if inner_ip[0] >> 4 != 4 || inner_ip[0] & 0x0f < 5 {
        return Ok(Outcome::new(CounterSlot::DropMalformed, DROP));
    }
    let inner_src = [inner_ip[12], inner_ip[13], inner_ip[14], inner_ip[15]];
    let inner_dst = [inner_ip[16], inner_ip[17], inner_ip[18], inner_ip[19]];
    match PEERS.get(Key::new(32, inner_src)) {
        Some(owner) if owner.public_ip == outer_src => {}
        _ => return Ok(Outcome::new(CounterSlot::DropSpoofed, DROP)),
    }

    // Strip everything between the outer Ethernet header and the inner IP header. FIXED_GSO keeps
    // gso_size: it counts payload, which decapsulation does not change.
    ctx.adjust_room(
        -((inner - wire::ETH_LEN) as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )?;

    if cfg.flags & FLAG_DELIVER_VIA_STACK == 0
        && let Some(ep) = ENDPOINTS.get_ptr(inner_dst)
    {
        // SAFETY: a valid map value pointer from the lookup.
        let ep = unsafe { *ep };
        let mut macs = [0u8; 12];
        macs[0..6].copy_from_slice(&ep.mac);
        macs[6..12].copy_from_slice(&ep.bridge_mac);
        ctx.store(0, &macs, 0)?;
        // SAFETY: plain helper call; the kernel checks the ifindex.
        let action = unsafe { bpf_redirect_peer(ep.host_ifindex, 0) };
        return Ok(Outcome::new(CounterSlot::DecapDelivered, action as i32));
    }
    // The outer frame was addressed to this host, so the stack takes the inner packet as its own
    // and routes it (to the docker bridge).
    Ok(Outcome::new(CounterSlot::DecapToStack, PASS))
}
