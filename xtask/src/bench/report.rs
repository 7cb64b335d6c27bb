//! Report: what every phase adds to as it runs, and results.md rendered from all of it.

use std::process::Command;
use std::{fmt::Write as _, time::Duration};

use super::{
    churn::{rate_label, ChurnResult, SweepResult},
    cpu::vm_hwm_kib,
    exhaustion,
    latency::{CostRow, LatencyResult, LatencyRuns},
    note,
    stats::{json_u64, median, median_ci, pct},
    storm::StormRow,
    tracers::{Cfg, Host},
    Settings, ATTACH_READERS, BACKGROUND_RATE, NOISY_OTHER_CPU, OK_BIND_EVERY, PROBES,
    PROBE_SPACING,
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
        let slot = if cfg == Cfg::PwAll {
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
            "| baseline | `--baseline` build ({version}), default mode, in every churn round \
             beside this build |"
        );
    }
}

/// Section 1 of results.md: loopback TCP churn at the maximum rate.
fn render_churn(m: &mut String, s: &Settings, churn: &ChurnResult, noisy: &mut Vec<String>) {
    let base = churn.median_rate(Cfg::None);
    let churn_noisy = churn.samples.iter().flatten().any(|x| x.noisy);
    let none_i = churn.cfgs.iter().position(|&c| c == Cfg::None);
    let base_cost = none_i.and_then(|n| {
        median(
            churn.samples[n]
                .iter()
                .filter_map(|x| x.cpu_us_per_conn)
                .collect(),
        )
    });
    let _ = writeln!(
        m,
        "\n## 1. Loopback TCP churn (connect/accept/close on 127.0.0.1)\n"
    );
    let _ = writeln!(
        m,
        "Completed connections/s over each {} s window, median over rounds. Each round runs \
         every tracer between two no-tracer windows (none, T1, none, T2, ..., none; tracer \
         order rotated each round), each window in a fresh network namespace. The server \
         accepts and closes first, so each \
         connection leaves a server-side TIME_WAIT on the listening port, as a busy HTTP server \
         does. *paired* = the tracer's throughput over the mean of the two no-tracer windows \
         around it, median over rounds (min–max in brackets, then from 6 rounds on a \
         distribution-free confidence interval of that median, at the coverage shown, at \
         least 95 %): it cancels the drift of a shared machine, so the targets are judged on \
         it. Every window is in churn-rounds.csv. *vs no tracer* = ratio of the \
         medians over all windows. *CPU µs/conn* = (bench threads + tracer + softirq CPU) / connections, median: \
         it moves far less with contention than throughput does, so it is the steadier \
         comparison on a shared machine. Tracer CPU = % of one core; other CPU = everything else on the machine (builds, \
         daemons, kernel threads) during the window, % of one core, median (max). Lost = \
         records the tracer reported dropped, summed over rounds.\n",
        s.window.as_secs()
    );
    let _ = writeln!(
        m,
        "| configuration | median conn/s | rounds min–max | vs no tracer | paired | CPU µs/conn (vs none) | tracer CPU % | other CPU % | clean rounds | lines | lost | target | result |"
    );
    let _ = writeln!(
        m,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for (i, &c) in churn.cfgs.iter().enumerate() {
        let rates: Vec<f64> = churn.samples[i].iter().map(|x| x.rate).collect();
        let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rates.iter().copied().fold(0.0, f64::max);
        let med = churn.median_rate(c).unwrap_or(f64::NAN);
        let ratio = base.map(|b| med / b).unwrap_or(f64::NAN);
        let br = churn.bracketed(c);
        let paired = churn.paired(c).map(|p| {
            let lo = br.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = br.iter().copied().fold(0.0, f64::max);
            let ci = median_ci(&br).map_or(String::new(), |(a, b, cov)| {
                format!("; {:.0}% CI {:.1}–{:.1}", cov * 100.0, a * 100.0, b * 100.0)
            });
            format!(
                "{:.1}% ({:.1}–{:.1}{ci})",
                p * 100.0,
                lo * 100.0,
                hi * 100.0
            )
        });
        let cpu = median(
            churn.samples[i]
                .iter()
                .filter_map(|x| x.tracer_cpu)
                .collect(),
        );
        let others: Vec<f64> = churn.samples[i]
            .iter()
            .filter_map(|x| x.other_cpu)
            .collect();
        let other_max = others.iter().copied().fold(0.0, f64::max);
        let clean = churn.samples[i].iter().filter(|x| !x.noisy).count();
        let cost = median(
            churn.samples[i]
                .iter()
                .filter_map(|x| x.cpu_us_per_conn)
                .collect(),
        );
        if clean < churn.samples[i].len() {
            noisy.push(format!(
                "churn {}: {} of {} rounds noisy (another tracer attached, or other processes \
                 above {NOISY_OTHER_CPU:.0}% of a core; up to {other_max:.0}%)",
                c.name(),
                churn.samples[i].len() - clean,
                churn.samples[i].len()
            ));
        }
        let (target, res) = match c {
            Cfg::PwDefault => (
                "≥ 97% paired",
                verdict(churn.paired(c).is_some_and(|p| p >= 0.97)),
            ),
            Cfg::PwAll => (
                "≥ 93% paired",
                verdict(churn.paired(c).is_some_and(|p| p >= 0.93)),
            ),
            _ => ("–", "–"),
        };
        let res = if res != "–" && churn_noisy {
            format!("{res} (noisy run)")
        } else {
            res.to_string()
        };
        let dash = |v: u64| {
            if c == Cfg::None {
                "–".to_string()
            } else {
                v.to_string()
            }
        };
        let _ = writeln!(
            m,
            "| {} | {:.0} | {:.0}–{:.0} | {:.1}% | {} | {} | {} | {} ({:.0}) | {}/{} | {} | {} | {} | {} |",
            c.label(),
            med,
            lo,
            hi,
            ratio * 100.0,
            paired.unwrap_or_else(|| "–".into()),
            match (cost, base_cost) {
                (Some(x), Some(b)) if c != Cfg::None => {
                    format!("{x:.1} ({:+.0}%)", (x / b - 1.0) * 100.0)
                }
                _ => fmt_opt(cost, 1),
            },
            fmt_opt(cpu, 1),
            fmt_opt(median(others.clone()), 0),
            other_max,
            clean,
            churn.samples[i].len(),
            dash(churn.lines[i]),
            dash(churn.lost[i]),
            target,
            res
        );
    }
    for pw in [Cfg::PwDefault, Cfg::PwAll] {
        let mine = churn.paired(pw);
        let peers: Vec<(Cfg, f64)> = [Cfg::Bpftrace, Cfg::Tcpstates]
            .into_iter()
            .filter_map(|p| churn.paired(p).map(|r| (p, r)))
            .collect();
        let ok = peers.len() == 2 && mine.is_some_and(|x| peers.iter().all(|(_, r)| x > *r));
        let detail = peers
            .iter()
            .map(|(p, r)| format!("{} {:.1}%", p.name(), r * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            m,
            "| {} cheaper than bpftrace and tcpstates | paired {:.1}% vs {} | | | | | | | | | higher throughput than both | {}{} |",
            pw.label(),
            mine.unwrap_or(f64::NAN) * 100.0,
            if detail.is_empty() {
                "peers missing".into()
            } else {
                detail
            },
            verdict(ok),
            if churn_noisy { " (noisy run)" } else { "" }
        );
    }
}

/// Section 1b of results.md: the churn rate sweep.
fn render_sweep(m: &mut String, s: &Settings, sw: &SweepResult, noisy: &mut Vec<String>) {
    let _ = writeln!(
        m,
        "\n## 1b. Churn rate sweep: achieved against offered connections/s\n"
    );
    let _ = writeln!(
        m,
        "The same churn and configurations at each offered rate: {} client threads, each \
         pacing its share on a deadline schedule (*max* = unpaced), one {} s window per point, \
         configurations in rotated order at each rate, each tracer started afresh per point. \
         A tracer that keeps up gives achieved = offered; below that, the gap is the \
         throughput it costs. Plotted in churn.png.\n",
        s.clients,
        sw.window.as_secs()
    );
    let head = |m: &mut String, cfgs: &[Cfg]| {
        let _ = writeln!(
            m,
            "| offered conn/s | {} |",
            cfgs.iter()
                .map(|c| c.name())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(m, "|---:|{}", "---:|".repeat(cfgs.len()));
    };
    let _ = writeln!(m, "Achieved conn/s:\n");
    head(m, &sw.cfgs);
    for (ri, &r) in sw.rates.iter().enumerate() {
        let cells: Vec<String> = sw.samples[ri]
            .iter()
            .map(|x| format!("{:.0}", x.rate))
            .collect();
        let _ = writeln!(m, "| {} | {} |", rate_label(r), cells.join(" | "));
    }
    let traced: Vec<Cfg> = sw
        .cfgs
        .iter()
        .copied()
        .filter(|&c| c != Cfg::None)
        .collect();
    if !traced.is_empty() {
        let _ = writeln!(
            m,
            "\nTracer CPU, % of one core (the tracer process's utime + stime; eBPF programs \
             run in the churning threads and are not in it):\n"
        );
        head(m, &traced);
        for (ri, &r) in sw.rates.iter().enumerate() {
            let cells: Vec<String> = traced
                .iter()
                .filter_map(|&c| sw.cfg_index(c))
                .map(|i| fmt_opt(sw.samples[ri][i].tracer_cpu, 1))
                .collect();
            let _ = writeln!(m, "| {} | {} |", rate_label(r), cells.join(" | "));
        }
        let _ = writeln!(
            m,
            "\nRecords lost over the sweep: {}.",
            traced
                .iter()
                .filter_map(|&c| sw
                    .cfg_index(c)
                    .map(|i| format!("{} {}", c.name(), sw.lost[i])))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Noise, failed connections, and pacing: with no tracer, a paced rate below the unpaced
    // maximum must be met, or the generator (or a busy machine) is what was measured.
    let none_i = sw.cfg_index(Cfg::None);
    let none_max = none_i.and_then(|n| {
        sw.rates
            .iter()
            .position(std::option::Option::is_none)
            .map(|ri| sw.samples[ri][n].rate)
    });
    let (mut noisy_pts, mut failed, mut other_max) = (0, 0u64, 0.0f64);
    for (ri, &r) in sw.rates.iter().enumerate() {
        for x in &sw.samples[ri] {
            noisy_pts += usize::from(x.noisy);
            failed += x.failures;
            other_max = other_max.max(x.other_cpu.unwrap_or(0.0));
        }
        if let (Some(n), Some(off), Some(top)) = (none_i, r, none_max) {
            let got = sw.samples[ri][n].rate;
            if off < top * 0.9 && got < off * 0.97 {
                noisy.push(format!(
                    "sweep: with no tracer only {got:.0} of {off:.0} offered conn/s were \
                     achieved, below the unpaced maximum ({top:.0}): pacing or machine noise"
                ));
            }
        }
    }
    let points = sw.rates.len() * sw.cfgs.len();
    if noisy_pts > 0 {
        noisy.push(format!(
            "sweep: {noisy_pts} of {points} points noisy (another tracer attached, or other \
             processes above {NOISY_OTHER_CPU:.0}% of a core; up to {other_max:.0}%)"
        ));
    }
    if failed > 0 {
        noisy.push(format!(
            "sweep: {failed} failed connections over all points"
        ));
    }
}

/// Section 2 of results.md: the bind storm.
fn render_storm(m: &mut String, s: &Settings, storm: &[StormRow], noisy: &mut Vec<String>) {
    let _ = writeln!(
        m,
        "\n## 2. Bind storm (EADDRINUSE on a port held by a listener; portwatch default, no port filter)\n"
    );
    let _ = writeln!(
        m,
        "2 threads, {} s per rate. *ok binds*: every {}th attempt is a successful bind to \
         127.0.0.1:0 plus close (bind ok and close events the kernel side carries too). \
         *received* = failures in conflict records with op=bind for the port (the sum of their \
         `count`: identical failures are coalesced); *lost* = sum of by_kind.bind \
         over `lost` records, read after SIGINT so the final one is included. `lost` counts \
         per kind and host-wide, so under loss a lost bind may be one of our ok binds or \
         another process's: the check is then generated ≤ received + lost ≤ generated + ok \
         binds (+ other processes' binds, possible only on a busy host). The last row has no \
         ok binds: on a quiet host it must be exact. Falling short is always a MISS.\n",
        s.window.as_secs(),
        OK_BIND_EVERY
    );
    let _ = writeln!(
        m,
        "| rate | achieved failing/s | failing binds | ok binds | received | lost (bind) | lost kernel / agent (all kinds) | generated = received + lost | other CPU % | target | result |"
    );
    let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|");
    for r in storm {
        let (acc, acc_ok) = r.accounting();
        let low = r.target.is_some_and(|t| t <= 50_000.0);
        let (target, res) = if low {
            (
                "0 lost, exact",
                verdict(r.log.lost_bind == 0 && r.log.lost_count == 0 && acc_ok),
            )
        } else {
            ("accounting closes", verdict(acc_ok))
        };
        if r.other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU) {
            noisy.push(format!(
                "bind storm {}: other processes used {:.0}% of a core",
                r.label,
                r.other_cpu.unwrap_or(0.0)
            ));
        }
        let _ = writeln!(
            m,
            "| {} | {:.0} | {} | {} | {} | {} | {} / {} | {}{} | {} | {} | {} |",
            r.label,
            r.failing as f64 / r.secs,
            r.failing,
            r.ok,
            r.log.conflicts_bind,
            r.log.lost_bind,
            r.log.lost_kernel,
            r.log.lost_agent,
            acc,
            if r.other_errors > 0 || r.eaddrinuse != r.failing {
                format!(
                    " ({} non-EADDRINUSE, {} other errors)",
                    r.failing - r.eaddrinuse,
                    r.other_errors
                )
            } else {
                String::new()
            },
            fmt_opt(r.other_cpu, 0),
            target,
            res
        );
    }
}

/// Section 3 of results.md: conflict latency, without and with attach clients.
fn render_latency(m: &mut String, host: &Host, runs: &LatencyRuns) {
    let both = [&runs.plain, &runs.attach];
    let _ = writeln!(
        m,
        "\n## 3. Conflict latency (failing bind → its line read from the agent's stdout)\n"
    );
    let _ = writeln!(
        m,
        "{} probes per run, one every {} ms, each on its own held port, under {:.0} conn/s \
         background churn; CLOCK_REALTIME just before bind() to the moment a reader thread \
         got the line. Two runs, each with a fresh agent: one with nothing attached, one with \
         {} clients on the control socket (`{{\"cmd\":\"attach\"}}`), {} reading everything \
         and one that never reads. Attached clients get every event as a record, not only \
         conflicts, so the stalled one falls behind at once; the reading clients run in the \
         bench process and take CPU from the same {} cores.\n",
        PROBES,
        PROBE_SPACING.as_millis(),
        BACKGROUND_RATE,
        ATTACH_READERS + 1,
        ATTACH_READERS,
        host.cores
    );
    let _ = writeln!(
        m,
        "| metric | latency, no attach clients | latency, {} attach clients, one stalled | \
         target | result |\n|---|---:|---:|---|---|",
        ATTACH_READERS + 1
    );
    let row = |m: &mut String,
               name: &str,
               v: &dyn Fn(&LatencyResult) -> String,
               target: &str,
               ok: Option<&dyn Fn(&LatencyResult) -> bool>| {
        let res = match ok {
            Some(f) => both.map(|l| verdict(f(l))).join(" / "),
            None => "info".into(),
        };
        let _ = writeln!(
            m,
            "| {name} | {} | {} | {target} | {res} |",
            v(both[0]),
            v(both[1])
        );
    };
    let all_seen = |l: &LatencyResult| l.lat_ms.len() == l.sent;
    let p50 = |l: &LatencyResult| pct(&l.lat_ms, 50.0);
    let p99 = |l: &LatencyResult| pct(&l.lat_ms, 99.0);
    row(
        m,
        "probes received",
        &|l| format!("{}/{}", l.lat_ms.len(), l.sent),
        "all",
        Some(&all_seen),
    );
    row(
        m,
        "p50",
        &|l| format!("{:.2} ms", p50(l)),
        "≤ 2 ms",
        Some(&|l| p50(l) <= 2.0),
    );
    row(
        m,
        "p99",
        &|l| format!("{:.2} ms", p99(l)),
        "≤ 20 ms",
        Some(&|l| p99(l) <= 20.0 && all_seen(l)),
    );
    row(
        m,
        "max",
        &|l| format!("{:.2} ms", l.lat_ms.last().copied().unwrap_or(f64::NAN)),
        "–",
        None,
    );
    row(
        m,
        "lost records (agent)",
        &|l| l.lost.to_string(),
        "0",
        Some(&|l| l.lost == 0),
    );
    row(
        m,
        "background churn achieved",
        &|l| format!("{:.0} conn/s", l.churn_rate),
        "–",
        None,
    );
    row(
        m,
        "agent CPU (of one core) / other processes",
        &|l| format!("{:.1}% / {}%", l.cpu_pct, fmt_opt(l.other_cpu, 0)),
        "–",
        None,
    );
    if let Some(a) = &runs.attach.attach {
        let _ = writeln!(
            m,
            "| stalled client: records it was told it missed, when it read at last after \
             the window | – | {} | – | info |",
            a.stalled_missed
                .map(|v| v.to_string())
                .unwrap_or_else(|| "? (no note within 5 s)".into())
        );
        let _ = writeln!(
            m,
            "| {} reading clients: lines read, min / max (records missed, all of them) | – \
             | {} / {} ({}) | – | info |",
            a.reader_lines.len(),
            a.reader_lines.iter().min().unwrap_or(&0),
            a.reader_lines.iter().max().unwrap_or(&0),
            a.reader_missed
        );
        let _ = writeln!(
            m,
            "| {} reading clients: CPU, summed (in the bench process, not in \"other \
             processes\") | – | {:.0}% of one core | – | info |",
            a.reader_lines.len(),
            a.reader_cpu_pct
        );
    }
}

/// Section 4 of results.md: the agent's cost (CPU, peak RSS, time to ready).
fn render_cost(
    m: &mut String,
    s: &Settings,
    lat_runs: Option<&LatencyRuns>,
    all: Option<&CostRow>,
    rep: &Report,
) {
    let ready: Vec<f64> = rep.ready.iter().map(|r| r.0.as_secs_f64()).collect();
    let ready_med = median(ready.clone()).unwrap_or(f64::NAN);
    let ready_max = ready.iter().copied().fold(0.0, f64::max);
    let su: Vec<f64> = rep
        .ready
        .iter()
        .filter_map(|r| r.1.map(|v| v as f64))
        .collect();
    let su_med = median(su.clone()).unwrap_or(f64::NAN);
    let su_max = su.iter().copied().fold(0.0, f64::max);
    let lat = lat_runs.map(|r| &r.plain);
    let _ = writeln!(m, "\n## 4. Agent cost\n");
    let _ = writeln!(
        m,
        "| metric | value | target | result |\n|---|---:|---|---|"
    );
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| CPU, default mode, at {:.0} conn/s (utime+stime over {} s; other processes {}%) | {:.1}% of one core | – | info |",
            lat.churn_rate,
            s.window.as_secs(),
            fmt_opt(lat.other_cpu, 0),
            lat.cpu_pct
        );
    }
    if let Some(att) = lat_runs.map(|r| &r.attach) {
        let _ = writeln!(
            m,
            "| CPU, default mode, {} attach clients (one stalled), at {:.0} conn/s (other processes {}%) | {:.1}% of one core | – | info |",
            ATTACH_READERS + 1,
            att.churn_rate,
            fmt_opt(att.other_cpu, 0),
            att.cpu_pct
        );
    }
    if let Some(all) = all {
        let _ = writeln!(
            m,
            "| CPU, --all-events, at {:.0} conn/s ({} lines, {} lost; other processes {}%) | {:.1}% of one core | – | info |",
            all.churn_rate,
            all.lines,
            all.lost,
            fmt_opt(all.other_cpu, 0),
            all.cpu_pct
        );
    }
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| peak RSS (VmHWM), default, latency run | {:.1} MiB | – | info |",
            lat.hwm_kib as f64 / 1024.0
        );
    }
    if let Some(att) = lat_runs.map(|r| &r.attach) {
        let _ = writeln!(
            m,
            "| peak RSS (VmHWM), default, latency run with {} attach clients (one stalled) | {:.1} MiB | – | info |",
            ATTACH_READERS + 1,
            att.hwm_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        m,
        "| peak RSS (VmHWM), highest of all default-mode runs (incl. bind storm) | {:.1} MiB | – | info |",
        rep.hwm_default as f64 / 1024.0
    );
    let _ = writeln!(
        m,
        "| peak RSS (VmHWM), highest of all --all-events runs | {:.1} MiB | – | info |",
        rep.hwm_all as f64 / 1024.0
    );
    let _ = writeln!(
        m,
        "| ready: spawn → ready line, median / max of {} starts | {:.0} / {:.0} ms | ≤ 1500 ms | {} |",
        ready.len(),
        ready_med * 1000.0,
        ready_max * 1000.0,
        verdict(!ready.is_empty() && ready_max <= 1.5)
    );
    let _ = writeln!(
        m,
        "| ready: startup_ms in the ready line, median / max | {su_med:.0} / {su_max:.0} ms | ≤ 1500 ms | {} |",
        verdict(!su.is_empty() && su_max <= 1500.0)
    );
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| latency run: ready wall / startup_ms / lost records | {:.0} ms / {} ms / {} | – | info |",
            lat.ready_wall.as_secs_f64() * 1000.0,
            lat.startup_ms
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            lat.lost
        );
    }
}
