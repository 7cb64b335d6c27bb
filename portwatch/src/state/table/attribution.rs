//! Attribution: who blocks an attempted bind, listen or publish, the one cause that
//! explains it, and a hint to act on. Reads the table only; the Docker placement of each
//! holder comes from the caller.

use portwatch_schema::{SockState, Text};
use std::net::{IpAddr, SocketAddr};

use super::{
    fmt_addr, overlap, Attempt, Attribution, Cause, Entry, Holder, Overlap, Placement, PortTable,
    Proto, TCP_LISTEN, TCP_TIME_WAIT,
};

/// What the sockets on the attempted port amount to, before a cause is chosen.
#[derive(Default)]
struct Found {
    holders: Vec<Holder>,
    /// TIME_WAIT sockets: how many, the soonest expiry (wall ns), an address, the overlap.
    tw: Option<(u32, i128, IpAddr, Overlap)>,
    listener: bool,
    bound: bool,
    time_wait: bool,
    best_overlap: Option<Overlap>,
    /// A client connection that got this port as its source port: (index in holders,
    /// its peer).
    collision: Option<(usize, SocketAddr)>,
}

impl Found {
    fn overlap_seen(&mut self, ov: Overlap) {
        self.best_overlap = Some(match self.best_overlap {
            Some(Overlap::Exact) => Overlap::Exact,
            _ if ov == Overlap::Exact => Overlap::Exact,
            Some(o) => o,
            None => ov,
        });
    }
}

impl PortTable {
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
        let mut f = self.sockets_on(a, place);
        if !a.op_listen && a.proto == Proto::Tcp {
            self.time_wait_on(a, &mut f);
        }
        // The collision's holder, before listeners are moved first.
        let collision = f.collision.map(|(i, peer)| (f.holders[i].clone(), peer));
        // Listeners first: they are the usual answer.
        f.holders.sort_by_key(|h| (h.state != "LISTEN", h.pid));
        let tw_holder = f.tw.map(|(n, exp, addr, ov)| Holder {
            pid: None,
            comm: None,
            cmdline: None,
            uid: None,
            state: SockState::TimeWait,
            proto: portwatch_schema::Proto::Tcp,
            addr,
            port: a.port,
            overlap: ov,
            since: None,
            count: Some(n),
            expires_in_s: Some(((exp - a.now_ns).max(0) as u64).div_ceil(1_000_000_000) as u32),
            container: None,
            via: None,
            container_port: None,
            stale: None,
        });
        let (cause, hint, reason) = explain(a, &f, collision.as_ref(), tw_holder.as_ref());
        let mut holders = f.holders;
        holders.extend(tw_holder);
        Attribution {
            holders,
            cause,
            overlap: f.best_overlap,
            hint,
            reason,
        }
    }

    /// The table's sockets on the attempted port that block it.
    fn sockets_on(
        &self,
        a: &Attempt<'_>,
        place: &mut dyn FnMut(&Entry) -> Option<Placement>,
    ) -> Found {
        let mut f = Found::default();
        let empty = Vec::new();
        let bucket = self
            .ports
            .get(&(a.netns, a.proto, a.port))
            .unwrap_or(&empty);
        for x in bucket {
            if a.actor_sk != 0 && x.sk == a.actor_sk {
                continue;
            }
            // listen() conflicts only with other listeners (so the actor's own bound socket
            // is not its blocker either).
            if a.op_listen && x.state != TCP_LISTEN {
                continue;
            }
            let Some(ov) = overlap(a.addr, None, x.local.ip(), x.v6only) else {
                continue;
            };
            f.overlap_seen(ov);
            if x.proto == Proto::Tcp && x.state == TCP_TIME_WAIT {
                // TIME_WAIT sockets are kept apart (`tw`); one here has no known expiry.
                f.time_wait = true;
                let exp = a.now_ns + 60_000_000_000;
                f.tw = Some(match f.tw {
                    Some((n, e, ad, o)) => (n + 1, e.min(exp), ad, o),
                    None => (1, exp, x.local.ip(), ov),
                });
                continue;
            }
            if x.proto == Proto::Tcp && x.state == TCP_LISTEN {
                f.listener = true;
            } else {
                f.bound = true;
                let (lo, hi) = a.ephemeral;
                let port = x.local.port();
                if f.collision.is_none() && x.remote.port() != 0 && lo <= port && port <= hi {
                    f.collision = Some((f.holders.len(), x.remote.into()));
                }
            }
            f.holders.push(holder(a, x, ov, place(x)));
        }
        f
    }

    /// TIME_WAIT sockets on the port that the dumps found (they hold their own expiry).
    fn time_wait_on(&self, a: &Attempt<'_>, f: &mut Found) {
        for (addr, q) in self.tw.get(&(a.netns, a.port)).into_iter().flatten() {
            let Some(ov) = overlap(a.addr, None, *addr, None) else {
                continue;
            };
            let live = q.iter().filter(|t| **t > a.now_ns);
            let (n, soonest) = live.fold((0u32, i128::MAX), |(n, m), t| (n + 1, m.min(*t)));
            if n == 0 {
                continue;
            }
            f.time_wait = true;
            f.overlap_seen(ov);
            f.tw = Some(match f.tw {
                Some((c, e, ad, o)) => (c + n, e.min(soonest), ad, o),
                None => (n, soonest, *addr, ov),
            });
        }
    }
}

fn holder(a: &Attempt<'_>, x: &Entry, ov: Overlap, p: Option<Placement>) -> Holder {
    let owner = x.owner.as_ref();
    Holder {
        pid: owner.map(|o| o.pid),
        comm: owner.map(|o| Text::from(&o.comm)),
        cmdline: owner.and_then(|o| o.cmdline.as_ref().map(Text::from)),
        uid: owner.map(|o| o.uid),
        state: x.sock_state(),
        proto: a.proto.schema(),
        addr: x.local.ip(),
        port: x.local.port(),
        overlap: ov,
        since: (x.since_ns != 0).then(|| crate::kernel::decode::rfc3339(x.since_ns.into())),
        count: None,
        expires_in_s: None,
        via: p.as_ref().and_then(|p| p.via).map(Text::from),
        container_port: p.as_ref().and_then(|p| p.container_port),
        stale: p.as_ref().and_then(|p| p.stale.then_some(true)),
        container: p.and_then(|p| p.container),
    }
}

/// `pid 4242 (nginx) in container web`.
fn who(h: &Holder) -> String {
    let mut w = match (h.pid, &h.comm) {
        (Some(p), Some(c)) => format!("pid {p} ({c})"),
        (Some(p), None) => format!("pid {p}"),
        _ => "a socket with no known owner".to_string(),
    };
    if let Some(c) = &h.container {
        w.push_str(&format!(" in container {}", c.name));
    }
    w
}

type Explained = (Cause, String, Option<String>);

/// The one cause, in order of what decides it: a stale binder, a published port, a
/// listener, an ephemeral collision, a bound socket, TIME_WAIT, or nothing known.
fn explain(
    a: &Attempt<'_>,
    f: &Found,
    collision: Option<&(Holder, SocketAddr)>,
    tw_holder: Option<&Holder>,
) -> Explained {
    let instead = match a.publishing {
        Some(name) => format!("publish {name} on another host port"),
        None => "bind another port".to_string(),
    };
    // The holder that decides the cause: a listener if there is one.
    let top = f
        .holders
        .iter()
        .find(|h| h.state == "LISTEN")
        .or(f.holders.first());
    if let Some(h) = top.filter(|h| h.stale == Some(true) && h.via.is_some()) {
        return stale(h);
    }
    if let Some((h, c, via)) = top.and_then(|h| Some((h, h.container.as_ref()?, h.via.as_deref()?)))
    {
        let target = h
            .container_port
            .map(|p| format!(" -> {p}/{}", h.proto))
            .unwrap_or_default();
        let pid = h.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        let hint = format!(
            "container {} ({}, {}) publishes {}{target} through {via}{pid}; {} stop {}, or \
             {instead}",
            c.name,
            c.image,
            c.id,
            fmt_addr(h.addr, h.port),
            c.engine,
            c.name
        );
        return (Cause::DockerPublished, hint, None);
    }
    if let (true, Some(h)) = (f.listener, top) {
        let hint = format!(
            "{} listens on {}; stop it or {instead}",
            who(h),
            fmt_addr(h.addr, h.port)
        );
        return (Cause::Listener, hint, None);
    }
    if let Some((h, peer)) = collision {
        let (lo, hi) = a.ephemeral;
        let hint = format!(
            "{} uses {} as the source port of an outbound connection to {peer}: {lo}-{hi} is \
             this namespace's ip_local_port_range, from which the kernel picks source ports. \
             Reserve the service port with `sysctl -w net.ipv4.ip_local_reserved_ports={}` \
             (and the same line in /etc/sysctl.d/ to keep it), or move the service outside \
             {lo}-{hi}",
            who(h),
            fmt_addr(h.addr, h.port),
            h.port
        );
        return (Cause::EphemeralCollision, hint, None);
    }
    if let (true, Some(h)) = (f.bound, f.holders.first()) {
        let hint = format!(
            "{} holds {} {} ({}); close that socket or {instead}",
            who(h),
            a.proto_name,
            fmt_addr(h.addr, h.port),
            h.state
        );
        return (Cause::Bound, hint, None);
    }
    let target = fmt_addr(a.addr, a.port);
    if let Some(h) = tw_holder {
        let n = h.count.unwrap_or(0);
        let hint = format!(
            "{n} TIME_WAIT socket{} on {target} expire within {} s; set SO_REUSEADDR on the \
             listener (the old one lacked it too) or wait",
            if n == 1 { "" } else { "s" },
            h.expires_in_s.unwrap_or(60)
        );
        return (Cause::TimeWait, hint, None);
    }
    let reason = format!(
        "no socket in network namespace {} holds {} {target} (the holder may have gone \
         already)",
        a.netns, a.proto_name
    );
    (Cause::Unknown, String::new(), Some(reason))
}

/// A binder (docker-proxy, conmon, dockerd) holding a published port no container claims.
fn stale(h: &Holder) -> Explained {
    let whose = match &h.container {
        Some(c) => format!("container {} ({}), which no longer runs", c.name, c.id),
        None => "a container the engine no longer knows".to_string(),
    };
    let pid = h.pid.map_or(String::new(), |p| format!(" (pid {p})"));
    let kill = h
        .pid
        .map_or(String::new(), |p| format!("end it: kill {p}; "));
    let hint = format!(
        "{}{pid} still holds {} for {whose}: it was left behind, e.g. by a daemon that was \
         killed or restarted uncleanly. {kill}if the daemon still says the port is allocated, \
         restart it (systemctl restart docker, or the podman service)",
        h.via.as_deref().unwrap_or("a proxy"),
        fmt_addr(h.addr, h.port),
    );
    (Cause::DockerStale, hint, None)
}
