//! The dataplane: programs and state that move container packets between hosts.

pub mod codec;
pub mod ebpf;
pub mod ebpf_datapath;
pub mod endpoints;
pub mod pins;
pub mod tun;
pub mod tun_datapath;

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
    /// `--datapath tun`, or auto without eBPF: the TUN datapath cannot run either.
    #[error("the TUN datapath cannot run on this host{reason}: {source}")]
    Tun {
        /// Why it was wanted (and, for auto, why eBPF was not used).
        reason: String,
        /// Why it cannot run.
        #[source]
        source: tun_datapath::TunDatapathError,
    },
}

/// Picks the datapath for `backend`: `None` for `alloc` (lease only).
///
/// `auto` uses eBPF when the programs load; otherwise the TUN datapath, saying in one log line why
/// eBPF could not be used.
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
                Err(err) => {
                    tracing::warn!(
                        "--datapath=auto: eBPF cannot load here ({}); using the TUN datapath \
                         (forwarding in user space)",
                        crate::control::etcd::error_chain(&err)
                    );
                    tun_datapath::TunDatapath::new(backend.clone(), public_ip)
                        .map(|d| Some(Box::new(d) as Box<dyn Datapath>))
                        .map_err(|source| SelectError::Tun {
                            reason: format!(" (--datapath=auto, and eBPF failed: {err})"),
                            source,
                        })
                }
            }
        }
        DatapathKind::Tun => tun_datapath::TunDatapath::new(backend.clone(), public_ip)
            .map(|d| Some(Box::new(d) as Box<dyn Datapath>))
            .map_err(|source| SelectError::Tun {
                reason: " (--datapath=tun)".into(),
                source,
            }),
    }
}

/// The `BackendData` a host publishes in its lease, the same whichever datapath runs, so a host
/// may switch datapaths across a restart without its peers noticing: vxlan's VNI and this host's
/// VTEP MAC (derived from its public IP), nothing for udp.
pub fn backend_data(backend: &Backend, public_ip: Ipv4Addr) -> Option<serde_json::Value> {
    match backend {
        Backend::Vxlan { vni, .. } => {
            let m = ebpf::vtep_mac_for(public_ip);
            Some(serde_json::json!({
                "VNI": vni,
                "VtepMAC": format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
            }))
        }
        _ => None,
    }
}
