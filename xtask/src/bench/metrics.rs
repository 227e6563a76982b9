//! One measurement each: iperf3 TCP (1 and 4 streams, with the CPU it cost), iperf3 64-byte UDP
//! packets per second, sockperf TCP ping-pong latency. Clients run in the first host's container,
//! servers in the second's.

use std::{process::Command, time::Duration};

use anyhow::{Context as _, bail};
use overlay_tests::netns::NetNs;

use super::check_interrupted;

/// Port of the iperf3 server in the receiving container.
pub const IPERF_PORT: &str = "5201";
/// Port of the sockperf server in the receiving container.
pub const SOCKPERF_PORT: &str = "11111";
/// UDP payload of the packets-per-second test.
pub const UDP_PAYLOAD: u32 = 64;

/// The metrics, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpPps,
    LatAvg,
    LatP50,
    LatP99,
    CpuPerGbit,
    /// Nanoseconds per run of `tc_encap` (eBPF modes).
    EncapNs,
    /// Nanoseconds per run of `tc_decap` (eBPF modes).
    DecapNs,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::Tcp1,
        Metric::Tcp4,
        Metric::UdpPps,
        Metric::LatAvg,
        Metric::LatP50,
        Metric::LatP99,
        Metric::CpuPerGbit,
        Metric::EncapNs,
        Metric::DecapNs,
    ];

    /// Key in the JSON output.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1 => "tcp_1_stream_gbps",
            Metric::Tcp4 => "tcp_4_streams_gbps",
            Metric::UdpPps => "udp_64b_kpps",
            Metric::LatAvg => "tcp_rr_avg_us",
            Metric::LatP50 => "tcp_rr_p50_us",
            Metric::LatP99 => "tcp_rr_p99_us",
            Metric::CpuPerGbit => "cpu_s_per_gbit",
            Metric::EncapNs => "tc_encap_ns_per_run",
            Metric::DecapNs => "tc_decap_ns_per_run",
        }
    }

    /// Column header.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP 1 stream Gbit/s",
            Metric::Tcp4 => "TCP 4 streams Gbit/s",
            Metric::UdpPps => "UDP 64 B kpps rx",
            Metric::LatAvg => "RR avg µs",
            Metric::LatP50 => "RR p50 µs",
            Metric::LatP99 => "RR p99 µs",
            Metric::CpuPerGbit => "CPU s/Gbit",
            Metric::EncapNs => "tc_encap ns/run",
            Metric::DecapNs => "tc_decap ns/run",
        }
    }

    /// Short name for chart groups.
    pub fn short(self) -> &'static str {
        match self {
            Metric::Tcp1 => "TCP ×1",
            Metric::Tcp4 => "TCP ×4",
            Metric::UdpPps => "UDP 64B pps",
            Metric::LatAvg => "RR avg",
            Metric::LatP50 => "RR p50",
            Metric::LatP99 => "RR p99",
            Metric::CpuPerGbit => "CPU/Gbit",
            Metric::EncapNs => "encap ns",
            Metric::DecapNs => "decap ns",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::Tcp1 | Metric::Tcp4 | Metric::UdpPps)
    }
}

/// One round of every metric for one mode.
pub type Sample = Vec<(Metric, f64)>;

/// Runs every measurement once, `secs` seconds each.
pub fn measure_all(
    client: &NetNs,
    server_ip: &str,
    secs: u32,
    tcp_cc: &str,
) -> anyhow::Result<Sample> {
    let mut out = Vec::new();
    let before = cpu_ticks()?;
    let tcp1 = iperf_tcp(client, server_ip, 1, secs, tcp_cc)?;
    let after = cpu_ticks()?;
    out.push((Metric::Tcp1, tcp1.bits_per_second / 1e9));
    let cpu_secs = (after - before) as f64 / clock_ticks_per_second();
    let gbits = tcp1.bytes as f64 * 8.0 / 1e9;
    if gbits > 0.0 {
        out.push((Metric::CpuPerGbit, cpu_secs / gbits));
    }
    check_interrupted()?;
    let tcp4 = iperf_tcp(client, server_ip, 4, secs, tcp_cc)?;
    out.push((Metric::Tcp4, tcp4.bits_per_second / 1e9));
    check_interrupted()?;
    out.push((
        Metric::UdpPps,
        iperf_udp_pps(client, server_ip, secs)? / 1e3,
    ));
    check_interrupted()?;
    let lat = sockperf(client, server_ip, secs)?;
    out.push((Metric::LatAvg, lat.avg));
    out.push((Metric::LatP50, lat.p50));
    out.push((Metric::LatP99, lat.p99));
    Ok(out)
}

/// The kernel's per-program run statistics (`kernel.bpf_stats_enabled`), on while it lives.
struct BpfStats;

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        overlay_tests::netns::run("sysctl", &["-qw", "kernel.bpf_stats_enabled=1"])
            .context("turning on kernel.bpf_stats_enabled")?;
        Ok(BpfStats)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = overlay_tests::netns::run("sysctl", &["-qw", "kernel.bpf_stats_enabled=0"]);
    }
}

/// Summed (run time in ns, runs) of every loaded program named `name`.
fn run_stats(name: &str) -> anyhow::Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "name", name])
        .output()
        .context("running bpftool prog show")?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool -j prog show output")?;
    let progs = match json {
        serde_json::Value::Array(a) => a,
        one => vec![one],
    };
    Ok(progs.iter().fold((0, 0), |(t, n), p| {
        (
            t + p["run_time_ns"].as_u64().unwrap_or(0),
            n + p["run_cnt"].as_u64().unwrap_or(0),
        )
    }))
}

/// What the eBPF programs cost per run, over a 64-byte UDP flood (one packet, one run each) with
/// the kernel's per-program statistics on. Measured after the other tests and apart from them:
/// the statistics add two clock reads to every run, which the other numbers must not carry.
pub fn program_cost(client: &NetNs, server_ip: &str, secs: u32) -> anyhow::Result<Sample> {
    let _stats = BpfStats::enable()?;
    let programs = [(Metric::EncapNs, "tc_encap"), (Metric::DecapNs, "tc_decap")];
    let before: Vec<(u64, u64)> = programs
        .iter()
        .map(|(_, p)| run_stats(p))
        .collect::<anyhow::Result<_>>()?;
    iperf_udp_pps(client, server_ip, secs)?;
    let mut out = Vec::new();
    for ((metric, program), (t0, n0)) in programs.iter().zip(before) {
        let (t1, n1) = run_stats(program)?;
        if n1 <= n0 {
            bail!("{program} did not run during the UDP flood");
        }
        out.push((*metric, (t1 - t0) as f64 / (n1 - n0) as f64));
    }
    Ok(out)
}

struct Throughput {
    bits_per_second: f64,
    bytes: u64,
}

struct Latency {
    avg: f64,
    p50: f64,
    p99: f64,
}

/// Runs a client inside `ns` under `timeout`, so a datapath that drops the control connection
/// cannot hang the bench. Returns stdout.
fn client(ns: &NetNs, program: &str, args: &[&str], limit: Duration) -> anyhow::Result<String> {
    let secs = limit.as_secs().max(1).to_string();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "timeout",
            "-k",
            "2",
            &secs,
            program,
        ])
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr
            .lines()
            .chain(stdout.lines())
            .rfind(|l| l.contains("error") || l.contains("ERROR"))
            .unwrap_or("")
            .trim()
            .to_owned();
        bail!(
            "{program} {} failed ({}) {detail}",
            args.join(" "),
            out.status
        );
    }
    Ok(stdout)
}

fn iperf_json(ns: &NetNs, args: &[&str], secs: u32) -> anyhow::Result<serde_json::Value> {
    // One retry: right after a mode comes up the server may not listen yet.
    let limit = Duration::from_secs(u64::from(secs) + 20);
    let stdout = match client(ns, "iperf3", args, limit) {
        Ok(s) => s,
        Err(_) => {
            std::thread::sleep(Duration::from_millis(500));
            client(ns, "iperf3", args, limit)?
        }
    };
    let json: serde_json::Value = serde_json::from_str(&stdout).context("iperf3 --json output")?;
    if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    Ok(json)
}

fn iperf_tcp(
    ns: &NetNs,
    ip: &str,
    streams: u32,
    secs: u32,
    tcp_cc: &str,
) -> anyhow::Result<Throughput> {
    let (s, p) = (secs.to_string(), streams.to_string());
    let args = ["-c", ip, "-p", IPERF_PORT, "-t", &s, "-P", &p, "--json"];
    let json = iperf_json(ns, &args, secs)?;
    // The namespace's default decides it (see tcp_cc); a mismatch would mislabel the numbers.
    if let Some(used) = json["end"]["sender_tcp_congestion"].as_str()
        && used != tcp_cc
    {
        bail!("iperf3's sender used {used} where the bench set {tcp_cc}");
    }
    let sum = &json["end"]["sum_received"];
    Ok(Throughput {
        bits_per_second: sum["bits_per_second"]
            .as_f64()
            .context("iperf3: no end.sum_received.bits_per_second")?,
        bytes: sum["bytes"].as_u64().unwrap_or(0),
    })
}

/// Packets per second the receiver got, sending 64-byte UDP payloads as fast as iperf3 can.
fn iperf_udp_pps(ns: &NetNs, ip: &str, secs: u32) -> anyhow::Result<f64> {
    let s = secs.to_string();
    let len = UDP_PAYLOAD.to_string();
    let json = iperf_json(
        ns,
        &[
            "-c", ip, "-p", IPERF_PORT, "-u", "-l", &len, "-b", "0", "-t", &s, "--json",
        ],
        secs,
    )?;
    let end = &json["end"];
    if let (Some(bytes), Some(seconds)) = (
        end["sum_received"]["bytes"].as_f64(),
        end["sum_received"]["seconds"].as_f64(),
    ) && seconds > 0.0
    {
        return Ok(bytes / f64::from(UDP_PAYLOAD) / seconds);
    }
    let sum = &end["sum"];
    let packets = sum["packets"]
        .as_f64()
        .context("iperf3: no end.sum.packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(f64::from(secs));
    Ok((packets - lost) / seconds)
}

fn sockperf(ns: &NetNs, ip: &str, secs: u32) -> anyhow::Result<Latency> {
    let s = secs.to_string();
    let stdout = client(
        ns,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "-i",
            ip,
            "-p",
            SOCKPERF_PORT,
            "-t",
            &s,
            "-m",
            "64",
            "--full-rtt",
        ],
        Duration::from_secs(u64::from(secs) + 20),
    )?;
    parse_sockperf(&stdout)
}

fn parse_sockperf(text: &str) -> anyhow::Result<Latency> {
    let clean = strip_ansi(text);
    let number_after = |marker: &str| -> Option<f64> {
        let line = clean.lines().find(|l| l.contains(marker))?;
        let rest = &line[line.find(marker)? + marker.len()..];
        rest.trim_start_matches(['=', ' '])
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    Ok(Latency {
        avg: number_after("avg-rtt=")
            .or_else(|| number_after("avg-latency="))
            .context("sockperf: no avg-rtt in its output")?,
        p50: number_after("percentile 50.000").context("sockperf: no p50")?,
        p99: number_after("percentile 99.000").context("sockperf: no p99")?,
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Non-idle CPU time of the whole machine (all cores) so far, in clock ticks: user, nice, system,
/// irq, softirq and steal from /proc/stat's `cpu` line (not idle, not iowait).
pub fn cpu_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is in user already)
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf_full_rtt() {
        let text = "sockperf: \u{1b}[2;35m====> avg-rtt=20.325 (std-dev=21.477)\u{1b}[0m\n\
                    sockperf: ---> percentile 99.000 =   86.060\n\
                    sockperf: ---> percentile 90.000 =   23.804\n\
                    sockperf: ---> percentile 50.000 =   16.310\n";
        let l = parse_sockperf(text).unwrap();
        assert_eq!((l.avg, l.p50, l.p99), (20.325, 16.310, 86.060));
    }
}
