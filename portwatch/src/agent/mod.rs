//! `portwatch run`: the pipeline from the kernel to the log line.
//!
//! ring buffer --(drain task: decode only)--> bounded queue --(writer thread: enrich,
//! encode, write)--> stdout / log file. The drain never blocks on output: when the queue is
//! full the event is counted as lost by the agent and reported in a `lost` record.

mod rings;
mod sockdiag;

use portwatch_schema::AgentEvent;
use rings::{watch, LostCounter, Rings};
use sockdiag::diag_loop;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use portwatch_common::Event;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    cli::RunArgs,
    control,
    engines::docker,
    error::{Error, Result},
    heap,
    host::diag,
    kernel::btf,
    kernel::decode::{self, Clock},
    kernel::prereq,
    kernel::probes,
    output::metrics::{self, Metrics},
    output::sink::{self, Output},
    process::{self, AgentRecord, Msg, SnapshotBuilder, KINDS},
};

/// Bounded queue between the drain and the processing thread, in batches. Batches are as
/// large as what one wakeup finds, so most are small; a burst (20,000 conflicts with ten
/// attach clients) needs the depth: 256 batches lost events in that test.
const QUEUE: usize = 4096;

/// `--group`: a name from /etc/group, or a numeric gid.
fn resolve_group(g: &str) -> Result<u32> {
    if let Ok(n) = g.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(g) {
        Ok(Some(gr)) => Ok(gr.gid.as_raw()),
        _ => Err(Error::UnknownGroup(g.into())),
    }
}

/// The agent's nice value. Storms from any user, on a 2-core host, starved a
/// default-priority agent: with 50 processes failing binds in a loop, an unrelated conflict
/// reached the log 350 ms late (p99), 30 ms at this priority. auditd raises its own priority
/// for the same reason. Threads inherit it, so this runs before any is started.
const AGENT_NICE: i32 = -10;

fn boost_priority() {
    // SAFETY: setpriority on the calling thread (PRIO_PROCESS with 0); no memory involved.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) };
    if rc != 0 {
        eprintln!(
            "portwatch: warning: could not raise the agent's priority to nice {AGENT_NICE} ({}); \
             under a storm of other processes its records may come late",
            std::io::Error::last_os_error()
        );
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// What `run` checks and opens before loading anything. Each failure here is a start-up
/// error that says what to do, before any program is in the kernel.
struct Prepared {
    btf_path: std::path::PathBuf,
    tracefs: prereq::Tracefs,
    /// One agent per host: a second one would double every record and fight over the
    /// socket.
    _instance: control::InstanceLock,
    group: Option<u32>,
    log: Option<sink::LogFile>,
    metrics: Option<Arc<Metrics>>,
    control: tokio::net::UnixListener,
    host: String,
    docker_eps: Vec<docker::Endpoint>,
}

fn prepare(args: &RunArgs) -> Result<Prepared> {
    prereq::check_kernel()?;
    prereq::check_privileges()?;
    boost_priority();
    let btf_path = prereq::check_btf()?;
    let tracefs = prereq::ensure_tracefs()?;
    let instance = control::lock_instance(&args.runtime_dir)?;
    let group = args.group.as_deref().map(resolve_group).transpose()?;
    // An unwritable log path given at start is a configuration error; later failures (disk
    // full, directory removed) are counted and survived.
    let log = match args.log_path() {
        Some(p) => {
            let f = sink::open_log(&p)?;
            Some(sink::LogFile::new(p, f, args.log_max_size, args.log_keep))
        }
        None => None,
    };
    let metrics = match args.metrics_addr {
        Some(addr) => {
            let m = Arc::new(Metrics::new());
            metrics::serve(addr, m.clone()).map_err(|reason| Error::Metrics { addr, reason })?;
            Some(m)
        }
        None => None,
    };
    Ok(Prepared {
        btf_path,
        tracefs,
        _instance: instance,
        group,
        log,
        metrics,
        control: control::bind(&args.runtime_dir, group)?,
        host: args.host.clone().unwrap_or_else(hostname),
        docker_eps: if args.no_docker {
            Vec::new()
        } else {
            docker::endpoints(&args.docker_host)?
        },
    })
}

/// The kernel offsets from BTF (unless `--no-btf-offsets`), then the programs loaded and
/// attached. Also says what could not be resolved, and whether the programs read each
/// event's network namespace themselves.
fn load_probes(
    args: &RunArgs,
    prep: &Prepared,
) -> Result<(probes::Probes, Vec<btf::Unresolved>, bool)> {
    let (offsets, problems) = if args.no_btf_offsets {
        (
            portwatch_common::Offsets::default(),
            vec![btf::Unresolved("disabled by --no-btf-offsets".into())],
        )
    } else {
        btf::resolve(&prep.btf_path)
    };
    let netns_in_kernel = offsets.netns_ok == 1;
    let probes = probes::load(&probes::LoadConfig {
        tracefs: &prep.tracefs.path,
        offsets,
        all_events: args.all_events,
        ports: &args.ports,
        ringbuf_size: args.ringbuf_size,
        hooks: args.hooks,
    })?;
    Ok((probes, problems, netns_in_kernel))
}

/// `ready`, then a `degraded` record for each thing that did not come up as it should.
fn startup_records(
    args: &RunArgs,
    probes: &probes::Probes,
    tracefs_mounted: bool,
    netns_in_kernel: bool,
    problems: &[btf::Unresolved],
    started: Instant,
) -> Vec<AgentRecord> {
    let mut out = vec![AgentRecord {
        version: Some(env!("CARGO_PKG_VERSION").to_owned()),
        pid: Some(std::process::id()),
        mode: Some(if args.all_events { "all" } else { "default" }.to_owned()),
        hooks: Some(probes.family().0.name().to_owned()),
        hooks_why: probes.family().1.map(str::to_string),
        functions: (!probes.functions().is_empty()).then(|| probes.functions().to_vec()),
        programs: Some(probes.attached().iter().map(|p| (*p).to_owned()).collect()),
        ports: Some(args.ports.clone()),
        ringbuf_bytes: Some(args.ringbuf_size),
        netns_source: Some(if netns_in_kernel { "kernel" } else { "procfs" }.to_owned()),
        tracefs_mounted: Some(tracefs_mounted),
        startup_ms: Some(started.elapsed().as_millis() as u64),
        log_file: args.log_path().map(|p| p.display().to_string()),
        ..AgentRecord::new(AgentEvent::Ready)
    }];
    let degraded = |reason: String| AgentRecord {
        reason: Some(reason),
        ..AgentRecord::new(AgentEvent::Degraded)
    };
    if !problems.is_empty() {
        let reason = problems
            .iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let netns_note = if netns_in_kernel {
            ""
        } else {
            "; network namespaces are read from /proc/<pid>/ns/net instead (slower, and empty \
             for processes that already exited)"
        };
        out.push(degraded(format!(
            "kernel offsets unresolved: {reason}{netns_note}"
        )));
    }
    out.extend(probes.notes().iter().cloned().map(degraded));
    out
}

/// Docker: a thread and runtime per engine. Without a daemon each says so once and
/// retries; a slow daemon can delay container names, never the records themselves.
fn spawn_docker(
    eps: Vec<docker::Endpoint>,
    tx: &mpsc::Sender<Msg>,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    eps.into_iter()
        .map(|ep| {
            let (tx, stop) = (tx.clone(), stop.clone());
            spawn_named(
                "portwatch-docker",
                "starting the Docker thread",
                move || {
                    docker::run(ep, tx, stop);
                },
            )
        })
        .collect()
}

fn signals() -> Result<[tokio::signal::unix::Signal; 3]> {
    let install = |kind: SignalKind, what: &'static str| {
        signal(kind).map_err(|source| Error::Io { what, source })
    };
    Ok([
        install(SignalKind::interrupt(), "installing the SIGINT handler")?,
        install(SignalKind::terminate(), "installing the SIGTERM handler")?,
        install(SignalKind::hangup(), "installing the SIGHUP handler")?,
    ])
}

/// A named thread, or the start-up error that says which could not start.
fn spawn_named<T: Send + 'static>(
    name: &str,
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| Error::Io { what, source })
}

/// The threads `run` started, and the flags that stop them.
struct Threads {
    stopping: Arc<AtomicBool>,
    stop_diag: Arc<AtomicBool>,
    stop_docker: tokio::sync::watch::Sender<bool>,
    diag: std::thread::JoinHandle<()>,
    docker: Vec<std::thread::JoinHandle<()>>,
    writer: std::thread::JoinHandle<()>,
}

async fn shutdown(
    t: Threads,
    mut probes: probes::Probes,
    mut rings: Rings,
    mut lost: LostCounter,
    tx: mpsc::Sender<Msg>,
) {
    // Shutdown, bounded to well under a second whatever the backlog: the processing thread
    // is told at once, works on for STOP_GRACE and counts what is left (`unwritten` in
    // `stopped`); the ring buffer is drained for at most DRAIN_AT_STOP and what stays in it
    // is counted as lost; the sock_diag and Docker threads get JOIN_AT_STOP each (a dump
    // in progress is abandoned with the process).
    const JOIN_AT_STOP: Duration = Duration::from_millis(150);
    t.stopping.store(true, Ordering::Relaxed);
    t.stop_diag.store(true, Ordering::Relaxed);
    let _ = t.stop_docker.send(true);
    // Programs first, so that nothing reaches the ring buffer after its last drain: what
    // is in it then is everything, written or counted.
    probes.unload_programs();
    rings.drain_at_stop(&tx, &lost.agent).await;
    if let Some(m) = lost.check(&probes) {
        let _ = tx.send(m).await;
    }
    let _ = tokio::time::timeout(
        JOIN_AT_STOP,
        tokio::task::spawn_blocking(move || t.diag.join()),
    )
    .await;
    if !t.docker.is_empty() {
        let all = tokio::task::spawn_blocking(move || {
            for h in t.docker {
                let _ = h.join();
            }
        });
        let _ = tokio::time::timeout(JOIN_AT_STOP, all).await;
    }
    let _ = tx.send(Msg::Stop).await;
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || t.writer.join()).await;
    drop(rings);
    drop(probes);
}

/// sock_diag: the start-up snapshot of every namespace (holders that predate the agent),
/// then a reconciliation and TIME_WAIT summary every --tw-interval seconds. It runs on its
/// own thread: a dump of 100k sockets must not stall the ring-buffer drain. Returns once
/// the start-up pass is done.
async fn start_sock_diag(
    args: &RunArgs,
    tx: &mpsc::Sender<Msg>,
    fresh_rx: std::sync::mpsc::Receiver<process::FreshRequest>,
    stop: &Arc<AtomicBool>,
    tw_counts: Option<probes::TimeWaitCounts>,
) -> Result<std::thread::JoinHandle<()>> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let (tx, stop) = (tx.clone(), stop.clone());
    let interval = Duration::from_secs(args.tw_interval);
    let t = spawn_named(
        "portwatch-diag",
        "starting the sock_diag thread",
        move || {
            diag_loop(tx, fresh_rx, interval, stop, first_tx, tw_counts);
        },
    )?;
    let _ = first_rx.await;
    Ok(t)
}

pub async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    let prep = prepare(&args)?;
    let (mut probes, problems, netns_in_kernel) = load_probes(&args, &prep)?;
    let (ring, bulk) = probes.take_events()?;
    let tw_counts = probes.take_time_wait_counts();
    // Parsing BTF (ours and aya's) peaked at tens of MB, all freed by now.
    crate::heap::trim();

    let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
    let attach_clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let (fresh_tx, fresh_rx) = std::sync::mpsc::channel::<process::FreshRequest>();
    let cfg = process::Config {
        host: prep.host.clone(),
        all_events: args.all_events,
        netns_from_proc: !netns_in_kernel,
        pressure_pct: args.pressure_pct,
        top: 10,
        window_s: args.window.as_secs(),
        metrics: prep.metrics.clone(),
        attach_clients: attach_clients.clone(),
        fresh: fresh_tx,
        stopping: stopping.clone(),
    };
    let out = Output::new(prep.log);
    let writer = spawn_named(
        "portwatch-writer",
        "starting the processing thread",
        move || {
            process::run(rx, out, cfg, started);
        },
    )?;

    let stop_diag = Arc::new(AtomicBool::new(false));
    let diag_thread = start_sock_diag(&args, &tx, fresh_rx, &stop_diag, tw_counts).await?;

    // Before `ready`: a supervisor (or a test) that signals the agent as soon as it says it
    // is ready must reach these handlers, not the default action, which for SIGHUP and
    // SIGTERM ends the process without its `stopped` record.
    let signals = signals()?;
    let records = startup_records(
        &args,
        &probes,
        prep.tracefs.mounted_by_us,
        netns_in_kernel,
        &problems,
        started,
    );
    for r in records {
        // The writer only stops after Stop, so this cannot fail before then.
        let _ = tx.send(Msg::Agent(Box::new(r))).await;
    }

    // Docker and the control socket after `ready`, so that stays the first line.
    let (stop_docker, stop_docker_rx) = tokio::sync::watch::channel(false);
    let docker_threads = spawn_docker(prep.docker_eps, &tx, &stop_docker_rx)?;
    tokio::spawn(control::serve(prep.control, tx.clone(), prep.group));

    let mut rings = Rings::new(ring, bulk)?;
    let mut lost = LostCounter::default();
    let [mut sigint, mut sigterm, mut sighup] = signals;
    watch(
        &args,
        &mut probes,
        &mut rings,
        &mut lost,
        &tx,
        &attach_clients,
        [&mut sigint, &mut sigterm, &mut sighup],
    )
    .await?;

    shutdown(
        Threads {
            stopping,
            stop_diag,
            stop_docker,
            diag: diag_thread,
            docker: docker_threads,
            writer,
        },
        probes,
        rings,
        lost,
        tx,
    )
    .await;
    Ok(())
}
