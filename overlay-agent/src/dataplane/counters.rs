//! What a datapath has counted, in one shape whichever datapath runs: outcomes under the
//! [`CounterSlot`] names both datapaths count by, per-peer traffic, and how full the bounded maps
//! are. Read while the agent runs (from any thread: `/metrics`, the status socket) through a
//! datapath's [`CounterSource`], or, for the eBPF datapath, from its pins after the agent died
//! ([`super::ebpf::pinned`]).

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use overlay_common::{CounterSlot, PeerCounters};

use super::contract::DatapathError;

/// Packets (and bytes, where counted) of one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutcomeCount {
    /// The outcome.
    pub slot: CounterSlot,
    /// Packets (skbs: a GSO batch counts once).
    pub packets: u64,
    /// Bytes; `None` where the datapath does not count them (TUN).
    pub bytes: Option<u64>,
}

/// How full a bounded map is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapFill {
    /// The map's name.
    pub map: String,
    /// Entries in it.
    pub entries: usize,
    /// Entries it can hold.
    pub capacity: u32,
}

/// One reading of a datapath's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Every outcome the datapath counts.
    pub outcomes: Vec<OutcomeCount>,
    /// Traffic per peer host, by public address; `None` where the datapath does not count per
    /// peer (TUN).
    pub peers: Option<Vec<(Ipv4Addr, PeerCounters)>>,
    /// The bounded maps (eBPF); none for TUN, whose tables grow as needed.
    pub maps: Vec<MapFill>,
}

impl Counters {
    /// The packets counted for `slot`, 0 when the datapath has no such outcome.
    pub fn packets(&self, slot: CounterSlot) -> u64 {
        self.outcomes
            .iter()
            .find(|o| o.slot == slot)
            .map_or(0, |o| o.packets)
    }
}

/// Reads a running datapath's counters.
pub trait CounterSource: Send + Sync + std::fmt::Debug {
    /// The counters now.
    fn read(&self) -> Result<Counters, DatapathError>;

    /// The bpffs root its maps and links are pinned under, when they are.
    fn pins(&self) -> Option<&std::path::Path> {
        None
    }
}

/// The eBPF datapath's counters, read from its pinned maps: the same reading whether the agent
/// that pinned them runs or not.
#[derive(Debug, Clone)]
pub struct PinnedCounters {
    /// The pin root (`--bpffs`).
    pub root: PathBuf,
}

impl CounterSource for PinnedCounters {
    fn pins(&self) -> Option<&std::path::Path> {
        Some(&self.root)
    }

    fn read(&self) -> Result<Counters, DatapathError> {
        use super::ebpf::pinned;
        let e = |op: &'static str| {
            move |source| DatapathError::Ebpf {
                op,
                source: Box::new(source),
            }
        };
        let outcomes = pinned::pinned_counters(&self.root)
            .map_err(e("reading the counters"))?
            .into_iter()
            .map(|(slot, c)| OutcomeCount {
                slot,
                packets: c.packets,
                bytes: Some(c.bytes),
            })
            .collect();
        Ok(Counters {
            outcomes,
            peers: Some(
                pinned::pinned_peer_counters(&self.root)
                    .map_err(e("reading the per-peer counters"))?,
            ),
            maps: pinned::pinned_map_fill(&self.root).map_err(e("counting map entries"))?,
        })
    }
}

/// A shared source, as the datapath hands it out.
pub type SharedSource = Arc<dyn CounterSource>;
