//! Simulated container hosts: the rig shared by the integration tests, `cargo xtask run` and
//! `cargo xtask bench`.
//!
//! ```text
//!   [lab-net]  bridge ul0 --+-- ulh1 <-veth-> eth0 [host h1] docker0 -- vh1c <-veth-> eth0 [container]
//!                           +-- ulh2 <-veth-> eth0 [host h2] docker0 -- ...
//! ```
//! The underlay is 198.18.0.0/24 (RFC 2544's benchmarking range, never routed anywhere), host *i*
//! is 198.18.0.*i*. Each host gets a docker0-like bridge configured the way docker configures it
//! from subnet.env (`--bip=FLANNEL_SUBNET --mtu=FLANNEL_MTU`) and one container namespace behind it.
//! Nothing is created in the caller's own namespace; dropping the lab deletes every namespace.

use std::net::Ipv4Addr;

use crate::{
    docker::{DockerError, Dockerd},
    netns::{NetNs, NetNsError, veth},
};

/// Interface name of a host's underlay NIC, inside the host namespace.
pub const UNDERLAY_IF: &str = "eth0";
/// Name of the docker-like bridge on each host.
pub const DOCKER_BRIDGE: &str = "docker0";

/// The rig's shape.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Prefix of every namespace name (kept short: names show up in `ip netns`).
    pub prefix: String,
    /// Number of hosts.
    pub hosts: usize,
    /// MTU of the underlay links.
    pub underlay_mtu: u32,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            prefix: "ovl".into(),
            hosts: 3,
            underlay_mtu: 1500,
        }
    }
}

/// A running rig. Hosts are dropped before the underlay switch.
#[derive(Debug)]
pub struct Lab {
    /// The simulated hosts, in order.
    pub hosts: Vec<Host>,
    /// The namespace holding the underlay bridge.
    pub switch: NetNs,
}

/// One simulated host.
#[derive(Debug)]
pub struct Host {
    /// 1-based host number.
    pub number: usize,
    /// The container, once [`Host::start_docker`] or [`Host::start_dockerd`] ran. Declared
    /// before `ns` so it drops first.
    pub container: Option<Container>,
    /// The host's real Docker engine, once [`Host::start_dockerd`] ran (dropped before `ns`).
    pub dockerd: Option<Dockerd>,
    /// The host's network namespace.
    pub ns: NetNs,
    /// The host's address on the underlay.
    pub underlay_ip: Ipv4Addr,
}

/// A container namespace behind a host's docker bridge.
#[derive(Debug)]
pub struct Container {
    /// The container's namespace; its interface is `eth0`.
    pub ns: NetNs,
    /// The container's address (the second address of the host's subnet, as docker hands out).
    pub ip: Ipv4Addr,
    /// Its name in the host's dockerd, when a real one runs it.
    pub docker_name: Option<String>,
}

impl Container {
    /// A handle on the same container that does not own its namespace, for a thread that uses
    /// it while the lab may restart things.
    pub fn view(&self) -> Container {
        Container {
            ns: NetNs::attach(self.ns.name()),
            ip: self.ip,
            docker_name: self.docker_name.clone(),
        }
    }
}

/// Errors building the rig.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A namespace or link operation failed.
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    /// The host's real Docker engine failed.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// subnet.env could not be read or lacks a field docker needs.
    #[error("subnet.env: {reason}")]
    SubnetEnv {
        /// What is wrong with it.
        reason: String,
    },
}

impl Lab {
    /// Builds the underlay and the hosts (no docker bridges yet).
    pub fn new(config: &LabConfig) -> Result<Self, LabError> {
        let switch = NetNs::new(&format!("{}-net", config.prefix))?;
        switch.ip(&["link", "add", "ul0", "type", "bridge"])?;
        switch.ip(&["link", "set", "ul0", "up"])?;
        let mtu = config.underlay_mtu.to_string();
        let mut hosts = Vec::with_capacity(config.hosts);
        for number in 1..=config.hosts {
            let ns = NetNs::new(&format!("{}-h{number}", config.prefix))?;
            let port = format!("ulh{number}");
            veth(&switch, &port, &ns, UNDERLAY_IF)?;
            switch.ip(&["link", "set", &port, "master", "ul0", "mtu", &mtu])?;
            ns.ip(&["link", "set", UNDERLAY_IF, "mtu", &mtu])?;
            let underlay_ip = Ipv4Addr::new(198, 18, 0, number as u8);
            ns.ip(&[
                "addr",
                "add",
                &format!("{underlay_ip}/24"),
                "dev",
                UNDERLAY_IF,
            ])?;
            // A container host forwards between its bridge and the overlay.
            ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            hosts.push(Host {
                number,
                container: None,
                dockerd: None,
                ns,
                underlay_ip,
            });
        }
        Ok(Self { hosts, switch })
    }
}

impl Host {
    /// Does what docker does with `--bip=FLANNEL_SUBNET --mtu=FLANNEL_MTU` read from subnet.env:
    /// a bridge holding the gateway address, and one container with the next address behind it.
    pub fn start_docker(&mut self, env: &SubnetEnv) -> Result<&Container, LabError> {
        let bip = format!("{}/{}", env.gateway, env.prefix_len);
        let mtu = env.mtu.to_string();
        self.ns
            .ip(&["link", "add", DOCKER_BRIDGE, "type", "bridge"])?;
        self.ns.ip(&["link", "set", DOCKER_BRIDGE, "mtu", &mtu])?;
        self.ns.ip(&["addr", "add", &bip, "dev", DOCKER_BRIDGE])?;
        self.ns.ip(&["link", "set", DOCKER_BRIDGE, "up"])?;

        let ns = NetNs::new(&format!("{}-c", self.ns.name()))?;
        let host_if = format!("vh{}c", self.number);
        veth(&self.ns, &host_if, &ns, "eth0")?;
        self.ns.ip(&[
            "link",
            "set",
            &host_if,
            "master",
            DOCKER_BRIDGE,
            "mtu",
            &mtu,
        ])?;
        let ip = Ipv4Addr::from(u32::from(env.gateway) + 1);
        ns.ip(&["link", "set", "eth0", "mtu", &mtu])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", env.prefix_len),
            "dev",
            "eth0",
        ])?;
        ns.ip(&["route", "add", "default", "via", &env.gateway.to_string()])?;
        Ok(self.container.insert(Container {
            ns,
            ip,
            docker_name: None,
        }))
    }

    /// Starts a real dockerd on the host with the overlay's `options` (from the drop-in or the
    /// options file, see [`crate::docker::OptionsFrom`]) and `docker run`s one container, whose
    /// namespace the lab then reaches by name. `fresh_host`: forwarding is turned off first, as
    /// on a host that never ran docker, so dockerd turns it on itself and then sets the FORWARD
    /// policy to DROP, which the overlay must cope with; otherwise forwarding stays on and docker
    /// leaves the policy ACCEPT (as on hosts where something enabled forwarding before docker).
    pub fn start_dockerd(
        &mut self,
        options: Vec<String>,
        fresh_host: bool,
    ) -> Result<&Container, LabError> {
        let forwarding = if fresh_host { "0" } else { "1" };
        self.ns.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.ip_forward={forwarding}")],
        )?;
        let daemon = self.dockerd.insert(Dockerd::start(&self.ns, options)?);
        let info = daemon.run(&format!("h{}c", self.number), &[])?;
        self.name_container(info)
    }

    /// Makes docker's container `info` the host's, its namespace named after the host's.
    fn name_container(
        &mut self,
        info: crate::docker::ContainerInfo,
    ) -> Result<&Container, LabError> {
        // A name left on the previous process's namespace goes first.
        self.container = None;
        let ns = NetNs::of_process(&format!("{}-c", self.ns.name()), info.pid)?;
        Ok(self.container.insert(Container {
            ns,
            ip: info.ip,
            docker_name: Some(info.name),
        }))
    }

    /// After the host's container was recreated or restarted by docker: names its namespace
    /// again and takes its address from docker.
    pub fn refresh_container(&mut self) -> Result<&Container, LabError> {
        let name = format!("h{}c", self.number);
        let daemon = self
            .dockerd
            .as_ref()
            .ok_or_else(|| DockerError::Container {
                name: name.clone(),
                reason: "no dockerd runs on this host".into(),
            })?;
        let info = daemon.inspect(&name)?;
        self.name_container(info)
    }

    /// Undoes [`Host::start_docker`]: deletes the container namespace and the bridge, so the
    /// host can be given another subnet.env (the benchmark reuses one rig for every mode).
    pub fn stop_docker(&mut self) -> Result<(), LabError> {
        self.container = None;
        if let Some(mut daemon) = self.dockerd.take() {
            daemon.shut_down()?;
        }
        let links = self.ns.ip(&["-o", "link", "show", DOCKER_BRIDGE]);
        if links.is_ok() {
            self.ns.ip(&["link", "del", DOCKER_BRIDGE])?;
        }
        Ok(())
    }
}

/// What docker reads from flannel's subnet.env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK's address.
    pub network: Ipv4Addr,
    /// FLANNEL_NETWORK's prefix length.
    pub network_len: u8,
    /// FLANNEL_SUBNET's address: the bridge's (gateway) address.
    pub gateway: Ipv4Addr,
    /// FLANNEL_SUBNET's prefix length.
    pub prefix_len: u8,
    /// FLANNEL_MTU.
    pub mtu: u32,
}

impl SubnetEnv {
    /// Parses flannel's `KEY=value` lines.
    pub fn parse(text: &str) -> Result<Self, LabError> {
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .ok_or_else(|| LabError::SubnetEnv {
                    reason: format!("no {key}"),
                })
        };
        let cidr = |key: &str| -> Result<(Ipv4Addr, u8), LabError> {
            let value = get(key)?;
            let bad = || LabError::SubnetEnv {
                reason: format!("{key}={value} is not an IPv4 CIDR"),
            };
            let (addr, len) = value.split_once('/').ok_or_else(bad)?;
            Ok((
                addr.parse().map_err(|_| bad())?,
                len.parse().map_err(|_| bad())?,
            ))
        };
        let (network, network_len) = cidr("FLANNEL_NETWORK")?;
        let (gateway, prefix_len) = cidr("FLANNEL_SUBNET")?;
        let mtu = get("FLANNEL_MTU")?;
        let mtu = mtu.parse().map_err(|_| LabError::SubnetEnv {
            reason: format!("FLANNEL_MTU={mtu} is not a number"),
        })?;
        Ok(Self {
            network,
            network_len,
            gateway,
            prefix_len,
            mtu,
        })
    }

    /// The host's subnet (FLANNEL_SUBNET with the host bits cleared).
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (
            Ipv4Addr::from(u32::from(self.gateway) & overlay_common::net::mask(self.prefix_len)),
            self.prefix_len,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flannel_subnet_env() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=172.16.0.0/12\nFLANNEL_SUBNET=172.16.21.1/24\nFLANNEL_MTU=1472\n\
             FLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        assert_eq!(env.gateway, Ipv4Addr::new(172, 16, 21, 1));
        assert_eq!(env.mtu, 1472);
        assert_eq!(env.subnet(), (Ipv4Addr::new(172, 16, 21, 0), 24));
        assert_eq!(env.network_len, 12);
    }

    #[test]
    fn rejects_missing_mtu() {
        assert!(
            SubnetEnv::parse("FLANNEL_NETWORK=10.0.0.0/8\nFLANNEL_SUBNET=10.1.0.1/24\n").is_err()
        );
    }
}
