//! `cargo xtask dashboard`: the README's picture of `deploy/grafana-dashboard.json`, drawn from a
//! real run instead of a screenshot (no Grafana here): three lab hosts on the eBPF datapath, TCP
//! between their containers, a burst of spoofed datagrams, and host 1's `/metrics` scraped once
//! a second. The panels are the dashboard's, computed the way its queries compute them (rates of
//! the counters between scrapes).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::{Cluster, HEALTHZ_PORT, backend_lab, http_get},
    netns::NsProcess,
    receive_cases::inner_ping,
};

use crate::{
    build,
    cmd::{is_root, step, workspace_root},
    setup,
};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Where to write the SVG.
    #[arg(long, default_value = "docs/dashboard.svg")]
    pub out: PathBuf,
    /// Seconds of traffic to record.
    #[arg(long, default_value_t = 40)]
    pub seconds: u32,
    /// Skip `setup`.
    #[arg(long)]
    pub no_setup: bool,
}

/// One scrape: every sample by its full name (`family{labels}`).
type Scrape = BTreeMap<String, f64>;

fn parse(body: &str) -> Scrape {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of `label` in a sample's name.
fn label<'a>(name: &'a str, label: &str) -> Option<&'a str> {
    let start = name.find(&format!("{label}=\""))? + label.len() + 2;
    let len = name[start..].find('"')?;
    Some(&name[start..start + len])
}

pub fn dashboard(opts: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the lab creates network namespaces and loads eBPF programs: run as root");
    }
    if !opts.no_setup {
        setup::setup(&setup::Options::default())?;
    }
    let binary = build::build(&build::Options { debug: false })?;
    let dir = std::env::temp_dir().join(format!("overlay-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (lab, config) = backend_lab("ovd", 3, "udp");
    let mut cluster = Cluster::new(&lab, &config, &binary, &dir).context("building the lab")?;
    step("dashboard: three hosts, eBPF datapath, udp backend");
    let healthz = [
        "--datapath=ebpf".to_owned(),
        "--healthz-ip=127.0.0.1".to_owned(),
        format!("--healthz-port={HEALTHZ_PORT}"),
    ];
    let flags: Vec<&str> = healthz.iter().map(String::as_str).collect();
    cluster.start_all(&flags)?;
    for i in 0..3 {
        cluster.wait_healthy(i, Duration::from_secs(30))?;
    }
    let container = |i: usize| cluster.lab.hosts[i].container.as_ref().expect("started");
    let log = |name: &str| dir.join(format!("{name}.log"));
    let mut procs: Vec<NsProcess> = Vec::new();
    for i in [0, 1] {
        procs.push(container(i).ns.spawn(
            "iperf3",
            &["-s", "-p", "5201"],
            Some(&log(&format!("iperf3-server-h{}", i + 1))),
        )?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let secs = opts.seconds;
    let (h1_c, h2_c) = (container(0).ip.to_string(), container(1).ip.to_string());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    let scrape = |c: &Cluster| -> anyhow::Result<Scrape> {
        let (code, body) = c.lab.hosts[0].ns.run(|| http_get(addr, "/metrics"))??;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(parse(&body))
    };
    step(format!(
        "dashboard: {secs} s: h1 -> h2 TCP at 400 Mbit/s; h3 -> h1 at 150 Mbit/s from 1/4 in; \
         spoofed datagrams from h2 from 1/2 in to 5/8; h1's /metrics once a second"
    ));
    let mut scrapes = vec![scrape(&cluster)?];
    let started = Instant::now();
    procs.push(container(0).ns.spawn(
        "iperf3",
        &[
            "-c",
            &h2_c,
            "-p",
            "5201",
            "-t",
            &secs.to_string(),
            "-b",
            "400M",
        ],
        Some(&log("iperf3-h1-h2")),
    )?);
    let h2_ip = cluster.lab.hosts[1].underlay_ip;
    let h1_ip = cluster.lab.hosts[0].underlay_ip;
    let spoofed = inner_ping(Ipv4Addr::new(172, 31, 99, 9), container(0).ip);
    for t in 1..=secs {
        if t == secs / 4 {
            procs.push(container(2).ns.spawn(
                "iperf3",
                &[
                    "-c",
                    &h1_c,
                    "-p",
                    "5201",
                    "-t",
                    &(secs - t).to_string(),
                    "-b",
                    "150M",
                ],
                Some(&log("iperf3-h3-h1")),
            )?);
        }
        if (secs / 2..secs * 5 / 8).contains(&t) {
            // A peer's address with an inner source outside its subnet: tc_decap drops each as
            // DropSpoofed, charged to that peer.
            cluster.lab.hosts[1].ns.run(|| -> std::io::Result<()> {
                let sock = std::net::UdpSocket::bind((h2_ip, 0))?;
                for _ in 0..300 {
                    sock.send_to(&spoofed, (h1_ip, 8285))?;
                }
                Ok(())
            })??;
        }
        let next = started + Duration::from_secs(u64::from(t));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        scrapes.push(scrape(&cluster)?);
    }
    drop(procs);
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", cluster.lab.hosts[0].ns.name()])
        .arg(&binary)
        .arg(format!(
            "--bpffs={}",
            cluster.bpffs.path().join("h1").display()
        ))
        .arg("status")
        .output()?;
    println!(
        "\n$ overlay-agent status   (on h1)\n{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let peers: BTreeMap<String, String> = (1..3)
        .map(|i| {
            let h = &cluster.lab.hosts[i];
            (
                h.underlay_ip.to_string(),
                format!("h{} {}", i + 1, h.underlay_ip),
            )
        })
        .collect();
    let svg = render(&scrapes, &peers);
    let out = workspace_root().join(&opts.out);
    std::fs::write(&out, svg).with_context(|| format!("writing {}", out.display()))?;
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    step(format!("dashboard: wrote {}", out.display()));
    Ok(())
}

/// A line chart's series: name, colour, one value per second.
struct Series {
    name: String,
    values: Vec<f64>,
}

/// Per-second rates of every sample of `family`, grouped by `key` of its name.
fn rates(scrapes: &[Scrape], family: &str, key: impl Fn(&str) -> Option<String>) -> Vec<Series> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (i, pair) in scrapes.windows(2).enumerate() {
        for (name, now) in &pair[1] {
            if !name.starts_with(&format!("{family}{{")) {
                continue;
            }
            let Some(k) = key(name) else { continue };
            let before = pair[0].get(name).copied().unwrap_or(*now);
            let v = by.entry(k).or_insert_with(|| vec![0.0; scrapes.len() - 1]);
            v[i] += (now - before).max(0.0);
        }
    }
    by.into_iter()
        .map(|(name, values)| Series { name, values })
        .collect()
}

const COLOURS: [&str; 6] = [
    "#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1",
];
const BG: &str = "#181b1f";
const PANEL: &str = "#22252b";
const TEXT: &str = "#d8d9da";
const DIM: &str = "#8e8e8e";

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let exp = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * exp >= v {
            return m * exp;
        }
    }
    10.0 * exp
}

fn fmt_axis(v: f64, unit: &str) -> String {
    let (v, p) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let n = if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    };
    format!("{n} {p}{unit}")
}

#[allow(clippy::too_many_arguments)]
fn chart(
    s: &mut String,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    title: &str,
    unit: &str,
    series: &[Series],
) {
    let _ = write!(
        s,
        r##"<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="{PANEL}"/><text x="{}" y="{}" fill="{TEXT}" font-size="14" font-weight="bold">{title}</text>"##,
        x + 10.0,
        y + 20.0
    );
    let (px, py, pw, ph) = (x + 70.0, y + 35.0, w - 240.0, h - 60.0);
    let max = nice_max(
        series
            .iter()
            .flat_map(|s| s.values.iter().copied())
            .fold(0.0, f64::max),
    );
    for i in 0..=4 {
        let v = max * f64::from(i) / 4.0;
        let yy = py + ph - ph * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{px}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#33363c"/><text x="{:.1}" y="{:.1}" fill="{DIM}" font-size="10" text-anchor="end">{}</text>"##,
            px + pw,
            px - 6.0,
            yy + 3.0,
            fmt_axis(v, unit)
        );
    }
    let n = series.first().map_or(0, |s| s.values.len());
    if n > 1 {
        for t in (0..n).step_by(10) {
            let xx = px + pw * t as f64 / (n - 1) as f64;
            let _ = write!(
                s,
                r##"<text x="{xx:.1}" y="{:.1}" fill="{DIM}" font-size="10" text-anchor="middle">{t}s</text>"##,
                py + ph + 14.0
            );
        }
    }
    for (i, se) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = se
            .values
            .iter()
            .enumerate()
            .map(|(t, v)| {
                let xx = px + pw * t as f64 / (n.max(2) - 1) as f64;
                let yy = py + ph - ph * v / max;
                format!("{xx:.1},{yy:.1}")
            })
            .collect();
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"##,
            points.join(" ")
        );
        let max = se.values.iter().copied().fold(0.0, f64::max);
        let ly = py + 12.0 + 30.0 * i as f64;
        let _ = write!(
            s,
            r##"<rect x="{:.1}" y="{:.1}" width="10" height="3" fill="{colour}"/><text x="{:.1}" y="{:.1}" fill="{TEXT}" font-size="11">{}</text><text x="{:.1}" y="{:.1}" fill="{DIM}" font-size="10">max {}</text>"##,
            px + pw + 15.0,
            ly - 4.0,
            px + pw + 30.0,
            ly,
            se.name,
            px + pw + 30.0,
            ly + 13.0,
            fmt_axis(max, unit)
        );
    }
}

fn stat(s: &mut String, x: f64, y: f64, title: &str, value: &str, good: bool) {
    let colour = if good { "#37872d" } else { "#c4162a" };
    let _ = write!(
        s,
        r##"<rect x="{x}" y="{y}" width="188" height="70" rx="3" fill="{colour}"/><text x="{:.1}" y="{:.1}" fill="#fff" font-size="12">{title}</text><text x="{:.1}" y="{:.1}" fill="#fff" font-size="24" font-weight="bold">{value}</text>"##,
        x + 10.0,
        y + 20.0,
        x + 10.0,
        y + 55.0
    );
}

fn render(scrapes: &[Scrape], peers: &BTreeMap<String, String>) -> String {
    let last = scrapes.last().cloned().unwrap_or_default();
    let get = |k: &str| last.get(k).copied().unwrap_or(0.0);
    let peer_name = |n: &str| label(n, "peer").map(|p| peers.get(p).cloned().unwrap_or(p.into()));
    let bits = |mut v: Vec<Series>| {
        for s in &mut v {
            for x in &mut s.values {
                *x *= 8.0;
            }
        }
        v
    };
    let tx = bits(rates(
        scrapes,
        "overlay_peer_transmit_bytes_total",
        peer_name,
    ));
    let rx = bits(rates(
        scrapes,
        "overlay_peer_receive_bytes_total",
        peer_name,
    ));
    let drops: Vec<Series> = rates(scrapes, "overlay_peer_dropped_packets_total", |n| {
        Some(format!("{} {}", label(n, "direction")?, peer_name(n)?))
    })
    .into_iter()
    .filter(|s| s.values.iter().any(|v| *v > 0.0))
    .collect();
    let reasons: Vec<Series> = rates(scrapes, "overlay_dataplane_dropped_packets_total", |n| {
        label(n, "reason").map(str::to_owned)
    })
    .into_iter()
    .filter(|s| s.values.iter().any(|v| *v > 0.0))
    .collect();
    let (w, h) = (1240.0, 860.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Inter, Helvetica, Arial, sans-serif"><rect width="{w}" height="{h}" fill="{BG}"/><text x="20" y="30" fill="{TEXT}" font-size="18" font-weight="bold">overlay-agent</text><text x="160" y="30" fill="{DIM}" font-size="12">deploy/grafana-dashboard.json, drawn from host h1's /metrics in a real run (cargo xtask dashboard): three hosts, eBPF datapath, udp backend</text>"##
    );
    let y0 = 45.0;
    stat(
        &mut s,
        20.0,
        y0,
        "Healthy (/healthz 200)",
        if get("overlay_healthy") == 1.0 {
            "yes"
        } else {
            "NO"
        },
        get("overlay_healthy") == 1.0,
    );
    stat(
        &mut s,
        220.0,
        y0,
        "Lease held",
        if get("overlay_lease_held") == 1.0 {
            "yes"
        } else {
            "NO"
        },
        get("overlay_lease_held") == 1.0,
    );
    let expiry = get("overlay_lease_expiry_seconds");
    stat(
        &mut s,
        420.0,
        y0,
        "Lease expires in",
        &format!("{:.1} h", expiry / 3600.0),
        expiry > 0.0,
    );
    stat(
        &mut s,
        620.0,
        y0,
        "etcd up",
        if get("overlay_etcd_up") == 1.0 {
            "yes"
        } else {
            "NO"
        },
        get("overlay_etcd_up") == 1.0,
    );
    stat(
        &mut s,
        820.0,
        y0,
        "Datapath up",
        if get("overlay_datapath_up") == 1.0 {
            "yes"
        } else {
            "NO"
        },
        get("overlay_datapath_up") == 1.0,
    );
    stat(
        &mut s,
        1020.0,
        y0,
        "Peers",
        &format!("{}", get("overlay_peers")),
        true,
    );
    let (cw, ch) = (600.0, 250.0);
    let y1 = y0 + 85.0;
    chart(&mut s, 20.0, y1, cw, ch, "Sent to each peer", "bit/s", &tx);
    chart(
        &mut s,
        620.0,
        y1,
        cw,
        ch,
        "Received from each peer",
        "bit/s",
        &rx,
    );
    let y2 = y1 + ch + 10.0;
    chart(
        &mut s,
        20.0,
        y2,
        cw,
        ch,
        "Drops by reason",
        "pkt/s",
        &reasons,
    );
    chart(&mut s, 620.0, y2, cw, ch, "Drops per peer", "pkt/s", &drops);
    let y3 = y2 + ch + 10.0;
    let _ = write!(
        s,
        r##"<rect x="20" y="{y3}" width="1200" height="{}" rx="3" fill="{PANEL}"/><text x="30" y="{}" fill="{TEXT}" font-size="14" font-weight="bold">Map fill</text>"##,
        h - y3 - 20.0,
        y3 + 20.0
    );
    let maps: Vec<(String, f64, f64)> = last
        .iter()
        .filter(|(k, _)| k.starts_with("overlay_map_entries{"))
        .filter_map(|(k, v)| {
            let map = label(k, "map")?.to_owned();
            let cap = last.get(&format!("overlay_map_capacity{{map=\"{map}\"}}"))?;
            Some((map, *v, *cap))
        })
        .collect();
    for (i, (map, entries, cap)) in maps.iter().enumerate() {
        let x = 30.0 + 297.0 * i as f64;
        let frac = if *cap > 0.0 { entries / cap } else { 0.0 };
        let _ = write!(
            s,
            r##"<text x="{x}" y="{:.1}" fill="{TEXT}" font-size="11">{map}: {entries} of {cap}</text><rect x="{x}" y="{:.1}" width="280" height="12" fill="#33363c"/><rect x="{x}" y="{:.1}" width="{:.1}" height="12" fill="{}"/>"##,
            y3 + 45.0,
            y3 + 52.0,
            y3 + 52.0,
            (280.0 * frac).max(2.0),
            COLOURS[0]
        );
    }
    s.push_str("</svg>\n");
    s
}
