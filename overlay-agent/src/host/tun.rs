//! Persistent TUN devices.
//!
//! The overlay device is a TUN so the host's routing looks like flannel's (`flannel0` holding the
//! Network route), and persistent so it, its routes and the TC program on it survive the agent:
//! traffic keeps flowing while the agent restarts, because the eBPF program, not the process,
//! forwards it.
//!
//! Devices are created with `IFF_MULTI_QUEUE`, so the TUN datapath (which needs one queue per
//! worker) can share the device with the eBPF path; the kernel refuses to attach a multi-queue
//! file to a single-queue device and the reverse, so a device an older version created without it
//! is attached as it is here (the eBPF path never reads it) and recreated by the TUN datapath
//! ([`delete_persistent_tun`]).

use std::{fs::OpenOptions, os::fd::AsRawFd as _};

/// The transmit queue length the TUN datapath gives its device (the kernel's TUN default is 500).
/// The queue holds what the kernel routes into the device until the forwarder reads it; with TSO
/// super-packets of up to 64 KB it absorbs a forwarder's scheduling hiccup instead of dropping
/// (and making TCP back off), as a short queue did under load.
pub const DATAPATH_TX_QUEUE_LEN: u32 = 5000;

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
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the L3 TUN device `name` (multi-queue) or attaches to it if it exists, whether or not
/// it is multi-queue, and makes it persistent.
pub fn create_persistent_tun(name: &str) -> Result<(), TunError> {
    let file = attach_any(name)?;
    tun_ioctl(&file, name, "TUNSETPERSIST", TUNSETPERSIST, 1)
}

/// Whether the existing device `name` is a multi-queue TUN; `None` when there is no such device
/// in the calling thread's network namespace.
pub fn is_multi_queue(name: &str) -> Option<bool> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string; if_nametoindex asks the calling thread's namespace.
    if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
        return None;
    }
    match attach(name, IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE) {
        Ok(_) => Some(true),
        Err(TunError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            Some(false)
        }
        Err(_) => None,
    }
}

/// Deletes the persistent TUN device `name` (with its addresses, routes and programs); a no-op
/// when it does not exist.
pub fn delete_persistent_tun(name: &str) -> Result<(), TunError> {
    if is_multi_queue(name).is_none() {
        return Ok(());
    }
    let file = attach_any(name)?;
    // The device goes when the last file attached to a non-persistent device closes.
    tun_ioctl(&file, name, "TUNSETPERSIST", TUNSETPERSIST, 0)
}

/// Sets `name`'s transmit queue length (`ip link set NAME txqueuelen LEN`), in the calling
/// thread's network namespace. For a TUN device it is the length of each queue's ring.
pub fn set_tx_queue_len(name: &str, len: u32) -> Result<(), TunError> {
    const SIOCSIFTXQLEN: libc::c_ulong = 0x8943;
    if name.len() >= libc::IFNAMSIZ {
        return Err(TunError::Name { name: name.into() });
    }
    #[repr(C)]
    struct IfReqQlen {
        name: [u8; libc::IFNAMSIZ],
        qlen: libc::c_int,
        _pad: [u8; 20],
    }
    let mut req = IfReqQlen {
        name: [0; libc::IFNAMSIZ],
        qlen: libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX),
        _pad: [0; 20],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let ioctl_err = |source| TunError::Ioctl {
        request: "SIOCSIFTXQLEN",
        name: name.into(),
        source,
    };
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").map_err(ioctl_err)?;
    // SAFETY: SIOCSIFTXQLEN reads a struct ifreq, which `req` is laid out as and outlives.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFTXQLEN, &raw mut req) };
    if ret < 0 {
        return Err(ioctl_err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Attaches multi-queue, or single-queue when the existing device is (the kernel refuses a
/// mismatch with EINVAL). Sysfs' `tun_flags` would tell directly, but shows the namespace sysfs
/// was mounted in, not necessarily the calling thread's.
fn attach_any(name: &str) -> Result<std::fs::File, TunError> {
    match attach(name, IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE) {
        Err(TunError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            attach(name, IFF_TUN | IFF_NO_PI)
        }
        r => r,
    }
}

fn attach(name: &str, flags: libc::c_short) -> Result<std::fs::File, TunError> {
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
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    tun_ioctl(
        &file,
        name,
        "TUNSETIFF",
        TUNSETIFF,
        &raw mut req as libc::c_ulong,
    )?;
    Ok(file)
}

fn tun_ioctl(
    file: &std::fs::File,
    name: &str,
    request: &'static str,
    code: libc::c_ulong,
    arg: libc::c_ulong,
) -> Result<(), TunError> {
    // SAFETY: the fd is open; TUNSETIFF reads an ifreq the caller owns, TUNSETPERSIST takes an
    // integer.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), code, arg) };
    if ret < 0 {
        return Err(TunError::Ioctl {
            request,
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
