//! Receive-side coalescing: the decapsulated packets of one `recvmmsg` batch become as few TUN
//! writes as possible.
//!
//! A TUN write costs one trip through the kernel's stack (routing, netfilter, the docker bridge,
//! veth, the container's TCP) however long the packet is, so writing 1.4 KB segments one by one
//! spends the receiving host's CPU on per-packet work. Consecutive in-order segments of one TCP
//! flow are merged into a super-packet handed to the kernel with a virtio-net header saying "TSO,
//! segments of `gso_size`, checksum left to do", as a NIC's GRO would; datagrams of one UDP flow
//! likewise as USO when the device accepts it. The merged packet is never built in memory: a write
//! is a gather of the virtio-net header, the first segment's rewritten headers (kept here) and each
//! segment's payload where `recvmmsg` put it.
//!
//! The kernel trusts a merged packet's checksum, so every segment merged is verified first (one
//! pass over its bytes; the outer UDP checksum cannot be relied on, VXLAN and the eBPF senders
//! leave it zero). Segments that fail are written alone for the kernel to drop and count; those
//! whose checksum a sender's offload left unfinished are merged (or written with "checksum left
//! to do"). The merge rules are the kernel's GRO rules (`tcp_gro_receive`): same addresses,
//! ports, TOS, TTL, DF, ACK number, window and options, the next sequence number, no flags but
//! ACK (ECE alike in every segment, PSH ending the run), every segment the first's size but the
//! last.
//!
//! Pure bookkeeping over pointers: the worker owns the buffers and does the writes.

use super::{
    codec::{self, ChecksumField, Ipv4Summary},
    vnet::{self, F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4, GSO_UDP_L4, VirtioHeader},
};

/// Segments merged into one packet at most (the kernel's own GRO stops at 64 too).
const MAX_SEGMENTS: usize = 64;
/// An IPv4 packet's largest total length.
const MAX_IP_LEN: usize = 65_535;
/// Flows with a run open at once; a further flow closes the oldest.
const MAX_OPEN: usize = 16;
/// The longest IPv4 plus TCP headers.
const MAX_HEADERS: usize = 60 + 60;

const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_ECE: u8 = 0x40;

/// What the device accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalesceOptions {
    /// The device was opened with `IFF_VNET_HDR` and TSO: writes carry a virtio-net header and
    /// TCP runs are merged. Without it every packet is written alone, as it is.
    pub vnet_hdr: bool,
    /// The device accepts USO (`TUN_F_USO4`, Linux 6.2): UDP runs are merged too.
    pub udp: bool,
    /// The device's MTU: the segment size a TCP packet longer than it is cut into.
    pub mtu: usize,
}

/// Why [`Coalescer::push`] refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    /// A TCP packet longer than the MTU whose headers leave no room for a segment (an unsegmented
    /// super-packet of an eBPF sender, handed on as TSO, needs them to).
    #[error("a {len}-byte TCP packet cannot be cut into segments of MTU {mtu}")]
    Oversize {
        /// The packet's length.
        len: usize,
        /// The device's MTU.
        mtu: usize,
    },
}

/// The flow a run belongs to: addresses, ports and protocol.
type FlowKey = [u8; 13];

/// An open run's state.
#[derive(Debug, Clone, Copy)]
struct Run {
    key: FlowKey,
    protocol: u8,
    /// IPv4 and L4 header bytes in `head`.
    l3_len: usize,
    /// The first segment's payload length: every other but the last is as long.
    seg_size: usize,
    /// The payload bytes of the run so far.
    payload: usize,
    /// TCP: the sequence number the next segment must carry.
    next_seq: u32,
    /// The first segment's checksum was left to offload (it matters for a run of one).
    partial: bool,
}

/// One write: the virtio-net header, `head` (a run's rewritten headers; empty for a packet
/// written as it is) and `pieces` (payloads, or the whole packet).
struct Entry {
    vnet: [u8; vnet::LEN],
    head: [u8; MAX_HEADERS],
    head_len: usize,
    pieces: Vec<(*const u8, usize)>,
    run: Option<Run>,
}

/// Groups a batch's packets into writes. See the module documentation.
pub struct Coalescer {
    options: CoalesceOptions,
    entries: Vec<Entry>,
    used: usize,
    /// Entries whose run is still open (a shorter segment, PSH, another flow's eviction or a
    /// segment that could not be appended closes it), oldest first.
    open: Vec<usize>,
}

// SAFETY: the pointers are only stored and handed back to the worker that owns the buffers
// they point into; this type never dereferences them.
unsafe impl Send for Coalescer {}

/// One write [`Coalescer::writes`] yields: the gather list and how many packets it carries.
pub struct Write<'a> {
    entry: &'a Entry,
    vnet_hdr: bool,
}

impl Write<'_> {
    /// Fills `iov` with the write's pieces, in order.
    pub fn iovecs(&self, iov: &mut Vec<libc::iovec>) {
        iov.clear();
        let e = self.entry;
        if self.vnet_hdr {
            iov.push(libc::iovec {
                iov_base: e.vnet.as_ptr().cast_mut().cast(),
                iov_len: vnet::LEN,
            });
        }
        if e.head_len > 0 {
            iov.push(libc::iovec {
                iov_base: e.head.as_ptr().cast_mut().cast(),
                iov_len: e.head_len,
            });
        }
        iov.extend(e.pieces.iter().map(|&(p, len)| libc::iovec {
            iov_base: p.cast_mut().cast(),
            iov_len: len,
        }));
    }

    /// The packets this write carries.
    pub fn packets(&self) -> usize {
        match self.entry.run {
            Some(_) => self.entry.pieces.len(),
            None => 1,
        }
    }

    /// The bytes written (virtio-net header included).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let vnet = if self.vnet_hdr { vnet::LEN } else { 0 };
        vnet + self.entry.head_len + self.entry.pieces.iter().map(|p| p.1).sum::<usize>()
    }
}

impl Coalescer {
    /// A coalescer for batches of at most `capacity` writes.
    pub fn new(options: CoalesceOptions, capacity: usize) -> Self {
        let entries = (0..capacity.max(1))
            .map(|_| Entry {
                vnet: [0; vnet::LEN],
                head: [0; MAX_HEADERS],
                head_len: 0,
                pieces: Vec::with_capacity(MAX_SEGMENTS),
                run: None,
            })
            .collect();
        Self {
            options,
            entries,
            used: 0,
            open: Vec::with_capacity(MAX_OPEN),
        }
    }

    /// Forgets the batch (after its writes are done).
    pub fn reset(&mut self) {
        self.used = 0;
        self.open.clear();
    }

    /// Whether the next push may need a write slot there is none of: write and reset first.
    pub fn is_full(&self) -> bool {
        self.used == self.entries.len()
    }

    /// Adds the decapsulated IPv4 packet `packet` (summarised by `info`): appended to its flow's
    /// open run, or a write of its own. `packet` is referred to, not copied, until [`reset`]; it
    /// may be modified in place (a checksum field). Must not be called when [`is_full`].
    ///
    /// [`reset`]: Coalescer::reset
    /// [`is_full`]: Coalescer::is_full
    pub fn push(&mut self, packet: &mut [u8], info: &Ipv4Summary) -> Result<(), CoalesceError> {
        let packet = &mut packet[..info.total_len];
        if !self.options.vnet_hdr {
            // No header can say "checksum left to do": finish what a sender's offload left.
            codec::complete_if_partial(packet);
            self.single(packet, [0; vnet::LEN]);
            return Ok(());
        }
        let l3 = info.header_len;
        match info.protocol {
            6 if info.total_len > self.options.mtu => self.oversize_tcp(packet),
            6 | 17 => {
                let udp = info.protocol == 17;
                let l4_len = if udp {
                    8
                } else {
                    match packet.get(l3 + 12) {
                        Some(&b) => usize::from(b >> 4) * 4,
                        None => 0,
                    }
                };
                let field = if udp { 6 } else { 16 };
                let check = codec::check_l4_checksum(packet);
                let headers_ok = l4_len >= if udp { 8 } else { 20 }
                    && l3 + l4_len <= info.total_len
                    && codec::internet_checksum(&packet[..l3]) == 0;
                let mergeable = headers_ok
                    && matches!(check, ChecksumField::Valid | ChecksumField::Partial)
                    && (!udp || self.options.udp)
                    && info.total_len > l3 + l4_len
                    && (udp || {
                        let flags = packet[l3 + 13];
                        flags & !(TCP_PSH | TCP_ECE) == TCP_ACK
                    });
                if mergeable {
                    self.merge(packet, l3, l4_len, check == ChecksumField::Partial);
                    return Ok(());
                }
                // A segment that is not merged still ends its flow's run: order within a flow.
                if packet.len() >= l3 + 4 {
                    let key = flow_key(packet, l3);
                    self.close_flow(&key);
                }
                let vnet = match check {
                    ChecksumField::Valid => verified(),
                    ChecksumField::Partial => left_to_offload(packet, l3, info.protocol, field),
                    // Wrong or not checkable: the kernel verifies, drops and counts.
                    ChecksumField::Invalid | ChecksumField::NotApplicable => [0; vnet::LEN],
                };
                self.single(packet, vnet);
                Ok(())
            }
            _ => {
                self.single(packet, [0; vnet::LEN]);
                Ok(())
            }
        }
    }

    /// The writes of the batch so far, in the order they must be made (each run's headers
    /// finished first).
    pub fn writes(&mut self) -> impl Iterator<Item = Write<'_>> {
        for e in &mut self.entries[..self.used] {
            if let Some(run) = e.run {
                finish(e, &run);
            }
        }
        let vnet_hdr = self.options.vnet_hdr;
        self.entries[..self.used]
            .iter()
            .map(move |entry| Write { entry, vnet_hdr })
    }

    /// A TCP packet longer than the MTU: an eBPF sender's GSO skb that crossed veth unsegmented
    /// (never a real wire). Handed to the kernel as TSO, or forwarding it would answer
    /// "fragmentation needed".
    fn oversize_tcp(&mut self, packet: &mut [u8]) -> Result<(), CoalesceError> {
        let mtu = self.options.mtu;
        let refused = CoalesceError::Oversize {
            len: packet.len(),
            mtu,
        };
        let gso = codec::parse_gso(packet, 6, 1).map_err(|_| refused)?;
        let mss = mtu.checked_sub(gso.header_len()).filter(|&m| m > 0);
        let Some(mss) = mss else {
            return Err(refused);
        };
        if !codec::set_pseudo_header_checksum(packet) {
            return Err(refused);
        }
        let key = flow_key(packet, gso.l3_len);
        self.close_flow(&key);
        let vnet = VirtioHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: gso.header_len(),
            gso_size: mss,
            csum_start: gso.l3_len,
            csum_offset: 16,
        }
        .encode();
        self.single(packet, vnet);
        Ok(())
    }

    fn single(&mut self, packet: &[u8], vnet: [u8; vnet::LEN]) {
        let e = &mut self.entries[self.used];
        self.used += 1;
        e.vnet = vnet;
        e.head_len = 0;
        e.run = None;
        e.pieces.clear();
        e.pieces.push((packet.as_ptr(), packet.len()));
    }

    fn close_flow(&mut self, key: &FlowKey) {
        if let Some(pos) = self.open_run(key) {
            self.open.remove(pos);
        }
    }

    fn open_run(&self, key: &FlowKey) -> Option<usize> {
        self.open
            .iter()
            .rposition(|&i| self.entries[i].run.as_ref().is_some_and(|r| r.key == *key))
    }

    /// Appends a verified TCP/UDP segment to its flow's run, or starts a run with it.
    fn merge(&mut self, packet: &[u8], l3: usize, l4_len: usize, partial: bool) {
        let protocol = packet[9];
        let key = flow_key(packet, l3);
        let hl = l3 + l4_len;
        let payload = &packet[hl..];
        let psh = protocol == 6 && packet[l3 + 13] & TCP_PSH != 0;
        if let Some(pos) = self.open_run(&key) {
            let i = self.open[pos];
            let e = &mut self.entries[i];
            let Some(run) = e.run.as_mut() else {
                unreachable!("open runs have run state");
            };
            if appends(
                run,
                &e.head[..e.head_len],
                e.pieces.len(),
                packet,
                hl,
                payload.len(),
            ) {
                e.pieces.push((payload.as_ptr(), payload.len()));
                run.payload += payload.len();
                run.next_seq = run.next_seq.wrapping_add(payload.len() as u32);
                if psh {
                    e.head[l3 + 13] |= TCP_PSH;
                }
                if psh || payload.len() < run.seg_size || e.pieces.len() == MAX_SEGMENTS {
                    self.open.remove(pos);
                }
                return;
            }
            self.open.remove(pos);
        }
        if self.open.len() == MAX_OPEN {
            self.open.remove(0);
        }
        let index = self.used;
        let e = &mut self.entries[index];
        self.used += 1;
        e.head[..hl].copy_from_slice(&packet[..hl]);
        e.head_len = hl;
        e.pieces.clear();
        e.pieces.push((payload.as_ptr(), payload.len()));
        let seq = if protocol == 6 {
            tcp_seq(packet, l3)
        } else {
            0
        };
        e.run = Some(Run {
            key,
            protocol,
            l3_len: l3,
            seg_size: payload.len(),
            payload: payload.len(),
            next_seq: seq.wrapping_add(payload.len() as u32),
            partial,
        });
        if !psh {
            self.open.push(index);
        }
    }
}

/// The sequence number of the TCP segment whose header starts at `l4`.
fn tcp_seq(packet: &[u8], l4: usize) -> u32 {
    u32::from_be_bytes([
        packet[l4 + 4],
        packet[l4 + 5],
        packet[l4 + 6],
        packet[l4 + 7],
    ])
}

fn flow_key(packet: &[u8], l3: usize) -> FlowKey {
    let mut key = [0u8; 13];
    key[..8].copy_from_slice(&packet[12..20]);
    key[8..12].copy_from_slice(&packet[l3..l3 + 4]);
    key[12] = packet[9];
    key
}

/// Whether `packet` (headers `hl` bytes, then `payload_len` bytes) continues the open `run`,
/// whose headers are `head` and which has `segments` segments so far.
fn appends(
    run: &Run,
    head: &[u8],
    segments: usize,
    packet: &[u8],
    hl: usize,
    payload_len: usize,
) -> bool {
    let l3 = run.l3_len;
    if hl != head.len()
        || payload_len > run.seg_size
        || hl + run.payload + payload_len > MAX_IP_LEN
        || segments >= MAX_SEGMENTS
    {
        return false;
    }
    // IPv4: version, IHL and TOS; flags, fragment offset, TTL and protocol; options.
    let same_ip =
        head[..2] == packet[..2] && head[6..10] == packet[6..10] && head[20..l3] == packet[20..l3];
    if !same_ip {
        return false;
    }
    if run.protocol == 17 {
        return true;
    }
    let t = l3;
    // ACK number and data offset; flags but PSH; window; urgent pointer and options.
    tcp_seq(packet, t) == run.next_seq
        && head[t + 8..t + 13] == packet[t + 8..t + 13]
        && (head[t + 13] ^ packet[t + 13]) & !TCP_PSH == 0
        && head[t + 14..t + 16] == packet[t + 14..t + 16]
        && head[t + 18..hl] == packet[t + 18..hl]
}

/// Rewrites a run's headers for the packet it makes: total length, IPv4 checksum, UDP length,
/// the L4 checksum field, and the virtio-net header (TSO/USO for a run of several segments).
fn finish(e: &mut Entry, run: &Run) {
    let l3 = run.l3_len;
    let hl = e.head_len;
    let field = if run.protocol == 17 { 6 } else { 16 };
    if e.pieces.len() == 1 {
        // A run of one is the packet as it arrived, verified (or left to offload by its sender).
        e.vnet = if run.partial {
            left_to_offload(&mut e.head[..hl], l3, run.protocol, field)
        } else {
            verified()
        };
        return;
    }
    let total = hl + run.payload;
    let h = &mut e.head[..hl];
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let ip = codec::internet_checksum(&h[..l3]);
    h[10..12].copy_from_slice(&ip.to_be_bytes());
    let l4_total = total - l3;
    if run.protocol == 17 {
        h[l3 + 4..l3 + 6].copy_from_slice(&(l4_total as u16).to_be_bytes());
    }
    let pseudo = codec::pseudo_header_checksum(h, run.protocol, l4_total);
    h[l3 + field..l3 + field + 2].copy_from_slice(&pseudo.to_be_bytes());
    let gso = if run.protocol == 17 {
        GSO_UDP_L4
    } else {
        GSO_TCPV4
    };
    e.vnet = VirtioHeader {
        flags: F_NEEDS_CSUM,
        gso_type: gso,
        hdr_len: hl,
        gso_size: run.seg_size,
        csum_start: l3,
        csum_offset: field,
    }
    .encode();
}

/// Puts exactly the pseudo-header sum in the checksum field (some senders leave its complement).
fn set_partial(packet: &mut [u8], l3: usize, protocol: u8, field: usize) {
    let l4_len = usize::from(u16::from_be_bytes([packet[2], packet[3]])) - l3;
    let pseudo = codec::pseudo_header_checksum(packet, protocol, l4_len);
    packet[l3 + field..l3 + field + 2].copy_from_slice(&pseudo.to_be_bytes());
}

/// The header of one packet whose checksum was verified.
fn verified() -> [u8; vnet::LEN] {
    VirtioHeader {
        flags: F_DATA_VALID,
        ..Default::default()
    }
    .encode()
}

/// Leaves one packet's checksum (its field at `l3 + field`) to the kernel: the field gets the
/// pseudo-header sum, and the header returned says so.
fn left_to_offload(packet: &mut [u8], l3: usize, protocol: u8, field: usize) -> [u8; vnet::LEN] {
    set_partial(packet, l3, protocol, field);
    VirtioHeader {
        flags: F_NEEDS_CSUM,
        csum_start: l3,
        csum_offset: field,
        ..Default::default()
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MSS: usize = 1400;

    /// `l4_len` zero bytes behind an IPv4 header from 10.5.`src`.2 to 10.5.9.2 for `l4_len` plus
    /// `payload_len` bytes of `protocol`, its checksum complete.
    fn ipv4(src: u8, protocol: u8, df: bool, l4_len: usize, payload_len: usize) -> Vec<u8> {
        let mut p = vec![0u8; 20 + l4_len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4_len + payload_len) as u16).to_be_bytes());
        if df {
            p[6] = 0x40;
        }
        p[8] = 63;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 5, src, 2]);
        p[16..20].copy_from_slice(&[10, 5, 9, 2]);
        let ip = codec::internet_checksum(&p[..20]);
        p[10..12].copy_from_slice(&ip.to_be_bytes());
        p
    }

    /// An IPv4 TCP packet from `src`:`sport` with sequence number `seq`, flags and payload, both
    /// checksums complete; 12 bytes of timestamp option like Linux sends.
    fn tcp(src: u8, sport: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = ipv4(src, 6, true, 32, payload.len());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&502u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p.extend_from_slice(payload);
        set_partial(&mut p, 20, 6, 16);
        assert!(codec::complete_if_partial(&mut p));
        p
    }

    fn udp(src: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = ipv4(src, 17, false, 8, payload.len());
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5000u16.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(payload);
        set_partial(&mut p, 20, 17, 6);
        assert!(codec::complete_if_partial(&mut p));
        p
    }

    fn options() -> CoalesceOptions {
        CoalesceOptions {
            vnet_hdr: true,
            udp: true,
            mtu: 1500,
        }
    }

    /// Pushes every packet (as they would lie in the receive buffers) and returns each write's
    /// bytes, virtio-net header first.
    fn coalesce(options: CoalesceOptions, packets: &mut [Vec<u8>]) -> Vec<Vec<u8>> {
        let mut co = Coalescer::new(options, 128);
        for p in packets.iter_mut() {
            let info = codec::parse_ipv4(p).unwrap();
            co.push(p, &info).unwrap();
        }
        let pushed = packets.len();
        let mut iov = Vec::new();
        let mut out = Vec::new();
        let mut carried = 0;
        for w in co.writes() {
            w.iovecs(&mut iov);
            let mut bytes = Vec::new();
            for v in &iov {
                // SAFETY: the iovecs point into `packets` and the coalescer, both alive here.
                bytes.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                });
            }
            assert_eq!(bytes.len(), w.bytes());
            carried += w.packets();
            out.push(bytes);
        }
        assert_eq!(carried, pushed, "every packet pushed is written once");
        out
    }

    /// Cuts a written packet as the kernel would (by its virtio-net header) and returns the
    /// segments, each verified complete.
    fn segments(w: &[u8]) -> Vec<Vec<u8>> {
        let h = VirtioHeader::parse(w);
        let mut pkt = w[vnet::LEN..].to_vec();
        let protocol = pkt[9];
        if h.gso_type == 0 {
            if h.flags & F_NEEDS_CSUM != 0 {
                assert!(codec::complete_offload_checksum(
                    &mut pkt,
                    h.csum_start,
                    h.csum_offset
                ));
            }
            return vec![pkt];
        }
        // The kernel's segmentation: headers per segment, checksums completed.
        let gso = codec::parse_gso(&pkt, protocol, h.gso_size).unwrap();
        (0..gso.segments())
            .map(|i| {
                let mut s = vec![0u8; gso.header_len()];
                codec::write_segment_headers(&pkt, &gso, i, &mut s).unwrap();
                s.extend_from_slice(&pkt[gso.payload(i)]);
                assert_eq!(codec::check_l4_checksum(&s), ChecksumField::Valid);
                s
            })
            .collect()
    }

    /// A packet without what merging and cutting again may change: IP ID and checksum (the
    /// kernel's segmentation counts IDs up from the first), PSH (it lands on the last segment)
    /// and the TCP checksum of a segment whose sender left it partial.
    fn normalised(p: &[u8]) -> Vec<u8> {
        let mut p = p.to_vec();
        p[4..6].copy_from_slice(&[0, 0]);
        p[10..12].copy_from_slice(&[0, 0]);
        if p[9] == 6 {
            p[33] &= !TCP_PSH;
            p[36..38].copy_from_slice(&[0, 0]);
        }
        p
    }

    fn same(got: &[Vec<u8>], want: &[Vec<u8>]) -> bool {
        got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|(g, w)| normalised(g) == normalised(w))
    }

    fn payload(seed: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + seed * 7) as u8).collect()
    }

    #[test]
    fn in_order_segments_of_one_flow_make_one_tso_write() {
        let data = payload(1, 10 * MSS + 333);
        let mut pkts: Vec<Vec<u8>> = data
            .chunks(MSS)
            .enumerate()
            .map(|(i, c)| tcp(1, 40000, 1000 + (i * MSS) as u32, TCP_ACK, c))
            .collect();
        let originals = pkts.clone();
        let writes = coalesce(options(), &mut pkts);
        assert_eq!(writes.len(), 1);
        let h = VirtioHeader::parse(&writes[0]);
        assert_eq!((h.flags, h.gso_type), (F_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!(
            (h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
            (52, MSS, 20, 16)
        );
        let packet = &writes[0][vnet::LEN..];
        assert_eq!(
            codec::parse_ipv4(packet).unwrap().total_len,
            52 + data.len()
        );
        assert_eq!(codec::internet_checksum(&packet[..20]), 0);
        assert_eq!(&packet[52..], &data[..]);
        assert!(same(&segments(&writes[0]), &originals));
    }

    #[test]
    fn a_gap_a_psh_a_foreign_flag_or_another_flow_ends_a_run() {
        let d = payload(2, MSS);
        let mut pkts = vec![
            tcp(1, 40000, 0, TCP_ACK, &d),
            tcp(1, 40000, MSS as u32, TCP_ACK, &d),
            tcp(2, 40000, 0, TCP_ACK, &d), // another flow: its own run
            tcp(1, 40000, 3 * MSS as u32, TCP_ACK, &d), // a gap: new run
            tcp(2, 40000, MSS as u32, TCP_ACK | TCP_PSH, &d), // PSH: appended, ends the run
            tcp(2, 40000, 2 * MSS as u32, TCP_ACK, &d), // after PSH: new run
            tcp(1, 40000, 4 * MSS as u32, TCP_ACK | 0x01, &d), // FIN: alone, ends flow 1's run
            tcp(1, 40000, 5 * MSS as u32 + 1, TCP_ACK, &d),
        ];
        let originals = pkts.clone();
        let writes = coalesce(options(), &mut pkts);
        let counts: Vec<usize> = writes.iter().map(|w| segments(w).len()).collect();
        assert_eq!(counts, [2, 2, 1, 1, 1, 1]);
        // Flow by flow, the packets come out in the order they went in.
        let out: Vec<Vec<u8>> = writes.iter().flat_map(|w| segments(w)).collect();
        for src in [1u8, 2] {
            let of = |v: &[Vec<u8>]| -> Vec<Vec<u8>> {
                v.iter().filter(|p| p[14] == src).cloned().collect()
            };
            assert!(same(&of(&out), &of(&originals)), "flow {src}");
        }
    }

    #[test]
    fn a_segment_with_a_bad_checksum_goes_alone_for_the_kernel_to_drop() {
        let d = payload(3, MSS);
        let mut bad = tcp(1, 40000, MSS as u32, TCP_ACK, &d);
        bad[100] ^= 0xff;
        let mut pkts = vec![
            tcp(1, 40000, 0, TCP_ACK, &d),
            bad,
            tcp(1, 40000, 2 * MSS as u32, TCP_ACK, &d),
        ];
        let writes = coalesce(options(), &mut pkts);
        assert_eq!(writes.len(), 3);
        assert_eq!(
            VirtioHeader::parse(&writes[1]).flags,
            0,
            "no DATA_VALID, no NEEDS_CSUM: the kernel checks"
        );
        assert_eq!(
            VirtioHeader::parse(&writes[0]).flags,
            F_DATA_VALID,
            "a verified run of one"
        );
    }

    #[test]
    fn unfinished_offload_checksums_are_merged_and_left_to_the_kernel() {
        let data = payload(4, 3 * MSS);
        let mut pkts: Vec<Vec<u8>> = data
            .chunks(MSS)
            .enumerate()
            .map(|(i, c)| {
                let mut p = tcp(1, 40000, (i * MSS) as u32, TCP_ACK, c);
                set_partial(&mut p, 20, 6, 16);
                p
            })
            .collect();
        let mut lone = vec![pkts[0].clone()];
        let writes = coalesce(options(), &mut pkts);
        assert_eq!(writes.len(), 1);
        assert_eq!(segments(&writes[0]).len(), 3);
        let w = coalesce(options(), &mut lone);
        assert_eq!(VirtioHeader::parse(&w[0]).flags, F_NEEDS_CSUM);
        assert_eq!(
            codec::check_l4_checksum(&segments(&w[0])[0]),
            ChecksumField::Valid
        );
    }

    #[test]
    fn udp_datagrams_of_one_flow_merge_when_the_device_takes_uso() {
        let mut pkts: Vec<Vec<u8>> = (0..5).map(|i| udp(1, &payload(i, 64))).collect();
        pkts.push(udp(1, &payload(9, 20)));
        pkts.push(udp(1, &payload(9, 64)));
        let originals = pkts.clone();
        let writes = coalesce(options(), &mut pkts);
        assert_eq!(writes.len(), 2);
        assert_eq!(VirtioHeader::parse(&writes[0]).gso_type, GSO_UDP_L4);
        let out: Vec<Vec<u8>> = writes.iter().flat_map(|w| segments(w)).collect();
        assert!(same(&out, &originals));
        let no_uso = CoalesceOptions {
            udp: false,
            ..options()
        };
        let writes = coalesce(no_uso, &mut originals.clone());
        assert_eq!(writes.len(), originals.len());
        assert!(
            writes
                .iter()
                .all(|w| VirtioHeader::parse(w).flags == F_DATA_VALID)
        );
    }

    #[test]
    fn without_a_virtio_header_every_packet_is_written_as_it_came() {
        let d = payload(5, MSS);
        let mut pkts = vec![
            tcp(1, 1, 0, TCP_ACK, &d),
            tcp(1, 1, MSS as u32, TCP_ACK, &d),
        ];
        let originals = pkts.clone();
        let options = CoalesceOptions {
            vnet_hdr: false,
            udp: false,
            mtu: 1500,
        };
        assert_eq!(coalesce(options, &mut pkts), originals);
    }

    #[test]
    fn a_tcp_packet_over_the_mtu_is_handed_on_as_tso() {
        let data = payload(6, 5000);
        let mut pkts = vec![tcp(1, 1, 0, TCP_ACK, &data)];
        let writes = coalesce(options(), &mut pkts);
        let h = VirtioHeader::parse(&writes[0]);
        assert_eq!((h.gso_type, h.gso_size), (GSO_TCPV4, 1500 - 52));
        assert_eq!(segments(&writes[0]).len(), 4);
        let mut co = Coalescer::new(
            CoalesceOptions {
                mtu: 52,
                ..options()
            },
            4,
        );
        let mut p = tcp(1, 1, 0, TCP_ACK, &data);
        let info = codec::parse_ipv4(&p).unwrap();
        assert!(matches!(
            co.push(&mut p, &info),
            Err(CoalesceError::Oversize { .. })
        ));
    }

    proptest! {
        /// Whatever mix of flows, gaps, flags and sizes arrives, each flow's packets come out
        /// once each and in the order they arrived.
        #[test]
        fn every_flow_keeps_its_packets_and_their_order(
            steps in prop::collection::vec((0u8..3, 0usize..4, 1usize..=MSS, any::<bool>()), 1..120)
        ) {
            let mut seq = [0u32; 3];
            let mut pkts = Vec::new();
            for (i, &(flow, gap, len, psh)) in steps.iter().enumerate() {
                let f = usize::from(flow);
                // A gap now and then (a lost segment), a short segment, a PSH.
                if gap == 0 {
                    seq[f] = seq[f].wrapping_add(MSS as u32);
                }
                let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
                pkts.push(tcp(flow + 1, 7, seq[f], flags, &payload(i, len)));
                seq[f] = seq[f].wrapping_add(len as u32);
            }
            let originals = pkts.clone();
            let out: Vec<Vec<u8>> = coalesce(options(), &mut pkts)
                .iter()
                .flat_map(|w| segments(w))
                .collect();
            for src in 1u8..=3 {
                let of = |v: &[Vec<u8>]| -> Vec<Vec<u8>> {
                    v.iter().filter(|p| p[14] == src).cloned().collect()
                };
                prop_assert!(same(&of(&out), &of(&originals)), "flow {}", src);
            }
        }
    }
}
