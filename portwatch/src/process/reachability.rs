//! When published ports are judged reachable or not (`crate::engines::reach` is the judgement):
//! a few seconds after a container starts, after each re-read of its namespace, and again
//! whenever a client asks (`check P`, `ports`, `attach`).

use std::{net::IpAddr, path::PathBuf, time::Instant};

use portwatch_schema::{Body, DockerEvent};

use super::{FreshRequest, Processor};
use crate::{
    engines::containers::{Container, PortMap},
    engines::reach::{self, Published},
    host::diag,
    kernel::decode::Clock,
    state::table::{self, Proto},
};

impl Processor {
    /// Containers whose check is due: ask for a re-read of their namespace; the check runs
    /// when it comes (`reach_netns`).
    pub(super) fn reach_tick(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reach_due)
            .into_iter()
            .partition(|(_, t)| *t <= now);
        self.reach_due = later;
        for (id, _) in due {
            let Some(c) = self.docker.get(&id).cloned() else {
                continue;
            };
            let Some(ns) = own_namespace(&c) else {
                continue;
            };
            let netns = ns.inode;
            if self.cfg.fresh.send(FreshRequest::sockets_of(ns)).is_ok() {
                self.in_flight.entry(netns).or_insert_with(Instant::now);
                if !self.reach_wait.iter().any(|(x, _)| *x == id) {
                    self.reach_wait.push((id, netns));
                }
            }
        }
    }

    /// A client asked (`check P`, `ports`, `attach`): look again at the containers that
    /// publish `port` (every published port when None), at the next tick. What changed is
    /// written as `unreachable` / `reachable` records.
    pub(super) fn recheck_reach(&mut self, port: Option<u16>) {
        let now = Instant::now();
        let ids: Vec<Box<str>> = self
            .docker
            .iter()
            .filter(|c| c.state.is_live() && !c.published.is_empty())
            .filter(|c| port.is_none_or(|p| c.published.iter().any(|pm| pm.host_port == p)))
            .map(|c| c.full_id.clone())
            .collect();
        for id in ids {
            if self.reach_wait.iter().any(|(x, _)| *x == id) {
                continue;
            }
            match self.reach_due.iter_mut().find(|(x, _)| *x == id) {
                Some(due) => due.1 = due.1.min(now),
                None => self.reach_due.push((id, now)),
            }
        }
    }

    /// `check P`: each live container's mapping of host port `port`, judged from what the
    /// table holds for its namespace now (kept current by the kernel's events; a re-read
    /// is also asked for, whose changes become records).
    pub(super) fn published_answer(&mut self, port: u16) -> Vec<Published> {
        self.recheck_reach(Some(port));
        let mut out = Vec::new();
        let cs: Vec<_> = self.docker.iter().cloned().collect();
        for c in cs {
            let Some(netns) = c.netns.filter(|_| c.state.is_live()) else {
                continue;
            };
            for pm in c.published.iter().filter(|pm| pm.host_port == port) {
                let verdict = self.judge_published(&c, pm, netns);
                out.push(Published {
                    container: c.r.name.to_string(),
                    proto: pm.proto.name(),
                    host_ip: pm.host_ip,
                    host_port: pm.host_port,
                    container_port: pm.container_port,
                    reachable: verdict.is_none(),
                    hint: verdict.as_ref().map(|(_, h)| h.clone()),
                    listening: verdict.map(|(l, _)| l),
                });
            }
        }
        out.sort_by(|a, b| (&a.container, a.proto).cmp(&(&b.container, b.proto)));
        out
    }

    /// Judge the published ports of the containers in `netns` from the table: those waiting
    /// for this re-read (when `reread`), and those already found unreachable (to see them
    /// heal).
    pub(super) fn reach_netns(&mut self, netns: u32, reread: bool) {
        let mut ids: Vec<Box<str>> = Vec::new();
        if reread {
            let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reach_wait)
                .into_iter()
                .partition(|(_, n)| *n == netns);
            self.reach_wait = rest;
            ids.extend(mine.into_iter().map(|(id, _)| id));
        }
        for (id, ..) in &self.unreachable {
            if self.docker.get(id).is_some_and(|c| c.netns == Some(netns)) && !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        for id in ids {
            let Some(c) = self.docker.get(&id).cloned() else {
                continue;
            };
            for pm in &c.published {
                let verdict = self.judge_published(&c, pm, netns);
                let key = (id.clone(), pm.proto, pm.host_port);
                let was = self.unreachable.contains(&key);
                match verdict {
                    Some((listening, hint)) if !was => {
                        self.unreachable.insert(key);
                        self.write_reach(&c, pm, DockerEvent::Unreachable, Some(listening), hint);
                    }
                    None if was => {
                        self.unreachable.remove(&key);
                        let hint = format!(
                            "{} now listens on {} port {}",
                            c.r.name,
                            pm.proto.name(),
                            pm.container_port
                        );
                        self.write_reach(&c, pm, DockerEvent::Reachable, None, hint);
                    }
                    _ => {}
                }
            }
        }
    }

    /// None when published traffic for `pm` reaches a listener in `netns`; else what does
    /// listen on the container port there, and the hint.
    fn judge_published(
        &self,
        c: &Container,
        pm: &PortMap,
        netns: u32,
    ) -> Option<(Vec<reach::Listening>, String)> {
        let ips: Vec<IpAddr> = c.networks.iter().filter_map(|n| n.ip).collect();
        let listeners = self
            .table
            .rows()
            .filter(|(ns, x)| {
                *ns == netns
                    && x.remote.port() == 0
                    && (x.proto == Proto::Udp || x.state == table::TCP_LISTEN)
            })
            .map(|(_, x)| (x.proto, x.local.ip(), x.local.port()));
        let listening = reach::judge(pm, listeners, &ips)?;
        let comm = self
            .table
            .rows()
            .find(|(ns, x)| {
                *ns == netns && x.local.port() == pm.container_port && x.proto == pm.proto
            })
            .and_then(|(_, x)| x.owner.as_ref().map(|o| o.comm.clone()));
        let hint = reach::hint(&c.r.name, pm, &listening, comm.as_deref());
        Some((listening, hint))
    }

    fn write_reach(
        &mut self,
        c: &Container,
        pm: &PortMap,
        event: DockerEvent,
        listening: Option<Vec<reach::Listening>>,
        hint: String,
    ) {
        let r = portwatch_schema::Docker {
            container: Some(c.r.clone()),
            netns: c.netns,
            proto: Some(pm.proto.schema()),
            host_ip: Some(pm.host_ip),
            host_port: Some(pm.host_port),
            container_port: Some(pm.container_port),
            listening,
            hint: Some(hint),
            ..portwatch_schema::Docker::new(event)
        };
        self.emit_body(Clock::now_wall_ns(), Body::Docker(r));
    }
}

/// The container's own network namespace, reached through its main process; None for a
/// container that is not running or shares the host's.
fn own_namespace(c: &Container) -> Option<diag::Namespace> {
    let netns = c.netns?;
    if c.pid == 0 || c.network_mode.as_ref() == "host" {
        return None;
    }
    Some(diag::Namespace {
        inode: netns,
        path: PathBuf::from(format!("/proc/{}/ns/net", c.pid)),
    })
}
