//! vm-bench's results: the windows parsed from the log, paired with the no-agent windows
//! around them, as markdown and JSON.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{
    bench::{VmBenchArgs, BENCH_CFGS},
    guest::MARK,
    report::programs,
};

pub(super) struct BenchWindow {
    round: u32,
    step: u32,
    cfg: String,
    /// ns per getppid() in the fastest tenth of the calls, and over all of them.
    syscall_ns: f64,
    syscall_mean_ns: f64,
    /// Connections per second over the window, and in its fastest second.
    conn_s: f64,
    conn_best_s: f64,
    failed: u64,
    /// The agent's CPU time during the window's load, in clock ticks (1/100 s).
    agent_ticks: Option<u64>,
}

/// One window against the no-agent windows around it: ratios of getppid()'s cost (1.0 =
/// the same) and of churn throughput (1.0 = the same).
struct Pair {
    syscall_best: f64,
    syscall_mean: f64,
    churn_best: f64,
    churn_mean: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
pub(super) struct BenchResult {
    pub(super) windows: Vec<BenchWindow>,
    hooks: HashMap<String, String>,
    tw: Vec<Value>,
    ss_before: Option<u64>,
    ss_after: Option<u64>,
    pub(super) error: Option<String>,
}

impl BenchResult {
    pub(super) fn parse(log: &str) -> BenchResult {
        let mut r = BenchResult::default();
        let mut last_ready: Option<Value> = None;
        for line in log.lines() {
            let Some(at) = line.find(MARK) else { continue };
            let f: Vec<&str> = line[at + MARK.len()..].split('|').collect();
            match f.as_slice() {
                ["ready", rest @ ..] => {
                    last_ready = serde_json::from_str(&rest.join("|")).ok();
                }
                ["bench", round, step, cfg, sc, sc_mean, ch, ch_best, failed, ticks] => {
                    let (Ok(round), Ok(step), Ok(sc), Ok(sc_mean), Ok(ch), Ok(ch_best)) = (
                        round.parse(),
                        step.parse(),
                        sc.parse(),
                        sc_mean.parse(),
                        ch.parse(),
                        ch_best.parse(),
                    ) else {
                        continue;
                    };
                    if let Some(v) = last_ready.take() {
                        let attached =
                            format!("{} ({})", v["hooks"].as_str().unwrap_or("?"), programs(&v));
                        r.hooks.entry(cfg.to_string()).or_insert(attached);
                    }
                    r.windows.push(BenchWindow {
                        round,
                        step,
                        cfg: cfg.to_string(),
                        syscall_ns: sc,
                        syscall_mean_ns: sc_mean,
                        conn_s: ch,
                        conn_best_s: ch_best,
                        failed: failed.parse().unwrap_or(0),
                        agent_ticks: ticks.parse().ok(),
                    });
                }
                ["tw", rest @ ..] => {
                    if let Ok(v) = serde_json::from_str::<Value>(&rest.join("|")) {
                        r.tw.push(v);
                    }
                }
                ["tw-ss", "before", n] => r.ss_before = n.trim().parse().ok(),
                ["tw-ss", "after", n] => r.ss_after = n.trim().parse().ok(),
                ["bench-error", e] => r.error = Some(e.to_string()),
                _ => {}
            }
        }
        r
    }

    /// Each window of `cfg` against the mean of the no-agent windows right before and after
    /// it, in the same round.
    fn paired(&self, cfg: &str) -> Vec<Pair> {
        let mut out = Vec::new();
        for (i, w) in self.windows.iter().enumerate() {
            if w.cfg != cfg || i == 0 {
                continue;
            }
            let (Some(a), Some(b)) = (self.windows.get(i - 1), self.windows.get(i + 1)) else {
                continue;
            };
            if a.cfg != "none" || b.cfg != "none" || a.round != w.round {
                continue;
            }
            let mean = |f: fn(&BenchWindow) -> f64| (f(a) + f(b)) / 2.0;
            out.push(Pair {
                syscall_best: w.syscall_ns / mean(|x| x.syscall_ns),
                syscall_mean: w.syscall_mean_ns / mean(|x| x.syscall_mean_ns),
                churn_best: w.conn_best_s / mean(|x| x.conn_best_s),
                churn_mean: w.conn_s / mean(|x| x.conn_s),
            });
        }
        out
    }

    pub(super) fn markdown(&self, release: &str, accel: &str, args: &VmBenchArgs) -> String {
        let mut md = format!(
            "#### {release} ({accel}; {} rounds, {} getppid() calls and {} s of loopback \
             churn per window)\n\n\
             | configuration | hooks attached | getppid() ns, fastest tenth (median) | getppid() cost vs no agent: fastest tenth / all calls (paired medians) | churn conn/s, fastest second (median) | churn vs no agent: fastest second (paired median, min–max) / whole window (paired median) | agent CPU s per window (median) |\n\
             |---|---|---|---|---|---|---|\n",
            args.rounds, args.syscalls, args.window
        );
        for cfg in std::iter::once("none").chain(BENCH_CFGS) {
            let ws: Vec<&BenchWindow> = self.windows.iter().filter(|w| w.cfg == cfg).collect();
            let sc = median(ws.iter().map(|w| w.syscall_ns).collect());
            let ch = median(ws.iter().map(|w| w.conn_best_s).collect());
            let (cost, churn) = if cfg == "none" {
                ("–".to_string(), "–".to_string())
            } else {
                let p = self.paired(cfg);
                let pct = |v: Vec<f64>| median(v) * 100.0;
                let best: Vec<f64> = p.iter().map(|x| x.churn_best).collect();
                let lo = best.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = best.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (
                    format!(
                        "{:+.1}% / {:+.1}%",
                        pct(p.iter().map(|x| x.syscall_best).collect()) - 100.0,
                        pct(p.iter().map(|x| x.syscall_mean).collect()) - 100.0
                    ),
                    format!(
                        "{:.1}% ({:.1}–{:.1}%) / {:.1}%",
                        pct(best),
                        lo * 100.0,
                        hi * 100.0,
                        pct(p.iter().map(|x| x.churn_mean).collect())
                    ),
                )
            };
            let cpu = median(
                ws.iter()
                    .filter_map(|w| w.agent_ticks.map(|t| t as f64 / 100.0))
                    .collect(),
            );
            md.push_str(&format!(
                "| {cfg} | {} | {sc:.0} | {cost} | {ch:.0} | {churn} | {} |\n",
                self.hooks.get(cfg).map_or("–", String::as_str),
                if cfg == "none" || cpu.is_nan() {
                    "–".to_string()
                } else {
                    format!("{cpu:.2}")
                }
            ));
        }
        let failed: u64 = self.windows.iter().map(|w| w.failed).sum();
        if failed > 0 {
            md.push_str(&format!(
                "\n{failed} churn connects failed (EADDRNOTAVAIL while local ports sat in TIME_WAIT) and were retried.\n"
            ));
        }
        let sum = |k: &str| self.tw.iter().filter_map(|v| v[k].as_u64()).sum::<u64>();
        let by = self
            .tw
            .first()
            .and_then(|v| v["counted_by"].as_str())
            .unwrap_or("?");
        md.push_str(&format!(
            "\nTIME_WAIT, {} connections in a namespace of their own under `--hooks trampoline`: \
             `entered` {} and `expired` {} summed over {} `time_wait` records (counted_by: {by}); \
             `ss` saw {} TIME_WAIT sockets before `ss -K` and {} after; the last record's total: {}.\n",
            args.tw_conns,
            sum("entered"),
            sum("expired"),
            self.tw.len(),
            self.ss_before.map_or("?".into(), |n| n.to_string()),
            self.ss_after.map_or("?".into(), |n| n.to_string()),
            self.tw.last().map_or("?".into(), |v| v["total"].to_string()),
        ));
        md
    }

    pub(super) fn to_json(&self, kernel: &str, release: &str, accel: &str) -> Value {
        json!({
            "kernel": kernel,
            "release": release,
            "accelerator": accel,
            "windows": self.windows.iter().map(|w| json!({
                "round": w.round, "step": w.step, "configuration": w.cfg,
                "syscall_ns_fastest_tenth": w.syscall_ns, "syscall_ns": w.syscall_mean_ns,
                "conn_per_s": w.conn_s, "conn_per_s_fastest_second": w.conn_best_s,
                "failed_connects": w.failed,
                "agent_cpu_ticks": w.agent_ticks,
            })).collect::<Vec<_>>(),
            "paired": BENCH_CFGS.iter().map(|c| {
                let p = self.paired(c);
                json!({
                    "configuration": c,
                    "syscall_cost_ratio_fastest_tenth": p.iter().map(|x| x.syscall_best).collect::<Vec<_>>(),
                    "syscall_cost_ratio": p.iter().map(|x| x.syscall_mean).collect::<Vec<_>>(),
                    "churn_ratio_fastest_second": p.iter().map(|x| x.churn_best).collect::<Vec<_>>(),
                    "churn_ratio": p.iter().map(|x| x.churn_mean).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
            "time_wait": {
                "records": self.tw,
                "ss_before_kill": self.ss_before,
                "ss_after_kill": self.ss_after,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_windows_pair_with_the_no_agent_windows_around_them() {
        let log = "noise PWVM|round|1\n\
                   PWVM|bench|1|1|none|1000.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|ready|{\"hooks\":\"tracepoint\",\"programs\":[\"sys_enter_bind\"]}\n\
                   PWVM|bench|1|2|tracepoint|1300.0|1430.0|900.0|1080|0|45\n\
                   PWVM|bench|1|3|none|1000.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|ready|{\"hooks\":\"trampoline\",\"programs\":[\"tr_release\"]}\n\
                   PWVM|bench|1|4|trampoline|1010.0|1100.0|990.0|1200|2|40\n\
                   PWVM|bench|1|5|none|1020.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|bench|1|6|trampoline-all|1.0|x\n\
                   PWVM|tw-ss|before|5000\n\
                   PWVM|tw|{\"total\":5000,\"entered\":5000,\"expired\":0,\"counted_by\":\"events\"}\n\
                   PWVM|done|9.0\n";
        let r = BenchResult::parse(log);
        assert_eq!(r.windows.len(), 5, "the malformed line is skipped");
        let tp = r.paired("tracepoint");
        assert_eq!(tp.len(), 1);
        assert!((tp[0].syscall_best - 1.3).abs() < 1e-9 && (tp[0].churn_mean - 0.9).abs() < 1e-9);
        assert!((tp[0].churn_best - 0.9).abs() < 1e-9 && (tp[0].syscall_mean - 1.3).abs() < 1e-9);
        let t = r.paired("trampoline");
        assert_eq!(t.len(), 1);
        assert!((t[0].syscall_best - 1.0).abs() < 1e-9 && (t[0].churn_mean - 0.99).abs() < 1e-9);
        assert_eq!(r.hooks["trampoline"], "trampoline (tr_release)");
        assert_eq!(r.windows[1].agent_ticks, Some(45));
        assert_eq!(r.ss_before, Some(5000));
        assert_eq!(r.tw.len(), 1);
        assert!(r.paired("trampoline-all").is_empty());
        assert!(r
            .markdown(
                "6.1",
                "tcg",
                &VmBenchArgs {
                    kernels: vec![],
                    rounds: 1,
                    window: 5,
                    syscalls: 10,
                    tw_conns: 5000
                }
            )
            .contains("| tracepoint | tracepoint (sys_enter_bind) | 1300 | +30.0% / +30.0% |"));
    }
}
