//! The control plane: flannel-compatible network config, subnet leases and peers in etcd, the
//! subnet file and readiness. It tells the dataplane what to do through
//! [`crate::dataplane::contract::Overlay`].

pub mod config;
pub mod etcd;
pub mod healthz;
pub mod lease;
pub mod notify;
pub mod peers;
pub mod subnet;
pub mod subnet_env;
