//! "Container starts but port not accessible", with the real dockerd and real containers:
//! a published port whose service listens on 127.0.0.1 only, one where nothing listens, and
//! the record saying so heals when a reachable listener appears.

use portwatch_tests::{docker::*, *};
use serde_json::Value;

fn is_docker(v: &Value, event: &str, id: &str) -> bool {
    v["type"] == "docker" && v["event"] == event && v["container"]["id"] == id
}

#[test]
fn published_ports_nothing_reachable_listens_on() {
    require_docker();
    let (p_lo, p_none) = (free_port(80), free_port(81));
    // No --port filter: the in-container listen that heals the first one must be seen.
    let agent = Agent::start(&["--tw-interval", "2"]);
    agent.wait_for("docker connected", |v| {
        v["type"] == "docker" && v["event"] == "connected"
    });
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
    let r = agent.wait_for("unreachable (loopback)", |v| {
        is_docker(v, "unreachable", &lo_id)
    });
    assert_eq!(r["host_port"], p_lo, "{r}");
    assert_eq!(r["container_port"], 80, "{r}");
    assert_eq!(r["proto"], "tcp", "{r}");
    assert_eq!(r["container"]["name"], lo.name.as_str(), "{r}");
    assert_eq!(
        r["listening"],
        serde_json::json!([{"addr": "127.0.0.1", "port": 80}]),
        "{r}"
    );
    let hint = r["hint"].as_str().unwrap();
    assert!(
        hint.contains("listens on 127.0.0.1:80 only") && hint.contains("0.0.0.0:80"),
        "{hint}"
    );
    let n = agent.wait_for("unreachable (nothing)", |v| {
        is_docker(v, "unreachable", &none_id)
    });
    assert_eq!(n["listening"], serde_json::json!([]), "{n}");
    assert!(n["hint"].as_str().unwrap().starts_with("nothing in"), "{n}");
    // The service now listens on every address: the record heals.
    let h = agent.wait_for("reachable", |v| is_docker(v, "reachable", &lo_id));
    assert_eq!(h["host_port"], p_lo, "{h}");
    let done = agent.stop();
    let unreachable = done
        .lines
        .iter()
        .filter(|v| is_docker(v, "unreachable", &lo_id))
        .count();
    assert_eq!(unreachable, 1, "written once until it heals");
}
