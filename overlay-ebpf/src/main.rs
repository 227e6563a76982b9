//! eBPF programs of the overlay dataplane.
//!
//! - `tc_encap` (TC egress on the overlay TUN device): wraps container packets for peers in
//!   flannel's `udp` or `vxlan` format and redirects them out of the underlay interface.
//! - `tc_decap` (TC ingress on the underlay interface): accepts overlay packets from known peers
//!   only, strips the outer headers and delivers the inner packet straight into the container
//!   (`bpf_redirect_peer`) or to the host stack.
//!
//! Entry points are thin: each calls a `try_*` function, counts its outcome and returns its verdict.
#![no_std]
#![no_main]

mod decap;
mod encap;
mod wire;

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
    programs::TcContext,
};
use overlay_common::{
    COUNTER_SLOTS, Counter, CounterSlot,
    maps::{Config, Endpoint, MAX_ENDPOINTS, MAX_PEERS, Peer, PeerAddr},
};

/// Per-CPU packet counters, one slot per [`CounterSlot`]: no atomics, no shared cache lines.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "PEERS")]
static PEERS: LpmTrie<[u8; 4], Peer> = LpmTrie::with_max_entries(MAX_PEERS, 0);

#[map(name = "PEER_ADDRS")]
static PEER_ADDRS: HashMap<[u8; 4], PeerAddr> = HashMap::with_max_entries(MAX_PEERS, 0);

#[map(name = "ENDPOINTS")]
static ENDPOINTS: HashMap<[u8; 4], Endpoint> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

/// What a program decided: the counter to bump (None for traffic that is not ours) and the verdict.
pub struct Outcome {
    slot: Option<CounterSlot>,
    action: i32,
}

impl Outcome {
    const fn new(slot: CounterSlot, action: i32) -> Self {
        Self {
            slot: Some(slot),
            action,
        }
    }

    const fn not_ours(action: i32) -> Self {
        Self { slot: None, action }
    }
}

#[classifier]
pub fn tc_encap(ctx: TcContext) -> i32 {
    finish(&ctx, encap::try_encap(&ctx), CounterSlot::EncapError)
}

#[classifier]
pub fn tc_decap(ctx: TcContext) -> i32 {
    finish(&ctx, decap::try_decap(&ctx), CounterSlot::DecapError)
}

/// Counts the outcome and returns its verdict. A helper error mid-way leaves the packet half
/// rewritten, so it is dropped (and counted) rather than passed on.
#[inline(always)]
fn finish(ctx: &TcContext, result: Result<Outcome, i64>, error_slot: CounterSlot) -> i32 {
    let len = u64::from(ctx.len());
    let outcome = result.unwrap_or(Outcome::new(error_slot, TC_ACT_SHOT as i32));
    if let Some(slot) = outcome.slot
        && let Some(counter) = COUNTERS.get_ptr_mut(slot.index())
    {
        // SAFETY: the pointer comes from the map lookup and is this CPU's value; per-CPU values
        // are never touched concurrently.
        unsafe { (*counter).add(len) };
    }
    outcome.action
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
