//! The eBPF datapath across simulated hosts, driven through the agent's library (the daemon's
//! wiring is tested elsewhere): three hosts on one underlay, each with a docker-like bridge and a
//! container; every container reaches every other, in both wire formats, with no kernel vxlan
//! device anywhere; and decapsulation refuses what does not come from a peer.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use overlay_agent::{
    dataplane::{
        contract::{LocalLease, OverlaySpec},
        ebpf::{DecapHook, EbpfDataplane, PeerRoute, XdpMode, endpoints, pins::Pins},
    },
    host::{Netlink, iface::Underlay},
};
use overlay_common::{
    CounterSlot,
    maps::Encap,
    net::{Mac, Subnet},
};
use overlay_tests::{
    bpffs::BpfFs,
    flow::PingFlow,
    lab::{Host, Lab, LabConfig, SubnetEnv, UNDERLAY_IF},
};

const NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 0, 0), 12);

fn subnet_of(host: &Host) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, host.number as u8, 0)
}

fn lease_of(host: &Host) -> Subnet {
    Subnet::new(subnet_of(host), 24).unwrap()
}

/// The contract's view of a lab host: what the agent derives from the backend and the lease.
fn spec_of(host: &Host, encap: Encap) -> OverlaySpec {
    let backend = match encap {
        Encap::Vxlan => overlay_agent::control::config::Backend::Vxlan {
            vni: 1,
            port: port_of(encap),
            direct_routing: false,
            gbp: false,
            mtu: None,
        },
        _ => overlay_agent::control::config::Backend::Udp {
            port: port_of(encap),
        },
    };
    OverlaySpec::new(&backend, host.underlay_ip).unwrap()
}

fn port_of(encap: Encap) -> u16 {
    match encap {
        Encap::Vxlan => 8472,
        _ => 8285,
    }
}

/// What the agent does on a host: the overlay device, the programs, the config.
fn bring_up(host: &Host, encap: Encap) -> EbpfDataplane {
    bring_up_with(host, encap, None, DecapHook::Tc)
}

fn bring_up_pinned(host: &Host, encap: Encap, pins: Option<&Path>) -> EbpfDataplane {
    bring_up_with(host, encap, pins, DecapHook::Tc)
}

fn bring_up_with(
    host: &Host,
    encap: Encap,
    pins: Option<&Path>,
    decap: DecapHook,
) -> EbpfDataplane {
    host.ns
        .run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let netlink = Netlink::connect().unwrap();
                let underlay = netlink.link(UNDERLAY_IF).await.unwrap();
                let spec = spec_of(host, encap);
                let lease = LocalLease {
                    network: Subnet::new(NETWORK.0, NETWORK.1).unwrap(),
                    subnet: lease_of(host),
                    underlay: Underlay {
                        name: UNDERLAY_IF.into(),
                        addr: host.underlay_ip,
                        mtu: underlay.mtu,
                    },
                    mtu: underlay.mtu - spec.overhead(),
                };
                let device = spec.device(&lease);
                let index = device.prepare(&netlink).await.unwrap();
                let pins = pins.map(|p| Pins::open(p).unwrap());
                let mut dp = EbpfDataplane::load(pins).unwrap();
                dp.configure(&spec.program_config(&lease, underlay.index, false))
                    .unwrap();
                dp.attach(&device.name, UNDERLAY_IF, decap).unwrap();
                device.route(&netlink, index).await.unwrap();
                // Spawned from this thread, so the learner lives in the host's namespace.
                endpoints::spawn(
                    dp.take_endpoints().unwrap(),
                    Ipv4Addr::from(u32::from(subnet_of(host)) + 1),
                )
                .unwrap();
                dp
            })
        })
        .unwrap()
}

fn peer_route(host: &Host) -> PeerRoute {
    PeerRoute {
        subnet: lease_of(host),
        public_ip: host.underlay_ip,
        vtep_mac: Mac::vtep_for(host.underlay_ip),
        kernel_decap: true,
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
    let (a, b) = (
        from.container.as_ref().unwrap(),
        to.container.as_ref().unwrap(),
    );
    if let Err(e) = overlay_tests::cluster::tcp_transfer(a, b, 5201, 1 << 20) {
        panic!("h{} -> h{}: {e}", from.number, to.number);
    }
}

fn three_hosts_reach_each_other(encap: Encap) {
    three_hosts_reach_each_other_with(encap, DecapHook::Tc)
}

fn three_hosts_reach_each_other_with(encap: Encap, decap: DecapHook) {
    let mut lab = Lab::new(&LabConfig {
        prefix: "ovt-dp".into(),
        hosts: 3,
        underlay_mtu: 1500,
    })
    .unwrap();
    let mut dataplanes: Vec<EbpfDataplane> = lab
        .hosts
        .iter()
        .map(|h| bring_up_with(h, encap, None, decap))
        .collect();
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

fn udp_format_three_hosts() {
    three_hosts_reach_each_other(Encap::Udp);
}

fn vxlan_format_three_hosts() {
    three_hosts_reach_each_other(Encap::Vxlan);
}

fn xdp_decap_three_hosts_both_formats() {
    three_hosts_reach_each_other_with(Encap::Udp, DecapHook::Xdp(XdpMode::Driver));
    three_hosts_reach_each_other_with(Encap::Vxlan, DecapHook::Xdp(XdpMode::Skb));
}

fn removed_peer_becomes_unreachable_and_non_peers_are_dropped() {
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
    let dropped_before = counter(&dps[1], CounterSlot::DropNotPeer);
    dps[1].remove_peer(lease_of(&lab.hosts[0])).unwrap();
    assert!(
        ping(&lab.hosts[0], ip2).is_err(),
        "still reachable after removal"
    );
    // Refused by host 2's decap as coming from a non-peer, not lost elsewhere.
    assert!(counter(&dps[1], CounterSlot::DropNotPeer) > dropped_before);

    // And back.
    dps[1].upsert_peer(peer_route(&lab.hosts[0])).unwrap();
    ping(&lab.hosts[0], ip2).expect("reachable again after re-adding");
}

/// Configures `host` exactly as flannel's vxlan backend configures the kernel: a vxlan device,
/// and per peer a permanent neighbour, an FDB entry and an onlink route. Returns its VtepMAC.
fn flannel_kernel_vxlan(host: &Host, peers: &[&Host]) -> [u8; 6] {
    let ns = &host.ns;
    let local = host.underlay_ip.to_string();
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        &local,
        "dev",
        UNDERLAY_IF,
        "dstport",
        "8472",
        "nolearning",
    ])
    .unwrap();
    ns.ip(&["link", "set", "flannel.1", "mtu", "1450", "up"])
        .unwrap();
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/32", subnet_of(host)),
        "dev",
        "flannel.1",
    ])
    .unwrap();
    for peer in peers {
        let mac = Mac::vtep_for(peer.underlay_ip).to_string();
        let gw = subnet_of(peer).to_string();
        ns.ip(&[
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])
        .unwrap();
        ns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &peer.underlay_ip.to_string(),
            ],
        )
        .unwrap();
        ns.ip(&[
            "route",
            "add",
            &format!("{gw}/24"),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ])
        .unwrap();
    }
    let out = ns.ip(&["-br", "link", "show", "flannel.1"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text.split_whitespace().nth(2).expect("flannel.1 has a MAC");
    let mut bytes = [0u8; 6];
    for (b, part) in bytes.iter_mut().zip(mac.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    bytes
}

fn mixed_cluster_with_flannel_kernel_vxlan_host() {
    let encap = Encap::Vxlan;
    let mut lab = Lab::new(&LabConfig {
        prefix: "ovt-mx".into(),
        hosts: 3,
        underlay_mtu: 1500,
    })
    .unwrap();
    // Hosts 1 and 2 run our eBPF datapath; host 3 is a flannel vxlan host.
    let (ours, theirs) = lab.hosts.split_at(2);
    let flannel_host = &theirs[0];
    let flannel_mac = flannel_kernel_vxlan(flannel_host, &[&ours[0], &ours[1]]);
    let mut dps: Vec<EbpfDataplane> = ours.iter().map(|h| bring_up(h, encap)).collect();
    for (i, dp) in dps.iter_mut().enumerate() {
        dp.upsert_peer(peer_route(&ours[1 - i])).unwrap();
        dp.upsert_peer(PeerRoute {
            vtep_mac: Mac(flannel_mac),
            kernel_decap: true,
            ..peer_route(flannel_host)
        })
        .unwrap();
    }
    for host in &mut lab.hosts {
        let env = docker_env(host, encap);
        host.start_docker(&env).unwrap();
    }
    let flannel_ip = lab.hosts[2].container.as_ref().unwrap().ip;
    for from in 0..2 {
        ping(&lab.hosts[from], flannel_ip).expect("eBPF host -> flannel vxlan host");
        let ours_ip = lab.hosts[from].container.as_ref().unwrap().ip;
        ping(&lab.hosts[2], ours_ip).expect("flannel vxlan host -> eBPF host");
    }
    tcp_transfer(&lab.hosts[0], &lab.hosts[2]);
    tcp_transfer(&lab.hosts[2], &lab.hosts[1]);
    for dp in &dps {
        assert!(counter(dp, CounterSlot::DecapToStack) > 0);
        assert_eq!(counter(dp, CounterSlot::DropBadVxlan), 0);
    }
}

fn restart_with_pinned_programs_loses_no_packet_and_drops_stale_peers() {
    let bpffs = BpfFs::new().unwrap();
    let encap = Encap::Udp;
    let mut lab = Lab::new(&LabConfig {
        prefix: "ovt-rs".into(),
        hosts: 2,
        underlay_mtu: 1500,
    })
    .unwrap();
    let pin_dirs: Vec<_> = lab
        .hosts
        .iter()
        .map(|h| bpffs.path().join(format!("h{}", h.number)))
        .collect();
    let mut dps: Vec<EbpfDataplane> = lab
        .hosts
        .iter()
        .zip(&pin_dirs)
        .map(|(h, p)| bring_up_pinned(h, encap, Some(p)))
        .collect();
    dps[0].upsert_peer(peer_route(&lab.hosts[1])).unwrap();
    dps[1].upsert_peer(peer_route(&lab.hosts[0])).unwrap();
    // A peer that will be gone by the time host 1's agent restarts.
    let departed = PeerRoute {
        subnet: Subnet::new(Ipv4Addr::new(172, 16, 77, 0), 24).unwrap(),
        public_ip: Ipv4Addr::new(198, 18, 0, 77),
        vtep_mac: Mac::default(),
        kernel_decap: true,
    };
    dps[0].upsert_peer(departed).unwrap();
    for host in &mut lab.hosts {
        let env = docker_env(host, encap);
        host.start_docker(&env).unwrap();
    }
    let ip2 = lab.hosts[1].container.as_ref().unwrap().ip;
    ping(&lab.hosts[0], ip2).unwrap();

    // 100 pings a second, one ping process across both agents going away and coming back.
    let c1 = &lab.hosts[0].container.as_ref().unwrap().ns;
    let mut flow = PingFlow::start(c1, ip2, "0.01", 20).unwrap();
    let at_stop = flow.count();
    // The agents stop: their dataplane objects (program and map fds) are gone once drop returns.
    drop(dps);
    flow.assert_running("the agents stopped");
    // With no agent holding anything, the pinned links keep the programs forwarding.
    flow.wait_replies(at_stop, 20, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no replies while no agent ran: {e}"));
    let mut dps: Vec<EbpfDataplane> = lab
        .hosts
        .iter()
        .zip(&pin_dirs)
        .map(|(h, p)| bring_up_pinned(h, encap, Some(p)))
        .collect();
    dps[0].upsert_peer(peer_route(&lab.hosts[1])).unwrap();
    dps[1].upsert_peer(peer_route(&lab.hosts[0])).unwrap();
    assert_eq!(
        dps[0].remove_stale_peers().unwrap(),
        1,
        "the departed peer is removed"
    );
    assert_eq!(dps[1].remove_stale_peers().unwrap(), 0);
    let (replies, output) = flow.resumes(at_stop, 20, "the agents' restart");
    let lost = overlay_tests::flow::lost(&replies);
    assert!(
        lost.is_empty(),
        "packets lost across the restart: icmp_seq {lost:?}\n{output}"
    );

    // The pins are what keeps the programs: without them the links go.
    drop(dps);
    for dir in &pin_dirs {
        assert!(Pins::teardown(dir).is_empty());
    }
    assert!(ping(&lab.hosts[0], lab.hosts[1].container.as_ref().unwrap().ip).is_err());
}

overlay_tests::test_main!(
    root udp_format_three_hosts,
    root vxlan_format_three_hosts,
    root xdp_decap_three_hosts_both_formats,
    root removed_peer_becomes_unreachable_and_non_peers_are_dropped,
    root mixed_cluster_with_flannel_kernel_vxlan_host,
    root restart_with_pinned_programs_loses_no_packet_and_drops_stale_peers,
);
