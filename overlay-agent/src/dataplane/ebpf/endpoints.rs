//! Learning the local containers, so decapsulated packets go straight into them.
//!
//! Delivering with `bpf_redirect_peer` needs, per container IP: the host-side veth (the program
//! redirects to its peer, the container's interface), the container's MAC and the bridge's MAC.
//! All three are in the kernel already, on the docker bridge, i.e. the interface that holds
//! FLANNEL_SUBNET's gateway address: the ARP entry gives IP -> MAC, the bridge's FDB gives
//! MAC -> port. The bridge appears after the agent (docker starts after it) and containers come
//! and go, so the learner resyncs on every link, neighbour or address event, and every few seconds
//! as a safety net. An IP the host has not resolved yet is simply delivered through the stack, which
//! resolves it.
//!
//! The learner also deletes ARP entries whose MAC no bridge port has any more: the container they
//! were resolved for is gone (its veth went, and the bridge forgot the MAC with it). Docker hands
//! a freed address out again, and when the new container has another MAC the kernel would go on
//! sending to the old one until its neighbour timers run out (up to a minute, longer with raised
//! `base_reachable_time`), the new container unreachable meanwhile. Without the entry the next
//! packet resolves the address again.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::Duration,
};

use futures::StreamExt as _;
use overlay_common::maps::Endpoint;

use super::EndpointsMap;
use crate::host::{Netlink, NetlinkError};

/// Resync period without events.
const PERIOD: Duration = Duration::from_secs(5);
/// Events come in bursts (a container start is a dozen); one resync per burst.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Starts the learner on a thread of its own (it owns the map from then on). It runs until the
/// process exits.
pub fn spawn(map: EndpointsMap, gateway: Ipv4Addr) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("endpoints".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread tokio runtime builds");
            runtime.block_on(run(map, gateway));
        })
        .map(|_| ())
}

async fn run(mut map: EndpointsMap, gateway: Ipv4Addr) {
    let (netlink, mut events) = match Netlink::connect_monitor() {
        Ok(v) => v,
        Err(err) => {
            tracing::error!(
                "endpoint learning off, packets for local containers go through the stack: {err}"
            );
            forget_all(&mut map);
            return;
        }
    };
    // Containers the map had no room for, each warned about once until it fits or goes.
    let mut refused: HashSet<Ipv4Addr> = HashSet::new();
    let mut known: HashMap<Ipv4Addr, Endpoint> = match map.entries() {
        Ok(entries) => entries.into_iter().collect(),
        Err(err) => {
            tracing::warn!("reading the endpoints left by a previous run: {err}");
            HashMap::new()
        }
    };
    loop {
        match learn(&netlink, gateway).await {
            Ok(learned) => {
                apply(&mut map, &mut known, &mut refused, learned.endpoints);
                forget_stale(&netlink, learned.bridge, learned.stale).await;
            }
            Err(err) => tracing::warn!("learning local containers: {err}"),
        }
        tokio::select! {
            event = events.next() => {
                if event.is_none() {
                    tracing::error!(
                        "netlink monitor closed; endpoint learning stops, packets for local \
                         containers go through the stack"
                    );
                    forget_all(&mut map);
                    return;
                }
                tokio::time::sleep(DEBOUNCE).await;
                // Drain the rest of the burst.
                while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, events.next()).await {}
            }
            () = tokio::time::sleep(PERIOD) => {}
        }
    }
}

/// Without a learner nobody would notice a container going away, and its entry would steer
/// packets at a veth that may be gone or reused: better no entries (delivery through the stack).
fn forget_all(map: &mut EndpointsMap) {
    let entries = map.entries().unwrap_or_default();
    for (ip, _) in entries {
        if let Err(err) = map.remove(ip) {
            tracing::warn!(%ip, "removing endpoint: {err}");
        }
    }
}

/// What one look at the bridge found.
#[derive(Default)]
struct Learned {
    /// The bridge holding the gateway address (0: none yet).
    bridge: u32,
    /// What the endpoints map should hold now.
    endpoints: HashMap<Ipv4Addr, Endpoint>,
    /// Addresses whose ARP entry names a MAC no bridge port has.
    stale: Vec<Ipv4Addr>,
}

async fn learn(netlink: &Netlink, gateway: Ipv4Addr) -> Result<Learned, NetlinkError> {
    let mut learned = Learned::default();
    let Some(bridge) = netlink.link_with_ipv4(gateway).await? else {
        return Ok(learned);
    };
    learned.bridge = bridge;
    let Ok(bridge_mac) = <[u8; 6]>::try_from(netlink.link_by_index(bridge).await?.mac.as_slice())
    else {
        return Ok(learned);
    };
    let veths = netlink.veth_indexes().await?;
    let fdb = netlink.bridge_fdb(bridge).await?;
    // Behind any port: a MAC learned behind an uplink is no stale entry, only no container.
    let on_bridge: HashSet<[u8; 6]> = fdb.iter().map(|e| e.mac).collect();
    let ports: HashMap<[u8; 6], u32> = fdb
        .into_iter()
        .filter(|e| veths.contains(&e.port))
        .map(|e| (e.mac, e.port))
        .collect();
    for neighbour in netlink.ipv4_neighbours(bridge).await? {
        if let Some(&port) = ports.get(&neighbour.mac) {
            learned.endpoints.insert(
                neighbour.ip,
                Endpoint {
                    host_ifindex: port,
                    mac: neighbour.mac,
                    bridge_mac,
                },
            );
        } else if !neighbour.permanent && !on_bridge.contains(&neighbour.mac) {
            learned.stale.push(neighbour.ip);
        }
    }
    Ok(learned)
}

/// Deletes the ARP entries [`learn`] found stale (see the module's comment). An entry for a
/// container idle longer than the bridge's FDB ageing goes too: its next packet costs one ARP
/// round trip, as it would once the kernel's timers ran out.
async fn forget_stale(netlink: &Netlink, bridge: u32, stale: Vec<Ipv4Addr>) {
    for ip in stale {
        match netlink.delete_neighbour(bridge, ip).await {
            Ok(()) => tracing::debug!(%ip, "ARP entry of a MAC gone from the bridge deleted"),
            Err(err) => tracing::warn!(%ip, "deleting a stale ARP entry: {err}"),
        }
    }
}

fn apply(
    map: &mut EndpointsMap,
    known: &mut HashMap<Ipv4Addr, Endpoint>,
    refused: &mut HashSet<Ipv4Addr>,
    desired: HashMap<Ipv4Addr, Endpoint>,
) {
    refused.retain(|ip| desired.contains_key(ip));
    // Removals first: a stale entry points at a veth that may be gone, and a redirect to it drops.
    let gone: Vec<Ipv4Addr> = known
        .keys()
        .filter(|ip| !desired.contains_key(ip))
        .copied()
        .collect();
    for ip in gone {
        match map.remove(ip) {
            Ok(()) => {
                known.remove(&ip);
                tracing::debug!(%ip, "local container gone");
            }
            Err(err) => tracing::warn!(%ip, "removing endpoint: {err}"),
        }
    }
    for (ip, endpoint) in desired {
        if known.get(&ip) == Some(&endpoint) {
            continue;
        }
        match map.upsert(ip, endpoint) {
            Ok(()) => {
                known.insert(ip, endpoint);
                refused.remove(&ip);
                tracing::debug!(%ip, port = endpoint.host_ifindex, "local container learned");
            }
            // Its packets still arrive, through the kernel's stack: a warning, once.
            Err(err) if refused.insert(ip) => tracing::warn!(
                %ip,
                "programming endpoint: {err}; its packets are delivered through the stack"
            ),
            Err(err) => tracing::debug!(%ip, "programming endpoint: {err}"),
        }
    }
}
