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
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::Serialize;

use crate::containers::ContainerRef;
pub use crate::diag::Proto;

pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// Who owns a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Arc<str>,
    pub cmdline: Option<Arc<str>>,
    pub uid: u32,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel state number (TCP); UDP sockets keep what sock_diag reports.
    pub state: u8,
    pub inode: u64,
    /// Kernel `struct sock` address from events (0 when only sock_diag saw it).
    pub sk: u64,
    pub owner: Option<Owner>,
    /// Wall-clock ns when portwatch saw it bound, if it did.
    pub since_ns: Option<i128>,
    pub v6only: Option<bool>,
    /// Wall-clock ns at which a TIME_WAIT socket expires.
    pub expires_ns: Option<i128>,
}

impl Entry {
    /// A socket as sock_diag reported it at `wall_ns`; owner and since are unknown yet.
    pub fn from_diag(d: &crate::diag::SockEntry, wall_ns: i128) -> Entry {
        Entry {
            proto: d.proto,
            local: d.local,
            remote: d.remote,
            state: d.state,
            inode: d.inode,
            sk: 0,
            owner: None,
            since_ns: None,
            v6only: d.v6only,
            expires_ns: (d.state == TCP_TIME_WAIT)
                .then(|| wall_ns + i128::from(d.expires_ms) * 1_000_000),
        }
    }

    pub fn state_name(&self) -> &'static str {
        match (self.proto, self.state) {
            (Proto::Udp, _) => "UDP",
            (_, TCP_LISTEN) => "LISTEN",
            (_, TCP_TIME_WAIT) => "TIME_WAIT",
            (_, TCP_CLOSE) => "BOUND",
            (_, s) => crate::decode::tcp_state_name(s as u16),
        }
    }

    fn same_socket(&self, o: &Entry) -> bool {
        (self.inode != 0 && self.inode == o.inode)
            || (self.proto == o.proto
                && self.local == o.local
                && self.remote == o.remote
                && (self.state == TCP_TIME_WAIT) == (o.state == TCP_TIME_WAIT))
    }
}

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
    /// Entries healed by reconciliation (added or removed), since start.
    pub drift_healed: u64,
}

/// How a holder's address overlaps the attempted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    Exact,
    Wildcard,
    DualStack,
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 they carry.
fn canon(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
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

/// One entry of a conflict's `holders`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Holder {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub state: &'static str,
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
    pub overlap: Overlap,
    /// When portwatch saw it bound (RFC 3339), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// TIME_WAIT only: how many sockets this entry stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// TIME_WAIT only: seconds until the first of them expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u32>,
    /// The container the owner runs in, or, with `via`, whose published port it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Arc<ContainerRef>>,
    /// `docker-proxy` or `dockerd`: the socket is a published port held for `container`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<&'static str>,
    /// With `via`: the container port it forwards to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
}

/// Where a holder stands in Docker, as the container index tells it.
pub struct Placement {
    pub container: Arc<ContainerRef>,
    pub via: Option<&'static str>,
    pub container_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub holders: Vec<Holder>,
    pub cause: &'static str,
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
    pub actor_pid: u32,
    /// The actor's own socket, excluded from its holders (listen-time conflicts).
    pub actor_sk: u64,
    pub now_ns: i128,
    pub proto_name: &'a str,
    /// The container a failing docker-proxy/dockerd bind was publishing for: hints then
    /// suggest another host port for it rather than "bind another port".
    pub publishing: Option<&'a str>,
}

pub fn fmt_addr(a: IpAddr, port: u16) -> String {
    match a {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
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
        self.ports.entry((netns, proto, port)).or_default()
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
                    && x.owner.as_ref().map(|o| o.pid) == pid))
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
                    && x.owner.as_ref().map(|o| o.pid) == pid
            })
        };
        if let Some(x) = by_sk.or_else(by_owner).map(|i| &mut b[i]) {
            x.state = TCP_LISTEN;
            if x.sk == 0 {
                x.sk = e.sk;
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
        } else if new == TCP_CLOSE && (old == 5 || old == 11) {
            if e.sk != 0 {
                if let Some(b) = self.ports.get_mut(&(netns, Proto::Tcp, port)) {
                    b.retain(|x| !(x.state != TCP_TIME_WAIT && x.sk == e.sk));
                }
            }
            let at = e.since_ns.unwrap_or(0);
            self.add_time_wait(netns, e.local, at + 60_000_000_000);
        }
    }

    /// The process exited: its sockets are gone unless another process shares them, which
    /// the next reconciliation will show.
    pub fn on_exit(&mut self, pid: u32) {
        self.ports.retain(|_, b| {
            b.retain(|x| {
                !(x.state != TCP_TIME_WAIT && x.owner.as_ref().is_some_and(|o| o.pid == pid))
            });
            !b.is_empty()
        });
    }

    /// Replace one namespace's entries with a sock_diag snapshot. What events told us about a
    /// socket (owner, since, sk) is kept when the snapshot has the same socket; owners of new
    /// sockets come from `owners` (inode -> owner). Returns the number of entries healed:
    /// sockets the table lacked plus sockets it had that no longer exist.
    pub fn reconcile(
        &mut self,
        netns: u32,
        snapshot: Vec<Entry>,
        owners: &dyn Fn(u64) -> Option<Owner>,
        now_ns: i128,
    ) -> u64 {
        let mut old: HashMap<Key, Bucket> = HashMap::new();
        self.ports.retain(|k, b| {
            if k.0 == netns {
                old.insert(*k, std::mem::take(b));
                false
            } else {
                true
            }
        });
        // TIME_WAIT: the snapshot is the truth, events since then are re-added by the kernel's
        // next entries. Rebuilt for this namespace, sorted by expiry.
        self.tw.retain(|k, _| k.0 != netns);
        let mut tws: Vec<(SocketAddr, i128)> = Vec::new();
        let mut healed = 0u64;
        for mut e in snapshot {
            if e.proto == Proto::Tcp && e.state == TCP_TIME_WAIT {
                tws.push((e.local, e.expires_ns.unwrap_or(now_ns + 60_000_000_000)));
                continue;
            }
            let key = (netns, e.proto, e.local.port());
            let prev = old.get_mut(&key).and_then(|b| {
                let i = b.iter().position(|x| x.same_socket(&e))?;
                Some(b.swap_remove(i))
            });
            match prev {
                Some(p) => {
                    e.owner = e.owner.or(p.owner);
                    e.since_ns = p.since_ns;
                    e.sk = p.sk;
                    if e.state == TCP_TIME_WAIT && e.expires_ns.is_none() {
                        e.expires_ns = p.expires_ns;
                    }
                }
                None => {
                    healed += 1;
                    if e.owner.is_none() && e.inode != 0 {
                        e.owner = owners(e.inode);
                    }
                }
            }
            if e.state == TCP_TIME_WAIT && e.expires_ns.is_none() {
                e.expires_ns = Some(now_ns + 60_000_000_000);
            }
            self.ports.entry(key).or_default().push(e);
        }
        tws.sort_unstable_by_key(|t| t.1);
        for (local, exp) in tws {
            let b = self.tw.entry((netns, local.port())).or_default();
            match b.iter_mut().find(|(a, _)| *a == local.ip()) {
                Some((_, q)) => q.push_back(exp),
                None => b.push((local.ip(), VecDeque::from([exp]))),
            }
        }
        // What the table had but the kernel no longer does. TIME_WAIT entries that expired
        // are normal, not drift.
        for b in old.values() {
            healed += b
                .iter()
                .filter(|x| {
                    x.state != TCP_TIME_WAIT
                        || x.expires_ns.is_some_and(|t| t > now_ns + 1_000_000_000)
                })
                .count() as u64;
        }
        self.drift_healed += healed;
        healed
    }

    /// Every entry with its namespace.
    pub fn rows(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.ports
            .iter()
            .flat_map(|(k, b)| b.iter().map(move |e| (k.0, e)))
    }

    /// Who blocks `a`, why, and what to do (without Docker placement).
    pub fn attribute(&self, a: &Attempt<'_>) -> Attribution {
        self.attribute_with(a, &mut |_| None)
    }

    /// `attribute`, with each owned socket placed in Docker by `place`: a holder in a
    /// container names it, and a published port held by docker-proxy/dockerd makes the
    /// cause `docker_published`.
    pub fn attribute_with(
        &self,
        a: &Attempt<'_>,
        place: &mut dyn FnMut(&Entry) -> Option<Placement>,
    ) -> Attribution {
        let mut holders = Vec::new();
        let mut tw: Option<(u32, i128, IpAddr, Overlap)> = None;
        let mut kinds = (false, false, false); // listener, bound, time_wait
        let mut best_overlap: Option<Overlap> = None;
        let empty = Vec::new();
        let bucket = self
            .ports
            .get(&(a.netns, a.proto, a.port))
            .unwrap_or(&empty);
        for x in bucket {
            if a.actor_sk != 0 && x.sk == a.actor_sk {
                continue;
            }
            // listen(): the actor's own bound socket is not its blocker.
            if a.op_listen
                && x.state != TCP_LISTEN
                && x.owner.as_ref().is_some_and(|o| o.pid == a.actor_pid)
            {
                continue;
            }
            // listen() conflicts only with other listeners.
            if a.op_listen && x.state != TCP_LISTEN {
                continue;
            }
            let Some(ov) = overlap(a.addr, None, x.local.ip(), x.v6only) else {
                continue;
            };
            best_overlap = Some(match best_overlap {
                Some(Overlap::Exact) => Overlap::Exact,
                _ if ov == Overlap::Exact => Overlap::Exact,
                Some(o) => o,
                None => ov,
            });
            if x.proto == Proto::Tcp && x.state == TCP_TIME_WAIT {
                kinds.2 = true;
                let exp = x.expires_ns.unwrap_or(a.now_ns + 60_000_000_000);
                tw = Some(match tw {
                    Some((n, e, ad, o)) => (n + 1, e.min(exp), ad, o),
                    None => (1, exp, x.local.ip(), ov),
                });
                continue;
            }
            if x.proto == Proto::Tcp && x.state == TCP_LISTEN {
                kinds.0 = true;
            } else {
                kinds.1 = true;
            }
            let p = place(x);
            holders.push(Holder {
                pid: x.owner.as_ref().map(|o| o.pid),
                comm: x.owner.as_ref().map(|o| o.comm.clone()),
                cmdline: x.owner.as_ref().and_then(|o| o.cmdline.clone()),
                uid: x.owner.as_ref().map(|o| o.uid),
                state: x.state_name(),
                proto: a.proto.name(),
                addr: x.local.ip(),
                port: x.local.port(),
                overlap: ov,
                since: x.since_ns.map(crate::decode::rfc3339),
                count: None,
                expires_in_s: None,
                via: p.as_ref().and_then(|p| p.via),
                container_port: p.as_ref().and_then(|p| p.container_port),
                container: p.map(|p| p.container),
            });
        }
        if !a.op_listen && a.proto == Proto::Tcp {
            for (addr, q) in self.tw.get(&(a.netns, a.port)).into_iter().flatten() {
                let Some(ov) = overlap(a.addr, None, *addr, None) else {
                    continue;
                };
                let live = q.iter().filter(|t| **t > a.now_ns);
                let (n, soonest) = live.fold((0u32, i128::MAX), |(n, m), t| (n + 1, m.min(*t)));
                if n == 0 {
                    continue;
                }
                kinds.2 = true;
                best_overlap = Some(match best_overlap {
                    Some(Overlap::Exact) => Overlap::Exact,
                    _ if ov == Overlap::Exact => Overlap::Exact,
                    Some(o) => o,
                    None => ov,
                });
                tw = Some(match tw {
                    Some((c, e, ad, o)) => (c + n, e.min(soonest), ad, o),
                    None => (n, soonest, *addr, ov),
                });
            }
        }
        // Listeners first: they are the usual answer.
        holders.sort_by_key(|h| (h.state != "LISTEN", h.pid));
        let tw_holder = tw.map(|(n, exp, addr, ov)| Holder {
            pid: None,
            comm: None,
            cmdline: None,
            uid: None,
            state: "TIME_WAIT",
            proto: "tcp",
            addr,
            port: a.port,
            overlap: ov,
            since: None,
            count: Some(n),
            expires_in_s: Some(((exp - a.now_ns).max(0) as u64).div_ceil(1_000_000_000) as u32),
            container: None,
            via: None,
            container_port: None,
        });
        let target = fmt_addr(a.addr, a.port);
        let who = |h: &Holder| {
            let mut w = match (h.pid, &h.comm) {
                (Some(p), Some(c)) => format!("pid {p} ({c})"),
                (Some(p), None) => format!("pid {p}"),
                _ => "a socket with no known owner".to_string(),
            };
            if let Some(c) = &h.container {
                w.push_str(&format!(" in container {}", c.name));
            }
            w
        };
        let instead = match a.publishing {
            Some(name) => format!("publish {name} on another host port"),
            None => "bind another port".to_string(),
        };
        // The holder that decides the cause: a listener if there is one.
        let top = holders
            .iter()
            .find(|h| h.state == "LISTEN")
            .or(holders.first());
        let (cause, hint, reason) =
            if let Some((h, c, via)) = top.and_then(|h| Some((h, h.container.as_ref()?, h.via?))) {
                let target = h
                    .container_port
                    .map(|p| format!(" -> {p}/{}", h.proto))
                    .unwrap_or_default();
                let pid = h.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                (
                    "docker_published",
                    format!(
                    "container {} ({}, {}) publishes {}{target} through {via}{pid}; docker stop \
                     {}, or {instead}",
                    c.name,
                    c.image,
                    c.id,
                    fmt_addr(h.addr, h.port),
                    c.name
                ),
                    None,
                )
            } else if kinds.0 {
                let h = top.unwrap();
                (
                    "listener",
                    format!(
                        "{} listens on {}; stop it or {instead}",
                        who(h),
                        fmt_addr(h.addr, h.port)
                    ),
                    None,
                )
            } else if kinds.1 {
                let h = &holders[0];
                (
                    "bound",
                    format!(
                        "{} holds {} {} ({}); close that socket or {instead}",
                        who(h),
                        a.proto_name,
                        fmt_addr(h.addr, h.port),
                        h.state
                    ),
                    None,
                )
            } else if let Some(h) = &tw_holder {
                let n = h.count.unwrap_or(0);
                (
                    "time_wait",
                    format!(
                        "{n} TIME_WAIT socket{} on {} expire within {} s; set SO_REUSEADDR on the \
                     listener (the old one lacked it too) or wait",
                        if n == 1 { "" } else { "s" },
                        target,
                        h.expires_in_s.unwrap_or(60)
                    ),
                    None,
                )
            } else {
                (
                    "unknown",
                    String::new(),
                    Some(format!(
                        "no socket in network namespace {} holds {} {} (the holder may have gone \
                     already)",
                        a.netns, a.proto_name, target
                    )),
                )
            };
        holders.extend(tw_holder);
        Attribution {
            holders,
            cause,
            overlap: best_overlap,
            hint,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn owner(pid: u32, comm: &str) -> Option<Owner> {
        Some(Owner {
            pid,
            comm: comm.into(),
            cmdline: None,
            uid: 0,
        })
    }

    fn entry(proto: Proto, local: &str, state: u8, pid: u32) -> Entry {
        Entry {
            proto,
            local: sa(local),
            remote: sa("0.0.0.0:0"),
            state,
            inode: 0,
            sk: 0,
            owner: (pid != 0).then(|| owner(pid, "nginx")).flatten(),
            since_ns: None,
            v6only: None,
            expires_ns: None,
        }
    }

    fn attempt(addr: &str, port: u16, proto: Proto) -> Attempt<'static> {
        Attempt {
            netns: 1,
            proto,
            addr: addr.parse().unwrap(),
            port,
            op_listen: false,
            actor_pid: 99,
            actor_sk: 0,
            now_ns: 0,
            proto_name: if proto == Proto::Tcp { "tcp" } else { "udp" },
            publishing: None,
        }
    }

    #[test]
    fn overlaps() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            overlap(ip("127.0.0.1"), None, ip("127.0.0.1"), None),
            Some(Overlap::Exact)
        );
        assert_eq!(
            overlap(ip("127.0.0.1"), None, ip("0.0.0.0"), None),
            Some(Overlap::Wildcard)
        );
        assert_eq!(
            overlap(ip("0.0.0.0"), None, ip("127.0.0.1"), None),
            Some(Overlap::Wildcard)
        );
        assert_eq!(overlap(ip("127.0.0.1"), None, ip("127.0.0.2"), None), None);
        assert_eq!(
            overlap(ip("0.0.0.0"), None, ip("::"), None),
            Some(Overlap::DualStack)
        );
        assert_eq!(overlap(ip("0.0.0.0"), None, ip("::"), Some(true)), None);
        assert_eq!(
            overlap(ip("::"), None, ip("10.0.0.1"), None),
            Some(Overlap::DualStack)
        );
        assert_eq!(overlap(ip("::1"), None, ip("127.0.0.1"), None), None);
        assert_eq!(
            overlap(ip("::ffff:127.0.0.1"), None, ip("127.0.0.1"), None),
            Some(Overlap::Exact)
        );
    }

    #[test]
    fn listener_cause_and_hint() {
        let mut t = PortTable::default();
        t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_CLOSE, 4242));
        t.on_listen(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_CLOSE, 4242));
        let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
        assert_eq!(a.cause, "listener");
        assert_eq!(a.overlap, Some(Overlap::Wildcard));
        assert_eq!(a.holders.len(), 1);
        assert_eq!(a.holders[0].pid, Some(4242));
        assert_eq!(a.holders[0].state, "LISTEN");
        assert_eq!(
            a.hint,
            "pid 4242 (nginx) listens on 0.0.0.0:8080; stop it or bind another port"
        );
        // Other namespace, other proto: nothing.
        let mut other = attempt("127.0.0.1", 8080, Proto::Tcp);
        other.netns = 2;
        assert_eq!(t.attribute(&other).cause, "unknown");
        assert_eq!(
            t.attribute(&attempt("127.0.0.1", 8080, Proto::Udp)).cause,
            "unknown"
        );
    }

    #[test]
    fn bound_udp_and_close() {
        let mut t = PortTable::default();
        let mut e = entry(Proto::Udp, "127.0.0.1:5353", TCP_CLOSE, 7);
        e.sk = 0xabc;
        t.on_bind(1, e);
        let a = t.attribute(&attempt("127.0.0.1", 5353, Proto::Udp));
        assert_eq!(a.cause, "bound");
        assert_eq!(a.holders[0].state, "UDP");
        t.on_close(1, Proto::Udp, 5353, 0xabc, 7);
        assert_eq!(
            t.attribute(&attempt("127.0.0.1", 5353, Proto::Udp)).cause,
            "unknown"
        );
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn time_wait_only_aggregates() {
        let mut t = PortTable::default();
        for i in 0..3 {
            let mut e = entry(Proto::Tcp, "127.0.0.1:8080", TCP_TIME_WAIT, 0);
            e.remote = sa(&format!("127.0.0.1:{}", 40000 + i));
            e.expires_ns = Some((41 + i as i128) * 1_000_000_000);
            t.ports.entry((1, Proto::Tcp, 8080)).or_default().push(e);
        }
        let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
        assert_eq!(a.cause, "time_wait");
        assert_eq!(a.holders.len(), 1);
        assert_eq!(a.holders[0].count, Some(3));
        assert_eq!(a.holders[0].expires_in_s, Some(41));
        assert!(
            a.hint
                .starts_with("3 TIME_WAIT sockets on 127.0.0.1:8080 expire within 41 s"),
            "{}",
            a.hint
        );
    }

    #[test]
    fn listen_conflict_excludes_own_socket() {
        let mut t = PortTable::default();
        let mut mine = entry(Proto::Tcp, "127.0.0.1:9000", TCP_CLOSE, 99);
        mine.sk = 2;
        let mut other = entry(Proto::Tcp, "127.0.0.1:9000", TCP_CLOSE, 99);
        other.sk = 1;
        t.on_bind(1, other.clone());
        t.on_bind(1, mine);
        t.on_listen(1, other);
        let mut a = attempt("127.0.0.1", 9000, Proto::Tcp);
        a.op_listen = true;
        a.actor_sk = 2;
        let r = t.attribute(&a);
        assert_eq!(r.cause, "listener");
        assert_eq!(r.holders.len(), 1);
        assert_eq!(r.holders[0].state, "LISTEN");
    }

    #[test]
    fn reconcile_keeps_event_facts_and_counts_drift() {
        let mut t = PortTable::default();
        let mut e = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242);
        e.since_ns = Some(5);
        e.inode = 77;
        t.on_bind(1, e);
        t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:9999", TCP_CLOSE, 1)); // gone in the kernel
        let mut snap_same = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 0);
        snap_same.inode = 77;
        let mut snap_new = entry(Proto::Tcp, "0.0.0.0:7000", TCP_LISTEN, 0);
        snap_new.inode = 88;
        let owners = |ino: u64| (ino == 88).then(|| owner(555, "passed").unwrap());
        let healed = t.reconcile(1, vec![snap_same, snap_new], &owners, 0);
        assert_eq!(healed, 2, "one new, one vanished");
        assert_eq!(t.drift_healed, 2);
        let a = t.attribute(&attempt("0.0.0.0", 8080, Proto::Tcp));
        assert_eq!(a.holders[0].pid, Some(4242), "owner from events kept");
        assert!(a.holders[0].since.is_some());
        let b = t.attribute(&attempt("0.0.0.0", 7000, Proto::Tcp));
        assert_eq!(b.holders[0].pid, Some(555), "owner from the inode map");
        assert_eq!(
            t.attribute(&attempt("0.0.0.0", 9999, Proto::Tcp)).cause,
            "unknown"
        );
    }

    fn web1() -> Arc<ContainerRef> {
        Arc::new(ContainerRef {
            id: "99c0b70358a8".into(),
            name: "web1".into(),
            image: "nginx:1.27".into(),
            compose_project: Some("shop".into()),
            compose_service: Some("web".into()),
        })
    }

    #[test]
    fn published_port_makes_the_cause_docker_published() {
        let mut t = PortTable::default();
        let mut proxy = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 31032);
        proxy.owner = owner(31032, "docker-proxy");
        t.on_bind(1, proxy);
        let mut place = |x: &Entry| {
            (x.owner.as_ref()?.comm.as_ref() == "docker-proxy").then(|| Placement {
                container: web1(),
                via: Some("docker-proxy"),
                container_port: Some(80),
            })
        };
        let a = t.attribute_with(&attempt("127.0.0.1", 8080, Proto::Tcp), &mut place);
        assert_eq!(a.cause, "docker_published");
        assert_eq!(a.holders[0].via, Some("docker-proxy"));
        assert_eq!(
            a.holders[0].container.as_deref().map(|c| &*c.name),
            Some("web1")
        );
        assert_eq!(
            a.hint,
            "container web1 (nginx:1.27, 99c0b70358a8) publishes 0.0.0.0:8080 -> 80/tcp through \
             docker-proxy (pid 31032); docker stop web1, or bind another port"
        );
        let v = serde_json::to_value(&a.holders[0]).unwrap();
        assert_eq!(v["container"]["compose_project"], "shop");
        assert_eq!(v["container_port"], 80);
        // Without placement the same socket is an ordinary listener.
        assert_eq!(
            t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp)).cause,
            "listener"
        );
    }

    #[test]
    fn holder_in_a_container_and_an_actor_publishing() {
        let mut t = PortTable::default();
        t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242));
        let mut place = |_: &Entry| {
            Some(Placement {
                container: web1(),
                via: None,
                container_port: None,
            })
        };
        let mut at = attempt("0.0.0.0", 8080, Proto::Tcp);
        at.publishing = Some("web2");
        let a = t.attribute_with(&at, &mut place);
        assert_eq!(a.cause, "listener");
        assert_eq!(
            a.hint,
            "pid 4242 (nginx) in container web1 listens on 0.0.0.0:8080; stop it or publish web2 \
             on another host port"
        );
        let v = serde_json::to_value(&a.holders[0]).unwrap();
        assert!(
            v.get("via").is_none() && v.get("container_port").is_none(),
            "{v}"
        );
    }

    #[test]
    fn tcp_state_time_wait_entry_and_listener_stop() {
        let mut t = PortTable::default();
        let mut l = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242);
        l.sk = 9;
        t.on_bind(1, l.clone());
        let mut tw = entry(Proto::Tcp, "127.0.0.1:8080", 0, 0);
        tw.remote = sa("127.0.0.1:50000");
        tw.since_ns = Some(0);
        t.on_tcp_state(1, &tw, 5, TCP_CLOSE);
        t.on_tcp_state(1, &l, TCP_LISTEN, TCP_CLOSE);
        let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
        assert_eq!(a.cause, "time_wait");
        assert_eq!(a.holders[0].expires_in_s, Some(60));
    }
}
