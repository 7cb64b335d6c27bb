//! CPU and memory accounting, from /proc and the clocks: a process's CPU time, the machine's,
//! softirq time, the CPU of everything else during a window (and waiting for it to drop),
//! peak RSS, a thread's own CPU time, the load average.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use super::{note, report::Report, tracers::foreign_tracers, NOISY_OTHER_CPU};

/// utime + stime of a process, in seconds.
pub(super) fn cpu_seconds(pid: i32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU time of every task on the machine (user + nice + system, all cores), in seconds.
/// irq/softirq time is left out on both sides of the "other processes" subtraction, as it is
/// not charged to any process.
fn system_cpu_seconds() -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(f.iter().sum::<u64>() as f64 / hz)
}

/// System-wide softirq time, in seconds. Loopback TCP is processed in softirq context (and
/// so are the tracepoint programs that fire there); with IRQ time accounting that time is
/// charged to no process, so the per-connection CPU cost adds it explicitly.
pub(super) fn softirq_seconds() -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let v: u64 = s.lines().next()?.split_whitespace().nth(7)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(v as f64 / hz)
}

/// CPU used by everything except the bench and the tracer under test, as % of one core:
/// other engineers' builds, daemons, kernel threads. A high figure marks a noisy window.
pub(super) struct OtherCpu {
    sys: Option<f64>,
    own: Option<f64>,
    tracer: Option<f64>,
    at: Instant,
    tracer_pid: Option<i32>,
}

impl OtherCpu {
    pub(super) fn start(tracer_pid: Option<i32>) -> OtherCpu {
        OtherCpu {
            sys: system_cpu_seconds(),
            own: cpu_seconds(std::process::id() as i32),
            tracer: tracer_pid.and_then(cpu_seconds),
            at: Instant::now(),
            tracer_pid,
        }
    }
    pub(super) fn pct(&self) -> Option<f64> {
        let el = self.at.elapsed().as_secs_f64();
        let sys = system_cpu_seconds()? - self.sys?;
        let own = cpu_seconds(std::process::id() as i32)? - self.own?;
        let tr = match (self.tracer_pid, self.tracer) {
            (Some(p), Some(t0)) => cpu_seconds(p)? - t0,
            _ => 0.0,
        };
        Some(((sys - own - tr) / el * 100.0).max(0.0))
    }
}

/// Before a measurement, wait (bounded) until other processes are nearly idle and no foreign
/// tracer is attached: the machine is shared (builds, soak tests), and 2 cores leave no
/// headroom. The total wait over the whole bench is capped by `quiet_budget`; when it is
/// spent, measurements go ahead and the noise shows in the "other CPU" column and warnings.
pub(super) fn wait_for_quiet(rep: &mut Report) {
    let start = Instant::now();
    let limit = rep.quiet_budget.min(Duration::from_secs(15));
    let mut said = false;
    loop {
        let o = OtherCpu::start(None);
        thread::sleep(Duration::from_millis(500));
        let busy = o.pct().unwrap_or(0.0);
        let foreign = foreign_tracers(None);
        for f in &foreign {
            if rep.foreign.insert(f.clone()) {
                note(&format!(
                    "WARNING: another process has tracing eBPF programs loaded: {f}; its hooks \
                     run under every configuration, \"no tracer\" included"
                ));
            }
        }
        let why = format!(
            "other processes use {busy:.0}% of a core{}",
            if foreign.is_empty() {
                ""
            } else {
                " and a foreign tracer is attached"
            }
        );
        if busy < NOISY_OTHER_CPU && foreign.is_empty() {
            break;
        }
        if start.elapsed() >= limit {
            note(&format!(
                "{why}; measuring anyway (wait budget left: {:.0} s)",
                rep.quiet_budget
                    .saturating_sub(start.elapsed())
                    .as_secs_f64()
            ));
            break;
        }
        if !said {
            note(&format!("waiting for the machine to quiet down: {why}"));
            said = true;
        }
    }
    rep.quiet_budget = rep.quiet_budget.saturating_sub(start.elapsed());
}

/// Peak resident set size (VmHWM) in KiB.
pub(super) fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub(super) fn read_loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(super) fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}
