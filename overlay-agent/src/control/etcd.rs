//! The connection to etcd: endpoints, TLS, user/password, and reconnecting with a capped backoff.
//!
//! The agent talks to one member at a time and moves to the next when that member fails. The
//! client library's own balancing over several endpoints sends some requests to a dead member
//! and fails them (etcd-client#39), which stalled renewals while quorum held; a connection to
//! one member fails or works as a whole, so a dead member costs one failed request and a switch.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

/// First pause between connection attempts; it doubles up to [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest pause between connection attempts, so a returning etcd is found within seconds.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// While no member answers, one summary line this often instead of one per attempt.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);
/// `in_use` before the first connection.
const NO_MEMBER: usize = usize::MAX;
/// How often the members not in use are probed.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How long a probe may take before the member counts as not answering.
const PROBE_TIMEOUT: Duration = Duration::from_secs(4);

/// Errors of setting up or using the etcd connection.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file given on the command line cannot be read.
    #[error("reading {what} {path}: {source}")]
    ReadFile {
        /// Which file: "CA file", "certificate file" or "key file".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Only one of --etcd-certfile and --etcd-keyfile was given.
    #[error("--etcd-certfile and --etcd-keyfile must be given together")]
    HalfIdentity,
    /// Only one of --etcd-username and --etcd-password was given.
    #[error("--etcd-username and --etcd-password must be given together")]
    HalfCredentials,
    /// `--etcd-endpoints` lists no endpoint.
    #[error("--etcd-endpoints lists no endpoint")]
    NoEndpoints,
    /// The endpoints or options are refused by the client library (e.g. TLS files with an
    /// `http://` endpoint); retrying cannot help.
    #[error("etcd endpoints {endpoints}: {source}")]
    BadEndpoints {
        /// The endpoints as given.
        endpoints: String,
        /// What the client reported.
        #[source]
        source: etcd_client::Error,
    },
    /// Connecting, authenticating or a request failed; etcd may be down or unreachable.
    #[error("etcd {op}: {source}")]
    Request {
        /// What was being done.
        op: &'static str,
        /// What the client reported.
        #[source]
        source: etcd_client::Error,
    },
}

impl EtcdError {
    /// True for errors that another attempt may cure (etcd down, network, auth token expired),
    /// false for errors in the agent's own settings.
    pub fn is_transient(&self) -> bool {
        matches!(self, EtcdError::Request { .. })
    }

    /// True when a member answered but could not serve the request for want of a leader (an
    /// election in progress, or no quorum): the member is reachable, the cluster is not ready.
    pub fn is_no_leader(&self) -> bool {
        match self {
            EtcdError::Request {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            } => ["no leader", "leader changed", "request timed out"]
                .iter()
                .any(|m| status.message().contains(m)),
            _ => false,
        }
    }
}

/// Shorthand for mapping an `etcd_client` error of one operation.
pub fn req(op: &'static str) -> impl FnOnce(etcd_client::Error) -> EtcdError {
    move |source| EtcdError::Request { op, source }
}

/// How to reach etcd, from the command line.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// CA of etcd's server certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert_file: Option<PathBuf>,
    /// Client certificate's key.
    pub key_file: Option<PathBuf>,
    /// User name and password for etcd authentication.
    pub credentials: Option<(String, String)>,
    /// Index in `endpoints` of the member the last connection went to; shared by clones so a
    /// reconnect anywhere moves on from the member that failed.
    in_use: Arc<AtomicUsize>,
    /// Connection attempts no member answered, shared by clones.
    unanswered: Arc<AtomicU64>,
    /// Per member, whether it answered last time it was tried or probed.
    up: Arc<Vec<AtomicBool>>,
}

impl EtcdSettings {
    /// Collects and cross-checks the etcd flags.
    pub fn new(
        endpoints: Vec<String>,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<Self, EtcdError> {
        if cert_file.is_some() != key_file.is_some() {
            return Err(EtcdError::HalfIdentity);
        }
        let credentials = match (username, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            // flanneld sends an empty password when only the user is set; so do we.
            (Some(u), None) => Some((u, String::new())),
            (None, Some(_)) => return Err(EtcdError::HalfCredentials),
        };
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let n = endpoints.len();
        Ok(Self {
            endpoints,
            ca_file,
            cert_file,
            key_file,
            credentials,
            in_use: Arc::new(AtomicUsize::new(NO_MEMBER)),
            unanswered: Arc::new(AtomicU64::new(0)),
            up: Arc::new(endpoints_up(n)),
        })
    }

    /// How many members answered when last tried or probed.
    pub fn members_up(&self) -> usize {
        self.up.iter().filter(|u| u.load(Ordering::Relaxed)).count()
    }

    /// Probes the members not in use, every [`PROBE_EVERY`], until dropped; each change between
    /// answering and not is logged once. An agent that is not using a member that went down
    /// still names it, and a reconnect tries the members that answer first.
    pub async fn probe_members(self, probe_key: String) {
        let n = self.endpoints.len();
        if n < 2 {
            return;
        }
        // Kept across probes: with authentication, each new client costs etcd a password
        // check.
        let mut clients: Vec<Option<Client>> = (0..n).map(|_| None).collect();
        loop {
            tokio::time::sleep(PROBE_EVERY).await;
            for (i, slot) in clients.iter_mut().enumerate() {
                if i == self.in_use.load(Ordering::Relaxed) {
                    // The connection in use reports on its member itself.
                    continue;
                }
                let result = tokio::time::timeout(PROBE_TIMEOUT, async {
                    if slot.is_none() {
                        *slot = Some(self.connect_member(i, &probe_key).await?);
                    } else if let Some(client) = slot {
                        client
                            .get(
                                probe_key.as_str(),
                                Some(GetOptions::new().with_count_only()),
                            )
                            .await
                            .map_err(req("probe"))?;
                    }
                    Ok::<_, EtcdError>(())
                })
                .await;
                let endpoint = &self.endpoints[i];
                let answered = matches!(result, Ok(Ok(())));
                let was = self.up[i].swap(answered, Ordering::Relaxed);
                match (was, result) {
                    (true, Ok(Err(e))) if e.is_no_leader() => tracing::warn!(
                        "etcd member {endpoint} answers but cannot serve: the cluster has no \
                         leader ({})",
                        error_chain(&e)
                    ),
                    (true, Ok(Err(e))) => {
                        tracing::warn!("etcd member {endpoint} unreachable: {}", error_chain(&e));
                    }
                    (true, Err(_)) => tracing::warn!(
                        "etcd member {endpoint} unreachable: no answer within {}",
                        humantime::format_duration(PROBE_TIMEOUT)
                    ),
                    (false, Ok(Ok(()))) => tracing::info!("etcd member {endpoint} answers again"),
                    _ => {}
                }
                if !answered {
                    *slot = None;
                }
            }
        }
    }

    /// The count of connection attempts to a member that did not answer, which keeps growing
    /// while etcd is away (the log says so only once a minute).
    pub fn unanswered(&self) -> Arc<AtomicU64> {
        self.unanswered.clone()
    }

    /// The endpoint of the member the current connection goes to.
    pub fn member(&self) -> &str {
        let i = self.in_use.load(Ordering::Relaxed);
        self.endpoints.get(i).map_or("(none yet)", String::as_str)
    }

    fn options(&self) -> Result<ConnectOptions, EtcdError> {
        let read = |what, path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdError::ReadFile {
                what,
                path: path.clone(),
                source,
            })
        };
        // Keep-alive pings make a watch on a dead connection fail within seconds instead of
        // hanging until TCP gives up; the timeouts keep a request from hanging on a dead peer.
        let mut opts = ConnectOptions::new()
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(10))
            // A member cut off from the others refuses requests and ends watches ("no leader")
            // instead of serving stale reads and a watch that never fires, so the agent moves
            // to a member that is part of the quorum.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read("CA file", ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(
                    read("certificate file", cert)?,
                    read("key file", key)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = &self.credentials {
            opts = opts.with_user(user, password);
        }
        Ok(opts)
    }

    /// One connection attempt to member `index`, proven by a read of `probe_key` (connecting
    /// alone is lazy and would succeed with etcd down).
    async fn connect_member(&self, index: usize, probe_key: &str) -> Result<Client, EtcdError> {
        let opts = self.options()?;
        let endpoint = &self.endpoints[index];
        let mut client = Client::connect([endpoint], Some(opts))
            .await
            .map_err(|source| match source {
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                    EtcdError::BadEndpoints {
                        endpoints: endpoint.clone(),
                        source,
                    }
                }
                source => EtcdError::Request {
                    op: "connect",
                    source,
                },
            })?;
        client
            .get(probe_key, Some(GetOptions::new().with_count_only()))
            .await
            .map_err(req("connect"))?;
        Ok(client)
    }

    /// Tries each member once, starting after the one in use (which just failed, when there is
    /// one); `failed` hears of each member that did not answer. The last transient error is
    /// returned when none answers.
    async fn round(
        &self,
        probe_key: &str,
        failed: &mut dyn FnMut(&str, &EtcdError),
    ) -> Result<Client, EtcdError> {
        let n = self.endpoints.len();
        let first = match self.in_use.load(Ordering::Relaxed) {
            NO_MEMBER => 0,
            i => (i + 1) % n,
        };
        // Members that answered last time first, each group in ring order.
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        order.sort_by_key(|&i| !self.up[i].load(Ordering::Relaxed));
        let mut last = None;
        for i in order {
            match self.connect_member(i, probe_key).await {
                Ok(client) => {
                    self.in_use.store(i, Ordering::Relaxed);
                    self.up[i].store(true, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(e) if e.is_transient() => {
                    self.unanswered.fetch_add(1, Ordering::Relaxed);
                    self.up[i].store(false, Ordering::Relaxed);
                    failed(&self.endpoints[i], &e);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint (checked in new)"))
    }

    /// Connects to the first member that answers, retrying rounds over all members forever with
    /// a capped exponential backoff, and returns only errors that retrying cannot cure. What is
    /// logged is bounded by `outage`: each member that does not answer is named once, and while
    /// none does, one summary line a minute. Success is not logged: the caller knows what was
    /// resumed.
    pub async fn connect(&self, probe_key: &str, outage: &mut Outage) -> Result<Client, EtcdError> {
        let mut pause = BACKOFF_START;
        loop {
            let result = self
                .round(probe_key, &mut |endpoint, e| {
                    outage.member_failed(endpoint, e)
                })
                .await;
            match result {
                Ok(client) => return Ok(client),
                Err(e) if e.is_transient() => {
                    outage.round_failed(&self.endpoints, &e);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(BACKOFF_CAP);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// An etcd outage as the agent lives through it, from the first failed request to the next
/// working connection: when it began, and what was logged, so that a long one logs a bounded
/// number of lines.
#[derive(Debug)]
pub struct Outage {
    since: Instant,
    named: Vec<String>,
    rounds: u32,
    last_summary: Instant,
}

impl Default for Outage {
    fn default() -> Self {
        Self::new()
    }
}

impl Outage {
    /// An outage beginning now.
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            since: now,
            named: Vec::new(),
            rounds: 0,
            last_summary: now,
        }
    }

    /// How long it has lasted, to the second.
    pub fn lasted(&self) -> Duration {
        round_secs(self.since.elapsed())
    }

    /// When it began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Rounds over all members that none answered.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    fn member_failed(&mut self, endpoint: &str, e: &EtcdError) {
        if !self.named.iter().any(|n| n == endpoint) {
            if e.is_no_leader() {
                // Named for what it is: an election or a lost quorum, not a member down.
                tracing::warn!(
                    "etcd member {endpoint} answers but cannot serve: the cluster has no \
                     leader ({}); waiting for one",
                    error_chain(e)
                );
            } else {
                tracing::warn!("etcd member {endpoint} unreachable: {}", error_chain(e));
            }
            self.named.push(endpoint.to_owned());
        }
    }

    fn round_failed(&mut self, endpoints: &[String], e: &EtcdError) {
        self.rounds += 1;
        if self.rounds == 1 {
            tracing::warn!(
                "no etcd member serves requests ({}); the datapath and the known peers stay as \
                 they are; retrying, with a summary every {}",
                endpoints.join(", "),
                humantime::format_duration(OUTAGE_LOG_EVERY)
            );
        } else if self.last_summary.elapsed() >= OUTAGE_LOG_EVERY {
            tracing::warn!(
                "etcd still unreachable after {} ({} rounds over {} members), last: {}",
                humantime::format_duration(self.lasted()),
                self.rounds,
                endpoints.len(),
                error_chain(e)
            );
            self.last_summary = Instant::now();
        }
    }
}

fn endpoints_up(n: usize) -> Vec<AtomicBool> {
    (0..n).map(|_| AtomicBool::new(true)).collect()
}

/// A duration to the second, for log lines.
pub fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// An error and its sources on one line: tonic's top-level messages ("transport error") say
/// little without the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
