//! `portwatch run`: the pipeline from the kernel to the log line.
//!
//! ring buffer --(drain task: decode only)--> bounded queue --(writer thread: enrich,
//! encode, write)--> stdout / log file. The drain never blocks on output: when the queue is
//! full the event is counted as lost by the agent and reported in a `lost` record.

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
/// Largest batch: one queue slot carries up to this many events.
const BATCH: usize = 256;
/// How often events submitted without a wakeup are collected.
const DRAIN_MS: u64 = 50;
/// Queue slots the storm ring leaves free: at most 64 of its batches (a few ms of work)
/// wait ahead of a
/// prompt event.
const BULK_ROOM: usize = QUEUE - 64;

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
        event: "ready",
        version: Some(env!("CARGO_PKG_VERSION")),
        pid: Some(std::process::id()),
        mode: Some(if args.all_events { "all" } else { "default" }),
        hooks: Some(probes.family().0.name()),
        hooks_why: probes.family().1.map(str::to_string),
        functions: (!probes.functions().is_empty()).then(|| probes.functions().to_vec()),
        programs: Some(probes.attached().to_vec()),
        ports: Some(args.ports.clone()),
        ringbuf_bytes: Some(args.ringbuf_size),
        netns_source: Some(if netns_in_kernel { "kernel" } else { "procfs" }),
        tracefs_mounted: Some(tracefs_mounted),
        startup_ms: Some(started.elapsed().as_millis() as u64),
        log_file: args.log_path(),
        ..Default::default()
    }];
    let degraded = |reason: String| AgentRecord {
        event: "degraded",
        reason: Some(reason),
        ..Default::default()
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

/// Events lost since the last `lost` record: the kernel's (ring buffer full, or runs the
/// kernel skipped) and the agent's (queue full).
struct LostCounter {
    agent: Arc<[AtomicU64; KINDS]>,
    last_kernel: [u64; KINDS],
    last_agent: [u64; KINDS],
}

impl LostCounter {
    fn check(&mut self, probes: &probes::Probes) -> Option<Msg> {
        let full = probes.lost_counts();
        let skipped = probes.skipped_counts();
        let k: [u64; KINDS] = std::array::from_fn(|i| full[i] + skipped[i]);
        let a: [u64; KINDS] = std::array::from_fn(|i| self.agent[i].load(Ordering::Relaxed));
        let dk: [u64; KINDS] = std::array::from_fn(|i| k[i].saturating_sub(self.last_kernel[i]));
        let da: [u64; KINDS] = std::array::from_fn(|i| a[i] - self.last_agent[i]);
        self.last_kernel = k;
        self.last_agent = a;
        (dk.iter().chain(da.iter()).any(|&x| x > 0)).then_some(Msg::Lost {
            kernel: dk,
            agent: da,
        })
    }
}

/// The two ring buffers (prompt events, and the storm ring read with most of the queue
/// kept free) and the batches being gathered from each.
struct Rings {
    ring: AsyncFd<RingBuf<MapData>>,
    bulk: RingBuf<MapData>,
    scratch: Vec<Event>,
    bulk_scratch: Vec<Event>,
    /// The storm ring still held events when its last drain stopped.
    bulk_left: bool,
}

impl Rings {
    fn drain_bulk(&mut self, tx: &mpsc::Sender<Msg>) {
        self.bulk_left = drain(&mut self.bulk, tx, &mut self.bulk_scratch, BULK_ROOM);
    }

    fn drain_both(&mut self, tx: &mpsc::Sender<Msg>) {
        drain(self.ring.get_mut(), tx, &mut self.scratch, 0);
        self.drain_bulk(tx);
    }

    /// At stop, after the programs are gone: everything left goes to the processing thread
    /// within DRAIN_AT_STOP, and what cannot is counted as lost, never silent.
    async fn drain_at_stop(&mut self, tx: &mpsc::Sender<Msg>, lost: &[AtomicU64; KINDS]) {
        const DRAIN_AT_STOP: Duration = Duration::from_millis(200);
        let give_up = tokio::time::Instant::now() + DRAIN_AT_STOP;
        while drain(self.ring.get_mut(), tx, &mut self.scratch, 0)
            | drain(&mut self.bulk, tx, &mut self.bulk_scratch, 0)
        {
            if tokio::time::Instant::now() >= give_up {
                let lose = |ev: &Event| {
                    lost[(ev.kind as usize).min(KINDS - 1)].fetch_add(1, Ordering::Relaxed);
                };
                self.scratch
                    .drain(..)
                    .chain(self.bulk_scratch.drain(..))
                    .for_each(|ev| lose(&ev));
                for r in [self.ring.get_mut(), &mut self.bulk] {
                    while let Some(item) = r.next() {
                        if let Some(ev) = decode::event_from_bytes(&item) {
                            lose(&ev);
                        }
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
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

/// The event loop: drain the rings (on wakeup, and every DRAIN_MS for events submitted
/// without one), count losses, turn the state hook on while clients are attached, reopen
/// the log on SIGHUP; returns on SIGINT or SIGTERM.
async fn watch(
    args: &RunArgs,
    probes: &mut probes::Probes,
    rings: &mut Rings,
    lost: &mut LostCounter,
    tx: &mpsc::Sender<Msg>,
    attach_clients: &std::sync::atomic::AtomicUsize,
    signals: [&mut tokio::signal::unix::Signal; 3],
) -> Result<()> {
    let mut lost_tick = tokio::time::interval(Duration::from_millis(args.lost_interval_ms));
    lost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Events that need no prompt handling are submitted without a wakeup (see the kernel
    // side's emit()); this tick collects them.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(DRAIN_MS));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state_hook_failed = false;
    let [sigint, sigterm, sighup] = signals;
    loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                rings.drain_both(tx);
                // Coalescing windows and held conflicts are timed on the processing thread;
                // a full queue means it is busy, and the next tick will do.
                let _ = tx.try_send(Msg::Tick);
                // Default mode: TCP state changes only while someone attached wants the
                // live detail (see probes::load).
                if !args.all_events && !state_hook_failed {
                    let want = attach_clients.load(Ordering::Relaxed) > 0;
                    if let Err(e) = probes.set_state_hook(want) {
                        eprintln!(
                            "portwatch: warning: attaching clients get no tcp_state records: {e}"
                        );
                        state_hook_failed = true;
                    }
                }
            }
            guard = rings.ring.readable_mut() => {
                let mut guard = guard.map_err(|source| Error::Io { what: "waiting on the ring buffer", source })?;
                drain(guard.get_inner_mut(), tx, &mut rings.scratch, 0);
                guard.clear_ready();
                // Field by field: the guard still borrows the prompt ring.
                rings.bulk_left = drain(&mut rings.bulk, tx, &mut rings.bulk_scratch, BULK_ROOM);
            }
            _ = tokio::time::sleep(Duration::from_millis(1)), if rings.bulk_left => {
                rings.drain_bulk(tx);
            }
            _ = lost_tick.tick() => {
                if let Some(m) = lost.check(probes) { let _ = tx.send(m).await; }
            }
            _ = sighup.recv() => { let _ = tx.send(Msg::Reopen).await; }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
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

pub async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    let prep = prepare(&args)?;
    let (offsets, problems) = if args.no_btf_offsets {
        (
            portwatch_common::Offsets::default(),
            vec![btf::Unresolved("disabled by --no-btf-offsets".into())],
        )
    } else {
        btf::resolve(&prep.btf_path)
    };
    let netns_in_kernel = offsets.netns_ok == 1;
    let mut probes = probes::load(&probes::LoadConfig {
        tracefs: &prep.tracefs.path,
        offsets,
        all_events: args.all_events,
        ports: &args.ports,
        ringbuf_size: args.ringbuf_size,
        hooks: args.hooks,
    })?;
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

    // sock_diag: the start-up snapshot of every namespace (holders that predate the agent),
    // then a reconciliation and TIME_WAIT summary every --tw-interval seconds. It runs on
    // its own thread: a dump of 100k sockets must not stall the ring-buffer drain.
    let stop_diag = Arc::new(AtomicBool::new(false));
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let diag_thread = {
        let (tx, stop) = (tx.clone(), stop_diag.clone());
        let interval = Duration::from_secs(args.tw_interval);
        spawn_named(
            "portwatch-diag",
            "starting the sock_diag thread",
            move || {
                diag_loop(tx, fresh_rx, interval, stop, first_tx, tw_counts);
            },
        )?
    };
    let _ = first_rx.await;

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

    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it, and it is
    // only used for readiness (epoll), never read or closed behind tokio's back.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::Io {
            what: "registering the ring buffer with the event loop",
            source: e.into_parts().1,
        })?;
    let mut rings = Rings {
        ring,
        bulk,
        scratch: Vec::new(),
        bulk_scratch: Vec::new(),
        bulk_left: false,
    };
    let mut lost = LostCounter {
        agent: Arc::new(Default::default()),
        last_kernel: [0; KINDS],
        last_agent: [0; KINDS],
    };
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

/// Decode only; never block. Events go to the processing thread in batches (one wakeup of
/// that thread per batch, not per event). When its queue is full, draining stops and the
/// rest waits in the kernel's ring buffer (several MB) until the next drain: a burst of
/// conflicts, each woken on its own and so each a tiny batch, would otherwise overflow the
/// queue long before the ring. Only a full ring loses events, and the kernel counts those
/// exactly. Returns true when events were left behind for that reason.
///
/// `keep_free`: stop (returning true) while fewer queue slots than that are free. The
/// storm ring is read with most of the queue kept free, so that its backlog waits in the
/// kernel rather than in front of the next prompt event, and read again a millisecond later.
fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<Msg>,
    scratch: &mut Vec<Event>,
    keep_free: usize,
) -> bool {
    // Events are gathered in `scratch` (kept across calls) and each batch is sent as an
    // exact-size copy: most wakeups find a few events, and a full-size buffer per wakeup
    // made every queued batch cost 32 KiB whatever it held. While the processing thread is
    // busy with a large reconciliation the queue fills up with them (8 MB of mostly empty
    // batches at the heap's peak in a soak), all freed again moments later.
    // A batch the queue refused stays in `scratch` and goes first next time.
    let flush = |batch: &mut Vec<Event>| -> bool {
        if batch.is_empty() {
            return true;
        }
        match tx.try_send(Msg::Events(batch.as_slice().to_vec())) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                batch.clear();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    };
    if scratch.len() >= BATCH && !flush(scratch) {
        return true;
    }
    loop {
        if tx.capacity() < keep_free {
            return true;
        }
        let Some(item) = ring.next() else {
            break;
        };
        let Some(e) = decode::event_from_bytes(&item) else {
            continue;
        };
        drop(item);
        if scratch.capacity() == 0 {
            scratch.reserve_exact(BATCH);
        }
        scratch.push(e);
        if scratch.len() >= BATCH && !flush(scratch) {
            return true;
        }
    }
    !flush(scratch)
}

fn diag_loop(
    tx: mpsc::Sender<Msg>,
    requests: std::sync::mpsc::Receiver<process::FreshRequest>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    first: tokio::sync::oneshot::Sender<()>,
    tw_counts: Option<probes::TimeWaitCounts>,
) {
    let mut last_dump: std::collections::HashMap<u32, Instant> = Default::default();
    let mut first = Some(first);
    loop {
        if first.is_none() {
            // The last pass's snapshots were reconciled and freed seconds ago: give the pages
            // back before this pass allocates again.
            heap::trim();
        }
        let wall_ns = Clock::now_wall_ns();
        // Start-up waits for this pass, so it may use every core; later passes run beside
        // the host's own work and take one.
        let threads = if first.is_some() {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        } else {
            1
        };
        let owners = Arc::new(diag::socket_owners_on(threads));
        let namespaces = diag::namespaces();
        let live: Vec<u32> = namespaces.iter().map(|n| n.inode).collect();
        for ns in namespaces {
            // The snapshot is built here, off the processing thread, as the dump is read. It is
            // stamped when this namespace's dump begins, not the pass: the pass first scans
            // every process's fds, which on a slow host takes long enough that TIME_WAIT
            // ages measured against the pass's start counted sockets in two records.
            let builder = SnapshotBuilder::new(
                ns.inode,
                owners.clone(),
                first.is_none(),
                Clock::now_wall_ns(),
            );
            let builder = match diag::dump_into(&ns, builder) {
                Ok(b) => b,
                // Its last process just exited: the namespace is gone, nothing to report.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    eprintln!("portwatch: warning: {e}; the port table may miss that namespace");
                    continue;
                }
            };
            let port_range = diag::local_port_range(&ns).ok();
            let mut snap = builder.finish(ns, port_range);
            snap.owners_ns = wall_ns;
            snap.tw_events = tw_counts.as_ref().map(|c| c.get(snap.ns.inode));
            if tx.blocking_send(Msg::Snapshot(Box::new(snap))).is_err() {
                return;
            }
        }
        if tx
            .blocking_send(Msg::Namespaces {
                live,
                as_of: wall_ns,
            })
            .is_err()
        {
            return;
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match requests.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => {
                    if !serve_fresh(r, &requests, &tx, &mut last_dump, &stop) {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Dumps of one namespace for conflicts are at least this far apart: a storm of conflicts in
/// a namespace costs at most this many dumps a second, however many ask.
const FRESH_MIN_GAP: Duration = Duration::from_millis(250);

/// Serve re-read requests: everything queued is merged per namespace first, then each
/// namespace is dumped once (waiting out FRESH_MIN_GAP since its last dump). Returns false
/// when the processing thread is gone.
fn serve_fresh(
    first: process::FreshRequest,
    requests: &std::sync::mpsc::Receiver<process::FreshRequest>,
    tx: &mpsc::Sender<Msg>,
    last_dump: &mut std::collections::HashMap<u32, Instant>,
    stop: &AtomicBool,
) -> bool {
    let mut queue: Vec<process::FreshRequest> = vec![first];
    let merge = |queue: &mut Vec<process::FreshRequest>, r: process::FreshRequest| match queue
        .iter_mut()
        .find(|q| q.ns.inode == r.ns.inode)
    {
        Some(q) => q.merge(r),
        None => queue.push(r),
    };
    while let Ok(r) = requests.try_recv() {
        merge(&mut queue, r);
    }
    while !queue.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        // The namespace whose gap is over first.
        let ready_at = |r: &process::FreshRequest| {
            last_dump
                .get(&r.ns.inode)
                .map_or_else(Instant::now, |t| *t + FRESH_MIN_GAP)
        };
        let (i, at) = queue
            .iter()
            .enumerate()
            .map(|(i, r)| (i, ready_at(r)))
            .min_by_key(|(_, at)| *at)
            .expect("queue is not empty");
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            while let Ok(r) = requests.try_recv() {
                merge(&mut queue, r);
            }
            continue;
        }
        let r = queue.swap_remove(i);
        last_dump.insert(r.ns.inode, Instant::now());
        let fresh = fresh_read(r);
        if tx.blocking_send(Msg::Fresh(Box::new(fresh))).is_err() {
            return false;
        }
        while let Ok(r) = requests.try_recv() {
            merge(&mut queue, r);
        }
    }
    true
}

/// One re-read: the namespace's sockets (with owners when asked) and the port counts.
fn fresh_read(r: process::FreshRequest) -> process::Fresh {
    let as_of = Clock::now_wall_ns();
    let netns = r.ns.inode;
    let dumped = diag::dump_with_range(&r.ns)
        .map(|d| (r.ns, d))
        .or_else(|first| {
            // The thread whose path was given may be gone; the namespace may not be. The inode
            // is checked on the way in, so a reused path cannot lead elsewhere.
            match r.alt {
                Some(path) => {
                    let alt = diag::Namespace { inode: netns, path };
                    diag::dump_with_range(&alt).map(|d| (alt, d))
                }
                None => Err(first),
            }
        });
    let (ns, (entries, range)) = match dumped {
        Ok(x) => x,
        Err(e) => {
            return process::Fresh {
                netns,
                as_of,
                result: Err(format!("sock_diag dump failed: {e}")),
            }
        }
    };
    let counts = process::count_toward(&entries, &r.dsts);
    let no_source = r
        .dsts
        .iter()
        .filter(|d| diag::source_available(&ns, **d).ok() == Some(false))
        .copied()
        .collect();
    let snapshot = r.sockets.then(|| {
        // Owners of sockets the table did not know: one /proc walk, only on this miss path.
        let owners = Arc::new(diag::socket_owners());
        Box::new(process::Snapshot::new(
            ns, &entries, owners, None, false, as_of,
        ))
    });
    process::Fresh {
        netns,
        as_of,
        result: Ok(process::FreshData {
            snapshot,
            counts,
            range,
            no_source,
        }),
    }
}
