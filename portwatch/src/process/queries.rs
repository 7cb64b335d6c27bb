//! Control queries answered from the processing thread: `attach`, `ports`, `status`, `check`'s
//! published ports, and the `lost` accounting.

use super::*;

impl Processor {
    /// A control-socket request, answered on the channel it carries.
    pub(super) fn query(&mut self, q: Query) {
        match q {
            Query::Attach {
                filter,
                since_s,
                live,
                replay,
            } => {
                self.recheck_reach(filter.port);
                self.attach(filter, since_s, live, replay);
            }
            Query::Ports { filter, reply } => {
                let _ = reply.send(self.ports(&filter));
                self.recheck_reach(filter.port);
            }
            Query::Published { port, reply } => {
                let _ = reply.send(self.published_answer(port));
            }
            Query::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    pub(super) fn ports(&mut self, filter: &Filter) -> Vec<PortRow> {
        let docker = &mut self.docker;
        crate::control::rows::table_rows(&self.table, filter, &mut |ns, e| place(docker, ns, e))
    }

    pub(super) fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "table_size": self.table.len(),
            "records": self.out.lines,
            "lost_total": self.lost_total,
            "log_write_errors": self.out.log_errors(),
            "attached": self.subs.len(),
            "drift_healed": self.table.drift_healed,
            "last_reconcile": {
                "sockets": self.last_reconcile.0,
                "ms": self.last_reconcile.1.as_secs_f64() * 1000.0,
            },
            "rss_kb": std::fs::read_to_string("/proc/self/status").ok().and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            }),
            // Against rss_kb: RSS growing while heap.in_use_kb stays flat is the allocator
            // holding freed memory, not a collection growing.
            "heap": crate::heap::usage(),
            "window": { "items": self.window.len(), "bytes": self.window_bytes },
            // Failures being coalesced, and conflicts waiting for a namespace re-read.
            "bursts": { "active": self.bursts.len(), "absorbed": self.bursts.held() },
            "held_conflicts": self.held.len(),
            "services": { "open": self.services.len(), "restarts_coalesced": self.services.coalesced },
            "unknown_kinds": self.unknown_kinds,
            "stdout_write_errors": self.out.stdout_errors,
            "failed_encodes": self.failed_encodes,
        })
    }

    pub(super) fn lost(&mut self, kernel: [u64; KINDS], agent: [u64; KINDS]) {
        let mut by_kind = BTreeMap::new();
        for kd in Kind::ALL {
            let i = kd.raw() as usize;
            let n = kernel[i] + agent[i];
            if n > 0 {
                by_kind.insert(kd.name().to_owned(), n);
            }
        }
        let k: u64 = kernel.iter().sum();
        let a: u64 = agent.iter().sum();
        self.lost_total += k + a;
        let r = portwatch_schema::Lost {
            count: k + a,
            kernel: k,
            agent: a,
            by_kind,
            total: self.lost_total,
        };
        self.emit_body(Clock::now_wall_ns(), Body::Lost(r));
    }
}

/// Where a socket's owner stands in Docker: a published port held by docker-proxy/dockerd
/// for a container, or a process inside a container.
pub(super) fn place(docker: &mut Index, netns: u32, x: &Entry) -> Option<Placement> {
    let owner = x.owner.as_ref();
    if let Some(via) = owner.and_then(|o| containers::docker_binder(&o.comm)) {
        if netns == docker.host_netns() {
            let (ip, port) = (x.local.ip(), x.local.port());
            if let Some((c, p)) = docker.publisher(x.proto, ip, port) {
                return Some(Placement {
                    container: Some(c.r.clone()),
                    via: Some(via),
                    container_port: Some(p.container_port),
                    stale: false,
                });
            }
            // A binder holding a published port that no container the engines know runs
            // or starts with: left behind by a daemon that died or lost track (moby#20486,
            // #36591). Only said while an engine is connected, which knows every container;
            // the podman CLI only passes the socket on, so it is never the one left.
            if via != "podman" && docker.connected() && !docker.claims(x.proto, ip, port) {
                let cip = owner
                    .and_then(|o| o.cmdline.as_deref())
                    .and_then(|c| containers::proxy_args(c).0);
                return Some(Placement {
                    container: cip.and_then(|ip| docker.by_ip(ip)).map(|c| c.r.clone()),
                    via: Some(via),
                    container_port: None,
                    stale: true,
                });
            }
        }
    }
    let c = docker.container_of(owner.map_or(0, |o| o.pid), netns, 0)?;
    Some(Placement {
        container: Some(c.r.clone()),
        via: None,
        container_port: None,
        stale: false,
    })
}
