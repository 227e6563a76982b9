//! What etcd itself says about the agents' leases while a fault runs: a thread that polls the
//! subnet leases (`etcdctl get --prefix <prefix>/subnets/ -w json`) and each one's remaining
//! lifetime (`etcdctl lease timetolive <id> -w json`), and keeps, per host (the lease's
//! PublicIP), the lowest remaining TTL etcd reported, every etcd lease the key was attached to
//! (a renewal moves the key to a new one), the subnets it held, and the polls in which the host
//! held no key or more than one.
//!
//! Plus the log counting the tests need: the WARN lines an agent wrote in a window of its log.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::cluster::EtcdCtl;

/// Pause between two polls.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// One subnet lease as one poll saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSample {
    /// The key, e.g. `/flannel/subnets/172.16.5.0-24`.
    pub key: String,
    /// The subnet it names, e.g. `172.16.5.0/24`.
    pub subnet: String,
    /// The lease's PublicIP.
    pub public_ip: Ipv4Addr,
    /// The etcd lease the key is attached to (0: none, a reservation).
    pub etcd_lease: i64,
    /// Seconds etcd says the etcd lease has left (whole seconds, truncated); `None` when the
    /// lease ended between the two reads (a renewal revoked it) or has no TTL.
    pub remaining: Option<i64>,
}

/// What the polls saw of one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostLeases {
    /// The lowest remaining TTL etcd reported for the host's key, in seconds.
    pub min_remaining: Option<i64>,
    /// The etcd leases its key was attached to, in the order seen: one more per renewal.
    pub etcd_leases: Vec<i64>,
    /// The subnets its keys named.
    pub subnets: BTreeSet<String>,
    /// Answered polls in which it held no key (after it was first seen): its lease had lapsed.
    pub absent_polls: usize,
    /// Answered polls in which it held more than one key.
    pub multiple_polls: usize,
}

impl HostLeases {
    /// Renewals seen: how many times the key moved to another etcd lease.
    pub fn renewals(&self) -> usize {
        self.etcd_leases.len().saturating_sub(1)
    }
}

/// Everything the polls saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseHistory {
    /// Per host, by PublicIP.
    pub hosts: BTreeMap<Ipv4Addr, HostLeases>,
    /// Polls some member answered.
    pub answered: usize,
    /// Polls no member answered (quorum lost, say).
    pub unanswered: usize,
    /// The last poll's leases, when it was answered.
    pub last: Vec<LeaseSample>,
    /// The last error of an unanswered poll.
    pub last_error: Option<String>,
}

impl LeaseHistory {
    /// The host's record (an empty one if never seen).
    pub fn host(&self, ip: Ipv4Addr) -> HostLeases {
        self.hosts.get(&ip).cloned().unwrap_or_default()
    }

    fn record(&mut self, expected: &BTreeSet<Ipv4Addr>, samples: Vec<LeaseSample>) {
        self.answered += 1;
        let mut held: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        for s in &samples {
            *held.entry(s.public_ip).or_default() += 1;
            let host = self.hosts.entry(s.public_ip).or_default();
            host.subnets.insert(s.subnet.clone());
            if host.etcd_leases.last() != Some(&s.etcd_lease) {
                host.etcd_leases.push(s.etcd_lease);
            }
            if let Some(r) = s.remaining {
                host.min_remaining = Some(host.min_remaining.map_or(r, |m| m.min(r)));
            }
        }
        for (ip, host) in &mut self.hosts {
            match held.get(ip).copied().unwrap_or(0) {
                0 => host.absent_polls += 1,
                1 => {}
                _ => host.multiple_polls += 1,
            }
        }
        for ip in expected {
            self.hosts.entry(*ip).or_insert_with(|| HostLeases {
                absent_polls: 1,
                ..HostLeases::default()
            });
        }
        self.last = samples;
    }
}

/// Errors of one poll.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// etcdctl failed (member down, no quorum, timeout).
    #[error(transparent)]
    Etcdctl(#[from] crate::netns::NetNsError),
    /// etcdctl printed something that is not what `-w json` prints.
    #[error("unreadable etcdctl output: {0}")]
    Unreadable(String),
}

/// Reads every subnet lease under `prefix` and its remaining TTL through `ctl`, as one member
/// sees them.
pub fn poll(ctl: &EtcdCtl, prefix: &str) -> Result<Vec<LeaseSample>, PollError> {
    let timeouts = ["--command-timeout=2s", "--dial-timeout=1s"];
    let dir = format!("{prefix}/subnets/");
    let out = ctl.run(&[
        timeouts[0],
        timeouts[1],
        "get",
        "--prefix",
        "-w",
        "json",
        &dir,
    ])?;
    let bad = || PollError::Unreadable(out.clone());
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| bad())?;
    let mut samples = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let text = |field: &str| {
            kv[field]
                .as_str()
                .and_then(base64_decode)
                .and_then(|b| String::from_utf8(b).ok())
        };
        let (Some(key), Some(value)) = (text("key"), text("value")) else {
            return Err(bad());
        };
        let Some(subnet) = key.strip_prefix(&dir).map(|s| s.replacen('-', "/", 1)) else {
            continue;
        };
        let Some(public_ip) = serde_json::from_str::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| v["PublicIP"].as_str().and_then(|s| s.parse().ok()))
        else {
            // Not a lease (written by hand?): nobody's.
            continue;
        };
        let etcd_lease = kv["lease"].as_i64().unwrap_or(0);
        let remaining = if etcd_lease == 0 {
            None
        } else {
            let out = ctl.run(&[
                timeouts[0],
                timeouts[1],
                "lease",
                "timetolive",
                &format!("{etcd_lease:x}"),
                "-w",
                "json",
            ])?;
            let v: serde_json::Value =
                serde_json::from_str(&out).map_err(|_| PollError::Unreadable(out.clone()))?;
            // -1: no such lease any more (revoked by a renewal since the get, or expired).
            v["ttl"].as_i64().filter(|&t| t >= 0)
        };
        samples.push(LeaseSample {
            key,
            subnet,
            public_ip,
            etcd_lease,
            remaining,
        });
    }
    Ok(samples)
}

/// A thread polling the leases (see the module) until stopped; stopped on drop.
#[derive(Debug)]
pub struct LeaseWatch {
    history: Arc<Mutex<LeaseHistory>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWatch {
    /// Starts polling the leases under `prefix`, each poll through the first of `ctls` (one per
    /// member, so a dead member costs a refused connection) that answers; `expected` are hosts
    /// that must hold a lease from the first poll on. Returns once the first poll is done.
    pub fn start(ctls: Vec<EtcdCtl>, prefix: &str, expected: &[Ipv4Addr]) -> Self {
        let history = Arc::new(Mutex::new(LeaseHistory::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let expected: BTreeSet<Ipv4Addr> = expected.iter().copied().collect();
        let (h, s, prefix) = (history.clone(), stop.clone(), prefix.to_owned());
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // The member that answered last is asked first: a dead one first in line would
            // cost every poll its dial timeout and leave renewals unseen between polls.
            let mut first = 0;
            while !s.load(Ordering::Relaxed) {
                let mut result = Err(String::from("no member to ask"));
                for k in 0..ctls.len() {
                    let i = (first + k) % ctls.len();
                    match poll(&ctls[i], &prefix) {
                        Ok(samples) => {
                            result = Ok(samples);
                            first = i;
                            break;
                        }
                        Err(e) => result = Err(e.to_string()),
                    }
                }
                {
                    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(samples) => h.record(&expected, samples),
                        Err(e) => {
                            h.unanswered += 1;
                            h.last_error = Some(e);
                        }
                    }
                }
                let _ = first_tx.send(());
                std::thread::sleep(POLL_EVERY);
            }
        });
        let _ = first_rx.recv();
        Self {
            history,
            stop,
            thread: Some(thread),
        }
    }

    /// What the polls saw so far.
    pub fn history(&self) -> LeaseHistory {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until `done` holds for what the polls saw, and returns that; `Err` with the last
    /// history when `within` passes first.
    pub fn wait_for(
        &self,
        within: Duration,
        mut done: impl FnMut(&LeaseHistory) -> bool,
    ) -> Result<LeaseHistory, LeaseHistory> {
        let deadline = Instant::now() + within;
        loop {
            let h = self.history();
            if done(&h) {
                return Ok(h);
            }
            if Instant::now() > deadline {
                return Err(h);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops polling and returns everything seen.
    pub fn stop(mut self) -> LeaseHistory {
        self.halt();
        self.history()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The lines of `log` at WARN level (tracing's level column, after the timestamp).
pub fn warn_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("WARN"))
        .collect()
}

/// Standard base64 (etcdctl's JSON encodes keys and values so); `None` if `s` is not.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_etcdctl_base64() {
        assert_eq!(
            base64_decode("L2ZsYW5uZWwvc3VibmV0cy8xNzIuMTYuNS4wLTI0").unwrap(),
            b"/flannel/subnets/172.16.5.0-24"
        );
        assert_eq!(
            base64_decode("eyJQdWJsaWNJUCI6IjE5OC4xOC4wLjEiLCJQdWJsaWNJUHY2IjpudWxsfQ==").unwrap(),
            br#"{"PublicIP":"198.18.0.1","PublicIPv6":null}"#
        );
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert!(base64_decode("a!b").is_none());
    }

    fn sample(ip: u8, lease: i64, remaining: i64) -> LeaseSample {
        LeaseSample {
            key: format!("/p/subnets/10.0.{ip}.0-24"),
            subnet: format!("10.0.{ip}.0/24"),
            public_ip: Ipv4Addr::new(198, 18, 0, ip),
            etcd_lease: lease,
            remaining: Some(remaining),
        }
    }

    #[test]
    fn history_keeps_the_minimum_renewals_and_gaps_per_host() {
        let h1 = Ipv4Addr::new(198, 18, 0, 1);
        let h2 = Ipv4Addr::new(198, 18, 0, 2);
        let expected: BTreeSet<_> = [h1, h2].into();
        let mut h = LeaseHistory::default();
        h.record(&expected, vec![sample(1, 10, 19), sample(2, 20, 15)]);
        h.record(&expected, vec![sample(1, 10, 11), sample(2, 21, 20)]);
        h.record(&expected, vec![sample(1, 11, 20)]);
        h.record(&expected, vec![sample(1, 11, 19), sample(1, 12, 19)]);
        let one = h.host(h1);
        assert_eq!(one.min_remaining, Some(11));
        assert_eq!(one.etcd_leases, [10, 11, 12]);
        assert_eq!(one.multiple_polls, 1);
        assert_eq!(one.absent_polls, 0);
        let two = h.host(h2);
        assert_eq!((two.min_remaining, two.renewals()), (Some(15), 1));
        assert_eq!(two.absent_polls, 2);
        // A host expected but never seen counts as absent from the first poll on.
        let h3 = Ipv4Addr::new(198, 18, 0, 3);
        let mut h = LeaseHistory::default();
        h.record(&[h3].into(), vec![]);
        h.record(&[h3].into(), vec![]);
        assert_eq!(h.host(h3).absent_polls, 2);
    }

    #[test]
    fn counts_warn_lines() {
        let log = "2026-12-02T10:00:00.000000Z  INFO overlay_agent: up\n\
                   2026-12-02T10:00:01.000000Z  WARN overlay_agent::control::etcd: etcd member x unreachable\n\
                   2026-12-02T10:00:02.000000Z ERROR overlay_agent: WARN in text only\n";
        assert_eq!(warn_lines(log).len(), 1);
    }
}
