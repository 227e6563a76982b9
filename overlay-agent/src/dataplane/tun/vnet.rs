//! The virtio-net header a TUN device opened with `IFF_VNET_HDR` puts before each packet read and
//! expects before each packet written: what the kernel left to offload (checksum, segmentation)
//! or may skip (a checksum already verified). Native endian: the device is not switched to
//! big-endian.

pub use tun_rs::VIRTIO_NET_HDR_LEN as LEN;

/// Flag: the checksum from `csum_start` is left to do (`CHECKSUM_PARTIAL`).
pub const F_NEEDS_CSUM: u8 = 1;
/// Flag: the checksum was verified (`CHECKSUM_UNNECESSARY`).
pub const F_DATA_VALID: u8 = 2;
/// `gso_type`: one packet, nothing to segment.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4, segments of `gso_size`.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP datagrams of `gso_size` (USO).
pub const GSO_UDP_L4: u8 = 5;
/// The ECN bit of `gso_type`: CWR handling, which segmentation does in any case.
const GSO_ECN: u8 = 0x80;

/// The fields of a virtio-net header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioHeader {
    /// [`F_NEEDS_CSUM`], [`F_DATA_VALID`] or none.
    pub flags: u8,
    /// `GSO_*`, without the ECN bit.
    pub gso_type: u8,
    /// Headers in front of the payload that is segmented.
    pub hdr_len: usize,
    /// Payload bytes a segment.
    pub gso_size: usize,
    /// Where the checksum left to do starts summing.
    pub csum_start: usize,
    /// Where, from `csum_start`, it is stored.
    pub csum_offset: usize,
}

impl VirtioHeader {
    /// Reads a header; fields `b` is too short for read as zero.
    pub fn parse(b: &[u8]) -> Self {
        let u16_at = |i: usize| {
            b.get(i..i + 2)
                .map_or(0, |x| usize::from(u16::from_ne_bytes([x[0], x[1]])))
        };
        Self {
            flags: b.first().copied().unwrap_or(0),
            gso_type: b.get(1).copied().unwrap_or(0) & !GSO_ECN,
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut h = [0u8; LEN];
        h[0] = self.flags;
        h[1] = self.gso_type;
        h[2..4].copy_from_slice(&(self.hdr_len as u16).to_ne_bytes());
        h[4..6].copy_from_slice(&(self.gso_size as u16).to_ne_bytes());
        h[6..8].copy_from_slice(&(self.csum_start as u16).to_ne_bytes());
        h[8..10].copy_from_slice(&(self.csum_offset as u16).to_ne_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_parse_is_the_identity() {
        let h = VirtioHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1400,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VirtioHeader::parse(&h.encode()), h);
        assert_eq!(
            VirtioHeader::parse(&[0, GSO_TCPV4 | GSO_ECN]).gso_type,
            GSO_TCPV4
        );
    }
}
