//! Packet counters kept by the eBPF programs in a per-CPU array map.

use bytemuck::{Pod, Zeroable};

/// Name of the per-CPU array map holding one [`Counter`] per [`CounterSlot`].
pub const COUNTERS_MAP: &str = "COUNTERS";

/// What a slot of the counters map counts. The discriminant is the map index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSlot {
    /// Packets seen by the XDP program on the underlay interface.
    XdpIngress = 0,
    /// Packets seen by the TC classifier on the overlay device's egress.
    TcEgress = 1,
}

impl CounterSlot {
    /// Every slot, in index order.
    pub const ALL: [CounterSlot; COUNTER_SLOTS as usize] =
        [CounterSlot::XdpIngress, CounterSlot::TcEgress];

    /// Index of this slot in the counters map.
    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// Number of entries in the counters map.
pub const COUNTER_SLOTS: u32 = 2;

/// Packets and bytes, one per CPU per slot; user space sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted, as the program saw them (L2 for XDP, the skb length for TC).
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
