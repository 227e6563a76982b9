//! Packet counters kept by the eBPF programs in a per-CPU array map, one slot per outcome.

use bytemuck::{Pod, Zeroable};

/// Name of the per-CPU array map holding one [`Counter`] per [`CounterSlot`].
pub const COUNTERS_MAP: &str = "COUNTERS";

macro_rules! slots {
    ($($(#[doc = $doc:literal])* $name:ident = $idx:literal,)*) => {
        /// What a slot of the counters map counts. The discriminant is the map index.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum CounterSlot {
            $($(#[doc = $doc])* $name = $idx,)*
        }

        impl CounterSlot {
            /// Every slot, in index order.
            pub const ALL: &[CounterSlot] = &[$(CounterSlot::$name,)*];

            /// A short name for logs and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(CounterSlot::$name => stringify!($name),)*
                }
            }
        }
    };
}

slots! {
    /// Encapsulated and sent towards a peer.
    Encapsulated = 0,
    /// No peer owns the destination: handed to the TUN device (the userspace slow path).
    EncapNoPeer = 1,
    /// Not an IPv4 packet on the overlay device: handed to the TUN device.
    EncapNotIpv4 = 2,
    /// A helper failed while encapsulating (no room, redirect refused): dropped.
    EncapError = 3,
    /// Decapsulated and delivered straight into a local container.
    DecapDelivered = 4,
    /// Decapsulated and handed to the host stack (unknown endpoint, or delivery via stack).
    DecapToStack = 5,
    /// Overlay packet from an address that is not a known peer: dropped.
    DropNotPeer = 6,
    /// Overlay packet whose inner source is not in the sending peer's subnets: dropped.
    DropSpoofed = 7,
    /// Overlay packet too short or with a bad inner header: dropped.
    DropMalformed = 8,
    /// VXLAN packet with the wrong flags, VNI or inner destination MAC: dropped.
    DropBadVxlan = 9,
    /// Overlay packet from a peer that is a fragment or has IP options: dropped (see
    /// [`crate::policy`]).
    DropUnparsed = 10,
    /// A helper failed while decapsulating: dropped.
    DecapError = 11,
    /// Overlay packet from a peer whose inner destination is not in this host's subnet: dropped
    /// (this host is no relay).
    DropNotLocal = 12,
    /// A packet whose checksum or segmentation was left to offload, for a peer that cannot take
    /// that (see [`crate::maps::PEER_KERNEL_DECAP`]): sent through the finishing device, where
    /// the kernel completes it, then encapsulated.
    EncapFinishing = 13,
}

/// Number of entries in the counters map.
pub const COUNTER_SLOTS: u32 = 14;

impl CounterSlot {
    /// Index of this slot in the counters map.
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Packets and bytes, one per CPU per slot; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (the skb length as the program saw it).
    pub bytes: u64,
}

impl Counter {
    /// Adds one packet of `len` bytes.
    #[inline(always)]
    pub fn add(&mut self, len: u64) {
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(len);
    }

    /// The sum of two counters, as used to fold per-CPU values.
    pub fn merged(self, other: Counter) -> Counter {
        Counter {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

// SAFETY: Counter is repr(C), has no padding (bytemuck::Pod is derived, which checks it) and every
// bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Counter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_indices() {
        assert_eq!(CounterSlot::ALL.len(), COUNTER_SLOTS as usize);
        for (i, slot) in CounterSlot::ALL.iter().enumerate() {
            assert_eq!(slot.index() as usize, i);
        }
    }

    #[test]
    fn merged_adds_fields() {
        let mut a = Counter::default();
        a.add(100);
        a.add(50);
        let b = Counter {
            packets: 1,
            bytes: 7,
        };
        assert_eq!(
            a.merged(b),
            Counter {
                packets: 3,
                bytes: 157
            }
        );
    }
}
