//! Golden records: one of each record type, built as the agent builds it and compared byte
//! for byte with the line it writes. Schema v1 allows new fields, never a renamed or
//! dropped one (docs/schema.md): a change here is a change every user's script sees, so
//! each expected line below is the contract, not a snapshot to refresh.

use super::*;
use crate::{engines::containers::ContainerRef, model::Overlap};
use portwatch_schema::{
    Busiest, CgroupMode, ConflictActor, Destination, Docker, Ephemeral, Exit, Listening, Lost,
    Network, Port, PortActor, PortCount, PortMap, Pressure, RemoteCount, TimeWait,
};

const WALL: i128 = 1_764_000_000_123_456_789;
const NS: u32 = 4_026_531_840;

/// The line the agent writes for `body`.
fn line(body: Body) -> String {
    serde_json::to_string(&record::record(&Text::from("lab1"), WALL, body)).unwrap()
}

fn web() -> Arc<ContainerRef> {
    Arc::new(ContainerRef {
        id: "99c0b70358a8".into(),
        engine: "docker".into(),
        name: "web1".into(),
        image: "nginx:1.27".into(),
        compose_project: Some("shop".into()),
        compose_service: Some("web".into()),
    })
}

fn event(k: u32, ret: i32) -> Event {
    let mut e = Event::zeroed();
    e.kind = k;
    e.pid = 4242;
    e.tid = 4243;
    e.uid = 1000;
    e.cgroup_id = 77;
    e.ret = ret;
    e.fd = 3;
    e.family = portwatch_common::AF_INET;
    e.proto = IPPROTO_TCP;
    e.port = 8080;
    e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    e.comm[..5].copy_from_slice(b"nginx");
    e.netns = NS;
    e
}

fn listener() -> table::Holder {
    table::Holder {
        pid: Some(17),
        comm: Some("python3".into()),
        cmdline: Some("python3 -m http.server 8080".into()),
        uid: Some(0),
        state: portwatch_schema::SockState::Listen,
        proto: portwatch_schema::Proto::Tcp,
        addr: "0.0.0.0".parse().unwrap(),
        port: 8080,
        overlap: Overlap::Wildcard,
        since: Some("2025-11-24T15:59:00.000000000Z".into()),
        count: None,
        expires_in_s: None,
        container: Some(web()),
        via: None,
        container_port: None,
        stale: None,
    }
}

/// The agent's line is the contract, and the typed schema every reader uses
/// (`portwatch_schema::Record`) reads it and writes the same bytes back: no field it does not
/// know, none it drops or reorders.
fn same(got: &str, want: &str) {
    assert_eq!(
        got, want,
        "schema v1 changed: update docs/schema.md and bump `v` if a field was renamed or dropped"
    );
    let typed = portwatch_schema::Record::parse(got).unwrap_or_else(|e| panic!("{e}: {got}"));
    assert!(
        !matches!(typed.body, portwatch_schema::Body::Unknown),
        "a type the schema crate does not know: {got}"
    );
    assert_eq!(
        serde_json::to_string(&typed).unwrap(),
        got,
        "portwatch-schema reads this record differently from how the agent writes it"
    );
}

#[test]
fn conflict_bind() {
    let e = event(kind::BIND, -98);
    let mut actor = record::actor(&e, Some(Arc::from("nginx -g daemon off;")));
    actor.container = Some(web());
    let ts = decode::rfc3339(WALL);
    let mut r = record::conflict(&ts, &e, Kind::Bind, NS, actor);
    r.holders.push(listener());
    r.cause = Cause::Listener;
    r.overlap = Some(Overlap::Wildcard);
    r.hint = "pid 17 (python3) listens on 0.0.0.0:8080; stop it or bind another port".into();
    r.reason = None;
    same(
        &line(Body::Conflict(r)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"conflict","host":"lab1","op":"bind","error":"EADDRINUSE","errno":98,"proto":"tcp","family":"ipv4","addr":"127.0.0.1","port":8080,"netns":4026531840,"fd":3,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":"nginx -g daemon off;","cgroup_id":77,"container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"}},"holders":[{"pid":17,"comm":"python3","cmdline":"python3 -m http.server 8080","uid":0,"state":"LISTEN","proto":"tcp","addr":"0.0.0.0","port":8080,"overlap":"wildcard","since":"2025-11-24T15:59:00.000000000Z","container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"}}],"cause":"listener","overlap":"wildcard","hint":"pid 17 (python3) listens on 0.0.0.0:8080; stop it or bind another port","count":1,"first_ts":"2025-11-24T16:00:00.123456789Z","last_ts":"2025-11-24T16:00:00.123456789Z"}"#,
    );
}

#[test]
fn conflict_connect_with_destination() {
    let mut e = event(kind::CONNECT, -99);
    e.raddr[..4].copy_from_slice(&[10, 0, 0, 5]);
    e.rport = 5432;
    let ts = decode::rfc3339(WALL);
    let mut r = record::conflict(&ts, &e, Kind::Connect, NS, record::actor(&e, None));
    r.destination = Some(Destination {
        addr: "10.0.0.5".parse().unwrap(),
        port: 5432,
        in_use: 28231,
        time_wait: 1000,
        range: Some([32768, 60999]),
        as_of: Some(decode::rfc3339(WALL + 5_000_000)),
    });
    r.count = 250;
    same(
        &line(Body::Conflict(r)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"conflict","host":"lab1","op":"connect","error":"EADDRNOTAVAIL","errno":99,"proto":"tcp","family":"ipv4","addr":"10.0.0.5","port":5432,"netns":4026531840,"fd":3,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":null,"cgroup_id":77},"holders":[],"cause":"ephemeral_exhausted","destination":{"addr":"10.0.0.5","port":5432,"in_use":28231,"time_wait":1000,"range":[32768,60999],"as_of":"2025-11-24T16:00:00.128456789Z"},"hint":"no free local port toward this destination; widen net.ipv4.ip_local_port_range or reuse connections","count":250,"first_ts":"2025-11-24T16:00:00.123456789Z","last_ts":"2025-11-24T16:00:00.123456789Z"}"#,
    );
}

#[test]
fn conflict_docker_publish() {
    let ts = decode::rfc3339(WALL);
    let mut holder = listener();
    holder.via = Some("docker-proxy".into());
    holder.container_port = Some(80);
    let r = portwatch_schema::Conflict {
        op: Op::DockerPublish,
        error: portwatch_schema::Error::PortAlreadyAllocated,
        errno: None,
        proto: portwatch_schema::Proto::Tcp,
        family: portwatch_schema::Family::Ipv4,
        addr: "0.0.0.0".parse().unwrap(),
        port: 8080,
        netns: NS,
        fd: None,
        actor: ConflictActor::Container { container: web() },
        holders: vec![holder],
        cause: Cause::PortAlreadyAllocated,
        overlap: Some(Overlap::Exact),
        destination: None,
        hint: "container web1 already publishes 0.0.0.0:8080 -> 80/tcp".into(),
        docker_error: Some("Bind for 0.0.0.0:8080 failed: port is already allocated".into()),
        reason: None,
        count: 1,
        first_ts: ts.clone(),
        last_ts: ts,
    };
    same(
        &line(Body::Conflict(r)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"conflict","host":"lab1","op":"docker_publish","error":"port_already_allocated","proto":"tcp","family":"ipv4","addr":"0.0.0.0","port":8080,"netns":4026531840,"actor":{"container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"}},"holders":[{"pid":17,"comm":"python3","cmdline":"python3 -m http.server 8080","uid":0,"state":"LISTEN","proto":"tcp","addr":"0.0.0.0","port":8080,"overlap":"wildcard","since":"2025-11-24T15:59:00.000000000Z","container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"},"via":"docker-proxy","container_port":80}],"cause":"port_already_allocated","overlap":"exact","hint":"container web1 already publishes 0.0.0.0:8080 -> 80/tcp","docker_error":"Bind for 0.0.0.0:8080 failed: port is already allocated","count":1,"first_ts":"2025-11-24T16:00:00.123456789Z","last_ts":"2025-11-24T16:00:00.123456789Z"}"#,
    );
}

#[test]
fn port_open_and_close() {
    let actor = || {
        Some(PortActor {
            pid: 17,
            comm: "python3".into(),
            cmdline: None,
            uid: 0,
            container: Some(web()),
        })
    };
    let open = Port {
        event: portwatch_schema::PortEvent::Open,
        proto: portwatch_schema::Proto::Tcp,
        family: portwatch_schema::Family::Ipv4,
        addr: "0.0.0.0".parse().unwrap(),
        port: 8080,
        netns: NS,
        actor: actor(),
        existing: Some(true),
        since: None,
        held_s: None,
        restarts: None,
        reason: None,
    };
    same(
        &line(Body::Port(open.clone())),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"port","host":"lab1","event":"open","proto":"tcp","family":"ipv4","addr":"0.0.0.0","port":8080,"netns":4026531840,"actor":{"pid":17,"comm":"python3","cmdline":null,"uid":0,"container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"}},"existing":true}"#,
    );
    let close = Port {
        event: portwatch_schema::PortEvent::Close,
        existing: None,
        since: Some("2025-11-24T15:59:00.000000000Z".into()),
        held_s: Some(61.5),
        restarts: Some(2),
        reason: Some("gone".into()),
        ..open
    };
    same(
        &line(Body::Port(close)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"port","host":"lab1","event":"close","proto":"tcp","family":"ipv4","addr":"0.0.0.0","port":8080,"netns":4026531840,"actor":{"pid":17,"comm":"python3","cmdline":null,"uid":0,"container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"}},"since":"2025-11-24T15:59:00.000000000Z","held_s":61.5,"restarts":2,"reason":"gone"}"#,
    );
}

#[test]
fn socket_calls_and_exit() {
    let e = event(kind::BIND, 0);
    let r = record::sock_op(&e, Kind::Bind, NS, record::actor(&e, None));
    same(
        &line(r),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"bind","host":"lab1","result":"ok","errno":0,"proto":"tcp","family":"ipv4","addr":"127.0.0.1","port":8080,"netns":4026531840,"fd":3,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":null,"cgroup_id":77}}"#,
    );
    let mut c = event(kind::CONNECT, -111);
    c.raddr[..4].copy_from_slice(&[10, 0, 0, 5]);
    c.rport = 5432;
    c.port = 40000;
    let r = record::sock_op(&c, Kind::Connect, NS, record::actor(&c, None));
    same(
        &line(r),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"connect","host":"lab1","result":"ECONNREFUSED","errno":111,"proto":"tcp","family":"ipv4","addr":"127.0.0.1","port":40000,"raddr":"10.0.0.5","rport":5432,"netns":4026531840,"fd":3,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":null,"cgroup_id":77}}"#,
    );
    let x = Exit {
        netns: NS,
        actor: record::actor(&e, None),
    };
    same(
        &line(Body::Exit(x)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"exit","host":"lab1","netns":4026531840,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":null,"cgroup_id":77}}"#,
    );
}

#[test]
fn tcp_state() {
    let mut e = event(kind::TCP_STATE, 0);
    e.raddr[..4].copy_from_slice(&[10, 0, 0, 5]);
    e.rport = 5432;
    e.old_state = 5;
    e.new_state = 7;
    let mut out = Vec::new();
    record::write_tcp_state(&mut out, decode::rfc3339(WALL).as_bytes(), b"\"lab1\"", &e);
    same(
        std::str::from_utf8(&out).unwrap(),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"tcp_state","host":"lab1","family":"ipv4","addr":"127.0.0.1","port":8080,"raddr":"10.0.0.5","rport":5432,"old_state":"FIN_WAIT2","new_state":"CLOSE","time_wait":true,"netns":4026531840,"context_pid":4242}"#,
    );
}

#[test]
fn lost() {
    let r = Lost {
        count: 12,
        kernel: 10,
        agent: 2,
        by_kind: BTreeMap::from([("bind".into(), 9), ("close".into(), 3)]),
        total: 40,
    };
    same(
        &line(Body::Lost(r)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"lost","host":"lab1","count":12,"kernel":10,"agent":2,"by_kind":{"bind":9,"close":3},"total":40}"#,
    );
}

#[test]
fn docker_records() {
    let connected = Docker {
        endpoint: Some("unix:///var/run/docker.sock".into()),
        engine: Some("docker".into()),
        api_version: Some("1.41".into()),
        server_version: Some("20.10.24".into()),
        containers: Some(3),
        running: Some(2),
        sync_ms: Some(12),
        cgroup: Some(CgroupMode::Hybrid),
        ..Docker::new(portwatch_schema::DockerEvent::Connected)
    };
    same(
        &line(Body::Docker(connected)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"docker","host":"lab1","event":"connected","endpoint":"unix:///var/run/docker.sock","engine":"docker","api_version":"1.41","server_version":"20.10.24","containers":3,"running":2,"sync_ms":12,"cgroup":"hybrid"}"#,
    );
    let nets = vec![Network {
        name: "bridge".into(),
        ip: Some("172.17.0.2".parse().unwrap()),
    }];
    let ports = vec![PortMap {
        proto: portwatch_schema::Proto::Tcp,
        host_ip: "0.0.0.0".parse().unwrap(),
        host_port: 8080,
        container_port: 80,
    }];
    let start = Docker {
        container: Some(web()),
        pid: Some(5151),
        netns: Some(4_026_532_100),
        cgroup_id: Some(9876),
        cgroup_path: Some("/system.slice/docker-99c0b70358a8.scope".into()),
        network_mode: Some("bridge".into()),
        networks: Some(nets),
        ports: Some(ports),
        ..Docker::new(portwatch_schema::DockerEvent::Start)
    };
    same(
        &line(Body::Docker(start)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"docker","host":"lab1","event":"start","container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"},"pid":5151,"netns":4026532100,"cgroup_id":9876,"cgroup_path":"/system.slice/docker-99c0b70358a8.scope","network_mode":"bridge","networks":[{"name":"bridge","ip":"172.17.0.2"}],"ports":[{"proto":"tcp","host_ip":"0.0.0.0","host_port":8080,"container_port":80}]}"#,
    );
    let unreachable = Docker {
        container: Some(web()),
        proto: Some(portwatch_schema::Proto::Tcp),
        host_ip: Some("0.0.0.0".parse().unwrap()),
        host_port: Some(8080),
        container_port: Some(80),
        listening: Some(vec![Listening {
            addr: "127.0.0.1".parse().unwrap(),
            port: 80,
        }]),
        hint: Some("web1 listens on 127.0.0.1:80 only; listen on 0.0.0.0".into()),
        ..Docker::new(portwatch_schema::DockerEvent::Unreachable)
    };
    same(
        &line(Body::Docker(unreachable)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"docker","host":"lab1","event":"unreachable","container":{"id":"99c0b70358a8","engine":"docker","name":"web1","image":"nginx:1.27","compose_project":"shop","compose_service":"web"},"proto":"tcp","host_ip":"0.0.0.0","host_port":8080,"container_port":80,"listening":[{"addr":"127.0.0.1","port":80}],"hint":"web1 listens on 127.0.0.1:80 only; listen on 0.0.0.0"}"#,
    );
}

#[test]
fn agent_records() {
    let ready = AgentRecord {
        version: Some("0.1.0".into()),
        pid: Some(14125),
        mode: Some("default".into()),
        hooks: Some("tracepoint".into()),
        programs: Some(vec!["sys_enter_bind".into(), "sys_exit_bind".into()]),
        ports: Some(vec![]),
        ringbuf_bytes: Some(4_194_304),
        netns_source: Some("kernel".into()),
        tracefs_mounted: Some(false),
        startup_ms: Some(376),
        table_size: Some(40),
        namespaces: Some(3),
        ..AgentRecord::new(AgentEvent::Ready)
    };
    same(
        &line(Body::Agent(ready)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"agent","host":"lab1","event":"ready","version":"0.1.0","pid":14125,"mode":"default","hooks":"tracepoint","programs":["sys_enter_bind","sys_exit_bind"],"ports":[],"ringbuf_bytes":4194304,"netns_source":"kernel","tracefs_mounted":false,"startup_ms":376,"table_size":40,"namespaces":3}"#,
    );
    let stopped = AgentRecord {
        records: Some(2),
        lost_total: Some(0),
        log_write_errors: Some(0),
        stdout_write_errors: Some(0),
        drift_healed: Some(1),
        unwritten: Some(0),
        uptime_s: Some(2.884),
        ..AgentRecord::new(AgentEvent::Stopped)
    };
    same(
        &line(Body::Agent(stopped)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"agent","host":"lab1","event":"stopped","records":2,"lost_total":0,"log_write_errors":0,"stdout_write_errors":0,"drift_healed":1,"unwritten":0,"uptime_s":2.884}"#,
    );
}

#[test]
fn time_wait_and_pressure() {
    let tw = TimeWait {
        netns: NS,
        total: 1200,
        entered: 300,
        expired: 250,
        counted_by: "dumps".into(),
        by_local_port: vec![PortCount {
            port: 8080,
            count: 900,
        }],
        by_remote: vec![RemoteCount {
            addr: "10.0.0.5".parse().unwrap(),
            port: 5432,
            count: 300,
        }],
        ephemeral: Ephemeral {
            range: [32768, 60999],
            busiest: Some(Busiest {
                addr: "10.0.0.5".parse().unwrap(),
                port: 5432,
                in_use: 300,
                pct: 1.1,
            }),
        },
    };
    same(
        &line(Body::TimeWait(tw)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"time_wait","host":"lab1","netns":4026531840,"total":1200,"entered":300,"expired":250,"counted_by":"dumps","by_local_port":[{"port":8080,"count":900}],"by_remote":[{"addr":"10.0.0.5","port":5432,"count":300}],"ephemeral":{"range":[32768,60999],"busiest":{"addr":"10.0.0.5","port":5432,"in_use":300,"pct":1.1}}}"#,
    );
    let p = Pressure {
        netns: NS,
        addr: "10.0.0.5".parse().unwrap(),
        port: 5432,
        in_use: 20000,
        range: [32768, 60999],
        pct: 70.8,
        threshold_pct: 50.0,
        hint: "20000 of 28232 local ports toward 10.0.0.5:5432 are taken".into(),
    };
    same(
        &line(Body::Pressure(p)),
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"pressure","host":"lab1","netns":4026531840,"addr":"10.0.0.5","port":5432,"in_use":20000,"range":[32768,60999],"pct":70.8,"threshold_pct":50.0,"hint":"20000 of 28232 local ports toward 10.0.0.5:5432 are taken"}"#,
    );
}

/// Every field of every golden record above is named in docs/schema.md, the schema users
/// read: a field added to a record without its documentation fails here.
#[test]
fn every_golden_field_is_documented() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/schema.md"));
    let me = include_str!("golden.rs");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    out.push(k.clone());
                    walk(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut lines = 0;
    for part in me.split("r#\"").skip(1) {
        let Some((json, _)) = part.split_once("\"#") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            continue;
        };
        lines += 1;
        let mut keys = Vec::new();
        walk(&v, &mut keys);
        // by_kind's keys are event kinds, not field names.
        let by_kind: Vec<&String> = v["by_kind"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let named = |k: &str| {
            doc.match_indices(k).any(|(i, _)| {
                !word(doc[..i].chars().next_back()) && !word(doc[i + k.len()..].chars().next())
            })
        };
        for k in keys.iter().filter(|k| !by_kind.contains(k)) {
            assert!(
                named(k),
                "{}: field `{k}` is not in docs/schema.md",
                v["type"]
            );
        }
    }
    assert_eq!(lines, 17, "every golden record was checked");
}
