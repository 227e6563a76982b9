//! The article's story with a real Docker engine on every host: Debian's dockerd started from the
//! agent's subnet.env (hosts 1 and 3 by the drop-in in deploy/, host 2 by `overlay-agent
//! docker-opts`), containers from a local busybox image, docker's own iptables rules in force
//! (FORWARD policy DROP, masquerading), both backends and both datapaths.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use overlay_agent::status::Status;
use overlay_tests::{
    cluster::{Cluster, DockerEngine, ETCD_IP},
    etcd::{TempDir, agent_binary},
    flow::PingFlow,
    lab::SubnetEnv,
    netns::NetNs,
};

const SECOND: Duration = Duration::from_secs(1);

/// Three hosts with agents (`--datapath=<datapath> --ip-masq`, `flags`) and a real dockerd each,
/// one container per host.
fn start(prefix: &str, backend: &str, datapath: &str, flags: &[&str], tmp: &TempDir) -> Cluster {
    if let Err(e) = overlay_tests::docker::available() {
        panic!("{e}");
    }
    let mut c = Cluster::with_backend(prefix, 3, backend, tmp.path()).unwrap();
    c.docker = DockerEngine::Real;
    let datapath = format!("--datapath={datapath}");
    let mut all = vec![datapath.as_str(), "--ip-masq"];
    all.extend_from_slice(flags);
    c.start_all(&all).unwrap();
    c
}

fn docker(c: &Cluster, i: usize) -> &overlay_tests::docker::Dockerd {
    c.lab.hosts[i].dockerd.as_ref().expect("a real dockerd")
}

fn env(c: &Cluster, i: usize) -> SubnetEnv {
    SubnetEnv::parse(&std::fs::read_to_string(&c.agents[i].subnet_file).unwrap()).unwrap()
}

/// `overlay-agent status --json` in host `i`'s namespace.
fn status(c: &Cluster, i: usize) -> Status {
    let bpffs = c.bpffs.path().join(format!("h{}", i + 1));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.lab.hosts[i].ns.name()])
        .arg(agent_binary())
        .arg(format!("--bpffs={}", bpffs.display()))
        .args(["status", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Packets of outcome `name` host `i`'s datapath counted.
fn outcome(c: &Cluster, i: usize, name: &str) -> u64 {
    let s = status(c, i);
    let d = s.dataplane.as_ref().expect("the dataplane's counters");
    d.outcomes
        .iter()
        .find(|o| o.outcome == name)
        .map_or(0, |o| o.packets)
}

/// The local endpoints (address, MAC) host `i`'s eBPF datapath delivers into.
fn endpoints(c: &Cluster, i: usize) -> BTreeSet<(Ipv4Addr, String)> {
    let s = status(c, i);
    let d = s.dataplane.as_ref().expect("the dataplane's state");
    d.endpoints.iter().map(|e| (e.ip, e.mac.clone())).collect()
}

/// Polls `probe` every 50 ms until it returns `Some`; panics naming `what` and the last `Err`.
fn wait_for<T>(within: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let until = Instant::now() + within;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if Instant::now() > until => panic!("timed out waiting for {what}: {last}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The article's last step: `docker exec` a ping from every container to every other.
fn docker_ping_matrix(c: &Cluster) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, from) in c.lab.hosts.iter().enumerate() {
        let name = from
            .container
            .as_ref()
            .unwrap()
            .docker_name
            .clone()
            .unwrap();
        for (j, to) in c.lab.hosts.iter().enumerate() {
            if i == j {
                continue;
            }
            let ip = to.container.as_ref().unwrap().ip.to_string();
            let ping = ["exec", &name, "ping", "-c", "3", "-W", "2", &ip];
            if let Err(e) = docker(c, i).cli(&ping) {
                failures.push(format!("h{} -> h{} ({ip}): {e}", i + 1, j + 1));
            }
        }
    }
    failures
}

/// The source address a TCP connection from `from`'s namespace to `listen` in `to` arrives
/// with.
fn source_seen(from: &NetNs, to: &NetNs, listen: SocketAddr) -> Ipv4Addr {
    let listener = to.run(|| TcpListener::bind(listen)).unwrap().unwrap();
    let conn = from
        .run(|| TcpStream::connect_timeout(&listen, 5 * SECOND))
        .unwrap()
        .unwrap_or_else(|e| panic!("connecting to {listen}: {e}"));
    let (_, peer) = listener.accept().unwrap();
    drop(conn);
    match peer {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(a) => panic!("{a}"),
    }
}

fn iptables(ns: &NetNs, table: &str) -> String {
    let out = ns.exec("iptables", &["-w", "-t", table, "-S"]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The article with real docker: every container pings every other with `docker exec`, 1 MB
/// goes over TCP, docker's FORWARD DROP and masquerading are in force, the container's own
/// address crosses the overlay; with eBPF the containers are learned and delivered into.
fn article_with_real_docker(backend: &str, datapath: &str) {
    let tmp = TempDir::new(&format!("docker-{backend}-{datapath}")).unwrap();
    let prefix = format!("ovt-d{}{}", &backend[..1], &datapath[..1]);
    let c = start(&prefix, backend, datapath, &[], &tmp);

    for (i, host) in c.lab.hosts.iter().enumerate() {
        let env = env(&c, i);
        let bip = format!("--bip={}/{}", env.gateway, env.prefix_len);
        let mtu = format!("--mtu={}", env.mtu);
        let ps = docker(&c, i).ps_line().unwrap();
        assert!(ps.contains(&bip) && ps.contains(&mtu), "h{}: {ps}", i + 1);
        // Host 2 took docker-opts' options: the agent masquerades, so docker must not.
        assert_eq!(ps.contains("--ip-masq=false"), i == 1, "h{}: {ps}", i + 1);
        let docker0 = host
            .ns
            .ip(&["-o", "-4", "addr", "show", "docker0"])
            .unwrap();
        let docker0 = String::from_utf8_lossy(&docker0.stdout);
        assert!(
            docker0.contains(&format!("inet {}/{}", env.gateway, env.prefix_len)),
            "{docker0}"
        );
        let link = host.ns.ip(&["-o", "link", "show", "docker0"]).unwrap();
        let link = String::from_utf8_lossy(&link.stdout);
        assert!(link.contains(&format!("mtu {} ", env.mtu)), "{link}");
        // Docker turned forwarding on itself, so it dropped forwarding by policy: the overlay
        // passes only through the agent's FLANNEL-FWD rules (or its eBPF path).
        let filter = iptables(&host.ns, "filter");
        assert!(filter.contains("-P FORWARD DROP"), "h{}: {filter}", i + 1);
        assert!(filter.contains("-A FLANNEL-FWD"), "h{}: {filter}", i + 1);
    }

    let failures = docker_ping_matrix(&c);
    assert!(failures.is_empty(), "{failures:#?}");
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let container = |i: usize| c.lab.hosts[i].container.as_ref().unwrap();
        overlay_tests::cluster::tcp_transfer(container(from), container(to), 5301, 1 << 20)
            .unwrap_or_else(|e| panic!("1 MB h{} -> h{}: {e}", from + 1, to + 1));
    }

    // Host 2's container, whose docker does not masquerade: its own address reaches host 3's
    // container, and the host's own address reaches what lies outside the Network.
    let c2 = c.lab.hosts[1].container.as_ref().unwrap();
    let c3 = c.lab.hosts[2].container.as_ref().unwrap();
    let seen = source_seen(&c2.ns, &c3.ns, SocketAddr::from((c3.ip, 5302)));
    assert_eq!(seen, c2.ip, "h2's container across the overlay");
    let seen = source_seen(&c2.ns, &c.lab.switch, SocketAddr::from((ETCD_IP, 5303)));
    assert_eq!(
        seen, c.lab.hosts[1].underlay_ip,
        "h2's container leaving the Network"
    );

    if datapath == "ebpf" {
        for (i, host) in c.lab.hosts.iter().enumerate() {
            let container = host.container.as_ref().unwrap();
            let info = docker(&c, i)
                .inspect(container.docker_name.as_ref().unwrap())
                .unwrap();
            let learned = endpoints(&c, i);
            assert!(
                learned.contains(&(info.ip, info.mac.clone())),
                "h{}: {learned:?}",
                i + 1
            );
            assert!(
                outcome(&c, i, "DecapDelivered") > 0,
                "h{}: nothing delivered into the container",
                i + 1
            );
        }
    }
}

fn udp_ebpf_containers_reach_each_other() {
    article_with_real_docker("udp", "ebpf");
}

fn vxlan_ebpf_containers_reach_each_other() {
    article_with_real_docker("vxlan", "ebpf");
}

fn udp_tun_containers_reach_each_other() {
    article_with_real_docker("udp", "tun");
}

fn vxlan_tun_containers_reach_each_other() {
    article_with_real_docker("vxlan", "tun");
}

/// `ping` from host `from`'s container namespace to `to`: 3 echoes.
fn ping_from(c: &Cluster, from: usize, to: Ipv4Addr) -> Result<(), String> {
    c.ping(from, to, 3).map_err(|e| e.to_string())
}

/// Waits until host `i`'s eBPF datapath lists `ip` with `mac` among its local endpoints.
fn wait_learned(c: &Cluster, i: usize, ip: Ipv4Addr, mac: &str) {
    wait_for(
        10 * SECOND,
        &format!("h{} to learn {ip} at {mac}", i + 1),
        || {
            let learned = endpoints(c, i);
            learned
                .contains(&(ip, mac.to_owned()))
                .then_some(())
                .ok_or(format!("{learned:?}"))
        },
    );
}

/// Pings `to` from host 2's container and returns how many packets host 1 delivered straight
/// into a container meanwhile.
fn delivered_on_h1(c: &Cluster, to: Ipv4Addr) -> u64 {
    let before = outcome(c, 0, "DecapDelivered");
    ping_from(c, 1, to).unwrap_or_else(|e| panic!("h2 -> {to}: {e}"));
    outcome(c, 0, "DecapDelivered") - before
}

/// The eBPF endpoint learner with containers docker creates and removes: one started after the
/// agent is learned and delivered into; a removed one's entry goes; one started again with the
/// same address and another MAC gets the traffic. The learner reads the host's ARP entries and
/// the bridge's FDB, so a container is learned once the host has resolved it: the first packet
/// for it goes through the stack, which does.
fn containers_started_and_removed_are_learned() {
    let tmp = TempDir::new("docker-learn").unwrap();
    let c = start("ovt-dl", "udp", "ebpf", &[], &tmp);
    let d1 = docker(&c, 0);
    // Left to the kernel, an ARP entry stays reachable for 15..45 s after its last confirmation;
    // with 10 minutes the old MAC would outlive the test, so only the agent's deletion of the
    // stale entry lets the container started again be reached.
    c.lab.hosts[0]
        .ns
        .exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.neigh.docker0.base_reachable_time_ms=600000",
            ],
        )
        .unwrap();

    let late = d1.run("late", &[]).unwrap();
    ping_from(&c, 1, late.ip).unwrap_or_else(|e| panic!("h2 -> the new container: {e}"));
    wait_learned(&c, 0, late.ip, &late.mac);
    let delivered = delivered_on_h1(&c, late.ip);
    assert!(
        delivered >= 3,
        "{delivered} echo requests delivered straight into {late:?}"
    );

    d1.remove("late").unwrap();
    wait_for(10 * SECOND, "h1 to forget the removed container", || {
        let learned = endpoints(&c, 0);
        (!learned.iter().any(|(ip, _)| *ip == late.ip))
            .then_some(())
            .ok_or(format!("{learned:?}"))
    });
    wait_for(
        10 * SECOND,
        "h1 to drop its ARP entry for the removed container",
        || {
            let arp = h1_arp(&c, late.ip);
            (!arp.contains(&late.mac)).then_some(()).ok_or(arp)
        },
    );

    // Docker hands the freed address out again; the MAC is another.
    let mac = "02:42:0e:0e:0e:01";
    let again = d1.run("again", &["--mac-address", mac]).unwrap();
    assert_eq!(again.ip, late.ip, "docker gave the freed address out again");
    assert_eq!(again.mac, mac);
    ping_from(&c, 1, again.ip).unwrap_or_else(|e| panic!("h2 -> the container started again: {e}"));
    wait_learned(&c, 0, again.ip, mac);
    let delivered = delivered_on_h1(&c, again.ip);
    assert!(
        delivered >= 3,
        "{delivered} echo requests delivered into {again:?}"
    );
}

/// h1's ARP entry for `ip` on docker0, as `ip neigh` shows it (empty: none).
fn h1_arp(c: &Cluster, ip: Ipv4Addr) -> String {
    let out = c.lab.hosts[0]
        .ns
        .ip(&["neigh", "show", &ip.to_string(), "dev", "docker0"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The etcd revision that created host `i`'s lease key: a new lease would be a new key.
fn lease_created_at(c: &Cluster, i: usize) -> (String, i64) {
    let s = status(c, i);
    let key = s
        .agent
        .as_ref()
        .and_then(|a| a.lease.key.clone())
        .expect("a lease key");
    let out = c.etcd.etcdctl(&["get", &key, "-w", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rev = v["kvs"][0]["create_revision"]
        .as_i64()
        .unwrap_or_else(|| panic!("{out}"));
    (key, rev)
}

/// dockerd restarted while the agents run (as `systemctl restart docker` does): its containers
/// stop with it and come back (`--restart=always`) with new veths; traffic resumes into them and
/// nothing is leased again.
fn docker_restarted_while_the_agents_run(datapath: &str) {
    let tmp = TempDir::new(&format!("docker-restart-{datapath}")).unwrap();
    let mut c = start(
        &format!("ovt-dr{}", &datapath[..1]),
        "vxlan",
        datapath,
        &[],
        &tmp,
    );
    let leases: Vec<_> = (0..3).map(|i| lease_created_at(&c, i)).collect();
    let envs: Vec<_> = (0..3).map(|i| env(&c, i)).collect();
    let agent_pids: Vec<_> = c
        .agents
        .iter()
        .map(|a| a.process.as_ref().unwrap().pid())
        .collect();
    let old_pid = docker(&c, 0).inspect("h1c").unwrap().pid;

    let h1_ip = c.lab.hosts[0].container.as_ref().unwrap().ip;
    c.lab.hosts[0].dockerd.as_mut().unwrap().stop().unwrap();
    // Docker is down and its container gone: nothing answers on h1 now.
    assert!(ping_from(&c, 1, h1_ip).is_err());
    c.lab.hosts[0]
        .dockerd
        .as_mut()
        .unwrap()
        .start_again()
        .unwrap();
    let info = wait_for(30 * SECOND, "docker to restart h1's container", || {
        docker(&c, 0).inspect("h1c").map_err(|e| e.to_string())
    });
    assert_ne!(info.pid, old_pid, "the container was restarted");
    c.lab.hosts[0].refresh_container().unwrap();

    let failures = docker_ping_matrix(&c);
    assert!(failures.is_empty(), "after docker's restart: {failures:#?}");
    if datapath == "ebpf" {
        let before = outcome(&c, 0, "DecapDelivered");
        ping_from(&c, 1, info.ip).unwrap();
        assert!(
            outcome(&c, 0, "DecapDelivered") >= before + 3,
            "not delivered into the new veth"
        );
    }
    // Nothing re-leased, nothing restarted on the agents' side.
    for i in 0..3 {
        assert_eq!(lease_created_at(&c, i), leases[i], "h{}'s lease", i + 1);
        assert_eq!(env(&c, i), envs[i], "h{}'s subnet.env", i + 1);
        assert_eq!(c.agents[i].process.as_ref().unwrap().pid(), agent_pids[i]);
    }
}

fn docker_restarted_while_the_ebpf_agents_run() {
    docker_restarted_while_the_agents_run("ebpf");
}

fn docker_restarted_while_the_tun_agents_run() {
    docker_restarted_while_the_agents_run("tun");
}

/// docker's own rules, as `iptables -S` prints them: every line naming a DOCKER chain, docker0
/// or a MASQUERADE of a docker subnet.
fn dockers_rules(ns: &NetNs) -> Vec<String> {
    ["filter", "nat"]
        .iter()
        .flat_map(|t| {
            iptables(ns, t)
                .lines()
                .filter(|l| l.contains("DOCKER") || l.contains("docker0"))
                .map(|l| format!("{t}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The agents restarted while docker runs: a ping between containers runs across the restart
/// without a loss, and docker is untouched (same daemon, same container, same rules). Then
/// `overlay-agent teardown` removes the agent's rules and leaves docker's.
fn agent_restarted_while_docker_runs_then_torn_down() {
    let tmp = TempDir::new("docker-agent-restart").unwrap();
    let flags: Vec<String> = overlay_tests::cluster::healthz_flags().into();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut c = start("ovt-da", "udp", "ebpf", &flags, &tmp);
    let dockerd_pids: Vec<_> = (0..3).map(|i| docker(&c, i).pid()).collect();
    let containers: Vec<_> = (0..3)
        .map(|i| docker(&c, i).inspect(&format!("h{}c", i + 1)).unwrap())
        .collect();
    let rules: Vec<_> = c.lab.hosts.iter().map(|h| dockers_rules(&h.ns)).collect();
    assert!(
        rules.iter().all(|r| !r.is_empty()),
        "docker installed no rules: {rules:?}"
    );

    let c1 = &c.lab.hosts[0].container.as_ref().unwrap().ns;
    let mut flow = PingFlow::start(c1, containers[1].ip, "0.01", 20).unwrap();
    let at_restart = flow.count();
    c.kill_agents(&[0, 1]);
    flow.assert_running("the agents were killed");
    c.restart_agents(&[0, 1], 30 * SECOND).unwrap();
    let (replies, output) = flow.resumes(at_restart, 20, "the agents' restart");
    let lost = overlay_tests::flow::lost(&replies);
    assert!(
        lost.is_empty(),
        "pings lost across the restart: {lost:?}\n{output}"
    );
    for i in 0..3 {
        assert_eq!(docker(&c, i).pid(), dockerd_pids[i], "h{}'s dockerd", i + 1);
        let now = docker(&c, i).inspect(&format!("h{}c", i + 1)).unwrap();
        assert_eq!(now, containers[i], "h{}'s container", i + 1);
        assert_eq!(
            dockers_rules(&c.lab.hosts[i].ns),
            rules[i],
            "h{}'s docker rules",
            i + 1
        );
    }
    assert!(docker_ping_matrix(&c).is_empty());

    // Teardown after the agent stopped: the agent's chains go, docker's stay as they were.
    c.kill_agents(&[0]);
    let bpffs = c.bpffs.path().join("h1");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", c.lab.hosts[0].ns.name()])
        .arg(agent_binary())
        .arg("teardown")
        .arg(format!("--bpffs={}", bpffs.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h1 = &c.lab.hosts[0].ns;
    assert_eq!(
        dockers_rules(h1),
        rules[0],
        "teardown touched docker's rules"
    );
    let all = format!(
        "{}{}{}",
        iptables(h1, "filter"),
        iptables(h1, "nat"),
        iptables(h1, "raw")
    );
    for chain in ["FLANNEL-FWD", "FLANNEL-POSTRTG", "OVERLAY-UNTRACKED"] {
        assert!(!all.contains(chain), "{chain} left by teardown:\n{all}");
    }
    // Containers on the same host still reach each other over docker0.
    let other = docker(&c, 0).run("neighbour", &[]).unwrap();
    ping_from(&c, 0, other.ip).unwrap();
}

/// Set in the child [`a_killed_runs_dockerd_and_containers_are_removed_after`] starts: the
/// child is the killed run.
const CHILD_ENV: &str = "OVERLAY_TESTS_DOCKER_CHILD";

/// What a run killed with SIGKILL leaves (its dockerd, containerd, shim and container still
/// running, their mounts, state directory and cgroups, its namespaces) is removed by the next
/// run's [`overlay_tests::docker::remove_leftovers`], as `cargo xtask run` and bench do at
/// start. The killed run is this test binary again, started for this test with [`CHILD_ENV`].
fn a_killed_runs_dockerd_and_containers_are_removed_after() {
    if std::env::var_os(CHILD_ENV).is_some() {
        // The run to be killed: a host with a dockerd and a container, then wait for SIGKILL.
        let host = NetNs::new("ovt-dk-h").unwrap();
        let daemon = overlay_tests::docker::Dockerd::start(
            &host,
            vec!["--bip=172.31.250.1/24".into(), "--mtu=1450".into()],
        )
        .unwrap();
        let c = daemon.run("victim", &[]).unwrap();
        println!("READY {} {}", daemon.state_dir().display(), c.pid);
        std::mem::forget((host, daemon));
        loop {
            std::thread::sleep(SECOND);
        }
    }
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_runs_dockerd_and_containers_are_removed_after",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        // After the harness's "test <name> ... " on the same line.
        .find_map(|l| l.split_once("READY ").map(|(_, r)| r.to_owned()))
        .expect("the child's READY line");
    let mut words = ready.split_whitespace();
    let state = std::path::PathBuf::from(words.next().unwrap());
    let container_pid: u32 = words.next().unwrap().parse().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // What the killed run left: it must be there for the cleanup to be exercised.
    let alive = overlay_tests::docker::running;
    let mentioning = |needle: &str| -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
            })
            .collect()
    };
    let name = state.file_name().unwrap().to_string_lossy().into_owned();
    let mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&*state.to_string_lossy()))
            .count()
    };
    let cgroup = std::path::Path::new("/sys/fs/cgroup/pids").join(&name);
    assert!(alive(container_pid), "the container died with the run");
    assert!(
        !mentioning(&state.to_string_lossy()).is_empty(),
        "no dockerd left running"
    );
    assert!(state.exists() && mounts() > 0 && cgroup.exists());

    // A cgroup whose state directory is gone already (a run killed while removing its state).
    let orphan = std::path::Path::new("/sys/fs/cgroup/pids").join(format!(
        "{}{}-99",
        overlay_tests::docker::STATE_PREFIX,
        child.id()
    ));
    std::fs::create_dir(&orphan).unwrap();

    let removed = overlay_tests::docker::remove_leftovers();
    overlay_tests::netns::remove_stale("ovt-dk");
    assert!(!orphan.exists(), "{} left", orphan.display());
    assert!(removed.contains(&state), "{removed:?}");
    assert!(!alive(container_pid), "the container still runs");
    let left = mentioning(&state.to_string_lossy());
    assert!(left.is_empty(), "processes left: {left:?}");
    assert!(!state.exists(), "{} left", state.display());
    assert_eq!(mounts(), 0, "mounts left under {}", state.display());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
}

overlay_tests::test_main!(
    root udp_ebpf_containers_reach_each_other,
    root vxlan_ebpf_containers_reach_each_other,
    root udp_tun_containers_reach_each_other,
    root vxlan_tun_containers_reach_each_other,
    root containers_started_and_removed_are_learned,
    root docker_restarted_while_the_ebpf_agents_run,
    root docker_restarted_while_the_tun_agents_run,
    root agent_restarted_while_docker_runs_then_torn_down,
    root a_killed_runs_dockerd_and_containers_are_removed_after,
);
