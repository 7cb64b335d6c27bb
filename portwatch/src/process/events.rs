//! Kernel events: the port table kept current, and the verbose records (`--all-events`,
//! or for attached clients).

use super::*;

impl Processor {
    pub(super) fn owner_of(&mut self, e: &Event) -> Arc<Owner> {
        let comm = decode::comm(&e.comm);
        let cmdline = self.procs.cmdline(e.pid, e.tid, &comm);
        self.table.owner(e.pid, &comm, cmdline, e.uid)
    }

    /// Keep the port table current from one kernel event.
    pub(super) fn update_table(&mut self, e: &Event, k: Kind, netns: u32, wall: i128) {
        let local = SocketAddr::new(decode::ip(e.family, &e.addr), e.port);
        let remote = SocketAddr::new(decode::ip(e.family, &e.raddr), e.rport);
        let entry = |state: u8, owner: Option<Arc<Owner>>, proto: Proto| Entry {
            proto,
            local: local.into(),
            remote: remote.into(),
            state,
            inode: 0,
            sk: e.sk,
            owner,
            since_ns: wall as i64,
            v6only: None,
        };
        match k {
            Kind::Bind if e.ret == 0 => {
                if let Some(p) = proto_of(e.proto) {
                    let o = self.owner_of(e);
                    self.table
                        .on_bind(netns, entry(table::TCP_CLOSE, Some(o.clone()), p));
                    // A UDP socket bound to an explicit port serves on it; port 0 asks the
                    // kernel for an ephemeral one, which is a client's.
                    if p == Proto::Udp && e.port != 0 {
                        self.service_open(netns, p, local, e, o, wall);
                    }
                }
            }
            Kind::Listen if e.ret == 0 => {
                let o = self.owner_of(e);
                self.table
                    .on_listen(netns, entry(table::TCP_LISTEN, Some(o.clone()), Proto::Tcp));
                if e.port != 0 {
                    self.service_open(netns, Proto::Tcp, local, e, o, wall);
                }
            }
            Kind::Close => {
                if let Some(p) = proto_of(e.proto) {
                    self.table.on_close(netns, p, e.port, e.sk, e.pid);
                    self.services.close(netns, p, e.port, e.sk, e.pid, wall);
                }
            }
            Kind::Exit => {
                // Its sockets close after this event, and a child may share them: a re-read
                // of each namespace where it served (on the sock_diag thread) decides.
                for ns in self.services.namespaces_of(e.pid) {
                    self.request(ns, e, None, true);
                }
                self.table.on_exit(e.pid);
                self.recent_exits.push_back((e.pid, wall));
                while self.recent_exits.len() > 4096
                    || self
                        .recent_exits
                        .front()
                        .is_some_and(|(_, t)| wall - t > 30_000_000_000)
                {
                    self.recent_exits.pop_front();
                }
                self.procs.forget(e.pid);
                self.docker.forget_pid(e.pid);
            }
            Kind::TcpState => {
                let (old, new) = (e.old_state as u8, e.new_state as u8);
                let en = entry(table::TCP_TIME_WAIT, None, Proto::Tcp);
                self.table.on_tcp_state(netns, &en, old, new);
            }
            _ => {}
        }
    }

    /// Drop what the table and the trackers keep about namespaces that are gone.
    pub(super) fn prune(&mut self, live: &[u32], as_of: i128) {
        let live: std::collections::HashSet<u32> = live.iter().copied().collect();
        let dropped = self.table.prune_namespaces(&live, as_of);
        for ns in dropped {
            self.services.check(ns, as_of, &|_, _| false);
        }
        self.ns_paths.retain(|n, _| live.contains(n));
        self.port_ranges.retain(|n, _| live.contains(n));
        self.last_counts.retain(|(n, _), _| live.contains(n));
    }

    /// Whether an event would have produced a log record (for the shutdown count).
    pub(super) fn would_write(&self, e: &Event) -> bool {
        match Kind::try_from(e.kind) {
            Ok(k) => self.cfg.all_events || record::is_conflict(e, k),
            Err(_) => false,
        }
    }

    pub(super) fn event(&mut self, e: &Event) {
        let Ok(k) = Kind::try_from(e.kind) else {
            self.unknown_kinds += 1;
            return;
        };
        let wall = self.clock.wall_ns(e.ts_ns);
        let netns = if e.netns == 0 && self.cfg.netns_from_proc && e.pid != 0 && k != Kind::TcpState
        {
            self.procs.netns(e.pid)
        } else {
            e.netns
        };
        self.update_table(e, k, netns, wall);
        if record::is_conflict(e, k) {
            self.conflict(e, k, netns, wall);
            return;
        }
        self.push_window(WinItem::Raw(wall, *e, netns));
        let live = !self.subs.is_empty();
        if !self.cfg.all_events && !live {
            return;
        }
        let Some(keys) = self.format_verbose(e, k, netns, wall, live && self.any_filter()) else {
            return;
        };
        if self.cfg.all_events {
            let buf = std::mem::take(&mut self.buf);
            self.out.write_line(&buf);
            self.buf = buf;
            if let Some(m) = &self.cfg.metrics {
                m.record_type(k.name());
            }
        }
        if live {
            let line: Arc<[u8]> = Arc::from(&self.buf[..]);
            self.publish(&line, &keys);
        }
    }

    /// Encode a verbose (bind, listen, connect, close, exit, tcp_state) record into buf, and
    /// say its keys (only when `keyed`: they are for attached clients that filter, and
    /// neither `--all-events` nor an unfiltered client should pay for them on every event);
    /// None if it could not be encoded.
    pub(super) fn format_verbose(
        &mut self,
        e: &Event,
        k: Kind,
        netns: u32,
        wall: i128,
        keyed: bool,
    ) -> Option<Keys> {
        self.buf.clear();
        let body = match k {
            Kind::Bind | Kind::Listen | Kind::Connect | Kind::Close => {
                let cmdline = self.procs.cmdline(e.pid, e.tid, &decode::comm(&e.comm));
                let mut actor = record::actor(e, cmdline);
                actor.container = self.container_ref(e, netns);
                Some(record::sock_op(e, k, netns, actor))
            }
            Kind::Exit => {
                let mut actor = record::actor(e, None);
                actor.container = self.container_ref(e, netns);
                Some(Body::Exit(portwatch_schema::Exit { netns, actor }))
            }
            Kind::TcpState => None,
        };
        let keys = match body {
            Some(body) => {
                let r = record::record(&self.host, wall, body);
                serde_json::to_writer(&mut self.buf, &r).is_ok().then(|| {
                    if keyed {
                        Keys::of_record(&r)
                    } else {
                        Keys::default()
                    }
                })
            }
            // tcp_state: written straight from the event (see `write_tcp_state`).
            None => {
                let ts = self.ts_cache.format(wall);
                record::write_tcp_state(&mut self.buf, ts, &self.host_json, e);
                Some(if keyed {
                    Keys::of_event(e, k, None)
                } else {
                    Keys::default()
                })
            }
        };
        self.buf.push(b'\n');
        if keys.is_none() {
            self.failed_encodes += 1;
        }
        keys
    }
}
