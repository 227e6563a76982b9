//! A real etcd for the control-plane tests, and the agent processes that use it, each behind an
//! RAII guard: whatever a test does, dropping the guards kills the processes and deletes their
//! files.
//!
//! etcd listens on free loopback ports only, with its data in a fresh temporary directory. TLS
//! certificates are made with the `openssl` command (Debian's `openssl` package, present on the
//! project's machines); authentication is set up with `etcdctl`.
//!
//! This module uses only std and libc (the library must not depend on overlay-agent).

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

/// Where Debian's etcd-server and etcd-client packages put the binaries.
pub const ETCD: &str = "/usr/bin/etcd";
/// See [`ETCD`].
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// Errors of the etcd and agent helpers.
#[derive(Debug, thiserror::Error)]
pub enum EtcdTestError {
    /// A command could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {output}")]
    Failed {
        /// The command line.
        command: String,
        /// Its stderr and stdout.
        output: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = EtcdTestError> = std::result::Result<T, E>;

/// A temporary directory, removed with its content on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `/tmp/overlay-tests-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "overlay-tests-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| EtcdTestError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the kernel does not reuse it at once).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

fn run_checked(cmd: &mut Command) -> Result<Output> {
    let program = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|source| EtcdTestError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(EtcdTestError::Failed {
            command: format!(
                "{program} {}",
                cmd.get_args()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        });
    }
    Ok(out)
}

/// Certificates for an etcd with TLS and client-certificate authentication.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed everything below.
    pub ca: PathBuf,
    /// etcd's certificate (SAN 127.0.0.1, localhost).
    pub server_cert: PathBuf,
    /// etcd's key.
    pub server_key: PathBuf,
    /// A client certificate the CA signed.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Makes a CA, a server and a client certificate (ECDSA P-256, valid one day) in `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let p = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| run_checked(Command::new("openssl").args(args));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
        let (ca, ca_key) = (p("ca.crt"), p("ca.key"));
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", &s(&ca_key), "-out", &s(&ca), "-days", "1"],
                &["-subj", "/CN=overlay-tests CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        )?;
        let leaf = |name: &str, ext: &str| -> Result<(PathBuf, PathBuf)> {
            let (cert, key, csr, extfile) = (
                p(&format!("{name}.crt")),
                p(&format!("{name}.key")),
                p(&format!("{name}.csr")),
                p(&format!("{name}.ext")),
            );
            std::fs::write(&extfile, ext).map_err(|source| EtcdTestError::Io {
                path: extfile.clone(),
                source,
            })?;
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &s(&key), "-out", &s(&csr)],
                    &["-subj", &format!("/CN={name}")],
                ]
                .concat(),
            )?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &s(&csr),
                "-CA",
                &s(&ca),
                "-CAkey",
                &s(&ca_key),
                "-CAcreateserial",
                "-out",
                &s(&cert),
                "-days",
                "1",
                "-extfile",
                &s(&extfile),
            ])?;
            Ok((cert, key))
        };
        let (server_cert, server_key) = leaf(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n\
             basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        )?;
        let (client_cert, client_key) = leaf(
            "client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\n",
        )?;
        Ok(Self {
            ca,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }
}

/// How to start etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Serve clients over TLS and require client certificates.
    pub tls: bool,
}

/// A running etcd on loopback, with its data in a temporary directory.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    tls: Option<TlsFiles>,
    /// `user:password` etcdctl authenticates with once authentication is on.
    root_user: Option<String>,
    dir: TempDir,
}

impl Etcd {
    /// Starts a plain-HTTP etcd and waits until it answers.
    pub fn start() -> Result<Self> {
        Self::start_with(&EtcdOptions::default())
    }

    /// Starts etcd as `opts` says and waits until it answers.
    pub fn start_with(opts: &EtcdOptions) -> Result<Self> {
        let dir = TempDir::new("etcd")?;
        let tls = if opts.tls {
            let certs = dir.path().join("certs");
            std::fs::create_dir_all(&certs).map_err(|source| EtcdTestError::Io {
                path: certs.clone(),
                source,
            })?;
            Some(TlsFiles::generate(&certs)?)
        } else {
            None
        };
        let mut etcd = Self {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            root_user: None,
            dir,
        };
        etcd.restart()?;
        Ok(etcd)
    }

    /// The client URL (`http://127.0.0.1:PORT` or `https://...`).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates, when started with TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The data directory's parent, a scratch directory removed with the guard.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops etcd (SIGKILL: an outage, not a shutdown); the data is kept for [`Etcd::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// True while etcd runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// (Re)starts etcd on the same ports with the same data and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let url = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = self.dir.path().join("etcd.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| EtcdTestError::Io {
                path: log.clone(),
                source,
            })?;
        let mut cmd = Command::new(ETCD);
        cmd.args(["--name", "overlay-tests"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("overlay-tests={peer}")])
            // Quiet and fast: no metrics listener, small snapshots, fsync is the disk's business.
            .args(["--log-level", "warn", "--logger", "zap"])
            .args(["--unsafe-no-fsync"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file);
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().map_err(|source| EtcdTestError::Spawn {
            program: ETCD.into(),
            source,
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.try_etcdctl(&["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                // No etcdctl to ask: waiting would only end in the timeout, hiding why.
                Err(err @ EtcdTestError::Spawn { .. }) => return Err(err),
                Err(_) => {}
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(EtcdTestError::Failed {
                    command: format!("{ETCD} (exited with {status})"),
                    output: text,
                });
            }
            if Instant::now() > deadline {
                return Err(EtcdTestError::Timeout {
                    what: format!("etcd at {url}"),
                    waited: Duration::from_secs(20),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn etcdctl_cmd(&self) -> Command {
        let mut cmd = Command::new(ETCDCTL);
        cmd.env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "--command-timeout=5s"]);
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some(u) = &self.root_user {
            cmd.args(["--user", u]);
        }
        cmd
    }

    /// Runs etcdctl against this etcd (with its certificates and root user) and returns stdout.
    pub fn try_etcdctl(&self, args: &[&str]) -> Result<String> {
        let out = run_checked(self.etcdctl_cmd().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`Etcd::try_etcdctl`], panicking on failure (for test bodies).
    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"))
    }

    /// Writes `key` = `value` (no lease: a reservation, when under `subnets/`).
    pub fn put(&self, key: &str, value: &str) {
        // `--` so values starting with '-' are not taken for flags.
        self.etcdctl(&["put", "--", key, value]);
    }

    /// Deletes `key`.
    pub fn del(&self, key: &str) {
        self.etcdctl(&["del", "--", key]);
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", "--", key]);
        let v = out.strip_suffix('\n').unwrap_or(&out);
        (!out.is_empty()).then(|| v.to_owned())
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", "--prefix", "--", prefix]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_owned(), c[1].to_owned()))
            .collect()
    }

    /// The etcd lease (hex id as etcdctl prints it) `key` is attached to; 0 for none.
    pub fn lease_of(&self, key: &str) -> i64 {
        let out = self.etcdctl(&["get", "-w", "fields", "--", key]);
        out.lines()
            .find_map(|l| l.strip_prefix("\"Lease\" : "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Turns authentication on: a `root` user (which etcdctl then uses) and `user` with
    /// read-write access to the keys under `prefix` only.
    pub fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) -> Result<()> {
        let root_pw = "root-secret";
        self.try_etcdctl(&["user", "add", &format!("root:{root_pw}")])?;
        self.try_etcdctl(&["user", "grant-role", "root", "root"])?;
        self.try_etcdctl(&["role", "add", user])?;
        self.try_etcdctl(&[
            "role",
            "grant-permission",
            user,
            "--prefix=true",
            "readwrite",
            prefix,
        ])?;
        self.try_etcdctl(&["user", "add", &format!("{user}:{password}")])?;
        self.try_etcdctl(&["user", "grant-role", user, user])?;
        self.try_etcdctl(&["auth", "enable"])?;
        self.root_user = Some(format!("root:{root_pw}"));
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `overlay-agent` binary the tests run.
///
/// Cargo builds a dependency's binaries only for that package's own tests, so this test crate
/// builds it itself, once per test process, with the same cargo (`$CARGO`), profile and target
/// directory as the running test (both read from the test executable's path,
/// `<target>/<profile>/deps/<test>`): cargo's own freshness check then guarantees the binary
/// matches the sources, and costs about a second when nothing changed. `OVERLAY_AGENT_BIN`
/// overrides all of this (e.g. to test an installed binary).
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("OVERLAY_AGENT_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executables live in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd = Command::new(cargo);
        // Cargo gives the test the variables it gives a build of this package; passed on, they
        // would differ from a plain build's and make build scripts that watch them (ring's
        // watches CARGO_MANIFEST_DIR) rerun, here and again in the next plain `cargo test`.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k == "OUT_DIR"
                || k.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(k.as_ref());
            }
        }
        cmd.args([
            "build",
            "--package",
            "overlay-agent",
            "--bin",
            "overlay-agent",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo to build overlay-agent");
        assert!(status.success(), "building overlay-agent failed: {status}");
        profile_dir.join("overlay-agent")
    })
}

/// A running `overlay-agent`, its stderr in `<dir>/<name>.log`; killed on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    /// The `--subnet-file` it was given, if any.
    pub subnet_file: Option<PathBuf>,
    /// When it was started.
    pub started: Instant,
}

impl Agent {
    /// Starts the agent with `args` and extra environment `env`, logging to `<dir>/<name>.log`.
    /// `RUST_LOG` is set to `info` unless `env` sets it.
    pub fn spawn(dir: &Path, name: &str, args: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).map_err(|source| EtcdTestError::Io {
            path: log.clone(),
            source,
        })?;
        let mut cmd = Command::new(agent_binary());
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let subnet_file = args
            .iter()
            .find_map(|a| a.strip_prefix("--subnet-file="))
            .map(PathBuf::from);
        let child = cmd.spawn().map_err(|source| EtcdTestError::Spawn {
            program: agent_binary().display().to_string(),
            source,
        })?;
        Ok(Self {
            child: Some(child),
            log,
            subnet_file,
            started: Instant::now(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times; returns whether it did in time.
    pub fn wait_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= count {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits for the subnet file to exist and returns its content.
    pub fn wait_subnet_env(&self, timeout: Duration) -> Option<String> {
        let path = self.subnet_file.as_ref()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(path)
                && text.contains("FLANNEL_MTU")
            {
                return Some(text);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory preconditions; the pid is our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs it (a crash: nothing is cleaned up) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
