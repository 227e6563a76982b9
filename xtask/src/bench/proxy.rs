//! The `udp-proxy` baseline: what flannel's udp backend does in its C proxy
//! (`backend/udp/proxy_amd64.c`), rebuilt as honestly as possible so the bench can put a number on
//! the per-packet userspace proxy that our TUN and eBPF datapaths replace.
//!
//! Like flannel: a TUN device `flannel0` (no packet info header), one UDP socket on port 8285, the
//! inner IPv4 packet as the whole UDP payload, one thread, both fds non-blocking behind `poll`, and
//! per packet exactly one read and one write syscall (`read` on the TUN then `sendto`, or
//! `recvfrom` then `write` on the TUN). The TTL is decremented with the RFC 1624 checksum patch,
//! and the next hop comes from a linear scan of a small route table, as in flannel.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, bail};
use overlay_tests::netns::NetNs;

/// flannel's udp backend port.
pub const UDP_PORT: u16 = 8285;
/// The TUN device name flannel's udp backend uses.
pub const TUN_NAME: &str = "flannel0";

/// One peer subnet and the host that holds it.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub subnet: Ipv4Addr,
    pub prefix_len: u8,
    pub next_hop: SocketAddrV4,
}

/// A running proxy thread; stopped (and its TUN device gone) on drop.
#[derive(Debug)]
pub struct UdpProxy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl UdpProxy {
    /// Starts the proxy inside `ns`: creates `flannel0` and binds UDP port 8285 there. The caller
    /// configures the device's address, MTU and routes (as flanneld does after creating it).
    pub fn start(ns: &NetNs, routes: Vec<Route>, mtu: usize) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let ns_name = ns.name().to_owned();
        // The thread lives in the namespace for its whole life. It cannot borrow `ns`, so it
        // enters by the namespace's file, as NetNs::enter_current_thread does.
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("udp-proxy {ns_name}"))
            .spawn(move || {
                let setup = (|| -> anyhow::Result<(OwnedFd, UdpSocket)> {
                    let file = std::fs::File::open(format!("/run/netns/{ns_name}"))?;
                    // SAFETY: setns with a namespace fd changes only this thread's namespace.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    let tun = open_tun(TUN_NAME)?;
                    let sock = UdpSocket::bind(("0.0.0.0", UDP_PORT)).context("bind :8285")?;
                    sock.set_nonblocking(true)?;
                    Ok((tun, sock))
                })();
                match setup {
                    Ok((tun, sock)) => {
                        let _ = ready_tx.send(Ok(()));
                        run(&tun, &sock, &routes, mtu, &stop_flag);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err.context(format!("starting the udp proxy in {}", ns.name())))
            }
            Err(_) => bail!("the udp proxy thread died while starting"),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: open with a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).context("TUNSETIFF flannel0");
    }
    Ok(fd)
}

/// flannel's main loop: poll, then alternate one TUN read and one socket read while either moves
/// data (skipping poll while busy, as flannel does).
fn run(tun: &OwnedFd, sock: &UdpSocket, routes: &[Route], mtu: usize, stop: &AtomicBool) {
    let mut buf = vec![0u8; mtu];
    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Relaxed) {
        // A timeout only so the stop flag is seen; flannel blocks forever and uses a ctl socket.
        // SAFETY: fds is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n <= 0 {
            continue;
        }
        loop {
            let mut activity = tun_to_udp(tun, sock, routes, &mut buf);
            activity |= udp_to_tun(sock, tun, &mut buf);
            if !activity || stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

fn tun_to_udp(tun: &OwnedFd, sock: &UdpSocket, routes: &[Route], buf: &mut [u8]) -> bool {
    // SAFETY: reading into a buffer of buf.len() bytes.
    let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 20 {
        return n >= 0;
    }
    let pkt = &mut buf[..n as usize];
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    let Some(route) = routes
        .iter()
        .find(|r| in_subnet(dst, r.subnet, r.prefix_len))
    else {
        // flannel answers with ICMP net unreachable; the bench never sends such packets.
        return true;
    };
    if decrement_ttl(pkt) {
        let _ = sock.send_to(pkt, route.next_hop);
    }
    true
}

fn udp_to_tun(sock: &UdpSocket, tun: &OwnedFd, buf: &mut [u8]) -> bool {
    let Ok((n, _from)) = sock.recv_from(buf) else {
        return false;
    };
    let pkt = &mut buf[..n];
    if n >= 20 && decrement_ttl(pkt) {
        // SAFETY: writing n initialised bytes.
        unsafe { libc::write(tun.as_raw_fd(), pkt.as_ptr().cast(), n) };
    }
    true
}

fn in_subnet(addr: Ipv4Addr, subnet: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(subnet) & mask
}

/// Decrements the TTL and patches the header checksum (RFC 1624), as flannel's proxy does.
/// Returns false when the packet must be dropped.
fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt[8] <= 1 {
        return false;
    }
    pkt[8] -= 1;
    let sum = u32::from(u16::from_be_bytes([pkt[10], pkt[11]])) + 0x100;
    let sum = (sum & 0xffff) + (sum >> 16);
    pkt[10..12].copy_from_slice(&(sum as u16).to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(h: &[u8]) -> u16 {
        let mut sum = 0u32;
        for w in h.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 64, 255] {
            let mut h = [
                0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, ttl, 1, 0, 0, 172, 16, 1, 2, 172, 16, 2, 2,
            ];
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            assert!(decrement_ttl(&mut h));
            assert_eq!(h[8], ttl - 1);
            assert_eq!(checksum(&h), 0, "ttl {ttl}");
        }
        let mut h = [0u8; 20];
        h[8] = 1;
        assert!(!decrement_ttl(&mut h));
    }

    #[test]
    fn subnet_match() {
        let s = Ipv4Addr::new(172, 16, 2, 0);
        assert!(in_subnet(Ipv4Addr::new(172, 16, 2, 9), s, 24));
        assert!(!in_subnet(Ipv4Addr::new(172, 16, 3, 9), s, 24));
    }
}
