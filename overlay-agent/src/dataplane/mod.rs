//! The dataplane: programs and state that move container packets between hosts.

pub mod ebpf;
pub mod ebpf_datapath;
pub mod endpoints;
pub mod pins;

use std::net::Ipv4Addr;

use crate::{
    cli::DatapathKind,
    control::{config::Backend, datapath::Datapath},
};

/// Why no datapath could be built.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// `--datapath ebpf` (or auto) and the programs cannot load here.
    #[error("the eBPF datapath cannot run on this host: {source}")]
    Ebpf {
        /// Why loading failed.
        #[source]
        source: ebpf::EbpfError,
    },
    /// `--datapath tun`, or auto without eBPF: the userspace datapath is not built yet.
    #[error(
        "the TUN datapath is not available in this version{reason}; \
         run where eBPF can load (root or CAP_BPF+CAP_NET_ADMIN, kernel >= 5.10)"
    )]
    TunUnavailable {
        /// Why it was wanted.
        reason: String,
    },
}

/// Picks the datapath for `backend`: `None` for `alloc` (lease only).
///
/// `auto` uses eBPF when the programs load and says why in the log when they do not; it never
/// quietly picks something that forwards less.
pub fn select(
    kind: DatapathKind,
    backend: &Backend,
    public_ip: Ipv4Addr,
    options: ebpf_datapath::EbpfOptions,
) -> Result<Option<Box<dyn Datapath>>, SelectError> {
    if matches!(backend, Backend::Alloc) {
        return Ok(None);
    }
    match kind {
        DatapathKind::Ebpf => {
            ebpf_datapath::EbpfDatapath::new(backend.clone(), public_ip, options.clone())
                .map(|d| Some(Box::new(d) as Box<dyn Datapath>))
                .map_err(|source| SelectError::Ebpf { source })
        }
        DatapathKind::Auto => {
            match ebpf_datapath::EbpfDatapath::new(backend.clone(), public_ip, options.clone()) {
                Ok(d) => {
                    tracing::info!(
                        "--datapath=auto: eBPF programs load on this kernel; using eBPF"
                    );
                    Ok(Some(Box::new(d)))
                }
                Err(err) => Err(SelectError::TunUnavailable {
                    reason: format!(" (--datapath=auto fell back because eBPF failed: {err})"),
                }),
            }
        }
        DatapathKind::Tun => Err(SelectError::TunUnavailable {
            reason: " (--datapath=tun)".into(),
        }),
    }
}
