//! `cargo xtask soak --minutes N`: three hosts on a three-member etcd, steady ping and TCP
//! traffic between their containers for N minutes, while peers join and leave every few seconds
//! (some deleted, some left to expire), agents are killed and restarted, and etcd members are
//! killed and restarted, at random, one at a time. Every 15 s one line: per agent RSS, open file
//! descriptors, CPU, the peers its metrics count and the entries its kernel peer map holds. At the
//! end a summary; the run fails on a lost ping, a failed TCP transfer, an agent that exited by
//! itself, or growth of the never-restarted agent's descriptors or memory.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::{
        Cluster, HEALTHZ_PORT, LabEtcd as _, backend_lab, healthz_flags, metric, tcp_transfer,
    },
    etcd_cluster::EtcdCluster,
    flow::{self, PingFlow},
};

use crate::{build, cmd::step, setup};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// How long to run, in minutes (fractions allowed: CI runs a short one).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Seed of the random schedule (printed, so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip `setup`.
    #[arg(long)]
    pub no_setup: bool,
    /// Build the agent without optimisations.
    #[arg(long)]
    pub debug_agent: bool,
}

/// Namespace prefix of the soak's lab.
const PREFIX: &str = "sk";
/// The lease TTL the agents run with: short, so renewals and expiries happen all the time.
const TTL: &str = "--subnet-lease-ttl=30s";
/// How long an expired peer stays: short, so stale peers come and go within the run.
const GRACE: &str = "--expired-peer-grace=60s";
/// The host whose agent is never restarted: its memory and descriptors over the whole run
/// tell whether the agent leaks.
const STEADY: usize = 0;
const SAMPLE_EVERY: Duration = Duration::from_secs(15);
/// Samples before this are warm-up (the first peers, the first renewals).
const WARM_UP: Duration = Duration::from_secs(60);

pub fn soak(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_setup {
        setup::setup(&setup::Options::default())?;
    }
    let binary = build::build(&build::Options {
        debug: opts.debug_agent,
    })?;
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let run_for = Duration::from_secs_f64(opts.minutes * 60.0);
    step(format!(
        "soak: {:.1} min, seed {seed}: 3 hosts, 3 etcd members, 6 ping flows at 20/s, TCP \
         transfers h1->h3, peers joining and leaving, agent and etcd member restarts",
        opts.minutes
    ));
    let dir = std::env::temp_dir().join(format!("overlay-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = run(&binary, &dir, run_for, seed);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        step(format!("soak: logs kept in {}", dir.display()));
    }
    result
}

/// xorshift64*: the schedule is repeatable from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }

    fn secs(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_secs(from + self.below(to - from + 1))
    }
}

/// One agent's numbers at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: usize,
    cpu_ticks: u64,
    peers: u64,
    stale: u64,
    map_entries: usize,
}

/// A fake peer's lease, written with etcdctl: a host that joins and later leaves.
struct FakePeer {
    key: String,
    /// Deleted at this time; `None`: left to expire.
    delete_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Tally {
    agent_restarts: usize,
    member_restarts: usize,
    peers_joined: usize,
    peers_deleted: usize,
    peers_left_to_expire: usize,
    tcp_ok: usize,
    tcp_failed: Vec<String>,
    /// The soak's own etcd writes that had to be repeated (see [`patiently`]).
    rig_retries: usize,
}

/// How long the soak's own etcd writes (the joining and leaving peers) are repeated: through an
/// election after a member's death, and under load, etcd answers "request timed out" or "no
/// leader" for a few seconds, which the agents ride out and so must the rig. Past this, etcd is
/// broken for everyone and the soak fails.
const RIG_PATIENCE: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds, for at most [`RIG_PATIENCE`], counting each repetition.
fn patiently<T>(
    retries: &mut usize,
    what: &str,
    mut op: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + RIG_PATIENCE;
    loop {
        match op() {
            Ok(v) => return Ok(v),
            Err(_) if Instant::now() < deadline => {
                *retries += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{what}: etcd refused for {RIG_PATIENCE:?}, with quorum"
                )));
            }
        }
    }
}

fn run(binary: &Path, dir: &Path, run_for: Duration, seed: u64) -> anyhow::Result<()> {
    let mut rng = Rng(seed);
    let (lab, config) = backend_lab(PREFIX, 3, "vxlan");
    let mut cluster = Cluster::with_etcd(&lab, &config, binary, dir, |lab, dir| {
        Ok(EtcdCluster::new(&lab.switch, PREFIX, dir)?)
    })
    .context("building the lab")?;
    let mut extra: Vec<String> = healthz_flags().to_vec();
    extra.extend([TTL.to_owned(), GRACE.to_owned()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    cluster.start_all(&extra).context("starting the agents")?;
    for i in 0..3 {
        cluster.wait_healthy(i, Duration::from_secs(30))?;
    }
    let ips = cluster.container_ips();
    let own_subnets: Vec<Ipv4Addr> = ips
        .iter()
        .map(|ip| Ipv4Addr::from(ip.to_bits() & !0xff))
        .collect();
    let mut flows = Vec::new();
    for (from, host) in cluster.lab.hosts.iter().enumerate() {
        for (to, ip) in ips.iter().enumerate() {
            if from != to {
                let c = host.container.as_ref().expect("started");
                flows.push((
                    (from, to),
                    PingFlow::start(&c.ns, *ip, "0.05", 5).map_err(anyhow::Error::msg)?,
                ));
            }
        }
    }
    step(
        "soak: traffic runs; one line every 15 s: per host RSS MiB / fds / CPU % / peers (stale) / map entries",
    );

    let started = Instant::now();
    let mut tally = Tally::default();
    let mut fakes: Vec<FakePeer> = Vec::new();
    let mut next_fake = 0u32;
    let mut next_join = started + rng.secs(2, 5);
    let mut next_agent_restart = started + rng.secs(30, 60);
    let mut next_member_kill = started + rng.secs(40, 80);
    let mut member_down: Option<(usize, Instant)> = None;
    let mut next_sample = started;
    let mut samples: Vec<(Duration, [Sample; 3])> = Vec::new();
    let mut last_cpu: Option<(Instant, [u64; 3])> = None;
    let hz = clock_ticks();
    let ctl = cluster.etcd.ctl();

    // TCP: transfers back to back on their own thread, each checked byte for byte.
    let (tcp_tx, tcp_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let stop_tcp = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|scope| -> anyhow::Result<()> {
        {
            // Views of the two containers (not owning their namespaces), so the loop below can
            // restart agents meanwhile.
            let view = |h: usize| {
                cluster.lab.hosts[h]
                    .container
                    .as_ref()
                    .expect("started")
                    .view()
            };
            let (from, to) = (view(0), view(2));
            let stop = stop_tcp.clone();
            scope.spawn(move || {
                let mut port = 20000u16;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    port = if port >= 29999 { 20000 } else { port + 1 };
                    let _ = tcp_tx.send(tcp_transfer(&from, &to, port, 4 << 20));
                }
            });
        }
        let outcome = (|| -> anyhow::Result<()> {
            while started.elapsed() < run_for {
                std::thread::sleep(Duration::from_millis(200));
                let now = Instant::now();
                for r in tcp_rx.try_iter() {
                    match r {
                        Ok(()) => tally.tcp_ok += 1,
                        Err(e) => tally.tcp_failed.push(e),
                    }
                }
                // Peers join every few seconds; each leaves by deletion or by expiry.
                if now >= next_join {
                    next_join = now + rng.secs(2, 5);
                    let subnet = loop {
                        next_fake += 1;
                        let s = Ipv4Addr::new(172, 30, (next_fake % 250) as u8, 0);
                        if !own_subnets.contains(&s) {
                            break s;
                        }
                    };
                    let key = format!("/flannel/subnets/{subnet}-24");
                    let ip = Ipv4Addr::new(198, 18, 1, (next_fake % 250) as u8 + 1);
                    let value = format!(
                        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"0e:fa:c6:12:01:{:02x}"}}}}"#,
                        (next_fake % 250) + 1
                    );
                    // Granted and written as one: a lease granted before a failed put expires
                    // unused.
                    patiently(&mut tally.rig_retries, "a peer joining", || {
                        let lease = ctl.run(&["lease", "grant", "20"])?;
                        let id = lease
                            .split_whitespace()
                            .nth(1)
                            .context("lease grant's answer")?;
                        ctl.run(&["put", "--lease", id, "--", &key, &value])?;
                        Ok(())
                    })?;
                    tally.peers_joined += 1;
                    let delete_at = (rng.below(2) == 0).then(|| now + rng.secs(3, 15));
                    if delete_at.is_none() {
                        tally.peers_left_to_expire += 1;
                    }
                    fakes.push(FakePeer { key, delete_at });
                }
                // Those left to expire need nothing more; the others go when due.
                let mut kept = Vec::new();
                for f in fakes.drain(..) {
                    match f.delete_at {
                        Some(t) if now >= t => {
                            patiently(&mut tally.rig_retries, "a peer leaving", || {
                                Ok(ctl.run(&["del", &f.key])?)
                            })?;
                            tally.peers_deleted += 1;
                        }
                        Some(_) => kept.push(f),
                        None => {}
                    }
                }
                fakes = kept;
                // An agent of a host other than the steady one is killed and restarted.
                if now >= next_agent_restart {
                    next_agent_restart = now + rng.secs(30, 60);
                    let host = 1 + rng.below(2) as usize;
                    cluster.kill_agents(&[host]);
                    cluster.restart_agents(&[host], Duration::from_secs(60))?;
                    tally.agent_restarts += 1;
                }
                // One etcd member down at a time, back after 5-20 s.
                match member_down {
                    Some((m, back_at)) if now >= back_at => {
                        cluster.etcd.start(m)?;
                        member_down = None;
                        tally.member_restarts += 1;
                        next_member_kill = now + rng.secs(30, 60);
                    }
                    None if now >= next_member_kill => {
                        let m = rng.below(3) as usize;
                        cluster.etcd.kill(m)?;
                        member_down = Some((m, now + rng.secs(5, 20)));
                    }
                    _ => {}
                }
                for (i, agent) in cluster.agents.iter_mut().enumerate() {
                    if let Some(p) = agent.process.as_mut()
                        && let Some(status) = p.try_wait()
                    {
                        bail!(
                            "the agent of h{} exited by itself ({status}); log:\n{}",
                            i + 1,
                            agent.log_text()
                        );
                    }
                }
                if now >= next_sample {
                    next_sample = now + SAMPLE_EVERY;
                    let s = sample_all(&cluster)?;
                    let cpu: [u64; 3] = std::array::from_fn(|i| s[i].cpu_ticks);
                    let pct: [f64; 3] = match last_cpu {
                        Some((t, before)) => std::array::from_fn(|i| {
                            cpu[i].saturating_sub(before[i]) as f64 / hz / t.elapsed().as_secs_f64()
                                * 100.0
                        }),
                        None => [0.0; 3],
                    };
                    last_cpu = Some((now, cpu));
                    let line: Vec<String> = (0..3)
                        .map(|i| {
                            format!(
                                "h{} {:.1} MiB / {} fds / {:.1}% / {} ({}) / {}",
                                i + 1,
                                s[i].rss_kib as f64 / 1024.0,
                                s[i].fds,
                                pct[i],
                                s[i].peers,
                                s[i].stale,
                                s[i].map_entries
                            )
                        })
                        .collect();
                    step(format!(
                        "soak: {:>5.0}s  {}",
                        started.elapsed().as_secs_f64(),
                        line.join("  |  ")
                    ));
                    samples.push((started.elapsed(), s));
                }
            }
            Ok(())
        })();
        stop_tcp.store(true, std::sync::atomic::Ordering::Relaxed);
        outcome
    })?;
    for r in tcp_rx.try_iter() {
        match r {
            Ok(()) => tally.tcp_ok += 1,
            Err(e) => tally.tcp_failed.push(e),
        }
    }
    if let Some((m, _)) = member_down {
        cluster.etcd.start(m)?;
    }
    let mut sent = 0usize;
    let mut lost_total = 0usize;
    let mut lost_lines = Vec::new();
    for ((from, to), f) in flows {
        let (replies, _) = f.stop();
        let lost = flow::lost(&replies);
        sent += replies.len() + lost.len();
        lost_total += lost.len();
        if !lost.is_empty() {
            lost_lines.push(format!(
                "h{}->h{}: {} lost ({:?}...)",
                from + 1,
                to + 1,
                lost.len(),
                &lost[..lost.len().min(5)]
            ));
        }
    }
    summarise(&samples, &tally, sent, lost_total, &lost_lines)
}

fn summarise(
    samples: &[(Duration, [Sample; 3])],
    tally: &Tally,
    sent: usize,
    lost: usize,
    lost_lines: &[String],
) -> anyhow::Result<()> {
    step(format!(
        "soak: {} agent restarts, {} etcd member restarts, {} peers joined ({} deleted, {} left to expire); the soak's own etcd writes repeated {} times",
        tally.agent_restarts,
        tally.member_restarts,
        tally.peers_joined,
        tally.peers_deleted,
        tally.peers_left_to_expire,
        tally.rig_retries
    ));
    step(format!(
        "soak: pings: {sent} sent, {lost} lost{}",
        if lost_lines.is_empty() {
            String::new()
        } else {
            format!(": {}", lost_lines.join("; "))
        }
    ));
    step(format!(
        "soak: TCP transfers of 4 MiB h1->h3: {} checked, {} failed",
        tally.tcp_ok,
        tally.tcp_failed.len()
    ));
    let steady: Vec<(Duration, Sample)> = samples
        .iter()
        .filter(|(t, _)| *t >= WARM_UP)
        .map(|(t, s)| (*t, s[STEADY]))
        .collect();
    let mut failures = Vec::new();
    if let (Some((t0, first)), Some((t1, last))) = (steady.first(), steady.last()) {
        let max_rss = steady.iter().map(|(_, s)| s.rss_kib).max().unwrap_or(0);
        step(format!(
            "soak: h{} (never restarted), {:.0}s..{:.0}s: RSS {:.1} -> {:.1} MiB (max {:.1}), fds {} -> {}, map entries {} -> {}",
            STEADY + 1,
            t0.as_secs_f64(),
            t1.as_secs_f64(),
            first.rss_kib as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            max_rss as f64 / 1024.0,
            first.fds,
            last.fds,
            first.map_entries,
            last.map_entries
        ));
        // Judged only over a run long enough for growth to show through the noise.
        if *t1 - *t0 >= Duration::from_secs(600) {
            if last.rss_kib > first.rss_kib + first.rss_kib / 4 {
                failures.push(format!("h{} RSS grew by more than 25%", STEADY + 1));
            }
            if last.fds > first.fds + 4 {
                failures.push(format!(
                    "h{} descriptors grew from {} to {}",
                    STEADY + 1,
                    first.fds,
                    last.fds
                ));
            }
        }
    }
    if lost > 0 {
        failures.push(format!("{lost} pings lost"));
    }
    if !tally.tcp_failed.is_empty() {
        failures.push(format!(
            "TCP transfers failed: {}",
            tally.tcp_failed.join("; ")
        ));
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}

fn sample_all(cluster: &Cluster<EtcdCluster>) -> anyhow::Result<[Sample; 3]> {
    let mut out = [Sample::default(); 3];
    for (i, s) in out.iter_mut().enumerate() {
        let pid = cluster.agents[i]
            .process
            .as_ref()
            .map(|p| p.pid())
            .context("agent runs")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        s.rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        s.fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name's closing parenthesis: utime and stime are 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        s.cpu_ticks = fields
            .get(11)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
        let ns = &cluster.lab.hosts[i].ns;
        s.peers = ns.run(|| metric(addr, "overlay_peers"))?.unwrap_or(0.0) as u64;
        s.stale = ns
            .run(|| metric(addr, "overlay_peers_stale"))?
            .unwrap_or(0.0) as u64;
        // The maps' directory is versioned by the maps' ABI (`maps-v<N>`): take the one there.
        let pins = cluster.bpffs.path().join(format!("h{}", i + 1));
        let map = std::fs::read_dir(&pins)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("maps-v"))
            })
            .with_context(|| format!("no maps-v* in {}", pins.display()))?
            .join("PEERS");
        let dump = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&map)
            .output()?;
        s.map_entries = serde_json::from_slice::<serde_json::Value>(&dump.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0);
    }
    Ok(out)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
