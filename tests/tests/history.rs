//! Port history: `port` records for service ports in default mode, and `portwatch history`
//! reading them back from the log, with real listeners, a SIGKILLed holder, a flapping
//! service and a conflict.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use portwatch_tests::{
    schema::{PortEvent, Proto, Type},
    *,
};

const HOLD: &str = env!("CARGO_BIN_EXE_pw-hold");

/// The `port` records of `port` with this `event`.
fn ports(records: &[Record], port: u16, event: PortEvent) -> Vec<&Record> {
    records_of(records, Type::Port, port)
        .into_iter()
        .filter(|r| body(r).event == event)
        .collect()
}

/// A `port` record's own fields.
fn body(r: &Record) -> &schema::Port {
    r.port().unwrap_or_else(|| panic!("a port record: {r:?}"))
}

/// The pid of a `port` record's actor (None when no process could be named).
fn actor_pid(r: &Record) -> Option<u32> {
    body(r).actor.as_ref().map(|a| a.pid)
}

/// A `port` record of `port`, with `event` if given.
fn port_record(r: &Record, port: u16, event: Option<PortEvent>) -> bool {
    r.port()
        .is_some_and(|p| p.port == port && event.as_ref().is_none_or(|e| p.event == *e))
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
    agent.wait_record("existing open", |r| {
        r.port()
            .is_some_and(|p| p.port == p_before && p.existing == Some(true))
    });

    // A TCP listener and an explicit UDP bind, held then released.
    // The TCP one in this process, so that it ends with a real close().
    let tcp = listener(&format!("127.0.0.1:{p_tcp}"));
    let udp = Holder::start(HOLD, "udp", &format!("127.0.0.1:{p_udp}"), None);
    let (tcp_pid, udp_pid) = (std::process::id(), udp.pid());
    agent.wait_record("tcp open", |r| port_record(r, p_tcp, None));
    agent.wait_record("udp open", |r| port_record(r, p_udp, None));
    // A conflict while it is held.
    let a: SocketAddr = format!("127.0.0.1:{p_tcp}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert!(bind(&s, &a).is_err());
    drop(s);
    agent.wait_record("conflict", |r| is_conflict_on(r, p_tcp));
    drop(tcp);
    drop(udp); // pw-hold is killed on drop: its socket goes with it

    // A holder that is SIGKILLed: its close comes from a re-read of the namespace.
    let killed = Holder::start(HOLD, "tcp-listen", &format!("127.0.0.1:{p_kill}"), None);
    let kill_pid = killed.pid();
    agent.wait_record("kill open", |r| port_record(r, p_kill, None));
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
    let close = |port: u16| move |r: &Record| port_record(r, port, Some(PortEvent::Close));
    agent.wait_record("tcp close", close(p_tcp));
    agent.wait_record("killed close", close(p_kill));
    agent.wait_record("flap close", close(p_flap));
    eprintln!("closes written within {:?}", t0.elapsed());
    drop(before);
    let done = agent.stop();
    let records = done.records;

    let o = ports(&records, p_tcp, PortEvent::Open);
    let c = ports(&records, p_tcp, PortEvent::Close);
    assert_eq!((o.len(), c.len()), (1, 1), "{o:?} {c:?}");
    assert_eq!(actor_pid(o[0]), Some(tcp_pid));
    assert_eq!(body(o[0]).proto, Proto::Tcp);
    assert_eq!(body(o[0]).addr, Ipv4Addr::LOCALHOST);
    // The close says since when: the open's own ts.
    assert_eq!(body(c[0]).since.as_deref(), Some(o[0].ts()), "{c:?}");
    assert!(body(c[0]).held_s.is_some_and(|h| h > 0.0), "{c:?}");
    assert_eq!(body(c[0]).reason.as_deref(), Some("close"), "{c:?}");
    let u = ports(&records, p_udp, PortEvent::Open);
    assert_eq!(u.len(), 1);
    assert_eq!(body(u[0]).proto, Proto::Udp);
    assert_eq!(actor_pid(u[0]), Some(udp_pid));
    assert_eq!(ports(&records, p_udp, PortEvent::Close).len(), 1);
    let k = ports(&records, p_kill, PortEvent::Close);
    assert_eq!(k.len(), 1);
    assert_eq!(actor_pid(k[0]), Some(kill_pid));
    assert_eq!(body(k[0]).reason.as_deref(), Some("gone"), "{k:?}");
    // Only this process's listener on p_eph, not its client (another process may hold the
    // port number elsewhere on a busy host: only our own records are counted).
    let mine: Vec<_> = records_of(&records, Type::Port, p_eph)
        .into_iter()
        .filter(|r| actor_pid(r) == Some(tcp_pid))
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "only the listener on {p_eph}, not its client: {mine:?}"
    );
    assert_eq!(body(mine[0]).event, PortEvent::Open);
    assert!(
        !records.iter().any(|r| port_record(r, 0, None)),
        "no port record for an ephemeral bind"
    );
    let flap_opens = ports(&records, p_flap, PortEvent::Open);
    let flap_closes = ports(&records, p_flap, PortEvent::Close);
    assert_eq!(flap_opens.len(), 1, "coalesced: {flap_opens:?}");
    assert_eq!(flap_closes.len(), 1);
    assert_eq!(body(flap_closes[0]).restarts, Some(49), "{flap_closes:?}");

    // The log has the same lines; history reads them back (its own --json stays JSON).
    let (code, out, err) = history(&[&p_tcp.to_string(), log.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let items: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["held", "conflict"], "{out}");
    assert_eq!(items[0]["actor"]["pid"], tcp_pid);
    assert_eq!(items[0]["from"], o[0].ts());
    assert_eq!(items[0]["to"], c[0].ts());
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
