//! The Docker join, end to end: the real agent against the real dockerd, real containers
//! from the busybox test image, real port conflicts. `cargo xtask test` installs and starts
//! dockerd and builds the image first; without them these tests fail, never skip.
//!
//! Docker 20.10 (Debian's) binds published ports with docker-proxy; since Docker 28 dockerd
//! binds them itself. The tests accept either as `via`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use portwatch_tests::{docker::*, *};
use serde_json::Value;

const HOLD: &str = env!("CARGO_BIN_EXE_pw-hold");

fn is_docker(v: &Value, event: &str) -> bool {
    v["type"] == "docker" && v["event"] == event
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
    let c = a.wait_for("docker connected", |v| is_docker(v, "connected"));
    assert_eq!(
        c["api_version"].as_str().map(|s| s.starts_with("1.")),
        Some(true),
        "{c}"
    );
    assert!(c["server_version"].is_string(), "{c}");
    a
}

fn start_record(agent: &Agent, c: &Container) -> Value {
    let id = c.short_id();
    agent.wait_for("docker start", move |v| {
        is_docker(v, "start") && v["container"]["id"] == id.as_str()
    })
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

fn host_conflict(agent: &Agent, port: u16) -> Value {
    let ns = host_netns();
    agent.wait_for("conflict on the host", move |v| {
        v["type"] == "conflict" && v["port"] == port && v["netns"] == ns && v["op"] == "bind"
    })
}

fn check_container(v: &Value, c: &Container) {
    assert_eq!(v["id"], c.short_id(), "{v}");
    assert_eq!(v["id"].as_str().unwrap().len(), 12, "{v}");
    assert_eq!(v["name"], c.name.as_str(), "{v}");
    assert_eq!(v["image"], TEST_IMAGE, "{v}");
}

fn is_binder(via: &Value) -> bool {
    via == "docker-proxy" || via == "dockerd"
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

    let c = agent.wait_for("docker_publish conflict", |v| {
        v["type"] == "conflict" && v["op"] == "docker_publish" && v["port"] == port
    });
    assert_rfc3339(&c["ts"]);
    assert_eq!(c["v"], 1);
    assert_eq!(c["error"], "port_already_allocated", "{c}");
    assert_eq!(c["cause"], "port_already_allocated", "{c}");
    assert_eq!(c["proto"], "tcp", "{c}");
    // Docker 28 allocates 0.0.0.0 and :: separately and reports whichever it tried
    // first; Docker 20.10 only ever reports 0.0.0.0.
    match c["addr"].as_str() {
        Some("0.0.0.0") => assert_eq!(c["family"], "ipv4", "{c}"),
        Some("::") => {
            assert_eq!(c["family"], "ipv6", "{c}");
            assert_eq!(c["overlap"], "dual_stack", "{c}");
        }
        _ => panic!("the refused address is a wildcard: {c}"),
    }
    assert_eq!(c["netns"], host_netns(), "{c}");
    check_container(&c["actor"]["container"], &b);
    assert!(
        c["actor"].get("pid").is_none(),
        "no process made a syscall: {c}"
    );
    let holders = c["holders"].as_array().unwrap();
    assert!(!holders.is_empty(), "{c}");
    for h in holders {
        check_container(&h["container"], &a);
        assert!(is_binder(&h["via"]), "{c}");
        assert_eq!(h["container_port"], 80, "{c}");
    }
    let hint = c["hint"].as_str().unwrap();
    assert!(hint.contains(&format!("docker stop {}", a.name)), "{hint}");
    assert!(
        hint.contains(&format!("publish {} on another host port", b.name)),
        "{hint}"
    );
    assert!(
        c["docker_error"]
            .as_str()
            .unwrap()
            .contains("port is already allocated"),
        "{c}"
    );

    // Any other process that wants the port is told it is A's.
    fail_bind(port);
    let h = host_conflict(&agent, port);
    assert_eq!(h["cause"], "docker_published", "{h}");
    check_container(&h["holders"][0]["container"], &a);
    assert!(is_binder(&h["holders"][0]["via"]), "{h}");

    let done = agent.stop();
    let n = done
        .lines
        .iter()
        .filter(|v| v["op"] == "docker_publish" && v["port"] == port)
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

    let c = host_conflict(&agent, port);
    assert_eq!(c["error"], "EADDRINUSE", "{c}");
    assert!(is_binder(&c["actor"]["via"]), "{c}");
    assert!(is_binder(&c["actor"]["comm"]), "{c}");
    check_container(&c["actor"]["container"], &b);
    assert_eq!(c["cause"], "listener", "{c}");
    let h = &c["holders"][0];
    assert_eq!(
        h["pid"],
        holder.pid(),
        "the host process really holds it: {c}"
    );
    assert!(h.get("container").is_none(), "{c}");
    let hint = c["hint"].as_str().unwrap();
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
    let netns = netns_inode_of(&format!("/proc/{}/ns/net", a.pid()));
    assert_eq!(start["netns"], netns, "{start}");
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
    let c = agent.wait_for("conflict in the container", move |v| {
        v["type"] == "conflict" && v["port"] == 8080 && v["netns"] == netns
    });
    assert_eq!(c["cause"], "listener", "{c}");
    check_container(&c["actor"]["container"], &a);
    assert!(c["actor"].get("via").is_none(), "{c}");
    let h = &c["holders"][0];
    check_container(&h["container"], &a);
    assert_eq!(h["comm"], "httpd", "{c}");
    assert!(h.get("via").is_none(), "{c}");
    assert!(
        c["hint"]
            .as_str()
            .unwrap()
            .contains(&format!("in container {}", a.name)),
        "{c}"
    );
    // Where cgroup2 is mounted, the kernel's cgroup id is the container's cgroup.
    if start["cgroup_id"].is_u64() {
        assert_eq!(c["actor"]["cgroup_id"], start["cgroup_id"], "{c}\n{start}");
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
    let nets = start["networks"].as_array().unwrap();
    assert_eq!(nets.len(), 1, "{start}");
    assert_eq!(nets[0]["name"], net.name.as_str(), "{start}");
    assert!(nets[0]["ip"].is_string(), "{start}");
    assert_eq!(start["network_mode"], net.name.as_str(), "{start}");
    let ports = start["ports"].as_array().unwrap();
    assert!(
        ports.iter().any(|p| p["host_port"] == port
            && p["container_port"] == 80
            && p["proto"] == "tcp"
            && p["host_ip"] == "0.0.0.0"),
        "{start}"
    );

    fail_bind(port);
    let c = host_conflict(&agent, port);
    assert_eq!(c["cause"], "docker_published", "{c}");
    assert!(c.get("reason").is_none(), "{c}");
    let h = &c["holders"][0];
    check_container(&h["container"], &a);
    assert!(is_binder(&h["via"]), "{c}");
    assert_eq!(h["container_port"], 80, "{c}");
    let hint = c["hint"].as_str().unwrap();
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
    assert_eq!(
        start["container"]["compose_project"],
        project.as_str(),
        "{start}"
    );
    assert_eq!(start["container"]["compose_service"], "web", "{start}");
    fail_bind(port);
    let c = host_conflict(&agent, port);
    let hc = &c["holders"][0]["container"];
    check_container(hc, &a);
    assert_eq!(hc["compose_project"], project.as_str(), "{c}");
    assert_eq!(hc["compose_service"], "web", "{c}");
    // Not in a container: no key at all.
    assert!(c["actor"].get("container").is_none(), "{c}");
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
    assert!(start["pid"].as_u64().unwrap() > 0, "{start}");
    assert!(start["netns"].as_u64().unwrap() > 0, "{start}");
    assert!(
        start["cgroup_path"]
            .as_str()
            .unwrap()
            .contains(a.id.as_deref().unwrap()),
        "{start}"
    );
    a.stop();
    let die = agent.wait_for("die", |v| {
        is_docker(v, "die") && v["container"]["id"] == id.as_str()
    });
    a.remove();
    let destroy = agent.wait_for("destroy", |v| {
        is_docker(v, "destroy") && v["container"]["id"] == id.as_str()
    });
    for r in [&start, &die, &destroy] {
        assert_rfc3339(&r["ts"]);
        check_container(&r["container"], &a);
        let ports = r["ports"].as_array().unwrap();
        assert!(
            ports
                .iter()
                .any(|p| p["host_port"] == port && p["container_port"] == 80),
            "{r}"
        );
    }
    assert!(die["exit_code"].is_i64(), "{die}");
    let done = agent.stop();
    for ev in ["start", "die", "destroy"] {
        let n = done
            .lines
            .iter()
            .filter(|v| is_docker(v, ev) && v["container"]["id"] == id.as_str())
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
    let h = host_conflict(&agent, port);
    assert_eq!(h["cause"], "docker_published", "{h}");
    let holders = h["holders"].as_array().unwrap();
    assert!(!holders.is_empty(), "{h}");
    for x in holders {
        assert_eq!(x["comm"], "dockerd", "no docker-proxy runs: {h}");
        assert_eq!(x["via"], "dockerd", "{h}");
        assert_eq!(x["container_port"], 80, "{h}");
        check_container(&x["container"], &c);
    }
    let hint = h["hint"].as_str().unwrap();
    assert!(hint.contains(&c.name), "{hint}");
    drop(c);
    agent.stop();
}

/// Polls until `n` records match, and says how long it took.
fn time_until(
    agent: &Agent,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Duration {
    let t = Instant::now();
    while agent.snapshot().iter().filter(|v| pred(v)).count() < n {
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
    let took = time_until(agent, nth, Duration::from_secs(10), |v| {
        is_docker(v, "connected")
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
    let c = host_conflict(agent, port);
    assert_eq!(c["cause"], "docker_published", "{c}");
    check_container(&c["holders"][0]["container"], &b);
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
    agent.wait_for("unavailable", |v| is_docker(v, "unavailable"));
    daemon_back(&agent, &outage, 2);

    attribution_works(&agent, "restart-b", port2);
    drop(a);
    let done = agent.stop();
    let count = |p: &dyn Fn(&Value) -> bool| done.lines.iter().filter(|v| p(v)).count();
    assert_eq!(
        count(&|v| is_docker(v, "unavailable")),
        1,
        "once per outage"
    );
    assert_eq!(count(&|v| is_docker(v, "connected")), 2);
    // The daemon stopped A on its way down: its die is written once, live or found at the
    // resync; its start once.
    let mine = |ev: &'static str| {
        let id = a_id.clone();
        move |v: &Value| is_docker(v, ev) && v["container"]["id"] == id.as_str()
    };
    assert_eq!(count(&mine("start")), 1, "{}", lines(&done.lines));
    assert_eq!(count(&mine("die")), 1, "{}", lines(&done.lines));
    assert_eq!(count(&mine("destroy")), 1, "{}", lines(&done.lines));
}

fn lines(v: &[Value]) -> String {
    v.iter()
        .map(Value::to_string)
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
    let u = agent.wait_for("unavailable", |v| is_docker(v, "unavailable"));
    assert!(u["reason"].as_str().unwrap().contains("dockerd"), "{u}");
    assert_eq!(u["endpoint"], "unix:///var/run/docker.sock", "{u}");
    daemon_back(&agent, &outage, 1);
    attribution_works(&agent, "late", port);
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let n = done
        .lines
        .iter()
        .filter(|v| is_docker(v, "unavailable"))
        .count();
    assert_eq!(n, 1, "said once, however long the daemon was away");
}

/// `--no-docker`: no join, no docker records.
#[test]
fn no_docker_flag() {
    let agent = Agent::start(&["--no-docker"]);
    std::thread::sleep(Duration::from_secs(1));
    let done = agent.stop();
    assert!(!done.lines.iter().any(|v| v["type"] == "docker"));
}
