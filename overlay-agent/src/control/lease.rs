//! Subnet leases in etcd, written exactly as flannel writes them: key
//! `<prefix>/subnets/<ip>-<len>`, JSON value, attached to an etcd lease.
//!
//! Every write is a transaction conditioned on what was read, so two agents never both believe
//! they hold a subnet: creation requires the key to be absent, and taking over or renewing an
//! existing key requires it to be unchanged since it was seen holding our PublicIP. Unlike
//! flanneld, renewal therefore never overwrites someone else's lease.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use overlay_common::net::Mac;

use super::{
    config::NetworkConfig,
    etcd::{EtcdError, req},
    subnet::Subnet,
};

/// How many times creation may lose a race before acquisition gives up. Each lost race means
/// another agent got a subnet, so this bounds the wait, not the outcome, in any realistic
/// cluster.
const MAX_ATTEMPTS: u32 = 1000;

/// Errors of acquiring and keeping a lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// etcd failed; the caller retries after reconnecting.
    #[error(transparent)]
    Etcd {
        /// The failure.
        #[from]
        source: EtcdError,
    },
    /// Every subnet in [SubnetMin, SubnetMax] is leased or reserved.
    #[error(
        "no free subnet: all {count} subnets of /{len} in {min}..{max} of network {network} are \
         taken; free a lease or widen SubnetMin/SubnetMax"
    )]
    Exhausted {
        /// The Network.
        network: Subnet,
        /// SubnetLen.
        len: u8,
        /// SubnetMin's address.
        min: Ipv4Addr,
        /// SubnetMax's address.
        max: Ipv4Addr,
        /// How many subnets the range holds.
        count: u64,
    },
    /// Creation kept losing races for longer than any healthy cluster needs.
    #[error("gave up acquiring a subnet after {attempts} lost races")]
    TooManyRaces {
        /// How many attempts were made.
        attempts: u32,
    },
    /// Our subnet is now held by another host, so keeping it would route its containers to us.
    #[error("subnet {subnet} is now held by {holder} (key {key}); it cannot be kept")]
    Taken {
        /// The subnet we held.
        subnet: Subnet,
        /// The key.
        key: String,
        /// Who holds it.
        holder: Holder,
    },
}

/// A lease's value, as flannel encodes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseAttrs {
    /// The address other hosts send encapsulated traffic to.
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    /// Dual stack; always null here (IPv6 is not supported yet). Kept so the value has
    /// flannel's shape.
    #[serde(rename = "PublicIPv6", default)]
    pub public_ipv6: Option<String>,
    /// `udp`, `vxlan`, `alloc`, ... Not written for udp, as flanneld's udp backend writes none
    /// (and every reader, flanneld's and ours, takes a missing one for udp); empty when absent.
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "is_implicit_udp"
    )]
    pub backend_type: String,
    /// Backend specifics, e.g. vxlan's `{"VNI":1,"VtepMAC":"..."}`; none for udp and alloc,
    /// and then not written (flanneld's field is `omitempty`).
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
}

/// Whether `BackendType` says udp in the way flanneld's udp leases do: by being absent.
fn is_implicit_udp(backend_type: &String) -> bool {
    backend_type.is_empty() || backend_type == "udp"
}

impl LeaseAttrs {
    /// The JSON flannel writes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data always serializes")
    }

    /// Parses a lease value. Reservations written by hand may carry only `PublicIP`.
    pub fn from_json(value: &[u8]) -> Option<Self> {
        Self::read(value).ok()
    }

    /// Parses a lease value, saying what is wrong with one that does not parse. Unknown fields
    /// are ignored, as flanneld's Go decoder ignores them.
    pub fn read(value: &[u8]) -> Result<Self, BadValue> {
        if value.len() > MAX_LEASE_VALUE {
            return Err(BadValue::TooLarge { len: value.len() });
        }
        serde_json::from_slice(value).map_err(|e| BadValue::Invalid {
            reason: e.to_string(),
        })
    }
}

/// Largest lease value read. flanneld's are about 200 bytes; a bigger one is not a lease, and
/// parsing megabytes of it for every watch event would cost every host.
pub const MAX_LEASE_VALUE: usize = 64 * 1024;

/// Why a lease value is not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadValue {
    /// Larger than [`MAX_LEASE_VALUE`].
    #[error("a value of {len} bytes (at most {MAX_LEASE_VALUE} are read)")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not flannel's lease JSON.
    #[error("not a lease: {reason}")]
    Invalid {
        /// The JSON decoder's message.
        reason: String,
    },
}

/// The key of `subnet` under `prefix`.
pub fn subnet_key(prefix: &str, subnet: &Subnet) -> String {
    format!("{}/subnets/{}", prefix.trim_end_matches('/'), subnet.key())
}

/// The prefix all lease keys share.
pub fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

/// Parses the subnet from a full lease key. A dual-stack key (`10.5.52.0-24&fc00::-64`) yields
/// its IPv4 part, so the subnet counts as taken.
pub fn subnet_of_key(prefix: &str, key: &str) -> Option<Subnet> {
    let name = key.strip_prefix(&subnets_prefix(prefix))?;
    let v4 = name.split_once('&').map_or(name, |(v4, _)| v4);
    Subnet::from_key(v4).ok()
}

/// A lease this agent holds.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldLease {
    /// The subnet.
    pub subnet: Subnet,
    /// Its key.
    pub key: String,
    /// The etcd lease the key is attached to; 0 for a reservation (no TTL).
    pub etcd_lease: i64,
    /// When the agent should renew it (far future for a reservation).
    pub renew_at: Instant,
    /// When etcd drops it unless renewed (far future for a reservation).
    pub expires_at: Instant,
    /// The claim that returned it wrote the key anew: no lease of this host's was there.
    pub created: bool,
}

impl HeldLease {
    /// True for a reservation: a key without TTL, kept forever.
    pub fn is_reservation(&self) -> bool {
        self.etcd_lease == 0
    }
}

/// What acquisition and renewal need to know.
#[derive(Debug, Clone)]
pub struct LeaseParams {
    /// `--etcd-prefix`.
    pub prefix: String,
    /// The network config.
    pub config: NetworkConfig,
    /// Our lease value.
    pub attrs: LeaseAttrs,
    /// `--subnet-lease-ttl`.
    pub ttl: Duration,
    /// `--subnet-lease-renew-margin`.
    pub renew_margin: Duration,
}

impl LeaseParams {
    /// When to renew a lease granted now: `renew_margin` before it ends, as flannel does, or a
    /// third of the way through when the TTL is shorter than the margin (short test TTLs). A
    /// third leaves a sixth of the TTL for moving to another member before less than half of
    /// it remains.
    pub fn renew_interval(&self) -> Duration {
        if self.ttl > self.renew_margin {
            self.ttl - self.renew_margin
        } else {
            self.ttl / 3
        }
    }

    /// Pause before retrying a failed renewal: a minute as flannel, less for short TTLs so a
    /// short lease is not lost to one failure.
    pub fn retry_interval(&self) -> Duration {
        (self.ttl / 6).clamp(Duration::from_millis(500), Duration::from_secs(60))
    }

    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX)
    }
}

/// Who holds a subnet we wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A host, by its lease's PublicIP.
    Host(Ipv4Addr),
    /// A value that is not a lease (written by hand?), as found.
    Unreadable(String),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Host(ip) => write!(f, "{ip}"),
            Holder::Unreadable(value) => write!(f, "an unreadable value {value:?}"),
        }
    }
}

/// The outcome of trying to hold one particular subnet.
#[derive(Debug)]
pub enum Claim {
    /// We hold it now.
    Held(HeldLease),
    /// Another holds it.
    TakenBy(Holder),
}

/// Makes `subnet` ours if it is free or already ours, in one transaction conditioned on what was
/// read: absent (create revision 0), or holding our PublicIP and unchanged since read (same mod
/// revision). This is acquisition, renewal and re-acquisition after a loss alike.
///
/// A reservation (key without lease) stays without lease; its value is refreshed so peers see
/// our backend data.
pub async fn claim(
    client: &mut Client,
    params: &LeaseParams,
    subnet: Subnet,
) -> Result<Claim, LeaseError> {
    let key = subnet_key(&params.prefix, &subnet);
    let value = params.attrs.to_json();
    for _ in 0..10 {
        let resp = client
            .get(key.as_str(), None)
            .await
            .map_err(req("reading a lease"))?;
        let created = resp.kvs().is_empty();
        let (cmp, old_lease, reservation) = match resp.kvs().first() {
            None => (
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                0,
                false,
            ),
            Some(kv) => {
                match LeaseAttrs::from_json(kv.value()) {
                    Some(a) if a.public_ip == params.attrs.public_ip => {}
                    Some(a) => return Ok(Claim::TakenBy(Holder::Host(a.public_ip))),
                    None => {
                        return Ok(Claim::TakenBy(Holder::Unreadable(
                            String::from_utf8_lossy(kv.value()).into_owned(),
                        )));
                    }
                }
                (
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
                    kv.lease(),
                    kv.lease() == 0,
                )
            }
        };
        // Taken before the grant, so our idea of the expiry is never later than etcd's.
        let granted_at = Instant::now();
        // etcd may grant another TTL than asked (it raises ones below its minimum); the
        // expiry is etcd's, not our wish.
        let (new_lease, granted_ttl) = if reservation {
            (0, params.ttl)
        } else {
            let grant = client
                .lease_grant(params.ttl_secs(), None)
                .await
                .map_err(req("granting a lease"))?;
            let ttl = u64::try_from(grant.ttl()).map_or(params.ttl, Duration::from_secs);
            (grant.id(), ttl)
        };
        let put = if reservation {
            TxnOp::put(key.as_str(), value.as_str(), None)
        } else {
            TxnOp::put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(new_lease)),
            )
        };
        let txn = Txn::new().when([cmp]).and_then([put]);
        let committed = match client.txn(txn).await {
            Ok(r) => r.succeeded(),
            Err(e) => {
                // The transaction may have committed with only the answer lost: revoking the new
                // lease would then delete the key we just wrote. Unused, it expires on its own.
                return Err(req("writing a lease")(e).into());
            }
        };
        if !committed {
            // Someone wrote the key between our read and our write: read again.
            revoke(client, new_lease).await;
            continue;
        }
        // The old etcd lease no longer holds the key; ending it now keeps etcd's lease table
        // from accumulating one dead lease per renewal until each expires.
        if old_lease != 0 && old_lease != new_lease {
            revoke(client, old_lease).await;
        }
        // A year stands for "never": timers far beyond that gain nothing.
        let never = granted_at + Duration::from_secs(365 * 24 * 3600);
        let (renew_at, expires_at) = if reservation {
            (never, never)
        } else {
            (
                granted_at + params.renew_interval().min(granted_ttl / 3 * 2),
                granted_at + granted_ttl,
            )
        };
        return Ok(Claim::Held(HeldLease {
            subnet,
            key,
            etcd_lease: new_lease,
            renew_at,
            expires_at,
            created,
        }));
    }
    Err(LeaseError::TooManyRaces { attempts: 10 })
}

/// Whether etcd still has the etcd lease `id`. Asked when a peer's key goes: with its lease
/// still there the key was deleted, with the lease gone it expired (or was revoked with it).
pub async fn etcd_lease_alive(client: &mut Client, id: i64) -> Result<bool, EtcdError> {
    match client.lease_time_to_live(id, None).await {
        // etcd answers a lease it does not know with TTL -1.
        Ok(resp) => Ok(resp.ttl() > 0),
        Err(etcd_client::Error::GRpcStatus(status)) if status.message().contains("not found") => {
            Ok(false)
        }
        Err(e) => Err(req("looking up a peer's etcd lease")(e)),
    }
}

async fn revoke(client: &mut Client, lease: i64) {
    if lease != 0
        && let Err(e) = client.lease_revoke(lease).await
    {
        // Harmless: an unrevoked lease expires with its TTL.
        tracing::debug!("revoking etcd lease {lease:x}: {e}");
    }
}

/// One entry of the lease table.
#[derive(Debug, Clone)]
pub struct LeaseEntry {
    /// The subnet.
    pub subnet: Subnet,
    /// The value, or why it is not read.
    pub attrs: Result<LeaseAttrs, BadValue>,
    /// The etcd lease (0: reservation).
    pub etcd_lease: i64,
    /// The revision that created the key: of two overlapping leases, the older stands.
    pub created: i64,
}

/// Reads all leases under `<prefix>/subnets/`, with the revision of the read.
pub async fn list(client: &mut Client, prefix: &str) -> Result<(Vec<LeaseEntry>, i64), EtcdError> {
    let resp = client
        .get(
            subnets_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(req("listing leases"))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let entries = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = kv.key_str().ok()?;
            Some(LeaseEntry {
                subnet: subnet_of_key(prefix, key)?,
                attrs: LeaseAttrs::read(kv.value()),
                etcd_lease: kv.lease(),
                created: kv.create_revision(),
            })
        })
        .collect();
    Ok((entries, revision))
}

/// Acquires a subnet in flannel's order: (1) a lease or reservation already holding our
/// PublicIP that fits the config, (2) `previous` (from the old subnet file) if free, (3) a random
/// free subnet in [SubnetMin, SubnetMax].
pub async fn acquire(
    client: &mut Client,
    params: &LeaseParams,
    previous: Option<Subnet>,
) -> Result<HeldLease, LeaseError> {
    let cfg = &params.config;
    let mut rng = Rng::seeded();
    for attempt in 0..MAX_ATTEMPTS {
        let (entries, _) = list(client, &params.prefix).await?;

        // (1) Ours already; a reservation first, since it is what the operator asked for.
        let mine = ours(&entries, params.attrs.public_ip, cfg);
        let taken = Taken::new(&entries);
        let mut candidates: Vec<Subnet> = mine.iter().map(|e| e.subnet).collect();
        // (2) The subnet of the previous run, so docker's --bip stays valid across an expiry.
        if let Some(prev) = previous
            && cfg.fits(&prev)
            && !taken.overlaps(&prev)
        {
            candidates.push(prev);
        }
        // (3) A random free one; random so agents starting together rarely pick the same.
        let random = taken.pick_free(cfg, &mut rng);
        if candidates.is_empty() && random.is_none() {
            return Err(LeaseError::Exhausted {
                network: cfg.network,
                len: cfg.subnet_len,
                min: cfg.subnet_min.addr(),
                max: cfg.subnet_max.addr(),
                count: cfg.subnet_count(),
            });
        }
        candidates.extend(random);
        for subnet in candidates {
            match claim(client, params, subnet).await? {
                Claim::Held(held) => return Ok(held),
                Claim::TakenBy(holder) => {
                    tracing::debug!("subnet {subnet} was taken by {holder} first; trying again");
                }
            }
        }
        // Lost a race: back off a little so the winners' writes land before we list again.
        let jitter = Duration::from_millis(rng.below(20 + u64::from(attempt.min(10)) * 10));
        tokio::time::sleep(jitter).await;
    }
    Err(LeaseError::TooManyRaces {
        attempts: MAX_ATTEMPTS,
    })
}

/// The leases and reservations holding `public_ip` that fit `cfg`, in the order acquisition tries
/// them: reservations first, since they are what the operator asked for.
fn ours<'a>(
    entries: &'a [LeaseEntry],
    public_ip: Ipv4Addr,
    cfg: &NetworkConfig,
) -> Vec<&'a LeaseEntry> {
    let mut mine: Vec<&LeaseEntry> = entries
        .iter()
        .filter(|e| e.attrs.as_ref().is_ok_and(|a| a.public_ip == public_ip) && cfg.fits(&e.subnet))
        .collect();
    mine.sort_by_key(|e| (e.etcd_lease != 0, e.subnet));
    mine
}

/// The VtepMAC that the lease [`acquire`] will take first already publishes, when it is a vxlan
/// lease of the same VNI: flanneld's (its flannel.<VNI> device's random MAC) on a host taken over
/// from it. Keeping it means the takeover changes nothing peers read.
pub async fn published_vtep_mac(
    client: &mut Client,
    prefix: &str,
    public_ip: Ipv4Addr,
    cfg: &NetworkConfig,
    vni: u32,
) -> Result<Option<Mac>, EtcdError> {
    let (entries, _) = list(client, prefix).await?;
    Ok(ours(&entries, public_ip, cfg)
        .first()
        .and_then(|e| e.attrs.as_ref().ok())
        .filter(|a| a.backend_type == "vxlan")
        .and_then(|a| a.backend_data.as_ref())
        .filter(|d| d.get("VNI").and_then(serde_json::Value::as_u64) == Some(u64::from(vni)))
        .and_then(|d| d.get("VtepMAC")?.as_str()?.parse().ok()))
}

/// The subnets in use, indexed for fast "is it free" checks.
struct Taken {
    /// Network addresses of keys, whatever their length.
    exact: HashSet<(u32, u8)>,
    /// Every key, for overlap checks with odd-sized keys.
    all: Vec<Subnet>,
}

impl Taken {
    fn new(entries: &[LeaseEntry]) -> Self {
        Self {
            exact: entries
                .iter()
                .map(|e| (u32::from(e.subnet.addr()), e.subnet.prefix()))
                .collect(),
            all: entries.iter().map(|e| e.subnet).collect(),
        }
    }

    fn overlaps(&self, s: &Subnet) -> bool {
        if self.exact.contains(&(u32::from(s.addr()), s.prefix())) {
            return true;
        }
        // Keys of another length appear only after SubnetLen changed; rare, so a scan is fine.
        self.all
            .iter()
            .any(|t| t.prefix() != s.prefix() && t.overlaps(s))
    }

    /// A uniformly random free subnet in [SubnetMin, SubnetMax], or `None` when all are taken.
    fn pick_free(&self, cfg: &NetworkConfig, rng: &mut Rng) -> Option<Subnet> {
        let count = cfg.subnet_count();
        let nth = |i| cfg.subnet_min.nth_from(cfg.subnet_len, i);
        // Random probes find a free subnet at once in a sparse network; the scan below settles
        // a crowded one exactly.
        for _ in 0..64 {
            let s = nth(rng.below(count))?;
            if !self.overlaps(&s) {
                return Some(s);
            }
        }
        let free: Vec<Subnet> = (0..count)
            .filter_map(nth)
            .filter(|s| !self.overlaps(s))
            .collect();
        if free.is_empty() {
            None
        } else {
            Some(free[usize::try_from(rng.below(free.len() as u64)).ok()?])
        }
    }
}

/// A small xorshift generator: subnet choice needs spread, not cryptographic strength, and a
/// dependency for it is not worth it.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS per process; mixing in pid and time keeps agents
        // started in the same instant apart.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        Self(h.finish() | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in 0..n (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_has_flannels_shape() {
        let a = LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 64, 3),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"})),
        };
        assert_eq!(
            a.to_json(),
            r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
        assert_eq!(LeaseAttrs::from_json(a.to_json().as_bytes()), Some(a));
        let r = LeaseAttrs::from_json(br#"{"PublicIP":"10.0.0.7"}"#).unwrap();
        assert_eq!(r.public_ip, Ipv4Addr::new(10, 0, 0, 7));
        assert!(LeaseAttrs::from_json(b"{}").is_none());
    }

    #[test]
    fn udp_value_is_flanneld_udp_value_byte_for_byte() {
        let udp = LeaseAttrs {
            public_ip: Ipv4Addr::new(192, 168, 100, 4),
            public_ipv6: None,
            backend_type: "udp".into(),
            backend_data: None,
        };
        assert_eq!(
            udp.to_json(),
            r#"{"PublicIP":"192.168.100.4","PublicIPv6":null}"#
        );
        // Read back, a missing BackendType is empty, which every reader takes for udp.
        let back = LeaseAttrs::from_json(udp.to_json().as_bytes()).unwrap();
        assert_eq!(back.backend_type, "");
        assert_eq!(back.to_json(), udp.to_json());
        let alloc = LeaseAttrs {
            backend_type: "alloc".into(),
            ..udp
        };
        assert_eq!(
            alloc.to_json(),
            r#"{"PublicIP":"192.168.100.4","PublicIPv6":null,"BackendType":"alloc"}"#
        );
    }

    #[test]
    fn keys() {
        let s: Subnet = "10.5.34.0/24".parse().unwrap();
        assert_eq!(
            subnet_key("/coreos.com/network", &s),
            "/coreos.com/network/subnets/10.5.34.0-24"
        );
        assert_eq!(subnet_key("/flannel/", &s), "/flannel/subnets/10.5.34.0-24");
        assert_eq!(
            subnet_of_key("/flannel", "/flannel/subnets/10.5.34.0-24"),
            Some(s)
        );
        assert_eq!(
            subnet_of_key("/flannel", "/flannel/subnets/10.5.34.0-24&fc00::-64"),
            Some(s)
        );
        assert_eq!(subnet_of_key("/flannel", "/flannel/config"), None);
        assert_eq!(
            subnet_of_key("/flannel", "/other/subnets/10.5.34.0-24"),
            None
        );
    }

    fn params(ttl: u64, margin_min: u64) -> LeaseParams {
        LeaseParams {
            prefix: "/p".into(),
            config: NetworkConfig::parse(br#"{"Network":"10.0.0.0/16"}"#).unwrap(),
            attrs: LeaseAttrs {
                public_ip: Ipv4Addr::LOCALHOST,
                public_ipv6: None,
                backend_type: "udp".into(),
                backend_data: None,
            },
            ttl: Duration::from_secs(ttl),
            renew_margin: Duration::from_secs(margin_min * 60),
        }
    }

    #[test]
    fn renewal_timing() {
        assert_eq!(
            params(24 * 3600, 60).renew_interval(),
            Duration::from_secs(23 * 3600)
        );
        assert_eq!(params(30, 60).renew_interval(), Duration::from_secs(10));
        assert_eq!(
            params(24 * 3600, 60).retry_interval(),
            Duration::from_secs(60)
        );
        assert_eq!(params(3, 1).retry_interval(), Duration::from_millis(500));
    }

    fn entry(s: &str) -> LeaseEntry {
        LeaseEntry {
            subnet: s.parse().unwrap(),
            attrs: Err(BadValue::TooLarge { len: 0 }),
            etcd_lease: 0,
            created: 0,
        }
    }

    #[test]
    fn pick_free_finds_the_last_hole_and_respects_odd_keys() {
        let cfg = NetworkConfig::parse(
            br#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.0","SubnetMax":"10.0.8.0"}"#,
        )
        .unwrap();
        let mut entries: Vec<LeaseEntry> = (1..=8)
            .filter(|i| *i != 5)
            .map(|i| entry(&format!("10.0.{i}.0/24")))
            .collect();
        let mut rng = Rng::seeded();
        for _ in 0..20 {
            assert_eq!(
                Taken::new(&entries).pick_free(&cfg, &mut rng),
                Some("10.0.5.0/24".parse().unwrap())
            );
        }
        entries.push(entry("10.0.5.128/25"));
        assert_eq!(Taken::new(&entries).pick_free(&cfg, &mut rng), None);
    }
}
