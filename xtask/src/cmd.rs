//! Running external commands with their command line shown, so long steps show progress.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Prints a progress line for a step.
pub fn step(msg: impl std::fmt::Display) {
    eprintln!("==> {msg}");
}

/// Runs `cmd` with inherited stdio, failing with the command line if it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("    $ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or None when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// The cargo that runs this xtask, so nested builds use the same toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // What `cargo run` set for xtask itself. ring's build script reruns when CARGO_MANIFEST_DIR
    // changes, so inheriting it rebuilt ring, rustls, tonic, etcd-client and the agent each time
    // a plain `cargo build`/`cargo test` and an xtask build took turns (over a minute each).
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_PKG_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Whether this process runs as root (namespaces, eBPF and apt need it).
pub use overlay_tests::is_root;

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Totals of libtest's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds one line of `cargo test` output when it is a `test result:` line
    /// (`test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; ...`).
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part
                .split_whitespace()
                .filter(|w| *w != "ok." && *w != "FAILED.");
            if let (Some(n), Some(what)) = (words.next(), words.next())
                && let Ok(n) = n.parse::<u64>()
            {
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }

    /// The closing line CI reads.
    pub fn line(&self) -> String {
        format!(
            "xtask: {} passed, {} failed, {} skipped",
            self.passed, self.failed, self.ignored
        )
    }

    /// Fails unless tests ran and none failed or was skipped: an ignored test (a root test run
    /// without root, or an `#[ignore]`) did not show anything, so it cannot count as green.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.failed > 0 {
            bail!("{} test(s) failed", self.failed);
        }
        if self.ignored > 0 {
            bail!(
                "{} test(s) were skipped (ignored): every test must run; see the `ignored` lines above",
                self.ignored
            );
        }
        if self.passed == 0 {
            bail!("no test ran");
        }
        Ok(())
    }
}

/// Runs a `cargo test` command, echoing its stdout as it comes, and adds its `test result:` lines
/// to `totals`.
pub fn run_tests(cmd: &mut Command, totals: &mut TestTotals) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    eprintln!("    $ {}", display(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", display(cmd)))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", display(cmd));
    }
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that SIGINT or SIGTERM arrived. Async-signal-safe (one atomic store), for the signal
/// handlers of `run` and `bench`.
pub fn mark_interrupted() {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// True once SIGINT or SIGTERM arrived: long steps check it and unwind, dropping what they built.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Fails with "interrupted" once a signal arrived.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn an_ignored_test_fails_the_totals() {
        let mut totals = TestTotals::default();
        for line in [
            "running 3 tests",
            "test a ... ok",
            "test b ... ignored, needs root (network namespaces, eBPF)",
            "test result: ok. 2 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s",
        ] {
            totals.add_line(line);
        }
        assert_eq!(
            totals,
            TestTotals {
                passed: 7,
                failed: 0,
                ignored: 1
            }
        );
        assert_eq!(totals.line(), "xtask: 7 passed, 0 failed, 1 skipped");
        let err = totals.check().unwrap_err().to_string();
        assert!(err.contains("1 test(s) were skipped"), "{err}");

        totals.ignored = 0;
        assert!(totals.check().is_ok());
        totals.add_line("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.10s");
        assert_eq!((totals.passed, totals.failed), (8, 2));
        assert!(totals.check().is_err());
        assert!(TestTotals::default().check().is_err(), "no test ran");
    }
}
