//! Troubleshooting workflows with real sockets in namespaces the tests make: a service port
//! taken as an outbound connection's source port, and EADDRNOTAVAIL that is not port
//! exhaustion.

use std::{net::SocketAddr, os::fd::OwnedFd, process::Command, time::Duration};

use portwatch_tests::*;

#[test]
fn a_service_port_taken_as_a_source_port_is_an_ephemeral_collision() {
    let ns = NetNs::new("coll");
    // One ephemeral port: the client's connection is sure to get it.
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    let server = test_port(70);
    let agent = Agent::start(&[]);
    let (err, holder_pid) = ns.run(move || {
        let dst: SocketAddr = format!("127.0.0.1:{server}").parse().unwrap();
        let l = listener(&format!("127.0.0.1:{server}"));
        let c = socket(&dst, SOCK_STREAM, false);
        connect(&c, &dst).expect("connect");
        // The service that wants 40000 starts now.
        let svc: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let s = socket(&svc, SOCK_STREAM, false);
        let err = bind(&s, &svc).err().and_then(|e| e.raw_os_error());
        // Keep the client open until the agent has read the namespace.
        std::thread::sleep(Duration::from_millis(1500));
        drop((l, c));
        (err, std::process::id())
    });
    assert_eq!(err, Some(libc::EADDRINUSE));
    let r = agent.wait_record("the collision", |r| {
        r.conflict().is_some_and(|c| c.port == 40000) && r.netns() == Some(ns.inode32())
    });
    let c = r.conflict().unwrap();
    assert_eq!(c.cause, schema::Cause::EphemeralCollision, "{c:?}");
    let hint = &c.hint;
    assert!(
        hint.contains("sysctl -w net.ipv4.ip_local_reserved_ports=40000"),
        "{hint}"
    );
    assert!(hint.contains(&format!("127.0.0.1:{server}")), "{hint}");
    let h = &c.holders[0];
    assert_eq!(h.pid, Some(holder_pid), "{c:?}");
    assert_eq!(h.state, schema::SockState::Established, "{c:?}");

    // check warns about a port inside the range, and suggests ports outside it first.
    let out = ns.run(|| {
        Command::new(agent_bin())
            .args(["check", "40000", "--json"])
            .output()
            .unwrap()
    });
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(v["in_ephemeral_range"], true, "{v}");
    assert_eq!(v["ephemeral_range"], serde_json::json!([40000, 40000]));
    let out = ns.run(|| {
        Command::new(agent_bin())
            .args(["check", "--suggest", "2", "--range", "39999-40001"])
            .output()
            .unwrap()
    });
    let s = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        s.lines().collect::<Vec<_>>(),
        ["39999", "40001"],
        "40000 is last: {s}"
    );
}

fn v6_connect(ty: i32) -> (Option<i32>, OwnedFd) {
    let dst: SocketAddr = "[::1]:53".parse().unwrap();
    let s = socket(&dst, ty, false);
    let e = connect(&s, &dst).err().and_then(|e| e.raw_os_error());
    (e, s)
}

#[test]
fn eaddrnotavail_without_exhaustion_is_not_called_exhaustion() {
    // dockerd's case on every container start: ::1 is not configured in the new namespace.
    let ns = NetNs::new("noaddr");
    ns.sysctl("net.ipv6.conf.lo.disable_ipv6", "1");
    let agent = Agent::start(&[]);
    let (udp, tcp) = ns.run(|| {
        let (udp, _u) = v6_connect(SOCK_DGRAM);
        let (tcp, _t) = v6_connect(SOCK_STREAM);
        (udp, tcp)
    });
    assert_eq!(udp, Some(libc::EADDRNOTAVAIL));
    assert_eq!(tcp, Some(libc::EADDRNOTAVAIL));
    let is_connect = |r: &Record| {
        r.conflict().is_some_and(|c| c.op == schema::Op::Connect) && r.netns() == Some(ns.inode32())
    };
    let r = agent.wait_record("the TCP connect", is_connect);
    let c = r.conflict().unwrap();
    assert_eq!(c.cause, schema::Cause::AddressUnavailable, "{c:?}");
    assert!(c.hint.contains("not port exhaustion"), "{c:?}");
    let d = c.destination.as_ref().expect("destination");
    assert_eq!(d.in_use, 0, "{c:?}");
    assert!(d.as_of.is_some(), "{c:?}");
    let done = agent.stop();
    let connects: Vec<_> = done.records.iter().filter(|r| is_connect(r)).collect();
    assert_eq!(
        connects.len(),
        1,
        "the UDP one is no conflict: {connects:?}"
    );
    assert_eq!(connects[0].conflict().unwrap().proto, schema::Proto::Tcp);
}

#[test]
fn time_wait_of_a_stopped_server_in_the_ephemeral_range_counts_under_its_port() {
    let ns = NetNs::new("twsrv");
    let agent = Agent::start(&["--tw-interval", "1"]);
    // Inside the default ip_local_port_range (32768-60999).
    const P: u16 = 45123;
    const N: usize = 3000;
    ns.run(|| {
        let addr: SocketAddr = format!("127.0.0.1:{P}").parse().unwrap();
        let l = std::net::TcpListener::bind(addr).unwrap();
        let mut clients = Vec::with_capacity(N);
        for _ in 0..N {
            let c = std::net::TcpStream::connect(addr).unwrap();
            let (srv, _) = l.accept().unwrap();
            // The server closes first: the TIME_WAIT socket is on its side, local port P.
            drop(srv);
            clients.push(c);
        }
        std::thread::sleep(Duration::from_millis(200));
        drop(clients);
        drop(l);
    });
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns_name(&ns),
            "ss",
            "-Htan",
            "state",
            "time-wait",
        ])
        .arg(format!("( sport = :{P} )"))
        .output()
        .unwrap();
    let in_tw = String::from_utf8_lossy(&ss.stdout).lines().count();
    assert!(in_tw >= N - 10, "ss shows {in_tw} TIME_WAIT sockets on {P}");
    let tw = |r: &Record| match &r.body {
        Body::TimeWait(t) if t.netns == ns.inode32() => Some(t.clone()),
        _ => None,
    };
    let r = agent.wait_record("a time_wait record with the port", |r| {
        tw(r).is_some_and(|t| t.by_local_port.iter().any(|x| x.port == P))
    });
    let t = tw(&r).unwrap();
    let count = t.by_local_port.iter().find(|x| x.port == P).unwrap().count;
    assert!(count as usize >= N - 10, "{t:?}");
    let remotes: u64 = t.by_remote.iter().map(|x| x.count).sum();
    assert_eq!(remotes, 0, "no client ports among by_remote: {t:?}");
}

/// The `ip netns` name of a test namespace (its path's last component).
fn ns_name(ns: &NetNs) -> String {
    ns.path().rsplit('/').next().unwrap().to_string()
}
