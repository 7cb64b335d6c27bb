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
    let agent = Agent::start(&[
        "--tw-interval",
        "2",
        "--docker-host",
        "unix:///var/run/docker.sock",
    ]);
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
    let h = agent.wait_for("reachable", |v| is_docker(v, "reachable", &lo_id));
    assert_eq!(h["host_port"], p_lo, "{h}");
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
        .lines
        .iter()
        .filter(|v| is_docker(v, "unreachable", &lo_id))
        .count();
    assert_eq!(unreachable, 1, "written once until it heals");
    let still = done
        .lines
        .iter()
        .filter(|v| is_docker(v, "unreachable", &none_id))
        .count();
    assert_eq!(
        still, 1,
        "re-checked on request, written once while it stays unreachable"
    );
}
