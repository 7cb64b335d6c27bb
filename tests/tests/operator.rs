//! The operator interface against the real agent: attach, ports, check, tail, doctor,
//! metrics, the single-instance lock, the control socket's permissions and the log file.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portwatch_tests::{
    schema::{AgentEvent, Error, Type},
    *,
};
use serde_json::Value;

fn pw() -> Command {
    Command::new(agent_bin())
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pwtest-op-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn conflict(port: u16) {
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert!(bind(&s, &a).is_err());
}

/// The i-th of many distinct loopback addresses on `port`. Identical failures are coalesced
/// into one record a second; tests that need a record per failure fail on distinct
/// addresses, all blocked by one listener on 0.0.0.0.
fn distinct(port: u16, i: usize) -> SocketAddr {
    let (b, c, d) = (1 + i / 62_500, (i / 250) % 250, i % 250 + 1);
    format!("127.{b}.{c}.{d}:{port}").parse().unwrap()
}

fn json_lines(s: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(s)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[test]
fn attach_replays_the_past_then_streams_live_detail() {
    let port = test_port(31);
    let agent = Agent::start(&[]);
    let _h = listener(&format!("127.0.0.1:{port}"));
    conflict(port); // the past
    agent.wait_record("first conflict", |r| is_conflict_on(r, port));
    let rt = agent.runtime_dir().to_str().unwrap().to_string();
    let client = pw()
        .args([
            "attach",
            "--runtime-dir",
            &rt,
            "--port",
            &port.to_string(),
            "--since",
            "60s",
            "--duration",
            "3s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    conflict(port); // live
                    // Verbose detail although the agent logs at the default level: a bind on the port.
    let other: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let s = socket(&other, SOCK_STREAM, false);
    bind(&s, &other).unwrap();
    // TCP state changes too: default mode attaches that hook only while a client is
    // attached. A connection the server closes first leaves the server side in TIME_WAIT.
    let tw_addr: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
    {
        let srv = std::net::TcpListener::bind(tw_addr).unwrap();
        let mut c = std::net::TcpStream::connect(tw_addr).unwrap();
        drop(srv.accept().unwrap());
        let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
    }
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Agent records, one per line: every one reads into the typed schema.
    let records = records_in(&out.stdout);
    let conflicts = records_of(&records, Type::Conflict, port).len();
    assert_eq!(conflicts, 2, "one replayed, one live: {records:?}");
    assert!(
        records.iter().any(|r| matches!(&r.body,
            Body::Bind(b) if b.result == Error::Ok && b.addr == Ipv4Addr::new(127, 0, 0, 2))),
        "live verbose bind record: {records:?}"
    );
    assert!(
        records.iter().any(|r| matches!(&r.body,
            Body::TcpState(t) if t.addr == Ipv4Addr::new(127, 0, 0, 3) && t.time_wait)),
        "live TIME_WAIT entry from the state hook: {records:?}"
    );
    assert!(
        records
            .iter()
            .all(|r| r.conflict().is_none_or(|c| c.port == port)),
        "filter applied"
    );
    // The agent's own log stayed at the default level.
    let done = agent.stop();
    assert!(records_of(&done.records, Type::Bind, port).is_empty());
    assert!(records_of(&done.records, Type::TcpState, port).is_empty());
}

#[test]
fn stalled_attach_client_does_not_slow_logging() {
    let port = test_port(32);
    let agent = Agent::start(&[]);
    let _h = listener(&format!("0.0.0.0:{port}"));
    let sock = agent.runtime_dir().join("portwatch.sock");
    // Ten clients; one never reads.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"{\"cmd\":\"attach\"}\n").unwrap();
    let readers: Vec<_> = (0..9)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.write_all(b"{\"cmd\":\"attach\"}\n").unwrap();
            std::thread::spawn(move || {
                let mut n = 0;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                for l in BufReader::new(s).lines() {
                    let Ok(_) = l else { break };
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    const N: usize = 20_000;
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let t0 = Instant::now();
    for i in 0..N {
        let _ = bind(&s, &distinct(port, i));
    }
    // Every conflict reaches the log although one client has not read a byte.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = records_of(&agent.snapshot_records(), Type::Conflict, port).len();
        if n >= N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {N} conflicts logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{N} conflicts logged in {:?} with a stalled client attached",
        t0.elapsed()
    );
    for r in readers {
        let n = r.join().unwrap();
        assert!(n >= 1000, "a reading client got {n} lines");
    }
    // The stalled client starts reading at last: once it has caught up it is told how many
    // records it missed.
    let reader = std::thread::spawn(move || {
        let _ = stalled.set_read_timeout(Some(Duration::from_secs(15)));
        for l in BufReader::new(stalled).lines() {
            let Ok(l) = l else { break };
            // Every line is a record the typed schema reads, or the protocol's error line.
            if let AttachLine::Record(r) = attach_line(&l) {
                if let Body::Missed(m) = r.body {
                    return m.count;
                }
            }
        }
        0
    });
    while !reader.is_finished() {
        let _ = bind(&s, &a);
        std::thread::sleep(Duration::from_millis(50));
    }
    let missed = reader.join().unwrap();
    assert!(missed > 0, "stalled client was not told it missed records");
    let done = agent.stop();
    assert_eq!(
        done.records.iter().filter(|r| r.ty() == Type::Lost).count(),
        0,
        "the agent lost nothing"
    );
}

#[test]
fn ports_from_the_agent_and_from_a_snapshot() {
    let port = test_port(33);
    let h = Holder::start(
        env!("CARGO_BIN_EXE_pw-hold"),
        "tcp-listen",
        &format!("127.0.0.1:{port}"),
        None,
    );
    let agent = Agent::start(&[]);
    let rt = agent.runtime_dir().to_str().unwrap().to_string();
    let out = pw()
        .args([
            "ports",
            "--runtime-dir",
            &rt,
            "--port",
            &port.to_string(),
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = json_lines(&out.stdout);
    assert!(
        rows.iter()
            .any(|r| r["state"] == "LISTEN" && r["pid"] == h.pid() && r["comm"] == "pw-hold"),
        "{rows:?}"
    );
    drop(agent);
    // No agent: a one-shot snapshot says the same.
    let out = pw()
        .args([
            "ports",
            "--runtime-dir",
            "/nonexistent-pw",
            "--port",
            &port.to_string(),
            "--state",
            "listen",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("pw-hold[{}]", h.pid())), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("snapshot"));
}

#[test]
fn check_held_and_free_ports_and_suggest() {
    let base = test_port(34);
    let h = Holder::start(
        env!("CARGO_BIN_EXE_pw-hold"),
        "tcp-listen",
        &format!("0.0.0.0:{base}"),
        None,
    );
    let out = pw().args(["check", &base.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "held port");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("taken")
            && text.contains(&format!("pw-hold[{}]", h.pid()))
            && text.contains("listens on"),
        "{text}"
    );
    let out = pw()
        .args(["check", &(base + 1).to_string(), "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "free port: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(json_lines(&out.stdout)[0]["free"], true);
    let out = pw()
        .args([
            "check",
            "--suggest",
            "2",
            "--range",
            &format!("{base}-{}", base + 5),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 2);
    assert!(
        !ports.contains(&base),
        "the held port is not suggested: {ports:?}"
    );
}

#[test]
fn second_agent_is_refused_with_the_first_ones_pid() {
    let rt = tempdir("lock");
    let rts = rt.to_str().unwrap();
    let first = Agent::start(&["--runtime-dir", rts]);
    let out = pw()
        .args(["run", "--no-log-file", "--runtime-dir", rts])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("already running (pid {}", first.pid())),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    drop(first);
}

#[test]
fn metrics_endpoint_is_scraped() {
    let port = test_port(35);
    let mport = test_port(36);
    let addr = format!("127.0.0.1:{mport}");
    let agent = Agent::start(&["--metrics-addr", &addr, "--tw-interval", "1"]);
    let _h = listener(&format!("127.0.0.1:{port}"));
    conflict(port);
    agent.wait_record("conflict", |r| is_conflict_on(r, port));
    std::thread::sleep(Duration::from_millis(1500));
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1."), "{body}");
    assert!(
        body.contains("portwatch_conflicts_total{cause=\"listener\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("portwatch_records_total{type=\"conflict\"} 1"),
        "{body}"
    );
    assert!(body.contains("portwatch_lost_events_total 0"), "{body}");
    assert!(body.contains("portwatch_port_table_entries "), "{body}");
    assert!(body.contains("portwatch_docker_connected "), "{body}");
    // Nothing listens anywhere but the address asked for.
    assert!(std::net::TcpStream::connect(format!("127.0.0.2:{mport}")).is_err());
}

#[test]
fn control_socket_refuses_non_root_peers() {
    let agent = Agent::start(&[]);
    let sock = agent.runtime_dir().join("portwatch.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be root-only");
    // Even with the file opened up by mistake, the agent checks the peer's credentials.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(agent.runtime_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tempdir("nonroot");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("portwatch");
    std::fs::copy(agent_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&bin);
    cmd.args([
        "attach",
        "--runtime-dir",
        agent.runtime_dir().to_str().unwrap(),
        "--duration",
        "2s",
    ]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("uid 65534"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn attach_without_an_agent_says_so() {
    let out = pw()
        .args(["attach", "--runtime-dir", "/nonexistent-pw"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no portwatch agent is running") && err.contains("portwatch run"),
        "{err}"
    );
}

fn log_lines(paths: &[PathBuf]) -> Vec<Value> {
    paths
        .iter()
        .filter(|p| p.exists())
        .flat_map(|p| json_lines(&std::fs::read(p).unwrap()))
        .collect()
}

/// `log_lines`, typed.
fn log_records_of(paths: &[PathBuf]) -> Vec<Record> {
    paths
        .iter()
        .filter(|p| p.exists())
        .flat_map(|p| log_records(p))
        .collect()
}

#[test]
fn log_rotation_and_tail_over_rotated_and_compressed_files() {
    let dir = tempdir("rot");
    let log = dir.join("events.jsonl");
    let port = test_port(37);
    let agent = Agent::start(&[
        "--log-file",
        log.to_str().unwrap(),
        "--log-max-size",
        "8K",
        "--log-keep",
        "3",
    ]);
    let _h = listener(&format!("0.0.0.0:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    for i in 0..60 {
        let _ = bind(&s, &distinct(port, i));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while records_of(&agent.snapshot_records(), Type::Conflict, port).len() < 60 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = agent.stop();
    let rot = |n: u32| PathBuf::from(format!("{}.{n}", log.display()));
    assert!(
        rot(1).exists() && rot(3).exists() && !rot(4).exists(),
        "rotated and kept 3"
    );
    for p in [rot(3), rot(2), rot(1), log.clone()] {
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len <= 8192, "{} is {len} bytes", p.display());
    }
    // No line split or lost across rotations: the newest files hold the tail of stdout.
    // The same JSON, key for key: compared as values, where absent and null differ.
    let files = log_lines(&[rot(3), rot(2), rot(1), log.clone()]);
    assert_eq!(files[..], done.lines[done.lines.len() - files.len()..]);
    let typed = log_records_of(&[rot(3), rot(2), rot(1), log.clone()]);
    assert_eq!(typed[..], done.records[done.records.len() - typed.len()..]);
    // logrotate-style compression of an old file; tail reads it too, oldest first.
    let gz = Command::new("gzip").arg(rot(2)).status().unwrap();
    assert!(gz.success());
    let out = pw()
        .args(["tail", log.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json_lines(&out.stdout), files);
    assert_eq!(records_in(&out.stdout), typed);
    let out = pw()
        .args([
            "tail",
            log.to_str().unwrap(),
            "--type",
            "conflict",
            "--port",
            &port.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().count() > 0 && text.lines().all(|l| l.contains("CONFLICT")),
        "{text}"
    );
}

#[test]
fn tail_skips_malformed_lines_and_follows_across_rotation() {
    let dir = tempdir("tail");
    let log = dir.join("events.jsonl");
    // Written here, not by the agent: a conflict with a port and nothing else, which tail
    // shows but the typed schema does not read, so these stay JSON.
    let good = |n: u32| {
        format!("{{\"v\":1,\"ts\":\"2026-11-25T08:00:00.000000000Z\",\"type\":\"conflict\",\"port\":{n}}}\n")
    };
    let mut text = String::new();
    for i in 0..10_000 {
        text.push_str(&format!("garbage {i} {{\n"));
    }
    text.push_str(&good(1));
    std::fs::write(&log, text).unwrap();
    let out = pw()
        .args(["tail", log.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(json_lines(&out.stdout).len(), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 10000 malformed lines"));
    // Follow: append, rotate (rename + new file), append again.
    let mut child = pw()
        .args(["tail", "-f", log.to_str().unwrap(), "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(
        serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap()["port"],
        1
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .unwrap()
        .write_all(good(2).as_bytes())
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap()["port"],
        2
    );
    std::fs::rename(&log, format!("{}.1", log.display())).unwrap();
    std::fs::write(&log, good(3)).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap()["port"],
        3
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn sighup_reopens_the_log_file() {
    let dir = tempdir("hup");
    let log = dir.join("events.jsonl");
    let port = test_port(38);
    let agent = Agent::start(&["--log-file", log.to_str().unwrap()]);
    std::fs::rename(&log, dir.join("events.jsonl.old")).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent.wait_record("log_reopened", |r| {
        is_agent_event(r, AgentEvent::LogReopened)
    });
    let _h = listener(&format!("127.0.0.1:{port}"));
    conflict(port);
    agent.wait_record("conflict", |r| is_conflict_on(r, port));
    drop(agent.stop());
    let fresh = log_records(&log);
    assert!(
        is_agent_event(&fresh[0], AgentEvent::LogReopened),
        "the new file says why it starts: {:?}",
        fresh[0]
    );
    assert!(fresh.iter().any(|r| is_conflict_on(r, port)), "{fresh:?}");
    let old = log_records(&dir.join("events.jsonl.old"));
    assert!(
        old.iter().all(|r| r.conflict().is_none()),
        "the renamed file got nothing new"
    );
}

#[test]
fn full_disk_is_counted_and_writing_resumes() {
    let dir = tempdir("tmpfs");
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            dir.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(dir.clone());
    let log = dir.join("events.jsonl");
    let filler = dir.join("filler");
    let port = test_port(39);
    let agent = Agent::start(&["--log-file", log.to_str().unwrap(), "--log-max-size", "0"]);
    // Fill the disk.
    let _ = std::fs::write(&filler, vec![b'x'; 64 * 1024]);
    let _h = listener(&format!("0.0.0.0:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    for i in 0..200 {
        let _ = bind(&s, &distinct(port, i));
    }
    agent.wait_record("log_error", |r| is_agent_event(r, AgentEvent::LogError));
    let deadline = Instant::now() + Duration::from_secs(10);
    while records_of(&agent.snapshot_records(), Type::Conflict, port).len() < 200 {
        assert!(Instant::now() < deadline, "stdout must keep every record");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    conflict(port);
    let is_resumed = |r: &Record| is_agent_event(r, AgentEvent::LogResumed);
    let resumed = agent.wait_record("log_resumed", is_resumed);
    let failed = resumed.agent().and_then(|a| a.failed_records);
    assert!(failed.is_some_and(|n| n > 0), "{resumed:?}");
    let done = agent.stop();
    assert!(done.status.success());
    // Every line in the file is whole: each one reads as a record.
    let in_file = log_records(&log);
    assert!(in_file.iter().any(is_resumed));
    // A small write can still fit in the file's last page of a full tmpfs, so writing may
    // resume and fail again more than once: every failed record is in some log_resumed.
    let all_failed: u64 = done
        .records
        .iter()
        .filter_map(|r| r.agent().filter(|a| a.event == AgentEvent::LogResumed))
        .map(|a| a.failed_records.expect("log_resumed has failed_records"))
        .sum();
    let last = done.records.last().and_then(Record::agent);
    assert_eq!(
        last.and_then(|a| a.log_write_errors),
        Some(all_failed),
        "{last:?}"
    );
}

#[test]
fn doctor_checks_this_host() {
    let agent = Agent::start(&[]);
    let dir = tempdir("doctor");
    let out = pw()
        .args([
            "doctor",
            "--runtime-dir",
            agent.runtime_dir().to_str().unwrap(),
            "--log-file",
            dir.join("e.jsonl").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    for want in [
        "PASS kernel",
        "PASS btf",
        "PASS privileges",
        "PASS tracefs",
        "tracepoint syscalls:sys_enter_bind",
        "PASS log path",
        "PASS agent",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains(&format!("running, pid {}", agent.pid())),
        "{text}"
    );
    // And a failing check names its fix.
    let out = pw()
        .args([
            "doctor",
            "--runtime-dir",
            "/nonexistent-pw",
            "--log-file",
            "/proc/nope/e.jsonl",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("FAIL agent") && text.contains("fix: start it"),
        "{text}"
    );
    assert!(text.contains("FAIL log path"), "{text}");
}

#[test]
fn packaging_outputs() {
    let out = pw().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("portwatch "));
    let out = pw().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("_portwatch"));
    let out = pw().arg("man").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(".TH portwatch"));
    for sub in ["run", "tail", "attach", "ports", "check", "doctor"] {
        let out = pw().args([sub, "--help"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Example"),
            "{sub} --help has no example"
        );
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/portwatch.service");
    let unit = std::fs::read_to_string(unit).expect("systemd unit");
    assert!(unit.contains("ExecStart=/usr/local/bin/portwatch run"));
}

/// `--group NAME`: the control socket belongs to that group (looked up by name), mode 0660;
/// an unknown group stops the agent before it starts, with an error that says what to give.
#[test]
fn group_owns_the_control_socket_and_an_unknown_group_is_refused() {
    use std::os::unix::fs::MetadataExt;
    let groups = std::fs::read_to_string("/etc/group").unwrap();
    let (name, gid) = groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid: u32 = f.nth(1)?.parse().ok()?;
            (gid != 0).then(|| (name.to_string(), gid))
        })
        .next()
        .expect("a group other than root in /etc/group");
    let rt = tempdir("group");
    let rts = rt.to_str().unwrap();
    let agent = Agent::start(&["--runtime-dir", rts, "--group", &name]);
    let meta = std::fs::metadata(rt.join("portwatch.sock")).unwrap();
    assert_eq!(meta.gid(), gid, "socket group, for --group {name}");
    assert_eq!(meta.mode() & 0o777, 0o660);
    drop(agent);

    let rt = tempdir("nogroup");
    let out = pw()
        .args([
            "run",
            "--no-log-file",
            "--runtime-dir",
            rt.to_str().unwrap(),
        ])
        .args(["--group", "pw-no-such-group"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown group 'pw-no-such-group'") && err.contains("/etc/group"),
        "{err}"
    );
}
