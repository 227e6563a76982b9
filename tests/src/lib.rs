//! Helpers for the integration tests: network namespaces, veth pairs and processes, each behind an
//! RAII guard so a failing test still cleans up.
//!
//! Most tests need root (namespaces, eBPF). Each test file runs on [`harness`] (libtest's command
//! line and output, through libtest-mimic), which reports a root test run without root as
//! **ignored**, with the reason, never as passed; `cargo xtask test` fails when any test was
//! ignored. `OVERLAY_TESTS_REQUIRE_ROOT=1` (set by `cargo xtask test`) makes such a test fail
//! instead, naming it.

pub mod bpffs;
pub mod capture;
pub mod cluster;
pub mod docker;
pub mod etcd;
pub mod etcd_cluster;
pub mod flanneld;
pub mod flow;
pub mod fuzz;
pub mod lab;
pub mod lease_watch;
pub mod migration;
pub mod netns;
pub mod receive_cases;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The test runner of every file in `tests/tests/` (`harness = false` in Cargo.toml): libtest's
/// arguments (filters, `--test-threads`, `--list`, `--ignored`, ...) and its `test result:` line,
/// with tests that need root reported as ignored when run without it.
pub mod harness {
    use libtest_mimic::{Arguments, Completion, Trial};

    /// What a test needs to run.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Needs {
        /// Nothing special: it always runs.
        Nothing,
        /// Root (network namespaces, eBPF, mounts): ignored without it.
        Root,
    }

    /// One test of a file.
    pub struct Test {
        name: &'static str,
        needs: Needs,
        body: fn(),
    }

    impl Test {
        /// A test that runs as any user.
        pub fn plain(name: &'static str, body: fn()) -> Self {
            Self {
                name,
                needs: Needs::Nothing,
                body,
            }
        }

        /// A test that needs root.
        pub fn root(name: &'static str, body: fn()) -> Self {
            Self {
                name,
                needs: Needs::Root,
                body,
            }
        }
    }

    /// Why a root test did not run, as the runner prints it.
    pub const NEEDS_ROOT: &str =
        "needs root (network namespaces, eBPF); run as root, or `cargo xtask test`";

    /// Whether a test needing `needs` can run here: `Ok(true)` to run it, `Ok(false)` to report it
    /// ignored, `Err` to fail it (`OVERLAY_TESTS_REQUIRE_ROOT=1`).
    pub fn may_run(needs: Needs, is_root: bool, require_root: bool) -> Result<bool, String> {
        match (needs, is_root, require_root) {
            (Needs::Nothing, _, _) | (Needs::Root, true, _) => Ok(true),
            (Needs::Root, false, true) => Err(format!(
                "{NEEDS_ROOT}, and OVERLAY_TESTS_REQUIRE_ROOT=1 forbids skipping it"
            )),
            (Needs::Root, false, false) => Ok(false),
        }
    }

    /// Runs `tests` as libtest would and exits with its status.
    pub fn run(tests: Vec<Test>) -> ! {
        let args = Arguments::from_args();
        let is_root = crate::is_root();
        let require_root = std::env::var_os("OVERLAY_TESTS_REQUIRE_ROOT").is_some_and(|v| v == "1");
        let trials = tests
            .into_iter()
            .map(|t| {
                Trial::ignorable_test(t.name, move || {
                    match may_run(t.needs, is_root, require_root)? {
                        true => {
                            (t.body)();
                            Ok(Completion::Completed)
                        }
                        false => Ok(Completion::ignored_with(NEEDS_ROOT)),
                    }
                })
            })
            .collect();
        libtest_mimic::run(&args, trials).exit()
    }

    /// The `main` of a test file: `overlay_tests::test_main!(root a, root b, plain c);` where each
    /// name is a `fn()` of the file, `root` ones needing root.
    #[macro_export]
    macro_rules! test_main {
        ($($needs:ident $name:ident),* $(,)?) => {
            fn main() {
                $crate::harness::run(vec![
                    $($crate::harness::Test::$needs(stringify!($name), $name)),*
                ])
            }
        };
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn root_tests_without_root_are_ignored_or_fail_never_pass() {
            assert_eq!(may_run(Needs::Root, true, false), Ok(true));
            assert_eq!(may_run(Needs::Root, true, true), Ok(true));
            assert_eq!(may_run(Needs::Root, false, false), Ok(false));
            assert!(may_run(Needs::Root, false, true).is_err());
            assert_eq!(may_run(Needs::Nothing, false, true), Ok(true));
        }
    }
}
