//! Host setup and host facts: the underlay interface, the overlay device, its addresses and routes
//! (netlink and the TUN driver), the finishing device, and the netfilter rules.
//! Everything here acts in the calling thread's network namespace.

pub mod finishing;
pub mod iface;
pub mod iptables;
pub mod netlink;
pub mod overlay;
pub mod tun;

pub use netlink::{Netlink, NetlinkError};
pub use overlay::{OverlayDevice, OverlayDeviceError};
pub use tun::{TunError, create_persistent_tun};
