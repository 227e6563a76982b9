//! The eBPF datapath behind the control plane's [`Datapath`] interface: on `start` it lays out the
//! overlay device as flannel does, configures and attaches the programs, then turns each peer
//! event into map updates.

use std::{net::Ipv4Addr, path::PathBuf};

use overlay_common::maps::Encap;

use super::{
    ebpf::{DecapHook, EbpfConfig, EbpfDataplane, EbpfError, PeerRoute, vtep_mac_for},
    pins::Pins,
};
use crate::{
    control::{
        config::Backend,
        datapath::{Datapath, DatapathError, LocalLease},
        peers::{Peer, PeerEvent},
        subnet::Subnet,
    },
    host::{Netlink, OverlayDevice},
};

/// Operator choices for the eBPF datapath.
#[derive(Debug, Clone, Default)]
pub struct EbpfOptions {
    /// Pin programs and maps under this bpffs directory, so they outlive the agent.
    pub bpffs: Option<PathBuf>,
    /// Where decapsulation runs.
    pub decap: DecapHook,
    /// Deliver decapsulated packets through the host stack (netfilter FORWARD, docker's rules)
    /// instead of straight into containers.
    pub deliver_via_stack: bool,
}

/// flannel's udp and vxlan formats, encapsulated and decapsulated in the kernel.
pub struct EbpfDatapath {
    options: EbpfOptions,
    backend: Backend,
    encap: Encap,
    public_ip: Ipv4Addr,
    dataplane: EbpfDataplane,
    /// Netlink is async; the datapath's calls are not, and run on a thread of their own.
    runtime: tokio::runtime::Runtime,
    started: bool,
    /// The Network and our subnet, once started: peers must fit in the one, outside the other.
    lease: Option<(Subnet, Subnet)>,
    /// The last peer update that failed, for /healthz.
    failing: Option<(Subnet, String)>,
}

impl EbpfDatapath {
    /// Loads the programs (so a kernel or privilege problem shows before any lease is taken),
    /// pinning under `bpffs` when given.
    pub fn new(
        backend: Backend,
        public_ip: Ipv4Addr,
        options: EbpfOptions,
    ) -> Result<Self, EbpfError> {
        let encap = match backend {
            Backend::Vxlan { .. } => Encap::Vxlan,
            _ => Encap::Udp,
        };
        let pins = options.bpffs.as_deref().map(Pins::open).transpose()?;
        let dataplane = EbpfDataplane::load(pins)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime builds");
        Ok(Self {
            options,
            backend,
            encap,
            public_ip,
            dataplane,
            runtime,
            started: false,
            lease: None,
            failing: None,
        })
    }

    /// flannel's device names: `flannel0` for udp, `flannel.<VNI>` for vxlan.
    fn device_name(&self) -> String {
        match self.backend {
            Backend::Vxlan { vni, .. } => format!("flannel.{vni}"),
            _ => "flannel0".into(),
        }
    }

    fn port_and_vni(&self) -> (u16, u32) {
        match self.backend {
            Backend::Vxlan { vni, port, .. } => (port, vni),
            Backend::Udp { port } => (port, 0),
            Backend::Alloc => (0, 0),
        }
    }

    fn route_for(&self, peer: &Peer) -> Result<PeerRoute, Unusable> {
        if let Some((network, own)) = &self.lease
            && (!network.contains(&peer.subnet) || own.overlaps(&peer.subnet))
        {
            // A lease outside the Network (or over our own subnet) would widen what decap
            // accepts from that peer, up to our own containers' addresses.
            return Err(Unusable::OutsideNetwork);
        }
        if peer.backend_type != self.backend.type_name() {
            return Err(Unusable::Backend {
                theirs: peer.backend_type.clone(),
            });
        }
        let vtep_mac = match self.encap {
            Encap::Vxlan => peer
                .backend_data
                .as_ref()
                .and_then(|d| d.get("VtepMAC"))
                .and_then(|m| m.as_str())
                .and_then(parse_mac)
                .ok_or(Unusable::VtepMac)?,
            _ => [0; 6],
        };
        Ok(PeerRoute {
            subnet: peer.subnet.addr(),
            prefix_len: peer.subnet.prefix(),
            public_ip: peer.public_ip,
            vtep_mac,
        })
    }
}

/// Why a peer's lease cannot be forwarded to.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    /// Its subnet is not inside the Network, or overlaps ours.
    #[error("its subnet is outside the Network or overlaps this host's")]
    OutsideNetwork,
    /// It runs another backend.
    #[error("it uses backend {theirs}")]
    Backend {
        /// The peer's BackendType.
        theirs: String,
    },
    /// A vxlan lease without a usable VtepMAC.
    #[error("its BackendData has no valid VtepMAC")]
    VtepMac,
}

fn failed(context: impl Into<String>) -> impl FnOnce(EbpfError) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Failed {
        context,
        source: Box::new(source),
    }
}

/// Decapsulated packets that go up the host stack arrive on the underlay interface with sources
/// that route via the overlay device; strict reverse-path filtering (RHEL's default) would drop
/// them. Loose mode keeps the spoofing protection that matters here (the source must be routable),
/// and the decap program already checked the sender.
fn relax_rp_filter(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/rp_filter");
    match std::fs::read_to_string(&path).map(|v| v.trim().to_owned()) {
        Ok(v) if v == "1" => match std::fs::write(&path, "2") {
            Ok(()) => tracing::info!(
                "rp_filter on {interface} was strict (1); set to loose (2) so decapsulated \
                 packets delivered through the stack are not dropped"
            ),
            Err(e) => tracing::warn!(
                "rp_filter on {interface} is strict (1) and could not be relaxed ({e}): \
                 packets delivered through the stack will be dropped"
            ),
        },
        Ok(_) => {}
        Err(e) => tracing::debug!("reading {path}: {e}"),
    }
}

fn event_subnet(event: &PeerEvent) -> Subnet {
    match event {
        PeerEvent::Added(peer) => peer.subnet,
        PeerEvent::Removed(subnet) => *subnet,
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

impl Datapath for EbpfDatapath {
    fn describe(&self) -> String {
        format!("eBPF ({})", self.backend.type_name())
    }

    fn backend_data(&self) -> Option<serde_json::Value> {
        super::backend_data(&self.backend, self.public_ip)
    }

    fn start(&mut self, lease: &LocalLease) -> Result<(), DatapathError> {
        let underlay = lease
            .underlay
            .as_ref()
            .ok_or_else(|| DatapathError::Failed {
                context: "starting the eBPF datapath".into(),
                source: "no underlay interface (give --iface)".into(),
            })?;
        let device = OverlayDevice {
            name: self.device_name(),
            mtu: lease.mtu,
            lease_addr: lease.subnet.addr(),
            addr_prefix_len: match self.encap {
                Encap::Vxlan => 32,
                _ => lease.network.prefix(),
            },
            network: (lease.network.addr(), lease.network.prefix()),
        };
        let underlay_index = self
            .runtime
            .block_on(async {
                let netlink = Netlink::connect()?;
                device.ensure(&netlink).await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    netlink.link(&underlay.name).await?.index,
                )
            })
            .map_err(|source| DatapathError::Failed {
                context: format!("setting up {}", device.name),
                source,
            })?;
        relax_rp_filter(&underlay.name);
        let (port, vni) = self.port_and_vni();
        self.dataplane
            .configure(&EbpfConfig {
                encap: self.encap,
                local_ip: underlay.addr,
                subnet: (lease.subnet.addr(), lease.subnet.prefix()),
                underlay_ifindex: underlay_index,
                port,
                vni,
                vtep_mac: vtep_mac_for(self.public_ip),
                deliver_via_stack: self.options.deliver_via_stack,
            })
            .map_err(failed("configuring the eBPF programs"))?;
        self.dataplane
            .attach(&device.name, &underlay.name, self.options.decap)
            .map_err(failed(format!(
                "attaching to {} and {}",
                device.name, underlay.name
            )))?;
        // Direct delivery needs TC decap (bpf_redirect_peer) and an operator who did not ask for
        // the stack.
        if self.options.decap == DecapHook::Tc && !self.options.deliver_via_stack {
            let endpoints = self
                .dataplane
                .take_endpoints()
                .map_err(failed("opening the endpoints map"))?;
            super::endpoints::spawn(endpoints, lease.subnet.first_host()).map_err(|source| {
                DatapathError::Failed {
                    context: "starting the endpoint learner".into(),
                    source: Box::new(source),
                }
            })?;
        }
        tracing::info!(
            device = %device.name,
            underlay = %underlay.name,
            "eBPF datapath up: encapsulating on {} egress, decapsulating on {} ingress",
            device.name,
            underlay.name
        );
        self.lease = Some((lease.network, lease.subnet));
        self.started = true;
        Ok(())
    }

    fn apply(&mut self, event: &PeerEvent) -> Result<(), DatapathError> {
        let result = match event {
            PeerEvent::Added(peer) => match self.route_for(peer) {
                Ok(route) => self
                    .dataplane
                    .upsert_peer(route)
                    .map_err(failed(format!("programming peer {}", peer.subnet))),
                Err(reason) => {
                    tracing::warn!("not forwarding to {}: {reason}", peer.subnet);
                    // What the subnet had before no longer holds either.
                    self.dataplane
                        .remove_peer(peer.subnet.addr(), peer.subnet.prefix())
                        .map_err(failed(format!("removing peer {}", peer.subnet)))
                }
            },
            PeerEvent::Removed(subnet) => self
                .dataplane
                .remove_peer(subnet.addr(), subnet.prefix())
                .map_err(failed(format!("removing peer {subnet}"))),
        };
        // A failed update stays visible on /healthz until a later one to the same peer works.
        match &result {
            Ok(()) => {
                if self
                    .failing
                    .as_ref()
                    .is_some_and(|(subnet, _)| *subnet == event_subnet(event))
                {
                    self.failing = None;
                }
            }
            Err(e) => self.failing = Some((event_subnet(event), e.to_string())),
        }
        result
    }

    fn synced(&mut self) -> Result<(), DatapathError> {
        let removed = self
            .dataplane
            .remove_stale_peers()
            .map_err(failed("removing stale peers"))?;
        if removed > 0 {
            tracing::info!("removed {removed} peer(s) left by the previous run and gone since");
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if !self.started {
            return Err("eBPF datapath not started".into());
        }
        match &self.failing {
            Some((subnet, error)) => Err(format!("peer {subnet} not programmed: {error}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannel_vtep_macs() {
        assert_eq!(
            parse_mac("c6:d2:32:6f:8f:44"),
            Some([0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44])
        );
        assert_eq!(parse_mac("c6:d2:32:6f:8f"), None);
        assert_eq!(parse_mac("c6:d2:32:6f:8f:44:00"), None);
        assert_eq!(parse_mac("zz:d2:32:6f:8f:44"), None);
    }
}
