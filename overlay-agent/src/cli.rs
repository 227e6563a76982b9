//! The command line: flanneld's flags with flanneld's defaults, each also read from the
//! environment as `FLANNELD_<FLAG>`, plus the agent's own flags.
//!
//! Unit files written for flanneld keep working: Go-style single-dash long flags
//! (`-etcd-endpoints=...`) are accepted (see [`normalize_go_flags`]), boolean flags take
//! `--flag`, `--flag=true` and `--flag=false` like Go's `flag` package, and glog's
//! `--logtostderr` is accepted and ignored (the agent always logs to stderr, which systemd keeps).

use std::{
    ffi::OsString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};

/// Which datapath forwards overlay packets for the udp and vxlan backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathKind {
    /// eBPF when the kernel allows it, else the TUN device.
    Auto,
    /// eBPF programs (XDP/TC); fails when they cannot load.
    Ebpf,
    /// A TUN device driven from user space, as flanneld's udp backend does.
    Tun,
}

/// Where the eBPF datapath decapsulates on the underlay interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DecapKind {
    /// TC ingress: delivers straight into containers (the fastest on veth and virtual NICs).
    Tc,
    /// Native XDP, before the stack allocates an skb and before GRO: may win on a physical NIC;
    /// delivers through the host stack.
    Xdp,
    /// Generic (skb) XDP, for drivers without native XDP; for testing.
    XdpGeneric,
}

/// Flannel-compatible overlay network agent whose dataplane runs in eBPF.
///
/// A drop-in replacement for flanneld: same flags, same etcd data, same subnet.env. Without a
/// subcommand it runs the daemon, exactly as flanneld's command line does.
#[derive(Debug, Clone, Parser)]
#[command(name = "overlay-agent", version)]
pub struct Cli {
    /// A one-shot tool instead of the daemon (the daemon needs no subcommand).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Comma-separated etcd endpoints.
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix under which the network config and the leases live.
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// TLS key file of the client certificate used to reach etcd.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// TLS client certificate file used to reach etcd.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// CA file that signed etcd's server certificate.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// etcd user name (etcd authentication).
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd password (etcd authentication).
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// Interface (name or IPv4 address) to use for inter-host traffic; repeatable, first found
    /// wins. Default: the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against interface names and IPv4 addresses, when no --iface matches;
    /// repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,

    /// IPv4 address other hosts reach this one at (default: the interface's address).
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address other hosts reach this one at; accepted, not used yet (the agent is IPv4
    /// only, and a network config with EnableIPv6 is refused).
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<Ipv6Addr>,

    /// Use the interface of the route to this address (as `ip route get <addr>` shows it), when
    /// no --iface or --iface-regex matches.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// Where to write the subnet file that docker's unit reads.
    #[arg(
        long,
        global = true,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// flanneld's directory for multi-network subnet files; accepted, unused.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_DIR",
        default_value = "/run/flannel/networks"
    )]
    pub subnet_dir: PathBuf,

    /// Renew the lease this many minutes before it expires.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(1..=1439)
    )]
    pub subnet_lease_renew_margin: u32,

    /// Masquerade traffic leaving the overlay Network (iptables rules as flanneld's), and tell
    /// docker through FLANNEL_IPMASQ that it need not.
    #[arg(
        long,
        env = "FLANNELD_IP_MASQ",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub ip_masq: bool,

    /// With --ip-masq, masquerade without --random-fully (flanneld's flag of the same name).
    #[arg(
        long,
        env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub ip_masq_fully_random_disable: bool,

    /// Install flanneld's FORWARD accept rules for the Network (chain FLANNEL-FWD); false
    /// installs none and removes those a previous run left.
    #[arg(
        long,
        env = "FLANNELD_IPTABLES_FORWARD_RULES",
        num_args = 0..=1,
        require_equals = true,
        default_value = "true",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub iptables_forward_rules: bool,

    /// Every this many seconds, check the iptables rules (and the --ip-blackhole-route) and
    /// restore what is missing.
    #[arg(
        long,
        env = "FLANNELD_IPTABLES_RESYNC",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub iptables_resync: u32,

    /// Add a blackhole route for this host's subnet, so traffic to its addresses that no local
    /// container holds is dropped instead of following a less specific route (flanneld's flag).
    /// Its metric is the highest, so docker's bridge route for the subnet always wins.
    #[arg(
        long,
        env = "FLANNELD_IP_BLACKHOLE_ROUTE",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub ip_blackhole_route: bool,

    /// Address the health endpoint listens on.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,

    /// Port of the health endpoint (`GET /healthz`); 0 turns it off. It answers as flanneld
    /// does: 200 `flanneld is running` while the agent runs (see --healthz-strict).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 0)]
    pub healthz_port: u16,

    /// Make `/healthz` report the agent's real state instead of flanneld's constant answer:
    /// 200 `ok` while the lease is held and the datapath is up, else 503 with the reason.
    #[arg(
        long,
        env = "FLANNELD_HEALTHZ_STRICT",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub healthz_strict: bool,

    /// Log verbosity, as glog's -v: 0 info, 1-2 debug, 3 and more trace. RUST_LOG overrides it.
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value_t = 0)]
    pub verbosity: u8,

    /// glog's; accepted and ignored: logs always go to stderr.
    #[arg(
        long,
        env = "FLANNELD_LOGTOSTDERR",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub logtostderr: Option<bool>,

    /// glog's; accepted and ignored: logs always go to stderr.
    #[arg(
        long,
        env = "FLANNELD_ALSOLOGTOSTDERR",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub alsologtostderr: Option<bool>,

    /// glog's; accepted and ignored: no log files are written.
    #[arg(long = "log_dir", env = "FLANNELD_LOG_DIR")]
    pub log_dir: Option<String>,

    /// glog's per-file verbosity; accepted and ignored (RUST_LOG gives per-module levels).
    #[arg(long, env = "FLANNELD_VMODULE")]
    pub vmodule: Option<String>,

    /// flanneld's; refused: this agent has no Kubernetes subnet manager.
    #[arg(
        long,
        hide = true,
        env = "FLANNELD_KUBE_SUBNET_MGR",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub kube_subnet_mgr: Option<bool>,

    /// flanneld's; refused (Kubernetes only).
    #[arg(long, hide = true, env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// flanneld's; refused (Kubernetes only).
    #[arg(long, hide = true, env = "FLANNELD_KUBE_ANNOTATION_PREFIX")]
    pub kube_annotation_prefix: Option<String>,

    /// flanneld's; refused (Kubernetes only).
    #[arg(long, hide = true, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<String>,

    /// flanneld's; refused (Kubernetes only: its net-conf.json replaces etcd's config).
    #[arg(long, hide = true, env = "FLANNELD_NET_CONFIG_PATH")]
    pub net_config_path: Option<String>,

    /// flanneld's; refused (Kubernetes only).
    #[arg(
        long,
        hide = true,
        env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub set_node_network_unavailable: Option<bool>,

    /// Datapath for the udp and vxlan backends (the alloc backend needs none).
    #[arg(long, env = "FLANNELD_DATAPATH", value_enum, default_value_t = DatapathKind::Auto)]
    pub datapath: DatapathKind,

    /// bpffs directory where the eBPF datapath pins its programs' links and maps, so forwarding
    /// continues while the agent restarts (bpffs is mounted on /sys/fs/bpf if needed).
    #[arg(
        long,
        global = true,
        env = "FLANNELD_BPFFS",
        default_value = "/sys/fs/bpf/overlay-agent"
    )]
    pub bpffs: PathBuf,

    /// Where the eBPF datapath decapsulates.
    #[arg(long, env = "FLANNELD_DECAP", value_enum, default_value_t = DecapKind::Tc)]
    pub decap: DecapKind,

    /// Deliver decapsulated packets through the host's stack (so netfilter's FORWARD chain and
    /// docker's rules see them) instead of straight into the containers, which bypasses them.
    #[arg(
        long,
        env = "FLANNELD_DELIVER_VIA_STACK",
        num_args = 0..=1,
        require_equals = true,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub deliver_via_stack: bool,

    /// Count packets and bytes per peer host in the eBPF programs (status, /metrics). `=false`
    /// saves their map update per packet; the per-outcome counters stay.
    #[arg(
        long,
        env = "FLANNELD_PEER_COUNTERS",
        num_args = 0..=1,
        require_equals = true,
        default_value = "true",
        default_missing_value = "true",
        value_parser = parse_go_bool
    )]
    pub peer_counters: bool,

    /// How long a peer whose lease expired (as opposed to one deleted, or whose subnet another
    /// host took) stays in the dataplane. An expired lease usually means a host cut off from
    /// etcd that still forwards; the subnet cannot go to another host without that host's
    /// lease replacing the stale peer at once, so keeping it costs only a map entry. One hour
    /// covers etcd partitions and maintenance at any TTL, and still clears hosts gone for good
    /// within the hour, so the maps do not fill with them in a cluster that churns hosts.
    #[arg(
        long,
        env = "FLANNELD_EXPIRED_PEER_GRACE",
        default_value = "1h",
        value_parser = parse_grace
    )]
    pub expired_peer_grace: Duration,

    /// Lifetime of the subnet lease in etcd (e.g. 30s, 90m, 24h); it is renewed before it ends.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_LEASE_TTL",
        default_value = "24h",
        value_parser = parse_ttl
    )]
    pub subnet_lease_ttl: Duration,
}

/// The one-shot tools.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Remove what the agent leaves on the host after it stops: the overlay devices it created
    /// (flannel0, flannel.<VNI>) with their routes, and the pinned programs and maps under
    /// --bpffs. Refuses, removing nothing, while an agent runs here (--force overrides). Idempotent;
    /// lists every failure and exits non-zero on any.
    Teardown(crate::teardown::TeardownArgs),
    /// Show what the agent and its dataplane are doing: the lease, etcd, the datapath with its
    /// programs and links, every peer with its traffic, the drops by reason, local endpoints.
    /// Asks the running agent; without one, reads the pinned dataplane under --bpffs. Exits 0
    /// when the agent is healthy, 1 when it is not, 3 when no agent answers.
    Status(crate::status::show::StatusArgs),
    /// Write docker's daemon options from subnet.env, as flannel's mk-docker-opts.sh does:
    /// DOCKER_OPTS=" --bip=... --ip-masq=... --mtu=...", byte for byte as the script writes it.
    DockerOpts(crate::docker_opts::DockerOptsArgs),
}

impl Cli {
    /// Parses the process's arguments, accepting Go-style single-dash long flags; exits with
    /// status 2 on a bad command line, a refused flanneld flag included.
    pub fn parse_args() -> Self {
        Self::try_parse_args_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the program name first) as [`Cli::parse_args`] parses the process's, for
    /// checking a command line (a unit file's ExecStart, for instance) without running it.
    pub fn try_parse_args_from(
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Result<Self, clap::Error> {
        let cli = Self::try_parse_from(normalize_go_flags(args.into_iter().map(Into::into)))?;
        match cli.unsupported() {
            None => Ok(cli),
            Some(flag) => Err(clap::Error::raw(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{flag} is a flanneld flag overlay-agent cannot honour: it has no Kubernetes \
                     subnet manager and leases subnets from etcd only (--etcd-endpoints, \
                     --etcd-prefix); remove {flag} (or its FLANNELD_* variable)\n"
                ),
            )),
        }
    }

    /// The first flanneld flag given that only the Kubernetes subnet manager uses, as it is
    /// spelled on the command line. `--kube-subnet-mgr=false` asks for etcd, which is what runs.
    pub fn unsupported(&self) -> Option<&'static str> {
        [
            ("--kube-subnet-mgr", self.kube_subnet_mgr == Some(true)),
            ("--kube-api-url", self.kube_api_url.is_some()),
            (
                "--kube-annotation-prefix",
                self.kube_annotation_prefix.is_some(),
            ),
            ("--kubeconfig-file", self.kubeconfig_file.is_some()),
            ("--net-config-path", self.net_config_path.is_some()),
            (
                "--set-node-network-unavailable",
                self.set_node_network_unavailable.is_some(),
            ),
        ]
        .into_iter()
        .find_map(|(flag, given)| given.then_some(flag))
    }

    /// The glog flags given, which the agent ignores, as `--flag=value`.
    pub fn ignored_glog_flags(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = self.logtostderr {
            out.push(format!("--logtostderr={v}"));
        }
        if let Some(v) = self.alsologtostderr {
            out.push(format!("--alsologtostderr={v}"));
        }
        if let Some(v) = &self.log_dir {
            out.push(format!("--log_dir={v}"));
        }
        if let Some(v) = &self.vmodule {
            out.push(format!("--vmodule={v}"));
        }
        out
    }

    /// The tracing filter directive that `-v` asks for.
    pub fn log_level(&self) -> &'static str {
        match self.verbosity {
            0 => "info",
            1 | 2 => "debug",
            _ => "trace",
        }
    }
}

/// Go's `strconv.ParseBool`, which flanneld's boolean flags and variables use.
fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    // etcd rounds lease TTLs to whole seconds and refuses 0.
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".to_owned());
    }
    Ok(d)
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Long flags (without dashes) that Go's `flag` package would also accept with one dash.
const LONG_FLAGS: &[&str] = &[
    "etcd-endpoints",
    "etcd-prefix",
    "etcd-keyfile",
    "etcd-certfile",
    "etcd-cafile",
    "etcd-username",
    "etcd-password",
    "iface",
    "iface-regex",
    "public-ip",
    "subnet-file",
    "subnet-dir",
    "subnet-lease-renew-margin",
    "ip-masq",
    "healthz-ip",
    "healthz-port",
    "logtostderr",
    "alsologtostderr",
    "log_dir",
    "vmodule",
    "version",
    "datapath",
    "subnet-lease-ttl",
    "public-ipv6",
    "iface-can-reach",
    "ip-masq-fully-random-disable",
    "iptables-forward-rules",
    "iptables-resync",
    "ip-blackhole-route",
    "healthz-strict",
    "kube-subnet-mgr",
    "kube-api-url",
    "kube-annotation-prefix",
    "kubeconfig-file",
    "net-config-path",
    "set-node-network-unavailable",
];

/// Rewrites `-etcd-endpoints=x` to `--etcd-endpoints=x` for the known long flags, since Go's
/// `flag` package treats one and two dashes alike and unit files use both. Stops at `--`.
pub fn normalize_go_flags(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest_verbatim {
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        let rewritten = arg.to_str().and_then(|s| {
            let name = s.strip_prefix('-').filter(|n| !n.starts_with('-'))?;
            let flag = name.split_once('=').map_or(name, |(f, _)| f);
            LONG_FLAGS
                .contains(&flag)
                .then(|| OsString::from(format!("-{s}")))
        });
        out.push(rewritten.unwrap_or(arg));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let argv = std::iter::once("overlay-agent")
            .chain(args.iter().copied())
            .map(OsString::from);
        Cli::try_parse_from(normalize_go_flags(argv))
    }

    #[test]
    fn defaults_are_flanneld_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.etcd_endpoints,
            ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
        );
        assert_eq!(c.etcd_prefix, "/coreos.com/network");
        assert_eq!(c.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(c.subnet_lease_renew_margin, 60);
        assert!(!c.ip_masq);
        assert_eq!(c.healthz_ip, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.healthz_port, 0);
        assert_eq!(c.datapath, DatapathKind::Auto);
        assert_eq!(c.subnet_lease_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.log_level(), "info");
    }

    #[test]
    fn article_command_line() {
        let c = parse(&[
            "--etcd-endpoints=http://H:2379",
            "--etcd-prefix=/flannel",
            "--logtostderr=true",
            "--subnet-dir=/run/flannel/networks",
            "--subnet-file=/run/flannel/subnet.env",
        ])
        .unwrap();
        assert_eq!(c.etcd_endpoints, ["http://H:2379"]);
        assert_eq!(c.etcd_prefix, "/flannel");
    }

    #[test]
    fn go_style_flags() {
        let c = parse(&[
            "-etcd-endpoints=http://a:1,http://b:2",
            "-iface",
            "eth0",
            "--iface=10.0.0.1",
            "-ip-masq",
            "-v=2",
            "--logtostderr",
            "-subnet-lease-ttl=90m",
            "-public-ip=127.0.0.9",
        ])
        .unwrap();
        assert_eq!(c.etcd_endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(c.iface, ["eth0", "10.0.0.1"]);
        assert!(c.ip_masq);
        assert_eq!(c.verbosity, 2);
        assert_eq!(c.log_level(), "debug");
        assert_eq!(c.subnet_lease_ttl, Duration::from_secs(90 * 60));
        assert_eq!(c.public_ip, Some(Ipv4Addr::new(127, 0, 0, 9)));
        assert!(!parse(&["--ip-masq=false"]).unwrap().ip_masq);
        assert!(parse(&["--ip-masq=T"]).unwrap().ip_masq);
        assert_eq!(parse(&["--v=3"]).unwrap().verbosity, 3);
        assert_eq!(parse(&["-v", "1"]).unwrap().verbosity, 1);
    }

    #[test]
    fn subcommands_beside_flanneld_flags() {
        // The article's command line has no subcommand and still runs the daemon.
        assert!(
            parse(&["--etcd-prefix=/flannel", "-subnet-file=/x"])
                .unwrap()
                .command
                .is_none()
        );
        let t = parse(&["teardown", "--bpffs=/sys/fs/bpf/x"]).unwrap();
        assert!(matches!(t.command, Some(Command::Teardown(_))));
        assert_eq!(t.bpffs, PathBuf::from("/sys/fs/bpf/x"));
        let t = parse(&["--bpffs=/b", "teardown"]).unwrap();
        assert_eq!(t.bpffs, PathBuf::from("/b"));
        let d = parse(&[
            "docker-opts",
            "-d",
            "/etc/default/docker",
            "-c",
            "-k",
            "X",
            "-m",
        ])
        .unwrap();
        let Some(Command::DockerOpts(o)) = d.command else {
            panic!("not docker-opts");
        };
        assert_eq!(o.docker_env, PathBuf::from("/etc/default/docker"));
        assert!(o.combined && o.no_ip_masq && !o.individual);
        assert_eq!(o.key, "X");
        assert_eq!(o.flannel_env, None);
        let d = parse(&["docker-opts", "--subnet-file=/s.env", "-f", "/f.env"]).unwrap();
        assert_eq!(d.subnet_file, PathBuf::from("/s.env"));
        let Some(Command::DockerOpts(o)) = d.command else {
            panic!("not docker-opts");
        };
        assert_eq!(o.flannel_env, Some(PathBuf::from("/f.env")));
        assert_eq!(o.docker_env, PathBuf::from("/run/docker_opts.env"));
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn every_flanneld_flag_is_accepted() {
        let c = parse(&[
            "--iface-can-reach=10.0.0.1",
            "--public-ipv6=fd00::1",
            "--iptables-resync=7",
            "--iptables-forward-rules=false",
            "--ip-masq-fully-random-disable",
            "--ip-blackhole-route",
            "-alsologtostderr",
            "--log_dir=/var/log/flannel",
            "-vmodule=main=2",
            "--logtostderr",
            "--healthz-strict",
        ])
        .unwrap();
        assert_eq!(c.iface_can_reach, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(c.public_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(c.iptables_resync, 7);
        assert!(!c.iptables_forward_rules);
        assert!(c.ip_masq_fully_random_disable && c.ip_blackhole_route && c.healthz_strict);
        assert_eq!(
            c.ignored_glog_flags(),
            [
                "--logtostderr=true",
                "--alsologtostderr=true",
                "--log_dir=/var/log/flannel",
                "--vmodule=main=2"
            ]
        );
        let d = parse(&[]).unwrap();
        assert_eq!(d.iptables_resync, 5);
        assert!(d.iptables_forward_rules && !d.ip_blackhole_route && !d.healthz_strict);
        assert!(d.ignored_glog_flags().is_empty());
        assert!(parse(&["--iptables-resync=0"]).is_err());
    }

    #[test]
    fn every_flag_has_its_flanneld_variable() {
        use clap::CommandFactory as _;
        let cmd = Cli::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let want = format!("FLANNELD_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "--{long}"
            );
            checked += 1;
        }
        assert!(checked > 30, "{checked}");
    }

    #[test]
    fn kubernetes_flags_are_refused_by_name() {
        fn argv(a: &str) -> [&str; 2] {
            ["overlay-agent", a]
        }
        for (arg, flag) in [
            ("--kube-subnet-mgr", "--kube-subnet-mgr"),
            ("-kube-subnet-mgr=true", "--kube-subnet-mgr"),
            ("--kube-api-url=https://k:6443", "--kube-api-url"),
            ("--kube-annotation-prefix=x", "--kube-annotation-prefix"),
            ("--kubeconfig-file=/k", "--kubeconfig-file"),
            (
                "--net-config-path=/etc/kube-flannel/net-conf.json",
                "--net-config-path",
            ),
            (
                "--set-node-network-unavailable=false",
                "--set-node-network-unavailable",
            ),
        ] {
            let e = Cli::try_parse_args_from(argv(arg)).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{arg}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!(
                    "{flag} is a flanneld flag overlay-agent cannot honour"
                )),
                "{arg}: {msg}"
            );
        }
        // Asking for etcd explicitly is what the agent does.
        assert!(Cli::try_parse_args_from(argv("--kube-subnet-mgr=false")).is_ok());
    }

    #[test]
    fn rejects_out_of_range() {
        assert!(parse(&["--subnet-lease-renew-margin=0"]).is_err());
        assert!(parse(&["--subnet-lease-renew-margin=1440"]).is_err());
        assert!(parse(&["--subnet-lease-ttl=500ms"]).is_err());
        assert!(parse(&["--subnet-lease-ttl=soon"]).is_err());
        assert!(parse(&["--ip-masq=maybe"]).is_err());
        assert!(parse(&["--datapath=dpdk"]).is_err());
        assert!(parse(&["--public-ip=::1"]).is_err());
    }

    #[test]
    fn single_dash_rewrite_is_limited_to_known_flags() {
        let argv = ["x", "-v=1", "-iface=lo", "-zz", "--", "-iface=eth0"].map(OsString::from);
        let out = normalize_go_flags(argv);
        assert_eq!(
            out,
            ["x", "-v=1", "--iface=lo", "-zz", "--", "-iface=eth0"].map(OsString::from)
        );
    }
}
