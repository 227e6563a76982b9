//! Cleaning up after the lab: on Ctrl-C (the main thread unwinds and drops the lab, dockerds
//! and containers with it; a watchdog removes everything by force if that stalls), and at start,
//! what a killed earlier run left.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use crate::cmd::step;

/// Prefix of the lab's namespace names (`ovl-h1-<pid>-<n>`, `ovl-net-<pid>-<n>`, ...).
pub const PREFIX: &str = "ovl";
/// Prefix of the lab's temporary directory under the system's temp dir (`<prefix><pid>`).
pub const DIR_PREFIX: &str = "overlay-run-";
/// Prefix of the bpffs mount points overlay-tests' BpfFs creates (`<prefix><pid>-<n>`).
const BPFFS_PREFIX: &str = "overlay-bpffs-";
/// Where overlay-tests' NsEtcd keeps its data (`<dir>/<prefix><pid>-<n>`).
const ETCD_DATA: (&str, &str) = ("/dev/shm", "overlay-etcd-");

/// The lab's bpffs mount point, for the watchdog.
static BPFFS: Mutex<Option<PathBuf>> = Mutex::new(None);

pub use crate::cmd::{check_interrupted, interrupted};

/// Records the lab's bpffs so the watchdog can unmount it.
pub fn set_bpffs(path: Option<PathBuf>) {
    *BPFFS.lock().unwrap_or_else(|p| p.into_inner()) = path;
}

extern "C" fn on_signal(_: libc::c_int) {
    crate::cmd::mark_interrupted();
}

/// On SIGINT/SIGTERM the main thread notices at its next check and drops the lab (agents, etcd,
/// namespaces, bpffs). If that has not finished within 20 s, the watchdog kills everything in this
/// run's namespaces, deletes them, unmounts the bpffs and exits.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| {
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("\n==> run: interrupted, tearing the lab down");
        std::thread::sleep(Duration::from_secs(20));
        // Docker first: its containers' processes are in namespaces without the lab's names.
        let dockers = overlay_tests::docker::remove_own();
        let gone = overlay_tests::netns::remove_own(PREFIX);
        let bpffs = BPFFS.lock().ok().and_then(|b| b.clone());
        if let Some(path) = bpffs {
            umount(&path);
        }
        let _ = std::fs::remove_dir_all(lab_dir(std::process::id()));
        remove_dirs(Path::new(ETCD_DATA.0), ETCD_DATA.1, |pid| {
            pid == std::process::id()
        });
        eprintln!(
            "==> run: cleanup by force ({} namespace(s) deleted, {} dockerd state(s) removed)",
            gone.len(),
            dockers.len()
        );
        std::process::exit(130);
    });
}

/// This run's temporary directory (etcd's data, per-host /run, logs).
pub fn lab_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn umount(path: &Path) {
    let _ = std::process::Command::new("umount").arg(path).status();
    let _ = std::fs::remove_dir(path);
}

/// Removes what an earlier run that was killed left: its namespaces (with the processes in
/// them), its bpffs mount and its temporary directory. Another run still in progress is left
/// alone (its pid is alive).
pub fn remove_leftovers() {
    // Docker first: its containers' processes are in namespaces without the lab's names.
    let dockers = overlay_tests::docker::remove_leftovers().len();
    let namespaces = overlay_tests::netns::remove_stale(PREFIX);
    let tmp = std::env::temp_dir();
    let mut mounts = 0;
    if let Ok(table) = std::fs::read_to_string("/proc/self/mounts") {
        for line in table.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_), Some(point), Some(fstype)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let point = Path::new(point);
            let stale = fstype == "bpf"
                && point.parent() == Some(tmp.as_path())
                && point
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(BPFFS_PREFIX))
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid));
            if stale {
                umount(point);
                mounts += 1;
            }
        }
    }
    let stale = |pid: u32| pid != std::process::id() && !pid_alive(pid);
    let dirs = remove_dirs(&tmp, DIR_PREFIX, stale)
        + remove_dirs(Path::new(ETCD_DATA.0), ETCD_DATA.1, stale);
    if namespaces.len() + mounts + dirs + dockers > 0 {
        step(format!(
            "run: removed what an earlier run left: {} namespace(s), {mounts} bpffs mount(s), \
             {dirs} temporary dir(s), {dockers} dockerd(s) with their containers",
            namespaces.len()
        ));
    }
}

/// Removes the directories `<parent>/<prefix><pid>[-...]` whose pid matches; returns how many.
fn remove_dirs(parent: &Path, prefix: &str, matches: impl Fn(u32) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(&matches)
        })
        .filter(|entry| std::fs::remove_dir_all(entry.path()).is_ok())
        .count()
}
