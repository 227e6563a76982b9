//! The lab scenario of `cargo xtask run`: the article, host by host.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::{Cluster, DockerEngine, ETCD_IP, ETCD_PORT, PREFIX, PingStats, host_run_dir},
    lab::{LabConfig, SubnetEnv},
};

use super::{
    Backend, Datapath, Docker, Options,
    cleanup::{self, check_interrupted, interrupted},
};
use crate::cmd::{step, workspace_root};

/// How long the agents get to write their subnet.env (etcd lease + datapath up).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// Echo requests per pair.
const PINGS: u32 = 3;

/// The network config the article puts into etcd (udp: the article's own, verbatim).
fn network_config(backend: Backend) -> &'static str {
    match backend {
        Backend::Udp => r#"{"Network": "172.16.0.0/12"}"#,
        Backend::Vxlan => r#"{"Network": "172.16.0.0/12", "Backend": {"Type": "vxlan"}}"#,
    }
}

/// The article's ExecStart flags, with the lab's etcd.
fn article_args() -> Vec<String> {
    vec![
        format!("--etcd-endpoints=http://{ETCD_IP}:{ETCD_PORT}"),
        format!("--etcd-prefix={PREFIX}"),
        "--logtostderr=true".into(),
        "--subnet-dir=/run/flannel/networks".into(),
        "--subnet-file=/run/flannel/subnet.env".into(),
    ]
}

/// Runs the lab in this run's temporary directory, then keeps the logs under target/run/logs and
/// removes the directory.
pub fn lab(opts: &Options, binary: &Path) -> anyhow::Result<()> {
    let dir = cleanup::lab_dir(std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();
    let result = scenario(opts, binary, &dir, started);
    // The cluster has been dropped: agents stopped, etcd stopped, namespaces deleted, bpffs
    // unmounted (which releases every pin).
    cleanup::set_bpffs(None);
    let logs = keep_logs(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    match &result {
        Ok(()) => step(format!(
            "run: lab removed; logs in {} (took {:.1} s)",
            logs.display(),
            started.elapsed().as_secs_f64()
        )),
        Err(_) => step(format!(
            "run: lab removed; the agents' and etcd's logs are in {}",
            logs.display()
        )),
    }
    result
}

fn keep_logs(dir: &Path) -> PathBuf {
    let logs = workspace_root().join("target").join("run").join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::create_dir_all(&logs);
    let _ = std::fs::copy(dir.join("etcd.log"), logs.join("etcd.log"));
    for i in 1.. {
        let log = dir.join(format!("h{i}")).join("agent.log");
        if !log.exists() {
            break;
        }
        let _ = std::fs::copy(&log, logs.join(format!("h{i}-agent.log")));
    }
    logs
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("      {l}\n"))
        .collect()
}

fn scenario(opts: &Options, binary: &Path, dir: &Path, started: Instant) -> anyhow::Result<()> {
    let n = usize::from(opts.hosts);
    let config = network_config(opts.backend);
    let device = match opts.backend {
        Backend::Udp => "flannel0",
        Backend::Vxlan => "flannel.1",
    };

    step(format!(
        "run: lab: {n} simulated hosts h1..h{n} (network namespaces) on one underlay bridge, \
         198.18.0.0/24, host i at 198.18.0.i"
    ));
    step(format!(
        "run: etcd: a real etcd on {ETCD_IP}:{ETCD_PORT}, listening only inside the lab's switch \
         namespace (the lab's loopback: the hosts' namespaces cannot reach this machine's \
         127.0.0.1, and nothing outside the lab can reach it); data in a temporary directory \
         (/dev/shm/overlay-etcd-{}-*), log in {}",
        std::process::id(),
        dir.join("etcd.log").display()
    ));
    let mut cluster = Cluster::new(
        &LabConfig {
            prefix: cleanup::PREFIX.into(),
            hosts: n,
            underlay_mtu: 1500,
        },
        config,
        binary,
        dir,
    )
    .context("building the lab")?;
    cleanup::set_bpffs(Some(cluster.bpffs.path().to_owned()));
    cluster.docker = docker_engine("run", opts.docker);
    check_interrupted()?;
    step(format!(
        "run: etcdctl put {PREFIX}/config '{config}'   (the article's `etcdctl set` is the v2 API)"
    ));
    let stored = cluster
        .etcd
        .etcdctl(&["get", &format!("{PREFIX}/config")])?;
    println!("\n$ etcdctl get {PREFIX}/config\n{}", stored.trim_end());

    let mut extra = Vec::new();
    match opts.datapath {
        Datapath::Auto => {}
        Datapath::Ebpf => extra.push("--datapath=ebpf".to_owned()),
        Datapath::Tun => extra.push("--datapath=tun".to_owned()),
    }
    step(
        "run: agents: the article's command line; each host has its own /run (the agent runs in a \
         mount namespace of its own with the host's directory bind-mounted on /run), so \
         /run/flannel/subnet.env is per host as on real machines. Added for the lab only: \
         --bpffs=<lab bpffs>/hN, since all hosts share one kernel and a bpffs the agent mounted \
         inside `ip netns exec` would die with it",
    );
    for i in 0..n {
        let mut args = article_args();
        args.push(format!(
            "--bpffs={}",
            cluster.bpffs.path().join(format!("h{}", i + 1)).display()
        ));
        args.extend(extra.iter().cloned());
        step(format!("run: h{}: overlay-agent {}", i + 1, args.join(" ")));
        cluster.start_agent_private_run(i, args)?;
    }

    step(format!(
        "run: waiting for every agent's subnet.env (lease from etcd, datapath up; up to {} s)",
        READY_WITHIN.as_secs()
    ));
    let envs = wait_ready(&mut cluster, n)?;

    for (i, env) in envs.iter().enumerate() {
        check_interrupted()?;
        let host = &cluster.lab.hosts[i];
        let mut out = String::new();
        writeln!(out, "\n=== h{} ({}) ===", i + 1, host.underlay_ip)?;
        let addr = host.ns.ip(&["addr", "show", "dev", device])?;
        writeln!(out, "$ ip addr show {device}")?;
        out.push_str(&String::from_utf8_lossy(&addr.stdout));
        let subnet_file = &cluster.agents[i].subnet_file;
        writeln!(out, "$ cat /run/flannel/subnet.env")?;
        out.push_str(&std::fs::read_to_string(subnet_file).unwrap_or_default());
        writeln!(
            out,
            "datapath: {}",
            datapath_line(&cluster.agents[i].log_text())
        )?;
        if cluster.docker == DockerEngine::Imitate {
            writeln!(
                out,
                "$ dockerd --bip={}/{} --mtu={}   (imitated: bridge docker0 with that address and \
                 MTU, one container behind it)",
                env.gateway, env.prefix_len, env.mtu
            )?;
        } else {
            writeln!(
                out,
                "docker's options from: {}",
                cluster.docker_options_from(i)
            )?;
        }
        print!("{out}");
        cluster
            .start_docker(i, env)
            .with_context(|| format!("h{}: docker's part", i + 1))?;
        print!("{}", docker_part(&cluster, i)?);
    }

    check_interrupted()?;
    let pairs = n * (n - 1);
    step(format!(
        "run: every container pings every other ({pairs} pairs, {PINGS} echoes each, at once{})",
        if cluster.docker == DockerEngine::Real {
            ", as `docker exec <container> ping <address>`"
        } else {
            ""
        }
    ));
    let results = cluster.ping_matrix_stats(PINGS);
    let (table, failures) = table(&cluster, &results);
    println!("\n{table}");
    check_interrupted()?;
    print_status(&cluster, binary)?;

    if opts.once {
        if !failures.is_empty() {
            let mut logs = String::new();
            for (i, a) in cluster.agents.iter().enumerate() {
                let _ = write!(
                    logs,
                    "    h{} agent log (end):\n{}",
                    i + 1,
                    tail(&a.log_text(), 8)
                );
            }
            bail!(
                "{} of {pairs} pairs unreachable: {}\n{logs}",
                failures.len(),
                failures.join(", ")
            );
        }
        println!(
            "all {pairs} pairs reachable ({n}×{}) in {:.1} s from the start",
            n - 1,
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }

    if failures.is_empty() {
        println!("all {pairs} pairs reachable ({n}×{})", n - 1);
    } else {
        println!(
            "NOT all pairs reachable: {}; the lab stays up so you can look",
            failures.join(", ")
        );
    }
    print_explore(&cluster, device, dir, binary);
    let mut exited = vec![false; n];
    while !interrupted() {
        std::thread::sleep(Duration::from_millis(200));
        if interrupted() {
            // Ctrl-C reached the agents too (same process group); that is not news.
            break;
        }
        for (i, agent) in cluster.agents.iter_mut().enumerate() {
            if !exited[i]
                && let Some(status) = agent.process.as_mut().and_then(|p| p.try_wait())
            {
                exited[i] = true;
                step(format!(
                    "run: h{}'s agent exited ({status}); its pinned dataplane keeps forwarding",
                    i + 1
                ));
            }
        }
    }
    step("run: Ctrl-C: stopping the agents and etcd, deleting the namespaces, unmounting bpffs");
    drop(cluster);
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{} of {pairs} pairs were unreachable", failures.len())
    }
}

/// Who does docker's part: a real dockerd unless asked otherwise or it cannot run here, which is
/// said in one line.
pub fn docker_engine(who: &str, choice: Docker) -> DockerEngine {
    match choice {
        Docker::Imitate => {
            step(format!(
                "{who}: docker: imitated (--docker=imitate): a bridge and a veth per container"
            ));
            DockerEngine::Imitate
        }
        Docker::Real => match overlay_tests::docker::available() {
            Ok(()) => {
                step(format!(
                    "{who}: docker: a real dockerd per host ({}), each in its host's network \
                     namespace with state of its own; containers from {}, imported from \
                     /bin/busybox",
                    version_of_dockerd(),
                    overlay_tests::docker::IMAGE
                ));
                DockerEngine::Real
            }
            Err(e) => {
                step(format!(
                    "{who}: docker: {e}; imitating it instead (a bridge and a veth per container)"
                ));
                DockerEngine::Imitate
            }
        },
    }
}

pub fn version_of_dockerd() -> String {
    std::process::Command::new("dockerd")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("dockerd --version: {e}"))
}

/// What the article shows of docker on host `i` once it runs: dockerd's command line, docker0,
/// and the container.
fn docker_part(cluster: &Cluster, i: usize) -> anyhow::Result<String> {
    let host = &cluster.lab.hosts[i];
    let container = host.container.as_ref().context("no container")?;
    let mut out = String::new();
    if let Some(daemon) = &host.dockerd {
        writeln!(out, "$ ps -o user,pid,args -C dockerd")?;
        writeln!(out, "{}", daemon.ps_line()?)?;
        let docker0 = host.ns.ip(&["addr", "show", "docker0"])?;
        writeln!(out, "$ ip addr show docker0")?;
        out.push_str(&String::from_utf8_lossy(&docker0.stdout));
        let name = container.docker_name.as_deref().unwrap_or("?");
        writeln!(
            out,
            "$ docker run -d --name {name} {} sleep 1000000   ({})",
            overlay_tests::docker::IMAGE,
            daemon.cli_command()
        )?;
    }
    writeln!(out, "container: eth0 {}", container.ip)?;
    Ok(out)
}

/// What `overlay-agent status` says on h1 after the pings: the lease, the datapath, each peer
/// with the traffic just sent.
fn print_status(cluster: &Cluster, binary: &Path) -> anyhow::Result<()> {
    let bpffs = cluster.bpffs.path().join("h1");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", cluster.lab.hosts[0].ns.name()])
        .arg(binary)
        .arg(format!("--bpffs={}", bpffs.display()))
        .arg("status")
        .output()
        .context("running overlay-agent status")?;
    println!(
        "\n=== h1 ===\n$ overlay-agent status\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    if !out.status.success() {
        bail!(
            "overlay-agent status on h1 exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Waits until every agent has written its subnet.env, showing each as it comes.
fn wait_ready(cluster: &mut Cluster, n: usize) -> anyhow::Result<Vec<SubnetEnv>> {
    let start = Instant::now();
    let mut envs: Vec<Option<SubnetEnv>> = vec![None; n];
    loop {
        check_interrupted()?;
        for (i, slot) in envs.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let agent = &mut cluster.agents[i];
            if let Some(env) = std::fs::read_to_string(&agent.subnet_file)
                .ok()
                .and_then(|t| SubnetEnv::parse(&t).ok())
            {
                step(format!(
                    "run: h{} ready after {:.1} s: FLANNEL_SUBNET={}/{}",
                    i + 1,
                    start.elapsed().as_secs_f64(),
                    env.gateway,
                    env.prefix_len
                ));
                *slot = Some(env);
            } else if let Some(status) = agent.process.as_mut().and_then(|p| p.try_wait()) {
                bail!(
                    "h{}'s agent exited ({status}) before writing subnet.env:\n{}",
                    i + 1,
                    tail(&agent.log_text(), 15)
                );
            }
        }
        if envs.iter().all(Option::is_some) {
            return Ok(envs.into_iter().flatten().collect());
        }
        if start.elapsed() > READY_WITHIN {
            let mut msg = String::new();
            for (i, env) in envs.iter().enumerate() {
                if env.is_none() {
                    let _ = write!(
                        msg,
                        "\n    h{} has no subnet.env; its log (end):\n{}",
                        i + 1,
                        tail(&cluster.agents[i].log_text(), 10)
                    );
                }
            }
            bail!(
                "not every agent was ready within {} s:{msg}",
                READY_WITHIN.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The datapath the agent chose, from its "datapath: ..." log line.
fn datapath_line(log: &str) -> String {
    let chosen = log.lines().filter(|l| !l.contains("ERROR")).find_map(|l| {
        l.split_once(" datapath: ")
            .map(|(_, d)| d.trim().to_owned())
    });
    let auto = log.lines().find_map(|l| {
        l.split_once("--datapath=auto: ")
            .map(|(_, d)| d.trim().to_owned())
    });
    match (chosen, auto) {
        (Some(c), Some(a)) => format!("{c} (--datapath=auto: {a})"),
        (Some(c), None) => c,
        (None, _) => "(no \"datapath:\" line in the agent's log)".into(),
    }
}

/// The reachability table and the failed pairs.
fn table(cluster: &Cluster, results: &[(usize, usize, PingStats)]) -> (String, Vec<String>) {
    let ip = |i: usize| {
        cluster.lab.hosts[i]
            .container
            .as_ref()
            .map_or_else(|| "-".to_owned(), |c| c.ip.to_string())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<20} {:<9} {:<12} rtt min/avg/max (ms)",
        "from container", "to container", "replies", "reachable"
    );
    let mut failures = Vec::new();
    for &(from, to, stats) in results {
        let ok = stats.received > 0;
        if !ok {
            failures.push(format!("h{} -> h{}", from + 1, to + 1));
        }
        let rtt = stats.rtt_ms.map_or_else(
            || "-".to_owned(),
            |(min, avg, max)| format!("{min:.3}/{avg:.3}/{max:.3}"),
        );
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:<9} {:<12} {rtt}",
            format!("h{} {}", from + 1, ip(from)),
            format!("h{} {}", to + 1, ip(to)),
            format!("{}/{}", stats.received, stats.sent),
            if ok { "yes" } else { "NO" },
        );
    }
    (out, failures)
}

fn print_explore(cluster: &Cluster, device: &str, dir: &Path, binary: &Path) {
    let h1 = cluster.lab.hosts[0].ns.name();
    let c1 = cluster.lab.hosts[0]
        .container
        .as_ref()
        .map_or("", |c| c.ns.name());
    let c2_ip = cluster.lab.hosts[1]
        .container
        .as_ref()
        .map_or_else(String::new, |c| c.ip.to_string());
    let switch = cluster.lab.switch.name();
    let port = if device == "flannel0" { 8285 } else { 8472 };
    println!(
        "\nThe lab is up. Try, in another terminal (as root):\n\
         \x20 # the namespaces: hosts ({prefix}-hN-...), their containers (...-c-...), the switch\n\
         \x20 ip netns list | grep {prefix}-\n\
         \x20 # h1's container pings h2's container\n\
         \x20 ip netns exec {c1} ping {c2_ip}\n\
         \x20 # what h1's agent and dataplane do: lease, etcd, programs, each peer's traffic, drops\n\
         \x20 ip netns exec {h1} {agent} --bpffs={pins} status\n\
         \x20 # h1's overlay device and routes\n\
         \x20 ip netns exec {h1} ip addr show {device}\n\
         \x20 ip netns exec {h1} ip route\n\
         \x20 # h1's pinned program links and maps (what keeps forwarding while the agent restarts)\n\
         \x20 ls -R {pins}\n\
         \x20 bpftool prog show name tc_encap\n\
         \x20 # the encapsulated packets on h1's underlay NIC\n\
         \x20 ip netns exec {h1} tcpdump -ni eth0 udp port {port}\n\
         \x20 # h1's /run/flannel/subnet.env (each host's /run is a directory of the lab)\n\
         \x20 cat {run}/flannel/subnet.env\n\
         \x20 # the leases in etcd\n\
         \x20 ip netns exec {switch} etcdctl --endpoints=http://{ETCD_IP}:{ETCD_PORT} get --prefix {PREFIX}\n\
         \x20 # h1's agent log\n\
         \x20 tail -f {log}\n\
         Press Ctrl-C to tear everything down.",
        prefix = cleanup::PREFIX,
        run = host_run_dir(dir, 0).display(),
        log = dir.join("h1").join("agent.log").display(),
        pins = cluster.bpffs.path().join("h1").display(),
        agent = binary.display(),
    );
}
