//! `overlay-agent teardown` in a lab host: after the agent stops (leaving its device, routes,
//! pinned programs and netfilter rules on purpose), teardown removes them all; a second run is a
//! no-op; a device the agent did not create is reported, not silently handled. While an agent
//! runs, teardown refuses before removing anything (the agent still forwards); `--force` says
//! what it breaks, then removes.

use std::process::Output;

use overlay_tests::{
    bpffs::pinned_links,
    cluster::Cluster,
    etcd::{TempDir, agent_binary},
    lab::LabConfig,
    netns::NetNs,
};

fn teardown(ns: &NetNs, bpffs: &std::path::Path) -> Output {
    teardown_with(ns, bpffs, &[])
}

fn teardown_with(ns: &NetNs, bpffs: &std::path::Path, extra: &[&str]) -> Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(agent_binary())
        .arg("teardown")
        .arg(format!("--bpffs={}", bpffs.display()))
        .args(extra)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn link_exists(id: &str) -> bool {
    overlay_tests::netns::run("bpftool", &["link", "show", "id", id]).is_ok()
}

fn teardown_removes_what_the_agent_left(backend: &str, device: &str) {
    let tmp = TempDir::new(&format!("teardown-{backend}")).unwrap();
    let config = format!(r#"{{"Network": "172.16.0.0/12", "Backend": {{"Type": "{backend}"}}}}"#);
    let mut c = Cluster::new(
        &LabConfig {
            prefix: "ovt-td".into(),
            hosts: 2,
            underlay_mtu: 1500,
        },
        &config,
        agent_binary(),
        tmp.path(),
    )
    .unwrap();
    c.start_all(&["--datapath=ebpf", "--ip-masq", "--ip-blackhole-route"])
        .unwrap();
    assert!(c.ping_matrix().is_empty(), "the lab works before teardown");
    let pins = c.bpffs.path().join("h1");
    let h1 = &c.lab.hosts[0].ns;

    // A device named like ours that the agent did not create (flanneld's own kernel device
    // would be one): reported and left alone.
    h1.ip(&["link", "add", "flannel.77", "type", "bridge"])
        .unwrap();

    // While the agent runs, teardown says so, fails, and removes nothing: h2 still forwards.
    let h2 = &c.lab.hosts[1].ns;
    let h2_pins = c.bpffs.path().join("h2");
    let h2_links = pinned_links(&h2_pins);
    let h2_rules = h2.iptables_rules();
    let busy = teardown(h2, &h2_pins);
    assert!(!busy.status.success(), "{}", text(&busy));
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("still running") && stderr.contains("nothing was removed"),
        "{}",
        text(&busy)
    );
    assert!(
        !String::from_utf8_lossy(&busy.stdout).contains("removed"),
        "{}",
        text(&busy)
    );
    assert!(h2.ip(&["link", "show", device]).is_ok(), "{device} removed");
    assert_eq!(pinned_links(&h2_pins).len(), h2_links.len(), "pins removed");
    assert_eq!(h2.iptables_rules(), h2_rules, "iptables rules changed");
    assert!(
        c.ping_matrix().is_empty(),
        "the refused teardown broke forwarding"
    );

    // --force says what it breaks before it acts, then removes what it can.
    let forced = teardown_with(h2, &h2_pins, &["--force"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        stderr.contains("--force") && stderr.contains("forwarding to every peer stops"),
        "{}",
        text(&forced)
    );
    assert!(
        String::from_utf8_lossy(&forced.stdout).contains(&format!("removed device {device}")),
        "{}",
        text(&forced)
    );
    assert!(h2.ip(&["link", "show", device]).is_err(), "{device} left");

    // Stopped, the agent leaves its dataplane in place on purpose.
    c.agents[0]
        .process
        .take()
        .unwrap()
        .stop(std::time::Duration::from_secs(5));
    assert!(h1.ip(&["link", "show", device]).is_ok());
    // udp: the finishing device (a veth pair) too; vxlan has none.
    let finishing = device == "flannel0";
    assert_eq!(h1.ip(&["link", "show", "flannel-csum"]).is_ok(), finishing);
    let links: Vec<String> = pinned_links(&pins)
        .iter()
        .map(|l| l.link_id.to_string())
        .collect();
    assert!(!links.is_empty(), "no pinned links");
    assert!(links.iter().all(|id| link_exists(id)));
    // What an older agent version installed: its OVERLAY-* chain goes too.
    h1.exec(
        "sh",
        &[
            "-ec",
            "iptables -w -N OVERLAY-FWD; iptables -w -A OVERLAY-FWD -s 172.16.0.0/12 -j ACCEPT; \
             iptables -w -I FORWARD 1 -j OVERLAY-FWD",
        ],
    )
    .unwrap();
    let blackholes = || {
        let out = h1
            .ip(&["-4", "route", "show", "type", "blackhole"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        blackholes().contains("metric 4294967295"),
        "{}",
        blackholes()
    );

    let out = teardown(h1, &pins);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("removed device {device}")),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("left flannel.77 alone"), "{}", text(&out));
    assert!(stdout.contains("removed iptables chains"), "{}", text(&out));
    assert!(
        h1.ip(&["link", "show", device]).is_err(),
        "{device} still there"
    );
    assert!(h1.ip(&["link", "show", "flannel.77"]).is_ok());
    assert!(
        h1.ip(&["link", "show", "flannel-csum-in"]).is_err(),
        "the finishing device still there"
    );
    assert_eq!(
        stdout.contains("removed the finishing device flannel-csum / flannel-csum-in"),
        finishing,
        "{}",
        text(&out)
    );
    let routes = String::from_utf8_lossy(&h1.ip(&["route"]).unwrap().stdout).into_owned();
    assert!(!routes.contains("172.16.0.0/12"), "route left: {routes}");
    assert!(!pins.exists(), "pins left under {}", pins.display());
    for table in ["filter", "nat"] {
        let rules = h1.exec("iptables", &["-w", "-t", table, "-S"]).unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        assert!(
            !rules.contains("OVERLAY-") && !rules.contains("FLANNEL-"),
            "{table} rules left: {rules}"
        );
    }
    assert!(stdout.contains("removed blackhole route"), "{}", text(&out));
    assert_eq!(blackholes(), "", "blackhole route left");
    for id in &links {
        assert!(
            !link_exists(id),
            "link {id} still exists (program still attached)"
        );
    }

    // Idempotent.
    let again = teardown(h1, &pins);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to remove"),
        "{}",
        text(&again)
    );
}

fn teardown_udp() {
    teardown_removes_what_the_agent_left("udp", "flannel0");
}

fn teardown_vxlan() {
    teardown_removes_what_the_agent_left("vxlan", "flannel.1");
}

overlay_tests::test_main!(
    root teardown_udp,
    root teardown_vxlan,
);
