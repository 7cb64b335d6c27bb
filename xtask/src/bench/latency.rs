//! 3 + 4. Latency under background churn, and the agent's cost.

use std::{
    fmt::Write as _,
    fs,
    sync::atomic::{AtomicI64, Ordering::Relaxed},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    churn::measure_churn,
    cpu::{cpu_seconds, vm_hwm_kib, wait_for_quiet, OtherCpu},
    load::{bind_to, errno, loopback, tcp_socket, AttachClients, Churn, Fd, ProbeHolders},
    note,
    report::Report,
    stats::{json_u64, parse_agent_log, pct, probe_latencies, realtime_ns, record_type, LineStats},
    tracers::{read_agent_lines, wait_ready, Cfg, Sink, Tracer},
    Settings, ATTACH_READERS, BACKGROUND_RATE, PROBES, PROBE_SPACING, SETTLE, WARM,
};

/// Both latency runs: the agent alone, then with clients attached to its control socket.
pub(super) struct LatencyRuns {
    pub(super) plain: LatencyResult,
    pub(super) attach: LatencyResult,
}

pub(super) struct LatencyResult {
    /// Set for the run with clients on the control socket.
    pub(super) attach: Option<AttachResult>,
    pub(super) sent: usize,
    pub(super) lat_ms: Vec<f64>,
    pub(super) churn_rate: f64,
    pub(super) cpu_pct: f64,
    pub(super) hwm_kib: u64,
    pub(super) ready_wall: Duration,
    pub(super) startup_ms: Option<u64>,
    pub(super) lost: u64,
    pub(super) other_cpu: Option<f64>,
}

pub(super) struct AttachResult {
    /// Lines read by each reading client over the agent's life (replay included).
    pub(super) reader_lines: Vec<u64>,
    /// Records the reading clients were told they missed (0 if they kept up).
    pub(super) reader_missed: u64,
    /// CPU the reading clients used, summed, in % of one core over their run. They run in
    /// the bench process, so "other processes" does not include them.
    pub(super) reader_cpu_pct: f64,
    /// Records the stalled client was told it missed when it read at last, after the window
    /// (None: no `missed` note came in time).
    pub(super) stalled_missed: Option<u64>,
}

/// Conflict latency and the agent's cost under background churn. With `attach`, the same
/// again with ten clients on the agent's control socket, one of which never reads: a stalled
/// client must not slow logging down.
pub(super) fn latency_cost_phase(
    s: &Settings,
    rep: &mut Report,
    attach: bool,
) -> Result<LatencyResult> {
    let (tag, what) = run_names(attach);
    note(&format!(
        "{what} (+ cost): portwatch default, {PROBES} probe binds every {} ms under {:.0} \
         conn/s churn, {} s window",
        PROBE_SPACING.as_millis(),
        BACKGROUND_RATE,
        s.window.as_secs()
    ));
    wait_for_quiet(rep);
    // One holder per probe so each conflict is known by its port. Created before the agent
    // starts: their listen() calls are not part of what is measured.
    let probes = ProbeHolders::new(PROBES)?;
    let (holders, arrivals) = (&probes.holders, probes.arrivals.clone());

    let StartedAgent {
        mut t,
        reader,
        ready_wall,
        clients,
    } = start_agent(s, rep, attach, tag, &probes)?;

    let mut churn = Churn::start(
        s.clients,
        Some(BACKGROUND_RATE),
        WARM + s.window * 2 + Duration::from_secs(30),
    )?;
    thread::sleep(WARM);
    let (c0, cpu0, t0) = (churn.completed(), cpu_seconds(t.pid()), Instant::now());
    let other = OtherCpu::start(Some(t.pid()));

    // Probes: one reused socket (a failed bind leaves it unbound), spaced in time.
    let probe = tcp_socket()?;
    let (sent_at, sent) = send_probes(&probe, holders, t0)?;
    // The rest of the window: churn only (the CPU figure covers the whole window).
    if let Some(d) = (t0 + s.window).checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    let el = t0.elapsed().as_secs_f64();
    let (c1, cpu1) = (churn.completed(), cpu_seconds(t.pid()));
    let other_cpu = other.pct();
    // After the window (the probes are all sent): the churn still makes records to publish.
    let stalled_missed = clients
        .as_ref()
        .and_then(|c| c.stalled_missed(Duration::from_secs(5)));
    churn.finish();
    let hwm = vm_hwm_kib(t.pid()).unwrap_or(0);
    rep.hwm(Cfg::PwDefault, t.pid());
    // Late lines get up to 2 s more (bounded wait).
    let wait_until = Instant::now() + Duration::from_secs(2);
    while arrivals.iter().any(|a| a.load(Relaxed) == 0) && Instant::now() < wait_until {
        thread::sleep(Duration::from_millis(10));
    }
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let log = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
        .log;
    if !log.stopped {
        rep.warn(format!("{what}: no 'stopped' record"));
    }
    let attach_res = attach_result(clients, stalled_missed);
    write_probe_csv(s, tag, &arrivals, &sent_at, holders);
    let lat_ms = probe_latencies(&arrivals, &sent_at);
    let r = LatencyResult {
        attach: attach_res,
        sent,
        churn_rate: (c1 - c0) as f64 / el,
        cpu_pct: match (cpu0, cpu1) {
            (Some(a), Some(b)) => (b - a) / el * 100.0,
            _ => f64::NAN,
        },
        hwm_kib: hwm,
        ready_wall,
        startup_ms: log.startup_ms,
        lost: log.lost_count,
        other_cpu,
        lat_ms,
    };
    note_result(&what, &r);
    Ok(r)
}

/// The run's file tag and its name in progress lines.
fn run_names(attach: bool) -> (&'static str, String) {
    if attach {
        (
            "latency-attach",
            format!(
                "latency, {} attach clients, one stalled",
                ATTACH_READERS + 1
            ),
        )
    } else {
        ("latency", "latency, no attach clients".to_string())
    }
}

/// The agent of a latency run, started, ready and settled.
struct StartedAgent {
    t: Tracer,
    /// The thread reading the agent's stdout (it marks the probes' conflicts as they arrive).
    reader: thread::JoinHandle<LineStats>,
    /// From spawn to the `ready` line.
    ready_wall: Duration,
    /// The clients on the control socket, with `attach`.
    clients: Option<AttachClients>,
}

/// Start the agent (and with `attach` its control-socket clients); wait until ready and settled.
fn start_agent(
    s: &Settings,
    rep: &mut Report,
    attach: bool,
    tag: &str,
    probes: &ProbeHolders,
) -> Result<StartedAgent> {
    let (mut t, stdout) = Tracer::spawn(s, Cfg::PwDefault, tag, Sink::Pipe)?;
    let stdout = stdout.context("agent stdout pipe")?;
    let marks = probes.marks();
    let (reader, ready_rx) = read_agent_lines(
        stdout,
        "bench-reader",
        LineStats::default(),
        move |st, line, now| {
            if record_type(line) == "conflict" && line.contains("\"op\":\"bind\"") {
                if let Some(p) = json_u64(line, "port") {
                    marks.arrived(p, now);
                }
            }
            st.feed(line, None);
        },
    )?;
    let (ready_at, line) = wait_ready(&mut t, &ready_rx)?;
    let ready_wall = ready_at - t.spawned;
    rep.agent_ready(ready_wall, &line);
    // The control socket is bound before the ready line is printed.
    let clients = if attach {
        let dir = t.runtime_dir.as_ref().context(
            "this agent build has no --runtime-dir, so the bench cannot find its control socket",
        )?;
        Some(AttachClients::connect(&dir.join("portwatch.sock"))?)
    } else {
        None
    };
    thread::sleep(SETTLE);
    Ok(StartedAgent {
        t,
        reader,
        ready_wall,
        clients,
    })
}

/// One failing bind per holder on `probe`, PROBE_SPACING apart from `t0`: send times and count.
fn send_probes(probe: &Fd, holders: &[(Fd, u16)], t0: Instant) -> Result<(Vec<i64>, usize)> {
    let mut sent_at = vec![0i64; PROBES];
    let mut sent = 0;
    for (i, (_, port)) in holders.iter().enumerate() {
        let due = t0 + PROBE_SPACING * i as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let sa = loopback(*port);
        sent_at[i] = realtime_ns();
        // SAFETY: our socket, a valid sockaddr.
        let r = unsafe { bind_to(probe.0, &sa) };
        if r == 0 || errno() != libc::EADDRINUSE {
            bail!("probe bind to 127.0.0.1:{port} did not fail with EADDRINUSE");
        }
        sent += 1;
    }
    Ok((sent_at, sent))
}

/// What the attach clients saw, once they are finished (None without `attach`).
fn attach_result(
    clients: Option<AttachClients>,
    stalled_missed: Option<u64>,
) -> Option<AttachResult> {
    clients.map(|c| {
        let counts = c.finish();
        AttachResult {
            reader_lines: counts.iter().map(|n| n.lines).collect(),
            reader_missed: counts.iter().map(|n| n.missed).sum(),
            reader_cpu_pct: counts
                .iter()
                .filter(|n| n.ran_s > 0.0)
                .map(|n| n.cpu_s / n.ran_s * 100.0)
                .sum(),
            stalled_missed,
        }
    })
}

/// `<tag>.csv`: each probe's latency, in send order (best effort).
fn write_probe_csv(
    s: &Settings,
    tag: &str,
    arrivals: &[AtomicI64],
    sent_at: &[i64],
    holders: &[(Fd, u16)],
) {
    // Per-probe detail, in send order, to see when slow ones happened (e.g. periodic work).
    let mut csv = String::from("probe,port,sent_realtime_ns,latency_ms\n");
    for (i, (a, &s0)) in arrivals.iter().zip(sent_at).enumerate() {
        let a = a.load(Relaxed);
        let l = if a != 0 {
            format!("{:.3}", (a - s0) as f64 / 1e6)
        } else {
            "missing".into()
        };
        let _ = writeln!(csv, "{i},{},{s0},{l}", holders[i].1);
    }
    let _ = fs::write(s.dir.join(format!("{tag}.csv")), csv);
}

/// The run's progress line.
fn note_result(what: &str, r: &LatencyResult) {
    note(&format!(
        "{what}: {}/{} probes seen, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; agent {:.1}% CPU \
         at {:.0} conn/s, VmHWM {} KiB, {} lost{}",
        r.lat_ms.len(),
        r.sent,
        pct(&r.lat_ms, 50.0),
        pct(&r.lat_ms, 99.0),
        r.lat_ms.last().copied().unwrap_or(f64::NAN),
        r.cpu_pct,
        r.churn_rate,
        r.hwm_kib,
        r.lost,
        match &r.attach {
            Some(a) => format!(
                "; reading clients got {}..{} lines ({} missed, {:.0}% CPU), the stalled one \
                 missed {}",
                a.reader_lines.iter().min().unwrap_or(&0),
                a.reader_lines.iter().max().unwrap_or(&0),
                a.reader_missed,
                a.reader_cpu_pct,
                a.stalled_missed
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "? (no note)".into())
            ),
            None => String::new(),
        }
    ));
}

pub(super) struct CostRow {
    pub(super) churn_rate: f64,
    pub(super) cpu_pct: f64,
    hwm_kib: u64,
    pub(super) lines: u64,
    pub(super) lost: u64,
    pub(super) other_cpu: Option<f64>,
}

#[cfg(test)]
impl CostRow {
    /// A row from its figures (the report tests).
    pub(super) fn new(
        churn_rate: f64,
        cpu_pct: f64,
        lines: u64,
        lost: u64,
        other_cpu: Option<f64>,
    ) -> CostRow {
        CostRow {
            churn_rate,
            cpu_pct,
            hwm_kib: 0,
            lines,
            lost,
            other_cpu,
        }
    }
}

/// The agent's cost in --all-events mode under the same background churn (output to a file).
pub(super) fn cost_all_events(s: &Settings, rep: &mut Report) -> Result<CostRow> {
    note(&format!(
        "cost: portwatch --all-events under {:.0} conn/s churn, {} s",
        BACKGROUND_RATE,
        s.window.as_secs()
    ));
    wait_for_quiet(rep);
    let (mut t, _) = Tracer::spawn(s, Cfg::PwAll, "cost-all-events", Sink::File)?;
    let (wall, line) = t.wait_ready_file()?;
    rep.agent_ready(wall, &line);
    thread::sleep(SETTLE);
    let smp = measure_churn(s.clients, Some(BACKGROUND_RATE), s.window, Some(t.pid()))?;
    let hwm = vm_hwm_kib(t.pid()).unwrap_or(0);
    rep.hwm(Cfg::PwAll, t.pid());
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let log = parse_agent_log(&t.out, None)?;
    t.remove_logs(s.keep_logs);
    let r = CostRow {
        churn_rate: smp.rate,
        cpu_pct: smp.tracer_cpu.unwrap_or(f64::NAN),
        hwm_kib: hwm,
        lines: log.lines,
        lost: log.lost_count,
        other_cpu: smp.other_cpu,
    };
    note(&format!(
        "cost: --all-events {:.1}% CPU at {:.0} conn/s, {} lines, {} lost, VmHWM {} KiB",
        r.cpu_pct, r.churn_rate, r.lines, r.lost, r.hwm_kib
    ));
    Ok(r)
}
