//! `cargo xtask bench --control-plane N`.

use std::path::Path;

use super::Options;

pub fn run(
    _opts: &Options,
    _n: usize,
    _agent: Result<&Path, &str>,
    _run_dir: &Path,
) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
