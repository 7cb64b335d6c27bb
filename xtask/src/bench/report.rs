//! Report: what every phase adds to as it runs, and results.md rendered from all of it.
//! The sections' tables are written by `throughput` (1 and 1b) and `agent` (2 to 4).

mod agent;
mod throughput;

use std::process::Command;
use std::{fmt::Write as _, time::Duration};

use self::{
    agent::{render_cost, render_latency, render_storm},
    throughput::{render_churn, render_sweep},
};
use super::{
    churn::{ChurnResult, SweepResult},
    cpu::vm_hwm_kib,
    exhaustion,
    latency::{CostRow, LatencyRuns},
    note,
    stats::json_u64,
    storm::StormRow,
    tracers::{Cfg, Host},
    Settings,
};

/// What every phase adds to: agent ready times and peak RSS, warnings, the time left for
/// waiting on a busy machine, and the foreign tracers seen.
#[derive(Default)]
pub(super) struct Report {
    /// (spawn -> ready line wall time, startup_ms from the line)
    pub(super) ready: Vec<(Duration, Option<u64>)>,
    /// Peak VmHWM over all agent runs, per mode (KiB).
    pub(super) hwm_default: u64,
    pub(super) hwm_all: u64,
    pub(super) warnings: Vec<String>,
    /// What is left of the total time wait_for_quiet may spend.
    pub(super) quiet_budget: Duration,
    /// Foreign tracers seen between runs.
    pub(super) foreign: std::collections::BTreeSet<String>,
}

impl Report {
    pub(super) fn agent_ready(&mut self, wall: Duration, line: &str) {
        self.ready.push((wall, json_u64(line, "startup_ms")));
    }
    pub(super) fn hwm(&mut self, cfg: Cfg, pid: i32) {
        let v = vm_hwm_kib(pid).unwrap_or(0);
        let slot = if cfg.all_events() {
            &mut self.hwm_all
        } else {
            &mut self.hwm_default
        };
        *slot = (*slot).max(v);
    }
    pub(super) fn warn(&mut self, w: String) {
        note(&format!("WARNING: {w}"));
        self.warnings.push(w);
    }
}

pub(super) fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

pub(super) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn render_markdown(
    s: &Settings,
    host: &Host,
    load_end: &str,
    churn: Option<&ChurnResult>,
    sweep: Option<&SweepResult>,
    storm: Option<&[StormRow]>,
    exhaust: Option<&exhaustion::ExhaustResult>,
    lat_runs: Option<&LatencyRuns>,
    all: Option<&CostRow>,
    rep: &Report,
) -> String {
    let mut m = String::new();
    let mut noisy: Vec<String> = Vec::new();
    render_header(&mut m, s, host, load_end);
    if let Some(churn) = churn {
        render_churn(&mut m, s, churn, &mut noisy);
    }
    if let Some(sw) = sweep {
        render_sweep(&mut m, s, sw, &mut noisy);
    }
    if let Some(storm) = storm {
        render_storm(&mut m, s, storm, &mut noisy);
    }
    if let Some(r) = exhaust {
        exhaustion::render(&mut m, r, &mut noisy);
    }
    if let Some(runs) = lat_runs {
        render_latency(&mut m, host, runs);
    }
    render_cost(&mut m, s, lat_runs, all, rep);
    for f in &rep.foreign {
        noisy.push(format!(
            "another process had tracing eBPF programs loaded during the bench: {f}; its hooks \
             ran under every configuration, \"no tracer\" included"
        ));
    }
    if !rep.warnings.is_empty() || !noisy.is_empty() {
        let _ = writeln!(m, "\n## Warnings\n");
        for w in rep.warnings.iter().chain(&noisy) {
            let _ = writeln!(m, "- {w}");
        }
    }
    m
}

/// The title, and the machine and settings of the run.
fn render_header(m: &mut String, s: &Settings, host: &Host, load_end: &str) {
    let _ = writeln!(m, "# portwatch bench\n");
    let _ = writeln!(m, "| | |\n|---|---|");
    let _ = writeln!(m, "| date | {} |", host.date);
    let _ = writeln!(m, "| kernel | {} |", host.kernel);
    let _ = writeln!(m, "| CPU | {} ({} cores) |", host.cpu, host.cores);
    let _ = writeln!(
        m,
        "| load average (1/5/15 min) at start / end | {} / {} |",
        host.load_start, load_end
    );
    let _ = writeln!(
        m,
        "| settings | {} s per configuration, {} churn round(s), {} client threads + 1 acceptor; \
         agent: `portwatch run {}` (a private copy of the release build) |",
        s.window.as_secs(),
        s.rounds,
        s.clients,
        s.agent_args
            .iter()
            .map(|a| {
                let a = a.to_string_lossy();
                // Keep the table short: the runtime dir is under target/bench/.
                if a.starts_with('/') {
                    "target/bench/run".to_string()
                } else {
                    a.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(b) = &s.baseline {
        let version = Command::new(b)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let _ = writeln!(
            m,
            "| baseline | `--baseline` build ({version}), default mode and `--all-events`, in \
             every churn round beside this build |"
        );
    }
}
