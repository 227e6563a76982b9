//! Network namespaces and veth pairs for tests, removed on drop.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// Errors of setting up a namespace rig.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// A command could not be started at all.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("entering network namespace {name}: {source}")]
    Enter {
        /// The namespace.
        name: String,
        /// The error of open or setns.
        #[source]
        source: std::io::Error,
    },
}

/// Runs a command, turning a non-zero exit into an error that carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetNsError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| NetNsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetNsError::Failed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Deleted on drop: false for a handle on a namespace someone else owns.
    owned: bool,
}

impl NetNs {
    /// Creates a namespace whose name starts with `prefix` and is unique to this process, with
    /// its loopback up.
    pub fn new(prefix: &str) -> Result<Self, NetNsError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on the existing namespace `name`, which stays when the handle is dropped (for
    /// threads that act in a namespace their creator owns).
    pub fn attach(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// Names the network namespace process `pid` is in `name` (`ip netns attach`: a docker
    /// container's, so the lab reaches it like its own). Dropping the handle removes the name
    /// only; the namespace lives as long as the process.
    pub fn of_process(name: &str, pid: u32) -> Result<Self, NetNsError> {
        run("ip", &["netns", "attach", name, &pid.to_string()])?;
        Ok(Self {
            name: name.to_owned(),
            owned: true,
        })
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetNsError> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The netfilter rules of both tables, as `iptables -S` prints them (empty where iptables
    /// fails: the checks comparing them then fail instead).
    pub fn iptables_rules(&self) -> String {
        ["filter", "nat"]
            .iter()
            .filter_map(|table| self.exec("iptables", &["-w", "-t", table, "-S"]).ok())
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .collect()
    }

    /// Runs `ip args` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetNsError> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread that has entered this namespace, so code using the calling thread's
    /// namespace (netlink, interface names, the eBPF attach calls) acts inside it. Other threads
    /// are not affected.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, NetNsError> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_current_thread()?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace for good (other threads are not affected).
    /// For long-lived threads that must live inside the namespace, such as a userspace forwarder
    /// owning a TUN device and a socket there; prefer [`NetNs::run`] for short work.
    pub fn enter_current_thread(&self) -> Result<(), NetNsError> {
        let enter_err = |source| NetNsError::Enter {
            name: self.name.clone(),
            source,
        };
        let file = File::open(format!("/run/netns/{}", self.name)).map_err(enter_err)?;
        // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(enter_err(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {err}");
        }
    }
}

/// Creates a veth pair with one end in each namespace, both ends up. The pair goes away with
/// either namespace.
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<(), NetNsError> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A long-running process started inside a namespace by [`NetNs::spawn`]: asked to stop
/// (SIGTERM, then SIGKILL after a grace period) and reaped on drop.
#[derive(Debug)]
pub struct NsProcess {
    child: std::process::Child,
    command: String,
}

impl NetNs {
    /// Starts `program args` inside the namespace and returns a guard that stops it on drop.
    /// Its stdout and stderr go to `log` (appended) or are discarded.
    pub fn spawn(
        &self,
        program: &str,
        args: &[&str],
        log: Option<&std::path::Path>,
    ) -> Result<NsProcess, NetNsError> {
        let command = format!("ip netns exec {} {program} {}", self.name, args.join(" "));
        let spawn_err = |source| NetNsError::Spawn {
            command: command.clone(),
            source,
        };
        let (stdout, stderr) = match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(spawn_err)?;
                let err = file.try_clone().map_err(spawn_err)?;
                (
                    std::process::Stdio::from(file),
                    std::process::Stdio::from(err),
                )
            }
            None => (std::process::Stdio::null(), std::process::Stdio::null()),
        };
        // `ip netns exec` enters the namespace and execs the program, so the child's pid is the
        // program's own.
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(spawn_err)?;
        Ok(NsProcess { child, command })
    }
}

impl NsProcess {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it now: SIGTERM, then SIGKILL when it has not exited within `grace`. Returns its
    /// exit status.
    pub fn stop(&mut self, grace: std::time::Duration) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        // SAFETY: kill on the pid of a child we have not reaped yet signals only that child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(2));
    }
}

/// Deletes namespaces left behind by processes that no longer run: every namespace named
/// `<prefix>-<role>-<pid>-...` (as [`NetNs::new`] names them when given `<prefix>-<role>`, which
/// is what the lab does) whose creating process (the pid [`NetNs::new`] put in
/// the name) is gone. Processes still inside them are killed first. Namespaces of live processes
/// (another run in progress) are left alone. Returns the names deleted.
pub fn remove_stale(prefix: &str) -> Vec<String> {
    remove_matching(prefix, |pid| {
        pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
}

/// Deletes every namespace whose name starts with `prefix-` and that this process created,
/// killing the processes inside first. For signal handlers and other last-resort cleanup, where
/// the [`NetNs`] guards will not run.
pub fn remove_own(prefix: &str) -> Vec<String> {
    remove_matching(prefix, |pid| pid == std::process::id())
}

fn remove_matching(prefix: &str, creator_matches: impl Fn(u32) -> bool) -> Vec<String> {
    let Ok(out) = run("ip", &["netns", "list"]) else {
        return Vec::new();
    };
    let start = format!("{prefix}-");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&start))
        .filter(|n| {
            // Names are `<prefix>-<role>-<pid>-<n>[-...]` (NetNs::new called with
            // `<prefix>-<role>`, as the lab does): the creating pid is the second component.
            n[start.len()..]
                .split('-')
                .nth(1)
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(&creator_matches)
        })
        .map(str::to_owned)
        .collect();
    // Containers (longer names) before the hosts they hang off.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in &names {
        if let Ok(pids) = run("ip", &["netns", "pids", name]) {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: kill only sends a signal.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = run("ip", &["netns", "del", name]);
    }
    names
}
