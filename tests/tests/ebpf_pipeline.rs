//! The eBPF build pipeline end to end: the object embedded in the agent loads, its programs attach
//! to a veth pair across two namespaces through the agent's loader, and their counters move when
//! traffic flows.

use overlay_agent::dataplane::ebpf::{EbpfDataplane, XdpMode};
use overlay_common::{Counter, CounterSlot};
use overlay_tests::{
    netns::{NetNs, veth},
    require_root,
};

const PINGS: u64 = 20;

fn counter(counters: &[(CounterSlot, Counter)], slot: CounterSlot) -> Counter {
    counters
        .iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, c)| *c)
        .unwrap_or_else(|| panic!("no counter for {slot:?}"))
}

fn attached_programs_count_traffic(mode: XdpMode) {
    let a = NetNs::new("ovt-a").unwrap();
    let b = NetNs::new("ovt-b").unwrap();
    veth(&a, "va", &b, "vb").unwrap();
    a.ip(&["addr", "add", "198.51.100.1/24", "dev", "va"])
        .unwrap();
    b.ip(&["addr", "add", "198.51.100.2/24", "dev", "vb"])
        .unwrap();

    // TC on the sender's egress, XDP on the receiver's ingress: each attach happens inside the
    // namespace that owns the interface.
    let mut dataplane = EbpfDataplane::load().expect("load eBPF object");
    a.run(|| dataplane.attach_tc_egress("va"))
        .unwrap()
        .expect("attach tc egress");
    b.run(|| dataplane.attach_xdp("vb", mode))
        .unwrap()
        .expect("attach xdp");
    let xdp_state = b.ip(&["-d", "link", "show", "vb"]).unwrap();
    assert!(
        String::from_utf8_lossy(&xdp_state.stdout).contains("prog/xdp"),
        "vb shows no XDP program"
    );

    let before = dataplane.counters().unwrap();
    a.exec(
        "ping",
        &[
            "-q",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            "198.51.100.2",
        ],
    )
    .expect("ping across the veth pair");
    let after = dataplane.counters().unwrap();

    for slot in CounterSlot::ALL {
        let (b0, a0) = (counter(&before, slot), counter(&after, slot));
        let packets = a0.packets - b0.packets;
        // Every echo request passes both hooks; ARP may add a few more.
        assert!(
            packets >= PINGS,
            "{slot:?}: {packets} packets, expected >= {PINGS}"
        );
        assert!(
            a0.bytes - b0.bytes >= packets * 84,
            "{slot:?}: byte count too small for {packets} ICMP packets"
        );
    }

    // Dropping the dataplane detaches both programs.
    drop(dataplane);
    let xdp_state = b.ip(&["-d", "link", "show", "vb"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&xdp_state.stdout).contains("prog/xdp"),
        "XDP program still attached after drop"
    );
}

#[test]
fn programs_count_traffic_native_xdp() {
    if require_root("programs_count_traffic_native_xdp") {
        attached_programs_count_traffic(XdpMode::Driver);
    }
}

#[test]
fn programs_count_traffic_generic_xdp() {
    if require_root("programs_count_traffic_generic_xdp") {
        attached_programs_count_traffic(XdpMode::Skb);
    }
}
