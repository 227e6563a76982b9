//! Pre-flight: what can be checked before the agent takes a lease or touches the kernel, checked
//! then, so that a host that cannot run the agent fails at once and leaves nothing behind (under
//! `Restart=on-failure` a late failure would otherwise take a lease, create devices, pin programs
//! and add rules every few seconds).
//!
//! Checked: the subnet file can be written (its directory exists or can be created, and takes a
//! new file: a read-only mount fails here), the bpffs pin directory is usable when the eBPF
//! datapath may run, and, for the backends that forward (udp, vxlan), the underlay is one peers
//! can reach (not the loopback interface, not a loopback, unspecified, multicast or broadcast
//! public IP, which peers refuse anyway), and the TUN datapath's UDP port is free. The
//! health port is bound before anything else (`daemon::run`), so a port in use fails first too.
//! What cannot be checked without doing it (the kernel accepting the device, the programs, the
//! rules) is undone when it fails (`daemon::footprint`).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::{
    cli::{Cli, DatapathKind},
    control::config::{Backend, NetworkConfig},
    dataplane::ebpf::pins::is_bpffs,
    host::iface::Underlay,
};

/// Where the agent mounts a bpf filesystem itself when none is there (`Pins::open`).
const SYS_FS_BPF: &str = "/sys/fs/bpf";

/// Why the agent cannot start here; nothing was done yet when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// The subnet file's directory cannot be created or does not take a new file (a read-only
    /// mount, permissions).
    #[error(
        "--subnet-file {}: cannot write in {}: {source} (checked before taking a lease; \
         nothing was done)",
        path.display(),
        dir.display()
    )]
    SubnetFile {
        /// The subnet file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The subnet file's path names a directory.
    #[error("--subnet-file {}: is a directory; name a file", path.display())]
    SubnetFileIsDir {
        /// The path.
        path: PathBuf,
    },
    /// The pin directory cannot hold the eBPF datapath's pins.
    #[error(
        "--bpffs {}: {reason}; give a directory on a bpf filesystem (mount -t bpf bpf {SYS_FS_BPF}), \
         or --datapath=tun (checked before taking a lease; nothing was done)",
        path.display()
    )]
    Bpffs {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The underlay interface is the loopback interface: nothing sent there reaches a peer.
    #[error(
        "underlay interface {name} is a loopback interface: no other host can reach this one \
         there; give --iface (or --iface-regex, --iface-can-reach) naming the interface other \
         hosts reach this one through"
    )]
    LoopbackIface {
        /// The interface.
        name: String,
    },
    /// The TUN datapath's UDP port is held by a socket that is not flannel's.
    #[error(
        "UDP port {port} ({backend}) is in use on this host: the TUN datapath receives its \
         peers' packets there; stop what holds it (ss -ulpn 'sport = :{port}'), or set \
         Backend.Port in the network config for every host (checked before taking a lease; \
         nothing was done)"
    )]
    DataPortInUse {
        /// The port.
        port: u16,
        /// `udp` or `vxlan`.
        backend: &'static str,
    },
    /// The public IP is not one another host can send to (peers refuse such a lease).
    #[error(
        "public IP {ip} is {what}: no other host can send to it, and peers refuse such a \
         lease; give --public-ip (or --iface) with an address other hosts reach this one at"
    )]
    PublicIp {
        /// The address.
        ip: Ipv4Addr,
        /// What kind of address it is.
        what: &'static str,
    },
}

/// The checks that need neither etcd nor the network config: the subnet file.
pub fn local(cli: &Cli) -> Result<(), PreflightError> {
    subnet_file(&cli.subnet_file)
}

/// The checks that need the config and the chosen underlay: the underlay and public IP, and the
/// pin directory when the eBPF datapath may run.
pub fn host(
    cli: &Cli,
    config: &NetworkConfig,
    underlay: Option<&Underlay>,
    public_ip: Ipv4Addr,
) -> Result<(), PreflightError> {
    // alloc forwards nothing: the interface only sizes the MTU, and no pins are made.
    let forwards = !matches!(config.backend, Backend::Alloc);
    // The interface first: it is what the operator named (the address follows from it).
    if forwards
        && let Some(u) = underlay
        && (is_loopback_iface(&u.name) || u.addr.is_loopback())
    {
        return Err(PreflightError::LoopbackIface {
            name: u.name.clone(),
        });
    }
    if !forwards {
        // Its PublicIP is a record only: no peer sends to it.
        return Ok(());
    }
    public_address(public_ip)?;
    if cli.datapath != DatapathKind::Tun {
        // auto too: a pin directory that is not on bpffs is a setting to fix, not a kernel
        // without eBPF to fall back from.
        bpffs(&cli.bpffs)?;
    } else {
        data_port(&config.backend)?;
    }
    Ok(())
}

/// The TUN datapath's port can be bound. flanneld's own sockets are the exception: its udp
/// process holding `flannel0` and its kernel `flannel.<VNI>` are judged (refused, taken over)
/// where the device is made, with what to do about each.
fn data_port(backend: &Backend) -> Result<(), PreflightError> {
    let (Backend::Udp { port } | Backend::Vxlan { port, .. }) = *backend else {
        return Ok(());
    };
    let flannels = super::leftovers::own_device(backend)
        .is_some_and(|d| Path::new("/sys/class/net").join(d).exists());
    match std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !flannels => {
            Err(PreflightError::DataPortInUse {
                port,
                backend: backend.type_name(),
            })
        }
        // Bound and dropped at once; another error is the datapath's to report.
        _ => Ok(()),
    }
}

/// The subnet file's directory exists or can be created, and takes a new file, which is how the
/// file is written (a temporary file renamed over it).
fn subnet_file(path: &Path) -> Result<(), PreflightError> {
    if path.is_dir() {
        return Err(PreflightError::SubnetFileIsDir {
            path: path.to_owned(),
        });
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let failed = |source| PreflightError::SubnetFile {
        path: path.to_owned(),
        dir: dir.to_owned(),
        source,
    };
    // Creating the directory is what writing the file does first anyway; it is no state.
    std::fs::create_dir_all(dir).map_err(failed)?;
    let probe = dir.join(format!(".subnet-file-check.{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(failed)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// An address peers can send to; the same classes `PeerSet::settle` refuses in a peer's lease.
fn public_address(ip: Ipv4Addr) -> Result<(), PreflightError> {
    let what = if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_broadcast() {
        "the broadcast address"
    } else {
        return Ok(());
    };
    Err(PreflightError::PublicIp { ip, what })
}

/// Whether the kernel flags interface `name` as loopback.
fn is_loopback_iface(name: &str) -> bool {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("flags"))
        .ok()
        .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & libc::IFF_LOOPBACK as u32 != 0)
}

/// The pin directory is on a bpf filesystem, or would be created on one: its nearest existing
/// ancestor is on bpffs, or it lies below `/sys/fs/bpf`, where the agent mounts one itself.
fn bpffs(path: &Path) -> Result<(), PreflightError> {
    let bad = |reason: String| PreflightError::Bpffs {
        path: path.to_owned(),
        reason,
    };
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => return Err(bad("no part of the path exists".into())),
        }
    }
    if !existing.is_dir() {
        return Err(bad(format!("{} is not a directory", existing.display())));
    }
    let sys_bpf = Path::new(SYS_FS_BPF);
    if is_bpffs(existing) || (path.starts_with(sys_bpf) && existing == sys_bpf) {
        return Ok(());
    }
    Err(bad(if existing == path {
        "not on a bpf filesystem".into()
    } else {
        format!(
            "would be created in {}, which is not on a bpf filesystem",
            existing.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ips_no_peer_can_reach_are_refused() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(public_address(ip.parse().unwrap()).is_err(), "{ip}");
        }
        assert!(public_address("192.168.100.4".parse().unwrap()).is_ok());
    }

    #[test]
    fn loopback_is_known_by_its_flags() {
        assert!(is_loopback_iface("lo"));
        assert!(!is_loopback_iface("no-such-interface"));
    }

    #[test]
    fn subnet_file_checks() {
        let dir = std::env::temp_dir().join(format!("preflight-{}", std::process::id()));
        let file = dir.join("a/subnet.env");
        subnet_file(&file).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.join("a")).unwrap().count(),
            0,
            "no probe left"
        );
        assert!(matches!(
            subnet_file(&dir),
            Err(PreflightError::SubnetFileIsDir { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_plain_directory_is_no_bpffs() {
        let e = bpffs(&std::env::temp_dir().join("no-such-dir/pins")).unwrap_err();
        assert!(e.to_string().contains("not on a bpf filesystem"), "{e}");
    }
}
