//! What the agent and its dataplane are doing, in one shape for `overlay-agent status` (text and
//! `--json`), the status socket and `/metrics`.
//!
//! Two halves, read from two places so each survives what the other does not:
//! - [`AgentState`]: the lease, etcd, health and the peers as the control plane knows them. Only
//!   a running agent has it; [`socket`] serves it.
//! - [`DataplaneState`]: counters, links, routes, endpoints and map fill. The eBPF dataplane's are
//!   read from its pins, the same reading whether the agent runs or died (its programs forward
//!   on); the TUN datapath's live only in the agent, which then sends them along.

pub mod metrics;
pub mod show;
pub mod socket;

use std::{net::Ipv4Addr, path::Path};

use overlay_common::{CounterSlot, PeerCounters};
use serde::{Deserialize, Serialize};

use crate::dataplane::{
    contract::{DatapathError, DatapathInfo, UnprogrammedPeer},
    counters::{CounterSource, Counters, MapFill, PinnedCounters},
    ebpf::pinned::PinnedLinkInfo,
};

/// Everything status reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The running agent's view; `None` when no agent answered (then `agent_error` says why).
    pub agent: Option<AgentState>,
    /// Why no agent's view is included.
    pub agent_error: Option<String>,
    /// The dataplane; `None` when there is none to read (no pins, and no agent to ask).
    pub dataplane: Option<DataplaneState>,
    /// Why the dataplane could not be read, when it could not.
    pub dataplane_error: Option<String>,
}

/// A running agent's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// Its process id.
    pub pid: u32,
    /// Its version.
    pub version: String,
    /// Whether `/healthz` answers 200.
    pub healthy: bool,
    /// Why not, when not.
    pub unhealthy_reason: Option<String>,
    /// What a healthy agent still says (etcd away).
    pub note: Option<String>,
    /// The subnet lease.
    pub lease: LeaseState,
    /// The etcd connection.
    pub etcd: EtcdState,
    /// The datapath (`None` before it is built, and for alloc).
    pub datapath: Option<DatapathInfo>,
    /// Why the datapath does not forward as it should, when it does not.
    pub datapath_unhealthy: Option<String>,
    /// The peers given to the datapath.
    pub peers: Vec<PeerState>,
    /// What the peer set refused and kept, since start.
    pub peer_counts: PeerCountsState,
    /// Peers the datapath could not program: known, but not forwarded to.
    #[serde(default)]
    pub unprogrammed: Vec<UnprogrammedPeer>,
}

/// The subnet lease.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LeaseState {
    /// Whether one is held.
    pub held: bool,
    /// Why none is, when none is.
    pub none_because: Option<String>,
    /// The subnet.
    pub subnet: Option<String>,
    /// Its etcd key.
    pub key: Option<String>,
    /// A reservation: no TTL.
    pub reservation: bool,
    /// The TTL asked for, in seconds.
    pub ttl_seconds: Option<u64>,
    /// Seconds until etcd expires it unless renewed.
    pub expires_in_seconds: Option<f64>,
    /// When it was last granted or renewed (seconds since the Unix epoch).
    pub renewed_at_unix: Option<u64>,
    /// How long ago that was, in seconds.
    pub renewed_seconds_ago: Option<f64>,
}

/// The etcd connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EtcdState {
    /// `--etcd-endpoints`.
    pub endpoints: Vec<String>,
    /// The member in use.
    pub member: String,
    /// Whether a member answers.
    pub up: bool,
    /// For how long none has, in seconds.
    pub down_seconds: Option<f64>,
    /// The last error, in one line.
    pub last_error: Option<String>,
    /// How long ago it happened, in seconds.
    pub last_error_seconds_ago: Option<f64>,
    /// Reconnections after a request failed on the member in use.
    pub reconnects: u64,
    /// Connection attempts no member answered.
    pub unanswered_attempts: u64,
}

/// A peer as the control plane gave it to the datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    /// Its subnet.
    pub subnet: String,
    /// Its public (underlay) address.
    pub public_ip: Ipv4Addr,
    /// `udp` or `vxlan`.
    pub backend: String,
    /// vxlan: the VtepMAC its frames go to.
    pub vtep_mac: Option<String>,
    /// udp: whether it decapsulates in its kernel (our eBPF datapath).
    pub kernel_decap: Option<bool>,
    /// Kept past its lease's expiry, for `--expired-peer-grace`.
    pub stale: bool,
}

/// What the peer set refused and kept.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct PeerCountsState {
    /// Peers now, stale ones included.
    pub known: usize,
    /// Of those, stale.
    pub stale: usize,
    /// Leases refused.
    pub refused: u64,
    /// Peers that went stale.
    pub went_stale: u64,
    /// Stale peers removed when their grace ended.
    pub grace_ended: u64,
    /// Times several leases named one PublicIP.
    pub shared_public_ip: u64,
}

/// The dataplane as its counters and maps show it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataplaneState {
    /// Where it was read: `pins` (the eBPF maps under `--bpffs`) or `agent` (TUN, in memory).
    pub read_from: String,
    /// Every outcome counted.
    pub outcomes: Vec<OutcomeState>,
    /// Traffic per peer host; `None` where not counted (TUN).
    pub peer_traffic: Option<Vec<PeerTraffic>>,
    /// How full the bounded maps are.
    pub maps: Vec<MapFill>,
    /// The pinned links and their programs.
    pub links: Vec<PinnedLinkInfo>,
    /// The peer routes in the dataplane's maps.
    pub routes: Vec<RouteState>,
    /// The local containers delivered into directly.
    pub endpoints: Vec<EndpointState>,
}

/// One outcome's count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeState {
    /// Its name ([`CounterSlot::name`]).
    pub outcome: String,
    /// Whether it is a drop.
    pub drop: bool,
    /// Packets.
    pub packets: u64,
    /// Bytes, where counted.
    pub bytes: Option<u64>,
}

/// One peer host's traffic, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTraffic {
    /// Its public address.
    pub public_ip: Ipv4Addr,
    /// Packets sent to it.
    pub tx_packets: u64,
    /// Inner bytes sent to it.
    pub tx_bytes: u64,
    /// Packets to it dropped (a helper failed).
    pub tx_dropped: u64,
    /// Packets received from it and delivered.
    pub rx_packets: u64,
    /// Inner bytes received from it.
    pub rx_bytes: u64,
    /// Packets from it dropped by the receive checks.
    pub rx_dropped: u64,
}

impl PeerTraffic {
    fn new(public_ip: Ipv4Addr, c: &PeerCounters) -> Self {
        Self {
            public_ip,
            tx_packets: c.tx.packets,
            tx_bytes: c.tx.bytes,
            tx_dropped: c.tx_dropped.packets,
            rx_packets: c.rx.packets,
            rx_bytes: c.rx.bytes,
            rx_dropped: c.rx_dropped.packets,
        }
    }
}

/// A peer route in the maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteState {
    /// The peer subnet.
    pub subnet: String,
    /// Where its packets go.
    pub public_ip: Ipv4Addr,
    /// vxlan: the inner destination MAC.
    pub vtep_mac: Option<String>,
    /// The peer decapsulates in its kernel.
    pub kernel_decap: bool,
}

/// A local container the decapsulation delivers into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Its address.
    pub ip: Ipv4Addr,
    /// The host side of its veth.
    pub host_ifindex: u32,
    /// Its MAC.
    pub mac: String,
}

impl DataplaneState {
    /// As status shows a datapath's counters.
    pub fn new(counters: Counters) -> Self {
        let outcomes = counters
            .outcomes
            .iter()
            .map(|o| OutcomeState {
                outcome: o.slot.name().to_owned(),
                drop: o.slot.is_drop(),
                packets: o.packets,
                bytes: o.bytes,
            })
            .collect();
        let peer_traffic = counters.peers.as_ref().map(|peers| {
            peers
                .iter()
                .map(|(ip, c)| PeerTraffic::new(*ip, c))
                .collect()
        });
        let routes = counters
            .routes
            .iter()
            .map(|r| RouteState {
                subnet: r.subnet.to_string(),
                public_ip: r.public_ip,
                vtep_mac: (r.vtep_mac != Default::default()).then(|| r.vtep_mac.to_string()),
                kernel_decap: r.kernel_decap,
            })
            .collect();
        let endpoints = counters
            .endpoints
            .iter()
            .map(|(ip, ep)| EndpointState {
                ip: *ip,
                host_ifindex: ep.host_ifindex,
                mac: overlay_common::net::Mac(ep.mac).to_string(),
            })
            .collect();
        Self {
            read_from: counters.read_from.to_owned(),
            outcomes,
            peer_traffic,
            maps: counters.maps,
            links: counters.links,
            routes,
            endpoints,
        }
    }

    /// The eBPF dataplane pinned under `root`, whether or not its agent runs.
    pub fn from_pins(root: &Path) -> Result<Self, DatapathError> {
        Self::read(&PinnedCounters {
            root: root.to_owned(),
        })
    }

    /// Reads a datapath's counters now.
    pub fn read(source: &dyn CounterSource) -> Result<Self, DatapathError> {
        Ok(Self::new(source.read()?))
    }

    /// Packets counted for `slot`.
    pub fn packets(&self, slot: CounterSlot) -> u64 {
        self.outcomes
            .iter()
            .find(|o| o.outcome == slot.name())
            .map_or(0, |o| o.packets)
    }
}
