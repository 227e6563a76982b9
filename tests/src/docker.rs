//! Real Docker engines in the lab: Debian's dockerd, one per simulated host, started the way an
//! operator's host starts it, and containers from a local busybox image.
//!
//! Each daemon enters only its host's network namespace (`nsenter --net`): `ip netns exec` would
//! mount a fresh sysfs and hide the cgroup hierarchies dockerd needs. Everything else it has of
//! its own, so several run at once: data and exec roots under one state directory
//! (`/tmp/overlay-docker-<pid>-<n>`, short because containerd's sockets live in it), its API
//! socket, pid file, a daemon.json naming its own key file, and a cgroup parent named like the
//! state directory. Dropping a [`Dockerd`] removes its containers, stops it and removes all of
//! that; [`remove_leftovers`] does the same for daemons of runs that were killed.
//!
//! No registry exists here: the image is `/bin/busybox` with its applet links, built into a tar
//! once per machine (cached in the temp dir) and `docker import`ed into each daemon.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

/// The docker CLI of the engine's own version (a newer one may come first in PATH).
pub const DOCKER_CLI: &str = "/usr/bin/docker";
/// The engine.
pub const DOCKERD: &str = "dockerd";
/// The image's one binary (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";
/// The image every lab container runs.
pub const IMAGE: &str = "busybox:local";
/// Prefix of the daemons' state directories under the temp dir, and of their cgroup parents.
pub const STATE_PREFIX: &str = "overlay-docker-";
/// Cgroup hierarchies dockerd's cgroupfs driver uses (cgroup v1, as this machine mounts them).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long the API may take to answer after the daemon starts (0.2-0.6 s measured idle).
const START_WITHIN: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after SIGTERM once its containers are gone (about 3 s).
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// Errors of the lab's docker engines.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The machine cannot run dockerd (not installed, not root, no cgroup hierarchies).
    #[error("dockerd cannot run here: {reason}")]
    Unavailable {
        /// Why, in one line.
        reason: String,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// dockerd did not answer, or exited, after it was started.
    #[error("dockerd in {ns} did not come up: {reason}; its log ends:\n{log}")]
    Start {
        /// The host namespace.
        ns: String,
        /// What happened.
        reason: String,
        /// The last lines of its log.
        log: String,
    },
    /// dockerd did not exit within [`STOP_WITHIN`] of SIGTERM (it was killed).
    #[error("dockerd in {ns} did not exit within {STOP_WITHIN:?} of SIGTERM; killed")]
    Stop {
        /// The host namespace.
        ns: String,
    },
    /// A docker CLI command failed.
    #[error("`docker {command}` failed: {stderr}")]
    Command {
        /// The arguments.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A container's state could not be read as expected.
    #[error("container {name}: {reason}")]
    Container {
        /// The container.
        name: String,
        /// What was wrong.
        reason: String,
    },
}

/// Whether a dockerd can be started here; the reason, in one line, when not.
pub fn available() -> Result<(), DockerError> {
    let unavailable = |reason: String| Err(DockerError::Unavailable { reason });
    if !crate::is_root() {
        return unavailable("not root".into());
    }
    for program in [DOCKERD, DOCKER_CLI] {
        match Command::new(program).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                return unavailable(format!("`{program} --version` exited with {}", out.status));
            }
            Err(e) => {
                return unavailable(format!(
                    "{program}: {e} (cargo xtask setup installs docker.io)"
                ));
            }
        }
    }
    for controller in ["devices", "memory", "pids"] {
        let path = Path::new(CGROUP_ROOT).join(controller);
        if !path.join("cgroup.procs").exists() {
            return unavailable(format!(
                "no cgroup v1 {controller} hierarchy at {}",
                path.display()
            ));
        }
    }
    Ok(())
}

/// One running dockerd, in a host's network namespace.
#[derive(Debug)]
pub struct Dockerd {
    ns: String,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    options: Vec<String>,
    process: Option<Child>,
}

/// What docker says about one of its containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// The container's name.
    pub name: String,
    /// The pid of its first process, on the machine.
    pub pid: u32,
    /// Its address on docker0.
    pub ip: Ipv4Addr,
    /// Its MAC address on docker0.
    pub mac: String,
}

impl Dockerd {
    /// Starts dockerd in `host`'s network namespace with the overlay's `options` (its `--bip`,
    /// `--mtu`, ... as the host's unit or options file give them), waits for its API and imports
    /// the lab image.
    /// Callers ask [`available`] once, before starting any.
    pub fn start(host: &NetNs, options: Vec<String>) -> Result<Self, DockerError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let state = std::env::temp_dir().join(format!(
            "{STATE_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        create_dir(&state)?;
        let socket = state.join("docker.sock");
        let log = state.join("dockerd.log");
        let config = state.join("daemon.json");
        // Without a key path of its own every daemon writes /etc/docker/key.json (20.10 has no
        // flag for it).
        let json = serde_json::json!({ "deprecated-key-path": state.join("key.json") });
        write(&config, &json.to_string())?;
        let mut daemon = Self {
            ns: host.name().to_owned(),
            socket,
            log,
            options,
            process: None,
            state,
        };
        daemon.spawn()?;
        daemon.ensure_image()?;
        Ok(daemon)
    }

    /// The daemon's own flags: state, socket and cgroup parent of its own.
    fn own_flags(&self) -> Vec<String> {
        let s = self.state.display();
        let name = self.state.file_name().unwrap_or_default().to_string_lossy();
        vec![
            format!("--data-root={s}/data"),
            format!("--exec-root={s}/exec"),
            format!("--pidfile={s}/docker.pid"),
            format!("-H=unix://{}", self.socket.display()),
            format!("--cgroup-parent=/{name}"),
            format!("--config-file={s}/daemon.json"),
        ]
    }

    fn spawn(&mut self) -> Result<(), DockerError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| io(&self.log, source))?;
        let err = file.try_clone().map_err(|source| io(&self.log, source))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg(DOCKERD)
            .args(self.own_flags())
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| DockerError::Unavailable {
                reason: format!("starting nsenter {DOCKERD}: {e}"),
            })?;
        self.process = Some(child);
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if self
                .cli(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
            {
                return Ok(());
            }
            let exited = self
                .process
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.process = None;
                return Err(self.start_error(format!("it exited ({status})")));
            }
            if Instant::now() > deadline {
                return Err(self.start_error(format!("its API gave no answer in {START_WITHIN:?}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_error(&self, reason: String) -> DockerError {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        DockerError::Start {
            ns: self.ns.clone(),
            reason,
            log: lines[lines.len().saturating_sub(15)..].join("\n"),
        }
    }

    /// Imports the lab image unless the daemon has it (its data survives a restart).
    fn ensure_image(&self) -> Result<(), DockerError> {
        if self
            .cli(&["image", "inspect", "--format", "{{.Id}}", IMAGE])
            .is_ok()
        {
            return Ok(());
        }
        let tar = image_tar()?;
        self.cli(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            &tar.to_string_lossy(),
            IMAGE,
        ])
        .map(|_| ())
    }

    /// The docker CLI against this daemon with `args`, to run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER_CLI);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the docker CLI against this daemon; its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> Result<String, DockerError> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| DockerError::Command {
                command: args.join(" "),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(DockerError::Command {
                command: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The shell command that talks to this daemon (`/usr/bin/docker -H unix://...`).
    pub fn cli_command(&self) -> String {
        format!("{DOCKER_CLI} -H unix://{}", self.socket.display())
    }

    /// Its state directory (data and exec roots, socket, log).
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// The options it was started with from the overlay (not its lab-specific own flags).
    pub fn options(&self) -> &[String] {
        &self.options
    }

    /// Its command line as `ps` shows it.
    pub fn ps_line(&self) -> Result<String, DockerError> {
        let pid = self.pid().ok_or_else(|| DockerError::Command {
            command: "ps".into(),
            stderr: "dockerd is not running".into(),
        })?;
        let out = Command::new("ps")
            .args(["-o", "user,pid,args", "-p", &pid.to_string()])
            .output()
            .map_err(|e| DockerError::Command {
                command: "ps".into(),
                stderr: e.to_string(),
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// `docker run -d` of a long-running container named `name` on the default bridge, restarted
    /// by docker whenever the daemon starts, with `extra` flags (`--mac-address`, ...).
    pub fn run(&self, name: &str, extra: &[&str]) -> Result<ContainerInfo, DockerError> {
        let mut args = vec!["run", "-d", "--name", name, "--restart=always"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sleep", "1000000"]);
        self.cli(&args)?;
        self.inspect(name)
    }

    /// What docker says of container `name` now (running, with an address).
    pub fn inspect(&self, name: &str) -> Result<ContainerInfo, DockerError> {
        let format =
            "{{.State.Pid}} {{.NetworkSettings.IPAddress}} {{.NetworkSettings.MacAddress}}";
        let out = self.cli(&["inspect", "--format", format, name])?;
        let bad = |reason: String| DockerError::Container {
            name: name.to_owned(),
            reason,
        };
        let mut words = out.split_whitespace();
        let (Some(pid), Some(ip), Some(mac)) = (words.next(), words.next(), words.next()) else {
            return Err(bad(format!(
                "inspect says {out:?}: not running with an address"
            )));
        };
        let pid: u32 = pid.parse().map_err(|_| bad(format!("pid {pid:?}")))?;
        if pid == 0 {
            return Err(bad("not running".into()));
        }
        Ok(ContainerInfo {
            name: name.to_owned(),
            pid,
            ip: ip.parse().map_err(|_| bad(format!("address {ip:?}")))?,
            mac: mac.to_owned(),
        })
    }

    /// `docker rm -f` of container `name`.
    pub fn remove(&self, name: &str) -> Result<(), DockerError> {
        self.cli(&["rm", "-f", name]).map(|_| ())
    }

    /// Stops the daemon as its unit would (SIGTERM; its containers stop with it, and those run
    /// with `--restart=always` come back when it starts again) and waits for it to exit.
    pub fn stop(&mut self) -> Result<(), DockerError> {
        let Some(mut child) = self.process.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WITHIN;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(DockerError::Stop {
                    ns: self.ns.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the stopped daemon again with the same options and state.
    pub fn start_again(&mut self) -> Result<(), DockerError> {
        if self.process.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Removes every container, stops the daemon and removes its state and cgroups; every step
    /// is tried, the first error is returned.
    pub fn shut_down(&mut self) -> Result<(), DockerError> {
        let mut first = None;
        if self.process.is_some() {
            // Containers first: each would otherwise hold the stop for its 10 s timeout.
            match self.cli(&["ps", "-aq"]) {
                Ok(ids) if !ids.is_empty() => {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids.split_whitespace());
                    if let Err(e) = self.cli(&args) {
                        first.get_or_insert(e);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.stop() {
            first.get_or_insert(e);
        }
        remove_state(&self.state);
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// The lab image's tar: `/bin/busybox` and a link per applet, built once and kept in the temp
/// dir under a name that changes with the busybox binary.
pub fn image_tar() -> Result<PathBuf, DockerError> {
    use std::os::unix::fs::MetadataExt as _;
    let busybox = Path::new(BUSYBOX);
    let meta = std::fs::metadata(busybox).map_err(|source| DockerError::Unavailable {
        reason: format!(
            "{}: {source} (cargo xtask setup installs busybox-static)",
            busybox.display()
        ),
    })?;
    let tar = std::env::temp_dir().join(format!(
        "overlay-busybox-image-{}-{}.tar",
        meta.size(),
        meta.mtime()
    ));
    if tar.exists() {
        return Ok(tar);
    }
    let tree = std::env::temp_dir().join(format!("overlay-busybox-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tree);
    let bin = tree.join("bin");
    create_dir(&bin)?;
    std::fs::copy(busybox, bin.join("busybox")).map_err(|source| io(busybox, source))?;
    let list = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .map_err(|source| io(busybox, source))?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            let link = bin.join(applet);
            std::os::unix::fs::symlink("busybox", &link).map_err(|source| io(&link, source))?;
        }
    }
    // Written beside and renamed: a run killed halfway leaves no truncated image behind.
    let partial = tar.with_extension(format!("partial-{}", std::process::id()));
    let status = Command::new("tar")
        .args(["-C"])
        .arg(&tree)
        .args(["-cf"])
        .arg(&partial)
        .arg(".")
        .status()
        .map_err(|source| io(&partial, source))?;
    let _ = std::fs::remove_dir_all(&tree);
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(DockerError::Command {
            command: "tar -c (the busybox image)".into(),
            stderr: format!("tar exited with {status}"),
        });
    }
    std::fs::rename(&partial, &tar).map_err(|source| io(&tar, source))?;
    Ok(tar)
}

/// Removes what the daemons of runs no longer alive left behind: their containers' and daemons'
/// processes, mounts, state directories and cgroups. Returns the state directories removed.
pub fn remove_leftovers() -> Vec<PathBuf> {
    remove_states(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes what this process's daemons left, for a cleanup by force.
pub fn remove_own() -> Vec<PathBuf> {
    remove_states(|pid| pid == std::process::id())
}

fn remove_states(creator_matches: impl Fn(u32) -> bool) -> Vec<PathBuf> {
    // A daemon's name is on its state directory and on its cgroups; a run killed while removing
    // its state leaves the cgroups alone, so both places are looked at.
    let names_in = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(STATE_PREFIX))
            .collect()
    };
    let mut names: std::collections::BTreeSet<String> =
        names_in(&std::env::temp_dir()).into_iter().collect();
    for hierarchy in std::fs::read_dir(CGROUP_ROOT)
        .into_iter()
        .flatten()
        .flatten()
    {
        names.extend(names_in(&hierarchy.path()));
    }
    let mut removed = Vec::new();
    for name in names {
        let rest = &name[STATE_PREFIX.len()..];
        let creator = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if creator.is_some_and(&creator_matches) {
            let state = std::env::temp_dir().join(&name);
            kill_processes_of(&state);
            remove_state(&state);
            removed.push(state);
        }
    }
    removed
}

/// SIGKILLs every process in the daemon's cgroups (its containers') and every process whose
/// command line names its state directory (dockerd, containerd, the shims).
fn kill_processes_of(state: &Path) {
    let name = state.file_name().unwrap_or_default().to_string_lossy();
    let mut pids = Vec::new();
    fn procs_below(dir: &Path, pids: &mut Vec<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        // Each container has a cgroup of its own below the daemon's parent.
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                procs_below(&e.path(), pids);
            }
        }
    }
    for dir in cgroup_dirs(&name) {
        procs_below(&dir, &mut pids);
    }
    let needle = state.to_string_lossy().into_owned();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
    }
    for &pid in &pids {
        // SAFETY: kill only sends a signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Their mounts can only go once they have: SIGKILL is delivered asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| running(p as u32)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` exists and is not a zombie waiting for its parent.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // After the command in parentheses, which may hold spaces: " <state> ".
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Unmounts what is mounted under `state` (containers' root filesystems, network namespace
/// files), deepest first, removes it, and removes the daemon's cgroups.
fn remove_state(state: &Path) {
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(state))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        // SAFETY: a path we built, NUL-terminated by CString.
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = std::fs::remove_dir_all(state);
    let name = state.file_name().unwrap_or_default().to_string_lossy();
    for dir in cgroup_dirs(&name) {
        remove_cgroup(&dir);
    }
}

/// The daemon's cgroup parent in each v1 hierarchy that has it.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path().join(name))
        .filter(|d| d.is_dir())
        .collect()
}

/// Removes a cgroup and the ones below it (rmdir, children first: cgroupfs has no recursive
/// removal).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn io(path: &Path, source: std::io::Error) -> DockerError {
    DockerError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_dir(path: &Path) -> Result<(), DockerError> {
    std::fs::create_dir_all(path).map_err(|source| io(path, source))
}

fn write(path: &Path, text: &str) -> Result<(), DockerError> {
    std::fs::write(path, text).map_err(|source| io(path, source))
}

/// Where a host's dockerd gets the overlay's options from, as operators' hosts do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionsFrom {
    /// `deploy/docker-overlay.conf`'s ExecStart line, its `${FLANNEL_SUBNET}`, `${FLANNEL_MTU}`
    /// and `$DOCKER_OPTS` expanded from subnet.env (and no /etc/default/docker).
    DropIn,
    /// `DOCKER_OPTS` from an options file `overlay-agent docker-opts` writes (as flannel's
    /// mk-docker-opts.sh), given to `dockerd $DOCKER_OPTS`.
    DockerOpts {
        /// The agent binary.
        agent_bin: PathBuf,
    },
}

impl std::fmt::Display for OptionsFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DropIn => f.write_str("deploy/docker-overlay.conf (the systemd drop-in)"),
            Self::DockerOpts { .. } => {
                f.write_str("DOCKER_OPTS from `overlay-agent docker-opts` (as mk-docker-opts.sh)")
            }
        }
    }
}

/// The project's docker drop-in.
pub const DROP_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/docker-overlay.conf");

impl OptionsFrom {
    /// dockerd's overlay options for the host whose agent wrote `subnet_env`; `scratch` is a
    /// directory for the options file.
    pub fn options(&self, subnet_env: &Path, scratch: &Path) -> Result<Vec<String>, DockerError> {
        let env = std::fs::read_to_string(subnet_env).map_err(|source| io(subnet_env, source))?;
        match self {
            Self::DropIn => {
                let unit =
                    std::fs::read_to_string(DROP_IN).map_err(|s| io(Path::new(DROP_IN), s))?;
                drop_in_options(&unit, &env)
            }
            Self::DockerOpts { agent_bin } => {
                let file = scratch.join("docker_opts.env");
                let out = Command::new(agent_bin)
                    .arg("docker-opts")
                    .arg("-f")
                    .arg(subnet_env)
                    .arg("-d")
                    .arg(&file)
                    .env_remove("DOCKER_OPTS")
                    .output()
                    .map_err(|source| io(agent_bin, source))?;
                if !out.status.success() {
                    return Err(DockerError::Command {
                        command: format!("{} docker-opts", agent_bin.display()),
                        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    });
                }
                let text = std::fs::read_to_string(&file).map_err(|source| io(&file, source))?;
                let value =
                    env_value(&text, "DOCKER_OPTS").ok_or_else(|| DockerError::Command {
                        command: "overlay-agent docker-opts".into(),
                        stderr: format!("{} has no DOCKER_OPTS:\n{text}", file.display()),
                    })?;
                Ok(value.split_whitespace().map(str::to_owned).collect())
            }
        }
    }
}

/// The words after dockerd in the drop-in's last `ExecStart=`, with the variables systemd would
/// expand taken from `env` (subnet.env; `$DOCKER_OPTS` empty, as without /etc/default/docker).
/// `-H fd://` and `--containerd=` are left out: the lab daemon has a socket of its own and starts
/// its own containerd.
pub fn drop_in_options(unit: &str, env: &str) -> Result<Vec<String>, DockerError> {
    let bad = |reason: String| DockerError::Command {
        command: format!("reading {DROP_IN}"),
        stderr: reason,
    };
    let joined = unit.replace("\\\n", " ");
    let exec = joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .rfind(|l| !l.trim().is_empty())
        .ok_or_else(|| bad("no ExecStart= with a command".into()))?;
    let mut words = exec.split_whitespace();
    match words.next() {
        Some(program) if program.ends_with("/dockerd") => {}
        other => return Err(bad(format!("ExecStart runs {other:?}, not dockerd"))),
    }
    let mut options = Vec::new();
    let mut skip_next = false;
    for word in words {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if word == "-H" {
            skip_next = true;
            continue;
        }
        if word.starts_with("--containerd=") || word.starts_with("-H=") || word == "fd://" {
            continue;
        }
        if word == "$DOCKER_OPTS" || word == "${DOCKER_OPTS}" {
            continue;
        }
        let mut expanded = String::new();
        let mut rest = word;
        while let Some(start) = rest.find("${") {
            expanded.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| bad(format!("unterminated variable in {word}")))?;
            let name = &rest[start + 2..start + end];
            let value = env_value(env, name)
                .ok_or_else(|| bad(format!("subnet.env has no {name} for {word}")))?;
            expanded.push_str(&value);
            rest = &rest[start + end + 1..];
        }
        expanded.push_str(rest);
        options.push(expanded);
    }
    Ok(options)
}

/// The value of `KEY=value` or `KEY="value"` in an environment file.
fn env_value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let value = l.trim().strip_prefix(key)?.strip_prefix('=')?;
        Some(value.trim().trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_in_gives_bip_and_mtu_from_subnet_env() {
        let unit = std::fs::read_to_string(DROP_IN).unwrap();
        let env = "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\n\
                   FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n";
        assert_eq!(
            drop_in_options(&unit, env).unwrap(),
            ["--bip=172.16.21.1/24", "--mtu=1472"]
        );
    }

    #[test]
    fn a_drop_in_naming_a_missing_variable_is_an_error() {
        let unit = "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd -H fd:// --bip=${NOPE}\n";
        let err = drop_in_options(unit, "FLANNEL_SUBNET=10.1.2.1/24\n").unwrap_err();
        assert!(err.to_string().contains("no NOPE"), "{err}");
    }
}
