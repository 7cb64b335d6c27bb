//! Kernel-to-log pipeline, end to end: the real agent, real eBPF in the real kernel, real
//! sockets making real conflicts. Run as root, one at a time (`cargo xtask test`).

use std::{net::SocketAddr, process::Command, time::Duration};

use portwatch_tests::*;
use serde_json::Value;

fn me() -> u32 {
    std::process::id()
}

/// Common assertions on a conflict record made by this test process.
fn check_conflict(c: &Value, op: &str, proto: &str, family: &str, addr: &str, port: u16, tid: u32) {
    assert_eq!(c["v"], 1, "{c}");
    assert_rfc3339(&c["ts"]);
    assert!(c["host"].as_str().is_some_and(|h| !h.is_empty()), "{c}");
    assert_eq!(c["op"], op, "{c}");
    assert_eq!(c["error"], "EADDRINUSE", "{c}");
    assert_eq!(c["errno"], 98, "{c}");
    assert_eq!(c["proto"], proto, "{c}");
    assert_eq!(c["family"], family, "{c}");
    assert_eq!(c["addr"], addr, "{c}");
    assert_eq!(c["port"], port, "{c}");
    assert_eq!(c["netns"], host_netns(), "{c}");
    assert_eq!(c["actor"]["pid"], me(), "{c}");
    assert_eq!(c["actor"]["tid"], tid, "{c}");
    assert_eq!(c["actor"]["uid"], 0, "{c}");
    assert!(
        c["actor"]["comm"].as_str().is_some_and(|s| !s.is_empty()),
        "{c}"
    );
    let cmdline = c["actor"]["cmdline"]
        .as_str()
        .expect("cmdline of a live process");
    assert!(
        cmdline.contains("pipeline"),
        "cmdline {cmdline:?} is not this test binary"
    );
    assert!(c["holders"].is_array() && c["cause"].is_string() && c["hint"].is_string());
}

#[test]
fn tcp_ipv4_loopback_conflict() {
    let port = test_port(1);
    let agent = Agent::start(&[]);
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let err = bind(&s, &a).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let c = agent.wait_for("tcp v4 conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    check_conflict(&c, "bind", "tcp", "ipv4", "127.0.0.1", port, gettid());
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    // Default mode: the successful bind and listen of the holder are not logged.
    assert!(of_type(&done.lines, "bind", port).is_empty());
    assert_eq!(done.lines.last().unwrap()["event"], "stopped");
}

#[test]
fn ipv6_loopback_conflict() {
    let port = test_port(2);
    let agent = Agent::start(&[]);
    let _holder = listener(&format!("[::1]:{port}"));
    let a: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    let c = agent.wait_for("v6 conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    check_conflict(&c, "bind", "tcp", "ipv6", "::1", port, gettid());
}

#[test]
fn udp_conflict() {
    let port = test_port(3);
    let agent = Agent::start(&[]);
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let h = socket(&a, SOCK_DGRAM, false);
    bind(&h, &a).unwrap();
    let s = socket(&a, SOCK_DGRAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    let c = agent.wait_for("udp conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    check_conflict(&c, "bind", "udp", "ipv4", "127.0.0.1", port, gettid());
}

#[test]
fn wildcard_held_specific_attempted() {
    let port = test_port(4);
    let agent = Agent::start(&[]);
    let _holder = listener(&format!("0.0.0.0:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    let c = agent.wait_for("wildcard conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    // What was *attempted* is reported, not the holder's wildcard.
    check_conflict(&c, "bind", "tcp", "ipv4", "127.0.0.1", port, gettid());
}

#[test]
fn listen_time_conflict() {
    let port = test_port(5);
    let agent = Agent::start(&[]);
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Two SO_REUSEADDR sockets may share the bound port; the second listen() then fails.
    let s1 = socket(&a, SOCK_STREAM, true);
    let s2 = socket(&a, SOCK_STREAM, true);
    bind(&s1, &a).unwrap();
    bind(&s2, &a).unwrap();
    listen(&s1).unwrap();
    assert_eq!(
        listen(&s2).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    let c = agent.wait_for("listen conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    check_conflict(&c, "listen", "tcp", "ipv4", "127.0.0.1", port, gettid());
    let done = agent.stop();
    // Both binds succeeded: the only conflict is the listen.
    let conflicts = of_type(&done.lines, "conflict", port);
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
}

#[test]
fn same_port_in_two_namespaces_is_no_conflict() {
    let port = test_port(6);
    let ns_a = NetNs::new("a");
    let ns_b = NetNs::new("b");
    let agent = Agent::start(&["--all-events", "--port", &port.to_string()]);
    let addr = format!("127.0.0.1:{port}");
    let (fa, tid_a) = ns_a.run({
        let addr = addr.clone();
        move || (listener(&addr), gettid())
    });
    let (fb, tid_b) = ns_b.run({
        let addr = addr.clone();
        move || (listener(&addr), gettid())
    });
    // A real conflict inside namespace A, to prove netns is carried on conflicts too.
    let (err, tid_c) = ns_a.run({
        let addr = addr.clone();
        move || {
            let a: SocketAddr = addr.parse().unwrap();
            let s = socket(&a, SOCK_STREAM, false);
            (bind(&s, &a).unwrap_err().raw_os_error(), gettid())
        }
    });
    assert_eq!(err, Some(libc::EADDRINUSE));
    agent.wait_for("conflict in ns A", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    let done = agent.stop();
    drop((fa, fb));
    let binds = of_type(&done.lines, "bind", port);
    let ok: Vec<_> = binds.iter().filter(|v| v["result"] == "ok").collect();
    assert_eq!(ok.len(), 2, "two successful binds expected: {binds:?}");
    let host = host_netns();
    let (ia, ib) = (ns_a.inode(), ns_b.inode());
    assert_ne!(ia, ib);
    assert!(ia != host && ib != host);
    let bind_a = ok
        .iter()
        .find(|v| v["actor"]["tid"] == tid_a)
        .expect("bind in A");
    let bind_b = ok
        .iter()
        .find(|v| v["actor"]["tid"] == tid_b)
        .expect("bind in B");
    assert_eq!(bind_a["netns"], ia);
    assert_eq!(bind_b["netns"], ib);
    let conflicts = of_type(&done.lines, "conflict", port);
    assert_eq!(conflicts.len(), 1, "only the deliberate one: {conflicts:?}");
    assert_eq!(conflicts[0]["netns"], ia);
    assert_eq!(conflicts[0]["actor"]["tid"], tid_c);
    // --all-events also shows the listens and the LISTEN state changes in each namespace.
    let listens = of_type(&done.lines, "listen", port);
    assert_eq!(listens.len(), 2, "{listens:?}");
    let states: Vec<_> = of_type(&done.lines, "tcp_state", port)
        .into_iter()
        .filter(|v| v["new_state"] == "LISTEN")
        .map(|v| v["netns"].as_u64().unwrap())
        .collect();
    assert!(states.contains(&ia) && states.contains(&ib), "{states:?}");
}

/// Flood a tiny ring buffer: every conflict is either received or counted as lost, exactly.
#[test]
fn ring_buffer_overflow_is_counted_exactly() {
    let port = test_port(7);
    // The holder exists before the agent, so only the flood's events reach it.
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let agent = Agent::start(&[
        "--port",
        &port.to_string(),
        "--ringbuf-size",
        "4096",
        "--lost-interval-ms",
        "100",
    ]);
    const PER_THREAD: usize = 50_000;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                // A failed bind leaves the socket unbound, so one socket can fail many times.
                let s = socket(&a, SOCK_STREAM, false);
                let mut failed = 0;
                for _ in 0..PER_THREAD {
                    if bind(&s, &a).is_err() {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let generated: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(generated, 2 * PER_THREAD);
    std::thread::sleep(Duration::from_millis(300));
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    // Identical failures are coalesced: each record stands for `count` of them.
    let records = of_type(&done.lines, "conflict", port);
    let received: u64 = records
        .iter()
        .map(|c| c["count"].as_u64().expect("conflict records carry count"))
        .sum();
    let lost_records: Vec<_> = done.lines.iter().filter(|v| v["type"] == "lost").collect();
    let lost: u64 = lost_records
        .iter()
        .map(|v| v["by_kind"]["bind"].as_u64().unwrap_or(0))
        .sum();
    for l in &lost_records {
        assert_eq!(
            l["count"].as_u64().unwrap(),
            l["kernel"].as_u64().unwrap() + l["agent"].as_u64().unwrap(),
            "{l}"
        );
    }
    let stopped = done.lines.last().unwrap();
    let unwritten = stopped["unwritten"]
        .as_u64()
        .expect("stopped has unwritten");
    eprintln!(
        "generated {generated}, received {received} in {} records, lost {lost}, unwritten \
         {unwritten}",
        records.len()
    );
    assert!(
        lost > 0,
        "a 4 KiB ring buffer should overflow under {generated} binds"
    );
    assert_eq!(
        generated as u64,
        received + lost + unwritten,
        "generated = the records' counts + lost + unwritten"
    );
    assert_eq!(stopped["event"], "stopped");
    assert_eq!(stopped["lost_total"], lost);
}

#[test]
fn log_file_gets_the_same_lines() {
    let port = test_port(8);
    let dir = tempdir("logfile");
    let log = dir.join("sub/dir/events.jsonl");
    let agent = Agent::start(&["--log-file", log.to_str().unwrap()]);
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    agent.wait_for("conflict", |v| v["type"] == "conflict" && v["port"] == port);
    let done = agent.stop_with(libc::SIGTERM);
    assert!(done.status.success(), "SIGTERM exits 0: {}", done.stderr);
    let file: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("log line is JSON"))
        .collect();
    assert_eq!(file, done.lines, "log file and stdout differ");
    assert_eq!(file.first().unwrap()["event"], "ready");
    assert_eq!(file.last().unwrap()["event"], "stopped");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_flag_is_a_usage_error() {
    let out = Command::new(agent_bin())
        .args(["run", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--no-such-flag"), "{err}");
    let out = Command::new(agent_bin())
        .args(["run", "--ringbuf-size", "5000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));
    assert!(out.stdout.is_empty());
}

#[test]
fn unwritable_log_file_is_refused() {
    require_root();
    // A path under a regular file can never be created, even by root.
    let dir = tempdir("unwritable");
    let file = dir.join("plainfile");
    std::fs::write(&file, "x").unwrap();
    let bad = file.join("events.jsonl");
    let out = Command::new(agent_bin())
        .args(["run", "--log-file", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open log file") && err.contains("--log-file"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(out.stdout.is_empty(), "no ready line on failure");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn non_root_is_refused_with_a_clear_error() {
    require_root();
    // Copy the binary where an unprivileged user can execute it.
    let dir = tempdir("nonroot");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("portwatch");
    std::fs::copy(agent_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&bin);
    cmd.arg("run");
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
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs root") && err.contains("CAP_BPF"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn mounts_tracefs_when_missing() {
    // A private mount namespace without tracefs: what a fresh boot looks like.
    let script = format!(
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; \
         mountpoint -q /sys/kernel/tracing && exit 99; exec {} run --no-log-file --runtime-dir /tmp/pwtest-rt-tracefs",
        agent_bin().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let agent = Agent::start_cmd(&mut cmd);
    assert_eq!(agent.ready["tracefs_mounted"], true, "{}", agent.ready);
    // And it works: a conflict still comes through.
    let port = test_port(9);
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    agent.wait_for("conflict", |v| v["type"] == "conflict" && v["port"] == port);
    assert!(agent.stop().status.success());
}

#[test]
fn netns_falls_back_to_procfs() {
    let port = test_port(10);
    let agent = Agent::start(&["--no-btf-offsets"]);
    assert_eq!(agent.ready["netns_source"], "procfs");
    agent.wait_for("degraded notice", |v| {
        v["type"] == "agent" && v["event"] == "degraded"
    });
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    let c = agent.wait_for("conflict", |v| v["type"] == "conflict" && v["port"] == port);
    assert_eq!(c["netns"], host_netns());
    let done = agent.stop();
    let degraded = done
        .lines
        .iter()
        .filter(|v| v["event"] == "degraded")
        .count();
    assert_eq!(degraded, 1, "said once");
}

#[test]
fn bad_sockaddr_and_unix_binds_are_ignored() {
    let port = test_port(11);
    let agent = Agent::start(&["--all-events"]);
    // SAFETY: deliberately invalid pointer: the kernel returns EFAULT.
    let rc = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let rc = libc::bind(fd, 0x10 as *const libc::sockaddr, 16);
        let e = std::io::Error::last_os_error().raw_os_error();
        libc::close(fd);
        (rc, e)
    };
    assert_eq!(rc, (-1, Some(libc::EFAULT)));
    let dir = tempdir("unix");
    let sock = std::os::unix::net::UnixListener::bind(dir.join("s")).unwrap();
    // The agent is still alive and still reports.
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    agent.wait_for("conflict", |v| v["type"] == "conflict" && v["port"] == port);
    let done = agent.stop();
    drop(sock);
    let mine: Vec<_> = done
        .lines
        .iter()
        .filter(|v| v["type"] == "bind" || v["type"] == "conflict")
        .filter(|v| v["actor"]["pid"] == me())
        .collect();
    // Exactly the holder's bind and the conflict: neither the EFAULT nor the AF_UNIX bind.
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.iter().all(|v| v["port"] == port));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn connect_eaddrnotavail_names_the_destination() {
    let ns = NetNs::new("eph");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001");
    let port = test_port(12);
    let agent = Agent::start(&[]);
    let (errs, tid) = ns.run(move || {
        let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let _l = listener(&format!("127.0.0.1:{port}"));
        let mut keep = Vec::new();
        let mut errs = Vec::new();
        for _ in 0..4 {
            let s = socket(&dst, SOCK_STREAM, false);
            match connect(&s, &dst) {
                Ok(()) => keep.push(s),
                Err(e) => errs.push(e.raw_os_error()),
            }
        }
        (errs, gettid())
    });
    assert!(errs.contains(&Some(libc::EADDRNOTAVAIL)), "{errs:?}");
    let c = agent.wait_for("connect conflict", |v| {
        v["type"] == "conflict" && v["op"] == "connect" && v["port"] == port
    });
    assert_eq!(c["error"], "EADDRNOTAVAIL");
    assert_eq!(c["addr"], "127.0.0.1");
    assert_eq!(c["cause"], "ephemeral_exhausted");
    assert_eq!(c["netns"], ns.inode());
    assert_eq!(c["actor"]["tid"], tid);
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pwtest-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// io_uring's IORING_OP_BIND and IORING_OP_LISTEN (6.11+) pass no syscall tracepoint: the
/// trampoline hooks on `__sys_bind_socket`/`__sys_listen_socket` see them. A listener made
/// that way is a `port open` held by this process, and an io_uring bind that then fails is
/// a conflict naming it.
#[test]
#[ignore = "needs trampoline hooks and Linux 6.11+: `cargo xtask vm-test --kernel 6.12` runs it"]
fn io_uring_bind_and_listen_are_seen() {
    let port = test_port(13);
    let agent = Agent::start(&[]);
    assert_eq!(
        agent.ready["hooks"], "trampoline",
        "io_uring's bind and listen are only visible to the trampoline hooks: {}",
        agent.ready
    );
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let held = socket(&a, SOCK_STREAM, false);
    uring::bind(&held, &a).expect("io_uring bind of a free port");
    uring::listen(&held).expect("io_uring listen");
    let open = agent.wait_for("port open from io_uring", |v| {
        v["type"] == "port" && v["event"] == "open" && v["port"] == port
    });
    assert_eq!(open["actor"]["pid"], me(), "{open}");
    let s = socket(&a, SOCK_STREAM, false);
    let err = uring::bind(&s, &a).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let c = agent.wait_for("io_uring bind conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    assert_eq!(c["op"], "bind", "{c}");
    assert_eq!(c["error"], "EADDRINUSE", "{c}");
    assert_eq!(c["actor"]["pid"], me(), "{c}");
    let holders = c["holders"].as_array().expect("holders");
    assert!(
        holders.iter().any(|h| h["pid"] == me()),
        "the io_uring listener is the holder: {c}"
    );
    drop(agent.stop());
}
