//! Choosing the underlay interface as flanneld does: `--iface` (name or address, first found),
//! then `--iface-regex` (matched against names and addresses), then `--iface-can-reach` (the
//! interface of the kernel's route to that address, with the source address the kernel would
//! use), and only when none of them was given, the interface of the default route. Its MTU sizes
//! the overlay.

use std::{ffi::CStr, net::Ipv4Addr, path::Path};

/// Errors of choosing the underlay interface.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// Listing interfaces failed.
    #[error("listing network interfaces: {source}")]
    List {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An `--iface-regex` is not a valid regular expression.
    #[error("--iface-regex {pattern:?}: {source}")]
    BadRegex {
        /// The pattern.
        pattern: String,
        /// What the regex parser said.
        #[source]
        source: regex::Error,
    },
    /// The kernel's route lookup for `--iface-can-reach` failed.
    #[error("--iface-can-reach {target}: {source}")]
    CanReach {
        /// The address given.
        target: Ipv4Addr,
        /// Why.
        #[source]
        source: super::netlink::NetlinkError,
    },
    /// Nothing matched.
    #[error("no usable interface: {tried}")]
    NotFound {
        /// What was tried.
        tried: String,
    },
}

/// The interface inter-host traffic uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// Its name, e.g. `eth0`.
    pub name: String,
    /// Its IPv4 address (the first one, or the one `--iface` named).
    pub addr: Ipv4Addr,
    /// Its MTU.
    pub mtu: u32,
}

/// An interface's name and one of its IPv4 addresses.
type IfAddr = (String, Ipv4Addr);

/// Every (interface, IPv4 address) pair, in the kernel's order.
pub fn ipv4_addresses() -> Result<Vec<IfAddr>, IfaceError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(IfaceError::List {
            source: std::io::Error::last_os_error(),
        });
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null()
            // SAFETY: ifa_addr is non-null and points to a sockaddr.
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: sa_family is AF_INET, so the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
            out.push((
                name.to_string_lossy().into_owned(),
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            ));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The interface of the IPv4 default route, from `/proc/net/route`.
pub fn default_route_interface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; the lowest metric wins.
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[6].parse::<u32>().unwrap_or(u32::MAX), f[0].to_owned()))
        })
        .min()
        .map(|(_, name)| name)
}

/// The MTU of interface `name`.
pub fn mtu(name: &str) -> Option<u32> {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("mtu"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The name of interface `index`.
fn index_to_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires; it NUL-terminates on success.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The interface of the kernel's route to `target`, with the source address the route gives
/// (else the interface's first IPv4 address), as flanneld's `--iface-can-reach` does.
async fn can_reach(target: Ipv4Addr, addrs: &[IfAddr]) -> Result<Option<IfAddr>, IfaceError> {
    let lookup = async { super::netlink::Netlink::connect()?.route_get(target).await };
    let route = lookup
        .await
        .map_err(|source| IfaceError::CanReach { target, source })?;
    let Some(name) = index_to_name(route.oif) else {
        return Ok(None);
    };
    let addr = route
        .source
        .or_else(|| addrs.iter().find(|(n, _)| *n == name).map(|(_, a)| *a));
    Ok(addr.map(|a| (name, a)))
}

/// Chooses the underlay interface from `--iface`, `--iface-regex` and `--iface-can-reach`,
/// else the default route's.
pub async fn choose(
    ifaces: &[String],
    regexes: &[String],
    reach: Option<Ipv4Addr>,
) -> Result<Underlay, IfaceError> {
    let addrs = ipv4_addresses()?;
    let underlay = |(name, addr): &IfAddr| {
        mtu(name).map(|mtu| Underlay {
            name: name.clone(),
            addr: *addr,
            mtu,
        })
    };
    for want in ifaces {
        let found = match want.parse::<Ipv4Addr>() {
            Ok(ip) => addrs.iter().find(|(_, a)| *a == ip),
            Err(_) => addrs.iter().find(|(n, _)| n == want),
        };
        if let Some(u) = found.and_then(underlay) {
            return Ok(u);
        }
    }
    for pattern in regexes {
        let re = regex::Regex::new(pattern).map_err(|source| IfaceError::BadRegex {
            pattern: pattern.clone(),
            source,
        })?;
        if let Some(u) = addrs
            .iter()
            .find(|(n, a)| re.is_match(&a.to_string()) || re.is_match(n))
            .and_then(underlay)
        {
            return Ok(u);
        }
    }
    if let Some(target) = reach
        && let Some(u) = can_reach(target, &addrs).await?.as_ref().and_then(underlay)
    {
        return Ok(u);
    }
    if !ifaces.is_empty() || !regexes.is_empty() || reach.is_some() {
        // flanneld does not fall back to the default route once --iface was given.
        return Err(IfaceError::NotFound {
            tried: format!(
                "none of --iface {ifaces:?} / --iface-regex {regexes:?} / --iface-can-reach \
                 {reach:?} names an interface with an IPv4 address"
            ),
        });
    }
    default_route_interface()
        .and_then(|name| addrs.iter().find(|(n, _)| *n == name))
        .and_then(underlay)
        .ok_or_else(|| IfaceError::NotFound {
            tried: "no --iface or --iface-regex given, and no IPv4 default route with an address"
                .to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn loopback_by_name_address_and_regex() {
        let lo = choose(&["nonexistent0".into(), "lo".into()], &[], None)
            .await
            .unwrap();
        assert_eq!(lo.name, "lo");
        assert_eq!(lo.addr, Ipv4Addr::LOCALHOST);
        assert!(lo.mtu >= 1500);
        assert_eq!(
            choose(&["127.0.0.1".into()], &[], None).await.unwrap().name,
            "lo"
        );
        assert_eq!(
            choose(&[], &["^127\\.".into()], None).await.unwrap().name,
            "lo"
        );
        assert!(matches!(
            choose(&["nonexistent0".into()], &[], None).await,
            Err(IfaceError::NotFound { .. })
        ));
        assert!(matches!(
            choose(&[], &["(".into()], None).await,
            Err(IfaceError::BadRegex { .. })
        ));
    }

    #[tokio::test]
    async fn can_reach_follows_the_kernels_route() {
        // Any loopback address is routed to lo, from 127.0.0.1.
        let lo = choose(&[], &[], Some(Ipv4Addr::new(127, 0, 0, 42)))
            .await
            .unwrap();
        assert_eq!((lo.name.as_str(), lo.addr), ("lo", Ipv4Addr::LOCALHOST));
        // --iface wins over --iface-can-reach, as in flanneld.
        assert!(matches!(
            choose(&["nonexistent0".into()], &[], Some(Ipv4Addr::new(127, 0, 0, 42))).await,
            Ok(u) if u.name == "lo"
        ));
    }
}
