//! The userspace forwarder behind the TUN datapath: TUN -> peer lookup -> encapsulate -> UDP, and
//! UDP -> sender check -> decapsulate -> TUN, on the same device (`flannel0` / `flannel.<VNI>`)
//! and in the same wire formats as the eBPF path.
//!
//! One worker per core, each a thread with a current-thread tokio runtime owning one queue of the
//! multi-queue TUN device and one `SO_REUSEPORT` UDP socket, so flows stay on one core and no
//! state is shared but the peer table (see [`peers`]) and counters. The fast path (the default
//! [`Profile::Full`]) moves TCP as 64 KB super-packets: TUN offloads (`IFF_VNET_HDR`,
//! `TUNSETOFFLOAD`; super-packets read are cut into segments by the codec without copying the
//! payload, each segment sent as its headers plus a slice of the read buffer; received segments
//! are merged back into super-packets by [`coalesce`] and written gathered, without copying),
//! UDP GSO on send and UDP GRO on receive,
//! `recvmmsg`/`sendmmsg`, no allocation per packet.
//!
//! [`Profile`] keeps the slower steps selectable (`OVERLAY_TUN_PROFILE`), so each can be measured
//! with `cargo xtask bench`.

pub mod coalesce;
pub mod codec;
pub mod datapath;
pub mod peers;
pub mod socket;
pub mod stats;
pub mod vnet;
mod worker;

use std::{
    net::{Ipv4Addr, UdpSocket},
    sync::Arc,
    thread::JoinHandle,
};

pub use peers::{PeerRoute, PeerTable, SharedPeers};
pub use stats::{Stats, StatsSnapshot};

use overlay_common::maps::Config;

use crate::{control::subnet::Subnet, dataplane::contract::Unhealthy};
use codec::Format;

/// Errors starting the forwarder.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    /// Opening a queue of the TUN device failed.
    #[error("opening queue {queue} of TUN device {device} (offload {offload}): {source}")]
    TunQueue {
        /// The device.
        device: String,
        /// The queue number.
        queue: usize,
        /// Whether offloads were asked for.
        offload: bool,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Binding the UDP socket failed (another process on the port, or no permission).
    #[error("binding UDP port {port} for worker {worker}: {source}")]
    Bind {
        /// The port.
        port: u16,
        /// The worker.
        worker: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be spawned.
    #[error("spawning worker thread {worker}: {source}")]
    Spawn {
        /// The worker.
        worker: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// `OVERLAY_TUN_PROFILE` names no profile.
    #[error("OVERLAY_TUN_PROFILE={value:?}: expected baseline, offload or full")]
    Profile {
        /// The value given.
        value: String,
    },
}

/// How much of the fast path is on: the steps of the performance work, kept selectable so each
/// can be measured (`OVERLAY_TUN_PROFILE=baseline|offload|full`, default `full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// One read and one write per packet, one worker: what flannel's udp proxy does.
    Baseline,
    /// TUN offloads, UDP GSO/GRO and batched system calls, one worker.
    Offload,
    /// As `Offload`, one worker per core on a multi-queue device.
    Full,
}

impl Profile {
    /// The profile `OVERLAY_TUN_PROFILE` names, `Full` when unset.
    pub fn from_env() -> Result<Self, ForwarderError> {
        match std::env::var("OVERLAY_TUN_PROFILE") {
            Err(_) => Ok(Profile::Full),
            Ok(v) => match v.as_str() {
                "baseline" => Ok(Profile::Baseline),
                "offload" => Ok(Profile::Offload),
                "full" | "" => Ok(Profile::Full),
                _ => Err(ForwarderError::Profile { value: v }),
            },
        }
    }

    fn offload(self) -> bool {
        self != Profile::Baseline
    }

    fn workers(self) -> usize {
        match self {
            Profile::Full => std::thread::available_parallelism().map_or(1, |n| n.get()),
            _ => 1,
        }
    }
}

/// What the forwarder needs to know.
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    /// The TUN device (it must exist; multi-queue when the profile runs several workers).
    pub device: String,
    /// This host's side of the overlay as the eBPF programs get it (`OverlaySpec::program_config`):
    /// the wire format, port, VNI and VtepMAC, and what the receive policy judges by.
    pub host: Config,
    /// The whole overlay Network: destinations in it that no peer owns get ICMP unreachable.
    pub network: Subnet,
    /// Source of the ICMP answers (not a local address: the kernel drops those as martians).
    pub icmp_source: Ipv4Addr,
    /// ICMP answers per second and worker at most.
    pub icmp_per_second: u32,
    /// The device's MTU.
    pub mtu: u32,
    /// The performance profile.
    pub profile: Profile,
}

impl ForwarderConfig {
    /// The wire format.
    pub fn format(&self) -> Format {
        Format::of(&self.host)
    }

    /// The UDP port: listened on, and sent to.
    pub fn port(&self) -> u16 {
        self.host.port
    }
}

/// The running forwarder. Dropping it stops the workers and closes their queues and sockets.
pub struct Forwarder {
    stats: Arc<Stats>,
    stop: tokio::sync::watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    description: String,
}

impl Forwarder {
    /// Opens the queues and sockets (in the calling thread's network namespace) and starts the
    /// workers; forwarding works when this returns.
    pub fn start(config: ForwarderConfig, peers: Arc<SharedPeers>) -> Result<Self, ForwarderError> {
        let workers = config.profile.workers();
        let offload = config.profile.offload();
        let mut queues = Vec::with_capacity(workers);
        for queue in 0..workers {
            let err = |source| ForwarderError::TunQueue {
                device: config.device.clone(),
                queue,
                offload,
                source,
            };
            let dev = match queues.first() {
                None => tun_rs::DeviceBuilder::new()
                    .name(&config.device)
                    .offload(offload)
                    .multi_queue(crate::host::tun::is_multi_queue(&config.device) == Some(true))
                    .build_sync()
                    .map_err(err)?,
                Some(first) => tun_rs::SyncDevice::try_clone(first).map_err(err)?,
            };
            dev.set_nonblocking(true).map_err(err)?;
            queues.push(dev);
        }
        let options = socket::SocketOptions {
            reuse_port: workers > 1,
            gro: offload,
            gso: offload,
        };
        let sockets: Vec<UdpSocket> = (0..workers)
            .map(|worker| {
                socket::bind(Ipv4Addr::from(config.host.local_ip), config.port(), options).map_err(
                    |source| ForwarderError::Bind {
                        port: config.port(),
                        worker,
                        source,
                    },
                )
            })
            .collect::<Result<_, _>>()?;
        let stats = Arc::new(Stats::default());
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut handles = Vec::with_capacity(workers);
        for (worker, (dev, sock)) in queues.into_iter().zip(sockets).enumerate() {
            let ctx = worker::Worker {
                config: config.clone(),
                index: worker,
                peers: peers.reader(),
                stats: stats.clone(),
                gso: options.gso,
            };
            let stop = stop_rx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("tun-worker-{worker}"))
                .spawn(move || ctx.run(dev, sock, stop))
                .map_err(|source| ForwarderError::Spawn { worker, source })?;
            handles.push(handle);
        }
        let description = format!(
            "{workers} worker(s), profile {:?} (TUN offload {offload}, UDP GSO/GRO {offload}, \
             batched syscalls {offload})",
            config.profile
        );
        Ok(Self {
            stats,
            stop,
            workers: handles,
            description,
        })
    }

    /// The counters, shared: readable while the workers count.
    pub fn counters(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Workers, profile and offloads, for the log.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// `Err` when a worker has stopped (its reason is in the log).
    pub fn check(&self) -> Result<(), Unhealthy> {
        let stopped = self.workers.iter().filter(|w| w.is_finished()).count();
        if stopped > 0 {
            return Err(Unhealthy::WorkersStopped {
                stopped,
                workers: self.workers.len(),
            });
        }
        Ok(())
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // The counters' only trace once the process is gone: what an operator compares
        // against the traffic seen, and the first thing to look at after a loss.
        tracing::info!("TUN datapath stopped: {}", self.stats.snapshot());
    }
}
