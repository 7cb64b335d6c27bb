//! The container engines' messages: the index, lifecycle records, and their own port
//! failures (`docker_publish` conflicts).

use super::*;

impl Processor {
    pub(super) fn container_ref(
        &mut self,
        e: &Event,
        netns: u32,
    ) -> Option<Arc<containers::ContainerRef>> {
        self.docker
            .container_of(e.pid, netns, e.cgroup_id)
            .map(|c| c.r.clone())
    }

    pub(super) fn docker_msg(&mut self, m: DockerMsg) {
        match m {
            DockerMsg::Connected(c) => {
                self.docker
                    .replace_all(&c.endpoint, c.containers.iter().cloned());
                self.docker.connected.insert(c.endpoint.clone());
                if let Some(m) = &self.cfg.metrics {
                    m.set_docker_connected(true);
                }
                let running = c.containers.iter().filter(|c| c.state.is_live()).count();
                let r = portwatch_schema::Docker {
                    endpoint: Some(c.endpoint.to_string()),
                    engine: Some(c.engine.to_owned()),
                    api_version: Some(c.api_version.clone()),
                    server_version: Some(c.server_version.clone()),
                    containers: Some(c.containers.len() as u64),
                    running: Some(running as u64),
                    sync_ms: Some(c.sync_ms),
                    cgroup: Some(c.cgroup),
                    ..portwatch_schema::Docker::new(DockerEvent::Connected)
                };
                self.emit_body(c.ts_ns, Body::Docker(r));
            }
            DockerMsg::Unavailable {
                endpoint,
                reason,
                ts_ns,
            } => {
                // No start failure will be reported now: write the proxy binds held back for
                // one. Conflicts waiting for a namespace re-read keep waiting: that is not
                // the daemon's to end.
                self.docker.connected.remove(&endpoint);
                if let Some(m) = &self.cfg.metrics {
                    m.set_docker_connected(self.docker.connected());
                }
                self.release_pending(|_| true, None);
                let r = portwatch_schema::Docker {
                    endpoint: Some(endpoint.to_string()),
                    reason: Some(reason),
                    ..portwatch_schema::Docker::new(DockerEvent::Unavailable)
                };
                self.emit_body(ts_ns, Body::Docker(r));
            }
            DockerMsg::Upsert(c) => self.docker.upsert(c),
            DockerMsg::Lifecycle(l) => {
                if l.event == "destroy" {
                    self.docker.remove(&l.container.full_id);
                } else {
                    self.docker.upsert(l.container.clone());
                }
                let id = l.container.full_id.clone();
                if l.event == "start" && !l.container.published.is_empty() {
                    self.reach_due.push((id, Instant::now() + REACH_DELAY));
                } else if l.event == "die" || l.event == "destroy" {
                    self.reach_due.retain(|(x, _)| *x != id);
                    self.reach_wait.retain(|(x, _)| *x != id);
                    self.unreachable.retain(|(x, ..)| *x != id);
                }
                let event = DockerEvent::parse(l.event);
                let r = record::lifecycle(event, &l.container, l.exit_code, l.missed);
                self.emit_body(l.ts_ns, Body::Docker(r));
            }
            DockerMsg::StartFailed {
                container,
                error,
                ts_ns,
            } => {
                self.docker.upsert(container.clone());
                match containers::parse_start_error(&error) {
                    Some(StartError::Allocated { ip, port }) => {
                        self.publish_conflict(&container, ip, port, &error, ts_ns);
                    }
                    Some(StartError::InUse { ip, port }) => {
                        self.recent_in_use
                            .push((container.clone(), ip, port, Instant::now()));
                        let same = |p: &PendingBind| {
                            let pip = decode::ip(p.e.family, &p.e.addr);
                            p.e.port == port && table::overlap(pip, None, ip, None).is_some()
                        };
                        self.release_pending(same, Some(&container));
                    }
                    None => {}
                }
            }
            DockerMsg::Tick => self.flush_pending(false),
        }
    }

    /// Container `b` asked for a host port that a running container publishes, and dockerd's
    /// allocator refused: a conflict no syscall shows. The holder is the publisher, with
    /// the socket its proxy holds when there is one.
    pub(super) fn publish_conflict(
        &mut self,
        b: &Container,
        ip: IpAddr,
        port: u16,
        error: &str,
        ts_ns: i128,
    ) {
        // The daemon can report one refused start more than once (the start error and the
        // container's state both carry it): one failure, one record.
        if self.published_recently(&b.full_id, ip, port) {
            return;
        }
        let proto = b
            .bindings
            .iter()
            .find(|p| p.host_port <= port && port <= p.host_port_end)
            .map_or(Proto::Tcp, |p| p.proto);
        let publisher = self
            .docker
            .publisher(proto, ip, port)
            .map(|(c, p)| (c.clone(), *p));
        let holders = self.publish_holders(b, proto, ip, port, ts_ns, publisher.as_ref());
        let (hint, reason) = publish_hint(b, publisher.as_ref(), proto.name(), ip, port);
        let overlap = holders.first().map(|h| h.overlap);
        let ts = decode::rfc3339(ts_ns);
        let r = portwatch_schema::Conflict {
            op: Op::DockerPublish,
            error: portwatch_schema::Error::PortAlreadyAllocated,
            errno: None,
            proto: proto.schema(),
            family: record::family_of_addr(ip),
            addr: ip,
            port,
            netns: self.docker.host_netns(),
            fd: None,
            actor: portwatch_schema::ConflictActor::Container {
                container: b.r.clone(),
            },
            holders,
            cause: Cause::PortAlreadyAllocated,
            overlap,
            destination: None,
            hint,
            docker_error: Some(error.to_string()),
            reason,
            // Always 1: dockerd refuses each start once (see `burst`).
            count: 1,
            first_ts: ts.clone(),
            last_ts: ts.clone(),
        };
        self.emit(&record::record_at(&self.host, ts, Body::Conflict(r)));
    }

    /// Was this refusal (container, address, port) reported in the last 10 s? Records it.
    fn published_recently(&mut self, full_id: &str, ip: IpAddr, port: u16) -> bool {
        let now = Instant::now();
        self.recent_published
            .retain(|(.., t)| now.duration_since(*t) < Duration::from_secs(10));
        if self
            .recent_published
            .iter()
            .any(|(id, i, p, _)| (id.as_str(), *i, *p) == (full_id, ip, port))
        {
            return true;
        }
        self.recent_published
            .push((full_id.to_string(), ip, port, now));
        false
    }

    /// The sockets that hold the port for the publishing container, or, with none (no
    /// userland proxy before Docker 28), the daemon's allocation itself.
    fn publish_holders(
        &mut self,
        b: &Container,
        proto: Proto,
        ip: IpAddr,
        port: u16,
        ts_ns: i128,
        publisher: Option<&(Arc<Container>, PortMap)>,
    ) -> Vec<table::Holder> {
        let netns = self.docker.host_netns();
        let attempt = Attempt {
            netns,
            proto,
            addr: ip,
            port,
            op_listen: false,
            actor_sk: 0,
            now_ns: ts_ns,
            proto_name: proto.name(),
            publishing: Some(&b.r.name),
            ephemeral: self.port_range(netns),
        };
        let docker = &mut self.docker;
        let a = self
            .table
            .attribute_with(&attempt, &mut |x| place(docker, netns, x));
        let mut holders: Vec<table::Holder> = a
            .holders
            .into_iter()
            .filter(|h| {
                h.via.is_some()
                    && publisher.is_some_and(|(c, _)| h.container.as_ref() == Some(&c.r))
            })
            .collect();
        if let (true, Some((c, p))) = (holders.is_empty(), publisher) {
            holders.push(table::Holder {
                pid: None,
                comm: None,
                cmdline: None,
                uid: None,
                state: portwatch_schema::SockState::Published,
                proto: proto.schema(),
                addr: p.host_ip,
                port,
                overlap: table::overlap(ip, None, p.host_ip, None).unwrap_or(table::Overlap::Exact),
                since: None,
                count: None,
                expires_in_s: None,
                container: Some(c.r.clone()),
                via: Some("dockerd".into()),
                container_port: Some(p.container_port),
                stale: None,
            });
        }
        self.fill_cmdlines(&mut holders);
        holders
    }
}

/// The hint (and, when no publisher is known, the reason) of a `docker_publish` conflict.
fn publish_hint(
    b: &Container,
    publisher: Option<&(Arc<Container>, PortMap)>,
    proto_name: &str,
    ip: IpAddr,
    port: u16,
) -> (String, Option<String>) {
    match publisher {
        Some((a, p)) => (
            format!(
                "container {} ({}, {}) already publishes {} -> {}; {} stop {}, or publish {} \
                 on another host port",
                a.r.name,
                a.r.image,
                a.r.id,
                table::fmt_addr(p.host_ip, port),
                p.target(),
                a.r.engine,
                a.r.name,
                b.r.name
            ),
            None,
        ),
        None => (
            format!("publish {} on another host port", b.r.name),
            Some(format!(
                "no running container in the index publishes {proto_name} {}; it may have \
                 stopped since",
                table::fmt_addr(ip, port)
            )),
        ),
    }
}
