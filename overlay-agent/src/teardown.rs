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
//! kernel vxlan device of flanneld itself) was not created by this agent and is left alone.

use std::path::{Path, PathBuf};

use crate::{
    dataplane::ebpf::pins::Pins,
    host::{Netlink, iptables, netlink::BLACKHOLE_METRIC},
};

/// `overlay-agent teardown` flags (the pin directory is the global `--bpffs`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TeardownArgs {}

/// What could not be removed, or why a teardown is unsafe.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// An agent still runs here: it keeps its programs attached and may bring its device back.
    #[error(
        "overlay-agent (pid {pid}) is still running in this network namespace: stop it first \
         (systemctl stop overlay-agent); its programs stay attached and its device may come \
         back while it runs"
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

/// Removes the overlay devices and the pins under `bpffs`, collecting every failure.
pub async fn teardown(bpffs: &Path) -> Report {
    let mut report = Report::default();
    for pid in running_agents() {
        report.errors.push(TeardownError::AgentRunning { pid });
    }
    devices(&mut report).await;
    match Netlink::connect() {
        Ok(netlink) => blackhole_routes(&netlink, &mut report).await,
        Err(e) => report.errors.push(TeardownError::Netlink(e)),
    }
    pins(bpffs, &mut report);
    netfilter(&mut report);
    report
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
pub fn main(bpffs: &Path) -> std::process::ExitCode {
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
    let report = runtime.block_on(teardown(bpffs));
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
