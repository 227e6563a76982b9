//! The overlay contract: the flannel rules every datapath obeys, written once.
//!
//! - [`PeerBackend`]: what a peer's lease says about how to reach it, parsed once by the control
//!   plane (a real flanneld's udp lease has no `BackendType` at all: that is udp).
//! - [`OverlaySpec`]: this host's side of the overlay: device name, address and route, port, VNI,
//!   VtepMAC, the `BackendData` to publish, the MTU overhead, and the configuration the receive
//!   policy ([`overlay_common::policy`]) is judged against.
//! - [`OverlaySpec::route_for`]: a peer becomes a [`PeerRoute`], or an [`Unusable`] reason; either
//!   way the previous route for that subnet is replaced or withdrawn ([`RouteChange`]).
//! - [`Datapath`]: what is left to a datapath: the mechanics of installing routes and moving
//!   packets. The eBPF and TUN datapaths implement it; [`Overlay`] drives one of them with the
//!   rules above, so neither decides a rule of its own.

use std::{collections::BTreeMap, net::Ipv4Addr};

use overlay_common::{
    maps::{Config, Encap, FLAG_DELIVER_VIA_STACK},
    net::Mac,
};

use crate::{
    control::{config::Backend, peers::PeerEvent, subnet::Subnet},
    dataplane::counters::SharedSource,
    host::{OverlayDevice, iface::Underlay},
};

/// How a peer's lease says it is reached: `BackendType` and `BackendData`, read as flanneld means
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerBackend {
    /// flannel's udp backend. flanneld writes its udp leases without a `BackendType` (it is
    /// `omitempty` and the udp backend leaves it empty), so an absent or empty type is udp too.
    Udp {
        /// `BackendData.KernelDecap`, which our eBPF datapath publishes (flanneld's udp backend
        /// ignores BackendData): the peer takes packets whose checksum or segmentation was left
        /// to offload; flanneld's proxy does not ([`overlay_common::maps::PEER_KERNEL_DECAP`]).
        kernel_decap: bool,
    },
    /// flannel's vxlan backend, with the VtepMAC its frames must be addressed to.
    Vxlan {
        /// `BackendData.VtepMAC`.
        vtep_mac: Mac,
    },
    /// A vxlan lease whose `BackendData` has no valid `VtepMAC`.
    VxlanWithoutMac,
    /// Any other backend (`host-gw`, `alloc`, ...).
    Other(String),
}

impl PeerBackend {
    /// Reads a lease's `BackendType` and `BackendData`.
    pub fn from_lease(backend_type: &str, backend_data: Option<&serde_json::Value>) -> Self {
        match backend_type {
            "" | "udp" => PeerBackend::Udp {
                kernel_decap: backend_data
                    .and_then(|d| d.get(KERNEL_DECAP))
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            },
            "vxlan" => backend_data
                .and_then(|d| d.get("VtepMAC"))
                .and_then(|m| m.as_str())
                .and_then(|m| m.parse().ok())
                .map_or(PeerBackend::VxlanWithoutMac, |vtep_mac| {
                    PeerBackend::Vxlan { vtep_mac }
                }),
            other => PeerBackend::Other(other.to_owned()),
        }
    }

    /// The backend's type name, as logs and `BackendType` spell it.
    pub fn type_name(&self) -> &str {
        match self {
            PeerBackend::Udp { .. } => "udp",
            PeerBackend::Vxlan { .. } | PeerBackend::VxlanWithoutMac => "vxlan",
            PeerBackend::Other(t) => t,
        }
    }
}

/// The `BackendData` key of a udp lease saying the host decapsulates in its kernel.
const KERNEL_DECAP: &str = "KernelDecap";

/// Another host, as its lease describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its containers' subnet.
    pub subnet: Subnet,
    /// Where to send its traffic.
    pub public_ip: Ipv4Addr,
    /// How to reach it.
    pub backend: PeerBackend,
}

/// Where one peer subnet's packets go: what a datapath installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's subnet.
    pub subnet: Subnet,
    /// The peer's public (underlay) address: the outer destination.
    pub public_ip: Ipv4Addr,
    /// The peer's VtepMAC (vxlan; zero for udp): the inner destination MAC.
    pub vtep_mac: Mac,
    /// The peer decapsulates in its kernel (udp; see [`PeerBackend::Udp`]).
    pub kernel_decap: bool,
}

/// Why a peer's lease cannot be forwarded to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// Its subnet is not inside the Network, or overlaps ours: forwarding would widen what the
    /// receive policy accepts from that peer, up to our own containers' addresses.
    #[error("its subnet is outside the Network or overlaps this host's")]
    OutsideNetwork,
    /// It runs another backend than this host.
    #[error("it uses backend {theirs:?}, this host {ours}")]
    Backend {
        /// The peer's backend.
        theirs: String,
        /// Ours.
        ours: &'static str,
    },
    /// A vxlan lease without a usable VtepMAC.
    #[error("its BackendData has no valid VtepMAC")]
    VtepMac,
}

/// What a peer event does to the installed routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteChange {
    /// Install (or replace) the route for its subnet.
    Install(PeerRoute),
    /// Remove whatever route the subnet has: the peer is gone, or its lease is no longer usable
    /// (what the old lease said does not hold any more either).
    Withdraw {
        /// The subnet.
        subnet: Subnet,
        /// Why, when the peer is still there.
        unusable: Option<Unusable>,
    },
}

/// flannel's backend on this host, as the datapaths need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `udp`: the inner packet is the UDP payload.
    Udp {
        /// The UDP port (8285 by default).
        port: u16,
    },
    /// `vxlan`: RFC 7348.
    Vxlan {
        /// The VNI.
        vni: u32,
        /// The UDP port (8472 by default on Linux).
        port: u16,
    },
}

/// This host's side of the overlay: everything derived from the backend and the host's public
/// address, the same whichever datapath runs, so a host may switch datapaths across a restart
/// without its peers noticing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlaySpec {
    /// The wire format and its parameters.
    pub format: Format,
    /// The address peers send to.
    pub public_ip: Ipv4Addr,
    /// vxlan: the inner destination MAC peers address this host by. Derived from the public IP,
    /// unless a lease of ours already published one (see [`OverlaySpec::keeping_vtep_mac`]).
    vtep_mac: Mac,
}

impl OverlaySpec {
    /// The spec for `backend`; `None` for `alloc`, which forwards nothing.
    pub fn new(backend: &Backend, public_ip: Ipv4Addr) -> Option<Self> {
        let format = match *backend {
            Backend::Udp { port } => Format::Udp { port },
            Backend::Vxlan { vni, port, .. } => Format::Vxlan { vni, port },
            Backend::Alloc => return None,
        };
        Some(Self {
            format,
            public_ip,
            vtep_mac: Mac::vtep_for(public_ip),
        })
    }

    /// The same spec answering to `mac`, the VtepMAC a lease of ours already publishes (flanneld's
    /// on a host taken over from it): peers then need no update, and a flanneld peer, whose watch
    /// can miss an update, keeps sending to the right MAC. Ignored for udp, which has no MAC.
    pub fn keeping_vtep_mac(self, mac: Mac) -> Self {
        match self.format {
            Format::Udp { .. } => self,
            Format::Vxlan { .. } => Self {
                vtep_mac: mac,
                ..self
            },
        }
    }

    /// The map-level wire format.
    pub fn encap(&self) -> Encap {
        match self.format {
            Format::Udp { .. } => Encap::Udp,
            Format::Vxlan { .. } => Encap::Vxlan,
        }
    }

    /// `udp` or `vxlan`.
    pub fn type_name(&self) -> &'static str {
        match self.format {
            Format::Udp { .. } => "udp",
            Format::Vxlan { .. } => "vxlan",
        }
    }

    /// flannel's device names: `flannel0` for udp, `flannel.<VNI>` for vxlan.
    pub fn device_name(&self) -> String {
        match self.format {
            Format::Udp { .. } => "flannel0".into(),
            Format::Vxlan { vni, .. } => format!("flannel.{vni}"),
        }
    }

    /// The overlay UDP port.
    pub fn port(&self) -> u16 {
        match self.format {
            Format::Udp { port } | Format::Vxlan { port, .. } => port,
        }
    }

    /// The VNI (vxlan), 0 for udp.
    pub fn vni(&self) -> u32 {
        match self.format {
            Format::Udp { .. } => 0,
            Format::Vxlan { vni, .. } => vni,
        }
    }

    /// This host's VtepMAC: the inner destination its peers use.
    pub fn vtep_mac(&self) -> Mac {
        self.vtep_mac
    }

    /// The `BackendData` to publish in our lease: vxlan's VNI and VtepMAC; for udp nothing (as
    /// flanneld), or `{"KernelDecap":true}` when this host's datapath decapsulates in the kernel.
    pub fn backend_data(&self, kernel_decap: bool) -> Option<serde_json::Value> {
        match self.format {
            Format::Udp { .. } if kernel_decap => Some(serde_json::json!({ KERNEL_DECAP: true })),
            Format::Udp { .. } => None,
            Format::Vxlan { vni, .. } => Some(serde_json::json!({
                "VNI": vni,
                "VtepMAC": self.vtep_mac().to_string(),
            })),
        }
    }

    /// Bytes the format adds in front of an inner packet: the underlay MTU minus this is the
    /// overlay MTU.
    pub fn overhead(&self) -> u32 {
        self.encap().overhead()
    }

    /// How the overlay device must look once `lease` is held: flannel's layout, `flannel0`
    /// holding the lease's network address with the Network's prefix length (which routes the
    /// Network to it), `flannel.<VNI>` holding `<lease>/32` with an explicit Network route (one
    /// route suffices: the datapath picks the peer).
    pub fn device(&self, lease: &LocalLease) -> OverlayDevice {
        OverlayDevice {
            name: self.device_name(),
            mtu: lease.mtu,
            lease_addr: lease.subnet.addr(),
            addr_prefix_len: match self.format {
                Format::Udp { .. } => lease.network.prefix(),
                Format::Vxlan { .. } => 32,
            },
            network: (lease.network.addr(), lease.network.prefix()),
        }
    }

    /// This host's settings as the programs and the receive policy read them.
    pub fn program_config(
        &self,
        lease: &LocalLease,
        underlay_ifindex: u32,
        deliver_via_stack: bool,
    ) -> Config {
        Config {
            local_ip: lease.underlay_addr().octets(),
            underlay_ifindex,
            vni: self.vni(),
            port: self.port(),
            encap: self.encap() as u8,
            flags: if deliver_via_stack {
                FLAG_DELIVER_VIA_STACK
            } else {
                0
            },
            vtep_mac: self.vtep_mac().0,
            subnet_prefix_len: lease.subnet.prefix(),
            _pad: [0],
            subnet: lease.subnet.addr().octets(),
            finish_ifindex: 0,
        }
    }

    /// The one rule from a peer event to a route change: a peer is forwarded to when its subnet
    /// lies inside the Network and outside ours, it runs our backend, and (vxlan) it published a
    /// VtepMAC. Anything else withdraws the subnet's route.
    pub fn route_change(&self, lease: &LocalLease, event: &PeerEvent) -> RouteChange {
        match event {
            PeerEvent::Removed(subnet) => RouteChange::Withdraw {
                subnet: *subnet,
                unusable: None,
            },
            PeerEvent::Added(peer) => match self.route_for(lease, peer) {
                Ok(route) => RouteChange::Install(route),
                Err(unusable) => RouteChange::Withdraw {
                    subnet: peer.subnet,
                    unusable: Some(unusable),
                },
            },
        }
    }

    /// The route to `peer`, or why there is none.
    pub fn route_for(&self, lease: &LocalLease, peer: &Peer) -> Result<PeerRoute, Unusable> {
        if !lease.network.contains(&peer.subnet) || lease.subnet.overlaps(&peer.subnet) {
            return Err(Unusable::OutsideNetwork);
        }
        let (vtep_mac, kernel_decap) = match (self.format, &peer.backend) {
            (Format::Udp { .. }, PeerBackend::Udp { kernel_decap }) => {
                (Mac::default(), *kernel_decap)
            }
            (Format::Vxlan { .. }, PeerBackend::Vxlan { vtep_mac }) => (*vtep_mac, true),
            (Format::Vxlan { .. }, PeerBackend::VxlanWithoutMac) => return Err(Unusable::VtepMac),
            (_, theirs) => {
                return Err(Unusable::Backend {
                    theirs: theirs.type_name().to_owned(),
                    ours: self.type_name(),
                });
            }
        };
        Ok(PeerRoute {
            subnet: peer.subnet,
            public_ip: peer.public_ip,
            vtep_mac,
            kernel_decap,
        })
    }
}

/// What a datapath needs to know about this host once its lease is held.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalLease {
    /// The whole overlay network (`Network`).
    pub network: Subnet,
    /// This host's subnet.
    pub subnet: Subnet,
    /// The interface inter-host traffic leaves by.
    pub underlay: Underlay,
    /// The overlay MTU written to subnet.env: the underlay's minus the encapsulation.
    pub mtu: u32,
}

impl LocalLease {
    /// This host's address on the underlay: the outer source, and the only outer destination
    /// decapsulated (not the lease's PublicIP, which differs behind NAT).
    pub fn underlay_addr(&self) -> Ipv4Addr {
        self.underlay.addr
    }
}

/// What failed in a datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Creating or updating the overlay device, its address or route.
    #[error("setting up {device}: {source}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: crate::host::OverlayDeviceError,
    },
    /// Looking up the underlay interface.
    #[error("looking up the underlay interface {interface}: {source}")]
    Underlay {
        /// The interface.
        interface: String,
        /// Why.
        #[source]
        source: crate::host::NetlinkError,
    },
    /// The eBPF programs or maps.
    #[error("{op}: {source}")]
    Ebpf {
        /// What was being done.
        op: &'static str,
        /// Why (boxed: eBPF errors are large, and rare).
        #[source]
        source: Box<super::ebpf::EbpfError>,
    },
    /// Programming one peer into the eBPF maps.
    #[error("programming peer {subnet}: {source}")]
    EbpfPeer {
        /// The peer's subnet.
        subnet: Subnet,
        /// Why.
        #[source]
        source: Box<super::ebpf::EbpfError>,
    },
    /// The finishing device (udp, eBPF) could not be set up.
    #[error("setting up the finishing device: {source}")]
    Finishing {
        /// Why.
        #[source]
        source: crate::host::finishing::FinishingError,
    },
    /// The endpoint learner (direct delivery into containers) could not start.
    #[error("starting the endpoint learner: {source}")]
    Endpoints {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TUN forwarder could not start.
    #[error("starting the TUN forwarder on {device}: {source}")]
    Forwarder {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: super::tun::ForwarderError,
    },
    /// The TUN device could not be prepared.
    #[error("preparing {device}: {source}")]
    TunDevice {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: crate::host::TunError,
    },
}

impl DatapathError {
    /// A peer was refused because an eBPF map is full (its entries are kept).
    pub fn is_map_full(&self) -> bool {
        matches!(self, DatapathError::EbpfPeer { source, .. }
            if matches!(**source, super::ebpf::EbpfError::Full { .. }))
    }
}

/// Why a datapath does not forward as it should: what `/healthz` reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// The agent has not got as far as starting the datapath.
    #[error("datapath not started")]
    Starting,
    /// `start` has not succeeded (yet).
    #[error("the {0} datapath is not started")]
    NotStarted(&'static str),
    /// flanneld's device is found and still forwards: the datapath takes it over once every peer
    /// is programmed.
    #[error("taking {0} over from flanneld once every peer is programmed")]
    TakingOver(String),
    /// Updates of some peers failed, and no later one to them succeeded.
    #[error("{failing} peer(s) not programmed, {subnet} among them: {error}")]
    PeerFailed {
        /// The first such peer's subnet.
        subnet: Subnet,
        /// How many peers are not programmed.
        failing: usize,
        /// The error, as text (the error itself is logged where it happened).
        error: String,
    },
    /// A program is no longer attached where it was (its device or pinned link removed).
    #[error("not forwarding: {0}")]
    Detached(String),
    /// Every TUN forwarding worker stopped.
    #[error("every TUN forwarding worker has stopped (was {device} deleted?)")]
    WorkersGone {
        /// The device.
        device: String,
    },
    /// Some TUN forwarding workers stopped.
    #[error("{stopped} of {workers} TUN forwarding workers have stopped")]
    WorkersStopped {
        /// How many stopped.
        stopped: usize,
        /// How many there were.
        workers: usize,
    },
}

/// The mechanics a datapath provides; the rules are [`Overlay`]'s.
///
/// Calls are synchronous and made from the datapath thread, so a datapath may block briefly
/// (netlink, map updates) without stalling etcd traffic.
pub trait Datapath: Send {
    /// `eBPF` or `TUN`, for logs and health.
    fn kind(&self) -> &'static str;

    /// Brings the datapath up for our lease: the device as `spec` describes it, then forwarding.
    /// Returns once forwarding works.
    fn start(&mut self, spec: &OverlaySpec, lease: &LocalLease) -> Result<(), DatapathError>;

    /// Installs or replaces one peer route. Idempotent.
    fn install(&mut self, route: &PeerRoute) -> Result<(), DatapathError>;

    /// Removes the route of `subnet`, if any. Idempotent.
    fn withdraw(&mut self, subnet: Subnet) -> Result<(), DatapathError>;

    /// Makes the installs and withdrawals since the last call take effect, for a datapath that
    /// publishes its peer table whole (one table per batch of events, not per event: thousands
    /// of peers arrive at once). Called when no more events are queued, and before `synced`.
    fn flush(&mut self) {}

    /// The initial peer list is complete: state a previous run left behind and no peer confirmed
    /// can go now. Called once.
    fn synced(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }

    /// `Ok` while the datapath's own machinery runs.
    fn check(&self) -> Result<(), Unhealthy> {
        Ok(())
    }

    /// Called every [`POLL_INTERVAL`] after `start`: finishes work that waits on something
    /// outside the agent (a takeover waiting for flanneld to release its device).
    fn poll(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }

    /// Whether received packets are decapsulated in the kernel, which takes a sender's offload
    /// state (a checksum left to do, a GSO batch) as it is; published in a udp lease.
    fn kernel_decap(&self) -> bool {
        false
    }

    /// Where its counters can be read from any thread while it runs; `None` before `start`.
    fn counters(&self) -> Option<SharedSource> {
        None
    }

    /// The devices it forwards through, once started.
    fn devices(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What runs, as status and metrics name it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DatapathInfo {
    /// `eBPF` or `TUN` (empty for alloc, which forwards nothing).
    pub kind: String,
    /// The wire format: `udp` or `vxlan` (or `alloc`).
    pub backend: String,
    /// Why this datapath: the `--datapath` choice and what loading found.
    pub chosen: String,
    /// The devices it forwards through.
    pub devices: Vec<String>,
}

/// How often [`Datapath::poll`] runs.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A peer update that failed.
#[derive(Debug, Clone)]
struct Failed {
    /// The route that was to be installed (`None`: a withdrawal failed).
    route: Option<PeerRoute>,
    /// Why, in one line.
    error: String,
    /// A map was full: tried again when a peer leaves.
    map_full: bool,
}

/// A peer the datapath could not program: known, but not forwarded to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnprogrammedPeer {
    /// Its subnet.
    pub subnet: String,
    /// Its public (underlay) address (`None` when a withdrawal failed).
    pub public_ip: Option<Ipv4Addr>,
    /// Why, in one line.
    pub reason: String,
    /// A map was full; it gets in when a peer leaves.
    pub map_full: bool,
}

/// One datapath driven by the contract's rules: the daemon's only view of the dataplane.
pub struct Overlay {
    spec: OverlaySpec,
    datapath: Box<dyn Datapath>,
    lease: Option<LocalLease>,
    /// Peer updates that failed, for /healthz and status, each until a later one to that peer
    /// works.
    failing: BTreeMap<Subnet, Failed>,
    /// Why this datapath was chosen, for status.
    chosen: String,
}

impl Overlay {
    /// Drives `datapath` for `spec`.
    pub fn new(spec: OverlaySpec, datapath: Box<dyn Datapath>) -> Self {
        Self {
            spec,
            datapath,
            lease: None,
            failing: BTreeMap::new(),
            chosen: String::new(),
        }
    }

    /// Records why this datapath was chosen (`--datapath` and what loading found).
    pub fn chosen_because(mut self, why: impl Into<String>) -> Self {
        self.chosen = why.into();
        self
    }

    /// What the datapath is, and why, for status.
    pub fn info(&self) -> DatapathInfo {
        // The overlay device first: it is what operators look for (the rest: the underlay, the
        // finishing device).
        let own = self.spec.device_name();
        let mut devices = self.datapath.devices();
        devices.sort_by_key(|d| *d != own);
        DatapathInfo {
            kind: self.datapath.kind().to_owned(),
            backend: self.spec.type_name().to_owned(),
            chosen: self.chosen.clone(),
            devices,
        }
    }

    /// See [`Datapath::counters`].
    pub fn counters(&self) -> Option<SharedSource> {
        self.datapath.counters()
    }

    /// The `BackendData` our lease publishes: the spec's, with what the datapath says of its
    /// receive path.
    pub fn backend_data(&self) -> Option<serde_json::Value> {
        self.spec.backend_data(self.datapath.kernel_decap())
    }

    /// This host's side of the overlay.
    pub fn spec(&self) -> &OverlaySpec {
        &self.spec
    }

    /// A short description for logs, e.g. "eBPF (udp)".
    pub fn describe(&self) -> String {
        format!("{} ({})", self.datapath.kind(), self.spec.type_name())
    }

    /// Brings the datapath up for `lease`.
    pub fn start(&mut self, lease: LocalLease) -> Result<(), DatapathError> {
        self.datapath.start(&self.spec, &lease)?;
        self.lease = Some(lease);
        Ok(())
    }

    /// Applies one peer-set change through [`OverlaySpec::route_change`]. Events before `start`
    /// cannot be judged (the Network and our subnet are unknown) and are ignored; the daemon
    /// sends the full peer list after `start`.
    pub fn apply(&mut self, event: &PeerEvent) -> Result<(), DatapathError> {
        let Some(lease) = &self.lease else {
            return Ok(());
        };
        let change = self.spec.route_change(lease, event);
        let (subnet, result) = match &change {
            RouteChange::Install(route) => (route.subnet, self.datapath.install(route)),
            RouteChange::Withdraw { subnet, unusable } => {
                if let Some(reason) = unusable {
                    tracing::warn!("not forwarding to {subnet}: {reason}");
                }
                (*subnet, self.datapath.withdraw(*subnet))
            }
        };
        let made_room = matches!(change, RouteChange::Withdraw { .. })
            && result.is_ok()
            && !self.failing.contains_key(&subnet);
        self.record(&change, &result);
        if made_room {
            self.retry_refused();
        }
        result
    }

    fn record(&mut self, change: &RouteChange, result: &Result<(), DatapathError>) {
        let (subnet, route) = match change {
            RouteChange::Install(route) => (route.subnet, Some(*route)),
            RouteChange::Withdraw { subnet, .. } => (*subnet, None),
        };
        match result {
            Ok(()) => {
                if self.failing.remove(&subnet).is_some_and(|f| f.map_full) && route.is_some() {
                    tracing::info!("peer {subnet} is in the dataplane now");
                }
            }
            Err(e) => {
                let failed = Failed {
                    route,
                    error: e.to_string(),
                    map_full: e.is_map_full(),
                };
                self.failing.insert(subnet, failed);
            }
        }
    }

    /// A peer left the dataplane: the peers a full map refused get in, in subnet order, until
    /// one is refused again (then the map is full again, and the rest would be too).
    fn retry_refused(&mut self) {
        let refused: Vec<PeerRoute> = self
            .failing
            .values()
            .filter(|f| f.map_full)
            .filter_map(|f| f.route)
            .collect();
        for route in refused {
            let result = self.datapath.install(&route);
            let again = result.is_err();
            self.record(&RouteChange::Install(route), &result);
            if again {
                break;
            }
        }
    }

    /// The peers the datapath could not program, with why.
    pub fn unprogrammed(&self) -> Vec<UnprogrammedPeer> {
        self.failing
            .iter()
            .map(|(subnet, f)| UnprogrammedPeer {
                subnet: subnet.to_string(),
                public_ip: f.route.map(|r| r.public_ip),
                reason: f.error.clone(),
                map_full: f.map_full,
            })
            .collect()
    }

    /// See [`Datapath::flush`].
    pub fn flush(&mut self) {
        self.datapath.flush();
    }

    /// The initial peer list is complete.
    pub fn synced(&mut self) -> Result<(), DatapathError> {
        self.datapath.flush();
        self.datapath.synced()
    }

    /// See [`Datapath::poll`]; nothing before `start`.
    pub fn poll(&mut self) -> Result<(), DatapathError> {
        if self.lease.is_none() {
            return Ok(());
        }
        self.datapath.poll()
    }

    /// `Ok` while the datapath forwards as the peers say.
    pub fn check(&self) -> Result<(), Unhealthy> {
        if self.lease.is_none() {
            return Err(Unhealthy::NotStarted(self.datapath.kind()));
        }
        self.datapath.check()?;
        // A full map is not unhealthy: every other peer is forwarded to, and a restart (what a
        // failing probe leads to) would not make room. Status and metrics name those peers.
        let broken = || self.failing.iter().filter(|(_, f)| !f.map_full);
        match broken().next() {
            Some((subnet, f)) => Err(Unhealthy::PeerFailed {
                subnet: *subnet,
                failing: broken().count(),
                error: f.error.clone(),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    fn lease() -> LocalLease {
        LocalLease {
            network: net("10.5.0.0/16"),
            subnet: net("10.5.1.0/24"),
            underlay: Underlay {
                name: "eth0".into(),
                addr: Ipv4Addr::new(198, 18, 0, 1),
                mtu: 1500,
            },
            mtu: 1472,
        }
    }

    fn vxlan_spec(vni: u32) -> OverlaySpec {
        let backend = Backend::Vxlan {
            vni,
            port: 8472,
            direct_routing: false,
            gbp: false,
            mtu: None,
        };
        OverlaySpec::new(&backend, Ipv4Addr::new(198, 18, 0, 1)).unwrap()
    }

    fn peer(subnet: &str, backend: PeerBackend) -> Peer {
        Peer {
            subnet: net(subnet),
            public_ip: Ipv4Addr::new(198, 18, 0, 2),
            backend,
        }
    }

    #[test]
    fn flanneld_udp_leases_have_no_backend_type() {
        let flanneld = PeerBackend::Udp {
            kernel_decap: false,
        };
        assert_eq!(PeerBackend::from_lease("", None), flanneld);
        assert_eq!(PeerBackend::from_lease("udp", None), flanneld);
        // Ours, on the eBPF datapath, says it decapsulates in the kernel; anything else is not.
        let ours = serde_json::json!({"KernelDecap": true});
        assert_eq!(
            PeerBackend::from_lease("", Some(&ours)),
            PeerBackend::Udp { kernel_decap: true }
        );
        for odd in [
            serde_json::json!({"KernelDecap": "yes"}),
            serde_json::json!({"KernelDecap": false}),
            serde_json::json!([1]),
        ] {
            assert_eq!(PeerBackend::from_lease("", Some(&odd)), flanneld, "{odd}");
        }
        let data = serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"});
        assert_eq!(
            PeerBackend::from_lease("vxlan", Some(&data)),
            PeerBackend::Vxlan {
                vtep_mac: "c6:d2:32:6f:8f:44".parse().unwrap()
            }
        );
        let bad = serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32"});
        assert_eq!(
            PeerBackend::from_lease("vxlan", Some(&bad)),
            PeerBackend::VxlanWithoutMac
        );
        assert_eq!(
            PeerBackend::from_lease("host-gw", None),
            PeerBackend::Other("host-gw".into())
        );
    }

    #[test]
    fn one_rule_from_peer_to_route() {
        let udp =
            OverlaySpec::new(&Backend::Udp { port: 8285 }, Ipv4Addr::new(198, 18, 0, 1)).unwrap();
        let vxlan = vxlan_spec(1);
        let l = lease();
        assert_eq!(
            udp.route_for(
                &l,
                &peer(
                    "10.5.2.0/24",
                    PeerBackend::Udp {
                        kernel_decap: false
                    }
                )
            )
            .map(|r| r.kernel_decap),
            Ok(false)
        );
        assert_eq!(
            udp.route_for(
                &l,
                &peer("10.5.2.0/24", PeerBackend::Udp { kernel_decap: true })
            )
            .map(|r| r.kernel_decap),
            Ok(true)
        );
        assert_eq!(
            udp.route_for(
                &l,
                &peer(
                    "10.6.2.0/24",
                    PeerBackend::Udp {
                        kernel_decap: false
                    }
                )
            ),
            Err(Unusable::OutsideNetwork)
        );
        assert_eq!(
            udp.route_for(
                &l,
                &peer(
                    "10.5.0.0/23",
                    PeerBackend::Udp {
                        kernel_decap: false
                    }
                )
            ),
            Err(Unusable::OutsideNetwork),
            "a lease over our own subnet"
        );
        let mac = Mac([2, 0, 0, 0, 0, 2]);
        assert!(matches!(
            udp.route_for(
                &l,
                &peer("10.5.2.0/24", PeerBackend::Vxlan { vtep_mac: mac })
            ),
            Err(Unusable::Backend { .. })
        ));
        assert_eq!(
            vxlan
                .route_for(
                    &l,
                    &peer("10.5.2.0/24", PeerBackend::Vxlan { vtep_mac: mac })
                )
                .map(|r| r.vtep_mac),
            Ok(mac)
        );
        assert_eq!(
            vxlan.route_for(&l, &peer("10.5.2.0/24", PeerBackend::VxlanWithoutMac)),
            Err(Unusable::VtepMac)
        );
        // An unusable update withdraws what the subnet had.
        assert!(matches!(
            vxlan.route_change(
                &l,
                &PeerEvent::Added(peer(
                    "10.5.2.0/24",
                    PeerBackend::Udp {
                        kernel_decap: false
                    }
                ))
            ),
            RouteChange::Withdraw {
                unusable: Some(Unusable::Backend { .. }),
                ..
            }
        ));
    }

    #[test]
    fn both_backends_lay_out_devices_as_flannel() {
        let l = lease();
        let udp =
            OverlaySpec::new(&Backend::Udp { port: 8285 }, Ipv4Addr::new(198, 18, 0, 1)).unwrap();
        let d = udp.device(&l);
        assert_eq!(
            (d.name.as_str(), d.addr_prefix_len, d.mtu),
            ("flannel0", 16, 1472)
        );
        assert_eq!(udp.backend_data(false), None);
        assert_eq!(
            udp.backend_data(true),
            Some(serde_json::json!({"KernelDecap": true}))
        );
        let vxlan = vxlan_spec(7);
        assert_eq!(vxlan.device(&l).name, "flannel.7");
        assert_eq!(vxlan.device(&l).addr_prefix_len, 32);
        assert_eq!(
            vxlan.backend_data(true),
            Some(serde_json::json!({"VNI": 7, "VtepMAC": "0e:fa:c6:12:00:01"}))
        );
        assert_eq!(vxlan.overhead(), 50);
        assert_eq!(udp.overhead(), 28);
    }
}
