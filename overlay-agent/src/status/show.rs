//! `overlay-agent status`: asks the running agent (the status socket), and reads the pinned
//! dataplane itself when no agent answers, so a dataplane left forwarding by a dead agent is
//! still shown. Text for a person, `--json` for scripts (the [`Status`] as the socket sends it).
//!
//! Exit status: 0 the agent runs and is healthy, 1 it runs and is unhealthy, 3 no agent answers
//! (what is pinned is still shown), as `systemctl status` uses 3 for "not running".

use std::{fmt::Write as _, net::Ipv4Addr, path::Path, process::ExitCode};

use super::{DataplaneState, PeerTraffic, Status, socket};

/// `overlay-agent status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn main(bpffs: &Path, args: &StatusArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("overlay-agent status: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let status = match runtime.block_on(socket::fetch(bpffs)) {
        Ok(status) => status,
        Err(e) => from_pins(
            bpffs,
            format!(
                "{e}; the socket is per network namespace: where the agent runs in another, run \
                 status there (ip netns exec <namespace> overlay-agent status)"
            ),
        ),
    };
    if args.json {
        match serde_json::to_string_pretty(&status) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("overlay-agent status: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", render(&status, bpffs));
    }
    match &status.agent {
        Some(a) if a.healthy => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(1),
        None => ExitCode::from(3),
    }
}

/// The status without an agent: what its pins hold.
fn from_pins(bpffs: &Path, agent_error: String) -> Status {
    let maps = crate::dataplane::ebpf::pins::maps_dir(bpffs);
    let (dataplane, dataplane_error) = if !maps.exists() {
        (
            None,
            Some(format!("nothing is pinned under {}", bpffs.display())),
        )
    } else {
        match DataplaneState::from_pins(bpffs) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(crate::control::etcd::error_chain(&e))),
        }
    };
    Status {
        agent: None,
        agent_error: Some(agent_error),
        dataplane,
        dataplane_error,
    }
}

/// A byte count for people: 1.5 MiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn ago(secs: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs as u64)).to_string()
}

/// One peer row: its subnets, address, backend, and its host's traffic.
struct Row {
    subnets: Vec<String>,
    public_ip: Ipv4Addr,
    backend: String,
    traffic: Option<PeerTraffic>,
}

/// The text a person reads.
pub fn render(status: &Status, bpffs: &Path) -> String {
    let mut o = String::new();
    let traffic_of = |ip: Ipv4Addr| {
        status
            .dataplane
            .as_ref()
            .and_then(|d| d.peer_traffic.as_ref())
            .and_then(|t| t.iter().find(|p| p.public_ip == ip).cloned())
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |subnet: String, public_ip: Ipv4Addr, backend: String| match rows
        .iter_mut()
        .find(|r| r.public_ip == public_ip)
    {
        Some(r) => r.subnets.push(subnet),
        None => rows.push(Row {
            subnets: vec![subnet],
            public_ip,
            backend,
            traffic: traffic_of(public_ip),
        }),
    };
    match &status.agent {
        Some(a) => {
            let health = match (&a.unhealthy_reason, &a.note) {
                (Some(r), _) => format!("UNHEALTHY: {r}"),
                (None, Some(n)) => format!("healthy ({n})"),
                (None, None) => "healthy".to_owned(),
            };
            let _ = writeln!(
                o,
                "Agent:      running (pid {}, version {}), {health}",
                a.pid, a.version
            );
            let l = &a.lease;
            let lease = match (l.held, &l.subnet) {
                (true, Some(subnet)) => {
                    let mut s = format!("{subnet} at {}", l.key.as_deref().unwrap_or("?"));
                    if l.reservation {
                        s.push_str(" (reservation, no TTL)");
                    } else {
                        let _ = write!(
                            s,
                            ", TTL {}, expires in {}",
                            ago(l.ttl_seconds.unwrap_or(0) as f64),
                            ago(l.expires_in_seconds.unwrap_or(0.0))
                        );
                    }
                    if let Some(r) = l.renewed_seconds_ago {
                        let _ = write!(s, ", renewed {} ago", ago(r));
                    }
                    s
                }
                _ => format!("none: {}", l.none_because.as_deref().unwrap_or("?")),
            };
            let _ = writeln!(o, "Lease:      {lease}");
            let e = &a.etcd;
            let mut etcd = if e.up {
                format!("up, member {}", e.member)
            } else {
                format!(
                    "UNREACHABLE for {}, last member {}",
                    ago(e.down_seconds.unwrap_or(0.0)),
                    e.member
                )
            };
            let _ = write!(
                etcd,
                " ({} endpoint(s)); {} reconnect(s), {} unanswered attempt(s)",
                e.endpoints.len(),
                e.reconnects,
                e.unanswered_attempts
            );
            if let (Some(err), Some(t)) = (&e.last_error, e.last_error_seconds_ago) {
                let _ = write!(etcd, "; last error {} ago: {err}", ago(t));
            }
            let _ = writeln!(o, "etcd:       {etcd}");
            match &a.datapath {
                Some(d) => {
                    let _ = writeln!(
                        o,
                        "Datapath:   {} ({}) on {}: {}{}",
                        d.kind,
                        d.backend,
                        if d.devices.is_empty() {
                            "(not started)".to_owned()
                        } else {
                            d.devices.join(", ")
                        },
                        d.chosen,
                        match &a.datapath_unhealthy {
                            Some(u) => format!("; NOT FORWARDING AS IT SHOULD: {u}"),
                            None => String::new(),
                        }
                    );
                }
                None => {
                    let _ = writeln!(o, "Datapath:   none (alloc backend, or not built yet)");
                }
            }
            for p in &a.peers {
                let mut backend = p.backend.clone();
                if let Some(mac) = &p.vtep_mac {
                    let _ = write!(backend, " VtepMAC {mac}");
                }
                if p.kernel_decap == Some(true) {
                    backend.push_str(" kernel-decap");
                }
                if p.stale {
                    backend.push_str(" STALE (lease expired, kept for the grace period)");
                }
                if let Some(u) = a.unprogrammed.iter().find(|u| u.subnet == p.subnet) {
                    let _ = write!(backend, " NOT PROGRAMMED: {}", u.reason);
                }
                add(p.subnet.clone(), p.public_ip, backend);
            }
            let c = &a.peer_counts;
            if c.refused > 0 || c.shared_public_ip > 0 {
                let _ = writeln!(
                    o,
                    "Leases:     {} refused, {} time(s) several leases named one PublicIP (see \
                     the log)",
                    c.refused, c.shared_public_ip
                );
            }
        }
        None => {
            let _ = writeln!(
                o,
                "Agent:      NOT RUNNING ({})",
                status.agent_error.as_deref().unwrap_or("?")
            );
            if let Some(d) = &status.dataplane {
                let _ = writeln!(
                    o,
                    "Datapath:   eBPF, pinned under {}: its programs forward with the peers \
                     below without the agent, until `overlay-agent teardown` removes them",
                    bpffs.display()
                );
                for r in &d.routes {
                    let backend = match &r.vtep_mac {
                        Some(mac) => format!("vxlan VtepMAC {mac}"),
                        None if r.kernel_decap => "udp kernel-decap".to_owned(),
                        None => "udp".to_owned(),
                    };
                    add(r.subnet.clone(), r.public_ip, backend);
                }
            }
        }
    }
    let Some(d) = &status.dataplane else {
        if let Some(e) = &status.dataplane_error {
            let _ = writeln!(o, "Dataplane:  {e}");
        }
        let _ = write_peers(&mut o, &rows, false);
        return o;
    };
    for l in &d.links {
        let _ = writeln!(
            o,
            "Program:    {} on {}: {}",
            l.program,
            l.interface,
            match (&l.link_id, &l.program_id, &l.error) {
                (Some(link), Some(prog), _) => format!("link id {link}, program id {prog}"),
                (_, _, Some(e)) => format!("pin unreadable: {e}"),
                _ => "?".to_owned(),
            }
        );
    }
    let _ = write_peers(&mut o, &rows, d.peer_traffic.is_some());
    if d.peer_traffic.is_none() && !rows.is_empty() {
        let _ = writeln!(o, "  (the TUN datapath counts no per-peer traffic)");
    }
    let drops: Vec<String> = d
        .outcomes
        .iter()
        .filter(|x| x.drop)
        .map(|x| format!("{} {}", x.outcome, x.packets))
        .collect();
    let _ = writeln!(o, "Drops:      {}", drops.join(", "));
    let passed: Vec<String> = d
        .outcomes
        .iter()
        .filter(|x| !x.drop)
        .map(|x| match x.bytes {
            Some(b) => format!("{} {} ({})", x.outcome, x.packets, bytes(b)),
            None => format!("{} {}", x.outcome, x.packets),
        })
        .collect();
    let _ = writeln!(o, "Outcomes:   {}", passed.join(", "));
    if !d.maps.is_empty() {
        let maps: Vec<String> = d
            .maps
            .iter()
            .map(|m| format!("{} {}/{}", m.map, m.entries, m.capacity))
            .collect();
        let _ = writeln!(o, "Maps:       {}", maps.join(", "));
    }
    let _ = writeln!(o, "Endpoints:  {}", d.endpoints.len());
    for e in &d.endpoints {
        let _ = writeln!(
            o,
            "  {} via ifindex {} (MAC {})",
            e.ip, e.host_ifindex, e.mac
        );
    }
    o
}

fn write_peers(o: &mut String, rows: &[Row], counted: bool) -> std::fmt::Result {
    writeln!(o, "Peers:      {}", rows.len())?;
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        o,
        "  {:<18} {:<15} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}  BACKEND",
        "SUBNET", "PUBLIC IP", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "TX DROP", "RX DROP"
    )?;
    for r in rows {
        let t = r.traffic.as_ref();
        let n = |f: fn(&PeerTraffic) -> u64| match (counted, t) {
            (true, Some(t)) => f(t).to_string(),
            (true, None) => "0".to_owned(),
            (false, _) => "-".to_owned(),
        };
        let b = |f: fn(&PeerTraffic) -> u64| match (counted, t) {
            (true, Some(t)) => bytes(f(t)),
            (true, None) => "0 B".to_owned(),
            (false, _) => "-".to_owned(),
        };
        writeln!(
            o,
            "  {:<18} {:<15} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}  {}",
            r.subnets.join(","),
            r.public_ip,
            n(|t| t.tx_packets),
            b(|t| t.tx_bytes),
            n(|t| t.rx_packets),
            b(|t| t.rx_bytes),
            n(|t| t.tx_dropped),
            n(|t| t.rx_dropped),
            r.backend
        )?;
    }
    Ok(())
}
