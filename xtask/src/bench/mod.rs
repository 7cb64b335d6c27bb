//! `cargo xtask bench`: side-by-side benchmarks of the release agent, in one run.
//!
//! 1. Loopback TCP churn (connect/accept/close) with no tracer, portwatch (default and
//!    `--all-events`), an equivalent bpftrace script and libbpf-tools' tcpstates, interleaved
//!    over rounds so that drift on a noisy machine hits every configuration alike.
//!    1b. The same configurations at several offered (paced) churn rates: achieved throughput
//!    and tracer CPU against offered rate.
//! 2. Bind storm: failing binds at controlled rates; every generated failure must come out
//!    in a conflict record's `count` or be counted in a `lost` record.
//!    2b. Exhaustion storm (bench/exhaustion.rs): connect() failing with EADDRNOTAVAIL at max
//!    rate in a namespace with every ephemeral port taken, against the latency of an
//!    unrelated conflict on the host, the agent's CPU, the accounting and the time from
//!    SIGTERM to exit.
//! 3. Latency from a failing bind to its conflict line on the agent's stdout: with nothing
//!    attached, and with ten clients on the control socket, one of which never reads.
//! 4. The agent's own cost: CPU, peak RSS, time to ready.
//!
//! Results go to target/bench/results.md (printed too), target/bench/churn.png (the sweep:
//! throughput against churn rate per tracer) and target/bench/churn-max.png (the max-rate
//! rounds).
//!
//! Load generators call libc directly on pre-built socket addresses: no allocation and no
//! std wrappers in the measured loops, so the generator itself costs as little as possible and
//! the same in every configuration. Every child process is owned by a guard that stops it
//! (SIGINT, then SIGKILL) when dropped, and is also told by the kernel (PR_SET_PDEATHSIG) if
//! this process dies without unwinding.
//!
//! One module per concern: `tracers` (the machine, the peers and the tracer processes),
//! `load` (the load generators), `cpu` (CPU and memory accounting), `stats` (the agent's and
//! the peers' output read back, and the statistics), the phases (`churn` with the sweep,
//! `storm`, `exhaustion`, `latency` with the cost), `report` (results.md) and `plot` (the
//! PNGs).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use self::{
    churn::{churn_phase, sweep_phase, ChurnResult, SweepResult, SWEEP_RATES, SWEEP_RATES_QUICK},
    cpu::read_loadavg,
    latency::{cost_all_events, latency_cost_phase, CostRow, LatencyRuns},
    plot::{write_churn_png, write_sweep_png},
    report::{render_markdown, Report},
    storm::{bind_storm_phase, StormRow},
    tracers::{ensure_peers, Host, Peers, BPFTRACE_SCRIPT, FLOOR_SCRIPT},
};
// Besides the above, what exhaustion.rs takes from here with `use super::*`.
use self::{
    cpu::{cpu_seconds, vm_hwm_kib, wait_for_quiet, OtherCpu},
    load::{
        bind_to, errno, listener, loopback, loopback_up, tcp_socket, Fd, OwnNetns, ProbeHolders,
        SIN_LEN,
    },
    report::{fmt_opt, verdict},
    stats::{json_u64, pct, realtime_ns, record_type},
    tracers::{read_agent_lines, wait_ready, Cfg, Sink, Tracer},
};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread,
};

mod churn;
mod cpu;
mod exhaustion;
mod latency;
mod load;
mod plot;
mod report;
mod stats;
mod storm;
mod tracers;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds of measurement per configuration (churn rounds, each bind-storm rate, the cost
    /// runs). Default 10, or 3 with --quick. Each point of the churn rate sweep gets half of
    /// it (5 s, or 1 s with --quick).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: Option<u64>,
    /// Smoke run: 3 s per configuration, a single churn round, and a sweep of 3 rates
    /// (5k, 15k and max conn/s) at 1 s each.
    #[arg(long)]
    quick: bool,
    /// Interleaved churn rounds (default 3, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Client threads of the churn load generator.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    clients: u32,
    /// Keep the tracers' output files in target/bench/ (they can reach hundreds of MB each).
    #[arg(long)]
    keep_logs: bool,
    /// Run only these parts (repeatable; default: all): churn (1, max rate), sweep (1b,
    /// achieved against offered churn rate, churn.png), storm (2, failing binds, and 2b,
    /// ephemeral port exhaustion), latency (3, without and with attach clients, and the
    /// default-mode cost), cost (the --all-events cost).
    #[arg(long, value_enum, value_name = "PART")]
    only: Vec<Part>,
    /// Another portwatch binary (an older release build, say), run in default mode beside
    /// this build in every churn round, so a before/after comparison shares one run's noise.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Churn,
    Sweep,
    Storm,
    Latency,
    Cost,
}

/// How far behind its schedule a paced churn client may fall and still catch up.
const CHURN_MAX_LAG: Duration = Duration::from_millis(10);
/// Background churn rate for the latency and cost runs (connections/s).
const BACKGROUND_RATE: f64 = 10_000.0;
/// Latency probes: count and spacing.
const PROBES: usize = 200;
const PROBE_SPACING: Duration = Duration::from_millis(20);
/// Bind storm: one attempt in this many is a successful bind (fresh socket, port 0, close).
const OK_BIND_EVERY: u64 = 10;
/// Time given to a tracer to attach (bpftrace compiles its script first).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a tracer is ready, so its start-up work does not overlap the measurement.
const SETTLE: Duration = Duration::from_millis(300);
/// Load runs this long before the measured window opens (connection setup, caches).
const WARM: Duration = Duration::from_millis(500);

/// Above this much CPU used by other processes during a window (% of one core), the window
/// is marked noisy: on 2 cores that is a large share of what the load generator could use.
const NOISY_OTHER_CPU: f64 = 30.0;

/// Readers among the attach clients of the second latency run; one more client never reads.
const ATTACH_READERS: usize = 9;

pub fn run(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bench needs root: the agent, bpftrace and tcpstates load eBPF programs and attach \
             tracepoints (run `sudo -E cargo xtask bench`)"
        );
    }
    let secs = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
    let dir = crate::workspace_root().join("target").join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = bench_lock(&dir)?;
    let cfg = settings(&args, secs, dir)?;
    let peers = ensure_peers();
    let script = cfg.dir.join("peer.bt");
    fs::write(&script, BPFTRACE_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let floor = cfg.dir.join("floor.bt");
    fs::write(&floor, FLOOR_SCRIPT).with_context(|| format!("writing {}", floor.display()))?;

    let host = Host::probe();
    let started = Instant::now();
    let mut report = Report {
        quiet_budget: if args.quick {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(90)
        },
        ..Default::default()
    };

    let phases = run_phases(&args, secs, &cfg, &peers, &mut report)?;

    write_results(&cfg, &host, &phases, &report)?;
    write_pngs(&cfg, &phases);
    note(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// Build the agent, copy it (and the --baseline binary) into `dir`, and the run's settings.
fn settings(args: &BenchArgs, secs: u64, dir: PathBuf) -> Result<Settings> {
    let built = crate::build_agent(true)?;
    // A private copy: others rebuilding target/release/portwatch during the run must not
    // change what is measured between one round and the next.
    let agent = dir.join("portwatch");
    let _ = fs::remove_file(&agent);
    fs::copy(&built, &agent)
        .with_context(|| format!("copying {} to {}", built.display(), agent.display()))?;
    let baseline = match &args.baseline {
        Some(b) => {
            let copy = dir.join("portwatch-baseline");
            let _ = fs::remove_file(&copy);
            fs::copy(b, &copy).with_context(|| {
                format!(
                    "copying the --baseline binary {} (give a portwatch build)",
                    b.display()
                )
            })?;
            Some(copy)
        }
        None => None,
    };
    Ok(Settings {
        window: Duration::from_secs(secs),
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
        clients: args.clients as usize,
        keep_logs: args.keep_logs,
        agent_args: agent_args(&agent, &dir),
        baseline_args: baseline
            .as_deref()
            .map(|b| agent_args(b, &dir))
            .unwrap_or_default(),
        baseline,
        dir,
        agent,
    })
}

/// What the phases measured; None for a phase left out by --only.
struct Phases {
    churn: Option<ChurnResult>,
    sweep: Option<SweepResult>,
    storm: Option<Vec<StormRow>>,
    exhaust: Option<exhaustion::ExhaustResult>,
    lat: Option<LatencyRuns>,
    all_cost: Option<CostRow>,
}

/// The phases --only asks for (all by default), in order.
fn run_phases(
    args: &BenchArgs,
    secs: u64,
    cfg: &Settings,
    peers: &Peers,
    report: &mut Report,
) -> Result<Phases> {
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let churn = if want(Part::Churn) {
        Some(churn_phase(cfg, peers, report)?)
    } else {
        None
    };
    let sweep = if want(Part::Sweep) {
        let rates = if args.quick {
            &SWEEP_RATES_QUICK[..]
        } else {
            &SWEEP_RATES[..]
        };
        let window = Duration::from_secs((secs / 2).max(1));
        Some(sweep_phase(cfg, peers, rates, window, report)?)
    } else {
        None
    };
    let storm = if want(Part::Storm) {
        Some(bind_storm_phase(cfg, report)?)
    } else {
        None
    };
    let exhaust = if want(Part::Storm) {
        Some(exhaustion::exhaustion_storm_phase(cfg, report)?)
    } else {
        None
    };
    let lat = if want(Part::Latency) {
        Some(LatencyRuns {
            plain: latency_cost_phase(cfg, report, false)?,
            attach: latency_cost_phase(cfg, report, true)?,
        })
    } else {
        None
    };
    let all_cost = if want(Part::Cost) {
        Some(cost_all_events(cfg, report)?)
    } else {
        None
    };
    Ok(Phases {
        churn,
        sweep,
        storm,
        exhaust,
        lat,
        all_cost,
    })
}

/// results.md (printed too) and churn-rounds.csv.
fn write_results(cfg: &Settings, host: &Host, phases: &Phases, report: &Report) -> Result<()> {
    let Phases {
        churn,
        sweep,
        storm,
        exhaust,
        lat,
        all_cost,
    } = phases;
    let host_end_load = read_loadavg();
    let md = render_markdown(
        cfg,
        host,
        &host_end_load,
        churn.as_ref(),
        sweep.as_ref(),
        storm.as_deref(),
        exhaust.as_ref(),
        lat.as_ref(),
        all_cost.as_ref(),
        report,
    );
    let out = cfg.dir.join("results.md");
    fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    note(&format!("wrote {}", out.display()));
    if let Some(c) = &churn {
        let path = cfg.dir.join("churn-rounds.csv");
        fs::write(&path, c.csv()).with_context(|| format!("writing {}", path.display()))?;
        note(&format!("wrote {}", path.display()));
    }
    Ok(())
}

/// churn.png and churn-max.png, each when its phase ran; a chart that fails is only noted.
fn write_pngs(cfg: &Settings, phases: &Phases) {
    let Phases { churn, sweep, .. } = phases;
    // churn.png: the sweep (throughput against churn rate); churn-max.png: the max-rate rounds.
    let pngs: [(&str, Option<Result<()>>); 2] = [
        (
            "churn.png",
            sweep
                .as_ref()
                .map(|sw| write_sweep_png(&cfg.dir.join("churn.png"), sw)),
        ),
        (
            "churn-max.png",
            churn
                .as_ref()
                .map(|c| write_churn_png(&cfg.dir.join("churn-max.png"), c)),
        ),
    ];
    for (name, r) in pngs {
        match r {
            Some(Ok(())) => note(&format!("wrote {}", cfg.dir.join(name).display())),
            Some(Err(e)) => note(&format!("{name} skipped: {e:#}")),
            None => {}
        }
    }
}

/// One bench at a time: two would load the same 2 cores, see each other's agents as foreign
/// tracers, and overwrite each other's files in target/bench/. The lock is released when the
/// returned file is dropped (or the process dies).
fn bench_lock(dir: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another `cargo xtask bench` is running ({}); two at once would measure each other. \
             Wait for it to finish.",
            if holder.trim().is_empty() {
                "pid unknown".to_string()
            } else {
                format!("pid {}", holder.trim())
            }
        );
    }
    let _ = f.set_len(0);
    let _ = fs::write(&path, std::process::id().to_string());
    Ok(f)
}

struct Settings {
    window: Duration,
    rounds: u32,
    clients: usize,
    keep_logs: bool,
    dir: PathBuf,
    agent: PathBuf,
    /// Added to every `portwatch run`.
    agent_args: Vec<std::ffi::OsString>,
    /// `--baseline`: the other build, and what its `run` takes.
    baseline: Option<PathBuf>,
    baseline_args: Vec<std::ffi::OsString>,
}

/// Options the bench adds to `portwatch run`, when this build of the agent has them:
/// `--no-log-file`, because as root the agent otherwise appends every record to
/// /var/log/portwatch (a bench would write gigabytes there and rotate away real records;
/// stdout carries the same lines); and a private `--runtime-dir`, so the bench neither takes
/// the host-wide single-instance lock from a real agent or the end-to-end tests, nor fails
/// because one of them holds it.
fn agent_args(agent: &Path, dir: &Path) -> Vec<std::ffi::OsString> {
    let help = Command::new(agent)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut v = Vec::new();
    if help.contains("--no-log-file") {
        v.push("--no-log-file".into());
    }
    if help.contains("--runtime-dir") {
        let run = dir.join("run");
        let _ = fs::create_dir_all(&run);
        v.push("--runtime-dir".into());
        v.push(run.into_os_string());
    }
    v
}

fn note(msg: &str) {
    eprintln!("[bench] {msg}");
}
