//! A running flannel cluster migrated to overlay-agent host by host, and rolled back, with every
//! container pinging every other at 20/s throughout: the integration test and
//! `cargo xtask run --migrate-from-flannel` both run it, and report the loss per host swap.
//!
//! A swap to the agent is the README's: start the agent beside the running flanneld (it takes
//! over the lease, the device and the chains while flanneld still runs), then stop flanneld. A
//! swap back is `systemctl stop overlay-agent`, `overlay-agent teardown --to-flanneld`, flanneld
//! started, then `overlay-agent teardown --to-flanneld` again.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use crate::{
    cluster::{Cluster, ClusterError, PREFIX, healthz_flags},
    flanneld::{Backend, Flanneld, FlanneldError, HostSpec, subnet_file},
    flow::{PingFlow, Reply},
    lab::{LabConfig, SubnetEnv},
    netns::NetNsError,
};

/// Pings per second between each pair of containers.
const PINGS_PER_SECOND: u32 = 20;
/// Replies every flow must get after a swap before it counts as done: the swap's losses are
/// then visible as gaps below them.
const REPLIES_AFTER_SWAP: usize = 10;

/// Errors of running the migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A stand-in failed.
    #[error(transparent)]
    Flanneld(#[from] FlanneldError),
    /// A namespace command failed.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// Traffic did not behave.
    #[error("{0}")]
    Traffic(String),
}

/// Which way a host was swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// flanneld -> overlay-agent.
    ToAgent,
    /// overlay-agent -> flanneld.
    ToFlanneld,
}

/// One host swap and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// 1-based host number.
    pub host: usize,
    /// Which way.
    pub direction: Direction,
    /// Echo requests sent by every flow while the swap ran (from the last reply before it to
    /// the last reply after it).
    pub sent: u32,
    /// Of those, the ones never answered, per flow as (from host, to host, icmp_seq).
    pub lost: Vec<(usize, usize, u32)>,
}

impl std::fmt::Display for Swap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.direction {
            Direction::ToAgent => "flanneld -> overlay-agent",
            Direction::ToFlanneld => "overlay-agent -> flanneld",
        };
        write!(
            f,
            "h{} {what}: {} of {} pings lost",
            self.host,
            self.lost.len(),
            self.sent
        )
    }
}

/// How to run it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Namespace prefix.
    pub prefix: String,
    /// The flannel backend.
    pub backend: Backend,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// The agents' flags beyond the article's (e.g. `--datapath=ebpf`).
    pub agent_flags: Vec<String>,
    /// Swap every host back to flanneld afterwards.
    pub rollback: bool,
    /// Where logs and subnet files go.
    pub dir: PathBuf,
}

/// The flows, one per ordered pair of hosts.
struct Flows {
    flows: Vec<(usize, usize, PingFlow)>,
}

impl Flows {
    fn max_seqs(&self) -> Vec<u32> {
        self.flows
            .iter()
            .map(|(_, _, f)| f.replies().iter().map(|r| r.seq).max().unwrap_or(0))
            .collect()
    }

    /// Waits for [`REPLIES_AFTER_SWAP`] more replies on every flow, then reports what was lost
    /// between `before` (each flow's highest answered request when the swap began) and now.
    fn settle(
        &mut self,
        host: usize,
        direction: Direction,
        before: &[u32],
    ) -> Result<Swap, MigrationError> {
        for (from, to, flow) in &mut self.flows {
            flow.wait_replies(flow.count(), REPLIES_AFTER_SWAP, Duration::from_secs(20))
                .map_err(|e| {
                    MigrationError::Traffic(format!("h{from} -> h{to} after swapping h{host}: {e}"))
                })?;
        }
        let after = self.max_seqs();
        let mut swap = Swap {
            host,
            direction,
            sent: 0,
            lost: Vec::new(),
        };
        for (((from, to, flow), &b), &a) in self.flows.iter().zip(before).zip(&after) {
            swap.sent += a - b;
            let replies: Vec<Reply> = flow.replies();
            swap.lost.extend(
                crate::flow::lost(&replies)
                    .into_iter()
                    .filter(|&s| s > b && s <= a)
                    .map(|s| (*from, *to, s)),
            );
        }
        Ok(swap)
    }
}

/// The migration's cluster: etcd, three hosts, a stand-in or an agent on each.
pub struct Migration {
    /// The cluster (its agents are started by the swaps).
    pub cluster: Cluster,
    plan: Plan,
    standins: Vec<Option<Flanneld>>,
    flows: Option<Flows>,
}

fn network_config(backend: Backend) -> &'static str {
    match backend {
        // The article's: no Backend at all means udp.
        Backend::Udp => r#"{"Network": "172.16.0.0/12"}"#,
        Backend::Vxlan => r#"{"Network": "172.16.0.0/12", "Backend": {"Type": "vxlan"}}"#,
    }
}

impl Migration {
    /// Three flanneld hosts with a container each, every container reaching every other, and the
    /// ping flows running.
    pub fn flannel_cluster(plan: Plan) -> Result<Self, MigrationError> {
        let lab = LabConfig {
            prefix: plan.prefix.clone(),
            hosts: 3,
            underlay_mtu: 1500,
        };
        let cluster = Cluster::new(
            &lab,
            network_config(plan.backend),
            &plan.agent_bin,
            &plan.dir,
        )?;
        let mut me = Self {
            cluster,
            plan,
            standins: Vec::new(),
            flows: None,
        };
        for i in 0..3 {
            let standin = me.start_flanneld(i)?;
            me.standins.push(Some(standin));
        }
        for i in 0..3 {
            let env = std::fs::read_to_string(subnet_file(&me.plan.dir, i))
                .map_err(|e| MigrationError::Traffic(format!("flanneld's subnet file: {e}")))?;
            let env = SubnetEnv::parse(&env).map_err(ClusterError::from)?;
            me.cluster.lab.hosts[i]
                .start_docker(&env)
                .map_err(ClusterError::from)?;
        }
        // The stand-ins follow each other's leases: every pair answers once they have.
        let ips = me.cluster.container_ips();
        let mut flows = Vec::new();
        for (from, host) in me.cluster.lab.hosts.iter().enumerate() {
            for (to, ip) in ips.iter().enumerate() {
                if to == from {
                    continue;
                }
                let ns = &host.container.as_ref().expect("started above").ns;
                let interval = format!("{:.2}", 1.0 / f64::from(PINGS_PER_SECOND));
                let flow = PingFlow::start(ns, *ip, &interval, 5).map_err(|e| {
                    MigrationError::Traffic(format!(
                        "h{} -> h{} under flanneld: {e}",
                        from + 1,
                        to + 1
                    ))
                })?;
                flows.push((from + 1, to + 1, flow));
            }
        }
        me.flows = Some(Flows { flows });
        Ok(me)
    }

    fn host_spec(&self, i: usize) -> HostSpec {
        let host = &self.cluster.lab.hosts[i];
        HostSpec {
            ns: host.ns.name().to_owned(),
            public_ip: host.underlay_ip,
            subnet: Ipv4Addr::new(172, 16, 10 + i as u8, 0),
            network: (Ipv4Addr::new(172, 16, 0, 0), 12),
            underlay_mtu: 1500,
            subnet_file: subnet_file(&self.plan.dir, i),
            prefix: PREFIX.to_owned(),
        }
    }

    fn start_flanneld(&self, i: usize) -> Result<Flanneld, MigrationError> {
        let spec = self.host_spec(i);
        Ok(Flanneld::start(
            &spec,
            &self.cluster.lab.hosts[i].ns,
            &self.cluster.etcd,
            self.plan.backend,
        )?)
    }

    fn flows(&mut self) -> &mut Flows {
        self.flows
            .as_mut()
            .expect("flows run from flannel_cluster on")
    }

    /// Host `i` (0-based) from flanneld to the agent: the agent starts beside the running
    /// flanneld, with its subnet file; once the agent is ready, flanneld stops; then the agent
    /// finishes the takeover alone.
    pub fn to_agent(&mut self, i: usize) -> Result<Swap, MigrationError> {
        let before = self.flows().max_seqs();
        self.start_agent_beside(i)?;
        if let Some(standin) = self.standins[i].take() {
            standin.stop();
        }
        self.wait_taken_over(i)?;
        self.flows().settle(i + 1, Direction::ToAgent, &before)
    }

    /// Starts host `i`'s agent beside its running flanneld and waits until it is ready (the
    /// takeover done as far as it goes while flanneld runs).
    pub fn start_agent_beside(&mut self, i: usize) -> Result<(), MigrationError> {
        let mut flags: Vec<String> = healthz_flags().into();
        flags.extend(self.plan.agent_flags.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let args = self.cluster.agent_args(i, &flags);
        self.cluster.start_agent(i, args)?;
        self.cluster.wait_healthy(i, Duration::from_secs(30))?;
        Ok(())
    }

    /// Host `i` handed back while its flanneld still runs (the agent started beside it, then
    /// rolled back before flanneld was stopped): the agent stops, and one
    /// `overlay-agent teardown --to-flanneld` gives the traffic back to the running flanneld.
    pub fn back_to_running_flanneld(&mut self, i: usize) -> Result<Swap, MigrationError> {
        let before = self.flows().max_seqs();
        self.stop_agent(i);
        self.hand_back(i)?;
        self.nothing_left(i)?;
        self.flows().settle(i + 1, Direction::ToFlanneld, &before)
    }

    /// Stops host `i`'s agent (SIGTERM, as systemctl stop).
    fn stop_agent(&mut self, i: usize) {
        if let Some(mut p) = self.cluster.agents[i].process.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// `overlay-agent teardown --to-flanneld` on host `i`, with the agent's pins.
    fn hand_back(&self, i: usize) -> Result<(), MigrationError> {
        let bin = self.plan.agent_bin.display().to_string();
        let bpffs = format!("--bpffs={}", self.bpffs(i).display());
        self.cluster.lab.hosts[i]
            .ns
            .exec(&bin, &[&bpffs, "teardown", "--to-flanneld"])?;
        Ok(())
    }

    fn bpffs(&self, i: usize) -> PathBuf {
        self.cluster.bpffs.path().join(format!("h{}", i + 1))
    }

    /// Fails unless nothing of the agent's is left on host `i`: no pins, no handover device.
    fn nothing_left(&self, i: usize) -> Result<(), MigrationError> {
        let bpffs = self.bpffs(i);
        let ns = &self.cluster.lab.hosts[i].ns;
        if ns.ip(&["link", "show", "flannel-handovr"]).is_ok() || bpffs.exists() {
            return Err(MigrationError::Traffic(format!(
                "h{}: the hand-back left the handover device or pins under {}",
                i + 1,
                bpffs.display()
            )));
        }
        Ok(())
    }

    /// Host `i` from flanneld to the agent with `flags`, the restart way: flanneld stops first,
    /// then the agent starts with its subnet file. What the TUN datapath needs (with udp, flanneld
    /// holds `flannel0` and the port); forwarding pauses meanwhile, and the loss is reported.
    pub fn replace_with_agent(&mut self, i: usize, flags: &[&str]) -> Result<Swap, MigrationError> {
        let before = self.flows().max_seqs();
        if let Some(standin) = self.standins[i].take() {
            standin.stop();
        }
        let mut all: Vec<String> = healthz_flags().into();
        all.extend(flags.iter().map(|f| f.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let args = self.cluster.agent_args(i, &all);
        self.cluster.start_agent(i, args)?;
        self.cluster.wait_healthy(i, Duration::from_secs(30))?;
        self.flows().settle(i + 1, Direction::ToAgent, &before)
    }

    /// Waits until the agent of host `i` holds the overlay device itself: the handover device is
    /// gone and the device is a TUN that persists (the agent's, not flanneld's).
    fn wait_taken_over(&mut self, i: usize) -> Result<(), MigrationError> {
        let ns = &self.cluster.lab.hosts[i].ns;
        let device = self.plan.backend.device();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let handover = ns.ip(&["link", "show", "flannel-handovr"]).is_ok();
            let details = ns
                .ip(&["-d", "link", "show", device])
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if !handover && details.contains("tun type tun") && details.contains("persist") {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(MigrationError::Traffic(format!(
                    "h{}'s agent did not take {device} over (handover device present: {handover}; \
                     {device}: {details}); log:\n{}",
                    i + 1,
                    self.cluster.agents[i].log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Host `i` back to flanneld: the agent stops, `overlay-agent teardown --to-flanneld` hands
    /// the host back (vxlan: flanneld's kernel device, forwarding; udp: a bridge), flanneld
    /// starts with the agent's subnet file, and the same command again removes the bridge.
    pub fn to_flanneld(&mut self, i: usize) -> Result<Swap, MigrationError> {
        let before = self.flows().max_seqs();
        self.stop_agent(i);
        self.hand_back(i)?;
        let ns = &self.cluster.lab.hosts[i].ns;
        if self.plan.backend == Backend::Vxlan {
            // What flanneld will keep: its kind of device, answering to the lease's VtepMAC.
            let link = ns.ip(&["-d", "link", "show", "flannel.1"])?;
            let link = String::from_utf8_lossy(&link.stdout).into_owned();
            let published = crate::flanneld::leases(&self.cluster.etcd.ctl(), PREFIX)?
                .into_iter()
                .find(|l| l.public_ip == self.cluster.lab.hosts[i].underlay_ip)
                .and_then(|l| l.vtep_mac)
                .unwrap_or_default();
            if !link.contains("vxlan id 1 ") || published.is_empty() || !link.contains(&published) {
                return Err(MigrationError::Traffic(format!(
                    "h{}: the hand-back left no vxlan device answering to the lease's VtepMAC \
                     {published}: {link}",
                    i + 1
                )));
            }
        }
        let standin = self.start_flanneld(i)?;
        self.standins[i] = Some(standin);
        // Once flanneld runs: what the hand-back left for it (udp's bridge) goes.
        self.hand_back(i)?;
        self.nothing_left(i)?;
        self.flows().settle(i + 1, Direction::ToFlanneld, &before)
    }

    /// Every host swapped to the agent, then (with `rollback`) back, in host order; `progress`
    /// hears of each swap as it is done.
    pub fn run(&mut self, mut progress: impl FnMut(&Swap)) -> Result<Vec<Swap>, MigrationError> {
        let mut swaps = Vec::new();
        for i in 0..3 {
            let swap = self.to_agent(i)?;
            progress(&swap);
            swaps.push(swap);
        }
        if self.plan.rollback {
            for i in 0..3 {
                let swap = self.to_flanneld(i)?;
                progress(&swap);
                swaps.push(swap);
            }
        }
        Ok(swaps)
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        // Flows and stand-ins before the namespaces they live in.
        self.flows = None;
        self.standins.clear();
    }
}
