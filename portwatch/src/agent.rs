//! `portwatch run`: the pipeline from the kernel to the log line.
//!
//! ring buffer --(drain task: decode only)--> bounded queue --(writer thread: enrich,
//! encode, write)--> stdout / log file. The drain never blocks on output: when the queue is
//! full the event is counted as lost by the agent and reported in a `lost` record.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use portwatch_common::{kind, Event, Kind};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    btf,
    cli::RunArgs,
    decode::{self, Clock},
    enrich::ProcCache,
    error::{Error, Result},
    prereq, probes,
    record::{self, Header},
    sink::{self, Output},
};

const QUEUE: usize = 65_536;
const KINDS: usize = kind::COUNT as usize;

/// What the writer thread receives.
enum Msg {
    Event(Box<Event>),
    Agent(AgentRecord),
    Lost {
        kernel: [u64; KINDS],
        agent: [u64; KINDS],
    },
    Stop,
}

/// `type: "agent"`: lifecycle of the agent itself.
#[derive(Debug, Serialize, Default)]
pub struct AgentRecord {
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programs: Option<Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ringbuf_bytes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracefs_mounted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_write_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_s: Option<f64>,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    h: Header<'a>,
    #[serde(flatten)]
    body: T,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

pub async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    prereq::check_privileges()?;
    let btf_path = prereq::check_btf()?;
    let tracefs = prereq::ensure_tracefs()?;
    let log = match &args.log_file {
        Some(p) => Some((p.clone(), sink::open_log(p)?)),
        None => None,
    };
    let host = args.host.clone().unwrap_or_else(hostname);

    let (offsets, problems) = if args.no_btf_offsets {
        (
            portwatch_common::Offsets::default(),
            vec![btf::Unresolved("disabled by --no-btf-offsets".into())],
        )
    } else {
        btf::resolve(&btf_path)
    };
    let netns_in_kernel = offsets.netns_ok == 1;

    let mut probes = probes::load(&probes::LoadConfig {
        tracefs: &tracefs.path,
        offsets,
        all_events: args.all_events,
        ports: &args.ports,
        ringbuf_size: args.ringbuf_size,
    })?;
    let ring = probes.take_events()?;

    let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
    let agent_lost: Arc<[AtomicU64; KINDS]> = Arc::new(Default::default());

    let writer = {
        let host = host.clone();
        let all = args.all_events;
        std::thread::Builder::new()
            .name("portwatch-writer".into())
            .spawn(move || writer_loop(rx, Output::new(log), host, all, !netns_in_kernel, started))
            .map_err(|source| Error::Io {
                what: "starting the writer thread",
                source,
            })?
    };

    let send = |m: Msg| {
        let tx = tx.clone();
        async move {
            // The writer only stops after Stop, so this cannot fail before then.
            let _ = tx.send(m).await;
        }
    };

    send(Msg::Agent(AgentRecord {
        event: "ready",
        version: Some(env!("CARGO_PKG_VERSION")),
        pid: Some(std::process::id()),
        mode: Some(if args.all_events { "all" } else { "default" }),
        programs: Some(probes::PROGRAMS.iter().map(|p| p.0).collect()),
        ports: Some(args.ports.clone()),
        ringbuf_bytes: Some(args.ringbuf_size),
        netns_source: Some(if netns_in_kernel { "kernel" } else { "procfs" }),
        tracefs_mounted: Some(tracefs.mounted_by_us),
        startup_ms: Some(started.elapsed().as_millis() as u64),
        log_file: args.log_file.clone(),
        ..Default::default()
    }))
    .await;
    if !problems.is_empty() {
        let reason = problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let netns_note = if netns_in_kernel {
            ""
        } else {
            "; network namespaces are read from /proc/<pid>/ns/net instead (slower, and empty \
             for processes that already exited)"
        };
        send(Msg::Agent(AgentRecord {
            event: "degraded",
            reason: Some(format!("kernel offsets unresolved: {reason}{netns_note}")),
            ..Default::default()
        }))
        .await;
    }

    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| Error::Io {
        what: "installing the SIGINT handler",
        source,
    })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| Error::Io {
        what: "installing the SIGTERM handler",
        source,
    })?;

    // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it, and it is
    // only used for readiness (epoll), never read or closed behind tokio's back.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::Io {
            what: "registering the ring buffer with the event loop",
            source: e.into_parts().1,
        })?;

    let mut lost_tick = tokio::time::interval(Duration::from_millis(args.lost_interval_ms));
    lost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_kernel = [0u64; KINDS];
    let mut last_agent = [0u64; KINDS];

    let mut check_lost = |probes: &probes::Probes| -> Option<Msg> {
        let k = probes.lost_counts();
        let a: [u64; KINDS] = std::array::from_fn(|i| agent_lost[i].load(Ordering::Relaxed));
        let dk: [u64; KINDS] = std::array::from_fn(|i| k[i] - last_kernel[i]);
        let da: [u64; KINDS] = std::array::from_fn(|i| a[i] - last_agent[i]);
        last_kernel = k;
        last_agent = a;
        (dk.iter().chain(da.iter()).any(|&x| x > 0)).then_some(Msg::Lost {
            kernel: dk,
            agent: da,
        })
    };

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(|source| Error::Io { what: "waiting on the ring buffer", source })?;
                drain(guard.get_inner_mut(), &tx, &agent_lost);
                guard.clear_ready();
            }
            _ = lost_tick.tick() => {
                if let Some(m) = check_lost(&probes) { send(m).await; }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }

    // Shutdown: take what is still in the ring buffer, account for losses, then stop.
    drain(ring.get_mut(), &tx, &agent_lost);
    if let Some(m) = check_lost(&probes) {
        send(m).await;
    }
    send(Msg::Stop).await;
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    drop(ring);
    drop(probes); // detaches every program
    Ok(())
}

/// Decode only; never block. A full queue is counted, not waited on.
fn drain(ring: &mut RingBuf<MapData>, tx: &mpsc::Sender<Msg>, agent_lost: &[AtomicU64; KINDS]) {
    while let Some(item) = ring.next() {
        let Some(e) = decode::event_from_bytes(&item) else {
            continue;
        };
        drop(item);
        let k = (e.kind as usize).min(KINDS - 1);
        if tx.try_send(Msg::Event(Box::new(e))).is_err() {
            agent_lost[k].fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Writer {
    out: Output,
    host: String,
    all: bool,
    netns_from_proc: bool,
    clock: Clock,
    procs: ProcCache,
    buf: Vec<u8>,
    lost_total: u64,
    unknown_kinds: u64,
}

impl Writer {
    fn emit<T: Serialize>(&mut self, v: &T) {
        self.buf.clear();
        if serde_json::to_writer(&mut self.buf, v).is_ok() {
            self.buf.push(b'\n');
            self.out.write_line(&self.buf);
        }
    }

    fn event(&mut self, e: &Event) {
        let Ok(k) = Kind::try_from(e.kind) else {
            self.unknown_kinds += 1;
            return;
        };
        let conflict = record::is_conflict(e, k);
        if !conflict && !self.all {
            if k == Kind::Exit {
                self.procs.forget(e.pid);
            }
            return;
        }
        let wall = self.clock.wall_ns(e.ts_ns);
        let host = std::mem::take(&mut self.host);
        let netns = if e.netns == 0 && self.netns_from_proc && e.pid != 0 {
            self.procs.netns(e.pid)
        } else {
            e.netns
        };
        let comm = decode::comm(&e.comm);
        let cmdline = if k == Kind::TcpState {
            None
        } else {
            self.procs.cmdline(e.pid, e.tid, &comm)
        };
        match k {
            _ if conflict => {
                let r =
                    record::conflict(Header::new("conflict", &host, wall), e, k, netns, cmdline);
                self.emit(&r);
            }
            Kind::Bind | Kind::Listen | Kind::Connect | Kind::Close => {
                let r = record::sock_op(Header::new(k.name(), &host, wall), e, netns, cmdline);
                self.emit(&r);
            }
            Kind::Exit => {
                let r = record::Exit {
                    h: Header::new("exit", &host, wall),
                    netns,
                    actor: record::Actor::from_event(e, cmdline),
                };
                self.emit(&r);
                self.procs.forget(e.pid);
            }
            Kind::TcpState => {
                let r = record::tcp_state(Header::new("tcp_state", &host, wall), e);
                self.emit(&r);
            }
        }
        self.host = host;
    }

    fn lost(&mut self, kernel: [u64; KINDS], agent: [u64; KINDS]) {
        let mut by_kind = BTreeMap::new();
        for kd in Kind::ALL {
            let i = kd.raw() as usize;
            let n = kernel[i] + agent[i];
            if n > 0 {
                by_kind.insert(kd.name(), n);
            }
        }
        let k: u64 = kernel.iter().sum();
        let a: u64 = agent.iter().sum();
        self.lost_total += k + a;
        let host = std::mem::take(&mut self.host);
        let r = record::Lost {
            h: Header::new("lost", &host, Clock::now_wall_ns()),
            count: k + a,
            kernel: k,
            agent: a,
            by_kind,
            total: self.lost_total,
        };
        self.emit(&r);
        self.host = host;
    }

    fn agent(&mut self, r: AgentRecord) {
        let host = std::mem::take(&mut self.host);
        let line = Line {
            h: Header::new("agent", &host, Clock::now_wall_ns()),
            body: r,
        };
        self.emit(&line);
        self.host = host;
    }
}

fn writer_loop(
    mut rx: mpsc::Receiver<Msg>,
    out: Output,
    host: String,
    all: bool,
    netns_from_proc: bool,
    started: Instant,
) {
    let mut w = Writer {
        out,
        host,
        all,
        netns_from_proc,
        clock: Clock::now(),
        procs: ProcCache::new("/proc", 4096),
        buf: Vec::with_capacity(1024),
        lost_total: 0,
        unknown_kinds: 0,
    };
    let mut since_clock = 0u32;
    while let Some(m) = rx.blocking_recv() {
        match m {
            Msg::Event(e) => {
                // Re-read the monotonic/wall offset now and then: NTP slews the wall clock.
                since_clock += 1;
                if since_clock >= 10_000 {
                    w.clock = Clock::now();
                    since_clock = 0;
                }
                w.event(&e);
            }
            Msg::Agent(r) => w.agent(r),
            Msg::Lost { kernel, agent } => w.lost(kernel, agent),
            Msg::Stop => {
                let r = AgentRecord {
                    event: "stopped",
                    records: Some(w.out.lines),
                    lost_total: Some(w.lost_total),
                    log_write_errors: Some(w.out.file_errors),
                    uptime_s: Some((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
                    ..Default::default()
                };
                w.agent(r);
                break;
            }
        }
    }
}
