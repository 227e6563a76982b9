//! The bench's etcd: the lab's own ([`overlay_tests::cluster::NsEtcd`]), inside the rig's switch
//! namespace so the agents reach it over the simulated underlay, nothing listens outside the rig,
//! and a Ctrl-C cleanup that kills every process in the rig's namespaces also kills etcd.

pub use overlay_tests::cluster::{ETCD_IP, NsEtcd as Etcd};
