//! The TUN datapath's mechanics behind [`Datapath`], for hosts where the eBPF programs cannot load.
//! It lays out the overlay device as the contract describes it (the same name, addresses, route
//! and VtepMAC as the eBPF datapath) and forwards in user space ([`super::Forwarder`]) in the same
//! wire formats, judging received datagrams by the same receive policy, so eBPF and TUN hosts mix
//! freely in one cluster.
//!
//! The forwarder runs while the agent runs: on restart, packets to other hosts are dropped from
//! the moment the old process exits until the new one has its lease and calls `start` (the
//! device, its addresses and routes persist meanwhile).

use std::{collections::BTreeMap, sync::Arc};

use super::{
    Forwarder, ForwarderConfig, ForwarderError, PeerRoute, PeerTable, Profile, SharedPeers,
};
use crate::{
    control::subnet::Subnet,
    dataplane::contract::{Datapath, DatapathError, LocalLease, OverlaySpec, Unhealthy},
    host::{
        Netlink,
        overlay::{Occupant, OverlayDeviceError},
        tun as host_tun,
    },
};

/// ICMP "destination unreachable" answers per second and worker.
const ICMP_PER_SECOND: u32 = 100;

/// Errors building the TUN datapath.
#[derive(Debug, thiserror::Error)]
pub enum TunDatapathError {
    /// The TUN driver is not usable here.
    #[error(
        "/dev/net/tun is not usable: {source} (load the tun module; the agent needs CAP_NET_ADMIN)"
    )]
    NoTun {
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `OVERLAY_TUN_PROFILE` is invalid.
    #[error(transparent)]
    Profile(#[from] ForwarderError),
}

/// flannel's udp and vxlan formats, forwarded in user space through the overlay TUN device.
pub struct TunDatapath {
    profile: Profile,
    peers: Arc<SharedPeers>,
    routes: BTreeMap<Subnet, PeerRoute>,
    /// `routes` changed since the forwarder's table was last published.
    unpublished: bool,
    forwarder: Option<Forwarder>,
    /// The TUN device, once started.
    device: Option<String>,
    /// Netlink is async; the datapath's calls are not, and run on a thread of their own.
    runtime: tokio::runtime::Runtime,
}

impl TunDatapath {
    /// Checks that the TUN driver can be opened (so a missing module shows before any lease is
    /// taken).
    pub fn new() -> Result<Self, TunDatapathError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| TunDatapathError::NoTun { source })?;
        let profile = Profile::from_env()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime builds");
        Ok(Self {
            profile,
            peers: Arc::new(SharedPeers::default()),
            routes: BTreeMap::new(),
            unpublished: false,
            forwarder: None,
            device: None,
            runtime,
        })
    }

    /// The forwarder's counters, once started.
    pub fn stats(&self) -> Option<super::StatsSnapshot> {
        self.forwarder.as_ref().map(Forwarder::stats)
    }

    fn publish(&self) {
        self.peers.publish(PeerTable::new(&self.routes));
    }
}

impl Datapath for TunDatapath {
    fn kind(&self) -> &'static str {
        "TUN"
    }

    fn counters(&self) -> Option<crate::dataplane::counters::SharedSource> {
        self.forwarder
            .as_ref()
            .map(|f| f.counters() as crate::dataplane::counters::SharedSource)
    }

    fn devices(&self) -> Vec<String> {
        self.device.iter().cloned().collect()
    }

    fn start(&mut self, spec: &OverlaySpec, lease: &LocalLease) -> Result<(), DatapathError> {
        let device = spec.device(lease);
        let name = device.name.clone();
        let device_error = |source: OverlayDeviceError| DatapathError::Device {
            device: name.clone(),
            source,
        };
        let netlink = {
            let _guard = self.runtime.enter();
            Netlink::connect().map_err(|e| device_error(e.into()))?
        };
        let occupant = self
            .runtime
            .block_on(device.occupant(&netlink))
            .map_err(|e| device_error(e.into()))?;
        match occupant {
            Occupant::KernelVxlan => {
                // flanneld's vxlan device holds the name, and its socket the port: both must go
                // before this datapath can have them. Forwarding pauses until the forwarder runs.
                tracing::warn!(
                    "deleting flanneld's vxlan device {name}: the TUN datapath needs its name and \
                     port (the eBPF datapath takes over without a pause)"
                );
                self.runtime
                    .block_on(device.drain_and_delete(&netlink))
                    .map_err(device_error)?;
            }
            Occupant::OwnTun if host_tun::is_multi_queue(&name) == Some(false) => {
                // The kernel cannot attach a second queue to a single-queue TUN; recreating it
                // loses its addresses and routes (re-added just below) and any program attached.
                tracing::warn!(
                    "{name} is a single-queue TUN device (made by an older version); recreating \
                     it as multi-queue"
                );
                host_tun::delete_persistent_tun(&name).map_err(|source| {
                    DatapathError::TunDevice {
                        device: name.clone(),
                        source,
                    }
                })?;
            }
            // A running flanneld's flannel0 is refused by prepare, naming the process.
            _ => {}
        }
        let index = self
            .runtime
            .block_on(device.prepare(&netlink))
            .map_err(device_error)?;
        if let Err(e) = host_tun::set_tx_queue_len(&name, host_tun::DATAPATH_TX_QUEUE_LEN) {
            // Forwarding works without it, only drops more under load.
            tracing::warn!("{e}; {name} keeps its transmit queue length");
        }
        let forwarder = Forwarder::start(
            ForwarderConfig {
                device: name.clone(),
                // No underlay ifindex: the kernel's UDP socket picks the route.
                host: spec.program_config(lease, 0, false),
                network: lease.network,
                // Not flannel0's own address: the kernel drops packets arriving with a local
                // source as martians. The Network's first address is no host's (leases start
                // at SubnetMin) and routes back through the device, so rp_filter passes it.
                icmp_source: lease.network.addr(),
                icmp_per_second: ICMP_PER_SECOND,
                mtu: lease.mtu,
                profile: self.profile,
            },
            self.peers.clone(),
        )
        .map_err(|source| DatapathError::Forwarder {
            device: name.clone(),
            source,
        })?;
        // Routed only now that the forwarder reads the device (for vxlan: the /32 address routes
        // nothing; udp's address already routes the Network here, which nothing else did).
        self.runtime
            .block_on(device.route(&netlink, index))
            .map_err(|source| DatapathError::Device {
                device: name.clone(),
                source,
            })?;
        tracing::info!(
            device = %name,
            "TUN datapath up: forwarding {name} <-> UDP port {} in user space, {}",
            spec.port(),
            forwarder.describe()
        );
        self.forwarder = Some(forwarder);
        self.device = Some(name.clone());
        Ok(())
    }

    fn install(&mut self, route: &PeerRoute) -> Result<(), DatapathError> {
        if self.routes.insert(route.subnet, *route) != Some(*route) {
            self.unpublished = true;
        }
        Ok(())
    }

    fn withdraw(&mut self, subnet: Subnet) -> Result<(), DatapathError> {
        if self.routes.remove(&subnet).is_some() {
            self.unpublished = true;
        }
        Ok(())
    }

    fn flush(&mut self) {
        // Building the table is linear in the peers: once per batch keeps 16k peers at start
        // from costing 16k tables.
        if std::mem::take(&mut self.unpublished) {
            self.publish();
        }
    }

    fn check(&self) -> Result<(), Unhealthy> {
        match &self.forwarder {
            None => Err(Unhealthy::NotStarted("TUN")),
            Some(f) => f.check(),
        }
    }
}
