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
