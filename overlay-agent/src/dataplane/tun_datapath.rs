//! The TUN datapath behind the control plane's [`Datapath`] interface: for hosts where the eBPF
//! programs cannot load. It lays the overlay device out exactly as the eBPF datapath does (same
//! name, addresses, route, VtepMAC) and forwards in user space ([`super::tun`]), in the same wire
//! formats, so eBPF and TUN hosts mix freely in one cluster.
//!
//! The forwarder runs while the agent runs: on restart, packets to other hosts are dropped from
//! the moment the old process exits until the new one has its lease and calls `start` (the
//! device, its addresses and routes persist meanwhile).

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use super::{
    codec::Format,
    ebpf::vtep_mac_for,
    tun::{Forwarder, ForwarderConfig, ForwarderError, PeerRoute, PeerTable, Profile, SharedPeers},
};
use crate::{
    control::{
        config::Backend,
        datapath::{Datapath, DatapathError, LocalLease},
        peers::{Peer, PeerEvent},
    },
    host::{Netlink, OverlayDevice, tun as host_tun},
};

/// ICMP "destination unreachable" answers per second and worker.
const ICMP_PER_SECOND: u32 = 100;

/// Errors building the TUN datapath.
#[derive(Debug, thiserror::Error)]
pub enum TunDatapathError {
    /// The backend is not one the TUN datapath forwards.
    #[error("the TUN datapath forwards udp and vxlan, not {backend}")]
    Backend {
        /// The backend's type.
        backend: String,
    },
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
    backend: Backend,
    public_ip: Ipv4Addr,
    profile: Profile,
    peers: Arc<SharedPeers>,
    routes: BTreeMap<(Ipv4Addr, u8), PeerRoute>,
    forwarder: Option<Forwarder>,
    /// Netlink is async; the datapath's calls are not, and run on a thread of their own.
    runtime: tokio::runtime::Runtime,
}

impl TunDatapath {
    /// Checks that the TUN driver can be opened (so a missing module shows before any lease is
    /// taken).
    pub fn new(backend: Backend, public_ip: Ipv4Addr) -> Result<Self, TunDatapathError> {
        if !matches!(backend, Backend::Udp { .. } | Backend::Vxlan { .. }) {
            return Err(TunDatapathError::Backend {
                backend: backend.type_name().into(),
            });
        }
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
            backend,
            public_ip,
            profile,
            peers: Arc::new(SharedPeers::default()),
            routes: BTreeMap::new(),
            forwarder: None,
            runtime,
        })
    }

    /// The forwarder's counters, once started.
    pub fn stats(&self) -> Option<super::tun::StatsSnapshot> {
        self.forwarder.as_ref().map(Forwarder::stats)
    }

    fn device_name(&self) -> String {
        match self.backend {
            Backend::Vxlan { vni, .. } => format!("flannel.{vni}"),
            _ => "flannel0".into(),
        }
    }

    fn format(&self) -> Format {
        match self.backend {
            Backend::Vxlan { vni, .. } => Format::Vxlan {
                vni,
                local_mac: vtep_mac_for(self.public_ip),
            },
            _ => Format::Udp,
        }
    }

    fn port(&self) -> u16 {
        match self.backend {
            Backend::Vxlan { port, .. } | Backend::Udp { port } => port,
            Backend::Alloc => 0,
        }
    }

    fn route_for(&self, peer: &Peer) -> Result<PeerRoute, String> {
        if peer.backend_type != self.backend.type_name() {
            return Err(format!(
                "lease {} uses backend {}, this host {}",
                peer.subnet,
                peer.backend_type,
                self.backend.type_name()
            ));
        }
        let vtep_mac = match self.backend {
            Backend::Vxlan { .. } => peer
                .backend_data
                .as_ref()
                .and_then(|d| d.get("VtepMAC"))
                .and_then(|m| m.as_str())
                .and_then(parse_mac)
                .ok_or_else(|| format!("lease {} has no valid BackendData.VtepMAC", peer.subnet))?,
            _ => [0; 6],
        };
        Ok(PeerRoute {
            public_ip: peer.public_ip,
            vtep_mac,
        })
    }

    fn publish(&self) {
        self.peers.publish(PeerTable::new(&self.routes));
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn failed(
    context: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Failed { context, source }
}

impl Datapath for TunDatapath {
    fn describe(&self) -> String {
        format!("TUN ({}, userspace)", self.backend.type_name())
    }

    fn backend_data(&self) -> Option<serde_json::Value> {
        match self.backend {
            // The same VtepMAC the eBPF datapath publishes: a host may switch datapaths across a
            // restart without its peers noticing.
            Backend::Vxlan { vni, .. } => {
                let m = vtep_mac_for(self.public_ip);
                Some(serde_json::json!({
                    "VNI": vni,
                    "VtepMAC": format!(
                        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        m[0], m[1], m[2], m[3], m[4], m[5]
                    ),
                }))
            }
            _ => None,
        }
    }

    fn start(&mut self, lease: &LocalLease) -> Result<(), DatapathError> {
        let name = self.device_name();
        if host_tun::is_multi_queue(&name) == Some(false) {
            // The kernel cannot attach a second queue to a single-queue TUN; recreating it loses
            // its addresses and routes (re-added just below) and any program attached to it.
            tracing::warn!(
                "{name} is a single-queue TUN device (made by an older version); recreating it \
                 as multi-queue"
            );
            host_tun::delete_persistent_tun(&name)
                .map_err(|e| failed(format!("recreating {name}"))(Box::new(e)))?;
        }
        let device = OverlayDevice {
            name: name.clone(),
            mtu: lease.mtu,
            lease_addr: lease.subnet.addr(),
            addr_prefix_len: match self.backend {
                Backend::Vxlan { .. } => 32,
                _ => lease.network.prefix(),
            },
            network: (lease.network.addr(), lease.network.prefix()),
        };
        self.runtime
            .block_on(async {
                let netlink = Netlink::connect()?;
                device.ensure(&netlink).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .map_err(failed(format!("setting up {name}")))?;
        if let Err(e) = host_tun::set_tx_queue_len(&name, host_tun::DATAPATH_TX_QUEUE_LEN) {
            // Forwarding works without it, only drops more under load.
            tracing::warn!("{e}; {name} keeps its transmit queue length");
        }
        let forwarder = Forwarder::start(
            ForwarderConfig {
                device: name.clone(),
                format: self.format(),
                port: self.port(),
                network: (lease.network.addr(), lease.network.prefix()),
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
        .map_err(|e| failed(format!("starting the TUN forwarder on {name}"))(Box::new(e)))?;
        tracing::info!(
            device = %name,
            "TUN datapath up: forwarding {name} <-> UDP port {} in user space, {}",
            self.port(),
            forwarder.describe()
        );
        self.forwarder = Some(forwarder);
        Ok(())
    }

    fn apply(&mut self, event: &PeerEvent) -> Result<(), DatapathError> {
        match event {
            PeerEvent::Added(peer) => match self.route_for(peer) {
                Ok(route) => {
                    self.routes
                        .insert((peer.subnet.addr(), peer.subnet.prefix()), route);
                }
                Err(reason) => {
                    tracing::warn!("not forwarding to {}: {reason}", peer.subnet);
                    return Ok(());
                }
            },
            PeerEvent::Removed(subnet) => {
                self.routes.remove(&(subnet.addr(), subnet.prefix()));
            }
        }
        self.publish();
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        match &self.forwarder {
            None => Err("TUN datapath not started".into()),
            Some(f) => f.check(),
        }
    }
}
