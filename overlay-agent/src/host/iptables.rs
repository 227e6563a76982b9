//! The netfilter rules flanneld installs, through iptables(8) as flanneld does, so whichever
//! backend (nft or legacy) the host's docker uses gets them.
//!
//! The chains, jumps, rule specs and comments are flanneld's own (v0.20), so a host that ran
//! flanneld is adopted as it is: installing refills `FLANNEL-FWD`/`FLANNEL-POSTRTG` in place and
//! leaves exactly one jump to each, instead of a second set of identical rules beside flanneld's.
//! Chains of older versions of this agent (`OVERLAY-FWD`, `OVERLAY-POSTRTG`) are removed for the
//! same reason.
//!
//! - Forwarding: docker >= 1.13 sets the FORWARD policy to DROP and accepts only its own bridge's
//!   traffic; overlay packets delivered through the host stack (the TUN datapath, `--decap xdp`,
//!   `--deliver-via-stack`, and the eBPF path's first packets to a container it has not learned
//!   yet) would be dropped there. `FLANNEL-FWD`, jumped to first from FORWARD, accepts traffic
//!   from and to the Network.
//! - `--ip-masq`: `FLANNEL-POSTRTG` in nat POSTROUTING masquerades container traffic that leaves
//!   the Network, and traffic from outside to other hosts' containers, but not traffic between
//!   containers nor what kube-proxy marked.
//!
//! Each chain is refilled in one `iptables-restore --noflush` transaction per table, so no packet
//! sees a half-filled chain and a changed Network or subnet leaves no stale rule.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

/// Errors of installing or checking rules.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    /// iptables (or iptables-restore) is not installed, or not on PATH.
    #[error("{program} not found: install it (Debian: apt-get install iptables)")]
    Missing {
        /// The program.
        program: &'static str,
    },
    /// An iptables command failed.
    #[error("iptables {args}: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// An iptables-restore transaction failed; nothing of it was applied.
    #[error("iptables-restore of table {table}: {stderr}{hint}")]
    Restore {
        /// The table.
        table: &'static str,
        /// What it printed.
        stderr: String,
        /// What may help.
        hint: &'static str,
    },
}

/// flanneld's forward chain.
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
/// flanneld's masquerading chain.
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// The eBPF datapath's chain of overlay traffic conntrack must not follow (see
/// [`untracked_rules`]). flanneld has no counterpart.
pub const UNTRACKED_CHAIN: &str = "OVERLAY-UNTRACKED";
/// Chains of agent versions before the FLANNEL-* adoption: `(table, parent, chain)`.
const LEGACY_CHAINS: [(&str, &str, &str); 2] = [
    ("filter", "FORWARD", "OVERLAY-FWD"),
    ("nat", "POSTROUTING", "OVERLAY-POSTRTG"),
];
/// The mark kube-proxy puts on traffic it masquerades itself.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
const FORWARD_COMMENT: &str = "flanneld forward";
const MASQ_COMMENT: &str = "flanneld masq";
const UNTRACKED_COMMENT: &str = "overlay-agent: delivered past conntrack";

/// One chain of rules and the jump to it from a built-in chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// The built-in chain that jumps to [`RuleSet::chain`].
    pub parent: &'static str,
    /// The chain.
    pub chain: &'static str,
    /// The jump's rule spec, in `parent`.
    pub jump: Vec<String>,
    /// The chain's rule specs, in order.
    pub rules: Vec<Vec<String>>,
}

/// A subnet as iptables writes it.
fn cidr((addr, len): (Ipv4Addr, u8)) -> String {
    format!("{addr}/{len}")
}

fn spec(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// flanneld's forward rules: accept forwarding from and to the Network.
pub fn forward_rules(network: (Ipv4Addr, u8)) -> RuleSet {
    let net = cidr(network);
    let c = FORWARD_COMMENT;
    RuleSet {
        table: "filter",
        parent: "FORWARD",
        chain: FORWARD_CHAIN,
        jump: spec(&["-m", "comment", "--comment", c, "-j", FORWARD_CHAIN]),
        rules: vec![
            spec(&["-s", &net, "-m", "comment", "--comment", c, "-j", "ACCEPT"]),
            spec(&["-d", &net, "-m", "comment", "--comment", c, "-j", "ACCEPT"]),
        ],
    }
}

/// flanneld's `--ip-masq` rules for `network`, with this host's `subnet`; `random_fully` adds
/// `--random-fully` to the MASQUERADE rules (off with `--ip-masq-fully-random-disable`).
pub fn masquerade_rules(
    network: (Ipv4Addr, u8),
    subnet: (Ipv4Addr, u8),
    random_fully: bool,
) -> RuleSet {
    let (net, sub) = (cidr(network), cidr(subnet));
    let c = MASQ_COMMENT;
    let masquerade = |mut rule: Vec<String>| {
        rule.extend(spec(&["-m", "comment", "--comment", c, "-j", "MASQUERADE"]));
        if random_fully {
            rule.push("--random-fully".to_owned());
        }
        rule
    };
    RuleSet {
        table: "nat",
        parent: "POSTROUTING",
        chain: MASQ_CHAIN,
        jump: spec(&["-m", "comment", "--comment", c, "-j", MASQ_CHAIN]),
        rules: vec![
            // kube-proxy masquerades what it marked; twice would break it on some kernels.
            spec(&[
                "-m",
                "mark",
                "--mark",
                KUBE_PROXY_MARK,
                "-m",
                "comment",
                "--comment",
                c,
                "-j",
                "RETURN",
            ]),
            // Between containers: addresses stay as they are.
            spec(&[
                "-s",
                &net,
                "-d",
                &net,
                "-m",
                "comment",
                "--comment",
                c,
                "-j",
                "RETURN",
            ]),
            // Containers to the outside world (multicast excepted).
            masquerade(spec(&["-s", &net, "!", "-d", "224.0.0.0/4"])),
            // The outside world to this host's containers: as is.
            spec(&[
                "!",
                "-s",
                &net,
                "-d",
                &sub,
                "-m",
                "comment",
                "--comment",
                c,
                "-j",
                "RETURN",
            ]),
            // The outside world (this host itself, say) to other hosts' containers.
            masquerade(spec(&["!", "-s", &net, "-d", &net])),
        ],
    }
}

/// With direct delivery the eBPF programs put packets from other hosts straight into the
/// containers, past the host's conntrack, which then sees only the containers' side of a
/// connection. NAT on that side breaks it: docker's own `-s <bip> ! -o docker0 -j MASQUERADE`
/// (docker's default without `--ip-masq=false`) picks the connection up mid-stream and rewrites
/// the container's replies to the host's address, which the far end resets. So the containers'
/// traffic to the rest of the Network is not tracked at all (raw table, before conntrack and
/// whatever order docker gives its nat rules); the other direction already passes it where the
/// programs deliver. Traffic within this host's subnet, and to the outside world, is tracked as
/// ever.
pub fn untracked_rules(network: (Ipv4Addr, u8), subnet: (Ipv4Addr, u8)) -> RuleSet {
    let (net, sub) = (cidr(network), cidr(subnet));
    let c = UNTRACKED_COMMENT;
    RuleSet {
        table: "raw",
        parent: "PREROUTING",
        chain: UNTRACKED_CHAIN,
        jump: spec(&["-m", "comment", "--comment", c, "-j", UNTRACKED_CHAIN]),
        rules: vec![
            spec(&["-d", &sub, "-m", "comment", "--comment", c, "-j", "RETURN"]),
            spec(&[
                "-s",
                &sub,
                "-d",
                &net,
                "-m",
                "comment",
                "--comment",
                c,
                "-j",
                "CT",
                "--notrack",
            ]),
        ],
    }
}

/// An argument as iptables-restore reads it (the comments hold spaces).
fn quote(arg: &str) -> String {
    if arg.contains(|c: char| c.is_whitespace() || c == '"') {
        format!("\"{}\"", arg.replace('"', "\\\""))
    } else {
        arg.to_owned()
    }
}

/// One restore line: `head` (`-A CHAIN`, `-I CHAIN 1`) and the rule.
fn line(head: &str, rule: &[String]) -> String {
    let mut l = head.to_owned();
    for a in rule {
        l.push(' ');
        l.push_str(&quote(a));
    }
    l.push('\n');
    l
}

impl RuleSet {
    /// The iptables-restore transaction that makes the host hold exactly this set: the chain
    /// created or flushed and refilled, every jump to it found in `parent_rules` (the parent
    /// chain as `iptables -S` prints it: a previous run's, flanneld's, duplicates) deleted, and
    /// one jump inserted first.
    pub fn restore_script(&self, parent_rules: &str) -> String {
        let mut s = format!(
            "*{}\n:{} - [0:0]\n-F {}\n",
            self.table, self.chain, self.chain
        );
        let jump_suffix = format!(" -j {}", self.chain);
        let prefix = format!("-A {} ", self.parent);
        for existing in parent_rules.lines().map(str::trim_end) {
            if let Some(rest) = existing.strip_prefix(&prefix)
                && existing.ends_with(&jump_suffix)
            {
                s.push_str(&format!("-D {} {rest}\n", self.parent));
            }
        }
        s.push_str(&line(&format!("-I {} 1", self.parent), &self.jump));
        let append = format!("-A {}", self.chain);
        for rule in &self.rules {
            s.push_str(&line(&append, rule));
        }
        s.push_str("COMMIT\n");
        s
    }

    /// Installs the set (see [`RuleSet::restore_script`]), after removing the chain an older
    /// agent version used for the same purpose.
    pub fn install(&self) -> Result<(), IptablesError> {
        for (table, parent, chain) in LEGACY_CHAINS {
            if table == self.table {
                remove_chain(table, parent, chain)?;
            }
        }
        let parent_rules = iptables_output(&["-t", self.table, "-S", self.parent])?;
        restore(self.table, &self.restore_script(&parent_rules))
    }

    /// Whether the chain, the jump and every rule are in place (order is not checked, as
    /// flanneld does not either).
    pub fn is_intact(&self) -> Result<bool, IptablesError> {
        let mut checks = vec![(self.parent, &self.jump)];
        checks.extend(self.rules.iter().map(|r| (self.chain, r)));
        for (chain, rule) in checks {
            let mut args = vec!["-t", self.table, "-C", chain];
            args.extend(rule.iter().map(String::as_str));
            match iptables(&args) {
                Ok(()) => {}
                Err(IptablesError::Failed { .. }) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Removes the chain, the one an older agent version used for the same purpose, and every
    /// jump to them.
    pub fn remove(&self) -> Result<(), IptablesError> {
        for (table, parent, chain) in LEGACY_CHAINS {
            if table == self.table {
                remove_chain(table, parent, chain)?;
            }
        }
        remove_chain(self.table, self.parent, self.chain)
    }

    /// Whether the chain, or the one an older agent version used for it, exists.
    pub fn present(&self) -> bool {
        chain_exists(self.table, self.chain)
            || LEGACY_CHAINS
                .iter()
                .any(|(t, _, c)| *t == self.table && chain_exists(t, c))
    }

    /// Checks the set and reinstalls it when anything is missing; true when it had to.
    pub fn ensure(&self) -> Result<bool, IptablesError> {
        if self.is_intact()? {
            return Ok(false);
        }
        self.install()?;
        Ok(true)
    }
}

/// Removes `chain` of `table` and every jump to it from `parent`. A missing chain is no error.
fn remove_chain(table: &'static str, parent: &str, chain: &str) -> Result<(), IptablesError> {
    if iptables(&["-t", table, "-n", "-L", chain]).is_err() {
        return Ok(());
    }
    let jump_suffix = format!(" -j {chain}");
    let prefix = format!("-A {parent} ");
    let mut script = format!("*{table}\n");
    for existing in iptables_output(&["-t", table, "-S", parent])?.lines() {
        if let Some(rest) = existing.strip_prefix(&prefix)
            && existing.trim_end().ends_with(&jump_suffix)
        {
            script.push_str(&format!("-D {parent} {rest}\n"));
        }
    }
    script.push_str(&format!("-F {chain}\n-X {chain}\nCOMMIT\n"));
    restore(table, &script)
}

/// Every chain the agent (any version) installs, as `(table, parent, chain)`.
pub fn all_chains() -> [(&'static str, &'static str, &'static str); 5] {
    [
        ("filter", "FORWARD", FORWARD_CHAIN),
        ("nat", "POSTROUTING", MASQ_CHAIN),
        ("raw", "PREROUTING", UNTRACKED_CHAIN),
        LEGACY_CHAINS[0],
        LEGACY_CHAINS[1],
    ]
}

/// Whether `chain` exists in `table`.
pub fn chain_exists(table: &str, chain: &str) -> bool {
    iptables(&["-t", table, "-n", "-L", chain]).is_ok()
}

/// Removes every chain the agent installs (flanneld's names and older versions' `OVERLAY-*`)
/// with their jumps; every failure is collected, none stops the rest. Missing chains are not
/// failures.
pub fn remove_rules() -> Vec<IptablesError> {
    all_chains()
        .into_iter()
        .filter_map(|(table, parent, chain)| remove_chain(table, parent, chain).err())
        .collect()
}

fn restore(table: &'static str, script: &str) -> Result<(), IptablesError> {
    // -w: wait for the xtables lock instead of failing when docker holds it.
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| IptablesError::Missing {
            program: "iptables-restore",
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as the process's failure below.
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|_| IptablesError::Missing {
            program: "iptables-restore",
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let hint = if script.contains("--random-fully") {
        " (if this iptables or kernel lacks MASQUERADE --random-fully, give \
         --ip-masq-fully-random-disable)"
    } else {
        ""
    };
    Err(IptablesError::Restore {
        table,
        stderr,
        hint,
    })
}

fn run(args: &[&str]) -> Result<std::process::Output, IptablesError> {
    Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|_| IptablesError::Missing {
            program: "iptables",
        })
}

fn iptables(args: &[&str]) -> Result<(), IptablesError> {
    iptables_output(args).map(drop)
}

fn iptables_output(args: &[&str]) -> Result<String, IptablesError> {
    let out = run(args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(IptablesError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 0, 0), 12);
    const SUB: (Ipv4Addr, u8) = (Ipv4Addr::new(172, 16, 21, 0), 24);

    #[test]
    fn flanneld_rules_exactly() {
        let f = forward_rules(NET);
        assert_eq!(
            f.restore_script(""),
            "*filter\n:FLANNEL-FWD - [0:0]\n-F FLANNEL-FWD\n\
             -I FORWARD 1 -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
             -A FLANNEL-FWD -s 172.16.0.0/12 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             -A FLANNEL-FWD -d 172.16.0.0/12 -m comment --comment \"flanneld forward\" -j ACCEPT\n\
             COMMIT\n"
        );
        let m = masquerade_rules(NET, SUB, true);
        let c = "-m comment --comment \"flanneld masq\"";
        assert_eq!(
            m.restore_script(""),
            format!(
                "*nat\n:FLANNEL-POSTRTG - [0:0]\n-F FLANNEL-POSTRTG\n\
                 -I POSTROUTING 1 {c} -j FLANNEL-POSTRTG\n\
                 -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN\n\
                 -A FLANNEL-POSTRTG -s 172.16.0.0/12 -d 172.16.0.0/12 {c} -j RETURN\n\
                 -A FLANNEL-POSTRTG -s 172.16.0.0/12 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully\n\
                 -A FLANNEL-POSTRTG ! -s 172.16.0.0/12 -d 172.16.21.0/24 {c} -j RETURN\n\
                 -A FLANNEL-POSTRTG ! -s 172.16.0.0/12 -d 172.16.0.0/12 {c} -j MASQUERADE --random-fully\n\
                 COMMIT\n"
            )
        );
        let plain = masquerade_rules(NET, SUB, false);
        assert!(
            plain
                .rules
                .iter()
                .all(|r| !r.contains(&"--random-fully".to_owned()))
        );
        assert_eq!(
            plain
                .rules
                .iter()
                .filter(|r| r.contains(&"MASQUERADE".to_owned()))
                .count(),
            2
        );
    }

    #[test]
    fn every_existing_jump_is_replaced_by_one() {
        // As `iptables -S FORWARD` prints a host flanneld ran on twice, plus docker's rules.
        let existing = "-P FORWARD DROP\n\
                        -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
                        -A FORWARD -j DOCKER-USER\n\
                        -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
                        -A FORWARD -j FLANNEL-FWD-OTHER\n";
        let script = forward_rules(NET).restore_script(existing);
        assert_eq!(
            script
                .lines()
                .filter(
                    |l| *l == "-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"
                )
                .count(),
            2,
            "{script}"
        );
        assert!(
            !script.contains("DOCKER-USER") && !script.contains("OTHER"),
            "{script}"
        );
        assert_eq!(script.matches("-I FORWARD 1 ").count(), 1, "{script}");
    }
}
