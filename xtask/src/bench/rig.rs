//! The rig every mode runs on (two simulated hosts on one underlay bridge, from
//! `overlay_tests::lab`), and how each mode is set up on it and torn down again.
//!
//! Host *N* is 198.18.0.*N* on the underlay. Modes without the agent give host *N* the subnet
//! 172.16.*N*.0/24 of the network 172.16.0.0/12; modes with the agent let it lease a subnet from
//! etcd. Either way docker's bridge and container are then built from that subnet.env.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::{
    cluster::DockerEngine,
    flanneld::{self, UdpProxy},
    lab::{Host, Lab, LabConfig, SubnetEnv, UNDERLAY_IF},
    netns::NsProcess,
};

use super::{
    etcd::{ETCD_IP, Etcd},
    interrupted,
    metrics::{IPERF_PORT, SOCKPERF_PORT},
    tcp_cc::TcpCc,
};

/// Prefix of every namespace the bench creates.
pub const PREFIX: &str = "ovbench";
/// The overlay network of the static modes (and the agent's config).
pub const NETWORK: &str = "172.16.0.0/12";
/// etcd prefix the agents use (flannel's default).
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// How a mode forwards container traffic between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain routes between hosts: no encapsulation, the limit.
    Bare,
    /// The kernel's vxlan device, configured as flannel's vxlan backend does.
    KernelVxlan,
    /// flannel's udp backend: TUN + single-threaded userspace proxy.
    UdpProxy,
    /// overlay-agent with a backend type, a `--datapath`, and more flags.
    Agent {
        backend: &'static str,
        datapath: &'static str,
        flags: &'static [&'static str],
    },
}

/// A mode of the bench.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub name: &'static str,
    pub kind: Kind,
    pub what: &'static str,
}

/// Every mode, in report order.
pub const MODES: [Mode; 8] = [
    Mode {
        name: "bare",
        kind: Kind::Bare,
        what: "plain routes between hosts, no encapsulation (the limit)",
    },
    Mode {
        name: "kernel-vxlan",
        kind: Kind::KernelVxlan,
        what: "kernel vxlan device flannel.1, as flannel's vxlan backend sets it up",
    },
    Mode {
        name: "udp-proxy",
        kind: Kind::UdpProxy,
        what: "flannel's udp backend: TUN flannel0 + one-thread userspace proxy on :8285",
    },
    Mode {
        name: "ebpf-udp",
        kind: Kind::Agent {
            backend: "udp",
            datapath: "ebpf",
            flags: &[],
        },
        what: "overlay-agent, Backend udp, --datapath ebpf",
    },
    Mode {
        name: "ebpf-udp-no-peer-counters",
        kind: Kind::Agent {
            backend: "udp",
            datapath: "ebpf",
            flags: &["--peer-counters=false"],
        },
        what: "ebpf-udp with --peer-counters=false: against ebpf-udp, what the per-peer counters cost",
    },
    Mode {
        name: "ebpf-vxlan",
        kind: Kind::Agent {
            backend: "vxlan",
            datapath: "ebpf",
            flags: &[],
        },
        what: "overlay-agent, Backend vxlan, --datapath ebpf",
    },
    Mode {
        name: "tun-udp",
        kind: Kind::Agent {
            backend: "udp",
            datapath: "tun",
            flags: &[],
        },
        what: "overlay-agent, Backend udp, --datapath tun",
    },
    Mode {
        name: "tun-vxlan",
        kind: Kind::Agent {
            backend: "vxlan",
            datapath: "tun",
            flags: &[],
        },
        what: "overlay-agent, Backend vxlan, --datapath tun",
    },
];

/// Why a mode could not run.
#[derive(Debug)]
pub enum SetupError {
    /// Not built yet, or not working yet: reported as missing with the reason.
    Missing(String),
    /// The rig itself failed.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for SetupError {
    fn from(e: anyhow::Error) -> Self {
        SetupError::Failed(e)
    }
}

impl From<overlay_tests::cluster::ClusterError> for SetupError {
    fn from(e: overlay_tests::cluster::ClusterError) -> Self {
        SetupError::Failed(e.into())
    }
}

impl From<overlay_tests::flanneld::FlanneldError> for SetupError {
    fn from(e: overlay_tests::flanneld::FlanneldError) -> Self {
        SetupError::Failed(e.into())
    }
}

impl From<overlay_tests::netns::NetNsError> for SetupError {
    fn from(e: overlay_tests::netns::NetNsError) -> Self {
        SetupError::Failed(e.into())
    }
}

/// The rig: two hosts and the switch, reused by every mode.
#[derive(Debug)]
pub struct Rig {
    pub lab: Lab,
    pub dir: PathBuf,
    /// Given to each mode's containers.
    pub tcp_cc: TcpCc,
    /// Real dockerd or its imitation.
    pub docker: DockerEngine,
}

/// What a running mode holds; dropping it stops the servers, agents, proxies and etcd.
#[derive(Debug, Default)]
pub struct Active {
    // Drop order: servers (in the containers) first, then agents, proxies, etcd.
    servers: Vec<NsProcess>,
    agents: Vec<NsProcess>,
    proxies: Vec<UdpProxy>,
    etcd: Option<Etcd>,
    /// The receiving container's address.
    pub server_ip: String,
}

impl Rig {
    /// Builds the rig with `hosts` hosts. `dir` receives logs and per-host subnet.env files.
    pub fn new(
        hosts: usize,
        dir: &Path,
        tcp_cc: TcpCc,
        docker: DockerEngine,
    ) -> anyhow::Result<Self> {
        let lab = Lab::new(&LabConfig {
            prefix: PREFIX.into(),
            hosts,
            underlay_mtu: 1500,
        })?;
        // etcd lives on the switch, reachable from every host over the underlay.
        lab.switch
            .ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "ul0"])?;
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            lab,
            dir: dir.to_owned(),
            tcp_cc,
            docker,
        })
    }

    /// Sets `mode` up and checks container 1 reaches container 2.
    pub fn setup(&mut self, mode: &Mode, agent: Option<&Path>) -> Result<Active, SetupError> {
        let mut active = Active::default();
        let envs: Vec<SubnetEnv> = match mode.kind {
            Kind::Bare => {
                let envs = self.static_envs(1500);
                for host in &self.lab.hosts {
                    for peer in self.peers(host) {
                        host.ns.ip(&[
                            "route",
                            "add",
                            &format!("172.16.{peer}.0/24"),
                            "via",
                            &format!("198.18.0.{peer}"),
                        ])?;
                    }
                }
                envs
            }
            Kind::KernelVxlan => {
                let envs = self.static_envs(1450);
                setup_kernel_vxlan(&self.lab.hosts, |h| self.peers(h))?;
                envs
            }
            Kind::UdpProxy => {
                let envs = self.static_envs(1472);
                for host in &self.lab.hosts {
                    let routes = self
                        .peers(host)
                        .into_iter()
                        .map(|peer| flanneld::Route {
                            subnet: Ipv4Addr::new(172, 16, peer as u8, 0),
                            prefix_len: 24,
                            next_hop: SocketAddrV4::new(
                                Ipv4Addr::new(198, 18, 0, peer as u8),
                                flanneld::UDP_PORT,
                            ),
                        })
                        .collect();
                    active.proxies.push(UdpProxy::start(
                        &host.ns,
                        host.underlay_ip,
                        Arc::new(Mutex::new(routes)),
                        1472,
                    )?);
                    // As flanneld configures flannel0: the lease's address with the network's
                    // prefix (the kernel adds the route of the whole network via the TUN), MTU
                    // underlay - 28.
                    let addr = format!("172.16.{}.0/12", host.number);
                    host.ns
                        .ip(&["addr", "add", &addr, "dev", flanneld::TUN_NAME])?;
                    host.ns
                        .ip(&["link", "set", flanneld::TUN_NAME, "mtu", "1472", "up"])?;
                }
                envs
            }
            Kind::Agent {
                backend,
                datapath,
                flags,
            } => {
                let agent = agent.ok_or_else(|| {
                    SetupError::Missing(
                        "no overlay-agent binary (the build failed or was skipped)".into(),
                    )
                })?;
                self.start_agents(&mut active, agent, backend, datapath, flags)?
            }
        };
        for (host, env) in self.lab.hosts.iter_mut().zip(&envs) {
            match self.docker {
                DockerEngine::Imitate => host
                    .start_docker(env)
                    .context("docker bridge from subnet.env")?,
                DockerEngine::Real => {
                    let options = vec![
                        format!("--bip={}/{}", env.gateway, env.prefix_len),
                        format!("--mtu={}", env.mtu),
                        "--ip-masq=false".to_owned(),
                    ];
                    host.start_dockerd(options, false)
                        .context("dockerd from subnet.env")?
                }
            };
            let container = host.container.as_ref().expect("started");
            self.tcp_cc.apply(&container.ns)?;
        }
        let c2 = self.lab.hosts[1].container.as_ref().expect("started");
        active.server_ip = c2.ip.to_string();
        active.servers.push(c2.ns.spawn(
            "iperf3",
            &["-s", "-p", IPERF_PORT],
            Some(&self.dir.join("iperf3-server.log")),
        )?);
        active.servers.push(c2.ns.spawn(
            "sockperf",
            &[
                "server",
                "--tcp",
                "-i",
                &active.server_ip,
                "-p",
                SOCKPERF_PORT,
            ],
            Some(&self.dir.join("sockperf-server.log")),
        )?);
        if !self.ping(&active.server_ip, Duration::from_secs(10)) {
            let msg = format!(
                "container {} cannot reach container {} through the overlay",
                self.lab.hosts[0].container.as_ref().expect("started").ip,
                active.server_ip
            );
            return Err(match mode.kind {
                Kind::Agent {
                    backend, datapath, ..
                } => {
                    let log = self
                        .dir
                        .join("h1")
                        .join(format!("agent-{backend}-{datapath}.log"));
                    let said = first_warning(&log)
                        .map(|w| format!("; the agent says: {w}"))
                        .unwrap_or_default();
                    SetupError::Missing(format!(
                        "{msg} (subnet.env was written, but the datapath does not forward){said}"
                    ))
                }
                _ => SetupError::Failed(anyhow::anyhow!(msg)),
            });
        }
        // Let the servers bind (ping may have succeeded before they listen).
        std::thread::sleep(Duration::from_millis(300));
        Ok(active)
    }

    /// Stops the mode and returns every host to its bare state (underlay address only).
    pub fn teardown(&mut self, active: Active) {
        drop(active);
        for host in &mut self.lab.hosts {
            if let Err(e) = host.stop_docker() {
                eprintln!("    teardown {}: {e}", host.ns.name());
            }
            reset_host(host);
        }
    }

    /// The client namespace (container of host 1).
    pub fn client(&self) -> &overlay_tests::netns::NetNs {
        &self.lab.hosts[0].container.as_ref().expect("mode is up").ns
    }

    fn static_envs(&self, mtu: u32) -> Vec<SubnetEnv> {
        self.lab
            .hosts
            .iter()
            .map(|h| SubnetEnv {
                network: Ipv4Addr::new(172, 16, 0, 0),
                network_len: 12,
                gateway: Ipv4Addr::new(172, 16, h.number as u8, 1),
                prefix_len: 24,
                mtu,
            })
            .collect()
    }

    fn peers(&self, host: &Host) -> Vec<usize> {
        self.lab
            .hosts
            .iter()
            .map(|h| h.number)
            .filter(|&n| n != host.number)
            .collect()
    }

    fn ping(&self, ip: &str, within: Duration) -> bool {
        let client = &self.lab.hosts[0].container.as_ref().expect("started").ns;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline && !interrupted() {
            if client.exec("ping", &["-c", "1", "-W", "1", ip]).is_ok() {
                return true;
            }
        }
        false
    }

    fn start_agents(
        &mut self,
        active: &mut Active,
        agent: &Path,
        backend: &str,
        datapath: &str,
        flags: &[&str],
    ) -> Result<Vec<SubnetEnv>, SetupError> {
        let etcd = Etcd::start(&self.lab.switch, &self.dir.join("etcd"))?;
        etcd.put(
            &format!("{ETCD_PREFIX}/config"),
            &format!(r#"{{"Network": "{NETWORK}", "Backend": {{"Type": "{backend}"}}}}"#),
        )?;
        let endpoint = etcd.endpoint();
        active.etcd = Some(etcd);
        let agent_str = agent.to_string_lossy().into_owned();
        let mut files = Vec::new();
        for host in &self.lab.hosts {
            let hdir = self.dir.join(format!("h{}", host.number));
            std::fs::create_dir_all(&hdir).map_err(anyhow::Error::from)?;
            let subnet_file = hdir.join("subnet.env");
            let _ = std::fs::remove_file(&subnet_file);
            let log = hdir.join(format!("agent-{backend}-{datapath}.log"));
            let _ = std::fs::remove_file(&log);
            let mut args = agent_args(
                &endpoint,
                host.underlay_ip,
                &subnet_file.to_string_lossy(),
                datapath,
            );
            args.extend(flags.iter().map(|f| f.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            active
                .agents
                .push(host.ns.spawn(&agent_str, &args, Some(&log))?);
            files.push((subnet_file, log));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (agent, (_, log)) in active.agents.iter_mut().zip(&files) {
                if let Some(status) = agent.try_wait() {
                    let why = first_error(log).unwrap_or_else(|| last_lines(log, 2));
                    return Err(SetupError::Missing(format!(
                        "overlay-agent --datapath {datapath} exited ({status}): {why}"
                    )));
                }
            }
            let ready: Option<Vec<SubnetEnv>> = files
                .iter()
                .map(|(f, _)| {
                    std::fs::read_to_string(f)
                        .ok()
                        .and_then(|t| SubnetEnv::parse(&t).ok())
                })
                .collect();
            if let Some(envs) = ready {
                return Ok(envs);
            }
            if Instant::now() > deadline || interrupted() {
                return Err(SetupError::Missing(format!(
                    "overlay-agent --datapath {datapath} wrote no subnet.env within 30 s: {}",
                    last_lines(&files[0].1, 2)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The agent's command line, flanneld's flags: what the lead's datapaths must accept.
pub fn agent_args(
    endpoint: &str,
    public_ip: Ipv4Addr,
    subnet_file: &str,
    datapath: &str,
) -> Vec<String> {
    [
        "--etcd-endpoints",
        endpoint,
        "--etcd-prefix",
        ETCD_PREFIX,
        "--iface",
        UNDERLAY_IF,
        "--public-ip",
        &public_ip.to_string(),
        "--subnet-file",
        subnet_file,
        "--datapath",
        datapath,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The first WARN or ERROR line of an agent log, without its timestamp.
fn first_warning(log: &Path) -> Option<String> {
    first_line(log, &[" WARN ", " ERROR "])
}

/// The first ERROR line of an agent log, without its timestamp.
fn first_error(log: &Path) -> Option<String> {
    first_line(log, &[" ERROR "])
}

fn first_line(log: &Path, needles: &[&str]) -> Option<String> {
    std::fs::read_to_string(log)
        .ok()?
        .lines()
        .find(|l| needles.iter().any(|n| l.contains(n)))
        .map(|l| {
            let l = l.trim();
            // Drop the RFC 3339 timestamp tracing puts first.
            match l.split_once(' ') {
                Some((ts, rest)) if ts.contains('T') && ts.ends_with('Z') => rest.trim().to_owned(),
                _ => l.to_owned(),
            }
        })
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(n)..].join(" | ");
    if tail.is_empty() {
        format!("(no output; log {})", path.display())
    } else {
        tail
    }
}

/// What flannel's vxlan backend does on each host (the stand-in's layout): the device, then per
/// peer a permanent neighbour, an FDB entry and an onlink route.
fn setup_kernel_vxlan(hosts: &[Host], peers: impl Fn(&Host) -> Vec<usize>) -> anyhow::Result<()> {
    let subnet = |n: usize| Ipv4Addr::new(172, 16, n as u8, 0);
    let macs = hosts
        .iter()
        .map(|h| flanneld::vxlan_device(&h.ns, h.underlay_ip, subnet(h.number), 1450))
        .collect::<Result<Vec<_>, _>>()?;
    for host in hosts {
        for peer in peers(host) {
            let lease = flanneld::PeerLease {
                subnet: subnet(peer),
                prefix_len: 24,
                public_ip: Ipv4Addr::new(198, 18, 0, peer as u8),
                vtep_mac: Some(macs[peer - 1].clone()),
            };
            flanneld::vxlan_peer(&host.ns, &lease, &macs[peer - 1])?;
        }
    }
    Ok(())
}

/// Removes whatever a mode left on a host: links other than lo and the underlay NIC, routes that
/// are not the underlay's connected route, neighbours, and any XDP/TC program on the NIC.
fn reset_host(host: &Host) {
    let ns = &host.ns;
    if let Ok(out) = ns.ip(&["-o", "link", "show"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name != "lo" && name != UNDERLAY_IF {
                let _ = ns.ip(&["link", "del", name]);
            }
        }
    }
    if let Ok(out) = ns.ip(&["-4", "-o", "route", "show", "table", "main"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !line.contains("proto kernel")
                && let Some(dst) = line.split_whitespace().next()
            {
                let _ = ns.ip(&["route", "del", dst]);
            }
        }
    }
    let _ = ns.ip(&["neigh", "flush", "dev", UNDERLAY_IF]);
    let _ = ns.ip(&["link", "set", "dev", UNDERLAY_IF, "xdp", "off"]);
    let _ = ns.exec("tc", &["qdisc", "del", "dev", UNDERLAY_IF, "clsact"]);
}

/// Reports a host's leftover state (checked after every mode): links and eBPF programs.
pub fn describe_leftovers(host: &Host) -> Option<String> {
    let links = host.ns.ip(&["-o", "link", "show"]).ok()?;
    let extra: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n != "lo" && n != UNDERLAY_IF)
        .collect();
    let mut left = Vec::new();
    if !extra.is_empty() {
        left.push(format!("links {}", extra.join(", ")));
    }
    // eBPF programs still attached in the host (XDP, TC/tcx): an agent's datapath outliving it
    // would distort the next mode. (The agents' pins live in the private bpffs that `ip netns
    // exec` mounts for them, so they go when the agent exits.)
    if let Ok(out) = host.ns.exec("bpftool", &["-j", "net", "show"])
        && let Ok(json) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
    {
        for entry in json.as_array().into_iter().flatten() {
            for (kind, progs) in entry.as_object().into_iter().flatten() {
                if progs.as_array().is_some_and(|a| !a.is_empty()) {
                    left.push(format!("{kind} programs {progs}"));
                }
            }
        }
    }
    (!left.is_empty()).then(|| format!("{}: {}", host.ns.name(), left.join("; ")))
}

/// Fails when the rig is not in its bare state.
pub fn check_clean(rig: &Rig) -> anyhow::Result<()> {
    let left: Vec<String> = rig
        .lab
        .hosts
        .iter()
        .filter_map(describe_leftovers)
        .collect();
    if !left.is_empty() {
        bail!("teardown left {}", left.join("; "));
    }
    Ok(())
}
