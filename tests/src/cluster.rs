//! A whole overlay cluster in the lab: etcd inside the underlay switch's namespace (reachable from
//! every host over the simulated underlay, from nowhere else), one real `overlay-agent` process per
//! host, and docker's part done from each host's subnet.env.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    bpffs::BpfFs,
    lab::{Lab, LabConfig, LabError, SubnetEnv, UNDERLAY_IF},
    netns::{NetNs, NetNsError, NsProcess},
};

/// etcd's client address: the underlay switch's own address.
pub const ETCD_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// etcd's client port.
pub const ETCD_PORT: u16 = 2379;

/// Errors of building or driving a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The lab could not be built.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// A namespace operation failed.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for, with the relevant log lines.
        what: String,
    },
    /// The three-member etcd failed.
    #[error(transparent)]
    EtcdCluster(#[from] crate::etcd_cluster::EtcdClusterError),
    /// A host's real Docker engine failed.
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
}

/// What does docker's part on each host of a [`Cluster`] once its agent wrote subnet.env.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DockerEngine {
    /// A bridge and a veth per container, set up as docker would from subnet.env.
    #[default]
    Imitate,
    /// A real dockerd per host, given its options the two ways operators do: hosts 1, 3, ... by
    /// the drop-in in deploy/, hosts 2, 4, ... by `overlay-agent docker-opts`.
    Real,
}

/// The etcd a [`Cluster`] runs its agents against: the one [`NsEtcd`] of the lab, or a
/// three-member [`crate::etcd_cluster::EtcdCluster`].
pub trait LabEtcd: std::fmt::Debug {
    /// The client URLs the agents are given (`--etcd-endpoints`), in order.
    fn endpoints(&self) -> Vec<String>;
    /// An etcdctl against it.
    fn ctl(&self) -> EtcdCtl;
}

impl LabEtcd for NsEtcd {
    fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    fn ctl(&self) -> EtcdCtl {
        NsEtcd::ctl(self)
    }
}

/// etcd running inside a namespace, killed on drop: the one etcd of the lab, the bench and
/// `cargo xtask run`.
#[derive(Debug)]
pub struct NsEtcd {
    process: NsProcess,
    ns: String,
    data_dir: PathBuf,
}

impl NsEtcd {
    /// Starts etcd in `ns` on [`ETCD_IP`] (which `ns` must own), its log in `dir/etcd.log`, and
    /// waits until it answers.
    pub fn start(ns: &NetNs, dir: &Path) -> Result<Self, ClusterError> {
        // On tmpfs: fsync on a real disk makes filling etcd with thousands of leases slow.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let data_dir = Path::new("/dev/shm").join(format!(
            "overlay-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let endpoint = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let peer = "http://127.0.0.1:2380";
        let data = data_dir.to_string_lossy().into_owned();
        let log = dir.join("etcd.log");
        let process = ns.spawn(
            "etcd",
            &[
                "--name",
                "lab",
                "--data-dir",
                &data,
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                &format!("lab={peer}"),
                "--log-level",
                "warn",
                // Large transactions fill etcd with thousands of leases quickly (bench).
                "--max-txn-ops",
                "1024",
            ],
            Some(&log),
        )?;
        let mut etcd = Self {
            process,
            ns: ns.name().to_owned(),
            data_dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while etcd.etcdctl(&["endpoint", "health"]).is_err() {
            if let Some(status) = etcd.process.try_wait() {
                return Err(ClusterError::Timeout {
                    what: format!(
                        "etcd to answer: it exited ({status}), see {}",
                        log.display()
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: "etcd to answer within 20 s".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(etcd)
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{ETCD_IP}:{ETCD_PORT}")
    }

    /// Puts one key.
    pub fn put(&self, key: &str, value: &str) -> Result<(), NetNsError> {
        // `--` so values starting with '-' are not taken for flags.
        self.etcdctl(&["put", "--", key, value]).map(|_| ())
    }

    /// Puts many keys, a transaction per thousand (the server allows 1024 operations each), so
    /// thousands of leases take seconds rather than a process per key.
    pub fn put_many(&self, pairs: &[(String, String)]) -> Result<(), NetNsError> {
        // etcdctl's txn reads Go-quoted arguments: no compares, the puts, no failure ops.
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        for chunk in pairs.chunks(1000) {
            let mut script = String::from("\n");
            for (k, v) in chunk {
                script.push_str(&format!("put {} {}\n", quote(k), quote(v)));
            }
            script.push_str("\n\n");
            // No compares, so the transaction succeeds unless a put fails, which etcdctl's exit
            // status reports.
            self.ctl().run_with_input(&["txn"], &script)?;
        }
        Ok(())
    }

    /// etcd's Prometheus metrics (`/metrics` on the client URL), fetched from inside the
    /// namespace (needs curl).
    pub fn metrics(&self) -> Result<String, NetNsError> {
        let url = format!("{}/metrics", self.endpoint());
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sf",
            "--max-time",
            "5",
            &url,
        ]);
        output(cmd, "curl /metrics")
    }

    /// Runs etcdctl (v3 API) against it, returning stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, NetNsError> {
        self.ctl().run(args)
    }

    /// An etcdctl for it that other threads can own.
    pub fn ctl(&self) -> EtcdCtl {
        EtcdCtl {
            ns: self.ns.clone(),
            endpoint: self.endpoint(),
        }
    }
}

/// etcdctl (v3 API) against the lab's etcd, run in its namespace.
#[derive(Debug, Clone)]
pub struct EtcdCtl {
    ns: String,
    endpoint: String,
}

impl EtcdCtl {
    /// etcdctl run in namespace `ns` against `endpoints` (comma-joined into `--endpoints`).
    pub fn new(ns: &str, endpoints: &[String]) -> Self {
        Self {
            ns: ns.to_owned(),
            endpoint: endpoints.join(","),
        }
    }

    /// Runs etcdctl with `args`, returning stdout.
    pub fn run(&self, args: &[&str]) -> Result<String, NetNsError> {
        let endpoint = format!("--endpoints={}", self.endpoint);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcdctl", &endpoint])
            .args(args)
            .env("ETCDCTL_API", "3");
        output(cmd, &format!("etcdctl {}", args.join(" ")))
    }
}

impl EtcdCtl {
    /// Runs etcdctl with `args` and `input` on its standard input, returning stdout.
    pub fn run_with_input(&self, args: &[&str], input: &str) -> Result<String, NetNsError> {
        use std::io::Write;
        let what = format!("etcdctl {}", args.join(" "));
        let endpoint = format!("--endpoints={}", self.endpoint);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcdctl", &endpoint])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|source| NetNsError::Spawn {
                command: what.clone(),
                source,
            })?;
        let written = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|source| NetNsError::Spawn {
                command: what.clone(),
                source,
            })?;
        if !out.status.success() || written.is_err() {
            return Err(NetNsError::Failed {
                command: what,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn output(mut cmd: Command, what: &str) -> Result<String, NetNsError> {
    let out = cmd.output().map_err(|source| NetNsError::Spawn {
        command: what.to_owned(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetNsError::Failed {
            command: what.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for NsEtcd {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(3));
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// One agent process and its files.
#[derive(Debug)]
pub struct AgentProcess {
    /// The process (None while stopped).
    pub process: Option<NsProcess>,
    /// Its log.
    pub log: PathBuf,
    /// Its subnet.env.
    pub subnet_file: PathBuf,
    /// The arguments it runs with.
    pub args: Vec<String>,
}

impl AgentProcess {
    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A cluster: the lab, etcd and one agent per host. Agents stop before etcd, etcd before the lab.
#[derive(Debug)]
pub struct Cluster<E = NsEtcd> {
    /// One per host, in host order.
    pub agents: Vec<AgentProcess>,
    /// etcd.
    pub etcd: E,
    /// The hosts.
    pub lab: Lab,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// Where logs and subnet files go.
    pub dir: PathBuf,
    /// The agents' pins. A bpffs an agent mounts itself inside `ip netns exec`'s private mount
    /// namespace dies with the agent, and its programs with it; this one outlives them, as
    /// /sys/fs/bpf does on a real host. Dropped last.
    pub bpffs: BpfFs,
    /// Real dockerd or its imitation, for [`Cluster::start_all`] and [`Cluster::start_docker`].
    pub docker: DockerEngine,
}

/// The lab of [`Cluster::with_backend`]: `hosts` on a 1500-byte underlay, and the network config
/// with the Network 172.16.0.0/12 and `Backend.Type` `backend`.
pub fn backend_lab(prefix: &str, hosts: usize, backend: &str) -> (LabConfig, String) {
    (
        LabConfig {
            prefix: prefix.into(),
            hosts,
            underlay_mtu: 1500,
        },
        format!(r#"{{"Network": "172.16.0.0/12", "Backend": {{"Type": "{backend}"}}}}"#),
    )
}

/// The etcd prefix the cluster uses (the article's).
pub const PREFIX: &str = "/flannel";

impl Cluster {
    /// Builds the lab, starts etcd with `config` at `/flannel/config`, and gives every host a
    /// default route towards the switch (as a real host has, so the agent's default-interface
    /// detection finds eth0). Agents are started with [`Cluster::start_agent`].
    pub fn new(
        config: &LabConfig,
        network_config: &str,
        agent_bin: &Path,
        dir: &Path,
    ) -> Result<Self, ClusterError> {
        Cluster::with_etcd(config, network_config, agent_bin, dir, |lab, dir| {
            NsEtcd::start(&lab.switch, dir)
        })
    }

    /// A cluster of `hosts` on a 1500-byte underlay with the Network 172.16.0.0/12 and
    /// `Backend.Type` `backend`, the agent binary the tests build, files under `dir`.
    pub fn with_backend(
        prefix: &str,
        hosts: usize,
        backend: &str,
        dir: &Path,
    ) -> Result<Self, ClusterError> {
        let (config_lab, config) = backend_lab(prefix, hosts, backend);
        Self::new(&config_lab, &config, crate::etcd::agent_binary(), dir)
    }
}

impl<E: LabEtcd> Cluster<E> {
    /// [`Cluster::new`] with the etcd `start_etcd` starts once the lab and the switch's address
    /// ([`ETCD_IP`]) exist.
    pub fn with_etcd(
        config: &LabConfig,
        network_config: &str,
        agent_bin: &Path,
        dir: &Path,
        start_etcd: impl FnOnce(&Lab, &Path) -> Result<E, ClusterError>,
    ) -> Result<Self, ClusterError> {
        let lab = Lab::new(config)?;
        lab.switch
            .ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "ul0"])?;
        for host in &lab.hosts {
            host.ns
                .ip(&["route", "add", "default", "via", &ETCD_IP.to_string()])?;
        }
        std::fs::create_dir_all(dir).map_err(|source| ClusterError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let etcd = start_etcd(&lab, dir)?;
        etcd.ctl()
            .run(&["put", "--", &format!("{PREFIX}/config"), network_config])?;
        let bpffs = BpfFs::new()?;
        Ok(Self {
            agents: Vec::new(),
            etcd,
            lab,
            agent_bin: agent_bin.to_owned(),
            dir: dir.to_owned(),
            bpffs,
            docker: DockerEngine::Imitate,
        })
    }

    /// The flanneld command line for host `index` (0-based): the article's flags, this host's
    /// subnet file, and `extra`.
    pub fn agent_args(&self, index: usize, extra: &[&str]) -> Vec<String> {
        let subnet_file = self.dir.join(format!("h{}", index + 1)).join("subnet.env");
        let mut args = vec![
            format!("--etcd-endpoints={}", self.etcd.endpoints().join(",")),
            format!("--etcd-prefix={PREFIX}"),
            "--logtostderr=true".into(),
            format!("--iface={UNDERLAY_IF}"),
            format!("--subnet-file={}", subnet_file.display()),
            format!(
                "--bpffs={}",
                self.bpffs.path().join(format!("h{}", index + 1)).display()
            ),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts an agent on every host that has none yet, with `extra` flags, and waits for their
    /// subnet.env files; then does docker's part on each. Returns the subnet.env contents.
    pub fn start_all(&mut self, extra: &[&str]) -> Result<Vec<SubnetEnv>, ClusterError> {
        for index in self.agents.len()..self.lab.hosts.len() {
            let args = self.agent_args(index, extra);
            self.start_agent(index, args)?;
        }
        let mut envs = Vec::new();
        for index in 0..self.lab.hosts.len() {
            let env = self.wait_subnet_env(index, Duration::from_secs(30))?;
            if self.lab.hosts[index].container.is_none() {
                self.start_docker(index, &env)?;
            }
            envs.push(env);
        }
        Ok(envs)
    }

    /// Where host `index`'s real dockerd gets its options (see [`DockerEngine::Real`]).
    pub fn docker_options_from(&self, index: usize) -> crate::docker::OptionsFrom {
        if index.is_multiple_of(2) {
            crate::docker::OptionsFrom::DropIn
        } else {
            crate::docker::OptionsFrom::DockerOpts {
                agent_bin: self.agent_bin.clone(),
            }
        }
    }

    /// Does docker's part on host `index` from its agent's subnet.env `env`, with the cluster's
    /// [`DockerEngine`].
    pub fn start_docker(&mut self, index: usize, env: &SubnetEnv) -> Result<(), ClusterError> {
        match self.docker {
            DockerEngine::Imitate => {
                self.lab.hosts[index].start_docker(env)?;
            }
            DockerEngine::Real => {
                let from = self.docker_options_from(index);
                let hdir = self.dir.join(format!("h{}", index + 1));
                let options = from.options(&self.agents[index].subnet_file, &hdir)?;
                self.lab.hosts[index].start_dockerd(options, true)?;
            }
        }
        Ok(())
    }

    /// Starts (or restarts) the agent of host `index` with `args`.
    pub fn start_agent(&mut self, index: usize, args: Vec<String>) -> Result<(), ClusterError> {
        let hdir = self.dir.join(format!("h{}", index + 1));
        std::fs::create_dir_all(&hdir).map_err(|source| ClusterError::Io {
            path: hdir.clone(),
            source,
        })?;
        let log = hdir.join("agent.log");
        let subnet_file = args
            .iter()
            .find_map(|a| a.strip_prefix("--subnet-file="))
            .map(PathBuf::from)
            .unwrap_or_else(|| "/run/flannel/subnet.env".into());
        let bin = self.agent_bin.to_string_lossy().into_owned();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = self.lab.hosts[index].ns.spawn(&bin, &argv, Some(&log))?;
        self.record_agent(index, process, log, subnet_file, args);
        Ok(())
    }

    /// Makes the started `process` host `index`'s agent (replacing a stopped one on restart).
    fn record_agent(
        &mut self,
        index: usize,
        process: NsProcess,
        log: PathBuf,
        subnet_file: PathBuf,
        args: Vec<String>,
    ) {
        let agent = AgentProcess {
            process: Some(process),
            log,
            subnet_file,
            args,
        };
        if index < self.agents.len() {
            self.agents[index] = agent;
        } else {
            self.agents.push(agent);
        }
    }

    /// Waits until host `index`'s agent has written its subnet.env, and parses it.
    pub fn wait_subnet_env(
        &mut self,
        index: usize,
        within: Duration,
    ) -> Result<SubnetEnv, ClusterError> {
        let deadline = Instant::now() + within;
        loop {
            let agent = &mut self.agents[index];
            if let Some(env) = std::fs::read_to_string(&agent.subnet_file)
                .ok()
                .and_then(|t| SubnetEnv::parse(&t).ok())
            {
                return Ok(env);
            }
            let exited = agent
                .process
                .as_mut()
                .and_then(NsProcess::try_wait)
                .map(|s| format!(" (agent exited: {s})"))
                .unwrap_or_default();
            if !exited.is_empty() || Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: format!(
                        "subnet.env of h{}{exited}; log:\n{}",
                        index + 1,
                        agent.log_text()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the agent of each host in `hosts` (a crash: no cleanup of any kind) and waits for
    /// each process to have exited. The agents' arguments stay, for [`Cluster::restart_agents`].
    pub fn kill_agents(&mut self, hosts: &[usize]) {
        for &i in hosts {
            if let Some(mut p) = self.agents[i].process.take() {
                // SAFETY: signalling our own child, not yet reaped.
                unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGKILL) };
                // Reaps it: once this returns, the process is gone.
                p.stop(Duration::from_secs(5));
            }
        }
    }

    /// Starts the agent of each host in `hosts` again with the arguments it had, and waits until
    /// each answers `/healthz` with 200 (lease held, datapath up): their arguments must carry
    /// [`healthz_flags`].
    pub fn restart_agents(
        &mut self,
        hosts: &[usize],
        within: Duration,
    ) -> Result<(), ClusterError> {
        for &i in hosts {
            let args = self.agents[i].args.clone();
            self.start_agent(i, args)?;
        }
        for &i in hosts {
            self.wait_healthy(i, within)?;
        }
        Ok(())
    }

    /// Waits until host `index`'s agent answers `GET /healthz` with 200, asked inside the host's
    /// namespace on the port of its `--healthz-port` (see [`healthz_flags`]).
    pub fn wait_healthy(&mut self, index: usize, within: Duration) -> Result<(), ClusterError> {
        let port: u16 = self.agents[index]
            .args
            .iter()
            .find_map(|a| a.strip_prefix("--healthz-port="))
            .and_then(|p| p.parse().ok())
            .expect("the agent runs with --healthz-port (healthz_flags)");
        let deadline = Instant::now() + within;
        loop {
            let last = match self.lab.hosts[index]
                .ns
                .run(|| healthz((Ipv4Addr::LOCALHOST, port).into()))?
            {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("{code} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            let agent = &mut self.agents[index];
            let exited = agent.process.as_mut().and_then(NsProcess::try_wait);
            if exited.is_some() || Instant::now() > deadline {
                return Err(ClusterError::Timeout {
                    what: format!(
                        "h{}'s /healthz to answer 200 (last: {last}; exited: {exited:?}); log:\n{}",
                        index + 1,
                        agent.log_text()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The container address of every host that has one.
    pub fn container_ips(&self) -> Vec<Ipv4Addr> {
        self.lab
            .hosts
            .iter()
            .filter_map(|h| h.container.as_ref().map(|c| c.ip))
            .collect()
    }

    /// Pings `to` from host `from`'s container: `count` echoes, `interval` apart.
    pub fn ping(&self, from: usize, to: Ipv4Addr, count: u32) -> Result<(), NetNsError> {
        let c = self.lab.hosts[from]
            .container
            .as_ref()
            .expect("the host has a container");
        c.ns.exec(
            "ping",
            &[
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.1",
                "-W",
                "1",
                &to.to_string(),
            ],
        )
        .map(|_| ())
    }

    /// Every container pings every other; returns the pairs that failed.
    pub fn ping_matrix(&self) -> Vec<String> {
        let ips = self.container_ips();
        let mut failures = Vec::new();
        for from in 0..self.lab.hosts.len() {
            for (j, to) in ips.iter().enumerate() {
                if j != from
                    && let Err(e) = self.ping(from, *to, 2)
                {
                    failures.push(format!("h{} -> {to}: {e}", from + 1));
                }
            }
        }
        failures
    }
}

/// The agent's health endpoint in a lab host: on the host's own loopback, port [`HEALTHZ_PORT`].
pub const HEALTHZ_PORT: u16 = 9471;

/// The flags that give an agent the health endpoint [`Cluster::wait_healthy`] asks (200 means
/// "lease held, datapath up"; `--healthz-strict` only changes the 200 body to `ok`, and keeps
/// that flag exercised).
pub fn healthz_flags() -> [String; 3] {
    [
        "--healthz-ip=127.0.0.1".into(),
        format!("--healthz-port={HEALTHZ_PORT}"),
        "--healthz-strict".into(),
    ]
}

/// `GET /healthz` on `addr` (from the calling thread's namespace): (status code, body).
pub fn healthz(addr: std::net::SocketAddr) -> std::io::Result<(u16, String)> {
    http_get(addr, "/healthz")
}

/// One value of the agent's `/metrics` on `addr` (the listener of `--healthz-port`).
pub fn metric(addr: std::net::SocketAddr, name: &str) -> std::io::Result<f64> {
    let (_, body) = http_get(addr, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no metric {name} in:\n{body}")))
}

/// `GET path` on `addr`: (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {resp:?}")))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// One ping run's result: what `ping -c N` printed in its summary.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PingStats {
    /// Echo requests sent.
    pub sent: u32,
    /// Echo replies received.
    pub received: u32,
    /// Round-trip times in milliseconds (min, avg, max), when any reply came.
    pub rtt_ms: Option<(f64, f64, f64)>,
}

impl PingStats {
    /// Parses iputils ping's summary lines (`3 packets transmitted, 3 received, ...` and
    /// `rtt min/avg/max/mdev = 0.041/0.060/0.083/0.017 ms`).
    pub fn parse(output: &str) -> Self {
        let mut stats = Self::default();
        for line in output.lines() {
            if line.contains("packets transmitted") {
                // iputils: "3 packets transmitted, 3 received"; busybox: "3 packets
                // transmitted, 3 packets received".
                let words: Vec<&str> = line.split_whitespace().collect();
                for (i, w) in words.iter().enumerate() {
                    let Ok(n) = w.parse::<u32>() else { continue };
                    let mut what = words[i + 1..].iter().copied();
                    let what = match what.next() {
                        Some("packets") => what.next(),
                        other => other,
                    };
                    match what {
                        Some(t) if t.starts_with("transmitted") => stats.sent = n,
                        Some(r) if r.starts_with("received") => stats.received = n,
                        _ => {}
                    }
                }
            } else if let Some(values) = line
                .strip_prefix("rtt min/avg/max/mdev = ")
                .or_else(|| line.strip_prefix("round-trip min/avg/max = "))
            {
                let v: Vec<f64> = values
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .split('/')
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if v.len() >= 3 {
                    stats.rtt_ms = Some((v[0], v[1], v[2]));
                }
            }
        }
        stats
    }
}

/// A host's private `/run` for agents started by [`Cluster::start_agent_private_run`].
pub fn host_run_dir(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("h{}", index + 1)).join("run")
}

impl<E: LabEtcd> Cluster<E> {
    /// Starts (or restarts) the agent of host `index` with `args` verbatim, in a mount namespace
    /// of its own where `/run` is this host's own directory ([`host_run_dir`]), as a separate
    /// machine would have: so the article's `--subnet-file=/run/flannel/subnet.env` can be used
    /// as it is by every host. `/run/flannel` is created first, as systemd's
    /// `RuntimeDirectory=flannel` does. The subnet file is read from the host's directory.
    pub fn start_agent_private_run(
        &mut self,
        index: usize,
        args: Vec<String>,
    ) -> Result<(), ClusterError> {
        let hdir = self.dir.join(format!("h{}", index + 1));
        let run = host_run_dir(&self.dir, index);
        let flannel = run.join("flannel");
        std::fs::create_dir_all(&flannel).map_err(|source| ClusterError::Io {
            path: flannel.clone(),
            source,
        })?;
        let log = hdir.join("agent.log");
        let subnet_file = args
            .iter()
            .find_map(|a| a.strip_prefix("--subnet-file="))
            .unwrap_or("/run/flannel/subnet.env");
        let subnet_file = match Path::new(subnet_file).strip_prefix("/run") {
            Ok(rest) => run.join(rest),
            Err(_) => PathBuf::from(subnet_file),
        };
        // `ip netns exec` already gives the command a mount namespace of its own (with / as a
        // slave, so nothing propagates back); the bind mount lives and dies with the agent.
        let script = "mount --bind \"$0\" /run && exec \"$@\"";
        let run_s = run.to_string_lossy().into_owned();
        let bin = self.agent_bin.to_string_lossy().into_owned();
        let mut argv: Vec<&str> = vec!["-c", script, &run_s, &bin];
        argv.extend(args.iter().map(String::as_str));
        let process = self.lab.hosts[index].ns.spawn("sh", &argv, Some(&log))?;
        self.record_agent(index, process, log, subnet_file, args);
        Ok(())
    }

    /// Every container pings every other, all at once, `count` echoes each; returns
    /// `(from host, to host, stats)` for every ordered pair, in order.
    pub fn ping_matrix_stats(&self, count: u32) -> Vec<(usize, usize, PingStats)> {
        /// Pings in flight at once (a 100-host lab has 9900 pairs).
        const BATCH: usize = 64;
        let mut pairs = Vec::new();
        for (from, host) in self.lab.hosts.iter().enumerate() {
            for (to, other) in self.lab.hosts.iter().enumerate() {
                if let (Some(c), Some(target)) = (&host.container, &other.container)
                    && from != to
                {
                    pairs.push((from, to, host, c, target.ip));
                }
            }
        }
        let mut results = Vec::with_capacity(pairs.len());
        for batch in pairs.chunks(BATCH) {
            let children: Vec<_> = batch
                .iter()
                .map(|(from, to, host, c, ip)| {
                    let (count, ip) = (count.to_string(), ip.to_string());
                    let ping = ["-c", &count, "-i", "0.2", "-W", "1", &ip];
                    // With a real docker, as the article does it: `docker exec <c> ping`.
                    let mut cmd = match (&host.dockerd, &c.docker_name) {
                        (Some(daemon), Some(name)) => {
                            let mut args = vec!["exec", name.as_str(), "ping"];
                            args.extend_from_slice(&ping);
                            daemon.command(&args)
                        }
                        _ => {
                            let mut cmd = Command::new("ip");
                            cmd.args(["netns", "exec", c.ns.name(), "ping", "-n"])
                                .args(ping);
                            cmd
                        }
                    };
                    let child = cmd
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::null())
                        .spawn();
                    (*from, *to, child)
                })
                .collect();
            results.extend(children.into_iter().map(|(from, to, child)| {
                let stats = child
                    .and_then(|c| c.wait_with_output())
                    .map(|out| PingStats::parse(&String::from_utf8_lossy(&out.stdout)))
                    .unwrap_or_default();
                (from, to, stats)
            }));
        }
        results
    }
}

/// Sends `bytes` bytes over TCP from the container `from` to the container `to` (listening on
/// `port`) and checks they arrive intact. Every step has a deadline, so a stalled datapath fails
/// the test instead of hanging it.
pub fn tcp_transfer(
    from: &crate::lab::Container,
    to: &crate::lab::Container,
    port: u16,
    bytes: usize,
) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    const STEP: Duration = Duration::from_secs(20);
    let payload: Vec<u8> = (0..bytes as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let ip = to.ip;
    let listener = to
        .ns
        .run(|| std::net::TcpListener::bind((ip, port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("listening on {ip}:{port}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        let server = s.spawn(move || -> Result<Vec<u8>, String> {
            let deadline = Instant::now() + STEP;
            let (mut conn, _) = loop {
                match listener.accept() {
                    Ok(c) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err("no connection within 20 s".into());
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            conn.set_nonblocking(false).map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(STEP))
                .map_err(|e| e.to_string())?;
            let mut got = Vec::new();
            conn.read_to_end(&mut got)
                .map_err(|e| format!("receiving after {} bytes: {e}", got.len()))?;
            Ok(got)
        });
        let sent = from
            .ns
            .run(|| -> Result<(), String> {
                let mut conn = std::net::TcpStream::connect_timeout(&(ip, port).into(), STEP)
                    .map_err(|e| format!("connecting to {ip}:{port}: {e}"))?;
                conn.set_write_timeout(Some(STEP))
                    .map_err(|e| e.to_string())?;
                conn.write_all(&payload)
                    .map_err(|e| format!("sending: {e}"))
            })
            .map_err(|e| e.to_string())?;
        let got = server
            .join()
            .map_err(|_| "receiver panicked".to_string())??;
        sent?;
        if got != payload {
            return Err(format!(
                "{} of {} bytes arrived, or corrupted",
                got.len(),
                payload.len()
            ));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summaries() {
        let ok = "PING 172.16.5.2 (172.16.5.2) 56(84) bytes of data.\n\n\
                  --- 172.16.5.2 ping statistics ---\n\
                  3 packets transmitted, 3 received, 0% packet loss, time 402ms\n\
                  rtt min/avg/max/mdev = 0.041/0.060/0.083/0.017 ms\n";
        assert_eq!(
            PingStats::parse(ok),
            PingStats {
                sent: 3,
                received: 3,
                rtt_ms: Some((0.041, 0.060, 0.083))
            }
        );
        let busybox = "--- 172.16.5.2 ping statistics ---\n\
                       3 packets transmitted, 2 packets received, 33% packet loss\n\
                       round-trip min/avg/max = 0.052/0.064/0.076 ms\n";
        assert_eq!(
            PingStats::parse(busybox),
            PingStats {
                sent: 3,
                received: 2,
                rtt_ms: Some((0.052, 0.064, 0.076))
            }
        );
        let lost = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2041ms\n";
        assert_eq!(
            PingStats::parse(lost),
            PingStats {
                sent: 3,
                received: 0,
                rtt_ms: None
            }
        );
    }
}
