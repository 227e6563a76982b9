//! The real agent, as an operator runs it: a real etcd, one `overlay-agent` per simulated host
//! with the article's flags and `--datapath ebpf`, docker's part done from each subnet.env. Every
//! container reaches every other; peers come and go through etcd; a killed agent loses no packet.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{Cluster, PREFIX},
    etcd::TempDir,
    require_root,
};

fn cluster(prefix: &str, hosts: usize, backend: &str, tmp: &TempDir) -> Cluster {
    Cluster::with_backend(prefix, hosts, backend, tmp.path()).unwrap()
}

/// Sums the kernel's run counts (kernel.bpf_stats_enabled) of every loaded program named `name`.
fn run_count(name: &str) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "name", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "run_cnt")
        .filter_map(|w| w[1].parse::<u64>().ok())
        .sum()
}

/// Turns on the kernel's per-program run statistics for the test, and back off after.
struct BpfStats;

impl BpfStats {
    fn enable() -> Self {
        overlay_tests::netns::run("sysctl", &["-qw", "kernel.bpf_stats_enabled=1"]).unwrap();
        BpfStats
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = overlay_tests::netns::run("sysctl", &["-qw", "kernel.bpf_stats_enabled=0"]);
    }
}

/// Sends 1 MB between two containers over TCP and checks it arrives intact.
fn tcp_transfer(cluster: &Cluster, from: usize, to: usize) {
    let container = |i: usize| cluster.lab.hosts[i].container.as_ref().unwrap();
    if let Err(e) =
        overlay_tests::cluster::tcp_transfer(container(from), container(to), 5301, 1 << 20)
    {
        panic!("h{} -> h{}: {e}", from + 1, to + 1);
    }
}

fn every_container_reaches_every_other(backend: &str) {
    let tmp = TempDir::new(&format!("agents-{backend}")).unwrap();
    let mut c = cluster("ovt-ag", 3, backend, &tmp);
    let envs = c.start_all(&["--datapath=ebpf"]).unwrap();
    let overhead = if backend == "vxlan" { 50 } else { 28 };
    for env in &envs {
        assert_eq!(env.mtu, 1500 - overhead, "FLANNEL_MTU for {backend}");
    }
    let stats = BpfStats::enable();
    let (encap_before, decap_before) = (run_count("tc_encap"), run_count("tc_decap"));
    let failures = c.ping_matrix();
    assert!(failures.is_empty(), "unreachable: {failures:#?}");
    tcp_transfer(&c, 0, 1);
    tcp_transfer(&c, 2, 0);
    assert!(run_count("tc_encap") > encap_before, "tc_encap never ran");
    assert!(run_count("tc_decap") > decap_before, "tc_decap never ran");
    drop(stats);
    for (i, host) in c.lab.hosts.iter().enumerate() {
        let vxlan = host
            .ns
            .ip(&["-d", "link", "show", "type", "vxlan"])
            .unwrap();
        assert!(
            vxlan.stdout.is_empty(),
            "h{} has a kernel vxlan device",
            i + 1
        );
        let log = c.agents[i].log_text();
        assert!(log.contains("eBPF datapath up"), "h{}: {log}", i + 1);
    }
}

#[test]
fn agents_udp_every_container_reaches_every_other() {
    if require_root("agents_udp_every_container_reaches_every_other") {
        every_container_reaches_every_other("udp");
    }
}

#[test]
fn agents_vxlan_every_container_reaches_every_other() {
    if require_root("agents_vxlan_every_container_reaches_every_other") {
        every_container_reaches_every_other("vxlan");
    }
}

/// Polls `ok` every 20 ms for up to `within`; returns how long it took.
fn within(within: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn reachable_once(c: &Cluster, from: usize, to: Ipv4Addr) -> bool {
    let cont = c.lab.hosts[from].container.as_ref().unwrap();
    cont.ns
        .exec("ping", &["-q", "-c", "1", "-W", "0.2", &to.to_string()])
        .is_ok()
}

#[test]
fn peer_removed_and_added_in_etcd_takes_effect_within_a_second() {
    if !require_root("peer_removed_and_added_in_etcd_takes_effect_within_a_second") {
        return;
    }
    let tmp = TempDir::new("agents-peers").unwrap();
    let mut c = cluster("ovt-pe", 3, "udp", &tmp);
    let envs = c.start_all(&["--datapath=ebpf"]).unwrap();
    let target = c.lab.hosts[2].container.as_ref().unwrap().ip;
    assert!(reachable_once(&c, 0, target));

    // Host 3's agent dies (its programs stay) and its lease is deleted: the others drop it.
    c.agents[2]
        .process
        .take()
        .unwrap()
        .stop(Duration::from_secs(2));
    let (net, len) = envs[2].subnet();
    let key = format!("{PREFIX}/subnets/{net}-{len}");
    let lease = c
        .etcd
        .etcdctl(&["get", "--print-value-only", &key])
        .unwrap();
    c.etcd.etcdctl(&["del", &key]).unwrap();
    let gone = within(Duration::from_secs(1), || !reachable_once(&c, 0, target));
    assert!(
        gone.is_some(),
        "still reachable a second after the lease was deleted"
    );

    // The lease comes back: reachable again.
    c.etcd.etcdctl(&["put", &key, lease.trim()]).unwrap();
    let back = within(Duration::from_secs(1), || reachable_once(&c, 0, target));
    assert!(
        back.is_some(),
        "unreachable a second after the lease came back; h1's log:\n{}",
        c.agents[0].log_text()
    );
    eprintln!("TIMING peer removed -> unreachable {gone:?}, added -> reachable {back:?}");
}

#[test]
fn agent_killed_and_restarted_loses_no_ping() {
    if !require_root("agent_killed_and_restarted_loses_no_ping") {
        return;
    }
    let tmp = TempDir::new("agents-restart").unwrap();
    let mut c = cluster("ovt-kl", 2, "vxlan", &tmp);
    c.start_all(&["--datapath=ebpf"]).unwrap();
    let target = c.lab.hosts[1].container.as_ref().unwrap().ip;
    assert!(reachable_once(&c, 0, target));

    let c1 = c.lab.hosts[0]
        .container
        .as_ref()
        .unwrap()
        .ns
        .name()
        .to_owned();
    let flow = std::process::Command::new("ip")
        .args([
            "netns", "exec", &c1, "ping", "-q", "-i", "0.01", "-c", "400", "-W", "1",
        ])
        .arg(target.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SIGKILL: no cleanup of any kind, as in a crash or an OOM kill.
    for agent in &mut c.agents {
        let mut p = agent.process.take().unwrap();
        unsafe { libc::kill(p.pid() as i32, libc::SIGKILL) };
        p.stop(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_millis(1000));
    for i in 0..2 {
        let args = c.agents[i].args.clone();
        c.start_agent(i, args).unwrap();
    }
    let out = flow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("400 packets transmitted, 400 received"),
        "pings lost while the agents were killed and restarted:\n{text}"
    );
    // The restarted agent swapped its programs into the links the killed one pinned.
    let swapped = within(Duration::from_secs(10), || {
        c.agents[0]
            .log_text()
            .contains("replaced the program in the pinned link")
    });
    assert!(swapped.is_some(), "{}", c.agents[0].log_text());
}

#[test]
fn forward_drop_policy_and_ip_masq_work_like_flannel() {
    if !require_root("forward_drop_policy_and_ip_masq_work_like_flannel") {
        return;
    }
    let tmp = TempDir::new("agents-masq").unwrap();
    let mut c = cluster("ovt-mq", 2, "udp", &tmp);
    // What docker >= 1.13 does to a host: forwarding dropped unless someone accepts it.
    for host in &c.lab.hosts {
        host.ns
            .exec("iptables", &["-w", "-P", "FORWARD", "DROP"])
            .unwrap();
    }
    // Through the stack, so the FORWARD chain sees every packet.
    c.start_all(&["--datapath=ebpf", "--deliver-via-stack", "--ip-masq"])
        .unwrap();
    let failures = c.ping_matrix();
    assert!(
        failures.is_empty(),
        "FORWARD DROP not handled: {failures:#?}"
    );
    // The switch (198.18.0.254) has no route back to the Network: only a masqueraded echo
    // request gets an answer.
    c.ping(0, cluster_switch_ip(), 2)
        .expect("container -> outside the Network, masqueraded");
    for (i, agent) in c.agents.iter().enumerate() {
        let log = agent.log_text();
        assert!(log.contains("--ip-masq: masquerading"), "h{}: {log}", i + 1);
    }
}

fn cluster_switch_ip() -> Ipv4Addr {
    overlay_tests::cluster::ETCD_IP
}

#[test]
fn a_vxlan_device_left_by_flanneld_is_reported_not_clobbered() {
    if !require_root("a_vxlan_device_left_by_flanneld_is_reported_not_clobbered") {
        return;
    }
    let tmp = TempDir::new("agents-leftover").unwrap();
    let mut c = cluster("ovt-lo", 1, "vxlan", &tmp);
    let ns = &c.lab.hosts[0].ns;
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "dev",
        "eth0",
    ])
    .unwrap();
    let args = c.agent_args(0, &["--datapath=ebpf"]);
    c.start_agent(0, args).unwrap();
    let err = c.wait_subnet_env(0, Duration::from_secs(20)).unwrap_err();
    let log = c.agents[0].log_text();
    assert!(
        log.contains("flannel.1 exists and is a vxlan device")
            && log.contains("ip link del flannel.1"),
        "{err}\n{log}"
    );
    let status = c.agents[0]
        .process
        .as_mut()
        .unwrap()
        .stop(Duration::from_secs(5));
    assert_eq!(status.and_then(|s| s.code()), Some(1));
    // Left as it was.
    let link = c.lab.hosts[0]
        .ns
        .ip(&["-d", "link", "show", "flannel.1"])
        .unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains("vxlan id 1"));
}
