//! A running three-host flannel cluster (flanneld stand-ins, udp and vxlan) migrated host by host
//! to overlay-agent on the eBPF datapath, with every container pinging every other at 20/s: no
//! ping may be lost. Then rolled back host by host, measured the same way: none lost either.

use overlay_tests::{
    etcd::{TempDir, agent_binary},
    flanneld::Backend,
    migration::{Direction, Migration, Plan},
};

fn migrate(backend: Backend, prefix: &str) {
    let tmp = TempDir::new(prefix).unwrap();
    let mut m = Migration::flannel_cluster(Plan {
        prefix: prefix.into(),
        backend,
        agent_bin: agent_binary().to_owned(),
        agent_flags: vec!["--datapath=ebpf".into()],
        rollback: true,
        dir: tmp.path().to_owned(),
    })
    .unwrap();
    let swaps = m.run(|swap| eprintln!("{swap} {:?}", swap.lost)).unwrap();
    assert_eq!(swaps.len(), 6);
    for swap in swaps.iter().filter(|s| s.direction == Direction::ToAgent) {
        // Each swap ran under traffic: every flow sent requests across it.
        assert!(swap.sent >= 6 * 10, "{swap}: too few pings to tell");
        assert!(swap.lost.is_empty(), "{swap}: lost {:?}", swap.lost);
    }
    // Rolled back, every host is flanneld's again, and every pair still answers (settle waited
    // for replies after each swap back), with nothing lost either.
    for swap in swaps
        .iter()
        .filter(|s| s.direction == Direction::ToFlanneld)
    {
        assert!(swap.sent >= 6 * 10, "{swap}: too few pings to tell");
        assert!(swap.lost.is_empty(), "{swap}: lost {:?}", swap.lost);
    }
}

fn migration_udp_loses_nothing() {
    migrate(Backend::Udp, "ovt-mu");
}

fn migration_vxlan_loses_nothing() {
    migrate(Backend::Vxlan, "ovt-mv");
}

overlay_tests::test_main!(
    root migration_udp_loses_nothing,
    root migration_vxlan_loses_nothing,
);
