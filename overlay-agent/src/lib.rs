//! `overlay-agent`: a flannel-compatible overlay network agent whose dataplane runs in eBPF.
//!
//! The crate is split along the architecture (see `docs/architecture.md`):
//! - [`dataplane`]: what moves packets: the eBPF loader and its maps.
//! - [`host`]: host setup through netlink and the TUN driver: the overlay device, addresses, routes.
#![deny(missing_docs)]

pub mod cli;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod docker_opts;
pub mod host;
pub mod status;
pub mod teardown;
