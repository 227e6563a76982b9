//! What an earlier run with another backend (or another VNI) left: its overlay device, which
//! would otherwise stay beside the new one with its address (udp's `flannel0` holds the lease
//! address with the Network's prefix, so the kernel keeps a connected route for the whole Network
//! through it), and udp's finishing device. Removed once the new device carries the Network, so
//! the change of backend costs no more than the change of format does.
//!
//! Only the agent's own devices go (persistent TUNs of flannel's names): flanneld's kernel vxlan
//! device and the `flannel0` a running flanneld holds are taken over by the datapath, and the
//! handover device belongs to a takeover in progress.

use crate::{
    control::config::Backend,
    host::{
        Netlink, finishing,
        overlay::{HANDOVER_DEVICE, OverlayDevice},
    },
};

/// The device name `backend` runs on, if any.
pub(super) fn own_device(backend: &Backend) -> Option<String> {
    match backend {
        Backend::Alloc => None,
        Backend::Vxlan { vni, .. } => Some(format!("flannel.{vni}")),
        _ => Some("flannel0".into()),
    }
}

/// Removes the other backends' devices of the agent's, each line logged; failures are logged
/// and do not stop the agent (the new device forwards either way).
pub(super) async fn remove(backend: &Backend) {
    let netlink = match Netlink::connect() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("looking for another backend's devices: {e}");
            return;
        }
    };
    let own = own_device(backend);
    let links = match netlink.links().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("looking for another backend's devices: {e}");
            return;
        }
    };
    for link in links {
        if link.name == HANDOVER_DEVICE || own.as_deref() == Some(link.name.as_str()) {
            continue;
        }
        let Some(device) = OverlayDevice::agents_own(&netlink, &link).await else {
            continue;
        };
        match device.drain_and_delete(&netlink).await {
            Ok(routes) => tracing::info!(
                "removed {} with its addresses and {routes} route(s): an earlier run's device \
                 for another backend than {}",
                link.name,
                backend.type_name()
            ),
            Err(e) => tracing::warn!(
                "an earlier run's {} (another backend) could not be removed: {e}",
                link.name
            ),
        }
    }
    // Only the udp format on the eBPF datapath uses the finishing device.
    if !matches!(backend, Backend::Udp { .. }) {
        match finishing::remove(&netlink).await {
            Ok(true) => tracing::info!(
                "removed the finishing device {} an earlier udp run left",
                finishing::FINISH_DEVICE
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("the finishing device an earlier udp run left: {e}"),
        }
    }
}
