//! `cargo xtask run`: the main job, the article's story end to end in a local lab.
//!
//! setup -> build -> a real etcd holding the article's network config under `/flannel` -> N
//! simulated hosts (network namespaces on one underlay bridge) -> one `overlay-agent` per host with
//! the article's command line -> per host, a real dockerd started from subnet.env (the drop-in's
//! `--bip=${FLANNEL_SUBNET} --mtu=${FLANNEL_MTU}` on odd hosts, `overlay-agent docker-opts` on
//! even ones; `--docker=imitate`, or a machine where dockerd cannot run, gets a bridge and a veth
//! per container instead) -> `docker run` a container per host -> every container pings every
//! other with `docker exec`. `--once` verifies and exits; otherwise the lab stays up until Ctrl-C.
//!
//! `--host -- <flags>` builds the agent and runs it on this machine instead;
//! `--migrate-from-flannel` migrates a running flannel cluster instead (see `migrate`).

mod cleanup;
pub mod lab;
mod migrate;

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::bail;

use crate::{
    build,
    cmd::{is_root, step},
    setup,
};

/// The overlay backend of the lab's network config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// flannel's udp backend (what the article's config, without "Backend", means).
    Udp,
    /// flannel's vxlan backend.
    Vxlan,
}

/// The agent's `--datapath`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datapath {
    /// eBPF when the kernel allows it, else TUN.
    Auto,
    /// eBPF only.
    Ebpf,
    /// The TUN device driven from user space.
    Tun,
}

/// What does docker's part on each simulated host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Docker {
    /// A real dockerd per host (Debian's docker.io), started from the agent's subnet.env as an
    /// operator's host starts it; where dockerd cannot run, the imitation, saying why.
    Real,
    /// A bridge and a veth per container, set up as docker would from subnet.env.
    Imitate,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Verify and exit: 0 when every container reaches every other, non-zero with the reason.
    #[arg(long)]
    pub once: bool,
    /// Number of simulated hosts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(2..=100))]
    pub hosts: u16,
    /// The network config's backend.
    #[arg(long, value_enum, default_value_t = Backend::Udp)]
    pub backend: Backend,
    /// The agents' --datapath.
    #[arg(long, value_enum, default_value_t = Datapath::Auto)]
    pub datapath: Datapath,
    /// Who does docker's part on each host.
    #[arg(long, value_enum, default_value_t = Docker::Real)]
    pub docker: Docker,
    /// Run the agent on this machine (not in the lab) with the flags after `--`.
    #[arg(long)]
    pub host: bool,
    /// Build the agent without optimisations (quicker to build).
    #[arg(long)]
    pub debug_agent: bool,
    /// Instead of the article's lab: a running flannel cluster (flanneld stand-ins) migrated to
    /// the agent host by host and rolled back, every container pinging every other at 20/s;
    /// prints the pings lost in each host swap.
    #[arg(long, conflicts_with_all = ["host", "hosts", "once"])]
    pub migrate_from_flannel: bool,
    /// Skip `setup` (when you know everything is installed).
    #[arg(long)]
    pub no_setup: bool,
    /// With --host: the agent's flags (flanneld's), e.g. `-- --etcd-endpoints=http://10.0.0.2:2379`.
    #[arg(last = true, value_name = "AGENT-FLAGS")]
    pub agent_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    if !opts.host && !opts.agent_args.is_empty() {
        bail!(
            "flags after `--` are the agent's, for --host; the lab gives its agents the article's \
             command line"
        );
    }
    if !is_root() && !opts.host {
        bail!(
            "the lab creates network namespaces, mounts bpffs and loads eBPF programs: run as root"
        );
    }
    if !opts.host {
        // Before the long steps, so Ctrl-C during the build cleans up as well.
        cleanup::install_signal_handlers();
        cleanup::remove_leftovers();
    }
    if !opts.no_setup {
        setup::setup(&setup::Options::default())?;
    }
    let binary = build::build(&build::Options {
        debug: opts.debug_agent,
    })?;
    if opts.host {
        return run_on_host(&binary, &opts.agent_args);
    }
    cleanup::check_interrupted()?;
    if opts.migrate_from_flannel {
        return migrate::migrate(opts, &binary);
    }
    let result = lab::lab(opts, &binary);
    if cleanup::interrupted() && opts.once {
        eprintln!("==> run: interrupted; lab removed");
        std::process::exit(130);
    }
    result
}

/// Replaces this process with the agent, so signals and the exit status are the agent's own.
fn run_on_host(binary: &std::path::Path, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        step(
            "run: not root: the agent needs CAP_NET_ADMIN and CAP_BPF (see deploy/overlay-agent.service)",
        );
    }
    step(format!(
        "run: on this host: {} {}",
        binary.display(),
        args.join(" ")
    ));
    let err = Command::new(binary).args(args).exec();
    bail!("starting {}: {err}", binary.display())
}
