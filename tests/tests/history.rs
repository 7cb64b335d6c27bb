//! Port history: `port` records for service ports in default mode, and `portwatch history`
//! reading them back from the log, with real listeners, a SIGKILLed holder, a flapping
//! service and a conflict.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use portwatch_tests::*;

const HOLD: &str = env!("CARGO_BIN_EXE_pw-hold");

fn ports<'a>(lines: &'a [serde_json::Value], port: u16, event: &str) -> Vec<&'a serde_json::Value> {
    of_type(lines, "port", port)
        .into_iter()
        .filter(|v| v["event"] == event)
        .collect()
}

fn history(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .arg("history")
        .args(args)
        .output()
        .expect("run portwatch history");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn service_ports_open_and_close_and_history_tells_who_held_them() {
    let dir = std::env::temp_dir().join(format!("pw-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("events.jsonl");
    // Checked free: a fixed port per test process once met another test's server-side
    // TIME_WAIT on 127.0.0.1 and the listener below failed with EADDRINUSE.
    let (p_before, p_tcp, p_udp, p_kill, p_flap, p_eph) = (
        free_port(60),
        free_port(61),
        free_port(62),
        free_port(63),
        free_port(64),
        free_port(65),
    );
    // Held before the agent starts: an `existing` open.
    let before = Holder::start(HOLD, "tcp-listen", &format!("0.0.0.0:{p_before}"), None);
    let agent = Agent::start(&["--log-file", log.to_str().unwrap()]);
    agent.wait_for("existing open", |v| {
        v["type"] == "port" && v["port"] == p_before && v["existing"] == true
    });

    // A TCP listener and an explicit UDP bind, held then released.
    // The TCP one in this process, so that it ends with a real close().
    let tcp = listener(&format!("127.0.0.1:{p_tcp}"));
    let udp = Holder::start(HOLD, "udp", &format!("127.0.0.1:{p_udp}"), None);
    let (tcp_pid, udp_pid) = (std::process::id(), udp.pid());
    agent.wait_for("tcp open", |v| v["type"] == "port" && v["port"] == p_tcp);
    agent.wait_for("udp open", |v| v["type"] == "port" && v["port"] == p_udp);
    // A conflict while it is held.
    let a: SocketAddr = format!("127.0.0.1:{p_tcp}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert!(bind(&s, &a).is_err());
    drop(s);
    agent.wait_for("conflict", |v| {
        v["type"] == "conflict" && v["port"] == p_tcp
    });
    drop(tcp);
    drop(udp); // pw-hold is killed on drop: its socket goes with it

    // A holder that is SIGKILLed: its close comes from a re-read of the namespace.
    let killed = Holder::start(HOLD, "tcp-listen", &format!("127.0.0.1:{p_kill}"), None);
    let kill_pid = killed.pid();
    agent.wait_for("kill open", |v| v["type"] == "port" && v["port"] == p_kill);
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(kill_pid as i32, libc::SIGKILL) };

    // Ephemeral binds (port 0) and client connections are not service ports.
    let eph: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let e = socket(&eph, SOCK_DGRAM, false);
    bind(&e, &eph).unwrap();
    let _l = listener(&format!("127.0.0.1:{p_eph}"));
    let c = socket(&a, SOCK_STREAM, false);
    let _ = connect(&c, &format!("127.0.0.1:{p_eph}").parse().unwrap());
    drop(c);

    // A service restarting 50 times, a few ms apart: coalesced, not 100 records.
    for _ in 0..50 {
        let f: SocketAddr = format!("127.0.0.1:{p_flap}").parse().unwrap();
        let fd = socket(&f, SOCK_STREAM, true);
        bind(&fd, &f).unwrap();
        listen(&fd).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }

    let t0 = Instant::now();
    agent.wait_for("tcp close", |v| {
        v["type"] == "port" && v["port"] == p_tcp && v["event"] == "close"
    });
    agent.wait_for("killed close", |v| {
        v["type"] == "port" && v["port"] == p_kill && v["event"] == "close"
    });
    agent.wait_for("flap close", |v| {
        v["type"] == "port" && v["port"] == p_flap && v["event"] == "close"
    });
    eprintln!("closes written within {:?}", t0.elapsed());
    drop(before);
    let done = agent.stop();
    let lines = done.lines;

    let o = ports(&lines, p_tcp, "open");
    let c = ports(&lines, p_tcp, "close");
    assert_eq!((o.len(), c.len()), (1, 1), "{o:?} {c:?}");
    assert_eq!(o[0]["actor"]["pid"], tcp_pid);
    assert_eq!(o[0]["proto"], "tcp");
    assert_eq!(o[0]["addr"], "127.0.0.1");
    assert_eq!(c[0]["since"], o[0]["ts"]);
    assert!(c[0]["held_s"].as_f64().unwrap() > 0.0);
    assert_eq!(c[0]["reason"], "close", "{c:?}");
    let u = ports(&lines, p_udp, "open");
    assert_eq!(u.len(), 1);
    assert_eq!(u[0]["proto"], "udp");
    assert_eq!(u[0]["actor"]["pid"], udp_pid);
    assert_eq!(ports(&lines, p_udp, "close").len(), 1);
    let k = ports(&lines, p_kill, "close");
    assert_eq!(k.len(), 1);
    assert_eq!(k[0]["actor"]["pid"], kill_pid);
    assert_eq!(k[0]["reason"], "gone", "{k:?}");
    // Only this process's listener on p_eph, not its client (another process may hold the
    // port number elsewhere on a busy host: only our own records are counted).
    let mine: Vec<_> = of_type(&lines, "port", p_eph)
        .into_iter()
        .filter(|v| v["actor"]["pid"] == tcp_pid)
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "only the listener on {p_eph}, not its client: {mine:?}"
    );
    assert_eq!(mine[0]["event"], "open");
    assert!(
        !lines.iter().any(|v| v["type"] == "port" && v["port"] == 0),
        "no port record for an ephemeral bind"
    );
    let flap_opens = ports(&lines, p_flap, "open");
    let flap_closes = ports(&lines, p_flap, "close");
    assert_eq!(flap_opens.len(), 1, "coalesced: {flap_opens:?}");
    assert_eq!(flap_closes.len(), 1);
    assert_eq!(flap_closes[0]["restarts"], 49, "{flap_closes:?}");

    // The log has the same lines; history reads them back.
    let (code, out, err) = history(&[&p_tcp.to_string(), log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let items: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["held", "conflict"], "{out}");
    assert_eq!(items[0]["actor"]["pid"], tcp_pid);
    assert_eq!(items[0]["from"], o[0]["ts"]);
    assert_eq!(items[0]["to"], c[0]["ts"]);
    assert_eq!(items[1]["record"]["cause"], "listener");

    // Rotated and compressed: move the log to .1 and gzip it, start a new one; history
    // still finds the holding, and a window before it finds nothing.
    let rot = dir.join("events.jsonl.1");
    std::fs::rename(&log, &rot).unwrap();
    assert!(Command::new("gzip").arg(&rot).status().unwrap().success());
    // A line cut short (a crash mid-write) is skipped and counted, never fatal.
    std::fs::write(
        &log,
        format!("{{\"v\":1,\"type\":\"port\",\"port\":{p_kill},\n"),
    )
    .unwrap();
    let (code, out, err) = history(&[&p_kill.to_string(), log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"kind\":\"held\""), "{out}");
    assert!(out.contains("\"ended_by\":\"gone\""), "{out}");
    assert!(err.contains("malformed"), "{err}");
    let (_, out, _) = history(&[
        &p_kill.to_string(),
        log.to_str().unwrap(),
        "--until",
        "2000-01-01T00:00:00Z",
    ]);
    assert!(out.starts_with("no holder"), "{out}");
    // Readable output names the holder and the gap-free timeline.
    let (_, out, _) = history(&[&p_tcp.to_string(), log.to_str().unwrap(), "--proto", "tcp"]);
    assert!(
        out.contains("HELD") && out.contains(&format!("[{tcp_pid}]")),
        "{out}"
    );
    assert!(out.contains("CONFLICT"), "{out}");
    // Bad input: a clear error, exit 2 for usage, 1 for a missing log.
    let (code, _, err) = history(&["notaport"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = history(&["80", "/nonexistent/events.jsonl"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
