//! The control plane: flannel-compatible network config, subnet leases and peers in etcd, the
//! subnet file and readiness. It tells the dataplane what to do through [`datapath::Datapath`].

pub mod config;
pub mod datapath;
pub mod etcd;
pub mod healthz;
pub mod iface;
pub mod lease;
pub mod notify;
pub mod peers;
pub mod subnet;
pub mod subnet_env;
