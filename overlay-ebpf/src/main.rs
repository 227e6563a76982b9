//! eBPF programs of the overlay dataplane.
//!
//! - `tc_encap` (TC egress on the overlay TUN device): wraps container packets for peers in
//!   flannel's `udp` or `vxlan` format and redirects them out of the underlay interface; a packet
//!   left to offload for a receiver that needs it finished goes through the finishing device.
//! - `tc_encap_finished` (TC ingress on the finishing device's peer, udp only): the same
//!   encapsulation for what the kernel finished there.
//! - `tc_decap` (TC ingress on the underlay interface): accepts overlay packets from known peers
//!   only, strips the outer headers and delivers the inner packet straight into the container
//!   (`bpf_redirect_peer`) or to the host stack.
//! - `xdp_decap` (XDP on the underlay interface, opt-in): the same checks before the skb exists.
//!
//! Entry points are thin: each calls a `try_*` function, counts its outcome and returns its verdict.
#![no_std]
#![no_main]

mod decap;
mod encap;
mod wire;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
    programs::{TcContext, XdpContext},
};
use overlay_common::{
    COUNTER_SLOTS, Counter, CounterSlot, PeerCounters,
    maps::{Config, Endpoint, FLAG_NO_PEER_COUNTERS, MAX_ENDPOINTS, MAX_PEERS, Peer, PeerAddr},
};

/// Per-CPU packet counters, one slot per [`CounterSlot`]: no atomics, no shared cache lines.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Per-CPU traffic per peer host, keyed by its public address; entries are the agent's to make.
#[map(name = "PEER_COUNTERS")]
static PEER_COUNTERS: PerCpuHashMap<[u8; 4], PeerCounters> =
    PerCpuHashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "PEERS")]
static PEERS: LpmTrie<[u8; 4], Peer> = LpmTrie::with_max_entries(MAX_PEERS, 0);

#[map(name = "PEER_ADDRS")]
static PEER_ADDRS: HashMap<[u8; 4], PeerAddr> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<[u8; 4], Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// What a program decided: the counter to bump (None for traffic that is not ours), the verdict,
/// and the peer host the packet was for or from, if one is known.
pub struct Outcome {
    pub slot: Option<CounterSlot>,
    pub action: i32,
    pub peer: Option<PeerHit>,
}

/// The peer a packet concerns, and the bytes to charge it (see [`PeerCounters`]).
#[derive(Clone, Copy)]
pub struct PeerHit {
    pub addr: [u8; 4],
    pub len: u32,
}

impl Outcome {
    pub const fn new(slot: CounterSlot, action: i32) -> Self {
        Self {
            slot: Some(slot),
            action,
            peer: None,
        }
    }

    pub const fn not_ours(action: i32) -> Self {
        Self {
            slot: None,
            action,
            peer: None,
        }
    }

    /// The same outcome, charged to the peer at `addr`.
    pub const fn for_peer(mut self, addr: [u8; 4], len: u32) -> Self {
        self.peer = Some(PeerHit { addr, len });
        self
    }
}

#[classifier]
pub fn tc_encap(ctx: TcContext) -> i32 {
    // Lengths are counted as the packet arrived, before any rewrite.
    let len = u64::from(ctx.len());
    finish(
        len,
        encap::try_encap(&ctx, encap::Start::Ip),
        CounterSlot::EncapError,
    )
}

#[classifier]
pub fn tc_encap_finished(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    finish(
        len,
        encap::try_encap(&ctx, encap::Start::Ethernet),
        CounterSlot::EncapError,
    )
}

#[classifier]
pub fn tc_decap(ctx: TcContext) -> i32 {
    let len = u64::from(ctx.len());
    finish(len, decap::try_tc_decap(&ctx), CounterSlot::DecapError)
}

/// The same checks as `tc_decap`, before the stack allocates an skb: opt-in (`--decap xdp`), for
/// NICs where decapsulating before GRO pays off. Delivers through the stack only.
#[xdp]
pub fn xdp_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let outcome = decap::try_xdp_decap(&ctx).unwrap_or(Outcome::new(
        CounterSlot::DecapError,
        xdp_action::XDP_DROP as i32,
    ));
    count(&outcome, len);
    outcome.action as u32
}

/// Counts the outcome and returns its verdict. A helper error mid-way leaves the packet half
/// rewritten, so it is dropped (and counted) rather than passed on.
#[inline(always)]
fn finish(len: u64, result: Result<Outcome, i64>, error_slot: CounterSlot) -> i32 {
    let outcome = result.unwrap_or(Outcome::new(error_slot, TC_ACT_SHOT as i32));
    count(&outcome, len);
    outcome.action
}

#[inline(always)]
fn count(outcome: &Outcome, len: u64) {
    let Some(slot) = outcome.slot else {
        return;
    };
    if let Some(counter) = COUNTERS.get_ptr_mut(slot.index()) {
        // SAFETY: the pointer comes from the map lookup and is this CPU's value; per-CPU values
        // are never touched concurrently.
        unsafe { (*counter).add(len) };
    }
    if let (Some(hit), Some(which)) = (outcome.peer, slot.peer_count())
        && CONFIG
            .get(0)
            .is_some_and(|c| c.flags & FLAG_NO_PEER_COUNTERS == 0)
        && let Some(counters) = PEER_COUNTERS.get_ptr_mut(&hit.addr)
    {
        // SAFETY: as above.
        unsafe { (*counters).add(which, u64::from(hit.len)) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: bpf_redirect_neigh and bpf_redirect_peer are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
