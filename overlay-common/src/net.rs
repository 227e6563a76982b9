//! Addresses of the overlay: IPv4 subnets and Ethernet MACs, the same type on every side (the
//! control plane's leases, the eBPF programs' config, the TUN forwarder's peer table, the tests).

use core::{fmt, net::Ipv4Addr, str::FromStr};

/// The netmask of a prefix length, as a host-order integer; prefixes above 32 mask everything.
#[inline(always)]
pub const fn mask(prefix: u8) -> u32 {
    // A shift by 32 is undefined for u32, and /0 is a legal (if useless) network.
    if prefix == 0 {
        0
    } else if prefix >= 32 {
        u32::MAX
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

/// True when `addr` lies in `network`/`prefix`; all three as they sit in a packet.
#[inline(always)]
pub fn in_subnet(addr: [u8; 4], network: [u8; 4], prefix: u8) -> bool {
    let m = mask(prefix);
    u32::from_be_bytes(addr) & m == u32::from_be_bytes(network) & m
}

/// Why a subnet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubnetError {
    /// No `/len` (or `-len` in key form).
    NoPrefixLength,
    /// The address part is not dotted-quad IPv4.
    BadAddress,
    /// The length part is not a decimal number.
    BadPrefixLength,
    /// The length is above 32.
    PrefixTooLong,
    /// Key form only: the address has host bits set.
    HostBitsSet,
}

impl fmt::Display for SubnetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SubnetError::NoPrefixLength => "no prefix length",
            SubnetError::BadAddress => "bad IPv4 address",
            SubnetError::BadPrefixLength => "bad prefix length",
            SubnetError::PrefixTooLong => "prefix length above 32",
            SubnetError::HostBitsSet => "host bits set",
        })
    }
}

impl core::error::Error for SubnetError {}

/// An IPv4 network: an address with all host bits cleared and a prefix length of 0..=32.
///
/// Host bits are always cleared on construction, so two values that cover the same addresses are
/// equal, which is what the lease table and the peer set rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: u32,
    prefix: u8,
}

impl Subnet {
    /// The network of `addr`/`prefix`; host bits of `addr` are dropped. `None` if `prefix > 32`.
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Option<Self> {
        if prefix > 32 {
            return None;
        }
        Some(Self {
            addr: addr.to_bits() & mask(prefix),
            prefix,
        })
    }

    /// The network address (all host bits zero).
    pub const fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr)
    }

    /// The prefix length.
    pub const fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask, as a host-order integer.
    pub const fn mask(&self) -> u32 {
        mask(self.prefix)
    }

    /// How many addresses the subnet covers.
    pub const fn size(&self) -> u64 {
        1u64 << (32 - self.prefix as u32)
    }

    /// The first address after the network address: what flannel writes as `FLANNEL_SUBNET` and
    /// what docker's `--bip` takes as the bridge address.
    pub const fn first_host(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr.wrapping_add(1))
    }

    /// The last address of the subnet.
    pub const fn last_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from_bits(self.addr | !mask(self.prefix))
    }

    /// True when `ip` lies in the subnet.
    pub const fn contains_ip(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & mask(self.prefix) == self.addr
    }

    /// True when `other` lies wholly inside this subnet.
    pub const fn contains(&self, other: &Subnet) -> bool {
        other.prefix >= self.prefix && self.contains_ip(other.addr())
    }

    /// True when the two subnets share at least one address.
    pub const fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// The number of subnets of length `len` this network holds (0 if `len` is shorter than the
    /// network's prefix or longer than 32).
    pub const fn count_subnets(&self, len: u8) -> u64 {
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
    pub const fn span_to(&self, last: &Subnet) -> u64 {
        if last.addr < self.addr {
            return 0;
        }
        let step = 1u64 << (32 - self.prefix as u32);
        (last.addr as u64 - self.addr as u64) / step + 1
    }

    /// The key form flannel uses under `<prefix>/subnets/`: `10.5.34.0-24`.
    pub const fn key(&self) -> SubnetKey {
        SubnetKey(*self)
    }

    /// Parses the key form `10.5.34.0-24`. Host bits must be clear: a key is written by an agent
    /// from a network address, so anything else is not a flannel lease key.
    pub fn from_key(key: &str) -> Result<Subnet, SubnetError> {
        parse(key, '-', true)
    }
}

/// [`Subnet`] displayed in flannel's key form (`10.5.34.0-24`).
#[derive(Debug, Clone, Copy)]
pub struct SubnetKey(Subnet);

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0.addr(), self.0.prefix)
    }
}

fn parse(input: &str, sep: char, strict: bool) -> Result<Subnet, SubnetError> {
    let (ip, len) = input.split_once(sep).ok_or(SubnetError::NoPrefixLength)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| SubnetError::BadAddress)?;
    // u8::from_str accepts a leading '+', which no CIDR writer produces.
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubnetError::BadPrefixLength);
    }
    let len: u8 = len.parse().map_err(|_| SubnetError::BadPrefixLength)?;
    let subnet = Subnet::new(ip, len).ok_or(SubnetError::PrefixTooLong)?;
    if strict && subnet.addr().to_bits() != ip.to_bits() {
        return Err(SubnetError::HostBitsSet);
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

/// An Ethernet address, as it sits in a frame and in the maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mac(pub [u8; 6]);

/// A text that is not six colon-separated hex bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacError;

impl fmt::Display for MacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a MAC address (six hex bytes separated by ':')")
    }
}

impl core::error::Error for MacError {}

impl Mac {
    /// The VTEP MAC a host publishes for `public_ip`: locally administered, unicast, and derived
    /// from the address so it stays the same across restarts and datapaths (flanneld's is random
    /// per device; nothing in the protocol needs it to be).
    pub const fn vtep_for(public_ip: Ipv4Addr) -> Mac {
        let o = public_ip.octets();
        Mac([0x0e, 0xfa, o[0], o[1], o[2], o[3]])
    }
}

impl FromStr for Mac {
    type Err = MacError;

    /// flannel's `VtepMAC` form: `c6:d2:32:6f:8f:44`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or(MacError)?;
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MacError);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacError)?;
        }
        match parts.next() {
            None => Ok(Mac(mac)),
            Some(_) => Err(MacError),
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::string::ToString;

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
        assert_eq!(s.key().to_string(), "10.5.34.0-24");
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
            prop_assert_eq!(Subnet::from_key(&s.key().to_string()).unwrap(), s);
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

#[cfg(test)]
mod mac_tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn parses_and_prints_flannel_vtep_macs() {
        let m: Mac = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m, Mac([0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44]));
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        for bad in [
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "zz:d2:32:6f:8f:44",
            "c6:d2:32:6f:8f:",
            "c6:d2:32:6f:8f:+4",
            "c6:d2:32:6f:8f:044",
        ] {
            assert_eq!(bad.parse::<Mac>(), Err(MacError), "{bad}");
        }
        assert_eq!(
            Mac::vtep_for(core::net::Ipv4Addr::new(198, 18, 0, 1)).to_string(),
            "0e:fa:c6:12:00:01"
        );
    }
}
