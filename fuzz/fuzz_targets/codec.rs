//! Fuzzes flannel's wire formats (`overlay_agent::dataplane::tun::codec`) on arbitrary input:
//! - decapsulation of both formats never panics, and what it accepts is a well-formed IPv4 packet
//!   lying inside the datagram;
//! - whatever parses as an IPv4 packet survives encapsulate → decapsulate unchanged (trimmed to
//!   its total length), for both formats;
//! - checksum completion (both forms) never panics, and a completed packet verifies;
//! - every segment cut from a TSO/USO super-packet is a well-formed, checksummed packet;
//! - the ICMP "destination unreachable" answer, when one is built, is a well-formed IPv4 packet
//!   with valid header and ICMP checksums, and fits `ICMP_UNREACH_MAX_LEN`;
//! - the receive path's coalescing (`dataplane::tun::coalesce`) never panics on hostile packets
//!   and writes each packet it was given exactly once.
//!
//! Run: `cargo +nightly fuzz run codec` (from the repository root; `cargo xtask test` runs it for
//! 30 s).
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use overlay_agent::dataplane::tun::{
    codec::{self, Format, ICMP_UNREACH_MAX_LEN, IPV4_MIN_LEN, L4Checksum, MAX_FORMAT_HEADER},
    coalesce::{CoalesceOptions, Coalescer},
};

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the parameters, the rest is the packet.
    if data.len() < 20 {
        return;
    }
    let (params, bytes) = data.split_at(20);
    let vni = u32::from_be_bytes([0, params[0], params[1], params[2]]);
    let local_mac: [u8; 6] = params[3..9].try_into().unwrap();
    let peer_mac: [u8; 6] = params[9..15].try_into().unwrap();
    let from = Ipv4Addr::new(params[15], params[16], params[17], params[18]);
    let code = params[19];
    let formats = [Format::Udp, Format::Vxlan { vni, local_mac }];

    // Decapsulation of hostile datagrams, both formats.
    for format in &formats {
        if let Ok((inner, info)) = codec::decapsulate(format, bytes) {
            assert_eq!(inner.len(), info.total_len);
            assert!(info.header_len >= IPV4_MIN_LEN && info.header_len <= info.total_len);
            assert_eq!(codec::parse_ipv4(inner), Ok(info));
            let start = inner.as_ptr() as usize - bytes.as_ptr() as usize;
            assert_eq!(start, format.header_len());
        }
    }

    // Encapsulation round trips: whatever is a valid inner packet comes back unchanged.
    let mut out = vec![0u8; bytes.len() + MAX_FORMAT_HEADER];
    for format in &formats {
        match codec::encapsulate(format, peer_mac, bytes, &mut out) {
            Ok(len) => {
                let info = codec::parse_ipv4(bytes).expect("encapsulate accepted it");
                assert_eq!(len, format.header_len() + info.total_len);
                // Received by a peer whose VtepMAC is the one we sent to.
                let receiver = match format {
                    Format::Udp => Format::Udp,
                    Format::Vxlan { vni, .. } => Format::Vxlan {
                        vni: *vni,
                        local_mac: peer_mac,
                    },
                };
                let (inner, back) = codec::decapsulate(&receiver, &out[..len]).unwrap();
                assert_eq!(inner, &bytes[..info.total_len]);
                assert_eq!(back, info);
            }
            Err(_) => assert!(codec::parse_ipv4(bytes).is_err()),
        }
        // Too small an output buffer is an error, never a panic or a short write.
        let _ = codec::encapsulate(format, peer_mac, bytes, &mut out[..bytes.len() / 2]);
    }

    // Checksum completion.
    let mut packet = bytes.to_vec();
    match codec::complete_partial_checksum(&mut packet) {
        L4Checksum::Completed => {
            assert_eq!(
                codec::complete_partial_checksum(&mut packet.clone()),
                L4Checksum::Valid
            );
        }
        L4Checksum::Valid | L4Checksum::Invalid | L4Checksum::NotApplicable => {
            assert_eq!(packet, bytes);
        }
    }

    // The receive path's cheap completion agrees with the verifying one.
    let mut cheap = bytes.to_vec();
    if codec::complete_if_partial(&mut cheap) {
        assert_eq!(
            codec::complete_partial_checksum(&mut cheap),
            L4Checksum::Valid
        );
    } else {
        assert_eq!(cheap, bytes);
    }

    // Cutting TSO/USO super-packets: every segment is a complete, checksummed packet.
    for protocol in [6, 17] {
        let mss = usize::from(params[0]).max(1) * 8;
        if let Ok(gso) = codec::parse_gso(bytes, protocol, mss) {
            for i in 0..gso.segments().min(64) {
                let mut seg = vec![0u8; gso.header_len()];
                let n = codec::write_segment_headers(bytes, &gso, i, &mut seg).unwrap();
                assert_eq!(n, gso.header_len());
                seg.extend_from_slice(&bytes[gso.payload(i)]);
                assert_eq!(codec::parse_ipv4(&seg).unwrap().total_len, seg.len());
                assert_eq!(
                    codec::complete_partial_checksum(&mut seg),
                    L4Checksum::Valid
                );
            }
        }
    }

    // ICMP unreachable answers.
    let mut icmp = [0u8; ICMP_UNREACH_MAX_LEN];
    if let Ok(Some(len)) = codec::icmp_unreachable(bytes, from, code, &mut icmp) {
        let answer = &icmp[..len];
        let info = codec::parse_ipv4(answer).expect("the answer is an IPv4 packet");
        assert_eq!(info.total_len, len);
        assert_eq!(info.src, from);
        assert_eq!(info.protocol, codec::IPPROTO_ICMP);
        assert_eq!(codec::internet_checksum(&answer[..info.header_len]), 0);
        assert_eq!(codec::internet_checksum(&answer[info.header_len..]), 0);
    }
    // Too small a buffer is an error, never a panic.
    let _ = codec::icmp_unreachable(bytes, from, code, &mut icmp[..IPV4_MIN_LEN]);

    // Coalescing: the input cut into packets of one length (as a GRO aggregate is), each pushed.
    let cut = usize::from(params[1]) * 4 + IPV4_MIN_LEN;
    for options in [
        CoalesceOptions {
            vnet_hdr: true,
            udp: true,
            mtu: usize::from(params[2]) * 8,
        },
        CoalesceOptions {
            vnet_hdr: false,
            udp: false,
            mtu: 1500,
        },
    ] {
        let mut packets = bytes.to_vec();
        let mut co = Coalescer::new(options, 8);
        // Packets the coalescer took since the last reset (a refused one is not written).
        let mut pushed = 0;
        for p in packets.chunks_mut(cut) {
            if let Ok(info) = codec::parse_ipv4(p)
                && co.push(p, &info).is_ok()
            {
                pushed += 1;
            }
            if co.is_full() {
                assert_eq!(co.writes().map(|w| w.packets()).sum::<usize>(), pushed);
                co.reset();
                pushed = 0;
            }
        }
        assert_eq!(co.writes().map(|w| w.packets()).sum::<usize>(), pushed);
    }
});
