//! The netfilter rules flanneld installs, through iptables(8) as flanneld does, so whichever
//! backend (nft or legacy) the host's docker uses gets them.
//!
//! - Forwarding: docker >= 1.13 sets the FORWARD policy to DROP and accepts only its own bridge's
//!   traffic; overlay packets delivered through the host stack (the TUN datapath, `--decap xdp`,
//!   `--deliver-via-stack`, and the eBPF path's first packets to a container it has not learned
//!   yet) would be dropped there. Chain `OVERLAY-FWD`, jumped to first from FORWARD, accepts
//!   traffic from and to the Network.
//! - `--ip-masq`: chain `OVERLAY-POSTRTG` in nat POSTROUTING masquerades container traffic that
//!   leaves the Network, and traffic from outside to other hosts' containers, but not traffic
//!   between containers (flanneld's rules).
//!
//! Each chain is flushed and refilled, so a changed Network or subnet leaves no stale rule.

use std::{net::Ipv4Addr, process::Command};

/// Errors of installing rules.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// iptables is not installed (or not on PATH).
    #[error("iptables not found: install it (Debian: apt-get install iptables)")]
    Missing,
    /// An iptables command failed.
    #[error("iptables {args}: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
}

const FORWARD_CHAIN: &str = "OVERLAY-FWD";
const MASQ_CHAIN: &str = "OVERLAY-POSTRTG";

/// A subnet as iptables writes it.
fn cidr((addr, len): (Ipv4Addr, u8)) -> String {
    format!("{addr}/{len}")
}

/// Accepts forwarding from and to the Network.
pub fn ensure_forward_rules(network: (Ipv4Addr, u8)) -> Result<(), IptablesError> {
    let net = cidr(network);
    fill_chain(
        "filter",
        "FORWARD",
        FORWARD_CHAIN,
        &[
            vec!["-s", &net, "-j", "ACCEPT"],
            vec!["-d", &net, "-j", "ACCEPT"],
        ],
    )
}

/// flanneld's `--ip-masq` rules for `network`, with this host's `subnet`.
pub fn ensure_masquerade_rules(
    network: (Ipv4Addr, u8),
    subnet: (Ipv4Addr, u8),
) -> Result<(), IptablesError> {
    let (net, sub) = (cidr(network), cidr(subnet));
    fill_chain(
        "nat",
        "POSTROUTING",
        MASQ_CHAIN,
        &[
            // Between containers: addresses stay as they are.
            vec!["-s", &net, "-d", &net, "-j", "RETURN"],
            // Containers to the outside world (multicast excepted).
            vec![
                "-s",
                &net,
                "!",
                "-d",
                "224.0.0.0/4",
                "-j",
                "MASQUERADE",
                "--random-fully",
            ],
            // The outside world to this host's containers: as is.
            vec!["!", "-s", &net, "-d", &sub, "-j", "RETURN"],
            // The outside world (this host itself, say) to other hosts' containers.
            vec![
                "!",
                "-s",
                &net,
                "-d",
                &net,
                "-j",
                "MASQUERADE",
                "--random-fully",
            ],
        ],
    )
}

/// Removes both chains and their jumps; every failure is collected, none stops the rest.
/// Missing chains are not failures.
pub fn remove_rules() -> Vec<IptablesError> {
    let mut errors = Vec::new();
    for (table, parent, chain) in [
        ("filter", "FORWARD", FORWARD_CHAIN),
        ("nat", "POSTROUTING", MASQ_CHAIN),
    ] {
        if iptables(&["-t", table, "-n", "-L", chain]).is_err() {
            continue;
        }
        while iptables(&["-t", table, "-C", parent, "-j", chain]).is_ok() {
            if let Err(e) = iptables(&["-t", table, "-D", parent, "-j", chain]) {
                errors.push(e);
                break;
            }
        }
        for args in [["-t", table, "-F", chain], ["-t", table, "-X", chain]] {
            if let Err(e) = iptables(&args) {
                errors.push(e);
            }
        }
    }
    errors
}

/// Creates `chain` if needed, replaces its rules, and jumps to it first thing from `parent`.
fn fill_chain(
    table: &str,
    parent: &str,
    chain: &str,
    rules: &[Vec<&str>],
) -> Result<(), IptablesError> {
    if iptables(&["-t", table, "-n", "-L", chain]).is_err() {
        iptables(&["-t", table, "-N", chain])?;
    }
    iptables(&["-t", table, "-F", chain])?;
    for rule in rules {
        let mut args = vec!["-t", table, "-A", chain];
        args.extend(rule.iter().copied());
        iptables(&args)?;
    }
    // First in the parent chain: docker's own FORWARD rules end in drops for other bridges.
    if iptables(&["-t", table, "-C", parent, "-j", chain]).is_err() {
        iptables(&["-t", table, "-I", parent, "1", "-j", chain])?;
    }
    Ok(())
}

fn iptables(args: &[&str]) -> Result<(), IptablesError> {
    // -w: wait for the xtables lock instead of failing when docker holds it.
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|_| IptablesError::Missing)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
