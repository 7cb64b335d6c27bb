use super::*;
use portwatch_schema::PortCount;

fn sock(local: &str, remote: &str, state: u8, inode: u64) -> diag::SockEntry {
    diag::SockEntry {
        netns: 1,
        proto: Proto::Tcp,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state,
        inode,
        uid: 0,
        expires_ms: 30_000,
        v6only: None,
    }
}

/// The counts come from the table's buckets plus the TIME_WAIT remotes kept aside,
/// as they used to come from the raw dump.
#[test]
fn time_wait_counts_from_a_streamed_snapshot() {
    let tw = table::TCP_TIME_WAIT;
    let dst = "10.0.0.9:443";
    let entries = [
        // A server on 8080 (not ephemeral) and one on 40000 (ephemeral, but listened on).
        sock("0.0.0.0:8080", "0.0.0.0:0", table::TCP_LISTEN, 1),
        sock("0.0.0.0:40000", "0.0.0.0:0", table::TCP_LISTEN, 2),
        sock("10.0.0.1:8080", "10.0.0.5:50001", tw, 0),
        sock("10.0.0.1:8080", "10.0.0.5:50002", tw, 0),
        sock("10.0.0.1:40000", "10.0.0.5:50003", tw, 0),
        // Client side toward dst: two in use, one in TIME_WAIT.
        sock("10.0.0.1:41000", dst, 1, 3),
        sock("10.0.0.1:41001", dst, 1, 4),
        sock("10.0.0.1:41002", dst, tw, 0),
    ];
    let ns = diag::Namespace {
        inode: 1,
        path: "/proc/self/ns/net".into(),
    };
    let s = Snapshot::new(ns, &entries, Arc::default(), None, true, 0);
    assert_eq!(s.len(), entries.len());
    let c = &s.counts;
    assert_eq!(c.total, 4);
    assert_eq!(c.by_local, HashMap::from([(8080, 2), (40000, 1)]));
    let d: (IpAddr, u16) = ("10.0.0.9".parse().unwrap(), 443);
    assert_eq!(c.by_remote, HashMap::from([(d, 1)]));
    assert_eq!(c.to_dst, HashMap::from([(d, 3)]));
    // Not reported (start-up): nothing counted, nothing kept aside.
    let ns = s.ns.clone();
    let quiet = Snapshot::new(ns, &entries, Arc::default(), None, false, 0);
    assert_eq!(quiet.counts.total, 0);
}

/// A server on an ephemeral-range port closed its accepted connections first, then its
/// listener stopped: the TIME_WAIT sockets are its port's, not 3,000 client ports'.
#[test]
fn time_wait_on_a_stopped_server_port_counts_under_that_port() {
    let tw = table::TCP_TIME_WAIT;
    let mut entries: Vec<diag::SockEntry> = (0..3000u32)
        .map(|i| {
            let client = format!("127.0.0.1:{}", 33000 + i);
            sock("127.0.0.1:45000", &client, tw, 0)
        })
        .collect();
    // A real client in TIME_WAIT toward one peer stays a client.
    entries.push(sock("10.0.0.1:41002", "10.0.0.9:443", tw, 0));
    let ns = diag::Namespace {
        inode: 1,
        path: "/proc/self/ns/net".into(),
    };
    let s = Snapshot::new(ns, &entries, Arc::default(), None, true, 0);
    assert_eq!(s.counts.by_local, HashMap::from([(45000, 3000)]));
    let d: (IpAddr, u16) = ("10.0.0.9".parse().unwrap(), 443);
    assert_eq!(s.counts.by_remote, HashMap::from([(d, 1)]));
}

/// `entered` comes from the TIME_WAIT sockets' remaining time: 60 s minus it is how long
/// each has been in TIME_WAIT.
#[test]
fn time_wait_entries_from_the_timers() {
    let tw = table::TCP_TIME_WAIT;
    let mut entries = Vec::new();
    // Remaining 59.95 s, 59.0 s, 55.0 s, 50.05 s and 10 s: in TIME_WAIT for 0.05 s, 1 s,
    // 5 s, 9.95 s and 50 s. The 0 ms one (timer just firing) is 60 s old.
    for (i, left) in [59_950u32, 59_000, 55_000, 50_050, 10_000, 0]
        .iter()
        .enumerate()
    {
        let mut d = sock("10.0.0.1:8080", &format!("10.0.0.5:{}", 50000 + i), tw, 0);
        d.expires_ms = *left;
        entries.push(d);
    }
    let ns = diag::Namespace {
        inode: 1,
        path: "/proc/self/ns/net".into(),
    };
    let s = Snapshot::new(ns, &entries, Arc::default(), None, true, 0);
    let a = &s.counts.ages;
    assert_eq!(a.younger_than(0), 0);
    assert_eq!(a.younger_than(100), 1);
    assert_eq!(a.younger_than(1_100), 2);
    assert_eq!(
        a.younger_than(10_000),
        4,
        "the usual 10 s between two records"
    );
    assert_eq!(a.younger_than(60_000), 5);
    assert_eq!(a.younger_than(u64::MAX), 6, "never past the end");
}

/// TIME_WAIT analytics without a kernel: a destination past the threshold is reported once
/// per crossing, and again only after it fell below.
#[test]
fn pressure_is_reported_once_per_crossing() {
    let mut st = TwState::default();
    let dst: IpAddr = "10.0.0.5".parse().unwrap();
    let range = (40000, 40099); // 100 ports
    let at = |n: u64| HashMap::from([((dst, 5432), n)]);
    let run = |st: &mut TwState, n| time_wait::pressure_records(st, 7, range, &at(n), 50.0);
    let first = run(&mut st, 60);
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].in_use, first[0].pct, first[0].range),
        (60, 60.0, [40000, 40099])
    );
    assert!(first[0]
        .hint
        .contains("60 of 100 local ports toward 10.0.0.5:5432"));
    assert!(run(&mut st, 70).is_empty(), "still above: no second record");
    assert!(
        run(&mut st, 10).is_empty(),
        "below: re-armed, nothing to say"
    );
    assert_eq!(run(&mut st, 55).len(), 1, "crossed again");
}

/// The busiest first, at most `n`.
#[test]
fn top_n_keeps_the_largest_counts() {
    let ports = [(80, 3), (443, 9), (8080, 1), (22, 5)]
        .into_iter()
        .map(|(port, count)| PortCount { port, count });
    let top: Vec<u16> = top_n(ports, 2).iter().map(|p| p.port).collect();
    assert_eq!(top, vec![443, 22]);
}

fn processor() -> (Processor, std::sync::mpsc::Receiver<FreshRequest>) {
    let (fresh, requests) = std::sync::mpsc::channel();
    let cfg = Config {
        host: "lab1".into(),
        all_events: false,
        netns_from_proc: false,
        pressure_pct: 90.0,
        top: 5,
        window_s: 0,
        metrics: None,
        attach_clients: Arc::default(),
        fresh,
        stopping: Arc::default(),
    };
    (
        Processor::new(Output::new(None), cfg, Instant::now()),
        requests,
    )
}

/// A connect's EADDRNOTAVAIL waits for its namespace's re-read. The daemon going away (said
/// once per outage, so it can arrive at any moment after start) ends the wait for held
/// proxy binds only: the conflict keeps waiting and gets its counts.
#[test]
fn docker_going_away_does_not_end_a_wait_for_a_namespace_re_read() {
    let (mut p, requests) = processor();
    let mut e = Event::zeroed();
    e.kind = portwatch_common::kind::CONNECT;
    e.ret = -libc::EADDRNOTAVAIL;
    e.pid = std::process::id();
    e.tid = nix::unistd::gettid().as_raw().cast_unsigned();
    e.family = portwatch_common::AF_INET6;
    e.proto = IPPROTO_TCP;
    e.rport = 53;
    e.raddr = std::net::Ipv6Addr::LOCALHOST.octets();
    let c = Pending {
        e,
        k: Kind::Connect,
        netns: 7,
        wall: 1,
        cmdline: None,
        span: Span {
            count: 1,
            first_ns: 1,
            last_ns: 1,
        },
    };
    p.emit_conflict(c, None, None);
    assert_eq!(p.held.len(), 1, "a connect waits for its counts");
    let asked = requests.try_recv().expect("a re-read was asked for");
    assert_eq!(asked.dsts, ["[::1]:53".parse().unwrap()]);
    p.docker_msg(DockerMsg::Unavailable {
        endpoint: "unix:///var/run/docker.sock".into(),
        reason: "connection refused".into(),
        ts_ns: 1,
    });
    assert_eq!(
        p.held.len(),
        1,
        "the daemon's outage is not the namespace's answer"
    );
    p.fresh(Fresh {
        netns: 7,
        as_of: 2,
        result: Ok(FreshData {
            snapshot: None,
            counts: vec![(asked.dsts[0], 0, 0)],
            range: Some((32768, 60999)),
            no_source: asked.dsts.clone(),
        }),
    });
    assert!(p.held.is_empty(), "the re-read ends the wait");
}
