//! `cargo xtask bench`: one instrument for every performance claim.
//!
//! Builds a rig of simulated hosts (network namespaces on one underlay bridge, each with a
//! docker0-like bridge and a container), and measures, on that same rig and in one invocation,
//! every mode: `bare` (plain routes, the limit), `kernel-vxlan` (flannel's vxlan backend),
//! `udp-proxy` (flannel's udp backend), and each datapath of overlay-agent. Modes alternate
//! between repeats so machine noise hits them alike. Output: markdown on stdout, JSON and an SVG
//! chart under `target/bench/`.
//!
//! `--control-plane N` measures the agent's control plane against N peer leases instead.

mod control;
mod etcd;
mod metrics;
mod report;
mod rig;
mod tcp_cc;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    build,
    cmd::{is_root, step, workspace_root},
};
use overlay_tests::cluster::DockerEngine;
use report::{ModeResult, Status};
use rig::{Kind, MODES, Rig, SetupError};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Short smoke run: 1 s per test, one repeat.
    #[arg(long)]
    pub quick: bool,
    /// Repeats of every measurement (the report shows the median and the spread).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Seconds per test (default 5, 1 with --quick).
    #[arg(long)]
    pub duration: Option<u32>,
    /// Only these modes (comma-separated), e.g. `bare,kernel-vxlan`.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Also write the JSON report to this file (it always goes to target/bench/latest.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Use this overlay-agent binary instead of building one.
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Build the agent without optimisations (quicker to build; not for real numbers).
    #[arg(long)]
    pub debug_agent: bool,
    /// Do not build the agent: the agent's modes are reported missing unless --agent is given.
    #[arg(long)]
    pub no_build: bool,
    /// TCP congestion control of every TCP socket in the containers, the same in every mode;
    /// `system` leaves it to the machine's default. Unset: cubic, Linux's default, so the numbers
    /// do not depend on how this machine happens to be tuned (the machine's default, said in the
    /// report, where cubic is not available).
    #[arg(long)]
    pub tcp_cc: Option<String>,
    /// Measure the control plane with N peer leases in etcd instead of the datapaths.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "1000")]
    pub control_plane: Option<usize>,
    /// Who does docker's part on each host: real (a dockerd per host, as users run it) where
    /// dockerd can run, else the imitation, saying why.
    #[arg(long, value_enum, default_value_t = crate::run::Docker::Real)]
    pub docker: crate::run::Docker,
    /// Skip `setup` (iperf3, sockperf, etcd, ... are proved there before the build).
    #[arg(long)]
    pub no_setup: bool,
}

pub use crate::cmd::{check_interrupted, interrupted};

extern "C" fn on_signal(_: libc::c_int) {
    crate::cmd::mark_interrupted();
}

/// On SIGINT/SIGTERM the main thread unwinds at its next check and drops the rig (namespaces,
/// processes, proxies). If that has not finished within 15 s, a watchdog kills everything in the
/// bench's namespaces, deletes them, and exits.
fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| {
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("\n==> bench: interrupted, cleaning up");
        std::thread::sleep(Duration::from_secs(15));
        let dockers = overlay_tests::docker::remove_own();
        let gone = overlay_tests::netns::remove_own(rig::PREFIX);
        eprintln!(
            "==> bench: cleanup by force ({} namespace(s) deleted, {} dockerd(s) removed)",
            gone.len(),
            dockers.len()
        );
        tcp_cc::restore_allowed();
        std::process::exit(130);
    });
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the bench builds network namespaces: run as root");
    }
    if !opts.no_setup {
        crate::setup::setup(&crate::setup::Options::default())?;
    }
    install_signal_handlers();
    let dockers = overlay_tests::docker::remove_leftovers();
    let stale = overlay_tests::netns::remove_stale(rig::PREFIX);
    if !stale.is_empty() || !dockers.is_empty() {
        step(format!(
            "bench: removed {} namespace(s) and {} dockerd(s) left by an earlier run",
            stale.len(),
            dockers.len()
        ));
    }
    let out_dir = workspace_root().join("target").join("bench");
    // Logs of this run (agents, etcd, servers), for when a mode is missing or fails; one
    // directory per run, so runs at the same time keep apart. Those of finished runs go.
    let logs = out_dir.join("logs");
    if let Ok(dirs) = std::fs::read_dir(&logs) {
        for d in dirs.flatten() {
            let pid = d.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_none_or(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
    let run_dir = logs.join(std::process::id().to_string());
    std::fs::create_dir_all(&run_dir)?;
    let result = if let Some(n) = opts.control_plane {
        let agent = agent_binary(opts);
        control::run(opts, n, agent.as_deref().map_err(|e| e.as_str()), &run_dir)
    } else {
        datapaths(opts, &out_dir, &run_dir)
    };
    if interrupted() {
        eprintln!("==> bench: interrupted; rig removed");
        std::process::exit(130);
    }
    result
}

/// The agent binary to run, or why there is none.
fn agent_binary(opts: &Options) -> Result<PathBuf, String> {
    if let Some(path) = &opts.agent {
        return if path.exists() {
            Ok(path.clone())
        } else {
            Err(format!("--agent {} does not exist", path.display()))
        };
    }
    if opts.no_build {
        return Err("--no-build and no --agent".into());
    }
    build::build(&build::Options {
        debug: opts.debug_agent,
    })
    .map_err(|e| format!("building overlay-agent failed: {e:#}"))
}

fn datapaths(opts: &Options, out_dir: &Path, run_dir: &Path) -> anyhow::Result<()> {
    let repeat = if opts.quick { 1 } else { opts.repeat.max(1) };
    let secs = opts
        .duration
        .unwrap_or(if opts.quick { 1 } else { 5 })
        .max(1);
    let modes: Vec<_> = if opts.modes.is_empty() {
        MODES.to_vec()
    } else {
        for m in &opts.modes {
            if !MODES.iter().any(|x| x.name == m) {
                let names: Vec<_> = MODES.iter().map(|x| x.name).collect();
                bail!("unknown mode {m}; modes: {}", names.join(", "));
            }
        }
        MODES
            .iter()
            .filter(|m| opts.modes.iter().any(|x| x == m.name))
            .copied()
            .collect()
    };

    let tcp_cc::Choice { cc, mut notes } = tcp_cc::TcpCc::select(opts.tcp_cc.as_deref())?;
    for note in &notes {
        step(format!("bench: {note}"));
    }
    let needs_agent = modes.iter().any(|m| matches!(m.kind, Kind::Agent { .. }));
    let agent = if needs_agent {
        step("bench: overlay-agent binary");
        let a = agent_binary(opts);
        match &a {
            Ok(p) => {
                if opts.debug_agent {
                    notes.push(
                        "agent built without optimisations (--debug-agent): its numbers are not \
                         representative"
                            .into(),
                    );
                }
                step(format!("bench: agent {}", p.display()));
            }
            Err(e) => step(format!("bench: no agent: {e}")),
        }
        a
    } else {
        Err("not needed".into())
    };

    let others_at_start = other_runs();
    let started = Instant::now();
    step(format!(
        "bench: rig of 2 simulated hosts; {} mode(s) x {repeat} repeat(s), {secs} s per test",
        modes.len()
    ));
    let docker = crate::run::lab::docker_engine("bench", opts.docker);
    notes.push(match docker {
        DockerEngine::Real => format!(
            "containers: real docker ({}) per host, `dockerd --bip --mtu --ip-masq=false` from \
             each mode's subnet, forwarding already on (FORWARD policy ACCEPT) so every mode runs \
             under the same rules",
            crate::run::lab::version_of_dockerd()
        ),
        DockerEngine::Imitate => {
            "containers: imitated (a bridge and a veth per container, no dockerd)".to_owned()
        }
    });
    let mut rig = Rig::new(2, run_dir, cc, docker).context("building the rig")?;
    let mut results: Vec<ModeResult> = modes
        .iter()
        .map(|m| ModeResult {
            name: m.name,
            what: m.what,
            status: Status::Measured,
            samples: Default::default(),
        })
        .collect();
    let total_steps = modes.len() as u32 * repeat;
    let mut done_steps = 0;
    for r in 0..repeat {
        // Rotate the order each repeat, so slow drift (thermal, other load) is spread over modes.
        let n = modes.len();
        for i in 0..n {
            check_interrupted()?;
            let idx = (i + r as usize) % n;
            let mode = &modes[idx];
            done_steps += 1;
            if !matches!(results[idx].status, Status::Measured) {
                continue;
            }
            step(format!(
                "bench [{done_steps}/{total_steps}, {:.0} s]: repeat {}/{repeat}, mode {}",
                started.elapsed().as_secs_f64(),
                r + 1,
                mode.name
            ));
            let agent_path = agent.as_ref().ok().map(PathBuf::as_path);
            let active = match rig.setup(mode, agent_path) {
                Ok(a) => a,
                Err(SetupError::Missing(why)) => {
                    let why = match (&agent, why.starts_with("no overlay-agent binary")) {
                        (Err(e), true) => e.clone(),
                        _ => why,
                    };
                    step(format!("bench: {} is missing: {why}", mode.name));
                    results[idx].status = Status::Missing(why);
                    rig.teardown(Default::default());
                    continue;
                }
                Err(SetupError::Failed(e)) => {
                    rig.teardown(Default::default());
                    return Err(e.context(format!("setting up mode {}", mode.name)));
                }
            };
            let mut sample = metrics::measure_all(
                rig.client(),
                &active.server_ip,
                secs,
                rig.tcp_cc.effective(),
            );
            if let (
                Ok(s),
                Kind::Agent {
                    datapath: "ebpf", ..
                },
            ) = (&mut sample, mode.kind)
            {
                match metrics::program_cost(rig.client(), &active.server_ip, secs) {
                    Ok(cost) => s.extend(cost),
                    Err(e) => sample = Err(e.context("the eBPF programs' cost per run")),
                }
            }
            rig.teardown(active);
            rig::check_clean(&rig)?;
            match sample {
                Ok(sample) => {
                    let line: Vec<String> = sample
                        .iter()
                        .map(|(m, v)| format!("{}={v:.2}", m.key()))
                        .collect();
                    eprintln!("    {}", line.join(" "));
                    for (m, v) in sample {
                        results[idx].samples.entry(m).or_default().push(v);
                    }
                }
                Err(e) => {
                    check_interrupted()?;
                    let why = format!("{e:#}");
                    step(format!("bench: {} failed: {why}", mode.name));
                    results[idx].status = Status::Failed(why);
                }
            }
        }
    }
    drop(rig);
    step(format!(
        "bench: measured in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let mut others = others_at_start;
    others.extend(other_runs());
    others.sort_unstable();
    others.dedup();
    if !others.is_empty() {
        let pids: Vec<String> = others.iter().map(u32::to_string).collect();
        let warning = format!(
            "another bench run (pid {}) was running at the same time: these numbers are disturbed",
            pids.join(", ")
        );
        step(format!("bench: WARNING: {warning}"));
        notes.push(warning);
    }
    notes.push(
        "Absolute numbers vary between machines; compare the ratios. CPU s/Gbit is the whole \
         machine's non-idle CPU time (/proc/stat) during the 1-stream TCP test per gigabit \
         moved, so other load on the machine inflates it."
            .into(),
    );
    notes.push(format!(
        "UDP kpps: {} B UDP payloads sent as fast as one iperf3 client can; what the receiver got.",
        metrics::UDP_PAYLOAD
    ));
    let ctx = report::Context {
        command: command_line(),
        machine: machine(),
        date: now(),
        repeat,
        secs,
        notes,
    };
    let md = report::markdown(&ctx, &results);
    let json = serde_json::to_string_pretty(&report::json(&ctx, &results))?;
    let svg = report::svg(&ctx, &results);
    std::fs::write(out_dir.join("latest.md"), &md)?;
    std::fs::write(out_dir.join("latest.json"), &json)?;
    std::fs::write(out_dir.join("ratios.svg"), &svg)?;
    if let Some(path) = &opts.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{md}");
    step(format!(
        "bench: wrote {}/latest.md, latest.json, ratios.svg{}",
        out_dir.display(),
        opts.json
            .as_ref()
            .map(|p| format!(" and {}", p.display()))
            .unwrap_or_default()
    ));
    if let Some(failed) = results
        .iter()
        .find(|r| matches!(r.status, Status::Failed(_)))
    {
        bail!("mode {} failed", failed.name);
    }
    Ok(())
}

/// Pids of other live processes that have bench namespaces.
fn other_runs() -> Vec<u32> {
    let Some(list) = crate::cmd::output(std::process::Command::new("ip").args(["netns", "list"]))
    else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut pids: Vec<u32> = list
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{}-", rig::PREFIX)))
        .filter_map(|rest| rest.split('-').nth(1)?.parse().ok())
        .filter(|&p| p != me && Path::new(&format!("/proc/{p}")).exists())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// The command as a user would type it.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!("cargo xtask {}", args.join(" "))
}

/// CPU model, cores, memory and kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

fn now() -> String {
    crate::cmd::output(std::process::Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
