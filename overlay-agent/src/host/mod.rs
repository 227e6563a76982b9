//! Host setup: the overlay device, its addresses and routes, through netlink and the TUN driver.
//! Everything here acts in the calling thread's network namespace.

pub mod iptables;
pub mod netlink;
pub mod overlay;
pub mod tun;

pub use netlink::{Netlink, NetlinkError};
pub use overlay::{OverlayDevice, OverlayDeviceError};
pub use tun::{TunError, create_persistent_tun};
