//! flannel's two wire formats as pure functions over byte slices, for the TUN datapath.
//!
//! What goes on the wire is the UDP payload; the kernel's UDP socket writes the outer IPv4 and
//! UDP headers. The payloads are byte-identical to what the eBPF path (`overlay-ebpf/src/wire.rs`)
//! and flannel write:
//! - `udp`: the inner IPv4 packet is the whole payload;
//! - `vxlan`: an 8-byte VXLAN header (flags 0x08, VNI) and an inner Ethernet header (dst = the
//!   peer's VtepMAC, src = ours, ethertype IPv4) in front of the inner packet.
//!
//! Nothing here does I/O or allocates, so everything is property-tested and fuzzed
//! (`fuzz/fuzz_targets/codec.rs`). The checks that need the peer table (is the sender a peer,
//! does the inner source belong to it) are the forwarder's.

use std::net::Ipv4Addr;

use overlay_common::{
    maps::{Config, Encap},
    policy::{self, Outer, Peers, Refusal},
};

pub use overlay_common::wire::{
    ETH_LEN, ETH_P_IP, IPPROTO_ICMP, IPV4_MIN_LEN, MAX_FORMAT_HEADER, VXLAN_FLAG_VNI,
    VXLAN_FORMAT_HEADER, VXLAN_LEN, vxlan_format_header,
};
/// ICMP "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Code "network unreachable", which flannel's proxy answers for Network addresses no peer owns.
pub const ICMP_NET_UNREACH: u8 = 0;
/// The longest "destination unreachable" message [`icmp_unreachable`] builds: outer IPv4 + ICMP
/// + the offending packet's header (at most 60 bytes) + 8 bytes of its payload.
pub const ICMP_UNREACH_MAX_LEN: usize = IPV4_MIN_LEN + 8 + 60 + 8;

/// Which of flannel's formats, with what this host puts in every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// flannel's `udp` backend: the inner IPv4 packet is the whole UDP payload.
    Udp,
    /// `vxlan`: VXLAN header and inner Ethernet header before the inner packet.
    Vxlan {
        /// Our VNI (24 bits); received packets must carry it.
        vni: u32,
        /// Our VtepMAC: the inner source we send, the inner destination we accept.
        local_mac: [u8; 6],
    },
}

impl Format {
    /// The format a host's program config describes (`OverlaySpec::program_config`).
    pub fn of(cfg: &Config) -> Format {
        match Encap::from_u8(cfg.encap) {
            Encap::Vxlan => Format::Vxlan {
                vni: cfg.vni,
                local_mac: cfg.vtep_mac,
            },
            _ => Format::Udp,
        }
    }

    /// How many bytes the format puts in front of the inner packet.
    pub fn header_len(&self) -> usize {
        match self {
            Format::Udp => Encap::Udp.format_header(),
            Format::Vxlan { .. } => Encap::Vxlan.format_header(),
        }
    }
}

/// Why a datagram or packet was refused. Each is a drop reason the forwarder counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// Shorter than the headers it must carry.
    #[error("{len} bytes are shorter than the {need}-byte headers")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The inner packet is not IPv4.
    #[error("inner packet has IP version {version}, not 4")]
    NotIpv4 {
        /// The version nibble.
        version: u8,
    },
    /// The IPv4 header length field is below 20 bytes or beyond the packet.
    #[error("IPv4 header length {header_len} does not fit a {len}-byte packet")]
    BadHeaderLength {
        /// IHL * 4.
        header_len: usize,
        /// The packet's length.
        len: usize,
    },
    /// The IPv4 total length is shorter than its header or longer than the bytes received.
    #[error("IPv4 total length {total_len} does not fit {len} bytes (header {header_len})")]
    BadTotalLength {
        /// The total length field.
        total_len: usize,
        /// The bytes available.
        len: usize,
        /// IHL * 4.
        header_len: usize,
    },
    /// The output buffer is too small.
    #[error("output buffer of {len} bytes cannot hold {need}")]
    BufferTooSmall {
        /// Its length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
}

/// What the forwarder needs of an IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Summary {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IHL * 4.
    pub header_len: usize,
    /// The total length field: the packet's real length (anything after it is padding).
    pub total_len: usize,
    /// The protocol number.
    pub protocol: u8,
}

/// Validates an IPv4 packet's header and returns what the forwarder needs.
pub fn parse_ipv4(packet: &[u8]) -> Result<Ipv4Summary, CodecError> {
    let len = packet.len();
    if len < IPV4_MIN_LEN {
        return Err(CodecError::Truncated {
            len,
            need: IPV4_MIN_LEN,
        });
    }
    let version = packet[0] >> 4;
    if version != 4 {
        return Err(CodecError::NotIpv4 { version });
    }
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_LEN || header_len > len {
        return Err(CodecError::BadHeaderLength { header_len, len });
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total_len < header_len || total_len > len {
        return Err(CodecError::BadTotalLength {
            total_len,
            len,
            header_len,
        });
    }
    Ok(Ipv4Summary {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        header_len,
        total_len,
        protocol: packet[9],
    })
}

/// Writes the format's header for a packet to the peer with VtepMAC `peer_mac` (ignored by
/// `udp`) into the first [`Format::header_len`] bytes of `out`; returns that length.
pub fn write_header(
    format: &Format,
    peer_mac: [u8; 6],
    out: &mut [u8],
) -> Result<usize, CodecError> {
    let need = format.header_len();
    let Some(h) = out.get_mut(..need) else {
        return Err(CodecError::BufferTooSmall {
            len: out.len(),
            need,
        });
    };
    if let Format::Vxlan { vni, local_mac } = format {
        h.copy_from_slice(&vxlan_format_header(*vni, peer_mac, *local_mac));
    }
    Ok(need)
}

/// Encapsulates `inner` (an IPv4 packet) for the peer with VtepMAC `peer_mac` into `out`; returns
/// the UDP payload's length. The inner packet is validated first, so nothing malformed is sent.
pub fn encapsulate(
    format: &Format,
    peer_mac: [u8; 6],
    inner: &[u8],
    out: &mut [u8],
) -> Result<usize, CodecError> {
    let info = parse_ipv4(inner)?;
    let inner = &inner[..info.total_len];
    let need = format.header_len() + inner.len();
    if out.len() < need {
        return Err(CodecError::BufferTooSmall {
            len: out.len(),
            need,
        });
    }
    let h = write_header(format, peer_mac, out)?;
    out[h..need].copy_from_slice(inner);
    Ok(need)
}

/// The TUN datapath's receive decision: the shared receive policy
/// ([`overlay_common::policy::judge`], the same the eBPF decap runs) on a datagram from `sender`,
/// then where the inner packet starts in the payload and its summary (its `total_len` is where it
/// ends; what follows is padding).
pub fn receive<P: Peers>(
    cfg: &Config,
    peers: &P,
    sender: Ipv4Addr,
    outer: Outer,
    payload: &[u8],
) -> Result<(usize, Ipv4Summary), Refusal> {
    // The policy has read and checked the inner header: its summary is the forwarder's, with no
    // second parse per packet.
    let a = policy::judge(cfg, peers, sender.octets(), outer, payload)?;
    let info = Ipv4Summary {
        src: Ipv4Addr::from(a.src),
        dst: Ipv4Addr::from(a.dst),
        header_len: a.header_len,
        total_len: a.inner_len,
        protocol: a.protocol,
    };
    Ok((a.inner, info))
}

/// Decapsulates a datagram by the format alone, trusting any sender and any addresses: for
/// round trips of the wire format and fuzzing, where no peer table exists.
pub fn decapsulate<'a>(
    format: &Format,
    payload: &'a [u8],
) -> Result<(&'a [u8], Ipv4Summary), Refusal> {
    struct Anyone;
    impl Peers for Anyone {
        fn is_peer(&self, _: [u8; 4]) -> bool {
            true
        }
        fn owner(&self, _: [u8; 4]) -> Option<[u8; 4]> {
            Some([0; 4])
        }
    }
    let (encap, vni, vtep_mac) = match *format {
        Format::Udp => (Encap::Udp, 0, [0; 6]),
        Format::Vxlan { vni, local_mac } => (Encap::Vxlan, vni, local_mac),
    };
    let cfg = Config {
        encap: encap as u8,
        vni,
        vtep_mac,
        // /0: every destination is local.
        subnet_prefix_len: 0,
        ..Config::default()
    };
    let (start, info) = receive(
        &cfg,
        &Anyone,
        Ipv4Addr::UNSPECIFIED,
        Outer::default(),
        payload,
    )?;
    Ok((&payload[start..start + info.total_len], info))
}

/// The destination of an IPv4 packet, if it has one: the forwarder's fast peek before lookup.
pub fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    let b = packet.get(..IPV4_MIN_LEN)?;
    (b[0] >> 4 == 4).then(|| Ipv4Addr::new(b[16], b[17], b[18], b[19]))
}

/// RFC 1071 checksum of `data` (a zero checksum field included in it).
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What [`complete_partial_checksum`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    /// Not TCP or UDP, a fragment, or UDP without a checksum: nothing to check.
    NotApplicable,
    /// The checksum verifies.
    Valid,
    /// The field held only the pseudo-header sum (a sender's checksum offload never completed,
    /// e.g. across veth); it has been completed.
    Completed,
    /// Wrong, and not an offload artefact: left as it is, for the receiving stack to drop.
    Invalid,
}

/// The one's-complement sum of `data`'s 16-bit words on top of `sum`, folded to 32 bits.
///
/// The bulk is summed as native-endian 32-bit words into a 64-bit accumulator, a loop the
/// compiler vectorises; it is on the forwarding path for every byte (the inner checksum on send,
/// its verification on receive). One's-complement addition does not care about byte order
/// beyond a swap of the folded result (RFC 1071, 2.(B)), and a 64-bit accumulator of 32-bit
/// words cannot overflow below 2^32 words.
fn sum16(data: &[u8], sum: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above; the answer is cached).
        return unsafe { sum16_avx2(data, sum) };
    }
    sum16_words(data, sum)
}

/// [`sum16_words`] compiled for AVX2: the same loop, vectorised 32 bytes at a time instead of
/// the baseline's 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum16_avx2(data: &[u8], sum: u32) -> u32 {
    sum16_words(data, sum)
}

#[inline(always)]
fn sum16_words(data: &[u8], sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(4);
    let mut acc: u64 = (&mut chunks)
        .map(|c| u64::from(u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
        .sum();
    let rest = chunks.remainder();
    if !rest.is_empty() {
        // Zero-padded at the end: an odd last byte is the high byte of its big-endian word.
        let mut last = [0u8; 4];
        last[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_ne_bytes(last));
    }
    let folded = u32::from(fold64(acc));
    // Back to big-endian words (a no-op on big-endian machines).
    let be = u32::from(u16::from_be(folded as u16));
    let total = u64::from(be) + u64::from(sum);
    ((total & 0xffff_ffff) + (total >> 32)) as u32
}

/// Folds a 64-bit one's-complement accumulator to 16 bits (in the byte order it was summed in).
fn fold64(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What a packet's TCP/UDP checksum field holds ([`check_l4_checksum`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumField {
    /// Not TCP or UDP, a fragment, or UDP without a checksum: nothing to check.
    NotApplicable,
    /// The checksum verifies.
    Valid,
    /// Only the pseudo-header sum: a sender's checksum offload that was never completed (an
    /// eBPF encapsulation across veth, where no NIC finishes it).
    Partial,
    /// Wrong, and not an offload artefact.
    Invalid,
}

/// Reads the TCP/UDP checksum of an IPv4 packet against its bytes: one pass over the segment,
/// nothing written. The receive path's coalescing verifies every segment it merges with this,
/// because the merged packet goes to the kernel as already checked.
pub fn check_l4_checksum(packet: &[u8]) -> ChecksumField {
    let Some((info, at, pseudo)) = l4_checksum_site(packet) else {
        return ChecksumField::NotApplicable;
    };
    if l4_sum(packet, &info, pseudo) == 0xffff {
        return ChecksumField::Valid;
    }
    if holds_pseudo_header_sum(packet, at, pseudo) {
        ChecksumField::Partial
    } else {
        ChecksumField::Invalid
    }
}

/// The folded sum of the TCP/UDP segment in `packet` (checksum field included) on top of its
/// pseudo-header sum: 0xffff when the checksum verifies. The pass over every payload byte.
fn l4_sum(packet: &[u8], info: &Ipv4Summary, pseudo: u16) -> u16 {
    fold(sum16(
        &packet[info.header_len..info.total_len],
        u32::from(pseudo),
    ))
}

/// Whether the checksum field at `at` holds the pseudo-header sum `pseudo` (or its complement,
/// as some senders leave it): a checksum left to offload and never finished.
fn holds_pseudo_header_sum(packet: &[u8], at: usize, pseudo: u16) -> bool {
    let stored = u16::from_be_bytes([packet[at], packet[at + 1]]);
    overlay_common::wire::is_unfinished_checksum(stored, pseudo)
}

/// Where an unfragmented IPv4 TCP/UDP packet keeps its L4 checksum: the summary, the field's
/// offset and the pseudo-header sum. None for anything else, and for UDP without a checksum.
fn l4_checksum_site(packet: &[u8]) -> Option<(Ipv4Summary, usize, u16)> {
    let (info, at) = l4_checksum_field(packet)?;
    if info.protocol == 17 && packet[at] == 0 && packet[at + 1] == 0 {
        return None;
    }
    let pseudo = pseudo_header_checksum(packet, info.protocol, info.total_len - info.header_len);
    Some((info, at, pseudo))
}

/// The summary and the checksum field's offset of an unfragmented IPv4 TCP/UDP packet.
fn l4_checksum_field(packet: &[u8]) -> Option<(Ipv4Summary, usize)> {
    let info = parse_ipv4(packet).ok()?;
    let frag = u16::from_be_bytes([packet[6], packet[7]]);
    let field = overlay_common::wire::l4_checksum_offset(info.protocol)?;
    // Fragments (MF or an offset) carry part of the segment only.
    if frag & 0x3fff != 0 || info.total_len < info.header_len + field + 2 {
        return None;
    }
    Some((info, info.header_len + field))
}

/// The pseudo-header sum (folded, not complemented) of the IPv4 header `ip` for `l4_len` bytes of
/// protocol `protocol`: what a TCP/UDP checksum field holds while the checksum is left to
/// offload (`CHECKSUM_PARTIAL`). `ip` must hold at least the first 20 bytes of the header.
pub fn pseudo_header_checksum(ip: &[u8], protocol: u8, l4_len: usize) -> u16 {
    // An IPv4 packet's, or a coalesced run's (bounded by the IPv4 total length), so it fits.
    debug_assert!(l4_len <= usize::from(u16::MAX));
    let addr = |r: core::ops::Range<usize>| -> [u8; 4] { ip[r].try_into().expect("4 bytes") };
    overlay_common::wire::pseudo_header_sum(addr(12..16), addr(16..20), protocol, l4_len as u16)
}

/// Completes the TCP/UDP checksum of a decapsulated IPv4 packet whose sender left it to
/// checksum offload. A sender's kernel that encapsulates in eBPF (with a zero outer UDP checksum)
/// passes such packets on unfinished when no NIC computes them (veth); the receiving kernel
/// would drop them. A packet whose checksum is wrong in any other way is left alone.
pub fn complete_partial_checksum(packet: &mut [u8]) -> L4Checksum {
    match check_l4_checksum(packet) {
        ChecksumField::NotApplicable => L4Checksum::NotApplicable,
        ChecksumField::Valid => L4Checksum::Valid,
        ChecksumField::Invalid => L4Checksum::Invalid,
        ChecksumField::Partial => {
            complete_if_partial(packet);
            L4Checksum::Completed
        }
    }
}

/// The cheap form of [`complete_partial_checksum`], for a TUN device without a virtio-net header
/// (which could leave the rest to the kernel): completes the TCP/UDP checksum when the field
/// holds exactly the pseudo-header sum (a sender's unfinished checksum offload), and otherwise
/// reads only the headers, verifying nothing, since the kernel verifies what it receives.
/// Returns whether it completed the checksum. (A valid checksum that happens to equal the
/// pseudo-header sum is recomputed to the same value.)
pub fn complete_if_partial(packet: &mut [u8]) -> bool {
    let Some((info, at, pseudo)) = l4_checksum_site(packet) else {
        return false;
    };
    if !holds_pseudo_header_sum(packet, at, pseudo) {
        return false;
    }
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    let mut csum = !l4_sum(packet, &info, pseudo);
    if info.protocol == 17 && csum == 0 {
        csum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// A TCP (TSO) or UDP (USO) super-packet as the TUN device hands it over with
/// `VIRTIO_NET_HDR_GSO_TCPV4` / `_UDP_L4`: one IPv4 header and one TCP/UDP header in front of up to
/// 64 KB of payload, to be cut into `mss`-byte segments ([`write_segment_headers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GsoPacket {
    /// IHL * 4.
    pub l3_len: usize,
    /// The TCP header's length (data offset * 4), or 8 for UDP.
    pub l4_len: usize,
    /// 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    /// The payload bytes per segment (the virtio header's `gso_size`).
    pub mss: usize,
    /// The IPv4 total length: the super-packet's real length.
    pub total_len: usize,
}

impl GsoPacket {
    /// IPv4 and TCP/UDP headers: what every segment repeats.
    pub fn header_len(&self) -> usize {
        self.l3_len + self.l4_len
    }

    /// How many segments the payload makes (one for an empty payload).
    pub fn segments(&self) -> usize {
        (self.total_len - self.header_len())
            .div_ceil(self.mss)
            .max(1)
    }

    /// The byte range of segment `i`'s payload in the super-packet.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let start = (self.header_len() + i * self.mss).min(self.total_len);
        start..(start + self.mss).min(self.total_len)
    }
}

/// Checks a super-packet of protocol `protocol` (6 or 17) to be cut into `mss`-byte segments.
pub fn parse_gso(packet: &[u8], protocol: u8, mss: usize) -> Result<GsoPacket, CodecError> {
    let info = parse_ipv4(packet)?;
    let l3 = info.header_len;
    let l4_len = match protocol {
        6 if info.protocol == 6 && info.total_len >= l3 + 20 => {
            usize::from(packet[l3 + 12] >> 4) * 4
        }
        17 if info.protocol == 17 => 8,
        _ => {
            return Err(CodecError::Truncated {
                len: info.total_len,
                need: l3 + 20,
            });
        }
    };
    let frag = u16::from_be_bytes([packet[6], packet[7]]);
    if l4_len < if protocol == 6 { 20 } else { 8 }
        || l3 + l4_len > info.total_len
        || mss == 0
        || frag & 0x3fff != 0
    {
        return Err(CodecError::Truncated {
            len: info.total_len,
            need: l3 + l4_len.max(8),
        });
    }
    Ok(GsoPacket {
        l3_len: l3,
        l4_len,
        protocol,
        mss,
        total_len: info.total_len,
    })
}

/// Writes segment `i`'s IPv4 and TCP/UDP headers into `out` (which must hold
/// [`GsoPacket::header_len`] bytes) as the kernel's segmentation would: total length, IP ID + i,
/// TCP sequence number + i * mss, FIN and PSH on the last segment only, CWR on the first only, UDP
/// length; and both checksums complete. The segment on the wire is these headers followed by
/// `packet[gso.payload(i)]`, which is read (for the checksum) but not copied.
pub fn write_segment_headers(
    packet: &[u8],
    gso: &GsoPacket,
    i: usize,
    out: &mut [u8],
) -> Result<usize, CodecError> {
    let hdr = gso.header_len();
    if out.len() < hdr {
        return Err(CodecError::BufferTooSmall {
            len: out.len(),
            need: hdr,
        });
    }
    let (l3, segments) = (gso.l3_len, gso.segments());
    let payload = &packet[gso.payload(i)];
    let out = &mut out[..hdr];
    out.copy_from_slice(&packet[..hdr]);
    out[2..4].copy_from_slice(&((hdr + payload.len()) as u16).to_be_bytes());
    let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(i as u16);
    out[4..6].copy_from_slice(&id.to_be_bytes());
    out[10..12].copy_from_slice(&[0, 0]);
    let ip_csum = internet_checksum(&out[..l3]);
    out[10..12].copy_from_slice(&ip_csum.to_be_bytes());
    let l4_total = gso.l4_len + payload.len();
    let at = if gso.protocol == 6 {
        let seq = u32::from_be_bytes([out[l3 + 4], out[l3 + 5], out[l3 + 6], out[l3 + 7]])
            .wrapping_add((i * gso.mss) as u32);
        out[l3 + 4..l3 + 8].copy_from_slice(&seq.to_be_bytes());
        if i + 1 < segments {
            out[l3 + 13] &= !0x09; // FIN, PSH
        }
        if i > 0 {
            out[l3 + 13] &= !0x80; // CWR
        }
        l3 + 16
    } else {
        out[l3 + 4..l3 + 6].copy_from_slice(&(l4_total as u16).to_be_bytes());
        l3 + 6
    };
    out[at..at + 2].copy_from_slice(&[0, 0]);
    let pseudo = sum16(&out[12..20], u32::from(gso.protocol) + l4_total as u32);
    // The L4 header's length is a multiple of 4, so the payload's words line up.
    let mut csum = !fold(sum16(payload, sum16(&out[l3..], pseudo)));
    if gso.protocol == 17 && csum == 0 {
        csum = 0xffff;
    }
    out[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    Ok(hdr)
}

/// Finishes a checksum the sender's kernel left to offload (`VIRTIO_NET_HDR_F_NEEDS_CSUM`): the
/// field at `start + offset` holds the pseudo-header sum; the one's-complement sum from `start`
/// to the end is added to it. Returns false (and leaves the packet) when the field lies outside.
pub fn complete_offload_checksum(packet: &mut [u8], start: usize, offset: usize) -> bool {
    let at = start.saturating_add(offset);
    if at.saturating_add(2) > packet.len() || start > packet.len() {
        return false;
    }
    let initial = u16::from_be_bytes([packet[at], packet[at + 1]]);
    packet[at..at + 2].copy_from_slice(&[0, 0]);
    let mut csum = !fold(sum16(&packet[start..], u32::from(initial)));
    // UDP (checksum at offset 6) sends "no checksum" as zero: a computed zero goes out as 0xffff.
    if offset == 6 && csum == 0 {
        csum = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// Puts the pseudo-header sum (not complemented) in a TCP/UDP packet's checksum field, as a
/// kernel leaving the checksum to offload does (`CHECKSUM_PARTIAL`). Returns false, leaving the
/// packet, when it is not an unfragmented IPv4 TCP/UDP packet.
pub fn set_pseudo_header_checksum(packet: &mut [u8]) -> bool {
    let Some((info, at)) = l4_checksum_field(packet) else {
        return false;
    };
    let partial = pseudo_header_checksum(packet, info.protocol, info.total_len - info.header_len);
    packet[at..at + 2].copy_from_slice(&partial.to_be_bytes());
    true
}

/// Builds the ICMP "destination unreachable" (code `code`) answering `offending`, sent from
/// `from`, into `out`; returns its length, or `Ok(None)` when RFC 1122 (3.2.2) forbids an answer:
/// the offending packet is an ICMP error itself, a later fragment, or from a source that is not
/// a unicast host.
pub fn icmp_unreachable(
    offending: &[u8],
    from: Ipv4Addr,
    code: u8,
    out: &mut [u8],
) -> Result<Option<usize>, CodecError> {
    let info = parse_ipv4(offending)?;
    let fragment_offset = u16::from_be_bytes([offending[6], offending[7]]) & 0x1fff;
    if fragment_offset != 0
        || info.src.is_unspecified()
        || info.src.is_broadcast()
        || info.src.is_multicast()
        || info.src.is_loopback()
    {
        return Ok(None);
    }
    if info.protocol == IPPROTO_ICMP {
        // Only queries (echo, timestamp, ...) may be answered with an error, never errors.
        let icmp_type = offending.get(info.header_len).copied();
        if !matches!(icmp_type, Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18)) {
            return Ok(None);
        }
    }
    let quoted = (info.header_len + 8).min(info.total_len);
    let len = IPV4_MIN_LEN + 8 + quoted;
    if out.len() < len {
        return Err(CodecError::BufferTooSmall {
            len: out.len(),
            need: len,
        });
    }
    let out = &mut out[..len];
    out.fill(0);
    out[0] = 0x45;
    // Routine precedence, as the kernel's own ICMP errors use (icmp_send: IPTOS_PREC_INTERNETCONTROL).
    out[1] = 0xc0;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64;
    out[9] = IPPROTO_ICMP;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&info.src.octets());
    let csum = internet_checksum(&out[..IPV4_MIN_LEN]);
    out[10..12].copy_from_slice(&csum.to_be_bytes());
    let icmp = &mut out[IPV4_MIN_LEN..];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = code;
    icmp[8..].copy_from_slice(&offending[..quoted]);
    let csum = internet_checksum(icmp);
    icmp[2..4].copy_from_slice(&csum.to_be_bytes());
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAC_A: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 1];
    const MAC_B: [u8; 6] = [0x0e, 0xfa, 198, 18, 0, 2];

    fn vxlan(vni: u32, local_mac: [u8; 6]) -> Format {
        Format::Vxlan { vni, local_mac }
    }

    /// A valid IPv4 packet with `payload`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = internet_checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn udp_payload_is_the_inner_packet() {
        let inner = ipv4([10, 5, 1, 2], [10, 5, 2, 2], 6, b"hello");
        let mut out = [0u8; 100];
        let n = encapsulate(&Format::Udp, [0; 6], &inner, &mut out).unwrap();
        assert_eq!(&out[..n], &inner[..]);
        let (back, info) = decapsulate(&Format::Udp, &out[..n]).unwrap();
        assert_eq!(back, &inner[..]);
        assert_eq!(info.dst, Ipv4Addr::new(10, 5, 2, 2));
    }

    #[test]
    fn vxlan_header_matches_the_ebpf_path_and_rfc_7348() {
        let inner = ipv4([10, 5, 1, 2], [10, 5, 2, 2], 17, b"x");
        let mut out = [0u8; 100];
        let n = encapsulate(&vxlan(0x01_02_03, MAC_A), MAC_B, &inner, &mut out).unwrap();
        // overlay-ebpf/src/wire.rs: flags 0x08, 3 reserved, VNI (3 bytes), 1 reserved, then
        // dst = peer's VtepMAC, src = ours, ethertype 0x0800.
        let expected_header = [
            0x08, 0, 0, 0, 0x01, 0x02, 0x03, 0, 0x0e, 0xfa, 198, 18, 0, 2, 0x0e, 0xfa, 198, 18, 0,
            1, 0x08, 0x00,
        ];
        assert_eq!(&out[..22], &expected_header);
        assert_eq!(&out[22..n], &inner[..]);
        // The peer (whose VtepMAC is MAC_B) decapsulates it.
        let (back, _) = decapsulate(&vxlan(0x01_02_03, MAC_B), &out[..n]).unwrap();
        assert_eq!(back, &inner[..]);
        // We do not: it is not for our MAC.
        assert_eq!(
            decapsulate(&vxlan(0x01_02_03, MAC_A), &out[..n]),
            Err(Refusal::BadVxlan)
        );
        assert_eq!(
            decapsulate(&vxlan(7, MAC_B), &out[..n]),
            Err(Refusal::BadVxlan)
        );
    }

    #[test]
    fn explicit_hostile_datagrams_are_refused() {
        let f = vxlan(1, MAC_B);
        let inner = ipv4([10, 5, 1, 2], [10, 5, 2, 2], 17, b"payload");
        let mut good = vec![0u8; 200];
        let n = encapsulate(&vxlan(1, MAC_A), MAC_B, &inner, &mut good).unwrap();
        good.truncate(n);
        assert!(decapsulate(&f, &good).is_ok());
        // Empty and truncated.
        assert!(matches!(decapsulate(&f, &[]), Err(Refusal::Malformed)));
        assert!(matches!(
            decapsulate(&Format::Udp, &inner[..19]),
            Err(Refusal::Malformed)
        ));
        // Inner total length beyond what arrived (cut in transit).
        assert!(matches!(
            decapsulate(&f, &good[..n - 1]),
            Err(Refusal::Malformed)
        ));
        // Flags without the VNI bit.
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(decapsulate(&f, &bad), Err(Refusal::BadVxlan));
        // ARP inside.
        let mut bad = good.clone();
        bad[20..22].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decapsulate(&f, &bad), Err(Refusal::BadVxlan));
        // IPv6 inside the udp format.
        let mut v6 = inner.clone();
        v6[0] = 0x60;
        assert_eq!(decapsulate(&Format::Udp, &v6), Err(Refusal::Malformed));
        // IHL below 5 and beyond the packet.
        let mut bad = inner.clone();
        bad[0] = 0x44;
        assert!(matches!(
            decapsulate(&Format::Udp, &bad),
            Err(Refusal::Malformed)
        ));
        bad[0] = 0x4f;
        assert!(matches!(
            decapsulate(&Format::Udp, &bad),
            Err(Refusal::Malformed)
        ));
        // Padding after the packet is trimmed, not forwarded.
        let mut padded = inner.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(decapsulate(&Format::Udp, &padded).unwrap().0, &inner[..]);
    }

    #[test]
    fn icmp_unreachable_quotes_the_header_and_8_bytes_and_checksums() {
        let offending = ipv4([10, 5, 1, 2], [10, 5, 9, 9], 17, &[1; 40]);
        let mut out = [0u8; ICMP_UNREACH_MAX_LEN];
        let n = icmp_unreachable(
            &offending,
            Ipv4Addr::new(10, 5, 1, 0),
            ICMP_NET_UNREACH,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert_eq!(n, 20 + 8 + 28);
        let info = parse_ipv4(&out[..n]).unwrap();
        assert_eq!(info.src, Ipv4Addr::new(10, 5, 1, 0));
        assert_eq!(info.dst, Ipv4Addr::new(10, 5, 1, 2));
        assert_eq!(info.protocol, IPPROTO_ICMP);
        assert_eq!(internet_checksum(&out[..20]), 0);
        assert_eq!(internet_checksum(&out[20..n]), 0);
        assert_eq!(&out[20..22], &[ICMP_DEST_UNREACH, ICMP_NET_UNREACH]);
        assert_eq!(&out[28..n], &offending[..28]);
        // Never an error about an error.
        let error = ipv4([10, 5, 1, 2], [10, 5, 9, 9], 1, &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            icmp_unreachable(&error, Ipv4Addr::new(10, 5, 1, 0), 0, &mut out),
            Ok(None)
        );
        // An echo request is answered.
        let echo = ipv4([10, 5, 1, 2], [10, 5, 9, 9], 1, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            icmp_unreachable(&echo, Ipv4Addr::new(10, 5, 1, 0), 0, &mut out),
            Ok(Some(_))
        ));
    }

    #[test]
    fn partial_checksums_are_completed_and_wrong_ones_left_alone() {
        let mut seg = vec![0u8; 20];
        seg[12] = 0x50; // data offset 5
        seg.extend_from_slice(b"some tcp payload");
        let mut p = ipv4([10, 5, 2, 2], [10, 5, 1, 2], 6, &seg);
        // What a kernel leaves for checksum offload: the folded pseudo-header sum.
        let pseudo = sum16(&p[12..20], 6 + seg.len() as u32);
        p[36..38].copy_from_slice(&fold(pseudo).to_be_bytes());
        assert_eq!(complete_partial_checksum(&mut p), L4Checksum::Completed);
        assert_eq!(complete_partial_checksum(&mut p), L4Checksum::Valid);
        let good = p.clone();
        p[40] ^= 1;
        assert_eq!(complete_partial_checksum(&mut p), L4Checksum::Invalid);
        let mut icmp = ipv4([10, 5, 2, 2], [10, 5, 1, 2], 1, &[8, 0, 0, 0]);
        assert_eq!(
            complete_partial_checksum(&mut icmp),
            L4Checksum::NotApplicable
        );
        assert_eq!(&good[..20], &p[..20]);
    }

    /// The super-packet's segments as they go on the wire: headers + payload.
    fn segment_all(packet: &[u8], protocol: u8, mss: usize) -> Vec<Vec<u8>> {
        let gso = parse_gso(packet, protocol, mss).unwrap();
        (0..gso.segments())
            .map(|i| {
                let mut seg = vec![0u8; gso.header_len()];
                write_segment_headers(packet, &gso, i, &mut seg).unwrap();
                seg.extend_from_slice(&packet[gso.payload(i)]);
                seg
            })
            .collect()
    }

    #[test]
    fn tso_and_uso_super_packets_segment_as_the_kernel_does() {
        let payload: Vec<u8> = (0..2500u32).map(|i| (i * 7 + 3) as u8).collect();
        // TCP: seq 1000, flags CWR|PSH|ACK|FIN, a partial (pseudo-header) checksum as TSO leaves.
        let mut tcp = vec![0u8; 20];
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x80 | 0x08 | 0x10 | 0x01;
        tcp.extend_from_slice(&payload);
        let mut packet = ipv4([10, 1, 1, 2], [10, 1, 2, 3], 6, &tcp);
        packet[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        let segs = segment_all(&packet, 6, 1000);
        assert_eq!(segs.len(), 3);
        let mut joined = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let info = parse_ipv4(seg).unwrap();
            assert_eq!(info.total_len, seg.len());
            assert_eq!(internet_checksum(&seg[..20]), 0);
            assert_eq!(
                complete_partial_checksum(&mut seg.clone()),
                L4Checksum::Valid
            );
            assert_eq!(
                u16::from_be_bytes([seg[4], seg[5]]),
                0xfffeu16.wrapping_add(i as u16)
            );
            let seq = u32::from_be_bytes([seg[24], seg[25], seg[26], seg[27]]);
            assert_eq!(seq, 1000 + 1000 * i as u32);
            let flags = seg[33];
            assert_eq!(flags & 0x10, 0x10);
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
            assert_eq!(flags & 0x09 != 0, i == 2, "FIN and PSH on the last only");
            joined.extend_from_slice(&seg[40..]);
        }
        assert_eq!(joined, payload);
        assert_eq!(segs[2].len(), 40 + 500);

        // UDP: each datagram gets its own length and checksum.
        let mut udp = vec![0u8; 8];
        udp.extend_from_slice(&payload);
        let packet = ipv4([10, 1, 1, 2], [10, 1, 2, 3], 17, &udp);
        let segs = segment_all(&packet, 17, 1200);
        assert_eq!(segs.len(), 3);
        for seg in &segs {
            assert_eq!(
                usize::from(u16::from_be_bytes([seg[24], seg[25]])),
                seg.len() - 20
            );
            assert_eq!(
                complete_partial_checksum(&mut seg.clone()),
                L4Checksum::Valid
            );
        }
        // Not what the virtio header says, or cut short: refused.
        assert!(parse_gso(&packet, 6, 1200).is_err());
        assert!(parse_gso(&packet, 17, 0).is_err());
        assert!(parse_gso(&packet[..25], 17, 1200).is_err());
    }

    #[test]
    fn offload_checksums_are_finished() {
        let mut udp = vec![0u8; 8];
        udp.extend_from_slice(b"hello, flannel");
        udp[4..6].copy_from_slice(&22u16.to_be_bytes());
        let mut packet = ipv4([10, 1, 1, 2], [10, 1, 2, 3], 17, &udp);
        // What the kernel leaves: the pseudo-header sum, not complemented.
        let pseudo = fold(sum16(&packet[12..20], 17 + 22));
        packet[26..28].copy_from_slice(&pseudo.to_be_bytes());
        assert!(complete_offload_checksum(&mut packet, 20, 6));
        assert_eq!(
            complete_partial_checksum(&mut packet.clone()),
            L4Checksum::Valid
        );
        assert!(!complete_offload_checksum(&mut packet, 20, 100));
        // And back: the pseudo-header sum is what completion recognises as an offload artefact.
        assert!(set_pseudo_header_checksum(&mut packet));
        assert_eq!(
            complete_partial_checksum(&mut packet),
            L4Checksum::Completed
        );
        assert_eq!(complete_partial_checksum(&mut packet), L4Checksum::Valid);
    }

    fn format_strategy() -> impl Strategy<Value = Format> {
        prop_oneof![
            Just(Format::Udp),
            (0u32..(1 << 24), any::<[u8; 6]>())
                .prop_map(|(vni, local_mac)| Format::Vxlan { vni, local_mac }),
        ]
    }

    proptest! {
        /// The vectorised sum agrees with the plain RFC 1071 loop, whatever the length,
        /// alignment and starting sum.
        #[test]
        fn fast_sum_matches_the_plain_loop(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            skip in 0usize..4,
            start in any::<u32>(),
        ) {
            let data = &data[skip.min(data.len())..];
            let mut plain = u64::from(start);
            for c in data.chunks(2) {
                plain += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
            }
            prop_assert_eq!(fold(sum16(data, start)), fold64(plain));
            prop_assert_eq!(fold(sum16_words(data, start)), fold64(plain));
        }

        #[test]
        fn encapsulate_then_decapsulate_is_the_identity(
            vni in 0u32..(1 << 24),
            sender_mac in any::<[u8; 6]>(),
            receiver_mac in any::<[u8; 6]>(),
            vxlan_format in any::<bool>(),
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            protocol in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1500),
        ) {
            let (tx, rx) = if vxlan_format {
                (vxlan(vni, sender_mac), vxlan(vni, receiver_mac))
            } else {
                (Format::Udp, Format::Udp)
            };
            let inner = ipv4(src, dst, protocol, &payload);
            let mut out = vec![0u8; inner.len() + MAX_FORMAT_HEADER];
            let n = encapsulate(&tx, receiver_mac, &inner, &mut out).unwrap();
            prop_assert_eq!(n, inner.len() + tx.header_len());
            let (back, info) = decapsulate(&rx, &out[..n]).unwrap();
            prop_assert_eq!(back, &inner[..]);
            prop_assert_eq!(info.src, Ipv4Addr::from(src));
            prop_assert_eq!(info.dst, Ipv4Addr::from(dst));
        }

        #[test]
        fn decapsulate_never_panics_and_returns_a_well_formed_packet(
            format in format_strategy(),
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            if let Ok((inner, info)) = decapsulate(&format, &bytes) {
                prop_assert_eq!(inner.len(), info.total_len);
                prop_assert!(info.header_len >= IPV4_MIN_LEN && info.header_len <= inner.len());
                prop_assert_eq!(inner[0] >> 4, 4);
            }
        }

        #[test]
        fn every_truncation_of_a_valid_datagram_is_refused(
            format in format_strategy(),
            payload in proptest::collection::vec(any::<u8>(), 0..100),
            cut in any::<prop::sample::Index>(),
        ) {
            let mac = match format { Format::Vxlan { local_mac, .. } => local_mac, Format::Udp => [0; 6] };
            let inner = ipv4([10, 0, 0, 1], [10, 0, 1, 1], 17, &payload);
            let mut out = vec![0u8; inner.len() + MAX_FORMAT_HEADER];
            let n = encapsulate(&format, mac, &inner, &mut out).unwrap();
            let cut = cut.index(n);
            prop_assert!(decapsulate(&format, &out[..cut]).is_err());
        }

        #[test]
        fn checksum_completion_never_panics_and_completed_packets_verify(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut p = bytes.clone();
            if complete_partial_checksum(&mut p) == L4Checksum::Completed {
                prop_assert_eq!(complete_partial_checksum(&mut p), L4Checksum::Valid);
            } else {
                prop_assert_eq!(p, bytes);
            }
        }

        #[test]
        fn cheap_completion_agrees_with_the_verifying_one(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut cheap = bytes.clone();
            let mut full = bytes.clone();
            let completed = complete_if_partial(&mut cheap);
            match complete_partial_checksum(&mut full) {
                L4Checksum::Completed => {
                    prop_assert!(completed);
                    prop_assert_eq!(&cheap, &full);
                }
                L4Checksum::Invalid | L4Checksum::NotApplicable => {
                    prop_assert!(!completed);
                    prop_assert_eq!(&cheap, &bytes);
                }
                // Unchanged, or rewritten with the same (valid) checksum.
                L4Checksum::Valid => prop_assert_eq!(
                    complete_partial_checksum(&mut cheap),
                    L4Checksum::Valid
                ),
            }
        }

        #[test]
        fn icmp_answers_always_checksum(
            src in any::<[u8; 4]>(),
            protocol in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let offending = ipv4(src, [10, 5, 9, 9], protocol, &payload);
            let mut out = [0u8; ICMP_UNREACH_MAX_LEN];
            if let Some(n) = icmp_unreachable(&offending, Ipv4Addr::new(10, 5, 1, 0), 0, &mut out).unwrap() {
                prop_assert_eq!(internet_checksum(&out[..20]), 0);
                prop_assert_eq!(internet_checksum(&out[20..n]), 0);
                prop_assert_eq!(parse_ipv4(&out[..n]).unwrap().dst, Ipv4Addr::from(src));
            }
        }
    }
}
