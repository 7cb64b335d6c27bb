//! The live port table: who holds which port in which network namespace, and the
//! attribution of a conflict to the sockets that block it.
//!
//! Sources: a sock_diag snapshot of every namespace at start-up (so holders that predate the
//! agent are known), kernel events as they happen (bind, listen, close, exit, TCP state), and
//! a periodic sock_diag reconciliation that heals what events cannot see (fds passed between
//! processes, dup'ed or inherited fds, io_uring binds) and counts the drift it healed.
//!
//! Pure logic: no syscalls here, so it is unit-tested with fakes.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr, SocketAddrV6},
    sync::Arc,
};

use portwatch_schema::SockState;

use crate::model::ContainerRef;
pub use crate::model::{overlap, Overlap, Owner, Proto};
pub use portwatch_schema::Cause;

pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// A socket address in 24 bytes instead of `SocketAddr`'s 32: IPv6 flow info is never
/// kept, and the scope id is kept as a plain number (it is only set for link-local IPv6,
/// where it tells interfaces apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    ip: IpAddr,
    port: u16,
    scope: u32,
}

impl Addr {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl From<SocketAddr> for Addr {
    fn from(a: SocketAddr) -> Addr {
        let scope = match a {
            SocketAddr::V6(v6) => v6.scope_id(),
            SocketAddr::V4(_) => 0,
        };
        Addr {
            ip: a.ip(),
            port: a.port(),
            scope,
        }
    }
}

impl From<Addr> for SocketAddr {
    fn from(a: Addr) -> SocketAddr {
        match a.ip {
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, a.port, 0, a.scope)),
            v4 @ IpAddr::V4(_) => SocketAddr::new(v4, a.port),
        }
    }
}

/// One socket of the table: 80 bytes. A table of 100k sockets is mostly these.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Kernel `struct sock` address from events (0 when only sock_diag saw it).
    pub sk: u64,
    pub owner: Option<Arc<Owner>>,
    /// Wall-clock ns when portwatch saw it bound; 0 if it did not.
    pub since_ns: i64,
    pub local: Addr,
    pub remote: Addr,
    /// Socket inode (sock_diag reports 32 bits); 0 if unknown or none (TIME_WAIT).
    pub inode: u32,
    pub proto: Proto,
    /// Kernel state number (TCP); UDP sockets keep what sock_diag reports.
    pub state: u8,
    pub v6only: Option<bool>,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 80);

impl Entry {
    /// A socket as sock_diag reported it, with the owner the /proc scan found for it;
    /// since is unknown.
    pub fn from_diag(d: &crate::host::diag::SockEntry, owner: Option<Arc<Owner>>) -> Entry {
        Entry {
            proto: d.proto,
            local: d.local.into(),
            remote: d.remote.into(),
            state: d.state,
            // sock_diag's idiag_inode is 32 bits wide.
            inode: d.inode as u32,
            sk: 0,
            owner,
            since_ns: 0,
            v6only: d.v6only,
        }
    }

    /// `sock_state` by name, as `ports` shows it.
    pub fn state_name(&self) -> &'static str {
        self.sock_state().known().unwrap_or("UNKNOWN")
    }

    /// As the record schema types it: `UDP`, `BOUND` (TCP, bound, not listening), else the
    /// TCP state.
    pub fn sock_state(&self) -> SockState {
        match (self.proto, self.state) {
            (Proto::Udp, _) => SockState::Udp,
            (_, TCP_CLOSE) => SockState::Bound,
            (_, s) => crate::kernel::decode::sock_state(u16::from(s)),
        }
    }

    /// What identifies a socket without its inode (one the events added has none).
    fn addr_key(&self) -> AddrKey {
        (
            self.proto,
            self.local,
            self.remote,
            self.state == TCP_TIME_WAIT,
        )
    }

    /// What reconciliation carries over from the entry the table had for the same socket:
    /// what only events know (when it was bound, its `struct sock`) and the owner they saw
    /// bind it, which is exact where the /proc scan only finds some holder of the fd.
    fn carry_from(&mut self, old: Entry) {
        if old.owner.is_some() {
            self.owner = old.owner;
        }
        self.since_ns = old.since_ns;
        self.sk = old.sk;
    }
}

type AddrKey = (Proto, Addr, Addr, bool);

type Bucket = Vec<Entry>;

/// (netns, proto, local port)
type Key = (u32, Proto, u16);

/// TIME_WAIT sockets of one (netns, TCP port). They have no owner and can number hundreds
/// of thousands on a busy host, so only their local address and expiry are kept: 16 bytes a
/// socket instead of a full `Entry`. Expiries are in time order.
type TwBucket = Vec<(IpAddr, VecDeque<i128>)>;

#[derive(Default)]
pub struct PortTable {
    ports: HashMap<Key, Bucket>,
    tw: HashMap<(u32, u16), TwBucket>,
    /// The owner of each process that bound something, shared by all its entries.
    owners: HashMap<u32, Arc<Owner>>,
    /// Entries healed by reconciliation (added or removed), since start.
    pub drift_healed: u64,
}

/// One entry of a conflict's `holders`: the schema's own type.
pub use portwatch_schema::Holder;

/// Where a holder stands in Docker, as the container index tells it.
pub struct Placement {
    pub container: Option<Arc<ContainerRef>>,
    pub via: Option<&'static str>,
    pub container_port: Option<u16>,
    /// A binder's socket that no known container runs or starts with: left behind.
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub holders: Vec<Holder>,
    pub cause: Cause,
    pub overlap: Option<Overlap>,
    pub hint: String,
    pub reason: Option<String>,
}

/// What was attempted.
pub struct Attempt<'a> {
    pub netns: u32,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    pub op_listen: bool,
    /// The actor's own socket, excluded from its holders (listen-time conflicts).
    pub actor_sk: u64,
    pub now_ns: i128,
    pub proto_name: &'a str,
    /// The container a failing docker-proxy/dockerd bind was publishing for: hints then
    /// suggest another host port for it rather than "bind another port".
    pub publishing: Option<&'a str>,
    /// The namespace's net.ipv4.ip_local_port_range: a connected socket holding the port as
    /// its local port from this range took it as an outbound connection's source port.
    pub ephemeral: (u16, u16),
}

pub fn fmt_addr(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 @ IpAddr::V4(_) => format!("{v4}:{port}"),
    }
}

impl PortTable {
    pub fn len(&self) -> usize {
        self.ports.values().map(Vec::len).sum::<usize>() + self.time_wait_len()
    }

    fn time_wait_len(&self) -> usize {
        self.tw.values().flatten().map(|(_, q)| q.len()).sum()
    }

    fn add_time_wait(&mut self, netns: u32, local: SocketAddr, expires: i128) {
        let b = self.tw.entry((netns, local.port())).or_default();
        match b.iter_mut().find(|(a, _)| *a == local.ip()) {
            Some((_, q)) => {
                // Expired ones leave from the front as new ones come in at the back.
                while q.front().is_some_and(|t| *t <= expires - 60_000_000_000) {
                    q.pop_front();
                }
                q.push_back(expires);
            }
            None => b.push((local.ip(), VecDeque::from([expires]))),
        }
    }

    /// TIME_WAIT sockets per (netns, addr, port) that have not expired at `now_ns`.
    pub fn time_wait_rows(
        &self,
        now_ns: i128,
    ) -> impl Iterator<Item = (u32, IpAddr, u16, usize)> + '_ {
        self.tw.iter().flat_map(move |((ns, port), b)| {
            b.iter()
                .map(move |(a, q)| (*ns, *a, *port, q.iter().filter(|t| **t > now_ns).count()))
                .filter(|r| r.3 > 0)
        })
    }

    fn bucket(&mut self, netns: u32, proto: Proto, port: u16) -> &mut Bucket {
        // Most ports are held by one socket; a Vec's default first growth is 4.
        self.ports
            .entry((netns, proto, port))
            .or_insert_with(|| Vec::with_capacity(1))
    }

    /// The shared owner for a process, as its events describe it: the one the table
    /// already holds when nothing changed (the usual case: no allocation per socket), else
    /// a new one that replaces it (after exec, or a reused pid).
    pub fn owner(
        &mut self,
        pid: u32,
        comm: &str,
        cmdline: Option<Arc<str>>,
        uid: u32,
    ) -> Arc<Owner> {
        if let Some(o) = self.owners.get(&pid) {
            if &*o.comm == comm && o.uid == uid && o.cmdline == cmdline {
                return o.clone();
            }
        }
        let o = Arc::new(Owner {
            pid,
            comm: Arc::from(comm),
            cmdline,
            uid,
        });
        self.owners.insert(pid, o.clone());
        o
    }

    /// A successful bind seen by the kernel programs.
    pub fn on_bind(&mut self, netns: u32, e: Entry) {
        let b = self.bucket(netns, e.proto, e.local.port());
        let pid = e.owner.as_ref().map(|o| o.pid);
        // The same socket may already be there: from an earlier event with the same sk, or
        // from the start-up snapshot (taken after the programs were attached, so an event
        // queued before it arrives after it).
        b.retain(|x| {
            !((e.sk != 0 && x.sk == e.sk)
                || (x.sk == 0
                    && x.local == e.local
                    && x.state != TCP_TIME_WAIT
                    && x.remote.port() == 0
                    && owned_by(x, pid)))
        });
        b.push(e);
    }

    /// A successful listen: the socket (found by `sk`, else by owner and address) is now
    /// LISTEN.
    pub fn on_listen(&mut self, netns: u32, e: Entry) {
        let b = self.bucket(netns, Proto::Tcp, e.local.port());
        let pid = e.owner.as_ref().map(|o| o.pid);
        let by_sk = b.iter().position(|x| e.sk != 0 && x.sk == e.sk);
        let by_owner = || {
            b.iter().position(|x| {
                x.local == e.local
                    && (x.state == TCP_CLOSE || (x.state == TCP_LISTEN && x.sk == 0))
                    && x.remote.port() == 0
                    && owned_by(x, pid)
            })
        };
        if let Some(x) = by_sk.or_else(by_owner).map(|i| &mut b[i]) {
            x.state = TCP_LISTEN;
            if x.sk == 0 {
                x.sk = e.sk;
            }
            if x.owner.is_none() {
                x.owner = e.owner;
            }
        } else {
            b.push(Entry {
                state: TCP_LISTEN,
                ..e
            });
        }
    }

    /// close() of a socket portwatch saw bound.
    pub fn on_close(&mut self, netns: u32, proto: Proto, port: u16, sk: u64, pid: u32) {
        let key = (netns, proto, port);
        if let Some(b) = self.ports.get_mut(&key) {
            b.retain(|x| {
                let mine = if sk != 0 {
                    x.sk == sk
                } else {
                    x.owner.as_ref().is_some_and(|o| o.pid == pid)
                };
                // A listener closed with connections still open goes on in TIME_WAIT etc.;
                // those are separate entries and stay.
                !(mine && x.state != TCP_TIME_WAIT)
            });
            if b.is_empty() {
                self.ports.remove(&key);
            }
        }
    }

    /// A TCP state change. LISTEN->CLOSE drops the listener; FIN_WAIT2/CLOSING->CLOSE is
    /// entry into TIME_WAIT (this tracepoint never reports TIME_WAIT itself), which adds a
    /// TIME_WAIT entry expiring after the kernel's fixed 60 s.
    pub fn on_tcp_state(&mut self, netns: u32, e: &Entry, old: u8, new: u8) {
        let port = e.local.port();
        if old == TCP_LISTEN && new == TCP_CLOSE {
            if let Some(b) = self.ports.get_mut(&(netns, Proto::Tcp, port)) {
                b.retain(|x| !(x.state == TCP_LISTEN && (x.sk == e.sk || x.local == e.local)));
            }
        } else if crate::kernel::decode::enters_time_wait(old.into(), new.into()) {
            if e.sk != 0 {
                if let Some(b) = self.ports.get_mut(&(netns, Proto::Tcp, port)) {
                    b.retain(|x| !(x.state != TCP_TIME_WAIT && x.sk == e.sk));
                }
            }
            let at = i128::from(e.since_ns);
            self.add_time_wait(netns, e.local.into(), at + 60_000_000_000);
        }
    }

    /// The process exited: its sockets are gone unless another process shares them, which
    /// the next reconciliation will show.
    pub fn on_exit(&mut self, pid: u32) {
        self.owners.remove(&pid);
        self.ports.retain(|_, b| {
            b.retain(|x| {
                !(x.state != TCP_TIME_WAIT && x.owner.as_ref().is_some_and(|o| o.pid == pid))
            });
            !b.is_empty()
        });
    }

    /// `on_exit`, for one namespace's sockets only (the owner table is left alone: the pid
    /// may own sockets elsewhere that a later dump shows).
    pub fn on_exit_in(&mut self, netns: u32, pid: u32) {
        self.ports.retain(|k, b| {
            if k.0 != netns {
                return true;
            }
            b.retain(|x| {
                !(x.state != TCP_TIME_WAIT && x.owner.as_ref().is_some_and(|o| o.pid == pid))
            });
            !b.is_empty()
        });
    }

    /// The entries of one (namespace, protocol, port).
    pub fn rows_at(&self, netns: u32, proto: Proto, port: u16) -> impl Iterator<Item = &Entry> {
        self.ports.get(&(netns, proto, port)).into_iter().flatten()
    }

    /// Every entry with its namespace.
    pub fn rows(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.ports
            .iter()
            .flat_map(|(k, b)| b.iter().map(move |e| (k.0, e)))
    }
}

mod attribution;
mod reconcile;

use reconcile::owned_by;
pub use reconcile::NsSockets;

#[cfg(test)]
mod tests;
