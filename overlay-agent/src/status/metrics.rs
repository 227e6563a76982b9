//! `/metrics`: the [`Status`] in Prometheus' text exposition format. Names follow Prometheus'
//! conventions: an `overlay_` prefix, base units in the name (`_seconds`, `_bytes`), `_total` on
//! counters, and one family per quantity with what varies in labels.

use std::fmt::Write as _;

use super::Status;

/// One metric family being written.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    /// One sample; `labels` as `(name, value)` pairs.
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

fn family<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    Family { out, name }
}

/// The exposition of `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let o = &mut out;
    if let Some(a) = &status.agent {
        family(
            o,
            "overlay_build_info",
            "gauge",
            "The agent's version, as a label; always 1.",
        )
        .sample(&[("version", &a.version)], 1);
        family(
            o,
            "overlay_healthy",
            "gauge",
            "1 while /healthz answers 200 (lease held, datapath forwarding, etcd heard from).",
        )
        .sample(&[], u8::from(a.healthy));
        family(
            o,
            "overlay_lease_held",
            "gauge",
            "1 while this host holds its subnet lease.",
        )
        .sample(&[], u8::from(a.lease.held));
        family(
            o,
            "overlay_lease_expiry_seconds",
            "gauge",
            "Seconds until etcd expires this host's lease unless renewed (0 without one).",
        )
        .sample(
            &[],
            format!("{:.0}", a.lease.expires_in_seconds.unwrap_or(0.0)),
        );
        family(
            o,
            "overlay_etcd_up",
            "gauge",
            "1 while an etcd member answers.",
        )
        .sample(&[], u8::from(a.etcd.up));
        family(
            o,
            "overlay_etcd_reconnects_total",
            "counter",
            "Reconnections after a request failed on the etcd member in use.",
        )
        .sample(&[], a.etcd.reconnects);
        family(
            o,
            "overlay_etcd_unanswered_attempts_total",
            "counter",
            "Connection attempts to an etcd member that did not answer.",
        )
        .sample(&[], a.etcd.unanswered_attempts);
        let c = &a.peer_counts;
        family(
            o,
            "overlay_peers",
            "gauge",
            "Peers known, stale ones included (see overlay_peers_unprogrammed for those not in the dataplane).",
        )
        .sample(&[], c.known);
        family(
            o,
            "overlay_peers_stale",
            "gauge",
            "Peers kept for --expired-peer-grace after their lease expired.",
        )
        .sample(&[], c.stale);
        family(
            o,
            "overlay_peers_unprogrammed",
            "gauge",
            "Peers the datapath could not program (a full map); not forwarded to.",
        )
        .sample(&[], a.unprogrammed.len());
        family(
            o,
            "overlay_peers_went_stale_total",
            "counter",
            "Peers whose lease expired and that were kept for the grace period.",
        )
        .sample(&[], c.went_stale);
        family(
            o,
            "overlay_peers_grace_ended_total",
            "counter",
            "Stale peers removed when their grace period ended.",
        )
        .sample(&[], c.grace_ended);
        family(
            o,
            "overlay_leases_sharing_public_ip_total",
            "counter",
            "Times several accepted leases were found naming one PublicIP (all are routed there).",
        )
        .sample(&[], c.shared_public_ip);
        family(
            o,
            "overlay_leases_refused_total",
            "counter",
            "Leases not made peers (bad value, bad address, outside the Network, overlapping).",
        )
        .sample(&[], c.refused);
        if let Some(d) = &a.datapath {
            family(
                o,
                "overlay_datapath_info",
                "gauge",
                "The datapath that forwards (kind eBPF or TUN) and its wire format; always 1.",
            )
            .sample(&[("kind", &d.kind), ("backend", &d.backend)], 1);
            family(
                o,
                "overlay_datapath_up",
                "gauge",
                "1 while the datapath is attached and forwards as the peers say.",
            )
            .sample(&[], u8::from(a.datapath_unhealthy.is_none()));
        }
    }
    let Some(d) = &status.dataplane else {
        return out;
    };
    let mut f = family(
        o,
        "overlay_dataplane_packets_total",
        "counter",
        "Packets the datapath forwarded, by outcome (a GSO batch counts once).",
    );
    for x in d.outcomes.iter().filter(|x| !x.drop) {
        f.sample(&[("outcome", &x.outcome)], x.packets);
    }
    if d.outcomes.iter().any(|x| x.bytes.is_some()) {
        let mut f = family(
            o,
            "overlay_dataplane_bytes_total",
            "counter",
            "Bytes of the packets the datapath forwarded, by outcome.",
        );
        for x in d.outcomes.iter().filter(|x| !x.drop) {
            if let Some(b) = x.bytes {
                f.sample(&[("outcome", &x.outcome)], b);
            }
        }
    }
    let mut f = family(
        o,
        "overlay_dataplane_dropped_packets_total",
        "counter",
        "Packets the datapath dropped, by reason.",
    );
    for x in d.outcomes.iter().filter(|x| x.drop) {
        f.sample(&[("reason", &x.outcome)], x.packets);
    }
    if let Some(peers) = &d.peer_traffic {
        type Get = fn(&super::PeerTraffic) -> u64;
        let per_peer: [(&'static str, &str, Get); 4] = [
            (
                "overlay_peer_transmit_packets_total",
                "Packets encapsulated to a peer host.",
                |p| p.tx_packets,
            ),
            (
                "overlay_peer_transmit_bytes_total",
                "Inner bytes encapsulated to a peer host.",
                |p| p.tx_bytes,
            ),
            (
                "overlay_peer_receive_packets_total",
                "Packets from a peer host decapsulated and delivered.",
                |p| p.rx_packets,
            ),
            (
                "overlay_peer_receive_bytes_total",
                "Inner bytes from a peer host decapsulated and delivered.",
                |p| p.rx_bytes,
            ),
        ];
        for (name, help, get) in per_peer {
            let mut f = family(o, name, "counter", help);
            for p in peers {
                f.sample(&[("peer", &p.public_ip.to_string())], get(p));
            }
        }
        let mut f = family(
            o,
            "overlay_peer_dropped_packets_total",
            "counter",
            "Packets to (transmit) or from (receive) a peer host that were dropped.",
        );
        for p in peers {
            let peer = p.public_ip.to_string();
            f.sample(&[("peer", &peer), ("direction", "transmit")], p.tx_dropped);
            f.sample(&[("peer", &peer), ("direction", "receive")], p.rx_dropped);
        }
    }
    if !d.maps.is_empty() {
        let mut f = family(
            o,
            "overlay_map_entries",
            "gauge",
            "Entries in a bounded eBPF map.",
        );
        for m in &d.maps {
            f.sample(&[("map", &m.map)], m.entries);
        }
        let mut f = family(
            o,
            "overlay_map_capacity",
            "gauge",
            "Entries a bounded eBPF map can hold.",
        );
        for m in &d.maps {
            f.sample(&[("map", &m.map)], m.capacity);
        }
    }
    out
}
