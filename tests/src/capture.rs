//! Frames as they cross a host's underlay NIC, for the fuzzers' corpus (`cargo xtask fuzz
//! --capture-corpus`): an `AF_PACKET` socket on one interface inside a namespace, and the
//! re-addressing that turns a captured overlay datagram into one the fuzzers' host
//! (`receive_cases`: `ME`, with the one peer `PEER`) accepts, keeping everything else of it as it
//! crossed the wire: sizes, IP flags, TTLs and IDs, UDP source ports, VXLAN flags, TCP options and
//! payload. Captured frames from lab addresses would only ever be refused as "not a peer", which
//! exercises one branch of the programs; re-addressed, they reach every check after it.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use overlay_common::{maps::Encap, wire};

use crate::{
    netns::NetNs,
    receive_cases::{self, ME, MY_SUBNET, MY_VTEP, PEER, PEER_SUBNET, PEER_VTEP, VNI},
};

/// Frames a capture keeps at most: enough for a corpus, bounded however busy the link.
const MAX_FRAMES: usize = 20_000;

/// One frame seen on the interface.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Sent by this host (`PACKET_OUTGOING`), as opposed to received.
    pub outgoing: bool,
    /// The whole Ethernet frame.
    pub bytes: Vec<u8>,
}

/// A running capture of the IPv4/UDP frames to one destination port on one interface.
#[derive(Debug)]
pub struct Capture {
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Capture {
    /// Starts capturing on `iface` in `ns` the UDP datagrams to `port`, both directions.
    /// Returns once the socket is bound, so traffic sent after this is seen.
    pub fn start(ns: &NetNs, iface: &str, port: u16) -> std::io::Result<Self> {
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns, iface) = (NetNs::attach(ns.name()), iface.to_owned());
        let (f, s) = (frames.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let socket = match open(&ns, &iface) {
                Ok(sock) => {
                    let _ = ready_tx.send(Ok(()));
                    sock
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: buf and from are valid for the lengths given.
                let n = unsafe {
                    libc::recvfrom(
                        socket.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&raw mut from).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                let bytes = &buf[..n as usize];
                if udp_dst_port(bytes) != Some(port) {
                    continue;
                }
                let mut kept = f.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() < MAX_FRAMES {
                    kept.push(Frame {
                        outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
                        bytes: bytes.to_vec(),
                    });
                }
            }
            Ok(())
        });
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the capture thread died before binding"))??;
        Ok(Self {
            frames,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and returns every frame seen, in order; the socket's error if it failed.
    pub fn stop(mut self) -> std::io::Result<Vec<Frame>> {
        self.halt()?;
        Ok(std::mem::take(
            &mut *self.frames.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    fn halt(&mut self) -> std::io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the capture thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// An `AF_PACKET` socket bound to `iface` in `ns` (entered by the calling thread for good), with
/// a receive timeout so the capture notices its stop flag.
fn open(ns: &NetNs, iface: &str) -> std::io::Result<OwnedFd> {
    ns.enter_current_thread()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let name = std::ffi::CString::new(iface).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is a valid sockaddr_ll of the length given.
    if unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: a valid timeval of the length given.
    if unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The UDP destination port of an IPv4/UDP Ethernet frame.
fn udp_dst_port(frame: &[u8]) -> Option<u16> {
    if be16(frame, 12)? != wire::ETH_P_IP {
        return None;
    }
    let ip = wire::ETH_LEN;
    let ihl = usize::from(frame.get(ip)? & 0x0f) * 4;
    if *frame.get(ip + 9)? != wire::IPPROTO_UDP {
        return None;
    }
    be16(frame, ip + ihl + 2)
}

/// What a re-addressed frame carries, to tell frames apart when picking a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shape {
    /// The inner packet's protocol.
    pub protocol: u8,
    /// The inner packet's total length.
    pub inner_len: usize,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

/// `frame`, a whole IPv4 datagram of `encap`'s format to its port, re-addressed as the
/// fuzzers' host receives from its peer: Ethernet as `receive_cases::frame` builds it, outer
/// `PEER` -> `ME`, inner source in `PEER_SUBNET` and destination in `MY_SUBNET` (each keeping its
/// last octet), and for vxlan the VNI and inner MACs of `receive_cases`; every checksum that
/// covers a changed byte is recomputed (an outer UDP checksum of 0 stays 0). `None` for anything
/// else (not IPv4/UDP, another port, a truncated or fragmented datagram, no inner IPv4 packet).
pub fn readdress(encap: Encap, frame: &[u8]) -> Option<(Vec<u8>, Shape)> {
    if udp_dst_port(frame)? != receive_cases::port(encap) {
        return None;
    }
    let ip = wire::ETH_LEN;
    let ihl = usize::from(frame[ip] & 0x0f) * 4;
    let total = usize::from(be16(frame, ip + 2)?);
    if frame[ip] >> 4 != 4 || ihl < wire::IPV4_MIN_LEN || total < ihl + 8 {
        return None;
    }
    if ip + total > frame.len() || be16(frame, ip + 6)? & 0x3fff != 0 {
        return None;
    }
    let mut f = frame[..ip + total].to_vec();
    let udp = ip + ihl;
    if usize::from(be16(&f, udp + 4)?) != total - ihl {
        return None;
    }
    let inner = match encap {
        Encap::Vxlan => {
            let vx = udp + wire::UDP_LEN;
            if f.len() < vx + wire::VXLAN_FORMAT_HEADER
                || be16(&f, vx + wire::vxlan::INNER_ETHERTYPE.start)? != wire::ETH_P_IP
            {
                return None;
            }
            let h = &mut f[vx..vx + wire::VXLAN_FORMAT_HEADER];
            h[wire::vxlan::VNI].copy_from_slice(&VNI.to_be_bytes()[1..4]);
            h[wire::vxlan::INNER_DST_MAC].copy_from_slice(&MY_VTEP);
            h[wire::vxlan::INNER_SRC_MAC].copy_from_slice(&PEER_VTEP);
            vx + wire::VXLAN_FORMAT_HEADER
        }
        _ => udp + wire::UDP_LEN,
    };
    let shape = readdress_inner(&mut f[inner..])?;
    // Outer: Ethernet, addresses, header checksum, UDP checksum over the new pseudo-header.
    f[..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
    f[ip + 12..ip + 16].copy_from_slice(&PEER.octets());
    f[ip + 16..ip + 20].copy_from_slice(&ME.octets());
    receive_cases::set_ipv4_checksum(&mut f[ip..ip + ihl]);
    if be16(&f, udp + 6)? != 0 {
        let sum = receive_cases::l4_checksum(PEER, ME, wire::IPPROTO_UDP, &mut f[udp..], 6);
        // 0 means "no checksum" in UDP: a computed 0 is sent as all ones.
        let sum = if sum == 0 { 0xffff } else { sum };
        f[udp + 6..udp + 8].copy_from_slice(&sum.to_be_bytes());
    }
    Some((f, shape))
}

/// Moves the inner packet into the fuzzers' subnets and fixes its checksums.
fn readdress_inner(p: &mut [u8]) -> Option<Shape> {
    let ihl = usize::from(*p.first()? & 0x0f) * 4;
    let total = usize::from(be16(p, 2)?);
    if p[0] >> 4 != 4 || ihl < wire::IPV4_MIN_LEN || total < ihl || total > p.len() {
        return None;
    }
    let (src, dst) = (p[15], p[19]);
    let o = |(net, _): (Ipv4Addr, u8), last: u8| {
        let [a, b, c, _] = net.octets();
        [a, b, c, last]
    };
    p[12..16].copy_from_slice(&o(PEER_SUBNET, src));
    p[16..20].copy_from_slice(&o(MY_SUBNET, dst));
    receive_cases::set_ipv4_checksum(&mut p[..ihl]);
    let protocol = p[9];
    let whole = be16(p, 6)? & 0x3fff == 0;
    let (s, d) = (
        Ipv4Addr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?),
        Ipv4Addr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?),
    );
    let l4 = &mut p[ihl..total];
    let mut tcp_flags = 0;
    match protocol {
        6 if whole && l4.len() >= 20 => {
            tcp_flags = l4[13];
            let sum = receive_cases::l4_checksum(s, d, 6, l4, 16);
            l4[16..18].copy_from_slice(&sum.to_be_bytes());
        }
        17 if whole && l4.len() >= 8 && be16(l4, 6)? != 0 => {
            let sum = receive_cases::l4_checksum(s, d, 17, l4, 6);
            let sum = if sum == 0 { 0xffff } else { sum };
            l4[6..8].copy_from_slice(&sum.to_be_bytes());
        }
        _ => {}
    }
    Some(Shape {
        protocol,
        inner_len: total,
        tcp_flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readdressed_table_frames_stay_valid_and_land_in_the_fuzzers_subnets() {
        for encap in [Encap::Udp, Encap::Vxlan] {
            // A TCP segment from a lab container to another, in the format, from a lab host.
            let mut tcp = vec![0u8; 20];
            tcp[12] = 0x50;
            tcp[13] = 0x18;
            tcp.extend_from_slice(b"payload");
            let (a, b) = (Ipv4Addr::new(10, 5, 3, 2), Ipv4Addr::new(10, 5, 4, 7));
            let sum = receive_cases::l4_checksum(a, b, 6, &mut tcp, 16);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            let inner = receive_cases::ipv4(a, b, 6, &tcp);
            let payload = receive_cases::payload(encap, 77, [2; 6], &inner);
            let frame = receive_cases::frame(encap, Ipv4Addr::new(10, 0, 0, 9), &payload);
            let (out, shape) = readdress(encap, &frame).expect("an overlay datagram");
            assert_eq!(
                shape,
                Shape {
                    protocol: 6,
                    inner_len: inner.len(),
                    tcp_flags: 0x18
                }
            );
            let case = receive_cases::Case {
                name: "re-addressed".into(),
                frame: out.clone(),
                expect: receive_cases::Expect::Accept,
            };
            let (from, _, _) = case.as_datagram().expect("valid outer headers");
            assert_eq!(from, PEER);
            let at = out.len() - inner.len();
            let new = &out[at..];
            assert_eq!(&new[12..16], &[172, 16, 2, 2]);
            assert_eq!(&new[16..20], &[172, 16, 1, 7]);
            assert_eq!(receive_cases::checksum(&new[..20]), 0);
            let mut seg = new[20..].to_vec();
            let want = u16::from_be_bytes([seg[16], seg[17]]);
            let (s, d) = (Ipv4Addr::new(172, 16, 2, 2), Ipv4Addr::new(172, 16, 1, 7));
            assert_eq!(receive_cases::l4_checksum(s, d, 6, &mut seg, 16), want);
            assert_eq!(&new[40..], b"payload");
            // Another port, or a truncated frame, is not one.
            assert!(readdress(encap, &frame[..frame.len() - 1]).is_none());
        }
        let udp = receive_cases::frame(Encap::Udp, PEER, &[0x45; 30]);
        assert!(readdress(Encap::Vxlan, &udp).is_none());
    }
}
