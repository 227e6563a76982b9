//! Fuzzes the peer set (`overlay_agent::control::peers::PeerSet`), where every other host's lease
//! is judged before it reaches a datapath, with a random sequence of lease writes (well-formed
//! leases drawn from a small universe so that overlaps and conflicts are common, and raw bytes
//! through `LeaseAttrs::read`), deletions, expiries and ends of grace. After every step:
//! - the events returned, applied in order, give exactly the set `peers()` reports (a datapath
//!   that follows the events holds the accepted peers, no more, no less);
//! - every accepted peer satisfies the documented rules (docs/architecture.md, "A lease"): its
//!   subnet lies inside the Network and does not overlap this host's or another accepted peer's;
//!   its PublicIP is not this host's, unspecified, loopback, multicast or broadcast; a vxlan
//!   VtepMAC is a unicast, non-zero address; it is what the latest write of that subnet says;
//! - the set is maximal: a lease that breaks no rule on its own and overlaps neither this host's
//!   subnet nor an accepted peer is accepted (a lease refused for an overlap stands once the
//!   older one goes);
//! - a deleted lease is never a peer.
//!
//! Run: `cargo +nightly fuzz run peers` (`cargo xtask test` runs it for 15 s).
#![no_main]

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use overlay_agent::control::{
    lease::LeaseAttrs,
    peers::{Gone, LeaseChange, Peer, PeerBackend, PeerEvent, PeerRules, PeerSet},
    subnet::Subnet,
};
use serde_json::json;

const OWN_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const GRACE: Duration = Duration::from_secs(60);

fn network() -> Subnet {
    Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 16).unwrap()
}

fn own() -> Subnet {
    Subnet::new(Ipv4Addr::new(10, 0, 1, 0), 24).unwrap()
}

/// Reads the fuzzer's bytes as choices.
struct Choices<'a>(&'a [u8]);

impl Choices<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// A subnet near the Network: mostly inside it, on small prefixes so that they nest.
fn subnet(c: &mut Choices) -> Option<Subnet> {
    let a = c.byte()?;
    let b = c.byte()?;
    let prefix = 21 + b % 6;
    let addr = match a % 16 {
        0 => Ipv4Addr::new(10, 1, a, 0),
        1 => Ipv4Addr::new(9, 255, 255, 0),
        _ => Ipv4Addr::new(10, 0, a % 12, b & 0x80),
    };
    Subnet::new(addr, prefix)
}

fn public_ip(c: &mut Choices) -> Option<Ipv4Addr> {
    Some(match c.byte()? % 12 {
        0 => OWN_IP,
        1 => Ipv4Addr::UNSPECIFIED,
        2 => Ipv4Addr::LOCALHOST,
        3 => Ipv4Addr::new(224, 0, 0, 1),
        4 => Ipv4Addr::BROADCAST,
        n => Ipv4Addr::new(198, 18, 0, n),
    })
}

fn lease_value(c: &mut Choices) -> Option<Vec<u8>> {
    let kind = c.byte()?;
    if kind % 8 == 0 {
        let n = usize::from(c.byte()?);
        return Some(c.take(n).to_vec());
    }
    let ip = public_ip(c)?;
    let mac = match c.byte()? % 5 {
        0 => "00:00:00:00:00:00".to_owned(),
        1 => "01:00:5e:00:00:01".to_owned(),
        2 => "not a mac".to_owned(),
        n => format!("0e:fa:c6:12:00:{n:02x}"),
    };
    let value = match kind % 4 {
        0 => json!({"PublicIP": ip.to_string()}),
        1 => json!({"PublicIP": ip.to_string(), "BackendType": "udp"}),
        2 => json!({"PublicIP": ip.to_string(), "BackendType": "vxlan",
                    "BackendData": {"VNI": 1, "VtepMAC": mac}}),
        _ => json!({"PublicIP": ip.to_string(), "BackendType": "alloc"}),
    };
    Some(value.to_string().into_bytes())
}

/// The rules a lease is judged by on its own, as the architecture document states them.
fn breaks_no_rule(subnet: &Subnet, attrs: &LeaseAttrs) -> bool {
    let ip = attrs.public_ip;
    let mac_ok = match PeerBackend::from_lease(&attrs.backend_type, attrs.backend_data.as_ref()) {
        PeerBackend::Vxlan { vtep_mac } => vtep_mac.0[0] & 1 == 0 && vtep_mac.0 != [0; 6],
        _ => true,
    };
    network().contains(subnet)
        && ip != OWN_IP
        && !ip.is_unspecified()
        && !ip.is_loopback()
        && !ip.is_multicast()
        && !ip.is_broadcast()
        && mac_ok
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices(data);
    let mut set = PeerSet::new(PeerRules {
        network: network(),
        own_ip: OWN_IP,
        grace: GRACE,
    });
    // What a datapath following the events holds.
    let mut followed: HashMap<Subnet, Peer> = HashMap::new();
    let mut apply = |events: Vec<PeerEvent>, followed: &mut HashMap<Subnet, Peer>| {
        for e in events {
            match e {
                PeerEvent::Added(p) => {
                    followed.insert(p.subnet, p);
                }
                PeerEvent::Removed(s) => {
                    assert!(followed.remove(&s).is_some(), "removed {s}, never added");
                }
            }
        }
    };
    apply(set.set_own(own()), &mut followed);
    // The leases etcd holds (or held, expired, within the grace), as last written.
    let mut leases: BTreeMap<Subnet, (Option<LeaseAttrs>, i64)> = BTreeMap::new();
    let mut deleted: Vec<Subnet> = Vec::new();
    let mut revision = 0i64;
    let mut now = Instant::now();

    while let Some(op) = c.byte() {
        let Some(s) = subnet(&mut c) else { break };
        let events = match op % 8 {
            0..=3 => {
                let Some(value) = lease_value(&mut c) else { break };
                let attrs = LeaseAttrs::read(&value);
                deleted.retain(|d| *d != s);
                revision += 1;
                // A rewrite keeps the key's create revision, as etcd does.
                let created = leases.get(&s).map_or(revision, |l| l.1);
                if s != own() {
                    leases.insert(s, (attrs.clone().ok(), created));
                }
                let change = LeaseChange::Put {
                    subnet: s,
                    attrs,
                    etcd_lease: 7,
                    created,
                };
                set.apply(&change, Gone::Deleted)
            }
            4 | 5 => {
                leases.remove(&s);
                deleted.push(s);
                set.apply(&LeaseChange::Deleted { subnet: s }, Gone::Deleted)
            }
            6 => set.apply(&LeaseChange::Deleted { subnet: s }, Gone::Expired),
            _ => {
                // The grace ends for every expired lease: only live ones remain.
                now += GRACE * 2;
                let live: Vec<Subnet> = leases.keys().copied().collect();
                for s in live {
                    if set.etcd_lease_of(&s).is_none() {
                        leases.remove(&s);
                    }
                }
                set.end_grace(now)
            }
        };
        apply(events, &mut followed);

        let mut reported: Vec<&Peer> = set.peers().collect();
        reported.sort_by_key(|p| p.subnet);
        let mut held: Vec<&Peer> = followed.values().collect();
        held.sort_by_key(|p| p.subnet);
        assert_eq!(reported, held, "the events disagree with the set");

        for p in &reported {
            let (attrs, _) = leases.get(&p.subnet).expect("a peer without a lease");
            let attrs = attrs.as_ref().expect("a peer from an unreadable lease");
            assert!(breaks_no_rule(&p.subnet, attrs), "{p:?} from {attrs:?}");
            assert_eq!(p.public_ip, attrs.public_ip, "{p:?}");
            assert_eq!(
                p.backend,
                PeerBackend::from_lease(&attrs.backend_type, attrs.backend_data.as_ref())
            );
            assert!(!p.subnet.overlaps(&own()), "{p:?} overlaps our subnet");
            for q in &reported {
                assert!(
                    p.subnet == q.subnet || !p.subnet.overlaps(&q.subnet),
                    "{p:?} overlaps {q:?}"
                );
            }
        }
        for d in &deleted {
            assert!(!followed.contains_key(d), "deleted {d} is still a peer");
        }
        for (s, (attrs, _)) in &leases {
            let Some(attrs) = attrs else { continue };
            if breaks_no_rule(s, attrs)
                && !s.overlaps(&own())
                && !reported.iter().any(|p| p.subnet.overlaps(s))
            {
                panic!("{s} {attrs:?} breaks no rule and conflicts with nothing, not accepted");
            }
        }
    }
});
