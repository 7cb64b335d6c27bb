//! What the processing thread receives: kernel event batches, dumps and re-reads from the
//! sock_diag thread, container messages, control queries, and the agent's own signals.

use super::*;

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
    /// Destinations the namespace has no source address for (`diag::NsRead::no_source`).
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
