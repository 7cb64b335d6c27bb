//! Kernel-to-log pipeline, end to end: the real agent, real eBPF in the real kernel, real
//! sockets making real conflicts. Run as root, one at a time (`cargo xtask test`).

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use portwatch_tests::{
    schema::{AgentEvent, Error, Family, Op, Proto, Type},
    *,
};
use serde_json::Value;

fn me() -> u32 {
    std::process::id()
}

/// Common assertions on a conflict record made by this test process (its family is the one
/// of `addr`).
fn check_conflict(r: &Record, op: Op, proto: Proto, addr: &str, port: u16, tid: u32) {
    let addr: IpAddr = addr.parse().unwrap();
    let family = if addr.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    let c = r.conflict().expect("a conflict record");
    assert_eq!(r.v, 1, "{r:?}");
    // A missing ts reads as null here, which fails as a string of the wrong form would.
    assert_rfc3339(&r.ts.clone().into());
    assert!(r.host.as_deref().is_some_and(|h| !h.is_empty()), "{r:?}");
    assert_eq!(c.op, op, "{c:?}");
    assert_eq!(c.error, Error::Eaddrinuse, "{c:?}");
    assert_eq!(c.errno, Some(98), "{c:?}");
    assert_eq!(c.proto, proto, "{c:?}");
    assert_eq!(c.family, family, "{c:?}");
    assert_eq!(c.addr, addr, "{c:?}");
    assert_eq!(c.port, port, "{c:?}");
    assert_eq!(u64::from(c.netns), host_netns(), "{c:?}");
    let a = c.actor.process().expect("a process actor");
    assert_eq!(a.pid, me(), "{c:?}");
    assert_eq!(a.tid, tid, "{c:?}");
    assert_eq!(a.uid, 0, "{c:?}");
    assert!(!a.comm.is_empty(), "{c:?}");
    let cmdline = a.cmdline.as_deref().expect("cmdline of a live process");
    assert!(
        cmdline.contains("pipeline"),
        "cmdline {cmdline:?} is not this test binary"
    );
    // holders and hint are there by the record's type; the cause is one the schema names.
    assert!(c.cause.known().is_some(), "{c:?}");
}

/// The first conflict on `port`.
fn conflict_on(agent: &Agent, what: &str, port: u16) -> Record {
    agent.wait_record(what, |r| r.conflict().is_some_and(|c| c.port == port))
}

/// The record is the agent's `stopped`.
fn is_stopped(r: Option<&Record>) -> bool {
    r.and_then(Record::agent)
        .is_some_and(|a| a.event == AgentEvent::Stopped)
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
    let c = conflict_on(&agent, "tcp v4 conflict", port);
    check_conflict(&c, Op::Bind, Proto::Tcp, "127.0.0.1", port, gettid());
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    // Default mode: the successful bind and listen of the holder are not logged.
    assert!(records_of(&done.records, Type::Bind, port).is_empty());
    assert!(is_stopped(done.records.last()), "{:?}", done.records.last());
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
    let c = conflict_on(&agent, "v6 conflict", port);
    check_conflict(&c, Op::Bind, Proto::Tcp, "::1", port, gettid());
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
    let c = conflict_on(&agent, "udp conflict", port);
    check_conflict(&c, Op::Bind, Proto::Udp, "127.0.0.1", port, gettid());
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
    let c = conflict_on(&agent, "wildcard conflict", port);
    // What was *attempted* is reported, not the holder's wildcard.
    check_conflict(&c, Op::Bind, Proto::Tcp, "127.0.0.1", port, gettid());
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
    let c = conflict_on(&agent, "listen conflict", port);
    check_conflict(&c, Op::Listen, Proto::Tcp, "127.0.0.1", port, gettid());
    let done = agent.stop();
    // Both binds succeeded: the only conflict is the listen.
    let conflicts = records_of(&done.records, Type::Conflict, port);
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
    conflict_on(&agent, "conflict in ns A", port);
    let done = agent.stop();
    drop((fa, fb));
    let binds = records_of(&done.records, Type::Bind, port);
    let ok: Vec<&schema::SockOp> = binds
        .iter()
        .filter_map(|r| r.sock_op())
        .filter(|s| s.result == Error::Ok)
        .collect();
    assert_eq!(ok.len(), 2, "two successful binds expected: {binds:?}");
    let host = host_netns();
    let (ia, ib) = (ns_a.inode(), ns_b.inode());
    assert_ne!(ia, ib);
    assert!(ia != host && ib != host);
    let bind_a = ok.iter().find(|s| s.actor.tid == tid_a).expect("bind in A");
    let bind_b = ok.iter().find(|s| s.actor.tid == tid_b).expect("bind in B");
    assert_eq!(u64::from(bind_a.netns), ia);
    assert_eq!(u64::from(bind_b.netns), ib);
    let conflicts = records_of(&done.records, Type::Conflict, port);
    assert_eq!(conflicts.len(), 1, "only the deliberate one: {conflicts:?}");
    let c = conflicts[0].conflict().unwrap();
    assert_eq!(u64::from(c.netns), ia);
    assert_eq!(c.actor.process().map(|a| a.tid), Some(tid_c));
    // --all-events also shows the listens and the LISTEN state changes in each namespace.
    let listens = records_of(&done.records, Type::Listen, port);
    assert_eq!(listens.len(), 2, "{listens:?}");
    let states: Vec<u64> = records_of(&done.records, Type::TcpState, port)
        .into_iter()
        .filter_map(|r| match &r.body {
            Body::TcpState(t) if t.new_state == schema::SockState::Listen => {
                Some(u64::from(t.netns))
            }
            _ => None,
        })
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
    let records = records_of(&done.records, Type::Conflict, port);
    // Every conflict record carries its count: the type says so.
    let received: u64 = records
        .iter()
        .filter_map(|r| r.conflict())
        .map(|c| c.count)
        .sum();
    let lost_records: Vec<&schema::Lost> = done
        .records
        .iter()
        .filter_map(|r| match &r.body {
            Body::Lost(l) => Some(l),
            _ => None,
        })
        .collect();
    let lost: u64 = lost_records
        .iter()
        .map(|l| l.by_kind.get("bind").copied().unwrap_or(0))
        .sum();
    for l in &lost_records {
        assert_eq!(l.count, l.kernel + l.agent, "{l:?}");
    }
    let last = done.records.last().unwrap();
    let stopped = last.agent().unwrap_or_else(|| panic!("{last:?}"));
    let unwritten = stopped.unwritten.expect("stopped has unwritten");
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
    assert_eq!(stopped.event, AgentEvent::Stopped);
    assert_eq!(stopped.lost_total, Some(lost));
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
    conflict_on(&agent, "conflict", port);
    let done = agent.stop_with(libc::SIGTERM);
    assert!(done.status.success(), "SIGTERM exits 0: {}", done.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    // The same JSON, key for key: compared as values, where absent and null differ.
    let file: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("log line is JSON"))
        .collect();
    assert_eq!(file, done.lines, "log file and stdout differ");
    let typed: Vec<Record> = text
        .lines()
        .map(|l| Record::parse(l).unwrap_or_else(|e| panic!("log line {l}: {e}")))
        .collect();
    assert_eq!(typed, done.records, "log file and stdout differ");
    let first = typed.first().and_then(Record::agent);
    assert!(
        first.is_some_and(|a| a.event == AgentEvent::Ready),
        "{first:?}"
    );
    assert!(is_stopped(typed.last()), "{:?}", typed.last());
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
    let ready = agent.ready_typed();
    assert_eq!(ready.tracefs_mounted, Some(true), "{ready:?}");
    // And it works: a conflict still comes through.
    let port = test_port(9);
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    conflict_on(&agent, "conflict", port);
    assert!(agent.stop().status.success());
}

#[test]
fn netns_falls_back_to_procfs() {
    let port = test_port(10);
    let agent = Agent::start(&["--no-btf-offsets"]);
    assert_eq!(agent.ready_typed().netns_source.as_deref(), Some("procfs"));
    let is_degraded = |r: &Record| r.agent().is_some_and(|a| a.event == AgentEvent::Degraded);
    agent.wait_record("degraded notice", is_degraded);
    let _holder = listener(&format!("127.0.0.1:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    let _ = bind(&s, &a);
    let r = conflict_on(&agent, "conflict", port);
    assert_eq!(r.netns().map(u64::from), Some(host_netns()));
    let done = agent.stop();
    let degraded = done.records.iter().filter(|r| is_degraded(r)).count();
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
    conflict_on(&agent, "conflict", port);
    let done = agent.stop();
    drop(sock);
    let mine: Vec<&Record> = done
        .records
        .iter()
        .filter(|r| {
            let pid = match &r.body {
                Body::Bind(s) => Some(s.actor.pid),
                Body::Conflict(c) => c.actor.process().map(|a| a.pid),
                _ => None,
            };
            pid == Some(me())
        })
        .collect();
    // Exactly the holder's bind and the conflict: neither the EFAULT nor the AF_UNIX bind.
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.iter().all(|r| port_of(r) == Some(port)), "{mine:?}");
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
    let r = agent.wait_record("connect conflict", |r| {
        r.conflict()
            .is_some_and(|c| c.op == Op::Connect && c.port == port)
    });
    let c = r.conflict().unwrap();
    assert_eq!(c.error, Error::Eaddrnotavail);
    assert_eq!(c.addr, std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(c.cause, schema::Cause::EphemeralExhausted);
    assert_eq!(c.netns, ns.inode32());
    assert_eq!(c.actor.process().map(|a| a.tid), Some(tid));
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
    let ready = agent.ready_typed();
    assert_eq!(
        ready.hooks.as_deref(),
        Some("trampoline"),
        "io_uring's bind and listen are only visible to the trampoline hooks: {ready:?}"
    );
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let held = socket(&a, SOCK_STREAM, false);
    uring::bind(&held, &a).expect("io_uring bind of a free port");
    uring::listen(&held).expect("io_uring listen");
    let r = agent.wait_record("port open from io_uring", |r| {
        r.port()
            .is_some_and(|p| p.event == schema::PortEvent::Open && p.port == port)
    });
    let open = r.port().unwrap();
    assert_eq!(open.actor.as_ref().map(|a| a.pid), Some(me()), "{open:?}");
    let s = socket(&a, SOCK_STREAM, false);
    let err = uring::bind(&s, &a).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    let r = conflict_on(&agent, "io_uring bind conflict", port);
    let c = r.conflict().unwrap();
    assert_eq!(c.op, Op::Bind, "{c:?}");
    assert_eq!(c.error, Error::Eaddrinuse, "{c:?}");
    assert_eq!(c.actor.process().map(|a| a.pid), Some(me()), "{c:?}");
    assert!(
        c.holders.iter().any(|h| h.pid == Some(me())),
        "the io_uring listener is the holder: {c:?}"
    );
    drop(agent.stop());
}
