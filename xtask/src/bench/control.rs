//! `cargo xtask bench --control-plane N`: one agent against N peer leases in a real etcd.
//!
//! Measured black-box wherever the datapath allows: every fake peer's PublicIP is a "sink" host
//! (198.18.0.2) that listens on the udp (8285) and vxlan (8472) ports and records the first
//! encapsulated packet per inner destination subnet, while a prober in the agent host's container
//! keeps sending one datagram to each subnet not seen yet. A peer "reached the dataplane" when a
//! packet to its subnet comes out encapsulated towards it. When the datapath forwards nothing
//! (not built yet), the agent's `peer added` log lines are counted instead, and the report says
//! so.
//!
//! - time to start and program all N peers (agent start to the last of N subnets seen);
//! - one added peer to the dataplane: median and p99 over 100 puts (10 with --quick);
//! - the agent's resident memory (VmRSS) with N peers;
//! - etcd requests per minute at rest (gRPC messages received by etcd, from its /metrics).

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    lab::{Lab, LabConfig, SubnetEnv},
    netns::NetNs,
};
use serde_json::json;

use super::{
    Options, check_interrupted,
    etcd::{ETCD_IP, Etcd},
    interrupted,
    report::Stat,
    rig::{ETCD_PREFIX, agent_args},
};
use crate::cmd::{step, workspace_root};

const SINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Subnet number `i` (0-based) of the fake peers: 10.(i/256+1).(i%256).0/24 — 10.0.x.0 is left
/// for nobody, the agent leases its own elsewhere in 10.0.0.0/8.
fn peer_subnet(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, (i / 256 + 1) as u8, (i % 256) as u8, 0)
}

pub fn run(
    opts: &Options,
    n: usize,
    agent: Result<&Path, &str>,
    run_dir: &Path,
) -> anyhow::Result<()> {
    if n == 0 || n > 60_000 {
        bail!("--control-plane N: N must be in 1..=60000");
    }
    let agent = match agent {
        Ok(a) => a,
        Err(why) => bail!("the control-plane bench needs the agent: {why}"),
    };
    let changes = if opts.quick { 10 } else { 100 };
    let rest_secs = if opts.quick { 10 } else { 60 };
    std::fs::create_dir_all(run_dir)?;
    step(format!(
        "bench control plane: {n} peers, {changes} added one by one, {rest_secs} s at rest"
    ));
    let mut lab = Lab::new(&LabConfig {
        prefix: super::rig::PREFIX.into(),
        hosts: 2,
        underlay_mtu: 1500,
    })?;
    lab.switch
        .ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "ul0"])?;
    let etcd = Etcd::start(&lab.switch, &run_dir.join("etcd"))?;
    etcd.put(
        &format!("{ETCD_PREFIX}/config"),
        r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#,
    )?;

    // The sink: every peer's underlay address.
    let seen: Arc<Mutex<HashMap<Ipv4Addr, Instant>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sink_threads = start_sink(&lab.hosts[1].ns, seen.clone(), stop.clone())?;

    step(format!("bench control plane: filling etcd with {n} leases"));
    let t = Instant::now();
    let http = EtcdHttp::new(&lab.hosts[1].ns);
    let lease = http.grant(24 * 3600)?;
    for i in 0..n {
        if i % 1000 == 0 {
            check_interrupted()?;
        }
        http.put_peer(peer_subnet(i), i, &lease)?;
    }
    step(format!(
        "bench control plane: {n} leases in {:.1} s",
        t.elapsed().as_secs_f64()
    ));

    // The agent.
    let hdir = run_dir.join("h1");
    std::fs::create_dir_all(&hdir)?;
    let subnet_file = hdir.join("subnet.env");
    let log = hdir.join("agent-control-plane.log");
    let args = agent_args(
        &etcd.endpoint(),
        lab.hosts[0].underlay_ip,
        &subnet_file.to_string_lossy(),
        "auto",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let mut agent_proc = lab.hosts[0]
        .ns
        .spawn(&agent.to_string_lossy(), &args, Some(&log))?;
    let env = loop {
        if let Some(status) = agent_proc.try_wait() {
            bail!("the agent exited ({status}); see {}", log.display());
        }
        if let Some(env) = std::fs::read_to_string(&subnet_file)
            .ok()
            .and_then(|t| SubnetEnv::parse(&t).ok())
        {
            break env;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("no subnet.env within 120 s; see {}", log.display());
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    };
    let t_subnet_env = t0.elapsed();
    lab.hosts[0].start_docker(&env)?;
    let container = &lab.hosts[0].container.as_ref().expect("started").ns;

    // Probe every subnet until all are seen, or decide the datapath forwards nothing.
    let all: Vec<Ipv4Addr> = (0..n).map(peer_subnet).collect();
    let prober = Prober::new(container)?;
    let limit = Duration::from_secs(60 + n as u64 / 100);
    let mut black_box = true;
    let mut log_all = None;
    let t_all = loop {
        let pending: Vec<Ipv4Addr> = {
            let seen = seen.lock().expect("sink lock");
            all.iter()
                .filter(|s| !seen.contains_key(s))
                .copied()
                .collect()
        };
        if pending.is_empty() {
            let seen = seen.lock().expect("sink lock");
            let last = all.iter().filter_map(|s| seen.get(s)).max().expect("n > 0");
            break last.duration_since(t0);
        }
        if log_all.is_none() && count_in_log(&log, "peer added") >= n {
            log_all = Some(t0.elapsed());
        }
        if let Some(at) = log_all
            && pending.len() == n
            && t0.elapsed() > at + Duration::from_secs(10)
        {
            // The agent added every peer 10 s ago and not one packet came out: the datapath
            // does not forward. Fall back to the log.
            black_box = false;
            break at;
        }
        if t0.elapsed() > limit {
            bail!(
                "{} of {n} peers not in the dataplane after {limit:?}",
                pending.len()
            );
        }
        check_interrupted()?;
        prober.send(&pending);
        std::thread::sleep(Duration::from_millis(20));
    };
    let method = if black_box {
        "black-box: first encapsulated packet towards the peer's underlay address"
    } else {
        "the datapath forwards nothing (not built yet): counted at the agent's `peer added` \
         log line, i.e. control plane only"
    };
    step(format!(
        "bench control plane: subnet.env after {:.2} s, all {n} peers after {:.2} s ({method})",
        t_subnet_env.as_secs_f64(),
        t_all.as_secs_f64()
    ));
    let rss_programmed = rss_kib(agent_proc.pid());

    // One peer at a time.
    let (own_subnet, _) = env.subnet();
    let mut latencies = Vec::new();
    let mut added = 0usize;
    for k in 0..changes {
        check_interrupted()?;
        let mut idx = n + k + added;
        while peer_subnet(idx) == own_subnet {
            idx += 1;
            added += 1;
        }
        let subnet = peer_subnet(idx);
        let log_before = count_in_log(&log, "peer added");
        let t = Instant::now();
        http.put_peer(subnet, idx, &lease)?;
        let deadline = t + Duration::from_secs(10);
        let reached = loop {
            if black_box {
                if let Some(at) = seen.lock().expect("sink lock").get(&subnet) {
                    break Some(at.duration_since(t));
                }
                prober.send(&[subnet]);
            } else if count_in_log(&log, "peer added") > log_before {
                break Some(t.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_micros(500));
        };
        match reached {
            Some(d) => latencies.push(d.as_secs_f64() * 1e3),
            None => bail!("added peer {subnet}/24 not in the dataplane within 10 s"),
        }
    }
    let lat = Stat::of(&latencies).context("no latencies")?;
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[((sorted.len() as f64 * 0.99).ceil() as usize).clamp(1, sorted.len()) - 1];

    // At rest.
    step(format!(
        "bench control plane: counting etcd requests for {rest_secs} s at rest"
    ));
    let before = grpc_messages(&etcd.metrics()?);
    let rest_start = Instant::now();
    while rest_start.elapsed() < Duration::from_secs(rest_secs) {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = grpc_messages(&etcd.metrics()?);
    let minutes = rest_start.elapsed().as_secs_f64() / 60.0;
    let mut per_method: Vec<(String, f64)> = after
        .iter()
        .map(|(m, v)| {
            (
                m.clone(),
                (v - before.get(m).copied().unwrap_or(0.0)) / minutes,
            )
        })
        .filter(|(_, v)| *v > 0.0)
        .collect();
    per_method.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total_per_min = per_method.iter().fold(0.0, |acc, (_, v)| acc + v);
    let total_before = before.values().fold(0.0, |acc, v| acc + v);
    if total_before == 0.0 {
        bail!("etcd's /metrics shows no grpc_server_msg_received_total: cannot count requests");
    }
    let rss_after = rss_kib(agent_proc.pid());
    if let Some(status) = agent_proc.try_wait() {
        bail!("the agent exited during the run ({status})");
    }
    drop(agent_proc);
    stop.store(true, Ordering::Relaxed);
    for t in sink_threads {
        let _ = t.join();
    }
    drop(etcd);
    drop(lab);

    let breakdown: Vec<String> = per_method
        .iter()
        .map(|(m, v)| format!("{m} {v:.1}"))
        .collect();
    let md = format!(
        "Command: `{}`  \nMachine: {}  \n\n\
         | control plane, {n} peers | value |\n| --- | ---: |\n\
         | agent start to subnet.env | {:.2} s |\n\
         | agent start to all {n} peers in the dataplane | {:.2} s |\n\
         | one added peer to the dataplane, median ({changes} changes) | {:.1} ms |\n\
         | one added peer to the dataplane, p99 | {p99:.1} ms |\n\
         | agent resident memory (VmRSS) with {n} peers | {:.1} MiB |\n\
         | etcd requests per minute at rest | {total_per_min:.1} |\n\n\
         - Peer programming measured: {method}.\n\
         - etcd requests at rest by gRPC method (per minute): {}. Counted from etcd's \
           grpc_server_msg_received_total, which stood at {} before the window (filling etcd \
           and the agent's start), so the counter works.\n",
        super::command_line(),
        super::machine(),
        t_subnet_env.as_secs_f64(),
        t_all.as_secs_f64(),
        lat.median,
        rss_after.or(rss_programmed).unwrap_or(0) as f64 / 1024.0,
        if breakdown.is_empty() {
            "none".to_owned()
        } else {
            breakdown.join(", ")
        },
        total_before,
    );
    let out = json!({
        "command": super::command_line(),
        "machine": super::machine(),
        "peers": n,
        "method": method,
        "start_to_subnet_env_s": t_subnet_env.as_secs_f64(),
        "start_to_all_peers_s": t_all.as_secs_f64(),
        "added_peer_ms": {"samples": latencies, "median": lat.median, "p99": p99},
        "agent_rss_kib": rss_after.or(rss_programmed),
        "etcd_requests_per_minute_at_rest": total_per_min,
        "etcd_requests_per_minute_by_method": per_method.iter().cloned().collect::<HashMap<_, _>>(),
    });
    let out_dir = workspace_root().join("target").join("bench");
    let json = serde_json::to_string_pretty(&out)?;
    std::fs::write(out_dir.join("control-plane.md"), &md)?;
    std::fs::write(out_dir.join("control-plane.json"), &json)?;
    if let Some(path) = &opts.json {
        std::fs::write(path, &json)?;
    }
    println!("{md}");
    step(format!(
        "bench control plane: wrote {}/control-plane.md and control-plane.json",
        out_dir.display()
    ));
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn count_in_log(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .map(|t| t.matches(needle).count())
        .unwrap_or(0)
}

/// `grpc_server_msg_received_total` per method, from etcd's Prometheus text.
fn grpc_messages(metrics: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|l| l.strip_prefix("grpc_method=\""))
            .map(|m| m.trim_end_matches('"').to_owned())
            .unwrap_or_default();
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(method).or_insert(0.0) += v;
        }
    }
    out
}

/// Threads in the sink namespace recording the first packet per inner destination /24.
fn start_sink(
    ns: &NetNs,
    seen: Arc<Mutex<HashMap<Ipv4Addr, Instant>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::new();
    for (port, inner_offset) in [(8285u16, 0usize), (8472, 8 + 14)] {
        let (tx, rx) = std::sync::mpsc::channel();
        let name = ns.name().to_owned();
        let (seen, stop) = (seen.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let sock = (|| -> anyhow::Result<UdpSocket> {
                enter(&name)?;
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })();
            let sock = match sock {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) && !interrupted() {
                let Ok(len) = sock.recv(&mut buf) else {
                    continue;
                };
                let now = Instant::now();
                let d = inner_offset + 16;
                if len >= d + 4 {
                    let dst = Ipv4Addr::new(buf[d], buf[d + 1], buf[d + 2], 0);
                    seen.lock().expect("sink lock").entry(dst).or_insert(now);
                }
            }
        }));
        rx.recv().context("sink thread")??;
    }
    Ok(threads)
}

fn enter(ns_name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(format!("/run/netns/{ns_name}"))?;
    // SAFETY: setns with a namespace fd changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// A UDP socket inside the container (opened by a thread that entered its namespace; a socket
/// stays in the namespace it was created in).
struct Prober {
    sock: UdpSocket,
}

impl Prober {
    fn new(ns: &NetNs) -> anyhow::Result<Self> {
        let sock = ns.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
        sock.set_nonblocking(true)?;
        Ok(Self { sock })
    }

    fn send(&self, subnets: &[Ipv4Addr]) {
        for s in subnets {
            let o = s.octets();
            let _ = self
                .sock
                .send_to(b"probe", (Ipv4Addr::new(o[0], o[1], o[2], 2), 9));
        }
    }
}

/// etcd's JSON gateway (`/v3/...`), over one keep-alive HTTP connection made from inside a rig
/// namespace: one request per lease, timed without a process start in between.
struct EtcdHttp {
    conn: Mutex<Option<TcpStream>>,
    ns_name: String,
}

impl EtcdHttp {
    fn new(ns: &NetNs) -> Self {
        Self {
            conn: Mutex::new(None),
            ns_name: ns.name().to_owned(),
        }
    }

    fn connect(&self) -> anyhow::Result<TcpStream> {
        let name = self.ns_name.clone();
        std::thread::spawn(move || -> anyhow::Result<TcpStream> {
            enter(&name)?;
            let s = TcpStream::connect((ETCD_IP, 2379))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut guard = self.conn.lock().expect("etcd http lock");
        if guard.is_none() {
            *guard = Some(self.connect()?);
        }
        let conn = guard.as_mut().expect("connected");
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {ETCD_IP}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes())?;
        // Read the head, then Content-Length bytes (or chunks).
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            let n = conn.read(&mut tmp)?;
            if n == 0 {
                *guard = None;
                bail!("etcd closed the connection");
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("etcd {path}: {}", head.lines().next().unwrap_or(""));
        }
        let body = if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < head_end + len {
                let n = conn.read(&mut tmp)?;
                if n == 0 {
                    bail!("etcd closed the connection mid-body");
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            buf[head_end..head_end + len].to_vec()
        } else {
            // Chunked: read until the terminating chunk.
            while !buf[head_end..].ends_with(b"0\r\n\r\n") {
                let n = conn.read(&mut tmp)?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            dechunk(&buf[head_end..])
        };
        Ok(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null))
    }

    fn grant(&self, ttl: u64) -> anyhow::Result<String> {
        let r = self.post("/v3/lease/grant", &json!({ "TTL": ttl }))?;
        r["ID"]
            .as_str()
            .map(str::to_owned)
            .context("etcd lease grant: no ID")
    }

    fn put_peer(&self, subnet: Ipv4Addr, i: usize, lease: &str) -> anyhow::Result<()> {
        let key = format!("{ETCD_PREFIX}/subnets/{subnet}-24");
        let mac = format!(
            "0e:cc:{:02x}:{:02x}:{:02x}:{:02x}",
            (i >> 24) & 0xff,
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff
        );
        let value = json!({
            "PublicIP": SINK_IP.to_string(),
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac},
        })
        .to_string();
        self.post(
            "/v3/kv/put",
            &json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": lease}),
        )?;
        Ok(())
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || data.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[(eol + 4 + size).min(data.len())..];
    }
    out
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= c.len() {
                s.push(T[(v >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"/coreos.com"), "L2NvcmVvcy5jb20=");
    }

    #[test]
    fn grpc_metric_lines() {
        let m = "grpc_server_msg_received_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 12\n\
                 grpc_server_msg_received_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"} 3\n";
        let g = grpc_messages(m);
        assert_eq!(g["Range"], 12.0);
        assert_eq!(g["Watch"], 3.0);
    }

    #[test]
    fn peer_subnets_are_distinct_tens() {
        assert_eq!(peer_subnet(0), Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(peer_subnet(257), Ipv4Addr::new(10, 2, 1, 0));
    }
}
