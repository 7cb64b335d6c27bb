//! What metrics and `attach` filters read from a record: its type, the ports, pids and
//! containers it names, its cause and counts. The agent takes them from the typed record as
//! it writes it (`Keys::of_record`), so no stage parses the agent's own JSON back; readers
//! of a log file (`report`, `tail`'s filter) take them from the same typed record read back,
//! and from the raw JSON (`Keys::from_value`) only for a line the schema cannot read. All go
//! through the same `Filter::matches_keys`.

use std::sync::Arc;

use portwatch_common::{Event, Kind};
use portwatch_schema::{Actor, Body, Cause, ConflictActor, Record, Text, Type};
use serde_json::Value;

use crate::{engines::containers::ContainerRef, state::table::Holder};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Keys {
    /// The record's `type`.
    pub ty: &'static str,
    /// Every port it is about: the attempted or held port, the remote port, the
    /// destination's, the holders', a container's published host ports.
    pub ports: Vec<u16>,
    /// The actor, the holders, a tcp_state's context pid, a container's init.
    pub pids: Vec<u32>,
    /// Shared with the record (a filter matches by name or id prefix): no copy per record.
    pub containers: Vec<Arc<ContainerRef>>,
    /// `conflict`: the cause.
    pub cause: Option<Cause>,
    /// `conflict`: the failures it stands for; `lost`: the events lost.
    pub count: u64,
    /// `time_wait`: the namespace and its TIME_WAIT total.
    pub netns: u32,
    pub total: u64,
}

impl Keys {
    pub fn of(ty: &'static str) -> Self {
        Keys {
            ty,
            ..Default::default()
        }
    }

    fn container(&mut self, c: Option<&Arc<ContainerRef>>) {
        if let Some(c) = c {
            self.containers.push(c.clone());
        }
    }

    fn actor(&mut self, a: &Actor) {
        self.pids.push(a.pid);
        self.container(a.container.as_ref());
    }

    fn holders(&mut self, hs: &[Holder]) {
        for h in hs {
            self.ports.push(h.port);
            self.pids.extend(h.pid);
            self.container(h.container.as_ref());
        }
    }

    /// A verbose record (bind, listen, connect, close, exit, tcp_state) straight from its
    /// kernel event, for the events kept raw in the attach window.
    pub fn of_event(e: &Event, k: Kind, container: Option<&Arc<ContainerRef>>) -> Self {
        let mut keys = Keys::of(k.name());
        match k {
            Kind::Exit => {}
            Kind::TcpState => keys.ports.extend([e.port, e.rport]),
            Kind::Bind | Kind::Listen | Kind::Connect | Kind::Close => {
                keys.ports.push(e.port);
                if e.rport != 0 {
                    keys.ports.push(e.rport);
                }
            }
        }
        // tcp_state names the task whose CPU ran the change as context_pid.
        keys.pids.push(e.pid);
        keys.container(container);
        keys
    }

    /// The same keys from a record read back from a log file or a socket.
    pub fn from_value(v: &Value) -> Self {
        let ty = v["type"].as_str().unwrap_or("");
        // The schema's type names are `'static`; one it does not know is `unknown`.
        let mut k = Keys::of(Type::parse(ty).known().unwrap_or("unknown"));
        let port = |x: &Value| x.as_u64().and_then(|p| u16::try_from(p).ok());
        let pid = |x: &Value| x.as_u64().and_then(|p| u32::try_from(p).ok());
        let named = |x: &Value| {
            let text = |k: &str| x[k].as_str().map(|s| Text::from(s.to_owned()));
            Some(Arc::new(ContainerRef {
                id: text("id").unwrap_or_default(),
                engine: if x["engine"] == "podman" {
                    "podman".into()
                } else {
                    "docker".into()
                },
                name: text("name")?,
                image: text("image").unwrap_or_default(),
                compose_project: text("compose_project"),
                compose_service: text("compose_service"),
            }))
        };
        for p in [
            &v["port"],
            &v["rport"],
            &v["destination"]["port"],
            &v["host_port"],
        ] {
            k.ports.extend(port(p));
        }
        for p in [&v["actor"]["pid"], &v["context_pid"], &v["pid"]] {
            k.pids.extend(pid(p));
        }
        for c in [&v["actor"]["container"], &v["container"]] {
            k.containers.extend(named(c));
        }
        for h in v["holders"].as_array().into_iter().flatten() {
            k.ports.extend(port(&h["port"]));
            k.pids.extend(pid(&h["pid"]));
            k.containers.extend(named(&h["container"]));
        }
        for m in v["ports"].as_array().into_iter().flatten() {
            k.ports.extend(port(&m["host_port"]));
        }
        if k.ty == "conflict" {
            // A name this version does not know counts as `unknown`, as the agent's own do.
            k.cause = Some(match v["cause"].as_str().map(Cause::parse) {
                Some(Cause::Other(_)) | None => Cause::Unknown,
                Some(c) => c,
            });
        }
        k.count = v["count"].as_u64().unwrap_or(0);
        k.netns = v["netns"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        k.total = v["total"].as_u64().unwrap_or(0);
        k
    }
}

impl Keys {
    /// The keys of a typed record: the agent's own as it writes them, or a line read back.
    pub fn of_record(r: &Record) -> Self {
        let mut k = Keys::of(r.ty().known().unwrap_or("unknown"));
        match &r.body {
            Body::Conflict(c) => {
                k.ports.push(c.port);
                k.ports.extend(c.destination.as_ref().map(|d| d.port));
                match &c.actor {
                    ConflictActor::Process(a) => k.actor(a),
                    ConflictActor::Container { container } => k.container(Some(container)),
                }
                k.holders(&c.holders);
                // A name this version does not know counts as `unknown`.
                k.cause = Some(match &c.cause {
                    Cause::Other(_) => Cause::Unknown,
                    known => known.clone(),
                });
                k.count = c.count;
                k.netns = c.netns;
            }
            Body::Port(p) => {
                k.ports.push(p.port);
                if let Some(a) = &p.actor {
                    k.pids.push(a.pid);
                    k.container(a.container.as_ref());
                }
                k.netns = p.netns;
            }
            Body::Bind(o) | Body::Listen(o) | Body::Connect(o) | Body::Close(o) => {
                k.ports.push(o.port);
                k.ports.extend(o.rport);
                k.actor(&o.actor);
                k.netns = o.netns;
            }
            Body::Exit(x) => {
                k.actor(&x.actor);
                k.netns = x.netns;
            }
            Body::TcpState(t) => {
                k.ports.extend([t.port, t.rport]);
                k.pids.push(t.context_pid);
                k.netns = t.netns;
            }
            Body::TimeWait(t) => {
                k.netns = t.netns;
                k.total = t.total;
            }
            Body::Pressure(p) => {
                k.ports.push(p.port);
                k.netns = p.netns;
            }
            Body::Lost(l) => {
                k.count = l.count;
                k.total = l.total;
            }
            Body::Docker(d) => {
                k.ports.extend(d.host_port);
                k.ports
                    .extend(d.ports.iter().flatten().map(|m| m.host_port));
                k.pids.extend(d.pid);
                k.container(d.container.as_ref());
                k.netns = d.netns.unwrap_or(0);
            }
            Body::Missed(m) => k.count = m.count,
            Body::Agent(_) | Body::Unknown => {}
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_from_a_conflict_line() {
        let v = json!({"type":"conflict","port":8080,"cause":"listener","count":3,"netns":7,
            "actor":{"pid":1,"container":{"name":"web1","id":"99c0b70358a8"}},
            "holders":[{"pid":2,"port":8081,"container":{"name":"db","id":"aa"}}]});
        let k = Keys::from_value(&v);
        assert_eq!(k.ty, "conflict");
        assert_eq!(k.ports, vec![8080, 8081]);
        assert_eq!(k.pids, vec![1, 2]);
        assert_eq!(k.containers.len(), 2);
        assert_eq!(k.cause, Some(Cause::Listener));
        assert_eq!((k.count, k.netns), (3, 7));
    }

    /// Normalized for comparison: the typed keys and the read-back keys name the same
    /// things, in an order of their own.
    fn norm(mut k: Keys) -> Keys {
        k.ports.sort_unstable();
        k.ports.dedup();
        k.pids.sort_unstable();
        k.pids.dedup();
        k.containers.sort_by(|a, b| a.name.cmp(&b.name));
        k.containers.dedup();
        k
    }

    fn container(name: &str, id: &str) -> Arc<ContainerRef> {
        Arc::new(ContainerRef {
            id: Text::copy(id),
            engine: "docker".into(),
            name: Text::copy(name),
            image: "nginx".into(),
            compose_project: None,
            compose_service: None,
        })
    }

    /// What the agent filters and counts a live record by is what a reader of its line
    /// gets: for a conflict with a container actor and a container holder, a bind, an exit
    /// and a docker lifecycle record, the keys of the typed record equal those of its line
    /// read back as JSON (the path for a line the schema cannot read).
    #[test]
    fn typed_keys_equal_the_keys_of_the_written_line() {
        use crate::output::record;
        let mut e = Event::zeroed();
        e.kind = portwatch_common::kind::BIND;
        e.ret = -98;
        e.pid = 41;
        e.tid = 42;
        e.port = 8080;
        e.family = portwatch_common::AF_INET;
        e.proto = portwatch_common::IPPROTO_TCP;
        let mut actor = record::actor(&e, None);
        actor.container = Some(container("web", "99c0b70358a8"));
        let mut c = record::conflict("ts", &e, Kind::Bind, 7, actor);
        c.holders.push(Holder {
            pid: Some(9),
            comm: Some("nginx".into()),
            cmdline: None,
            uid: Some(0),
            state: portwatch_schema::SockState::Listen,
            proto: portwatch_schema::Proto::Tcp,
            addr: "0.0.0.0".parse().unwrap(),
            port: 8080,
            overlap: crate::state::table::Overlap::Wildcard,
            since: None,
            count: None,
            expires_in_s: None,
            container: Some(container("db", "aa11")),
            via: None,
            container_port: None,
            stale: None,
        });
        c.cause = Cause::Listener;
        c.count = 4;
        let web = container("web", "99c0b70358a8");
        let d = portwatch_schema::Docker {
            container: Some(web),
            pid: Some(5),
            ..portwatch_schema::Docker::new(portwatch_schema::DockerEvent::Die)
        };
        let host = Text::from("h");
        for body in [
            Body::Conflict(c),
            record::sock_op(&e, Kind::Bind, 7, record::actor(&e, None)),
            Body::Exit(portwatch_schema::Exit {
                netns: 7,
                actor: record::actor(&e, None),
            }),
            Body::Docker(d),
        ] {
            let r = record::record(&host, 0, body);
            let line = serde_json::to_value(&r).unwrap();
            let typed = Keys::of_record(&r);
            assert!(!typed.ports.is_empty() || !typed.pids.is_empty(), "{r:?}");
            assert_eq!(norm(typed), norm(Keys::from_value(&line)), "{line}");
        }
    }

    #[test]
    fn unknown_type_and_cause_stay_named_as_such() {
        let k = Keys::from_value(&json!({"type":"conflict","cause":"martian"}));
        assert_eq!(k.cause, Some(Cause::Unknown));
        assert_eq!(Keys::from_value(&json!({"type":"nope"})).ty, "unknown");
    }
}
