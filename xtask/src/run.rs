//! `cargo xtask run`: the main job. Until the lab lands (the run issue) it builds the agent and
//! says what is coming, rather than pretending to do more.

use crate::{build, setup};

#[derive(Debug, clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    setup::setup(&setup::Options {})?;
    let binary = build::build(&build::Options { debug: false })?;
    eprintln!(
        "\nBuilt {}.\n\n`cargo xtask run` will start a real etcd, three simulated hosts in network \
         namespaces, one overlay-agent per host with the article's command line, docker-like \
         bridges configured from subnet.env, and show every container pinging every other. That \
         lab is not built yet; this command only builds the agent for now.",
        binary.display()
    );
    Ok(())
}
