//! One forwarding worker: a thread with a current-thread tokio runtime, one TUN queue, one UDP
//! socket, and two loops (TUN -> UDP, UDP -> TUN) over buffers allocated once.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::io::unix::AsyncFd;
use tun_rs::{AsyncDevice, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::{
    ForwarderConfig,
    peers::PeerReader,
    socket::{self, MAX_GSO_BYTES, MAX_GSO_SEGMENTS, RecvBatch, SendBatch, SendGroup},
    stats::Stats,
};
use crate::dataplane::codec::{self, ICMP_NET_UNREACH, ICMP_UNREACH_MAX_LEN, MAX_ENCAP_LEN};

/// Packets handled per batch in either direction.
const SLOTS: usize = 128;
/// TUN reads of one batch stop when fewer slots than one 64 KB super-packet's segments are left.
const SLOTS_PER_READ: usize = 64;
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

fn in_network(ip: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
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
        mut peers: PeerReader,
    ) -> io::Result<()> {
        let offload = self.config.profile.offload();
        let format = self.config.format;
        let hl = format.header_len();
        let seg_cap = MAX_ENCAP_LEN + (self.config.mtu as usize).max(1500);
        let mut orig = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
        let mut bufs: Vec<Vec<u8>> = (0..SLOTS).map(|_| vec![0u8; seg_cap]).collect();
        let mut sizes = vec![0usize; SLOTS];
        let mut groups: Vec<SendGroup> = Vec::with_capacity(SLOTS);
        let mut segs: Vec<(*const u8, usize)> = Vec::with_capacity(SLOTS);
        let mut batch = SendBatch::new(SLOTS, self.gso);
        let mut icmp = RateLimit {
            per_second: self.config.icmp_per_second,
            window: Instant::now(),
            used: 0,
        };
        let icmp_off = if offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let mut icmp_buf: Vec<Vec<u8>> = vec![Vec::with_capacity(icmp_off + ICMP_UNREACH_MAX_LEN)];
        let mut icmp_gro = GROTable::default();
        loop {
            let mut used = match dev
                .recv_multiple(&mut orig, &mut bufs, &mut sizes, MAX_ENCAP_LEN)
                .await
            {
                Ok(n) => n,
                Err(e) if is_fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!("TUN worker {}: read: {e}", self.index);
                    continue;
                }
            };
            if offload {
                // Drain what is queued into the same batch: one sendmmsg for many reads.
                while SLOTS - used >= SLOTS_PER_READ {
                    match dev.try_recv_multiple(
                        &mut orig,
                        &mut bufs[used..],
                        &mut sizes[used..],
                        MAX_ENCAP_LEN,
                    ) {
                        Ok(n) => used += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if is_fatal(&e) => return Err(e),
                        Err(e) => {
                            tracing::debug!("TUN worker {}: read: {e}", self.index);
                            break;
                        }
                    }
                }
            }
            let table = peers.current();
            groups.clear();
            segs.clear();
            let (mut no_peer, mut not_ipv4) = (0, 0);
            for i in 0..used {
                let len = sizes[i];
                let pkt = &bufs[i][MAX_ENCAP_LEN..MAX_ENCAP_LEN + len];
                let Some(dst) = codec::ipv4_destination(pkt) else {
                    not_ipv4 += 1;
                    continue;
                };
                let Some(route) = table.lookup(dst) else {
                    no_peer += 1;
                    if in_network(dst, self.config.network) {
                        self.answer_unreachable(
                            dev,
                            pkt,
                            &mut icmp,
                            &mut icmp_buf,
                            &mut icmp_gro,
                            icmp_off,
                        )
                        .await;
                    }
                    continue;
                };
                let start = MAX_ENCAP_LEN - hl;
                // Cannot fail: the headroom is MAX_ENCAP_LEN >= hl.
                let _ = codec::write_header(
                    &format,
                    route.vtep_mac,
                    &mut bufs[i][start..MAX_ENCAP_LEN],
                );
                let seg_len = hl + len;
                let dst = SocketAddrV4::new(route.public_ip, self.config.port);
                let seg_index = segs.len();
                segs.push((bufs[i][start..].as_ptr(), seg_len));
                // A GSO run: same peer, every segment but the last of the same size.
                if let Some(g) = groups.last_mut()
                    && self.gso
                    && g.dst == dst
                    && g.count < MAX_GSO_SEGMENTS
                    && g.bytes == g.seg_len * g.count
                    && seg_len <= g.seg_len
                    && g.bytes + seg_len <= MAX_GSO_BYTES
                {
                    g.count += 1;
                    g.bytes += seg_len;
                    continue;
                }
                groups.push(SendGroup {
                    dst,
                    first: seg_index,
                    count: 1,
                    seg_len,
                    bytes: seg_len,
                });
            }
            Stats::add(&self.stats.no_peer, no_peer);
            Stats::add(&self.stats.not_ipv4, not_ipv4);
            let messages = batch.prepare(&groups, &segs);
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
        }
    }

    async fn answer_unreachable(
        &self,
        dev: &AsyncDevice,
        offending: &[u8],
        limit: &mut RateLimit,
        buf: &mut [Vec<u8>],
        gro: &mut GROTable,
        off: usize,
    ) {
        if !limit.allow() {
            Stats::add(&self.stats.icmp_rate_limited, 1);
            return;
        }
        let b = &mut buf[0];
        b.clear();
        b.resize(off + ICMP_UNREACH_MAX_LEN, 0);
        // No answer is due (an ICMP error, a later fragment) or possible (not IPv4): stay quiet.
        let Ok(Some(n)) = codec::icmp_unreachable(
            offending,
            self.config.icmp_source,
            ICMP_NET_UNREACH,
            &mut b[off..],
        ) else {
            return;
        };
        b.truncate(off + n);
        match dev.send_multiple(gro, buf, off).await {
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
        let format = self.config.format;
        let off = if offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let mut rb = RecvBatch::new(if offload { RECV_SLOTS } else { 1 });
        // Heads of coalesced TCP flows grow to 64 KB once and keep their capacity.
        let mut out: Vec<Vec<u8>> = (0..SLOTS).map(|_| Vec::with_capacity(off + 2048)).collect();
        let mut gro = GROTable::default();
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
            let (mut not_peer, mut spoofed, mut malformed) = (0u64, 0u64, 0u64);
            let mut k = 0;
            for m in 0..n {
                let (data, src, seg) = rb.message(m);
                let seg = if seg == 0 { data.len().max(1) } else { seg };
                if !table.is_peer(src) {
                    not_peer += data.len().div_ceil(seg).max(1) as u64;
                    continue;
                }
                for d in data.chunks(seg) {
                    match codec::decapsulate(&format, d) {
                        Err(_) => malformed += 1,
                        Ok((_, info)) if !table.owns(src, info.src) => spoofed += 1,
                        Ok((inner, _)) => {
                            let b = &mut out[k];
                            b.clear();
                            b.resize(off, 0);
                            b.extend_from_slice(inner);
                            codec::complete_partial_checksum(&mut b[off..]);
                            k += 1;
                            if k == SLOTS {
                                self.write_tun(dev, &mut gro, &mut out[..k], off).await?;
                                k = 0;
                            }
                        }
                    }
                }
                if data.is_empty() {
                    malformed += 1;
                }
            }
            Stats::add(&self.stats.drop_not_peer, not_peer);
            Stats::add(&self.stats.drop_spoofed, spoofed);
            Stats::add(&self.stats.drop_malformed, malformed);
            if k > 0 {
                self.write_tun(dev, &mut gro, &mut out[..k], off).await?;
            }
        }
    }

    async fn write_tun(
        &self,
        dev: &AsyncDevice,
        gro: &mut GROTable,
        bufs: &mut [Vec<u8>],
        off: usize,
    ) -> io::Result<()> {
        let k = bufs.len() as u64;
        match dev.send_multiple(gro, bufs, off).await {
            Ok(_) => Stats::add(&self.stats.decapsulated, k),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                tracing::debug!("TUN worker {}: write: {e}", self.index);
                Stats::add(&self.stats.tun_write_errors, 1);
            }
        }
        Ok(())
    }
}
