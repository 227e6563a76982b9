//! Counters of the TUN datapath: what was forwarded and, per reason, what was dropped. Refusals
//! of the receive policy are counted per [`Refusal`], under the names the eBPF counters use.

use std::sync::atomic::{AtomicU64, Ordering};

use overlay_common::{CounterSlot, policy::Refusal};

use crate::dataplane::{
    contract::DatapathError,
    counters::{CounterSource, Counters, OutcomeCount},
};

/// Counters shared by all workers (relaxed atomics, added once per batch where possible).
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets read from the TUN device and sent to a peer.
    pub encapsulated: AtomicU64,
    /// Packets read from the TUN device whose destination no peer owns.
    pub no_peer: AtomicU64,
    /// Packets read from the TUN device that are not valid IPv4.
    pub not_ipv4: AtomicU64,
    /// ICMP "destination unreachable" answers written to the TUN device.
    pub icmp_sent: AtomicU64,
    /// ICMP answers not sent because of the rate limit.
    pub icmp_rate_limited: AtomicU64,
    /// Datagrams that could not be sent (a failed GSO send counts its segments).
    pub send_errors: AtomicU64,
    /// Packets decapsulated and written to the TUN device.
    pub decapsulated: AtomicU64,
    /// Datagrams the receive policy refused, per [`Refusal::index`].
    pub refused: [AtomicU64; Refusal::ALL.len()],
    /// Accepted packets the coalescer could not take (a TCP super-packet it cannot cut).
    pub coalesce_errors: AtomicU64,
    /// Writes to the TUN device that failed.
    pub tun_write_errors: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub encapsulated: u64,
    pub no_peer: u64,
    pub not_ipv4: u64,
    pub icmp_sent: u64,
    pub icmp_rate_limited: u64,
    pub send_errors: u64,
    pub decapsulated: u64,
    pub refused: [u64; Refusal::ALL.len()],
    pub coalesce_errors: u64,
    pub tun_write_errors: u64,
}

impl StatsSnapshot {
    /// Datagrams refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()]
    }
}

impl Stats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        if n != 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Adds per-reason refusal counts.
    pub fn add_refused(&self, counts: &[u64; Refusal::ALL.len()]) {
        for (counter, n) in self.refused.iter().zip(counts) {
            Stats::add(counter, *n);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            encapsulated: l(&self.encapsulated),
            no_peer: l(&self.no_peer),
            not_ipv4: l(&self.not_ipv4),
            icmp_sent: l(&self.icmp_sent),
            icmp_rate_limited: l(&self.icmp_rate_limited),
            send_errors: l(&self.send_errors),
            decapsulated: l(&self.decapsulated),
            refused: std::array::from_fn(|i| l(&self.refused[i])),
            coalesce_errors: l(&self.coalesce_errors),
            tun_write_errors: l(&self.tun_write_errors),
        }
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "encapsulated {} decapsulated {}; dropped: no peer {} not IPv4 {}",
            self.encapsulated, self.decapsulated, self.no_peer, self.not_ipv4,
        )?;
        for reason in Refusal::ALL {
            write!(f, " {} {}", reason.counter().name(), self.refused(reason))?;
        }
        write!(
            f,
            "; icmp sent {} rate-limited {}; errors: send {} coalesce {} tun write {}",
            self.icmp_sent,
            self.icmp_rate_limited,
            self.send_errors,
            self.coalesce_errors,
            self.tun_write_errors
        )
    }
}

impl StatsSnapshot {
    /// The counts under the outcome names the eBPF programs count by, so status and metrics
    /// read the same whichever datapath forwards. The TUN datapath counts neither bytes nor
    /// per peer; its ICMP answers have no eBPF counterpart and stay in its stop line.
    pub fn outcomes(&self) -> Vec<OutcomeCount> {
        let mut counts = vec![
            (CounterSlot::Encapsulated, self.encapsulated),
            (CounterSlot::EncapNoPeer, self.no_peer),
            (CounterSlot::EncapNotIpv4, self.not_ipv4),
            (CounterSlot::EncapError, self.send_errors),
            (CounterSlot::DecapToStack, self.decapsulated),
            (
                CounterSlot::DecapError,
                self.coalesce_errors + self.tun_write_errors,
            ),
        ];
        for reason in Refusal::ALL {
            let slot = reason.counter();
            match counts.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, n)) => *n += self.refused(reason),
                None => counts.push((slot, self.refused(reason))),
            }
        }
        counts.sort_by_key(|(s, _)| s.index());
        counts
            .into_iter()
            .map(|(slot, packets)| OutcomeCount {
                slot,
                packets,
                bytes: None,
            })
            .collect()
    }
}

impl CounterSource for Stats {
    fn read(&self) -> Result<Counters, DatapathError> {
        Ok(Counters {
            read_from: "agent",
            outcomes: self.snapshot().outcomes(),
            ..Counters::default()
        })
    }
}
