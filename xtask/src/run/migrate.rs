//! `cargo xtask run --migrate-from-flannel`: a running three-host flannel cluster (flanneld
//! stand-ins that write and do what flanneld v0.20 does) migrated to overlay-agent host by host,
//! then rolled back, with every container pinging every other at 20/s; prints the loss of each
//! host swap as it happens.

use std::path::Path;

use anyhow::Context as _;
use overlay_tests::{
    flanneld,
    migration::{Direction, Migration, Plan},
};

use super::{Backend, Options, cleanup};
use crate::cmd::step;

pub fn migrate(opts: &Options, binary: &Path) -> anyhow::Result<()> {
    let dir = cleanup::lab_dir(std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let backend = match opts.backend {
        Backend::Udp => flanneld::Backend::Udp,
        Backend::Vxlan => flanneld::Backend::Vxlan,
    };
    step(format!(
        "run: a flannel cluster ({:?} backend): 3 flanneld hosts, a container on each, 6 ping \
         flows at 20/s",
        opts.backend
    ));
    let result = (|| -> anyhow::Result<()> {
        let mut migration = Migration::flannel_cluster(Plan {
            prefix: cleanup::PREFIX.into(),
            backend,
            agent_bin: binary.to_owned(),
            agent_flags: vec![format!("--datapath={}", datapath_flag(opts))],
            rollback: true,
            dir: dir.clone(),
        })?;
        step(
            "run: per host: start overlay-agent beside flanneld, wait until it is ready, stop \
             flanneld; then back: stop the agent, overlay-agent teardown --to-flanneld, start \
             flanneld, overlay-agent teardown --to-flanneld",
        );
        let swaps = migration.run(|swap| {
            let detail = if swap.lost.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    swap.lost
                        .iter()
                        .map(|(f, t, s)| format!("h{f}->h{t} #{s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            step(format!("run:   {swap}{detail}"));
        })?;
        let (to_agent, back): (Vec<_>, Vec<_>) = swaps
            .iter()
            .partition(|s| s.direction == Direction::ToAgent);
        let lost = |v: &[&overlay_tests::migration::Swap]| -> (usize, u32) {
            (
                v.iter().map(|s| s.lost.len()).sum(),
                v.iter().map(|s| s.sent).sum(),
            )
        };
        let (l, s) = lost(&to_agent);
        step(format!(
            "run: migration to overlay-agent: {l} of {s} pings lost"
        ));
        let (l, s) = lost(&back);
        step(format!("run: rollback to flanneld: {l} of {s} pings lost"));
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn datapath_flag(opts: &Options) -> &'static str {
    match opts.datapath {
        // The zero-loss takeover is the eBPF datapath's; auto picks it where it loads.
        super::Datapath::Auto => "auto",
        super::Datapath::Ebpf => "ebpf",
        super::Datapath::Tun => "tun",
    }
}
