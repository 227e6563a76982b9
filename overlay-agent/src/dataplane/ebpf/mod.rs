//! The eBPF datapath: loads the embedded object, attaches `tc_encap` to the overlay device's egress
//! and `tc_decap` to the underlay interface's ingress, and keeps the maps in step with the peers
//! and local containers.
//!
//! The object is compiled by this crate's build script and embedded in the binary, so the agent
//! never depends on a file next to it, and a binary always runs the programs it was built with.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
        lpm_trie::Key,
    },
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};

pub use aya::programs::XdpMode;

pub mod datapath;
pub mod endpoints;
pub mod pinned;
pub mod pins;

pub use pinned::{pinned_counters, pinned_peers};

use crate::control::subnet::Subnet;
use overlay_common::{
    COUNTERS_MAP, Counter, CounterSlot, PEER_COUNTERS_MAP, PeerCounters,
    maps::{
        CONFIG_MAP, Config, ENDPOINTS_MAP, Endpoint, MAX_ENDPOINTS, MAX_PEERS, PEER_ADDRS_MAP,
        PEER_KERNEL_DECAP, PEERS_MAP, Peer, PeerAddr,
    },
    net::Mac,
    programs,
};
use pins::Pins;

/// Every map of the object, pinned together.
const ALL_MAPS: [&str; 6] = [
    CONFIG_MAP,
    PEERS_MAP,
    PEER_ADDRS_MAP,
    ENDPOINTS_MAP,
    COUNTERS_MAP,
    PEER_COUNTERS_MAP,
];

/// `BPF_NOEXIST`: an update that only creates.
const BPF_NOEXIST: u64 = 1;

/// The eBPF object built from `overlay-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

/// Errors of loading, attaching and driving the eBPF datapath.
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
    /// Attaching a program to an interface failed.
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
    /// The pin directory could not be prepared.
    #[error(transparent)]
    Pins(#[from] pins::PinsError),
    /// Pinning a link failed.
    #[error("pinning the link of {program} at {path}: {source}")]
    Pin {
        /// The program.
        program: &'static str,
        /// The pin path.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: aya::pin::PinError,
    },
    /// A map is full: the entry was not added, and every entry it had is still there.
    #[error(
        "{operation} in map {map}: the map is full ({capacity} entries); the entries it has are \
         kept, this one is not programmed"
    )]
    Full {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        operation: &'static str,
        /// Its capacity.
        capacity: u32,
    },
    /// The number of CPUs (the per-CPU maps' value count) could not be read.
    #[error("reading the possible CPUs (/sys/devices/system/cpu/possible): {source}")]
    Cpus {
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A map operation failed (kernel refusal).
    #[error("{operation} in map {map}: {source}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done.
        operation: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
}

/// Where decapsulation runs on the underlay interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecapHook {
    /// TC ingress: can deliver straight into containers (bpf_redirect_peer). The default.
    #[default]
    Tc,
    /// XDP, before the stack allocates an skb and before GRO; delivers through the stack only.
    /// May pay off on a physical NIC; on veth it measured slower (see docs/architecture.md).
    Xdp(XdpMode),
}

pub use super::contract::PeerRoute;

/// The local containers the decapsulation program delivers to directly.
pub struct EndpointsMap {
    map: BpfHashMap<MapData, [u8; 4], Endpoint>,
}

impl EndpointsMap {
    /// Programs a local container for direct delivery.
    pub fn upsert(&mut self, ip: Ipv4Addr, endpoint: Endpoint) -> Result<(), EbpfError> {
        self.map
            .insert(ip.octets(), endpoint, 0)
            .map_err(map_err(ENDPOINTS_MAP, "inserting an endpoint"))
    }

    /// Forgets a local container; unknown addresses are ignored.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<(), EbpfError> {
        removal(
            ENDPOINTS_MAP,
            "removing an endpoint",
            self.map.remove(&ip.octets()),
        )
    }

    /// Every programmed endpoint.
    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, EbpfError> {
        endpoint_entries(&self.map)
    }
}

/// The loaded eBPF datapath. Dropping it detaches the programs it attached in this process.
pub struct EbpfDataplane {
    ebpf: Ebpf,
    /// Peers as programmed, keyed by subnet, so removals and address refcounts need no map reads.
    peers: HashMap<Subnet, PeerRoute>,
    /// Where links and maps are pinned; None for a dataplane that lives and dies with the process.
    pins: Option<Pins>,
    /// Peer subnets found in maps reused from an earlier run and not confirmed since: kept (so
    /// traffic flows through the restart) until [`EbpfDataplane::remove_stale_peers`].
    stale_peers: HashSet<Subnet>,
    /// Every attachment made, so pins of any other are stale.
    attached: Vec<Attachment>,
}

/// One program attached to one interface by this dataplane.
#[derive(Debug, Clone)]
struct Attachment {
    program: &'static str,
    interface: String,
    /// The interface's index when attached: a device deleted and made again under the same name
    /// has another, and the attachment went with the old one.
    ifindex: u32,
    /// Where its link is pinned, when it is.
    pin: Option<PathBuf>,
}

/// The index of interface `name` in the calling thread's namespace; 0 when there is none.
fn ifindex(name: &str) -> u32 {
    std::ffi::CString::new(name)
        // SAFETY: if_nametoindex reads a NUL-terminated string and returns 0 when unknown.
        .map(|n| unsafe { libc::if_nametoindex(n.as_ptr()) })
        .unwrap_or(0)
}

impl Attachment {
    /// Why this attachment no longer carries traffic, if it does not.
    fn broken(&self) -> Option<String> {
        let now = ifindex(&self.interface);
        let (program, interface) = (self.program, &self.interface);
        if now == 0 {
            return Some(format!("{interface} is gone, and {program} with it"));
        }
        if now != self.ifindex {
            return Some(format!(
                "{interface} was deleted and made again: {program} is not attached to it"
            ));
        }
        match &self.pin {
            Some(pin) if !pin.exists() => Some(format!(
                "the pinned link of {program} on {interface} ({}) was removed (overlay-agent \
                 teardown?)",
                pin.display()
            )),
            _ => None,
        }
    }
}

impl EbpfDataplane {
    /// Loads the embedded object and its programs into the kernel (verifier included), attaching
    /// nothing yet. With `pins`, maps pinned by an earlier run of the same ABI version are reused
    /// (their peers stay programmed until [`EbpfDataplane::remove_stale_peers`]), and new ones are
    /// pinned.
    pub fn load(pins: Option<Pins>) -> Result<Self, EbpfError> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&'static str, PathBuf)> = pins
            .iter()
            .flat_map(|p| ALL_MAPS.iter().map(move |m| (*m, p.map_path(m))))
            .collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|source| EbpfError::Load { source })?;
        for name in [
            programs::TC_ENCAP,
            programs::TC_DECAP,
            programs::TC_ENCAP_FINISHED,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::Program {
                    program: name,
                    source,
                })?;
        }
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|source| EbpfError::Program {
                program: programs::XDP_DECAP,
                source,
            })?;
        let mut dataplane = Self {
            ebpf,
            peers: HashMap::new(),
            pins,
            stale_peers: HashSet::new(),
            attached: Vec::new(),
        };
        let trie: LpmTrie<&mut MapData, [u8; 4], Peer> = dataplane.map_mut(PEERS_MAP)?;
        let stale = trie
            .keys()
            .map(|k| k.map(|k| Subnet::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)))
            .collect::<Result<Vec<_>, _>>()
            .map(|keys| keys.into_iter().flatten().collect::<HashSet<_>>())
            .map_err(map_err(PEERS_MAP, "listing reused peers"))?;
        if !stale.is_empty() {
            tracing::info!(
                "reusing {} peer(s) pinned by the previous run until the peer list is read",
                stale.len()
            );
        }
        dataplane.stale_peers = stale;
        Ok(dataplane)
    }

    /// Removes the peers of the previous run that the control plane did not confirm (flannel
    /// leaves such routes behind forever), and peer addresses nothing refers to any more.
    pub fn remove_stale_peers(&mut self) -> Result<usize, EbpfError> {
        let stale: Vec<Subnet> = self.stale_peers.drain().collect();
        let mut trie: LpmTrie<&mut MapData, [u8; 4], Peer> = self.map_mut(PEERS_MAP)?;
        for subnet in &stale {
            removal(
                PEERS_MAP,
                "removing a stale peer",
                trie.remove(&trie_key(*subnet)),
            )?;
        }
        let live: HashSet<[u8; 4]> = self.peers.values().map(|p| p.public_ip.octets()).collect();
        let dead = |keys: Vec<[u8; 4]>| keys.into_iter().filter(|a| !live.contains(a));
        let mut addrs: BpfHashMap<&mut MapData, [u8; 4], PeerAddr> =
            self.map_mut(PEER_ADDRS_MAP)?;
        for addr in dead(addrs.keys().filter_map(Result::ok).collect()) {
            let r = addrs.remove(&addr);
            removal(PEER_ADDRS_MAP, "removing a stale peer address", r)?;
        }
        let mut counters: PerCpuHashMap<&mut MapData, [u8; 4], PeerCounters> =
            self.map_mut(PEER_COUNTERS_MAP)?;
        for addr in dead(counters.keys().filter_map(Result::ok).collect()) {
            let r = counters.remove(&addr);
            removal(PEER_COUNTERS_MAP, "removing a stale peer's counters", r)?;
        }
        Ok(stale.len())
    }

    /// Writes this host's settings; the programs pass everything until this is called.
    /// (`OverlaySpec::program_config` builds it, the same value the TUN datapath judges by.)
    pub fn configure(&mut self, cfg: &Config) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, Config> = self.map_mut(CONFIG_MAP)?;
        map.set(0, *cfg, 0)
            .map_err(map_err(CONFIG_MAP, "writing the config"))
    }

    /// Attaches `tc_encap` to the overlay device's egress and `tc_decap` to the underlay's ingress
    /// (interfaces looked up in the calling thread's network namespace; tcx links on kernels >= 6.6,
    /// clsact before), then drops pins of other interfaces ([`Self::prune_pins`]).
    ///
    /// With pins, the links are pinned (so the programs stay attached when the agent exits), and
    /// links an earlier run pinned on the same interfaces get the new programs swapped in
    /// atomically.
    pub fn attach(
        &mut self,
        overlay_if: &str,
        underlay_if: &str,
        decap: DecapHook,
    ) -> Result<(), EbpfError> {
        self.attach_decap(underlay_if, decap)?;
        self.attach_encap(overlay_if)?;
        self.prune_pins();
        Ok(())
    }

    /// Attaches the decapsulation program to the underlay's ingress: from then on, this host's
    /// overlay traffic arriving there is this dataplane's, whatever else listens on the port.
    pub fn attach_decap(&mut self, underlay_if: &str, decap: DecapHook) -> Result<(), EbpfError> {
        let program = match decap {
            DecapHook::Tc => {
                self.attach_tc(programs::TC_DECAP, underlay_if, TcAttachType::Ingress)?;
                programs::TC_DECAP
            }
            DecapHook::Xdp(mode) => {
                self.attach_xdp(underlay_if, mode)?;
                programs::XDP_DECAP
            }
        };
        self.record(program, underlay_if);
        Ok(())
    }

    /// Attaches `tc_encap` to `overlay_if`'s egress. During a takeover two devices carry it: the
    /// handover device and, once it holds the name, the agent's own.
    pub fn attach_encap(&mut self, overlay_if: &str) -> Result<(), EbpfError> {
        self.attach_tc(programs::TC_ENCAP, overlay_if, TcAttachType::Egress)?;
        self.record(programs::TC_ENCAP, overlay_if);
        Ok(())
    }

    /// Attaches `tc_encap_finished` to the finishing device's ingress (udp: see
    /// [`crate::host::finishing`]).
    pub fn attach_finishing(&mut self, peer_if: &str) -> Result<(), EbpfError> {
        self.attach_tc(programs::TC_ENCAP_FINISHED, peer_if, TcAttachType::Ingress)?;
        self.record(programs::TC_ENCAP_FINISHED, peer_if);
        Ok(())
    }

    fn record(&mut self, program: &'static str, interface: &str) {
        let ifindex = ifindex(interface);
        // Links are pinned only where tcx makes them links (see `attach_tc`); XDP's always are.
        let pinned = program == programs::XDP_DECAP || tcx_supported();
        let pin = self
            .pins
            .as_ref()
            .filter(|_| pinned)
            .map(|p| p.link_path(program, interface));
        self.attached.push(Attachment {
            program,
            interface: interface.to_owned(),
            ifindex,
            pin,
        });
    }

    /// The interfaces carrying a program, in the order attached.
    pub fn attachments(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for a in &self.attached {
            if !seen.contains(&a.interface) {
                seen.push(a.interface.clone());
            }
        }
        seen
    }

    /// Why the programs no longer all carry traffic: a device or pinned link removed under the
    /// running agent.
    pub fn detached(&self) -> Option<String> {
        self.attached.iter().find_map(Attachment::broken)
    }

    /// Forgets the encapsulation on `overlay_if`, a device that is gone (its link went with it),
    /// and removes that link's pin.
    pub fn forget_encap(&mut self, overlay_if: &str) {
        self.attached
            .retain(|a| !(a.program == programs::TC_ENCAP && a.interface == overlay_if));
        self.prune_pins();
    }

    /// Removes pins of links on interfaces this dataplane did not attach to, and of other map
    /// versions: what an earlier run left on devices since renamed, replaced or deleted.
    pub fn prune_pins(&self) {
        if let Some(pins) = &self.pins {
            let keep: Vec<PathBuf> = self
                .attached
                .iter()
                .map(|a| pins.link_path(a.program, &a.interface))
                .collect();
            for err in pins.remove_stale(&keep) {
                tracing::warn!("removing stale pinned objects: {err}");
            }
        }
    }

    fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<(), EbpfError> {
        let site = AttachSite::new(programs::XDP_DECAP, interface, self.pins.as_ref());
        let prog = xdp_program(&mut self.ebpf)?;
        if site.swap_into_pinned(prog)? {
            return Ok(());
        }
        let id = prog.attach(interface, mode).map_err(|e| site.error(e))?;
        site.pin(prog, id)
    }

    fn attach_tc(
        &mut self,
        program: &'static str,
        interface: &str,
        attach_type: TcAttachType,
    ) -> Result<(), EbpfError> {
        let tcx = tcx_supported();
        if !tcx {
            // Legacy tc needs the clsact qdisc; it may already be there, which is fine.
            if let Err(err) = aya::programs::tc::qdisc_add_clsact(interface) {
                tracing::debug!(%interface, %err, "clsact qdisc not added (may exist already)");
            }
        }
        // netlink tc filters are not links and cannot be pinned: without tcx, attach plainly.
        let pinning = self.pins.is_some();
        let pins = if tcx { self.pins.as_ref() } else { None };
        let site = AttachSite::new(program, interface, pins);
        let prog = classifier(&mut self.ebpf, program)?;
        if site.swap_into_pinned(prog)? {
            return Ok(());
        }
        let options = if tcx {
            TcAttachOptions::TcxOrder(LinkOrder::default())
        } else {
            TcAttachOptions::Netlink(Default::default())
        };
        let id = prog
            .attach_with_options(interface, attach_type, options)
            .map_err(|e| site.error(e))?;
        if !tcx {
            if pinning {
                // Meant to outlive the process, as a pinned link would: a tc filter does, once
                // our handle (which would detach it on drop) is forgotten.
                std::mem::forget(prog.take_link(id).map_err(|e| site.error(e))?);
            }
            return Ok(());
        }
        site.pin(prog, id)
    }

    /// The config and peers in the maps (for a dataplane loaded on an earlier run's pins: what that
    /// run programmed).
    pub fn programmed(&mut self) -> Result<(Config, Vec<PeerRoute>), EbpfError> {
        let config: Array<&mut MapData, Config> = self.map_mut(CONFIG_MAP)?;
        let config = config
            .get(&0, 0)
            .map_err(map_err(CONFIG_MAP, "reading the config"))?;
        let trie: LpmTrie<&mut MapData, [u8; 4], Peer> = self.map_mut(PEERS_MAP)?;
        Ok((config, routes(&trie)?))
    }

    /// Programs a peer subnet (replacing what the subnet had).
    pub fn upsert_peer(&mut self, peer: PeerRoute) -> Result<(), EbpfError> {
        let key = peer.subnet;
        self.stale_peers.remove(&key);
        if self.peers.get(&key) == Some(&peer) {
            return Ok(());
        }
        // Address first, so decapsulation accepts the peer by the time encapsulation uses it.
        let others = self
            .peers
            .iter()
            .filter(|(k, p)| **k != key && p.public_ip == peer.public_ip)
            .count();
        self.set_peer_addr(peer.public_ip, others + 1)?;
        let mut trie: LpmTrie<&mut MapData, [u8; 4], Peer> = self.map_mut(PEERS_MAP)?;
        let value = Peer {
            public_ip: peer.public_ip.octets(),
            vtep_mac: peer.vtep_mac.0,
            flags: if peer.kernel_decap {
                PEER_KERNEL_DECAP
            } else {
                0
            },
            _pad: [0],
        };
        if let Err(e) = trie.insert(&trie_key(peer.subnet), value, 0) {
            // Undo the address: decapsulation must not accept a host with no subnet programmed.
            self.sync_peer_addr(peer.public_ip)?;
            return Err(map_err(PEERS_MAP, "inserting a peer")(e));
        }
        if let Some(old) = self.peers.insert(key, peer)
            && old.public_ip != peer.public_ip
        {
            // The subnet moved to another host: the old address may have nothing left.
            self.sync_peer_addr(old.public_ip)?;
        }
        Ok(())
    }

    /// Removes a peer subnet; unknown subnets are ignored.
    pub fn remove_peer(&mut self, subnet: Subnet) -> Result<(), EbpfError> {
        let Some(old) = self.peers.get(&subnet).copied() else {
            return Ok(());
        };
        // Trie first: nothing is sent to the peer before its packets stop being accepted.
        let mut trie: LpmTrie<&mut MapData, [u8; 4], Peer> = self.map_mut(PEERS_MAP)?;
        removal(PEERS_MAP, "removing a peer", trie.remove(&trie_key(subnet)))?;
        self.peers.remove(&subnet);
        self.sync_peer_addr(old.public_ip)
    }

    /// The peers as programmed.
    pub fn peers(&self) -> impl Iterator<Item = &PeerRoute> {
        self.peers.values()
    }

    /// Makes `PEER_ADDRS` hold `addr` exactly while some programmed subnet lives there.
    fn sync_peer_addr(&mut self, addr: Ipv4Addr) -> Result<(), EbpfError> {
        let subnets = self.peers.values().filter(|p| p.public_ip == addr).count();
        self.set_peer_addr(addr, subnets)
    }

    /// Sets the address's subnet count, and gives it counters while it has subnets. The
    /// counters are made before the address is accepted, and removed after it no longer is, so
    /// every packet of a peer finds them; an entry an earlier run left keeps its counts.
    fn set_peer_addr(&mut self, addr: Ipv4Addr, subnets: usize) -> Result<(), EbpfError> {
        if subnets == 0 {
            let mut map: BpfHashMap<&mut MapData, [u8; 4], PeerAddr> =
                self.map_mut(PEER_ADDRS_MAP)?;
            let r = map.remove(&addr.octets());
            removal(PEER_ADDRS_MAP, "removing a peer address", r)?;
            let mut counters: PerCpuHashMap<&mut MapData, [u8; 4], PeerCounters> =
                self.map_mut(PEER_COUNTERS_MAP)?;
            let r = counters.remove(&addr.octets());
            return removal(PEER_COUNTERS_MAP, "removing a peer's counters", r);
        }
        let mut counters: PerCpuHashMap<&mut MapData, [u8; 4], PeerCounters> =
            self.map_mut(PEER_COUNTERS_MAP)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| EbpfError::Cpus { source })?;
        let zero = PerCpuValues::try_from(vec![PeerCounters::default(); cpus])
            .map_err(|source| EbpfError::Cpus { source })?;
        // Counters first: a host the programs accept always has counters to charge. Kept when
        // there (EEXIST), so a restarted agent's counts go on from the pinned ones.
        let created = match counters.insert(addr.octets(), zero, BPF_NOEXIST) {
            Ok(()) => true,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                false
            }
            Err(e) => return Err(map_err(PEER_COUNTERS_MAP, "creating a peer's counters")(e)),
        };
        let mut map: BpfHashMap<&mut MapData, [u8; 4], PeerAddr> = self.map_mut(PEER_ADDRS_MAP)?;
        let value = PeerAddr {
            subnets: subnets as u32,
        };
        let result = map
            .insert(addr.octets(), value, 0)
            .map_err(map_err(PEER_ADDRS_MAP, "inserting a peer address"));
        if result.is_err() && created {
            // Nothing half-applied: the host is not a peer, so it has no counters either.
            let mut counters: PerCpuHashMap<&mut MapData, [u8; 4], PeerCounters> =
                self.map_mut(PEER_COUNTERS_MAP)?;
            if let Err(e) = counters.remove(&addr.octets()) {
                tracing::warn!("removing the counters of {addr}, which is not a peer: {e}");
            }
        }
        result
    }

    /// Takes the local endpoints map out, for the endpoint learner that owns it from then on.
    pub fn take_endpoints(&mut self) -> Result<EndpointsMap, EbpfError> {
        let map = self
            .ebpf
            .take_map(ENDPOINTS_MAP)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: ENDPOINTS_MAP,
            })?;
        Ok(EndpointsMap {
            map: BpfHashMap::try_from(map).map_err(map_err(ENDPOINTS_MAP, "opening"))?,
        })
    }

    /// Reads the counters, summed over CPUs, one per [`CounterSlot`].
    pub fn counters(&self) -> Result<Vec<(CounterSlot, Counter)>, EbpfError> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or(EbpfError::Missing {
            kind: "map",
            name: COUNTERS_MAP,
        })?;
        let counters: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).map_err(map_err(COUNTERS_MAP, "opening"))?;
        summed(&counters)
    }

    /// Reads every peer host's counters, summed over CPUs.
    pub fn peer_counters(&self) -> Result<Vec<(Ipv4Addr, PeerCounters)>, EbpfError> {
        let map = self.ebpf.map(PEER_COUNTERS_MAP).ok_or(EbpfError::Missing {
            kind: "map",
            name: PEER_COUNTERS_MAP,
        })?;
        peer_totals(&PerCpuHashMap::try_from(map).map_err(map_err(PEER_COUNTERS_MAP, "opening"))?)
    }

    /// Runs one of the programs on a crafted packet (starting with its Ethernet header) with
    /// `BPF_PROG_TEST_RUN`, without attaching it anywhere: for tests and diagnostics. Returns the
    /// verdict and the packet as the program left it. Counters move as for real traffic.
    pub fn test_run(
        &mut self,
        program: &'static str,
        packet: &[u8],
    ) -> Result<(i32, Vec<u8>), EbpfError> {
        use aya::programs::{TestRun as _, TestRunOptions};
        // Room for the largest growth any program makes (the vxlan headers).
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        };
        let result = if program == programs::XDP_DECAP {
            xdp_program(&mut self.ebpf)?.test_run(opts)
        } else {
            classifier(&mut self.ebpf, program)?.test_run(opts)
        }
        .map_err(|source| EbpfError::Program { program, source })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value as i32, out))
    }

    fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, EbpfError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(EbpfError::Missing { kind: "map", name })?;
        M::try_from(map).map_err(map_err(name, "opening"))
    }
}

/// Every slot of the counters map, summed over the CPUs.
fn summed<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
) -> Result<Vec<(CounterSlot, Counter)>, EbpfError> {
    CounterSlot::ALL
        .iter()
        .map(|&slot| {
            let per_cpu = counters
                .get(&slot.index(), 0)
                .map_err(map_err(COUNTERS_MAP, "reading"))?;
            let total = per_cpu.iter().fold(Counter::default(), |a, b| a.merged(*b));
            Ok((slot, total))
        })
        .collect()
}

/// Every endpoint, in address order.
fn endpoint_entries<T: std::borrow::Borrow<MapData>>(
    map: &BpfHashMap<T, [u8; 4], Endpoint>,
) -> Result<Vec<(Ipv4Addr, Endpoint)>, EbpfError> {
    let mut out = map
        .iter()
        .map(|r| r.map(|(ip, ep)| (Ipv4Addr::from(ip), ep)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(ENDPOINTS_MAP, "listing endpoints"))?;
    out.sort_by_key(|(a, _)| *a);
    Ok(out)
}

/// A removal's result, a key already gone counting as removed.
fn removal(
    map: &'static str,
    operation: &'static str,
    result: Result<(), aya::maps::MapError>,
) -> Result<(), EbpfError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(EbpfError::Map {
            map,
            operation,
            source,
        }),
    }
}

/// Every peer host's counters, summed over the CPUs, in address order.
fn peer_totals<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuHashMap<T, [u8; 4], PeerCounters>,
) -> Result<Vec<(Ipv4Addr, PeerCounters)>, EbpfError> {
    let mut out = map
        .iter()
        .map(|r| {
            r.map(|(addr, per_cpu)| {
                let total = per_cpu
                    .iter()
                    .fold(PeerCounters::default(), |a, b| a.merged(*b));
                (Ipv4Addr::from(addr), total)
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(PEER_COUNTERS_MAP, "listing"))?;
    out.sort_by_key(|(a, _)| *a);
    Ok(out)
}

/// Every PEERS entry as the route it was programmed from.
fn routes<T: std::borrow::Borrow<MapData>>(
    trie: &LpmTrie<T, [u8; 4], Peer>,
) -> Result<Vec<PeerRoute>, EbpfError> {
    let entries = trie
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(PEERS_MAP, "listing peers"))?;
    Ok(entries
        .into_iter()
        .filter_map(|(key, peer)| {
            Some(PeerRoute {
                subnet: Subnet::new(Ipv4Addr::from(key.data()), key.prefix_len() as u8)?,
                public_ip: Ipv4Addr::from(peer.public_ip),
                vtep_mac: Mac(peer.vtep_mac),
                kernel_decap: peer.flags & PEER_KERNEL_DECAP != 0,
            })
        })
        .collect())
}

fn map_err(
    map: &'static str,
    operation: &'static str,
) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| {
        // The kernel says "full" as E2BIG for hash maps and ENOSPC for LPM tries.
        if let aya::maps::MapError::SyscallError(e) = &source
            && matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC))
        {
            return EbpfError::Full {
                map,
                operation,
                capacity: if map == ENDPOINTS_MAP {
                    MAX_ENDPOINTS
                } else {
                    MAX_PEERS
                },
            };
        }
        EbpfError::Map {
            map,
            operation,
            source,
        }
    }
}

/// aya attaches through tcx links from 6.6 on and through netlink (which needs clsact) before.
fn tcx_supported() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// A program kind whose links can be pinned and taken over: tcx classifiers and XDP.
trait LinkedProgram {
    type Link: TryFrom<FdLink, Error = aya::programs::links::LinkError> + TryInto<FdLink>;
    type LinkId;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::LinkId, ProgramError>;
    fn take_link(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError>;
}

impl LinkedProgram for SchedClassifier {
    type Link = SchedClassifierLink;
    type LinkId = aya::programs::tc::SchedClassifierLinkId;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::LinkId, ProgramError> {
        SchedClassifier::attach_to_link(self, link)
    }
    fn take_link(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError> {
        SchedClassifier::take_link(self, id)
    }
}

impl LinkedProgram for Xdp {
    type Link = XdpLink;
    type LinkId = aya::programs::xdp::XdpLinkId;
    fn attach_to_link(&mut self, link: Self::Link) -> Result<Self::LinkId, ProgramError> {
        Xdp::attach_to_link(self, link)
    }
    fn take_link(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError> {
        Xdp::take_link(self, id)
    }
}

/// One program on one interface, and where its link is pinned (None: not pinned).
struct AttachSite<'a> {
    program: &'static str,
    interface: &'a str,
    pin: Option<PathBuf>,
}

impl<'a> AttachSite<'a> {
    fn new(program: &'static str, interface: &'a str, pins: Option<&Pins>) -> Self {
        Self {
            program,
            interface,
            pin: pins.map(|p| p.link_path(program, interface)),
        }
    }

    fn error(&self, source: ProgramError) -> EbpfError {
        EbpfError::Attach {
            program: self.program,
            interface: self.interface.to_owned(),
            source,
        }
    }

    /// Swaps `prog` into the link an earlier run pinned here, atomically; false when there is no
    /// usable one (then a stale pin is removed).
    fn swap_into_pinned<P: LinkedProgram>(&self, prog: &mut P) -> Result<bool, EbpfError> {
        let Some(path) = &self.pin else {
            return Ok(false);
        };
        let Ok(old) = PinnedLink::from_pin(path) else {
            return Ok(false);
        };
        let swapped = P::Link::try_from(FdLink::from(old))
            .map_err(|e| e.to_string())
            .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()));
        match swapped {
            Ok(id) => {
                // The pin holds the link; our handle may go.
                drop(prog.take_link(id).map_err(|e| self.error(e))?);
                tracing::info!(
                    interface = %self.interface,
                    "{}: replaced the program in the pinned link",
                    self.program
                );
                Ok(true)
            }
            Err(reason) => {
                // Typically the interface was recreated and the old link is defunct.
                tracing::info!(
                    interface = %self.interface,
                    "{}: pinned link unusable ({reason}); attaching anew",
                    self.program
                );
                let _ = std::fs::remove_file(path);
                Ok(false)
            }
        }
    }

    /// Pins the link just made (when pinning), so it outlives the process.
    fn pin<P: LinkedProgram>(&self, prog: &mut P, id: P::LinkId) -> Result<(), EbpfError> {
        let Some(path) = &self.pin else {
            return Ok(());
        };
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| self.error(e))?
            .try_into()
            .map_err(|_| {
                self.error(ProgramError::IOError(std::io::Error::other(
                    "the link is not an fd link",
                )))
            })?;
        link.pin(path).map_err(|source| EbpfError::Pin {
            program: self.program,
            path: path.clone(),
            source,
        })?;
        Ok(())
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, EbpfError> {
    let name = programs::XDP_DECAP;
    let program = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    program.try_into().map_err(|source| EbpfError::Program {
        program: name,
        source,
    })
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, EbpfError> {
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

/// The LPM trie key of `subnet`.
fn trie_key(subnet: Subnet) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix()), subnet.addr().octets())
}
