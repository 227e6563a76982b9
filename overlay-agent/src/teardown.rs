//! `overlay-agent teardown`: removes what the agent deliberately leaves behind when it stops, so
//! that forwarding survives restarts and upgrades: the persistent overlay TUN devices
//! (`flannel0` for udp, `flannel.<VNI>` for vxlan) with their addresses and routes, and the pinned
//! programs' links and maps under `--bpffs` (removing the last link pin detaches the programs),
//! the netfilter chains it installed (forward rules, `--ip-masq`; flanneld's chain names, which
//! the agent adopts, and `OVERLAY-*` of older versions), and the `--ip-blackhole-route` route.
//!
//! Every step runs whatever failed before it; every failure is collected and reported, and the
//! exit status is non-zero if there was any. Running it again when nothing is left is a no-op.
//! It acts in the calling network namespace only. A `flannel.<N>` that is not a TUN device (the
//! kernel vxlan device of flanneld itself), or a `flannel0` a running process holds (flanneld's),
//! was not created by this agent and is left alone. Devices go one route at a time, then the
//! device, so another route takes their traffic at once.
//!
//! `--to-flanneld` hands the host back to flanneld without a moment in which a packet has no path
//! (see `hand_back`), and leaves flanneld's chains and blackhole route to it.
//!
//! While an agent runs in the same network namespace, teardown removes nothing and fails: taking
//! the dataplane from under a running agent stops its forwarding while it goes on reporting
//! itself healthy. `--force` proceeds anyway, after saying what it is about to break.

use std::path::{Path, PathBuf};

use crate::{
    dataplane::ebpf::pins::Pins,
    host::{Netlink, iptables, netlink::BLACKHOLE_METRIC},
};

/// `overlay-agent teardown` flags (the pin directory is the global `--bpffs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TeardownArgs {
    /// Hand the host back to flanneld, still forwarding: with vxlan, the agent's device is
    /// replaced by flanneld's kernel `flannel.<VNI>` with this host's VtepMAC and every peer's
    /// neighbour, FDB entry and route, which the kernel forwards by until flanneld starts and
    /// keeps it; flanneld's chains and the blackhole route stay for it. With udp there is nothing
    /// to hand back (flanneld forwards in its own process): as without the flag.
    #[arg(long)]
    pub to_flanneld: bool,
    /// Tear down even while an agent runs in this network namespace. Its forwarding to every
    /// peer stops at once (the devices and programs go from under it), it does not notice, and
    /// may bring its device back without the programs; what it breaks is printed before
    /// anything is removed. Stopping the agent first is the safe way.
    #[arg(long)]
    pub force: bool,
}

/// What could not be removed, or why a teardown is unsafe.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// An agent still runs here: it keeps its programs attached and may bring its device back.
    #[error(
        "overlay-agent (pid {pid}) is still running in this network namespace; nothing was \
         removed: stop it first (systemctl stop overlay-agent), or give --force to break its \
         forwarding anyway"
    )]
    AgentRunning {
        /// Its process id.
        pid: u32,
    },
    /// An overlay device could not be removed.
    #[error(transparent)]
    Device(#[from] crate::host::overlay::RemoveDevicesError),
    /// A netlink request failed (the `--ip-blackhole-route` routes were not removed).
    #[error("{0} (blackhole routes not removed)")]
    Netlink(#[source] crate::host::NetlinkError),
    /// The pin directory could not be looked at.
    #[error("looking at {path}: {source}")]
    Bpffs {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A pinned link or map could not be removed.
    #[error(transparent)]
    Pins(#[from] crate::dataplane::ebpf::pins::PinsError),
    /// A netfilter chain or rule could not be removed.
    #[error(transparent)]
    Netfilter(#[from] iptables::IptablesError),
    /// Handing the host back to flanneld failed at one step (what came before it stays, and
    /// the rest of the teardown runs).
    #[error("handing back to flanneld: {what}: {reason}")]
    HandBack {
        /// The step.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// What a teardown did.
#[derive(Debug, Default)]
pub struct Report {
    /// What was removed, one line each.
    pub removed: Vec<String>,
    /// What was left alone on purpose, one line each.
    pub notes: Vec<String>,
    /// What could not be removed.
    pub errors: Vec<TeardownError>,
}

/// Agents still running in this network namespace (other than this process), as `pid`s.
fn running_agents() -> Vec<u32> {
    let own_ns = std::fs::read_link("/proc/self/ns/net").ok();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let proc = PathBuf::from(format!("/proc/{pid}"));
            let exe_is_agent = std::fs::read_to_string(proc.join("comm"))
                .is_ok_and(|c| c.trim() == "overlay-agent");
            // argv[1..] holding a subcommand name means a tool like this one, not the daemon.
            let tool = std::fs::read(proc.join("cmdline")).is_ok_and(|c| {
                c.split(|b| *b == 0)
                    .skip(1)
                    .any(|a| a == b"teardown" || a == b"docker-opts")
            });
            exe_is_agent && !tool && std::fs::read_link(proc.join("ns/net")).ok() == own_ns
        })
        .collect()
}

/// What `--force` breaks for the running agent `pid`, one line, said before anything goes.
fn force_warning(pid: u32) -> String {
    format!(
        "--force: overlay-agent (pid {pid}) is running here; tearing down anyway: its forwarding \
         to every peer stops now (devices, routes and programs go from under it), its containers \
         lose the overlay, it is not told and keeps its lease and health answer, and it may \
         bring its device back without the programs; restart it afterwards"
    )
}

/// Removes the overlay devices and the pins under `bpffs`, collecting every failure; with
/// `to_flanneld`, first lays the host out for flanneld (see [`TeardownArgs::to_flanneld`]).
/// Without `force`, an agent running in this network namespace stops it before anything is
/// removed; with it, `warn` hears what will break first.
pub async fn teardown(bpffs: &Path, args: &TeardownArgs, warn: &mut dyn FnMut(&str)) -> Report {
    let mut report = Report::default();
    let agents = running_agents();
    if !agents.is_empty() {
        if !args.force {
            report.errors.extend(
                agents
                    .into_iter()
                    .map(|pid| TeardownError::AgentRunning { pid }),
            );
            return report;
        }
        for &pid in &agents {
            warn(&force_warning(pid));
        }
    }
    if args.to_flanneld {
        match hand_back(bpffs).await {
            Ok(HandBack::Bridge(line)) => {
                // The bridge forwards until flanneld does: nothing else may go yet.
                report.notes.push(line);
                return report;
            }
            Ok(HandBack::Done(line)) => report.removed.push(line),
            Ok(HandBack::Nothing) => report.notes.push(
                "nothing to hand back to flanneld: no eBPF dataplane of the agent here (the TUN \
                 datapath forwards in the agent's process)"
                    .into(),
            ),
            Err(e) => {
                report.errors.push(e);
                return report;
            }
        }
    }
    devices(&mut report).await;
    // After the devices: the programs deliver arriving traffic until then.
    pins(bpffs, &mut report);
    if args.to_flanneld {
        report
            .notes
            .push("left flanneld's iptables chains and blackhole route to flanneld".into());
    } else {
        match Netlink::connect() {
            Ok(netlink) => blackhole_routes(&netlink, &mut report).await,
            Err(e) => report.errors.push(TeardownError::Netlink(e)),
        }
        netfilter(&mut report);
    }
    report
}

/// A hand-back step's failure, named by the step.
trait Step<T> {
    fn step(self, what: &'static str) -> Result<T, TeardownError>;
}

impl<T, E: std::fmt::Display> Step<T> for Result<T, E> {
    fn step(self, what: &'static str) -> Result<T, TeardownError> {
        self.map_err(|e| TeardownError::HandBack {
            what,
            reason: e.to_string(),
        })
    }
}

/// What [`hand_back`] did.
enum HandBack {
    /// The host is flanneld's, forwarding; the rest of the teardown may run.
    Done(String),
    /// udp: a bridge forwards until flanneld runs; run again then.
    Bridge(String),
    /// No eBPF dataplane of the agent here.
    Nothing,
}

/// Hands the host to flanneld without a moment in which a packet has no path.
///
/// vxlan: the Network to the handover device (the agent's encapsulation, reusing the pinned
/// maps), the agent's device away, flanneld's kernel device with every pinned peer (each route
/// takes its subnet), the handover device away: the kernel forwards from then on, and flanneld
/// keeps the device. udp: flanneld forwards in its own process, which needs `flannel0`'s name and
/// a free route for the Network; so the agent's device gives them up to a bridge (the handover
/// device with a route per peer, more specific than flanneld's Network route, and the
/// programs), which a second run removes once flanneld runs: each peer's route goes in its own
/// atomic change, handing that subnet to flanneld's route.
async fn hand_back(bpffs: &Path) -> Result<HandBack, TeardownError> {
    use crate::{
        dataplane::ebpf::EbpfDataplane,
        host::overlay::{FlanneldVxlan, HANDOVER_DEVICE, Occupant, OverlayDevice},
    };
    use overlay_common::maps::Encap;

    let failed = |what: &'static str, reason: &dyn std::fmt::Display| TeardownError::HandBack {
        what,
        reason: reason.to_string(),
    };
    if !bpffs.exists() {
        return Ok(HandBack::Nothing);
    }
    let pins = Pins::open(bpffs).step("opening the pins")?;
    if !pins.has_maps() {
        return Ok(HandBack::Nothing);
    }
    let mut dataplane = EbpfDataplane::load(Some(pins)).step("loading the programs")?;
    let (config, peers) = dataplane.programmed().step("reading the pinned maps")?;
    let encap = Encap::from_u8(config.encap);
    let name = match encap {
        Encap::Vxlan => format!("flannel.{}", config.vni),
        _ => "flannel0".to_owned(),
    };
    let netlink = Netlink::connect().step("connecting to netlink")?;
    let lease_addr = std::net::Ipv4Addr::from(config.subnet);
    let mut device = OverlayDevice {
        name: name.clone(),
        mtu: 0,
        lease_addr,
        addr_prefix_len: 32,
        network: (lease_addr, 32),
    };
    let occupant = device
        .occupant(&netlink)
        .await
        .step("looking at the device")?;
    let flanneld_vxlan = |mtu: u32| FlanneldVxlan {
        name: name.clone(),
        vni: config.vni,
        port: config.port,
        underlay: config.underlay_ifindex,
        local: std::net::Ipv4Addr::from(config.local_ip),
        mac: config.vtep_mac,
        mtu,
        lease_addr,
    };
    if occupant != Occupant::OwnTun {
        let handover = device.handover();
        if handover
            .occupant(&netlink)
            .await
            .step("looking at the handover device")?
            != Occupant::OwnTun
        {
            return Ok(HandBack::Nothing);
        }
        // The handover device carries traffic: a second run, or a run (or a takeover) cut short.
        let bridge = netlink
            .link(HANDOVER_DEVICE)
            .await
            .step("looking at the handover device")?;
        return match (encap, occupant) {
            // flanneld's own flannel0 is there (it holds it open). A route of the bridge that is
            // no peer's (the Network route a takeover cut short moved off flanneld's device) goes
            // back to it first; the caller's teardown then drains the bridge a route at a time.
            (Encap::Udp, Occupant::LiveTun) => {
                let flannel0 = netlink
                    .link(&name)
                    .await
                    .step("looking at flanneld's flannel0")?;
                let routes = netlink
                    .routes_via(bridge.index)
                    .await
                    .step("reading the bridge's routes")?;
                for (dst, len) in routes {
                    if !peers
                        .iter()
                        .any(|p| p.subnet.addr() == dst && p.subnet.prefix() == len)
                    {
                        netlink
                            .replace_route(dst, len, flannel0.index)
                            .await
                            .step("routing the Network back to flannel0")?;
                    }
                }
                Ok(HandBack::Done(format!(
                    "the bridge to flanneld ({HANDOVER_DEVICE}): flanneld's flannel0 carries the \
                     traffic from here"
                )))
            }
            (Encap::Udp, _) => Err(failed(
                "removing the bridge",
                &"flanneld does not run here yet (no flannel0 of its own): start it, then run \
                  this again; removing the bridge now would stop forwarding",
            )),
            // vxlan, cut short: flanneld's device finished (every step a replace), then the
            // caller's teardown drains the bridge.
            (Encap::Vxlan, Occupant::Free) => {
                flanneld_vxlan(bridge.mtu)
                    .lay_out(&netlink, &peers)
                    .await
                    .step("laying out flanneld's device")?;
                Ok(HandBack::Done(format!(
                    "{name} laid out for flanneld with {} peer(s), resumed",
                    peers.len()
                )))
            }
            (Encap::Vxlan, Occupant::KernelVxlan) => {
                let kernel = netlink
                    .link(&name)
                    .await
                    .step("looking at the vxlan device")?;
                FlanneldVxlan::add_peers(&netlink, kernel.index, &peers)
                    .await
                    .step("programming flanneld's device")?;
                Ok(HandBack::Done(format!(
                    "{name}'s {} peer(s) programmed for flanneld, resumed",
                    peers.len()
                )))
            }
            (_, other) => Err(failed(
                "resuming the hand-back",
                &format!("{name} is {other:?}, neither the agent's nor flanneld's"),
            )),
        };
    }
    let link = netlink.link(&name).await.step("looking at the device")?;
    device.mtu = link.mtu;
    // The Network: the widest route through the agent's device.
    device.network = netlink
        .routes_via(link.index)
        .await
        .step("reading the device's routes")?
        .into_iter()
        .min_by_key(|(_, len)| *len)
        .ok_or_else(|| failed("finding the Network route", &"no route through the device"))?;
    let handover = device.handover();
    let index = handover
        .prepare(&netlink)
        .await
        .step("creating the handover device")?;
    dataplane
        .attach_encap(&handover.name)
        .step("attaching the encapsulation")?;
    match encap {
        Encap::Vxlan => {
            handover
                .route(&netlink, index)
                .await
                .step("routing the Network to the handover device")?;
            device
                .drain_and_delete(&netlink)
                .await
                .step("removing the agent's device")?;
            flanneld_vxlan(device.mtu)
                .lay_out(&netlink, &peers)
                .await
                .step("laying out flanneld's device")?;
            handover
                .drain_and_delete(&netlink)
                .await
                .step("removing the handover device")?;
            Ok(HandBack::Done(format!(
                "the agent's {name}, replaced by flanneld's kernel vxlan device with VtepMAC {} \
                 and {} peer(s): it forwards until flanneld starts and keeps it",
                overlay_common::net::Mac(config.vtep_mac),
                peers.len()
            )))
        }
        _ => {
            for peer in &peers {
                netlink
                    .replace_route(peer.subnet.addr(), peer.subnet.prefix(), index)
                    .await
                    .step("routing a peer to the handover device")?;
            }
            device
                .drain_and_delete(&netlink)
                .await
                .step("removing the agent's device")?;
            Ok(HandBack::Bridge(format!(
                "flannel0 and the Network's route are free for flanneld; a bridge ({HANDOVER_DEVICE}, \
                 a route per peer for {} peer(s), the programs) forwards until flanneld does: \
                 start flanneld, then run overlay-agent teardown --to-flanneld again",
                peers.len()
            )))
        }
    }
}

/// The agent's iptables chains present (flanneld's names, and `OVERLAY-*` of older versions),
/// as `table/chain`.
fn overlay_chains() -> Vec<String> {
    iptables::all_chains()
        .into_iter()
        .filter(|(table, _, chain)| iptables::chain_exists(table, chain))
        .map(|(table, _, chain)| format!("{table}/{chain}"))
        .collect()
}

fn netfilter(report: &mut Report) {
    let before = overlay_chains();
    if before.is_empty() {
        return;
    }
    let errors = iptables::remove_rules();
    if errors.is_empty() {
        report.removed.push(format!(
            "iptables chains {} and their jumps",
            before.join(", ")
        ));
    }
    report
        .errors
        .extend(errors.into_iter().map(TeardownError::from));
}

/// The `--ip-blackhole-route` routes (recognised by their metric).
async fn blackhole_routes(netlink: &Netlink, report: &mut Report) {
    let routes = match netlink.blackhole_routes(BLACKHOLE_METRIC).await {
        Ok(r) => r,
        Err(e) => {
            report.errors.push(TeardownError::Netlink(e));
            return;
        }
    };
    for (dst, len) in routes {
        match netlink.delete_blackhole(dst, len, BLACKHOLE_METRIC).await {
            Ok(()) => report.removed.push(format!(
                "blackhole route {dst}/{len} (--ip-blackhole-route)"
            )),
            Err(e) => report.errors.push(TeardownError::Netlink(e)),
        }
    }
}

fn pins(bpffs: &Path, report: &mut Report) {
    match std::fs::symlink_metadata(bpffs) {
        Ok(_) => {
            let errors = Pins::teardown(bpffs);
            if errors.is_empty() {
                report.removed.push(format!(
                    "pinned links and maps under {} (the programs detach with their last link)",
                    bpffs.display()
                ));
            }
            report
                .errors
                .extend(errors.into_iter().map(TeardownError::from));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => report.errors.push(TeardownError::Bpffs {
            path: bpffs.to_owned(),
            source,
        }),
    }
}

async fn devices(report: &mut Report) {
    let done = crate::host::overlay::remove_all().await;
    report.removed.extend(done.removed);
    report.notes.extend(done.left);
    report
        .errors
        .extend(done.errors.into_iter().map(TeardownError::from));
}

/// `overlay-agent teardown`: prints what it removed and what failed; non-zero on any failure.
pub fn main(bpffs: &Path, args: &TeardownArgs) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("overlay-agent teardown: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(teardown(bpffs, args, &mut |line| eprintln!("{line}")));
    for line in &report.removed {
        println!("removed {line}");
    }
    for line in &report.notes {
        println!("{line}");
    }
    if report.removed.is_empty() && report.errors.is_empty() {
        println!("nothing to remove");
    }
    if report.errors.is_empty() {
        return std::process::ExitCode::SUCCESS;
    }
    eprintln!(
        "overlay-agent teardown: {} failure(s):",
        report.errors.len()
    );
    for e in &report.errors {
        eprintln!("  {e}");
    }
    std::process::ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_removed_then_nothing_to_do() {
        // Pins::teardown only unlinks and rmdirs, so a plain directory stands in for bpffs.
        let dir = std::env::temp_dir().join(format!("teardown-pins-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("maps-v1")).unwrap();
        std::fs::create_dir_all(dir.join("links")).unwrap();
        std::fs::write(dir.join("maps-v1/PEERS"), b"").unwrap();
        std::fs::write(dir.join("links/tc_decap@eth0"), b"").unwrap();
        let mut report = Report::default();
        pins(&dir, &mut report);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.removed.len(), 1);
        assert!(!dir.exists());
        let mut again = Report::default();
        pins(&dir, &mut again);
        assert!(again.removed.is_empty() && again.errors.is_empty());
    }
}
