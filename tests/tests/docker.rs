//! The Docker join, end to end: the real agent against the real dockerd, real containers
//! from the busybox test image, real port conflicts. `cargo xtask test` installs and starts
//! dockerd and builds the image first; without them these tests fail, never skip.
//!
//! Docker 20.10 (Debian's) binds published ports with docker-proxy; since Docker 28 dockerd
//! binds them itself. The tests accept either as `via`.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use portwatch_tests::{
    docker::*,
    schema::{Cause, ContainerRef, DockerEvent, Family, Op, Overlap, Proto},
    *,
};

const HOLD: &str = env!("CARGO_BIN_EXE_pw-hold");

fn is_docker(r: &Record, event: DockerEvent) -> bool {
    docker_event(r, event).is_some()
}

/// The agent, tracing the join on stderr (shown when a wait fails). It watches only the
/// test's ports: this host may be busy with other work (a bind storm elsewhere would queue
/// ahead of the records a test waits for); Docker records are never filtered.
fn start_agent(ports: &[u16]) -> Agent {
    let mut cmd = std::process::Command::new(agent_bin());
    // Docker only: a Podman service running on the host would be joined too by default.
    cmd.args(["run", "--docker-host", "unix:///var/run/docker.sock"])
        .env("PORTWATCH_TRACE_DOCKER", "1");
    for p in ports {
        cmd.args(["--port", &p.to_string()]);
    }
    Agent::start_cmd(&mut cmd)
}

/// The agent, joined to the daemon.
fn agent(ports: &[u16]) -> Agent {
    require_docker();
    let a = start_agent(ports);
    let c = wait_docker_connected(&a);
    assert!(
        c.api_version
            .as_deref()
            .is_some_and(|s| s.starts_with("1.")),
        "{c:?}"
    );
    assert!(c.server_version.is_some(), "{c:?}");
    a
}

/// The container's `start` record.
fn start_record(agent: &Agent, c: &Container) -> Record {
    wait_container_event(agent, DockerEvent::Start, &c.short_id())
}

/// A `docker` record's body.
fn body(r: &Record) -> &schema::Docker {
    r.docker()
        .unwrap_or_else(|| panic!("not a docker record: {r:?}"))
}

/// This process binds 0.0.0.0:port and must get EADDRINUSE.
fn fail_bind(port: u16) {
    let a: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE),
        "bind 0.0.0.0:{port} should fail"
    );
}

fn host_conflict(agent: &Agent, port: u16) -> Record {
    let ns = host_netns();
    agent.wait_record("conflict on the host", |r| {
        r.conflict()
            .is_some_and(|c| c.port == port && u64::from(c.netns) == ns && c.op == Op::Bind)
    })
}

fn check_container(v: Option<&ContainerRef>, c: &Container) {
    let v = v.unwrap_or_else(|| panic!("no container where {} was expected", c.name));
    assert_eq!(v.id, c.short_id(), "{v:?}");
    assert_eq!(v.id.len(), 12, "{v:?}");
    assert_eq!(v.name, c.name, "{v:?}");
    assert_eq!(v.image, TEST_IMAGE, "{v:?}");
}

fn is_binder(via: Option<&str>) -> bool {
    matches!(via, Some("docker-proxy" | "dockerd"))
}

fn httpd(port: u16) -> Vec<String> {
    vec!["httpd".into(), "-f".into(), "-p".into(), port.to_string()]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Docker's "port is already allocated": decided inside dockerd, no syscall fails. The
/// agent turns it into a conflict between the two containers.
#[test]
fn port_already_allocated_between_two_containers() {
    let port = free_port(41);
    let agent = agent(&[port]);
    let p = format!("{port}:80");
    let a = Container::running("alloc-a", &["-p", &p], &strs(&httpd(80)));
    start_record(&agent, &a);
    let b = Container::run("alloc-b", &["-p", &p], &strs(&httpd(80)));
    assert!(!b.ok, "the second publisher must fail");
    assert!(
        b.stderr.contains("port is already allocated"),
        "{}",
        b.stderr
    );

    let r = agent.wait_record("docker_publish conflict", |r| {
        r.conflict()
            .is_some_and(|c| c.op == Op::DockerPublish && c.port == port)
    });
    assert_rfc3339(&r.ts.clone().into());
    assert_eq!(r.v, 1);
    let c = conflict_body(&r);
    assert_eq!(c.error, schema::Error::PortAlreadyAllocated, "{c:?}");
    assert_eq!(c.cause, Cause::PortAlreadyAllocated, "{c:?}");
    assert_eq!(c.proto, Proto::Tcp, "{c:?}");
    // Docker 28 allocates 0.0.0.0 and :: separately and reports whichever it tried
    // first; Docker 20.10 only ever reports 0.0.0.0.
    if c.addr == Ipv4Addr::UNSPECIFIED {
        assert_eq!(c.family, Family::Ipv4, "{c:?}");
    } else if c.addr == Ipv6Addr::UNSPECIFIED {
        assert_eq!(c.family, Family::Ipv6, "{c:?}");
        assert_eq!(c.overlap, Some(Overlap::DualStack), "{c:?}");
    } else {
        panic!("the refused address is a wildcard: {c:?}");
    }
    assert_eq!(u64::from(c.netns), host_netns(), "{c:?}");
    check_container(c.actor.container(), &b);
    assert!(
        c.actor.process().is_none(),
        "no process made a syscall: {c:?}"
    );
    // Absent, not null: the typed record cannot tell the two apart.
    let line = agent.raw_line(&r);
    assert!(
        line["actor"].get("pid").is_none(),
        "no process made a syscall: {line}"
    );
    assert!(!c.holders.is_empty(), "{c:?}");
    for h in &c.holders {
        check_container(h.container.as_deref(), &a);
        assert!(is_binder(h.via.as_deref()), "{c:?}");
        assert_eq!(h.container_port, Some(80), "{c:?}");
    }
    let hint = &c.hint;
    assert!(hint.contains(&format!("docker stop {}", a.name)), "{hint}");
    assert!(
        hint.contains(&format!("publish {} on another host port", b.name)),
        "{hint}"
    );
    assert!(
        c.docker_error
            .as_deref()
            .is_some_and(|e| e.contains("port is already allocated")),
        "{c:?}"
    );

    // Any other process that wants the port is told it is A's.
    fail_bind(port);
    let h = host_conflict(&agent, port);
    let h = conflict_body(&h);
    assert_eq!(h.cause, Cause::DockerPublished, "{h:?}");
    check_container(first_holder(h).container.as_deref(), &a);
    assert!(is_binder(first_holder(h).via.as_deref()), "{h:?}");

    let done = agent.stop();
    let n = done
        .records
        .iter()
        .filter(|r| {
            r.conflict()
                .is_some_and(|c| c.op == Op::DockerPublish && c.port == port)
        })
        .count();
    assert_eq!(n, 1, "one failed start, one record");
}

/// "Error starting userland proxy: ... bind: address already in use": a real EADDRINUSE,
/// but made by docker-proxy (dockerd since 28). The actor is the container being started.
#[test]
fn proxy_bind_failure_names_the_container_being_started() {
    let port = free_port(42);
    let agent = agent(&[port]);
    let holder = Holder::start(HOLD, "tcp-listen", &format!("0.0.0.0:{port}"), None);
    let b = Container::run("proxy-b", &["-p", &format!("{port}:80")], &strs(&httpd(80)));
    assert!(!b.ok, "publishing a port a host process holds must fail");
    assert!(b.stderr.contains("address already in use"), "{}", b.stderr);

    let r = host_conflict(&agent, port);
    let c = conflict_body(&r);
    assert_eq!(c.error, schema::Error::Eaddrinuse, "{c:?}");
    let actor = c.actor.process();
    assert!(is_binder(actor.and_then(|a| a.via.as_deref())), "{c:?}");
    assert!(is_binder(actor.map(|a| a.comm.as_str())), "{c:?}");
    check_container(c.actor.container(), &b);
    assert_eq!(c.cause, Cause::Listener, "{c:?}");
    let h = first_holder(c);
    assert_eq!(
        h.pid,
        Some(holder.pid()),
        "the host process really holds it: {c:?}"
    );
    assert!(h.container.is_none(), "{c:?}");
    // Absent, not null: the typed record cannot tell the two apart.
    let line = agent.raw_line(&r);
    assert!(line["holders"][0].get("container").is_none(), "{line}");
    let hint = &c.hint;
    assert!(
        hint.contains(&format!("publish {} on another host port", b.name)),
        "{hint}"
    );
}

/// Two processes in one container (both via `docker exec`) want the same port: both sides
/// name that container.
#[test]
fn conflict_inside_one_container() {
    let agent = agent(&[8080]);
    let a = Container::running("inside", &[], &["sleep", "3600"]);
    let start = start_record(&agent, &a);
    let start = body(&start);
    let netns = netns_inode_of(&format!("/proc/{}/ns/net", a.pid()));
    assert_eq!(start.netns.map(u64::from), Some(netns), "{start:?}");
    a.exec_detached(&strs(&httpd(8080)));
    // The second httpd fails once the first listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = a.exec(&strs(&httpd(8080)));
        let err = String::from_utf8_lossy(&o.stderr);
        if err.contains("Address already in use") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "second httpd never failed: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = agent.wait_record("conflict in the container", |r| {
        r.conflict()
            .is_some_and(|c| c.port == 8080 && u64::from(c.netns) == netns)
    });
    let c = conflict_body(&r);
    assert_eq!(c.cause, Cause::Listener, "{c:?}");
    check_container(c.actor.container(), &a);
    assert!(c.actor.process().is_some_and(|p| p.via.is_none()), "{c:?}");
    let h = first_holder(c);
    check_container(h.container.as_deref(), &a);
    assert_eq!(h.comm.as_deref(), Some("httpd"), "{c:?}");
    assert!(h.via.is_none(), "{c:?}");
    // Absent, not null: the typed record cannot tell the two apart.
    let line = agent.raw_line(&r);
    assert!(line["actor"].get("via").is_none(), "{line}");
    assert!(line["holders"][0].get("via").is_none(), "{line}");
    assert!(
        c.hint.contains(&format!("in container {}", a.name)),
        "{c:?}"
    );
    // Where cgroup2 is mounted, the kernel's cgroup id is the container's cgroup.
    if let Some(id) = start.cgroup_id {
        assert_eq!(
            c.actor.process().map(|p| p.cgroup_id),
            Some(id),
            "{c:?}\n{start:?}"
        );
    }
}

/// A container on a user-defined bridge network publishes a port; a host process that
/// wants it is told whose it is.
#[test]
fn container_on_a_user_defined_bridge_network() {
    let port = free_port(43);
    let agent = agent(&[port]);
    let net = Network::new("net");
    let a = Container::running(
        "onnet",
        &["--network", &net.name, "-p", &format!("{port}:80")],
        &strs(&httpd(80)),
    );
    let start = start_record(&agent, &a);
    let start = body(&start);
    let nets = start
        .networks
        .as_deref()
        .unwrap_or_else(|| panic!("no networks: {start:?}"));
    assert_eq!(nets.len(), 1, "{start:?}");
    assert_eq!(nets[0].name, net.name, "{start:?}");
    assert!(nets[0].ip.is_some(), "{start:?}");
    assert_eq!(
        start.network_mode.as_deref(),
        Some(net.name.as_str()),
        "{start:?}"
    );
    let ports = start
        .ports
        .as_deref()
        .unwrap_or_else(|| panic!("no ports: {start:?}"));
    assert!(
        ports.iter().any(|p| p.host_port == port
            && p.container_port == 80
            && p.proto == Proto::Tcp
            && p.host_ip == Ipv4Addr::UNSPECIFIED),
        "{start:?}"
    );

    fail_bind(port);
    let r = host_conflict(&agent, port);
    let c = conflict_body(&r);
    assert_eq!(c.cause, Cause::DockerPublished, "{c:?}");
    assert!(c.reason.is_none(), "{c:?}");
    // Absent, not null: the typed record cannot tell the two apart.
    let line = agent.raw_line(&r);
    assert!(line.get("reason").is_none(), "{line}");
    let h = first_holder(c);
    check_container(h.container.as_deref(), &a);
    assert!(is_binder(h.via.as_deref()), "{c:?}");
    assert_eq!(h.container_port, Some(80), "{c:?}");
    let hint = &c.hint;
    assert!(hint.contains(&format!("container {}", a.name)), "{hint}");
    assert!(hint.contains(&format!("docker stop {}", a.name)), "{hint}");
}

/// Compose's labels become compose_project / compose_service wherever the container is
/// named.
#[test]
fn compose_labels_show_up() {
    let port = free_port(44);
    let agent = agent(&[port]);
    let project = format!("shop{}", std::process::id());
    let a = Container::running(
        "compose",
        &[
            "--label",
            &format!("com.docker.compose.project={project}"),
            "--label",
            "com.docker.compose.service=web",
            "-p",
            &format!("{port}:80"),
        ],
        &strs(&httpd(80)),
    );
    let start = start_record(&agent, &a);
    let sc = body(&start).container.as_ref();
    assert_eq!(
        sc.and_then(|x| x.compose_project.as_deref()),
        Some(project.as_str()),
        "{start:?}"
    );
    assert_eq!(
        sc.and_then(|x| x.compose_service.as_deref()),
        Some("web"),
        "{start:?}"
    );
    fail_bind(port);
    let r = host_conflict(&agent, port);
    let c = conflict_body(&r);
    let hc = first_holder(c).container.as_deref();
    check_container(hc, &a);
    assert_eq!(
        hc.and_then(|x| x.compose_project.as_deref()),
        Some(project.as_str()),
        "{c:?}"
    );
    assert_eq!(
        hc.and_then(|x| x.compose_service.as_deref()),
        Some("web"),
        "{c:?}"
    );
    // Not in a container: no key at all.
    assert!(c.actor.container().is_none(), "{c:?}");
    let line = agent.raw_line(&r);
    assert!(line["actor"].get("container").is_none(), "{line}");
}

/// start, die and destroy records carry the published ports: the log alone says when a
/// port was taken and when it was freed.
#[test]
fn lifecycle_records_carry_published_ports() {
    let port = free_port(45);
    let agent = agent(&[port]);
    let a = Container::running(
        "life",
        &["-p", &format!("{port}:80/tcp")],
        &strs(&httpd(80)),
    );
    let id = a.short_id();
    let start = start_record(&agent, &a);
    let s = body(&start);
    assert!(s.pid.is_some_and(|p| p > 0), "{s:?}");
    assert!(s.netns.is_some_and(|n| n > 0), "{s:?}");
    assert!(
        s.cgroup_path
            .as_deref()
            .is_some_and(|p| p.contains(a.id.as_deref().unwrap())),
        "{s:?}"
    );
    a.stop();
    let die = wait_container_event(&agent, DockerEvent::Die, &id);
    a.remove();
    let destroy = wait_container_event(&agent, DockerEvent::Destroy, &id);
    for r in [&start, &die, &destroy] {
        assert_rfc3339(&r.ts.clone().into());
        let d = body(r);
        check_container(d.container.as_deref(), &a);
        let ports = d
            .ports
            .as_deref()
            .unwrap_or_else(|| panic!("no ports: {r:?}"));
        assert!(
            ports
                .iter()
                .any(|p| p.host_port == port && p.container_port == 80),
            "{r:?}"
        );
    }
    assert!(body(&die).exit_code.is_some(), "{die:?}");
    let done = agent.stop();
    for ev in [DockerEvent::Start, DockerEvent::Die, DockerEvent::Destroy] {
        let n = done
            .records
            .iter()
            .filter(|r| is_container_event(r, ev.clone(), &id))
            .count();
        assert_eq!(n, 1, "{ev} written once");
    }
}

/// `--userland-proxy=false`: no docker-proxy runs, yet dockerd keeps a listening socket of
/// its own on each published port to reserve it (20.10 and 28 alike, seen with `ss -ltnp`).
/// A host bind there fails, and the agent names the container, via dockerd.
#[test]
fn without_the_userland_proxy_dockerd_holds_the_published_port() {
    require_docker();
    let _daemon = DaemonWith::start(&["--userland-proxy=false"]);
    let port = free_port(49);
    let agent = agent(&[port]);
    // Made after the daemon switch, so it is removed before the daemon goes back.
    let c = Container::running("noproxy", &["-p", &format!("{port}:80")], &strs(&httpd(80)));
    start_record(&agent, &c);
    fail_bind(port);
    let r = host_conflict(&agent, port);
    let h = conflict_body(&r);
    assert_eq!(h.cause, Cause::DockerPublished, "{h:?}");
    assert!(!h.holders.is_empty(), "{h:?}");
    for x in &h.holders {
        assert_eq!(
            x.comm.as_deref(),
            Some("dockerd"),
            "no docker-proxy runs: {h:?}"
        );
        assert_eq!(x.via.as_deref(), Some("dockerd"), "{h:?}");
        assert_eq!(x.container_port, Some(80), "{h:?}");
        check_container(x.container.as_deref(), &c);
    }
    let hint = &h.hint;
    assert!(hint.contains(&c.name), "{hint}");
    drop(c);
    agent.stop();
}

/// Polls until `n` records match, and says how long it took.
fn time_until(
    agent: &Agent,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&Record) -> bool,
) -> Duration {
    let t = Instant::now();
    while agent.snapshot_records().iter().filter(|r| pred(r)).count() < n {
        assert!(
            t.elapsed() < timeout,
            "not within {timeout:?}:\n{}",
            agent.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

/// After 3 s without a daemon (the backoff goes on quietly), dockerd comes back; the
/// agent's `nth` `connected` must follow within 5 s of `docker info` answering.
fn daemon_back(agent: &Agent, outage: &DockerdOutage, nth: usize) {
    std::thread::sleep(Duration::from_secs(3));
    outage.end();
    let took = time_until(agent, nth, Duration::from_secs(10), |r| {
        is_docker(r, DockerEvent::Connected)
    });
    eprintln!("connected ({nth}) {took:?} after dockerd answered");
    assert!(
        took < Duration::from_secs(5),
        "connected only after {took:?}"
    );
}

/// Containers publish a port; a host bind shows that attribution works.
fn attribution_works(agent: &Agent, tag: &str, port: u16) {
    let b = Container::running(tag, &["-p", &format!("{port}:80")], &strs(&httpd(80)));
    start_record(agent, &b);
    fail_bind(port);
    let r = host_conflict(agent, port);
    let c = conflict_body(&r);
    assert_eq!(c.cause, Cause::DockerPublished, "{c:?}");
    check_container(first_holder(c).container.as_deref(), &b);
}

/// dockerd stops and comes back while the agent runs: one `unavailable`, then
/// `connected` within 5 s of the daemon answering, attribution as before, and no record
/// written twice.
#[test]
fn dockerd_restart_while_the_agent_runs() {
    let (port, port2) = (free_port(46), free_port(47));
    let agent = agent(&[port, port2]);
    let a = Container::running(
        "restart-a",
        &["--stop-timeout", "1", "-p", &format!("{port}:80")],
        &strs(&httpd(80)),
    );
    let a_id = a.short_id();
    start_record(&agent, &a);

    let outage = DockerdOutage::begin();
    agent.wait_record("unavailable", |r| is_docker(r, DockerEvent::Unavailable));
    daemon_back(&agent, &outage, 2);

    attribution_works(&agent, "restart-b", port2);
    drop(a);
    let done = agent.stop();
    let count = |p: &dyn Fn(&Record) -> bool| done.records.iter().filter(|r| p(r)).count();
    assert_eq!(
        count(&|r| is_docker(r, DockerEvent::Unavailable)),
        1,
        "once per outage"
    );
    assert_eq!(count(&|r| is_docker(r, DockerEvent::Connected)), 2);
    // The daemon stopped A on its way down: its die is written once, live or found at the
    // resync; its start once.
    let mine = |ev: DockerEvent| {
        let id = a_id.clone();
        move |r: &Record| is_container_event(r, ev.clone(), &id)
    };
    let all = lines(&done.records);
    assert_eq!(count(&mine(DockerEvent::Start)), 1, "{all}");
    assert_eq!(count(&mine(DockerEvent::Die)), 1, "{all}");
    assert_eq!(count(&mine(DockerEvent::Destroy)), 1, "{all}");
}

/// The records, one JSON line each, as the agent wrote them.
fn lines(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap_or_else(|e| format!("{e}: {r:?}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent starts first; dockerd comes later.
#[test]
fn agent_started_before_dockerd() {
    require_docker();
    let port = free_port(48);
    let outage = DockerdOutage::begin();
    let agent = start_agent(&[port]);
    let u = agent.wait_record("unavailable", |r| is_docker(r, DockerEvent::Unavailable));
    let u = body(&u);
    assert!(
        u.reason.as_deref().is_some_and(|s| s.contains("dockerd")),
        "{u:?}"
    );
    assert_eq!(
        u.endpoint.as_deref(),
        Some("unix:///var/run/docker.sock"),
        "{u:?}"
    );
    daemon_back(&agent, &outage, 1);
    attribution_works(&agent, "late", port);
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let n = done
        .records
        .iter()
        .filter(|r| is_docker(r, DockerEvent::Unavailable))
        .count();
    assert_eq!(n, 1, "said once, however long the daemon was away");
}

/// `--no-docker`: no join, no docker records.
#[test]
fn no_docker_flag() {
    let agent = Agent::start(&["--no-docker"]);
    std::thread::sleep(Duration::from_secs(1));
    let done = agent.stop();
    assert!(!done.records.iter().any(|r| r.docker().is_some()));
}
