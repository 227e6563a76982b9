//! One forwarding worker: a thread with a current-thread tokio runtime, one TUN queue, one UDP
//! socket, and two loops (TUN -> UDP, UDP -> TUN) over buffers allocated once.

use std::{
    io,
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;
use tun_rs::{AsyncDevice, SyncDevice};

use super::{
    ForwarderConfig,
    coalesce::{CoalesceOptions, Coalescer},
    peers::PeerReader,
    socket::{self, MAX_GSO_BYTES, MAX_GSO_SEGMENTS, RecvBatch, SendBatch, SendGroup},
    stats::Stats,
    vnet::{self, VirtioHeader},
};
use overlay_common::policy::Refusal;

use super::codec::{self, ICMP_NET_UNREACH, ICMP_UNREACH_MAX_LEN, MAX_FORMAT_HEADER};

/// Packets handled per batch in either direction.
const SLOTS: usize = 128;
/// Datagrams (GRO aggregates) per `recvmmsg`.
const RECV_SLOTS: usize = 16;

pub(super) struct Worker {
    pub config: ForwarderConfig,
    pub index: usize,
    pub peers: PeerReader,
    pub stats: Arc<Stats>,
    pub gso: bool,
}

/// Errors after which a queue or socket cannot be used any more (the device was deleted).
fn is_fatal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD | libc::EBADF | libc::ENODEV | libc::ENXIO)
    )
}

/// Adds segment `index` of `len` bytes to `dst` to the batch: to the last message when it extends
/// its GSO run (same peer, every segment but the last of the same size), else as a new message.
fn push_segment(
    groups: &mut Vec<SendGroup>,
    gso: bool,
    dst: SocketAddrV4,
    index: usize,
    len: usize,
) {
    if let Some(g) = groups.last_mut()
        && gso
        && g.dst == dst
        && g.count < MAX_GSO_SEGMENTS
        && g.bytes == g.seg_len * g.count
        && len <= g.seg_len
        && g.bytes + len <= MAX_GSO_BYTES
    {
        g.count += 1;
        g.bytes += len;
        return;
    }
    groups.push(SendGroup {
        dst,
        first: index,
        count: 1,
        seg_len: len,
        bytes: len,
    });
}

/// A segment's header slot: the format's header and the longest IPv4 and TCP headers.
const SEG_HDR: usize = MAX_FORMAT_HEADER + 60 + 60;
/// TUN reads (super-packets of up to 64 KB) gathered into one batch.
const READS: usize = 8;

/// What answering "destination unreachable" needs (see `Worker::unreachable`).
struct Unreachable {
    limit: RateLimit,
    buf: [u8; vnet::LEN + ICMP_UNREACH_MAX_LEN],
    /// Where the ICMP packet starts in `buf`: after the virtio-net header, if the device has one.
    off: usize,
}

/// At most `per_second` answers per one-second window.
struct RateLimit {
    per_second: u32,
    window: Instant,
    used: u32,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

impl Worker {
    pub fn run(
        self,
        dev: SyncDevice,
        sock: UdpSocket,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("TUN worker {}: no tokio runtime: {e}", self.index);
                return;
            }
        };
        rt.block_on(async move {
            let dev = match AsyncDevice::new(dev) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("TUN worker {}: registering the TUN queue: {e}", self.index);
                    return;
                }
            };
            // SAFETY: the socket is owned by the AsyncFd and closed only when it is dropped.
            let sock = match unsafe { AsyncFd::register(sock) } {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("TUN worker {}: registering the UDP socket: {e}", self.index);
                    return;
                }
            };
            let rx_peers = self.peers.clone();
            let tx_peers = self.peers.clone();
            tokio::select! {
                r = self.tun_to_udp(&dev, &sock, tx_peers) => {
                    if let Err(e) = r {
                        tracing::error!("TUN worker {}: reading {} stopped: {e}", self.index, self.config.device);
                    }
                }
                r = self.udp_to_tun(&dev, &sock, rx_peers) => {
                    if let Err(e) = r {
                        tracing::error!("TUN worker {}: writing {} stopped: {e}", self.index, self.config.device);
                    }
                }
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }

    async fn tun_to_udp(
        &self,
        dev: &AsyncDevice,
        sock: &AsyncFd<UdpSocket>,
        peers: PeerReader,
    ) -> io::Result<()> {
        if self.config.profile.offload() {
            self.tun_to_udp_offload(dev, sock, peers).await
        } else {
            self.tun_to_udp_copy(dev, sock, peers).await
        }
    }

    /// The offload path: reads super-packets with their virtio-net header and cuts TCP/UDP ones
    /// into segments without copying them: each segment goes out as two pieces gathered by the
    /// kernel, its headers (format header, IPv4, TCP/UDP, written in a small slot) and its
    /// payload (in the read buffer). The one pass over the payload in user space is the inner
    /// checksum, which must be complete on the wire: flannel's peers and the eBPF path deliver
    /// the inner packet as it is.
    async fn tun_to_udp_offload(
        &self,
        dev: &AsyncDevice,
        sock: &AsyncFd<UdpSocket>,
        mut peers: PeerReader,
    ) -> io::Result<()> {
        let format = self.config.format();
        let hl = format.header_len();
        let mut reads: Vec<Vec<u8>> = (0..READS).map(|_| vec![0u8; vnet::LEN + 65_535]).collect();
        let mut hdrs: Vec<[u8; SEG_HDR]> = vec![[0; SEG_HDR]; SLOTS];
        let mut pieces: Vec<(*const u8, usize)> = Vec::with_capacity(2 * SLOTS);
        let mut groups: Vec<SendGroup> = Vec::with_capacity(SLOTS);
        let mut batch = SendBatch::new(2 * SLOTS, self.gso);
        let mut icmp = self.unreachable();
        loop {
            let mut len = match dev.recv(&mut reads[0]).await {
                Ok(n) => n,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!("TUN worker {}: read: {e}", self.index);
                    continue;
                }
            };
            let table = peers.current();
            let (mut no_peer, mut not_ipv4, mut malformed) = (0u64, 0u64, 0u64);
            let mut r = 0;
            loop {
                let (vh, pkt) = reads[r][..len].split_at_mut(vnet::LEN.min(len));
                let hdr = VirtioHeader::parse(vh);
                'packet: {
                    let Some(dst) = codec::ipv4_destination(pkt) else {
                        not_ipv4 += 1;
                        break 'packet;
                    };
                    let Some(route) = table.lookup(dst) else {
                        no_peer += 1;
                        if self.config.network.contains_ip(dst) {
                            self.answer_unreachable(dev, pkt, &mut icmp).await;
                        }
                        break 'packet;
                    };
                    let dst = SocketAddrV4::new(route.public_ip, self.config.port());
                    let protocol = match hdr.gso_type {
                        vnet::GSO_NONE => None,
                        vnet::GSO_TCPV4 => Some(6),
                        vnet::GSO_UDP_L4 => Some(17),
                        // TCPv6 and the like: not an IPv4 overlay packet.
                        _ => {
                            malformed += 1;
                            break 'packet;
                        }
                    };
                    let gso = match protocol.map(|p| codec::parse_gso(pkt, p, hdr.gso_size)) {
                        None => None,
                        Some(Ok(g)) => Some(g),
                        Some(Err(_)) => {
                            malformed += 1;
                            break 'packet;
                        }
                    };
                    let Some(gso) = gso else {
                        // One packet; its checksum may be left to offload.
                        if hdr.flags & vnet::F_NEEDS_CSUM != 0
                            && !codec::complete_offload_checksum(
                                pkt,
                                hdr.csum_start,
                                hdr.csum_offset,
                            )
                        {
                            malformed += 1;
                            break 'packet;
                        }
                        let Ok(info) = codec::parse_ipv4(pkt) else {
                            not_ipv4 += 1;
                            break 'packet;
                        };
                        if pieces.len() == 2 * SLOTS {
                            self.send_batch(sock, &mut batch, &mut groups, &mut pieces, 2)
                                .await?;
                        }
                        let slot = pieces.len() / 2;
                        let _ = codec::write_header(&format, route.vtep_mac.0, &mut hdrs[slot]);
                        pieces.push((hdrs[slot].as_ptr(), hl));
                        pieces.push((pkt.as_ptr(), info.total_len));
                        push_segment(&mut groups, self.gso, dst, slot, hl + info.total_len);
                        break 'packet;
                    };
                    let pkt = &*pkt;
                    for i in 0..gso.segments() {
                        if pieces.len() == 2 * SLOTS {
                            self.send_batch(sock, &mut batch, &mut groups, &mut pieces, 2)
                                .await?;
                        }
                        let slot = pieces.len() / 2;
                        let h = &mut hdrs[slot];
                        let _ = codec::write_header(&format, route.vtep_mac.0, h);
                        // Cannot fail: the slot holds the longest headers.
                        let Ok(n) = codec::write_segment_headers(pkt, &gso, i, &mut h[hl..]) else {
                            break;
                        };
                        let payload = &pkt[gso.payload(i)];
                        pieces.push((h.as_ptr(), hl + n));
                        pieces.push((payload.as_ptr(), payload.len()));
                        push_segment(&mut groups, self.gso, dst, slot, hl + n + payload.len());
                    }
                }
                r += 1;
                if r == READS {
                    break;
                }
                // Drain what is queued into the same batch: one sendmmsg for many reads.
                len = match dev.try_recv(&mut reads[r]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if is_fatal(&e) => return Err(e),
                    Err(e) => {
                        tracing::debug!("TUN worker {}: read: {e}", self.index);
                        break;
                    }
                };
            }
            Stats::add(&self.stats.no_peer, no_peer);
            Stats::add(&self.stats.not_ipv4, not_ipv4 + malformed);
            self.send_batch(sock, &mut batch, &mut groups, &mut pieces, 2)
                .await?;
        }
    }

    /// Without offloads: packets one by one, copied behind the headroom for the format's header.
    async fn tun_to_udp_copy(
        &self,
        dev: &AsyncDevice,
        sock: &AsyncFd<UdpSocket>,
        mut peers: PeerReader,
    ) -> io::Result<()> {
        let format = self.config.format();
        let hl = format.header_len();
        let seg_cap = MAX_FORMAT_HEADER + (self.config.mtu as usize).max(1500);
        let mut orig = vec![0u8; vnet::LEN + 65_535];
        let mut bufs: Vec<Vec<u8>> = (0..SLOTS).map(|_| vec![0u8; seg_cap]).collect();
        let mut sizes = vec![0usize; SLOTS];
        let mut groups: Vec<SendGroup> = Vec::with_capacity(SLOTS);
        let mut segs: Vec<(*const u8, usize)> = Vec::with_capacity(SLOTS);
        let mut batch = SendBatch::new(SLOTS, self.gso);
        let mut icmp = self.unreachable();
        loop {
            let used = match dev
                .recv_multiple(&mut orig, &mut bufs, &mut sizes, MAX_FORMAT_HEADER)
                .await
            {
                Ok(n) => n,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!("TUN worker {}: read: {e}", self.index);
                    continue;
                }
            };
            let table = peers.current();
            let (mut no_peer, mut not_ipv4) = (0, 0);
            for i in 0..used {
                let len = sizes[i];
                let pkt = &bufs[i][MAX_FORMAT_HEADER..MAX_FORMAT_HEADER + len];
                let Some(dst) = codec::ipv4_destination(pkt) else {
                    not_ipv4 += 1;
                    continue;
                };
                let Some(route) = table.lookup(dst) else {
                    no_peer += 1;
                    if self.config.network.contains_ip(dst) {
                        self.answer_unreachable(dev, pkt, &mut icmp).await;
                    }
                    continue;
                };
                let start = MAX_FORMAT_HEADER - hl;
                // Cannot fail: the headroom is MAX_FORMAT_HEADER >= hl.
                let _ = codec::write_header(
                    &format,
                    route.vtep_mac.0,
                    &mut bufs[i][start..MAX_FORMAT_HEADER],
                );
                let seg_len = hl + len;
                let dst = SocketAddrV4::new(route.public_ip, self.config.port());
                let seg_index = segs.len();
                segs.push((bufs[i][start..].as_ptr(), seg_len));
                push_segment(&mut groups, self.gso, dst, seg_index, seg_len);
            }
            Stats::add(&self.stats.no_peer, no_peer);
            Stats::add(&self.stats.not_ipv4, not_ipv4);
            self.send_batch(sock, &mut batch, &mut groups, &mut segs, 1)
                .await?;
        }
    }

    /// Sends `groups` (each `per_segment` pieces a segment in `pieces`), skipping a message whose
    /// send fails, and empties both for the next batch.
    async fn send_batch(
        &self,
        sock: &AsyncFd<UdpSocket>,
        batch: &mut SendBatch,
        groups: &mut Vec<SendGroup>,
        pieces: &mut Vec<(*const u8, usize)>,
        per_segment: usize,
    ) -> io::Result<()> {
        let messages = batch.prepare(groups, pieces, per_segment);
        let mut from = 0;
        while from < messages {
            let mut guard = sock.writable().await?;
            match guard.try_io(|s| batch.send(socket::raw(s.get_ref()), from, messages)) {
                Err(_would_block) => continue,
                Ok(Ok(n)) => {
                    let sent: usize = groups[from..from + n].iter().map(|g| g.count).sum();
                    Stats::add(&self.stats.encapsulated, sent as u64);
                    from += n;
                }
                Ok(Err(e)) => {
                    // The first message failed (no route to the peer, ...): skip it.
                    tracing::debug!(
                        "TUN worker {}: send to {}: {e}",
                        self.index,
                        groups[from].dst
                    );
                    Stats::add(&self.stats.send_errors, groups[from].count as u64);
                    from += 1;
                }
            }
        }
        groups.clear();
        pieces.clear();
        Ok(())
    }

    /// The state for answering "unreachable": the rate limit and a buffer with room for the
    /// virtio-net header (left zero: no offload) when the device has one.
    fn unreachable(&self) -> Unreachable {
        Unreachable {
            limit: RateLimit {
                per_second: self.config.icmp_per_second,
                window: Instant::now(),
                used: 0,
            },
            buf: [0; vnet::LEN + ICMP_UNREACH_MAX_LEN],
            off: if self.config.profile.offload() {
                vnet::LEN
            } else {
                0
            },
        }
    }

    async fn answer_unreachable(&self, dev: &AsyncDevice, offending: &[u8], u: &mut Unreachable) {
        if !u.limit.allow() {
            Stats::add(&self.stats.icmp_rate_limited, 1);
            return;
        }
        // No answer is due (an ICMP error, a later fragment) or possible (not IPv4): stay quiet.
        let Ok(Some(n)) = codec::icmp_unreachable(
            offending,
            self.config.icmp_source,
            ICMP_NET_UNREACH,
            &mut u.buf[u.off..],
        ) else {
            return;
        };
        match dev.send(&u.buf[..u.off + n]).await {
            Ok(_) => Stats::add(&self.stats.icmp_sent, 1),
            Err(e) => {
                tracing::debug!("TUN worker {}: ICMP write: {e}", self.index);
                Stats::add(&self.stats.tun_write_errors, 1);
            }
        }
    }

    async fn udp_to_tun(
        &self,
        dev: &AsyncDevice,
        sock: &AsyncFd<UdpSocket>,
        mut peers: PeerReader,
    ) -> io::Result<()> {
        let offload = self.config.profile.offload();
        let mut rb = RecvBatch::new(if offload { RECV_SLOTS } else { 1 });
        let mut co = Coalescer::new(
            CoalesceOptions {
                vnet_hdr: offload,
                udp: offload && dev.udp_gso(),
                mtu: self.config.mtu as usize,
            },
            SLOTS,
        );
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 + 64);
        loop {
            let n = {
                let mut guard = sock.readable().await?;
                match guard.try_io(|s| rb.recv(socket::raw(s.get_ref()))) {
                    Err(_would_block) => continue,
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if is_fatal(&e) => return Err(e),
                    Ok(Err(e)) => {
                        tracing::debug!("TUN worker {}: recv: {e}", self.index);
                        continue;
                    }
                }
            };
            let table = peers.current();
            let mut refused = [0u64; Refusal::ALL.len()];
            let mut oversize = 0u64;
            for m in 0..n {
                let (data, src, seg, outer) = rb.message_mut(m);
                let seg = if seg == 0 { data.len().max(1) } else { seg };
                if data.is_empty() {
                    // The policy's verdict on an empty datagram, without a chunk to judge.
                    let reason = match codec::receive(&self.config.host, table, src, outer, data) {
                        Err(reason) => reason,
                        Ok(_) => Refusal::Malformed,
                    };
                    refused[reason.index()] += 1;
                }
                for d in data.chunks_mut(seg) {
                    let (header, info) =
                        match codec::receive(&self.config.host, table, src, outer, d) {
                            Err(reason) => {
                                refused[reason.index()] += 1;
                                continue;
                            }
                            Ok(accepted) => accepted,
                        };
                    // The inner packet starts right after the format's header.
                    if co.push(&mut d[header..], &info).is_err() {
                        oversize += 1;
                    }
                    if co.is_full() {
                        self.write_tun(dev, &mut co, &mut iov).await?;
                    }
                }
            }
            self.stats.add_refused(&refused);
            Stats::add(&self.stats.coalesce_errors, oversize);
            self.write_tun(dev, &mut co, &mut iov).await?;
        }
    }

    /// Makes the coalescer's writes, then resets it. A write that fails is counted and skipped.
    async fn write_tun(
        &self,
        dev: &AsyncDevice,
        co: &mut Coalescer,
        iov: &mut Vec<libc::iovec>,
    ) -> io::Result<()> {
        let (mut written, mut failed) = (0u64, 0u64);
        for w in co.writes() {
            w.iovecs(iov);
            loop {
                // SAFETY: the iovecs point at the coalescer's headers and at the receive batch's
                // buffers, neither touched until the coalescer is reset after these writes.
                let r = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
                if r >= 0 {
                    written += w.packets() as u64;
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    dev.writable().await?;
                    continue;
                }
                if is_fatal(&e) {
                    return Err(e);
                }
                tracing::debug!("TUN worker {}: write: {e}", self.index);
                failed += 1;
                break;
            }
        }
        co.reset();
        Stats::add(&self.stats.decapsulated, written);
        Stats::add(&self.stats.tun_write_errors, failed);
        Ok(())
    }
}
