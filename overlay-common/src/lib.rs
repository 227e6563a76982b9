//! Types shared by the kernel side (`overlay-ebpf`) and user space (`overlay-agent`).
//!
//! Every type that crosses the user/kernel boundary through a map is `#[repr(C)]`, spells out its
//! padding as named fields, and derives [`bytemuck::Pod`]: the derive refuses any type with
//! implicit padding, so a layout that would leak uninitialised bytes into a map, or differ between
//! the two compilers, does not compile.
#![no_std]
#![deny(missing_docs)]

pub mod maps;
pub mod net;
pub mod policy;
pub mod stats;
pub mod wire;

pub use stats::{
    COUNTER_SLOTS, COUNTERS_MAP, Counter, CounterSlot, PEER_COUNTERS_MAP, PeerCount, PeerCounters,
};

/// Names of the programs in the eBPF object, shared so the loader and the object cannot drift.
pub mod programs {
    /// TC classifier on the overlay device's egress: encapsulates towards peers.
    pub const TC_ENCAP: &str = "tc_encap";
    /// TC classifier on the underlay interface's ingress: checks the sender and decapsulates.
    pub const TC_DECAP: &str = "tc_decap";
    /// XDP program on the underlay interface: the same checks and decapsulation, opt-in.
    pub const XDP_DECAP: &str = "xdp_decap";
    /// TC classifier on the finishing device's ingress (udp only): encapsulates what the kernel
    /// finished for a receiver that needs finished packets.
    pub const TC_ENCAP_FINISHED: &str = "tc_encap_finished";
}

/// Version of the maps' layout and the programs' contract. Pinned objects of another version are
/// replaced, never reused, and replacing them empties the peer maps until the peer list is read
/// again: so it moves only when a layout does. (Counter slot 10 changed its meaning from "passed,
/// unparsed" to "dropped, unparsed" without moving; its count survives an upgrade under the new
/// name.)
/// 4: `PEER_COUNTERS`.
pub const ABI_VERSION: u32 = 4;
