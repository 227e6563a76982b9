//! The connection to etcd: endpoints, TLS, user/password, and reconnecting with a capped backoff.

use std::{path::PathBuf, time::Duration};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

/// First pause between connection attempts; it doubles up to [`BACKOFF_CAP`].
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest pause between connection attempts, so a returning etcd is found within seconds.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);

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
        Ok(Self {
            endpoints: endpoints
                .into_iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect(),
            ca_file,
            cert_file,
            key_file,
            credentials,
        })
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

    /// One connection attempt, proven by a read of `probe_key` (connecting alone is lazy and
    /// would succeed with etcd down).
    pub async fn connect_once(&self, probe_key: &str) -> Result<Client, EtcdError> {
        let opts = self.options()?;
        let mut client = Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(|source| match source {
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                    EtcdError::BadEndpoints {
                        endpoints: self.endpoints.join(","),
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

    /// Connects, retrying transient failures forever with a capped exponential backoff and one
    /// log line per failed attempt. Returns only errors that retrying cannot cure.
    pub async fn connect(&self, probe_key: &str) -> Result<Client, EtcdError> {
        let mut pause = BACKOFF_START;
        let mut attempt = 1u32;
        loop {
            match self.connect_once(probe_key).await {
                Ok(client) => {
                    if attempt > 1 {
                        tracing::info!(endpoints = %self.endpoints.join(","), "connected to etcd");
                    }
                    return Ok(client);
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(
                        "etcd at {} unreachable (attempt {attempt}), retrying in {:.1}s: {}",
                        self.endpoints.join(","),
                        pause.as_secs_f32(),
                        error_chain(&e)
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(BACKOFF_CAP);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
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
