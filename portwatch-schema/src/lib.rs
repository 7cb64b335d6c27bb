//! Record schema v1, typed: one JSON object per line, as `portwatch run` writes it and as
//! `tail`, `history`, `report`, `attach` and the end-to-end tests read it. The full
//! description of every field is docs/schema.md; names here are a contract with users'
//! scripts: fields are added, never renamed or dropped.
//!
//! [`Record::parse`] reads a line; writing a [`Record`] back with serde gives the same bytes
//! the agent wrote (the agent's golden-record test checks this for every record type).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

mod names;
mod new;
mod text;
pub use names::*;
pub use text::Text;

pub const SCHEMA_VERSION: u8 = 1;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Record {
    pub v: u8,
    /// RFC 3339 UTC with 9 fractional digits. Absent only on attach's `missed`.
    #[serde(default)]
    pub ts: Option<String>,
    #[serde(default)]
    pub host: Option<Text>,
    #[serde(flatten)]
    pub body: Body,
}

/// What a record says, by its `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    Conflict(Conflict),
    Port(Port),
    Bind(SockOp),
    Listen(SockOp),
    Connect(SockOp),
    Close(SockOp),
    Exit(Exit),
    TcpState(TcpState),
    TimeWait(TimeWait),
    Pressure(Pressure),
    Lost(Lost),
    Docker(Docker),
    Agent(Agent),
    Missed(Missed),
    /// A type this version does not know (schema v1 may add types).
    #[serde(other)]
    Unknown,
}

impl Record {
    /// One line of the log. An unknown `type` is no error (it reads as `Body::Unknown`); a
    /// line that is no JSON object, or a known type with a field of the wrong shape, is.
    pub fn parse(line: &str) -> Result<Record, serde_json::Error> {
        serde_json::from_str(line)
    }

    pub fn ty(&self) -> Type {
        match &self.body {
            Body::Conflict(_) => Type::Conflict,
            Body::Port(_) => Type::Port,
            Body::Bind(_) => Type::Bind,
            Body::Listen(_) => Type::Listen,
            Body::Connect(_) => Type::Connect,
            Body::Close(_) => Type::Close,
            Body::Exit(_) => Type::Exit,
            Body::TcpState(_) => Type::TcpState,
            Body::TimeWait(_) => Type::TimeWait,
            Body::Pressure(_) => Type::Pressure,
            Body::Lost(_) => Type::Lost,
            Body::Docker(_) => Type::Docker,
            Body::Agent(_) => Type::Agent,
            Body::Missed(_) => Type::Missed,
            Body::Unknown => Type::Other("unknown".into()),
        }
    }

    pub fn ts(&self) -> &str {
        self.ts.as_deref().unwrap_or("")
    }

    pub fn conflict(&self) -> Option<&Conflict> {
        match &self.body {
            Body::Conflict(c) => Some(c),
            _ => None,
        }
    }

    pub fn port(&self) -> Option<&Port> {
        match &self.body {
            Body::Port(p) => Some(p),
            _ => None,
        }
    }

    pub fn docker(&self) -> Option<&Docker> {
        match &self.body {
            Body::Docker(d) => Some(d),
            _ => None,
        }
    }

    pub fn agent(&self) -> Option<&Agent> {
        match &self.body {
            Body::Agent(a) => Some(a),
            _ => None,
        }
    }

    /// The syscall record (`bind`, `listen`, `connect`, `close`).
    pub fn sock_op(&self) -> Option<&SockOp> {
        match &self.body {
            Body::Bind(s) | Body::Listen(s) | Body::Connect(s) | Body::Close(s) => Some(s),
            _ => None,
        }
    }

    /// The network namespace the record is about, where it has one.
    pub fn netns(&self) -> Option<u32> {
        match &self.body {
            Body::Conflict(c) => Some(c.netns),
            Body::Port(p) => Some(p.netns),
            Body::Bind(s) | Body::Listen(s) | Body::Connect(s) | Body::Close(s) => Some(s.netns),
            Body::Exit(e) => Some(e.netns),
            Body::TcpState(t) => Some(t.netns),
            Body::TimeWait(t) => Some(t.netns),
            Body::Pressure(p) => Some(p.netns),
            Body::Docker(d) => d.netns,
            _ => None,
        }
    }
}

/// The agent's field order: `v`, `ts`, `type`, `host`, then the body's own fields.
impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Line<'a, T: Serialize> {
            v: u8,
            #[serde(skip_serializing_if = "Option::is_none")]
            ts: Option<&'a str>,
            #[serde(rename = "type")]
            ty: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            host: Option<&'a str>,
            #[serde(flatten)]
            body: &'a T,
        }
        let ty = self.ty();
        macro_rules! line {
            ($b:expr) => {
                Line {
                    v: self.v,
                    ts: self.ts.as_deref(),
                    ty: ty.as_str(),
                    host: self.host.as_deref(),
                    body: $b,
                }
                .serialize(s)
            };
        }
        match &self.body {
            Body::Conflict(b) => line!(b),
            Body::Port(b) => line!(b),
            Body::Bind(b) | Body::Listen(b) | Body::Connect(b) | Body::Close(b) => line!(b),
            Body::Exit(b) => line!(b),
            Body::TcpState(b) => line!(b),
            Body::TimeWait(b) => line!(b),
            Body::Pressure(b) => line!(b),
            Body::Lost(b) => line!(b),
            Body::Docker(b) => line!(b),
            Body::Agent(b) => line!(b),
            Body::Missed(b) => line!(b),
            Body::Unknown => line!(&BTreeMap::<String, ()>::new()),
        }
    }
}

/// How a container is named in records.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// The first 12 hex digits, as `docker ps` shows.
    pub id: Text,
    /// `docker` or `podman`.
    pub engine: Text,
    pub name: Text,
    pub image: Text,
    pub compose_project: Option<Text>,
    pub compose_service: Option<Text>,
}

/// The process that made the syscall.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub pid: u32,
    pub tid: u32,
    pub comm: Text,
    pub uid: u32,
    /// None (`null`) when the process was gone (or its pid reused) before it could be read.
    #[serialize_always]
    pub cmdline: Option<Text>,
    pub cgroup_id: u64,
    pub container: Option<Arc<ContainerRef>>,
    /// `docker-proxy` or `dockerd`: the container whose port it was publishing.
    pub via: Option<Text>,
}

/// A conflict's actor: the process whose syscall failed, or for `op:"docker_publish"` the
/// container that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ConflictActor {
    Process(Actor),
    Container { container: Arc<ContainerRef> },
}

impl ConflictActor {
    pub fn process(&self) -> Option<&Actor> {
        match self {
            ConflictActor::Process(a) => Some(a),
            ConflictActor::Container { .. } => None,
        }
    }

    pub fn container(&self) -> Option<&ContainerRef> {
        match self {
            ConflictActor::Process(a) => a.container.as_deref(),
            ConflictActor::Container { container } => Some(container),
        }
    }
}

/// One entry of a conflict's `holders`.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: Option<u32>,
    pub comm: Option<Text>,
    pub cmdline: Option<Text>,
    pub uid: Option<u32>,
    pub state: SockState,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub overlap: Overlap,
    pub since: Option<String>,
    /// TIME_WAIT only: how many sockets this entry stands for.
    pub count: Option<u32>,
    pub expires_in_s: Option<u32>,
    pub container: Option<Arc<ContainerRef>>,
    pub via: Option<Text>,
    pub container_port: Option<u16>,
    pub stale: Option<bool>,
}

/// connect `EADDRNOTAVAIL`: the destination and how taken its local ports were.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    pub in_use: u32,
    pub time_wait: u32,
    #[serialize_always]
    pub range: Option<[u16; 2]>,
    pub as_of: Option<String>,
}

/// `type:"conflict"`: a bind/listen that failed, a connect that found no free port, or
/// (`op:"docker_publish"`) a port the daemon refused to publish.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    pub op: Op,
    pub error: Error,
    /// Absent for `op:"docker_publish"`: no syscall failed.
    pub errno: Option<i32>,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u32,
    pub fd: Option<i32>,
    pub actor: ConflictActor,
    pub holders: Vec<Holder>,
    pub cause: Cause,
    pub overlap: Option<Overlap>,
    pub destination: Option<Destination>,
    pub hint: String,
    /// `op:"docker_publish"`: the daemon's own words.
    pub docker_error: Option<String>,
    pub reason: Option<String>,
    pub count: u64,
    pub first_ts: String,
    pub last_ts: String,
}

/// A `port` record's actor.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortActor {
    pub pid: u32,
    pub comm: Text,
    #[serialize_always]
    pub cmdline: Option<Text>,
    pub uid: u32,
    pub container: Option<Arc<ContainerRef>>,
}

/// `type:"port"`: a service port started or stopped being held.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Port {
    pub event: PortEvent,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub netns: u32,
    /// None (`null`) when no process could be named.
    #[serialize_always]
    pub actor: Option<PortActor>,
    pub existing: Option<bool>,
    pub since: Option<String>,
    pub held_s: Option<f64>,
    pub restarts: Option<u64>,
    /// `close`: `close` or `gone`.
    pub reason: Option<Text>,
}

/// `type: "bind" | "listen" | "connect" | "close"`: one socket syscall (`--all-events`).
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOp {
    pub result: Error,
    pub errno: i32,
    pub proto: Proto,
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub raddr: Option<IpAddr>,
    pub rport: Option<u16>,
    pub netns: u32,
    pub fd: i32,
    pub actor: Actor,
}

/// `type:"exit"`: a process that held a tracked socket exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub netns: u32,
    pub actor: Actor,
}

/// `type:"tcp_state"`: a TCP state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    pub family: Family,
    pub addr: IpAddr,
    pub port: u16,
    pub raddr: IpAddr,
    pub rport: u16,
    pub old_state: SockState,
    pub new_state: SockState,
    pub time_wait: bool,
    pub netns: u32,
    pub context_pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCount {
    pub port: u16,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCount {
    pub addr: IpAddr,
    pub port: u16,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Busiest {
    pub addr: IpAddr,
    pub port: u16,
    pub in_use: u64,
    pub pct: f64,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ephemeral {
    pub range: [u16; 2],
    #[serialize_always]
    pub busiest: Option<Busiest>,
}

/// `type:"time_wait"`: a namespace's TIME_WAIT sockets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeWait {
    pub netns: u32,
    pub total: u64,
    pub entered: u64,
    pub expired: u64,
    /// `events` or `dumps`.
    pub counted_by: Text,
    pub by_local_port: Vec<PortCount>,
    pub by_remote: Vec<RemoteCount>,
    pub ephemeral: Ephemeral,
}

/// `type:"pressure"`: local ports toward one destination crossed the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub netns: u32,
    pub addr: IpAddr,
    pub port: u16,
    pub in_use: u64,
    pub range: [u16; 2],
    pub pct: f64,
    pub threshold_pct: f64,
    pub hint: String,
}

/// `type:"lost"`: events that did not reach the log since the last `lost` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    pub count: u64,
    pub kernel: u64,
    pub agent: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub total: u64,
}

/// A published port: `docker` start/die/destroy's `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    pub proto: Proto,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
}

#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    pub ip: Option<IpAddr>,
}

/// What listens on a container port inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    pub addr: IpAddr,
    pub port: u16,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `type:"docker"`: the engines' connection and the containers' lifecycle.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Docker {
    pub event: DockerEvent,
    pub endpoint: Option<String>,
    pub engine: Option<String>,
    pub api_version: Option<String>,
    pub server_version: Option<String>,
    pub containers: Option<u64>,
    pub running: Option<u64>,
    pub sync_ms: Option<u64>,
    pub cgroup: Option<CgroupMode>,
    pub reason: Option<String>,
    pub container: Option<Arc<ContainerRef>>,
    pub pid: Option<u32>,
    pub netns: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    pub network_mode: Option<String>,
    pub networks: Option<Vec<Network>>,
    pub ports: Option<Vec<PortMap>>,
    pub exit_code: Option<i64>,
    /// It happened while the agent was not connected; found at the resync.
    #[serde(default, skip_serializing_if = "is_false")]
    pub missed: bool,
    pub proto: Option<Proto>,
    pub host_ip: Option<IpAddr>,
    pub host_port: Option<u16>,
    pub container_port: Option<u16>,
    pub listening: Option<Vec<Listening>>,
    pub hint: Option<String>,
}

/// `type:"agent"`: the agent's own lifecycle.
#[serde_with::skip_serializing_none]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub event: AgentEvent,
    pub version: Option<String>,
    pub pid: Option<u32>,
    pub mode: Option<String>,
    /// `ready`: `trampoline` or `tracepoint`.
    pub hooks: Option<String>,
    pub hooks_why: Option<String>,
    pub functions: Option<Vec<String>>,
    pub programs: Option<Vec<String>>,
    pub ports: Option<Vec<u16>>,
    pub ringbuf_bytes: Option<u32>,
    pub netns_source: Option<String>,
    pub tracefs_mounted: Option<bool>,
    pub startup_ms: Option<u64>,
    pub log_file: Option<String>,
    pub table_size: Option<u64>,
    pub namespaces: Option<u64>,
    pub reason: Option<String>,
    pub records: Option<u64>,
    pub lost_total: Option<u64>,
    pub log_write_errors: Option<u64>,
    pub stdout_write_errors: Option<u64>,
    pub drift_healed: Option<u64>,
    pub unwritten: Option<u64>,
    pub failed_records: Option<u64>,
    pub uptime_s: Option<f64>,
}

/// `type:"missed"` (attach only): records this client did not get because it read too
/// slowly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    pub count: u64,
}

#[cfg(test)]
mod tests;
