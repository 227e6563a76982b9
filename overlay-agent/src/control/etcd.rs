//! The connection to etcd: endpoints, TLS, user/password, and reconnecting with a capped backoff.
//!
//! The agent talks to one member at a time and moves to the next when that member fails. The
//! client library's own balancing over several endpoints sends some requests to a dead member
//! and fails them (etcd-client#39), which stalled renewals while quorum held; a connection to
//! one member fails or works as a whole, so a dead member costs one failed request and a switch.
//!
//! Endpoints are checked when the agent starts (scheme `http` or `https`, a host, a port that
//! exists), since the client library would otherwise dial something else than what was written
//! (a port above 65535 became port 80) or wait forever (`ftp://`). A failed request is logged as
//! one short reason ([`EtcdError::brief`]: "connection refused", "TLS handshake: unknown CA",
//! "timeout after 3 s", "dns: no such host"); the transport's whole error chain goes to the debug
//! level.

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
/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request may take once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// An endpoint that cannot be dialled as written (scheme, host or port).
    #[error("--etcd-endpoints {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
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
    /// One short line for a log line a person reads: for a failed request the reason alone
    /// ("connection refused", "TLS handshake: unknown CA", "timeout after 3 s", "dns: no such
    /// host", or etcd's own message), else the error itself. The whole chain, which for a
    /// transport error runs to hundreds of characters of tonic and hyper, is logged at debug
    /// level here, so that each summarised line has its detail one level down.
    pub fn brief(&self) -> String {
        let EtcdError::Request { op, source } = self else {
            return error_chain(self);
        };
        let chain = error_chain(self);
        tracing::debug!("etcd {op}: {chain}");
        let reason = match source {
            // etcd's own answer ("etcdserver: no leader"): short already, and the point.
            etcd_client::Error::GRpcStatus(status)
                if status.message().starts_with("etcdserver:") =>
            {
                first_line(status.message()).to_owned()
            }
            // Else a known cause: tonic reports some transport failures (TLS) as a status.
            _ => known_cause(&chain, *op == "connect").unwrap_or_else(|| match source {
                etcd_client::Error::GRpcStatus(status) => first_line(status.message()).to_owned(),
                _ => last_cause(&chain),
            }),
        };
        format!("{op}: {reason}")
    }

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
        for endpoint in &endpoints {
            check_endpoint(endpoint).map_err(|reason| EtcdError::BadEndpoint {
                endpoint: endpoint.clone(),
                reason,
            })?;
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
                        e.brief()
                    ),
                    (true, Ok(Err(e))) => {
                        tracing::warn!("etcd member {endpoint} unreachable: {}", e.brief());
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
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
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
                    e.brief()
                );
            } else {
                tracing::warn!("etcd member {endpoint} unreachable: {}", e.brief());
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
                e.brief()
            );
            self.last_summary = Instant::now();
        }
    }
}

fn endpoints_up(n: usize) -> Vec<AtomicBool> {
    (0..n).map(|_| AtomicBool::new(true)).collect()
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The reason in a transport error's chain, in a person's words, when it is one of those known;
/// `connecting`: the connection was being opened (its timeout is the connect timeout).
fn known_cause(chain: &str, connecting: bool) -> Option<String> {
    let c = chain.to_ascii_lowercase();
    let has = |needles: &[&str]| needles.iter().any(|n| c.contains(n));
    let secs = |d: Duration| d.as_secs();
    let reason: String = if has(&["connection refused"]) {
        "connection refused".into()
    } else if has(&[
        "unknownissuer",
        "unknown ca",
        "unknown issuer",
        "self-signed",
        "self signed",
    ]) {
        "TLS handshake: unknown CA (give --etcd-cafile the CA that signed etcd's certificate)"
            .into()
    } else if has(&["expired"]) && has(&["certificate", "tls"]) {
        "TLS handshake: certificate expired".into()
    } else if has(&["notvalidforname", "not valid for name", "hostname mismatch"]) {
        "TLS handshake: certificate not valid for this host name".into()
    } else if has(&[
        "certificate required",
        "certificaterequired",
        "bad certificate",
    ]) {
        "TLS handshake: etcd wants a client certificate (--etcd-certfile, --etcd-keyfile)".into()
    } else if has(&[
        "invalid content type",
        "corrupt message",
        "invalidcontenttype",
    ]) {
        "TLS handshake: the endpoint does not speak TLS (http:// instead of https://?)".into()
    } else if has(&["tls", "handshake", "certificate"]) {
        format!("TLS handshake: {}", last_cause(chain))
    } else if has(&[
        "name or service not known",
        "no such host",
        "nodename nor servname",
        "no address associated",
    ]) {
        "dns: no such host".into()
    } else if has(&["dns error", "failed to lookup address"]) {
        format!("dns: {}", last_cause(chain))
    } else if has(&[
        "timed out",
        "timeout",
        "deadline has elapsed",
        "deadline exceeded",
    ]) {
        let after = if connecting && has(&["connect"]) {
            CONNECT_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        format!("timeout after {} s", secs(after))
    } else if has(&["network is unreachable"]) {
        "network unreachable".into()
    } else if has(&["no route to host"]) {
        "no route to host".into()
    } else if has(&["connection reset"]) {
        "connection reset".into()
    } else {
        return None;
    };
    Some(reason)
}

/// The innermost cause of a `": "`-joined chain, cut to a line's length.
fn last_cause(chain: &str) -> String {
    let last = chain.rsplit(": ").next().unwrap_or(chain);
    let last = first_line(last);
    match last.char_indices().nth(120) {
        Some((i, _)) => format!("{}...", &last[..i]),
        None => last.to_owned(),
    }
}

/// Whether `endpoint` can be dialled as written: `http://` or `https://` (or no scheme, which
/// the client takes as `http://`), a host, and a port from 1 to 65535 if one is given.
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let rest = match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                return Err(format!(
                    "unsupported scheme {scheme:?}: etcd is reached over http:// or https://"
                ));
            }
            rest
        }
        None => endpoint,
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':')),
            None => return Err("unclosed [ in the IPv6 address".into()),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host".into());
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => {
                return Err(format!(
                    "invalid port {port:?}: a port is a number from 1 to 65535"
                ));
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_that_cannot_be_dialled_are_refused() {
        for ok in [
            "http://127.0.0.1:2379",
            "https://etcd.example:2379",
            "http://[::1]:2379",
            "127.0.0.1:2379",
            "http://etcd/",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("ftp://127.0.0.1:2379", "unsupported scheme \"ftp\""),
            ("http://host:99999", "invalid port \"99999\""),
            ("http://host:0", "invalid port"),
            ("http://host:x", "invalid port"),
            ("http://:2379", "no host"),
        ] {
            let e = check_endpoint(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = EtcdSettings::new(
            vec!["http://127.0.0.1:2379".into(), "http://host:99999".into()],
            None,
            None,
            None,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("host:99999"), "{e}");
    }

    #[test]
    fn transport_chains_become_one_short_reason() {
        let cases = [
            (
                "etcd connect: transport error: error trying to connect: tcp connect error: \
                 Connection refused (os error 111)",
                "connection refused",
            ),
            (
                "transport error: error trying to connect: invalid peer certificate: \
                 UnknownIssuer",
                "TLS handshake: unknown CA",
            ),
            (
                "transport error: error trying to connect: dns error: failed to lookup address \
                 information: Name or service not known",
                "dns: no such host",
            ),
            (
                "transport error: error trying to connect: tcp connect error: deadline has \
                 elapsed",
                "timeout after 3 s",
            ),
        ];
        for (chain, want) in cases {
            let got = known_cause(chain, true).unwrap_or_default();
            assert!(got.starts_with(want), "{chain}: {got}");
        }
        assert_eq!(known_cause("a: b: something odd", false), None);
        assert_eq!(last_cause("a: b: something odd"), "something odd");
    }
}
