//! Faults: the agent killed or stopped, odd bytes in names, and what must survive them.

use std::{
    ffi::OsStr,
    net::SocketAddr,
    os::unix::ffi::OsStrExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use portwatch_tests::{
    schema::{AgentEvent, Type},
    *,
};

/// Ids of the programs loaded in the kernel (`bpftool prog list`).
fn loaded_program_ids() -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["prog", "list", "--json"])
        .output()
        .expect("bpftool is installed by `cargo xtask setup`");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Ids of the programs a process holds, from its fds' fdinfo (`prog_id:`). Other agents may
/// run on the same host, so counting programs by name would not tell ours apart.
fn program_ids_of(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        if let Ok(info) = std::fs::read_to_string(fd.path()) {
            for l in info.lines() {
                if let Some(id) = l.strip_prefix("prog_id:") {
                    ids.push(id.trim().parse().unwrap());
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works() {
    let agent = Agent::start(&[]);
    let ours = program_ids_of(agent.pid());
    // Bind, listen and connect (enter and exit), close, process exit, and the TCP state hook,
    // which default mode loads but attaches only while a client is attached.
    assert_eq!(ours.len(), 9, "nine programs while running: {ours:?}");
    assert!(ours.iter().all(|id| loaded_program_ids().contains(id)));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded = loaded_program_ids();
        let left: Vec<_> = ours.iter().filter(|id| loaded.contains(id)).collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "programs {left:?} still loaded after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(agent);
    // Restart at once: same runtime dir, the stale lock and socket are no obstacle.
    let rt = std::env::temp_dir().join(format!("pwtest-kill-{}", std::process::id()));
    let a1 = Agent::start(&["--runtime-dir", rt.to_str().unwrap()]);
    // SAFETY: as above.
    unsafe { libc::kill(a1.pid() as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    drop(a1);
    let a2 = Agent::start(&["--runtime-dir", rt.to_str().unwrap()]);
    let port = test_port(41);
    let _h = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    a2.wait_record("conflict after restart", |r| is_conflict_on(r, port));
}

#[test]
fn sigterm_exits_promptly_with_every_record_flushed() {
    let port = test_port(42);
    let _h = listener(&format!("127.0.0.1:{port}"));
    let agent = Agent::start(&["--port", &port.to_string()]);
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    const N: usize = 5000;
    for _ in 0..N {
        let _ = bind(&s, &a);
    }
    let t0 = Instant::now();
    let done = agent.stop_with(libc::SIGTERM);
    let took = t0.elapsed();
    assert!(done.status.success());
    // Identical failures are coalesced: each record stands for `count` of them (every
    // conflict record carries its count: the type says so).
    let received: u64 = records_of(&done.records, Type::Conflict, port)
        .iter()
        .filter_map(|r| r.conflict())
        .map(|c| c.count)
        .sum();
    let last = done.records.last().unwrap();
    let stopped = last.agent().unwrap_or_else(|| panic!("{last:?}"));
    let unwritten = stopped.unwritten.expect("stopped has unwritten");
    let lost: u64 = done
        .records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Lost(l) => Some(l.by_kind.get("bind").copied().unwrap_or(0)),
            _ => None,
        })
        .sum();
    eprintln!("SIGTERM to exit: {took:?}; received {received}, lost {lost}, unwritten {unwritten}");
    assert_eq!(
        received + lost + unwritten,
        N as u64,
        "every conflict written, coalesced into a count, or counted"
    );
    assert_eq!(stopped.event, AgentEvent::Stopped, "{last:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
}

#[test]
fn odd_bytes_in_comm_and_cmdline_keep_the_json_valid() {
    let port = test_port(43);
    let agent = Agent::start(&[]);
    // A holder whose command line carries invalid UTF-8 and JSON metacharacters.
    let mut child = Command::new(env!("CARGO_BIN_EXE_pw-hold"))
        .args(["tcp-listen", &format!("127.0.0.1:{port}")])
        .arg(OsStr::from_bytes(b"\xff\xfe\"}{\\\n\t\x01"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The actor: a thread whose name has the same kind of bytes.
    let port2 = port;
    let tid = std::thread::spawn(move || {
        let name = b"x\"\\\xff{}\n\0";
        // SAFETY: PR_SET_NAME with a NUL-terminated buffer of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        let a: SocketAddr = format!("127.0.0.1:{port2}").parse().unwrap();
        let s = socket(&a, SOCK_STREAM, false);
        assert!(bind(&s, &a).is_err());
        gettid()
    })
    .join()
    .unwrap();
    let r = agent.wait_record("conflict", |r| is_conflict_on(r, port));
    let c = r.conflict().unwrap();
    let actor = c.actor.process().expect("a process actor");
    assert_eq!(actor.tid, tid, "{c:?}");
    assert_eq!(actor.comm, "x\"\\\u{fffd}{}\n");
    let cmd = c
        .holders
        .first()
        .and_then(|h| h.cmdline.as_deref())
        .expect("holder cmdline");
    assert!(cmd.contains("\u{fffd}\u{fffd}\"}{\\\n\t\u{1}"), "{cmd:?}");
    // stop() fails the test if any line the agent wrote is not valid JSON, or does not read
    // into the typed schema.
    let _ = child.kill();
    let _ = child.wait();
    agent.stop();
}
