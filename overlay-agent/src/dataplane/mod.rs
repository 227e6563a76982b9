//! The dataplane: the overlay contract ([`contract`]: the flannel rules, written once) and the two
//! datapaths that carry it out, [`ebpf`] in the kernel and [`tun`] in user space.

pub mod contract;
pub mod counters;
pub mod ebpf;
pub mod tun;

use crate::cli::DatapathKind;
use contract::{Datapath, Overlay, OverlaySpec};

/// Why no datapath could be built.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// `--datapath ebpf` and the programs cannot load here.
    #[error("the eBPF datapath cannot run on this host (--datapath=ebpf): {source}")]
    Ebpf {
        /// Why loading failed.
        #[source]
        source: Box<ebpf::EbpfError>,
    },
    /// `--datapath tun`: the TUN datapath cannot run.
    #[error("the TUN datapath cannot run on this host (--datapath=tun): {source}")]
    Tun {
        /// Why it cannot run.
        #[source]
        source: tun::datapath::TunDatapathError,
    },
    /// `--datapath auto`: neither can run.
    #[error(
        "no datapath can run on this host (--datapath=auto): eBPF failed ({ebpf}), and the TUN \
         datapath too: {tun}"
    )]
    Neither {
        /// Why eBPF failed.
        ebpf: Box<ebpf::EbpfError>,
        /// Why TUN failed.
        #[source]
        tun: tun::datapath::TunDatapathError,
    },
}

/// Picks the datapath for `spec`.
///
/// `auto` uses eBPF when the programs load; otherwise the TUN datapath, saying in one log line why
/// eBPF could not be used.
pub fn select(
    kind: DatapathKind,
    spec: OverlaySpec,
    options: ebpf::datapath::EbpfOptions,
) -> Result<Overlay, SelectError> {
    let ebpf = || {
        ebpf::datapath::EbpfDatapath::new(options.clone())
            .map(|d| Box::new(d) as Box<dyn Datapath>)
            .map_err(Box::new)
    };
    let tun = || tun::datapath::TunDatapath::new().map(|d| Box::new(d) as Box<dyn Datapath>);
    let (datapath, why) = match kind {
        DatapathKind::Ebpf => (
            ebpf().map_err(|source| SelectError::Ebpf { source })?,
            "--datapath=ebpf".to_owned(),
        ),
        DatapathKind::Tun => (
            tun().map_err(|source| SelectError::Tun { source })?,
            "--datapath=tun".to_owned(),
        ),
        DatapathKind::Auto => match ebpf() {
            Ok(d) => {
                tracing::info!("--datapath=auto: eBPF programs load on this kernel; using eBPF");
                (d, "--datapath=auto: the eBPF programs load here".to_owned())
            }
            Err(err) => {
                let reason = crate::control::etcd::error_chain(&err);
                tracing::warn!(
                    "--datapath=auto: eBPF cannot load here ({reason}); using the TUN datapath \
                     (forwarding in user space)"
                );
                let d = tun().map_err(|tun| SelectError::Neither { ebpf: err, tun })?;
                (
                    d,
                    format!("--datapath=auto: eBPF cannot load here ({reason})"),
                )
            }
        },
    };
    Ok(Overlay::new(spec, datapath).chosen_because(why))
}
