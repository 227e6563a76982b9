//! The other hosts' leases: one watch on `<prefix>/subnets/` resumed from a revision, and a
//! list-and-diff whenever the watch cannot be resumed (compaction, reconnect).
//!
//! The result is one stream of [`PeerEvent`]s, whatever produced it, so every datapath consumes
//! the same thing.

use std::collections::HashMap;

use etcd_client::{Client, EventType, WatchOptions, WatchStream};

use super::{
    etcd::{EtcdError, req},
    lease::{LeaseAttrs, LeaseEntry, subnet_of_key, subnets_prefix},
    subnet::Subnet,
};

pub use crate::dataplane::contract::{Peer, PeerBackend};

/// A peer from its lease: the one place a lease's JSON becomes a typed peer.
fn peer_of(subnet: Subnet, attrs: &LeaseAttrs) -> Peer {
    Peer {
        subnet,
        public_ip: attrs.public_ip,
        backend: PeerBackend::from_lease(&attrs.backend_type, attrs.backend_data.as_ref()),
    }
}

/// A change of the peer set.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerEvent {
    /// A peer appeared, or its lease changed (then it replaces the one with the same subnet).
    Added(Peer),
    /// The peer holding this subnet is gone.
    Removed(Subnet),
}

/// The known peers, excluding our own subnet.
#[derive(Debug, Default)]
pub struct PeerSet {
    peers: HashMap<Subnet, Peer>,
    own: Option<Subnet>,
}

impl PeerSet {
    /// Sets our own subnet, which is never a peer; drops it if it was one.
    pub fn set_own(&mut self, own: Subnet) -> Option<PeerEvent> {
        self.own = Some(own);
        self.peers.remove(&own).map(|_| PeerEvent::Removed(own))
    }

    /// The peers known now.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// How many peers are known.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// True when no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Replaces the set with a full listing and returns the differences.
    pub fn resync(&mut self, entries: &[LeaseEntry]) -> Vec<PeerEvent> {
        let mut fresh = HashMap::new();
        for e in entries {
            if Some(e.subnet) == self.own {
                continue;
            }
            match &e.attrs {
                Some(a) => {
                    fresh.insert(e.subnet, peer_of(e.subnet, a));
                }
                None => tracing::warn!("ignoring lease {} with an unreadable value", e.subnet),
            }
        }
        let mut events = Vec::new();
        for subnet in self.peers.keys() {
            if !fresh.contains_key(subnet) {
                events.push(PeerEvent::Removed(*subnet));
            }
        }
        for (subnet, peer) in &fresh {
            if self.peers.get(subnet) != Some(peer) {
                events.push(PeerEvent::Added(peer.clone()));
            }
        }
        self.peers = fresh;
        events
    }

    /// Applies one watched change; `None` when nothing changed for the datapath.
    pub fn apply(&mut self, change: &LeaseChange) -> Option<PeerEvent> {
        match change {
            LeaseChange::Put { subnet, .. } | LeaseChange::Deleted { subnet }
                if Some(*subnet) == self.own =>
            {
                None
            }
            LeaseChange::Put {
                subnet,
                attrs: Some(attrs),
            } => {
                let peer = peer_of(*subnet, attrs);
                if self.peers.get(subnet) == Some(&peer) {
                    return None;
                }
                self.peers.insert(*subnet, peer.clone());
                Some(PeerEvent::Added(peer))
            }
            LeaseChange::Put {
                subnet,
                attrs: None,
            } => {
                tracing::warn!("ignoring lease {subnet} with an unreadable value");
                self.peers
                    .remove(subnet)
                    .map(|_| PeerEvent::Removed(*subnet))
            }
            LeaseChange::Deleted { subnet } => self
                .peers
                .remove(subnet)
                .map(|_| PeerEvent::Removed(*subnet)),
        }
    }
}

/// One change seen by the watch.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseChange {
    /// A lease was written.
    Put {
        /// Its subnet.
        subnet: Subnet,
        /// Its value, when readable.
        attrs: Option<LeaseAttrs>,
    },
    /// A lease was deleted or expired.
    Deleted {
        /// Its subnet.
        subnet: Subnet,
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
    /// Starts watching changes made after `revision`.
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
            .watch(subnets_prefix(prefix), Some(opts))
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
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(subnet) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| subnet_of_key(&self.prefix, k))
                else {
                    continue;
                };
                self.revision = self.revision.max(kv.mod_revision());
                changes.push(match ev.event_type() {
                    EventType::Put => LeaseChange::Put {
                        subnet,
                        attrs: LeaseAttrs::from_json(kv.value()),
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
    use std::net::Ipv4Addr;

    fn attrs(ip: [u8; 4]) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: ip.into(),
            public_ipv6: None,
            backend_type: "udp".into(),
            backend_data: None,
        }
    }

    fn entry(s: &str, ip: [u8; 4]) -> LeaseEntry {
        LeaseEntry {
            subnet: s.parse().unwrap(),
            attrs: Some(attrs(ip)),
            etcd_lease: 1,
        }
    }

    #[test]
    fn resync_diffs_and_skips_own() {
        let mut set = PeerSet::default();
        assert_eq!(set.set_own("10.0.1.0/24".parse().unwrap()), None);
        let ev = set.resync(&[
            entry("10.0.1.0/24", [1, 1, 1, 1]),
            entry("10.0.2.0/24", [2, 2, 2, 2]),
        ]);
        assert_eq!(ev.len(), 1);
        assert!(matches!(&ev[0], PeerEvent::Added(p) if p.public_ip == Ipv4Addr::new(2, 2, 2, 2)));
        // Unchanged: nothing. Changed value and a removal: both reported.
        assert!(set.resync(&[entry("10.0.2.0/24", [2, 2, 2, 2])]).is_empty());
        let ev = set.resync(&[entry("10.0.3.0/24", [3, 3, 3, 3])]);
        assert_eq!(ev.len(), 2);
        assert!(ev.contains(&PeerEvent::Removed("10.0.2.0/24".parse().unwrap())));
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn watched_changes() {
        let mut set = PeerSet::default();
        let own = "10.0.1.0/24".parse().unwrap();
        set.set_own(own);
        let s = "10.0.2.0/24".parse().unwrap();
        let put = LeaseChange::Put {
            subnet: s,
            attrs: Some(attrs([2, 2, 2, 2])),
        };
        assert!(matches!(set.apply(&put), Some(PeerEvent::Added(_))));
        assert_eq!(set.apply(&put), None);
        assert_eq!(
            set.apply(&LeaseChange::Put {
                subnet: own,
                attrs: None
            }),
            None
        );
        assert_eq!(
            set.apply(&LeaseChange::Deleted { subnet: s }),
            Some(PeerEvent::Removed(s))
        );
        assert_eq!(set.apply(&LeaseChange::Deleted { subnet: s }), None);
        assert!(set.is_empty());
    }
}
