//! eBPF programs of the overlay dataplane.
//!
//! Entry points are thin: each calls a `try_*` function and turns its result into the program's
//! verdict, so the logic reads as ordinary fallible Rust.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use overlay_common::{COUNTER_SLOTS, Counter, CounterSlot};

/// Per-CPU packet counters, one slot per [`CounterSlot`]. Per-CPU so that counting needs no atomics
/// and no cache line bounces between cores.
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Ingress on the underlay interface. Counts and passes for now; decapsulation comes with the
/// dataplane.
#[xdp]
pub fn xdp_ingress(ctx: XdpContext) -> u32 {
    match try_xdp_ingress(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

fn try_xdp_ingress(ctx: &XdpContext) -> Result<u32, ()> {
    count(
        CounterSlot::XdpIngress,
        (ctx.data_end() - ctx.data()) as u64,
    )?;
    Ok(xdp_action::XDP_PASS)
}

/// Egress on the overlay device. Counts and hands the packet on (TC_ACT_UNSPEC: the next program
/// in the tcx chain, or the default action) so that it never hides traffic from other programs.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    match try_tc_egress(&ctx) {
        Ok(action) => action,
        Err(()) => TC_ACT_UNSPEC,
    }
}

fn try_tc_egress(ctx: &TcContext) -> Result<i32, ()> {
    count(CounterSlot::TcEgress, u64::from(ctx.len()))?;
    Ok(TC_ACT_UNSPEC)
}

#[inline(always)]
fn count(slot: CounterSlot, len: u64) -> Result<(), ()> {
    let counter = COUNTERS.get_ptr_mut(slot.index()).ok_or(())?;
    // SAFETY: the pointer comes from the map lookup and is valid for this CPU's slot; per-CPU
    // values are never touched concurrently.
    unsafe { (*counter).add(len) };
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, as helpers such as bpf_redirect_neigh's neighbours require.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
