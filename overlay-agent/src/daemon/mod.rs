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
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use etcd_client::Client;

use crate::{
    cli::{Cli, DecapKind},
    control::{
        config::{Backend, ConfigError, NetworkConfig},
        etcd::{EtcdError, EtcdSettings, Outage, req},
        healthz::{self, Health, NoLease, PeerStats},
        lease::{self, Claim, HeldLease, LeaseAttrs, LeaseError, LeaseParams},
        notify,
        peers::{Gone, LeaseChange, LeaseWatch, PeerEvent, PeerRules, PeerSet, WatchBatch},
        subnet_env::{self, SubnetEnv, SubnetEnvError},
    },
    dataplane::{
        self, SelectError,
        contract::{DatapathError, LocalLease, Overlay, OverlaySpec},
        ebpf::{DecapHook, XdpMode, datapath::EbpfOptions},
    },
    host::iface::{self, IfaceError, Underlay},
    status,
};

mod datapath_thread;
mod footprint;
mod host_rules;
mod leftovers;
mod preflight;

use datapath_thread::DatapathThread;
use footprint::Footprint;
pub use host_rules::HostRulesError;
use overlay_common::net::Mac;
pub use preflight::PreflightError;

/// How often the missing-config wait logs what it waits for.
const CONFIG_WAIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the config key is polled while missing.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often the summary systemd shows is brought up to date (sent only when it changed).
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// Underlay MTU assumed for the alloc backend when no interface is known.
const FALLBACK_MTU: u32 = 1500;

/// Why the daemon stopped. Each is reported as one line; the exit status is 1.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A pre-flight check failed: the agent cannot run here as configured (nothing was done).
    #[error("{source}")]
    Preflight {
        /// The check that failed.
        #[source]
        source: PreflightError,
    },
    /// `--ip-masq` or `--ip-blackhole-route` was asked for and could not be set up.
    #[error("{source}")]
    HostRules {
        /// Why.
        #[source]
        source: HostRulesError,
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
    /// No datapath can run here.
    #[error("{source}")]
    Select {
        /// The error.
        #[source]
        source: SelectError,
    },
    /// The datapath failed to start.
    #[error("{source}")]
    Datapath {
        /// The error (boxed: device and netlink errors are large).
        #[source]
        source: Box<DatapathError>,
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

impl From<PreflightError> for DaemonError {
    fn from(source: PreflightError) -> Self {
        DaemonError::Preflight { source }
    }
}

impl From<LeaseError> for DaemonError {
    fn from(source: LeaseError) -> Self {
        DaemonError::Lease { source }
    }
}

/// Runs the agent until SIGTERM or SIGINT (then `Ok`), or until an error it cannot recover from.
pub async fn run(cli: Cli) -> Result<(), DaemonError> {
    log_accepted_but_unused(&cli);
    let health = Health::new();
    if cli.healthz_port != 0 {
        let addr = SocketAddr::new(cli.healthz_ip, cli.healthz_port);
        let listener = healthz::bind(addr)
            .await
            .map_err(|source| DaemonError::Healthz { addr, source })?;
        let answer = if cli.healthz_strict {
            healthz::Answer::Strict
        } else {
            healthz::Answer::Flanneld
        };
        tracing::info!(
            "serving /healthz and /metrics on {addr} (/healthz: 200 {} while the lease is held \
             and the datapath forwards, else 503 with the reason)",
            match answer {
                healthz::Answer::Strict => "`ok`",
                healthz::Answer::Flanneld => "`flanneld is running`",
            }
        );
        tokio::spawn(healthz::serve(listener, health.clone(), answer));
    }
    match status::socket::bind(&cli.bpffs) {
        Ok(listener) => {
            tokio::spawn(status::socket::serve(listener, health.clone()));
        }
        // Forwarding does not need it; `overlay-agent status` then reads the pins alone.
        Err(e) => tracing::warn!("{e}; `overlay-agent status` will not reach this agent"),
    }
    tokio::spawn(publish_status(health.clone()));
    let footprint = Footprint::default();
    // The agent's future is dropped (its datapath thread with it) before anything is said or
    // undone below.
    let signal = tokio::select! {
        r = agent(cli, health, footprint.clone()) => return r,
        signal = shutdown_signal() => signal,
    };
    if footprint.is_ready() {
        tracing::info!("received {signal}; stopping: {}", footprint.left_running());
    } else {
        footprint
            .undo(&format!(
                "received {signal} before the start-up finished; stopping"
            ))
            .await;
    }
    Ok(())
}

/// One line each for the flanneld flags that are accepted but change nothing here, so an
/// operator reading the log knows.
fn log_accepted_but_unused(cli: &Cli) {
    let glog = cli.ignored_glog_flags();
    if !glog.is_empty() {
        tracing::info!(
            "ignoring glog's {}: the agent always logs to stderr (systemd's journal keeps it); \
             -v sets the level",
            glog.join(" ")
        );
    }
    if let Some(v6) = cli.public_ipv6 {
        // flanneld too uses it only with EnableIPv6, which this agent refuses until it has IPv6.
        tracing::warn!(
            "--public-ipv6={v6} is not used: overlay-agent has no IPv6 yet, and the lease says \
             \"PublicIPv6\":null"
        );
    }
}

/// Keeps systemd's `STATUS=` (what `systemctl status` shows) at the health's one-line summary.
async fn publish_status(health: Health) {
    let mut last = String::new();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        tick.tick().await;
        let now = health.summary();
        if now != last {
            if let Err(e) = notify::notify(&format!("STATUS={now}")) {
                tracing::debug!("notifying systemd of the status: {e}");
            }
            last = now;
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
    /// What this run put in place, for the shutdown line.
    footprint: Footprint,
    settings: EtcdSettings,
    config_key: String,
    params: LeaseParams,
    held: HeldLease,
    peers: PeerSet,
    datapath: DatapathThread,
    health: Health,
    /// The config value (`None`: deleted) last reported as differing from the running one, so
    /// each change is reported once.
    changed_config: Option<Option<Vec<u8>>>,
}

/// What a resynchronisation after an outage changed, for its one log line.
#[derive(Debug, Default)]
struct Resynced {
    added: usize,
    removed: usize,
}

/// The agent; a failure before READY undoes what the run did (see [`footprint`]).
async fn agent(cli: Cli, health: Health, footprint: Footprint) -> Result<(), DaemonError> {
    // The start-up's locals (the datapath thread above all) are gone when it returns, so the
    // undo finds the devices and pins unused.
    let result = start_and_run(cli, health, footprint.clone()).await;
    if let Err(e) = &result {
        footprint.undo(&format!("start-up failed ({e})")).await;
    }
    result
}

/// The agent's steps, in order; each is a function below.
async fn start_and_run(cli: Cli, health: Health, footprint: Footprint) -> Result<(), DaemonError> {
    preflight::local(&cli)?;
    let prefix = cli.etcd_prefix.trim_end_matches('/').to_owned();
    let config_key = format!("{prefix}/config");
    let settings = etcd_settings(&cli)?;
    health.set_grace(cli.expired_peer_grace);
    health.set_etcd(settings.clone());
    // Not heard from yet: status says so until the first member answers.
    health.etcd_lost(Instant::now());
    let mut client = connect(&settings, &config_key, &health).await?;
    // Dropped with the runtime when the agent stops.
    tokio::spawn(settings.clone().probe_members(config_key.clone()));
    let config = wait_for_config(&settings, &mut client, &config_key, &health).await?;
    let (underlay, public_ip) = choose_underlay(&cli, &config).await?;
    preflight::host(&cli, &config, underlay.as_ref(), public_ip)?;
    let mtu = overlay_mtu(&config, underlay.as_ref());
    let kept_mac = match config.backend {
        Backend::Vxlan { vni, .. } => {
            retrying(
                &settings,
                &config_key,
                &health,
                &mut client,
                "reading this host's lease",
                async |c| lease::published_vtep_mac(c, &prefix, public_ip, &config, vni).await,
            )
            .await?
        }
        _ => None,
    };
    // Loading the programs pins their maps: the first change to the host.
    footprint.record_before(&cli.bpffs).await;
    let overlay = build_overlay(
        &cli,
        &config.backend,
        public_ip,
        kept_mac,
        underlay.as_ref(),
    )?;
    let params = lease_params(&cli, prefix, &config, public_ip, overlay.as_ref());

    health.lease_lost(NoLease::Acquiring);
    let previous = subnet_env::previous_subnet(&cli.subnet_file);
    let held = retrying(
        &settings,
        &config_key,
        &health,
        &mut client,
        "acquiring a lease",
        async |c| lease::acquire(c, &params, previous).await,
    )
    .await?;
    log_held(&held, &params, "acquired");
    health.lease(&held, params.ttl);
    footprint.lease(&client, &held);

    let started = overlay
        .as_ref()
        .map(|o| (o.info().kind == "eBPF", o.spec().device_name()));
    let direct_delivery =
        matches!(started, Some((true, _))) && ebpf_options(&cli).delivers_directly();
    let datapath = DatapathThread::spawn(overlay, health.clone());
    if let Some(underlay) = underlay {
        let lease = LocalLease {
            network: config.network,
            subnet: held.subnet,
            underlay,
            mtu,
        };
        datapath.start(lease).await?;
        if let Some((ebpf, device)) = started {
            footprint.dataplane(ebpf, device, &cli.bpffs);
        }
    }
    leftovers::remove(&config.backend).await;
    let host_rules = host_rules::HostRules::install(&cli, &config, held.subnet, direct_delivery)
        .await
        .map_err(|source| DaemonError::HostRules { source })?;
    let added = host_rules.added();
    // Dropped with the runtime when the agent stops; the rules and route stay, as flanneld's do.
    let resync = tokio::spawn(host_rules.resync());
    footprint.rules(added, resync.abort_handle());

    let mut agent = Agent {
        footprint: footprint.clone(),
        settings,
        config_key,
        params,
        held,
        peers: PeerSet::new(PeerRules {
            network: config.network,
            own_ip: public_ip,
            grace: cli.expired_peer_grace,
        }),
        datapath,
        health,
        changed_config: None,
    };
    agent.peers.set_own(agent.held.subnet);
    // The peers known now reach the datapath before READY, so a container started right after
    // can reach every host.
    let (settings, key) = (agent.settings.clone(), agent.config_key.clone());
    let health = agent.health.clone();
    let (watch, _) = retrying(
        &settings,
        &key,
        &health,
        &mut client,
        "listing peers",
        async |c| agent.sync_peers(c).await,
    )
    .await?;
    agent.datapath.synced().await?;

    write_subnet_env(&cli, &config, agent.held.subnet, mtu)?;
    notify_ready();
    footprint.ready();
    agent.run(client, watch).await
}

/// An error that another attempt, on a new connection, may cure.
trait Retryable: Into<DaemonError> {
    /// The etcd error behind it, when it is transient.
    fn transient(&self) -> Option<&EtcdError>;
}

impl Retryable for EtcdError {
    fn transient(&self) -> Option<&EtcdError> {
        self.is_transient().then_some(self)
    }
}

impl Retryable for LeaseError {
    fn transient(&self) -> Option<&EtcdError> {
        match self {
            LeaseError::Etcd { source } if source.is_transient() => Some(source),
            _ => None,
        }
    }
}

impl From<EtcdError> for DaemonError {
    fn from(source: EtcdError) -> Self {
        DaemonError::Etcd { source }
    }
}

/// The one retry policy of the start-up steps: a transient etcd error reconnects (`connect`
/// backs off and logs each attempt) and runs `op` again; anything else is final.
async fn retrying<T, E: Retryable>(
    settings: &EtcdSettings,
    probe_key: &str,
    health: &Health,
    client: &mut Client,
    what: &str,
    mut op: impl AsyncFnMut(&mut Client) -> Result<T, E>,
) -> Result<T, DaemonError> {
    loop {
        match op(client).await {
            Ok(v) => return Ok(v),
            Err(e) => match e.transient() {
                Some(source) => {
                    let error = source.brief();
                    tracing::warn!(
                        "etcd member {}: {what}: {error}; trying the next member",
                        settings.member(),
                    );
                    health.etcd_lost(Instant::now());
                    health.etcd_member_failed(format!("{what}: {error}"));
                    *client = connect(settings, probe_key, health).await?;
                }
                None => return Err(e.into()),
            },
        }
    }
}

fn etcd_settings(cli: &Cli) -> Result<EtcdSettings, DaemonError> {
    EtcdSettings::new(
        cli.etcd_endpoints.clone(),
        cli.etcd_cafile.clone(),
        cli.etcd_certfile.clone(),
        cli.etcd_keyfile.clone(),
        cli.etcd_username.clone(),
        cli.etcd_password.clone(),
    )
    .map_err(|source| DaemonError::Etcd { source })
}

/// The underlay interface and the address peers send to. Required to forward; for alloc only
/// its MTU matters, so `--public-ip` suffices.
async fn choose_underlay(
    cli: &Cli,
    config: &NetworkConfig,
) -> Result<(Option<Underlay>, Ipv4Addr), DaemonError> {
    let chosen = iface::choose(&cli.iface, &cli.iface_regex, cli.iface_can_reach).await;
    let (underlay, public_ip) = match (chosen, &config.backend) {
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
    Ok((underlay, public_ip))
}

/// The MTU written to subnet.env: the config's (vxlan `MTU`), else the underlay's minus the
/// format's overhead.
fn overlay_mtu(config: &NetworkConfig, underlay: Option<&Underlay>) -> u32 {
    let underlay_mtu = underlay.map_or(FALLBACK_MTU, |u| u.mtu);
    match &config.backend {
        Backend::Vxlan { mtu: Some(m), .. } => *m,
        b => underlay_mtu.saturating_sub(b.encap_overhead()),
    }
}

/// What our lease says: the contract's BackendData (vxlan's the same whichever datapath runs; udp
/// says whether the datapath decapsulates in the kernel).
fn lease_params(
    cli: &Cli,
    prefix: String,
    config: &NetworkConfig,
    public_ip: Ipv4Addr,
    overlay: Option<&Overlay>,
) -> LeaseParams {
    LeaseParams {
        prefix,
        attrs: LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: config.backend.type_name().to_owned(),
            backend_data: overlay.and_then(Overlay::backend_data),
        },
        config: config.clone(),
        ttl: cli.subnet_lease_ttl,
        renew_margin: Duration::from_secs(u64::from(cli.subnet_lease_renew_margin) * 60),
    }
}

fn write_subnet_env(
    cli: &Cli,
    config: &NetworkConfig,
    subnet: crate::control::subnet::Subnet,
    mtu: u32,
) -> Result<(), DaemonError> {
    let env = SubnetEnv {
        network: config.network,
        subnet,
        mtu,
        ip_masq: cli.ip_masq,
    };
    env.write(&cli.subnet_file)
        .map_err(|source| DaemonError::SubnetEnv { source })?;
    tracing::info!(
        "wrote {}: FLANNEL_SUBNET={}/{} FLANNEL_MTU={mtu}",
        cli.subnet_file.display(),
        subnet.first_host(),
        subnet.prefix()
    );
    Ok(())
}

fn notify_ready() {
    match notify::notify("READY=1") {
        Ok(true) => tracing::info!("notified systemd: READY=1"),
        Ok(false) => {}
        Err(e) => tracing::warn!("notifying systemd (NOTIFY_SOCKET): {e}"),
    }
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

/// Connects at start-up, saying so once when it took more than one attempt.
async fn connect(
    settings: &EtcdSettings,
    probe_key: &str,
    health: &Health,
) -> Result<Client, DaemonError> {
    let mut outage = Outage::new();
    let client = settings
        .connect(probe_key, &mut outage)
        .await
        .map_err(|source| DaemonError::Etcd { source })?;
    health.etcd_back();
    if outage.rounds() > 0 {
        tracing::info!(
            "etcd answers after {}: member {}",
            humantime::format_duration(outage.lasted()),
            settings.member()
        );
    }
    Ok(client)
}

/// Reads `<prefix>/config`, waiting while it is absent; validation errors are final.
async fn wait_for_config(
    settings: &EtcdSettings,
    client: &mut Client,
    key: &str,
    health: &Health,
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
                    let config =
                        NetworkConfig::parse(kv.value()).map_err(|source| DaemonError::Config {
                            key: key.to_owned(),
                            source,
                        })?;
                    tracing::info!(
                        "network config at {key}: Network {} SubnetLen {} range {}..{} backend {}",
                        config.network,
                        config.subnet_len,
                        config.subnet_min.addr(),
                        config.subnet_max.addr(),
                        config.backend.type_name()
                    );
                    return Ok(config);
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
                let error = e.brief();
                tracing::warn!(
                    "etcd member {}: reading {key}: {error}; trying the next member",
                    settings.member(),
                );
                health.etcd_lost(Instant::now());
                health.etcd_member_failed(format!("reading {key}: {error}"));
                *client = connect(settings, key, health).await?;
            }
        }
    }
}

impl Agent {
    /// Lists the leases, sends the differences to the datapath, and starts a watch from the
    /// listing's revision. A peer missing from the listing is asked after: expired, it stays
    /// for the grace period; deleted, it goes.
    async fn sync_peers(
        &mut self,
        client: &mut Client,
    ) -> Result<(LeaseWatch, Resynced), EtcdError> {
        let (entries, revision) = lease::list(client, &self.params.prefix).await?;
        let mut expired = HashSet::new();
        for (subnet, etcd_lease) in self.peers.missing_from(&entries) {
            if self.gone(client, etcd_lease).await? == Gone::Expired {
                expired.insert(subnet);
            }
        }
        let events = self.peers.resync(&entries, &expired);
        let resynced = self.send(events);
        tracing::debug!("{} peers at revision {revision}", self.peers.len());
        let watch = LeaseWatch::start(client, &self.params.prefix, revision).await?;
        Ok((watch, resynced))
    }

    /// How a peer's lease went, from its etcd lease: still there, the key was deleted.
    async fn gone(&self, client: &mut Client, etcd_lease: i64) -> Result<Gone, EtcdError> {
        if etcd_lease == 0 {
            // A reservation has no TTL to run out: it was deleted.
            return Ok(Gone::Deleted);
        }
        Ok(match lease::etcd_lease_alive(client, etcd_lease).await? {
            true => Gone::Deleted,
            false => Gone::Expired,
        })
    }

    /// Sends peer changes to the datapath, counting them, and publishes the peer set's numbers.
    fn send(&self, events: Vec<PeerEvent>) -> Resynced {
        self.health.peers(PeerStats {
            known: self.peers.len(),
            stale: self.peers.stale(),
            counts: self.peers.counts(),
            list: self.peers.listing(),
        });
        let mut r = Resynced::default();
        for ev in events {
            match ev {
                PeerEvent::Added(_) => r.added += 1,
                PeerEvent::Removed(_) => r.removed += 1,
            }
            self.datapath.send(ev);
        }
        r
    }

    /// Claims our subnet again: renewal, re-creation after a deletion or expiry, both as one
    /// conditional transaction. Another holder is final.
    async fn reclaim(&mut self, client: &mut Client, why: &str) -> Result<(), LeaseError> {
        let subnet = self.held.subnet;
        match lease::claim(client, &self.params, subnet).await? {
            Claim::Held(held) => {
                self.held = held;
                self.footprint.lease(client, &self.held);
                self.health.lease(&self.held, self.params.ttl);
                tracing::debug!("{why}: subnet {subnet} held until renewal");
                Ok(())
            }
            Claim::TakenBy(holder) => {
                self.health.lease_lost(NoLease::TakenBy {
                    subnet,
                    holder: holder.clone(),
                });
                Err(LeaseError::Taken {
                    subnet,
                    key: self.held.key.clone(),
                    holder,
                })
            }
        }
    }

    /// After a reconnect: renew the lease (it may have expired meanwhile), resync the peers, and
    /// watch again.
    async fn resync(&mut self, client: &mut Client) -> Result<(LeaseWatch, Resynced), LeaseError> {
        self.reclaim(client, "resync").await?;
        Ok(self.sync_peers(client).await?)
    }

    /// The one line for a request that failed on the member in use; the caller then moves to
    /// the next member.
    fn member_failed(&self, what: &str, e: &EtcdError, outage: &mut Option<Outage>) {
        let error = e.brief();
        tracing::warn!(
            "etcd member {}: {what}: {error}; trying the next member (the datapath and {} peers \
             stay as they are)",
            self.settings.member(),
            self.peers.len()
        );
        let o = outage.get_or_insert_with(Outage::new);
        self.health.etcd_lost(o.since());
        self.health.etcd_member_failed(format!("{what}: {error}"));
    }

    async fn run(mut self, client: Client, watch: LeaseWatch) -> Result<(), DaemonError> {
        let mut conn = Some((client, watch));
        let mut outage: Option<Outage> = None;
        loop {
            let Some((mut client, mut watch)) = conn.take() else {
                let o = outage.get_or_insert_with(Outage::new);
                let mut client = self
                    .settings
                    .connect(&self.config_key, o)
                    .await
                    .map_err(|source| DaemonError::Etcd { source })?;
                match self.resync(&mut client).await {
                    Ok((watch, r)) => {
                        let lasted = outage.take().map(|o| o.lasted()).unwrap_or_default();
                        self.health.etcd_back();
                        tracing::info!(
                            "etcd is back after {} (member {}): subnet {} renewed; peers \
                             resynchronised: {} added or changed, {} removed, {} kept while \
                             their lease is expired, {} in all",
                            humantime::format_duration(lasted),
                            self.settings.member(),
                            self.held.subnet,
                            r.added,
                            r.removed,
                            self.peers.stale(),
                            self.peers.len()
                        );
                        conn = Some((client, watch));
                    }
                    Err(LeaseError::Etcd { source }) if source.is_transient() => {
                        self.member_failed("resynchronising", &source, &mut outage);
                    }
                    Err(e) => return Err(e.into()),
                }
                continue;
            };
            let renew_at = tokio::time::Instant::from_std(self.held.renew_at);
            let grace_end = self.peers.next_grace_end();
            tokio::select! {
                _ = tokio::time::sleep_until(renew_at) => {
                    match self.reclaim(&mut client, "renewal").await {
                        Ok(()) => {
                            log_held(&self.held, &self.params, "renewed");
                            conn = Some((client, watch));
                        }
                        // Renewed on the next member at once: waiting on this one could run
                        // the lease down.
                        Err(LeaseError::Etcd { source }) if source.is_transient() => {
                            self.member_failed("renewing the lease", &source, &mut outage);
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                _ = sleep_until_some(grace_end) => {
                    let events = self.peers.end_grace(Instant::now());
                    self.send(events);
                    conn = Some((client, watch));
                }
                batch = watch.next() => match batch {
                    Ok(WatchBatch::Changes(changes)) => {
                        match self.apply_changes(&mut client, changes).await {
                            Ok(()) => conn = Some((client, watch)),
                            Err(LeaseError::Etcd { source }) if source.is_transient() => {
                                self.member_failed("applying lease changes", &source, &mut outage);
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Ok(WatchBatch::Compacted) => {
                        tracing::info!("the watch revision was compacted; listing leases again");
                        match self.sync_peers(&mut client).await {
                            Ok((w, _)) => conn = Some((client, w)),
                            Err(e) => self.member_failed("relisting leases", &e, &mut outage),
                        }
                    }
                    Err(e) => self.member_failed("watching leases", &e, &mut outage),
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
                    self.health.lease_lost(NoLease::Deleted);
                    self.reclaim(client, "re-acquire").await?;
                    log_held(&self.held, &self.params, "re-acquired");
                }
                LeaseChange::Put {
                    subnet,
                    attrs: Ok(a),
                    ..
                } if *subnet == own && a.public_ip == self.params.attrs.public_ip => {}
                LeaseChange::Put { subnet, .. } if *subnet == own => {
                    // Someone overwrote our key; claim() reports who holds it now.
                    self.reclaim(client, "overwritten").await?;
                }
                LeaseChange::Config { value } => self.config_written(value.as_deref()),
                LeaseChange::Deleted { subnet } => {
                    let gone = match self.peers.etcd_lease_of(subnet) {
                        Some(id) => self.gone(client, id).await?,
                        None => Gone::Deleted,
                    };
                    let events = self.peers.apply(&change, gone);
                    self.send(events);
                }
                LeaseChange::Put { .. } => {
                    let events = self.peers.apply(&change, Gone::Deleted);
                    self.send(events);
                }
            }
        }
        Ok(())
    }

    /// The config key changed while running. The agent keeps the config it runs with: its
    /// subnet, devices and subnet.env (docker's --bip) all follow from it, and changing them
    /// under running containers would cut them off. Leases outside the running Network are
    /// refused meanwhile. Said once per new value; restarting the agents moves them.
    fn config_written(&mut self, value: Option<&[u8]>) {
        let running = &self.params.config;
        let same = value
            .and_then(|v| NetworkConfig::parse(v).ok())
            .is_some_and(|c| c == *running);
        if same {
            if self.changed_config.take().is_some() {
                tracing::info!(
                    "the network config at {} matches the running one again",
                    self.config_key
                );
            }
            return;
        }
        let value = value.map(<[u8]>::to_vec);
        if self.changed_config.as_ref() == Some(&value) {
            return;
        }
        let what = match value.as_deref().map(NetworkConfig::parse) {
            None => "was deleted".to_owned(),
            Some(Err(e)) => format!("is now invalid ({e})"),
            Some(Ok(c)) if c.network != running.network => {
                format!(
                    "now says Network {} (running: {})",
                    c.network, running.network
                )
            }
            Some(Ok(_)) => "changed".to_owned(),
        };
        tracing::error!(
            "the network config at {} {what} while running; this agent keeps running with \
             Network {} and subnet {} until it is restarted (restart agents host by host to \
             move them); leases outside the running Network are ignored meanwhile",
            self.config_key,
            running.network,
            self.held.subnet
        );
        self.changed_config = Some(value);
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        None => std::future::pending().await,
    }
}

/// The eBPF datapath's options from the command line.
fn ebpf_options(cli: &Cli) -> EbpfOptions {
    EbpfOptions {
        bpffs: Some(cli.bpffs.clone()),
        decap: match cli.decap {
            DecapKind::Tc => DecapHook::Tc,
            DecapKind::Xdp => DecapHook::Xdp(XdpMode::Driver),
            DecapKind::XdpGeneric => DecapHook::Xdp(XdpMode::Skb),
        },
        deliver_via_stack: cli.deliver_via_stack,
        no_peer_counters: !cli.peer_counters,
    }
}

/// Builds the overlay for the backend before the lease is acquired, so a kernel or privilege
/// problem (e.g. `--datapath=ebpf` on a kernel that refuses the programs) stops the agent before
/// it takes a subnet. `None` for alloc, which forwards nothing.
fn build_overlay(
    cli: &Cli,
    backend: &Backend,
    public_ip: Ipv4Addr,
    kept_mac: Option<Mac>,
    underlay: Option<&Underlay>,
) -> Result<Option<Overlay>, DaemonError> {
    let Some(mut spec) = OverlaySpec::new(backend, public_ip) else {
        return Ok(None);
    };
    if let Some(mac) = kept_mac
        && mac != spec.vtep_mac()
    {
        tracing::info!(
            "keeping VtepMAC {mac}, which this host's lease already publishes (flanneld's?), so \
             peers need no update"
        );
        spec = spec.keeping_vtep_mac(mac);
    }
    let overlay = dataplane::select(cli.datapath, spec, ebpf_options(cli))
        .map_err(|source| DaemonError::Select { source })?;
    // Why it was chosen is dataplane::select's line (auto), or the flag itself.
    tracing::info!(
        "datapath: {}{}",
        overlay.describe(),
        underlay.map_or(String::new(), |u| format!(" on {}", u.name))
    );
    Ok(Some(overlay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_lease_is_written_as_flanneld_writes_it() {
        let cli = Cli::try_parse_args_from(["overlay-agent"]).unwrap();
        let config = NetworkConfig::parse(br#"{"Network":"172.16.0.0/12"}"#).unwrap();
        let params = lease_params(
            &cli,
            "/flannel".into(),
            &config,
            Ipv4Addr::new(192, 168, 100, 4),
            None,
        );
        assert_eq!(
            params.attrs.to_json(),
            r#"{"PublicIP":"192.168.100.4","PublicIPv6":null}"#
        );
    }
}
