//! Sections 2 to 4 of results.md: what the agent itself delivers and costs: the bind
//! storm's accounting, the conflict latency with and without attach clients, and its CPU,
//! peak RSS and time to ready.

use std::fmt::Write as _;

use super::{fmt_opt, verdict, Report};
use crate::bench::{
    latency::{AttachResult, CostRow, LatencyResult, LatencyRuns},
    stats::{median, pct},
    storm::StormRow,
    tracers::Host,
    Settings, ATTACH_READERS, BACKGROUND_RATE, NOISY_OTHER_CPU, OK_BIND_EVERY, PROBES,
    PROBE_SPACING,
};

/// Section 2 of results.md: the bind storm.
pub(super) fn render_storm(
    m: &mut String,
    s: &Settings,
    storm: &[StormRow],
    noisy: &mut Vec<String>,
) {
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
pub(super) fn render_latency(m: &mut String, host: &Host, runs: &LatencyRuns) {
    let both = [&runs.plain, &runs.attach];
    latency_intro(m, host);
    latency_rows(m, both);
    if let Some(a) = &runs.attach.attach {
        attach_rows(m, a);
    }
}

/// Section 3's heading, the paragraph that says how latency is measured, and the table's
/// head.
fn latency_intro(m: &mut String, host: &Host) {
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
}

/// One metric of both runs: its two values, its target, and each run's verdict (`info`
/// without a target).
fn latency_row(
    m: &mut String,
    both: [&LatencyResult; 2],
    name: &str,
    v: &dyn Fn(&LatencyResult) -> String,
    target: &str,
    ok: Option<&dyn Fn(&LatencyResult) -> bool>,
) {
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
}

/// The metrics both runs have: probes received, the percentiles, lost records, the
/// background churn and the CPU.
fn latency_rows(m: &mut String, both: [&LatencyResult; 2]) {
    let all_seen = |l: &LatencyResult| l.lat_ms.len() == l.sent;
    let p50 = |l: &LatencyResult| pct(&l.lat_ms, 50.0);
    let p99 = |l: &LatencyResult| pct(&l.lat_ms, 99.0);
    latency_row(
        m,
        both,
        "probes received",
        &|l| format!("{}/{}", l.lat_ms.len(), l.sent),
        "all",
        Some(&all_seen),
    );
    latency_row(
        m,
        both,
        "p50",
        &|l| format!("{:.2} ms", p50(l)),
        "≤ 2 ms",
        Some(&|l| p50(l) <= 2.0),
    );
    latency_row(
        m,
        both,
        "p99",
        &|l| format!("{:.2} ms", p99(l)),
        "≤ 20 ms",
        Some(&|l| p99(l) <= 20.0 && all_seen(l)),
    );
    latency_row(
        m,
        both,
        "max",
        &|l| format!("{:.2} ms", l.lat_ms.last().copied().unwrap_or(f64::NAN)),
        "–",
        None,
    );
    latency_row(
        m,
        both,
        "lost records (agent)",
        &|l| l.lost.to_string(),
        "0",
        Some(&|l| l.lost == 0),
    );
    latency_row(
        m,
        both,
        "background churn achieved",
        &|l| format!("{:.0} conn/s", l.churn_rate),
        "–",
        None,
    );
    latency_row(
        m,
        both,
        "agent CPU (of one core) / other processes",
        &|l| format!("{:.1}% / {}%", l.cpu_pct, fmt_opt(l.other_cpu, 0)),
        "–",
        None,
    );
}

/// The attach run's own rows: what the stalled client missed, and what the reading clients
/// read and cost.
fn attach_rows(m: &mut String, a: &AttachResult) {
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

/// Section 4 of results.md: the agent's cost (CPU, peak RSS, time to ready).
pub(super) fn render_cost(
    m: &mut String,
    s: &Settings,
    lat_runs: Option<&LatencyRuns>,
    all: Option<&CostRow>,
    rep: &Report,
) {
    let _ = writeln!(m, "\n## 4. Agent cost\n");
    let _ = writeln!(
        m,
        "| metric | value | target | result |\n|---|---:|---|---|"
    );
    cost_cpu_rows(m, s, lat_runs, all);
    cost_rss_rows(m, lat_runs, rep);
    cost_ready_rows(m, lat_runs.map(|r| &r.plain), rep);
}

/// The agent's CPU under the background churn: default mode without and with attach
/// clients, and --all-events.
fn cost_cpu_rows(
    m: &mut String,
    s: &Settings,
    lat_runs: Option<&LatencyRuns>,
    all: Option<&CostRow>,
) {
    let lat = lat_runs.map(|r| &r.plain);
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
}

/// The agent's peak RSS: in the latency runs, and the highest of all runs per mode.
fn cost_rss_rows(m: &mut String, lat_runs: Option<&LatencyRuns>, rep: &Report) {
    if let Some(lat) = lat_runs.map(|r| &r.plain) {
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
}

/// The time to ready: measured from spawn, and as the ready line says, over every agent
/// start; and the latency run's own.
fn cost_ready_rows(m: &mut String, lat: Option<&LatencyResult>, rep: &Report) {
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

#[cfg(test)]
mod tests;
