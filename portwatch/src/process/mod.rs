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
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

mod conflicts;
mod engines;
mod output;
mod reachability;
mod services;
mod snapshot;
mod time_wait;

pub use snapshot::{Snapshot, SnapshotBuilder};
use snapshot::{TwCounts, DEFAULT_PORT_RANGE};

use crate::{
    control::protocol::{Filter, PortRow, Query},
    engines::containers::{self, Container, DockerMsg, Index, StartError},
    host::diag,
    host::enrich::ProcCache,
    kernel::decode::{self, Clock},
    output::keys::{Keyed, Keys},
    output::metrics::Metrics,
    output::record::{self, Header},
    output::sink::{LogEvent, Output},
    state::burst::{Bursts, Span, Verdict},
    state::service::{self, Services},
    state::table::{self, Attempt, Entry, Owner, Placement, PortTable, Proto},
};

/// How long a failed docker-proxy/dockerd bind waits for the daemon to say which container
/// failed to start. The daemon's event for it comes within milliseconds.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

pub const KINDS: usize = kind::COUNT as usize;

/// What the processing thread receives.
pub enum Msg {
    /// A batch of kernel events, in ring-buffer order.
    Events(Vec<Event>),
    Agent(Box<AgentRecord>),
    Lost {
        kernel: [u64; KINDS],
        agent: [u64; KINDS],
    },
    /// One namespace's sockets from sock_diag, for reconciliation and TIME_WAIT records.
    Snapshot(Box<Snapshot>),
    /// From the control socket: attach, ports, status, published.
    Control(Query),
    /// SIGHUP: reopen the log file.
    Reopen,
    /// From the Docker thread: the container index and lifecycle.
    Docker(DockerMsg),
    /// From the sock_diag thread: a namespace re-read that conflicts asked for.
    Fresh(Box<Fresh>),
    /// A tenth of a second passed: close coalescing windows, release held records.
    Tick,
    /// The sock_diag thread's pass that began at `as_of` (wall ns) found these namespaces:
    /// any other is gone.
    Namespaces {
        live: Vec<u32>,
        as_of: i128,
    },
    Stop,
}

impl From<Query> for Msg {
    fn from(q: Query) -> Self {
        Msg::Control(q)
    }
}

impl From<DockerMsg> for Msg {
    fn from(m: DockerMsg) -> Self {
        Msg::Docker(m)
    }
}

/// A namespace re-read asked for by the processing thread (`Processor::request`). The
/// sock_diag thread serves these, so no dump or /proc walk runs on the processing thread;
/// requests for one namespace that arrive while one is queued are merged into it.
#[derive(Debug)]
pub struct FreshRequest {
    pub ns: diag::Namespace,
    /// Another way into the same namespace (the path the agent last read it by), for when
    /// `ns` is a thread's path and the thread has exited before the re-read: a client that
    /// fails and exits at once is the common case.
    pub alt: Option<PathBuf>,
    /// Destinations to count local ports toward (connect `EADDRNOTAVAIL`).
    pub dsts: Vec<SocketAddr>,
    /// Also rebuild the namespace's sockets with their owners (a conflict whose holder the
    /// table does not know); needs a walk of /proc.
    pub sockets: bool,
}

impl FreshRequest {
    /// A re-read of a namespace's sockets, with their owners.
    pub fn sockets_of(ns: diag::Namespace) -> FreshRequest {
        FreshRequest {
            ns,
            alt: None,
            dsts: Vec::new(),
            sockets: true,
        }
    }

    pub fn merge(&mut self, other: FreshRequest) {
        for d in other.dsts {
            if !self.dsts.contains(&d) {
                self.dsts.push(d);
            }
        }
        self.sockets |= other.sockets;
        if self.alt.is_none() {
            self.alt = other.alt;
        }
    }
}

/// The answer to a `FreshRequest`.
pub struct Fresh {
    pub netns: u32,
    /// Wall-clock ns when the dump was taken: what the counts describe.
    pub as_of: i128,
    /// `Err`: why the namespace could not be read (it may be gone).
    pub result: std::result::Result<FreshData, String>,
}

pub struct FreshData {
    pub snapshot: Option<Box<Snapshot>>,
    /// (destination, in use, TIME_WAIT) for each requested destination.
    pub counts: Vec<(SocketAddr, u32, u32)>,
    pub range: Option<(u16, u16)>,
    /// Destinations the namespace has no source address for (`diag::source_available`).
    pub no_source: Vec<SocketAddr>,
}

/// Count the local TCP ports toward each destination, from a dump.
pub fn count_toward(
    entries: &[diag::SockEntry],
    dsts: &[SocketAddr],
) -> Vec<(SocketAddr, u32, u32)> {
    let mut out: Vec<(SocketAddr, u32, u32)> = dsts.iter().map(|d| (*d, 0, 0)).collect();
    for s in entries {
        if s.proto != diag::Proto::Tcp {
            continue;
        }
        if let Some(c) = out.iter_mut().find(|c| c.0 == s.remote) {
            if s.state == table::TCP_TIME_WAIT {
                c.2 += 1;
            } else {
                c.1 += 1;
            }
        }
    }
    out
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
    /// `ready`: the hook family attached, `trampoline` or `tracepoint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<&'static str>,
    /// `ready`: why `--hooks auto` fell back to the tracepoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks_why: Option<String>,
    /// `ready`: the kernel functions the trampoline programs are on, as program@function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
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
    pub table_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_write_errors: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift_healed: Option<u64>,
    /// `stopped`: records not written because the agent was stopping with a backlog.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unwritten: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_records: Option<u64>,
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

impl<T: Serialize + Keyed> Keyed for Line<'_, T> {
    fn keys(&self) -> Keys {
        Keys {
            ty: self.h.ty,
            ..self.body.keys()
        }
    }
}

impl Keyed for AgentRecord {
    fn keys(&self) -> Keys {
        Keys::of("agent")
    }
}

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

/// Where a socket's owner stands in Docker: a published port held by docker-proxy/dockerd
/// for a container, or a process inside a container.
fn place(docker: &mut Index, netns: u32, x: &Entry) -> Option<Placement> {
    let owner = x.owner.as_ref();
    if let Some(via) = owner.and_then(|o| containers::docker_binder(&o.comm)) {
        if netns == docker.host_netns() {
            let (ip, port) = (x.local.ip(), x.local.port());
            if let Some((c, p)) = docker.publisher(x.proto, ip, port) {
                return Some(Placement {
                    container: Some(c.r.clone()),
                    via: Some(via),
                    container_port: Some(p.container_port),
                    stale: false,
                });
            }
            // A binder holding a published port that no container the engines know runs
            // or starts with: left behind by a daemon that died or lost track (moby#20486,
            // #36591). Only said while an engine is connected, which knows every container;
            // the podman CLI only passes the socket on, so it is never the one left.
            if via != "podman" && docker.connected() && !docker.claims(x.proto, ip, port) {
                let cip = owner
                    .and_then(|o| o.cmdline.as_deref())
                    .and_then(|c| containers::proxy_args(c).0);
                return Some(Placement {
                    container: cip.and_then(|ip| docker.by_ip(ip)).map(|c| c.r.clone()),
                    via: Some(via),
                    container_port: None,
                    stale: true,
                });
            }
        }
    }
    let c = docker.container_of(owner.map_or(0, |o| o.pid), netns, 0)?;
    Some(Placement {
        container: Some(c.r.clone()),
        via: None,
        container_port: None,
        stale: false,
    })
}

/// connect `EADDRNOTAVAIL`: how many local ports toward the destination were taken (in use
/// or TIME_WAIT) when its namespace was re-read, against the namespace's
/// ip_local_port_range. `destination.as_of` says when: the counts describe the dump, taken
/// after the failure, not the failure's own moment.
fn apply_counts(r: &mut record::Conflict<'_>, e: &Event, f: &Freshness) {
    let dst = SocketAddr::new(decode::ip(e.family, &e.raddr), e.rport);
    let Some((in_use, tw, range, as_of)) = f.counts else {
        if let Some(why) = &f.failed {
            r.reason = Some(format!(
                "local ports toward {dst} could not be counted: {why}"
            ));
        }
        return;
    };
    r.destination = Some(record::Destination {
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
            r.cause = "address_unavailable";
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
    fn owner_of(&mut self, e: &Event) -> Arc<Owner> {
        let comm = decode::comm(&e.comm);
        let cmdline = self.procs.cmdline(e.pid, e.tid, &comm);
        self.table.owner(e.pid, &comm, cmdline, e.uid)
    }

    /// Keep the port table current from one kernel event.
    fn update_table(&mut self, e: &Event, k: Kind, netns: u32, wall: i128) {
        let local = SocketAddr::new(decode::ip(e.family, &e.addr), e.port);
        let remote = SocketAddr::new(decode::ip(e.family, &e.raddr), e.rport);
        let entry = |state: u8, owner: Option<Arc<Owner>>, proto: Proto| Entry {
            proto,
            local: local.into(),
            remote: remote.into(),
            state,
            inode: 0,
            sk: e.sk,
            owner,
            since_ns: wall as i64,
            v6only: None,
        };
        match k {
            Kind::Bind if e.ret == 0 => {
                if let Some(p) = proto_of(e.proto) {
                    let o = self.owner_of(e);
                    self.table
                        .on_bind(netns, entry(table::TCP_CLOSE, Some(o.clone()), p));
                    // A UDP socket bound to an explicit port serves on it; port 0 asks the
                    // kernel for an ephemeral one, which is a client's.
                    if p == Proto::Udp && e.port != 0 {
                        self.service_open(netns, p, local, e, o, wall);
                    }
                }
            }
            Kind::Listen if e.ret == 0 => {
                let o = self.owner_of(e);
                self.table
                    .on_listen(netns, entry(table::TCP_LISTEN, Some(o.clone()), Proto::Tcp));
                if e.port != 0 {
                    self.service_open(netns, Proto::Tcp, local, e, o, wall);
                }
            }
            Kind::Close => {
                if let Some(p) = proto_of(e.proto) {
                    self.table.on_close(netns, p, e.port, e.sk, e.pid);
                    self.services.close(netns, p, e.port, e.sk, e.pid, wall);
                }
            }
            Kind::Exit => {
                // Its sockets close after this event, and a child may share them: a re-read
                // of each namespace where it served (on the sock_diag thread) decides.
                for ns in self.services.namespaces_of(e.pid) {
                    self.request(ns, e, None, true);
                }
                self.table.on_exit(e.pid);
                self.recent_exits.push_back((e.pid, wall));
                while self.recent_exits.len() > 4096
                    || self
                        .recent_exits
                        .front()
                        .is_some_and(|(_, t)| wall - t > 30_000_000_000)
                {
                    self.recent_exits.pop_front();
                }
                self.procs.forget(e.pid);
                self.docker.forget_pid(e.pid);
            }
            Kind::TcpState => {
                let (old, new) = (e.old_state as u8, e.new_state as u8);
                let en = entry(table::TCP_TIME_WAIT, None, Proto::Tcp);
                self.table.on_tcp_state(netns, &en, old, new);
            }
            _ => {}
        }
    }

    /// Drop what the table and the trackers keep about namespaces that are gone.
    fn prune(&mut self, live: &[u32], as_of: i128) {
        let live: std::collections::HashSet<u32> = live.iter().copied().collect();
        let dropped = self.table.prune_namespaces(&live, as_of);
        for ns in dropped {
            self.services.check(ns, as_of, &|_, _| false);
        }
        self.ns_paths.retain(|n, _| live.contains(n));
        self.port_ranges.retain(|n, _| live.contains(n));
        self.last_counts.retain(|(n, _), _| live.contains(n));
    }

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

    /// Whether an event would have produced a log record (for the shutdown count).
    fn would_write(&self, e: &Event) -> bool {
        match Kind::try_from(e.kind) {
            Ok(k) => self.cfg.all_events || record::is_conflict(e, k),
            Err(_) => false,
        }
    }

    fn event(&mut self, e: &Event) {
        let Ok(k) = Kind::try_from(e.kind) else {
            self.unknown_kinds += 1;
            return;
        };
        let wall = self.clock.wall_ns(e.ts_ns);
        let netns = if e.netns == 0 && self.cfg.netns_from_proc && e.pid != 0 && k != Kind::TcpState
        {
            self.procs.netns(e.pid)
        } else {
            e.netns
        };
        self.update_table(e, k, netns, wall);
        if record::is_conflict(e, k) {
            self.conflict(e, k, netns, wall);
            return;
        }
        self.push_window(WinItem::Raw(wall, *e, netns));
        let live = !self.subs.is_empty();
        if !self.cfg.all_events && !live {
            return;
        }
        let Some(keys) = self.format_verbose(e, k, netns, wall, live) else {
            return;
        };
        if self.cfg.all_events {
            let buf = std::mem::take(&mut self.buf);
            self.out.write_line(&buf);
            self.buf = buf;
            if let Some(m) = &self.cfg.metrics {
                m.record_type(k.name());
            }
        }
        if live {
            let line: Arc<[u8]> = Arc::from(&self.buf[..]);
            self.publish(&line, &keys);
        }
    }

    /// Encode a verbose (bind, listen, connect, close, exit, tcp_state) record into buf, and
    /// say its keys (only when `keyed`: they are for attached clients, and `--all-events`
    /// alone should not pay for them); None if it could not be encoded.
    fn format_verbose(
        &mut self,
        e: &Event,
        k: Kind,
        netns: u32,
        wall: i128,
        keyed: bool,
    ) -> Option<Keys> {
        let keys_of = |r: &dyn Keyed| if keyed { r.keys() } else { Keys::default() };
        let host = std::mem::take(&mut self.cfg.host);
        self.buf.clear();
        let keys = match k {
            Kind::Bind | Kind::Listen | Kind::Connect | Kind::Close => {
                let comm = decode::comm(&e.comm);
                let cmdline = self.procs.cmdline(e.pid, e.tid, &comm);
                let mut r = record::sock_op(Header::new(k.name(), &host, wall), e, netns, cmdline);
                r.actor.container = self.container_ref(e, netns);
                serde_json::to_writer(&mut self.buf, &r)
                    .is_ok()
                    .then(|| keys_of(&r))
            }
            Kind::Exit => {
                let mut actor = record::Actor::from_event(e, None);
                actor.container = self.container_ref(e, netns);
                let r = record::Exit {
                    h: Header::new("exit", &host, wall),
                    netns,
                    actor,
                };
                serde_json::to_writer(&mut self.buf, &r)
                    .is_ok()
                    .then(|| keys_of(&r))
            }
            Kind::TcpState => {
                let ts = self.ts_cache.format(wall);
                record::write_tcp_state(&mut self.buf, ts, &self.host_json, e);
                Some(if keyed {
                    Keys::of_event(e, k, None)
                } else {
                    Keys::default()
                })
            }
        };
        self.cfg.host = host;
        self.buf.push(b'\n');
        if keys.is_none() {
            self.failed_encodes += 1;
        }
        keys
    }

    /// A control-socket request, answered on the channel it carries.
    fn query(&mut self, q: Query) {
        match q {
            Query::Attach {
                filter,
                since_s,
                live,
                replay,
            } => {
                self.recheck_reach(filter.port);
                self.attach(filter, since_s, live, replay);
            }
            Query::Ports { filter, reply } => {
                let _ = reply.send(self.ports(&filter));
                self.recheck_reach(filter.port);
            }
            Query::Published { port, reply } => {
                let _ = reply.send(self.published_answer(port));
            }
            Query::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    fn ports(&mut self, filter: &Filter) -> Vec<PortRow> {
        let docker = &mut self.docker;
        crate::control::rows::table_rows(&self.table, filter, &mut |ns, e| place(docker, ns, e))
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "table_size": self.table.len(),
            "records": self.out.lines,
            "lost_total": self.lost_total,
            "log_write_errors": self.out.log_errors(),
            "attached": self.subs.len(),
            "drift_healed": self.table.drift_healed,
            "last_reconcile": {
                "sockets": self.last_reconcile.0,
                "ms": self.last_reconcile.1.as_secs_f64() * 1000.0,
            },
            "rss_kb": std::fs::read_to_string("/proc/self/status").ok().and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            }),
            // Against rss_kb: RSS growing while heap.in_use_kb stays flat is the allocator
            // holding freed memory, not a collection growing.
            "heap": crate::heap::usage(),
            "window": { "items": self.window.len(), "bytes": self.window_bytes },
            // Failures being coalesced, and conflicts waiting for a namespace re-read.
            "bursts": { "active": self.bursts.len(), "absorbed": self.bursts.held() },
            "held_conflicts": self.held.len(),
            "services": { "open": self.services.len(), "restarts_coalesced": self.services.coalesced },
            "unknown_kinds": self.unknown_kinds,
            "failed_encodes": self.failed_encodes,
        })
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
        let host = std::mem::take(&mut self.cfg.host);
        let r = record::Lost {
            h: Header::new("lost", &host, Clock::now_wall_ns()),
            count: k + a,
            kernel: k,
            agent: a,
            by_kind,
            total: self.lost_total,
        };
        self.emit(&r);
        self.cfg.host = host;
    }
}

trait Counted {
    fn count(&self) -> u64;
}

#[derive(Serialize)]
struct PortCount {
    port: u16,
    count: u64,
}
impl Counted for PortCount {
    fn count(&self) -> u64 {
        self.count
    }
}

#[derive(Serialize)]
struct RemoteCount {
    addr: IpAddr,
    port: u16,
    count: u64,
}
impl Counted for RemoteCount {
    fn count(&self) -> u64 {
        self.count
    }
}

/// The `n` largest, largest first; the record stays bounded however many ports there are.
fn top_n<T: Counted>(it: impl Iterator<Item = T>, n: usize) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.count()));
    v.truncate(n);
    v
}

#[derive(Serialize)]
struct Busiest {
    addr: IpAddr,
    port: u16,
    in_use: u64,
    pct: f64,
}

#[derive(Serialize)]
struct Ephemeral {
    range: [u16; 2],
    busiest: Option<Busiest>,
}

/// `type: "time_wait"`.
#[derive(Serialize)]
struct TimeWait {
    netns: u32,
    total: u64,
    entered: u64,
    expired: u64,
    /// What counted `entered` and `expired`: `events` (the kernel's TIME_WAIT hooks, exact)
    /// or `dumps` (derived from two sock_diag dumps and the sockets' timers). `total` is
    /// always the dump's.
    counted_by: &'static str,
    by_local_port: Vec<PortCount>,
    by_remote: Vec<RemoteCount>,
    ephemeral: Ephemeral,
}

impl Keyed for TimeWait {
    fn keys(&self) -> Keys {
        Keys {
            netns: self.netns,
            total: self.total,
            ..Keys::of("time_wait")
        }
    }
}

/// `type: "pressure"`.
#[derive(Serialize)]
struct Pressure {
    netns: u32,
    addr: IpAddr,
    port: u16,
    in_use: u64,
    range: [u16; 2],
    pct: f64,
    threshold_pct: f64,
    hint: String,
}

impl Keyed for Pressure {
    fn keys(&self) -> Keys {
        Keys {
            ports: vec![self.port],
            netns: self.netns,
            ..Keys::of("pressure")
        }
    }
}

pub fn run(mut rx: mpsc::Receiver<Msg>, out: Output, cfg: Config, started: Instant) {
    let host_json = serde_json::to_vec(&cfg.host).unwrap_or_else(|_| b"\"\"".to_vec());
    let mut p = Processor {
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
    };
    let mut since_clock = 0u32;
    while let Some(m) = rx.blocking_recv() {
        match m {
            Msg::Events(batch) => {
                // Re-read the monotonic/wall offset now and then: NTP slews the wall clock.
                since_clock += batch.len() as u32;
                if since_clock >= 10_000 {
                    p.clock = Clock::now();
                    since_clock = 0;
                }
                if p.cfg.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                    let seen = *p.stop_seen.get_or_insert_with(Instant::now);
                    if seen.elapsed() >= STOP_GRACE {
                        // Shutdown is bounded: the rest is counted, not processed.
                        p.unwritten += batch.iter().filter(|e| p.would_write(e)).count() as u64;
                        continue;
                    }
                }
                for e in &batch {
                    p.event(e);
                }
            }
            Msg::Fresh(f) => p.fresh(*f),
            Msg::Namespaces { live, as_of } => p.prune(&live, as_of),
            Msg::Tick => {
                p.reach_tick();
                p.flush_services(false);
                p.flush_bursts(false);
                p.flush_pending(false);
            }
            Msg::Agent(mut r) => {
                if r.event == "ready" {
                    r.table_size = Some(p.table.len());
                    r.namespaces = Some(p.ns_paths.len());
                }
                let ready = r.event == "ready";
                p.emit_line("agent", Clock::now_wall_ns(), *r);
                if ready && !p.ready_sent {
                    p.ready_sent = true;
                    p.open_existing(None, Clock::now_wall_ns());
                }
            }
            Msg::Lost { kernel, agent } => p.lost(kernel, agent),
            Msg::Snapshot(mut s) => {
                let big = s.len() >= crate::heap::TRIM_AFTER_SOCKETS;
                p.snapshot(&mut s);
                // The replaced entries and the snapshot are freed now: give them back.
                drop(s);
                if big {
                    crate::heap::trim();
                }
            }
            Msg::Control(q) => p.query(q),
            Msg::Reopen => {
                // What came before the signal belongs to the old file.
                p.flush();
                if let Some(l) = &mut p.out.log {
                    l.reopen();
                    // The new file's first line says why it starts here; it also tells a
                    // log rotator the agent has let go of the old one.
                    let r = AgentRecord {
                        event: "log_reopened",
                        log_file: Some(l.path().to_path_buf()),
                        ..Default::default()
                    };
                    p.emit_line("agent", Clock::now_wall_ns(), r);
                }
            }
            Msg::Docker(m) => p.docker_msg(m),
            Msg::Stop => {
                // What coalescing and re-reads still hold is written now, as it stands.
                p.flush_bursts(true);
                p.flush_pending(true);
                p.flush_services(true);
                // Everything before the stop is written first, so the counts below are final.
                p.flush();
                let r = AgentRecord {
                    event: "stopped",
                    records: Some(p.out.lines),
                    lost_total: Some(p.lost_total),
                    log_write_errors: Some(p.out.log_errors()),
                    drift_healed: Some(p.table.drift_healed),
                    unwritten: Some(p.unwritten),
                    uptime_s: Some((started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0),
                    ..Default::default()
                };
                p.emit_line("agent", Clock::now_wall_ns(), r);
                p.flush();
                break;
            }
        }
        p.flush();
    }
}

#[cfg(test)]
mod tests;
