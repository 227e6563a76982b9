//! Results: medians and spreads, the markdown tables, the JSON file and the SVG chart.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::json;

use super::metrics::Metric;

/// What happened to one mode.
#[derive(Debug, Clone)]
pub enum Status {
    Measured,
    Missing(String),
    Failed(String),
}

/// All samples of one mode.
#[derive(Debug, Clone)]
pub struct ModeResult {
    pub name: &'static str,
    pub what: &'static str,
    pub status: Status,
    pub samples: BTreeMap<Metric, Vec<f64>>,
}

/// Median, min and max of a metric's samples.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    /// Half the range as a percentage of the median.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median.abs() * 100.0
        }
    }
}

impl ModeResult {
    pub fn stat(&self, m: Metric) -> Option<Stat> {
        Stat::of(self.samples.get(&m)?)
    }

    /// Relative performance against `reference`, higher is better: mode/ref for throughput and
    /// packet rate, ref/mode for latency and CPU.
    pub fn relative(&self, reference: &ModeResult, m: Metric) -> Option<f64> {
        let (a, b) = (self.stat(m)?.median, reference.stat(m)?.median);
        if a <= 0.0 || b <= 0.0 {
            return None;
        }
        Some(if m.higher_is_better() { a / b } else { b / a })
    }
}

/// Modes measured against another to price one feature: (mode, reference, what it prices).
pub const PAIRS: [(&str, &str, &str); 1] = [(
    "ebpf-udp",
    "ebpf-udp-no-peer-counters",
    "the per-peer counters",
)];

/// Everything the report needs besides the results.
#[derive(Debug, Clone)]
pub struct Context {
    pub command: String,
    pub machine: String,
    pub date: String,
    pub repeat: u32,
    pub secs: u32,
    pub notes: Vec<String>,
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The markdown report: absolute numbers, then relative performance against bare and against
/// kernel-vxlan.
pub fn markdown(ctx: &Context, results: &[ModeResult]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Command: `{}`  ", ctx.command);
    let _ = writeln!(s, "Machine: {}  ", ctx.machine);
    let _ = writeln!(
        s,
        "Date: {}; {} repeat(s) of {} s per test, median ± half the range.\n",
        ctx.date, ctx.repeat, ctx.secs
    );
    let _ = write!(s, "| mode |");
    for m in Metric::ALL {
        let _ = write!(s, " {} |", m.label());
    }
    let _ = write!(s, "\n| --- |");
    for _ in Metric::ALL {
        let _ = write!(s, " ---: |");
    }
    s.push('\n');
    for r in results {
        let _ = write!(s, "| {} |", r.name);
        match &r.status {
            Status::Measured => {
                for m in Metric::ALL {
                    match r.stat(m) {
                        Some(st) if st.n > 1 => {
                            let _ =
                                write!(s, " {} ±{:.0}% |", fmt_value(st.median), st.spread_pct());
                        }
                        Some(st) => {
                            let _ = write!(s, " {} |", fmt_value(st.median));
                        }
                        None => s.push_str(" – |"),
                    }
                }
            }
            Status::Missing(why) => {
                let _ = write!(s, " **missing**: {} |", why.replace('|', "/"));
                for _ in 1..Metric::ALL.len() {
                    s.push_str(" |");
                }
            }
            Status::Failed(why) => {
                let _ = write!(s, " **failed**: {} |", why.replace('|', "/"));
                for _ in 1..Metric::ALL.len() {
                    s.push_str(" |");
                }
            }
        }
        s.push('\n');
    }
    for reference in ["bare", "kernel-vxlan"] {
        let Some(base) = results
            .iter()
            .find(|r| r.name == reference && matches!(r.status, Status::Measured))
        else {
            continue;
        };
        let _ = write!(
            s,
            "\nRelative to `{reference}` (higher is better: throughput and packet rate as \
             mode/{reference}, latency and CPU as {reference}/mode):\n\n| mode |"
        );
        for m in Metric::ALL {
            let _ = write!(s, " {} |", m.short());
        }
        let _ = write!(s, "\n| --- |");
        for _ in Metric::ALL {
            let _ = write!(s, " ---: |");
        }
        s.push('\n');
        for r in results
            .iter()
            .filter(|r| matches!(r.status, Status::Measured))
        {
            let _ = write!(s, "| {} |", r.name);
            for m in Metric::ALL {
                match r.relative(base, m) {
                    Some(x) => {
                        let _ = write!(s, " {x:.2} |");
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
    }
    for (mode, reference, what) in PAIRS {
        let measured = |name: &str| {
            results
                .iter()
                .find(|r| r.name == name && matches!(r.status, Status::Measured))
        };
        let (Some(a), Some(b)) = (measured(mode), measured(reference)) else {
            continue;
        };
        let _ = write!(
            s,
            "\nWhat {what} cost: `{mode}` relative to `{reference}` (1.00: nothing; below: \
             slower by that much):\n\n|"
        );
        for m in Metric::ALL {
            let _ = write!(s, " {} |", m.short());
        }
        s.push_str("\n|");
        for _ in Metric::ALL {
            s.push_str(" ---: |");
        }
        s.push_str("\n|");
        for m in Metric::ALL {
            match a.relative(b, m) {
                Some(x) => {
                    let _ = write!(s, " {x:.3} |");
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    if !ctx.notes.is_empty() {
        s.push('\n');
        for n in &ctx.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// The JSON report: every sample, its statistics and the relative numbers.
pub fn json(ctx: &Context, results: &[ModeResult]) -> serde_json::Value {
    let find = |name: &str| {
        results
            .iter()
            .find(|r| r.name == name && matches!(r.status, Status::Measured))
    };
    let (bare, kvx) = (find("bare"), find("kernel-vxlan"));
    let modes: Vec<_> = results
        .iter()
        .map(|r| {
            let (status, reason) = match &r.status {
                Status::Measured => ("measured", None),
                Status::Missing(w) => ("missing", Some(w.clone())),
                Status::Failed(w) => ("failed", Some(w.clone())),
            };
            let mut metrics = serde_json::Map::new();
            let mut vs_bare = serde_json::Map::new();
            let mut vs_kvx = serde_json::Map::new();
            for m in Metric::ALL {
                if let Some(st) = r.stat(m) {
                    metrics.insert(
                        m.key().into(),
                        json!({
                            "samples": r.samples[&m],
                            "median": st.median,
                            "min": st.min,
                            "max": st.max,
                            "spread_pct": st.spread_pct(),
                            "higher_is_better": m.higher_is_better(),
                        }),
                    );
                }
                if let Some(x) = bare.and_then(|b| r.relative(b, m)) {
                    vs_bare.insert(m.key().into(), json!(x));
                }
                if let Some(x) = kvx.and_then(|b| r.relative(b, m)) {
                    vs_kvx.insert(m.key().into(), json!(x));
                }
            }
            json!({
                "mode": r.name,
                "what": r.what,
                "status": status,
                "reason": reason,
                "metrics": metrics,
                "relative_to_bare": vs_bare,
                "relative_to_kernel_vxlan": vs_kvx,
            })
        })
        .collect();
    json!({
        "command": ctx.command,
        "machine": ctx.machine,
        "date": ctx.date,
        "repeat": ctx.repeat,
        "seconds_per_test": ctx.secs,
        "relative_means": "higher is better: mode/reference for throughput and packet rate, \
                           reference/mode for latency and CPU per gigabit",
        "notes": ctx.notes,
        "modes": modes,
    })
}

const COLORS: [&str; 7] = [
    "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Grouped bars: per metric, one bar per measured mode, its performance relative to bare (higher
/// is better), with the 1.0 line.
pub fn svg(ctx: &Context, results: &[ModeResult]) -> String {
    let Some(bare) = results
        .iter()
        .find(|r| r.name == "bare" && matches!(r.status, Status::Measured))
    else {
        return String::from(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\">\
             <text x=\"10\" y=\"25\">bare was not measured: no ratios</text></svg>\n",
        );
    };
    let measured: Vec<&ModeResult> = results
        .iter()
        .filter(|r| matches!(r.status, Status::Measured))
        .collect();
    // Only what bare has: the programs' cost per run has nothing to be relative to there.
    let metrics: Vec<Metric> = Metric::ALL
        .into_iter()
        .filter(|&m| bare.stat(m).is_some())
        .collect();
    let max_ratio = measured
        .iter()
        .flat_map(|r| metrics.iter().filter_map(|&m| r.relative(bare, m)))
        .fold(1.2f64, f64::max)
        .min(4.0);
    let top = (max_ratio * 5.0).ceil() / 5.0;
    let (left, right, plot_top, plot_h) = (60.0, 20.0, 60.0, 300.0);
    let bar_w = 14.0;
    let group_w = bar_w * measured.len() as f64 + 24.0;
    let width = (left + right + group_w * metrics.len() as f64).max(720.0);
    let legend_rows = results.len();
    let height = plot_top + plot_h + 50.0 + 18.0 * legend_rows as f64 + 10.0;
    let y = |v: f64| plot_top + plot_h - (v.min(top) / top) * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{left}" y="20" font-size="15" font-weight="bold">Performance relative to bare (higher is better; latency and CPU inverted)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="40" fill="#555">{} · {}</text>"##,
        esc(&ctx.machine),
        esc(&ctx.date)
    );
    // Grid.
    let mut v = 0.0;
    while v <= top + 1e-9 {
        let yy = y(v);
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{v:.1}</text>",
            width - right,
            left - 6.0,
            yy + 4.0
        );
        v += 0.2;
    }
    let one = y(1.0);
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{:.1}" y1="{one:.1}" y2="{one:.1}" stroke="black" stroke-dasharray="4 3"/>"#,
        width - right
    );
    for (g, &m) in metrics.iter().enumerate() {
        let gx = left + group_w * g as f64 + 12.0;
        for (i, r) in measured.iter().enumerate() {
            let color =
                COLORS[results.iter().position(|x| x.name == r.name).unwrap_or(0) % COLORS.len()];
            if let Some(ratio) = r.relative(bare, m) {
                let x = gx + bar_w * i as f64;
                let yy = y(ratio);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {ratio:.2}</title></rect>"#,
                    bar_w - 2.0,
                    plot_top + plot_h - yy,
                    esc(r.name)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + bar_w * measured.len() as f64 / 2.0,
            plot_top + plot_h + 18.0,
            esc(m.short())
        );
    }
    for (i, r) in results.iter().enumerate() {
        let ly = plot_top + plot_h + 40.0 + 18.0 * i as f64;
        let color = COLORS[i % COLORS.len()];
        let label = match &r.status {
            Status::Measured => r.name.to_owned(),
            Status::Missing(_) => format!("{} (missing)", r.name),
            Status::Failed(_) => format!("{} (failed)", r.name),
        };
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 10.0,
            left + 18.0,
            ly,
            esc(&label)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let st = Stat::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((st.median, st.min, st.max), (2.0, 1.0, 3.0));
        assert_eq!(st.spread_pct(), 50.0);
        assert_eq!(Stat::of(&[1.0, 3.0]).unwrap().median, 2.0);
    }

    #[test]
    fn relative_is_higher_is_better() {
        let mk = |tput: f64, lat: f64| ModeResult {
            name: "x",
            what: "",
            status: Status::Measured,
            samples: [(Metric::Tcp1, vec![tput]), (Metric::LatP50, vec![lat])].into(),
        };
        let (bare, slow) = (mk(10.0, 20.0), mk(5.0, 40.0));
        assert_eq!(slow.relative(&bare, Metric::Tcp1), Some(0.5));
        assert_eq!(slow.relative(&bare, Metric::LatP50), Some(0.5));
    }
}
