//! A real three-member etcd cluster in the lab, each member in a network namespace of its own,
//! and the faults the etcd-fault tests inflict on it.
//!
//! ```text
//!   [lab-net]  bridge ul0 --+-- ulh1 <-veth-> eth0 [host h1]        198.18.0.1
//!                           +-- ...
//!                           +-- ulm1 <-veth-> eth0 [member m1]      198.18.0.251
//!                           +-- ulm2 <-veth-> eth0 [member m2]      198.18.0.252
//!                           +-- ulm3 <-veth-> eth0 [member m3]      198.18.0.253
//! ```
//! Each member is Debian's `/usr/bin/etcd` serving clients on `<its address>:2379` and its peers
//! on `<its address>:2380`, its data on `/dev/shm` (as [`crate::cluster::NsEtcd`]'s), kept
//! across [`EtcdCluster::kill`] and [`EtcdCluster::start`] so a restarted member rejoins with
//! what it had. etcdctl runs in the lab's switch namespace, which reaches every member over the
//! bridge whatever is done to a host.
//!
//! A [`crate::cluster::Cluster`] runs on it through [`crate::cluster::LabEtcd`]
//! ([`Cluster::with_etcd_cluster`]): its agents get every member's client URL, m1 first.
//! Dropping the cluster kills the members, deletes their data and their namespaces.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{
    cluster::{Cluster, ClusterError, EtcdCtl, LabEtcd},
    netns::{NetNs, NetNsError, NsProcess, veth},
};

/// Number of members.
pub const MEMBERS: usize = 3;
/// Members' client port.
pub const CLIENT_PORT: u16 = 2379;
/// Members' peer port.
pub const PEER_PORT: u16 = 2380;
/// Members' raft heartbeat interval: twice etcd's default, as the machine has two cores and runs
/// builds beside the tests, and a member starved for a moment must not be taken for dead.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(200);
/// Members' raft election timeout (twice etcd's default, for the same reason). A follower waits
/// a random time between this and twice this without a heartbeat before it stands for leader,
/// so after the leader's death no member serves for up to twice this, plus the vote.
pub const ELECTION_TIMEOUT: Duration = Duration::from_millis(2000);

/// Member `index`'s (0-based) address on the lab's underlay: 198.18.0.251 for m1.
pub fn member_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 251 + index as u8)
}

/// Member `index`'s client URL, as the agents are given it.
pub fn member_url(index: usize) -> String {
    format!("http://{}:{CLIENT_PORT}", member_ip(index))
}

/// Errors of the member cluster.
#[derive(Debug, thiserror::Error)]
pub enum EtcdClusterError {
    /// A namespace, link or etcdctl command failed.
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
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was waited for, and what was seen last.
        what: String,
    },
    /// etcdctl answered something this module cannot read.
    #[error("unexpected answer from {what}: {output}")]
    Unexpected {
        /// The command.
        what: String,
        /// What it printed.
        output: String,
    },
    /// An operation needs the member running and it is not, or the reverse.
    #[error("m{member}: {reason}")]
    Member {
        /// 1-based member number.
        member: usize,
        /// What is wrong.
        reason: String,
    },
}

type Result<T, E = EtcdClusterError> = std::result::Result<T, E>;

/// One member: its namespace, its process while it runs, its files.
#[derive(Debug)]
struct Member {
    /// `m1`, `m2`, `m3`: etcd's `--name`.
    name: String,
    process: Option<NsProcess>,
    data_dir: PathBuf,
    log: PathBuf,
    /// Declared last: the namespace goes after the process in it.
    ns: NetNs,
}

/// What `etcdctl endpoint status` says of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's raft id.
    pub id: u64,
    /// The raft id of the leader it follows (0: none).
    pub leader: u64,
    /// Its raft term.
    pub raft_term: u64,
}

/// Three etcd members on the lab's bridge. Dropping it kills them and deletes their data.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    /// Raft id of each member, learnt once the cluster first answered.
    ids: Vec<u64>,
    /// Where etcdctl runs: the lab's switch namespace.
    ctl_ns: String,
    /// The `--initial-cluster` value every member starts with.
    initial_cluster: String,
    /// `--initial-cluster-token`, unique to this cluster.
    token: String,
}

impl EtcdCluster {
    /// Creates the members' namespaces on `switch`'s bridge `ul0` (names `<prefix>-m1-...`),
    /// starts all three, and waits until each answers and a leader is elected. Logs go to
    /// `dir/m<N>.log`.
    pub fn new(switch: &NetNs, prefix: &str, dir: &Path) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        std::fs::create_dir_all(dir).map_err(|source| EtcdClusterError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let mut members = Vec::with_capacity(MEMBERS);
        for index in 0..MEMBERS {
            let name = format!("m{}", index + 1);
            let ns = NetNs::new(&format!("{prefix}-{name}"))?;
            let port = format!("ul{name}");
            veth(switch, &port, &ns, "eth0")?;
            switch.ip(&["link", "set", &port, "master", "ul0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", member_ip(index)),
                "dev",
                "eth0",
            ])?;
            // Same shape as NsEtcd's, so the lab's cleanup of a killed run finds them.
            let data_dir = Path::new("/dev/shm")
                .join(format!("overlay-etcd-{}-c{n}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&data_dir);
            members.push(Member {
                log: dir.join(format!("{name}.log")),
                name,
                process: None,
                data_dir,
                ns,
            });
        }
        let initial_cluster = (0..MEMBERS)
            .map(|i| format!("m{}=http://{}:{PEER_PORT}", i + 1, member_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            ids: Vec::new(),
            ctl_ns: switch.name().to_owned(),
            initial_cluster,
            token: format!("overlay-tests-{}-{n}", std::process::id()),
        };
        // All at once: the first member alone has no quorum to answer with.
        for index in 0..MEMBERS {
            cluster.start(index)?;
        }
        let all: Vec<usize> = (0..MEMBERS).collect();
        cluster.wait_healthy(&all, Duration::from_secs(30))?;
        cluster.ids = (0..MEMBERS)
            .map(|i| cluster.status(i).map(|s| s.id))
            .collect::<Result<_>>()?;
        cluster.wait_leader(Duration::from_secs(20))?;
        Ok(cluster)
    }

    /// Member `index`'s client URL.
    pub fn endpoint(&self, index: usize) -> String {
        member_url(index)
    }

    /// Member `index`'s etcd name (`m1`, ...).
    pub fn name(&self, index: usize) -> &str {
        &self.members[index].name
    }

    /// Member `index`'s log.
    pub fn log_text(&self, index: usize) -> String {
        std::fs::read_to_string(&self.members[index].log).unwrap_or_default()
    }

    /// Starts member `index` (again, after [`EtcdCluster::kill`]: with its data, so it rejoins
    /// as the member it was). Does not wait: alone it may have no quorum to answer with; see
    /// [`EtcdCluster::wait_healthy`].
    pub fn start(&mut self, index: usize) -> Result<()> {
        let ip = member_ip(index);
        let client = member_url(index);
        let peer = format!("http://{ip}:{PEER_PORT}");
        let member = &mut self.members[index];
        if member.process.is_some() {
            return Err(EtcdClusterError::Member {
                member: index + 1,
                reason: "started while it runs".into(),
            });
        }
        let data = member.data_dir.to_string_lossy().into_owned();
        let process = member.ns.spawn(
            "etcd",
            &[
                "--name",
                &member.name,
                "--data-dir",
                &data,
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                &self.token,
                "--heartbeat-interval",
                &HEARTBEAT_INTERVAL.as_millis().to_string(),
                "--election-timeout",
                &ELECTION_TIMEOUT.as_millis().to_string(),
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ],
            Some(&member.log),
        )?;
        member.process = Some(process);
        Ok(())
    }

    /// SIGKILLs member `index` (a crash: its connections reset, nothing is flushed) and reaps it.
    /// Its data stays for [`EtcdCluster::start`].
    pub fn kill(&mut self, index: usize) -> Result<()> {
        let Some(mut process) = self.members[index].process.take() else {
            return Err(EtcdClusterError::Member {
                member: index + 1,
                reason: "killed while not running".into(),
            });
        };
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(process.pid() as libc::pid_t, libc::SIGKILL) };
        // Reaps it: once this returns, the process is gone.
        process.stop(Duration::from_secs(5));
        Ok(())
    }

    /// Kills two members, quorum with them: the leader and the follower after it (in member
    /// order). Returns the members killed; one follower stays, without a leader.
    pub fn stop_quorum(&mut self) -> Result<[usize; 2]> {
        let leader = self.leader()?;
        let other = (leader + 1) % MEMBERS;
        self.kill(leader)?;
        self.kill(other)?;
        Ok([leader, other])
    }

    /// True while member `index`'s process runs.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.members[index]
            .process
            .as_mut()
            .is_some_and(|p| p.try_wait().is_none())
    }

    /// The members whose processes run, in member order.
    pub fn running(&mut self) -> Vec<usize> {
        (0..MEMBERS).filter(|&i| self.is_running(i)).collect()
    }

    /// The namespace observers reach every member from (where etcdctl runs).
    pub fn ctl_ns(&self) -> &str {
        &self.ctl_ns
    }

    /// etcdctl against member `index` alone.
    pub fn ctl_for(&self, index: usize) -> EtcdCtl {
        EtcdCtl::new(&self.ctl_ns, &[member_url(index)])
    }

    /// One etcdctl per member, in member order (for observers that must not depend on which
    /// member is up).
    pub fn member_ctls(&self) -> Vec<EtcdCtl> {
        (0..MEMBERS).map(|i| self.ctl_for(i)).collect()
    }

    /// `etcdctl endpoint status` of member `index`.
    pub fn status(&self, index: usize) -> Result<MemberStatus> {
        let out = self.ctl_for(index).run(&[
            "--command-timeout=2s",
            "--dial-timeout=1s",
            "endpoint",
            "status",
            "-w",
            "json",
        ])?;
        let unexpected = || EtcdClusterError::Unexpected {
            what: format!("etcdctl endpoint status of m{}", index + 1),
            output: out.clone(),
        };
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|_| unexpected())?;
        let status = &v[0]["Status"];
        Ok(MemberStatus {
            id: status["header"]["member_id"]
                .as_u64()
                .ok_or_else(unexpected)?,
            leader: status["leader"].as_u64().ok_or_else(unexpected)?,
            raft_term: status["raftTerm"].as_u64().ok_or_else(unexpected)?,
        })
    }

    /// The leader, as every running member that answers agrees it is (an error while they
    /// disagree, none answers, or the leader they name does not run).
    pub fn leader(&mut self) -> Result<usize> {
        let running = self.running();
        let mut leaders = Vec::new();
        let mut errors = Vec::new();
        for &i in &running {
            match self.status(i) {
                Ok(s) => leaders.push(s.leader),
                Err(e) => errors.push(format!("m{}: {e}", i + 1)),
            }
        }
        let Some(&first) = leaders.first() else {
            return Err(EtcdClusterError::Timeout {
                what: format!("a member to answer endpoint status: {}", errors.join("; ")),
            });
        };
        let index = self.ids.iter().position(|&id| id == first);
        match index {
            Some(i)
                if first != 0 && leaders.iter().all(|&l| l == first) && running.contains(&i) =>
            {
                Ok(i)
            }
            _ => Err(EtcdClusterError::Unexpected {
                what: "endpoint status: no leader all running members agree on".into(),
                output: format!(
                    "leaders {leaders:?} of members {running:?} (ids {:?}); {}",
                    self.ids,
                    errors.join("; ")
                ),
            }),
        }
    }

    /// Waits until the running members agree on a running leader, and returns it.
    pub fn wait_leader(&mut self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.leader() {
                Ok(i) => return Ok(i),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(EtcdClusterError::Timeout {
                    what: format!("a leader within {within:?} (last: {last})"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes member `to` the leader (`etcdctl move-leader`, asked of the current leader) and
    /// waits until every running member follows it.
    pub fn move_leader(&mut self, to: usize) -> Result<()> {
        let leader = self.wait_leader(Duration::from_secs(20))?;
        if leader != to {
            self.ctl_for(leader)
                .run(&["move-leader", &format!("{:x}", self.ids[to])])?;
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.leader() {
                Ok(i) if i == to => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(EtcdClusterError::Timeout {
                        what: format!("m{} to lead after move-leader", to + 1),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Waits until each of `members` answers `etcdctl endpoint health` (a read through the
    /// quorum), failing early when one of them exits.
    pub fn wait_healthy(&mut self, members: &[usize], within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for &i in members {
            loop {
                let last = match self.ctl_for(i).run(&[
                    "--command-timeout=2s",
                    "--dial-timeout=1s",
                    "endpoint",
                    "health",
                ]) {
                    Ok(_) => break,
                    Err(e) => e,
                };
                if !self.is_running(i) {
                    return Err(EtcdClusterError::Member {
                        member: i + 1,
                        reason: format!("exited; its log:\n{}", self.log_text(i)),
                    });
                }
                if Instant::now() > deadline {
                    return Err(EtcdClusterError::Timeout {
                        what: format!("m{} to be healthy (last: {last})", i + 1),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The remote addresses of the client connections member `index` holds (established TCP
    /// on its client port), read from the kernel's table of its namespace
    /// (`/proc/<etcd's pid>/net/tcp`). Empty while it does not run.
    pub fn client_peers(&self, index: usize) -> Vec<Ipv4Addr> {
        let Some(process) = &self.members[index].process else {
            return Vec::new();
        };
        let table =
            std::fs::read_to_string(format!("/proc/{}/net/tcp", process.pid())).unwrap_or_default();
        established_from(&table, CLIENT_PORT)
    }

    /// Cuts the host whose namespace is `host` off from every member: a `prohibit` route to each
    /// member's address in the host's namespace, so its packets to etcd fail while the rest of
    /// the underlay (the overlay's traffic) is untouched. Undone by [`EtcdPartition::heal`] or
    /// on drop.
    pub fn partition(&self, host: &NetNs) -> Result<EtcdPartition> {
        let mut partition = EtcdPartition {
            ns: NetNs::attach(host.name()),
            routes: Vec::new(),
        };
        for i in 0..MEMBERS {
            let route = format!("{}/32", member_ip(i));
            partition.ns.ip(&["route", "add", "prohibit", &route])?;
            partition.routes.push(route);
        }
        Ok(partition)
    }
}

/// The remote addresses of the connections in a `/proc/net/tcp` table that are established on
/// local port `port`.
pub fn established_from(table: &str, port: u16) -> Vec<Ipv4Addr> {
    // `sl local_address rem_address st ...`, addresses as the raw (network order) IPv4 bytes
    // printed as a host-order hex u32, ports in hex; state 01 is ESTABLISHED.
    let addr = |field: &str| -> Option<(Ipv4Addr, u16)> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some((Ipv4Addr::from(ip.to_ne_bytes()), port))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = addr(fields.get(1)?)?;
            let (remote, _) = addr(fields.get(2)?)?;
            (local_port == port && *fields.get(3)? == "01").then_some(remote)
        })
        .collect()
}

impl LabEtcd for EtcdCluster {
    fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(member_url).collect()
    }

    /// etcdctl against the members that run.
    fn ctl(&self) -> EtcdCtl {
        let running: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.process.is_some())
            .map(|(i, _)| member_url(i))
            .collect();
        EtcdCtl::new(&self.ctl_ns, &running)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut p) = member.process.take() {
                p.stop(Duration::from_secs(3));
            }
            let _ = std::fs::remove_dir_all(&member.data_dir);
        }
    }
}

/// A host cut off from etcd by [`EtcdCluster::partition`]; healed on drop.
#[derive(Debug)]
pub struct EtcdPartition {
    ns: NetNs,
    routes: Vec<String>,
}

impl EtcdPartition {
    /// Removes the routes: the host reaches etcd again.
    pub fn heal(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        while let Some(route) = self.routes.pop() {
            self.ns.ip(&["route", "del", "prohibit", &route])?;
        }
        Ok(())
    }
}

impl Drop for EtcdPartition {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!(
                "cleanup: healing the etcd partition of {}: {e}",
                self.ns.name()
            );
        }
    }
}

impl Cluster<EtcdCluster> {
    /// [`Cluster::with_backend`] on a three-member etcd ([`EtcdCluster`]) instead of the one
    /// etcd in the switch namespace: the agents get every member's URL, m1 first.
    pub fn with_etcd_cluster(
        prefix: &str,
        hosts: usize,
        backend: &str,
        dir: &Path,
    ) -> Result<Self, ClusterError> {
        let (config_lab, config) = crate::cluster::backend_lab(prefix, hosts, backend);
        Cluster::with_etcd(
            &config_lab,
            &config,
            crate::etcd::agent_binary(),
            dir,
            |lab, dir| Ok(EtcdCluster::new(&lab.switch, prefix, dir)?),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_client_connections_from_proc_net_tcp() {
        // 198.18.0.251:2379 <- 198.18.0.1:41000 established; <- 198.18.0.2 in TIME_WAIT (06);
        // the listening socket; a peer connection on 2380.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: FB0012C6:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: FB0012C6:094B 010012C6:A028 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: FB0012C6:094B 020012C6:A029 06 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   3: FB0012C6:094C FC0012C6:B000 01 00000000:00000000 00:00000000 00000000     0        0 4 1\n";
        assert_eq!(
            established_from(table, CLIENT_PORT),
            [Ipv4Addr::new(198, 18, 0, 1)]
        );
    }

    #[test]
    fn members_are_named_by_their_addresses() {
        assert_eq!(member_url(0), "http://198.18.0.251:2379");
        assert_eq!(member_ip(2), Ipv4Addr::new(198, 18, 0, 253));
    }
}
