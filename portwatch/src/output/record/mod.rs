//! Record schema v1: one JSON object per line. Names here are a contract with users'
//! scripts: add fields freely, never rename. Documented in docs/schema.md.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use portwatch_common::{Event, Kind};
pub use portwatch_schema::{Cause, Op};
use serde::Serialize;

use crate::{
    engines::containers::{CgroupMode, Container, ContainerRef, Network, PortMap},
    kernel::decode::{self, errno_name, family_name, ip, proto_name, tcp_state_name},
};

pub const SCHEMA_VERSION: u8 = 1;

/// Fields every record has.
#[derive(Debug, Serialize)]
pub struct Header<'a> {
    pub v: u8,
    pub ts: String,
    #[serde(rename = "type")]
    pub ty: &'static str,
    pub host: &'a str,
}

impl<'a> Header<'a> {
    pub fn new(ty: &'static str, host: &'a str, wall_ns: i128) -> Self {
        Header {
            v: SCHEMA_VERSION,
            ts: decode::rfc3339(wall_ns),
            ty,
            host,
        }
    }
}

/// The process that made the syscall.
#[derive(Debug, Serialize)]
pub struct Actor<'a> {
    pub pid: u32,
    pub tid: u32,
    pub comm: Cow<'a, str>,
    pub uid: u32,
    /// null when the process was gone (or its pid reused) before it could be read.
    pub cmdline: Option<Arc<str>>,
    pub cgroup_id: u64,
    /// The container it runs in; for docker-proxy/dockerd (`via`), the container whose
    /// port it was publishing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Arc<ContainerRef>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
}

impl<'a> Actor<'a> {
    pub fn from_event(e: &'a Event, cmdline: Option<Arc<str>>) -> Self {
        Actor {
            pid: e.pid,
            tid: e.tid,
            comm: decode::comm(&e.comm),
            uid: e.uid,
            cmdline,
            cgroup_id: e.cgroup_id,
            container: None,
            via: None,
        }
    }
}

/// connect() found no free local port toward this destination.
#[derive(Debug, Serialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    /// Local ports toward it in a non-TIME_WAIT state.
    pub in_use: u32,
    pub time_wait: u32,
    /// The namespace's net.ipv4.ip_local_port_range.
    pub range: Option<[u16; 2]>,
    /// When the counts were taken: a dump of the namespace made after the failure, never
    /// before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
}

/// `type: "conflict"`: a bind/listen that failed, or a connect that found no free port.
#[derive(Debug, Serialize)]
pub struct Conflict<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub op: Op,
    pub error: &'static str,
    pub errno: i32,
    pub proto: &'static str,
    pub family: &'static str,
    /// Attempted address (for `op:"connect"`, the destination).
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u32,
    pub fd: i32,
    pub actor: Actor<'a>,
    pub holders: Vec<crate::state::table::Holder>,
    pub cause: Cause,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<crate::state::table::Overlap>,
    /// connect EADDRNOTAVAIL: the destination and how taken its local ports are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    pub hint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The identical failures this record stands for (see `burst`): 1 for a single one.
    pub count: u64,
    /// Kernel time of the first and last of them.
    pub first_ts: String,
    pub last_ts: String,
}

/// `type: "port"`: a service port started (`open`) or stopped (`close`) being held. See
/// `service` for what counts and how flapping is coalesced.
#[derive(Debug, Serialize)]
pub struct Port<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub event: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u32,
    /// null when no process could be named (sock_diag found the socket without an owner).
    pub actor: Option<PortActor>,
    /// `open`: held already when the agent started, or found by sock_diag, not by an event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existing: Option<bool>,
    /// `close`: when it was opened, and for how long it was held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_s: Option<f64>,
    /// `close`: open/close cycles of less than a second coalesced into this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    /// `close`: `close` (the socket was closed) or `gone` (its process exited or was
    /// killed, or its container stopped: a re-read of the namespace showed it gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct PortActor {
    pub pid: u32,
    pub comm: Arc<str>,
    pub cmdline: Option<Arc<str>>,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Arc<ContainerRef>>,
}

/// `type: "bind" | "listen" | "connect" | "close"`: one socket syscall (`--all-events`).
#[derive(Debug, Serialize)]
pub struct SockOp<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    /// "ok" or the errno name.
    pub result: &'static str,
    pub errno: i32,
    pub proto: &'static str,
    pub family: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rport: Option<u16>,
    pub netns: u32,
    pub fd: i32,
    pub actor: Actor<'a>,
}

/// `type: "exit"`: a process that held a tracked socket exited.
#[derive(Debug, Serialize)]
pub struct Exit<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub netns: u32,
    pub actor: Actor<'a>,
}

/// `type: "tcp_state"`: a TCP state change. `time_wait` marks FIN_WAIT2->CLOSE and
/// CLOSING->CLOSE, which is how entry into TIME_WAIT shows on this tracepoint. Records are
/// written by `write_tcp_state`; this serde form is the reference its test checks it against.
#[cfg(test)]
#[derive(Debug, Serialize)]
pub struct TcpState<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub family: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old_state: &'static str,
    pub new_state: &'static str,
    pub time_wait: bool,
    pub netns: u32,
    /// Task on whose CPU the change ran; for changes driven by the network (softirq) this is
    /// an unrelated task, so it is not reported as an actor.
    pub context_pid: u32,
}

/// A `tcp_state` record for `e`, written directly: the same bytes as
/// `serde_json::to_writer(out, &tcp_state(Header::new("tcp_state", host, wall), e))`, where
/// `ts` is `decode::rfc3339(wall)` and `host_json` is `host` as a JSON string. Under
/// `--all-events` a TCP connection makes about ten of these, and serde's flattened header (a
/// map serializer escaping every key, a String per timestamp) was the agent's largest cost.
pub fn write_tcp_state(out: &mut Vec<u8>, ts: &[u8], host_json: &[u8], e: &Event) {
    let mut n = itoa::Buffer::new();
    out.reserve(256 + host_json.len());
    out.extend_from_slice(b"{\"v\":");
    out.extend_from_slice(n.format(SCHEMA_VERSION).as_bytes());
    out.extend_from_slice(b",\"ts\":\"");
    out.extend_from_slice(ts);
    out.extend_from_slice(b"\",\"type\":\"tcp_state\",\"host\":");
    out.extend_from_slice(host_json);
    out.extend_from_slice(b",\"family\":\"");
    out.extend_from_slice(family_name(e.family).as_bytes());
    out.extend_from_slice(b"\",\"addr\":\"");
    write_addr(out, e.family, &e.addr);
    out.extend_from_slice(b"\",\"port\":");
    out.extend_from_slice(n.format(e.port).as_bytes());
    out.extend_from_slice(b",\"raddr\":\"");
    write_addr(out, e.family, &e.raddr);
    out.extend_from_slice(b"\",\"rport\":");
    out.extend_from_slice(n.format(e.rport).as_bytes());
    out.extend_from_slice(b",\"old_state\":\"");
    out.extend_from_slice(tcp_state_name(e.old_state).as_bytes());
    out.extend_from_slice(b"\",\"new_state\":\"");
    out.extend_from_slice(tcp_state_name(e.new_state).as_bytes());
    out.extend_from_slice(b"\",\"time_wait\":");
    out.extend_from_slice(if decode::record_time_wait(e) {
        b"true"
    } else {
        b"false"
    });
    out.extend_from_slice(b",\"netns\":");
    out.extend_from_slice(n.format(e.netns).as_bytes());
    out.extend_from_slice(b",\"context_pid\":");
    out.extend_from_slice(n.format(e.pid).as_bytes());
    out.push(b'}');
}

/// An address as `Display` writes it (what serde emits for `IpAddr`); IPv4, the common case,
/// without going through core::fmt.
fn write_addr(out: &mut Vec<u8>, family: u16, a: &[u8; 16]) {
    if family == portwatch_common::AF_INET6 {
        use std::io::Write;
        let _ = write!(out, "{}", ip(family, a));
    } else {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(n.format(a[0]).as_bytes());
        for o in &a[1..4] {
            out.push(b'.');
            out.extend_from_slice(n.format(*o).as_bytes());
        }
    }
}

/// `type: "lost"`: events that did not reach the log, with exact counts since the last
/// `lost` record. `kernel`: the ring buffer was full; `agent`: the agent's queue was full.
#[derive(Debug, Serialize)]
pub struct Lost<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub count: u64,
    pub kernel: u64,
    pub agent: u64,
    pub by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Totals since the agent started.
    pub total: u64,
}

/// `type: "conflict"`, `op: "docker_publish"`: the daemon refused to publish a port that a
/// running container already publishes. No syscall failed, so there is no errno, fd or
/// process: the actor is the container that asked.
#[derive(Debug, Serialize)]
pub struct PublishConflict<'a> {
    #[serde(flatten)]
    pub h: Header<'a>,
    pub op: Op,
    pub error: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    /// The namespace ports are published in: the host's.
    pub netns: u32,
    pub actor: ContainerActor,
    pub holders: Vec<crate::state::table::Holder>,
    pub cause: Cause,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<crate::state::table::Overlap>,
    pub hint: String,
    /// The daemon's own words (`State.Error`).
    pub docker_error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Always 1: dockerd refuses each start once (see `Conflict::count`).
    pub count: u64,
    pub first_ts: String,
    pub last_ts: String,
}

#[derive(Debug, Serialize)]
pub struct ContainerActor {
    pub container: Arc<ContainerRef>,
}

/// `type: "docker"`: the Docker join's connection and the containers' lifecycle.
#[derive(Debug, Serialize, Default)]
pub struct Docker<'a> {
    /// `connected`, `unavailable`, `start`, `die` or `destroy`.
    pub event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<&'a Arc<ContainerRef>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub networks: Option<&'a [Network]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ports: Option<&'a [PortMap]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// It happened while the agent was not connected; found at the resync.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missed: bool,
    /// `unreachable`/`reachable`: the published port in question.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    /// `unreachable`: what does listen on the container port inside (possibly nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listening: Option<Vec<crate::engines::reach::Listening>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl<'a> Docker<'a> {
    /// start, die, destroy: who, and which host ports it took or freed.
    pub fn lifecycle(
        event: &'static str,
        c: &'a Container,
        exit_code: Option<i64>,
        missed: bool,
    ) -> Self {
        let live = event == "start";
        Docker {
            event,
            container: Some(&c.r),
            pid: live.then_some(c.pid).filter(|p| *p != 0),
            netns: c.netns.filter(|_| live),
            cgroup_id: c.cgroup_id.filter(|_| live),
            cgroup_path: c.cgroup_path.as_deref().filter(|_| live),
            network_mode: live.then_some(&*c.network_mode),
            networks: live.then_some(&c.networks[..]),
            ports: Some(&c.published),
            exit_code,
            missed,
            ..Default::default()
        }
    }
}

/// A conflict's `op` for the syscall that failed.
pub fn op_of(k: Kind) -> Op {
    match k {
        Kind::Bind => Op::Bind,
        Kind::Listen => Op::Listen,
        Kind::Connect => Op::Connect,
        other => Op::Other(other.name().to_owned()),
    }
}

pub fn is_conflict(e: &Event, k: Kind) -> bool {
    match k {
        Kind::Bind | Kind::Listen => e.ret < 0,
        // EADDRNOTAVAIL from a UDP connect means no usable local address (dockerd's iptables
        // probing [::1]:53 in a new container, say), never a shortage of ports: UDP's
        // autobind fails with EAGAIN instead. Not a port problem, so not a conflict.
        Kind::Connect => e.ret == -99 && e.proto != portwatch_common::IPPROTO_UDP,
        _ => false,
    }
}

/// The first-pass explanation for a conflict with no attribution.
pub fn unattributed(op: Kind, errno: i32, port: u16) -> (Cause, String, Option<String>) {
    match (op, errno) {
        (Kind::Connect, 99) => (
            Cause::EphemeralExhausted,
            "no free local port toward this destination; widen net.ipv4.ip_local_port_range or \
             reuse connections"
                .into(),
            None,
        ),
        (_, 13) if port < 1024 => (
            Cause::Unknown,
            format!(
                "port {port} is privileged: run as root or grant CAP_NET_BIND_SERVICE, or use a \
                 port above 1023"
            ),
            Some("EACCES: privileged port".into()),
        ),
        (_, 99) => (
            Cause::Unknown,
            "the address is not assigned to any interface in this network namespace; bind \
             0.0.0.0 or an existing address"
                .into(),
            Some("EADDRNOTAVAIL: address not local".into()),
        ),
        (_, 22) => (
            Cause::Unknown,
            "the socket is already bound (or the address is invalid); create a new socket \
             for each bind"
                .into(),
            Some("EINVAL: socket already bound or bad address".into()),
        ),
        _ => (
            Cause::Unknown,
            String::new(),
            Some("no holder is known for this address".into()),
        ),
    }
}

pub fn conflict<'a>(
    h: Header<'a>,
    e: &'a Event,
    k: Kind,
    netns: u32,
    cmdline: Option<Arc<str>>,
) -> Conflict<'a> {
    let errno = -e.ret;
    let (addr, port) = if k == Kind::Connect {
        (ip(e.family, &e.raddr), e.rport)
    } else {
        (ip(e.family, &e.addr), e.port)
    };
    let (cause, hint, reason) = unattributed(k, errno, port);
    let ts = h.ts.clone();
    Conflict {
        count: 1,
        first_ts: ts.clone(),
        last_ts: ts,
        h,
        op: op_of(k),
        error: errno_name(errno),
        errno,
        proto: proto_name(e.proto),
        family: family_name(e.family),
        addr,
        port,
        netns,
        fd: e.fd,
        actor: Actor::from_event(e, cmdline),
        holders: Vec::new(),
        cause,
        overlap: None,
        destination: None,
        hint,
        reason,
    }
}

pub fn sock_op<'a>(
    h: Header<'a>,
    e: &'a Event,
    netns: u32,
    cmdline: Option<Arc<str>>,
) -> SockOp<'a> {
    let errno = -e.ret;
    let connect = e.kind == portwatch_common::kind::CONNECT;
    SockOp {
        h,
        result: if e.ret == 0 { "ok" } else { errno_name(errno) },
        errno,
        proto: proto_name(e.proto),
        family: family_name(e.family),
        addr: ip(e.family, &e.addr),
        port: e.port,
        raddr: connect.then(|| ip(e.family, &e.raddr)),
        rport: connect.then_some(e.rport),
        netns,
        fd: e.fd,
        actor: Actor::from_event(e, cmdline),
    }
}

#[cfg(test)]
pub fn tcp_state<'a>(h: Header<'a>, e: &'a Event) -> TcpState<'a> {
    TcpState {
        h,
        family: family_name(e.family),
        addr: ip(e.family, &e.addr),
        port: e.port,
        raddr: ip(e.family, &e.raddr),
        rport: e.rport,
        old_state: tcp_state_name(e.old_state),
        new_state: tcp_state_name(e.new_state),
        time_wait: decode::record_time_wait(e),
        netns: e.netns,
        context_pid: e.pid,
    }
}

#[cfg(test)]
mod tests;
