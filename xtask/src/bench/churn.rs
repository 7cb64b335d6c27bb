//! 1. Churn
//!
//! Loopback TCP churn at the maximum rate, each tracer between two no-tracer windows, over
//! interleaved rounds; and (1b) the same configurations at several offered churn rates.

use std::{
    fmt::Write as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    cpu::{cpu_seconds, softirq_seconds, wait_for_quiet, OtherCpu},
    load::Churn,
    note,
    report::Report,
    stats::{median, parse_agent_log, parse_peer_log},
    tracers::{foreign_tracers, Cfg, Peers, Sink, Tracer, CONFIGS},
    Settings, NOISY_OTHER_CPU, SETTLE, WARM,
};

/// Run the churn for `window` after WARM: connections/s, failures, the tracer's CPU, and
/// whether anything foreign (CPU hogs, another tracer) disturbed the window.
pub(super) fn measure_churn(
    clients: usize,
    rate: Option<f64>,
    window: Duration,
    tracer_pid: Option<i32>,
) -> Result<ChurnSample> {
    // The scan for foreign tracers reads every fd of every process: with a process holding
    // 100k sockets it takes seconds. It runs before the load, never between the count and the
    // clock that bound the window.
    let foreign_before = !foreign_tracers(tracer_pid).is_empty();
    let mut churn = Churn::start(clients, rate, WARM + window + Duration::from_secs(30))?;
    thread::sleep(WARM);
    let cpu0 = tracer_pid.and_then(cpu_seconds);
    let own0 = cpu_seconds(std::process::id() as i32);
    let sirq0 = softirq_seconds();
    let other = OtherCpu::start(tracer_pid);
    let (c0, t0) = (churn.completed(), Instant::now());
    thread::sleep(window);
    let (c1, el) = (churn.completed(), t0.elapsed().as_secs_f64());
    let cpu1 = tracer_pid.and_then(cpu_seconds);
    let own1 = cpu_seconds(std::process::id() as i32);
    let sirq1 = softirq_seconds();
    let other_cpu = other.pct();
    let failures = churn.failures();
    churn.finish();
    let foreign = foreign_before || !foreign_tracers(tracer_pid).is_empty();
    Ok(ChurnSample {
        rate: (c1 - c0) as f64 / el,
        failures,
        tracer_cpu: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / el * 100.0),
            _ => None,
        },
        noisy: foreign || other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU),
        other_cpu,
        cpu_us_per_conn: (|| {
            let tracer = match (cpu0, cpu1) {
                (Some(a), Some(b)) => b - a,
                (None, None) if tracer_pid.is_none() => 0.0,
                _ => return None,
            };
            let total = own1? - own0? + sirq1? - sirq0? + tracer;
            (c1 > c0).then(|| total / (c1 - c0) as f64 * 1e6)
        })(),
    })
}

pub(super) struct ChurnSample {
    pub(super) rate: f64,
    pub(super) failures: u64,
    pub(super) tracer_cpu: Option<f64>,
    /// CPU of everything else on the machine during the window (% of one core).
    pub(super) other_cpu: Option<f64>,
    /// Another tracer was attached, or other processes used more than NOISY_OTHER_CPU.
    pub(super) noisy: bool,
    /// CPU spent per completed connection: the bench's own threads (load generator, mostly
    /// kernel time in syscalls, where the tracepoint programs run) + the tracer process +
    /// softirq time. Contention from other processes moves it far less than throughput.
    pub(super) cpu_us_per_conn: Option<f64>,
}

pub(super) struct ChurnResult {
    pub(super) cfgs: Vec<Cfg>,
    /// Per configuration (same order as cfgs): per-window samples (a tracer has one per
    /// round; no tracer has one more than there are tracers per round).
    pub(super) samples: Vec<Vec<ChurnSample>>,
    /// Per configuration: records lost by the tracer (agent lost records / "Lost N events").
    pub(super) lost: Vec<u64>,
    /// Per configuration: output lines written.
    pub(super) lines: Vec<u64>,
    /// Every window in the order run: the bracketed ratios and churn-rounds.csv.
    windows: Vec<ChurnWindow>,
}

struct ChurnWindow {
    round: u32,
    step: usize,
    cfg: Cfg,
    rate: f64,
    /// A tracer's bracketed ratio, once the no-tracer window after it has run.
    paired: Option<f64>,
}

impl ChurnResult {
    pub(super) fn median_rate(&self, c: Cfg) -> Option<f64> {
        let i = self.cfgs.iter().position(|&x| x == c)?;
        median(self.samples[i].iter().map(|s| s.rate).collect())
    }
    /// Median over rounds of the bracketed ratio (see `churn_phase`): the figure the targets
    /// are judged on.
    pub(super) fn paired(&self, c: Cfg) -> Option<f64> {
        median(self.bracketed(c))
    }
    /// Per round, the tracer's throughput relative to the mean of the two no-tracer windows
    /// right before and after it (empty for no tracer).
    pub(super) fn bracketed(&self, c: Cfg) -> Vec<f64> {
        self.windows
            .iter()
            .filter(|w| w.cfg == c)
            .filter_map(|w| w.paired)
            .collect()
    }
    /// churn-rounds.csv: one line per window, so the medians and intervals can be redone.
    pub(super) fn csv(&self) -> String {
        let mut c = String::from("round,step,configuration,conn_per_s,paired\n");
        for w in &self.windows {
            let _ = writeln!(
                c,
                "{},{},{},{:.0},{}",
                w.round,
                w.step,
                w.cfg.name(),
                w.rate,
                w.paired.map_or(String::new(), |p| format!("{p:.4}"))
            );
        }
        c
    }
}

#[cfg(test)]
impl ChurnResult {
    /// A result from per-configuration samples alone, without the order of the windows (the
    /// plot tests).
    pub(super) fn from_samples(cfgs: Vec<Cfg>, samples: Vec<Vec<ChurnSample>>) -> ChurnResult {
        ChurnResult {
            lost: vec![0; cfgs.len()],
            lines: vec![0; cfgs.len()],
            cfgs,
            samples,
            windows: Vec::new(),
        }
    }

    /// One tracer window per ratio, each with that paired ratio (the report tests).
    pub(super) fn with_paired(mut self, cfg: Cfg, ratios: &[f64]) -> ChurnResult {
        for (round, &p) in (1..).zip(ratios) {
            self.windows.push(ChurnWindow {
                round,
                step: 2,
                cfg,
                rate: 0.0,
                paired: Some(p),
            });
        }
        self
    }
}

/// The configurations this machine can run: all of CONFIGS but the peers that are missing.
fn available_cfgs(peers: &Peers) -> Vec<Cfg> {
    CONFIGS
        .into_iter()
        .filter(|c| match c {
            Cfg::Bpftrace => peers.bpftrace,
            Cfg::Tcpstates => peers.tcpstates,
            _ => true,
        })
        .collect()
}

/// The churn rounds' configurations: those available, plus the floor and the baseline build.
fn churn_cfgs(s: &Settings, peers: &Peers) -> Vec<Cfg> {
    let mut cfgs = available_cfgs(peers);
    if peers.bpftrace {
        cfgs.insert(1, Cfg::Floor);
    }
    if s.baseline.is_some() {
        let at = cfgs
            .iter()
            .position(|c| *c == Cfg::PwDefault)
            .map_or(1, |i| i + 1);
        cfgs.insert(at, Cfg::PwBaseline);
        let at = cfgs
            .iter()
            .position(|c| *c == Cfg::PwAll)
            .map_or(cfgs.len(), |i| i + 1);
        cfgs.insert(at, Cfg::PwBaselineAll);
    }
    cfgs
}

pub(super) fn churn_phase(s: &Settings, peers: &Peers, rep: &mut Report) -> Result<ChurnResult> {
    let cfgs = churn_cfgs(s, peers);
    let mut res = ChurnResult {
        samples: cfgs.iter().map(|_| Vec::new()).collect(),
        lost: vec![0; cfgs.len()],
        lines: vec![0; cfgs.len()],
        cfgs: cfgs.clone(),
        windows: Vec::new(),
    };
    let none_i = cfgs
        .iter()
        .position(|&c| c == Cfg::None)
        .context("no-tracer configuration missing")?;
    let tracers: Vec<usize> = (0..cfgs.len()).filter(|&i| i != none_i).collect();
    // Fill the TIME_WAIT table towards its steady state (capped by tcp_max_tw_buckets; each
    // agent's start-up snapshot and the kernel's lookups depend on it) and warm caches, so the
    // first configuration measured is not favoured.
    let warm = s.window;
    note(&format!(
        "churn: warm-up {:.0} s without tracer",
        warm.as_secs_f64()
    ));
    measure_churn(s.clients, None, warm, None)?;
    churn_rounds(s, rep, &mut res, &cfgs, none_i, &tracers)?;
    Ok(res)
}

/// Every round of the churn phase, each window's sample and tracer output added to `res`.
fn churn_rounds(
    s: &Settings,
    rep: &mut Report,
    res: &mut ChurnResult,
    cfgs: &[Cfg],
    none_i: usize,
    tracers: &[usize],
) -> Result<()> {
    // Each round brackets every tracer between two no-tracer windows:
    //   none, T1, none, T2, none, T3, none, T4, none
    // with the tracers' order rotated from round to round. On a shared machine throughput
    // drifts by 10-20 % over tens of seconds; a tracer compared with the mean of the two
    // no-tracer windows right around it is compared with the same machine, which a median over
    // windows minutes apart is not.
    let steps = 2 * tracers.len() + 1;
    for round in 0..s.rounds {
        let mut before: Option<f64> = None;
        // The last tracer window's row in res.windows, until the no-tracer window after it.
        let mut pending: Option<usize> = None;
        for step in 0..steps {
            let i = if step % 2 == 0 {
                none_i
            } else {
                tracers[(step / 2 + round as usize) % tracers.len()]
            };
            let cfg = cfgs[i];
            wait_for_quiet(rep);
            note(&format!(
                "churn: round {}/{}, step {}/{}: {} ({} s, {} clients)",
                round + 1,
                s.rounds,
                step + 1,
                steps,
                cfg.name(),
                s.window.as_secs(),
                s.clients
            ));
            let tag = format!("churn-{}-r{}", cfg.name(), round + 1);
            let (sample, lines, lost) = churn_point(s, cfg, None, s.window, &tag, rep)?;
            res.lines[i] += lines;
            res.lost[i] += lost;
            let mut detail = sample_detail(&sample);
            if i == none_i {
                if let (Some(row), Some(b)) = (pending.take(), before) {
                    let w = &mut res.windows[row];
                    let ratio = w.rate / ((b + sample.rate) / 2.0);
                    w.paired = Some(ratio);
                    detail.push_str(&format!(
                        "; {} at {:.1}% of the no-tracer windows around it",
                        w.cfg.name(),
                        ratio * 100.0
                    ));
                }
                before = Some(sample.rate);
            } else {
                pending = Some(res.windows.len());
            }
            res.windows.push(ChurnWindow {
                round: round + 1,
                step: step + 1,
                cfg,
                rate: sample.rate,
                paired: None,
            });
            note(&format!(
                "churn: round {}/{}, step {}/{}: {}: {:.0} conn/s{}",
                round + 1,
                s.rounds,
                step + 1,
                steps,
                cfg.name(),
                sample.rate,
                detail
            ));
            res.samples[i].push(sample);
        }
    }
    Ok(())
}

/// ", tracer X% CPU, N failed connections" for a progress line, each part only when known.
fn sample_detail(sample: &ChurnSample) -> String {
    let mut d = String::new();
    if let Some(c) = sample.tracer_cpu {
        d.push_str(&format!(", tracer {c:.1}% CPU"));
    }
    if sample.failures > 0 {
        d.push_str(&format!(", {} failed connections", sample.failures));
    }
    d
}

/// One churn window under `cfg` at `rate` (None: as fast as possible): start the tracer, wait
/// until it is attached, measure, stop it and read back what it wrote. Returns the sample and
/// the tracer's output lines and lost records (0 and 0 without a tracer).
fn churn_point(
    s: &Settings,
    cfg: Cfg,
    rate: Option<f64>,
    window: Duration,
    tag: &str,
    rep: &mut Report,
) -> Result<(ChurnSample, u64, u64)> {
    if cfg == Cfg::None {
        return Ok((measure_churn(s.clients, rate, window, None)?, 0, 0));
    }
    let (mut t, _) = Tracer::spawn(s, cfg, tag, Sink::File)?;
    let (wall, line) = t.wait_ready_file()?;
    if cfg.is_agent() {
        rep.agent_ready(wall, &line);
    }
    thread::sleep(SETTLE);
    let sample = measure_churn(s.clients, rate, window, Some(t.pid()))?;
    if cfg.is_agent() {
        rep.hwm(cfg, t.pid());
    }
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let (lines, lost) = if cfg.is_agent() {
        let log = parse_agent_log(&t.out, None)?;
        if !log.stopped {
            rep.warn(format!("{tag}: no 'stopped' record"));
        }
        (log.lines, log.lost_count)
    } else {
        parse_peer_log(&t.out)
    };
    t.remove_logs(s.keep_logs);
    Ok((sample, lines, lost))
}

// ---------------------------------------------------------------------------------------------
// 1b. Churn rate sweep: achieved throughput against offered rate

/// Offered rates of the sweep (total connections/s over all clients); None = unpaced, as fast
/// as possible. The no-tracer maximum on the 2-core reference machine is 12k-24k conn/s, so the
/// paced steps reach from light load to just under it, and the peers saturate between them.
pub(super) const SWEEP_RATES: [Option<f64>; 6] = [
    Some(2_000.0),
    Some(5_000.0),
    Some(10_000.0),
    Some(15_000.0),
    Some(20_000.0),
    None,
];
pub(super) const SWEEP_RATES_QUICK: [Option<f64>; 3] = [Some(5_000.0), Some(15_000.0), None];

pub(super) struct SweepResult {
    pub(super) cfgs: Vec<Cfg>,
    /// Offered rates, ascending, None (unpaced) last.
    pub(super) rates: Vec<Option<f64>>,
    pub(super) window: Duration,
    /// [rate][configuration], same orders as `rates` and `cfgs`.
    pub(super) samples: Vec<Vec<ChurnSample>>,
    /// Per configuration: records lost by the tracer over the whole sweep.
    pub(super) lost: Vec<u64>,
}

impl SweepResult {
    pub(super) fn cfg_index(&self, c: Cfg) -> Option<usize> {
        self.cfgs.iter().position(|&x| x == c)
    }
}

pub(super) fn rate_label(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.0}")).unwrap_or_else(|| "max".into())
}

/// Every configuration at each offered rate, one window per point. At each rate the
/// configurations run one after the other (order rotated from rate to rate), as the churn
/// rounds do, so drift on a shared machine hits them alike. Each point starts its tracer
/// afresh, so no tracer carries state or a backlog from one rate into the next.
pub(super) fn sweep_phase(
    s: &Settings,
    peers: &Peers,
    rates: &[Option<f64>],
    window: Duration,
    rep: &mut Report,
) -> Result<SweepResult> {
    let cfgs = available_cfgs(peers);
    let mut res = SweepResult {
        cfgs: cfgs.clone(),
        rates: rates.to_vec(),
        window,
        samples: Vec::new(),
        lost: vec![0; cfgs.len()],
    };
    // Bring the TIME_WAIT table near its steady state first, as the churn phase does, so the
    // lowest rates are not measured against an empty table and the highest against a full one.
    note(&format!(
        "sweep: warm-up {:.0} s without tracer",
        window.as_secs_f64()
    ));
    measure_churn(s.clients, None, window, None)?;
    let n = cfgs.len();
    for (ri, &rate) in rates.iter().enumerate() {
        let mut row: Vec<Option<ChurnSample>> = (0..n).map(|_| None).collect();
        for k in 0..n {
            let i = (k + ri) % n;
            let cfg = cfgs[i];
            wait_for_quiet(rep);
            let tag = format!("sweep-{}-{}", cfg.name(), rate_label(rate));
            let (sample, _, lost) = churn_point(s, cfg, rate, window, &tag, rep)?;
            res.lost[i] += lost;
            note(&format!(
                "sweep: {} at {} conn/s offered: {:.0} achieved{}",
                cfg.name(),
                rate_label(rate),
                sample.rate,
                sample_detail(&sample)
            ));
            row[i] = Some(sample);
        }
        let row = row.into_iter().collect::<Option<Vec<_>>>();
        res.samples
            .push(row.context("a sweep configuration was skipped")?);
    }
    Ok(res)
}
