//! What the agent keeps in the host's netfilter and routing tables beside the overlay, as
//! flanneld does: the FORWARD accept rules (unless `--iptables-forward-rules=false`), the
//! `--ip-masq` rules, and the `--ip-blackhole-route`; plus, where the eBPF datapath delivers
//! straight into containers, the raw-table rules that keep conntrack out of overlay traffic
//! ([`iptables::untracked_rules`]). Installed once before READY, then checked
//! every `--iptables-resync` seconds and restored when something (an operator, a firewall
//! reload, docker) removed them.

use std::{net::Ipv4Addr, time::Duration};

use crate::{
    cli::Cli,
    control::{
        config::{Backend, NetworkConfig},
        subnet::Subnet,
    },
    host::{
        Netlink, NetlinkError,
        iptables::{self, IptablesError, RuleSet},
        netlink::BLACKHOLE_METRIC,
    },
};

/// Why the host rules could not be installed at start.
#[derive(Debug, thiserror::Error)]
pub enum HostRulesError {
    /// `--ip-masq` was asked for and its rules could not be installed.
    #[error("--ip-masq: {source}")]
    IpMasq {
        /// Why.
        #[source]
        source: IptablesError,
    },
    /// `--ip-blackhole-route` was asked for and the route could not be added.
    #[error("--ip-blackhole-route: {source}")]
    Blackhole {
        /// Why.
        #[source]
        source: NetlinkError,
    },
}

/// The rules and route this host keeps, for the resync task.
pub struct HostRules {
    sets: Vec<RuleSet>,
    blackhole: Option<(Netlink, Subnet)>,
    period: Duration,
    added: Added,
}

/// What one [`HostRules::install`] added that was not there before it, so that a start-up that
/// fails later removes exactly that (and leaves what an earlier run or flanneld put there).
#[derive(Debug, Clone, Default)]
pub struct Added {
    sets: Vec<RuleSet>,
    blackhole: Option<Subnet>,
}

impl Added {
    /// Removes what was added; one line per thing removed or not.
    pub async fn remove(self) -> Vec<String> {
        let mut lines = Vec::new();
        for set in self.sets {
            let chain = set.chain;
            lines.push(match blocking(set, |s| s.remove()).await {
                Ok(()) => format!("removed iptables chain {chain}"),
                Err(e) => format!("iptables chain {chain} left: {e}"),
            });
        }
        if let Some(subnet) = self.blackhole {
            let removed = match Netlink::connect() {
                Ok(netlink) => netlink
                    .delete_blackhole(subnet.addr(), subnet.prefix(), BLACKHOLE_METRIC)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            lines.push(match removed {
                Ok(()) => format!("removed the blackhole route for {subnet}"),
                Err(e) => format!("the blackhole route for {subnet} left: {e}"),
            });
        }
        lines
    }
}

fn net(s: Subnet) -> (Ipv4Addr, u8) {
    (s.addr(), s.prefix())
}

impl HostRules {
    /// Installs what the flags ask for and removes what they turned off (so the host holds what
    /// the command line says, whatever an earlier run or flanneld left). The forward rules are
    /// best effort, since hosts without iptables have no FORWARD policy to get past either;
    /// `--ip-masq` and `--ip-blackhole-route` are required: the operator asked for them.
    /// A failure removes what this call added before it.
    /// `direct_delivery`: the datapath delivers packets from peers into the containers past the
    /// host stack.
    pub async fn install(
        cli: &Cli,
        config: &NetworkConfig,
        subnet: Subnet,
        direct_delivery: bool,
    ) -> Result<Self, HostRulesError> {
        let mut added = Added::default();
        match Self::install_adding(cli, config, subnet, direct_delivery, &mut added).await {
            Ok(rules) => Ok(rules),
            Err(e) => {
                for line in added.remove().await {
                    tracing::info!("undoing the host rules after a failure: {line}");
                }
                Err(e)
            }
        }
    }

    /// What this run added (see [`Added`]).
    pub fn added(&self) -> Added {
        self.added.clone()
    }

    async fn install_adding(
        cli: &Cli,
        config: &NetworkConfig,
        subnet: Subnet,
        direct_delivery: bool,
        added: &mut Added,
    ) -> Result<Self, HostRulesError> {
        let mut sets = Vec::new();
        let untracked = iptables::untracked_rules(net(config.network), net(subnet));
        if direct_delivery {
            if let Err(e) = install_kept(untracked, added, &mut sets).await {
                tracing::warn!(
                    "raw-table rules keeping conntrack out of traffic from {subnet} to {} not \
                     installed: {e}; NAT of it (docker masquerades its bridge's subnet unless \
                     started with --ip-masq=false) would break connections from other hosts",
                    config.network
                );
            }
        } else {
            remove_if_present(untracked, "the datapath delivers through the host stack").await;
        }
        let forward = iptables::forward_rules(net(config.network));
        let wants_forward = cli.iptables_forward_rules && !matches!(config.backend, Backend::Alloc);
        if wants_forward {
            if let Err(e) = install_kept(forward, added, &mut sets).await {
                tracing::warn!(
                    "forward rules for {} not installed: {e}; a FORWARD policy of DROP (docker \
                     sets one) would drop overlay traffic delivered through the host stack",
                    config.network
                );
            }
        } else {
            remove_if_present(forward, "--iptables-forward-rules=false").await;
        }

        let masq = iptables::masquerade_rules(
            net(config.network),
            net(subnet),
            !cli.ip_masq_fully_random_disable,
        );
        if cli.ip_masq {
            let new = matches!(blocking(masq.clone(), |m| Ok(m.present())).await, Ok(false));
            // Recorded before: a failed install may leave a part of the chain behind.
            if new {
                added.sets.push(masq.clone());
            }
            blocking(masq.clone(), |m| m.install())
                .await
                .map_err(|source| HostRulesError::IpMasq { source })?;
            tracing::info!(
                "--ip-masq: masquerading traffic leaving {}{}",
                config.network,
                if cli.ip_masq_fully_random_disable {
                    " (without --random-fully)"
                } else {
                    ""
                }
            );
            sets.push(masq);
        } else {
            remove_if_present(masq, "--ip-masq is off").await;
        }

        let blackhole = if cli.ip_blackhole_route {
            let netlink =
                Netlink::connect().map_err(|source| HostRulesError::Blackhole { source })?;
            if netlink
                .ensure_blackhole(subnet.addr(), subnet.prefix(), BLACKHOLE_METRIC)
                .await
                .map_err(|source| HostRulesError::Blackhole { source })?
            {
                added.blackhole = Some(subnet);
            }
            tracing::info!(
                "--ip-blackhole-route: blackhole route for {subnet} (metric {BLACKHOLE_METRIC}: \
                 docker's bridge route wins while it exists)"
            );
            Some((netlink, subnet))
        } else {
            None
        };
        Ok(Self {
            sets,
            blackhole,
            period: Duration::from_secs(u64::from(cli.iptables_resync)),
            added: added.clone(),
        })
    }

    /// Every period, checks each rule set and the blackhole route and restores what is
    /// missing, logging each restoration. Runs until the task is dropped.
    pub async fn resync(self) {
        if self.sets.is_empty() && self.blackhole.is_none() {
            return;
        }
        let start = tokio::time::Instant::now() + self.period;
        let mut tick = tokio::time::interval_at(start, self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for set in &self.sets {
                match blocking(set.clone(), |s| s.ensure()).await {
                    Ok(false) => {}
                    Ok(true) => tracing::warn!(
                        "iptables: chain {} of table {} (or its jump from {}) had lost rules; \
                         restored",
                        set.chain,
                        set.table,
                        set.parent
                    ),
                    Err(e) => tracing::warn!("iptables resync of chain {}: {e}", set.chain),
                }
            }
            if let Some((netlink, subnet)) = &self.blackhole {
                match netlink
                    .ensure_blackhole(subnet.addr(), subnet.prefix(), BLACKHOLE_METRIC)
                    .await
                {
                    Ok(false) => {}
                    Ok(true) => {
                        tracing::warn!("the blackhole route for {subnet} was gone; restored")
                    }
                    Err(e) => tracing::warn!("--ip-blackhole-route resync: {e}"),
                }
            }
        }
    }
}

/// Installs `set` and keeps it for the resync (`sets`), recording it in `added` when it was not
/// there before.
async fn install_kept(
    set: RuleSet,
    added: &mut Added,
    sets: &mut Vec<RuleSet>,
) -> Result<(), IptablesError> {
    let new = matches!(blocking(set.clone(), |s| Ok(s.present())).await, Ok(false));
    blocking(set.clone(), |s| s.install()).await?;
    if new {
        added.sets.push(set.clone());
    }
    sets.push(set);
    Ok(())
}

/// Removes `set` (and its older-agent counterpart) when present, logging why.
async fn remove_if_present(set: RuleSet, why: &'static str) {
    let chain = set.chain;
    let result = blocking(set, |s| {
        if !s.present() {
            return Ok(false);
        }
        s.remove().map(|()| true)
    })
    .await;
    match result {
        Ok(true) => tracing::info!("{why}: removed iptables chain {chain} left by an earlier run"),
        Ok(false) => {}
        Err(e) => tracing::warn!("{why}: removing iptables chain {chain}: {e}"),
    }
}

/// Runs an iptables call off the runtime's thread: each is a process that may wait for the
/// xtables lock.
async fn blocking<T: Send + 'static>(
    set: RuleSet,
    f: impl FnOnce(&RuleSet) -> Result<T, IptablesError> + Send + 'static,
) -> Result<T, IptablesError> {
    tokio::task::spawn_blocking(move || f(&set))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
