//! The eBPF datapath across simulated hosts, driven through the agent's library (the daemon's
//! wiring is tested elsewhere): three hosts on one underlay, each with a docker-like bridge and a
//! container; every container reaches every other, in both wire formats, with no kernel vxlan
//! device anywhere; and decapsulation refuses what does not come from a peer.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use overlay_agent::{
    dataplane::ebpf::{EbpfConfig, EbpfDataplane, PeerRoute, vtep_mac_for},
    host::{Netlink, OverlayDevice},
};
use overlay_common::{CounterSlot, maps::Encap};
use overlay_tests::{
    lab::{Host, Lab, LabConfig, SubnetEnv, UNDERLAY_IF},
    require_root,
};

const NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 0, 0), 12);

fn subnet_of(host: &Host) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, host.number as u8, 0)
}

fn device_name(encap: Encap) -> &'static str {
    match encap {
        Encap::Vxlan => "flannel.1",
        _ => "flannel0",
    }
}

fn port_of(encap: Encap) -> u16 {
    match encap {
        Encap::Vxlan => 8472,
        _ => 8285,
    }
}

/// What the agent does on a host: the overlay device, the programs, the config.
fn bring_up(host: &Host, encap: Encap) -> EbpfDataplane {
    host.ns
        .run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let netlink = Netlink::connect().unwrap();
                let underlay = netlink.link(UNDERLAY_IF).await.unwrap();
                let device = OverlayDevice {
                    name: device_name(encap).into(),
                    mtu: underlay.mtu - encap.overhead(),
                    lease_addr: subnet_of(host),
                    addr_prefix_len: if encap == Encap::Vxlan { 32 } else { NETWORK.1 },
                    network: NETWORK,
                };
                device.ensure(&netlink).await.unwrap();
                let mut dp = EbpfDataplane::load().unwrap();
                dp.configure(&EbpfConfig {
                    encap,
                    public_ip: host.underlay_ip,
                    underlay_ifindex: underlay.index,
                    port: port_of(encap),
                    vni: 1,
                    vtep_mac: vtep_mac_for(host.underlay_ip),
                    deliver_via_stack: false,
                })
                .unwrap();
                dp.attach(&device.name, UNDERLAY_IF).unwrap();
                dp
            })
        })
        .unwrap()
}

fn peer_route(host: &Host) -> PeerRoute {
    PeerRoute {
        subnet: subnet_of(host),
        prefix_len: 24,
        public_ip: host.underlay_ip,
        vtep_mac: vtep_mac_for(host.underlay_ip),
    }
}

fn docker_env(host: &Host, encap: Encap) -> SubnetEnv {
    SubnetEnv {
        network: NETWORK.0,
        network_len: NETWORK.1,
        gateway: Ipv4Addr::from(u32::from(subnet_of(host)) + 1),
        prefix_len: 24,
        mtu: 1500 - encap.overhead(),
    }
}

fn ping(from: &Host, to: Ipv4Addr) -> Result<(), String> {
    let c = from.container.as_ref().unwrap();
    c.ns.exec(
        "ping",
        &["-q", "-c", "3", "-i", "0.1", "-W", "2", &to.to_string()],
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn counter(dp: &EbpfDataplane, slot: CounterSlot) -> u64 {
    dp.counters()
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, c)| c.packets)
        .unwrap()
}

/// Sends 1 MB over TCP from `from`'s container to `to`'s and checks it arrives byte for byte.
fn tcp_transfer(from: &Host, to: &Host) {
    let payload: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let server_ns = &to.container.as_ref().unwrap().ns;
    let client_ns = &from.container.as_ref().unwrap().ns;
    let server_ip = to.container.as_ref().unwrap().ip;
    let listener = server_ns
        .run(|| TcpListener::bind((server_ip, 5201)).unwrap())
        .unwrap();
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            got
        });
        client_ns
            .run(|| {
                let mut conn =
                    TcpStream::connect_timeout(&(server_ip, 5201).into(), Duration::from_secs(5))
                        .unwrap();
                conn.write_all(&payload).unwrap();
            })
            .unwrap();
        let got = server.join().unwrap();
        assert_eq!(got.len(), payload.len(), "transfer truncated");
        assert!(got == payload, "transfer corrupted");
    });
}

fn three_hosts_reach_each_other(encap: Encap) {
    let mut lab = Lab::new(&LabConfig {
        prefix: "ovt-dp".into(),
        hosts: 3,
        underlay_mtu: 1500,
    })
    .unwrap();
    let mut dataplanes: Vec<EbpfDataplane> = lab.hosts.iter().map(|h| bring_up(h, encap)).collect();
    for (i, dp) in dataplanes.iter_mut().enumerate() {
        for (j, other) in lab.hosts.iter().enumerate() {
            if i != j {
                dp.upsert_peer(peer_route(other)).unwrap();
            }
        }
    }
    for host in &mut lab.hosts {
        let env = docker_env(host, encap);
        host.start_docker(&env).unwrap();
    }

    let ips: Vec<Ipv4Addr> = lab
        .hosts
        .iter()
        .map(|h| h.container.as_ref().unwrap().ip)
        .collect();
    let mut failures = Vec::new();
    for from in &lab.hosts {
        for (j, to) in ips.iter().enumerate() {
            if j + 1 != from.number
                && let Err(e) = ping(from, *to)
            {
                failures.push(format!("h{} -> {to}: {e}", from.number));
            }
        }
    }
    assert!(failures.is_empty(), "unreachable: {failures:#?}");
    tcp_transfer(&lab.hosts[0], &lab.hosts[1]);
    tcp_transfer(&lab.hosts[2], &lab.hosts[0]);

    for (host, dp) in lab.hosts.iter().zip(&dataplanes) {
        assert!(
            counter(dp, CounterSlot::Encapsulated) > 0,
            "h{} encapsulated nothing",
            host.number
        );
        assert!(
            counter(dp, CounterSlot::DecapToStack) > 0,
            "h{} decapsulated nothing",
            host.number
        );
        assert_eq!(counter(dp, CounterSlot::DropNotPeer), 0);
        let vxlan = host
            .ns
            .ip(&["-d", "link", "show", "type", "vxlan"])
            .unwrap();
        assert!(
            vxlan.stdout.is_empty(),
            "h{} has a kernel vxlan device",
            host.number
        );
    }
    drop(dataplanes);
}

#[test]
fn udp_format_three_hosts() {
    if require_root("udp_format_three_hosts") {
        three_hosts_reach_each_other(Encap::Udp);
    }
}

#[test]
fn vxlan_format_three_hosts() {
    if require_root("vxlan_format_three_hosts") {
        three_hosts_reach_each_other(Encap::Vxlan);
    }
}

#[test]
fn removed_peer_becomes_unreachable_and_non_peers_are_dropped() {
    if !require_root("removed_peer_becomes_unreachable_and_non_peers_are_dropped") {
        return;
    }
    let encap = Encap::Udp;
    let mut lab = Lab::new(&LabConfig {
        prefix: "ovt-rm".into(),
        hosts: 2,
        underlay_mtu: 1500,
    })
    .unwrap();
    let mut dps: Vec<EbpfDataplane> = lab.hosts.iter().map(|h| bring_up(h, encap)).collect();
    dps[0].upsert_peer(peer_route(&lab.hosts[1])).unwrap();
    dps[1].upsert_peer(peer_route(&lab.hosts[0])).unwrap();
    for host in &mut lab.hosts {
        let env = docker_env(host, encap);
        host.start_docker(&env).unwrap();
    }
    let ip2 = lab.hosts[1].container.as_ref().unwrap().ip;
    ping(&lab.hosts[0], ip2).expect("reachable while peered");

    // Host 2 forgets host 1: host 1's packets now come from a non-peer and are dropped.
    dps[1].remove_peer(subnet_of(&lab.hosts[0]), 24).unwrap();
    let started = Instant::now();
    assert!(
        ping(&lab.hosts[0], ip2).is_err(),
        "still reachable after removal"
    );
    assert!(counter(&dps[1], CounterSlot::DropNotPeer) > 0);
    assert!(started.elapsed() < Duration::from_secs(10));

    // And back.
    dps[1].upsert_peer(peer_route(&lab.hosts[0])).unwrap();
    ping(&lab.hosts[0], ip2).expect("reachable again after re-adding");
}
