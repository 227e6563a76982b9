//! Packet counters kept by the eBPF programs: a per-CPU array with one slot per outcome, and a
//! per-CPU hash with one entry per peer host. Which per-peer counter an outcome adds to is
//! [`CounterSlot::peer_count`], the one rule every program and the TUN datapath count by.

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

    /// Whether the packet was dropped (refused by the receive policy, or a helper failed).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            CounterSlot::EncapError
                | CounterSlot::DropNotPeer
                | CounterSlot::DropSpoofed
                | CounterSlot::DropMalformed
                | CounterSlot::DropBadVxlan
                | CounterSlot::DropUnparsed
                | CounterSlot::DecapError
                | CounterSlot::DropNotLocal
        )
    }

    /// The per-peer counter an outcome for a known peer adds to. `None` for outcomes that
    /// concern no peer (no route, not IPv4, a stranger's datagram) and for the finishing detour,
    /// whose packets are counted once, when `tc_encap_finished` sends them.
    pub const fn peer_count(self) -> Option<PeerCount> {
        match self {
            CounterSlot::Encapsulated => Some(PeerCount::Transmitted),
            CounterSlot::EncapError => Some(PeerCount::TransmitDropped),
            CounterSlot::DecapDelivered | CounterSlot::DecapToStack => Some(PeerCount::Received),
            CounterSlot::DropSpoofed
            | CounterSlot::DropMalformed
            | CounterSlot::DropBadVxlan
            | CounterSlot::DropUnparsed
            | CounterSlot::DecapError
            | CounterSlot::DropNotLocal => Some(PeerCount::ReceiveDropped),
            CounterSlot::EncapNoPeer
            | CounterSlot::EncapNotIpv4
            | CounterSlot::DropNotPeer
            | CounterSlot::EncapFinishing => None,
        }
    }
}

/// Name of the per-CPU hash map: peer public IPv4 address (`[u8; 4]`, network order) ->
/// [`PeerCounters`]. The agent creates an entry when a host becomes a peer and removes it when
/// its last subnet goes; the programs only add to entries that exist, so traffic never grows the
/// map.
pub const PEER_COUNTERS_MAP: &str = "PEER_COUNTERS";

/// Which of a peer's counters an outcome adds to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerCount {
    /// Encapsulated and sent to the peer.
    Transmitted,
    /// Meant for the peer, dropped while encapsulating.
    TransmitDropped,
    /// Received from the peer and decapsulated.
    Received,
    /// Received from the peer and refused by the receive policy (or a helper failed).
    ReceiveDropped,
}

/// One peer host's traffic, per CPU. Packets are skbs as the program saw them (a GSO batch counts
/// once); bytes are the inner IPv4 packets' for what was sent or received, the outer frame's for
/// what was refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PeerCounters {
    /// [`PeerCount::Transmitted`].
    pub tx: Counter,
    /// [`PeerCount::TransmitDropped`].
    pub tx_dropped: Counter,
    /// [`PeerCount::Received`].
    pub rx: Counter,
    /// [`PeerCount::ReceiveDropped`].
    pub rx_dropped: Counter,
}

impl PeerCounters {
    /// Adds one packet of `len` bytes to `which`.
    #[inline(always)]
    pub fn add(&mut self, which: PeerCount, len: u64) {
        match which {
            PeerCount::Transmitted => self.tx.add(len),
            PeerCount::TransmitDropped => self.tx_dropped.add(len),
            PeerCount::Received => self.rx.add(len),
            PeerCount::ReceiveDropped => self.rx_dropped.add(len),
        }
    }

    /// The sum of two, as used to fold per-CPU values.
    pub fn merged(self, o: PeerCounters) -> PeerCounters {
        PeerCounters {
            tx: self.tx.merged(o.tx),
            tx_dropped: self.tx_dropped.merged(o.tx_dropped),
            rx: self.rx.merged(o.rx),
            rx_dropped: self.rx_dropped.merged(o.rx_dropped),
        }
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
// SAFETY: as for Counter: four Counters, no padding (Pod derived).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerCounters {}

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
    fn every_peer_outcome_is_counted_once_per_direction() {
        for &slot in CounterSlot::ALL {
            match slot.peer_count() {
                Some(PeerCount::TransmitDropped | PeerCount::ReceiveDropped) => {
                    assert!(slot.is_drop(), "{slot:?}")
                }
                Some(PeerCount::Transmitted | PeerCount::Received) => {
                    assert!(!slot.is_drop(), "{slot:?}")
                }
                // A stranger's datagram is a drop no peer is charged with.
                None => assert_eq!(slot.is_drop(), slot == CounterSlot::DropNotPeer, "{slot:?}"),
            }
        }
        assert_eq!(core::mem::size_of::<PeerCounters>(), 64);
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
