//! flanneld stand-ins: what a running flanneld (v0.20) puts on a host and in etcd, per backend, so
//! mixed clusters and migrations are tested against flanneld's behaviour rather than ours.
//!
//! - The lease is written byte for byte as flanneld writes it (no `BackendType` for udp; vxlan's
//!   `BackendData` with the device's own random MAC), on an etcd lease of 24 h, and the subnet
//!   file as flanneld writes it.
//! - udp: a non-persistent TUN `flannel0` (it goes when the stand-in stops, as flanneld's does),
//!   holding the lease address as /32 with an explicit route for the Network, and a per-packet
//!   userspace proxy ([`UdpProxy`], one `read` + one `sendto` per packet, as flannel's C proxy) on a
//!   socket bound to the public address, port 8285.
//! - vxlan: the kernel device `flannel.1` (`nolearning`, port 8472, a kernel-chosen MAC) holding the
//!   lease address as /32, and per peer a permanent neighbour, an FDB entry and an onlink route.
//!   The device and its entries stay when the stand-in stops, as flanneld leaves them.
//! - Peers come from etcd: read at start and re-read while it runs (a thread polls), so a peer
//!   whose VtepMAC changes is followed as flanneld's watch follows it.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    cluster::{EtcdCtl, NsEtcd},
    lab::UNDERLAY_IF,
    netns::{NetNs, NetNsError},
};

/// flannel's udp backend port.
pub const UDP_PORT: u16 = 8285;
/// The TUN device name flannel's udp backend uses.
pub const TUN_NAME: &str = "flannel0";
/// flannel's vxlan device for VNI 1.
pub const VXLAN_NAME: &str = "flannel.1";

/// Errors of a stand-in.
#[derive(Debug, thiserror::Error)]
pub enum FlanneldError {
    /// A namespace command failed.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// etcd answered something a stand-in cannot use.
    #[error("etcd: {0}")]
    Etcd(String),
    /// The kernel reported a device without what flanneld reads from it.
    #[error("{0}")]
    Device(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FlanneldError {
    let what = what.into();
    move |source| FlanneldError::Io { what, source }
}

/// The backend a stand-in runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// flannel's udp backend (the article's).
    Udp,
    /// flannel's vxlan backend, VNI 1.
    Vxlan,
}

impl Backend {
    /// The overlay MTU on a 1500-byte underlay, as flanneld computes it.
    pub fn mtu(self, underlay_mtu: u32) -> u32 {
        match self {
            Backend::Udp => underlay_mtu - 28,
            Backend::Vxlan => underlay_mtu - 50,
        }
    }

    /// The overlay device's name.
    pub fn device(self) -> &'static str {
        match self {
            Backend::Udp => TUN_NAME,
            Backend::Vxlan => VXLAN_NAME,
        }
    }
}

/// One host's lease as a stand-in publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLease {
    /// The subnet's network address.
    pub subnet: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// `PublicIP`.
    pub public_ip: Ipv4Addr,
    /// `BackendData.VtepMAC`, for vxlan leases.
    pub vtep_mac: Option<String>,
}

/// The exact value flanneld v0.20 writes for a lease (`vtep_mac`: vxlan's device MAC; `None`: udp).
pub fn lease_value(public_ip: Ipv4Addr, vtep_mac: Option<&str>) -> String {
    match vtep_mac {
        None => format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null}}"#),
        Some(mac) => format!(
            r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        ),
    }
}

/// Every lease under `prefix` (`/flannel`), from etcd.
pub fn leases(etcd: &EtcdCtl, prefix: &str) -> Result<Vec<PeerLease>, FlanneldError> {
    let out = etcd.run(&["get", "--prefix", &format!("{prefix}/subnets/")])?;
    let lines: Vec<&str> = out.lines().collect();
    let mut leases = Vec::new();
    for pair in lines.chunks(2) {
        let [key, value] = pair else {
            return Err(FlanneldError::Etcd(format!("odd etcdctl output: {out}")));
        };
        let Some((addr, len)) = key
            .rsplit('/')
            .next()
            .and_then(|k| k.split_once('-'))
            .and_then(|(a, l)| Some((a.parse().ok()?, l.parse().ok()?)))
        else {
            continue;
        };
        let json: serde_json::Value = serde_json::from_str(value)
            .map_err(|e| FlanneldError::Etcd(format!("{key}: {e}: {value}")))?;
        let Some(public_ip) = json["PublicIP"].as_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        leases.push(PeerLease {
            subnet: addr,
            prefix_len: len,
            public_ip,
            vtep_mac: json["BackendData"]["VtepMAC"].as_str().map(str::to_owned),
        });
    }
    Ok(leases)
}

/// A flanneld stand-in on one host. Dropping it stops it, as SIGTERM stops flanneld: the udp
/// proxy and its `flannel0` go; the vxlan device stays.
pub struct Flanneld {
    ns_name: String,
    backend: Backend,
    /// The proxy's routes (udp), shared with the proxy thread.
    routes: Arc<Mutex<Vec<Route>>>,
    proxy: Option<UdpProxy>,
    poller: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// This host's lease.
    pub lease: PeerLease,
}

impl std::fmt::Debug for Flanneld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flanneld")
            .field("ns", &self.ns_name)
            .field("backend", &self.backend)
            .field("lease", &self.lease)
            .finish()
    }
}

/// What a stand-in needs to know about its host.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// The host's namespace name.
    pub ns: String,
    /// Its underlay (public) address.
    pub public_ip: Ipv4Addr,
    /// The subnet it leases (a /24 of `network`).
    pub subnet: Ipv4Addr,
    /// The Network.
    pub network: (Ipv4Addr, u8),
    /// The underlay MTU.
    pub underlay_mtu: u32,
    /// Where flanneld writes its subnet file.
    pub subnet_file: PathBuf,
    /// The etcd prefix (`/flannel`).
    pub prefix: String,
}

impl Flanneld {
    /// Starts a stand-in the way flanneld starts: the device first (vxlan: flanneld keeps a
    /// compatible `flannel.1` and its MAC, and replaces anything else of that name), the lease
    /// (written even when the same value is there, as flanneld re-acquires), the subnet file,
    /// then forwarding to the peers etcd lists, which a thread keeps following.
    pub fn start(
        host: &HostSpec,
        ns: &NetNs,
        etcd: &NsEtcd,
        backend: Backend,
    ) -> Result<Self, FlanneldError> {
        let mtu = backend.mtu(host.underlay_mtu);
        let routes = Arc::new(Mutex::new(Vec::new()));
        let mut lease = PeerLease {
            subnet: host.subnet,
            prefix_len: 24,
            public_ip: host.public_ip,
            vtep_mac: None,
        };
        // flanneld's order: udp acquires the lease, then opens and configures flannel0, then its
        // socket; vxlan needs the device's MAC for its lease, so the device comes first.
        let proxy = match backend {
            Backend::Udp => {
                write_lease(etcd, &host.prefix, &lease)?;
                let proxy = UdpProxy::start(ns, host.public_ip, routes.clone(), mtu as usize)?;
                ns.ip(&[
                    "addr",
                    "add",
                    &format!("{}/32", host.subnet),
                    "dev",
                    TUN_NAME,
                ])?;
                ns.ip(&["link", "set", TUN_NAME, "mtu", &mtu.to_string(), "up"])?;
                let network = format!("{}/{}", host.network.0, host.network.1);
                match ns.ip(&["route", "add", &network, "dev", TUN_NAME]) {
                    // flanneld ignores EEXIST here ("there might be a route for a subnet
                    // already").
                    Err(NetNsError::Failed { stderr, .. }) if stderr.contains("File exists") => {}
                    other => {
                        other?;
                    }
                }
                Some(proxy)
            }
            Backend::Vxlan => {
                lease.vtep_mac = Some(vxlan_device(ns, host.public_ip, host.subnet, mtu)?);
                write_lease(etcd, &host.prefix, &lease)?;
                None
            }
        };
        let env = format!(
            "FLANNEL_NETWORK={}/{}\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
            host.network.0,
            host.network.1,
            Ipv4Addr::from(u32::from(host.subnet) + 1),
        );
        if let Some(dir) = host.subnet_file.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        std::fs::write(&host.subnet_file, env)
            .map_err(io(format!("writing {}", host.subnet_file.display())))?;
        let mut me = Self {
            ns_name: host.ns.clone(),
            backend,
            routes,
            proxy,
            poller: None,
            lease,
        };
        me.follow_peers(etcd, &host.prefix)?;
        Ok(me)
    }

    /// Applies the peers etcd lists now, then keeps doing so from a thread.
    fn follow_peers(&mut self, etcd: &NsEtcd, prefix: &str) -> Result<(), FlanneldError> {
        let mut applied = Vec::new();
        let own = self.lease.clone();
        let backend = self.backend;
        let ns_name = self.ns_name.clone();
        let routes = self.routes.clone();
        sync_peers(
            &ns_name,
            backend,
            &own,
            &leases(&etcd.ctl(), prefix)?,
            &routes,
            &mut applied,
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let etcd = etcd.ctl();
        let prefix = prefix.to_owned();
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(now) = leases(&etcd, &prefix) {
                    // A failed command is tried again on the next round, as a watch would retry.
                    let _ = sync_peers(&ns_name, backend, &own, &now, &routes, &mut applied);
                }
            }
        });
        self.poller = Some((stop, thread));
        Ok(())
    }

    /// Stops it as SIGTERM stops flanneld: the udp proxy closes `flannel0` (which the kernel then
    /// deletes, with its address and routes) and its socket; vxlan leaves everything in place.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some((stop, thread)) = self.poller.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        self.proxy = None;
    }
}

impl Drop for Flanneld {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Puts `lease` on a new 24 h etcd lease, with flanneld's bytes.
fn write_lease(etcd: &NsEtcd, prefix: &str, lease: &PeerLease) -> Result<(), FlanneldError> {
    let granted = etcd.etcdctl(&["lease", "grant", "86400"])?;
    // "lease 694d7a2b1c3e5f01 granted with TTL(86400s)"
    let id = granted
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| FlanneldError::Etcd(format!("lease grant said {granted:?}")))?;
    let key = format!("{prefix}/subnets/{}-{}", lease.subnet, lease.prefix_len);
    let value = lease_value(lease.public_ip, lease.vtep_mac.as_deref());
    etcd.etcdctl(&["put", &format!("--lease={id}"), "--", &key, &value])?;
    Ok(())
}

/// flanneld's vxlan device: kept when one of the right kind is there (with its MAC), created
/// otherwise (replacing whatever held the name). Returns its MAC, the lease's VtepMAC.
pub fn vxlan_device(
    ns: &NetNs,
    local: Ipv4Addr,
    subnet: Ipv4Addr,
    mtu: u32,
) -> Result<String, FlanneldError> {
    let details = ns
        .ip(&["-d", "link", "show", VXLAN_NAME])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // flanneld keeps a device its vxlanLinksIncompat finds compatible: same VNI, local address,
    // underlay device and port (the MAC is not compared, and stays).
    let compatible = [
        "vxlan id 1 ",
        &format!("local {local} "),
        &format!("dev {UNDERLAY_IF} "),
        "dstport 8472 ",
    ]
    .iter()
    .all(|want| details.contains(want));
    if !compatible {
        if !details.is_empty() {
            ns.ip(&["link", "del", VXLAN_NAME])?;
        }
        ns.ip(&[
            "link",
            "add",
            VXLAN_NAME,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local.to_string(),
            "dev",
            UNDERLAY_IF,
            "dstport",
            "8472",
            "nolearning",
        ])?;
    }
    ns.ip(&["link", "set", VXLAN_NAME, "mtu", &mtu.to_string(), "up"])?;
    ns.ip(&[
        "addr",
        "replace",
        &format!("{subnet}/32"),
        "dev",
        VXLAN_NAME,
    ])?;
    let link = ns.ip(&["-o", "link", "show", VXLAN_NAME])?;
    let link = String::from_utf8_lossy(&link.stdout);
    link.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| FlanneldError::Device(format!("no MAC in: {link}")))
}

/// Brings forwarding in line with `now`: every other lease becomes a proxy route (udp) or a
/// neighbour, FDB entry and route (vxlan). `applied` is what the last call applied.
fn sync_peers(
    ns_name: &str,
    backend: Backend,
    own: &PeerLease,
    now: &[PeerLease],
    routes: &Mutex<Vec<Route>>,
    applied: &mut Vec<PeerLease>,
) -> Result<(), FlanneldError> {
    let peers: Vec<PeerLease> = now
        .iter()
        .filter(|l| l.subnet != own.subnet && l.public_ip != own.public_ip)
        .cloned()
        .collect();
    if &peers == applied {
        return Ok(());
    }
    match backend {
        Backend::Udp => {
            *routes.lock().unwrap_or_else(|e| e.into_inner()) = peers
                .iter()
                .map(|p| Route {
                    subnet: p.subnet,
                    prefix_len: p.prefix_len,
                    next_hop: SocketAddrV4::new(p.public_ip, UDP_PORT),
                })
                .collect();
        }
        Backend::Vxlan => {
            let ns = NetNs::attach(ns_name);
            for p in peers.iter().filter(|p| !applied.contains(p)) {
                let Some(mac) = &p.vtep_mac else { continue };
                vxlan_peer(&ns, p, mac)?;
            }
        }
    }
    *applied = peers;
    Ok(())
}

/// What flanneld's vxlan backend adds for one peer.
pub fn vxlan_peer(ns: &NetNs, peer: &PeerLease, mac: &str) -> Result<(), FlanneldError> {
    let gw = peer.subnet.to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &gw,
        "lladdr",
        mac,
        "dev",
        VXLAN_NAME,
        "nud",
        "permanent",
    ])?;
    ns.exec(
        "bridge",
        &[
            "fdb",
            "replace",
            mac,
            "dev",
            VXLAN_NAME,
            "dst",
            &peer.public_ip.to_string(),
            "self",
            "permanent",
        ],
    )?;
    ns.ip(&[
        "route",
        "replace",
        &format!("{}/{}", peer.subnet, peer.prefix_len),
        "via",
        &gw,
        "dev",
        VXLAN_NAME,
        "onlink",
    ])?;
    Ok(())
}

/// One peer subnet and the host that holds it.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The subnet's network address.
    pub subnet: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
    /// The peer's public address and port.
    pub next_hop: SocketAddrV4,
}

/// What flannel's udp backend does in its C proxy (`backend/udp/proxy_amd64.c`), rebuilt: a TUN
/// device `flannel0` (no packet info header, not persistent), one UDP socket on port 8285 bound
/// to the public address, the inner IPv4 packet as the whole UDP payload, one thread, both fds
/// non-blocking behind `poll`, and per packet exactly one read and one write syscall. The TTL is
/// decremented with the RFC 1624 checksum patch, and the next hop comes from a linear scan of the
/// route table, as in flannel. Stopped (and its TUN device gone) on drop.
#[derive(Debug)]
pub struct UdpProxy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl UdpProxy {
    /// Starts the proxy inside `ns`: creates `flannel0` and binds `bind`:8285 there. The caller
    /// configures the device's address, MTU and routes (as flanneld does after creating it).
    pub fn start(
        ns: &NetNs,
        bind: Ipv4Addr,
        routes: Arc<Mutex<Vec<Route>>>,
        mtu: usize,
    ) -> Result<Self, FlanneldError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), FlanneldError>>();
        let ns_name = ns.name().to_owned();
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("udp-proxy {ns_name}"))
            .spawn(move || {
                let setup = (|| -> Result<(OwnedFd, UdpSocket), FlanneldError> {
                    // The thread lives in the namespace for its whole life.
                    NetNs::attach(&ns_name).enter_current_thread()?;
                    let tun = open_tun(TUN_NAME)?;
                    let sock = UdpSocket::bind((bind, UDP_PORT))
                        .map_err(io(format!("binding {bind}:{UDP_PORT}")))?;
                    sock.set_nonblocking(true)
                        .map_err(io("a non-blocking socket"))?;
                    Ok((tun, sock))
                })();
                match setup {
                    Ok((tun, sock)) => {
                        let _ = ready_tx.send(Ok(()));
                        run(&tun, &sock, &routes, mtu, &stop_flag);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            })
            .map_err(io("spawning the udp proxy thread"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                stop,
                thread: Some(thread),
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            Err(_) => Err(FlanneldError::Io {
                what: "starting the udp proxy".into(),
                source: std::io::Error::other("its thread died"),
            }),
        }
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_tun(name: &str) -> Result<OwnedFd, FlanneldError> {
    // SAFETY: open with a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io("opening /dev/net/tun")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io(format!("TUNSETIFF {name}"))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// flannel's main loop: poll, then alternate one TUN read and one socket read while either moves
/// data (skipping poll while busy, as flannel does).
fn run(tun: &OwnedFd, sock: &UdpSocket, routes: &Mutex<Vec<Route>>, mtu: usize, stop: &AtomicBool) {
    let mut buf = vec![0u8; mtu];
    let mut fds = [
        libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    while !stop.load(Ordering::Relaxed) {
        // A timeout only so the stop flag is seen; flannel blocks forever and uses a ctl socket.
        // SAFETY: fds is a valid array of two pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if n <= 0 {
            continue;
        }
        loop {
            let mut activity = tun_to_udp(tun, sock, routes, &mut buf);
            activity |= udp_to_tun(sock, tun, &mut buf);
            if !activity || stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

fn tun_to_udp(tun: &OwnedFd, sock: &UdpSocket, routes: &Mutex<Vec<Route>>, buf: &mut [u8]) -> bool {
    // SAFETY: reading into a buffer of buf.len() bytes.
    let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 20 {
        return n >= 0;
    }
    let pkt = &mut buf[..n as usize];
    let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
    // flannel's table is swapped under a lock too (its ctl socket); uncontended here.
    let next_hop = routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|r| overlay_common::net::in_subnet(dst.octets(), r.subnet.octets(), r.prefix_len))
        .map(|r| r.next_hop);
    let Some(next_hop) = next_hop else {
        // flannel answers with ICMP net unreachable; no test sends such packets.
        return true;
    };
    if decrement_ttl(pkt) {
        let _ = sock.send_to(pkt, next_hop);
    }
    true
}

fn udp_to_tun(sock: &UdpSocket, tun: &OwnedFd, buf: &mut [u8]) -> bool {
    let Ok((n, _from)) = sock.recv_from(buf) else {
        return false;
    };
    let pkt = &mut buf[..n];
    if n >= 20 && decrement_ttl(pkt) {
        // SAFETY: writing n initialised bytes.
        unsafe { libc::write(tun.as_raw_fd(), pkt.as_ptr().cast(), n) };
    }
    true
}

/// Decrements the TTL and patches the header checksum (RFC 1624), as flannel's proxy does.
/// Returns false when the packet must be dropped.
fn decrement_ttl(pkt: &mut [u8]) -> bool {
    if pkt[8] <= 1 {
        return false;
    }
    pkt[8] -= 1;
    let sum = u32::from(u16::from_be_bytes([pkt[10], pkt[11]])) + 0x100;
    let sum = (sum & 0xffff) + (sum >> 16);
    pkt[10..12].copy_from_slice(&(sum as u16).to_be_bytes());
    true
}

/// The subnet file path of host `index` (0-based) under `dir`, where the cluster's agents keep
/// theirs too: the agent that takes over reads flanneld's.
pub fn subnet_file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("h{}", index + 1)).join("subnet.env")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum(h: &[u8]) -> u16 {
        let mut sum = 0u32;
        for w in h.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 64, 255] {
            let mut h = [
                0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, ttl, 1, 0, 0, 172, 16, 1, 2, 172, 16, 2, 2,
            ];
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            assert!(decrement_ttl(&mut h));
            assert_eq!(h[8], ttl - 1);
            assert_eq!(checksum(&h), 0, "ttl {ttl}");
        }
        let mut h = [0u8; 20];
        h[8] = 1;
        assert!(!decrement_ttl(&mut h));
    }

    #[test]
    fn lease_values_are_flanneld_bytes() {
        let ip = Ipv4Addr::new(192, 168, 100, 4);
        assert_eq!(
            lease_value(ip, None),
            r#"{"PublicIP":"192.168.100.4","PublicIPv6":null}"#
        );
        assert_eq!(
            lease_value(ip, Some("c6:d2:32:6f:8f:44")),
            r#"{"PublicIP":"192.168.100.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
    }
}
