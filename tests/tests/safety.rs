//! A start-up that cannot succeed leaves nothing behind, and a stop says what it leaves.
//!
//! - Pre-flight: each setting that cannot work (a read-only subnet file directory, a subnet file
//!   path that is a directory, a pin directory not on bpffs, the loopback interface or a loopback
//!   public IP, a health port in use) stops the agent before it takes a lease or touches the
//!   kernel: exit 1, one line naming the setting, and no device, pin, rule or lease key.
//! - Undo: a failure after the first side effect (the overlay device's name held by another
//!   device; subnet.env that cannot be replaced, the last step before READY) removes what the run
//!   made: devices, pins, iptables chains, the blackhole route, and the lease it created.
//! - A backend change removes the other backend's device (and udp's finishing device).
//! - SIGTERM says what stays: the dataplane and the lease with its expiry, or that no lease was
//!   held.
//! - etcd endpoints that cannot be dialled as written are refused at start; a transport error is
//!   one short reason at warn level, the whole chain only at debug level.

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{Cluster, PREFIX},
    etcd::{Agent, Etcd, EtcdOptions, TempDir, free_port},
    netns::NetNs,
};

/// Devices a run of the agent makes.
const DEVICES: [&str; 4] = ["flannel0", "flannel.1", "flannel-csum", "flannel-handovr"];

fn cluster(tag: &str, backend: &str) -> (TempDir, Cluster) {
    let tmp = TempDir::new(&format!("safety-{tag}")).unwrap();
    let c = Cluster::with_backend("sf", 1, backend, tmp.path()).unwrap();
    (tmp, c)
}

/// h1's command line with `overrides` replacing the flags of the same name.
fn args(c: &Cluster, overrides: &[&str]) -> Vec<String> {
    let name = |a: &str| a.split('=').next().unwrap_or(a).to_owned();
    let mut args: Vec<String> = c
        .agent_args(0, &[])
        .into_iter()
        .filter(|a| !overrides.iter().any(|o| name(o) == name(a)))
        .collect();
    args.extend(overrides.iter().map(|s| s.to_string()));
    args
}

/// Waits for h1's agent to exit (it must, within `within`).
fn wait_exit(c: &mut Cluster, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        let agent = &mut c.agents[0];
        if let Some(status) = agent.process.as_mut().and_then(|p| p.try_wait()) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts h1's agent with `overrides`, expects it to fail with exit status 1, returns its log.
fn start_failing(c: &mut Cluster, overrides: &[&str]) -> String {
    let a = args(c, overrides);
    c.start_agent(0, a).unwrap();
    let status = wait_exit(c, Duration::from_secs(60));
    let log = c.agents[0].log_text();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    log
}

fn h1(c: &Cluster) -> &NetNs {
    &c.lab.hosts[0].ns
}

fn pins(c: &Cluster) -> PathBuf {
    c.bpffs.path().join("h1")
}

fn lease_keys(c: &Cluster) -> String {
    c.etcd
        .ctl()
        .run(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/subnets/"),
        ])
        .unwrap()
}

/// No device (but those in `except`), pin, iptables chain, blackhole route or lease of h1.
fn assert_nothing_left(c: &Cluster, except: &[&str], log: &str) {
    for dev in DEVICES.iter().filter(|d| !except.contains(d)) {
        assert!(
            h1(c).ip(&["link", "show", dev]).is_err(),
            "{dev} left; log:\n{log}"
        );
    }
    assert!(
        !pins(c).exists(),
        "pins left under {}; log:\n{log}",
        pins(c).display()
    );
    let rules = h1(c).iptables_rules();
    assert!(
        !rules.contains("FLANNEL-"),
        "rules left: {rules}\nlog:\n{log}"
    );
    let blackholes = h1(c)
        .ip(&["-4", "route", "show", "type", "blackhole"])
        .unwrap();
    assert!(
        blackholes.stdout.is_empty(),
        "blackhole route left; log:\n{log}"
    );
    assert_eq!(lease_keys(c).trim(), "", "lease left; log:\n{log}");
}

/// Refused before anything: the log never gets to the lease.
fn assert_refused_early(log: &str, needle: &str) {
    assert!(log.contains(needle), "no {needle:?} in the log:\n{log}");
    assert!(!log.contains("acquired subnet"), "took a lease:\n{log}");
}

/// A read-only tmpfs, unmounted on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        overlay_tests::netns::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "ro,size=1m",
                "sf-ro",
                &dir.to_string_lossy(),
            ],
        )
        .unwrap();
        Self(dir.to_owned())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = overlay_tests::netns::run("umount", &[&self.0.to_string_lossy()]);
    }
}

fn preflight_read_only_subnet_file() {
    let (tmp, mut c) = cluster("ro", "udp");
    let ro = ReadOnly::mount(&tmp.path().join("ro"));
    let file = format!("--subnet-file={}", ro.0.join("subnet.env").display());
    let log = start_failing(&mut c, &[&file, "--datapath=ebpf", "--ip-masq"]);
    assert_refused_early(&log, "--subnet-file");
    assert!(log.contains("Read-only file system"), "{log}");
    assert_nothing_left(&c, &[], &log);
}

fn preflight_subnet_file_is_a_directory() {
    let (tmp, mut c) = cluster("dir", "udp");
    let dir = tmp.path().join("subnet.env");
    std::fs::create_dir_all(&dir).unwrap();
    let file = format!("--subnet-file={}", dir.display());
    let log = start_failing(&mut c, &[&file]);
    assert_refused_early(&log, "is a directory");
    assert_nothing_left(&c, &[], &log);
}

fn preflight_bpffs_not_a_bpf_filesystem() {
    let (tmp, mut c) = cluster("bpffs", "vxlan");
    let dir = tmp.path().join("not-bpffs/pins");
    let bpffs = format!("--bpffs={}", dir.display());
    let log = start_failing(&mut c, &[&bpffs, "--datapath=ebpf"]);
    assert_refused_early(&log, "not on a bpf filesystem");
    assert!(!dir.exists(), "{} created", dir.display());
    assert_nothing_left(&c, &[], &log);
}

fn preflight_loopback_interface() {
    let (_tmp, mut c) = cluster("lo", "udp");
    h1(&c).ip(&["link", "set", "lo", "up"]).unwrap();
    let log = start_failing(&mut c, &["--iface=lo"]);
    assert_refused_early(&log, "underlay interface lo is a loopback interface");
    assert_nothing_left(&c, &[], &log);
}

fn preflight_loopback_public_ip() {
    let (_tmp, mut c) = cluster("pubip", "vxlan");
    let log = start_failing(&mut c, &["--public-ip=127.0.0.1"]);
    assert_refused_early(&log, "public IP 127.0.0.1 is a loopback address");
    assert_nothing_left(&c, &[], &log);
}

fn preflight_healthz_port_in_use() {
    let (_tmp, mut c) = cluster("healthz", "udp");
    let port = overlay_tests::etcd::free_port();
    // A socket belongs to the namespace it was made in, whichever thread holds it later.
    let _taken = h1(&c)
        .run(|| std::net::TcpListener::bind(("0.0.0.0", port)).unwrap())
        .unwrap();
    let flag = format!("--healthz-port={port}");
    let log = start_failing(&mut c, &[&flag, "--datapath=ebpf"]);
    assert_refused_early(&log, &format!("--healthz-ip/--healthz-port 0.0.0.0:{port}"));
    assert_nothing_left(&c, &[], &log);
}

/// The TUN datapath's UDP port held by another program: refused before the lease.
fn preflight_data_port_in_use() {
    let (_tmp, mut c) = cluster("dataport", "udp");
    let _taken = h1(&c)
        .run(|| std::net::UdpSocket::bind(("0.0.0.0", 8285)).unwrap())
        .unwrap();
    let log = start_failing(&mut c, &["--datapath=tun"]);
    assert_refused_early(&log, "UDP port 8285 (udp) is in use on this host");
    assert_nothing_left(&c, &[], &log);
}

fn undo_when_the_device_cannot_be_made() {
    let (_tmp, mut c) = cluster("undo-dev", "vxlan");
    // Not the agent's kind of device, nor flanneld's: the datapath refuses to take the name,
    // after the lease was taken and the programs pinned.
    h1(&c)
        .ip(&["link", "add", "flannel.1", "type", "bridge"])
        .unwrap();
    let log = start_failing(&mut c, &["--datapath=ebpf"]);
    assert!(log.contains("acquired subnet"), "failed too early:\n{log}");
    assert!(log.contains("undid what this run did"), "{log}");
    assert!(log.contains("released the lease"), "{log}");
    assert_nothing_left(&c, &["flannel.1"], &log);
    assert!(
        h1(&c).ip(&["link", "show", "flannel.1"]).is_ok(),
        "the bridge that was there went"
    );
}

/// `chattr -i` on drop, so the directory can go.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = overlay_tests::netns::run("chattr", &["-i", &self.0.to_string_lossy()]);
    }
}

fn undo_when_subnet_env_cannot_be_written() {
    let (tmp, mut c) = cluster("undo-env", "udp");
    // The directory takes new files (the pre-flight passes), but the file cannot be replaced:
    // the last step before READY fails, after everything else was set up.
    let file = tmp.path().join("h1/subnet.env");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, "# kept\n").unwrap();
    overlay_tests::netns::run("chattr", &["+i", &file.to_string_lossy()]).unwrap();
    let _immutable = Immutable(file.clone());
    let flag = format!("--subnet-file={}", file.display());
    let log = start_failing(
        &mut c,
        &[
            &flag,
            "--datapath=ebpf",
            "--ip-masq",
            "--ip-blackhole-route",
        ],
    );
    assert!(log.contains("writing"), "{log}");
    for undone in [
        "removed iptables chain FLANNEL-FWD",
        "removed iptables chain FLANNEL-POSTRTG",
        "removed the blackhole route",
        "removed device flannel0",
        "removed the finishing device",
        "removed the pins",
        "released the lease",
    ] {
        assert!(log.contains(undone), "no {undone:?} in the log:\n{log}");
    }
    assert_nothing_left(&c, &[], &log);
}

fn address_of(ns: &NetNs, dev: &str) -> String {
    let out = ns.ip(&["-4", "-o", "addr", "show", "dev", dev]).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn backend_change(from: &str, old_device: &str, to: &str, new_device: &str) {
    let (_tmp, mut c) = cluster(&format!("{from}-{to}"), from);
    c.start_all(&["--datapath=ebpf"]).unwrap();
    c.agents[0]
        .process
        .take()
        .unwrap()
        .stop(Duration::from_secs(5));
    assert!(
        !address_of(h1(&c), old_device).is_empty(),
        "{old_device} has no address"
    );
    let config = format!(r#"{{"Network": "172.16.0.0/12", "Backend": {{"Type": "{to}"}}}}"#);
    c.etcd
        .ctl()
        .run(&["put", "--", &format!("{PREFIX}/config"), &config])
        .unwrap();
    let _ = std::fs::remove_file(&c.agents[0].subnet_file);
    let a = args(&c, &["--datapath=ebpf"]);
    c.start_agent(0, a).unwrap();
    c.wait_subnet_env(0, Duration::from_secs(30)).unwrap();
    let log = c.agents[0].log_text();
    assert!(h1(&c).ip(&["link", "show", new_device]).is_ok(), "{log}");
    assert!(
        log.contains(&format!("removed {old_device} with its addresses")),
        "{log}"
    );
    assert!(
        h1(&c).ip(&["link", "show", old_device]).is_err(),
        "{old_device} left beside {new_device}; log:\n{log}"
    );
    assert!(
        h1(&c).ip(&["link", "show", "flannel-csum"]).is_ok() == (to == "udp"),
        "the finishing device; log:\n{log}"
    );
    // No link pin of the old layout either (bpffs spells a dot %2e).
    let old_pins: Vec<_> = overlay_tests::bpffs::pinned_links(&pins(&c))
        .into_iter()
        .map(|l| l.path.to_string_lossy().into_owned())
        .filter(|p| {
            p.ends_with(&format!("@{}", old_device.replace('.', "%2e")))
                || (to != "udp" && p.contains("flannel-csum"))
        })
        .collect();
    assert!(old_pins.is_empty(), "{old_pins:?}; log:\n{log}");
    let routes = String::from_utf8_lossy(&h1(&c).ip(&["route"]).unwrap().stdout).into_owned();
    assert!(
        routes.contains(&format!("172.16.0.0/12 dev {new_device}")),
        "the Network is not routed to {new_device}: {routes}"
    );
}

fn backend_change_udp_to_vxlan() {
    backend_change("udp", "flannel0", "vxlan", "flannel.1");
}

fn backend_change_vxlan_to_udp() {
    backend_change("vxlan", "flannel.1", "udp", "flannel0");
}

fn shutdown_says_what_stays() {
    let (_tmp, mut c) = cluster("stop", "vxlan");
    c.start_all(&["--datapath=ebpf"]).unwrap();
    let status = c.agents[0]
        .process
        .take()
        .unwrap()
        .stop(Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()));
    let log = c.agents[0].log_text();
    let line = log
        .lines()
        .find(|l| l.contains("received SIGTERM"))
        .unwrap_or_else(|| panic!("no shutdown line:\n{log}"));
    assert!(
        line.contains("the eBPF dataplane stays attached and pinned") && line.contains("flannel.1"),
        "{line}"
    );
    assert!(
        line.contains("stays in etcd until it expires in") && line.contains("(at 20"),
        "{line}"
    );
}

fn shutdown_before_a_lease_says_so() {
    let (_tmp, mut c) = cluster("stop-early", "udp");
    c.etcd
        .ctl()
        .run(&["del", &format!("{PREFIX}/config")])
        .unwrap();
    let a = args(&c, &["--datapath=ebpf"]);
    c.start_agent(0, a).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.agents[0]
        .log_text()
        .contains("waiting for the network config")
    {
        assert!(Instant::now() < deadline, "{}", c.agents[0].log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    c.agents[0]
        .process
        .take()
        .unwrap()
        .stop(Duration::from_secs(5));
    let log = c.agents[0].log_text();
    assert!(
        log.contains("before the start-up finished")
            && log.contains("no lease held, no dataplane set up"),
        "{log}"
    );
    assert!(!log.contains("the lease stays"), "{log}");
    assert_nothing_left(&c, &[], &log);
}

/// An agent of `args` on this host (no namespace: etcd on loopback, the alloc backend's needs).
fn loopback_agent(tmp: &TempDir, name: &str, extra: &[String], env: &[(&str, &str)]) -> Agent {
    let mut args = vec![
        format!(
            "--subnet-file={}",
            tmp.path().join(name).join("subnet.env").display()
        ),
        "--public-ip=127.0.0.7".to_owned(),
    ];
    args.extend(extra.iter().cloned());
    Agent::spawn(tmp.path(), name, &args, env).unwrap()
}

fn endpoints_that_cannot_be_dialled_are_refused_at_start() {
    let tmp = TempDir::new("safety-endpoints").unwrap();
    for (endpoint, why) in [
        ("ftp://127.0.0.1:2379", "unsupported scheme \"ftp\""),
        ("http://127.0.0.1:99999", "invalid port \"99999\""),
    ] {
        let mut agent = loopback_agent(
            &tmp,
            "bad",
            &[format!("--etcd-endpoints=http://127.0.0.1:2379,{endpoint}")],
            &[],
        );
        let status = agent.wait_exit(Duration::from_secs(10));
        let log = agent.log_text();
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        assert!(log.contains(endpoint) && log.contains(why), "{log}");
    }
}

/// The agent's log once it has said `needle`, killed then.
fn log_once(mut agent: Agent, needle: &str) -> String {
    let said = agent.wait_log(needle, Duration::from_secs(30));
    let log = agent.log_text();
    agent.kill();
    assert!(said, "no {needle:?} in the log:\n{log}");
    log
}

fn transport_errors_are_one_short_line() {
    let tmp = TempDir::new("safety-transport").unwrap();
    let closed = format!("--etcd-endpoints=http://127.0.0.1:{}", free_port());
    let log = log_once(
        loopback_agent(&tmp, "refused", std::slice::from_ref(&closed), &[]),
        "unreachable: connect: connection refused",
    );
    assert!(
        !log.contains("transport error"),
        "the raw chain at info:\n{log}"
    );
    // The whole chain one level down.
    let log = log_once(
        loopback_agent(&tmp, "debug", &[closed], &[("RUST_LOG", "debug")]),
        "tcp connect error",
    );
    assert!(log.contains("connection refused"), "{log}");

    let log = log_once(
        loopback_agent(
            &tmp,
            "dns",
            &["--etcd-endpoints=http://sf-no-such-host.invalid:2379".to_owned()],
            &[],
        ),
        "unreachable: connect: dns: ",
    );
    assert!(!log.contains("transport error"), "{log}");
}

fn tls_without_the_ca_is_named() {
    let tmp = TempDir::new("safety-tls").unwrap();
    let etcd = Etcd::start_with(&EtcdOptions { tls: true }).unwrap();
    let tls = etcd.tls().unwrap();
    let log = log_once(
        loopback_agent(
            &tmp,
            "tls",
            &[
                format!("--etcd-endpoints={}", etcd.endpoint()),
                format!("--etcd-certfile={}", tls.client_cert.display()),
                format!("--etcd-keyfile={}", tls.client_key.display()),
            ],
            &[],
        ),
        "TLS handshake: unknown CA",
    );
    assert!(!log.contains("transport error"), "{log}");
}

overlay_tests::test_main!(
    plain endpoints_that_cannot_be_dialled_are_refused_at_start,
    plain transport_errors_are_one_short_line,
    plain tls_without_the_ca_is_named,
    root preflight_read_only_subnet_file,
    root preflight_subnet_file_is_a_directory,
    root preflight_bpffs_not_a_bpf_filesystem,
    root preflight_loopback_interface,
    root preflight_loopback_public_ip,
    root preflight_healthz_port_in_use,
    root preflight_data_port_in_use,
    root undo_when_the_device_cannot_be_made,
    root undo_when_subnet_env_cannot_be_written,
    root backend_change_udp_to_vxlan,
    root backend_change_vxlan_to_udp,
    root shutdown_says_what_stays,
    root shutdown_before_a_lease_says_so,
);
