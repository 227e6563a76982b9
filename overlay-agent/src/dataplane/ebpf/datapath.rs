//! The eBPF datapath's mechanics behind [`Datapath`]: on `start` it lays out the overlay device as
//! the contract describes it, writes the contract's program config and attaches the programs;
//! routes become map entries.

use std::path::PathBuf;

use super::{DecapHook, EbpfDataplane, EbpfError, pins::Pins};
use crate::{
    control::subnet::Subnet,
    dataplane::contract::{
        Datapath, DatapathError, Format, LocalLease, OverlaySpec, PeerRoute, Unhealthy,
    },
    host::{
        Netlink,
        finishing::{self, FINISH_PEER},
        overlay::{HANDOVER_DEVICE, Occupant, OverlayDevice, OverlayDeviceError},
    },
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
    /// Count no per-peer traffic (`--peer-counters=false`).
    pub no_peer_counters: bool,
}

impl EbpfOptions {
    /// Whether decapsulated packets go straight into the containers (`bpf_redirect_peer`, which
    /// needs TC decap), past the host stack and its conntrack.
    pub fn delivers_directly(&self) -> bool {
        self.decap == DecapHook::Tc && !self.deliver_via_stack
    }
}

/// flannel's udp and vxlan formats, encapsulated and decapsulated in the kernel.
pub struct EbpfDatapath {
    options: EbpfOptions,
    dataplane: EbpfDataplane,
    /// Netlink is async; the datapath's calls are not, and run on a thread of their own.
    runtime: tokio::runtime::Runtime,
    started: bool,
    /// What flanneld left, taken over once the peers are programmed (`synced`).
    takeover: Option<Takeover>,
    /// The device a running flanneld still holds; the handover device forwards until it is gone.
    waiting_for: Option<OverlayDevice>,
    /// The initial peer list is programmed: a takeover may proceed.
    synced: bool,
    /// Why the takeover's last step failed, while it does.
    takeover_error: Option<String>,
    /// See [`EbpfDatapath::netlink`].
    netlink: Option<Netlink>,
}

/// A takeover waiting for the initial peer list.
#[derive(Debug, Clone)]
struct Takeover {
    device: OverlayDevice,
    occupant: Occupant,
    underlay: String,
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
            takeover: None,
            waiting_for: None,
            synced: false,
            takeover_error: None,
            netlink: None,
        })
    }
}

impl EbpfDatapath {
    /// Moves a takeover on: the one waiting for the peer list (once they are programmed), then
    /// the wait for a running flanneld to release its device.
    fn resume(&mut self) -> Result<(), DatapathError> {
        if self.synced
            && let Some(takeover) = self.takeover.clone()
        {
            self.take_over(takeover)?;
            self.takeover = None;
        }
        let Some(device) = self.waiting_for.clone() else {
            return Ok(());
        };
        let netlink = self.netlink(&device.name)?;
        let occupant = self
            .runtime
            .block_on(device.occupant(&netlink))
            .map_err(|e| device_error(&device.name)(e.into()))?;
        if occupant == Occupant::LiveTun {
            return Ok(());
        }
        self.take_name(&netlink, &device)?;
        self.waiting_for = None;
        tracing::info!(
            "the process holding {0} stopped; {0} is now the agent's, and {1} is gone",
            device.name,
            HANDOVER_DEVICE
        );
        Ok(())
    }

    /// The datapath's one netlink connection, opened on first use (its task runs inside this
    /// thread's `block_on` calls): the 100 ms polls of a takeover reuse it.
    fn netlink(&mut self, device: &str) -> Result<Netlink, DatapathError> {
        if let Some(netlink) = &self.netlink {
            return Ok(netlink.clone());
        }
        let _guard = self.runtime.enter();
        let netlink = Netlink::connect().map_err(|e| device_error(device)(e.into()))?;
        self.netlink = Some(netlink.clone());
        Ok(netlink)
    }

    /// Takes over what flanneld left, in the order that keeps forwarding: arriving traffic to the
    /// programs, the Network to the handover device, then flanneld's device goes (vxlan) or is
    /// waited for (a running flanneld's udp device, see `poll`).
    fn take_over(&mut self, takeover: Takeover) -> Result<(), DatapathError> {
        let Takeover {
            device,
            occupant,
            underlay,
        } = takeover;
        let netlink = self.netlink(&device.name)?;
        self.dataplane
            .attach_decap(&underlay, self.options.decap)
            .map_err(ebpf("attaching the decapsulation program"))?;
        self.carry_on_handover(&netlink, &device)?;
        if occupant == Occupant::LiveTun {
            tracing::info!(
                "{} is held by a running process (flanneld?): forwarding through {} until it \
                 stops; stop it now (systemctl disable --now flanneld)",
                device.name,
                HANDOVER_DEVICE
            );
            self.waiting_for = Some(device);
            // take_name prunes on the other path.
            self.dataplane.prune_pins();
        } else {
            // The kernel device forwards until its per-peer routes go; the handover device,
            // routed the whole Network meanwhile, carries what each carried.
            let moved = self
                .runtime
                .block_on(device.drain_and_delete(&netlink))
                .map_err(device_error(&device.name))?;
            self.take_name(&netlink, &device)?;
            tracing::info!(
                "took over {} from flanneld's vxlan device ({moved} route(s) moved): its traffic \
                 is encapsulated by the eBPF programs, with the same VtepMAC",
                device.name
            );
        }
        Ok(())
    }

    /// `device` made (or kept), encapsulating, then routed the Network in one replace: no packet
    /// reaches it before the program does.
    fn serve(&mut self, netlink: &Netlink, device: &OverlayDevice) -> Result<(), DatapathError> {
        let index = self
            .runtime
            .block_on(device.prepare(netlink))
            .map_err(device_error(&device.name))?;
        self.dataplane
            .attach_encap(&device.name)
            .map_err(ebpf("attaching the encapsulation program"))?;
        self.runtime
            .block_on(device.route(netlink, index))
            .map_err(device_error(&device.name))
    }

    /// The Network routed to the handover device, encapsulated there by the same program: the
    /// device flanneld left may then go without a packet finding no route.
    fn carry_on_handover(
        &mut self,
        netlink: &Netlink,
        device: &OverlayDevice,
    ) -> Result<(), DatapathError> {
        self.serve(netlink, &device.handover())
    }

    /// The agent's own device under the overlay name, served; a handover device, if any, then
    /// carries nothing and goes.
    fn take_name(
        &mut self,
        netlink: &Netlink,
        device: &OverlayDevice,
    ) -> Result<(), DatapathError> {
        self.serve(netlink, device)?;
        let handover = device.handover();
        self.runtime
            .block_on(handover.drain_and_delete(netlink))
            .map_err(device_error(&handover.name))?;
        self.dataplane.forget_encap(&handover.name);
        Ok(())
    }
}

fn device_error(device: &str) -> impl FnOnce(OverlayDeviceError) -> DatapathError {
    let device = device.to_owned();
    move |source| DatapathError::Device { device, source }
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

    fn kernel_decap(&self) -> bool {
        true
    }

    fn start(&mut self, spec: &OverlaySpec, lease: &LocalLease) -> Result<(), DatapathError> {
        let device = spec.device(lease);
        let underlay = &lease.underlay;
        let netlink = self.netlink(&device.name)?;
        let (underlay_index, occupant) = self.runtime.block_on(async {
            let index = netlink
                .link(&underlay.name)
                .await
                .map(|l| l.index)
                .map_err(|source| DatapathError::Underlay {
                    interface: underlay.name.clone(),
                    source,
                })?;
            let occupant = device
                .occupant(&netlink)
                .await
                .map_err(|e| device_error(&device.name)(e.into()))?;
            Ok::<_, DatapathError>((index, occupant))
        })?;
        relax_rp_filter(&underlay.name);
        let mut config = spec.program_config(lease, underlay_index, self.options.deliver_via_stack);
        if self.options.no_peer_counters {
            config.flags |= overlay_common::maps::FLAG_NO_PEER_COUNTERS;
        }
        if matches!(spec.format, Format::Udp { .. }) {
            // Before the config names it, so tc_encap never redirects into nothing.
            config.finish_ifindex = self
                .runtime
                .block_on(finishing::ensure(&netlink, device.mtu))
                .map_err(|source| DatapathError::Finishing { source })?;
            self.dataplane
                .attach_finishing(FINISH_PEER)
                .map_err(ebpf("attaching the finishing program"))?;
        }
        self.dataplane
            .configure(&config)
            .map_err(ebpf("configuring the eBPF programs"))?;
        match occupant {
            Occupant::Free | Occupant::OwnTun => {
                self.dataplane
                    .attach_decap(&underlay.name, self.options.decap)
                    .map_err(ebpf("attaching the decapsulation program"))?;
                self.take_name(&netlink, &device)?;
            }
            Occupant::KernelVxlan | Occupant::LiveTun => {
                // flanneld forwards until the programs know every peer: taking its traffic any
                // earlier would refuse it.
                tracing::info!(
                    "{} was left by flanneld{}: taking it over once the peers are programmed",
                    device.name,
                    if occupant == Occupant::LiveTun {
                        ", which still runs"
                    } else {
                        ""
                    }
                );
                self.takeover = Some(Takeover {
                    device: device.clone(),
                    occupant,
                    underlay: underlay.name.clone(),
                });
            }
            Occupant::Other(kind) => {
                return Err(device_error(&device.name)(OverlayDeviceError::Occupied {
                    name: device.name.clone(),
                    kind,
                }));
            }
        }
        // Direct delivery needs TC decap (bpf_redirect_peer) and an operator who did not ask for
        // the stack.
        if self.options.delivers_directly() {
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

    fn poll(&mut self) -> Result<(), DatapathError> {
        let result = self.resume();
        // A failure is reported once (then health keeps saying it), not every poll.
        let text = result.as_ref().err().map(ToString::to_string);
        let repeated = text.is_some() && text == self.takeover_error;
        self.takeover_error = text;
        if repeated { Ok(()) } else { result }
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
        // Every peer is programmed now, whatever becomes of the stale ones.
        self.synced = true;
        let removed = self
            .dataplane
            .remove_stale_peers()
            .map_err(ebpf("removing stale peers"))?;
        if removed > 0 {
            tracing::info!("removed {removed} peer(s) left by the previous run and gone since");
        }
        // A failure keeps the takeover pending: health says why, and `poll` tries again (every
        // step is idempotent).
        let result = self.resume();
        self.takeover_error = result.as_ref().err().map(ToString::to_string);
        result
    }

    fn counters(&self) -> Option<crate::dataplane::counters::SharedSource> {
        let root = self.options.bpffs.clone()?;
        Some(std::sync::Arc::new(
            crate::dataplane::counters::PinnedCounters { root },
        ))
    }

    fn devices(&self) -> Vec<String> {
        self.dataplane.attachments()
    }

    fn check(&self) -> Result<(), Unhealthy> {
        if !self.started {
            return Err(Unhealthy::NotStarted("eBPF"));
        }
        // Until then flanneld forwards: stopping it now would cut traffic.
        let failing = |name: &str| match &self.takeover_error {
            Some(e) => format!("{name} (failing: {e})"),
            None => name.to_owned(),
        };
        match (&self.takeover, &self.waiting_for, &self.takeover_error) {
            (Some(t), _, _) => Err(Unhealthy::TakingOver(failing(&t.device.name))),
            (None, Some(d), Some(_)) => Err(Unhealthy::TakingOver(failing(&d.name))),
            _ => match self.dataplane.detached() {
                Some(why) => Err(Unhealthy::Detached(why)),
                None => Ok(()),
            },
        }
    }
}
