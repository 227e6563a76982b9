//! `cargo xtask build`: the agent binary, with the eBPF object compiled and embedded by its build
//! script.

use std::path::PathBuf;

use crate::cmd::{cargo, run, step, workspace_root};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Build without optimisations (faster to compile, much slower to forward in user space).
    #[arg(long)]
    pub debug: bool,
}

/// Builds the agent and returns the path of its binary.
pub fn build(opts: &Options) -> anyhow::Result<PathBuf> {
    let profile = if opts.debug { "debug" } else { "release" };
    step(format!(
        "build: overlay-agent ({profile}, eBPF object embedded)"
    ));
    let mut cmd = cargo();
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "overlay-agent"]);
    if !opts.debug {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let binary = workspace_root()
        .join("target")
        .join(profile)
        .join("overlay-agent");
    step(format!("build: {}", binary.display()));
    Ok(binary)
}
