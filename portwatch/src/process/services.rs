//! Service ports opening and closing (`port` records), from events and dumps.

use super::*;
use portwatch_schema::PortEvent;

impl Processor {
    pub(super) fn service_open(
        &mut self,
        netns: u32,
        proto: Proto,
        local: SocketAddr,
        e: &Event,
        owner: Arc<Owner>,
        wall: i128,
    ) {
        let key = service::Key {
            netns,
            proto,
            addr: local.ip(),
            port: local.port(),
        };
        let s = service::Service {
            sk: e.sk,
            owner: Some(owner),
            cgroup_id: e.cgroup_id,
            opened_ns: wall,
            restarts: 0,
            existing: false,
        };
        if let Some(c) = self.services.open(key, s) {
            self.write_port(c, wall);
        }
        if !self.unreachable.is_empty() {
            self.reach_netns(netns, false);
        }
    }

    /// After a namespace's sockets were replaced by a dump taken at `as_of`: services whose
    /// socket is gone are closed, and listeners no event showed (held before the agent
    /// started, or opened in ways events miss) are opened.
    pub(super) fn check_services(&mut self, netns: u32, as_of: i128) {
        let table = &self.table;
        let alive = |k: &service::Key, sk: u64| {
            table.rows_at(netns, k.proto, k.port).any(|x| {
                x.local.ip() == k.addr
                    && x.remote.port() == 0
                    && (k.proto == Proto::Udp || x.state == table::TCP_LISTEN)
                    && (sk == 0 || x.sk == 0 || x.sk == sk)
            })
        };
        self.services.check(netns, as_of, &alive);
        // `ready` is the first line: listeners of the start-up snapshot are written after it.
        if self.ready_sent {
            self.open_existing(Some(netns), as_of);
        }
    }

    /// Open records for listeners in the table that no event showed (in `netns`, or all).
    pub(super) fn open_existing(&mut self, netns: Option<u32>, as_of: i128) {
        let found: Vec<(service::Key, service::Service)> = self
            .table
            .rows()
            .filter(|(ns, x)| {
                netns.is_none_or(|n| n == *ns)
                    && x.proto == Proto::Tcp
                    && x.state == table::TCP_LISTEN
                    && x.local.port() != 0
            })
            .map(|(ns, x)| {
                let key = service::Key {
                    netns: ns,
                    proto: Proto::Tcp,
                    addr: x.local.ip(),
                    port: x.local.port(),
                };
                let s = service::Service {
                    sk: x.sk,
                    owner: x.owner.clone(),
                    cgroup_id: 0,
                    opened_ns: if x.since_ns == 0 {
                        as_of
                    } else {
                        i128::from(x.since_ns)
                    },
                    restarts: 0,
                    existing: true,
                };
                (key, s)
            })
            .filter(|(k, _)| !self.services.is_open(k))
            .collect();
        for (key, s) in found {
            if let Some(c) = self.services.open(key, s) {
                self.write_port(c, as_of);
            }
        }
    }

    /// Write closes whose flap window is over (all of them with `all`).
    pub(super) fn flush_services(&mut self, all: bool) {
        let now = Clock::now_wall_ns();
        for c in self.services.due(now, all) {
            self.write_port(c, now);
        }
    }

    pub(super) fn write_port(&mut self, c: service::Change, wall: i128) {
        let (key, s, event, at, why) = match c {
            service::Change::Open(key, s) => (key, s, PortEvent::Open, wall, None),
            service::Change::Close {
                key,
                service,
                at_ns,
                why,
            } => (key, service, PortEvent::Close, at_ns, Some(why)),
        };
        let actor = s.owner.as_ref().map(|o| portwatch_schema::PortActor {
            pid: o.pid,
            comm: Text::from(&o.comm),
            cmdline: o.cmdline.as_ref().map(Text::from),
            uid: o.uid,
            container: self
                .docker
                .container_of(o.pid, key.netns, s.cgroup_id)
                .map(|c| c.r.clone()),
        });
        let closing = why.is_some();
        let r = portwatch_schema::Port {
            event,
            proto: key.proto.schema(),
            family: record::family_of_addr(key.addr),
            addr: key.addr,
            port: key.port,
            netns: key.netns,
            actor,
            existing: (!closing && s.existing).then_some(true),
            since: closing.then(|| decode::rfc3339(s.opened_ns)),
            held_s: closing.then(|| ((at - s.opened_ns).max(0) as f64 / 1e6).round() / 1e3),
            restarts: closing.then_some(s.restarts),
            reason: why.map(|w| Text::from_static(w.name())),
        };
        self.emit_body(at, Body::Port(r));
    }
}
