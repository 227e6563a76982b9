//! Fuzzes the network config parser (`overlay_agent::control::config::NetworkConfig::parse`,
//! flannel's `<prefix>/config` JSON, the first thing every agent reads):
//! - it never panics, whatever the bytes;
//! - a config it accepts satisfies the documented invariants: a Network of /28 or wider, a
//!   SubnetLen from the Network's length + 2 to 30, SubnetMin <= SubnetMax, both subnets of
//!   SubnetLen inside the Network, a VNI of 24 bits, an MTU within 68..=65535;
//! - it re-serialises: the accepted config written out with every field explicit (flannel's
//!   names) parses to the same config;
//! - field names match ignoring ASCII case, as Go's `encoding/json` matches them: the same JSON
//!   with every key lower-cased parses to the same result (unless two keys then collide).
//!
//! Run: `cargo +nightly fuzz run config` (`cargo xtask test` runs it for 15 s).
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::control::config::{Backend, NetworkConfig};
use serde_json::{Map, Value, json};

/// The config with every field explicit, as an operator could have written it.
fn explicit(c: &NetworkConfig) -> Value {
    let backend = match &c.backend {
        Backend::Udp { port } => json!({"Type": "udp", "Port": port}),
        Backend::Vxlan {
            vni,
            port,
            direct_routing,
            gbp,
            mtu,
        } => json!({
            "Type": "vxlan", "VNI": vni, "Port": port, "DirectRouting": direct_routing,
            "GBP": gbp, "MTU": mtu,
        }),
        Backend::Alloc => json!({"Type": "alloc"}),
    };
    json!({
        "Network": c.network.to_string(),
        "SubnetLen": c.subnet_len,
        "SubnetMin": c.subnet_min.addr().to_string(),
        "SubnetMax": c.subnet_max.addr().to_string(),
        "Backend": backend,
    })
}

/// `value` with the keys of the root and of `Backend` lower-cased; `None` when two collide.
fn lower_cased(value: &Value) -> Option<Value> {
    fn lower(obj: &Map<String, Value>, nested: bool) -> Option<Map<String, Value>> {
        let mut out = Map::new();
        for (k, v) in obj {
            let v = match v {
                Value::Object(b) if nested && k.eq_ignore_ascii_case("backend") => {
                    Value::Object(lower(b, false)?)
                }
                other => other.clone(),
            };
            if out.insert(k.to_ascii_lowercase(), v).is_some() {
                return None;
            }
        }
        Some(out)
    }
    match value {
        Value::Object(root) => lower(root, true).map(Value::Object),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let parsed = NetworkConfig::parse(data);

    if let Ok(value) = serde_json::from_slice::<Value>(data)
        && let Some(lower) = lower_cased(&value)
    {
        let again = NetworkConfig::parse(lower.to_string().as_bytes());
        match (&parsed, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{lower}"),
            (Err(_), Err(_)) => {}
            (a, b) => panic!("case changed the verdict: {a:?} / {b:?} for {lower}"),
        }
    }

    let Ok(c) = parsed else { return };
    let net = c.network;
    assert!(net.prefix() <= 28, "{c:?}");
    assert!(c.subnet_len >= net.prefix() + 2 && c.subnet_len <= 30, "{c:?}");
    assert!(c.subnet_min <= c.subnet_max, "{c:?}");
    for s in [c.subnet_min, c.subnet_max] {
        assert!(c.fits(&s) && c.in_range(&s), "{s} in {c:?}");
    }
    assert!(c.subnet_count() >= 1, "{c:?}");
    if let Backend::Vxlan { vni, mtu, .. } = c.backend {
        assert!(vni <= 0xff_ffff, "{c:?}");
        assert!(mtu.is_none_or(|m| (68..=65535).contains(&m)), "{c:?}");
    }

    let text = explicit(&c).to_string();
    match NetworkConfig::parse(text.as_bytes()) {
        Ok(again) => assert_eq!(again, c, "{text}"),
        Err(e) => panic!("{c:?} written out as {text} is refused: {e}"),
    }
});
