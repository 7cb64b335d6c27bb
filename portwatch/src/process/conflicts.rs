//! Failed calls become conflict records: bursts coalesced, binders' failures held for
//! the engine's word, re-reads asked for and waited on, then attributed and written.

use super::*;

impl Processor {
    /// One failure from the kernel: coalesced with identical ones (see `burst`), written at
    /// once when it starts a burst.
    pub(super) fn conflict(&mut self, e: &Event, k: Kind, netns: u32, wall: i128) {
        let (verdict, closed) = self.bursts.offer(e, k, netns, wall);
        if let Some(s) = closed {
            self.write_conflict(&s.event, s.kind, s.netns, s.span.last_ns, s.span);
        }
        match verdict {
            Verdict::Write => self.write_conflict(e, k, netns, wall, Span::single(wall)),
            Verdict::Absorbed => {
                // Attached clients asked for live detail: they still see each attempt.
                if self.subs.is_empty() {
                    return;
                }
                if let Some(keys) = self.format_verbose(e, k, netns, wall, self.any_filter()) {
                    let line: Arc<[u8]> = Arc::from(&self.buf[..]);
                    self.publish(&line, &keys);
                }
            }
        }
    }

    /// Close coalescing windows that are over, and write what they absorbed.
    pub(super) fn flush_bursts(&mut self, all: bool) {
        let due = if all {
            self.bursts.drain()
        } else {
            self.bursts.due(Clock::now_wall_ns())
        };
        for s in due {
            self.write_conflict(&s.event, s.kind, s.netns, s.span.last_ns, s.span);
        }
    }

    pub(super) fn write_conflict(
        &mut self,
        e: &Event,
        k: Kind,
        netns: u32,
        wall: i128,
        span: Span,
    ) {
        let comm = decode::comm(&e.comm);
        let cmdline = self.procs.cmdline(e.pid, e.tid, &comm);
        // docker-proxy or dockerd failing to bind a published port: the actor that matters
        // is the container being started. The daemon names it (State.Error) a moment
        // later, so wait for that rather than guess among containers asking for the port.
        let binder = containers::docker_binder(&comm)
            .filter(|_| k != Kind::Connect && netns == self.docker.host_netns());
        let c = Pending {
            e: *e,
            k,
            netns,
            wall,
            cmdline,
            span,
        };
        if let Some(via) = binder {
            let ip = decode::ip(e.family, &e.addr);
            if let Some(container) = self.recent_failure(ip, e.port) {
                self.emit_conflict(c, Some((container, via)), None);
            } else if self.docker.connected() {
                self.pending.push(PendingBind {
                    e: c.e,
                    k,
                    netns,
                    wall,
                    cmdline: c.cmdline,
                    via,
                    deadline: Instant::now() + PUBLISH_WAIT,
                    span,
                });
            } else {
                let container = self.guess_publishing(e, c.cmdline.as_deref());
                self.emit_conflict(c, container.map(|x| (x, via)), None);
            }
            return;
        }
        self.emit_conflict(c, None, None);
    }

    /// A start failure the daemon already reported for this host address.
    pub(super) fn recent_failure(&self, ip: IpAddr, port: u16) -> Option<Arc<Container>> {
        self.recent_in_use
            .iter()
            .rev()
            .find(|(_, fip, fport, _)| {
                *fport == port && table::overlap(ip, None, *fip, None).is_some()
            })
            .map(|(c, ..)| c.clone())
    }

    /// Without the daemon's word: the one container that is not running and asks for this
    /// host port (docker-proxy's `-container-ip`, when its address is known, decides first).
    pub(super) fn guess_publishing(
        &self,
        e: &Event,
        cmdline: Option<&str>,
    ) -> Option<Arc<Container>> {
        let proto = proto_of(e.proto)?;
        let (cip, _) = cmdline.map(containers::proxy_args).unwrap_or_default();
        if let Some(c) = cip.and_then(|ip| self.docker.by_ip(ip)) {
            return Some(c.clone());
        }
        match self
            .docker
            .starting(proto, decode::ip(e.family, &e.addr), e.port)[..]
        {
            [c] => Some(c.clone()),
            _ => None,
        }
    }

    /// Write the held-back proxy binds that `done` selects, naming `container` or, without
    /// it, the best guess.
    pub(super) fn release_pending(
        &mut self,
        done: impl Fn(&PendingBind) -> bool,
        container: Option<&Arc<Container>>,
    ) {
        let (ready, wait) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| done(p));
        self.pending = wait;
        for p in ready {
            let c = container
                .cloned()
                .or_else(|| self.guess_publishing(&p.e, p.cmdline.as_deref()));
            let pending = Pending {
                e: p.e,
                k: p.k,
                netns: p.netns,
                wall: p.wall,
                cmdline: p.cmdline,
                span: p.span,
            };
            self.emit_conflict(pending, c.map(|c| (c, p.via)), None);
        }
    }

    /// Write held-back proxy binds whose wait is over (all of them with `all`), and
    /// conflicts whose namespace re-read did not come in time.
    pub(super) fn flush_pending(&mut self, all: bool) {
        let now = Instant::now();
        self.release_pending(|p| all || p.deadline <= now, None);
        self.recent_in_use
            .retain(|(.., t)| now.duration_since(*t) < Duration::from_secs(5));
        let (late, wait): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| all || h.deadline <= now);
        self.held = wait;
        for h in late {
            let why = if all {
                "the agent stopped before its namespace could be re-read"
            } else {
                "its namespace could not be re-read in time"
            };
            let f = Freshness {
                counts: None,
                failed: Some(why.into()),
                no_source: false,
            };
            self.emit_conflict(h.c, h.publishing, Some(f));
        }
        self.in_flight
            .retain(|_, t| all || now.duration_since(*t) < FRESH_WAIT * 2);
    }

    /// The sock_diag thread re-read a namespace: take its sockets into the table, then
    /// write the conflicts that waited for it.
    pub(super) fn fresh(&mut self, f: Fresh) {
        self.in_flight.remove(&f.netns);
        let (counts, range, failed, no_source) = match f.result {
            Ok(mut d) => {
                match d.range {
                    Some(r) => {
                        self.port_ranges.insert(f.netns, r);
                    }
                    // The re-read could not enter the namespace a second time (its path's
                    // process just exited): the range the last read found still holds.
                    None => d.range = self.port_ranges.get(&f.netns).copied(),
                }
                if let Some(s) = &mut d.snapshot {
                    self.reconcile(s);
                }
                (d.counts, d.range, None, d.no_source)
            }
            Err(why) => (Vec::new(), None, Some(why), Vec::new()),
        };
        for &(dst, in_use, tw) in &counts {
            if self.last_counts.len() >= 4096 {
                self.last_counts.clear();
            }
            self.last_counts.insert(
                (f.netns, dst),
                ((in_use, tw, range, f.as_of), no_source.contains(&dst)),
            );
        }
        let (mine, rest): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.c.netns == f.netns);
        self.held = rest;
        let mut again = Vec::new();
        for h in mine {
            let freshness = if h.c.k == Kind::Connect {
                let dst = SocketAddr::new(decode::ip(h.c.e.family, &h.c.e.raddr), h.c.e.rport);
                match counts.iter().find(|c| c.0 == dst) {
                    Some(&(_, in_use, tw)) => Freshness {
                        counts: Some((in_use, tw, range, f.as_of)),
                        failed: None,
                        no_source: no_source.contains(&dst),
                    },
                    // Asked for after this dump began: it needs the next one.
                    None if failed.is_none() => {
                        again.push(h);
                        continue;
                    }
                    None => Freshness {
                        counts: None,
                        failed: failed.clone(),
                        no_source: false,
                    },
                }
            } else {
                Freshness {
                    counts: None,
                    failed: failed.clone(),
                    no_source: false,
                }
            };
            self.emit_conflict(h.c, h.publishing, Some(freshness));
        }
        for h in &again {
            let dst = SocketAddr::new(decode::ip(h.c.e.family, &h.c.e.raddr), h.c.e.rport);
            let e = h.c.e;
            self.request(f.netns, &e, Some(dst), false);
        }
        self.held.extend(again);
    }

    /// Command lines of holders the table knew without one, read now (comm-checked).
    pub(super) fn fill_cmdlines(&mut self, holders: &mut [table::Holder]) {
        for h in holders {
            if let (Some(pid), Some(comm), None) = (h.pid, &h.comm, &h.cmdline) {
                h.cmdline = self.procs.cmdline(pid, pid, comm).map(Text::from);
            }
        }
    }

    /// Hold a conflict until its namespace is re-read; false if no re-read can be asked.
    pub(super) fn hold(
        &mut self,
        c: &Pending,
        publishing: Option<&(Arc<Container>, &'static str)>,
        dst: Option<SocketAddr>,
    ) -> bool {
        if self.stop_seen.is_some() || !self.request(c.netns, &c.e, dst, dst.is_none()) {
            return false;
        }
        self.held.push(Held {
            c: c.clone(),
            publishing: publishing.cloned(),
            deadline: Instant::now() + FRESH_WAIT,
        });
        true
    }

    /// Attribute and write one conflict. `fresh` is None the first time: a conflict the
    /// table cannot explain, or a connect that needs the port counts toward its destination,
    /// is then held for a re-read of its namespace (on the sock_diag thread) and comes back
    /// here with it.
    pub(super) fn emit_conflict(
        &mut self,
        c: Pending,
        publishing: Option<(Arc<Container>, &'static str)>,
        fresh: Option<Freshness>,
    ) {
        let e = &c.e;
        let (k, netns, wall) = (c.k, c.netns, c.wall);
        let mut fresh = fresh;
        if k == Kind::Connect && fresh.as_ref().is_none_or(|f| f.counts.is_none()) {
            let dst = SocketAddr::new(decode::ip(e.family, &e.raddr), e.rport);
            if fresh.is_none() && self.hold(&c, publishing.as_ref(), Some(dst)) {
                return;
            }
            // No re-read of its own can be had (the agent is stopping, or it came too
            // late): the last counts toward the same destination, with their own `as_of`.
            if let Some(&(counts, no_source)) = self.last_counts.get(&(netns, dst)) {
                fresh = Some(Freshness {
                    counts: Some(counts),
                    failed: None,
                    no_source,
                });
            }
        }
        let mut actor = record::actor(e, c.cmdline.clone());
        match &publishing {
            Some((c, via)) => {
                actor.container = Some(c.r.clone());
                actor.via = Some(Text::from_static(via));
            }
            None => {
                actor.container = self
                    .docker
                    .container_of(e.pid, netns, e.cgroup_id)
                    .map(|c| c.r.clone());
            }
        }
        let ts = decode::rfc3339(wall);
        let mut r = record::conflict(&ts, e, k, netns, actor);
        r.count = c.span.count;
        r.first_ts = decode::rfc3339(c.span.first_ns);
        r.last_ts = decode::rfc3339(c.span.last_ns);
        if k != Kind::Connect {
            if let Some(proto) = proto_of(e.proto) {
                let attempt = Attempt {
                    netns,
                    proto,
                    addr: decode::ip(e.family, &e.addr),
                    port: e.port,
                    op_listen: k == Kind::Listen,
                    actor_sk: e.sk,
                    now_ns: wall,
                    proto_name: proto.name(),
                    publishing: publishing.as_ref().map(|(c, _)| &*c.r.name),
                    ephemeral: self.port_range(netns),
                };
                let docker = &mut self.docker;
                let a = self
                    .table
                    .attribute_with(&attempt, &mut |x| place(docker, netns, x));
                // Events cannot see everything (passed fds, io_uring): a conflict the table
                // cannot explain waits for a re-read of its namespace, rate-limited there.
                // So does one whose holders include a socket with no known owner: it may be
                // a leftover of a dead namespace whose inode number was reused, or of a
                // process that just exited; a re-read tells.
                let ownerless = a
                    .holders
                    .iter()
                    .any(|h| h.pid.is_none() && h.state != "TIME_WAIT" && h.via.is_none());
                if (a.cause == Cause::Unknown || ownerless)
                    && fresh.is_none()
                    && self.hold(&c, publishing.as_ref(), None)
                {
                    return;
                }
                let mut a = a;
                self.fill_cmdlines(&mut a.holders);
                take_attribution(&mut r, a, e, fresh.as_ref());
            }
        } else if let Some(f) = &fresh {
            apply_counts(&mut r, e, f);
        }
        self.emit(&record::record_at(&self.host, ts, Body::Conflict(r)));
    }
}

/// The table's attribution into the first-pass record: holders, cause and overlap; its hint
/// unless it has none and the record does; its reason when the cause stays unknown (with
/// why no re-read could be had).
fn take_attribution(
    r: &mut portwatch_schema::Conflict,
    a: table::Attribution,
    e: &Event,
    fresh: Option<&Freshness>,
) {
    r.holders = a.holders;
    let known = a.cause != Cause::Unknown;
    r.cause = a.cause;
    r.overlap = a.overlap;
    if !a.hint.is_empty() || r.hint.is_empty() {
        r.hint = a.hint;
    }
    if known {
        r.reason = None;
    } else if r.reason.is_none() || e.ret == -98 {
        r.reason = a.reason;
        if let Some(why) = fresh.and_then(|f| f.failed.as_ref()) {
            r.reason = Some(format!(
                "{}; {why}",
                r.reason.as_deref().unwrap_or("no holder is known")
            ));
        }
    }
}
