//! The daemon: wires the command line, etcd, the lease, the peers, the datapath, subnet.env,
//! readiness and `/healthz` together, and keeps them going through etcd outages.
//!
//! Sequence: connect to etcd (retrying) -> wait for and validate `<prefix>/config` -> choose the
//! underlay -> build the datapath -> acquire a lease -> start the datapath and give it the peers
//! -> write subnet.env -> READY=1 -> renew, watch, resync until SIGTERM/SIGINT.
//!
//! When etcd goes away the datapath and the last known peers stay as they are; the daemon
//! reconnects, lists the leases and diffs them against what it knew, renews its own lease (or
//! re-creates it if it expired meanwhile), and resumes watching.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::mpsc as std_mpsc,
    time::{Duration, Instant},
};

use etcd_client::Client;
use tokio::sync::{mpsc, oneshot};

use crate::{
    cli::{Cli, DecapKind},
    control::{
        config::{Backend, ConfigError, NetworkConfig},
        datapath::{Datapath, DatapathError, LocalLease},
        etcd::{EtcdError, EtcdSettings, error_chain, req},
        healthz::{self, Health},
        iface::{self, IfaceError, Underlay},
        lease::{self, Claim, HeldLease, LeaseAttrs, LeaseError, LeaseParams},
        notify,
        peers::{LeaseChange, LeaseWatch, PeerEvent, PeerSet, WatchBatch},
        subnet_env::{self, SubnetEnv, SubnetEnvError},
    },
    dataplane::{
        self,
        ebpf::{DecapHook, XdpMode},
        ebpf_datapath::EbpfOptions,
    },
    host::iptables,
};

/// How often the missing-config wait logs what it waits for.
const CONFIG_WAIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the config key is polled while missing.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// Underlay MTU assumed for the alloc backend when no interface is known.
const FALLBACK_MTU: u32 = 1500;

/// Why the daemon stopped. Each is reported as one line; the exit status is 1.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// `--ip-masq` was asked for and its rules could not be installed.
    #[error("--ip-masq: {source}")]
    IpMasq {
        /// Why.
        #[source]
        source: iptables::IptablesError,
    },
    /// The network config is invalid.
    #[error("invalid network config at {key}: {source}")]
    Config {
        /// The etcd key read.
        key: String,
        /// What is wrong.
        #[source]
        source: ConfigError,
    },
    /// etcd settings that retrying cannot fix (TLS files, endpoints).
    #[error("{source}")]
    Etcd {
        /// The error.
        #[source]
        source: EtcdError,
    },
    /// No subnet could be had or kept.
    #[error("{source}")]
    Lease {
        /// The error.
        #[source]
        source: LeaseError,
    },
    /// No underlay interface.
    #[error("{source}")]
    Iface {
        /// The error.
        #[source]
        source: IfaceError,
    },
    /// The alloc backend needs an address to publish.
    #[error(
        "no public IP: give --public-ip, or --iface/--iface-regex naming an interface with an \
         IPv4 address ({source})"
    )]
    NoPublicIp {
        /// Why no interface was found.
        #[source]
        source: IfaceError,
    },
    /// The datapath failed to start.
    #[error("{source}")]
    Datapath {
        /// The error.
        #[source]
        source: DatapathError,
    },
    /// The datapath's thread died.
    #[error("the datapath thread stopped unexpectedly")]
    DatapathGone,
    /// subnet.env could not be written.
    #[error("{source}")]
    SubnetEnv {
        /// The error.
        #[source]
        source: SubnetEnvError,
    },
    /// The health endpoint could not listen.
    #[error("--healthz-ip/--healthz-port {addr}: {source}")]
    Healthz {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl DaemonError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        1
    }
}

/// flanneld's netfilter rules: forwarding for the Network (so docker's FORWARD policy of DROP
/// does not eat overlay traffic delivered through the stack; best effort, since hosts without
/// iptables have no such policy either), and masquerading with `--ip-masq` (required: the
/// operator asked for it, and docker is told through FLANNEL_IPMASQ not to do it).
fn install_netfilter_rules(
    cli: &Cli,
    config: &NetworkConfig,
    subnet: crate::control::subnet::Subnet,
) -> Result<(), DaemonError> {
    let network = (config.network.addr(), config.network.prefix());
    if !matches!(config.backend, Backend::Alloc)
        && let Err(e) = iptables::ensure_forward_rules(network)
    {
        tracing::warn!(
            "forward rules for {}/{} not installed: {e}; a FORWARD policy of DROP (docker sets \
             one) would drop overlay traffic delivered through the host stack",
            network.0,
            network.1
        );
    }
    if cli.ip_masq {
        iptables::ensure_masquerade_rules(network, (subnet.addr(), subnet.prefix()))
            .map_err(|source| DaemonError::IpMasq { source })?;
        tracing::info!(
            "--ip-masq: masquerading traffic leaving {}/{}",
            network.0,
            network.1
        );
    }
    Ok(())
}

impl From<LeaseError> for DaemonError {
    fn from(source: LeaseError) -> Self {
        DaemonError::Lease { source }
    }
}

/// Runs the agent until SIGTERM or SIGINT (then `Ok`), or until an error it cannot recover from.
pub async fn run(cli: Cli) -> Result<(), DaemonError> {
    let health = Health::new("waiting for etcd and the network config");
    if cli.healthz_port != 0 {
        let addr = SocketAddr::new(cli.healthz_ip, cli.healthz_port);
        let listener = healthz::bind(addr)
            .await
            .map_err(|source| DaemonError::Healthz { addr, source })?;
        tracing::info!("serving /healthz on {addr}");
        tokio::spawn(healthz::serve(listener, health.clone()));
    }
    tokio::select! {
        r = agent(cli, health) => r,
        signal = shutdown_signal() => {
            tracing::info!(
                "received {signal}; stopping (the lease stays in etcd until it expires, so a \
                 restart keeps the subnet)"
            );
            Ok(())
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without handlers the default action (exit) still applies; never resolve.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Everything the running agent keeps.
struct Agent {
    settings: EtcdSettings,
    config_key: String,
    params: LeaseParams,
    held: HeldLease,
    peers: PeerSet,
    datapath: DatapathHandle,
    health: Health,
}

async fn agent(cli: Cli, health: Health) -> Result<(), DaemonError> {
    let prefix = cli.etcd_prefix.trim_end_matches('/').to_owned();
    let config_key = format!("{prefix}/config");
    let settings = EtcdSettings::new(
        cli.etcd_endpoints.clone(),
        cli.etcd_cafile.clone(),
        cli.etcd_certfile.clone(),
        cli.etcd_keyfile.clone(),
        cli.etcd_username.clone(),
        cli.etcd_password.clone(),
    )
    .map_err(|source| DaemonError::Etcd { source })?;

    let mut client = connect(&settings, &config_key).await?;
    let config = wait_for_config(&settings, &mut client, &config_key).await?;
    tracing::info!(
        "network config at {config_key}: Network {} SubnetLen {} range {}..{} backend {}",
        config.network,
        config.subnet_len,
        config.subnet_min.addr(),
        config.subnet_max.addr(),
        config.backend.type_name()
    );

    // The underlay: required to forward; for alloc only its MTU matters, so --public-ip suffices.
    let (underlay, public_ip) = match (iface::choose(&cli.iface, &cli.iface_regex), &config.backend)
    {
        (Ok(u), _) => {
            let ip = cli.public_ip.unwrap_or(u.addr);
            (Some(u), ip)
        }
        (Err(e), Backend::Alloc) => match cli.public_ip {
            Some(ip) => {
                tracing::info!("alloc backend: no underlay interface ({e}); MTU {FALLBACK_MTU}");
                (None, ip)
            }
            None => return Err(DaemonError::NoPublicIp { source: e }),
        },
        (Err(source), _) => return Err(DaemonError::Iface { source }),
    };
    if let Some(u) = &underlay {
        tracing::info!(
            "underlay interface {} ({}), MTU {}; public IP {public_ip}",
            u.name,
            u.addr,
            u.mtu
        );
    }
    let underlay_mtu = underlay.as_ref().map_or(FALLBACK_MTU, |u| u.mtu);
    let mtu = match &config.backend {
        Backend::Vxlan { mtu: Some(m), .. } => *m,
        b => underlay_mtu.saturating_sub(b.encap_overhead()),
    };

    let datapath = build_datapath(&cli, &config.backend, public_ip, underlay.as_ref())
        .map_err(|source| DaemonError::Datapath { source })?;
    let backend_data = datapath.as_ref().and_then(|d| d.backend_data());
    let params = LeaseParams {
        prefix: prefix.clone(),
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: config.backend.type_name().to_owned(),
            backend_data,
        },
        config: config.clone(),
        ttl: cli.subnet_lease_ttl,
        renew_margin: Duration::from_secs(u64::from(cli.subnet_lease_renew_margin) * 60),
    };

    health.lease_lost("acquiring a subnet lease");
    let previous = subnet_env::previous_subnet(&cli.subnet_file);
    let held = loop {
        match lease::acquire(&mut client, &params, previous).await {
            Ok(held) => break held,
            Err(LeaseError::Etcd { source }) if source.is_transient() => {
                tracing::warn!("acquiring a lease: {}; reconnecting", error_chain(&source));
                client = connect(&settings, &config_key).await?;
            }
            Err(e) => return Err(e.into()),
        }
    };
    log_held(&held, &params, "acquired");
    health.lease_held(held.expires_at);

    let datapath = DatapathHandle::spawn(datapath, health.clone());
    let local = LocalLease {
        network: config.network,
        subnet: held.subnet,
        public_ip,
        underlay,
        backend: config.backend.clone(),
        mtu,
    };
    datapath.start(local).await?;
    install_netfilter_rules(&cli, &config, held.subnet)?;

    let mut agent = Agent {
        settings,
        config_key,
        params,
        held,
        peers: PeerSet::default(),
        datapath,
        health,
    };
    agent.peers.set_own(agent.held.subnet);
    // The peers known now reach the datapath before READY, so a container started right after
    // can reach every host.
    let watch = loop {
        match agent.sync_peers(&mut client).await {
            Ok(w) => break w,
            Err(e) if e.is_transient() => {
                tracing::warn!("listing peers: {}; reconnecting", error_chain(&e));
                client = connect(&agent.settings, &agent.config_key).await?;
            }
            Err(e) => return Err(DaemonError::Etcd { source: e }),
        }
    };
    agent.datapath.synced().await?;

    let env = SubnetEnv {
        network: config.network,
        subnet: agent.held.subnet,
        mtu,
        ip_masq: cli.ip_masq,
    };
    env.write(&cli.subnet_file)
        .map_err(|source| DaemonError::SubnetEnv { source })?;
    tracing::info!(
        "wrote {}: FLANNEL_SUBNET={}/{} FLANNEL_MTU={mtu}",
        cli.subnet_file.display(),
        agent.held.subnet.first_host(),
        agent.held.subnet.prefix()
    );
    match notify::notify("READY=1") {
        Ok(true) => tracing::info!("notified systemd: READY=1"),
        Ok(false) => {}
        Err(e) => tracing::warn!("notifying systemd (NOTIFY_SOCKET): {e}"),
    }

    agent.run(client, watch).await
}

fn log_held(held: &HeldLease, params: &LeaseParams, what: &str) {
    if held.is_reservation() {
        tracing::info!(
            "{what} subnet {} from the reservation at {} (no TTL)",
            held.subnet,
            held.key
        );
    } else {
        tracing::info!(
            "{what} subnet {} at {} (TTL {})",
            held.subnet,
            held.key,
            humantime::format_duration(params.ttl)
        );
    }
}

async fn connect(settings: &EtcdSettings, probe_key: &str) -> Result<Client, DaemonError> {
    settings
        .connect(probe_key)
        .await
        .map_err(|source| DaemonError::Etcd { source })
}

/// Reads `<prefix>/config`, waiting while it is absent; validation errors are final.
async fn wait_for_config(
    settings: &EtcdSettings,
    client: &mut Client,
    key: &str,
) -> Result<NetworkConfig, DaemonError> {
    let mut last_log: Option<Instant> = None;
    loop {
        match client
            .get(key, None)
            .await
            .map_err(req("reading the network config"))
        {
            Ok(resp) => match resp.kvs().first() {
                Some(kv) => {
                    return NetworkConfig::parse(kv.value()).map_err(|source| {
                        DaemonError::Config {
                            key: key.to_owned(),
                            source,
                        }
                    });
                }
                None => {
                    if last_log.is_none_or(|t| t.elapsed() >= CONFIG_WAIT_LOG_EVERY) {
                        tracing::info!("waiting for the network config at etcd key {key}");
                        last_log = Some(Instant::now());
                    }
                    tokio::time::sleep(CONFIG_POLL).await;
                }
            },
            Err(e) => {
                tracing::warn!("reading {key}: {}; reconnecting", error_chain(&e));
                *client = connect(settings, key).await?;
            }
        }
    }
}

impl Agent {
    /// Lists the leases, sends the differences to the datapath, and starts a watch from the
    /// listing's revision.
    async fn sync_peers(&mut self, client: &mut Client) -> Result<LeaseWatch, EtcdError> {
        let (entries, revision) = lease::list(client, &self.params.prefix).await?;
        for ev in self.peers.resync(&entries) {
            self.datapath.send(ev);
        }
        tracing::debug!("{} peers at revision {revision}", self.peers.len());
        LeaseWatch::start(client, &self.params.prefix, revision).await
    }

    /// Claims our subnet again: renewal, re-creation after a deletion or expiry, both as one
    /// conditional transaction. Another holder is final.
    async fn reclaim(&mut self, client: &mut Client, why: &str) -> Result<(), LeaseError> {
        let subnet = self.held.subnet;
        match lease::claim(client, &self.params, subnet).await? {
            Claim::Held(held) => {
                self.held = held;
                self.health.lease_held(self.held.expires_at);
                tracing::debug!("{why}: subnet {subnet} held until renewal");
                Ok(())
            }
            Claim::TakenBy(holder) => {
                self.health
                    .lease_lost(format!("subnet {subnet} is held by {holder}"));
                Err(LeaseError::Taken {
                    subnet,
                    key: self.held.key.clone(),
                    holder,
                })
            }
        }
    }

    /// After a reconnect: resync the peers, renew the lease (it may have expired meanwhile),
    /// and watch again.
    async fn resync(&mut self, client: &mut Client) -> Result<LeaseWatch, LeaseError> {
        self.reclaim(client, "resync").await?;
        Ok(self.sync_peers(client).await?)
    }

    async fn run(mut self, client: Client, watch: LeaseWatch) -> Result<(), DaemonError> {
        let mut conn = Some((client, watch));
        loop {
            let Some((mut client, mut watch)) = conn.take() else {
                let mut client = connect(&self.settings, &self.config_key).await?;
                match self.resync(&mut client).await {
                    Ok(watch) => {
                        tracing::info!(
                            "resynchronised with etcd: subnet {} kept, {} peers",
                            self.held.subnet,
                            self.peers.len()
                        );
                        conn = Some((client, watch));
                    }
                    Err(LeaseError::Etcd { source }) if source.is_transient() => {
                        tracing::warn!("resync failed: {}", error_chain(&source));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
                continue;
            };
            let renew_at = tokio::time::Instant::from_std(self.held.renew_at);
            tokio::select! {
                _ = tokio::time::sleep_until(renew_at) => {
                    match self.reclaim(&mut client, "renewal").await {
                        Ok(()) => {
                            log_held(&self.held, &self.params, "renewed");
                            conn = Some((client, watch));
                        }
                        Err(LeaseError::Etcd { source }) if source.is_transient() => {
                            let retry = self.params.retry_interval();
                            tracing::warn!(
                                "renewing the lease failed, retrying in {}: {}",
                                humantime::format_duration(retry),
                                error_chain(&source)
                            );
                            self.held.renew_at = Instant::now() + retry;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                batch = watch.next() => match batch {
                    Ok(WatchBatch::Changes(changes)) => {
                        match self.apply_changes(&mut client, changes).await {
                            Ok(()) => conn = Some((client, watch)),
                            Err(LeaseError::Etcd { source }) if source.is_transient() => {
                                tracing::warn!("re-acquiring the lease: {}", error_chain(&source));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(WatchBatch::Compacted) => {
                        tracing::info!("the watch revision was compacted; listing leases again");
                        match self.sync_peers(&mut client).await {
                            Ok(w) => conn = Some((client, w)),
                            Err(e) => tracing::warn!("relisting leases: {}", error_chain(&e)),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            "lost etcd ({}); keeping the datapath and {} known peers while \
                             reconnecting",
                            error_chain(&e),
                            self.peers.len()
                        );
                    }
                },
            }
        }
    }

    async fn apply_changes(
        &mut self,
        client: &mut Client,
        changes: Vec<LeaseChange>,
    ) -> Result<(), LeaseError> {
        let own = self.held.subnet;
        for change in changes {
            match &change {
                LeaseChange::Deleted { subnet } if *subnet == own => {
                    tracing::warn!(
                        "our lease {} was deleted or expired; re-acquiring subnet {own}",
                        self.held.key
                    );
                    self.health.lease_lost("lease deleted; re-acquiring");
                    self.reclaim(client, "re-acquire").await?;
                    log_held(&self.held, &self.params, "re-acquired");
                }
                LeaseChange::Put {
                    subnet,
                    attrs: Some(a),
                } if *subnet == own && a.public_ip == self.params.attrs.public_ip => {}
                LeaseChange::Put { subnet, .. } if *subnet == own => {
                    // Someone overwrote our key; claim() reports who holds it now.
                    self.reclaim(client, "overwritten").await?;
                }
                _ => {
                    if let Some(ev) = self.peers.apply(&change) {
                        self.datapath.send(ev);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Builds the datapath for the backend, before the lease is acquired (its
/// [`Datapath::backend_data`] goes into the lease). This is where the dataplane plugs in: the eBPF
/// and TUN datapaths replace the stub here, chosen by `kind` (`--datapath`); an error (e.g.
/// `--datapath=ebpf` on a kernel that refuses the programs) stops the agent with status 1.
/// `underlay` is `Some` for udp and vxlan. Returns `None` for alloc, which forwards nothing.
pub fn build_datapath(
    cli: &Cli,
    backend: &Backend,
    public_ip: Ipv4Addr,
    underlay: Option<&Underlay>,
) -> Result<Option<Box<dyn Datapath>>, DatapathError> {
    let options = EbpfOptions {
        bpffs: Some(cli.bpffs.clone()),
        decap: match cli.decap {
            DecapKind::Tc => DecapHook::Tc,
            DecapKind::Xdp => DecapHook::Xdp(XdpMode::Driver),
            DecapKind::XdpGeneric => DecapHook::Xdp(XdpMode::Skb),
        },
        deliver_via_stack: cli.deliver_via_stack,
    };
    let datapath = dataplane::select(cli.datapath, backend, public_ip, options).map_err(|e| {
        DatapathError::Failed {
            context: format!(
                "--datapath={}",
                format!("{:?}", cli.datapath).to_lowercase()
            ),
            source: Box::new(e),
        }
    })?;
    if let Some(d) = &datapath {
        tracing::info!(
            "datapath: {}{}",
            d.describe(),
            underlay.map_or(String::new(), |u| format!(" on {}", u.name))
        );
    }
    Ok(datapath)
}

/// Work for the datapath thread.
enum DatapathCmd {
    Start(LocalLease, oneshot::Sender<Result<(), DatapathError>>),
    Event(PeerEvent),
    /// The initial peer list has been sent; replies once the datapath has applied it.
    Synced(oneshot::Sender<()>),
}

/// The datapath, run on a thread of its own so its (possibly blocking) calls never stall etcd
/// traffic, fed in order through a channel. Peer events are logged here, whatever the datapath.
struct DatapathHandle {
    tx: Option<mpsc::UnboundedSender<DatapathCmd>>,
    /// Disconnects when the thread has dropped the datapath.
    done: std_mpsc::Receiver<()>,
}

/// How long stopping waits for the datapath's own teardown (the TUN workers and their counters).
const DATAPATH_STOP_WAIT: Duration = Duration::from_secs(2);

impl DatapathHandle {
    fn spawn(datapath: Option<Box<dyn Datapath>>, health: Health) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<DatapathCmd>();
        let (alive_tx, done) = std_mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("datapath".into())
            .spawn(move || {
                let _alive = alive_tx;
                let mut datapath = datapath;
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        DatapathCmd::Start(local, reply) => {
                            let r = match datapath.as_mut() {
                                Some(d) => d.start(&local),
                                None => Ok(()),
                            };
                            health.datapath(r.as_ref().err().map(|e| e.to_string()));
                            let _ = reply.send(r);
                        }
                        DatapathCmd::Event(ev) => {
                            match &ev {
                                PeerEvent::Added(p) => tracing::info!(
                                    "peer added: {} at {} ({})",
                                    p.subnet,
                                    p.public_ip,
                                    p.backend_type
                                ),
                                PeerEvent::Removed(s) => tracing::info!("peer removed: {s}"),
                            }
                            if let Some(d) = datapath.as_mut() {
                                if let Err(e) = d.apply(&ev) {
                                    tracing::error!("datapath: {}", error_chain(&e));
                                }
                                health.datapath(d.check().err());
                            }
                        }
                        DatapathCmd::Synced(reply) => {
                            if let Some(d) = datapath.as_mut()
                                && let Err(e) = d.synced()
                            {
                                tracing::error!("datapath: {}", error_chain(&e));
                            }
                            let _ = reply.send(());
                        }
                    }
                }
            })
            .expect("spawning the datapath thread");
        Self { tx: Some(tx), done }
    }

    async fn start(&self, local: LocalLease) -> Result<(), DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(DatapathCmd::Start(local, reply)).ok())
            .ok_or(DaemonError::DatapathGone)?;
        rx.await
            .map_err(|_| DaemonError::DatapathGone)?
            .map_err(|source| DaemonError::Datapath { source })
    }

    fn send(&self, ev: PeerEvent) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(DatapathCmd::Event(ev));
        }
    }

    /// Tells the datapath the initial peer list is complete (it may then drop what a previous
    /// run left), and waits until everything sent before has been applied.
    async fn synced(&self) -> Result<(), DaemonError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(DatapathCmd::Synced(reply)).ok())
            .ok_or(DaemonError::DatapathGone)?;
        rx.await.map_err(|_| DaemonError::DatapathGone)
    }
}

impl Drop for DatapathHandle {
    /// Closes the queue and waits, briefly, for the thread to drop the datapath: the process
    /// exits right after, and would otherwise cut its teardown short.
    fn drop(&mut self) {
        self.tx = None;
        if let Err(std_mpsc::RecvTimeoutError::Timeout) = self.done.recv_timeout(DATAPATH_STOP_WAIT)
        {
            tracing::warn!(
                "the datapath did not stop within {DATAPATH_STOP_WAIT:?}; exiting without it"
            );
        }
    }
}
