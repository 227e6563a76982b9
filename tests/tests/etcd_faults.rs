//! etcd cluster faults against real agents: a three-member etcd (each member in a namespace of
//! its own, `overlay_tests::etcd_cluster`), three hosts on the eBPF datapath with a short
//! `--subnet-lease-ttl`, and every fault held for longer than that TTL, so a lease that was not
//! renewed through it would be gone.
//!
//! Each test watches the fault from three sides and asserts on all of them:
//! - etcd itself (`overlay_tests::lease_watch`): every host's key, the etcd lease it is attached
//!   to and that lease's remaining TTL, polled throughout: the lowest remaining TTL seen, the
//!   renewals (a renewal moves the key to a new etcd lease), whether the key ever went missing;
//!   at the end, exactly one key per host, naming the subnet the host had before;
//! - the containers: a ping flow between every ordered pair of hosts, started before the fault
//!   and stopped after the heal, that must have run across the fault and lost nothing;
//! - the agents: never exited, and their logs: the down member named in WARN lines, no WARN line
//!   calling a live member unreachable, and few WARN lines however long the outage.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use overlay_tests::{
    cluster::{Cluster, PREFIX, healthz_flags},
    etcd::TempDir,
    etcd_cluster::{ELECTION_TIMEOUT, EtcdCluster, MEMBERS, member_url},
    flow::{PingFlow, lost},
    lab::SubnetEnv,
    lease_watch::{LeaseHistory, LeaseSample, LeaseWatch, warn_lines},
    netns::NetNs,
};

/// The agents' `--subnet-lease-ttl`.
const TTL: Duration = Duration::from_secs(20);
/// [`TTL`] as the flag.
const TTL_FLAG: &str = "--subnet-lease-ttl=20s";
/// Every fault lasts at least this long: longer than the TTL.
const OUTAGE: Duration = Duration::from_secs(24);
/// The lowest remaining TTL a lease renewed on time shows: the agent renews at half the TTL, and
/// etcd answers in whole seconds, truncated.
const HALF_TTL_FLOOR: i64 = (TTL.as_secs() / 2) as i64 - 1;
/// WARN lines an agent may write per started minute of outage.
const WARNS_PER_MINUTE: usize = 10;
/// Each flow's ping interval (ping's `-i`): 20 a second.
const PING_INTERVAL: &str = "0.05";
/// Replies every flow must get after the heal (and to requests sent after the fault began).
const REPLIES_AFTER: usize = 10;

type Rig = Cluster<EtcdCluster>;

/// The checks of one test: each failed one is kept, and the test fails at the end naming all
/// of them, so one run shows everything a fault broke.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, failure: impl FnOnce() -> String) {
        if !ok {
            let f = failure();
            eprintln!("CHECK FAILED: {f}");
            self.failed.push(f);
        }
    }

    /// Fails the test if any check failed, with `logs` (the agents' WARN lines) appended.
    fn done(self, logs: String) {
        assert!(
            self.failed.is_empty(),
            "{} check(s) failed:\n- {}\nagents' last WARN/ERROR lines:\n{logs}",
            self.failed.len(),
            self.failed.join("\n- ")
        );
    }
}

/// The flags of every agent here: the eBPF datapath, the short TTL, the health endpoint.
fn agent_flags(extra: &[&str]) -> Vec<String> {
    let mut flags = vec!["--datapath=ebpf".to_owned(), TTL_FLAG.to_owned()];
    flags.extend(healthz_flags());
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// A lab of `hosts` hosts on a three-member etcd, with agents (and containers) on the first
/// `agents`.
fn rig(prefix: &str, hosts: usize, agents: usize, extra: &[&str]) -> (TempDir, Rig) {
    let tmp = TempDir::new(prefix).unwrap();
    let mut c = Cluster::with_etcd_cluster(prefix, hosts, "udp", tmp.path()).unwrap();
    for i in 0..agents {
        start_host(&mut c, i, extra);
    }
    (tmp, c)
}

/// Starts host `i`'s agent with [`agent_flags`], waits for its subnet.env and health, and
/// gives it its container. Returns its subnet.
fn start_host(c: &mut Rig, i: usize, extra: &[&str]) -> String {
    let flags = agent_flags(extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = c.agent_args(i, &flags);
    c.start_agent(i, args).unwrap();
    let env = c.wait_subnet_env(i, Duration::from_secs(30)).unwrap();
    if c.lab.hosts[i].container.is_none() {
        c.lab.hosts[i].start_docker(&env).unwrap();
    }
    c.wait_healthy(i, Duration::from_secs(30)).unwrap();
    subnet_of(&env)
}

fn subnet_of(env: &SubnetEnv) -> String {
    let (addr, len) = env.subnet();
    format!("{addr}/{len}")
}

fn ip(c: &Rig, i: usize) -> Ipv4Addr {
    c.lab.hosts[i].underlay_ip
}

/// The subnet host `i`'s subnet.env names now.
fn current_subnet(c: &Rig, i: usize) -> String {
    let text = std::fs::read_to_string(&c.agents[i].subnet_file).unwrap();
    subnet_of(&SubnetEnv::parse(&text).unwrap())
}

/// Why host `i`'s agent is not running, if it is not.
fn exited(c: &mut Rig, i: usize, when: &str) -> Option<String> {
    let agent = &mut c.agents[i];
    let status = agent.process.as_mut().and_then(|p| p.try_wait());
    (agent.process.is_none() || status.is_some()).then(|| {
        let log = agent.log_text();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "h{}'s agent exited ({status:?}) {when}; its last lines:\n{}",
            i + 1,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// Checks that the agents of `hosts` still run.
fn check_running(checks: &mut Checks, c: &mut Rig, hosts: &[usize], when: &str) {
    for &i in hosts {
        let why = exited(c, i, when);
        checks.check(why.is_none(), || why.unwrap_or_default());
    }
}

fn pid(c: &Rig, i: usize) -> u32 {
    c.agents[i].process.as_ref().expect("agent started").pid()
}

/// A ping flow between the containers of every ordered pair of `hosts`.
struct Flows {
    flows: Vec<(usize, usize, PingFlow)>,
    /// Each flow's reply count when the fault began.
    at_fault: Vec<usize>,
}

impl Flows {
    fn start(c: &Rig, hosts: &[usize]) -> Self {
        let mut flows = Vec::new();
        for &from in hosts {
            for &to in hosts {
                if from == to {
                    continue;
                }
                let ns = &c.lab.hosts[from].container.as_ref().unwrap().ns;
                let target = c.lab.hosts[to].container.as_ref().unwrap().ip;
                let flow = PingFlow::start(ns, target, PING_INTERVAL, 3)
                    .unwrap_or_else(|e| panic!("h{} -> h{}: {e}", from + 1, to + 1));
                flows.push((from, to, flow));
            }
        }
        Self {
            flows,
            at_fault: Vec::new(),
        }
    }

    /// The fault begins now: every flow must be running.
    fn mark_fault(&mut self) {
        self.at_fault = self
            .flows
            .iter_mut()
            .map(|(from, to, f)| {
                f.assert_running(&format!("the fault (h{} -> h{})", *from + 1, *to + 1));
                f.count()
            })
            .collect();
    }

    fn assert_running(&mut self, when: &str) {
        for (from, to, f) in &mut self.flows {
            f.assert_running(&format!("{when} (h{} -> h{})", *from + 1, *to + 1));
        }
    }

    /// Ends every flow once it answered again after `after`, checking it ran across the fault;
    /// returns the lost requests as (from host, to host, icmp_seq), 1-based hosts, and the
    /// requests sent in all.
    fn finish(self, after: &str) -> (Vec<(usize, usize, u32)>, u32) {
        let mut losses = Vec::new();
        let mut sent = 0;
        for ((from, to, flow), at) in self.flows.into_iter().zip(self.at_fault) {
            let (replies, _) = flow.resumes(at, REPLIES_AFTER, after);
            sent += replies.iter().map(|r| r.seq).max().unwrap_or(0);
            losses.extend(lost(&replies).into_iter().map(|s| (from + 1, to + 1, s)));
        }
        (losses, sent)
    }
}

/// What an agent logs when etcd answers again after a failure: while running (`etcd is back
/// after ... (member ...)`), at start-up (`etcd answers after ...: member ...`), or when a member
/// it named unreachable answers its probe (`etcd member ... answers again`).
const BACK: [&str; 3] = ["etcd is back", "etcd answers after", "answers again"];

/// Where each agent's log stood when the outage began.
struct LogWindow {
    from: Vec<usize>,
}

impl LogWindow {
    fn open(c: &Rig) -> Self {
        Self {
            from: c.agents.iter().map(|a| a.log_text().len()).collect(),
        }
    }

    /// Checks that each agent of `hosts` that wrote a WARN line about etcd since the window
    /// opened says, after its last one, that etcd is back ([`BACK`]); waits up to 15 s for that
    /// line.
    fn check_back(&self, checks: &mut Checks, c: &Rig, hosts: &[usize]) {
        for &i in hosts {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let text = c.agents[i].log_text();
                let from = self.from.get(i).copied().unwrap_or(0).min(text.len());
                let lines: Vec<&str> = text[from..].lines().collect();
                let Some(last) = lines.iter().rposition(|l| {
                    l.split_whitespace().nth(1) == Some("WARN") && l.contains("etcd")
                }) else {
                    break;
                };
                let back = lines[last + 1..]
                    .iter()
                    .any(|l| BACK.iter().any(|b| l.contains(b)));
                if back {
                    break;
                }
                if Instant::now() > deadline {
                    checks.check(false, || {
                        format!(
                            "h{} never said etcd is back ({BACK:?}) after its last WARN line: {}",
                            i + 1,
                            lines[last]
                        )
                    });
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Each agent's WARN lines since the window opened (all of them for agents started since).
    fn warns(&self, c: &Rig) -> Vec<Vec<String>> {
        c.agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let text = a.log_text();
                let from = self.from.get(i).copied().unwrap_or(0).min(text.len());
                warn_lines(&text[from..])
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .collect()
    }
}

/// Holds the fault: returns once it has lasted `at_least` and `done` holds for what etcd shows
/// of the leases, checking meanwhile that the agents of `agents` run (a check failed for each
/// that exits, and the hold ends) and the flows ping. A failed check (with what the leases
/// looked like) if `done` does not hold within two TTLs after `at_least`.
#[allow(clippy::too_many_arguments)]
fn hold(
    checks: &mut Checks,
    c: &mut Rig,
    flows: &mut Flows,
    watch: &LeaseWatch,
    agents: &[usize],
    at_least: Duration,
    what: &str,
    mut done: impl FnMut(&LeaseHistory) -> bool,
) -> Duration {
    let start = Instant::now();
    let deadline = at_least + 2 * TTL;
    loop {
        let gone: Vec<String> = agents
            .iter()
            .filter_map(|&i| exited(c, i, &format!("while {what}")))
            .collect();
        if !gone.is_empty() {
            for g in gone {
                checks.check(false, || g);
            }
            return start.elapsed();
        }
        flows.assert_running(what);
        let history = watch.history();
        let elapsed = start.elapsed();
        if elapsed >= at_least && done(&history) {
            return elapsed;
        }
        if elapsed > deadline {
            checks.check(false, || {
                format!("{what}: the awaited lease state not seen within {deadline:?}; etcd showed: {history:?}")
            });
            return elapsed;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// WARN and ERROR lines per agent in failure messages: the last ones.
const LOG_LINES: usize = 6;

/// Every agent's last WARN and ERROR lines, for failure messages.
fn logs(c: &Rig) -> String {
    c.agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let text = a.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let level = l.split_whitespace().nth(1);
                    matches!(level, Some("WARN" | "ERROR"))
                })
                .collect();
            let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
            format!(
                "--- h{} ({} lines)\n{}\n",
                i + 1,
                lines.len(),
                tail.join("\n")
            )
        })
        .collect()
}

/// Longest a poll waits for a member's answer: a dead or leaderless member must not hold up the
/// watch for long, as the watch must see every renewal.
const ASK_WITHIN: Duration = Duration::from_secs(1);
/// Longest the lease watch may go without an answer while quorum holds. After the leader's death
/// no member serves until the others have waited out their randomised election timeouts (at most
/// twice [`ELECTION_TIMEOUT`]) and voted; the poll in flight then answers within [`ASK_WITHIN`].
/// Anything up to this bound is shorter than a renewal interval (a third of the TTL), so no etcd
/// lease can come and go unseen.
const MAX_SILENCE: Duration = Duration::from_secs(2 * ELECTION_TIMEOUT.as_secs() + 2);
const _: () =
    assert!(MAX_SILENCE.as_secs() >= 2 * ELECTION_TIMEOUT.as_secs() + ASK_WITHIN.as_secs());
const _: () = assert!(3 * MAX_SILENCE.as_secs() < TTL.as_secs());

/// Reads the subnet leases and each one's remaining TTL with the etcd client library, from the
/// namespace etcdctl runs in, asking every member at once and taking the first answer: members
/// asked one after another would add a wait per leaderless member to every poll of an election.
struct LeaseReader {
    rt: tokio::runtime::Runtime,
    members: Vec<(String, Option<etcd_client::Client>)>,
}

impl LeaseReader {
    /// A reader for the calling thread, which it moves into `ns` for good.
    fn on_this_thread(ns: &str) -> Self {
        NetNs::attach(ns)
            .enter_current_thread()
            .expect("entering the etcd clients' namespace");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Self {
            rt,
            members: (0..MEMBERS).map(|i| (member_url(i), None)).collect(),
        }
    }

    /// A [`LeaseWatch`] fed by a reader on the watch's thread.
    fn watch(c: &Rig, expected: &[Ipv4Addr]) -> LeaseWatch {
        let ns = c.etcd.ctl_ns().to_owned();
        LeaseWatch::start(
            move || {
                let mut reader = Self::on_this_thread(&ns);
                move || reader.read()
            },
            expected,
        )
    }

    /// One poll: the leases as the first member to answer holds them.
    fn read(&mut self) -> Result<Vec<LeaseSample>, String> {
        let Self { rt, members } = self;
        let mut errors = Vec::new();
        let answer = rt.block_on(async {
            let mut asked = tokio::task::JoinSet::new();
            for (i, (url, client)) in members.iter().enumerate() {
                let (url, mut client) = (url.clone(), client.clone());
                asked.spawn(async move {
                    let read =
                        tokio::time::timeout(ASK_WITHIN, read_member(&url, &mut client)).await;
                    (i, client, read)
                });
            }
            while let Some(joined) = asked.join_next().await {
                let (i, client, read) = joined.expect("a member's read task");
                let error = match read {
                    Ok(Ok(samples)) => {
                        members[i].1 = client;
                        // The reads still running are dropped with the set.
                        return Some(samples);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {ASK_WITHIN:?}"),
                };
                errors.push(format!("m{}: {error}", i + 1));
                // A fresh connection next time: the old one may be to a process that is gone.
                members[i].1 = None;
            }
            None
        });
        answer.ok_or_else(|| {
            errors.sort();
            errors.join("; ")
        })
    }
}

/// The leases under [`PREFIX`] as member `url` holds them (a linearizable read: a member
/// without a leader does not answer), connecting first when `client` is `None`.
async fn read_member(
    url: &str,
    client: &mut Option<etcd_client::Client>,
) -> Result<Vec<LeaseSample>, etcd_client::Error> {
    let client = match client {
        Some(c) => c,
        None => client.insert(etcd_client::Client::connect([url], None).await?),
    };
    let dir = format!("{PREFIX}/subnets/");
    let resp = client
        .get(
            dir.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut samples = Vec::new();
    for kv in resp.kvs() {
        let (Ok(key), Ok(value)) = (kv.key_str(), kv.value_str()) else {
            continue;
        };
        let Some(subnet) = key.strip_prefix(&dir).map(|s| s.replacen('-', "/", 1)) else {
            continue;
        };
        let Some(public_ip) = serde_json::from_str::<serde_json::Value>(value)
            .ok()
            .and_then(|v| v["PublicIP"].as_str().and_then(|s| s.parse().ok()))
        else {
            // Not a lease (written by hand?): nobody's.
            continue;
        };
        let remaining = if kv.lease() == 0 {
            None
        } else {
            let ttl = client.lease_time_to_live(kv.lease(), None).await?.ttl();
            // -1: no such lease any more (revoked by a renewal since the get, or expired).
            (ttl >= 0).then_some(ttl)
        };
        samples.push(LeaseSample {
            key: key.to_owned(),
            subnet,
            public_ip,
            etcd_lease: kv.lease(),
            remaining,
        });
    }
    Ok(samples)
}

/// The leases as etcd holds them now, asked of the first member that answers.
fn leases_now(c: &Rig) -> Vec<LeaseSample> {
    let ns = c.etcd.ctl_ns().to_owned();
    std::thread::spawn(move || LeaseReader::on_this_thread(&ns).read())
        .join()
        .expect("the lease reader's thread")
        .unwrap_or_else(|e| panic!("no member answered: {e}"))
}

/// While quorum held, the watch answered often enough to have seen every renewal and every
/// lapse.
fn check_watch_dense(checks: &mut Checks, history: &LeaseHistory, phase: &str) {
    eprintln!(
        "lease watch {phase}: {} polls answered, {} not, longest silence {:.1} s",
        history.answered,
        history.unanswered,
        history.longest_silence.as_secs_f64()
    );
    checks.check(history.longest_silence <= MAX_SILENCE, || {
        format!(
            "the lease watch went {:.1} s without an answer {phase} while quorum held (at most \
             {MAX_SILENCE:?}): what it saw of the leases has gaps; last error: {:?}",
            history.longest_silence.as_secs_f64(),
            history.last_error
        )
    });
}

/// At the end: every host of `subnets` (host index -> the subnet it had before) holds exactly
/// one key, naming that subnet, and subnet.env still says so; no other key exists.
fn check_one_lease_each(checks: &mut Checks, c: &Rig, subnets: &BTreeMap<usize, String>) {
    let leases = leases_now(c);
    let mut by_host: BTreeMap<Ipv4Addr, Vec<&str>> = BTreeMap::new();
    for l in &leases {
        by_host.entry(l.public_ip).or_default().push(&l.subnet);
    }
    for (&i, subnet) in subnets {
        let keys = by_host.remove(&ip(c, i)).unwrap_or_default();
        checks.check(keys == [subnet.as_str()], || {
            format!(
                "h{} holds {keys:?} in etcd at the end, not exactly its {subnet}",
                i + 1
            )
        });
        let now = current_subnet(c, i);
        checks.check(&now == subnet, || {
            format!(
                "h{}'s subnet.env says {now} at the end, not {subnet}",
                i + 1
            )
        });
    }
    checks.check(by_host.is_empty(), || {
        format!("keys of no host at the end: {by_host:?}")
    });
}

/// Through the watch: each of `hosts` held its key in every answered poll, one key only, and
/// never with less than half the TTL left.
fn check_leases_kept(
    checks: &mut Checks,
    c: &Rig,
    history: &LeaseHistory,
    hosts: &[usize],
    phase: &str,
) {
    for &i in hosts {
        let h = history.host(ip(c, i));
        eprintln!(
            "h{} {phase}: lowest remaining TTL {:?} s, {} renewals, absent in {} of {} polls \
             ({} unanswered)",
            i + 1,
            h.min_remaining,
            h.renewals(),
            h.absent_polls,
            history.answered,
            history.unanswered
        );
        checks.check(h.absent_polls == 0, || {
            format!(
                "h{}'s lease lapsed {phase}: its key was missing in {} of {} answered polls",
                i + 1,
                h.absent_polls,
                history.answered
            )
        });
        checks.check(h.multiple_polls == 0, || {
            format!("h{} held two keys {phase}", i + 1)
        });
        checks.check(h.min_remaining.is_some_and(|m| m >= HALF_TTL_FLOOR), || {
            format!(
                "h{}'s lease got down to {:?} s of its {} s TTL {phase} (at least \
                 {HALF_TTL_FLOOR} must remain: renewals were late or failed); {} renewals seen",
                i + 1,
                h.min_remaining,
                TTL.as_secs(),
                h.renewals()
            )
        });
    }
}

/// No lost ping, and the flows sent enough to tell.
fn check_no_loss(
    checks: &mut Checks,
    losses: &[(usize, usize, u32)],
    sent: u32,
    outage: Duration,
    flows: usize,
) {
    eprintln!("pings: {} of {sent} lost over {flows} flows", losses.len());
    // 20 a second per flow across the outage, at least half of them (the machine is busy).
    let wanted = (outage.as_secs() as u32 * 10) * flows as u32;
    checks.check(sent >= wanted, || {
        format!("only {sent} pings sent (wanted {wanted})")
    });
    checks.check(losses.is_empty(), || {
        let shown = &losses[..losses.len().min(20)];
        format!(
            "{} of {sent} pings lost (from host, to host, icmp_seq; first 20): {shown:?}",
            losses.len()
        )
    });
}

/// WARN lines per agent during an outage of `outage`: at most [`WARNS_PER_MINUTE`] per started
/// minute.
fn check_warns_bounded(checks: &mut Checks, warns: &[Vec<String>], outage: Duration) {
    let bound = WARNS_PER_MINUTE * (outage.as_secs().div_ceil(60).max(1) as usize);
    for (i, lines) in warns.iter().enumerate() {
        eprintln!(
            "h{}: {} WARN lines in {:.0} s of outage",
            i + 1,
            lines.len(),
            outage.as_secs_f64()
        );
        checks.check(lines.len() <= bound, || {
            format!(
                "h{} wrote {} WARN lines in a {:.0} s outage (at most {bound})",
                i + 1,
                lines.len(),
                outage.as_secs_f64()
            )
        });
    }
}

/// The agents in `named` name `down` in a WARN line; no agent's WARN line calls a member other
/// than `down` unreachable.
fn check_names_the_down_member(
    checks: &mut Checks,
    warns: &[Vec<String>],
    named: &[usize],
    down: usize,
) {
    let url = member_url(down);
    for &i in named {
        checks.check(warns[i].iter().any(|l| l.contains(&url)), || {
            format!(
                "h{} was connected to m{} ({url}) when it died, but none of its {} WARN lines \
                 names it",
                i + 1,
                down + 1,
                warns[i].len()
            )
        });
    }
    for (i, lines) in warns.iter().enumerate() {
        let wrong: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("unreachable"))
            .filter(|l| (0..MEMBERS).any(|m| m != down && l.contains(&member_url(m))))
            .collect();
        checks.check(wrong.is_empty(), || {
            format!(
                "h{} calls a member that ran throughout unreachable in {} WARN lines, e.g.: {}",
                i + 1,
                wrong.len(),
                wrong[0]
            )
        });
    }
}

/// Checks that host `from`'s container gets an answer from `to`'s (within 15 s).
fn check_reaches(checks: &mut Checks, c: &Rig, from: usize, to: usize) {
    let src = c.lab.hosts[from].container.as_ref().unwrap();
    let dst = c.lab.hosts[to].container.as_ref().unwrap().ip.to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    while src
        .ns
        .exec("ping", &["-q", "-c", "1", "-W", "0.3", &dst])
        .is_err()
    {
        if Instant::now() > deadline {
            checks.check(false, || {
                format!(
                    "h{}'s container never reached h{}'s ({dst})",
                    from + 1,
                    to + 1
                )
            });
            return;
        }
    }
}

/// The member most of `hosts`' agents hold a client connection to, and those agents.
fn busiest_member(c: &Rig, hosts: &[usize]) -> (usize, Vec<usize>) {
    (0..MEMBERS)
        .map(|m| {
            let peers = c.etcd.client_peers(m);
            let agents: Vec<usize> = hosts
                .iter()
                .copied()
                .filter(|&h| peers.contains(&ip(c, h)))
                .collect();
            (m, agents)
        })
        .max_by_key(|(m, agents)| (agents.len(), std::cmp::Reverse(*m)))
        .unwrap()
}

/// What the steady hosts were before the fault.
struct Before {
    hosts: Vec<usize>,
    ips: Vec<Ipv4Addr>,
    subnets: BTreeMap<usize, String>,
    pids: Vec<u32>,
}

impl Before {
    fn take(c: &Rig, hosts: &[usize]) -> Self {
        Self {
            hosts: hosts.to_vec(),
            ips: hosts.iter().map(|&i| ip(c, i)).collect(),
            subnets: hosts.iter().map(|&i| (i, current_subnet(c, i))).collect(),
            pids: hosts.iter().map(|&i| pid(c, i)).collect(),
        }
    }

    /// Checks that the agents of `hosts` (all of them if empty) are the processes they were.
    fn check_same_processes(&self, checks: &mut Checks, c: &Rig, hosts: &[usize]) {
        for (&i, &before) in self.hosts.iter().zip(&self.pids) {
            if hosts.is_empty() || hosts.contains(&i) {
                let now = pid(c, i);
                checks.check(now == before, || {
                    format!(
                        "h{}'s agent is another process ({before} then {now})",
                        i + 1
                    )
                });
            }
        }
    }
}

/// One member down (the leader, or a follower) for longer than the TTL while a new host joins.
fn one_member_down(prefix: &str, kill_leader: bool) {
    let (_tmp, mut c) = rig(prefix, 4, 3, &[]);
    let mut checks = Checks::default();
    let before = Before::take(&c, &[0, 1, 2]);
    let hosts = before.hosts.clone();

    // The member to kill: the one most agents talk to, made the leader or a follower.
    let (victim, connected) = busiest_member(&c, &hosts);
    assert!(!connected.is_empty(), "no agent holds a connection to etcd");
    let role = if kill_leader { "leader" } else { "follower" };
    if kill_leader {
        c.etcd.move_leader(victim).unwrap();
    } else if c.etcd.leader().unwrap() == victim {
        c.etcd.move_leader((victim + 1) % MEMBERS).unwrap();
    }
    assert_eq!(
        c.etcd.leader().unwrap() == victim,
        kill_leader,
        "m{} must be the {role}",
        victim + 1
    );

    let mut flows = Flows::start(&c, &hosts);
    let watch = LeaseReader::watch(&c, &before.ips);
    let window = LogWindow::open(&c);
    let leader_before = c.etcd.leader().unwrap();
    flows.mark_fault();
    c.etcd.kill(victim).unwrap();
    // Killing the leader makes the others elect one; killing a follower leaves the leader be.
    let leader = c.etcd.wait_leader(Duration::from_secs(20)).unwrap();
    assert_ne!(leader, victim);
    if !kill_leader {
        assert_eq!(
            leader, leader_before,
            "a follower's death changed the leader"
        );
    }

    // A new host joins while the member is down; every agent must learn of it from its watch
    // (or its resync), which the containers prove by answering each other.
    let new_subnet = start_host(&mut c, 3, &[]);
    for &i in &hosts {
        check_reaches(&mut checks, &c, i, 3);
        check_reaches(&mut checks, &c, 3, i);
    }
    let ips = before.ips.clone();
    let outage = hold(
        &mut checks,
        &mut c,
        &mut flows,
        &watch,
        &[0, 1, 2, 3],
        OUTAGE,
        &format!("m{} ({role}) is down", victim + 1),
        |h| ips.iter().all(|&ip| h.host(ip).renewals() >= 2),
    );
    assert!(!c.etcd.is_running(victim), "m{} came back", victim + 1);
    let warns = window.warns(&c);
    c.etcd.start(victim).unwrap();
    c.etcd
        .wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .unwrap();
    let (losses, sent) = flows.finish(&format!("m{} was back", victim + 1));
    let history = watch.stop();

    eprintln!(
        "m{} ({role}) down for {:.0} s; agents connected to it: {:?}",
        victim + 1,
        outage.as_secs_f64(),
        connected.iter().map(|i| i + 1).collect::<Vec<_>>()
    );
    check_running(&mut checks, &mut c, &[0, 1, 2, 3], "after the outage");
    before.check_same_processes(&mut checks, &c, &[]);
    check_leases_kept(
        &mut checks,
        &c,
        &history,
        &[0, 1, 2, 3],
        "with a member down",
    );
    check_watch_dense(&mut checks, &history, "with a member down");
    check_no_loss(&mut checks, &losses, sent, outage, flows_of(hosts.len()));
    let mut all = before.subnets.clone();
    all.insert(3, new_subnet);
    check_one_lease_each(&mut checks, &c, &all);
    check_names_the_down_member(&mut checks, &warns, &connected, victim);
    check_warns_bounded(&mut checks, &warns, outage);
    window.check_back(&mut checks, &c, &hosts);
    checks.done(logs(&c));
}

fn flows_of(hosts: usize) -> usize {
    hosts * (hosts - 1)
}

fn leader_killed_for_longer_than_the_ttl() {
    one_member_down("ef1", true);
}

fn follower_killed_for_longer_than_the_ttl() {
    one_member_down("ef2", false);
}

/// Quorum lost (two members killed) for longer than the TTL, then restored; a new agent started
/// meanwhile gets its lease once quorum is back.
fn quorum_lost_for_longer_than_the_ttl_then_restored() {
    let (_tmp, mut c) = rig("ef3", 4, 3, &[]);
    let mut checks = Checks::default();
    let before = Before::take(&c, &[0, 1, 2]);
    let hosts = before.hosts.clone();

    let mut flows = Flows::start(&c, &hosts);
    let watch = LeaseReader::watch(&c, &before.ips);
    let window = LogWindow::open(&c);
    flows.mark_fault();
    let killed = c.etcd.stop_quorum().unwrap();
    // A new host's agent starts without quorum: it can get no lease yet, and must wait for one.
    let flags = agent_flags(&[]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = c.agent_args(3, &flags);
    c.start_agent(3, args).unwrap();
    let outage = hold(
        &mut checks,
        &mut c,
        &mut flows,
        &watch,
        &[0, 1, 2, 3],
        OUTAGE,
        "quorum is lost",
        |_| true,
    );
    // Still without quorum at its end: no leader, the observer unanswered, no lease for h4.
    assert!(c.etcd.leader().is_err(), "a leader without quorum");
    assert!(
        !c.agents[3].subnet_file.exists(),
        "h4 wrote a subnet.env without quorum"
    );
    let during = watch.stop();
    assert!(
        during.unanswered > 0,
        "etcd answered throughout: {during:?}"
    );
    let warns = window.warns(&c);

    for &m in &killed {
        c.etcd.start(m).unwrap();
    }
    c.etcd
        .wait_healthy(&[0, 1, 2], Duration::from_secs(30))
        .unwrap();
    let after = LeaseReader::watch(&c, &before.ips);
    // The new agent gets its lease now, and the others learn of it.
    let new_subnet = match c.wait_subnet_env(3, Duration::from_secs(30)) {
        Ok(env) => {
            c.lab.hosts[3].start_docker(&env).unwrap();
            Some(subnet_of(&env))
        }
        Err(e) => {
            checks.check(false, || {
                format!("h4 got no lease after quorum returned: {e}")
            });
            None
        }
    };
    if new_subnet.is_some() {
        for &i in &hosts {
            check_reaches(&mut checks, &c, i, 3);
            check_reaches(&mut checks, &c, 3, i);
        }
    }
    // And every lease is renewed again.
    let renewed: Vec<Ipv4Addr> = (0..4).map(|i| ip(&c, i)).collect();
    if let Err(h) = after.wait_for(2 * TTL, |h| {
        renewed.iter().all(|&ip| h.host(ip).renewals() >= 1)
    }) {
        checks.check(false, || {
            format!("not every lease was renewed after quorum returned: {h:?}")
        });
    }
    let (losses, sent) = flows.finish("quorum returned");
    let after = after.stop();

    eprintln!(
        "m{} and m{} down for {:.0} s",
        killed[0] + 1,
        killed[1] + 1,
        outage.as_secs_f64()
    );
    check_running(&mut checks, &mut c, &[0, 1, 2, 3], "after quorum returned");
    before.check_same_processes(&mut checks, &c, &[]);
    // No key lapsed while etcd could say so, nor after.
    for &i in &hosts {
        let absent = during.host(ip(&c, i)).absent_polls;
        checks.check(absent == 0, || {
            format!(
                "h{}'s key missing in {absent} polls before quorum was lost",
                i + 1
            )
        });
    }
    check_leases_kept(&mut checks, &c, &after, &hosts, "after quorum returned");
    check_watch_dense(&mut checks, &after, "after quorum returned");
    check_no_loss(&mut checks, &losses, sent, outage, flows_of(hosts.len()));
    let mut all = before.subnets.clone();
    if let Some(s) = new_subnet {
        all.insert(3, s);
    }
    check_one_lease_each(&mut checks, &c, &all);
    check_warns_bounded(&mut checks, &warns, outage);
    window.check_back(&mut checks, &c, &hosts);
    checks.done(logs(&c));
}

/// One host cut off from every member for longer than the TTL, its underlay up: its lease
/// expires, and the other hosts keep forwarding to it (`--expired-peer-grace`) without a lost
/// ping; healed, it takes the same subnet back.
fn a_host_partitioned_from_etcd_keeps_its_traffic_and_its_subnet() {
    let (_tmp, mut c) = rig("ef4", 3, 3, &["--expired-peer-grace=5m"]);
    let mut checks = Checks::default();
    let before = Before::take(&c, &[0, 1, 2]);
    let hosts = before.hosts.clone();
    let cut = 2;
    let others = [0, 1];
    let cut_ip = ip(&c, cut);

    let mut flows = Flows::start(&c, &hosts);
    let watch = LeaseReader::watch(&c, &before.ips);
    let window = LogWindow::open(&c);
    flows.mark_fault();
    let partition = c.etcd.partition(&c.lab.hosts[cut].ns).unwrap();
    let ips = before.ips.clone();
    let outage = hold(
        &mut checks,
        &mut c,
        &mut flows,
        &watch,
        &hosts,
        OUTAGE,
        "h3 is cut off from etcd (until its lease expired and the others renewed twice)",
        |h| {
            h.host(cut_ip).absent_polls > 0
                && others.iter().all(|&i| h.host(ips[i]).renewals() >= 2)
        },
    );
    let warns = window.warns(&c);
    // The others keep h3 as a stale peer, and say so in status and /metrics.
    for &i in &others {
        let seen = wait_stale(&c, i, cut_ip, Duration::from_secs(10));
        checks.check(seen.is_ok(), || {
            format!(
                "h{}'s status never showed h3 ({cut_ip}) as stale: {}",
                i + 1,
                seen.unwrap_err()
            )
        });
    }
    partition.heal().unwrap();
    // Back in etcd with its subnet, and healthy.
    let subnet = before.subnets[&cut].clone();
    if let Err(h) = watch.wait_for(2 * TTL, |h| {
        h.last
            .iter()
            .any(|l| l.public_ip == cut_ip && l.subnet == subnet)
    }) {
        checks.check(false, || {
            format!("h3 did not take {subnet} back after the heal: {h:?}")
        });
    }
    if let Err(e) = c.wait_healthy(cut, Duration::from_secs(30)) {
        checks.check(false, || format!("h3 not healthy after the heal: {e}"));
    }
    let (losses, sent) = flows.finish("the heal");
    let history = watch.stop();

    eprintln!("h3 cut off for {:.0} s", outage.as_secs_f64());
    check_running(&mut checks, &mut c, &hosts, "after the heal");
    before.check_same_processes(&mut checks, &c, &[]);
    let h3 = history.host(cut_ip);
    checks.check(h3.absent_polls > 0, || {
        format!("h3's lease never expired while cut off: {h3:?}")
    });
    checks.check(h3.subnets.len() == 1, || {
        format!("h3 held several subnets: {:?}", h3.subnets)
    });
    check_leases_kept(&mut checks, &c, &history, &others, "with h3 cut off");
    check_watch_dense(&mut checks, &history, "with h3 cut off");
    check_no_loss(&mut checks, &losses, sent, outage, flows_of(hosts.len()));
    check_one_lease_each(&mut checks, &c, &before.subnets);
    check_warns_bounded(&mut checks, &warns, outage);
    // Only h3 lost etcd (the others log that h3's lease expired).
    window.check_back(&mut checks, &c, &[cut]);
    checks.done(logs(&c));
}

/// Waits until host `i`'s `overlay-agent status --json` lists the peer at `peer` as stale and its
/// `/metrics` counts a stale peer; the last status seen when it does not.
fn wait_stale(c: &Rig, i: usize, peer: Ipv4Addr, within: Duration) -> Result<(), String> {
    let bpffs = format!(
        "--bpffs={}",
        c.bpffs.path().join(format!("h{}", i + 1)).display()
    );
    let addr =
        std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, overlay_tests::cluster::HEALTHZ_PORT));
    let deadline = Instant::now() + within;
    loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", c.lab.hosts[i].ns.name()])
            .arg(overlay_tests::etcd::agent_binary())
            .args([bpffs.as_str(), "status", "--json"])
            .output()
            .map_err(|e| e.to_string())?;
        let status: overlay_agent::status::Status =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        let stale = status
            .agent
            .as_ref()
            .is_some_and(|a| a.peers.iter().any(|p| p.public_ip == peer && p.stale));
        let metric = c.lab.hosts[i]
            .ns
            .run(|| overlay_tests::cluster::metric(addr, "overlay_peers_stale"))
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if stale && metric >= 1.0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "overlay_peers_stale {metric}; peers {:?}",
                status.agent.map(|a| a.peers)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every member restarted in turn, in the reverse of the agents' `--etcd-endpoints` order, one
/// agent restarted meanwhile with the list reversed: each member down until every lease was
/// renewed without it.
fn members_restarted_in_another_order_than_the_endpoints() {
    let (_tmp, mut c) = rig("ef5", 3, 3, &[]);
    let mut checks = Checks::default();
    let before = Before::take(&c, &[0, 1, 2]);
    let hosts = before.hosts.clone();

    let mut flows = Flows::start(&c, &hosts);
    let watch = LeaseReader::watch(&c, &before.ips);
    let window = LogWindow::open(&c);
    flows.mark_fault();
    let started = Instant::now();
    for m in (0..MEMBERS).rev() {
        let ips = before.ips.clone();
        let base: Vec<usize> = {
            let h = watch.history();
            ips.iter().map(|&ip| h.host(ip).renewals()).collect()
        };
        c.etcd.kill(m).unwrap();
        if m == 1 {
            // h1 restarted with the endpoints reversed (m3, m2, m1), m2 down.
            c.kill_agents(&[0]);
            let mut args = c.agents[0].args.clone();
            let reversed: Vec<String> = (0..MEMBERS).rev().map(member_url).collect();
            for a in &mut args {
                if a.starts_with("--etcd-endpoints=") {
                    *a = format!("--etcd-endpoints={}", reversed.join(","));
                }
            }
            c.start_agent(0, args).unwrap();
            if let Err(e) = c.wait_healthy(0, Duration::from_secs(30)) {
                checks.check(false, || {
                    format!("h1 restarted with the endpoints reversed is not healthy: {e}")
                });
            }
        }
        hold(
            &mut checks,
            &mut c,
            &mut flows,
            &watch,
            &hosts,
            TTL / 2,
            &format!("m{} is down", m + 1),
            |h| {
                ips.iter()
                    .zip(&base)
                    .all(|(&ip, &b)| h.host(ip).renewals() > b)
            },
        );
        c.etcd.start(m).unwrap();
        c.etcd
            .wait_healthy(&[0, 1, 2], Duration::from_secs(30))
            .unwrap();
    }
    let outage = started.elapsed();
    let warns = window.warns(&c);
    let (losses, sent) = flows.finish("the last member was back");
    let history = watch.stop();

    eprintln!("members restarted over {:.0} s", outage.as_secs_f64());
    check_running(&mut checks, &mut c, &hosts, "after the restarts");
    before.check_same_processes(&mut checks, &c, &[1, 2]);
    check_leases_kept(
        &mut checks,
        &c,
        &history,
        &hosts,
        "while the members restarted",
    );
    check_watch_dense(&mut checks, &history, "while the members restarted");
    check_no_loss(&mut checks, &losses, sent, outage, flows_of(hosts.len()));
    check_one_lease_each(&mut checks, &c, &before.subnets);
    check_warns_bounded(&mut checks, &warns, outage);
    window.check_back(&mut checks, &c, &hosts);
    checks.done(logs(&c));
}

overlay_tests::test_main!(
    root leader_killed_for_longer_than_the_ttl,
    root follower_killed_for_longer_than_the_ttl,
    root quorum_lost_for_longer_than_the_ttl_then_restored,
    root a_host_partitioned_from_etcd_keeps_its_traffic_and_its_subnet,
    root members_restarted_in_another_order_than_the_endpoints,
);
