//! What etcd itself says about the agents' leases while a fault runs: a thread that polls the
//! subnet leases and each one's remaining lifetime through a reader the caller gives (the fault
//! tests read with the etcd client library, in-process: one poll takes milliseconds where four
//! etcdctl processes took seconds on a loaded machine and left renewals unseen), and keeps, per
//! host (the lease's PublicIP), the lowest remaining TTL etcd reported, every etcd lease the key
//! was attached to (a renewal moves the key to a new one), the subnets it held, the polls in
//! which the host held no key or more than one, and the longest time without an answered poll,
//! which says how far the other figures can be trusted.
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
    /// The longest time from the watch's start or an answered poll to the next answered poll
    /// (or to now, while none answers): a lease could have come and gone unseen within it.
    pub longest_silence: Duration,
    /// When the last poll was answered (the watch's start before any).
    pub last_answer: Option<Instant>,
    /// The last error of an unanswered poll.
    pub last_error: Option<String>,
}

impl LeaseHistory {
    /// The host's record (an empty one if never seen).
    pub fn host(&self, ip: Ipv4Addr) -> HostLeases {
        self.hosts.get(&ip).cloned().unwrap_or_default()
    }

    /// The time since the last answered poll, counted into [`LeaseHistory::longest_silence`].
    fn silence_until(&mut self, now: Instant) {
        let since = self.last_answer.get_or_insert(now);
        self.longest_silence = self.longest_silence.max(now.duration_since(*since));
    }

    fn record(&mut self, expected: &BTreeSet<Ipv4Addr>, samples: Vec<LeaseSample>, at: Instant) {
        self.silence_until(at);
        self.last_answer = Some(at);
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

/// A thread polling the leases (see the module) until stopped; stopped on drop.
#[derive(Debug)]
pub struct LeaseWatch {
    history: Arc<Mutex<LeaseHistory>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseWatch {
    /// Starts polling on a thread of its own: `make` builds the reader there (so it may enter a
    /// namespace or own a runtime), and each call of the reader is one poll, `Err` naming why
    /// no member answered. `expected` are hosts that must hold a lease from the first poll on.
    /// Returns once the first poll is done.
    pub fn start<M, R>(make: M, expected: &[Ipv4Addr]) -> Self
    where
        M: FnOnce() -> R + Send + 'static,
        R: FnMut() -> Result<Vec<LeaseSample>, String>,
    {
        let history = Arc::new(Mutex::new(LeaseHistory {
            last_answer: Some(Instant::now()),
            ..LeaseHistory::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let expected: BTreeSet<Ipv4Addr> = expected.iter().copied().collect();
        let (h, s) = (history.clone(), stop.clone());
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut read = make();
            while !s.load(Ordering::Relaxed) {
                let result = read();
                let at = Instant::now();
                {
                    let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(samples) => h.record(&expected, samples, at),
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
        // A watch that never polled would pass every check on an empty history.
        first_rx
            .recv()
            .expect("the lease watch's thread died before its first poll");
        Self {
            history,
            stop,
            thread: Some(thread),
        }
    }

    /// What the polls saw so far (the silence running now included).
    pub fn history(&self) -> LeaseHistory {
        let mut h = self
            .history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        h.silence_until(Instant::now());
        h
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn history_keeps_the_minimum_renewals_gaps_and_silences() {
        let h1 = Ipv4Addr::new(198, 18, 0, 1);
        let h2 = Ipv4Addr::new(198, 18, 0, 2);
        let expected: BTreeSet<_> = [h1, h2].into();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut h = LeaseHistory {
            last_answer: Some(t0),
            ..LeaseHistory::default()
        };
        h.record(
            &expected,
            vec![sample(1, 10, 19), sample(2, 20, 15)],
            at(100),
        );
        h.record(
            &expected,
            vec![sample(1, 10, 11), sample(2, 21, 20)],
            at(300),
        );
        h.record(&expected, vec![sample(1, 11, 20)], at(2300));
        h.record(
            &expected,
            vec![sample(1, 11, 19), sample(1, 12, 19)],
            at(2400),
        );
        assert_eq!(h.longest_silence, Duration::from_millis(2000));
        h.silence_until(at(5400));
        assert_eq!(h.longest_silence, Duration::from_millis(3000));
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
        h.record(&[h3].into(), vec![], t0);
        h.record(&[h3].into(), vec![], t0);
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
