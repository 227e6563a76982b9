//! A ping flow watched while it runs, so a test can place an event (a kill, a restart) inside the
//! flow by waiting for replies instead of sleeping, and can then prove from the replies' sequence
//! numbers that one and the same flow was running before the event and still ran after it.

use crate::netns::NetNs;

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// One echo reply as ping printed it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reply {
    /// `icmp_seq`: the request's number, from 1, one per interval.
    pub seq: u32,
    /// When it arrived (`-D`: seconds since the epoch, as ping's clock read it).
    pub at: f64,
}

impl Reply {
    /// Parses iputils ping's reply line with `-D`:
    /// `[1700000000.123456] 64 bytes from 172.16.5.2: icmp_seq=12 ttl=62 time=0.1 ms`.
    pub fn parse(line: &str) -> Option<Self> {
        if !line.contains("bytes from") {
            return None;
        }
        let at = line.strip_prefix('[')?.split(']').next()?.parse().ok()?;
        let seq = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("icmp_seq="))?
            .parse()
            .ok()?;
        Some(Self { seq, at })
    }
}

#[derive(Debug, Default)]
struct Seen {
    replies: Vec<Reply>,
    output: String,
}

/// `ping -n -D -i <interval> -W 1 <to>` (no count: it runs until stopped) inside a network
/// namespace, its replies collected as they arrive. Killed on drop.
#[derive(Debug)]
pub struct PingFlow {
    child: Child,
    seen: Arc<Mutex<Seen>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PingFlow {
    /// Starts pinging `to` every `interval` seconds (ping's `-i`, e.g. `"0.01"`) from namespace
    /// `ns`, and waits for its first `first` replies (so the flow is known to run).
    pub fn start(ns: &NetNs, to: Ipv4Addr, interval: &str, first: usize) -> Result<Self, String> {
        let mut flow = Self::spawn(ns.name(), to, interval).map_err(|e| format!("ping: {e}"))?;
        flow.wait_replies(0, first, Duration::from_secs(10))?;
        Ok(flow)
    }

    fn spawn(ns: &str, to: Ipv4Addr, interval: &str) -> std::io::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-D", "-i", interval, "-W", "1",
            ])
            .arg(to.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let sink = seen.clone();
        // ping writes a line per reply as it comes (it flushes stdout even into a pipe).
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(reply) = Reply::parse(&line) {
                    s.replies.push(reply);
                }
                s.output.push_str(&line);
                s.output.push('\n');
            }
        });
        Ok(Self {
            child,
            seen,
            reader: Some(reader),
        })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replies so far, in arrival order.
    pub fn replies(&self) -> Vec<Reply> {
        self.seen().replies.clone()
    }

    /// How many replies arrived so far.
    pub fn count(&self) -> usize {
        self.seen().replies.len()
    }

    /// What ping printed so far.
    pub fn output(&self) -> String {
        self.seen().output.clone()
    }

    /// True while the ping process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `n` more replies than `after` have arrived (replies number `after + 1 ..=
    /// after + n` in arrival order); fails when ping exits or `deadline` passes first (a stalled
    /// flow must fail the test, not hang it).
    pub fn wait_replies(
        &mut self,
        after: usize,
        n: usize,
        deadline: Duration,
    ) -> Result<(), String> {
        let until = Instant::now() + deadline;
        loop {
            if self.count() >= after + n {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!(
                    "ping exited after {} replies; it printed:\n{}",
                    self.count(),
                    self.output()
                ));
            }
            if Instant::now() > until {
                return Err(format!(
                    "{} replies after reply {after} within {deadline:?}: got {}; ping printed:\n{}",
                    n,
                    self.count().saturating_sub(after),
                    self.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Panics unless ping still runs: the flow did not end before `event`.
    pub fn assert_running(&mut self, event: &str) {
        assert!(
            self.is_running(),
            "the flow ended before {event}:\n{}",
            self.output()
        );
    }

    /// Ends a flow placed across an event: waits for `n` more replies from now (`after`, e.g.
    /// "the restart", names the moment in the failure), checks that ping still runs, stops it, and
    /// checks [`ran_across`] with `at_event` (the reply count when the event began). Returns the
    /// replies and ping's output.
    pub fn resumes(mut self, at_event: usize, n: usize, after: &str) -> (Vec<Reply>, String) {
        let resumed = self.count();
        if let Err(e) = self.wait_replies(resumed, n, Duration::from_secs(10)) {
            panic!("no replies after {after}: {e}");
        }
        self.assert_running(&format!("{after} was over"));
        let (replies, output) = self.stop();
        if let Err(e) = ran_across(&replies, at_event, resumed, n) {
            panic!("the flow did not run across {after}: {e}\n{output}");
        }
        (replies, output)
    }

    /// Stops ping (SIGINT, so it prints its summary) and returns every reply and its output.
    pub fn stop(mut self) -> (Vec<Reply>, String) {
        // SAFETY: signalling our own child, not yet reaped. `ip netns exec` execs ping, so the
        // pid is ping's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let s = self.seen();
        (s.replies.clone(), s.output.clone())
    }
}

impl Drop for PingFlow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sequence numbers in `1..=` the highest one replied that got no reply: the requests lost.
pub fn lost(replies: &[Reply]) -> Vec<u32> {
    let max = replies.iter().map(|r| r.seq).max().unwrap_or(0);
    let mut got = vec![false; max as usize + 1];
    for r in replies {
        got[r.seq as usize] = true;
    }
    (1..=max).filter(|&s| !got[s as usize]).collect()
}

/// Checks that one flow ran across an event: `at_event` replies had arrived before it, and the
/// replies from number `resumed` on (arrival order) include at least `min` to requests numbered
/// above every reply before the event.
pub fn ran_across(
    replies: &[Reply],
    at_event: usize,
    resumed: usize,
    min: usize,
) -> Result<(), String> {
    let Some(before) = replies[..at_event].iter().map(|r| r.seq).max() else {
        return Err("no reply before the event".into());
    };
    let later = replies[resumed..].iter().filter(|r| r.seq > before).count();
    if later < min {
        return Err(format!(
            "{later} replies after the event to requests sent after it (last before: \
             icmp_seq {before}), wanted {min}"
        ));
    }
    Ok(())
}

/// The longest time between two consecutive replies, in seconds.
pub fn longest_gap(replies: &[Reply]) -> f64 {
    replies
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_and_finds_losses() {
        let line = "[1700000000.500000] 64 bytes from 172.16.5.2: icmp_seq=3 ttl=62 time=0.101 ms";
        assert_eq!(
            Reply::parse(line),
            Some(Reply {
                seq: 3,
                at: 1_700_000_000.5
            })
        );
        assert_eq!(
            Reply::parse("PING 172.16.5.2 (172.16.5.2) 56(84) bytes of data."),
            None
        );
        let r = |seq, at| Reply { seq, at };
        let replies = [r(1, 0.0), r(2, 0.01), r(4, 0.5), r(5, 0.51)];
        assert_eq!(lost(&replies), [3]);
        assert!((longest_gap(&replies) - 0.49).abs() < 1e-9);
        assert!(lost(&[]).is_empty());
        assert!(ran_across(&replies, 2, 2, 2).is_ok());
        assert!(ran_across(&replies, 2, 2, 3).is_err());
        assert!(
            ran_across(&replies, 0, 0, 1).is_err(),
            "nothing before the event"
        );
        // Replies after the event to requests from before it do not count.
        assert!(ran_across(&[r(1, 0.0), r(2, 0.1), r(1, 0.2)], 2, 2, 1).is_err());
    }
}
