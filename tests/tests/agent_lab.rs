//! The real agent, as an operator runs it: a real etcd, one `overlay-agent` per simulated host
//! with the article's flags and `--datapath ebpf`, docker's part done from each subnet.env. Every
//! container reaches every other; peers come and go through etcd; a killed agent loses no packet.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use overlay_tests::{
    bpffs::pinned_links,
    cluster::{Cluster, PREFIX, healthz_flags},
    etcd::TempDir,
    flanneld::UdpProxy,
    flow::PingFlow,
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
        let pins = c.bpffs.path().join(format!("h{}", i + 1));
        assert!(
            !pinned_links(&pins).is_empty(),
            "h{}'s agent pinned no eBPF link: {}",
            i + 1,
            c.agents[i].log_text()
        );
    }
}

fn agents_udp_every_container_reaches_every_other() {
    every_container_reaches_every_other("udp");
}

fn agents_vxlan_every_container_reaches_every_other() {
    every_container_reaches_every_other("vxlan");
}

/// Polls `ok` every 20 ms until it holds; false when `deadline` passes first (a deadline so a
/// change that never takes effect fails the test; how fast it takes effect is the bench's).
fn eventually(deadline: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if ok() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn reachable_once(c: &Cluster, from: usize, to: Ipv4Addr) -> bool {
    let cont = c.lab.hosts[from].container.as_ref().unwrap();
    cont.ns
        .exec("ping", &["-q", "-c", "1", "-W", "0.2", &to.to_string()])
        .is_ok()
}

fn peer_removed_and_added_in_etcd_takes_effect() {
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
    // Host 3's programs still run: it stays reachable until h1 drops the peer.
    assert!(
        reachable_once(&c, 0, target),
        "unreachable before the lease was deleted"
    );
    c.etcd.etcdctl(&["del", &key]).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || !reachable_once(&c, 0, target)),
        "still reachable after the lease was deleted; h1's log:\n{}",
        c.agents[0].log_text()
    );

    // The lease comes back: reachable again.
    c.etcd.etcdctl(&["put", &key, lease.trim()]).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || reachable_once(&c, 0, target)),
        "unreachable after the lease came back; h1's log:\n{}",
        c.agents[0].log_text()
    );
}

fn agent_killed_and_restarted_loses_no_ping() {
    let tmp = TempDir::new("agents-restart").unwrap();
    let mut c = cluster("ovt-kl", 2, "vxlan", &tmp);
    let mut flags = vec!["--datapath=ebpf".to_owned()];
    flags.extend(healthz_flags());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.start_all(&flags).unwrap();
    let target = c.lab.hosts[1].container.as_ref().unwrap().ip;
    assert!(reachable_once(&c, 0, target));
    let links_before = pinned_links(&c.bpffs.path().join("h1"));
    assert!(!links_before.is_empty(), "h1 pinned no link");

    // 100 pings a second from h1's container to h2's, one ping process across everything below.
    let c1 = &c.lab.hosts[0].container.as_ref().unwrap().ns;
    let mut flow = PingFlow::start(c1, target, "0.01", 20).unwrap();
    // SIGKILL both agents (no cleanup of any kind, as in a crash or an OOM kill), and wait until
    // both processes are gone.
    let at_kill = flow.count();
    c.kill_agents(&[0, 1]);
    flow.assert_running("the agents were killed");
    // With no agent running anywhere, the pinned programs keep forwarding: replies go on.
    let at_exit = flow.count();
    flow.wait_replies(at_exit, 20, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no replies while the agents were down: {e}"));
    // Restarted agents, each ready (healthz 200: lease held, datapath up).
    c.restart_agents(&[0, 1], Duration::from_secs(30)).unwrap();
    // One flow across the kill and the restart: replies before the kill, and replies to later
    // requests after both agents were ready again.
    let (replies, output) = flow.resumes(at_kill, 20, "the agents' restart");
    // And none lost: every request up to the last one answered got its reply.
    let lost = overlay_tests::flow::lost(&replies);
    assert!(
        lost.is_empty(),
        "pings lost while the agents were killed and restarted: icmp_seq {lost:?}\n{output}"
    );
    // The restarted agent swapped its programs into the links the killed one pinned: the same
    // links, now running programs the new agent loaded.
    let links_after = pinned_links(&c.bpffs.path().join("h1"));
    assert_eq!(
        links_after
            .iter()
            .map(|l| (&l.path, l.link_id))
            .collect::<Vec<_>>(),
        links_before
            .iter()
            .map(|l| (&l.path, l.link_id))
            .collect::<Vec<_>>(),
        "the pinned links were replaced, not reused"
    );
    for (after, before) in links_after.iter().zip(&links_before) {
        assert_ne!(
            after.prog_id,
            before.prog_id,
            "{}: still the killed agent's program",
            after.path.display()
        );
    }
}

fn forward_drop_policy_and_ip_masq_work_like_flannel() {
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
    // Each agent installed flanneld's masquerading rules, in flanneld's chain.
    for (i, host) in c.lab.hosts.iter().enumerate() {
        let nat = rules(&host.ns, "nat");
        assert!(
            nat.lines()
                .any(|l| l.starts_with("-A FLANNEL-POSTRTG")
                    && l.contains("MASQUERADE --random-fully")),
            "h{}'s nat table: {nat}",
            i + 1
        );
    }
}

/// The lines of `text` that `keep` keeps.
fn lines_where(text: &str, keep: impl Fn(&str) -> bool) -> Vec<&str> {
    text.lines().filter(|l| keep(l)).collect()
}

/// `iptables -t <table> -S` in `ns`.
fn rules(ns: &overlay_tests::netns::NetNs, table: &str) -> String {
    let out = ns.exec("iptables", &["-w", "-t", table, "-S"]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for `ok` to hold, asking again on each change of state the agent makes (every resync
/// period here); panics with `what` and the last state after `within`.
fn wait_for(within: Duration, what: &str, mut ok: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match ok() {
            Ok(()) => return,
            Err(state) if Instant::now() > deadline => panic!("{what}: {state}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn flanneld_chains_are_adopted_restored_and_turned_off_like_flanneld() {
    let tmp = TempDir::new("agents-chains").unwrap();
    let mut c = cluster("ovt-fc", 2, "udp", &tmp);
    let fwd_jump = r#"-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#;
    let masq_jump = r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#;
    // What flanneld (twice started, with another Network) and an older agent left on both hosts.
    for host in &c.lab.hosts {
        let sh = |script: &str| {
            host.ns.exec("sh", &["-ec", script]).unwrap();
        };
        sh(r#"iptables -w -N FLANNEL-FWD
              iptables -w -A FLANNEL-FWD -s 10.99.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
              iptables -w -I FORWARD 1 -m comment --comment "flanneld forward" -j FLANNEL-FWD
              iptables -w -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
              iptables -w -t nat -N FLANNEL-POSTRTG
              iptables -w -t nat -A FLANNEL-POSTRTG -s 10.99.0.0/16 -j MASQUERADE
              iptables -w -t nat -I POSTROUTING 1 -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
              iptables -w -N OVERLAY-FWD
              iptables -w -A OVERLAY-FWD -s 172.16.0.0/12 -j ACCEPT
              iptables -w -I FORWARD 1 -j OVERLAY-FWD"#);
    }
    let a1 = c.agent_args(
        0,
        &[
            "--datapath=ebpf",
            "--ip-masq",
            "--ip-masq-fully-random-disable",
            "--ip-blackhole-route",
            "--iptables-resync=1",
        ],
    );
    c.start_agent(0, a1).unwrap();
    let a2 = c.agent_args(1, &["--datapath=ebpf", "--iptables-forward-rules=false"]);
    c.start_agent(1, a2).unwrap();
    let env = c.wait_subnet_env(0, Duration::from_secs(30)).unwrap();
    c.wait_subnet_env(1, Duration::from_secs(30)).unwrap();
    let (sub, len) = env.subnet();
    let h1 = &c.lab.hosts[0].ns;

    // h1 holds flanneld's chains, exactly once, with flanneld's rules for this Network only.
    let filter = rules(h1, "filter");
    let jumps = lines_where(&filter, |l| l.ends_with("-j FLANNEL-FWD"));
    assert_eq!(jumps, [fwd_jump], "{filter}");
    let chain = lines_where(&filter, |l| l.starts_with("-A FLANNEL-FWD"));
    assert_eq!(
        chain,
        [
            r#"-A FLANNEL-FWD -s 172.16.0.0/12 -m comment --comment "flanneld forward" -j ACCEPT"#,
            r#"-A FLANNEL-FWD -d 172.16.0.0/12 -m comment --comment "flanneld forward" -j ACCEPT"#,
        ],
        "{filter}"
    );
    assert!(!filter.contains("OVERLAY-"), "{filter}");
    let nat = rules(h1, "nat");
    let jumps = lines_where(&nat, |l| l.ends_with("-j FLANNEL-POSTRTG"));
    assert_eq!(jumps, [masq_jump], "{nat}");
    let chain = lines_where(&nat, |l| l.starts_with("-A FLANNEL-POSTRTG"));
    assert_eq!(chain.len(), 5, "{nat}");
    assert!(!nat.contains("10.99.0.0/16"), "{nat}");
    assert_eq!(
        chain.iter().filter(|l| l.contains("-j MASQUERADE")).count(),
        2,
        "{nat}"
    );
    assert!(!nat.contains("--random-fully"), "{nat}");
    let blackhole = format!("blackhole {sub}/{len} ");
    let has_blackhole = |routes: &str| {
        routes
            .lines()
            .any(|l| l.starts_with(&blackhole) && l.trim_end().ends_with(" metric 4294967295"))
    };
    let blackholes = || {
        let out = h1
            .ip(&["-4", "route", "show", "type", "blackhole"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(has_blackhole(&blackholes()), "{}", blackholes());

    // Removed behind the agent's back: restored within a resync period or so.
    h1.exec(
        "sh",
        &[
            "-ec",
            r#"iptables -w -D FLANNEL-FWD -d 172.16.0.0/12 -m comment --comment "flanneld forward" -j ACCEPT
               iptables -w -t nat -D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
        ],
    )
    .unwrap();
    h1.ip(&[
        "route",
        "del",
        "blackhole",
        &format!("{sub}/{len}"),
        "metric",
        "4294967295",
    ])
    .unwrap();
    wait_for(Duration::from_secs(20), "rules and route restored", || {
        let (filter, nat, routes) = (rules(h1, "filter"), rules(h1, "nat"), blackholes());
        let restored = filter.contains(
            r#"-A FLANNEL-FWD -d 172.16.0.0/12 -m comment --comment "flanneld forward" -j ACCEPT"#,
        ) && nat.lines().filter(|l| *l == masq_jump).count() == 1
            && has_blackhole(&routes);
        if restored {
            Ok(())
        } else {
            Err(format!("{filter}\n{nat}\n{routes}"))
        }
    });
    let filter = rules(h1, "filter");
    assert_eq!(
        filter
            .lines()
            .filter(|l| l.starts_with("-A FLANNEL-FWD"))
            .count(),
        2,
        "{filter}"
    );
    assert_eq!(
        filter.lines().filter(|l| *l == fwd_jump).count(),
        1,
        "{filter}"
    );
    assert!(
        c.agents[0].log_text().contains("restored"),
        "{}",
        c.agents[0].log_text()
    );

    // h2 (--iptables-forward-rules=false, no --ip-masq): no chain of flanneld's or ours left.
    let h2 = &c.lab.hosts[1].ns;
    for table in ["filter", "nat"] {
        let r = rules(h2, table);
        assert!(
            !r.contains("FLANNEL-") && !r.contains("OVERLAY-"),
            "h2 {table}: {r}"
        );
    }
    let out = h2
        .ip(&["-4", "route", "show", "type", "blackhole"])
        .unwrap();
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn cluster_switch_ip() -> Ipv4Addr {
    overlay_tests::cluster::ETCD_IP
}

fn tun_datapath_takes_over_a_vxlan_device_left_by_flanneld() {
    let tmp = TempDir::new("agents-leftover").unwrap();
    let mut c = cluster("ovt-lo", 2, "vxlan", &tmp);
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
    c.start_all(&["--datapath=tun"]).unwrap();
    let failures = c.ping_matrix();
    assert!(failures.is_empty(), "{failures:#?}");
    // The name is the agent's TUN now, the kernel device gone.
    let link = c.lab.hosts[0]
        .ns
        .ip(&["-d", "link", "show", "flannel.1"])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("tun type tun") && !link.contains("vxlan id"),
        "{link}"
    );
}

fn tun_datapath_refuses_a_running_flanneld_udp() {
    let tmp = TempDir::new("agents-liveudp").unwrap();
    let mut c = cluster("ovt-lu", 1, "udp", &tmp);
    let host = &c.lab.hosts[0];
    // flanneld's udp backend, running: its flannel0 lives while it holds it, and so does its
    // socket on the public address's port 8285.
    let _flanneld = UdpProxy::start(
        &host.ns,
        host.underlay_ip,
        Arc::new(Mutex::new(Vec::new())),
        1472,
    )
    .unwrap();
    let args = c.agent_args(0, &["--datapath=tun"]);
    c.start_agent(0, args).unwrap();
    // It exits by itself: wait for that, not for a time.
    let process = c.agents[0].process.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = process.try_wait() {
            break Some(status);
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running beside flanneld"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // What the operator reads, and the exit status systemd sees.
    let log = c.agents[0].log_text();
    assert!(
        log.contains("flannel0 is held by a running process") && log.contains("--datapath=ebpf"),
        "{log}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    // flanneld's device is untouched: still a TUN that does not persist.
    let link = c.lab.hosts[0]
        .ns
        .ip(&["-d", "link", "show", "flannel0"])
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        link.contains("tun type tun") && !link.contains("persist on"),
        "{link}"
    );
}

overlay_tests::test_main!(
    root agents_udp_every_container_reaches_every_other,
    root agents_vxlan_every_container_reaches_every_other,
    root peer_removed_and_added_in_etcd_takes_effect,
    root agent_killed_and_restarted_loses_no_ping,
    root forward_drop_policy_and_ip_masq_work_like_flannel,
    root flanneld_chains_are_adopted_restored_and_turned_off_like_flanneld,
    root tun_datapath_takes_over_a_vxlan_device_left_by_flanneld,
    root tun_datapath_refuses_a_running_flanneld_udp,
);
