//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use crate::{
    cmd::{TestTotals, cargo, is_root, run, run_tests, step, workspace_root},
    fuzz, setup,
};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Skip `setup` (when you know everything is installed).
    #[arg(long)]
    pub no_setup: bool,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!(
            "the integration tests create network namespaces and load eBPF programs: run as root"
        );
    }
    if !opts.no_setup {
        setup::setup(&setup::Options::default())?;
    }
    let root = workspace_root();

    step("test: rustfmt check");
    run(cargo()
        .current_dir(&root)
        .args(["fmt", "--all", "--", "--check"]))?;

    // overlay-ebpf is not a default member (it only builds for the BPF target), so the default
    // members are exactly the user-space crates.
    step("test: clippy -D warnings on the user-space crates");
    run(cargo()
        .current_dir(&root)
        .args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;

    let mut totals = TestTotals::default();
    step("test: unit tests");
    run_tests(
        cargo().current_dir(&root).args([
            "test",
            "--workspace",
            "--exclude",
            "overlay-ebpf",
            "--exclude",
            "overlay-tests",
        ]),
        &mut totals,
    )?;

    // The cargo-fuzz targets (fuzz/, its own workspace, built by the nightly with sanitizers),
    // each for a bounded time; libFuzzer exits non-zero when it finds a crash, leaving the input
    // in fuzz/artifacts/<target>/. The eBPF fuzzer (tests/tests/ebpf_fuzz.rs) runs with the
    // integration tests below, for its default 15 s.
    for (target, seconds) in fuzz::TARGETS {
        fuzz::run_target(target, seconds)?;
    }

    // Single-threaded: the tests share the kernel's namespaces, links and BPF state.
    // OVERLAY_TESTS_REQUIRE_ROOT turns a skipped root test into a failure, and any test reported
    // ignored fails the totals below, so CI cannot pass by skipping.
    step("test: integration tests (network namespaces, eBPF, etcd)");
    run_tests(
        cargo()
            .current_dir(&root)
            .args([
                "test",
                "--package",
                "overlay-tests",
                "--",
                "--test-threads=1",
            ])
            .env("OVERLAY_TESTS_REQUIRE_ROOT", "1"),
        &mut totals,
    )?;
    if let Err(err) = totals.check() {
        println!("{}", totals.line());
        return Err(err);
    }

    // The main job, as the README tells users to run it, for both backends. The agent is built
    // without optimisations here (its dependencies are already built for the tests above); the
    // lab, the agents' command line and the checks are those of `cargo xtask run --once`.
    for backend in ["udp", "vxlan"] {
        step(format!(
            "test: the main job (cargo xtask run --once --backend {backend})"
        ));
        run(std::process::Command::new(std::env::current_exe()?).args([
            "run",
            "--once",
            "--no-setup",
            "--debug-agent",
            "--backend",
            backend,
        ]))?;
    }

    // The bench's smoke test: the whole rig, every mode, 1 s per test. A mode that is not built
    // yet is reported missing; a mode that breaks fails the step. The agent is built without
    // optimisations here (its dependencies are already built for the tests above).
    step("test: benchmark smoke test (cargo xtask bench --quick)");
    run(std::process::Command::new(std::env::current_exe()?).args([
        "bench",
        "--quick",
        "--debug-agent",
        "--no-setup",
    ]))?;

    // A short soak: the long one (`cargo xtask soak --minutes 30`) is a command of its own; this
    // keeps its rig, its fault schedule and its checks (no lost ping, no failed transfer, no agent
    // exit) working. Its random seed is printed, so a failure can be repeated.
    step("test: a one-minute soak (cargo xtask soak --minutes 1)");
    run(std::process::Command::new(std::env::current_exe()?).args([
        "soak",
        "--minutes",
        "1",
        "--debug-agent",
        "--no-setup",
    ]))?;

    // The plain closing line CI reads, summing every test binary above; a skipped (ignored) test
    // fails the run as a failed one does.
    println!("{}", totals.line());
    totals.check()?;
    step("test: all steps passed");
    Ok(())
}
