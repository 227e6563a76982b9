//! A small typed netlink API: the few link, address and route operations the agent needs, hiding
//! rtnetlink's message builders.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoTun, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage},
        neighbour::{
            NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
        },
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
};

/// Errors of netlink operations.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket: {source}")]
    Connect {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No interface has this name.
    #[error("no interface named {name}")]
    NoSuchLink {
        /// The name looked up.
        name: String,
    },
    /// The kernel's route lookup gave no output interface (an unreachable, blackhole or local
    /// destination).
    #[error("no route with an output interface to {dst}")]
    NoRoute {
        /// The destination looked up.
        dst: Ipv4Addr,
    },
    /// The kernel refused a request.
    #[error("{operation}: {source}")]
    Request {
        /// What was asked, for the log.
        operation: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
}

/// The error of a refused request, `operation` saying what was asked.
fn request(operation: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let operation = operation.into();
    move |source| NetlinkError::Request { operation, source }
}

/// What the agent needs to know about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Hardware address (empty for L3 devices such as TUN).
    pub mac: Vec<u8>,
    /// The link kind (`tun`, `vxlan`, `veth`, ...), when the kernel reports one.
    pub kind: Option<String>,
    /// For a TUN device: whether it persists without a process holding it (`IFLA_TUN_PERSIST`).
    /// Read over netlink, so it is the calling thread's namespace's, whatever sysfs shows.
    pub tun_persist: Option<bool>,
}

/// A neighbour (ARP) entry: an IPv4 address resolved to a MAC on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv4Neighbour {
    /// The interface it was resolved on.
    pub ifindex: u32,
    /// The address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Set by hand (`nud permanent`): the kernel never re-resolves it.
    pub permanent: bool,
}

/// A MAC a bridge learned behind one of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// The bridge.
    pub bridge: u32,
    /// The port the MAC is behind.
    pub port: u32,
    /// The MAC.
    pub mac: [u8; 6],
}

/// A netlink connection in the calling thread's network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens the connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetlinkError::Connect { source })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// Wraps a handle whose connection already runs.
    pub fn from_handle(handle: Handle) -> Self {
        Self { handle }
    }

    /// Looks an interface up by name.
    pub async fn link(&self, name: &str) -> Result<LinkInfo, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(link_info(&msg)),
            Ok(None) => Err(NetlinkError::NoSuchLink { name: name.into() }),
            // The kernel answers ENODEV for an unknown name.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                Err(NetlinkError::NoSuchLink { name: name.into() })
            }
            Err(source) => Err(NetlinkError::Request {
                operation: format!("looking up {name}"),
                source,
            }),
        }
    }

    /// Every interface of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| link_info(&m))
            .try_collect()
            .await
            .map_err(request("listing interfaces"))
    }

    /// Looks an interface up by index.
    pub async fn link_by_index(&self, index: u32) -> Result<LinkInfo, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(link_info(&msg)),
            Ok(None) => Err(NetlinkError::NoSuchLink {
                name: format!("#{index}"),
            }),
            Err(source) => Err(NetlinkError::Request {
                operation: format!("looking up interface {index}"),
                source,
            }),
        }
    }

    /// Opens a connection that also receives link, neighbour and IPv4 address change events: the
    /// receiver yields one item per event (its content is not interpreted).
    pub fn connect_monitor()
    -> Result<(Self, futures::channel::mpsc::UnboundedReceiver<impl Sized>), NetlinkError> {
        let (connection, handle, events) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Ifaddr,
        ])
        .map_err(|source| NetlinkError::Connect { source })?;
        tokio::spawn(connection);
        Ok((Self { handle }, events))
    }

    /// The index of the interface holding `addr`, if any.
    pub async fn link_with_ipv4(&self, addr: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(request("listing addresses"))?
        {
            if msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr))
            {
                return Ok(Some(msg.header.index));
            }
        }
        Ok(None)
    }

    /// Indexes of all veth interfaces.
    pub async fn veth_indexes(&self) -> Result<Vec<u32>, NetlinkError> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = links.try_next().await.map_err(request("listing links"))? {
            let is_veth = msg.attributes.iter().any(|a| match a {
                LinkAttribute::LinkInfo(infos) => infos
                    .iter()
                    .any(|i| matches!(i, NlLinkInfo::Kind(InfoKind::Veth))),
                _ => false,
            });
            if is_veth {
                out.push(msg.header.index);
            }
        }
        Ok(out)
    }

    /// Resolved IPv4 neighbours (ARP entries in a usable state) on `ifindex`.
    pub async fn ipv4_neighbours(&self, ifindex: u32) -> Result<Vec<Ipv4Neighbour>, NetlinkError> {
        let msgs = self.neighbours(AddressFamily::Inet).await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == ifindex && usable(m.header.state))
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = None;
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = l.as_slice().try_into().ok()
                        }
                        _ => {}
                    }
                }
                Some(Ipv4Neighbour {
                    ifindex,
                    ip: ip?,
                    mac: mac?,
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }

    /// `ip neigh del <ip> dev <ifindex>`; an entry already gone is not an error.
    pub async fn delete_neighbour(&self, ifindex: u32, ip: Ipv4Addr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(msg).execute().await {
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENOENT => Ok(()),
            other => other.map_err(request(format!(
                "deleting the neighbour {ip} on interface {ifindex}"
            ))),
        }
    }

    /// MACs the bridge `bridge` learned behind its ports (its own ports' addresses excluded).
    pub async fn bridge_fdb(&self, bridge: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let msgs = self.neighbours(AddressFamily::Bridge).await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.state != NeighbourState::Permanent)
            .filter_map(|m| {
                let mut master = None;
                let mut mac = None;
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::Controller(c) => master = Some(*c),
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = l.as_slice().try_into().ok()
                        }
                        _ => {}
                    }
                }
                (master? == bridge).then_some(FdbEntry {
                    bridge,
                    port: m.header.ifindex,
                    mac: mac?,
                })
            })
            .collect())
    }

    async fn neighbours(
        &self,
        family: AddressFamily,
    ) -> Result<Vec<NeighbourMessage>, NetlinkError> {
        self.handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(request(format!("listing {family:?} neighbours")))
    }

    /// Sets an interface's MTU and brings it up.
    pub async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(format!(
                "setting MTU {mtu} and up on interface {index}"
            )))
    }

    /// Makes `addr/prefix_len` the only IPv4 address of the interface: a lease that moved leaves no
    /// stale address behind.
    pub async fn set_only_ipv4(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut present = false;
        let mut stale = Vec::new();
        while let Some(msg) = existing
            .try_next()
            .await
            .map_err(request(format!("listing addresses of interface {index}")))?
        {
            let ours = msg.header.prefix_len == prefix_len
                && msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == addr));
            let is_v4 = msg
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(_))));
            if ours {
                present = true;
            } else if is_v4 {
                stale.push(msg);
            }
        }
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(request(format!(
                    "removing a stale address of interface {index}"
                )))?;
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), prefix_len)
                .execute()
                .await
                .map_err(request(format!(
                    "adding {addr}/{prefix_len} to interface {index}"
                )))?;
        }
        Ok(())
    }

    /// Deletes the interface `index` (`name` is for the error), with its addresses and routes.
    pub async fn delete_link(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(request(format!("deleting {name}")))
    }

    /// Adds or replaces the route `dst/prefix_len dev index`.
    pub async fn replace_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        index: u32,
    ) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .output_interface(index)
            .build();
        self.add_or_replace(route, || {
            format!("routing {dst}/{prefix_len} to interface {index}")
        })
        .await
    }

    /// Adds `route`, replacing the one with the same key (destination, metric, table).
    async fn add_or_replace(
        &self,
        route: RouteMessage,
        operation: impl FnOnce() -> String,
    ) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(request(operation()))
    }
}

/// The metric of the `--ip-blackhole-route` route: the highest, so any other route for the same
/// subnet (docker's bridge, whose connected route has metric 0) wins while it exists, and the
/// blackhole takes over only when it is gone. flanneld uses metric 0, the same key as docker0's
/// connected route, so its add fails ("File exists") for as long as docker0 holds the subnet.
/// The metric also tells teardown which blackhole routes are the agent's.
pub const BLACKHOLE_METRIC: u32 = u32::MAX;

/// The main routing table's id.
const MAIN_TABLE: u32 = 254;

/// Where the kernel would send a packet, as `ip route get` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteLookup {
    /// The output interface.
    pub oif: u32,
    /// The source address the kernel would choose, when it names one.
    pub source: Option<Ipv4Addr>,
}

impl Netlink {
    /// The kernel's route lookup for `dst` (`ip route get <dst>`).
    pub async fn route_get(&self, dst: Ipv4Addr) -> Result<RouteLookup, NetlinkError> {
        let operation = || format!("looking up the route to {dst}");
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        let mut answers = self.handle.route().get(msg).execute();
        let answer = answers.try_next().await.map_err(request(operation()))?;
        let oif = answer.as_ref().and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
        });
        let source = answer.as_ref().and_then(|m| {
            m.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(s)) => Some(*s),
                _ => None,
            })
        });
        oif.map(|oif| RouteLookup { oif, source })
            .ok_or(NetlinkError::NoRoute { dst })
    }

    /// The blackhole routes of the main table with metric `metric`, as (network, length).
    pub async fn blackhole_routes(&self, metric: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut out = Vec::new();
        while let Some(m) = routes.try_next().await.map_err(request("listing routes"))? {
            if m.header.kind != RouteType::BlackHole
                || route_table(&m) != MAIN_TABLE
                || route_priority(&m) != metric
            {
                continue;
            }
            let dst = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                _ => None,
            });
            out.push((
                dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
                m.header.destination_prefix_length,
            ));
        }
        Ok(out)
    }

    /// The main-table IPv4 routes through interface `index`.
    async fn route_messages_via(&self, index: u32) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut through = Vec::new();
        while let Some(m) = routes.try_next().await.map_err(request("listing routes"))? {
            let oif = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            if route_table(&m) == MAIN_TABLE && oif == Some(index) {
                through.push(m);
            }
        }
        Ok(through)
    }

    /// The destinations (network, length) of the main-table IPv4 routes through `index`.
    pub async fn routes_via(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetlinkError> {
        Ok(self
            .route_messages_via(index)
            .await?
            .iter()
            .map(|m| {
                let dst = m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                    _ => None,
                });
                (
                    dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
                    m.header.destination_prefix_length,
                )
            })
            .collect())
    }

    /// Deletes every main-table IPv4 route through interface `index`, one by one, each an atomic
    /// change: a less specific route elsewhere takes each one's traffic the moment it goes.
    /// Returns how many went.
    pub async fn delete_routes_via(&self, index: u32) -> Result<usize, NetlinkError> {
        let through = self.route_messages_via(index).await?;
        let n = through.len();
        for route in through {
            self.handle
                .route()
                .del(route)
                .execute()
                .await
                .map_err(request(format!(
                    "deleting a route through interface {index}"
                )))?;
        }
        Ok(n)
    }

    /// Creates the veth pair `name` / `peer`, both with MTU `mtu`, down. Returns their indexes.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        mtu: u32,
    ) -> Result<(u32, u32), NetlinkError> {
        let message = rtnetlink::LinkVeth::new(name, peer).mtu(mtu).build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(request(format!("creating the veth pair {name} / {peer}")))?;
        Ok((self.link(name).await?.index, self.link(peer).await?.index))
    }

    /// Creates flanneld's kind of vxlan device: `name`, VNI `vni`, on `underlay` from `local`,
    /// UDP `port`, no learning, MAC `mac`, MTU `mtu`, up.
    #[allow(clippy::too_many_arguments)]
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        underlay: u32,
        local: Ipv4Addr,
        port: u16,
        mac: [u8; 6],
        mtu: u32,
    ) -> Result<u32, NetlinkError> {
        let message = rtnetlink::LinkVxlan::new(name, vni)
            .dev(underlay)
            .local(local)
            .port(port)
            .learning(false)
            .address(mac.to_vec())
            .mtu(mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(request(format!("creating the vxlan device {name}")))?;
        Ok(self.link(name).await?.index)
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub async fn permanent_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request(format!(
                "adding the neighbour {ip} on interface {index}"
            )))
    }

    /// `bridge fdb replace <mac> dev <index> dst <dst> self permanent`: the vxlan device sends
    /// frames for `mac` to `dst`.
    pub async fn vxlan_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(request(format!(
                "adding the FDB entry for {dst} on interface {index}"
            )))
    }

    /// `ip route replace <dst>/<len> via <gateway> dev <index> onlink`.
    pub async fn replace_onlink_route(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        gateway: Ipv4Addr,
        index: u32,
    ) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix_len)
            .gateway(gateway)
            .output_interface(index)
            .onlink()
            .build();
        self.add_or_replace(route, || {
            format!("routing {dst}/{prefix_len} via {gateway} onlink")
        })
        .await
    }

    /// Adds the blackhole route `dst/prefix_len metric metric` unless it is there; true when it
    /// had to.
    pub async fn ensure_blackhole(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        metric: u32,
    ) -> Result<bool, NetlinkError> {
        if self
            .blackhole_routes(metric)
            .await?
            .contains(&(dst, prefix_len))
        {
            return Ok(false);
        }
        self.add_or_replace(blackhole(dst, prefix_len, metric), || {
            format!("adding the blackhole route {dst}/{prefix_len}")
        })
        .await?;
        Ok(true)
    }

    /// Deletes the blackhole route `dst/prefix_len metric metric`.
    pub async fn delete_blackhole(
        &self,
        dst: Ipv4Addr,
        prefix_len: u8,
        metric: u32,
    ) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .del(blackhole(dst, prefix_len, metric))
            .execute()
            .await
            .map_err(request(format!(
                "deleting the blackhole route {dst}/{prefix_len}"
            )))
    }
}

fn blackhole(dst: Ipv4Addr, prefix_len: u8, metric: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, prefix_len)
        .kind(RouteType::BlackHole)
        .priority(metric)
        .table_id(MAIN_TABLE)
        .build()
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_priority(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether a neighbour entry holds a MAC worth using.
fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
    )
}

/// `IFLA_TUN_PERSIST` (linux/if_link.h), which netlink-packet-route leaves undecoded.
const IFLA_TUN_PERSIST: u16 = 6;

fn tun_persist(attr: &InfoTun) -> Option<bool> {
    use rtnetlink::packet_core::Nla as _;
    let InfoTun::Other(nla) = attr else {
        return None;
    };
    if nla.kind() != IFLA_TUN_PERSIST {
        return None;
    }
    let mut value = vec![0u8; nla.value_len()];
    nla.emit_value(&mut value);
    value.first().map(|v| *v != 0)
}

/// What a link message says about the link.
fn link_info(msg: &LinkMessage) -> LinkInfo {
    let mut info = LinkInfo {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        mac: Vec::new(),
        kind: None,
        tun_persist: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => info.name.clone_from(name),
            LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
            LinkAttribute::Address(mac) => info.mac.clone_from(mac),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        NlLinkInfo::Kind(kind) => info.kind = Some(kind.to_string()),
                        NlLinkInfo::Data(InfoData::Tun(attrs)) => {
                            info.tun_persist = attrs.iter().find_map(tun_persist);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}
