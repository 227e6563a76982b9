//! The network configuration flannel keeps at `<prefix>/config`: JSON parsing, defaults and
//! validation.
//!
//! Field names are matched case-insensitively, as Go's `encoding/json` (and so flannel) does, so a
//! config that flannel accepts is accepted here.

use std::net::Ipv4Addr;

use serde_json::{Map, Value};

use super::subnet::Subnet;

/// UDP port of the udp backend when the config names none.
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// UDP port of the vxlan backend on Linux when the config names none.
pub const VXLAN_DEFAULT_PORT: u16 = 8472;
/// VXLAN network identifier when the config names none.
pub const VXLAN_DEFAULT_VNI: u32 = 1;

/// Why a network config is refused. Each variant names the offending field so the one error line
/// the agent prints tells the operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value is not JSON at all.
    #[error("not valid JSON: {source}")]
    Json {
        /// The parser's message, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON is valid but is not an object (or `Backend` is not an object).
    #[error("field {field}: must be a JSON object")]
    NotObject {
        /// `(root)` or `Backend`.
        field: &'static str,
    },
    /// A required field is absent.
    #[error("field {field}: missing")]
    Missing {
        /// The field's name as flannel spells it.
        field: &'static str,
    },
    /// A field has a value of the wrong type or out of range.
    #[error("field {field}: {value} is invalid: {reason}")]
    Invalid {
        /// The field's name as flannel spells it.
        field: &'static str,
        /// The value as found in the config.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `Backend.Type` names no backend flannel knows.
    #[error("field Backend.Type: unknown backend type {backend_type:?} (known: udp, vxlan, alloc)")]
    UnknownBackend {
        /// The type found.
        backend_type: String,
    },
    /// `Backend.Type` names a flannel backend this agent does not implement (yet).
    #[error(
        "field Backend.Type: backend type {backend_type:?} is not supported by overlay-agent \
         (supported: udp, vxlan, alloc)"
    )]
    UnsupportedBackend {
        /// The type found.
        backend_type: String,
    },
}

/// The backend: how packets between hosts are carried, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// IPv4 packets as the payload of UDP datagrams (flannel's default).
    Udp {
        /// Destination UDP port.
        port: u16,
    },
    /// VXLAN (RFC 7348).
    Vxlan {
        /// VXLAN network identifier (24 bits).
        vni: u32,
        /// Destination UDP port.
        port: u16,
        /// Route directly (no encapsulation) to peers on the same L2 segment.
        direct_routing: bool,
        /// VXLAN group based policy extension.
        gbp: bool,
        /// MTU for the overlay device, when the config sets one.
        mtu: Option<u32>,
    },
    /// Lease management only: no device, no forwarding.
    Alloc,
}

impl Backend {
    /// The name flannel writes in a lease's `BackendType`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Backend::Udp { .. } => "udp",
            Backend::Vxlan { .. } => "vxlan",
            Backend::Alloc => "alloc",
        }
    }

    /// Bytes the encapsulation adds to each packet: the MTU of the overlay is the underlay's minus
    /// this (the wire formats' own lengths, `overlay_common::wire`).
    pub fn encap_overhead(&self) -> u32 {
        use overlay_common::maps::Encap;
        match self {
            Backend::Udp { .. } => Encap::Udp.overhead(),
            Backend::Vxlan { .. } => Encap::Vxlan.overhead(),
            Backend::Alloc => Encap::None.overhead(),
        }
    }
}

/// A validated network config with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The whole overlay network (`Network`).
    pub network: Subnet,
    /// Prefix length of each host's subnet (`SubnetLen`).
    pub subnet_len: u8,
    /// Lowest subnet handed out (`SubnetMin`), on a `subnet_len` boundary.
    pub subnet_min: Subnet,
    /// Highest subnet handed out (`SubnetMax`), on a `subnet_len` boundary.
    pub subnet_max: Subnet,
    /// The backend and its options.
    pub backend: Backend,
}

impl NetworkConfig {
    /// Parses and validates the JSON stored at `<prefix>/config`.
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|source| ConfigError::Json { source })?;
        let Value::Object(root) = value else {
            return Err(ConfigError::NotObject { field: "(root)" });
        };
        Self::from_object(&root)
    }

    fn from_object(root: &Map<String, Value>) -> Result<Self, ConfigError> {
        if let Some(v) = get_bool(root, "EnableIPv4")?
            && !v
        {
            return Err(invalid(
                "EnableIPv4",
                "false",
                "overlay-agent needs an IPv4 network",
            ));
        }
        if let Some(true) = get_bool(root, "EnableIPv6")? {
            return Err(invalid(
                "EnableIPv6",
                "true",
                "IPv6 is not supported by overlay-agent yet",
            ));
        }

        let network = match get(root, "Network") {
            None | Some(Value::Null) => return Err(ConfigError::Missing { field: "Network" }),
            Some(v) => parse_subnet("Network", v)?,
        };
        if network.prefix() > 28 {
            return Err(invalid(
                "Network",
                network,
                "the network is too small: the smallest useful network is a /28",
            ));
        }

        let subnet_len = match get_uint(root, "SubnetLen")? {
            None | Some(0) if network.prefix() <= 22 => 24,
            None | Some(0) => network.prefix() + 2,
            Some(len) if len > 30 => {
                return Err(invalid("SubnetLen", len, "must be at most 30"));
            }
            Some(len) => u8::try_from(len).expect("checked above"),
        };
        if subnet_len < network.prefix() + 2 {
            return Err(invalid(
                "SubnetLen",
                subnet_len,
                format!(
                    "the network {network} must hold at least 4 subnets, so SubnetLen must be at \
                     least {}",
                    network.prefix() + 2
                ),
            ));
        }

        let count = network.count_subnets(subnet_len);
        let subnet_min = match get_addr(root, "SubnetMin")? {
            // The first subnet is skipped: its network address equals the Network's own, which
            // confuses tools that see the overlay as one block.
            None => network.nth_from(subnet_len, 1).expect("at least 4 subnets"),
            Some(ip) => boundary("SubnetMin", ip, network, subnet_len)?,
        };
        let subnet_max = match get_addr(root, "SubnetMax")? {
            None => network
                .nth_from(subnet_len, count - 1)
                .expect("inside the network"),
            Some(ip) => boundary("SubnetMax", ip, network, subnet_len)?,
        };
        if subnet_max < subnet_min {
            return Err(invalid(
                "SubnetMax",
                subnet_max.addr(),
                format!("below SubnetMin {}", subnet_min.addr()),
            ));
        }

        let backend = match get(root, "Backend") {
            None | Some(Value::Null) => Backend::Udp {
                port: UDP_DEFAULT_PORT,
            },
            Some(Value::Object(b)) => parse_backend(b)?,
            Some(_) => return Err(ConfigError::NotObject { field: "Backend" }),
        };

        Ok(Self {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
        })
    }

    /// How many subnets lie in [`subnet_min`, `subnet_max`].
    ///
    /// [`subnet_min`]: Self::subnet_min
    /// [`subnet_max`]: Self::subnet_max
    pub fn subnet_count(&self) -> u64 {
        self.subnet_min.span_to(&self.subnet_max)
    }

    /// True when `subnet` can be this host's subnet: inside the Network with the configured
    /// length. Kept leases and reservations need only this; new ones also lie in
    /// [SubnetMin, SubnetMax].
    pub fn fits(&self, subnet: &Subnet) -> bool {
        subnet.prefix() == self.subnet_len && self.network.contains(subnet)
    }

    /// True when `subnet` fits and lies in [SubnetMin, SubnetMax].
    pub fn in_range(&self, subnet: &Subnet) -> bool {
        self.fits(subnet) && self.subnet_min <= *subnet && *subnet <= self.subnet_max
    }
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Looks a field up the way Go's `encoding/json` does: an exact match first, else any key equal
/// to it ignoring ASCII case.
fn get<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(field))
            .map(|(_, v)| v)
    })
}

fn get_bool(obj: &Map<String, Value>, field: &'static str) -> Result<Option<bool>, ConfigError> {
    match get(obj, field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(field, v, "must be true or false")),
    }
}

fn get_uint(obj: &Map<String, Value>, field: &'static str) -> Result<Option<u64>, ConfigError> {
    match get(obj, field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(field, v, "must be a non-negative integer")),
    }
}

fn get_addr(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    match get(obj, field) {
        None | Some(Value::Null) => Ok(None),
        // flannel leaves an all-zero address as "not set".
        Some(Value::String(s)) if s.is_empty() || s == "0.0.0.0" => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| invalid(field, s, "must be an IPv4 address")),
        Some(v) => Err(invalid(field, v, "must be an IPv4 address string")),
    }
}

fn parse_subnet(field: &'static str, v: &Value) -> Result<Subnet, ConfigError> {
    match v {
        Value::String(s) => s
            .parse()
            .map_err(|_| invalid(field, s, "must be an IPv4 CIDR such as 10.5.0.0/16")),
        _ => Err(invalid(field, v, "must be an IPv4 CIDR string")),
    }
}

/// Checks that `ip` starts a subnet of length `len` inside `network`.
fn boundary(
    field: &'static str,
    ip: Ipv4Addr,
    network: Subnet,
    len: u8,
) -> Result<Subnet, ConfigError> {
    if !network.contains_ip(ip) {
        return Err(invalid(field, ip, format!("outside Network {network}")));
    }
    let subnet = Subnet::new(ip, len).expect("len <= 30");
    if subnet.addr() != ip {
        return Err(invalid(
            field,
            ip,
            format!("not on a /{len} (SubnetLen) boundary"),
        ));
    }
    Ok(subnet)
}

fn parse_backend(b: &Map<String, Value>) -> Result<Backend, ConfigError> {
    let ty = match get(b, "Type") {
        None | Some(Value::Null) => "udp".to_owned(),
        Some(Value::String(s)) => s.to_ascii_lowercase(),
        Some(v) => return Err(invalid("Backend.Type", v, "must be a string")),
    };
    let port = |default: u16| -> Result<u16, ConfigError> {
        match get_uint(b, "Port").map_err(|e| rename(e, "Backend.Port"))? {
            None | Some(0) => Ok(default),
            Some(p) => {
                u16::try_from(p).map_err(|_| invalid("Backend.Port", p, "must be at most 65535"))
            }
        }
    };
    match ty.as_str() {
        "udp" => Ok(Backend::Udp {
            port: port(UDP_DEFAULT_PORT)?,
        }),
        "vxlan" => {
            let vni = match get_uint(b, "VNI").map_err(|e| rename(e, "Backend.VNI"))? {
                None | Some(0) => VXLAN_DEFAULT_VNI,
                Some(v) if v > 0xFF_FFFF => {
                    return Err(invalid("Backend.VNI", v, "must fit in 24 bits"));
                }
                Some(v) => u32::try_from(v).expect("checked above"),
            };
            let mtu = match get_uint(b, "MTU").map_err(|e| rename(e, "Backend.MTU"))? {
                None | Some(0) => None,
                Some(m) if !(68..=65535).contains(&m) => {
                    return Err(invalid("Backend.MTU", m, "must be within 68..=65535"));
                }
                Some(m) => Some(u32::try_from(m).expect("checked above")),
            };
            Ok(Backend::Vxlan {
                vni,
                port: port(VXLAN_DEFAULT_PORT)?,
                direct_routing: get_bool(b, "DirectRouting")
                    .map_err(|e| rename(e, "Backend.DirectRouting"))?
                    .unwrap_or(false),
                gbp: get_bool(b, "GBP")
                    .map_err(|e| rename(e, "Backend.GBP"))?
                    .unwrap_or(false),
                mtu,
            })
        }
        "alloc" => Ok(Backend::Alloc),
        "host-gw" | "wireguard" | "ipip" | "ipsec" | "gce" | "aws-vpc" | "ali-vpc"
        | "tencent-vpc" | "extension" => Err(ConfigError::UnsupportedBackend { backend_type: ty }),
        _ => Err(ConfigError::UnknownBackend { backend_type: ty }),
    }
}

/// Backend option errors are found by the generic getters, which know only the bare name.
fn rename(e: ConfigError, field: &'static str) -> ConfigError {
    match e {
        ConfigError::Invalid { value, reason, .. } => ConfigError::Invalid {
            field,
            value,
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
    }

    fn net(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    fn err(s: &str) -> String {
        parse(s).unwrap_err().to_string()
    }

    #[test]
    fn article_config_gets_flannel_defaults() {
        let c = parse(r#"{"Network": "172.16.0.0/12"}"#).unwrap();
        assert_eq!(c.network, net("172.16.0.0/12"));
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, net("172.16.1.0/24"));
        assert_eq!(c.subnet_max, net("172.31.255.0/24"));
        assert_eq!(c.backend, Backend::Udp { port: 8285 });
        assert_eq!(c.subnet_count(), 4095);
    }

    #[test]
    fn subnet_len_default_for_small_networks() {
        assert_eq!(
            parse(r#"{"Network":"10.0.0.0/22"}"#).unwrap().subnet_len,
            24
        );
        assert_eq!(
            parse(r#"{"Network":"10.0.0.0/23"}"#).unwrap().subnet_len,
            25
        );
        let c = parse(r#"{"Network":"10.0.0.0/28"}"#).unwrap();
        assert_eq!(c.subnet_len, 30);
        assert_eq!(c.subnet_min, net("10.0.0.4/30"));
        assert_eq!(c.subnet_max, net("10.0.0.12/30"));
        assert_eq!(c.subnet_count(), 3);
    }

    #[test]
    fn fields_are_case_insensitive_like_go() {
        let c =
            parse(r#"{"network":"10.1.0.0/16","subnetlen":26,"backend":{"type":"VXLAN","vni":7}}"#)
                .unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(
            c.backend,
            Backend::Vxlan {
                vni: 7,
                port: 8472,
                direct_routing: false,
                gbp: false,
                mtu: None
            }
        );
    }

    #[test]
    fn explicit_range_and_backends() {
        let c = parse(
            r#"{"Network":"10.1.0.0/16","SubnetLen":24,"SubnetMin":"10.1.10.0",
                "SubnetMax":"10.1.59.0","Backend":{"Type":"alloc"}}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_count(), 50);
        assert_eq!(c.backend, Backend::Alloc);
        assert!(c.in_range(&net("10.1.10.0/24")));
        assert!(!c.in_range(&net("10.1.60.0/24")));
        assert!(c.fits(&net("10.1.60.0/24")));
        assert!(!c.fits(&net("10.1.60.0/25")));
        let c = parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"udp","Port":9000}}"#).unwrap();
        assert_eq!(c.backend, Backend::Udp { port: 9000 });
        assert_eq!(c.backend.encap_overhead(), 28);
        let c = parse(r#"{"Network":"10.1.0.0/16","Backend":{}}"#).unwrap();
        assert_eq!(c.backend, Backend::Udp { port: 8285 });
        assert_eq!(
            parse(r#"{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","MTU":1400,"GBP":true}}"#)
                .unwrap()
                .backend,
            Backend::Vxlan {
                vni: 1,
                port: 8472,
                direct_routing: false,
                gbp: true,
                mtu: Some(1400)
            }
        );
    }

    #[test]
    fn host_bits_of_network_are_dropped_like_go() {
        assert_eq!(
            parse(r#"{"Network":"10.1.2.3/16"}"#).unwrap().network,
            net("10.1.0.0/16")
        );
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"Network": "#, "not valid JSON"),
            (r#"[1]"#, "(root): must be a JSON object"),
            (r#"{}"#, "field Network: missing"),
            (r#"{"Network": null}"#, "field Network: missing"),
            (r#"{"Network": 5}"#, "field Network"),
            (r#"{"Network": "10.0.0.0"}"#, "field Network"),
            (
                r#"{"Network": "10.0.0.0/29"}"#,
                "field Network: 10.0.0.0/29 is invalid: the network is too small",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetLen": 31}"#,
                "field SubnetLen: 31 is invalid: must be at most 30",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetLen": -1}"#,
                "field SubnetLen",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetLen": "24"}"#,
                "field SubnetLen",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetLen": 17}"#,
                "field SubnetLen: 17 is invalid: the network 10.0.0.0/16 must hold at least 4 subnets",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetLen": 8}"#,
                "field SubnetLen",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}"#,
                "field SubnetMin: 10.1.0.0 is invalid: outside Network",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.1"}"#,
                "field SubnetMin: 10.0.1.1 is invalid: not on a /24",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMin": "bogus"}"#,
                "field SubnetMin",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMin": 3}"#,
                "field SubnetMin",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMax": "11.0.0.0"}"#,
                "field SubnetMax: 11.0.0.0 is invalid: outside Network",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMax": "10.0.5.128"}"#,
                "field SubnetMax",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.5.0"}"#,
                "field SubnetMax: 10.0.5.0 is invalid: below SubnetMin",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": 3}"#,
                "field Backend: must be a JSON object",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "gre"}}"#,
                "field Backend.Type: unknown backend type \"gre\"",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": 1}}"#,
                "field Backend.Type",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "host-gw"}}"#,
                "field Backend.Type: backend type \"host-gw\" is not supported",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}"#,
                "field Backend.Port",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "udp", "Port": "x"}}"#,
                "field Backend.Port",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "VNI": 16777216}}"#,
                "field Backend.VNI",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "MTU": 20}}"#,
                "field Backend.MTU",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "Backend": {"Type": "vxlan", "GBP": "yes"}}"#,
                "field Backend.GBP",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "EnableIPv6": true}"#,
                "field EnableIPv6",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "EnableIPv4": false}"#,
                "field EnableIPv4",
            ),
            (
                r#"{"Network": "10.0.0.0/16", "EnableIPv4": "no"}"#,
                "field EnableIPv4",
            ),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(
                got.contains(want),
                "{json}: got {got:?}, want it to contain {want:?}"
            );
        }
    }
}
