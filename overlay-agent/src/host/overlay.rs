//! The overlay device as flannel lays it out, so the host's routing looks the same to operators
//! and to docker: `flannel0` (udp) holds the lease's network address with the whole Network's
//! prefix length, which routes the Network to it; `flannel.<VNI>` (vxlan) holds `<lease>/32`, and
//! the Network is routed to it explicitly (flannel routes per peer; one route suffices here since
//! the eBPF program picks the peer).

use std::net::Ipv4Addr;

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
    /// A device the agent cannot take over holds the overlay device's name.
    #[error(
        "{name} exists and is a {kind} device, which overlay-agent does not take over; remove it first: ip link del {name}"
    )]
    Occupied {
        /// The device name.
        name: String,
        /// Its kind.
        kind: String,
    },
    /// A running process (flanneld's udp backend) holds the TUN device, and with it the UDP port:
    /// the TUN datapath, which needs both, cannot start beside it.
    #[error(
        "{name} is held by a running process (flanneld's udp backend?), which also holds its UDP \
         port: stop it first, or run --datapath=ebpf, which takes over while it runs"
    )]
    HeldByProcess {
        /// The device name.
        name: String,
    },
}

/// What holds the overlay device's name when the agent starts: what it finds on a host where
/// flanneld ran, or an earlier run of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupant {
    /// Nothing: a fresh host, or flanneld's udp device gone with flanneld.
    Free,
    /// A persistent TUN: an earlier run's own, kept with its addresses and routes.
    OwnTun,
    /// A TUN that exists only while a process holds it open: a running flanneld's `flannel0`.
    /// It vanishes, with its routes, when flanneld stops.
    LiveTun,
    /// flanneld's `flannel.<VNI>`: a kernel vxlan device, which forwards through its FDB,
    /// neighbour and route entries whether flanneld runs or not.
    KernelVxlan,
    /// Any other kind of device.
    Other(String),
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

/// The TUN device that carries the overlay while flanneld's device still holds the name: the
/// Network is routed to it, with the same encapsulation attached, until the agent's own device
/// takes the name and the route. Never left behind by a finished takeover; teardown removes it
/// after a crash in between.
pub const HANDOVER_DEVICE: &str = "flannel-handovr";

impl OverlayDevice {
    /// `link` described for removal when it is a device of the agent's own kind (a persistent
    /// TUN of flannel's names); `None` for anything else (flanneld's, another program's).
    pub async fn agents_own(
        netlink: &Netlink,
        link: &crate::host::netlink::LinkInfo,
    ) -> Option<Self> {
        if !is_overlay_name(&link.name) {
            return None;
        }
        let device = OverlayDevice {
            name: link.name.clone(),
            mtu: link.mtu,
            lease_addr: Ipv4Addr::UNSPECIFIED,
            addr_prefix_len: 32,
            network: (Ipv4Addr::UNSPECIFIED, 0),
        };
        (device.occupant(netlink).await.ok() == Some(Occupant::OwnTun)).then_some(device)
    }

    /// What holds this device's name now.
    pub async fn occupant(&self, netlink: &Netlink) -> Result<Occupant, NetlinkError> {
        match netlink.link(&self.name).await {
            Err(NetlinkError::NoSuchLink { .. }) => Ok(Occupant::Free),
            Err(e) => Err(e),
            Ok(link) => Ok(match link.kind.as_deref() {
                Some("tun") => match link.tun_persist {
                    Some(false) => Occupant::LiveTun,
                    Some(true) => Occupant::OwnTun,
                    // Not knowing whose it is, it is not taken for ours.
                    None => Occupant::Other("tun (persistence not reported)".into()),
                },
                Some("vxlan") => Occupant::KernelVxlan,
                kind => Occupant::Other(kind.unwrap_or("unknown").to_owned()),
            }),
        }
    }

    /// The same layout on [`HANDOVER_DEVICE`].
    pub fn handover(&self) -> Self {
        Self {
            name: HANDOVER_DEVICE.into(),
            // /32 whatever the backend: an address with a prefix makes the kernel route that
            // prefix to the device at once, before anything forwards there.
            addr_prefix_len: 32,
            ..self.clone()
        }
    }

    /// Creates the device (or keeps the agent's own) with its MTU and address, up, without the
    /// Network route: the caller attaches what forwards first, then calls [`Self::route`], so
    /// no packet reaches a device that cannot forward it. Returns its interface index.
    pub async fn prepare(&self, netlink: &Netlink) -> Result<u32, OverlayDeviceError> {
        match self.occupant(netlink).await? {
            Occupant::Free | Occupant::OwnTun => {}
            Occupant::LiveTun => {
                return Err(OverlayDeviceError::HeldByProcess {
                    name: self.name.clone(),
                });
            }
            Occupant::KernelVxlan => {
                return Err(OverlayDeviceError::Occupied {
                    name: self.name.clone(),
                    kind: "vxlan".into(),
                });
            }
            Occupant::Other(kind) => {
                return Err(OverlayDeviceError::Occupied {
                    name: self.name.clone(),
                    kind,
                });
            }
        }
        create_persistent_tun(&self.name)?;
        let link = netlink.link(&self.name).await?;
        netlink.set_mtu_up(link.index, self.mtu).await?;
        netlink
            .set_only_ipv4(link.index, self.lease_addr, self.addr_prefix_len)
            .await?;
        Ok(link.index)
    }

    /// Routes the Network to the device at `index`, replacing the route that had the key (the
    /// previous device's, flanneld's or the handover device's) in one step.
    pub async fn route(&self, netlink: &Netlink, index: u32) -> Result<(), OverlayDeviceError> {
        netlink
            .replace_route(self.network.0, self.network.1, index)
            .await?;
        Ok(())
    }

    /// Moves the traffic of the device of this name (whatever made it) elsewhere, then deletes
    /// it; returns how many routes went. Its routes go first, one atomic change each, so what
    /// they carried takes a less specific route at once; deleting a device that still carries
    /// traffic takes tens of milliseconds, during which the kernel drops what it routes there.
    /// Nothing to do when there is no such device.
    pub async fn drain_and_delete(&self, netlink: &Netlink) -> Result<usize, OverlayDeviceError> {
        let link = match netlink.link(&self.name).await {
            Ok(link) => link,
            Err(NetlinkError::NoSuchLink { .. }) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let moved = netlink.delete_routes_via(link.index).await?;
        netlink.delete_link(link.index, &self.name).await?;
        Ok(moved)
    }
}

/// flanneld's vxlan layout: the kernel device `flannel.<VNI>` and, per peer, what flanneld's
/// vxlan backend adds. A flanneld started on a host laid out so keeps the device (and its MAC,
/// the lease's VtepMAC) and re-adds the same entries, so nothing it forwards changes.
#[derive(Debug, Clone)]
pub struct FlanneldVxlan {
    /// `flannel.<VNI>`.
    pub name: String,
    /// The VNI.
    pub vni: u32,
    /// The UDP port.
    pub port: u16,
    /// The underlay interface's index.
    pub underlay: u32,
    /// The underlay address (flanneld's `local`).
    pub local: Ipv4Addr,
    /// The device's MAC: the lease's VtepMAC.
    pub mac: [u8; 6],
    /// The overlay MTU.
    pub mtu: u32,
    /// The lease's network address, held as /32.
    pub lease_addr: Ipv4Addr,
}

impl FlanneldVxlan {
    /// Creates the device, then each peer's permanent neighbour (its subnet's .0 -> VtepMAC), FDB
    /// entry (VtepMAC -> public IP) and onlink route (subnet via .0): each route takes its
    /// subnet's traffic from any less specific route the moment it is added.
    pub async fn lay_out(
        &self,
        netlink: &Netlink,
        peers: &[crate::dataplane::contract::PeerRoute],
    ) -> Result<(), OverlayDeviceError> {
        let index = netlink
            .add_vxlan(
                &self.name,
                self.vni,
                self.underlay,
                self.local,
                self.port,
                self.mac,
                self.mtu,
            )
            .await?;
        netlink.set_only_ipv4(index, self.lease_addr, 32).await?;
        Self::add_peers(netlink, index, peers).await
    }

    /// Each peer's permanent neighbour, FDB entry and onlink route on the vxlan device `index`;
    /// every one a replace, so a second run redoes what a failed one left half done.
    pub async fn add_peers(
        netlink: &Netlink,
        index: u32,
        peers: &[crate::dataplane::contract::PeerRoute],
    ) -> Result<(), OverlayDeviceError> {
        for peer in peers {
            let gateway = peer.subnet.addr();
            netlink
                .permanent_neighbour(index, gateway, peer.vtep_mac.0)
                .await?;
            netlink
                .vxlan_fdb(index, peer.vtep_mac.0, peer.public_ip)
                .await?;
            netlink
                .replace_onlink_route(gateway, peer.subnet.prefix(), gateway, index)
                .await?;
        }
        Ok(())
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
        source: NetlinkError,
    },
    /// Removing one device (its routes first) failed.
    #[error("removing device {name}: {source}")]
    Delete {
        /// The device.
        name: String,
        /// Why it failed.
        #[source]
        source: OverlayDeviceError,
    },
    /// Removing the finishing device failed.
    #[error("removing the finishing device: {source}")]
    Finishing {
        /// Why it failed.
        #[source]
        source: super::finishing::FinishingError,
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

/// Whether `name` is an overlay device name the agent uses: `flannel0`, `flannel.<VNI>` or the
/// handover device.
pub fn is_overlay_name(name: &str) -> bool {
    name == "flannel0"
        || name == HANDOVER_DEVICE
        || name
            .strip_prefix("flannel.")
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
}

/// The undo of [`OverlayDevice::prepare`] for every overlay device here: removes the persistent
/// TUN devices named `flannel0`, `flannel.<VNI>` or [`HANDOVER_DEVICE`], each's routes first (so
/// another route takes their traffic at once), then the device with its addresses. A device of
/// such a name that is not a persistent TUN (flanneld's vxlan device, or the `flannel0` a running
/// flanneld holds) was not made by the agent and is left alone. The finishing device (a veth
/// pair, [`super::finishing`]) goes too. Every failure is collected.
pub async fn remove_all() -> Removed {
    let mut report = Removed::default();
    let netlink = match Netlink::connect() {
        Ok(n) => n,
        Err(source) => {
            report.errors.push(RemoveDevicesError::Netlink {
                op: "opening a netlink socket",
                source,
            });
            return report;
        }
    };
    let links = match netlink.links().await {
        Ok(links) => links,
        Err(source) => {
            report.errors.push(RemoveDevicesError::Netlink {
                op: "listing interfaces",
                source,
            });
            return report;
        }
    };
    for link in links.into_iter().filter(|l| is_overlay_name(&l.name)) {
        let name = link.name.clone();
        match (link.kind.as_deref(), link.tun_persist) {
            (Some("tun"), Some(true)) => {}
            (Some("tun"), _) => {
                report.left.push(format!(
                    "left {name} alone: a TUN device a running process holds (flanneld's?), not \
                     overlay-agent's"
                ));
                continue;
            }
            _ => {
                report.left.push(format!(
                    "left {name} alone: not a TUN device, so not created by overlay-agent"
                ));
                continue;
            }
        }
        let device = OverlayDevice {
            name: name.clone(),
            mtu: link.mtu,
            lease_addr: Ipv4Addr::UNSPECIFIED,
            addr_prefix_len: 32,
            network: (Ipv4Addr::UNSPECIFIED, 0),
        };
        match device.drain_and_delete(&netlink).await {
            Ok(routes) => report.removed.push(format!(
                "device {name} with its addresses and {routes} route(s)"
            )),
            Err(source) => report
                .errors
                .push(RemoveDevicesError::Delete { name, source }),
        }
    }
    // After the overlay devices: tc_encap redirects into it while flannel0 carries traffic.
    match super::finishing::remove(&netlink).await {
        Ok(true) => report.removed.push(format!(
            "the finishing device {} / {}",
            super::finishing::FINISH_DEVICE,
            super::finishing::FINISH_PEER
        )),
        Ok(false) => {}
        Err(source) => report.errors.push(RemoveDevicesError::Finishing { source }),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names() {
        for ok in ["flannel0", "flannel.1", "flannel.4096", HANDOVER_DEVICE] {
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
