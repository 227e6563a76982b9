//! The status socket: a running agent answers each connection with its [`Status`] as JSON and
//! closes it. An abstract unix socket named after the pin root (`@overlay-agent:<--bpffs>`):
//! scoped to the network namespace like the agent's devices, gone with the process (no file
//! to clean up after a crash), and one per agent, as the pin root is.

use std::{
    io,
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr},
    path::Path,
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::Status;
use crate::control::healthz::Health;

/// How long a failed accept waits before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long `status` waits for the agent's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Errors of the status socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Binding failed (another agent with the same `--bpffs` runs in this network namespace).
    #[error("binding the status socket {name}: {source}")]
    Bind {
        /// The socket's name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// No agent answers.
    #[error("no agent answers on {name}: {source}")]
    Connect {
        /// The socket's name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The agent did not answer in time.
    #[error("the agent on {name} did not answer within {ANSWER_WAIT:?}")]
    Timeout {
        /// The socket's name.
        name: String,
    },
    /// The answer is not a status.
    #[error("the agent on {name} answered something unreadable: {source}")]
    Decode {
        /// The socket's name.
        name: String,
        /// The error.
        #[source]
        source: serde_json::Error,
    },
}

/// The socket's name for the agent pinning under `bpffs`, as `ss -x` shows it.
pub fn name(bpffs: &Path) -> String {
    format!("@overlay-agent:{}", bpffs.display())
}

fn address(bpffs: &Path) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(&name(bpffs).as_bytes()[1..])
}

/// Binds the socket; [`serve`] answers on it.
pub fn bind(bpffs: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    let bind_error = |source| SocketError::Bind {
        name: name(bpffs),
        source,
    };
    let listener =
        std::os::unix::net::UnixListener::bind_addr(&address(bpffs).map_err(bind_error)?)
            .map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    tokio::net::UnixListener::from_std(listener).map_err(bind_error)
}

/// Answers every connection from root or this agent's user with the status, until dropped.
/// Others get nothing: the status names peers, keys and addresses.
pub async fn serve(listener: tokio::net::UnixListener, health: Health) {
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            // Out of file descriptors, typically: retrying at once would only spin.
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        let allowed = conn
            .peer_cred()
            .is_ok_and(|c| c.uid() == 0 || c.uid() == own_uid);
        if !allowed {
            continue;
        }
        let health = health.clone();
        tokio::spawn(async move {
            let body = match tokio::task::spawn_blocking(move || health.status()).await {
                Ok(status) => serde_json::to_vec(&status).unwrap_or_default(),
                Err(_) => return,
            };
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        });
    }
}

/// Asks the agent pinning under `bpffs` (in this network namespace) for its status.
pub async fn fetch(bpffs: &Path) -> Result<Status, SocketError> {
    let name = name(bpffs);
    let connect_error = |source| SocketError::Connect {
        name: name.clone(),
        source,
    };
    let std_stream =
        std::os::unix::net::UnixStream::connect_addr(&address(bpffs).map_err(connect_error)?)
            .map_err(connect_error)?;
    std_stream.set_nonblocking(true).map_err(connect_error)?;
    let mut stream = tokio::net::UnixStream::from_std(std_stream).map_err(connect_error)?;
    let mut body = Vec::new();
    tokio::time::timeout(ANSWER_WAIT, stream.read_to_end(&mut body))
        .await
        .map_err(|_| SocketError::Timeout { name: name.clone() })?
        .map_err(connect_error)?;
    serde_json::from_slice(&body).map_err(|source| SocketError::Decode { name, source })
}
