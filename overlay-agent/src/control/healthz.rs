//! The agent's health, as `/healthz`, `/metrics`, the status socket and systemd's `STATUS=` tell
//! it. `/healthz` answers 200 only while the lease is held (through etcd outages: see
//! [`Health::reason`]), the datapath is attached and forwards, and etcd was heard from recently
//! enough; else 503 with the reason in the body. Its 200 body is flanneld's,
//! `flanneld is running`, so checks written for flanneld keep matching (`--healthz-strict`
//! answers `ok` instead, as earlier versions did with it).
//! A tiny HTTP/1.0-style responder: one request per connection, no dependency.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    control::{
        etcd::{EtcdSettings, round_secs},
        lease::HeldLease,
        peers::PeerCounts,
    },
    dataplane::{
        contract::{DatapathInfo, Unhealthy, UnprogrammedPeer},
        counters::SharedSource,
    },
    status::{
        AgentState, DataplaneState, EtcdState, LeaseState, PeerCountsState, PeerState, Status,
        metrics,
    },
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
    etcd_reconnects: u64,
    /// The etcd connection's settings (endpoints, member in use, attempt counters).
    etcd: Option<EtcdSettings>,
    /// The last etcd error, in one line, and when.
    etcd_error: Option<(Instant, String)>,
    /// The lease held, for status.
    lease: Option<LeaseDetail>,
    /// What datapath runs.
    datapath_info: Option<DatapathInfo>,
    /// Where its counters are read.
    counters: Option<SharedSource>,
    /// Peers the datapath refused.
    unprogrammed: Vec<UnprogrammedPeer>,
}

/// The lease held, as status shows it.
#[derive(Debug, Clone)]
struct LeaseDetail {
    subnet: crate::control::subnet::Subnet,
    key: String,
    reservation: bool,
    ttl: Duration,
    renewed: Instant,
    renewed_wall: SystemTime,
}

/// The peer set as `/metrics` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Peers the datapath was given, stale ones included.
    pub known: usize,
    /// Of those, peers whose lease expired, kept for the grace period.
    pub stale: usize,
    /// What was refused and kept so far.
    pub counts: PeerCounts,
    /// The peers themselves.
    pub list: Vec<PeerState>,
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
            etcd_reconnects: 0,
            etcd: None,
            etcd_error: None,
            lease: None,
            datapath_info: None,
            counters: None,
            unprogrammed: Vec::new(),
        })))
    }

    /// The etcd connection whose member, endpoints and counters status shows.
    pub fn set_etcd(&self, settings: EtcdSettings) {
        self.state().etcd = Some(settings);
    }

    /// Records what datapath runs, and where its counters are read once it started.
    pub fn set_datapath(&self, info: DatapathInfo, counters: Option<SharedSource>) {
        let mut s = self.state();
        s.datapath_info = Some(info);
        s.counters = counters;
    }

    /// Records the peers the datapath could not program, all of them (empty: none).
    pub fn unprogrammed(&self, peers: Vec<UnprogrammedPeer>) {
        self.state().unprogrammed = peers;
    }

    /// Records the peer set's numbers.
    pub fn peers(&self, stats: PeerStats) {
        self.state().peers = stats;
    }

    /// Records that a request failed on the member in use (`error`: one line), which the
    /// connection then replaces.
    pub fn etcd_member_failed(&self, error: String) {
        let mut s = self.state();
        s.etcd_reconnects += 1;
        s.etcd_error = Some((Instant::now(), error));
    }

    /// The agent's state, as the status socket sends it.
    pub fn agent_state(&self) -> AgentState {
        let reason = self.reason();
        let note = self.note();
        let s = self.state();
        let now = Instant::now();
        let secs = |d: Duration| (d.as_secs_f64() * 10.0).round() / 10.0;
        let lease = match (&s.lease, s.lease_until) {
            (Some(l), Some(until)) => LeaseState {
                held: true,
                none_because: None,
                subnet: Some(l.subnet.to_string()),
                key: Some(l.key.clone()),
                reservation: l.reservation,
                ttl_seconds: (!l.reservation).then_some(l.ttl.as_secs()),
                expires_in_seconds: (!l.reservation)
                    .then(|| secs(until.saturating_duration_since(now))),
                renewed_at_unix: l
                    .renewed_wall
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs()),
                renewed_seconds_ago: Some(secs(now.saturating_duration_since(l.renewed))),
            },
            (l, _) => LeaseState {
                held: false,
                none_because: Some(s.lease_reason.to_string()),
                subnet: l.as_ref().map(|l| l.subnet.to_string()),
                key: l.as_ref().map(|l| l.key.clone()),
                ..LeaseState::default()
            },
        };
        let etcd = EtcdState {
            endpoints: s
                .etcd
                .as_ref()
                .map_or_else(Vec::new, |e| e.endpoints.clone()),
            member: s.etcd.as_ref().map_or("", |e| e.member()).to_owned(),
            up: s.etcd_lost.is_none(),
            down_seconds: s.etcd_lost.map(|t| secs(now.saturating_duration_since(t))),
            last_error: s.etcd_error.as_ref().map(|(_, e)| e.clone()),
            last_error_seconds_ago: s
                .etcd_error
                .as_ref()
                .map(|(t, _)| secs(now.saturating_duration_since(*t))),
            reconnects: s.etcd_reconnects,
            unanswered_attempts: s
                .etcd
                .as_ref()
                .map_or(0, |e| e.unanswered().load(Ordering::Relaxed)),
        };
        let c = s.peers.counts;
        AgentState {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            healthy: reason.is_none(),
            unhealthy_reason: reason,
            note,
            lease,
            etcd,
            datapath: s.datapath_info.clone(),
            datapath_unhealthy: s.datapath.as_ref().map(ToString::to_string),
            peers: s.peers.list.clone(),
            peer_counts: PeerCountsState {
                known: s.peers.known,
                stale: s.peers.stale,
                refused: c.refused,
                went_stale: c.went_stale,
                grace_ended: c.grace_ended,
                shared_public_ip: c.shared_public_ip,
            },
            unprogrammed: s.unprogrammed.clone(),
        }
    }

    /// The agent's state with its dataplane's, read now.
    pub fn status(&self) -> Status {
        let agent = self.agent_state();
        let counters = self.state().counters.clone();
        let (dataplane, dataplane_error) = match counters.map(|c| DataplaneState::read(&*c)) {
            None => (None, None),
            Some(Ok(d)) => (Some(d), None),
            Some(Err(e)) => (None, Some(crate::control::etcd::error_chain(&e))),
        };
        Status {
            agent: Some(agent),
            agent_error: None,
            dataplane,
            dataplane_error,
        }
    }

    /// The Prometheus text exposition of the agent's state.
    pub fn metrics(&self) -> String {
        metrics::render(&self.status())
    }

    /// The one line systemd shows (`STATUS=`): what forwards, or why the agent is unhealthy.
    /// Asked every second, so it reads the state directly (no copy of the peer list).
    pub fn summary(&self) -> String {
        let reason = self.reason();
        let note = self.note();
        let s = self.state();
        let subnet = s
            .lease
            .as_ref()
            .filter(|_| s.lease_until.is_some())
            .map(|l| l.subnet.to_string());
        if let Some(reason) = reason {
            return match subnet {
                Some(subnet) => format!("unhealthy: {reason} (subnet {subnet})"),
                None => format!("unhealthy: {reason}"),
            };
        }
        let mut line = format!("subnet {}", subnet.as_deref().unwrap_or("?"));
        if let Some(d) = &s.datapath_info {
            line.push_str(&format!(", {} ({})", d.kind, d.backend));
            if let Some(device) = d.devices.first() {
                line.push_str(&format!(" on {device}"));
            }
        }
        line.push_str(&format!(", {} peer(s)", s.peers.known));
        if let Some(note) = note {
            line.push_str(&format!("; {note}"));
        }
        line
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

    /// Records the lease just granted or renewed (`ttl`: as asked for).
    pub fn lease(&self, held: &HeldLease, ttl: Duration) {
        let mut s = self.state();
        s.lease_until = Some(held.expires_at);
        s.lease = Some(LeaseDetail {
            subnet: held.subnet,
            key: held.key.clone(),
            reservation: held.is_reservation(),
            ttl,
            renewed: Instant::now(),
            renewed_wall: SystemTime::now(),
        });
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
        let etcd = s.etcd_lost.map(|since| {
            format!(
                "etcd unreachable for {}; forwarding with the known peers",
                humantime::format_duration(round_secs(since.elapsed()))
            )
        });
        // Not unhealthy: every other peer is forwarded to, and a restart would not make room.
        let refused = s.unprogrammed.first().map(|p| {
            format!(
                "{} peer(s) not in the dataplane ({}: {})",
                s.unprogrammed.len(),
                p.subnet,
                p.reason
            )
        });
        match (etcd, refused) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        }
    }
}

/// What `/healthz` answers while healthy; unhealthy is 503 with the reason either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// flanneld's body, `flanneld is running`.
    Flanneld,
    /// `ok`, with what a healthy agent still says (`--healthz-strict`).
    Strict,
}

/// How long a failed accept waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// flanneld's body, byte for byte (no newline).
pub const FLANNELD_BODY: &str = "flanneld is running";

impl Answer {
    /// The status line and body for the current `health`.
    pub fn respond(self, health: &Health) -> (&'static str, String) {
        match (self, health.reason()) {
            (_, Some(r)) => ("503 Service Unavailable", format!("{r}\n")),
            (Answer::Flanneld, None) => ("200 OK", FLANNELD_BODY.to_owned()),
            (Answer::Strict, None) => match health.note() {
                None => ("200 OK", "ok\n".to_owned()),
                Some(note) => ("200 OK", format!("ok: {note}\n")),
            },
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
            // Out of file descriptors, typically: retrying at once would only spin.
            tokio::time::sleep(ACCEPT_RETRY).await;
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
                (Some("GET"), Some("/metrics")) => {
                    // Reading the pinned maps blocks briefly; keep it off the runtime's workers.
                    let h = health.clone();
                    match tokio::task::spawn_blocking(move || h.metrics()).await {
                        Ok(body) => ("200 OK", body),
                        Err(_) => ("500 Internal Server Error", "metrics failed\n".to_owned()),
                    }
                }
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
    fn flanneld_body_while_healthy_and_the_reason_when_not() {
        let h = Health::new();
        for answer in [Answer::Flanneld, Answer::Strict] {
            assert_eq!(
                answer.respond(&h),
                (
                    "503 Service Unavailable",
                    "waiting for etcd and the network config\n".to_owned()
                )
            );
        }
        h.lease_held(Instant::now() + Duration::from_secs(3600));
        h.datapath(Ok(()));
        assert_eq!(Answer::Strict.respond(&h), ("200 OK", "ok\n".to_owned()));
        assert_eq!(
            Answer::Flanneld.respond(&h),
            ("200 OK", FLANNELD_BODY.to_owned())
        );
        h.datapath(Err(Unhealthy::Detached("flannel0 is gone".into())));
        let (status, body) = Answer::Flanneld.respond(&h);
        assert_eq!(status, "503 Service Unavailable");
        assert_eq!(body, "not forwarding: flannel0 is gone\n");
        assert!(
            h.summary().contains("unhealthy: not forwarding"),
            "{}",
            h.summary()
        );
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
