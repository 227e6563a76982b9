//! The narrow interface between the control plane and a datapath.
//!
//! The control plane owns leases and peers; a datapath moves packets. They meet here:
//! 1. the daemon builds the datapath for the backend (see `daemon::build_datapath`) and asks it
//!    for the `BackendData` to publish in our lease ([`Datapath::backend_data`]);
//! 2. once the lease is held it calls [`Datapath::start`] with the [`LocalLease`]; `start`
//!    returns when forwarding works, and only then is subnet.env written and READY=1 sent;
//! 3. every change of the peer set arrives as a [`PeerEvent`] through [`Datapath::apply`], in
//!    order, from one task: first the full peer list (as `Added` events) before readiness, then
//!    the watch's changes and the diffs of each resync;
//! 4. [`Datapath::check`] feeds `/healthz`.
//!
//! Calls are synchronous and made from a task of their own, so a datapath may block briefly
//! (netlink, map updates) without stalling etcd traffic; one that needs long-running work spawns
//! its own tasks or threads in `start`.

use std::net::Ipv4Addr;

use super::{config::Backend, iface::Underlay, peers::PeerEvent, subnet::Subnet};

/// A datapath failure.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Setting up or updating the datapath failed.
    #[error("{context}: {source}")]
    Failed {
        /// What was being done, e.g. "adding the route to 10.5.3.0/24".
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a datapath needs to know about this host once its lease is held.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalLease {
    /// The whole overlay network (`Network`).
    pub network: Subnet,
    /// This host's subnet.
    pub subnet: Subnet,
    /// The address peers send to (`--public-ip`, else the underlay interface's).
    pub public_ip: Ipv4Addr,
    /// The interface inter-host traffic leaves by, when known (always for udp/vxlan).
    pub underlay: Option<Underlay>,
    /// The backend and its options.
    pub backend: Backend,
    /// The overlay MTU written to subnet.env: the underlay's minus the encapsulation.
    pub mtu: u32,
}

/// A datapath: what forwards overlay packets between this host and its peers.
pub trait Datapath: Send {
    /// A short description for logs, e.g. "eBPF (udp)".
    fn describe(&self) -> String;

    /// The `BackendData` to publish in our lease (vxlan: `{"VNI":..,"VtepMAC":..}`); `None` for
    /// null. Asked once, before the lease is acquired.
    fn backend_data(&self) -> Option<serde_json::Value> {
        None
    }

    /// Brings the datapath up for our lease. Returns once forwarding works.
    fn start(&mut self, lease: &LocalLease) -> Result<(), DatapathError>;

    /// Applies one peer-set change. Must be idempotent: after a resync an `Added` may repeat a
    /// peer already known.
    fn apply(&mut self, event: &PeerEvent) -> Result<(), DatapathError>;

    /// The initial peer list (sent right after `start`) is complete: state a previous run left
    /// behind and no peer confirmed can go now. Called once.
    fn synced(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }

    /// `Ok` while the datapath forwards; otherwise a one-line reason (served by `/healthz`).
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}
