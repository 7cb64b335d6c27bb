//! The processing stage (one thread): keeps the port table current from kernel events and
//! sock_diag snapshots, attributes conflicts, writes records, and summarises TIME_WAIT.
//!
//! It receives everything over one bounded queue, in order, so the table and the records
//! always agree. Nothing here runs on the ring-buffer drain.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use portwatch_common::{kind, Event, Kind, IPPROTO_TCP, IPPROTO_UDP};
use portwatch_schema::{AgentEvent, Body, Cause, DockerEvent, Op, Text};
use tokio::sync::{mpsc, oneshot};

mod conflicts;
mod engines;
mod events;
#[cfg(test)]
mod golden;
mod msg;
mod output;
mod queries;
mod reachability;
mod records;
mod services;
mod snapshot;
mod time_wait;

pub use msg::{count_toward, Fresh, FreshData, FreshRequest, Msg, KINDS};
use queries::place;
use records::top_n;
pub use records::AgentRecord;

pub use snapshot::{Snapshot, SnapshotBuilder};
use snapshot::{TwCounts, DEFAULT_PORT_RANGE};

use crate::{
    control::protocol::{Filter, PortRow, Query},
    engines::containers::{self, Container, DockerMsg, Index, PortMap, StartError},
    host::diag,
    host::enrich::ProcCache,
    kernel::decode::{self, Clock},
    output::keys::Keys,
    output::metrics::Metrics,
    output::record::{self, Record},
    output::sink::{LogEvent, Output},
    state::burst::{Bursts, Span, Verdict},
    state::service::{self, Services},
    state::table::{self, Attempt, Entry, Owner, Placement, PortTable, Proto},
};

/// How long a failed docker-proxy/dockerd bind waits for the daemon to say which container
/// failed to start. The daemon's event for it comes within milliseconds.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

pub struct Config {
    pub host: String,
    pub all_events: bool,
    pub netns_from_proc: bool,
    pub pressure_pct: f64,
    pub top: usize,
    /// How far back `attach` can replay.
    pub window_s: u64,
    pub metrics: Option<Arc<Metrics>>,
    /// Clients attached to the control socket, kept current here: the event loop attaches
    /// the TCP state hook while there are any (default mode).
    pub attach_clients: Arc<std::sync::atomic::AtomicUsize>,
    /// Namespace re-reads go to the sock_diag thread through this.
    pub fresh: std::sync::mpsc::Sender<FreshRequest>,
    /// Set on SIGTERM: past `STOP_GRACE`, queued events are counted, not processed.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// How long after SIGTERM queued events are still processed. Whatever is left after it is
/// counted in the `stopped` record (`unwritten`) instead, so shutdown stays within a second
/// however large the backlog.
const STOP_GRACE: Duration = Duration::from_millis(400);

/// How long a conflict waits for the re-read of its namespace before it is written with
/// what the table knows.
const FRESH_WAIT: Duration = Duration::from_secs(2);

/// Most items the recent-past window holds, whatever its age, and most bytes: memory stays
/// bounded on a busy host (a soak run showed 65,536 conflict lines alone take ~50 MB).
const WINDOW_ITEMS: usize = 65_536;
const WINDOW_BYTES: usize = 8 << 20;

/// The recent past, for `attach`. Records that were logged are kept as their lines; verbose
/// kernel events (logged only with --all-events) are kept raw and formatted on replay, so
/// keeping them costs no JSON encoding on the hot path.
#[derive(Clone)]
enum WinItem {
    Line(i128, Arc<[u8]>, Arc<Keys>),
    Raw(i128, Event, u32),
}

impl WinItem {
    fn wall(&self) -> i128 {
        match self {
            WinItem::Line(w, ..) | WinItem::Raw(w, ..) => *w,
        }
    }

    /// Approximate heap and slot cost, for the window's byte bound.
    fn cost(&self) -> usize {
        match self {
            WinItem::Line(_, l, k) => {
                l.len()
                    + 64
                    + std::mem::size_of::<Keys>()
                    + k.ports.len() * 2
                    + k.pids.len() * 4
                    + k.containers.len() * 64
            }
            WinItem::Raw(..) => std::mem::size_of::<WinItem>(),
        }
    }
}

struct Sub {
    filter: Filter,
    tx: mpsc::Sender<Arc<[u8]>>,
    /// Records this client could not take because it was not reading fast enough.
    missed: u64,
    closed: bool,
}

/// Per-namespace TIME_WAIT bookkeeping between two `time_wait` records.
#[derive(Default)]
struct TwState {
    last_total: u64,
    /// The kernel's cumulative (created, destroyed) at the previous record, with hooks.
    last_events: Option<(u64, u64)>,
    /// When the dump behind `last_total` was taken (wall ns); None before the first record.
    last_wall_ns: Option<i128>,
    pressured: std::collections::HashSet<(IpAddr, u16)>,
}

struct Processor {
    out: Output,
    cfg: Config,
    clock: Clock,
    procs: ProcCache,
    table: PortTable,
    ns_paths: HashMap<u32, PathBuf>,
    tw: HashMap<u32, TwState>,
    buf: Vec<u8>,
    /// Timestamps and `cfg.host` as a JSON string (it never changes), kept for the tcp_state
    /// fast path (`--all-events`).
    ts_cache: decode::TsCache,
    host_json: Vec<u8>,
    /// `cfg.host`, shared by every record.
    host: Text,
    lost_total: u64,
    unknown_kinds: u64,
    /// Records serde could not encode (none expected; counted, shown in `status`).
    failed_encodes: u64,
    window: std::collections::VecDeque<WinItem>,
    window_bytes: usize,
    subs: Vec<Sub>,
    started: Instant,
    /// Sockets in, and duration of, the last sock_diag reconciliation of one namespace.
    last_reconcile: (usize, std::time::Duration),
    docker: Index,
    /// Failed docker-proxy/dockerd binds waiting for the daemon to name their container.
    pending: Vec<PendingBind>,
    /// Start failures with EADDRINUSE the daemon reported, in case its report arrives
    /// before the kernel's.
    recent_in_use: Vec<(Arc<Container>, IpAddr, u16, Instant)>,
    /// Identical failures coalesced into one record per second (see `burst`).
    bursts: Bursts,
    /// Conflicts waiting for their namespace's re-read (`Msg::Fresh`).
    held: Vec<Held>,
    /// Namespaces with a re-read requested and not answered yet.
    in_flight: HashMap<u32, Instant>,
    /// When SIGTERM was first seen here.
    stop_seen: Option<Instant>,
    /// Records not written because the agent was stopping (counted in `stopped`).
    unwritten: u64,
    /// Service ports held now, for `port` records.
    services: Services,
    /// Each namespace's ip_local_port_range, as its last dump read it.
    port_ranges: HashMap<u32, (u16, u16)>,
    /// `docker_publish` conflicts written lately, to write each refused start once.
    recent_published: Vec<(String, IpAddr, u16, Instant)>,
    /// The `ready` record is out.
    ready_sent: bool,
    /// Processes that exited lately (pid, wall ns of the exit), oldest first: a dump taken
    /// before an exit but applied after it must not bring the process's sockets back.
    recent_exits: std::collections::VecDeque<(u32, i128)>,
    /// The last port counts taken toward each (namespace, destination), for a connect
    /// conflict that can no longer wait for its own (the agent is stopping).
    last_counts: HashMap<(u32, SocketAddr), (PortCounts, bool)>,
    /// Containers whose published ports are to be checked for a listener: (full id, when).
    reach_due: Vec<(Box<str>, Instant)>,
    /// Containers waiting for a re-read of their namespace before that check.
    reach_wait: Vec<(Box<str>, u32)>,
    /// Published ports found unreachable: (full id, proto, host port), written once until
    /// they heal.
    unreachable: std::collections::HashSet<(Box<str>, Proto, u16)>,
    /// Events since the monotonic/wall offset was last re-read.
    since_clock: u32,
}

/// How long after a container starts its published ports are checked: its service needs a
/// moment to listen.
const REACH_DELAY: Duration = Duration::from_secs(3);

/// A conflict waiting for a re-read of its namespace.
struct Held {
    c: Pending,
    publishing: Option<(Arc<Container>, &'static str)>,
    deadline: Instant,
}

/// A conflict's facts, as the processing thread first saw them.
#[derive(Clone)]
struct Pending {
    e: Event,
    k: Kind,
    netns: u32,
    wall: i128,
    cmdline: Option<Arc<str>>,
    span: Span,
}

/// Local ports toward a destination: in use, TIME_WAIT, the namespace's ephemeral range,
/// and when (wall ns) they were counted.
type PortCounts = (u32, u32, Option<(u16, u16)>, i128);

/// What a re-read of the namespace added to a conflict.
#[derive(Default)]
struct Freshness {
    /// connect `EADDRNOTAVAIL`: the counts toward its destination and when they were taken.
    counts: Option<PortCounts>,
    /// connect `EADDRNOTAVAIL`: the namespace has no source address for the destination.
    no_source: bool,
    /// Why no re-read could be had.
    failed: Option<String>,
}

struct PendingBind {
    e: Event,
    k: Kind,
    netns: u32,
    wall: i128,
    cmdline: Option<Arc<str>>,
    via: &'static str,
    deadline: Instant,
    span: Span,
}

/// connect `EADDRNOTAVAIL`: how many local ports toward the destination were taken (in use
/// or TIME_WAIT) when its namespace was re-read, against the namespace's
/// ip_local_port_range. `destination.as_of` says when: the counts describe the dump, taken
/// after the failure, not the failure's own moment.
fn apply_counts(r: &mut portwatch_schema::Conflict, e: &Event, f: &Freshness) {
    let dst = SocketAddr::new(decode::ip(e.family, &e.raddr), e.rport);
    let Some((in_use, tw, range, as_of)) = f.counts else {
        if let Some(why) = &f.failed {
            r.reason = Some(format!(
                "local ports toward {dst} could not be counted: {why}"
            ));
        }
        return;
    };
    r.destination = Some(portwatch_schema::Destination {
        addr: dst.ip(),
        port: dst.port(),
        in_use,
        time_wait: tw,
        range: range.map(|(a, b)| [a, b]),
        as_of: Some(decode::rfc3339(as_of)),
    });
    if let Some((lo, hi)) = range {
        let n = u32::from(hi.saturating_sub(lo)) + 1;
        // EADDRNOTAVAIL also means "no such local address". The counts cannot tell (they are
        // taken after the failure, when the connections may be gone); whether the namespace
        // has a source address for the destination can.
        if f.no_source {
            r.cause = Cause::AddressUnavailable;
            r.hint = format!(
                "connect to {dst} failed with EADDRNOTAVAIL, but only {} of {n} local ports \
                 ({lo}-{hi}) toward it are taken: this is not port exhaustion. The namespace \
                 has no usable source address for it (an address not configured, e.g. ::1 or \
                 a removed IP); check `ip addr` in that namespace",
                in_use + tw
            );
            return;
        }
        r.hint = format!(
            "{} of {n} local ports ({lo}-{hi}) toward {dst} are taken ({in_use} in use, {tw} in \
             TIME_WAIT); widen net.ipv4.ip_local_port_range, reuse connections, or spread \
             load over more destination addresses",
            in_use + tw
        );
    }
}

fn proto_of(p: u16) -> Option<Proto> {
    match p {
        IPPROTO_TCP => Some(Proto::Tcp),
        IPPROTO_UDP => Some(Proto::Udp),
        _ => None,
    }
}

impl Processor {
    fn port_range(&self, netns: u32) -> (u16, u16) {
        self.port_ranges
            .get(&netns)
            .copied()
            .unwrap_or(DEFAULT_PORT_RANGE)
    }

    /// Where to enter a namespace for a fresh sock_diag dump.
    fn ns_path(&self, netns: u32, e: &Event) -> Option<diag::Namespace> {
        // The actor's thread was in that namespace a moment ago (it may have setns'd on its
        // own): the surest way in. A cached path may lead to a namespace that died and
        // whose inode number was given to this one.
        let p = PathBuf::from(format!("/proc/{}/task/{}/ns/net", e.pid, e.tid));
        if e.pid != 0 && p.exists() {
            return Some(diag::Namespace {
                inode: netns,
                path: p,
            });
        }
        self.ns_paths.get(&netns).map(|p| diag::Namespace {
            inode: netns,
            path: p.clone(),
        })
    }

    /// Ask the sock_diag thread to re-read a namespace: with `dst`, to count local ports
    /// toward it; with `sockets`, to rebuild the table's view of it with owners. At most one
    /// request per namespace is outstanding; the thread merges what arrives meanwhile and
    /// rate-limits dumps per namespace, so a storm of conflicts is not a storm of dumps.
    /// Returns false when no request can be made (no way into the namespace).
    fn request(&mut self, netns: u32, e: &Event, dst: Option<SocketAddr>, sockets: bool) -> bool {
        let Some(ns) = self.ns_path(netns, e) else {
            return false;
        };
        let alt = self
            .ns_paths
            .get(&netns)
            .filter(|p| **p != ns.path)
            .cloned();
        let req = FreshRequest {
            ns,
            alt,
            dsts: dst.into_iter().collect(),
            sockets,
        };
        if self.cfg.fresh.send(req).is_err() {
            return false;
        }
        self.in_flight.entry(netns).or_insert_with(Instant::now);
        true
    }
}

/// The processing thread: messages in queue order, each handled to completion and its
/// records written before the next.
pub fn run(mut rx: mpsc::Receiver<Msg>, out: Output, cfg: Config, started: Instant) {
    let mut p = Processor::new(out, cfg, started);
    while let Some(m) = rx.blocking_recv() {
        let go_on = p.handle(m);
        p.flush();
        if !go_on {
            break;
        }
    }
}

impl Processor {
    fn new(out: Output, cfg: Config, started: Instant) -> Processor {
        let host_json = serde_json::to_vec(&cfg.host).unwrap_or_else(|_| b"\"\"".to_vec());
        let host = Text::copy(&cfg.host);
        Processor {
            out,
            cfg,
            clock: Clock::now(),
            procs: ProcCache::new("/proc", 4096),
            table: PortTable::default(),
            ns_paths: HashMap::new(),
            tw: HashMap::new(),
            buf: Vec::with_capacity(1024),
            ts_cache: decode::TsCache::default(),
            host_json,
            host,
            lost_total: 0,
            unknown_kinds: 0,
            failed_encodes: 0,
            window: std::collections::VecDeque::new(),
            window_bytes: 0,
            subs: Vec::new(),
            started,
            last_reconcile: (0, std::time::Duration::ZERO),
            docker: Index::new(
                std::fs::metadata("/proc/self/ns/net")
                    .ok()
                    .and_then(|m| u32::try_from(m.ino()).ok())
                    .unwrap_or(0),
                "/proc",
            ),
            pending: Vec::new(),
            recent_in_use: Vec::new(),
            bursts: Bursts::default(),
            held: Vec::new(),
            in_flight: HashMap::new(),
            stop_seen: None,
            unwritten: 0,
            services: Services::default(),
            port_ranges: HashMap::new(),
            recent_published: Vec::new(),
            ready_sent: false,
            recent_exits: std::collections::VecDeque::new(),
            last_counts: HashMap::new(),
            reach_due: Vec::new(),
            reach_wait: Vec::new(),
            unreachable: std::collections::HashSet::new(),
            since_clock: 0,
        }
    }

    /// One message, dispatched to the stage that owns it. False after `Stop`.
    fn handle(&mut self, m: Msg) -> bool {
        match m {
            Msg::Events(batch) => self.events(&batch),
            Msg::Fresh(f) => self.fresh(*f),
            Msg::Namespaces { live, as_of } => self.prune(&live, as_of),
            Msg::Tick => {
                self.reach_tick();
                self.flush_services(false);
                self.flush_bursts(false);
                self.flush_pending(false);
            }
            Msg::Agent(r) => self.agent_record(*r),
            Msg::Lost { kernel, agent } => self.lost(kernel, agent),
            Msg::Snapshot(mut s) => {
                let big = s.len() >= crate::heap::TRIM_AFTER_SOCKETS;
                self.snapshot(&mut s);
                // The replaced entries and the snapshot are freed now: give them back.
                drop(s);
                if big {
                    crate::heap::trim();
                }
            }
            Msg::Control(q) => self.query(q),
            Msg::Reopen => self.reopen(),
            Msg::Docker(m) => self.docker_msg(m),
            Msg::Stop => {
                self.stop();
                return false;
            }
        }
        true
    }

    /// A batch of kernel events, unless the agent has been stopping for longer than
    /// STOP_GRACE: then they are only counted.
    fn events(&mut self, batch: &[Event]) {
        // Re-read the monotonic/wall offset now and then: NTP slews the wall clock.
        self.since_clock += batch.len() as u32;
        if self.since_clock >= 10_000 {
            self.clock = Clock::now();
            self.since_clock = 0;
        }
        if self.cfg.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let seen = *self.stop_seen.get_or_insert_with(Instant::now);
            if seen.elapsed() >= STOP_GRACE {
                // Shutdown is bounded: the rest is counted, not processed.
                self.unwritten += batch.iter().filter(|e| self.would_write(e)).count() as u64;
                return;
            }
        }
        for e in batch {
            self.event(e);
        }
    }

    fn agent_record(&mut self, mut r: AgentRecord) {
        let ready = r.event == AgentEvent::Ready;
        if ready {
            r.table_size = Some(self.table.len() as u64);
            r.namespaces = Some(self.ns_paths.len() as u64);
        }
        self.emit_body(Clock::now_wall_ns(), Body::Agent(r));
        if ready && !self.ready_sent {
            self.ready_sent = true;
            self.open_existing(None, Clock::now_wall_ns());
        }
    }

    /// SIGHUP: the log file is reopened, and its first line says why.
    fn reopen(&mut self) {
        // What came before the signal belongs to the old file.
        self.flush();
        if let Some(l) = &mut self.out.log {
            l.reopen();
            // The new file's first line says why it starts here; it also tells a log
            // rotator the agent has let go of the old one.
            let r = AgentRecord {
                log_file: Some(l.path().display().to_string()),
                ..AgentRecord::new(AgentEvent::LogReopened)
            };
            self.emit_body(Clock::now_wall_ns(), Body::Agent(r));
        }
    }

    /// `Stop`: what coalescing and re-reads still hold is written as it stands, then the
    /// `stopped` record with the final counts.
    fn stop(&mut self) {
        self.flush_bursts(true);
        self.flush_pending(true);
        self.flush_services(true);
        // Everything before the stop is written first, so the counts below are final.
        self.flush();
        let r = AgentRecord {
            records: Some(self.out.lines),
            lost_total: Some(self.lost_total),
            log_write_errors: Some(self.out.log_errors()),
            stdout_write_errors: Some(self.out.stdout_errors),
            drift_healed: Some(self.table.drift_healed),
            unwritten: Some(self.unwritten),
            uptime_s: Some((self.started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
            ..AgentRecord::new(AgentEvent::Stopped)
        };
        self.emit_body(Clock::now_wall_ns(), Body::Agent(r));
    }
}

#[cfg(test)]
mod tests;
