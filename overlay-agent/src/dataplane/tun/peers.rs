//! The TUN datapath's peer table: longest-prefix match from an overlay address to the peer that
//! holds it, and the sender check the eBPF decap does (a datagram must come from a known peer's
//! public IP, and its inner source must lie in a subnet that peer holds).
//!
//! Workers read an immutable snapshot; the datapath thread publishes a new one per peer event
//! and bumps a generation counter, which workers compare once per batch, so the packet path
//! takes no lock.

use overlay_common::{net::mask, policy::Peers};

use crate::control::subnet::Subnet;
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

pub use crate::dataplane::contract::PeerRoute;

/// One immutable snapshot of the peers.
#[derive(Debug, Default)]
pub struct PeerTable {
    /// Per prefix length, longest first: masked address -> route.
    by_len: Vec<(u8, HashMap<u32, PeerRoute>)>,
    public_ips: HashSet<Ipv4Addr>,
}

impl PeerTable {
    /// Builds a table from the installed routes.
    pub fn new(routes: &BTreeMap<Subnet, PeerRoute>) -> Self {
        let mut by_len: BTreeMap<u8, HashMap<u32, PeerRoute>> = BTreeMap::new();
        let mut public_ips = HashSet::new();
        for (subnet, route) in routes {
            by_len
                .entry(subnet.prefix())
                .or_default()
                .insert(u32::from(subnet.addr()), *route);
            public_ips.insert(route.public_ip);
        }
        Self {
            by_len: by_len.into_iter().rev().collect(),
            public_ips,
        }
    }

    /// The route of the peer whose subnet holds `ip`.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&PeerRoute> {
        let ip = u32::from(ip);
        self.by_len
            .iter()
            .find_map(|(len, map)| map.get(&(ip & mask(*len))))
    }

    /// Whether `sender` is some peer's public IP.
    pub fn is_peer(&self, sender: Ipv4Addr) -> bool {
        self.public_ips.contains(&sender)
    }

    /// The number of peers.
    pub fn len(&self) -> usize {
        self.by_len.iter().map(|(_, m)| m.len()).sum()
    }

    /// Whether there are no peers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the shared receive policy asks of the peers (the eBPF decap asks its maps the same).
impl Peers for PeerTable {
    fn is_peer(&self, addr: [u8; 4]) -> bool {
        self.is_peer(Ipv4Addr::from(addr))
    }

    fn owner(&self, inner: [u8; 4]) -> Option<[u8; 4]> {
        self.lookup(Ipv4Addr::from(inner))
            .map(|r| r.public_ip.octets())
    }
}

/// The table shared between the datapath thread (writer) and the workers (readers).
#[derive(Debug, Default)]
pub struct SharedPeers {
    current: RwLock<Arc<PeerTable>>,
    generation: AtomicU64,
}

impl SharedPeers {
    /// Publishes a new snapshot.
    pub fn publish(&self, table: PeerTable) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A reader that refreshes its snapshot cheaply.
    pub fn reader(self: &Arc<Self>) -> PeerReader {
        let generation = self.generation.load(Ordering::Acquire);
        PeerReader {
            table: self.snapshot(),
            generation,
            shared: self.clone(),
        }
    }

    fn snapshot(&self) -> Arc<PeerTable> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A worker's view of the peers.
#[derive(Debug, Clone)]
pub struct PeerReader {
    table: Arc<PeerTable>,
    generation: u64,
    shared: Arc<SharedPeers>,
}

impl PeerReader {
    /// The current table, refreshed if a new one was published (one atomic load otherwise).
    pub fn current(&mut self) -> &PeerTable {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.table = self.shared.snapshot();
            self.generation = generation;
        }
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(subnet: &str, last: u8) -> (Subnet, PeerRoute) {
        let subnet: Subnet = subnet.parse().unwrap();
        (
            subnet,
            PeerRoute {
                subnet,
                public_ip: Ipv4Addr::new(198, 18, 0, last),
                vtep_mac: Default::default(),
                kernel_decap: false,
            },
        )
    }

    #[test]
    fn longest_prefix_wins_and_sender_checks_match_the_ebpf_decap() {
        let routes: BTreeMap<_, _> = [
            route("10.5.0.0/16", 9),
            route("10.5.2.0/24", 2),
            route("10.5.3.0/24", 3),
        ]
        .into_iter()
        .collect();
        let t = PeerTable::new(&routes);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.lookup(Ipv4Addr::new(10, 5, 2, 7)),
            Some(&route("10.5.2.0/24", 2).1)
        );
        assert_eq!(
            t.lookup(Ipv4Addr::new(10, 5, 7, 7)),
            Some(&route("10.5.0.0/16", 9).1)
        );
        assert_eq!(t.lookup(Ipv4Addr::new(10, 6, 0, 1)), None);
        assert!(t.is_peer(Ipv4Addr::new(198, 18, 0, 3)));
        assert!(!t.is_peer(Ipv4Addr::new(198, 18, 0, 4)));
        assert_eq!(t.owner([10, 5, 3, 1]), Some([198, 18, 0, 3]));
        // A peer sending with another peer's container address is spoofing.
        assert_ne!(t.owner([10, 5, 2, 1]), Some([198, 18, 0, 3]));
    }

    #[test]
    fn readers_see_published_tables() {
        let shared = Arc::new(SharedPeers::default());
        let mut reader = shared.reader();
        assert!(reader.current().is_empty());
        let routes: BTreeMap<_, _> = [route("10.5.2.0/24", 2)].into_iter().collect();
        shared.publish(PeerTable::new(&routes));
        assert_eq!(reader.current().len(), 1);
    }
}
