//! The finishing device (udp format, eBPF datapath): a veth pair through which `tc_encap` sends a
//! packet whose TCP/UDP checksum or segmentation was left to offload, when the peer it goes to
//! cannot take that (flanneld's udp proxy). `flannel-csum` has transmit checksumming off, so the
//! kernel completes the checksum and segments a GSO batch in software as the packet leaves it;
//! the finished packets come in at `flannel-csum-in`, where `tc_encap_finished` encapsulates them.
//! No address, no route: nothing but the programs' redirects uses it.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use super::netlink::{Netlink, NetlinkError};

/// The side `tc_encap` redirects into (transmit checksumming off).
pub const FINISH_DEVICE: &str = "flannel-csum";
/// The side the finished packets arrive on (`tc_encap_finished` on its ingress).
pub const FINISH_PEER: &str = "flannel-csum-in";

/// Errors setting the finishing device up or removing it.
#[derive(Debug, thiserror::Error)]
pub enum FinishingError {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The name is taken by something that is not our veth pair.
    #[error("{name} exists and is not the agent's veth pair (kind {kind:?}): remove it")]
    Occupied {
        /// The interface.
        name: String,
        /// Its link kind.
        kind: Option<String>,
    },
    /// Turning transmit checksumming off failed: without it the device would finish nothing.
    #[error("turning off transmit checksumming on {name} (SIOCETHTOOL): {source}")]
    Ethtool {
        /// The interface.
        name: String,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
}

/// Creates the pair (or keeps the one a previous run left), MTU `mtu` (the overlay's: the packets
/// are inner packets), transmit checksumming off on [`FINISH_DEVICE`], both up. Returns
/// [`FINISH_DEVICE`]'s index: the programs' redirect target.
pub async fn ensure(netlink: &Netlink, mtu: u32) -> Result<u32, FinishingError> {
    let existing = match netlink.link(FINISH_DEVICE).await {
        Ok(link) => Some(link),
        Err(NetlinkError::NoSuchLink { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let (device, peer) = match existing {
        Some(link) if link.kind.as_deref() == Some("veth") => {
            let peer = netlink.link(FINISH_PEER).await.map_err(|e| match e {
                NetlinkError::NoSuchLink { .. } => FinishingError::Occupied {
                    name: FINISH_DEVICE.into(),
                    kind: Some("veth without its flannel-csum-in peer".into()),
                },
                e => e.into(),
            })?;
            (link.index, peer.index)
        }
        Some(link) => {
            return Err(FinishingError::Occupied {
                name: FINISH_DEVICE.into(),
                kind: link.kind,
            });
        }
        None => netlink.add_veth(FINISH_DEVICE, FINISH_PEER, mtu).await?,
    };
    disable_tx_checksum(FINISH_DEVICE)?;
    // No IPv6 link-local address, no router solicitations: the pair carries only redirects.
    for name in [FINISH_DEVICE, FINISH_PEER] {
        let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
        if let Err(e) = std::fs::write(&path, "1") {
            tracing::debug!("{path}: {e}");
        }
    }
    netlink.set_mtu_up(device, mtu).await?;
    netlink.set_mtu_up(peer, mtu).await?;
    Ok(device)
}

/// Removes the pair (deleting one side deletes both). Absent is fine.
pub async fn remove(netlink: &Netlink) -> Result<bool, FinishingError> {
    match netlink.link(FINISH_DEVICE).await {
        Ok(link) if link.kind.as_deref() == Some("veth") => {
            netlink.delete_link(link.index, FINISH_DEVICE).await?;
            Ok(true)
        }
        Ok(_) | Err(NetlinkError::NoSuchLink { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `ethtool -K <name> tx off`: the legacy ETHTOOL_STXCSUM request, which clears every transmit
/// checksum feature (and with them TSO, which depends on them), so the kernel finishes checksums
/// and segments batches before the device sends.
fn disable_tx_checksum(name: &str) -> Result<(), FinishingError> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let err = |source| FinishingError::Ethtool {
        name: name.into(),
        source,
    };
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    // SAFETY: ifreq is plain data; all zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at an ethtool_value that outlives the
    // call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut ifr) };
    if ret < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}
