//! "Container starts but port not accessible", with the real dockerd and real containers:
//! a published port whose service listens on 127.0.0.1 only, one where nothing listens, and
//! the record saying so heals when a reachable listener appears.

use std::net::Ipv4Addr;

use portwatch_tests::{
    docker::*,
    schema::{DockerEvent, Listening, Proto},
    *,
};
use serde_json::Value;

/// A `docker` record's body.
fn body(r: &Record) -> &schema::Docker {
    r.docker()
        .unwrap_or_else(|| panic!("not a docker record: {r:?}"))
}

#[test]
fn published_ports_nothing_reachable_listens_on() {
    require_docker();
    let (p_lo, p_none) = (free_port(80), free_port(81));
    // No --port filter: the in-container listen that heals the first one must be seen.
    let agent = Agent::start(&[
        "--tw-interval",
        "2",
        "--docker-host",
        "unix:///var/run/docker.sock",
    ]);
    wait_docker_connected(&agent);
    // The usual mistake: the service listens on loopback inside the container; it is
    // restarted on all addresses 6 s later.
    let lo = Container::running(
        "reach-lo",
        &["-p", &format!("{p_lo}:80/tcp")],
        &[
            "sh",
            "-c",
            "httpd -f -p 127.0.0.1:80 & P=$!; sleep 6; kill $P; sleep 0.2; exec httpd -f -p 80",
        ],
    );
    let none = Container::running(
        "reach-none",
        &["-p", &format!("{p_none}:8080/tcp")],
        &["sleep", "60"],
    );
    let (lo_id, none_id) = (lo.short_id(), none.short_id());
    let rec = wait_container_event(&agent, DockerEvent::Unreachable, &lo_id);
    let r = body(&rec);
    assert_eq!(r.host_port, Some(p_lo), "{r:?}");
    assert_eq!(r.container_port, Some(80), "{r:?}");
    assert_eq!(r.proto, Some(Proto::Tcp), "{r:?}");
    assert_eq!(
        r.container.as_ref().map(|c| c.name.as_str()),
        Some(lo.name.as_str()),
        "{r:?}"
    );
    let loopback = vec![Listening {
        addr: Ipv4Addr::LOCALHOST.into(),
        port: 80,
    }];
    assert_eq!(r.listening.as_ref(), Some(&loopback), "{r:?}");
    // Exactly those keys, too: the typed entry would not show another.
    let line = agent.raw_line(&rec);
    assert_eq!(
        line["listening"],
        serde_json::to_value(&loopback).unwrap(),
        "{line}"
    );
    let hint = r
        .hint
        .as_deref()
        .unwrap_or_else(|| panic!("no hint: {r:?}"));
    assert!(
        hint.contains("listens on 127.0.0.1:80 only") && hint.contains("0.0.0.0:80"),
        "{hint}"
    );
    let n = wait_container_event(&agent, DockerEvent::Unreachable, &none_id);
    let n = body(&n);
    assert_eq!(n.listening.as_deref(), Some(&[][..]), "{n:?}");
    assert!(
        n.hint
            .as_deref()
            .is_some_and(|h| h.starts_with("nothing in")),
        "{n:?}"
    );
    // `check P` on such a port says the same, from the agent's view of the container.
    let check = |json: bool| {
        let p = p_none.to_string();
        let rt = agent.runtime_dir().to_str().unwrap().to_string();
        let mut args = vec!["check", p.as_str(), "--runtime-dir", rt.as_str()];
        if json {
            args.push("--json");
        }
        let o = std::process::Command::new(agent_bin())
            .args(&args)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (out, err) = check(true);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let published = v["published"].as_array().unwrap_or_else(|| panic!("{v}"));
    // Docker publishes on 0.0.0.0 and on :: : one mapping each, both judged.
    assert!(!published.is_empty(), "{v}");
    for p in published {
        assert_eq!(p["container"], none.name.as_str(), "{v}");
        assert_eq!(p["container_port"], 8080, "{v}");
        assert_eq!(p["reachable"], false, "{v}");
        assert_eq!(p["listening"], serde_json::json!([]), "{v}");
    }
    let (out, _) = check(false);
    assert!(
        out.contains("unreachable:")
            && out.contains(&none.name)
            && out.contains("hint: nothing in"),
        "{out}"
    );
    // The service now listens on every address: the record heals.
    let h = wait_container_event(&agent, DockerEvent::Reachable, &lo_id);
    let h = body(&h);
    assert_eq!(h.host_port, Some(p_lo), "{h:?}");
    // `ports` asks the agent to look again; a port still unreachable is not written twice.
    let o = std::process::Command::new(agent_bin())
        .args([
            "ports",
            "--runtime-dir",
            agent.runtime_dir().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let done = agent.stop();
    let unreachable = done
        .records
        .iter()
        .filter(|r| is_container_event(r, DockerEvent::Unreachable, &lo_id))
        .count();
    assert_eq!(unreachable, 1, "written once until it heals");
    let still = done
        .records
        .iter()
        .filter(|r| is_container_event(r, DockerEvent::Unreachable, &none_id))
        .count();
    assert_eq!(
        still, 1,
        "re-checked on request, written once while it stays unreachable"
    );
}
