//! `cargo xtask fuzz`: the cargo-fuzz targets (`fuzz/`: the codec, the lease and network config
//! parsers, the peer set) for a bounded time each, then the eBPF programs against the TUN
//! datapath under `BPF_PROG_TEST_RUN` (`tests/tests/ebpf_fuzz.rs`). `--long` runs the eBPF
//! fuzzer until every program has judged `LONG_RUNS` frames of each format. `--capture-corpus`
//! writes the seed corpus from real traffic instead (`corpus`).

use std::{path::Path, process::Command};

mod corpus;

use crate::{
    build,
    cmd::{cargo, is_root, run, step, workspace_root},
    setup,
};

/// Runs per program and format of `--long`.
pub const LONG_RUNS: u64 = 1_000_000;

/// The cargo-fuzz targets, each with the seconds `cargo xtask test` gives it.
pub const TARGETS: [(&str, u64); 4] = [("codec", 30), ("lease", 15), ("config", 15), ("peers", 15)];

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Seconds for the eBPF fuzzer (with `--long`: at most this long).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Run the eBPF fuzzer until each program has judged 10^6 frames of each format.
    #[arg(long)]
    pub long: bool,
    /// Seconds for each cargo-fuzz target (default: what `cargo xtask test` gives each).
    #[arg(long)]
    pub target_seconds: Option<u64>,
    /// Only the eBPF fuzzer.
    #[arg(long, conflicts_with = "targets_only")]
    pub ebpf_only: bool,
    /// Only the cargo-fuzz targets.
    #[arg(long)]
    pub targets_only: bool,
    /// Seed of the eBPF fuzzer (printed by every run, so a run can be repeated).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip `setup`.
    #[arg(long)]
    pub no_setup: bool,
    /// Instead of fuzzing: capture real traffic of both formats (flanneld stand-ins and the
    /// agent's eBPF datapath in a lab) and write the seed corpus (`tests/corpus/`,
    /// `fuzz/seeds/codec/`) from it.
    #[arg(long, conflicts_with_all = ["long", "ebpf_only", "targets_only", "seconds"])]
    pub capture_corpus: bool,
}

pub fn fuzz(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_setup {
        setup::setup(&setup::Options::default())?;
    }
    if opts.capture_corpus {
        if !is_root() {
            anyhow::bail!("the capture builds a lab of network namespaces: run as root");
        }
        let binary = build::build(&build::Options { debug: false })?;
        return corpus::capture_corpus(&binary);
    }
    if !opts.ebpf_only {
        for (target, seconds) in TARGETS {
            run_target(target, opts.target_seconds.unwrap_or(seconds))?;
        }
    }
    if !opts.targets_only {
        if !is_root() {
            anyhow::bail!("the eBPF fuzzer loads eBPF programs: run as root");
        }
        let seconds = match (opts.seconds, opts.long) {
            (Some(s), _) => s,
            // Bounded only so a broken kernel cannot hang it; the run count ends it.
            (None, true) => 24 * 3600,
            (None, false) => 20,
        };
        step(format!(
            "fuzz: the eBPF programs against the TUN datapath for {seconds} s{}",
            if opts.long {
                format!(" or {LONG_RUNS} runs per program and format")
            } else {
                String::new()
            }
        ));
        let mut cmd = cargo();
        cmd.current_dir(workspace_root())
            .args(["test", "--package", "overlay-tests", "--test", "ebpf_fuzz"])
            .env("OVERLAY_TESTS_REQUIRE_ROOT", "1")
            .env("OVERLAY_FUZZ_SECONDS", seconds.to_string());
        if opts.long {
            cmd.env("OVERLAY_FUZZ_PACKETS", LONG_RUNS.to_string());
        }
        if let Some(seed) = opts.seed {
            cmd.env("OVERLAY_FUZZ_SEED", seed.to_string());
        }
        run(&mut cmd)?;
    }
    Ok(())
}

/// Runs one cargo-fuzz target for `seconds`. New inputs go to the untracked `fuzz/corpus/`;
/// the committed seeds (`fuzz/seeds/<target>/`, when there are any) are read, never written.
/// libFuzzer exits non-zero on a crash, leaving the input in `fuzz/artifacts/<target>/`.
pub fn run_target(target: &str, seconds: u64) -> anyhow::Result<()> {
    let root = workspace_root();
    step(format!(
        "fuzz: {target} for {seconds} s (cargo +nightly fuzz run {target})"
    ));
    let scratch = format!("fuzz/corpus/{target}");
    std::fs::create_dir_all(root.join(&scratch))?;
    let seeds = format!("fuzz/seeds/{target}");
    let mut cmd = Command::new("cargo");
    // The nightly's cargo, not the one running xtask: fuzz/ is its own workspace.
    cmd.current_dir(&root)
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["+nightly", "fuzz", "run", target, &scratch]);
    if Path::new(&root.join(&seeds)).is_dir() {
        cmd.arg(&seeds);
    }
    cmd.args(["--", &format!("-max_total_time={seconds}")]);
    run(&mut cmd)
}
