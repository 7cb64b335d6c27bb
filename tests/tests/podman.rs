//! The Podman join, with the real engine (Debian's podman 4.3, rootful) and its
//! Docker-compatible API service: container names on records, lifecycle records with
//! ports, and Podman's own "address already in use" with both sides named. A published port
//! is held by the container's `conmon`; the `podman` CLI binds it first and hands it over.

use portwatch_tests::{
    docker::Container,
    podman::{self, *},
    *,
};
use serde_json::Value;

fn is_docker(v: &Value, event: &str) -> bool {
    v["type"] == "docker" && v["event"] == event
}

/// The agent joined to Podman only (Docker, if running, is left out by naming the socket).
fn agent(ports: &[u16]) -> Agent {
    require_podman();
    let mut args = vec!["--docker-host".to_string(), format!("unix://{SOCKET}")];
    for p in ports {
        args.extend(["--port".to_string(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Agent::start(&args);
    let c = a.wait_for("podman connected", |v| is_docker(v, "connected"));
    assert_eq!(c["engine"], "podman", "{c}");
    assert_eq!(c["endpoint"], format!("unix://{SOCKET}"), "{c}");
    a
}

fn check_container(v: &Value, c: &Container) {
    assert_eq!(v["name"], c.name.as_str(), "{v}");
    assert_eq!(v["id"], c.short_id().as_str(), "{v}");
    assert_eq!(v["engine"], "podman", "{v}");
    assert_eq!(v["image"], IMAGE, "{v}");
}

const HTTPD: [&str; 4] = ["httpd", "-f", "-p", "80"];

#[test]
fn podman_containers_are_named_on_lifecycle_and_conflicts() {
    let (port, port2) = (free_port(90), free_port(91));
    // 8080: the port the container below conflicts on inside.
    let agent = agent(&[port, port2, 8080]);

    // Lifecycle with ports.
    let a = podman::running("a", &["-p", &format!("{port}:80")], &HTTPD);
    let id = a.short_id();
    let start = agent.wait_for("podman start", move |v| {
        is_docker(v, "start") && v["container"]["id"] == id.as_str()
    });
    check_container(&start["container"], &a);
    assert_eq!(
        start["ports"],
        serde_json::json!([{"proto":"tcp","host_ip":"0.0.0.0","host_port":port,"container_port":80}]),
        "{start}"
    );
    assert!(
        start["cgroup_path"]
            .as_str()
            .unwrap_or("")
            .contains("libpod"),
        "{start}"
    );

    // A host process on the published port: held by conmon, for container a.
    let fd = socket(
        &format!("0.0.0.0:{port}").parse().unwrap(),
        libc::SOCK_STREAM,
        false,
    );
    let e = bind(&fd, &format!("0.0.0.0:{port}").parse().unwrap()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    let me = std::process::id();
    let c = agent.wait_for("host conflict", move |v| {
        v["type"] == "conflict" && v["port"] == port && v["actor"]["pid"] == me
    });
    assert_eq!(c["cause"], "docker_published", "{c}");
    let h = &c["holders"][0];
    assert_eq!(h["comm"], "conmon", "{c}");
    assert_eq!(h["via"], "conmon", "{c}");
    assert_eq!(h["container_port"], 80, "{c}");
    check_container(&h["container"], &a);
    let hint = c["hint"].as_str().unwrap();
    assert!(hint.contains(&format!("podman stop {}", a.name)), "{hint}");

    // A second container on the same host port: Podman's own EADDRINUSE, from the podman
    // CLI, names the container being started as the actor and a's conmon as the holder.
    let b = podman::run("b", &["-p", &format!("{port}:80")], &HTTPD);
    assert!(!b.ok, "the second container must fail to start");
    assert!(
        b.stderr.contains("address already in use"),
        "podman said: {}",
        b.stderr
    );
    let b_id = b.short_id();
    let c = agent.wait_for("podman's own conflict", move |v| {
        v["type"] == "conflict" && v["port"] == port && v["actor"]["comm"] == "podman"
    });
    assert_eq!(c["actor"]["via"], "podman", "{c}");
    assert_eq!(c["actor"]["container"]["id"], b_id.as_str(), "{c}");
    check_container(&c["actor"]["container"], &b);
    check_container(&c["holders"][0]["container"], &a);
    assert_eq!(c["cause"], "docker_published", "{c}");

    // A process inside a container is named as the actor of its own conflict.
    let d = podman::running(
        "d",
        &["-p", &format!("{port2}:8080")],
        &[
            "sh",
            "-c",
            "httpd -f -p 8080 & sleep 1; httpd -f -p 8080; sleep 60",
        ],
    );
    let d_id = d.short_id();
    let c = agent.wait_for("conflict inside a container", move |v| {
        v["type"] == "conflict"
            && v["port"] == 8080
            && v["actor"]["container"]["id"] == d_id.as_str()
    });
    check_container(&c["actor"]["container"], &d);
    assert_eq!(c["cause"], "listener", "{c}");

    let a_id = a.short_id();
    drop(a);
    let gone = agent.wait_for("podman die/destroy", move |v| {
        (is_docker(v, "die") || is_docker(v, "destroy")) && v["container"]["id"] == a_id.as_str()
    });
    assert_eq!(gone["container"]["engine"], "podman", "{gone}");
    agent.stop();
}
