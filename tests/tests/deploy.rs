//! The deployment files in `deploy/`: systemd accepts them (`systemd-analyze verify`, with the
//! docker drop-in applied to a docker.service like the packaged one), the unit's command line
//! expanded with the example /etc/default/flannel is the article's and parses, the docker
//! drop-in expands subnet.env into `--bip`/`--mtu`, and agents restricted to the unit's
//! capability bounding set forward in a lab.

use std::{path::Path, process::Command};

use overlay_agent::cli::Cli;
use overlay_tests::{
    cluster::Cluster,
    etcd::{TempDir, agent_binary},
    lab::LabConfig,
};

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` in a unit file (continuation lines joined), in order.
fn directive(unit: &str, key: &str) -> Vec<String> {
    let joined = unit.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

/// `KEY="value"` lines of an environment file.
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("KEY=value");
            (k.to_owned(), v.trim_matches('"').to_owned())
        })
        .collect()
}

/// systemd's expansion of an ExecStart line: `${VAR}` inside a word, `$VAR` as a whole word
/// split on whitespace.
fn expand(exec: &str, env: &[(String, String)]) -> Vec<String> {
    let get = |k: &str| {
        env.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map_or("", |(_, v)| v.as_str())
            .to_owned()
    };
    let mut out = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(var) = word.strip_prefix('$').filter(|w| !w.starts_with('{')) {
            out.extend(get(var).split_whitespace().map(str::to_owned));
            continue;
        }
        let mut w = word.to_owned();
        while let Some(start) = w.find("${") {
            let end = start + w[start..].find('}').expect("closing brace");
            let value = get(&w[start + 2..end]);
            w.replace_range(start..=end, &value);
        }
        out.push(w);
    }
    out
}

fn systemd_analyze_verify_accepts_the_units() {
    let tmp = TempDir::new("deploy-verify").unwrap();
    let dir = tmp.path();
    // ExecStart's program must exist for verify: the built agent stands in for
    // /usr/bin/overlay-agent, /bin/true for dockerd.
    let unit = deploy("overlay-agent.service")
        .replace("/usr/bin/overlay-agent", &agent_binary().to_string_lossy());
    std::fs::write(dir.join("overlay-agent.service"), unit).unwrap();
    // docker's packaged unit (docker.com's and Debian's, shortened), which the drop-in extends.
    std::fs::write(
        dir.join("docker.service"),
        "[Unit]\nDescription=Docker Application Container Engine\n\
         After=network-online.target\n\n[Service]\nType=notify\n\
         ExecStart=/bin/true -H fd:// --containerd=/run/containerd/containerd.sock\n\
         ExecReload=/bin/kill -s HUP $MAINPID\n\n[Install]\nWantedBy=multi-user.target\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("docker.service.d")).unwrap();
    std::fs::write(
        dir.join("docker.service.d/overlay.conf"),
        deploy("docker-overlay.conf").replace("/usr/bin/dockerd", "/bin/true"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("overlay-agent.service"))
        .arg(dir.join("docker.service"))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze (Debian package systemd; cargo xtask setup installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown keys and bad values are only warnings (exit 0): fail on any line about our files.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains(&*dir.to_string_lossy())
                || l.contains("overlay-agent.service")
                || l.contains("docker.service")
                || l.contains("overlay.conf")
        })
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // verify loaded the drop-in.
    let debug = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("docker.service"))
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .output()
        .unwrap();
    // (It lists a unit's drop-ins on stdout at debug level.)
    assert!(
        String::from_utf8_lossy(&debug.stdout).contains("docker.service.d/overlay.conf"),
        "the drop-in was not loaded"
    );
}

fn the_unit_runs_the_articles_command_line() {
    let unit = deploy("overlay-agent.service");
    assert_eq!(directive(&unit, "Type"), ["notify"]);
    assert_eq!(directive(&unit, "RuntimeDirectory"), ["flannel"]);
    assert_eq!(
        directive(&unit, "EnvironmentFile"),
        ["-/etc/default/flannel"]
    );
    assert!(!directive(&unit, "Restart").is_empty());
    for forbidden in [
        "PrivateMounts",
        "ProtectSystem",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "PrivateDevices",
    ] {
        assert!(
            directive(&unit, forbidden).is_empty(),
            "{forbidden}= gives the agent a private mount namespace: its bpffs pins would die \
             with it"
        );
    }

    // Environment= defaults, then /etc/default/flannel, as systemd applies them.
    let mut env: Vec<(String, String)> = directive(&unit, "Environment")
        .iter()
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let defaults = env_file(&deploy("default-flannel"));
    let keys: Vec<&str> = defaults.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["ETCD_HOSTS", "ETCD_PREFIX", "FLANNELD_OPTS"]);
    env.extend(defaults);
    let exec = directive(&unit, "ExecStart");
    let argv = expand(&exec[0], &env);
    assert_eq!(
        argv,
        [
            "/usr/bin/overlay-agent",
            "--etcd-endpoints=http://192.168.8.2:2379",
            "--etcd-prefix=/flannel",
            "--logtostderr=true",
            "--subnet-dir=/run/flannel/networks",
            "--subnet-file=/run/flannel/subnet.env",
        ]
    );
    let cli = Cli::try_parse_args_from(&argv).unwrap();
    assert_eq!(cli.etcd_endpoints, ["http://192.168.8.2:2379"]);
    assert_eq!(cli.etcd_prefix, "/flannel");
    assert!(cli.command.is_none());

    // Options in FLANNELD_OPTS are split into words.
    env.push(("FLANNELD_OPTS".into(), "--iface=eth1 --ip-masq".into()));
    let cli = Cli::try_parse_args_from(expand(&exec[0], &env)).unwrap();
    assert_eq!(cli.iface, ["eth1"]);
    assert!(cli.ip_masq);
}

fn the_docker_drop_in_passes_bip_and_mtu_from_subnet_env() {
    let dropin = deploy("docker-overlay.conf");
    assert!(directive(&dropin, "After").contains(&"overlay-agent.service".to_owned()));
    assert!(
        directive(&dropin, "Requires").is_empty(),
        "Requires= would restart docker (and every container) with the agent"
    );
    assert!(directive(&dropin, "EnvironmentFile").contains(&"/run/flannel/subnet.env".to_owned()));
    let exec = directive(&dropin, "ExecStart");
    assert_eq!(exec[0], "", "the packaged ExecStart must be reset first");
    let subnet_env = env_file(
        "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\nFLANNEL_MTU=1472\n\
         FLANNEL_IPMASQ=false\n",
    );
    let argv = expand(&exec[1], &subnet_env);
    assert_eq!(argv[0], "/usr/bin/dockerd");
    assert!(
        argv.contains(&"--bip=172.16.21.1/24".to_owned()),
        "{argv:?}"
    );
    assert!(argv.contains(&"--mtu=1472".to_owned()), "{argv:?}");
}

/// setpriv's form of the unit's CapabilityBoundingSet: `-all,+net_admin,...`.
fn bounding_set() -> String {
    let caps = directive(&deploy("overlay-agent.service"), "CapabilityBoundingSet");
    assert_eq!(caps.len(), 1);
    let mut set = "-all".to_owned();
    for cap in caps[0].split_whitespace() {
        set.push_str(",+");
        set.push_str(&cap.trim_start_matches("CAP_").to_lowercase());
    }
    set
}

fn agents_with_the_units_capabilities(backend: &str, datapath: &str, extra: &[&str]) {
    let tmp = TempDir::new(&format!("deploy-caps-{backend}-{datapath}")).unwrap();
    let config = format!(r#"{{"Network": "172.16.0.0/12", "Backend": {{"Type": "{backend}"}}}}"#);
    let mut c = Cluster::new(
        &LabConfig {
            prefix: "ovt-cap".into(),
            hosts: 2,
            underlay_mtu: 1500,
        },
        &config,
        Path::new("/usr/bin/setpriv"),
        tmp.path(),
    )
    .unwrap();
    let set = bounding_set();
    for i in 0..2 {
        // As systemd runs it: root, the unit's bounding set, NoNewPrivileges=yes.
        let mut args: Vec<String> = vec![
            format!("--bounding-set={set}"),
            "--inh-caps=-all".into(),
            "--no-new-privs".into(),
            "--".into(),
            agent_binary().to_string_lossy().into_owned(),
        ];
        let mut flags = vec![format!("--datapath={datapath}")];
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        args.extend(c.agent_args(i, &flags));
        c.start_agent(i, args).unwrap();
    }
    let envs: Vec<_> = (0..2)
        .map(|i| {
            c.wait_subnet_env(i, std::time::Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("with only {set}: {e}"))
        })
        .collect();
    for (i, env) in envs.iter().enumerate() {
        c.lab.hosts[i].start_docker(env).unwrap();
    }
    let failures = c.ping_matrix();
    assert!(failures.is_empty(), "with only {set}: {failures:?}");
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        c.agents[0].process.as_ref().unwrap().pid()
    ))
    .unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(
        bnd, "000001ffffffffff",
        "the agent ran with every capability"
    );
}

fn agents_forward_with_only_the_units_capabilities() {
    agents_with_the_units_capabilities("udp", "ebpf", &[]);
    agents_with_the_units_capabilities("vxlan", "ebpf", &["--ip-masq"]);
    agents_with_the_units_capabilities("udp", "tun", &[]);
}

overlay_tests::test_main!(
    plain systemd_analyze_verify_accepts_the_units,
    plain the_unit_runs_the_articles_command_line,
    plain the_docker_drop_in_passes_bip_and_mtu_from_subnet_env,
    root agents_forward_with_only_the_units_capabilities,
);
