//! Records the processing thread writes itself: `agent`, `time_wait` and `pressure`, and
//! the envelope that puts the common header on a record body.

use super::*;

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
    /// `stopped`: lines stdout refused (a closed pipe, say); the log file still has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_write_errors: Option<u64>,
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
pub(super) struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    pub(super) h: Header<'a>,
    #[serde(flatten)]
    pub(super) body: T,
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

pub(super) trait Counted {
    fn count(&self) -> u64;
}

#[derive(Serialize)]
pub(super) struct PortCount {
    pub(super) port: u16,
    pub(super) count: u64,
}

impl Counted for PortCount {
    fn count(&self) -> u64 {
        self.count
    }
}

#[derive(Serialize)]
pub(super) struct RemoteCount {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) count: u64,
}

impl Counted for RemoteCount {
    fn count(&self) -> u64 {
        self.count
    }
}

/// The `n` largest, largest first; the record stays bounded however many ports there are.
pub(super) fn top_n<T: Counted>(it: impl Iterator<Item = T>, n: usize) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.count()));
    v.truncate(n);
    v
}

#[derive(Serialize)]
pub(super) struct Busiest {
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) in_use: u64,
    pub(super) pct: f64,
}

#[derive(Serialize)]
pub(super) struct Ephemeral {
    pub(super) range: [u16; 2],
    pub(super) busiest: Option<Busiest>,
}

/// `type: "time_wait"`.
#[derive(Serialize)]
pub(super) struct TimeWait {
    pub(super) netns: u32,
    pub(super) total: u64,
    pub(super) entered: u64,
    pub(super) expired: u64,
    /// What counted `entered` and `expired`: `events` (the kernel's TIME_WAIT hooks, exact)
    /// or `dumps` (derived from two sock_diag dumps and the sockets' timers). `total` is
    /// always the dump's.
    pub(super) counted_by: &'static str,
    pub(super) by_local_port: Vec<PortCount>,
    pub(super) by_remote: Vec<RemoteCount>,
    pub(super) ephemeral: Ephemeral,
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
pub(super) struct Pressure {
    pub(super) netns: u32,
    pub(super) addr: IpAddr,
    pub(super) port: u16,
    pub(super) in_use: u64,
    pub(super) range: [u16; 2],
    pub(super) pct: f64,
    pub(super) threshold_pct: f64,
    pub(super) hint: String,
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
