//! Loads the embedded eBPF object, attaches its programs and reads its maps.
//!
//! The object is compiled by this crate's build script and embedded in the binary, so the agent
//! never depends on a file next to it, and a binary always runs the programs it was built with.

use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{SchedClassifier, TcAttachType, Xdp},
};
use overlay_common::{COUNTERS_MAP, Counter, CounterSlot, programs};

pub use aya::programs::XdpMode;

/// The eBPF object built from `overlay-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

/// Errors of loading, attaching and reading the eBPF dataplane.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The kernel refused the object: no BPF syscall, missing CAP_BPF/CAP_NET_ADMIN, or a map type
    /// it does not know.
    #[error("loading the eBPF object: {source}")]
    Load {
        /// What aya reported.
        #[source]
        source: aya::EbpfError,
    },
    /// The embedded object lacks a program or map the agent expects; it was built from sources that
    /// do not match this binary.
    #[error("the embedded eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },
    /// The verifier rejected a program, or a program has an unexpected type.
    #[error("loading program {program}: {source}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Attaching a program to an interface failed (no such interface, mode unsupported by the
    /// driver, another program in the way).
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The interface it was to be attached to.
        interface: String,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map could not be opened or read.
    #[error("reading map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
}

/// The loaded eBPF dataplane. Dropping it detaches every program it attached.
pub struct EbpfDataplane {
    ebpf: Ebpf,
}

impl EbpfDataplane {
    /// Loads the embedded object and its programs into the kernel (verifier included), attaching
    /// nothing yet.
    pub fn load() -> Result<Self, EbpfError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(OBJECT).map_err(|source| EbpfError::Load { source })?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, programs::XDP_INGRESS)?;
        xdp.load().map_err(|source| EbpfError::Program {
            program: programs::XDP_INGRESS,
            source,
        })?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, programs::TC_EGRESS)?;
        tc.load().map_err(|source| EbpfError::Program {
            program: programs::TC_EGRESS,
            source,
        })?;
        Ok(Self { ebpf })
    }

    /// Attaches the ingress XDP program to `interface` (looked up in the calling thread's network
    /// namespace).
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<(), EbpfError> {
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, programs::XDP_INGRESS)?;
        xdp.attach(interface, mode)
            .map_err(|source| EbpfError::Attach {
                program: programs::XDP_INGRESS,
                interface: interface.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// Attaches the egress classifier to `interface` (tcx on kernels >= 6.6, clsact before).
    pub fn attach_tc_egress(&mut self, interface: &str) -> Result<(), EbpfError> {
        let attach_err = |source| EbpfError::Attach {
            program: programs::TC_EGRESS,
            interface: interface.to_owned(),
            source,
        };
        if !tcx_supported() {
            // Legacy tc needs the clsact qdisc; it may already be there, which is fine.
            if let Err(err) = aya::programs::tc::qdisc_add_clsact(interface) {
                tracing::debug!(%interface, %err, "clsact qdisc not added (may exist already)");
            }
        }
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, programs::TC_EGRESS)?;
        tc.attach(interface, TcAttachType::Egress)
            .map_err(attach_err)?;
        Ok(())
    }

    /// Reads the counters, summed over CPUs, one per [`CounterSlot`].
    pub fn counters(&self) -> Result<Vec<(CounterSlot, Counter)>, EbpfError> {
        let map_err = |source| EbpfError::Map {
            map: COUNTERS_MAP,
            source,
        };
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(EbpfError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err)?;
        CounterSlot::ALL
            .iter()
            .map(|&slot| {
                let per_cpu = counters.get(&slot.index(), 0).map_err(map_err)?;
                let total = per_cpu.iter().fold(Counter::default(), |a, b| a.merged(*b));
                Ok((slot, total))
            })
            .collect()
    }
}

/// aya attaches through tcx links from 6.6 on and through netlink (which needs clsact) before.
fn tcx_supported() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, whose default (64 KiB) is too small for
/// any real map. Newer kernels account to the memory cgroup and ignore it, so failing is harmless.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid rlimit struct and has no other effect on memory.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11"
        );
    }
}
