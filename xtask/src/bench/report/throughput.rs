//! Sections 1 and 1b of results.md: what each tracer costs the loopback churn, at the
//! maximum rate and across the offered rates of the sweep.

use std::fmt::Write as _;

use super::{fmt_opt, verdict};
use crate::bench::{
    churn::{rate_label, ChurnResult, SweepResult},
    stats::{median, median_ci},
    tracers::Cfg,
    Settings, NOISY_OTHER_CPU,
};

/// Section 1 of results.md: loopback TCP churn at the maximum rate.
pub(super) fn render_churn(
    m: &mut String,
    s: &Settings,
    churn: &ChurnResult,
    noisy: &mut Vec<String>,
) {
    let churn_noisy = churn.samples.iter().flatten().any(|x| x.noisy);
    churn_intro(m, s);
    churn_table(m, churn, churn_noisy, noisy);
    churn_peer_rows(m, churn, churn_noisy);
}

/// Section 1's heading and the paragraph that says how the churn is measured.
fn churn_intro(m: &mut String, s: &Settings) {
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
}

/// The no-tracer figures each configuration's row is compared with: the median rate and
/// the median CPU per connection.
struct Baseline {
    rate: Option<f64>,
    cost: Option<f64>,
}

/// Section 1's table: one row per configuration.
fn churn_table(m: &mut String, churn: &ChurnResult, churn_noisy: bool, noisy: &mut Vec<String>) {
    let none_i = churn.cfgs.iter().position(|&c| c == Cfg::None);
    let base = Baseline {
        rate: churn.median_rate(Cfg::None),
        cost: none_i.and_then(|n| {
            median(
                churn.samples[n]
                    .iter()
                    .filter_map(|x| x.cpu_us_per_conn)
                    .collect(),
            )
        }),
    };
    let _ = writeln!(
        m,
        "| configuration | median conn/s | rounds min–max | vs no tracer | paired | CPU µs/conn (vs none) | tracer CPU % | other CPU % | clean rounds | lines | lost | target | result |"
    );
    let _ = writeln!(
        m,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for i in 0..churn.cfgs.len() {
        churn_row(m, churn, i, &base, churn_noisy, noisy);
    }
}

/// The row of the `i`-th configuration; a warning when some of its rounds were noisy.
fn churn_row(
    m: &mut String,
    churn: &ChurnResult,
    i: usize,
    base: &Baseline,
    churn_noisy: bool,
    noisy: &mut Vec<String>,
) {
    let c = churn.cfgs[i];
    let rates: Vec<f64> = churn.samples[i].iter().map(|x| x.rate).collect();
    let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rates.iter().copied().fold(0.0, f64::max);
    let med = churn.median_rate(c).unwrap_or(f64::NAN);
    let ratio = base.rate.map(|b| med / b).unwrap_or(f64::NAN);
    let paired = paired_cell(churn, c);
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
    let (target, res) = churn_target(churn, c, churn_noisy);
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
        match (cost, base.cost) {
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

/// The *paired* cell: the median bracketed ratio, its range and, from 6 rounds, its
/// confidence interval (None for no tracer).
fn paired_cell(churn: &ChurnResult, c: Cfg) -> Option<String> {
    let br = churn.bracketed(c);
    churn.paired(c).map(|p| {
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
    })
}

/// The target and result cells: portwatch's paired throughput targets, none for the others.
fn churn_target(churn: &ChurnResult, c: Cfg, churn_noisy: bool) -> (&'static str, String) {
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
    (target, res)
}

/// The closing rows: each portwatch mode against both peers, on paired throughput.
fn churn_peer_rows(m: &mut String, churn: &ChurnResult, churn_noisy: bool) {
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
pub(super) fn render_sweep(
    m: &mut String,
    s: &Settings,
    sw: &SweepResult,
    noisy: &mut Vec<String>,
) {
    sweep_intro(m, s, sw);
    sweep_achieved(m, sw);
    sweep_tracers(m, sw);
    sweep_noise(sw, noisy);
}

/// Section 1b's heading and the paragraph that says how the sweep runs.
fn sweep_intro(m: &mut String, s: &Settings, sw: &SweepResult) {
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
}

/// A sweep table's head: the offered rate, then one column per configuration.
fn sweep_head(m: &mut String, cfgs: &[Cfg]) {
    let _ = writeln!(
        m,
        "| offered conn/s | {} |",
        cfgs.iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(m, "|---:|{}", "---:|".repeat(cfgs.len()));
}

/// The achieved rates: one row per offered rate.
fn sweep_achieved(m: &mut String, sw: &SweepResult) {
    let _ = writeln!(m, "Achieved conn/s:\n");
    sweep_head(m, &sw.cfgs);
    for (ri, &r) in sw.rates.iter().enumerate() {
        let cells: Vec<String> = sw.samples[ri]
            .iter()
            .map(|x| format!("{:.0}", x.rate))
            .collect();
        let _ = writeln!(m, "| {} | {} |", rate_label(r), cells.join(" | "));
    }
}

/// The tracers' CPU at each offered rate, and the records they lost (nothing without a
/// tracer).
fn sweep_tracers(m: &mut String, sw: &SweepResult) {
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
        sweep_head(m, &traced);
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
}

/// Noise, failed connections, and pacing: with no tracer, a paced rate below the unpaced
/// maximum must be met, or the generator (or a busy machine) is what was measured.
fn sweep_noise(sw: &SweepResult, noisy: &mut Vec<String>) {
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

#[cfg(test)]
mod tests;
