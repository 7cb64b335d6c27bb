//! Record schema v1: one JSON object per line. The types are `portwatch_schema`'s, the
//! same every reader parses; this module builds them from kernel events and the agent's
//! state. Names are a contract with users' scripts: add fields freely, never rename.
//! Documented in docs/schema.md.

use std::sync::Arc;

use portwatch_common::{Event, Kind};
use portwatch_schema as schema;
pub use portwatch_schema::{Body, Cause, Op, Record, Text};

use crate::{
    engines::containers::{Container, Network, PortMap},
    kernel::decode::{self, errno_name, family_name, ip, proto_name, tcp_state_name},
};

pub const SCHEMA_VERSION: u8 = 1;

/// A record: the header every record has (`v`, `ts`, `host`; `type` is the body's) on
/// `body`.
pub fn record(host: &Text, wall_ns: i128, body: Body) -> Record {
    record_at(host, decode::rfc3339(wall_ns), body)
}

/// `record` with its `ts` already formatted (a conflict also writes it as `first_ts`).
pub fn record_at(host: &Text, ts: String, body: Body) -> Record {
    Record {
        v: SCHEMA_VERSION,
        ts: Some(ts),
        host: Some(host.clone()),
        body,
    }
}

/// An errno's name (`ok` for 0), typed.
pub fn error_of(errno: i32) -> schema::Error {
    if errno == 0 {
        schema::Error::Ok
    } else {
        schema::Error::parse(errno_name(errno))
    }
}

pub fn proto_of(p: u16) -> schema::Proto {
    schema::Proto::parse(proto_name(p))
}

pub fn family_of(f: u16) -> schema::Family {
    schema::Family::parse(family_name(f))
}

pub fn family_of_addr(a: std::net::IpAddr) -> schema::Family {
    if a.is_ipv4() {
        schema::Family::Ipv4
    } else {
        schema::Family::Ipv6
    }
}

/// The process that made the syscall. `cmdline` is None when the process was gone (or its
/// pid reused) before it could be read.
pub fn actor(e: &Event, cmdline: Option<Arc<str>>) -> schema::Actor {
    schema::Actor {
        pid: e.pid,
        tid: e.tid,
        comm: Text::copy(&decode::comm(&e.comm)),
        uid: e.uid,
        cmdline: cmdline.map(Text::from),
        cgroup_id: e.cgroup_id,
        container: None,
        via: None,
    }
}

/// A `tcp_state` record for `e`, written directly: the same bytes as serde writes for
/// `record(host, wall, tcp_state(e))`, where `ts` is `decode::rfc3339(wall)` and `host_json`
/// is `host` as a JSON string (the test in `tests.rs` checks it). Under `--all-events` a TCP
/// connection makes about ten of these, and serde's flattened header (a map serializer
/// escaping every key, a String per timestamp) was the agent's largest cost.
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

/// `type: "docker"`, `start`, `die`, `destroy`: who, and which host ports it took or freed.
pub fn lifecycle(
    event: schema::DockerEvent,
    c: &Container,
    exit_code: Option<i64>,
    missed: bool,
) -> schema::Docker {
    let live = event == schema::DockerEvent::Start;
    schema::Docker {
        container: Some(c.r.clone()),
        pid: live.then_some(c.pid).filter(|p| *p != 0),
        netns: c.netns.filter(|_| live),
        cgroup_id: c.cgroup_id.filter(|_| live),
        cgroup_path: c.cgroup_path.as_deref().filter(|_| live).map(str::to_owned),
        network_mode: live.then(|| c.network_mode.to_string()),
        networks: live.then(|| c.networks.iter().map(network).collect()),
        ports: Some(c.published.iter().map(port_map).collect()),
        exit_code,
        missed,
        ..schema::Docker::new(event)
    }
}

fn network(n: &Network) -> schema::Network {
    schema::Network {
        name: n.name.to_string(),
        ip: n.ip,
    }
}

fn port_map(p: &PortMap) -> schema::PortMap {
    schema::PortMap {
        proto: p.proto.schema(),
        host_ip: p.host_ip,
        host_port: p.host_port,
        container_port: p.container_port,
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

/// `type: "conflict"` for a bind/listen that failed, or a connect that found no free port:
/// the first pass, before attribution.
pub fn conflict(
    ts: &str,
    e: &Event,
    k: Kind,
    netns: u32,
    actor: schema::Actor,
) -> schema::Conflict {
    let errno = -e.ret;
    let (addr, port) = if k == Kind::Connect {
        (ip(e.family, &e.raddr), e.rport)
    } else {
        (ip(e.family, &e.addr), e.port)
    };
    let (cause, hint, reason) = unattributed(k, errno, port);
    schema::Conflict {
        op: op_of(k),
        error: error_of(errno),
        errno: Some(errno),
        proto: proto_of(e.proto),
        family: family_of(e.family),
        addr,
        port,
        netns,
        fd: Some(e.fd),
        actor: schema::ConflictActor::Process(actor),
        holders: Vec::new(),
        cause,
        overlap: None,
        destination: None,
        hint,
        docker_error: None,
        reason,
        count: 1,
        first_ts: ts.to_owned(),
        last_ts: ts.to_owned(),
    }
}

/// `type: "bind" | "listen" | "connect" | "close"`: one socket syscall (`--all-events`).
pub fn sock_op(e: &Event, k: Kind, netns: u32, actor: schema::Actor) -> Body {
    let errno = -e.ret;
    let connect = k == Kind::Connect;
    let op = schema::SockOp {
        result: error_of(errno),
        errno,
        proto: proto_of(e.proto),
        family: family_of(e.family),
        addr: ip(e.family, &e.addr),
        port: e.port,
        raddr: connect.then(|| ip(e.family, &e.raddr)),
        rport: connect.then_some(e.rport),
        netns,
        fd: e.fd,
        actor,
    };
    match k {
        Kind::Bind => Body::Bind(op),
        Kind::Listen => Body::Listen(op),
        Kind::Connect => Body::Connect(op),
        _ => Body::Close(op),
    }
}

/// `type: "tcp_state"`, the serde form: the reference `write_tcp_state`'s test checks it
/// against. `time_wait` marks FIN_WAIT2->CLOSE and CLOSING->CLOSE, which is how entry into
/// TIME_WAIT shows on this tracepoint; `context_pid` is the task on whose CPU the change
/// ran (for changes driven by the network, an unrelated one, so it is no actor).
#[cfg(test)]
pub fn tcp_state(e: &Event) -> Body {
    Body::TcpState(schema::TcpState {
        family: family_of(e.family),
        addr: ip(e.family, &e.addr),
        port: e.port,
        raddr: ip(e.family, &e.raddr),
        rport: e.rport,
        old_state: decode::sock_state(e.old_state),
        new_state: decode::sock_state(e.new_state),
        time_wait: decode::record_time_wait(e),
        netns: e.netns,
        context_pid: e.pid,
    })
}

#[cfg(test)]
mod tests;
