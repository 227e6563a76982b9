//! The overlay device as flannel lays it out, so the host's routing looks the same to operators
//! and to docker: `flannel0` (udp) holds the lease's network address with the whole Network's
//! prefix length, which routes the Network to it; `flannel.<VNI>` (vxlan) holds `<lease>/32`, and
//! the Network is routed to it explicitly (flannel routes per peer; one route suffices here since
//! the eBPF program picks the peer).

use std::{net::Ipv4Addr, path::Path};

use futures::TryStreamExt as _;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{link::LinkAttribute, route::RouteAttribute},
};

use super::{Netlink, NetlinkError, TunError, create_persistent_tun};

/// Errors setting up the overlay device.
#[derive(Debug, thiserror::Error)]
pub enum OverlayDeviceError {
    /// Creating the TUN device failed.
    #[error(transparent)]
    Tun(#[from] TunError),
    /// A netlink operation failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// A device of another kind holds the overlay device's name.
    #[error(
        "{name} exists and is a {kind} device, not the agent's TUN (left by flanneld's vxlan \
         backend?); remove it first: ip link del {name}"
    )]
    Occupied {
        /// The device name.
        name: String,
        /// Its kind.
        kind: String,
    },
}

/// How the overlay device must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayDevice {
    /// `flannel0` or `flannel.<VNI>`.
    pub name: String,
    /// Underlay MTU minus the encapsulation overhead.
    pub mtu: u32,
    /// The lease's network address.
    pub lease_addr: Ipv4Addr,
    /// The address's prefix length on the device: the Network's (udp) or 32 (vxlan).
    pub addr_prefix_len: u8,
    /// The whole overlay Network, routed to the device.
    pub network: (Ipv4Addr, u8),
}

impl OverlayDevice {
    /// Creates or updates the device; idempotent. Returns its interface index.
    pub async fn ensure(&self, netlink: &Netlink) -> Result<u32, OverlayDeviceError> {
        // flanneld's vxlan backend leaves a kernel vxlan device under the very name we use.
        match netlink.link(&self.name).await {
            Ok(existing) if existing.kind.as_deref().is_some_and(|k| k != "tun") => {
                return Err(OverlayDeviceError::Occupied {
                    name: self.name.clone(),
                    kind: existing.kind.unwrap_or_default(),
                });
            }
            Ok(_) | Err(NetlinkError::NoSuchLink { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        create_persistent_tun(&self.name)?;
        let link = netlink.link(&self.name).await?;
        netlink.set_mtu_up(link.index, self.mtu).await?;
        netlink
            .set_only_ipv4(link.index, self.lease_addr, self.addr_prefix_len)
            .await?;
        netlink
            .replace_route(self.network.0, self.network.1, link.index)
            .await?;
        Ok(link.index)
    }
}

/// Why an overlay device could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveDevicesError {
    /// A netlink request failed.
    #[error("{op}: {source} (devices not removed)")]
    Netlink {
        /// What was asked.
        op: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Deleting one device failed.
    #[error("deleting device {name}: {source}")]
    Delete {
        /// The device.
        name: String,
        /// Why it failed.
        #[source]
        source: rtnetlink::Error,
    },
}

/// What [`remove_all`] did.
#[derive(Debug, Default)]
pub struct Removed {
    /// Devices removed, one line each.
    pub removed: Vec<String>,
    /// Devices left alone on purpose, one line each.
    pub left: Vec<String>,
    /// What failed.
    pub errors: Vec<RemoveDevicesError>,
}

/// Whether `name` is an overlay device name the agent uses: `flannel0` or `flannel.<VNI>`.
pub fn is_overlay_name(name: &str) -> bool {
    name == "flannel0"
        || name
            .strip_prefix("flannel.")
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
}

fn is_tun(name: &str) -> bool {
    Path::new("/sys/class/net")
        .join(name)
        .join("tun_flags")
        .exists()
}

/// The undo of [`OverlayDevice::ensure`] for every overlay device here: removes the persistent
/// TUN devices named `flannel0` / `flannel.<VNI>` (their addresses and routes go with them). A
/// device of that name that is not a TUN (flanneld's own vxlan device) was not made by the agent
/// and is left alone. Every failure is collected.
pub async fn remove_all() -> Removed {
    let mut report = Removed::default();
    let (connection, handle, _) = match rtnetlink::new_connection() {
        Ok(c) => c,
        Err(source) => {
            report.errors.push(RemoveDevicesError::Netlink {
                op: "opening a netlink socket",
                source,
            });
            return report;
        }
    };
    tokio::spawn(connection);
    let links: Vec<(u32, String)> =
        match handle.link().get().execute().try_collect::<Vec<_>>().await {
            Ok(msgs) => msgs
                .iter()
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some((m.header.index, n.clone())),
                        _ => None,
                    })
                })
                .collect(),
            Err(e) => {
                report.errors.push(RemoveDevicesError::Netlink {
                    op: "listing interfaces",
                    source: std::io::Error::other(e),
                });
                return report;
            }
        };
    let routes: Vec<u32> = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map(|msgs| {
            msgs.iter()
                .filter_map(|m| {
                    m.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    for (index, name) in links.into_iter().filter(|(_, n)| is_overlay_name(n)) {
        if !is_tun(&name) {
            report.left.push(format!(
                "left {name} alone: not a TUN device, so not created by overlay-agent"
            ));
            continue;
        }
        let n_routes = routes.iter().filter(|&&oif| oif == index).count();
        match handle.link().del(index).execute().await {
            Ok(()) => report.removed.push(format!(
                "device {name} with its addresses and {n_routes} route(s)"
            )),
            Err(source) => report
                .errors
                .push(RemoveDevicesError::Delete { name, source }),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names() {
        for ok in ["flannel0", "flannel.1", "flannel.4096"] {
            assert!(is_overlay_name(ok), "{ok}");
        }
        for no in [
            "flannel",
            "flannel.",
            "flannel.x",
            "flannel1",
            "eth0",
            "flannel0x",
        ] {
            assert!(!is_overlay_name(no), "{no}");
        }
    }
}
