//! The eBPF datapath's mechanics behind [`Datapath`]: on `start` it lays out the overlay device as
//! the contract describes it, writes the contract's program config and attaches the programs;
//! routes become map entries.

use std::path::PathBuf;

use super::{DecapHook, EbpfDataplane, EbpfError, pins::Pins};
use crate::{
    control::subnet::Subnet,
    dataplane::contract::{Datapath, DatapathError, LocalLease, OverlaySpec, PeerRoute, Unhealthy},
    host::Netlink,
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
    dataplane: EbpfDataplane,
    /// Netlink is async; the datapath's calls are not, and run on a thread of their own.
    runtime: tokio::runtime::Runtime,
    started: bool,
}

impl EbpfDatapath {
    /// Loads the programs (so a kernel or privilege problem shows before any lease is taken),
    /// pinning under `bpffs` when given.
    pub fn new(options: EbpfOptions) -> Result<Self, EbpfError> {
        let pins = options.bpffs.as_deref().map(Pins::open).transpose()?;
        let dataplane = EbpfDataplane::load(pins)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime builds");
        Ok(Self {
            options,
            dataplane,
            runtime,
            started: false,
        })
    }
}

fn ebpf(op: &'static str) -> impl FnOnce(EbpfError) -> DatapathError {
    move |source| DatapathError::Ebpf {
        op,
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

impl Datapath for EbpfDatapath {
    fn kind(&self) -> &'static str {
        "eBPF"
    }

    fn start(&mut self, spec: &OverlaySpec, lease: &LocalLease) -> Result<(), DatapathError> {
        let device = spec.device(lease);
        let underlay = &lease.underlay;
        let underlay_index = self.runtime.block_on(async {
            let netlink = Netlink::connect().map_err(|source| DatapathError::Underlay {
                interface: underlay.name.clone(),
                source,
            })?;
            device
                .ensure(&netlink)
                .await
                .map_err(|source| DatapathError::Device {
                    device: device.name.clone(),
                    source,
                })?;
            netlink
                .link(&underlay.name)
                .await
                .map(|l| l.index)
                .map_err(|source| DatapathError::Underlay {
                    interface: underlay.name.clone(),
                    source,
                })
        })?;
        relax_rp_filter(&underlay.name);
        self.dataplane
            .configure(&spec.program_config(lease, underlay_index, self.options.deliver_via_stack))
            .map_err(ebpf("configuring the eBPF programs"))?;
        self.dataplane
            .attach(&device.name, &underlay.name, self.options.decap)
            .map_err(ebpf("attaching the eBPF programs"))?;
        // Direct delivery needs TC decap (bpf_redirect_peer) and an operator who did not ask for
        // the stack.
        if self.options.decap == DecapHook::Tc && !self.options.deliver_via_stack {
            let endpoints = self
                .dataplane
                .take_endpoints()
                .map_err(ebpf("opening the endpoints map"))?;
            super::endpoints::spawn(endpoints, lease.subnet.first_host())
                .map_err(|source| DatapathError::Endpoints { source })?;
        }
        tracing::info!(
            device = %device.name,
            underlay = %underlay.name,
            "eBPF datapath up: encapsulating on {} egress, decapsulating on {} ingress",
            device.name,
            underlay.name
        );
        self.started = true;
        Ok(())
    }

    fn install(&mut self, route: &PeerRoute) -> Result<(), DatapathError> {
        self.dataplane
            .upsert_peer(*route)
            .map_err(|source| DatapathError::EbpfPeer {
                subnet: route.subnet,
                source: Box::new(source),
            })
    }

    fn withdraw(&mut self, subnet: Subnet) -> Result<(), DatapathError> {
        self.dataplane
            .remove_peer(subnet)
            .map_err(|source| DatapathError::EbpfPeer {
                subnet,
                source: Box::new(source),
            })
    }

    fn synced(&mut self) -> Result<(), DatapathError> {
        let removed = self
            .dataplane
            .remove_stale_peers()
            .map_err(ebpf("removing stale peers"))?;
        if removed > 0 {
            tracing::info!("removed {removed} peer(s) left by the previous run and gone since");
        }
        Ok(())
    }

    fn check(&self) -> Result<(), Unhealthy> {
        if self.started {
            Ok(())
        } else {
            Err(Unhealthy::NotStarted("eBPF"))
        }
    }
}
