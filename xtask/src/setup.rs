//! `cargo xtask setup`: installs what building and testing need, and only what is missing.
//!
//! Each requirement is checked first and installed only when absent, so `test` and `run` can call
//! this every time at the cost of a few process spawns.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{output, run, step};

/// Debian packages the build, the tests and the lab use.
const PACKAGES: &[&str] = &[
    "etcd-server",       // the control plane's store, started by tests and `run`
    "etcd-client",       // etcdctl, to inspect and seed it
    "protobuf-compiler", // etcd-client's build script needs protoc
    "iproute2",          // ip netns / link / addr for the namespace rigs
    "iputils-ping",      // reachability checks in tests and `run`
    "bpftool",           // inspecting programs and maps
    "iperf3",            // benchmarks: TCP throughput
    "sockperf",          // benchmarks: latency
    "tcpdump",           // debugging the rigs
    "systemd",           // systemd-analyze verify on deploy/ (tests/tests/deploy.rs)
    "util-linux",        // setpriv: agents under the unit's capability set; mount --bind in `run`
    "iptables",          // the agent's forward and --ip-masq rules, as flanneld's
    "curl",              // the bench reads etcd's /metrics
];

/// The eBPF toolchain: nightly (for `-Z build-std=core` on bpfel-unknown-none), its rust-src, and
/// bpf-linker built against the nightly's own LLVM so both agree on the bitcode format.
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, for `cargo +nightly fuzz run codec` (the `fuzz/` workspace; `cargo xtask test` runs
/// it). Pinned so a release that needs a newer rustc cannot break setup: 0.13.2 (the newest when
/// pinned) builds with `--locked` on the nightly 1.97 above. Move it with the nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

#[derive(Debug, clap::Args)]
pub struct Options {}

pub fn setup(_opts: &Options) -> anyhow::Result<()> {
    debian_packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    step("setup: done");
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("setup: Debian packages present");
        return Ok(());
    }
    step(format!(
        "setup: installing Debian packages {}",
        missing.join(" ")
    ));
    if !crate::cmd::is_root() {
        bail!(
            "installing packages needs root; run as root or install them yourself: \
             apt-get install {}",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .with_context(|| {
                format!(
                    "the {NIGHTLY} toolchain is needed to build the eBPF programs and is not \
                 installed (rustup toolchain install {NIGHTLY} --component rust-src)"
                )
            })?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        step(format!("setup: rust-src for {NIGHTLY} present"));
        return Ok(());
    }
    step(format!("setup: adding rust-src to {NIGHTLY}"));
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = output(Command::new("bpf-linker").arg("--version"));
    if installed
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
    {
        step(format!("setup: bpf-linker {BPF_LINKER_VERSION} present"));
        return Ok(());
    }
    let sysroot = nightly_sysroot()?;
    let (llvm_lib, llvm_major) = nightly_libllvm(&sysroot)?;
    // bpf-linker's build looks for LLVM under $LLVM_PREFIX/lib and records that directory as its
    // rpath, so the prefix must outlive the install: keep it under CARGO_HOME, keyed by the LLVM
    // library name so a new nightly gets a prefix of its own.
    let prefix = cargo_home()?.join("bpf-linker-llvm").join(&llvm_lib);
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    let target = sysroot.join("lib").join(&llvm_lib);
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = lib_dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    }
    step(format!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (a few minutes)",
        target.display()
    ));
    run(Command::new("cargo")
        .args([
            &format!("+{NIGHTLY}"),
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let installed =
        output(Command::new("cargo").args([&format!("+{NIGHTLY}"), "fuzz", "--version"]));
    if installed
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION))
    {
        step(format!("setup: cargo-fuzz {CARGO_FUZZ_VERSION} present"));
        return Ok(());
    }
    step(format!(
        "setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (cargo install cargo-fuzz --locked, \
         about a minute)"
    ));
    run(Command::new("cargo").args([
        &format!("+{NIGHTLY}"),
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
        "--force",
    ]))
}

/// Finds the nightly's shared LLVM (`libLLVM.so.<major>.<minor>-rust-...`) and its major version.
fn nightly_libllvm(sysroot: &Path) -> anyhow::Result<(String, String)> {
    let lib = sysroot.join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version.split('.').next().unwrap_or_default();
            if !major.is_empty() && major.chars().all(|c| c.is_ascii_digit()) {
                return Ok((name.clone(), major.to_owned()));
            }
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}: cannot build bpf-linker",
        lib.display()
    )
}

fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}
