//! `cargo xtask setup`: installs what the build, the tests, `run` and `bench` need, and proves
//! each piece works by using it.
//!
//! [`REQUIREMENTS`] is the one list: what is needed, where it comes from, and how it is proved.
//! A package being installed proves nothing (a `--no-install-recommends` protoc without its
//! well-known `.proto` files broke etcd-client's build on new machines while CI, on machines
//! with an older manual install, stayed green), so every requirement is proved by doing what the
//! project does with it: protoc compiles a file importing `google/protobuf/descriptor.proto`,
//! bpf-linker links an eBPF object, a loopback etcd starts and answers etcdctl. The proofs run in
//! parallel on every `test` and `run` (about half a second, the etcd one being the slowest); what
//! fails is named with the package or command that brings it, all at once, before anything is
//! installed or built. `--check` stops there.
//!
//! The guard in `setup/guard.rs` (a unit test) fails when the code spawns a program that no
//! requirement here provides.

#[cfg(test)]
mod guard;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::cmd::{cargo, is_root, run, step};

/// The eBPF toolchain: nightly (for `-Z build-std=core` on bpfel-unknown-none), its rust-src, and
/// bpf-linker built against the nightly's own LLVM so both agree on the bitcode format.
const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz, for `cargo +nightly fuzz run codec` (the `fuzz/` workspace; `cargo xtask test` runs
/// it). Pinned so a release that needs a newer rustc cannot break setup: 0.13.2 (the newest when
/// pinned) builds with `--locked` on the nightly 1.97 above. Move it with the nightly.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One thing the project needs from the machine.
pub struct Requirement {
    /// What it is and who needs it, as the missing-piece message names it.
    pub what: &'static str,
    /// The programs it provides that the project's code spawns (by basename). The guard checks
    /// every spawn in the code against these.
    pub programs: &'static [&'static str],
    /// Where it comes from.
    pub source: Source,
    /// How setup shows it works.
    pub proof: Proof,
}

impl Requirement {
    /// A program (`programs[0]`) from Debian `packages`, proved by running it with `args`.
    const fn debian_tool(
        what: &'static str,
        programs: &'static [&'static str],
        packages: &'static [&'static str],
        args: &'static [&'static str],
    ) -> Self {
        Self {
            what,
            programs,
            source: Source::Debian(packages),
            proof: Proof::Runs(programs[0], args),
        }
    }
}

/// Where a requirement comes from.
pub enum Source {
    /// Debian packages, installed with `apt-get install --no-install-recommends`.
    Debian(&'static [&'static str]),
    /// `rustup <args>`.
    Rustup(&'static [&'static str]),
    /// `cargo +nightly install <krate> --version <version> --locked`; `nightly_llvm` builds it
    /// against the nightly's shared LLVM (bpf-linker must read the bitcode rustc writes).
    Cargo {
        krate: &'static str,
        version: &'static str,
        nightly_llvm: bool,
    },
}

/// How a requirement is proved.
pub enum Proof {
    /// The program runs with these arguments and exits 0. For tools whose real use needs root, a
    /// namespace rig or a peer (ip, ping, iperf3, ...), starting is the part a new machine lacks.
    Runs(&'static str, &'static [&'static str]),
    /// A check of its own, given an empty scratch directory (removed afterwards).
    Check(fn(&Path) -> Result<(), String>),
}

/// Everything the build, the tests, `run` and `bench` need. Order matters only for installing:
/// the nightly comes before what is built with it.
pub const REQUIREMENTS: &[Requirement] = &[
    // --- building ---
    Requirement {
        what: "C compiler and linker (rustc links with cc; ring's build script compiles C)",
        programs: &["cc"],
        source: Source::Debian(&["gcc", "libc6-dev"]),
        proof: Proof::Check(c_compiler_links),
    },
    Requirement {
        what: "C++ compiler (cargo fuzz builds libFuzzer's C++ sources)",
        programs: &["c++"],
        source: Source::Debian(&["g++"]),
        proof: Proof::Check(cxx_compiler_links),
    },
    Requirement {
        what: "protoc (etcd-client's build script compiles etcd's .proto files)",
        programs: &["protoc"],
        source: Source::Debian(&["protobuf-compiler"]),
        proof: Proof::Check(protoc_runs),
    },
    Requirement {
        what: "protobuf's well-known .proto files (etcd's protos import \
               google/protobuf/descriptor.proto)",
        programs: &[],
        source: Source::Debian(&["libprotobuf-dev"]),
        proof: Proof::Check(protoc_imports_descriptor),
    },
    Requirement {
        what: "the nightly toolchain (builds the eBPF programs)",
        programs: &[],
        source: Source::Rustup(&["toolchain", "install", NIGHTLY, "--profile", "minimal"]),
        proof: Proof::Check(|_| nightly_sysroot().map(|_| ())),
    },
    Requirement {
        what: "rust-src for the nightly (-Z build-std=core for bpfel-unknown-none)",
        programs: &[],
        source: Source::Rustup(&["component", "add", "rust-src", "--toolchain", NIGHTLY]),
        proof: Proof::Check(rust_src_present),
    },
    Requirement {
        what: "bpf-linker on the nightly's LLVM (links the eBPF object)",
        programs: &["bpf-linker"],
        source: Source::Cargo {
            krate: "bpf-linker",
            version: BPF_LINKER_VERSION,
            nightly_llvm: true,
        },
        proof: Proof::Check(bpf_linker_links),
    },
    // --- `cargo xtask test`'s checks ---
    Requirement {
        what: "rustfmt (cargo fmt --check)",
        programs: &["cargo-fmt"],
        source: Source::Rustup(&["component", "add", "rustfmt"]),
        proof: Proof::Check(|_| cargo_runs(cargo().args(["fmt", "--version"]))),
    },
    Requirement {
        what: "clippy (cargo clippy -D warnings)",
        programs: &["cargo-clippy"],
        source: Source::Rustup(&["component", "add", "clippy"]),
        proof: Proof::Check(|_| cargo_runs(cargo().args(["clippy", "--version"]))),
    },
    Requirement {
        what: "cargo-fuzz (fuzzing the codec)",
        programs: &["cargo-fuzz"],
        source: Source::Cargo {
            krate: "cargo-fuzz",
            version: CARGO_FUZZ_VERSION,
            nightly_llvm: false,
        },
        proof: Proof::Check(cargo_fuzz_runs),
    },
    // --- the tests, `run` and `bench` ---
    Requirement {
        what: "etcd and etcdctl (the control plane's store, started by tests, run and bench)",
        programs: &["etcd", "etcdctl"],
        source: Source::Debian(&["etcd-server", "etcd-client"]),
        proof: Proof::Check(etcd_answers),
    },
    Requirement {
        what: "ip, tc and bridge (namespaces, links, qdiscs and vxlan fdb entries of the rigs)",
        programs: &["ip", "tc", "bridge"],
        source: Source::Debian(&["iproute2"]),
        proof: Proof::Check(|_| {
            runs("ip", &["-V"])?;
            runs("tc", &["-V"])?;
            runs("bridge", &["-V"]).map(|_| ())
        }),
    },
    Requirement::debian_tool(
        "sh (the lab starts each agent through a shell that bind-mounts its /run)",
        &["sh"],
        &["dash"],
        &["-c", "exit 0"],
    ),
    Requirement::debian_tool(
        "ping (reachability in tests and run)",
        &["ping"],
        &["iputils-ping"],
        &["-V"],
    ),
    Requirement::debian_tool(
        "bpftool (tests inspect programs, links and stats)",
        &["bpftool"],
        &["bpftool"],
        &["version"],
    ),
    Requirement {
        what: "iptables and iptables-restore (the agent's FLANNEL-FWD and --ip-masq rules, \
               as flanneld's, each table written in one iptables-restore)",
        programs: &["iptables", "iptables-restore"],
        source: Source::Debian(&["iptables"]),
        proof: Proof::Check(|_| {
            runs("iptables", &["--version"])?;
            runs("iptables-restore", &["--version"]).map(|_| ())
        }),
    },
    Requirement::debian_tool(
        "setpriv (agents under the unit's capability set)",
        &["setpriv"],
        &["util-linux"],
        &["--version"],
    ),
    Requirement {
        what: "mount and umount (the lab's bpffs and bind mounts)",
        programs: &["mount", "umount"],
        source: Source::Debian(&["mount"]),
        proof: Proof::Check(|_| {
            runs("mount", &["--version"])?;
            runs("umount", &["--version"]).map(|_| ())
        }),
    },
    Requirement {
        what: "chattr and lsattr (the safety tests make a subnet file immutable)",
        programs: &["chattr", "lsattr"],
        source: Source::Debian(&["e2fsprogs"]),
        // chattr has no flag that only reports; its package's lsattr does, and chattr's usage
        // line (exit 1 without files) shows it is there.
        proof: Proof::Check(|_| {
            runs("lsattr", &["-V"])?;
            match Command::new("chattr").stdin(Stdio::null()).output() {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("chattr: {e}")),
            }
        }),
    },
    Requirement {
        what: "sysctl and ps (forwarding and BPF stats in the rigs; dockerd's command line)",
        programs: &["sysctl", "ps"],
        source: Source::Debian(&["procps"]),
        proof: Proof::Check(|_| {
            runs("sysctl", &["--version"])?;
            runs("ps", &["--version"]).map(|_| ())
        }),
    },
    Requirement {
        what: "dockerd and its docker CLI, 20.10 (a real Docker engine per lab host: tests, run, \
               bench), with containerd, runc and tini",
        programs: &["dockerd", "docker"],
        source: Source::Debian(&["docker.io"]),
        // /usr/bin/docker: a newer CLI in /usr/local/bin may come first in PATH.
        proof: Proof::Check(|_| {
            runs("dockerd", &["--version"])?;
            runs("/usr/bin/docker", &["--version"]).map(|_| ())
        }),
    },
    Requirement::debian_tool(
        "busybox, statically linked (the lab containers' image, docker-imported)",
        &["busybox"],
        &["busybox-static"],
        &["true"],
    ),
    Requirement::debian_tool(
        "tar (packs the busybox image for docker import)",
        &["tar"],
        &["tar"],
        &["--version"],
    ),
    Requirement::debian_tool(
        "nsenter (dockerd enters only its host's network namespace, keeping the cgroup mounts)",
        &["nsenter"],
        &["util-linux"],
        &["--version"],
    ),
    Requirement {
        what: "timeout and date (bench clients under a time limit; the report's date)",
        programs: &["timeout", "date"],
        source: Source::Debian(&["coreutils"]),
        proof: Proof::Check(|_| {
            runs("timeout", &["--version"])?;
            runs("date", &["--version"]).map(|_| ())
        }),
    },
    Requirement::debian_tool(
        "openssl (certificates for the etcd TLS tests)",
        &["openssl"],
        &["openssl"],
        &["version"],
    ),
    Requirement::debian_tool(
        "systemd-analyze (verifies deploy/'s units)",
        &["systemd-analyze"],
        &["systemd"],
        &["--version"],
    ),
    Requirement::debian_tool(
        "curl (bench reads etcd's /metrics)",
        &["curl"],
        &["curl"],
        &["--version"],
    ),
    Requirement::debian_tool(
        "iperf3 (bench: TCP throughput)",
        &["iperf3"],
        &["iperf3"],
        &["--version"],
    ),
    Requirement::debian_tool(
        "sockperf (bench: latency)",
        &["sockperf"],
        &["sockperf"],
        &["--version"],
    ),
    Requirement::debian_tool(
        "tcpdump (run prints it to explore the lab)",
        &["tcpdump"],
        &["tcpdump"],
        &["--version"],
    ),
];

#[derive(Debug, Default, clap::Args)]
pub struct Options {
    /// Only prove the requirements: install nothing, exit 1 naming what is missing.
    #[arg(long)]
    pub check: bool,
}

pub fn setup(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let proofs = prove_all()?;
    let missing: Vec<&Proved> = proofs.iter().filter(|p| p.result.is_err()).collect();
    if opts.check {
        for p in proofs.iter().filter(|p| p.result.is_ok()) {
            eprintln!("    ok  {} ({} ms)", p.req.what, p.took.as_millis());
        }
    }
    if missing.is_empty() {
        let slowest = proofs.iter().max_by_key(|p| p.took).expect("requirements");
        step(format!(
            "setup: all {} requirements proved in {:.2} s (slowest: {}, {:.2} s)",
            proofs.len(),
            started.elapsed().as_secs_f64(),
            slowest.req.what,
            slowest.took.as_secs_f64()
        ));
        return Ok(());
    }
    let list = describe(&missing);
    if opts.check {
        bail!(
            "setup --check: {} of {} requirements missing (`cargo xtask setup` installs them):\n{list}",
            missing.len(),
            proofs.len()
        );
    }
    let debian = debian_packages(&missing);
    if !debian.is_empty() && !is_root() {
        bail!(
            "setup: {} of {} requirements missing; installing Debian packages needs root (run as \
             root, or: apt-get install --no-install-recommends {}):\n{list}",
            missing.len(),
            proofs.len(),
            debian.join(" ")
        );
    }
    step(format!(
        "setup: {} of {} requirements missing:\n{list}",
        missing.len(),
        proofs.len()
    ));
    install(&missing, &debian)?;
    let still: Vec<Proved> = prove_all()?
        .into_iter()
        .filter(|p| p.result.is_err())
        .collect();
    if !still.is_empty() {
        bail!(
            "setup: installed, but these still fail their proof:\n{}",
            describe(&still.iter().collect::<Vec<_>>())
        );
    }
    step(format!(
        "setup: done, all {} requirements proved ({:.0} s)",
        proofs.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// A requirement's proof and how long it took.
struct Proved {
    req: &'static Requirement,
    result: Result<(), String>,
    took: Duration,
}

/// Proves every requirement, in parallel: the proofs are independent and mostly wait on a process.
fn prove_all() -> anyhow::Result<Vec<Proved>> {
    let scratch =
        overlay_tests::etcd::TempDir::new("setup").context("setup's scratch directory")?;
    Ok(std::thread::scope(|scope| {
        let handles: Vec<_> = REQUIREMENTS
            .iter()
            .enumerate()
            .map(|(i, req)| {
                let dir = scratch.path().join(i.to_string());
                scope.spawn(move || {
                    let started = Instant::now();
                    let result = std::fs::create_dir(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))
                        .and_then(|()| match &req.proof {
                            Proof::Runs(program, args) => runs(program, args).map(|_| ()),
                            Proof::Check(check) => check(&dir),
                        });
                    Proved {
                        req,
                        result,
                        took: started.elapsed(),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    }))
}

/// One line per missing requirement: what, why its proof failed, and what brings it.
fn describe(missing: &[&Proved]) -> String {
    let mut text = String::new();
    for p in missing {
        let why = p.result.as_ref().err().map_or("", String::as_str);
        let programs = if p.req.programs.is_empty() {
            String::new()
        } else {
            format!(" [{}]", p.req.programs.join(", "))
        };
        let _ = writeln!(
            text,
            "    missing: {}{programs}\n      proof: {}\n      from:  {}",
            p.req.what,
            why.trim(),
            how_to_install(&p.req.source)
        );
    }
    text.truncate(text.trim_end().len());
    text
}

fn how_to_install(source: &Source) -> String {
    match source {
        Source::Debian(packages) => {
            format!(
                "Debian package {} (apt-get install --no-install-recommends {0})",
                packages.join(" ")
            )
        }
        Source::Rustup(args) => format!("rustup {}", args.join(" ")),
        Source::Cargo {
            krate,
            version,
            nightly_llvm,
        } => {
            let llvm = if *nightly_llvm {
                " (setup builds it against the nightly's LLVM)"
            } else {
                ""
            };
            format!("cargo +{NIGHTLY} install {krate} --version {version} --locked{llvm}")
        }
    }
}

fn debian_packages(missing: &[&Proved]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for p in missing {
        if let Source::Debian(names) = p.req.source {
            for name in names {
                if !packages.contains(name) {
                    packages.push(name);
                }
            }
        }
    }
    packages
}

/// Installs the missing requirements: Debian packages in one apt-get, then rustup, then cargo, so
/// what is built with the nightly finds it installed.
fn install(missing: &[&Proved], debian: &[&str]) -> anyhow::Result<()> {
    if !debian.is_empty() {
        step(format!(
            "setup: installing Debian packages {}",
            debian.join(" ")
        ));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(debian)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    for p in missing {
        if let Source::Rustup(args) = p.req.source {
            step(format!("setup: {}", p.req.what));
            run(Command::new("rustup").args(args))?;
        }
    }
    for p in missing {
        if let Source::Cargo {
            krate,
            version,
            nightly_llvm,
        } = p.req.source
        {
            cargo_install(krate, version, nightly_llvm)?;
        }
    }
    Ok(())
}

fn cargo_install(krate: &str, version: &str, nightly_llvm: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        &format!("+{NIGHTLY}"),
        "install",
        krate,
        "--version",
        version,
        "--locked",
        "--force",
    ]);
    if nightly_llvm {
        let sysroot = nightly_sysroot().map_err(anyhow::Error::msg)?;
        let (llvm_lib, llvm_major) = nightly_libllvm(&sysroot)?;
        // bpf-linker's build looks for LLVM under $LLVM_PREFIX/lib and records that directory as
        // its rpath, so the prefix must outlive the install: keep it under CARGO_HOME, keyed by
        // the LLVM library name so a new nightly gets a prefix of its own.
        let prefix = cargo_home()?.join("bpf-linker-llvm").join(&llvm_lib);
        let lib_dir = prefix.join("lib");
        std::fs::create_dir_all(&lib_dir)
            .with_context(|| format!("creating {}", lib_dir.display()))?;
        let target = sysroot.join("lib").join(&llvm_lib);
        for name in ["libLLVM.so", llvm_lib.as_str()] {
            let link = lib_dir.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link)
                .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
        }
        step(format!(
            "setup: building {krate} {version} against {} (about a minute)",
            target.display()
        ));
        cmd.args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .env("LLVM_PREFIX", &prefix);
    } else {
        step(format!(
            "setup: installing {krate} {version} (about a minute)"
        ));
    }
    run(&mut cmd)
}

/// Runs `program args` quietly; its stdout, or why it did not start or failed (with the first
/// lines of its stderr).
fn runs(program: &str, args: &[&str]) -> Result<String, String> {
    output_of(Command::new(program).args(args))
}

fn output_of(cmd: &mut Command) -> Result<String, String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{line}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The first lines say what went wrong (protoc's missing import, cargo's unknown command).
        let head: Vec<&str> = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .take(3)
            .collect();
        return Err(format!("{line}: {}: {}", out.status, head.join(" / ")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn c_compiler_links(dir: &Path) -> Result<(), String> {
    let (src, out) = (dir.join("probe.c"), dir.join("probe"));
    write(
        &src,
        "#include <stdio.h>\nint main(void) { return puts(\"\") < 0; }\n",
    )?;
    let (src, out) = (src.to_string_lossy(), out.to_string_lossy());
    runs("cc", &["-o", &out, &src]).map(|_| ())
}

fn cxx_compiler_links(dir: &Path) -> Result<(), String> {
    let (src, out) = (dir.join("probe.cc"), dir.join("probe"));
    write(
        &src,
        "#include <vector>\nint main() { return std::vector<int>(1).size() != 1; }\n",
    )?;
    let (src, out) = (src.to_string_lossy(), out.to_string_lossy());
    runs("c++", &["-o", &out, &src]).map(|_| ())
}

/// The protoc etcd-client's build script uses: prost-build takes `$PROTOC`, else `protoc` on PATH.
fn protoc() -> Command {
    Command::new(std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into()))
}

fn protoc_runs(_dir: &Path) -> Result<(), String> {
    output_of(protoc().arg("--version")).map(|_| ())
}

/// What etcd-client's build needs from protoc and failed on new machines: an import of a
/// well-known type resolved from protoc's own include directory (or `$PROTOC_INCLUDE`, which
/// prost-build passes as `-I` too).
fn protoc_imports_descriptor(dir: &Path) -> Result<(), String> {
    write(
        &dir.join("probe.proto"),
        "syntax = \"proto3\";\n\
         import \"google/protobuf/descriptor.proto\";\n\
         extend google.protobuf.FieldOptions { string probe = 50000; }\n",
    )?;
    let mut cmd = protoc();
    cmd.arg(format!("--proto_path={}", dir.display()));
    if let Some(include) = std::env::var_os("PROTOC_INCLUDE") {
        cmd.arg("--proto_path").arg(include);
    }
    cmd.arg(format!(
        "--descriptor_set_out={}",
        dir.join("probe.pb").display()
    ))
    .arg("probe.proto")
    .current_dir(dir);
    output_of(&mut cmd).map(|_| ())
}

fn nightly_sysroot() -> Result<PathBuf, String> {
    let sysroot = runs("rustc", &[&format!("+{NIGHTLY}"), "--print", "sysroot"])?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn rust_src_present(_dir: &Path) -> Result<(), String> {
    let lib = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core/src/lib.rs");
    if lib.is_file() {
        Ok(())
    } else {
        Err(format!("{} is missing", lib.display()))
    }
}

/// Links an empty archive into an eBPF object: that loads bpf-linker's LLVM (the nightly's shared
/// library, which a nightly update removes) and runs its BPF code generation, without compiling
/// anything.
fn bpf_linker_links(dir: &Path) -> Result<(), String> {
    let version = runs("bpf-linker", &["--version"])?;
    if !version
        .split_whitespace()
        .any(|word| word == BPF_LINKER_VERSION)
    {
        return Err(format!(
            "bpf-linker is {}, the build pins {BPF_LINKER_VERSION}",
            version.trim()
        ));
    }
    let (archive, object) = (dir.join("empty.a"), dir.join("probe.o"));
    write(&archive, "!<arch>\n")?;
    let (archive_arg, object_arg) = (archive.to_string_lossy(), object.to_string_lossy());
    runs(
        "bpf-linker",
        &[
            "--target",
            "bpfel-unknown-none",
            "-o",
            &object_arg,
            &archive_arg,
        ],
    )?;
    let elf = std::fs::read(&object).map_err(|e| format!("reading {}: {e}", object.display()))?;
    // e_machine (offset 18, little-endian) is EM_BPF, 247.
    if elf.starts_with(b"\x7fELF") && elf.get(18..20) == Some(&[247, 0][..]) {
        Ok(())
    } else {
        Err(format!("{} is not an eBPF ELF object", object.display()))
    }
}

fn cargo_runs(cmd: &mut Command) -> Result<(), String> {
    output_of(cmd).map(|_| ())
}

fn cargo_fuzz_runs(_dir: &Path) -> Result<(), String> {
    // As `cargo xtask test` runs it: the nightly chosen by `+nightly`, not the xtask's toolchain.
    let version = output_of(
        Command::new("cargo")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([&format!("+{NIGHTLY}"), "fuzz", "--version"]),
    )?;
    if version
        .split_whitespace()
        .any(|word| word == CARGO_FUZZ_VERSION)
    {
        Ok(())
    } else {
        Err(format!(
            "cargo-fuzz is {}, setup pins {CARGO_FUZZ_VERSION}",
            version.trim()
        ))
    }
}

/// As the tests start it (`/usr/bin/etcd` on free loopback ports, data in a temporary directory,
/// waiting for `etcdctl endpoint health`), then a put and a get; the guard removes it all.
fn etcd_answers(_dir: &Path) -> Result<(), String> {
    let etcd = overlay_tests::etcd::Etcd::start().map_err(|e| e.to_string())?;
    etcd.try_etcdctl(&["put", "setup-probe", "ok"])
        .map_err(|e| e.to_string())?;
    let got = etcd
        .try_etcdctl(&["get", "--print-value-only", "setup-probe"])
        .map_err(|e| e.to_string())?;
    if got.trim() == "ok" {
        Ok(())
    } else {
        Err(format!("etcdctl get returned {got:?}, not \"ok\""))
    }
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
