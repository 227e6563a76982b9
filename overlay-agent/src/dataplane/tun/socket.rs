//! The UDP side of the TUN datapath: one socket per worker on the format's port
//! (`SO_REUSEPORT` spreads flows over the workers), batched with `recvmmsg`/`sendmmsg`, with UDP
//! GRO on receive (the kernel hands over runs of same-sized datagrams of one flow as one buffer)
//! and UDP GSO on send (one `UDP_SEGMENT` message carries up to [`MAX_GSO_SEGMENTS`]
//! datagrams, whose iovecs point straight into the TUN read buffers: no copy).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, RawFd},
};

/// Largest datagram (or GRO aggregate) received.
pub const RECV_BUF_LEN: usize = 65_536;
/// The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS is 64 on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Largest UDP payload of one GSO send (65535 - IPv4 - UDP headers).
pub const MAX_GSO_BYTES: usize = 65_507;

use overlay_common::policy::Outer;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// `IP_RECVFRAGSIZE`: a cmsg with the largest fragment's size when the datagram was reassembled.
const IP_RECVFRAGSIZE: libc::c_int = 25;
/// `IP_RECVOPTS`: a cmsg (of the same type) with the IP options, when the packet carried any.
const IP_RECVOPTS: libc::c_int = 6;
/// Room for one cmsg carrying an int (CMSG_SPACE(4) = 24 on 64-bit), 8-byte aligned: a send's
/// UDP_SEGMENT.
type CmsgBuf = [u64; 4];
/// Room for the cmsgs a receive asks for, 8-byte aligned: UDP_GRO and IP_RECVFRAGSIZE (an int
/// each, CMSG_SPACE(4) = 24 on 64-bit) and IP options (CMSG_SPACE(40) = 56).
type RecvCmsgBuf = [u64; 16];

/// What the socket offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// `SO_REUSEPORT`, so each worker binds its own socket.
    pub reuse_port: bool,
    /// Ask for UDP GRO.
    pub gro: bool,
    /// Send with UDP GSO.
    pub gso: bool,
}

/// Binds a non-blocking UDP socket on `addr:port`: this host's underlay address, the only outer
/// destination the eBPF decap accepts too (not 0.0.0.0, which would take datagrams sent to any
/// local address, from a container over docker0 for one).
pub fn bind(addr: Ipv4Addr, port: u16, options: SocketOptions) -> io::Result<UdpSocket> {
    // SAFETY: plain socket(2); the fd is owned by the UdpSocket right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    if options.reuse_port {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, one)?;
    }
    // Deep buffers absorb bursts of GSO sends and of the peers' traffic while a worker is busy.
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20);
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
    if options.gro {
        setsockopt(fd, SOL_UDP, UDP_GRO, one)?;
    }
    // The receive policy refuses fragmented datagrams and IP options, as the eBPF decap must
    // (it cannot reassemble); the kernel would otherwise hide both from a UDP socket.
    setsockopt(fd, libc::IPPROTO_IP, IP_RECVFRAGSIZE, one)?;
    setsockopt(fd, libc::IPPROTO_IP, IP_RECVOPTS, one)?;
    // DF on every datagram, as the eBPF encap sets it: a datagram that does not fit the path is
    // refused here (counted as a send error) rather than fragmented, since receivers refuse
    // fragments.
    setsockopt(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the length given.
    let ret = unsafe {
        libc::bind(
            fd,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is an int of the length given.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Preallocated state for `recvmmsg`: `slots` buffers of [`RECV_BUF_LEN`] bytes.
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<RecvCmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    /// Per received message: length, sender, GRO segment size (0: one datagram), outer shape.
    meta: Vec<(usize, Ipv4Addr, usize, Outer)>,
}

// SAFETY: the raw pointers in iovs/hdrs point into the batch's own heap buffers and are rebuilt
// before each use; nothing is shared.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// A batch of `slots` messages.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        // SAFETY: all-zero iovec, sockaddr_in and mmsghdr are valid values.
        let (iov, addr, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        Self {
            bufs: (0..slots)
                .map(|_| vec![0u8; RECV_BUF_LEN].into_boxed_slice())
                .collect(),
            addrs: vec![addr; slots],
            iovs: vec![iov; slots],
            ctrl: vec![[0; 16]; slots],
            hdrs: vec![hdr; slots],
            meta: vec![(0, Ipv4Addr::UNSPECIFIED, 0, Outer::default()); slots],
        }
    }

    /// One non-blocking `recvmmsg` on `fd`; returns the number of messages (`WouldBlock` when
    /// none is queued).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &raw mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = size_of::<RecvCmsgBuf>();
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by self, of the lengths given.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for i in 0..got {
            let len = self.hdrs[i].msg_len as usize;
            let src = Ipv4Addr::from(u32::from_be(self.addrs[i].sin_addr.s_addr));
            let mut seg = 0;
            let mut outer = Outer::default();
            let h = &self.hdrs[i].msg_hdr;
            // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, bounded by
            // msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(h);
                while !c.is_null() {
                    match ((*c).cmsg_level, (*c).cmsg_type) {
                        (SOL_UDP, UDP_GRO) => {
                            seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>())
                                as usize;
                        }
                        (libc::IPPROTO_IP, IP_RECVFRAGSIZE) => outer.fragment = true,
                        (libc::IPPROTO_IP, IP_RECVOPTS) => outer.ip_options = true,
                        _ => {}
                    }
                    c = libc::CMSG_NXTHDR(h, c);
                }
            }
            // A datagram truncated to the buffer (MSG_TRUNC) is refused whole by the codec: its
            // inner length no longer fits.
            self.meta[i] = (len.min(RECV_BUF_LEN), src, seg, outer);
        }
        Ok(got)
    }

    /// Message `i` of the last [`RecvBatch::recv`]: its bytes, sender, GRO segment size and how
    /// the outer packet arrived.
    pub fn message(&self, i: usize) -> (&[u8], Ipv4Addr, usize, Outer) {
        let (len, src, seg, outer) = self.meta[i];
        (&self.bufs[i][..len], src, seg, outer)
    }

    /// As [`RecvBatch::message`], writable (the receive path fixes checksum fields in place).
    pub fn message_mut(&mut self, i: usize) -> (&mut [u8], Ipv4Addr, usize, Outer) {
        let (len, src, seg, outer) = self.meta[i];
        (&mut self.bufs[i][..len], src, seg, outer)
    }
}

/// One datagram, or a GSO run of same-sized datagrams to one peer.
#[derive(Debug, Clone, Copy)]
pub struct SendGroup {
    /// The peer's address and port.
    pub dst: SocketAddrV4,
    /// Index of the first segment in the caller's segment list.
    pub first: usize,
    /// Number of segments.
    pub count: usize,
    /// Size of every segment but the last (which may be shorter).
    pub seg_len: usize,
    /// Total bytes.
    pub bytes: usize,
}

/// Preallocated state for `sendmmsg`.
pub struct SendBatch {
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in>,
    ctrl: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    gso: bool,
}

// SAFETY: as for RecvBatch: pointers are rebuilt before each use and point at caller data that
// outlives the call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// Room for `segments` segments; GSO when `gso`.
    pub fn new(segments: usize, gso: bool) -> Self {
        // SAFETY: all-zero values of these C structs are valid.
        let (iov, addr, hdr) = unsafe { (zeroed(), zeroed(), zeroed()) };
        Self {
            iovs: vec![iov; segments],
            addrs: vec![addr; segments],
            ctrl: vec![[0; 4]; segments],
            hdrs: vec![hdr; segments],
            gso,
        }
    }

    /// Whether sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Prepares `groups`, whose segments are `segments`: `per_segment` pieces (pointer and
    /// length, valid until the matching [`SendBatch::send`] returns) for each segment, gathered
    /// by the kernel. Returns the number of messages.
    pub fn prepare(
        &mut self,
        groups: &[SendGroup],
        segments: &[(*const u8, usize)],
        per_segment: usize,
    ) -> usize {
        for (s, &(ptr, len)) in segments.iter().enumerate() {
            self.iovs[s] = libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            };
        }
        for (m, g) in groups.iter().enumerate() {
            self.addrs[m] = sockaddr(g.dst);
            let h = &mut self.hdrs[m].msg_hdr;
            h.msg_name = (&raw mut self.addrs[m]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &raw mut self.iovs[g.first * per_segment];
            h.msg_iovlen = g.count * per_segment;
            h.msg_flags = 0;
            if g.count > 1 {
                let ctrl = &mut self.ctrl[m];
                h.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE/LEN are pure arithmetic.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                // SAFETY: the control buffer (32 bytes) holds one cmsg with a u16.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), g.seg_len as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        groups.len()
    }

    /// One non-blocking `sendmmsg` of the prepared messages `from..to`; returns how many were
    /// sent.
    pub fn send(&mut self, fd: RawFd, from: usize, to: usize) -> io::Result<usize> {
        // SAFETY: the headers were prepared by `prepare` and point at data the caller keeps alive.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs[from..to].as_mut_ptr(),
                (to - from) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The raw fd of a socket (for the batch calls).
pub fn raw(socket: &UdpSocket) -> RawFd {
    socket.as_raw_fd()
}
