//! 2b. Exhaustion storm: a client that finds no free local port toward one destination and
//! retries as fast as one core allows (connect() failing with EADDRNOTAVAIL), while an
//! unrelated conflict elsewhere on the host must still be logged at once.
//!
//! The storm runs in a network namespace of its own whose ephemeral range (40000-41999) is
//! all taken by connections held to 127.0.0.1:9000. Each failure is an event; identical ones
//! become about one record a second, each with the destination's port usage from a re-read of
//! the namespace made off the processing thread. Measured over the window: the agent's CPU,
//! the latency of probe binds on the host (each on a port of its own, so none is coalesced),
//! the records against the failures, and, once the storm stops, the time from SIGTERM to the
//! agent's exit while it still holds the storm's last window.

use std::{fmt::Write as _, process::ExitStatus};

use super::*;
use crate::bench::stats::probe_latencies;

const RANGE: (u16, u16) = (40000, 41999);
const DST_PORT: u16 = 9000;
/// One probe every this long over the window.
const SPACING: Duration = Duration::from_millis(50);
/// How long the probes' records may take to arrive after the last one, storm still running.
const LATE: Duration = Duration::from_secs(2);

pub(super) struct ExhaustResult {
    window_s: f64,
    /// EADDRNOTAVAIL from the storm, from its start to its stop (warm-up included: the agent
    /// sees those too).
    failures: u64,
    /// Failures per second inside the measured window.
    rate: f64,
    /// Storm connects that did not fail with EADDRNOTAVAIL (the range was not exhausted, or
    /// another error): must be 0 for the row to mean anything.
    unexpected: u64,
    records: u64,
    counted: u64,
    /// Records with a destination whose as_of is not before their first_ts.
    dest_ok: u64,
    probes_sent: usize,
    probe_counted: u64,
    lost_connect: u64,
    lost_bind: u64,
    unwritten: Option<u64>,
    lat_ms: Vec<f64>,
    cpu_pct: f64,
    other_cpu: Option<f64>,
    sigterm: Duration,
    exited_ok: bool,
    hwm_kib: u64,
}

impl ExhaustResult {
    fn accounted(&self) -> u64 {
        self.counted
            + self.probe_counted
            + self.lost_connect
            + self.lost_bind
            + self.unwritten.unwrap_or(0)
    }
    fn generated(&self) -> u64 {
        self.failures + self.probes_sent as u64
    }
}

/// What the reader thread took from the agent's stdout.
#[derive(Default)]
struct Seen {
    records: u64,
    counted: u64,
    dest_ok: u64,
    probe_counted: u64,
    lost_connect: u64,
    lost_bind: u64,
    unwritten: Option<u64>,
}

/// `2026-11-25T08:31:31.123456789Z` as nanoseconds since the epoch.
fn rfc3339_ns(s: &str) -> Option<i128> {
    let t = humantime::parse_rfc3339(s).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i128::try_from(d.as_nanos()).ok()
}

/// The storm's namespace: every port of RANGE held by a connection to 127.0.0.1:DST_PORT.
struct Exhausted {
    ns: OwnNetns,
    _listener: Fd,
    _held: Vec<Fd>,
}

impl Exhausted {
    /// Made by a short-lived thread, because unshare(CLONE_NEWNET) moves only the calling
    /// thread; the sockets stay in the namespace they were made in.
    fn new() -> Result<Exhausted> {
        thread::Builder::new()
            .name("bench-exhaust".into())
            .spawn(|| -> Result<Exhausted> {
                // SAFETY: plain syscalls; this thread exits right after.
                let fd = unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        bail!(
                            "unshare(CLONE_NEWNET): {} (the bench runs as root)",
                            std::io::Error::last_os_error()
                        );
                    }
                    libc::open(
                        c"/proc/thread-self/ns/net".as_ptr(),
                        libc::O_RDONLY | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    bail!(
                        "open /proc/thread-self/ns/net: {}",
                        std::io::Error::last_os_error()
                    );
                }
                let ns = OwnNetns { fd: Fd(fd) };
                loopback_up()?;
                // /proc/sys/net belongs to the namespace of the thread that opens it.
                fs::write(
                    "/proc/sys/net/ipv4/ip_local_port_range",
                    format!("{} {}", RANGE.0, RANGE.1),
                )
                .context("setting ip_local_port_range in the storm's namespace")?;
                let (l, _) = listener(DST_PORT, 4096)?;
                let dst = loopback(DST_PORT);
                let n = usize::from(RANGE.1 - RANGE.0) + 1;
                let mut held = Vec::with_capacity(n);
                for i in 0..n {
                    let c = tcp_socket()?;
                    // SAFETY: our socket, a valid sockaddr.
                    let r = unsafe {
                        libc::connect(c.0, (&dst as *const libc::sockaddr_in).cast(), SIN_LEN)
                    };
                    if r != 0 {
                        bail!(
                            "connection {i} of {n} to 127.0.0.1:{DST_PORT}: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                    held.push(c);
                }
                Ok(Exhausted {
                    ns,
                    _listener: l,
                    _held: held,
                })
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }
}

/// Room for the held connections and the probes' holders.
fn raise_nofile() {
    // SAFETY: plain syscalls on a valid rlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[derive(Default)]
struct StormCounts {
    failed: AtomicU64,
    unexpected: AtomicU64,
    /// Failures when the measured window opened and closed.
    at_open: AtomicU64,
}

/// connect() on a fresh socket each time, as fast as one thread can, until `stop`.
fn storm_loop(ns: &OwnNetns, stop: &AtomicBool, c: &StormCounts) -> Result<()> {
    ns.enter()?;
    let dst = loopback(DST_PORT);
    while !stop.load(Relaxed) {
        // SAFETY: plain syscalls on a socket this loop owns; `dst` outlives them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                c.unexpected.fetch_add(1, Relaxed);
                continue;
            }
            let r = libc::connect(fd, (&dst as *const libc::sockaddr_in).cast(), SIN_LEN);
            if r != 0 && errno() == libc::EADDRNOTAVAIL {
                c.failed.fetch_add(1, Relaxed);
            } else {
                c.unexpected.fetch_add(1, Relaxed);
            }
            libc::close(fd);
        }
    }
    Ok(())
}

pub(super) fn exhaustion_storm_phase(s: &Settings, rep: &mut Report) -> Result<ExhaustResult> {
    let probes = ((s.window.as_millis() / SPACING.as_millis()) as usize).clamp(20, 400);
    note(&format!(
        "exhaustion storm: connect() EADDRNOTAVAIL at max rate toward 127.0.0.1:{DST_PORT} in a \
         namespace with ip_local_port_range {} {}, {} s window, {probes} probe binds on the host \
         every {} ms",
        RANGE.0,
        RANGE.1,
        s.window.as_secs(),
        SPACING.as_millis()
    ));
    raise_nofile();
    wait_for_quiet(rep);
    // Before the agent starts: the setup (2,000 connections, the holders' listens) is not
    // part of what is measured.
    let exhausted = Exhausted::new()?;
    let probe_set = ProbeHolders::new(probes)?;
    let (holders, arrivals) = (&probe_set.holders, probe_set.arrivals.clone());

    let (mut t, reader) = start_agent(s, rep, &probe_set)?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(StormCounts::default());
    let exhausted = Arc::new(exhausted);
    let storm = {
        let (stop, counts, ex) = (stop.clone(), counts.clone(), exhausted.clone());
        thread::Builder::new()
            .name("bench-exhaust-storm".into())
            .spawn(move || storm_loop(&ex.ns, &stop, &counts))?
    };
    thread::sleep(WARM);
    let cpu0 = cpu_seconds(t.pid());
    let other = OtherCpu::start(Some(t.pid()));
    counts.at_open.store(counts.failed.load(Relaxed), Relaxed);
    let t0 = Instant::now();
    // The probes: one reused socket (a failed bind leaves it unbound), spaced over the window.
    let probe = tcp_socket()?;
    let (sent_at, sent) = send_probes(&probe, holders, probes, t0, &stop)?;
    if let Some(d) = (t0 + s.window).checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    let window_s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(t.pid());
    let in_window = counts.failed.load(Relaxed) - counts.at_open.load(Relaxed);
    let other_cpu = other.pct();
    // The probes' records, storm still running.
    let wait_until = Instant::now() + LATE;
    while arrivals.iter().any(|a| a.load(Relaxed) == 0) && Instant::now() < wait_until {
        thread::sleep(Duration::from_millis(10));
    }
    let hwm_kib = vm_hwm_kib(t.pid()).unwrap_or(0);
    rep.hwm(Cfg::PwDefault, t.pid());
    t.check_alive()?;
    // The storm stops and SIGTERM follows at once: the agent still holds the storm's open
    // window (and any conflict waiting for its namespace's re-read) when the signal lands.
    stop.store(true, Relaxed);
    storm
        .join()
        .map_err(|_| anyhow::anyhow!("the storm thread panicked"))??;
    let (status, sigterm) = sigterm_and_wait(&mut t)?;
    let seen = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?;
    let lat_ms = probe_latencies(&arrivals, &sent_at);
    let r = ExhaustResult {
        window_s,
        failures: counts.failed.load(Relaxed),
        rate: in_window as f64 / window_s,
        unexpected: counts.unexpected.load(Relaxed),
        records: seen.records,
        counted: seen.counted,
        dest_ok: seen.dest_ok,
        probes_sent: sent,
        probe_counted: seen.probe_counted,
        lost_connect: seen.lost_connect,
        lost_bind: seen.lost_bind,
        unwritten: seen.unwritten,
        lat_ms,
        cpu_pct: match (cpu0, cpu1) {
            (Some(a), Some(b)) => (b - a) / window_s * 100.0,
            _ => f64::NAN,
        },
        other_cpu,
        sigterm,
        exited_ok: status.success(),
        hwm_kib,
    };
    if r.unwritten.is_none() {
        rep.warn("exhaustion storm: no 'stopped' record (or no unwritten in it)".into());
    }
    note_result(&r);
    Ok(r)
}

/// Start the agent, its records tallied by a reader thread, and wait until it is ready and settled.
fn start_agent(
    s: &Settings,
    rep: &mut Report,
    probe_set: &ProbeHolders,
) -> Result<(Tracer, thread::JoinHandle<Seen>)> {
    let (mut t, stdout) = Tracer::spawn(s, Cfg::PwDefault, "exhaust", Sink::Pipe)?;
    let stdout = stdout.context("agent stdout pipe")?;
    let marks = probe_set.marks();
    let (reader, ready_rx) = read_agent_lines(
        stdout,
        "bench-exh-reader",
        Seen::default(),
        move |seen, line, now| match record_type(line) {
            "conflict" => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    return;
                };
                let count = v["count"].as_u64().unwrap_or(1);
                if v["op"] == "bind" {
                    if marks.arrived(v["port"].as_u64().unwrap_or(0), now) {
                        seen.probe_counted += count;
                    }
                } else if v["op"] == "connect" && v["port"] == DST_PORT {
                    seen.records += 1;
                    seen.counted += count;
                    let first = v["first_ts"].as_str().and_then(rfc3339_ns);
                    let as_of = v["destination"]["as_of"].as_str().and_then(rfc3339_ns);
                    if matches!((first, as_of), (Some(f), Some(a)) if a >= f) {
                        seen.dest_ok += 1;
                    }
                }
            }
            "lost" => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                    seen.lost_connect += v["by_kind"]["connect"].as_u64().unwrap_or(0);
                    seen.lost_bind += v["by_kind"]["bind"].as_u64().unwrap_or(0);
                }
            }
            "agent" if line.contains("\"event\":\"stopped\"") => {
                seen.unwritten = json_u64(line, "unwritten");
            }
            _ => {}
        },
    )?;
    let (ready_at, line) = wait_ready(&mut t, &ready_rx)?;
    rep.agent_ready(ready_at - t.spawned, &line);
    thread::sleep(SETTLE);
    Ok((t, reader))
}

/// One failing bind per holder on `probe`, SPACING apart from `t0`: send times and count.
fn send_probes(
    probe: &Fd,
    holders: &[(Fd, u16)],
    probes: usize,
    t0: Instant,
    stop: &AtomicBool,
) -> Result<(Vec<i64>, usize)> {
    let mut sent_at = vec![0i64; probes];
    let mut sent = 0;
    for (i, (_, port)) in holders.iter().enumerate() {
        let due = t0 + SPACING * i as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let sa = loopback(*port);
        sent_at[i] = realtime_ns();
        // SAFETY: our socket, a valid sockaddr.
        let r = unsafe { bind_to(probe.0, &sa) };
        if r == 0 || errno() != libc::EADDRINUSE {
            stop.store(true, Relaxed);
            bail!("probe bind to 127.0.0.1:{port} did not fail with EADDRINUSE");
        }
        sent += 1;
    }
    Ok((sent_at, sent))
}

/// SIGTERM to the agent and its exit polled every 1 ms: its status and the time it took.
fn sigterm_and_wait(t: &mut Tracer) -> Result<(ExitStatus, Duration)> {
    let sig_at = Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(t.pid(), libc::SIGTERM) };
    let deadline = sig_at + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = t.child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            // Tracer's drop kills it.
            bail!("the agent did not exit within 30 s of SIGTERM");
        }
        thread::sleep(Duration::from_millis(1));
    };
    let sigterm = sig_at.elapsed();
    t.exited = Some(status);
    Ok((status, sigterm))
}

/// The phase's progress line.
fn note_result(r: &ExhaustResult) {
    note(&format!(
        "exhaustion storm: {} failures ({:.0}/s in the window) -> {} records (counts {}, {} \
         with destination as_of >= first_ts), lost connect {} bind {}, unwritten {}; agent \
         {:.1}% CPU; probes {}/{} p50 {:.2} ms p99 {:.2} ms; SIGTERM to exit {:.0} ms",
        r.failures,
        r.rate,
        r.records,
        r.counted,
        r.dest_ok,
        r.lost_connect,
        r.lost_bind,
        r.unwritten.map_or("?".into(), |u| u.to_string()),
        r.cpu_pct,
        r.lat_ms.len(),
        r.probes_sent,
        pct(&r.lat_ms, 50.0),
        pct(&r.lat_ms, 99.0),
        r.sigterm.as_secs_f64() * 1000.0
    ));
}

/// Section 2b of results.md.
pub(super) fn render(m: &mut String, r: &ExhaustResult, noisy: &mut Vec<String>) {
    let _ = writeln!(
        m,
        "\n## 2b. Exhaustion storm (connect EADDRNOTAVAIL at max rate; portwatch default, no port filter)\n"
    );
    let _ = writeln!(
        m,
        "One thread calls connect() on a fresh socket as fast as it can, in a namespace whose \
         ip_local_port_range ({}-{}) is all held by connections to 127.0.0.1:{DST_PORT}, so every \
         attempt fails with EADDRNOTAVAIL. Identical failures are coalesced into about one \
         record a second, each with `destination` counts from a re-read of the namespace. \
         Meanwhile a bind on the host fails every {} ms, each on a port of its own (none \
         coalesced): latency from CLOCK_REALTIME just before that bind() to the moment the \
         bench read its line. CPU = the agent's utime + stime over the {:.1} s window. At the \
         end the storm stops and SIGTERM follows at once (the storm's last window still open \
         in the agent); exit time polled every 1 ms. *accounting* = sum of `count` over the \
         storm's and the probes' records + `lost` (by_kind connect + bind) + `unwritten` \
         against the failures made.\n",
        RANGE.0,
        RANGE.1,
        SPACING.as_millis(),
        r.window_s
    );
    let _ = writeln!(
        m,
        "| metric | value | target | result |\n|---|---:|---|---|"
    );
    for (name, value, target, ok) in table_rows(r) {
        let res = ok.map_or("info", verdict);
        let _ = writeln!(m, "| {name} | {value} | {target} | {res} |");
    }
    if r.other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU) {
        noisy.push(format!(
            "exhaustion storm: other processes used {:.0}% of a core",
            r.other_cpu.unwrap_or(0.0)
        ));
    }
}

/// A row of the table: metric, value, target, and whether it was met (None: information).
type Row = (&'static str, String, &'static str, Option<bool>);

/// The rows of section 2b's table, in order.
fn table_rows(r: &ExhaustResult) -> [Row; 9] {
    let p50 = pct(&r.lat_ms, 50.0);
    let p99 = pct(&r.lat_ms, 99.0);
    let all_probes = r.lat_ms.len() == r.probes_sent;
    [
        (
            "storm: EADDRNOTAVAIL per second (in the window) / in all",
            format!(
                "{:.0} / {}{}",
                r.rate,
                r.failures,
                if r.unexpected > 0 {
                    format!(
                        " ({} attempts did not fail with EADDRNOTAVAIL)",
                        r.unexpected
                    )
                } else {
                    String::new()
                }
            ),
            "–",
            Some(r.unexpected == 0 && r.failures > 0),
        ),
        (
            "agent CPU (of one core) / other processes",
            format!("{:.1}% / {}%", r.cpu_pct, fmt_opt(r.other_cpu, 0)),
            "≤ 25%",
            Some(r.cpu_pct <= 25.0),
        ),
        (
            "unrelated conflict latency p50",
            format!("{p50:.2} ms"),
            "–",
            None,
        ),
        (
            "unrelated conflict latency p99 (probes received)",
            format!("{p99:.2} ms ({}/{})", r.lat_ms.len(), r.probes_sent),
            "≤ 20 ms, all received",
            Some(p99 <= 20.0 && all_probes),
        ),
        (
            "storm records written / failures they count",
            format!("{} / {}", r.records, r.counted),
            "≈ 1 per second",
            Some(r.records >= 1 && (r.records as f64) <= r.window_s * 2.0 + 10.0),
        ),
        (
            "storm records with destination.as_of ≥ first_ts",
            format!("{} of {}", r.dest_ok, r.records),
            "all",
            Some(r.dest_ok == r.records),
        ),
        (
            "accounting: counts + lost + unwritten / failures",
            format!(
                "{} + {} + {} = {} / {}",
                r.counted + r.probe_counted,
                r.lost_connect + r.lost_bind,
                r.unwritten.map_or("?".into(), |u| u.to_string()),
                r.accounted(),
                r.generated()
            ),
            "equal",
            Some(r.unwritten.is_some() && r.accounted() == r.generated()),
        ),
        (
            "SIGTERM → exit (storm stopped just before)",
            format!(
                "{:.0} ms{}",
                r.sigterm.as_secs_f64() * 1000.0,
                if r.exited_ok {
                    ""
                } else {
                    ", exit status not 0"
                }
            ),
            "< 1 s",
            Some(r.exited_ok && r.sigterm < Duration::from_secs(1)),
        ),
        (
            "peak RSS (VmHWM)",
            format!("{:.1} MiB", r.hwm_kib as f64 / 1024.0),
            "–",
            None,
        ),
    ]
}

#[cfg(test)]
mod tests;
