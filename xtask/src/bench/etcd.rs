//! A real etcd for the bench, inside the rig's switch namespace so the agents reach it over the
//! simulated underlay and nothing listens outside the rig. (The tests' own etcd helper starts on
//! the caller's loopback; the bench keeps everything inside namespaces so a Ctrl-C cleanup that
//! kills every process in them also kills etcd.)

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_tests::netns::{NetNs, NsProcess};

/// etcd's client address on the underlay bridge of the switch namespace.
pub const ETCD_IP: &str = "198.18.0.254";

/// A running etcd, stopped and its data removed on drop.
#[derive(Debug)]
pub struct Etcd {
    process: NsProcess,
    data_dir: PathBuf,
    ns_name: String,
    pub endpoint: String,
}

impl Etcd {
    /// Starts etcd in `ns` (which must own [`ETCD_IP`]) with its log in `dir`, and waits until
    /// it answers.
    pub fn start(ns: &NetNs, dir: &Path) -> anyhow::Result<Self> {
        // On tmpfs: fsync on a real disk would make filling etcd with thousands of leases slow.
        let data_dir = Path::new("/dev/shm").join(format!("ovbench-etcd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(dir)?;
        let endpoint = format!("http://{ETCD_IP}:2379");
        let process = ns.spawn(
            "etcd",
            &[
                "--name",
                "bench",
                "--data-dir",
                &data_dir.to_string_lossy(),
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "bench=http://127.0.0.1:2380",
                "--log-level",
                "warn",
                // Large transactions fill etcd with thousands of leases quickly.
                "--max-txn-ops",
                "1024",
            ],
            Some(&dir.join("etcd.log")),
        )?;
        let mut etcd = Self {
            process,
            data_dir,
            ns_name: ns.name().to_owned(),
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if etcd.ctl(&["endpoint", "health"]).is_ok() {
                return Ok(etcd);
            }
            if let Some(status) = etcd.process.try_wait() {
                bail!(
                    "etcd exited ({status}); see {}",
                    dir.join("etcd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `etcdctl args` (v3 API) against this etcd and returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns_name, "etcdctl", "--endpoints"])
            .arg(&self.endpoint)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts one key.
    pub fn put(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.ctl(&["put", key, value]).map(|_| ())
    }

    /// etcd's Prometheus metrics (`/metrics` on the client URL), fetched from inside the rig.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns_name,
                "curl",
                "-sf",
                "--max-time",
                "5",
            ])
            .arg(format!("{}/metrics", self.endpoint))
            .output()
            .context("running curl for etcd's /metrics")?;
        if !out.status.success() {
            bail!("fetching etcd /metrics failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(3));
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
