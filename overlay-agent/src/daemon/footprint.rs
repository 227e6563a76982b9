//! What this run has put in place on the host and in etcd, recorded as the start-up goes, for two
//! readers:
//!
//! - a start-up that fails after the pre-flight (`daemon::preflight`) undoes it: the overlay
//!   devices and the finishing device that were not there before, the pin directory when there
//!   was none, the iptables chains and blackhole route it added, and the lease when this run
//!   created it (revoked, so the subnet is free at once instead of after its TTL). What was there
//!   before the run (an earlier run's dataplane, still forwarding; flanneld's rules; our lease)
//!   stays. Once READY was sent nothing is undone: from then on the agent leaves its dataplane in
//!   place on purpose, so that a restart does not interrupt forwarding.
//! - the shutdown line says what stays: the dataplane (forwarding or not) and the lease (until
//!   when), or that there is none.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::Client;

use super::host_rules::Added;
use crate::{
    control::{etcd::round_secs, lease::HeldLease},
    dataplane::ebpf::pins::Pins,
    host::{
        Netlink,
        finishing::{self, FINISH_DEVICE},
        overlay::{OverlayDevice, is_overlay_name},
    },
};

/// How long the undo waits for etcd to revoke the lease; unrevoked, it expires with its TTL.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The record, shared by the start-up and the signal handler (clones share it).
#[derive(Clone, Default)]
pub(super) struct Footprint(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    before: Option<Before>,
    lease: Option<Lease>,
    dataplane: Option<Dataplane>,
    rules: Added,
    resync: Option<tokio::task::AbortHandle>,
    ready: bool,
}

/// What the host held before this run touched it.
#[derive(Debug)]
struct Before {
    devices: Vec<String>,
    finishing: bool,
    bpffs: PathBuf,
    bpffs_existed: bool,
}

struct Lease {
    client: Client,
    held: HeldLease,
    created: bool,
}

#[derive(Debug)]
struct Dataplane {
    ebpf: bool,
    device: String,
    bpffs: PathBuf,
}

impl Footprint {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it leaves a record that is still the best one there is.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes what is on the host before the first side effect (loading the programs, which
    /// pins maps under `bpffs`).
    pub(super) async fn record_before(&self, bpffs: &Path) {
        let mut devices = Vec::new();
        let mut finishing = false;
        if let Ok(netlink) = Netlink::connect()
            && let Ok(links) = netlink.links().await
        {
            for link in links {
                finishing |= link.name == FINISH_DEVICE;
                if is_overlay_name(&link.name) {
                    devices.push(link.name);
                }
            }
        }
        self.state().before = Some(Before {
            devices,
            finishing,
            bpffs: bpffs.to_owned(),
            bpffs_existed: std::fs::symlink_metadata(bpffs).is_ok(),
        });
    }

    /// The lease is held (acquired, or renewed: whether this run created it is the first
    /// claim's [`HeldLease::created`]; a later re-creation after an expiry does not change it).
    pub(super) fn lease(&self, client: &Client, held: &HeldLease) {
        let mut state = self.state();
        let created = state.lease.as_ref().map_or(held.created, |l| l.created);
        state.lease = Some(Lease {
            client: client.clone(),
            held: held.clone(),
            created,
        });
    }

    /// The datapath started on `device`; `ebpf`: its programs are pinned under `bpffs`.
    pub(super) fn dataplane(&self, ebpf: bool, device: String, bpffs: &Path) {
        self.state().dataplane = Some(Dataplane {
            ebpf,
            device,
            bpffs: bpffs.to_owned(),
        });
    }

    /// The host rules were installed (`added`: what was not there before), and are resynced by
    /// the task `resync` aborts.
    pub(super) fn rules(&self, added: Added, resync: tokio::task::AbortHandle) {
        let mut state = self.state();
        state.rules = added;
        state.resync = Some(resync);
    }

    /// READY was sent: from now on what the agent set up stays when it stops.
    pub(super) fn ready(&self) {
        self.state().ready = true;
    }

    /// Whether READY was sent.
    pub(super) fn is_ready(&self) -> bool {
        self.state().ready
    }

    /// Undoes what this run did, after a start-up failure or a stop before READY (`why`, for
    /// the log line); nothing once READY was sent. A step that fails does not stop the others.
    pub(super) async fn undo(&self, why: &str) {
        let (before, lease, rules) = {
            let mut state = self.state();
            if state.ready {
                return;
            }
            if let Some(resync) = state.resync.take() {
                // Else it would put the rules back.
                resync.abort();
            }
            (
                state.before.take(),
                state.lease.take(),
                std::mem::take(&mut state.rules),
            )
        };
        let mut done = rules.remove().await;
        if let Some(before) = before {
            undo_host(&before, &mut done).await;
        }
        if let Some(lease) = lease {
            done.push(undo_lease(lease).await);
        }
        if done.is_empty() {
            tracing::info!(
                "{why}: nothing on the host or in etcd was changed (no lease held, no dataplane \
                 set up)"
            );
        } else {
            tracing::info!("{why}; undid what this run did: {}", done.join("; "));
        }
    }

    /// What stays after the agent stops, for the shutdown line.
    pub(super) fn left_running(&self) -> String {
        let state = self.state();
        let dataplane = match &state.dataplane {
            Some(d) if d.ebpf => format!(
                "the eBPF dataplane stays attached and pinned under {} and keeps forwarding to \
                 the last known peers through {} (overlay-agent teardown removes it)",
                d.bpffs.display(),
                d.device
            ),
            Some(d) => format!(
                "device {} stays with its routes, but nothing forwards through it until the agent \
                 runs again (the TUN datapath forwards in this process)",
                d.device
            ),
            None => "no dataplane was set up".to_owned(),
        };
        let lease = match &state.lease {
            Some(l) if l.held.is_reservation() => format!(
                "the reservation {} ({}) stays in etcd (no TTL)",
                l.held.key, l.held.subnet
            ),
            Some(l) => {
                let left = round_secs(l.held.expires_at.saturating_duration_since(Instant::now()));
                let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + left);
                format!(
                    "the lease {} ({}) stays in etcd until it expires in {} (at {at}), so a \
                     restart before then keeps the subnet",
                    l.held.key,
                    l.held.subnet,
                    humantime::format_duration(left)
                )
            }
            None => "no lease was held".to_owned(),
        };
        format!("{dataplane}; {lease}")
    }
}

/// Removes the devices and pins that were not there before.
async fn undo_host(before: &Before, done: &mut Vec<String>) {
    match Netlink::connect() {
        Ok(netlink) => {
            let links = netlink.links().await.unwrap_or_default();
            for link in links {
                if before.devices.contains(&link.name) {
                    continue;
                }
                // Only the agent's own kind of device: a name taken meanwhile by another is not
                // this run's doing.
                let Some(device) = OverlayDevice::agents_own(&netlink, &link).await else {
                    continue;
                };
                done.push(match device.drain_and_delete(&netlink).await {
                    Ok(_) => format!("removed device {}", link.name),
                    Err(e) => format!("device {} left: {e}", link.name),
                });
            }
            if !before.finishing {
                match finishing::remove(&netlink).await {
                    Ok(true) => done.push(format!("removed the finishing device {FINISH_DEVICE}")),
                    Ok(false) => {}
                    Err(e) => done.push(format!("the finishing device left: {e}")),
                }
            }
        }
        Err(e) => done.push(format!("devices not looked at: {e}")),
    }
    if !before.bpffs_existed && std::fs::symlink_metadata(&before.bpffs).is_ok() {
        let errors = Pins::teardown(&before.bpffs);
        done.push(if errors.is_empty() {
            format!("removed the pins under {}", before.bpffs.display())
        } else {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!(
                "pins under {} left: {}",
                before.bpffs.display(),
                errors.join(", ")
            )
        });
    }
}

/// Revokes the lease when this run created it (its key goes with it); keeps it otherwise.
async fn undo_lease(lease: Lease) -> String {
    let Lease {
        mut client,
        held,
        created,
    } = lease;
    if !created || held.is_reservation() {
        return format!(
            "kept {} ({}): it was this host's before this run",
            held.key, held.subnet
        );
    }
    match tokio::time::timeout(REVOKE_TIMEOUT, client.lease_revoke(held.etcd_lease)).await {
        Ok(Ok(_)) => format!("released the lease {} ({})", held.key, held.subnet),
        Ok(Err(e)) => format!(
            "the lease {} stays until its TTL ends: revoking it failed: {e}",
            held.key
        ),
        Err(_) => format!(
            "the lease {} stays until its TTL ends: etcd did not answer the revocation within {}",
            held.key,
            humantime::format_duration(REVOKE_TIMEOUT)
        ),
    }
}
