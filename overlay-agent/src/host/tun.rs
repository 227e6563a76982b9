//! Persistent TUN devices.
//!
//! The overlay device is a TUN so the host's routing looks like flannel's (`flannel0` holding the
//! Network route), and persistent so it, its routes and the TC program on it survive the agent:
//! traffic keeps flowing while the agent restarts, because the eBPF program, not the process,
//! forwards it.

use std::{fs::OpenOptions, os::fd::AsRawFd as _};

/// Errors creating the TUN device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// /dev/net/tun is missing or not accessible (no tun module, no CAP_NET_ADMIN).
    #[error("opening /dev/net/tun: {source}")]
    Open {
        /// The open error.
        #[source]
        source: std::io::Error,
    },
    /// The interface name does not fit IFNAMSIZ.
    #[error("interface name {name:?} is longer than 15 bytes")]
    Name {
        /// The rejected name.
        name: String,
    },
    /// An ioctl on the TUN file descriptor failed.
    #[error("{request} on {name}: {source}")]
    Ioctl {
        /// TUNSETIFF or TUNSETPERSIST.
        request: &'static str,
        /// The device.
        name: String,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the L3 TUN device `name` (or attaches to it if it exists) and makes it persistent.
pub fn create_persistent_tun(name: &str) -> Result<(), TunError> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(TunError::Name { name: name.into() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| TunError::Open { source })?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let ioctl = |request: &'static str, code: libc::c_ulong, arg: libc::c_ulong| {
        // SAFETY: the fd is open; TUNSETIFF reads an ifreq we own, TUNSETPERSIST takes an integer.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), code, arg) };
        if ret < 0 {
            return Err(TunError::Ioctl {
                request,
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    ioctl("TUNSETIFF", TUNSETIFF, &raw mut req as libc::c_ulong)?;
    ioctl("TUNSETPERSIST", TUNSETPERSIST, 1)?;
    Ok(())
}
