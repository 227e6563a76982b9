//! Fuzzes the lease value parser (`overlay_agent::control::lease::LeaseAttrs::read`), which reads
//! every other host's lease JSON from etcd:
//! - it never panics, whatever the bytes;
//! - a value over `MAX_LEASE_VALUE` is refused as `TooLarge` with its length, before any parsing,
//!   and a lease padded with JSON whitespace up to exactly the bound still reads the same;
//! - what it reads re-serialises (`to_json`, the JSON we write) to a value that reads back to
//!   the same lease (a `BackendType` of "udp" comes back absent, as flanneld's udp leases are),
//!   and serialising that gives the same bytes again.
//!
//! Run: `cargo +nightly fuzz run lease` (`cargo xtask test` runs it for 15 s).
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay_agent::control::lease::{BadValue, LeaseAttrs, MAX_LEASE_VALUE};

fuzz_target!(|data: &[u8]| {
    let read = LeaseAttrs::read(data);

    // The size bound, on one input in eight (a 64 KiB parse per run would slow the search).
    if data.first().is_some_and(|b| b % 8 == 0) {
        let mut over = data.to_vec();
        over.resize(MAX_LEASE_VALUE + 1 + usize::from(data[0]), b' ');
        assert_eq!(
            LeaseAttrs::read(&over),
            Err(BadValue::TooLarge { len: over.len() })
        );
        if data.len() <= MAX_LEASE_VALUE {
            let mut padded = data.to_vec();
            padded.resize(MAX_LEASE_VALUE, b' ');
            match (&read, LeaseAttrs::read(&padded)) {
                (Ok(a), Ok(b)) => assert_eq!(*a, b),
                (Ok(a), Err(e)) => panic!("{a:?} refused once padded: {e}"),
                // Trailing whitespace may complete nothing that was incomplete before.
                (Err(_), Ok(b)) => panic!("accepted only once padded: {b:?}"),
                (Err(_), Err(_)) => {}
            }
        }
    }

    let Ok(attrs) = read else { return };
    let json = attrs.to_json();
    let again = LeaseAttrs::read(json.as_bytes())
        .unwrap_or_else(|e| panic!("our own JSON {json} does not read back: {e}"));
    assert_eq!(again.public_ip, attrs.public_ip, "{json}");
    assert_eq!(again.public_ipv6, attrs.public_ipv6, "{json}");
    assert_eq!(again.backend_data, attrs.backend_data, "{json}");
    let backend_type = if attrs.backend_type == "udp" {
        ""
    } else {
        attrs.backend_type.as_str()
    };
    assert_eq!(again.backend_type, backend_type, "{json}");
    assert_eq!(again.to_json(), json);
});
