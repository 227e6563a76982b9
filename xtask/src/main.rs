//! `cargo xtask <command>`: the project's setup, build, test and run steps, one module each.

mod bench;
mod build;
mod cmd;
mod dashboard;
mod fuzz;
mod run;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Setup, build, test and run overlay-agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install everything the build and tests need (idempotent; cheap when all is present).
    Setup(setup::Options),
    /// Build the agent with its embedded eBPF object.
    Build(build::Options),
    /// Run setup, then formatting, lints, unit tests and the root integration tests.
    Test(test::Options),
    /// Run the main job (the article's docker scenario in a local lab).
    Run(run::Options),
    /// Benchmark every datapath against bare routes and flannel's backends on one rig.
    Bench(bench::Options),
    /// Fuzz the codec and parsers (cargo-fuzz) and the eBPF programs against the TUN datapath.
    Fuzz(fuzz::Options),
    /// Three hosts under traffic for N minutes while peers, agents and etcd members come and go.
    Soak(soak::Options),
    /// Draw the README's picture of the Grafana dashboard from a real run's /metrics.
    Dashboard(dashboard::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(opts) => setup::setup(&opts),
        Command::Build(opts) => build::build(&opts).map(|_| ()),
        Command::Test(opts) => test::test(&opts),
        Command::Run(opts) => run::run(&opts),
        Command::Bench(opts) => bench::bench(&opts),
        Command::Soak(opts) => soak::soak(&opts),
        Command::Fuzz(opts) => fuzz::fuzz(&opts),
        Command::Dashboard(opts) => dashboard::dashboard(&opts),
    }
}
