//! Helpers for the integration tests: network namespaces, veth pairs and processes, each behind an
//! RAII guard so a failing test still cleans up.
//!
//! The tests need root (namespaces, eBPF). Without root they skip with a message, unless
//! `OVERLAY_TESTS_REQUIRE_ROOT=1` (set by `cargo xtask test`) turns the skip into a failure, so CI
//! can never pass by skipping.

pub mod bpffs;
pub mod cluster;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod receive_cases;

/// Returns true when the test may run; prints why and returns false when it must skip.
///
/// Panics instead of skipping when `OVERLAY_TESTS_REQUIRE_ROOT=1`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("OVERLAY_TESTS_REQUIRE_ROOT").is_some_and(|v| v == "1") {
        panic!("{test}: needs root (network namespaces, eBPF), and OVERLAY_TESTS_REQUIRE_ROOT=1");
    }
    eprintln!(
        "SKIPPED {test}: needs root (network namespaces, eBPF); run `cargo xtask test` as root"
    );
    false
}
