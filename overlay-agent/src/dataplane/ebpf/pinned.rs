//! Reading the dataplane from its pins, without loading anything: what `status` shows and
//! `/metrics` exports, for a running agent's dataplane and for one whose agent has died (its
//! programs keep forwarding with the pinned maps).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::links::{FdLink, PinnedLink},
};
use overlay_common::{
    COUNTERS_MAP, Counter, CounterSlot, PEER_COUNTERS_MAP, PeerCounters,
    maps::{
        ENDPOINTS_MAP, Endpoint, MAX_ENDPOINTS, MAX_PEERS, PEER_ADDRS_MAP, PEERS_MAP, Peer,
        PeerAddr,
    },
};

use super::{EbpfError, endpoint_entries, map_err, peer_totals, pins, routes, summed};
use crate::dataplane::{
    contract::PeerRoute,
    counters::{Counters, MapFill, OutcomeCount},
};

/// This version's map `name` pinned under `root`.
fn pinned_map(root: &Path, name: &'static str) -> Result<MapData, EbpfError> {
    MapData::from_pin(pins::maps_dir(root).join(name)).map_err(map_err(name, "opening the pin"))
}

/// The packet counters of the dataplane pinned under `root`, summed over the CPUs.
pub fn pinned_counters(root: &Path) -> Result<Vec<(CounterSlot, Counter)>, EbpfError> {
    let data = pinned_map(root, COUNTERS_MAP)?;
    let counters: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(COUNTERS_MAP, "opening"))?;
    summed(&counters)
}

/// The peer routes programmed in the dataplane pinned under `root`, as
/// [`super::EbpfDataplane::programmed`] reads them from a loaded one.
pub fn pinned_peers(root: &Path) -> Result<Vec<PeerRoute>, EbpfError> {
    let data = pinned_map(root, PEERS_MAP)?;
    let trie: LpmTrie<_, [u8; 4], Peer> =
        LpmTrie::try_from(Map::LpmTrie(data)).map_err(map_err(PEERS_MAP, "opening"))?;
    routes(&trie)
}

/// Every peer host's traffic, summed over the CPUs, by public address.
pub fn pinned_peer_counters(root: &Path) -> Result<Vec<(Ipv4Addr, PeerCounters)>, EbpfError> {
    let data = pinned_map(root, PEER_COUNTERS_MAP)?;
    let map: PerCpuHashMap<_, [u8; 4], PeerCounters> =
        PerCpuHashMap::try_from(Map::PerCpuHashMap(data))
            .map_err(map_err(PEER_COUNTERS_MAP, "opening"))?;
    peer_totals(&map)
}

/// The local containers the decap delivers into directly.
pub fn pinned_endpoints(root: &Path) -> Result<Vec<(Ipv4Addr, Endpoint)>, EbpfError> {
    let data = pinned_map(root, ENDPOINTS_MAP)?;
    let map: BpfHashMap<_, [u8; 4], Endpoint> =
        BpfHashMap::try_from(Map::HashMap(data)).map_err(map_err(ENDPOINTS_MAP, "opening"))?;
    endpoint_entries(&map)
}

/// Everything the dataplane pinned under `root` counts and holds, each map opened once; the
/// fill of the maps is the length of their listings (the peer addresses, listed nowhere else,
/// are counted).
pub fn read(root: &Path) -> Result<Counters, EbpfError> {
    let outcomes = pinned_counters(root)?
        .into_iter()
        .map(|(slot, c)| OutcomeCount {
            slot,
            packets: c.packets,
            bytes: Some(c.bytes),
        })
        .collect();
    let peers = pinned_peer_counters(root)?;
    let routes = pinned_peers(root)?;
    let endpoints = pinned_endpoints(root)?;
    let addrs: BpfHashMap<_, [u8; 4], PeerAddr> =
        BpfHashMap::try_from(Map::HashMap(pinned_map(root, PEER_ADDRS_MAP)?))
            .map_err(map_err(PEER_ADDRS_MAP, "opening"))?;
    let fill = |map: &str, entries, capacity| MapFill {
        map: map.to_owned(),
        entries,
        capacity,
    };
    let maps = vec![
        fill(PEERS_MAP, routes.len(), MAX_PEERS),
        fill(
            PEER_ADDRS_MAP,
            addrs.keys().filter(Result::is_ok).count(),
            MAX_PEERS,
        ),
        fill(PEER_COUNTERS_MAP, peers.len(), MAX_PEERS),
        fill(ENDPOINTS_MAP, endpoints.len(), MAX_ENDPOINTS),
    ];
    Ok(Counters {
        read_from: "pins",
        outcomes,
        peers: Some(peers),
        maps,
        routes,
        endpoints,
        links: pinned_links(root),
    })
}

/// A pinned link: which program is attached where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PinnedLinkInfo {
    /// The program's name, from the pin's name.
    pub program: String,
    /// The interface, from the pin's name.
    pub interface: String,
    /// The pin.
    pub path: PathBuf,
    /// The kernel's link id; `None` when the pin could not be opened.
    pub link_id: Option<u32>,
    /// The id of the program attached through it.
    pub program_id: Option<u32>,
    /// Why the pin could not be read.
    pub error: Option<String>,
}

/// Every link pinned under `root`, in name order (`links/<program>@<interface>`).
pub fn pinned_links(root: &Path) -> Vec<PinnedLinkInfo> {
    let Ok(dir) = std::fs::read_dir(root.join("links")) else {
        return Vec::new();
    };
    let mut out: Vec<PinnedLinkInfo> = dir
        .filter_map(Result::ok)
        .map(|entry| {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let (program, interface) = name.split_once('@').unwrap_or((&name, ""));
            let interface = pins::interface_of_pin(interface);
            let info = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|l| FdLink::from(l).info().map_err(|e| e.to_string()));
            PinnedLinkInfo {
                program: program.to_owned(),
                interface,
                link_id: info.as_ref().ok().map(|i| i.id()),
                program_id: info.as_ref().ok().map(|i| i.program_id()),
                error: info.err(),
                path,
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}
