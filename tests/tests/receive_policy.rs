//! One receive policy, two datapaths: the table of `overlay_tests::receive_cases` gets the same
//! verdict and the same counter from the eBPF programs (TC and XDP, through `BPF_PROG_TEST_RUN`)
//! and from the TUN datapath's decision function. The live relay case for TUN hosts is in
//! `tun_datapath.rs`.

use std::collections::BTreeMap;

use overlay_agent::dataplane::{
    ebpf::{EbpfDataplane, PeerRoute},
    tun::{PeerTable, codec},
};
use overlay_common::{
    CounterSlot,
    maps::Encap,
    net::{Mac, Subnet},
    programs,
};
use overlay_tests::receive_cases::{Expect, PEER, PEER_SUBNET, PEER_VTEP, cases, host_config};

const ENCAPS: [Encap; 2] = [Encap::Udp, Encap::Vxlan];

fn peer_route() -> PeerRoute {
    PeerRoute {
        subnet: Subnet::new(PEER_SUBNET.0, PEER_SUBNET.1).unwrap(),
        public_ip: PEER,
        vtep_mac: Mac(PEER_VTEP),
        kernel_decap: true,
    }
}

fn the_tun_decision_function_follows_the_table() {
    let route = peer_route();
    let table = PeerTable::new(&BTreeMap::from([(route.subnet, route)]));
    let mut checked = 0;
    for encap in ENCAPS {
        let cfg = host_config(encap);
        for case in cases(encap) {
            // The kernel drops it before the socket: nothing for the TUN datapath to judge.
            let Some((sender, outer, payload)) = case.as_datagram() else {
                assert!(
                    case.name.contains("outer IP checksum")
                        || case.name.contains("outer IP version"),
                    "{}",
                    case.name
                );
                continue;
            };
            let got = match codec::receive(&cfg, &table, sender, outer, payload) {
                Ok(_) => Expect::Accept,
                Err(refusal) => Expect::Refuse(refusal),
            };
            assert_eq!(got, case.expect, "{}", case.name);
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} cases");
}

/// The counters that moved between two readings.
fn moved(
    dp: &EbpfDataplane,
    before: &[(CounterSlot, overlay_common::Counter)],
) -> Vec<CounterSlot> {
    dp.counters()
        .unwrap()
        .iter()
        .zip(before)
        .filter(|(a, b)| a.1.packets != b.1.packets)
        .map(|(a, _)| a.0)
        .collect()
}

fn the_ebpf_programs_follow_the_table() {
    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;
    const XDP_DROP: i32 = 1;
    const XDP_PASS: i32 = 2;
    let mut checked = 0;
    for encap in ENCAPS {
        let mut dp = EbpfDataplane::load(None).unwrap();
        dp.configure(&host_config(encap)).unwrap();
        dp.upsert_peer(peer_route()).unwrap();
        for case in cases(encap) {
            let (slot, tc, xdp) = match case.expect {
                Expect::Accept => (CounterSlot::DecapToStack, TC_ACT_OK, XDP_PASS),
                Expect::Refuse(r) => (r.counter(), TC_ACT_SHOT, XDP_DROP),
            };
            for (program, verdict) in [(programs::TC_DECAP, tc), (programs::XDP_DECAP, xdp)] {
                let before = dp.counters().unwrap();
                let (got, _) = dp.test_run(program, &case.frame).unwrap();
                assert_eq!(got, verdict, "{program}: {}", case.name);
                assert_eq!(moved(&dp, &before), vec![slot], "{program}: {}", case.name);
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "only {checked} runs");
}

overlay_tests::test_main!(
    plain the_tun_decision_function_follows_the_table,
    root the_ebpf_programs_follow_the_table,
);
