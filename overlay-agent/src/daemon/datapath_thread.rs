//! The datapath's own thread: the overlay's calls (netlink, map updates) may block, so they run
//! here, never on the task that talks to etcd; commands arrive in order through a channel.

use std::{sync::mpsc as std_mpsc, time::Duration};

use tokio::sync::oneshot;

use super::DaemonError;
use crate::{
    control::{etcd::error_chain, healthz::Health, peers::PeerEvent},
    dataplane::contract::{DatapathError, LocalLease, Overlay, POLL_INTERVAL},
};

/// Work for the datapath thread.
enum DatapathCmd {
    Start(LocalLease, oneshot::Sender<Result<(), DatapathError>>),
    Event(PeerEvent),
    /// The initial peer list has been sent; replies once the datapath has applied it.
    Synced(oneshot::Sender<()>),
}

/// The datapath, run on a thread of its own so its (possibly blocking) calls never stall etcd
/// traffic, fed in order through a channel. Peer events are logged here, whatever the datapath.
pub(super) struct DatapathThread {
    tx: Option<std_mpsc::Sender<DatapathCmd>>,
    /// Disconnects when the thread has dropped the datapath.
    done: std_mpsc::Receiver<()>,
}

/// How long stopping waits for the datapath's own teardown (the TUN workers and their counters).
const DATAPATH_STOP_WAIT: Duration = Duration::from_secs(2);

impl DatapathThread {
    pub(super) fn spawn(overlay: Option<Overlay>, health: Health) -> Self {
        match &overlay {
            Some(o) => health.set_datapath(o.info(), None),
            // alloc forwards nothing: nothing to be unhealthy about.
            None => health.datapath(Ok(())),
        }
        let (tx, rx) = std_mpsc::channel::<DatapathCmd>();
        let (alive_tx, done) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                let _alive = alive_tx;
                let mut overlay = overlay;
                // Events applied but not flushed: flushed once the queue is empty.
                let mut unflushed = false;
                loop {
                    let cmd = if unflushed {
                        match rx.try_recv() {
                            Ok(cmd) => cmd,
                            // The queue is empty: the batch takes effect.
                            Err(_) => {
                                flush(&mut overlay, &health);
                                unflushed = false;
                                continue;
                            }
                        }
                    } else {
                        match rx.recv_timeout(POLL_INTERVAL) {
                            Ok(cmd) => cmd,
                            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                                if let Some(o) = overlay.as_mut() {
                                    if let Err(e) = o.poll() {
                                        tracing::error!("datapath: {}", error_chain(&e));
                                    }
                                    report(&health, o);
                                }
                                continue;
                            }
                        }
                    };
                    // What follows a batch of events sees them applied.
                    if unflushed && !matches!(cmd, DatapathCmd::Event(_)) {
                        flush(&mut overlay, &health);
                        unflushed = false;
                    }
                    unflushed |= handle(cmd, &mut overlay, &health);
                }
            })
            .expect("spawning the datapath thread");
        Self { tx: Some(tx), done }
    }

    pub(super) async fn start(&self, local: LocalLease) -> Result<(), DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(DatapathCmd::Start(local, reply)).ok())
            .ok_or(DaemonError::DatapathGone)?;
        rx.await
            .map_err(|_| DaemonError::DatapathGone)?
            .map_err(|source| DaemonError::Datapath {
                source: Box::new(source),
            })
    }

    pub(super) fn send(&self, ev: PeerEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(DatapathCmd::Event(ev));
        }
    }

    /// Tells the datapath the initial peer list is complete (it may then drop what a previous
    /// run left), and waits until everything sent before has been applied.
    pub(super) async fn synced(&self) -> Result<(), DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(DatapathCmd::Synced(reply)).ok())
            .ok_or(DaemonError::DatapathGone)?;
        rx.await.map_err(|_| DaemonError::DatapathGone)
    }
}

impl Drop for DatapathThread {
    /// Closes the queue and waits, briefly, for the thread to drop the datapath: the process
    /// exits right after, and would otherwise cut its teardown short.
    fn drop(&mut self) {
        self.tx = None;
        if let Err(std_mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(DATAPATH_STOP_WAIT)
        {
            tracing::warn!(
                "the datapath did not stop within {DATAPATH_STOP_WAIT:?}; exiting without it"
            );
        }
    }
}

/// Runs one command; whether it was a peer event (which waits for a flush).
fn handle(cmd: DatapathCmd, overlay: &mut Option<Overlay>, health: &Health) -> bool {
    match cmd {
        DatapathCmd::Start(local, reply) => {
            let r = match overlay.as_mut() {
                Some(o) => o.start(local),
                None => Ok(()),
            };
            if let Some(o) = overlay.as_ref() {
                health.set_datapath(o.info(), o.counters());
            }
            match overlay.as_ref() {
                Some(o) => report(health, o),
                // alloc forwards nothing: nothing to be unhealthy about.
                None => health.datapath(Ok(())),
            }
            let _ = reply.send(r);
            false
        }
        DatapathCmd::Event(ev) => {
            match &ev {
                PeerEvent::Added(p) => tracing::info!(
                    "peer added: {} at {} ({})",
                    p.subnet,
                    p.public_ip,
                    p.backend.type_name()
                ),
                PeerEvent::Removed(s) => tracing::info!("peer removed: {s}"),
            }
            if let Some(o) = overlay.as_mut()
                && let Err(e) = o.apply(&ev)
            {
                tracing::error!("datapath: {}", error_chain(&e));
            }
            // Health and status learn of it at the batch's flush.
            true
        }
        DatapathCmd::Synced(reply) => {
            if let Some(o) = overlay.as_mut() {
                if let Err(e) = o.synced() {
                    tracing::error!("datapath: {}", error_chain(&e));
                }
                report(health, o);
            }
            let _ = reply.send(());
            false
        }
    }
}

fn flush(overlay: &mut Option<Overlay>, health: &Health) {
    if let Some(o) = overlay.as_mut() {
        o.flush();
        report(health, o);
    }
}

/// What health and status learn from the datapath after each call (and each batch of events).
fn report(health: &Health, overlay: &Overlay) {
    health.datapath(overlay.check());
    health.unprogrammed(overlay.unprogrammed());
}
