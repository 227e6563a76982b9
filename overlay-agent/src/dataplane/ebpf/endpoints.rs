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

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

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
    let mut known: HashMap<Ipv4Addr, Endpoint> = match map.entries() {
        Ok(entries) => entries.into_iter().collect(),
        Err(err) => {
            tracing::warn!("reading the endpoints left by a previous run: {err}");
            HashMap::new()
        }
    };
    loop {
        match learn(&netlink, gateway).await {
            Ok(desired) => apply(&mut map, &mut known, desired),
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

/// What the endpoints map should hold now.
async fn learn(
    netlink: &Netlink,
    gateway: Ipv4Addr,
) -> Result<HashMap<Ipv4Addr, Endpoint>, NetlinkError> {
    let mut desired = HashMap::new();
    let Some(bridge) = netlink.link_with_ipv4(gateway).await? else {
        return Ok(desired);
    };
    let Ok(bridge_mac) = <[u8; 6]>::try_from(netlink.link_by_index(bridge).await?.mac.as_slice())
    else {
        return Ok(desired);
    };
    let veths = netlink.veth_indexes().await?;
    let ports: HashMap<[u8; 6], u32> = netlink
        .bridge_fdb(bridge)
        .await?
        .into_iter()
        .filter(|e| veths.contains(&e.port))
        .map(|e| (e.mac, e.port))
        .collect();
    for neighbour in netlink.ipv4_neighbours(bridge).await? {
        if let Some(&port) = ports.get(&neighbour.mac) {
            desired.insert(
                neighbour.ip,
                Endpoint {
                    host_ifindex: port,
                    mac: neighbour.mac,
                    bridge_mac,
                },
            );
        }
    }
    Ok(desired)
}

fn apply(
    map: &mut EndpointsMap,
    known: &mut HashMap<Ipv4Addr, Endpoint>,
    desired: HashMap<Ipv4Addr, Endpoint>,
) {
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
                tracing::debug!(%ip, port = endpoint.host_ifindex, "local container learned");
            }
            Err(err) => tracing::warn!(%ip, "programming endpoint: {err}"),
        }
    }
}
