//! The few types every stage shares: a socket's protocol, its owner, how two bound
//! addresses overlap, and how a container is named. Nothing here depends on another
//! module of the agent.

use std::{net::IpAddr, sync::Arc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As records write it.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// As the record schema types it.
    pub fn schema(self) -> portwatch_schema::Proto {
        match self {
            Proto::Tcp => portwatch_schema::Proto::Tcp,
            Proto::Udp => portwatch_schema::Proto::Udp,
        }
    }
}

/// Who owns a socket. Shared: every socket of a process points at one `Owner` (a server
/// with 50k connections holds one, not 50k copies), see `PortTable::owner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Arc<str>,
    pub cmdline: Option<Arc<str>>,
    pub uid: u32,
}

/// How a holder's address overlaps the attempted one: the schema's own type.
pub use portwatch_schema::Overlap;

/// IPv4-mapped IPv6 addresses compare as the IPv4 they carry.
fn canon(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// Does a socket on `held` block a bind of `attempt` (same port, same proto)?
pub fn overlap(
    attempt: IpAddr,
    attempt_v6only: Option<bool>,
    held: IpAddr,
    held_v6only: Option<bool>,
) -> Option<Overlap> {
    let (a, h) = (canon(attempt), canon(held));
    match (a, h) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            if a == h {
                Some(Overlap::Exact)
            } else if a.is_unspecified() || h.is_unspecified() {
                Some(Overlap::Wildcard)
            } else {
                None
            }
        }
        // [::] without IPV6_V6ONLY also takes the port on every IPv4 address.
        (IpAddr::V4(_), IpAddr::V6(h6)) => {
            (h6.is_unspecified() && held_v6only != Some(true)).then_some(Overlap::DualStack)
        }
        (IpAddr::V6(a6), IpAddr::V4(_)) => {
            (a6.is_unspecified() && attempt_v6only != Some(true)).then_some(Overlap::DualStack)
        }
    }
}

/// How a container is named in records: the schema's own type. Shared (`Arc`), with
/// shared strings, so attaching it to a record costs no allocation.
pub use portwatch_schema::ContainerRef;
