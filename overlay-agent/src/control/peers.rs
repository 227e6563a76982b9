//! The other hosts' leases: one watch on `<prefix>/subnets/` resumed from a revision, and a
//! list-and-diff whenever the watch cannot be resumed (compaction, reconnect).
//!
//! The result is one stream of [`PeerEvent`]s, whatever produced it, so every datapath consumes
//! the same thing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, WatchOptions, WatchStream};
use overlay_common::net::Mac;

use super::{
    etcd::{EtcdError, req},
    lease::{BadValue, LeaseAttrs, LeaseEntry, subnet_of_key},
    subnet::Subnet,
};

pub use crate::dataplane::contract::{Peer, PeerBackend};

/// What peers are judged against: the running config and this host.
#[derive(Debug, Clone)]
pub struct PeerRules {
    /// The running config's Network: a peer subnet outside it is refused.
    pub network: Subnet,
    /// This host's public address: a lease naming it is not another host.
    pub own_ip: Ipv4Addr,
    /// How long a peer whose lease expired stays in the dataplane (`--expired-peer-grace`).
    pub grace: Duration,
}

/// Why a lease is not made a peer. Each is logged once per lease and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The value is not a lease.
    #[error("{0}")]
    Value(BadValue),
    /// The subnet lies outside the Network.
    #[error("the subnet lies outside the Network {network}")]
    OutsideNetwork {
        /// The running config's Network.
        network: Subnet,
    },
    /// The subnet overlaps this host's.
    #[error("the subnet overlaps this host's {own}")]
    OverlapsOwn {
        /// Our subnet.
        own: Subnet,
    },
    /// The subnet overlaps an older peer lease, which stands.
    #[error("the subnet overlaps the older lease of {older}, which stands")]
    OverlapsPeer {
        /// The older lease's subnet.
        older: Subnet,
    },
    /// PublicIP cannot be another host's underlay address.
    #[error("PublicIP {ip} is {what}")]
    PublicIp {
        /// The address.
        ip: Ipv4Addr,
        /// What it is instead.
        what: &'static str,
    },
    /// vxlan's VtepMAC is not a unicast address.
    #[error("VtepMAC {mac} is not a unicast MAC")]
    VtepMac {
        /// The MAC.
        mac: Mac,
    },
}

/// A peer from its lease: the one place a lease's JSON becomes a typed peer, and the one place
/// a lease is judged on its own (conflicts between leases are judged in [`PeerSet`]).
fn peer_of(subnet: Subnet, attrs: &LeaseAttrs, rules: &PeerRules) -> Result<Peer, Refusal> {
    if !rules.network.contains(&subnet) {
        return Err(Refusal::OutsideNetwork {
            network: rules.network,
        });
    }
    let ip = attrs.public_ip;
    let what = if ip == rules.own_ip {
        Some("this host's own address")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() && !rules.own_ip.is_loopback() {
        // Allowed only where this host's own is loopback too: hosts sharing one machine (a lab).
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    };
    if let Some(what) = what {
        return Err(Refusal::PublicIp { ip, what });
    }
    let backend = PeerBackend::from_lease(&attrs.backend_type, attrs.backend_data.as_ref());
    if let PeerBackend::Vxlan { vtep_mac } = backend
        && (vtep_mac.0[0] & 1 == 1 || vtep_mac == Mac::default())
    {
        return Err(Refusal::VtepMac { mac: vtep_mac });
    }
    Ok(Peer {
        subnet,
        public_ip: ip,
        backend,
    })
}

/// A change of the peer set.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// A peer appeared, or its lease changed (then it replaces the one with the same subnet).
    Added(Peer),
    /// The peer holding this subnet is gone.
    Removed(Subnet),
}

/// One lease of another host, as last seen.
#[derive(Debug, Clone)]
struct Record {
    /// The peer it makes, or why it makes none.
    peer: Result<Peer, Refusal>,
    /// Its etcd lease, to tell an expiry from a deletion when the key goes.
    etcd_lease: i64,
    /// The key's create revision: the older of two overlapping leases stands.
    created: i64,
    /// When etcd dropped it by expiry; it stays a peer for the grace period after that.
    expired_at: Option<Instant>,
}

/// Counts of what the peer set refused and kept, for logs and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounts {
    /// Leases refused, each counted once per refusal.
    pub refused: u64,
    /// Peers kept past their lease's expiry, counted when they became stale.
    pub went_stale: u64,
    /// Stale peers removed at the end of the grace period.
    pub grace_ended: u64,
    /// Times two or more accepted leases were found naming one PublicIP.
    pub shared_public_ip: u64,
}

/// The other hosts' leases, judged, and the peers the datapath was told of.
///
/// Every change recomputes the whole set from the leases ([`PeerSet::settle`]), so a lease
/// refused for overlapping an older one becomes a peer as soon as the older one goes, whatever
/// order the changes came in.
#[derive(Debug)]
pub struct PeerSet {
    rules: PeerRules,
    own: Option<Subnet>,
    leases: BTreeMap<Subnet, Record>,
    programmed: HashMap<Subnet, Peer>,
    /// The refusals logged, so each is logged once.
    refused: HashMap<Subnet, Refusal>,
    /// The PublicIPs more than one accepted lease names, as logged, so each is logged once.
    shared: HashMap<Ipv4Addr, Vec<Subnet>>,
    counts: PeerCounts,
}

/// A peer's lease that is gone from etcd: expired (its etcd lease is gone too) or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// etcd dropped it when its TTL ran out: the host is probably still there, cut off from
    /// etcd, so it stays a peer for the grace period.
    Expired,
    /// Deleted (by an operator, or by its host): removed at once.
    Deleted,
}

impl PeerSet {
    /// An empty set judged by `rules`.
    pub fn new(rules: PeerRules) -> Self {
        Self {
            rules,
            own: None,
            leases: BTreeMap::new(),
            programmed: HashMap::new(),
            refused: HashMap::new(),
            shared: HashMap::new(),
            counts: PeerCounts::default(),
        }
    }

    /// Sets our own subnet, which is never a peer.
    pub fn set_own(&mut self, own: Subnet) -> Vec<PeerEvent> {
        self.own = Some(own);
        self.leases.remove(&own);
        self.settle()
    }

    /// The peers the datapath has now, stale ones included.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.programmed.values()
    }

    /// The peers the datapath has, in subnet order, as status shows them.
    pub fn listing(&self) -> Vec<crate::status::PeerState> {
        use crate::dataplane::contract::PeerBackend;
        let mut peers: Vec<&Peer> = self.programmed.values().collect();
        peers.sort_by_key(|p| p.subnet);
        peers
            .into_iter()
            .map(|p| crate::status::PeerState {
                subnet: p.subnet.to_string(),
                public_ip: p.public_ip,
                backend: p.backend.type_name().to_owned(),
                vtep_mac: match &p.backend {
                    PeerBackend::Vxlan { vtep_mac } => Some(vtep_mac.to_string()),
                    _ => None,
                },
                kernel_decap: match &p.backend {
                    PeerBackend::Udp { kernel_decap } => Some(*kernel_decap),
                    _ => None,
                },
                stale: self
                    .leases
                    .get(&p.subnet)
                    .is_some_and(|r| r.expired_at.is_some()),
            })
            .collect()
    }

    /// How many peers the datapath has.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    /// True when the datapath has no peer.
    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// Peers kept only for the grace period: their lease expired.
    pub fn stale(&self) -> usize {
        self.leases
            .values()
            .filter(|r| r.expired_at.is_some() && r.peer.is_ok())
            .count()
    }

    /// What was refused and kept so far.
    pub fn counts(&self) -> PeerCounts {
        self.counts
    }

    /// The etcd lease of the live (not yet expired) lease of `subnet`, whose fate decides
    /// between [`Gone::Expired`] and [`Gone::Deleted`] when the key goes; `None` when there is
    /// nothing to decide.
    pub fn etcd_lease_of(&self, subnet: &Subnet) -> Option<i64> {
        self.leases
            .get(subnet)
            .filter(|r| r.expired_at.is_none())
            .map(|r| r.etcd_lease)
    }

    /// The live leases a full listing no longer has, with their etcd leases: the caller finds
    /// out how each went and hands that to [`PeerSet::resync`].
    pub fn missing_from(&self, entries: &[LeaseEntry]) -> Vec<(Subnet, i64)> {
        let listed: HashSet<Subnet> = entries.iter().map(|e| e.subnet).collect();
        self.leases
            .iter()
            .filter(|(s, r)| r.expired_at.is_none() && !listed.contains(s))
            .map(|(s, r)| (*s, r.etcd_lease))
            .collect()
    }

    /// Replaces the leases with a full listing. Of those the listing no longer has, the ones in
    /// `expired` stay for the grace period; the others are removed. Returns the changes for the
    /// datapath.
    pub fn resync(&mut self, entries: &[LeaseEntry], expired: &HashSet<Subnet>) -> Vec<PeerEvent> {
        let now = Instant::now();
        let mut fresh = BTreeMap::new();
        for e in entries {
            if Some(e.subnet) == self.own {
                continue;
            }
            fresh.insert(
                e.subnet,
                self.record(e.subnet, &e.attrs, e.etcd_lease, e.created),
            );
        }
        for (subnet, mut old) in std::mem::take(&mut self.leases) {
            if fresh.contains_key(&subnet) {
                continue;
            }
            if old.expired_at.is_none() && expired.contains(&subnet) {
                old.expired_at = Some(now);
                self.went_stale(&subnet, &old);
            }
            if old.expired_at.is_some() {
                fresh.insert(subnet, old);
            }
        }
        self.leases = fresh;
        self.settle()
    }

    /// Applies one watched change (`gone` says how a deleted lease went); returns the changes
    /// for the datapath.
    pub fn apply(&mut self, change: &LeaseChange, gone: Gone) -> Vec<PeerEvent> {
        match change {
            LeaseChange::Put { subnet, .. } | LeaseChange::Deleted { subnet }
                if Some(*subnet) == self.own =>
            {
                return Vec::new();
            }
            LeaseChange::Put {
                subnet,
                attrs,
                etcd_lease,
                created,
            } => {
                let record = self.record(*subnet, attrs, *etcd_lease, *created);
                self.leases.insert(*subnet, record);
            }
            LeaseChange::Deleted { subnet } => match gone {
                Gone::Deleted => {
                    self.leases.remove(subnet);
                }
                Gone::Expired => {
                    if let Some(mut r) = self.leases.remove(subnet) {
                        if r.expired_at.is_none() {
                            r.expired_at = Some(Instant::now());
                            self.went_stale(subnet, &r);
                        }
                        self.leases.insert(*subnet, r);
                    }
                }
            },
            LeaseChange::Config { .. } => return Vec::new(),
        }
        self.settle()
    }

    /// When the next stale peer's grace period ends.
    pub fn next_grace_end(&self) -> Option<Instant> {
        self.leases
            .values()
            .filter_map(|r| r.expired_at)
            .min()
            .map(|t| t + self.rules.grace)
    }

    /// Removes the stale peers whose grace period has ended; returns the changes.
    pub fn end_grace(&mut self, now: Instant) -> Vec<PeerEvent> {
        let grace = self.rules.grace;
        let ended: Vec<Subnet> = self
            .leases
            .iter()
            .filter(|(_, r)| r.expired_at.is_some_and(|t| t + grace <= now))
            .map(|(s, _)| *s)
            .collect();
        for subnet in &ended {
            self.leases.remove(subnet);
            self.counts.grace_ended += 1;
            tracing::info!(
                "peer {subnet}: its lease expired {} ago and no host has renewed it; removing it",
                humantime::format_duration(grace)
            );
        }
        self.settle()
    }

    fn record(
        &self,
        subnet: Subnet,
        attrs: &Result<LeaseAttrs, BadValue>,
        etcd_lease: i64,
        created: i64,
    ) -> Record {
        let peer = match attrs {
            Ok(a) => peer_of(subnet, a, &self.rules),
            Err(e) => Err(Refusal::Value(e.clone())),
        };
        Record {
            peer,
            etcd_lease,
            created,
            expired_at: None,
        }
    }

    fn went_stale(&mut self, subnet: &Subnet, r: &Record) {
        if let Ok(p) = &r.peer {
            self.counts.went_stale += 1;
            tracing::warn!(
                "peer {subnet} ({}): its lease expired; keeping it for {} (--expired-peer-grace) \
                 in case the host is only cut off from etcd; a host leasing the subnet \
                 replaces it at once",
                p.public_ip,
                humantime::format_duration(self.rules.grace)
            );
        }
    }

    /// Judges the leases against each other and our own subnet, logs new refusals, and returns
    /// what the datapath must change to have exactly the accepted peers.
    fn settle(&mut self) -> Vec<PeerEvent> {
        // Oldest first: of two overlapping leases the one created first stands, so a newcomer
        // cannot take over an existing host's addresses by announcing a wider subnet.
        let mut order: Vec<(&Subnet, &Record)> = self.leases.iter().collect();
        order.sort_by_key(|(s, r)| (r.created, **s));
        let mut accepted: BTreeMap<u32, Peer> = BTreeMap::new();
        let mut refusals: HashMap<Subnet, Refusal> = HashMap::new();
        for (subnet, record) in order {
            let verdict = record.peer.clone().and_then(|peer| {
                if let Some(own) = self.own
                    && own.overlaps(subnet)
                {
                    return Err(Refusal::OverlapsOwn { own });
                }
                match overlapping(&accepted, subnet) {
                    Some(older) => Err(Refusal::OverlapsPeer { older }),
                    None => Ok(peer),
                }
            });
            match verdict {
                Ok(peer) => {
                    accepted.insert(subnet.addr().to_bits(), peer);
                }
                Err(r) => {
                    refusals.insert(*subnet, r);
                }
            }
        }
        for (subnet, r) in &refusals {
            if self.refused.get(subnet) != Some(r) {
                self.counts.refused += 1;
                tracing::warn!("ignoring the lease of {subnet}: {r}");
            }
        }
        self.refused = refusals;
        let accepted: HashMap<Subnet, Peer> =
            accepted.into_values().map(|p| (p.subnet, p)).collect();
        self.note_shared_addresses(&accepted);
        let mut events: Vec<PeerEvent> = self
            .programmed
            .keys()
            .filter(|s| !accepted.contains_key(s))
            .map(|s| PeerEvent::Removed(*s))
            .collect();
        for (subnet, peer) in &accepted {
            if self.programmed.get(subnet) != Some(peer) {
                events.push(PeerEvent::Added(peer.clone()));
            }
        }
        self.programmed = accepted;
        events
    }
}

impl PeerSet {
    /// Two leases naming one PublicIP are both routed there, as flanneld routes them: a host
    /// that moved to another subnet leaves its old lease until it expires, and its new one must
    /// work meanwhile. Said once per set of subnets.
    fn note_shared_addresses(&mut self, accepted: &HashMap<Subnet, Peer>) {
        let mut by_ip: HashMap<Ipv4Addr, Vec<Subnet>> = HashMap::new();
        for p in accepted.values() {
            by_ip.entry(p.public_ip).or_default().push(p.subnet);
        }
        by_ip.retain(|_, subnets| subnets.len() > 1);
        for (ip, subnets) in &mut by_ip {
            subnets.sort();
            if self.shared.get(ip) != Some(subnets) {
                self.counts.shared_public_ip += 1;
                let list: Vec<String> = subnets.iter().map(Subnet::to_string).collect();
                tracing::info!(
                    "leases {} all name PublicIP {ip}: routing each to it, as flanneld does (a \
                     host that moved subnets keeps its old lease until it expires)",
                    list.join(", ")
                );
            }
        }
        self.shared = by_ip;
    }
}

/// An accepted subnet that overlaps `subnet`, keyed by start address: CIDR blocks overlap only
/// by containment, so it is the nearest one starting at or before `subnet`, or one starting
/// inside it.
fn overlapping(accepted: &BTreeMap<u32, Peer>, subnet: &Subnet) -> Option<Subnet> {
    let start = subnet.addr().to_bits();
    let end = subnet.last_addr().to_bits();
    let before = accepted
        .range(..=start)
        .next_back()
        .map(|(_, p)| p.subnet)
        .filter(|s| s.overlaps(subnet));
    before.or_else(|| accepted.range(start..=end).next().map(|(_, p)| p.subnet))
}

/// One change seen by the watch.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseChange {
    /// A lease was written.
    Put {
        /// Its subnet.
        subnet: Subnet,
        /// Its value, or why it is not read.
        attrs: Result<LeaseAttrs, BadValue>,
        /// Its etcd lease (0: a reservation).
        etcd_lease: i64,
        /// The key's create revision.
        created: i64,
    },
    /// A lease was deleted or expired.
    Deleted {
        /// Its subnet.
        subnet: Subnet,
    },
    /// `<prefix>/config` was written or deleted (`None`).
    Config {
        /// The new value.
        value: Option<Vec<u8>>,
    },
}

/// What the watch delivered.
#[derive(Debug)]
pub enum WatchBatch {
    /// Changes, in order.
    Changes(Vec<LeaseChange>),
    /// The revision to resume from was compacted away: list again and diff.
    Compacted,
}

/// The watch on `<prefix>/subnets/`.
pub struct LeaseWatch {
    stream: WatchStream,
    prefix: String,
    /// The last revision seen; a new watch resumes after it.
    pub revision: i64,
}

impl LeaseWatch {
    /// Starts watching changes made after `revision`: the leases, and the config key so a
    /// change of it while running is seen.
    pub async fn start(
        client: &mut Client,
        prefix: &str,
        revision: i64,
    ) -> Result<Self, EtcdError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let stream = client
            .watch(format!("{}/", prefix.trim_end_matches('/')), Some(opts))
            .await
            .map_err(req("watching leases"))?;
        Ok(Self {
            stream,
            prefix: prefix.to_owned(),
            revision,
        })
    }

    /// Waits for the next changes. An error means the connection is gone.
    pub async fn next(&mut self) -> Result<WatchBatch, EtcdError> {
        loop {
            let Some(resp) = self
                .stream
                .message()
                .await
                .map_err(req("watching leases"))?
            else {
                return Err(EtcdError::Request {
                    op: "watching leases",
                    source: etcd_client::Error::WatchError("the watch stream ended".into()),
                });
            };
            if resp.compact_revision() > 0 {
                return Ok(WatchBatch::Compacted);
            }
            if resp.canceled() {
                return Err(EtcdError::Request {
                    op: "watching leases",
                    source: etcd_client::Error::WatchError(format!(
                        "watch canceled by etcd: {}",
                        resp.cancel_reason()
                    )),
                });
            }
            if let Some(h) = resp.header() {
                self.revision = self.revision.max(h.revision());
            }
            let mut changes = Vec::new();
            let config_key = format!("{}/config", self.prefix.trim_end_matches('/'));
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let Ok(key) = kv.key_str() else { continue };
                if key == config_key {
                    changes.push(LeaseChange::Config {
                        value: (ev.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                    });
                    continue;
                }
                let Some(subnet) = subnet_of_key(&self.prefix, key) else {
                    continue;
                };
                changes.push(match ev.event_type() {
                    EventType::Put => LeaseChange::Put {
                        subnet,
                        attrs: LeaseAttrs::read(kv.value()),
                        etcd_lease: kv.lease(),
                        created: kv.create_revision(),
                    },
                    EventType::Delete => LeaseChange::Deleted { subnet },
                });
            }
            if !changes.is_empty() {
                return Ok(WatchBatch::Changes(changes));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN_IP: [u8; 4] = [198, 18, 0, 1];

    fn set() -> PeerSet {
        let mut set = PeerSet::new(PeerRules {
            network: "10.0.0.0/16".parse().unwrap(),
            own_ip: OWN_IP.into(),
            grace: Duration::from_secs(60),
        });
        assert!(set.set_own("10.0.1.0/24".parse().unwrap()).is_empty());
        set
    }

    fn attrs(ip: [u8; 4]) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.into(),
            public_ipv6: None,
            backend_type: "udp".into(),
            backend_data: None,
        }
    }

    fn entry(s: &str, ip: [u8; 4], created: i64) -> LeaseEntry {
        LeaseEntry {
            subnet: s.parse().unwrap(),
            attrs: Ok(attrs(ip)),
            etcd_lease: 7,
            created,
        }
    }

    fn put(s: &str, attrs: Result<LeaseAttrs, BadValue>, created: i64) -> LeaseChange {
        LeaseChange::Put {
            subnet: s.parse().unwrap(),
            attrs,
            etcd_lease: 7,
            created,
        }
    }

    fn del(s: &str) -> LeaseChange {
        LeaseChange::Deleted {
            subnet: s.parse().unwrap(),
        }
    }

    fn subnets(set: &PeerSet) -> Vec<String> {
        let mut v: Vec<String> = set.peers().map(|p| p.subnet.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn resync_diffs_and_skips_own() {
        let mut set = set();
        let none = HashSet::new();
        let ev = set.resync(
            &[
                entry("10.0.1.0/24", [1, 1, 1, 1], 1),
                entry("10.0.2.0/24", [2, 2, 2, 2], 2),
            ],
            &none,
        );
        assert_eq!(ev.len(), 1);
        assert!(matches!(&ev[0], PeerEvent::Added(p) if p.public_ip == Ipv4Addr::new(2, 2, 2, 2)));
        // Unchanged: nothing. Changed value and a removal: both reported.
        assert!(
            set.resync(&[entry("10.0.2.0/24", [2, 2, 2, 2], 2)], &none)
                .is_empty()
        );
        let listing = [entry("10.0.3.0/24", [3, 3, 3, 3], 3)];
        assert_eq!(
            set.missing_from(&listing),
            [("10.0.2.0/24".parse().unwrap(), 7)]
        );
        let ev = set.resync(&listing, &none);
        assert_eq!(ev.len(), 2);
        assert!(ev.contains(&PeerEvent::Removed("10.0.2.0/24".parse().unwrap())));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn watched_changes() {
        let mut set = set();
        let s: Subnet = "10.0.2.0/24".parse().unwrap();
        let p = put("10.0.2.0/24", Ok(attrs([2, 2, 2, 2])), 2);
        assert!(matches!(
            set.apply(&p, Gone::Deleted)[..],
            [PeerEvent::Added(_)]
        ));
        assert!(set.apply(&p, Gone::Deleted).is_empty());
        assert!(
            set.apply(
                &put("10.0.1.0/24", Ok(attrs([9, 9, 9, 9])), 1),
                Gone::Deleted
            )
            .is_empty()
        );
        assert_eq!(
            set.apply(&del("10.0.2.0/24"), Gone::Deleted),
            [PeerEvent::Removed(s)]
        );
        assert!(set.apply(&del("10.0.2.0/24"), Gone::Deleted).is_empty());
        assert!(set.is_empty());
    }

    #[test]
    fn an_expired_peer_stays_for_the_grace_period_and_a_new_holder_replaces_it() {
        let mut set = set();
        let s: Subnet = "10.0.2.0/24".parse().unwrap();
        set.apply(
            &put("10.0.2.0/24", Ok(attrs([2, 2, 2, 2])), 2),
            Gone::Deleted,
        );
        assert_eq!(set.etcd_lease_of(&s), Some(7));
        assert!(set.apply(&del("10.0.2.0/24"), Gone::Expired).is_empty());
        assert_eq!((set.len(), set.stale()), (1, 1));
        // Stale: there is no live lease to ask about any more.
        assert_eq!(set.etcd_lease_of(&s), None);
        let end = set.next_grace_end().unwrap();
        assert!(set.end_grace(end - Duration::from_secs(1)).is_empty());
        assert_eq!(set.end_grace(end), [PeerEvent::Removed(s)]);
        assert_eq!(set.counts().grace_ended, 1);

        // Another host leasing the subnet replaces the stale peer at once.
        set.apply(
            &put("10.0.2.0/24", Ok(attrs([2, 2, 2, 2])), 2),
            Gone::Deleted,
        );
        set.apply(&del("10.0.2.0/24"), Gone::Expired);
        let ev = set.apply(
            &put("10.0.2.0/24", Ok(attrs([5, 5, 5, 5])), 9),
            Gone::Deleted,
        );
        assert!(
            matches!(&ev[..], [PeerEvent::Added(p)] if p.public_ip == Ipv4Addr::new(5, 5, 5, 5))
        );
        assert_eq!((set.stale(), set.next_grace_end()), (0, None));

        // A stale peer survives a resync that does not list it; the same host renewing makes it
        // live again without touching the datapath.
        set.apply(&del("10.0.2.0/24"), Gone::Expired);
        assert!(set.resync(&[], &HashSet::new()).is_empty());
        assert_eq!(set.stale(), 1);
        assert!(
            set.resync(&[entry("10.0.2.0/24", [5, 5, 5, 5], 9)], &HashSet::new())
                .is_empty()
        );
        assert_eq!(set.stale(), 0);
        assert_eq!(set.counts().went_stale, 3);
    }

    #[test]
    fn hostile_leases_are_refused_once_each() {
        let mut set = set();
        let bad = |ip: [u8; 4]| put("10.0.2.0/24", Ok(attrs(ip)), 2);
        for ip in [
            OWN_IP,
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [255; 4],
        ] {
            assert!(set.apply(&bad(ip), Gone::Deleted).is_empty(), "{ip:?}");
        }
        assert_eq!(set.counts().refused, 5);
        // The same refusal again is not counted again.
        set.apply(&bad([255; 4]), Gone::Deleted);
        assert_eq!(set.counts().refused, 5);
        for change in [
            put("10.9.0.0/24", Ok(attrs([2, 2, 2, 2])), 3),
            put("10.0.1.128/25", Ok(attrs([2, 2, 2, 2])), 4),
            put("10.0.3.0/24", Err(BadValue::TooLarge { len: 1 << 20 }), 5),
        ] {
            assert!(set.apply(&change, Gone::Deleted).is_empty());
        }
        let mut vxlan = attrs([2, 2, 2, 2]);
        vxlan.backend_type = "vxlan".into();
        vxlan.backend_data = Some(serde_json::json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"}));
        assert!(
            set.apply(&put("10.0.4.0/24", Ok(vxlan), 6), Gone::Deleted)
                .is_empty()
        );
        assert_eq!(set.counts().refused, 9);
        assert!(set.is_empty());
    }

    #[test]
    fn of_overlapping_leases_the_older_stands_until_it_goes() {
        let mut set = set();
        set.apply(
            &put("10.0.4.0/24", Ok(attrs([4, 4, 4, 4])), 10),
            Gone::Deleted,
        );
        // A wider, newer lease over it is refused, whatever its key sorts like.
        assert!(
            set.apply(
                &put("10.0.0.0/21", Ok(attrs([6, 6, 6, 6])), 11),
                Gone::Deleted
            )
            .is_empty()
        );
        assert!(
            set.apply(
                &put("10.0.4.128/25", Ok(attrs([6, 6, 6, 6])), 12),
                Gone::Deleted
            )
            .is_empty()
        );
        assert_eq!(subnets(&set), ["10.0.4.0/24"]);
        // Two leases with one PublicIP (a host that moved subnets) are both routed there.
        set.apply(
            &put("10.0.5.0/24", Ok(attrs([4, 4, 4, 4])), 13),
            Gone::Deleted,
        );
        assert_eq!(subnets(&set), ["10.0.4.0/24", "10.0.5.0/24"]);
        // The older going lets the next-oldest stand: the /25 (the /21 still overlaps ours).
        set.apply(&del("10.0.4.0/24"), Gone::Deleted);
        assert_eq!(subnets(&set), ["10.0.4.128/25", "10.0.5.0/24"]);
    }
}
