//! What a datapath has counted, in one shape whichever datapath runs: outcomes under the
//! [`CounterSlot`] names both datapaths count by, per-peer traffic, and how full the bounded maps
//! are. Read while the agent runs (from any thread: `/metrics`, the status socket) through a
//! datapath's [`CounterSource`], or, for the eBPF datapath, from its pins after the agent died
//! ([`super::ebpf::pinned`]).

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use overlay_common::{CounterSlot, PeerCounters, maps::Endpoint};

use super::{
    contract::{DatapathError, PeerRoute},
    ebpf::pinned::PinnedLinkInfo,
};

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

/// One reading of a datapath's counters, and of the tables they are kept beside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Where it was read: `pins` (the eBPF maps under `--bpffs`) or `agent` (TUN, in memory).
    pub read_from: &'static str,
    /// Every outcome the datapath counts.
    pub outcomes: Vec<OutcomeCount>,
    /// Traffic per peer host, by public address; `None` where the datapath does not count per
    /// peer (TUN).
    pub peers: Option<Vec<(Ipv4Addr, PeerCounters)>>,
    /// The bounded maps (eBPF); none for TUN, whose tables grow as needed.
    pub maps: Vec<MapFill>,
    /// The peer routes in the dataplane's maps (eBPF).
    pub routes: Vec<PeerRoute>,
    /// The local containers delivered into directly (eBPF).
    pub endpoints: Vec<(Ipv4Addr, Endpoint)>,
    /// The pinned links and their programs (eBPF).
    pub links: Vec<PinnedLinkInfo>,
}

/// Reads a running datapath's counters.
pub trait CounterSource: Send + Sync + std::fmt::Debug {
    /// The counters now.
    fn read(&self) -> Result<Counters, DatapathError>;
}

/// The eBPF datapath's counters, read from its pinned maps: the same reading whether the agent
/// that pinned them runs or not.
#[derive(Debug, Clone)]
pub struct PinnedCounters {
    /// The pin root (`--bpffs`).
    pub root: PathBuf,
}

impl CounterSource for PinnedCounters {
    fn read(&self) -> Result<Counters, DatapathError> {
        super::ebpf::pinned::read(&self.root).map_err(|source| DatapathError::Ebpf {
            op: "reading the pinned dataplane",
            source: Box::new(source),
        })
    }
}

/// A shared source, as the datapath hands it out.
pub type SharedSource = Arc<dyn CounterSource>;
