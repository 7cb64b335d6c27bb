//! The closed vocabularies of schema v1: each a Rust enum that writes and reads the same
//! names. Schema v1 may add names, never rename one: a name this version does not know
//! reads as `Other` and is written back unchanged.

use serde::{Deserialize, Serialize};

macro_rules! names {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)*
            /// A name this version does not know.
            #[serde(untagged)]
            Other(String),
        }

        impl $name {
            /// Every name this version knows, in schema order.
            pub const KNOWN: &'static [$name] = &[$($name::$v),*];

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$v => $s,)*
                    $name::Other(s) => s,
                }
            }

            /// The name, if this version knows it: `'static`, for labels and tables.
            pub fn known(&self) -> Option<&'static str> {
                match self {
                    $($name::$v => Some($s),)*
                    $name::Other(_) => None,
                }
            }

            /// The known name for `s`, else `Other`.
            pub fn parse(s: &str) -> Self {
                match s {
                    $($s => $name::$v,)*
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

names! {
    /// `type`.
    Type {
        Conflict = "conflict",
        Port = "port",
        Bind = "bind",
        Listen = "listen",
        Connect = "connect",
        Close = "close",
        Exit = "exit",
        TcpState = "tcp_state",
        TimeWait = "time_wait",
        Pressure = "pressure",
        Lost = "lost",
        Docker = "docker",
        Agent = "agent",
        /// attach only: records this client missed because it read too slowly.
        Missed = "missed",
    }
}

names! {
    /// A conflict's `op`.
    Op {
        Bind = "bind",
        Listen = "listen",
        Connect = "connect",
        DockerPublish = "docker_publish",
    }
}

names! {
    /// A conflict's `cause`: exactly one per conflict.
    Cause {
        Listener = "listener",
        Bound = "bound",
        EphemeralCollision = "ephemeral_collision",
        TimeWait = "time_wait",
        DockerPublished = "docker_published",
        DockerStale = "docker_stale",
        PortAlreadyAllocated = "port_already_allocated",
        EphemeralExhausted = "ephemeral_exhausted",
        AddressUnavailable = "address_unavailable",
        Unknown = "unknown",
    }
}

names! {
    /// `error` (and a syscall record's `result`): the errno's name, `ok`, or for
    /// `op:"docker_publish"` the daemon's refusal.
    Error {
        Ok = "ok",
        Eaddrinuse = "EADDRINUSE",
        Eaddrnotavail = "EADDRNOTAVAIL",
        Eacces = "EACCES",
        Einval = "EINVAL",
        Econnrefused = "ECONNREFUSED",
        Einprogress = "EINPROGRESS",
        Eagain = "EAGAIN",
        PortAlreadyAllocated = "port_already_allocated",
    }
}

names! {
    /// A socket's state: a holder's `state`, and `tcp_state`'s `old_state`/`new_state`.
    SockState {
        Established = "ESTABLISHED",
        SynSent = "SYN_SENT",
        SynRecv = "SYN_RECV",
        FinWait1 = "FIN_WAIT1",
        FinWait2 = "FIN_WAIT2",
        TimeWait = "TIME_WAIT",
        Close = "CLOSE",
        CloseWait = "CLOSE_WAIT",
        LastAck = "LAST_ACK",
        Listen = "LISTEN",
        Closing = "CLOSING",
        NewSynRecv = "NEW_SYN_RECV",
        /// Bound, not listening (TCP).
        Bound = "BOUND",
        Udp = "UDP",
        /// A published port no process holds (`via:"dockerd"`).
        Published = "PUBLISHED",
        Unknown = "UNKNOWN",
    }
}

names! {
    /// `type:"docker"`'s `event`.
    DockerEvent {
        Connected = "connected",
        Unavailable = "unavailable",
        Start = "start",
        Die = "die",
        Destroy = "destroy",
        Unreachable = "unreachable",
        Reachable = "reachable",
    }
}

names! {
    /// `type:"agent"`'s `event`.
    AgentEvent {
        Ready = "ready",
        Degraded = "degraded",
        Stopped = "stopped",
        LogError = "log_error",
        LogReopened = "log_reopened",
        LogResumed = "log_resumed",
    }
}

names! {
    /// `type:"port"`'s `event`.
    PortEvent {
        Open = "open",
        Close = "close",
    }
}

names! {
    /// `proto`.
    Proto {
        Tcp = "tcp",
        Udp = "udp",
        Unknown = "unknown",
    }
}

names! {
    /// `family`.
    Family {
        Ipv4 = "ipv4",
        Ipv6 = "ipv6",
    }
}

/// How a holder's address overlaps the attempted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    Exact,
    Wildcard,
    DualStack,
}

/// Whether the kernel's cgroup id can name a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupMode {
    /// Only cgroup2 (`/sys/fs/cgroup` is cgroup2): every process has a v2 cgroup.
    V2,
    /// v1 controllers plus cgroup2 at another mount point (e.g. `/sys/fs/cgroup/unified`):
    /// runc also places containers there, so the v2 id still names them.
    Hybrid,
    /// No cgroup2 mounted: the kernel's cgroup id is the root's for every process, and
    /// containers are matched by network namespace and /proc/<pid>/cgroup instead.
    V1,
}
