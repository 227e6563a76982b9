//! IPv4 subnet arithmetic: parsing, formatting in flannel's key form, and iteration over the
//! subnets of a network.

use std::{fmt, net::Ipv4Addr, str::FromStr};

/// Errors of parsing a subnet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    /// The text is not `a.b.c.d/len` (or `a.b.c.d-len` in key form).
    #[error("{input:?} is not an IPv4 subnet: {reason}")]
    Parse {
        /// The text given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// An IPv4 network: an address with all host bits cleared and a prefix length of 0..=32.
///
/// Host bits are always cleared on construction, so two values that cover the same addresses are
/// equal, which is what the lease table and the peer set rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: u32,
    prefix: u8,
}

/// The netmask of a prefix length, as a host-order integer.
fn mask(prefix: u8) -> u32 {
    // A shift by 32 is undefined for u32, and /0 is a legal (if useless) network.
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl Subnet {
    /// The network of `addr`/`prefix`; host bits of `addr` are dropped. `None` if `prefix > 32`.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        (prefix <= 32).then(|| Self {
            addr: u32::from(addr) & mask(prefix),
            prefix,
        })
    }

    /// The network address (all host bits zero).
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr)
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// How many addresses the subnet covers.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The first address after the network address: what flannel writes as `FLANNEL_SUBNET` and
    /// what docker's `--bip` takes as the bridge address.
    pub fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr.wrapping_add(1))
    }

    /// The last address of the subnet.
    pub fn last_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr | !mask(self.prefix))
    }

    /// True when `ip` lies in the subnet.
    pub fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.addr
    }

    /// True when `other` lies wholly inside this subnet.
    pub fn contains(&self, other: &Subnet) -> bool {
        other.prefix >= self.prefix && self.contains_ip(other.addr())
    }

    /// True when the two subnets share at least one address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The number of subnets of length `len` this network holds (0 if `len` is shorter than the
    /// network's prefix or longer than 32).
    pub fn count_subnets(&self, len: u8) -> u64 {
        if len < self.prefix || len > 32 {
            0
        } else {
            1u64 << (len - self.prefix)
        }
    }

    /// The `index`-th subnet of length `len` counted from `self`'s own address, which need not be
    /// the start of a larger network. `None` past the end of the IPv4 space.
    pub fn nth_from(&self, len: u8, index: u64) -> Option<Subnet> {
        if len > 32 {
            return None;
        }
        let step = 1u64 << (32 - u32::from(len));
        let start = u64::from(self.addr & mask(len));
        let addr = start.checked_add(index.checked_mul(step)?)?;
        let addr = u32::try_from(addr).ok()?;
        Subnet::new(Ipv4Addr::from(addr), len)
    }

    /// How many subnets of this one's length lie from `self` to `last`, both included (0 if
    /// `last` comes before `self`).
    pub fn span_to(&self, last: &Subnet) -> u64 {
        if last.addr < self.addr {
            return 0;
        }
        let step = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(last.addr) - u64::from(self.addr)) / step + 1
    }

    /// The key form flannel uses under `<prefix>/subnets/`: `10.5.34.0-24`.
    pub fn to_key(&self) -> String {
        format!("{}-{}", self.addr(), self.prefix)
    }

    /// Parses the key form `10.5.34.0-24`. Host bits must be clear: a key is written by an agent
    /// from a network address, so anything else is not a flannel lease key.
    pub fn from_key(key: &str) -> Result<Subnet, SubnetError> {
        parse(key, '-', true)
    }
}

fn parse(input: &str, sep: char, strict: bool) -> Result<Subnet, SubnetError> {
    let err = |reason| SubnetError::Parse {
        input: input.to_owned(),
        reason,
    };
    let (ip, len) = input
        .split_once(sep)
        .ok_or_else(|| err("no prefix length"))?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| err("bad IPv4 address"))?;
    // u8::from_str accepts a leading '+', which no CIDR writer produces.
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("bad prefix length"));
    }
    let len: u8 = len.parse().map_err(|_| err("bad prefix length"))?;
    let subnet = Subnet::new(ip, len).ok_or_else(|| err("prefix length above 32"))?;
    if strict && subnet.addr() != ip {
        return Err(err("host bits set"));
    }
    Ok(subnet)
}

/// Parses `a.b.c.d/len`. Host bits are dropped, as Go's `net.ParseCIDR` (and so flannel) does.
impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s, '/', false)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_masks() {
        assert_eq!(net("10.5.1.7/16").to_string(), "10.5.0.0/16");
        assert_eq!(net("0.0.0.0/0").size(), 1 << 32);
        assert!("10.0.0.0/33".parse::<Subnet>().is_err());
        assert!("10.0.0.0".parse::<Subnet>().is_err());
        assert!("10.0.0.0/+8".parse::<Subnet>().is_err());
        assert!("10.0.0/8".parse::<Subnet>().is_err());
    }

    #[test]
    fn key_form() {
        let s = Subnet::from_key("10.5.34.0-24").unwrap();
        assert_eq!(s, net("10.5.34.0/24"));
        assert_eq!(s.to_key(), "10.5.34.0-24");
        assert!(Subnet::from_key("10.5.34.1-24").is_err());
        assert!(Subnet::from_key("10.5.34.0/24").is_err());
        assert!(Subnet::from_key("10.5.52.0-24&fc00::-64").is_err());
    }

    #[test]
    fn first_host_is_flannel_subnet() {
        assert_eq!(
            net("172.16.21.0/24").first_host(),
            Ipv4Addr::new(172, 16, 21, 1)
        );
        assert_eq!(net("10.0.0.0/30").last_addr(), Ipv4Addr::new(10, 0, 0, 3));
    }

    #[test]
    fn nth_and_span() {
        let n = net("10.0.0.0/16");
        assert_eq!(n.count_subnets(24), 256);
        assert_eq!(n.nth_from(24, 255), Some(net("10.0.255.0/24")));
        let first = net("10.0.1.0/24");
        assert_eq!(first.span_to(&net("10.0.255.0/24")), 255);
        assert_eq!(net("255.255.255.0/24").nth_from(24, 1), None);
    }

    fn any_subnet() -> impl Strategy<Value = Subnet> {
        (any::<u32>(), 0u8..=32).prop_map(|(a, p)| Subnet::new(Ipv4Addr::from(a), p).unwrap())
    }

    proptest! {
        #[test]
        fn display_parse_roundtrip(s in any_subnet()) {
            prop_assert_eq!(s.to_string().parse::<Subnet>().unwrap(), s);
            prop_assert_eq!(Subnet::from_key(&s.to_key()).unwrap(), s);
        }

        #[test]
        fn overlap_is_symmetric_and_matches_addresses(a in any_subnet(), b in any_subnet()) {
            prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
            // Two CIDR blocks overlap exactly when one holds the other's first address.
            let by_addr = a.contains_ip(b.addr()) || b.contains_ip(a.addr());
            prop_assert_eq!(a.overlaps(&b), by_addr);
        }

        #[test]
        fn subnets_of_a_network_tile_it(n in any_subnet(), extra in 0u8..=8, pick in any::<u64>()) {
            let len = n.prefix().saturating_add(extra).min(32);
            let count = n.count_subnets(len);
            prop_assert_eq!(count * (1u64 << (32 - u32::from(len))), n.size());
            let i = pick % count;
            let s = n.nth_from(len, i).unwrap();
            prop_assert!(n.contains(&s));
            prop_assert_eq!(s.prefix(), len);
            prop_assert!(n.contains_ip(s.first_host()) || len == 32);
            let first = n.nth_from(len, 0).unwrap();
            prop_assert_eq!(first.span_to(&s), i + 1);
            if i + 1 < count {
                let next = n.nth_from(len, i + 1).unwrap();
                prop_assert!(!next.overlaps(&s));
                prop_assert_eq!(u64::from(u32::from(next.addr())) - u64::from(u32::from(s.addr())),
                    1u64 << (32 - u32::from(len)));
            }
        }
    }
}
