//! The control plane against a real etcd: leases, reservations, restarts, expiry, an etcd
//! outage, TLS, authentication, the article's command line and the FLANNELD_* variables.
//!
//! Agents run as real `overlay-agent` processes (see `overlay_tests::etcd::agent_binary`) with
//! `--public-ip` on 127.x addresses, so no namespace is needed; most use the `alloc` backend.
//! Every etcd listens on free loopback ports. Timing lines start with `TIMING` (run with
//! `--nocapture` to see them).

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use overlay_tests::etcd::{Agent, Etcd, EtcdOptions, TempDir, free_port};

const SECOND: Duration = Duration::from_secs(1);

/// Flags every test agent gets: where etcd is, which prefix, where to write subnet.env.
fn args(etcd: &Etcd, prefix: &str, dir: &Path, name: &str, public_ip: &str) -> Vec<String> {
    vec![
        format!("--etcd-endpoints={}", etcd.endpoint()),
        format!("--etcd-prefix={prefix}"),
        format!("--subnet-file={}", subnet_file(dir, name).display()),
        format!("--public-ip={public_ip}"),
    ]
}

fn subnet_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("subnet.env")
}

fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    base.extend(extra.iter().map(|s| s.to_string()));
    base
}

/// FLANNEL_SUBNET's value (e.g. `10.5.3.1/24`) turned into the lease's network (`10.5.3.0/24`).
fn leased_subnet(env: &str) -> String {
    let v = env
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .unwrap_or_else(|| panic!("no FLANNEL_SUBNET in {env:?}"));
    let (ip, len) = v.split_once('/').unwrap();
    let ip: Ipv4Addr = ip.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    let net = u32::from(ip) & (u32::MAX << (32 - len));
    format!("{}/{len}", Ipv4Addr::from(net))
}

fn key_of(prefix: &str, subnet: &str) -> String {
    format!("{prefix}/subnets/{}", subnet.replace('/', "-"))
}

fn must_env(agent: &Agent, timeout: Duration) -> String {
    agent
        .wait_subnet_env(timeout)
        .unwrap_or_else(|| panic!("no subnet.env in time; log:\n{}", agent.log_text()))
}

/// `--healthz-port` on a free loopback port, and the address to read `/metrics` from.
fn metrics_flags() -> (Vec<String>, std::net::SocketAddr) {
    let port = free_port();
    (
        vec![
            format!("--healthz-port={port}"),
            "--healthz-ip=127.0.0.1".into(),
        ],
        std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    )
}

/// Waits until the agent's `/metrics` value `name` reaches `at_least`.
fn wait_metric_at_least(agent: &Agent, addr: std::net::SocketAddr, name: &str, at_least: f64) {
    let deadline = Instant::now() + 60 * SECOND;
    loop {
        if overlay_tests::cluster::metric(addr, name).is_ok_and(|v| v >= at_least) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {at_least}:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alloc_config(network: &str, extra: &str) -> String {
    format!(r#"{{"Network":"{network}"{extra},"Backend":{{"Type":"alloc"}}}}"#)
}

fn fifty_agents_get_distinct_subnets_and_the_51st_is_refused() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("fifty").unwrap();
    let prefix = "/fifty";
    // Exactly 50 subnets: 10.50.1.0/24 ..= 10.50.50.0/24.
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config(
            "10.50.0.0/16",
            r#","SubnetLen":24,"SubnetMin":"10.50.1.0","SubnetMax":"10.50.50.0""#,
        ),
    );
    overlay_tests::etcd::agent_binary(); // build before timing
    let start = Instant::now();
    let agents: Vec<Agent> = (1..=50)
        .map(|i| {
            let name = format!("a{i}");
            let a = args(&etcd, prefix, tmp.path(), &name, &format!("127.0.1.{i}"));
            Agent::spawn(tmp.path(), &name, &a, &[]).unwrap()
        })
        .collect();
    let envs: Vec<String> = agents
        .iter()
        .map(|a| must_env(a, Duration::from_secs(60)))
        .collect();
    let all_leased = start.elapsed();
    eprintln!(
        "TIMING fifty_agents_all_leased_ms={}",
        all_leased.as_millis()
    );

    let subnets: HashSet<String> = envs.iter().map(|e| leased_subnet(e)).collect();
    assert_eq!(subnets.len(), 50, "duplicate subnets: {envs:?}");
    for s in &subnets {
        let third: u32 = s.split('.').nth(2).unwrap().parse().unwrap();
        assert!(
            s.starts_with("10.50.") && s.ends_with(".0/24") && (1..=50).contains(&third),
            "{s} outside [SubnetMin, SubnetMax]"
        );
    }
    // Same /24 length and distinct network addresses: no overlap. etcd agrees, key by key.
    let leases = etcd.get_prefix(&format!("{prefix}/subnets/"));
    assert_eq!(leases.len(), 50);
    for (i, env) in envs.iter().enumerate() {
        let key = key_of(prefix, &leased_subnet(env));
        let value = etcd.get(&key).unwrap();
        assert!(
            value.contains(&format!("\"PublicIP\":\"127.0.1.{}\"", i + 1)),
            "{key} = {value}"
        );
        assert!(value.contains("\"BackendType\":\"alloc\""), "{value}");
        assert_ne!(etcd.lease_of(&key), 0, "{key} has no TTL");
    }
    for env in &envs {
        assert!(
            env.starts_with("FLANNEL_NETWORK=10.50.0.0/16\nFLANNEL_SUBNET=10.50."),
            "{env}"
        );
    }

    let mut late = Agent::spawn(
        tmp.path(),
        "a51",
        &args(&etcd, prefix, tmp.path(), "a51", "127.0.1.51"),
        &[],
    )
    .unwrap();
    let status = late
        .wait_exit(Duration::from_secs(20))
        .expect("the 51st agent must exit");
    assert_eq!(status.code(), Some(1), "log:\n{}", late.log_text());
    let log = late.log_text();
    assert!(log.contains("no free subnet"), "log:\n{log}");
    assert!(!subnet_file(tmp.path(), "a51").exists());
    drop(agents);
}

fn restart_keeps_the_subnet_and_sigterm_keeps_the_lease() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("restart").unwrap();
    let prefix = "/restart";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.51.0.0/16", ""),
    );
    let a = args(&etcd, prefix, tmp.path(), "a", "127.0.2.1");
    let mut agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    let subnet = leased_subnet(&must_env(&agent, 20 * SECOND));
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(10 * SECOND)
        .expect("SIGTERM must stop the agent");
    assert_eq!(status.code(), Some(0), "log:\n{}", agent.log_text());
    let key = key_of(prefix, &subnet);
    assert!(
        etcd.get(&key).is_some(),
        "SIGTERM must leave the lease in etcd"
    );

    // Another host starts meanwhile; the restarted agent still gets its own subnet back.
    let b = args(&etcd, prefix, tmp.path(), "b", "127.0.2.2");
    let other = Agent::spawn(tmp.path(), "b", &b, &[]).unwrap();
    assert_ne!(leased_subnet(&must_env(&other, 20 * SECOND)), subnet);
    std::fs::remove_file(subnet_file(tmp.path(), "a")).unwrap();
    let agent = Agent::spawn(tmp.path(), "a2", &a, &[]).unwrap();
    assert_eq!(leased_subnet(&must_env(&agent, 20 * SECOND)), subnet);
    assert_eq!(etcd.get_prefix(&format!("{prefix}/subnets/")).len(), 2);
}

fn a_deleted_lease_is_taken_back_while_running() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("deleted").unwrap();
    let prefix = "/deleted";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.52.0.0/16", ""),
    );
    let a = args(&etcd, prefix, tmp.path(), "a", "127.0.2.11");
    let mut agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    let subnet = leased_subnet(&must_env(&agent, 20 * SECOND));
    let key = key_of(prefix, &subnet);
    for _round in 1..=2 {
        etcd.del(&key);
        // Absent from the moment del returns; the first value seen after it is the agent's
        // re-acquisition.
        let deadline = Instant::now() + 10 * SECOND;
        let value = loop {
            if let Some(value) = etcd.get(&key) {
                break value;
            }
            assert!(
                Instant::now() < deadline,
                "the lease was not taken back; log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(value.contains("127.0.2.11"), "{value}");
        assert_ne!(etcd.lease_of(&key), 0);
    }
    assert!(agent.try_wait().is_none(), "the agent must keep running");

    // A different host overwriting our key is theft: the agent stops rather than share.
    etcd.put(&key, r#"{"PublicIP":"127.0.2.99","BackendType":"alloc"}"#);
    let status = agent.wait_exit(10 * SECOND).expect("agent must stop");
    assert_eq!(status.code(), Some(1));
    assert!(
        agent.log_text().contains("is now held by 127.0.2.99"),
        "{}",
        agent.log_text()
    );
    assert!(
        etcd.get(&key).unwrap().contains("127.0.2.99"),
        "renewal must not steal it back"
    );
}

fn a_reservation_is_used_by_its_public_ip_and_by_no_one_else() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("reserve").unwrap();
    let prefix = "/reserve";
    // Four subnets, 10.53.5.0 ..= 10.53.8.0; 10.53.7.0 is reserved for 127.0.3.7.
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config(
            "10.53.0.0/16",
            r#","SubnetMin":"10.53.5.0","SubnetMax":"10.53.8.0""#,
        ),
    );
    let reserved_key = format!("{prefix}/subnets/10.53.7.0-24");
    etcd.put(&reserved_key, r#"{"PublicIP":"127.0.3.7"}"#);

    let others: Vec<Agent> = (1..=3)
        .map(|i| {
            let name = format!("o{i}");
            let a = args(&etcd, prefix, tmp.path(), &name, &format!("127.0.3.{i}"));
            Agent::spawn(tmp.path(), &name, &a, &[]).unwrap()
        })
        .collect();
    let got: HashSet<String> = others
        .iter()
        .map(|a| leased_subnet(&must_env(a, 20 * SECOND)))
        .collect();
    let want: HashSet<String> = ["10.53.5.0/24", "10.53.6.0/24", "10.53.8.0/24"]
        .map(String::from)
        .into();
    assert_eq!(got, want);
    let mut fourth = Agent::spawn(
        tmp.path(),
        "o4",
        &args(&etcd, prefix, tmp.path(), "o4", "127.0.3.4"),
        &[],
    )
    .unwrap();
    assert_eq!(
        fourth.wait_exit(20 * SECOND).and_then(|s| s.code()),
        Some(1)
    );
    assert!(fourth.log_text().contains("no free subnet"));

    let owner = Agent::spawn(
        tmp.path(),
        "owner",
        &args(&etcd, prefix, tmp.path(), "owner", "127.0.3.7"),
        &[],
    )
    .unwrap();
    assert_eq!(
        leased_subnet(&must_env(&owner, 20 * SECOND)),
        "10.53.7.0/24"
    );
    assert!(
        owner.log_text().contains("reservation"),
        "{}",
        owner.log_text()
    );
    assert_eq!(
        etcd.lease_of(&reserved_key),
        0,
        "a reservation must stay without TTL"
    );
    let value = etcd.get(&reserved_key).unwrap();
    assert!(value.contains("\"PublicIP\":\"127.0.3.7\""), "{value}");
    drop(others);
}

fn after_ttl_expiry_a_restart_takes_the_subnet_from_subnet_env() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("expiry").unwrap();
    let prefix = "/expiry";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.54.0.0/16", ""),
    );
    let a = with(
        args(&etcd, prefix, tmp.path(), "a", "127.0.4.1"),
        &["--subnet-lease-ttl=3s"],
    );
    let mut agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    let subnet = leased_subnet(&must_env(&agent, 20 * SECOND));
    let key = key_of(prefix, &subnet);
    agent.kill();
    let deadline = Instant::now() + 20 * SECOND;
    while etcd.get(&key).is_some() {
        assert!(Instant::now() < deadline, "the lease never expired");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nothing in etcd points at the old subnet now; only subnet.env remembers it. One chance
    // in 255 that a random pick would find it too.
    let agent = Agent::spawn(tmp.path(), "a2", &a, &[]).unwrap();
    let _ = std::fs::remove_file(tmp.path().join("unused"));
    assert!(
        agent.wait_log("acquired subnet", 20 * SECOND),
        "{}",
        agent.log_text()
    );
    assert_eq!(leased_subnet(&must_env(&agent, 20 * SECOND)), subnet);
    // The short TTL is renewed, not left to lapse: a renewal grants a new etcd lease and moves
    // the key onto it. Seen twice, and the key never missing in between.
    let mut lease = etcd.lease_of(&key);
    for renewal in 1..=2 {
        let deadline = Instant::now() + 20 * SECOND;
        loop {
            let now = etcd.lease_of(&key);
            assert!(
                etcd.get(&key).is_some(),
                "the lease lapsed before renewal {renewal}: {}",
                agent.log_text()
            );
            if now != 0 && now != lease {
                lease = now;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "renewal {renewal} never came: {}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn an_etcd_outage_is_survived_without_restart_and_changes_made_meanwhile_are_seen() {
    let mut etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("outage").unwrap();
    let prefix = "/outage";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.55.0.0/16", ""),
    );
    let ttl = ["--subnet-lease-ttl=30s"];
    let (metrics, addr) = metrics_flags();
    let mut a = Agent::spawn(
        tmp.path(),
        "a",
        &with(
            with(args(&etcd, prefix, tmp.path(), "a", "127.0.5.1"), &ttl),
            &metrics.iter().map(String::as_str).collect::<Vec<_>>(),
        ),
        &[],
    )
    .unwrap();
    let subnet_a = leased_subnet(&must_env(&a, 20 * SECOND));
    let mut b = Agent::spawn(
        tmp.path(),
        "b",
        &with(args(&etcd, prefix, tmp.path(), "b", "127.0.5.2"), &ttl),
        &[],
    )
    .unwrap();
    let subnet_b = leased_subnet(&must_env(&b, 20 * SECOND));
    assert!(
        a.wait_log(&format!("peer added: {subnet_b}"), 10 * SECOND),
        "{}",
        a.log_text()
    );

    etcd.stop();
    b.kill(); // B dies during the outage; its lease must disappear from A's view.
    // A notices the outage and keeps trying to reconnect: its metrics say both.
    wait_metric_at_least(&a, addr, "overlay_etcd_reconnects_total", 1.0);
    assert_eq!(
        overlay_tests::cluster::metric(addr, "overlay_etcd_up").unwrap(),
        0.0
    );
    let unanswered =
        overlay_tests::cluster::metric(addr, "overlay_etcd_unanswered_attempts_total").unwrap();
    wait_metric_at_least(
        &a,
        addr,
        "overlay_etcd_unanswered_attempts_total",
        unanswered + 3.0,
    );
    assert!(
        a.try_wait().is_none(),
        "A must survive the outage:\n{}",
        a.log_text()
    );
    etcd.restart().unwrap();
    // Changes made before A is back: B's lease goes, a new host C appears.
    etcd.del(&key_of(prefix, &subnet_b));
    etcd.put(
        &format!("{prefix}/subnets/10.55.200.0-24"),
        r#"{"PublicIP":"127.0.5.3","PublicIPv6":null,"BackendType":"alloc","BackendData":null}"#,
    );
    assert!(
        a.wait_log("etcd is back after", 30 * SECOND),
        "A must reconnect:\n{}",
        a.log_text()
    );
    assert!(
        a.wait_log(&format!("peer removed: {subnet_b}"), 10 * SECOND),
        "{}",
        a.log_text()
    );
    assert!(
        a.wait_log("peer added: 10.55.200.0/24 at 127.0.5.3", 10 * SECOND),
        "{}",
        a.log_text()
    );
    let value = etcd
        .get(&key_of(prefix, &subnet_a))
        .expect("A's lease must be there");
    assert!(value.contains("127.0.5.1"), "{value}");
    assert_eq!(
        leased_subnet(&std::fs::read_to_string(subnet_file(tmp.path(), "a")).unwrap()),
        subnet_a
    );
    // And the watch works again afterwards.
    etcd.del(&format!("{prefix}/subnets/10.55.200.0-24"));
    assert!(
        a.wait_log("peer removed: 10.55.200.0/24", 10 * SECOND),
        "{}",
        a.log_text()
    );
    assert!(a.try_wait().is_none());
}

fn peer_changes_reach_a_watching_agent() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("peers").unwrap();
    let prefix = "/peers";
    // The agent's own subnet stays below the fake peers' 10.56.101-120, which it would otherwise
    // pick at random now and then and then lose to them.
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config(
            "10.56.0.0/16",
            r#","SubnetMin":"10.56.1.0","SubnetMax":"10.56.50.0""#,
        ),
    );
    let a = Agent::spawn(
        tmp.path(),
        "a",
        &args(&etcd, prefix, tmp.path(), "a", "127.0.6.1"),
        &[],
    )
    .unwrap();
    must_env(&a, 20 * SECOND);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt
        .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
        .unwrap();
    for i in 1..=20u32 {
        let key = format!("{prefix}/subnets/10.56.{}.0-24", 100 + i);
        let value = format!(
            r#"{{"PublicIP":"127.0.6.{}","PublicIPv6":null,"BackendType":"alloc","BackendData":null}}"#,
            10 + i
        );
        rt.block_on(client.put(key.as_str(), value, None)).unwrap();
        let line = format!("peer added: 10.56.{}.0/24 at 127.0.6.{}", 100 + i, 10 + i);
        assert!(a.wait_log(&line, 10 * SECOND), "{}", a.log_text());
        rt.block_on(client.delete(key.as_str(), None)).unwrap();
        assert!(
            a.wait_log(
                &format!("peer removed: 10.56.{}.0/24", 100 + i),
                10 * SECOND
            ),
            "{}",
            a.log_text()
        );
    }
    // In the order etcd saw them: each peer added, then removed, before the next one is added.
    // (The agent tells its peer changes only in its log; `overlay-agent status` will show them.)
    let log = a.log_text();
    let mut at = 0;
    for i in 1..=20u32 {
        for line in [
            format!("peer added: 10.56.{}.0/24 at 127.0.6.{}", 100 + i, 10 + i),
            format!("peer removed: 10.56.{}.0/24", 100 + i),
        ] {
            let found = log[at..]
                .find(&line)
                .unwrap_or_else(|| panic!("{line:?} missing or out of order:\n{log}"));
            at += found + line.len();
        }
    }
}

fn tls_with_client_certificates() {
    let etcd = Etcd::start_with(&EtcdOptions { tls: true }).unwrap();
    let tls = etcd.tls().unwrap().clone();
    let tmp = TempDir::new("tls").unwrap();
    let prefix = "/tls";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.57.0.0/16", ""),
    );
    let a = with(
        args(&etcd, prefix, tmp.path(), "a", "127.0.7.1"),
        &[
            &format!("--etcd-cafile={}", tls.ca.display()),
            &format!("--etcd-certfile={}", tls.client_cert.display()),
            &format!("--etcd-keyfile={}", tls.client_key.display()),
        ],
    );
    let agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    let subnet = leased_subnet(&must_env(&agent, 20 * SECOND));
    assert!(
        etcd.get(&key_of(prefix, &subnet))
            .unwrap()
            .contains("127.0.7.1")
    );

    // Without a client certificate etcd refuses the agent; it keeps retrying, saying so.
    let (metrics, addr) = metrics_flags();
    let b = with(
        with(
            args(&etcd, prefix, tmp.path(), "b", "127.0.7.2"),
            &[&format!("--etcd-cafile={}", tls.ca.display())],
        ),
        &metrics.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut refused = Agent::spawn(tmp.path(), "b", &b, &[]).unwrap();
    wait_metric_at_least(
        &refused,
        addr,
        "overlay_etcd_unanswered_attempts_total",
        2.0,
    );
    assert!(
        refused
            .log_text()
            .contains(&format!("etcd member {} unreachable", etcd.endpoint())),
        "{}",
        refused.log_text()
    );
    assert!(refused.try_wait().is_none());
    assert!(!subnet_file(tmp.path(), "b").exists());
}

fn username_and_password_authentication() {
    let mut etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("auth").unwrap();
    let prefix = "/auth";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.58.0.0/16", ""),
    );
    etcd.enable_auth("flannel", "s3cret", &format!("{prefix}/"))
        .unwrap();
    let a = with(
        args(&etcd, prefix, tmp.path(), "a", "127.0.8.1"),
        &["--etcd-username=flannel"],
    );
    // The password comes from the environment, as /etc/default/flannel would give it.
    let agent = Agent::spawn(tmp.path(), "a", &a, &[("FLANNELD_ETCD_PASSWORD", "s3cret")]).unwrap();
    let subnet = leased_subnet(&must_env(&agent, 20 * SECOND));
    let key = key_of(prefix, &subnet);
    assert!(etcd.get(&key).unwrap().contains("127.0.8.1"));
    // Renewal and re-acquisition work under auth too.
    etcd.del(&key);
    assert!(
        agent.wait_log("re-acquired subnet", 10 * SECOND),
        "{}",
        agent.log_text()
    );

    let (metrics, addr) = metrics_flags();
    let b = with(
        with(
            args(&etcd, prefix, tmp.path(), "b", "127.0.8.2"),
            &["--etcd-username=flannel", "--etcd-password=wrong"],
        ),
        &metrics.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let refused = Agent::spawn(tmp.path(), "b", &b, &[]).unwrap();
    wait_metric_at_least(
        &refused,
        addr,
        "overlay_etcd_unanswered_attempts_total",
        2.0,
    );
    assert!(
        refused.log_text().contains("authentication failed"),
        "{}",
        refused.log_text()
    );
    assert!(!subnet_file(tmp.path(), "b").exists());
}

/// Puts the real `/run/flannel/subnet.env` back as it was, whatever the test did.
struct RestoreFile {
    path: PathBuf,
    saved: Option<Vec<u8>>,
    dir_existed: bool,
}

impl Drop for RestoreFile {
    fn drop(&mut self) {
        match &self.saved {
            Some(content) => {
                let _ = std::fs::write(&self.path, content);
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
                if !self.dir_existed {
                    let _ = std::fs::remove_dir(self.path.parent().unwrap());
                }
            }
        }
    }
}

fn the_articles_command_line_starts_the_agent() {
    // The article's unit writes /run/flannel/subnet.env: that needs root, and the file is put
    // back as it was afterwards. The agent runs on a simulated host (its own network namespace,
    // with eth0 as the default route's interface), where the real datapath lays out flannel0.
    let tmp = TempDir::new("article").unwrap();
    let mut cluster = overlay_tests::cluster::Cluster::new(
        &overlay_tests::lab::LabConfig {
            prefix: "ovt-ar".into(),
            hosts: 1,
            underlay_mtu: 1500,
        },
        // The article's config, verbatim: no Backend, so udp.
        r#"{"Network": "172.16.0.0/12"}"#,
        overlay_tests::etcd::agent_binary(),
        tmp.path(),
    )
    .unwrap();
    let path = PathBuf::from("/run/flannel/subnet.env");
    let _restore = RestoreFile {
        saved: std::fs::read(&path).ok(),
        dir_existed: path.parent().unwrap().exists(),
        path: path.clone(),
    };
    let _ = std::fs::remove_file(&path);
    let cmdline = format!(
        "--etcd-endpoints={} --etcd-prefix=/flannel --logtostderr=true \
         --subnet-dir=/run/flannel/networks --subnet-file=/run/flannel/subnet.env",
        cluster.etcd.endpoint()
    );
    let argv: Vec<String> = cmdline.split_whitespace().map(String::from).collect();
    cluster.start_agent(0, argv).unwrap();
    let parsed = cluster.wait_subnet_env(0, 20 * SECOND).unwrap();
    let env = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(lines[0], "FLANNEL_NETWORK=172.16.0.0/12");
    assert!(
        lines[1].starts_with("FLANNEL_SUBNET=172.") && lines[1].ends_with(".1/24"),
        "{env}"
    );
    assert_eq!(lines[2], "FLANNEL_MTU=1472", "udp: underlay MTU 1500 - 28");
    assert_eq!(lines[3], "FLANNEL_IPMASQ=false");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }
    let (net, len) = parsed.subnet();
    let value = cluster
        .etcd
        .etcdctl(&[
            "get",
            "--print-value-only",
            &format!("/flannel/subnets/{net}-{len}"),
        ])
        .unwrap();
    // What flanneld's udp backend writes (no BackendType), and the one BackendData key its udp
    // backend ignores: this host decapsulates in the kernel (the eBPF datapath, which `auto`
    // picks here), so its peers need not finish what they send it.
    let public_ip = &cluster.lab.hosts[0].underlay_ip;
    assert_eq!(
        value.trim_end(),
        format!(
            r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendData":{{"KernelDecap":true}}}}"#
        )
    );
    // As in the article: flannel0 holds the lease's network address with the Network's length.
    let flannel0 = cluster.lab.hosts[0]
        .ns
        .ip(&["-4", "-o", "addr", "show", "dev", "flannel0"])
        .unwrap();
    let flannel0 = String::from_utf8_lossy(&flannel0.stdout).into_owned();
    assert!(flannel0.contains(&format!("inet {net}/12")), "{flannel0}");
    // The agent pins nothing where the test could see it here (no --bpffs: its own mount in
    // `ip netns exec`'s mount namespace), so only its log says which datapath it chose.
    let log = cluster.agents[0].log_text();
    assert!(log.contains("eBPF datapath up"), "{log}");
    let mut agent = cluster.agents[0].process.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGINT) };
    let status = agent.stop(10 * SECOND);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGINT exits 0");
}

fn flanneld_environment_variables_configure_the_agent() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("env").unwrap();
    etcd.put("/envnet/config", &alloc_config("10.59.0.0/16", ""));
    let file = tmp.path().join("env/subnet.env");
    let file_s = file.display().to_string();
    let endpoint = etcd.endpoint();
    let env = [
        ("FLANNELD_ETCD_ENDPOINTS", endpoint.as_str()),
        ("FLANNELD_ETCD_PREFIX", "/envnet"),
        ("FLANNELD_SUBNET_FILE", file_s.as_str()),
        ("FLANNELD_PUBLIC_IP", "127.0.9.1"),
        ("FLANNELD_IP_MASQ", "true"),
        ("FLANNELD_SUBNET_LEASE_TTL", "45s"),
        ("FLANNELD_IFACE", "lo"),
    ];
    let mut agent = Agent::spawn(tmp.path(), "env", &[], &env).unwrap();
    agent.subnet_file = Some(file.clone());
    let text = must_env(&agent, 20 * SECOND);
    assert!(text.contains("FLANNEL_IPMASQ=true"), "{text}");
    // alloc: the underlay MTU itself, here lo's (from FLANNELD_IFACE).
    let lo_mtu = std::fs::read_to_string("/sys/class/net/lo/mtu").unwrap();
    assert!(
        text.contains(&format!("FLANNEL_MTU={}", lo_mtu.trim())),
        "{text}"
    );
    let key = key_of("/envnet", &leased_subnet(&text));
    assert!(etcd.get(&key).unwrap().contains("127.0.9.1"));
    let ttl = etcd.etcdctl(&["lease", "timetolive", &format!("{:x}", etcd.lease_of(&key))]);
    let granted: u32 = ttl
        .split("granted with TTL(")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{ttl}"));
    assert_eq!(granted, 45);
}

fn healthz_is_503_until_ready_then_flanneld_body() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("healthz").unwrap();
    let port = free_port();
    let a = with(
        args(&etcd, "/hz", tmp.path(), "a", "127.0.10.5"),
        &[&format!("--healthz-port={port}"), "--healthz-ip=127.0.0.1"],
    );
    let agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    assert!(
        agent.wait_log(
            "waiting for the network config at etcd key /hz/config",
            10 * SECOND
        ),
        "{}",
        agent.log_text()
    );
    // Waiting for the network config: no lease, so not healthy, and the body says why.
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (code, body) = overlay_tests::cluster::healthz(addr).unwrap();
    assert_eq!(
        (code, body.as_str()),
        (503, "waiting for etcd and the network config\n")
    );
    // Once the lease is held (alloc: nothing to forward), flanneld's body, byte for byte.
    etcd.put("/hz/config", &alloc_config("10.62.0.0/16", ""));
    must_env(&agent, 20 * SECOND);
    let (code, body) = overlay_tests::cluster::healthz(addr).unwrap();
    assert_eq!((code, body.as_str()), (200, "flanneld is running"));
}

fn kubernetes_flags_are_refused_by_name_with_status_2() {
    for (arg, env) in [
        (Some("--kube-subnet-mgr"), None),
        (None, Some(("FLANNELD_KUBECONFIG_FILE", "/etc/kubeconfig"))),
    ] {
        let mut cmd = std::process::Command::new(overlay_tests::etcd::agent_binary());
        cmd.args(arg);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        let flag = arg.unwrap_or("--kubeconfig-file");
        assert!(
            stderr.contains(&format!(
                "{flag} is a flanneld flag overlay-agent cannot honour"
            )),
            "{stderr}"
        );
    }
}

fn missing_config_is_awaited_and_invalid_config_is_one_clear_error() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("config").unwrap();
    let healthz = free_port();
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(20 * SECOND)).unwrap();
    let a = with(
        args(&etcd, "/cfg", tmp.path(), "a", "127.0.10.1"),
        &[
            &format!("--healthz-port={healthz}"),
            "--healthz-ip=127.0.0.1",
            "--healthz-strict",
        ],
    );
    let sock_s = sock_path.display().to_string();
    let agent = Agent::spawn(tmp.path(), "a", &a, &[("NOTIFY_SOCKET", sock_s.as_str())]).unwrap();
    // That etcd answered and the key is missing only the log tells (healthz says "waiting" from
    // the start; `overlay-agent status` will tell more).
    assert!(
        agent.wait_log(
            "waiting for the network config at etcd key /cfg/config",
            10 * SECOND
        ),
        "{}",
        agent.log_text()
    );
    // Not ready, as /healthz says.
    let healthz = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, healthz));
    let (code, body) = overlay_tests::cluster::healthz(healthz).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting"), "{body}");
    etcd.put("/cfg/config", &alloc_config("10.61.0.0/16", ""));
    must_env(&agent, 20 * SECOND);
    // systemd hears why it is not ready (STATUS=, which `systemctl status` shows), then READY=1
    // and what forwards.
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    let seen = |messages: &[String]| {
        messages.iter().any(|m| m == "READY=1")
            && messages
                .iter()
                .any(|m| m.starts_with("STATUS=subnet 10.61."))
    };
    while !seen(&messages) {
        let n = sock
            .recv(&mut buf)
            .expect("READY=1 and STATUS= on NOTIFY_SOCKET");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(
        messages.first().map(String::as_str),
        Some("STATUS=unhealthy: waiting for etcd and the network config"),
        "{messages:#?}"
    );
    let (code, body) = overlay_tests::cluster::healthz(healthz).unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    for (config, field) in [
        (
            r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
            "field SubnetLen",
        ),
        (r#"{"Network":"10.0.0.0/29"}"#, "field Network"),
        (
            r#"{"Network":"10.0.0.0/16","Backend":{"Type":"bogus"}}"#,
            "field Backend.Type",
        ),
        (
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.9.0.0"}"#,
            "field SubnetMin",
        ),
        (r#"{"Network": "#, "not valid JSON"),
    ] {
        etcd.put("/bad/config", config);
        let mut bad = Agent::spawn(
            tmp.path(),
            "bad",
            &args(&etcd, "/bad", tmp.path(), "bad", "127.0.10.2"),
            &[],
        )
        .unwrap();
        let status = bad
            .wait_exit(10 * SECOND)
            .expect("an invalid config must stop the agent");
        assert_eq!(status.code(), Some(1));
        let log = bad.log_text();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "{log}");
        assert!(
            errors[0].contains("invalid network config at /bad/config")
                && errors[0].contains(field),
            "{}",
            errors[0]
        );
    }
}

fn an_agent_started_before_etcd_retries_until_etcd_is_up() {
    let mut etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("late").unwrap();
    let prefix = "/late";
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.62.0.0/16", ""),
    );
    etcd.stop();
    let (metrics, addr) = metrics_flags();
    let a = with(
        args(&etcd, prefix, tmp.path(), "a", "127.0.11.1"),
        &metrics.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut agent = Agent::spawn(tmp.path(), "a", &a, &[]).unwrap();
    // It keeps trying, and says so once, not once per attempt.
    wait_metric_at_least(&agent, addr, "overlay_etcd_unanswered_attempts_total", 3.0);
    assert_eq!(
        agent.log_text().matches("unreachable").count(),
        1,
        "{}",
        agent.log_text()
    );
    assert!(agent.try_wait().is_none());
    etcd.restart().unwrap();
    let env = must_env(&agent, 30 * SECOND);
    assert!(env.contains("FLANNEL_NETWORK=10.62.0.0/16"), "{env}");
}

/// Hostile and broken leases and config in etcd: each refused lease gets one log line and one
/// count, the agent keeps running, the good leases around them stay peers, and a config changed
/// while running is reported once and does not move the agent.
fn hostile_data_in_etcd_is_refused_once_each_and_survived() {
    let etcd = Etcd::start().unwrap();
    let tmp = TempDir::new("hostile").unwrap();
    let prefix = "/hostile";
    let config = alloc_config(
        "10.57.0.0/16",
        r#","SubnetMin":"10.57.1.0","SubnetMax":"10.57.50.0""#,
    );
    etcd.put(&format!("{prefix}/config"), &config);
    let port = free_port();
    let me = "198.18.77.1";
    let mut a = Agent::spawn(
        tmp.path(),
        "a",
        &with(
            args(&etcd, prefix, tmp.path(), "a", me),
            &[&format!("--healthz-port={port}"), "--healthz-ip=127.0.0.1"],
        ),
        &[],
    )
    .unwrap();
    let env = must_env(&a, 20 * SECOND);
    let own = leased_subnet(&env);
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let metric = |name: &str| overlay_tests::cluster::metric(addr, name).unwrap() as u64;
    let wait_metric = |name: &str, want: u64| {
        let deadline = Instant::now() + 20 * SECOND;
        while metric(name) != want {
            assert!(Instant::now() < deadline, "{name} never reached {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let lease = |ip: &str| format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null}}"#);
    let key = |s: &str| key_of(prefix, s);

    // Good leases: a plain one, one with fields flanneld does not know (Go ignores them, so
    // do we), and a second subnet of the first host (both routed there, as flanneld does).
    etcd.put(&key("10.57.100.0/24"), &lease("198.18.77.2"));
    etcd.put(
        &key("10.57.103.0/24"),
        r#"{"PublicIP":"198.18.77.4","PublicIPv6":null,"Future":{"x":[1,2]},"Extra":7}"#,
    );
    etcd.put(&key("10.57.109.0/24"), &lease("198.18.77.2"));
    wait_metric("overlay_peers", 3);
    assert_eq!(metric("overlay_leases_sharing_public_ip_total"), 1);

    // A 1 MiB value: through the client library, too long for a command line.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt
        .block_on(etcd_client::Client::connect([etcd.endpoint()], None))
        .unwrap();
    let huge = format!(
        r#"{{"PublicIP":"198.18.77.3","Pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    rt.block_on(client.put(key("10.57.102.0/24"), huge, None))
        .unwrap();
    let own_half = own.replace("/24", "/25");
    let hostile: Vec<(String, String)> = vec![
        (key("10.57.101.0/24"), "{not json".into()),
        (key("10.57.104.0/24"), lease(me)),
        (key("10.57.105.0/24"), lease("0.0.0.0")),
        (key("10.57.106.0/24"), lease("127.0.0.1")),
        (key("10.57.107.0/24"), lease("224.0.0.1")),
        (key("10.57.108.0/24"), lease("255.255.255.255")),
        (key("10.99.0.0/24"), lease("198.18.77.5")),
        (key(&own_half), lease("198.18.77.6")),
        (key("10.57.100.0/23"), lease("198.18.77.7")),
        (
            key("10.57.110.0/24"),
            r#"{"PublicIP":"198.18.77.8","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}}"#
                .into(),
        ),
    ];
    for (k, v) in &hostile {
        etcd.put(k, v);
    }
    let refused = hostile.len() as u64 + 1;
    wait_metric("overlay_leases_refused_total", refused);

    // The Network changed under the running agent: one ERROR line, the agent keeps its config
    // and subnet, and a lease of the new Network is refused as outside the running one.
    etcd.put(
        &format!("{prefix}/config"),
        &alloc_config("10.58.0.0/16", ""),
    );
    assert!(
        a.wait_log(
            "now says Network 10.58.0.0/16 (running: 10.57.0.0/16)",
            10 * SECOND
        ),
        "{}",
        a.log_text()
    );
    etcd.put(&key("10.58.1.0/24"), &lease("198.18.77.9"));
    wait_metric("overlay_leases_refused_total", refused + 1);
    etcd.put(&format!("{prefix}/config"), &config);
    assert!(
        a.wait_log("matches the running one again", 10 * SECOND),
        "{}",
        a.log_text()
    );
    // A renewal's Put of a refused lease is not a new refusal.
    etcd.put(&key("10.57.105.0/24"), &lease("0.0.0.0"));
    etcd.put(&key("10.57.111.0/24"), &lease("198.18.77.10"));
    wait_metric("overlay_peers", 4);
    assert_eq!(metric("overlay_leases_refused_total"), refused + 1);

    assert!(
        a.try_wait().is_none(),
        "the agent exited:\n{}",
        a.log_text()
    );
    assert_eq!(must_env(&a, SECOND), env, "subnet.env changed");
    let log = a.log_text();
    assert_eq!(
        log.matches("ignoring the lease of").count() as u64,
        refused + 1,
        "one line per refusal:\n{log}"
    );
    assert_eq!(log.matches("now says Network").count(), 1, "{log}");
    for needle in [
        "not a lease",
        "a value of 1048",
        "this host's own address",
        "unspecified",
        "a loopback address",
        "a multicast address",
        "the broadcast address",
        "outside the Network",
        "overlaps this host's",
        "overlaps the older lease of 10.57.100.0/24",
        "is not a unicast MAC",
    ] {
        assert!(log.contains(needle), "no {needle:?} in:\n{log}");
    }
}

overlay_tests::test_main!(
    plain hostile_data_in_etcd_is_refused_once_each_and_survived,
    plain fifty_agents_get_distinct_subnets_and_the_51st_is_refused,
    plain restart_keeps_the_subnet_and_sigterm_keeps_the_lease,
    plain a_deleted_lease_is_taken_back_while_running,
    plain a_reservation_is_used_by_its_public_ip_and_by_no_one_else,
    plain after_ttl_expiry_a_restart_takes_the_subnet_from_subnet_env,
    plain an_etcd_outage_is_survived_without_restart_and_changes_made_meanwhile_are_seen,
    plain peer_changes_reach_a_watching_agent,
    plain tls_with_client_certificates,
    plain username_and_password_authentication,
    root the_articles_command_line_starts_the_agent,
    plain flanneld_environment_variables_configure_the_agent,
    plain missing_config_is_awaited_and_invalid_config_is_one_clear_error,
    plain healthz_is_503_until_ready_then_flanneld_body,
    plain kubernetes_flags_are_refused_by_name_with_status_2,
    plain an_agent_started_before_etcd_retries_until_etcd_is_up,
);
