//! The Podman join, with the real engine (Debian's podman 4.3, rootful) and its
//! Docker-compatible API service: container names on records, lifecycle records with
//! ports, and Podman's own "address already in use" with both sides named. A published port
//! is held by the container's `conmon`; the `podman` CLI binds it first and hands it over.

use std::net::Ipv4Addr;

use portwatch_tests::{
    docker::{is_container_event, wait_container_event, wait_docker_connected, Container},
    podman::{self, *},
    schema::{Cause, ContainerRef, DockerEvent, PortMap, Proto},
    *,
};

/// The agent joined to Podman only (Docker, if running, is left out by naming the socket).
fn agent(ports: &[u16]) -> Agent {
    require_podman();
    let mut args = vec!["--docker-host".to_string(), format!("unix://{SOCKET}")];
    for p in ports {
        args.extend(["--port".to_string(), p.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Agent::start(&args);
    let c = wait_docker_connected(&a);
    assert_eq!(c.engine.as_deref(), Some("podman"), "{c:?}");
    assert_eq!(
        c.endpoint.as_deref(),
        Some(format!("unix://{SOCKET}").as_str()),
        "{c:?}"
    );
    a
}

fn check_container(v: Option<&ContainerRef>, c: &Container) {
    let v = v.unwrap_or_else(|| panic!("no container where {} was expected", c.name));
    assert_eq!(v.name, c.name, "{v:?}");
    assert_eq!(v.id, c.short_id(), "{v:?}");
    assert_eq!(v.engine, "podman", "{v:?}");
    assert_eq!(v.image, IMAGE, "{v:?}");
}

const HTTPD: [&str; 4] = ["httpd", "-f", "-p", "80"];

#[test]
fn podman_containers_are_named_on_lifecycle_and_conflicts() {
    let (port, port2) = (free_port(90), free_port(91));
    // 8080: the port the container below conflicts on inside.
    let agent = agent(&[port, port2, 8080]);

    // Lifecycle with ports.
    let a = podman::running("a", &["-p", &format!("{port}:80")], &HTTPD);
    let r = wait_container_event(&agent, DockerEvent::Start, &a.short_id());
    let start = r.docker().expect("matched as a docker record");
    check_container(start.container.as_deref(), &a);
    let expected = vec![PortMap {
        proto: Proto::Tcp,
        host_ip: Ipv4Addr::UNSPECIFIED.into(),
        host_port: port,
        container_port: 80,
    }];
    assert_eq!(start.ports.as_ref(), Some(&expected), "{start:?}");
    // Exactly those keys, too: the typed mapping would not show another.
    let line = agent.raw_line(&r);
    assert_eq!(
        line["ports"],
        serde_json::to_value(&expected).unwrap(),
        "{line}"
    );
    assert!(
        start
            .cgroup_path
            .as_deref()
            .unwrap_or("")
            .contains("libpod"),
        "{start:?}"
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
    let r = agent.wait_record("host conflict", |r| {
        r.conflict()
            .is_some_and(|c| c.port == port && c.actor.process().is_some_and(|p| p.pid == me))
    });
    let c = conflict_body(&r);
    assert_eq!(c.cause, Cause::DockerPublished, "{c:?}");
    let h = first_holder(c);
    assert_eq!(h.comm.as_deref(), Some("conmon"), "{c:?}");
    assert_eq!(h.via.as_deref(), Some("conmon"), "{c:?}");
    assert_eq!(h.container_port, Some(80), "{c:?}");
    check_container(h.container.as_deref(), &a);
    let hint = &c.hint;
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
    let r = agent.wait_record("podman's own conflict", |r| {
        r.conflict().is_some_and(|c| {
            c.port == port && c.actor.process().is_some_and(|p| p.comm == "podman")
        })
    });
    let c = conflict_body(&r);
    assert_eq!(
        c.actor.process().and_then(|p| p.via.as_deref()),
        Some("podman"),
        "{c:?}"
    );
    assert_eq!(
        c.actor.container().map(|x| x.id.as_str()),
        Some(b_id.as_str()),
        "{c:?}"
    );
    check_container(c.actor.container(), &b);
    check_container(first_holder(c).container.as_deref(), &a);
    assert_eq!(c.cause, Cause::DockerPublished, "{c:?}");

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
    let r = agent.wait_record("conflict inside a container", |r| {
        r.conflict()
            .is_some_and(|c| c.port == 8080 && c.actor.container().is_some_and(|x| x.id == d_id))
    });
    let c = conflict_body(&r);
    check_container(c.actor.container(), &d);
    assert_eq!(c.cause, Cause::Listener, "{c:?}");

    let a_id = a.short_id();
    drop(a);
    let gone = agent.wait_record("podman die/destroy", |r| {
        is_container_event(r, DockerEvent::Die, &a_id)
            || is_container_event(r, DockerEvent::Destroy, &a_id)
    });
    let engine = gone
        .docker()
        .and_then(|d| d.container.as_ref())
        .map(|x| x.engine.as_str());
    assert_eq!(engine, Some("podman"), "{gone:?}");
    agent.stop();
}
