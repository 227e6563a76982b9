//! `GET /healthz`. By default it answers as flanneld does, 200 with the body
//! `flanneld is running` whenever the agent runs, so monitoring written for flanneld keeps
//! working. With `--healthz-strict` ([`Answer::Strict`]) it tells the truth instead: 200 `ok`
//! when the lease is held and the datapath is up, else 503 with a one-line reason.
//! A tiny HTTP/1.0-style responder: one request per connection, no dependency.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    control::{etcd::round_secs, peers::PeerCounts},
    dataplane::contract::Unhealthy,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// Why no lease is held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoLease {
    /// Before the network config is read.
    #[error("waiting for etcd and the network config")]
    WaitingForEtcd,
    /// Acquiring one.
    #[error("acquiring a subnet lease")]
    Acquiring,
    /// Ours was deleted (or expired) and is being re-acquired.
    #[error("lease deleted; re-acquiring")]
    Deleted,
    /// Another holds our subnet now.
    #[error("subnet {subnet} is held by {holder}")]
    TakenBy {
        /// Our subnet.
        subnet: crate::control::subnet::Subnet,
        /// Who holds it.
        holder: crate::control::lease::Holder,
    },
}

/// The agent's health as `/healthz` reports it.
#[derive(Debug, Clone)]
pub struct Health(Arc<Mutex<State>>);

#[derive(Debug)]
struct State {
    /// Until when the lease is known to be held; `None` while none is held.
    lease_until: Option<Instant>,
    /// Why no lease is held (when `lease_until` is `None`).
    lease_reason: NoLease,
    /// Why the datapath is not up; `None` when it is.
    datapath: Option<Unhealthy>,
    /// Since when no etcd member answers; `None` while one does.
    etcd_lost: Option<Instant>,
    /// How long peers keep this host after its lease expired (`--expired-peer-grace`).
    grace: Duration,
    /// The peer set, as last published.
    peers: PeerStats,
    /// Requests that failed on the member in use, each followed by a move to the next member.
    etcd_member_failures: u64,
    /// Connection attempts no member answered (counted by the etcd connection).
    etcd_unanswered: Option<Arc<AtomicU64>>,
}

/// The peer set as `/metrics` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Peers the datapath was given, stale ones included.
    pub known: usize,
    /// Of those, peers whose lease expired, kept for the grace period.
    pub stale: usize,
    /// What was refused and kept so far.
    pub counts: PeerCounts,
}

impl Health {
    /// Starts with no lease, waiting for etcd, and the datapath not started.
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(State {
            lease_until: None,
            lease_reason: NoLease::WaitingForEtcd,
            datapath: Some(Unhealthy::Starting),
            etcd_lost: None,
            grace: Duration::ZERO,
            peers: PeerStats::default(),
            etcd_member_failures: 0,
            etcd_unanswered: None,
        })))
    }

    /// Where the etcd connection counts its unanswered attempts.
    pub fn set_etcd_unanswered(&self, counter: Arc<AtomicU64>) {
        self.state().etcd_unanswered = Some(counter);
    }

    /// Records the peer set's numbers.
    pub fn peers(&self, stats: PeerStats) {
        self.state().peers = stats;
    }

    /// Records that a request failed on the member in use.
    pub fn etcd_member_failed(&self) {
        self.state().etcd_member_failures += 1;
    }

    /// The Prometheus text exposition of the agent's state.
    pub fn metrics(&self) -> String {
        let healthy = self.reason().is_none();
        let s = self.state();
        let now = Instant::now();
        let lease_left = s
            .lease_until
            .map_or(0.0, |t| t.saturating_duration_since(now).as_secs_f64());
        let c = s.peers.counts;
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            ));
        };
        metric(
            "overlay_healthy",
            "gauge",
            "1 when /healthz --healthz-strict would answer 200.",
            u8::from(healthy).to_string(),
        );
        metric(
            "overlay_lease_expiry_seconds",
            "gauge",
            "Seconds until etcd expires this host's lease, as etcd granted it (0 without one).",
            format!("{lease_left:.0}"),
        );
        metric(
            "overlay_etcd_up",
            "gauge",
            "1 while an etcd member answers.",
            u8::from(s.etcd_lost.is_none()).to_string(),
        );
        metric(
            "overlay_etcd_member_failures_total",
            "counter",
            "Requests that failed on the etcd member in use, each followed by a move to the next.",
            s.etcd_member_failures.to_string(),
        );
        metric(
            "overlay_etcd_unanswered_attempts_total",
            "counter",
            "Connection attempts to an etcd member that did not answer.",
            s.etcd_unanswered
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed))
                .to_string(),
        );
        metric(
            "overlay_peers",
            "gauge",
            "Peers in the dataplane, stale ones included.",
            s.peers.known.to_string(),
        );
        metric(
            "overlay_peers_stale",
            "gauge",
            "Peers kept for --expired-peer-grace after their lease expired.",
            s.peers.stale.to_string(),
        );
        metric(
            "overlay_peers_went_stale_total",
            "counter",
            "Peers whose lease expired and that were kept for the grace period.",
            c.went_stale.to_string(),
        );
        metric(
            "overlay_peers_grace_ended_total",
            "counter",
            "Stale peers removed when their grace period ended.",
            c.grace_ended.to_string(),
        );
        metric(
            "overlay_leases_sharing_public_ip_total",
            "counter",
            "Times several accepted leases were found naming one PublicIP (all are routed there).",
            c.shared_public_ip.to_string(),
        );
        metric(
            "overlay_leases_refused_total",
            "counter",
            "Leases not made peers (bad value, bad address, outside the Network, overlapping).",
            c.refused.to_string(),
        );
        out
    }

    /// Sets how long peers keep this host's lease after it expired: as long as that lasts, an
    /// expiry the agent could not prevent (etcd unreachable) does not cut the host off.
    pub fn set_grace(&self, grace: Duration) {
        self.state().grace = grace;
    }

    /// Records that etcd stopped answering at `since`.
    pub fn etcd_lost(&self, since: Instant) {
        self.state().etcd_lost.get_or_insert(since);
    }

    /// Records that etcd answers again.
    pub fn etcd_back(&self) {
        self.state().etcd_lost = None;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that a lease is held until `until` (its etcd expiry; far away for a reservation).
    pub fn lease_held(&self, until: Instant) {
        self.state().lease_until = Some(until);
    }

    /// Records that no lease is held, and why.
    pub fn lease_lost(&self, reason: NoLease) {
        let mut s = self.state();
        s.lease_until = None;
        s.lease_reason = reason;
    }

    /// Records the datapath's state.
    pub fn datapath(&self, state: Result<(), Unhealthy>) {
        self.state().datapath = state.err();
    }

    /// `None` when healthy, else the reason.
    ///
    /// The lease counts as held until etcd's own expiry of it (the TTL etcd granted, from the
    /// grant) and, while etcd cannot be reached, for the peers' grace period after that: etcd
    /// does not expire leases while it has no quorum, and when it does expire ours the peers
    /// keep this host for the grace period. A liveness probe must not restart an agent whose
    /// forwarding is fine because etcd is away.
    pub fn reason(&self) -> Option<String> {
        let s = self.state();
        let now = Instant::now();
        match (s.lease_until, s.etcd_lost) {
            (None, _) => return Some(s.lease_reason.to_string()),
            (Some(t), None) if t <= now => {
                return Some("the lease expired before it could be renewed".into());
            }
            (Some(t), Some(since)) if t + s.grace <= now => {
                return Some(format!(
                    "etcd unreachable for {}: the lease's TTL ran out {} ago and peers keep an \
                     expired lease for {}",
                    humantime::format_duration(round_secs(now - since)),
                    humantime::format_duration(round_secs(now - t)),
                    humantime::format_duration(s.grace)
                ));
            }
            _ => {}
        }
        s.datapath.as_ref().map(|u| u.to_string())
    }

    /// What a healthy agent should still say: etcd is away.
    pub fn note(&self) -> Option<String> {
        let s = self.state();
        s.etcd_lost.map(|since| {
            format!(
                "etcd unreachable for {}; forwarding with the known peers",
                humantime::format_duration(round_secs(since.elapsed()))
            )
        })
    }
}

/// What `/healthz` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// flanneld's: always 200 `flanneld is running`.
    Flanneld,
    /// The agent's state: 200 `ok`, or 503 with the reason.
    Strict,
}

/// flanneld's body, byte for byte (no newline).
pub const FLANNELD_BODY: &str = "flanneld is running";

impl Answer {
    /// The status line and body for the current `health`.
    pub fn respond(self, health: &Health) -> (&'static str, String) {
        match (self, health.reason()) {
            (Answer::Flanneld, _) => ("200 OK", FLANNELD_BODY.to_owned()),
            (Answer::Strict, None) => match health.note() {
                None => ("200 OK", "ok\n".to_owned()),
                Some(note) => ("200 OK", format!("ok: {note}\n")),
            },
            (Answer::Strict, Some(r)) => ("503 Service Unavailable", format!("{r}\n")),
        }
    }
}

/// Binds the endpoint; the returned listener is served by [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/healthz` until the task is dropped.
pub async fn serve(listener: TcpListener, health: Health, answer: Answer) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut len = 0;
            // Only the request line matters; read until it is complete, briefly.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while len < buf.len() && !buf[..len].contains(&b'\n') {
                    match conn.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => len += n,
                    }
                }
            })
            .await;
            let line = String::from_utf8_lossy(&buf[..len]);
            let mut parts = line.split_whitespace();
            let (status, body) = match (parts.next(), parts.next()) {
                (Some("GET"), Some("/healthz")) => answer.respond(&health),
                (Some("GET"), Some("/metrics")) => ("200 OK", health.metrics()),
                (Some("GET"), Some(_)) => ("404 Not Found", "not found\n".to_owned()),
                _ => ("400 Bad Request", "bad request\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flanneld_answer_by_default_and_the_truth_when_strict() {
        let h = Health::new();
        assert_eq!(
            Answer::Flanneld.respond(&h),
            ("200 OK", "flanneld is running".to_owned())
        );
        assert_eq!(
            Answer::Strict.respond(&h),
            (
                "503 Service Unavailable",
                "waiting for etcd and the network config\n".to_owned()
            )
        );
        h.lease_held(Instant::now() + Duration::from_secs(3600));
        h.datapath(Ok(()));
        assert_eq!(Answer::Strict.respond(&h), ("200 OK", "ok\n".to_owned()));
        assert_eq!(Answer::Flanneld.respond(&h).1, FLANNELD_BODY);
    }

    #[test]
    fn an_etcd_outage_is_healthy_until_the_peers_grace_ends() {
        let h = Health::new();
        h.datapath(Ok(()));
        h.set_grace(Duration::from_secs(3600));
        // etcd's expiry of the lease has passed while etcd answers: the lease is gone.
        h.lease_held(Instant::now() - Duration::from_secs(1));
        assert_eq!(Answer::Strict.respond(&h).0, "503 Service Unavailable");
        // The same with etcd away: etcd may not have expired it (no quorum), and if it did the
        // peers keep this host for the grace period.
        h.etcd_lost(Instant::now() - Duration::from_secs(40));
        let (status, body) = Answer::Strict.respond(&h);
        assert_eq!(status, "200 OK");
        assert!(body.starts_with("ok: etcd unreachable for 40s"), "{body}");
        h.lease_held(Instant::now() - Duration::from_secs(3601));
        let (status, body) = Answer::Strict.respond(&h);
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.contains("peers keep an expired lease for 1h"),
            "{body}"
        );
        h.etcd_back();
        h.lease_held(Instant::now() + Duration::from_secs(30));
        assert_eq!(Answer::Strict.respond(&h), ("200 OK", "ok\n".to_owned()));
    }
}
