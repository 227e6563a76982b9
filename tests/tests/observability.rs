//! What an operator sees: `overlay-agent status` (text and `--json`), `/metrics` and `/healthz`,
//! read during traffic between containers, after the agent was killed (from the pins alone), and
//! after the dataplane was torn out under a running agent.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use overlay_agent::status::Status;
use overlay_common::maps::MAX_PEERS;
use overlay_tests::{
    cluster::{Cluster, HEALTHZ_PORT, PREFIX, http_get, metric},
    etcd::{TempDir, agent_binary},
    flow::PingFlow,
    lab::LabConfig,
};

const SECOND: Duration = Duration::from_secs(1);

/// Flags giving the agent the health endpoint with flanneld's default answer.
fn healthz_flags() -> Vec<String> {
    vec![
        "--healthz-ip=127.0.0.1".into(),
        format!("--healthz-port={HEALTHZ_PORT}"),
    ]
}

fn start(prefix: &str, backend: &str, datapath: &str, tmp: &TempDir) -> Cluster {
    let mut c = Cluster::with_backend(prefix, 2, backend, tmp.path()).unwrap();
    let mut flags = vec![format!("--datapath={datapath}")];
    flags.extend(healthz_flags());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    c.start_all(&flags).unwrap();
    for i in 0..2 {
        c.wait_healthy(i, 30 * SECOND).unwrap();
    }
    c
}

/// `overlay-agent status [--json]` run in host `index`'s namespace: (exit code, stdout).
fn status_cmd(c: &Cluster, index: usize, json: bool) -> (i32, String) {
    let bpffs = c.bpffs.path().join(format!("h{}", index + 1));
    let bpffs = format!("--bpffs={}", bpffs.display());
    let bin = agent_binary().to_string_lossy().into_owned();
    let mut args = vec![bpffs.as_str(), "status"];
    if json {
        args.push("--json");
    }
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.lab.hosts[index].ns.name(), &bin])
        .args(&args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "status wrote to stderr: {stderr}");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn status(c: &Cluster, index: usize) -> (i32, Status) {
    let (code, out) = status_cmd(c, index, true);
    let status = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, status)
}

/// `GET path` inside host `index`'s namespace.
fn get(c: &Cluster, index: usize, path: &str) -> (u16, String) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    c.lab.hosts[index]
        .ns
        .run(|| http_get(addr, path))
        .unwrap()
        .unwrap()
}

fn metric_of(c: &Cluster, index: usize, name: &str) -> f64 {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    c.lab.hosts[index]
        .ns
        .run(|| metric(addr, name))
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `probe` every 20 ms until it returns `Some`; panics naming `what` after `within`.
fn wait_for<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn peer_tx(s: &Status, peer: Ipv4Addr) -> (u64, u64) {
    let t = s
        .dataplane
        .as_ref()
        .and_then(|d| d.peer_traffic.as_ref())
        .and_then(|t| t.iter().find(|p| p.public_ip == peer))
        .unwrap_or_else(|| panic!("no traffic entry for peer {peer}: {s:#?}"));
    (t.tx_packets, t.rx_packets)
}

fn status_and_metrics_follow_traffic_and_survive_the_agent(backend: &str) {
    let tmp = TempDir::new(&format!("obs-{backend}")).unwrap();
    let mut c = start(&format!("ovt-ob{}", &backend[..1]), backend, "ebpf", &tmp);
    let h2 = c.lab.hosts[1].underlay_ip;
    let target = c.lab.hosts[1].container.as_ref().unwrap().ip;
    let c1 = &c.lab.hosts[0].container.as_ref().unwrap().ns;
    let mut flow = PingFlow::start(c1, target, "0.02", 5).unwrap();

    // While the agent runs: everything from the agent, the dataplane from the pins.
    let (code, s) = status(&c, 0);
    assert_eq!(code, 0, "{s:#?}");
    let a = s.agent.as_ref().expect("the running agent answers");
    assert!(a.healthy && a.lease.held, "{a:#?}");
    assert!(a.lease.subnet.is_some() && a.lease.key.is_some(), "{a:#?}");
    assert!(a.lease.expires_in_seconds.unwrap() > 0.0, "{a:#?}");
    assert!(a.etcd.up && !a.etcd.member.is_empty(), "{a:#?}");
    let d = a.datapath.as_ref().expect("a datapath");
    assert_eq!((d.kind.as_str(), d.backend.as_str()), ("eBPF", backend));
    assert!(d.chosen.contains("--datapath=ebpf"), "{d:#?}");
    assert_eq!(a.peers.len(), 1, "{a:#?}");
    assert_eq!(a.peers[0].public_ip, h2);
    let dp = s.dataplane.as_ref().expect("the dataplane");
    assert!(
        dp.links
            .iter()
            .all(|l| l.link_id.is_some() && l.program_id.is_some())
            && dp.links.iter().any(|l| l.program == "tc_encap"),
        "{:#?}",
        dp.links
    );
    assert!(dp.maps.iter().any(|m| m.map == "PEERS" && m.entries == 1));
    let (tx1, rx1) = peer_tx(&s, h2);
    assert!(tx1 > 0 && rx1 > 0, "the ping flow is not counted: {s:#?}");

    // /metrics moves with the same traffic; the flow is still running at the second scrape.
    let tx_metric = format!("overlay_peer_transmit_packets_total{{peer=\"{h2}\"}}");
    let rx_metric = format!("overlay_peer_receive_bytes_total{{peer=\"{h2}\"}}");
    let first = (metric_of(&c, 0, &tx_metric), metric_of(&c, 0, &rx_metric));
    let at = flow.count();
    flow.wait_replies(at, 5, 10 * SECOND).unwrap();
    let second = (metric_of(&c, 0, &tx_metric), metric_of(&c, 0, &rx_metric));
    assert!(
        second.0 >= first.0 + 5.0 && second.1 > first.1,
        "{first:?} -> {second:?}"
    );
    flow.assert_running("the second scrape");
    let (_, body) = get(&c, 0, "/metrics");
    for family in [
        "overlay_lease_held 1",
        "overlay_etcd_up 1",
        "overlay_peers 1",
        "overlay_datapath_info{kind=\"eBPF\"",
        "overlay_datapath_up 1",
        "overlay_dataplane_dropped_packets_total{reason=\"DropSpoofed\"}",
        "overlay_map_capacity{map=\"PEERS\"}",
        "overlay_etcd_reconnects_total 0",
    ] {
        assert!(body.contains(family), "no {family} in\n{body}");
    }
    let (code, text) = status_cmd(&c, 0, false);
    eprintln!("{text}");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("Agent:      running") && text.contains(&h2.to_string()),
        "{text}"
    );

    // The agent dies; the programs forward on, and status reads them from the pins, counters
    // still moving.
    c.kill_agents(&[0]);
    flow.assert_running("the agent was killed");
    let (code, s) = status(&c, 0);
    assert_eq!(code, 3, "{s:#?}");
    assert!(s.agent.is_none() && s.agent_error.is_some(), "{s:#?}");
    let dp = s.dataplane.as_ref().expect("the pinned dataplane");
    assert_eq!(dp.read_from, "pins");
    assert!(dp.routes.iter().any(|r| r.public_ip == h2), "{dp:#?}");
    let (tx_dead, _) = peer_tx(&s, h2);
    assert!(tx_dead >= tx1, "{tx_dead} < {tx1}");
    let at = flow.count();
    flow.wait_replies(at, 5, 10 * SECOND)
        .unwrap_or_else(|e| panic!("no replies with the agent dead: {e}"));
    let (tx_later, _) = peer_tx(&status(&c, 0).1, h2);
    assert!(tx_later >= tx_dead + 5, "{tx_dead} -> {tx_later}");
    let (_, text) = status_cmd(&c, 0, false);
    eprintln!("{text}");
    assert!(
        text.contains("Agent:      NOT RUNNING") && text.contains(&h2.to_string()),
        "{text}"
    );
    flow.assert_running("status after the kill");
}

fn ebpf_udp_status_and_metrics_follow_traffic_and_survive_the_agent() {
    status_and_metrics_follow_traffic_and_survive_the_agent("udp");
}

fn ebpf_vxlan_status_and_metrics_follow_traffic_and_survive_the_agent() {
    status_and_metrics_follow_traffic_and_survive_the_agent("vxlan");
}

/// `overlay-agent teardown --force` under the running agent: `/healthz` turns 503 with the
/// reason, and status and `/metrics` say so.
fn healthz_is_503_once_the_dataplane_is_torn_out() {
    let tmp = TempDir::new("obs-torn").unwrap();
    let c = start("ovt-obt", "udp", "ebpf", &tmp);
    assert_eq!(
        get(&c, 0, "/healthz"),
        (200, "flanneld is running".to_owned())
    );
    let bpffs = format!("--bpffs={}", c.bpffs.path().join("h1").display());
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.lab.hosts[0].ns.name()])
        .arg(agent_binary())
        .args([bpffs.as_str(), "teardown", "--force"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed device flannel0"),
        "{out:?}"
    );
    let (code, body) = wait_for(10 * SECOND, "/healthz to answer 503", || {
        let r = get(&c, 0, "/healthz");
        (r.0 != 200).then_some(r)
    });
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not forwarding: "), "{body}");
    assert_eq!(metric_of(&c, 0, "overlay_healthy"), 0.0);
    assert_eq!(metric_of(&c, 0, "overlay_datapath_up"), 0.0);
    let (code, s) = status(&c, 0);
    assert_eq!(code, 1);
    let a = s.agent.unwrap();
    assert!(
        a.unhealthy_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("not forwarding: ")),
        "{a:#?}"
    );
}

/// The TUN datapath's counters are readable while it runs, under the eBPF counters' names.
fn tun_counters_are_live() {
    let tmp = TempDir::new("obs-tun").unwrap();
    let c = start("ovt-obu", "udp", "tun", &tmp);
    let target = c.lab.hosts[1].container.as_ref().unwrap().ip;
    let c1 = &c.lab.hosts[0].container.as_ref().unwrap().ns;
    let mut flow = PingFlow::start(c1, target, "0.02", 5).unwrap();
    let (code, s) = status(&c, 0);
    assert_eq!(code, 0, "{s:#?}");
    assert_eq!(
        s.agent.as_ref().unwrap().datapath.as_ref().unwrap().kind,
        "TUN"
    );
    let dp = s.dataplane.as_ref().expect("the TUN datapath's counters");
    assert_eq!(dp.read_from, "agent");
    assert!(dp.peer_traffic.is_none());
    let sent = dp.packets(overlay_common::CounterSlot::Encapsulated);
    assert!(sent >= 5, "{dp:#?}");
    let name = "overlay_dataplane_packets_total{outcome=\"Encapsulated\"}";
    let before = metric_of(&c, 0, name);
    let at = flow.count();
    flow.wait_replies(at, 5, 10 * SECOND).unwrap();
    assert!(metric_of(&c, 0, name) >= before + 5.0);
    flow.assert_running("the TUN counters were read");
}

/// At the eBPF maps' capacity: a host that leases a subnet when h1's maps are full of other
/// peers is refused by h1's datapath, says so in status, `/metrics` and the strict health body,
/// loses none of the entries it had, and gets in as soon as one peer leaves.
fn a_full_peer_map_refuses_the_newcomer_until_a_peer_leaves() {
    let tmp = TempDir::new("obs-full").unwrap();
    let config = LabConfig {
        prefix: "ovt-obf".into(),
        hosts: 2,
        underlay_mtu: 1500,
    };
    // A /8 of /24s holds the fake peers, h1 and h2.
    let network = r#"{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "udp"}}"#;
    let mut c = Cluster::new(&config, network, agent_binary(), tmp.path()).unwrap();
    // MAX_PEERS hosts that exist only in etcd (nothing is sent to them): h1's maps are full
    // with them alone.
    let fake = |i: u32| {
        (
            format!("{PREFIX}/subnets/10.{}.{}.0-24", i / 256 + 1, i % 256),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null}}"#,
                Ipv4Addr::from(0x6440_0000 + i)
            ),
        )
    };
    let leases: Vec<_> = (0..MAX_PEERS).map(fake).collect();
    c.etcd.put_many(&leases).unwrap();

    let mut flags = vec!["--datapath=ebpf".to_owned(), "--healthz-strict".to_owned()];
    flags.extend(healthz_flags());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = c.agent_args(0, &flags);
    c.start_agent(0, args).unwrap();
    let env = c.wait_subnet_env(0, 60 * SECOND).unwrap();
    c.start_docker(0, &env).unwrap();
    c.wait_healthy(0, 120 * SECOND).unwrap();
    let peers_entries = "overlay_map_entries{map=\"PEERS\"}";
    wait_for(120 * SECOND, "h1 to program every fake peer", || {
        (metric_of(&c, 0, peers_entries) == f64::from(MAX_PEERS)).then_some(())
    });
    assert_eq!(metric_of(&c, 0, "overlay_peers_unprogrammed"), 0.0);

    // h2 (TUN: no map to fill) joins; h1 has no room for it.
    let args = c.agent_args(1, &["--datapath=tun"]);
    c.start_agent(1, args).unwrap();
    let env2 = c.wait_subnet_env(1, 60 * SECOND).unwrap();
    c.start_docker(1, &env2).unwrap();
    // The subnet of h2's gateway address: its lease.
    let mask = u32::MAX << (32 - env2.prefix_len);
    let h2_subnet = format!(
        "{}/{}",
        Ipv4Addr::from(u32::from(env2.gateway) & mask),
        env2.prefix_len
    );
    wait_for(60 * SECOND, "h1 to refuse h2", || {
        (metric_of(&c, 0, "overlay_peers_unprogrammed") == 1.0).then_some(())
    });
    let (code, s) = status(&c, 0);
    assert_eq!(
        code, 0,
        "a full map leaves the agent healthy: {:#?}",
        s.agent
    );
    let a = s.agent.as_ref().unwrap();
    assert_eq!(a.unprogrammed.len(), 1, "{:#?}", a.unprogrammed);
    let refused = &a.unprogrammed[0];
    assert_eq!(refused.subnet, h2_subnet);
    assert_eq!(refused.public_ip, Some(c.lab.hosts[1].underlay_ip));
    assert!(
        refused.map_full && refused.reason.contains("the map is full"),
        "{refused:?}"
    );
    assert_eq!(a.peers.len(), MAX_PEERS as usize + 1);
    let dp = s.dataplane.as_ref().unwrap();
    assert_eq!(dp.routes.len(), MAX_PEERS as usize, "an entry was lost");
    assert!(!dp.routes.iter().any(|r| r.subnet == h2_subnet));
    let (_, text) = status_cmd(&c, 0, false);
    assert!(
        text.lines()
            .any(|l| l.contains(&h2_subnet) && l.contains("NOT PROGRAMMED")),
        "{}",
        text.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    let (code, body) = get(&c, 0, "/healthz");
    assert_eq!(code, 200);
    assert!(body.contains("1 peer(s) not in the dataplane"), "{body}");
    // Refused means not forwarded to.
    let target = c.lab.hosts[1].container.as_ref().unwrap().ip;
    assert!(
        c.ping(0, target, 1).is_err(),
        "h1 reached h2 with no room for it"
    );

    // One fake peer leaves: h2 takes its place, without a resync.
    let (gone_key, _) = fake(7);
    c.etcd.etcdctl(&["del", &gone_key]).unwrap();
    wait_for(30 * SECOND, "h1 to program h2", || {
        (metric_of(&c, 0, "overlay_peers_unprogrammed") == 0.0).then_some(())
    });
    let (_, s) = status(&c, 0);
    let dp = s.dataplane.as_ref().unwrap();
    assert_eq!(dp.routes.len(), MAX_PEERS as usize);
    assert!(dp.routes.iter().any(|r| r.subnet == h2_subnet));
    assert!(!dp.routes.iter().any(|r| r.subnet == "10.1.7.0/24"));
    c.ping(0, target, 3).unwrap();
    let (_, body) = get(&c, 0, "/healthz");
    assert_eq!(body, "ok\n");
}

overlay_tests::test_main!(
    root ebpf_udp_status_and_metrics_follow_traffic_and_survive_the_agent,
    root ebpf_vxlan_status_and_metrics_follow_traffic_and_survive_the_agent,
    root healthz_is_503_once_the_dataplane_is_torn_out,
    root tun_counters_are_live,
    root a_full_peer_map_refuses_the_newcomer_until_a_peer_leaves,
);
