use super::*;
use crate::host::diag::SockEntry;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn owner(pid: u32, comm: &str) -> Option<Arc<Owner>> {
    Some(Arc::new(Owner {
        pid,
        comm: comm.into(),
        cmdline: None,
        uid: 0,
    }))
}

fn entry(proto: Proto, local: &str, state: u8, pid: u32) -> Entry {
    Entry {
        proto,
        local: sa(local).into(),
        remote: sa("0.0.0.0:0").into(),
        state,
        inode: 0,
        sk: 0,
        owner: (pid != 0).then(|| owner(pid, "nginx")).flatten(),
        since_ns: 0,
        v6only: None,
    }
}

/// A socket as sock_diag reports it.
fn diag(proto: Proto, local: &str, remote: &str, state: u8, inode: u64) -> SockEntry {
    SockEntry {
        netns: 1,
        proto,
        local: sa(local),
        remote: sa(remote),
        state,
        inode,
        uid: 0,
        expires_ms: 0,
        v6only: None,
    }
}

fn no_owners(_: u64) -> Option<Arc<Owner>> {
    None
}

fn attempt(addr: &str, port: u16, proto: Proto) -> Attempt<'static> {
    Attempt {
        netns: 1,
        proto,
        addr: addr.parse().unwrap(),
        port,
        op_listen: false,
        actor_sk: 0,
        now_ns: 0,
        proto_name: if proto == Proto::Tcp { "tcp" } else { "udp" },
        publishing: None,
        ephemeral: (32768, 60999),
    }
}

#[test]
fn a_client_connection_on_an_ephemeral_source_port_is_a_collision() {
    let mut t = PortTable::default();
    let mut client = entry(Proto::Tcp, "10.0.0.5:40001", 1 /* ESTABLISHED */, 7);
    client.remote = sa("10.0.0.9:5432").into();
    t.on_bind(1, client);
    let a = t.attribute(&attempt("0.0.0.0", 40001, Proto::Tcp));
    assert_eq!(a.cause, "ephemeral_collision");
    assert!(
        a.hint
            .contains("sysctl -w net.ipv4.ip_local_reserved_ports=40001"),
        "{}",
        a.hint
    );
    assert!(a.hint.contains("10.0.0.9:5432"), "{}", a.hint);
    // Outside the range, the same socket is only `bound`.
    let mut b = attempt("0.0.0.0", 40001, Proto::Tcp);
    b.ephemeral = (50000, 60000);
    assert_eq!(t.attribute(&b).cause, "bound");
    // A listener on the port still decides first.
    t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:40001", TCP_LISTEN, 8));
    assert_eq!(
        t.attribute(&attempt("0.0.0.0", 40001, Proto::Tcp)).cause,
        "listener"
    );
}

#[test]
fn overlaps() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        overlap(ip("127.0.0.1"), None, ip("127.0.0.1"), None),
        Some(Overlap::Exact)
    );
    assert_eq!(
        overlap(ip("127.0.0.1"), None, ip("0.0.0.0"), None),
        Some(Overlap::Wildcard)
    );
    assert_eq!(
        overlap(ip("0.0.0.0"), None, ip("127.0.0.1"), None),
        Some(Overlap::Wildcard)
    );
    assert_eq!(overlap(ip("127.0.0.1"), None, ip("127.0.0.2"), None), None);
    assert_eq!(
        overlap(ip("0.0.0.0"), None, ip("::"), None),
        Some(Overlap::DualStack)
    );
    assert_eq!(overlap(ip("0.0.0.0"), None, ip("::"), Some(true)), None);
    assert_eq!(
        overlap(ip("::"), None, ip("10.0.0.1"), None),
        Some(Overlap::DualStack)
    );
    assert_eq!(overlap(ip("::1"), None, ip("127.0.0.1"), None), None);
    assert_eq!(
        overlap(ip("::ffff:127.0.0.1"), None, ip("127.0.0.1"), None),
        Some(Overlap::Exact)
    );
}

#[test]
fn listener_cause_and_hint() {
    let mut t = PortTable::default();
    t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_CLOSE, 4242));
    t.on_listen(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_CLOSE, 4242));
    let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
    assert_eq!(a.cause, "listener");
    assert_eq!(a.overlap, Some(Overlap::Wildcard));
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].pid, Some(4242));
    assert_eq!(a.holders[0].state, "LISTEN");
    assert_eq!(
        a.hint,
        "pid 4242 (nginx) listens on 0.0.0.0:8080; stop it or bind another port"
    );
    // Other namespace, other proto: nothing.
    let mut other = attempt("127.0.0.1", 8080, Proto::Tcp);
    other.netns = 2;
    assert_eq!(t.attribute(&other).cause, "unknown");
    assert_eq!(
        t.attribute(&attempt("127.0.0.1", 8080, Proto::Udp)).cause,
        "unknown"
    );
}

/// A dump whose /proc walk ran before the socket existed leaves it without an owner;
/// the listen event that follows names the owner on that row rather than adding a
/// second row for the same socket.
#[test]
fn a_listen_event_adopts_the_ownerless_row_of_its_socket() {
    let mut t = PortTable::default();
    t.reconcile(NsSockets::build(
        1,
        &[diag(
            Proto::Tcp,
            "127.0.0.1:8080",
            "0.0.0.0:0",
            TCP_LISTEN,
            77,
        )],
        &no_owners,
        0,
    ));
    let mut ev = entry(Proto::Tcp, "127.0.0.1:8080", TCP_CLOSE, 4242);
    ev.sk = 0xffff_8880_0000_1000;
    t.on_listen(1, ev);
    let rows: Vec<&Entry> = t.rows_at(1, Proto::Tcp, 8080).collect();
    assert_eq!(rows.len(), 1, "one socket, one row");
    assert_eq!(rows[0].owner.as_ref().map(|o| o.pid), Some(4242));
    // A row owned by another process is not taken over.
    let mut t = PortTable::default();
    t.on_bind(1, entry(Proto::Tcp, "127.0.0.1:8081", TCP_CLOSE, 1));
    t.on_listen(1, entry(Proto::Tcp, "127.0.0.1:8081", TCP_CLOSE, 2));
    assert_eq!(t.rows_at(1, Proto::Tcp, 8081).count(), 2);
}

#[test]
fn bound_udp_and_close() {
    let mut t = PortTable::default();
    let mut e = entry(Proto::Udp, "127.0.0.1:5353", TCP_CLOSE, 7);
    e.sk = 0xabc;
    t.on_bind(1, e);
    let a = t.attribute(&attempt("127.0.0.1", 5353, Proto::Udp));
    assert_eq!(a.cause, "bound");
    assert_eq!(a.holders[0].state, "UDP");
    t.on_close(1, Proto::Udp, 5353, 0xabc, 7);
    assert_eq!(
        t.attribute(&attempt("127.0.0.1", 5353, Proto::Udp)).cause,
        "unknown"
    );
    assert_eq!(t.len(), 0);
}

#[test]
fn time_wait_only_aggregates() {
    let mut t = PortTable::default();
    let tws: Vec<SockEntry> = (0..3)
        .map(|i| {
            let mut d = diag(
                Proto::Tcp,
                "127.0.0.1:8080",
                &format!("127.0.0.1:{}", 40000 + i),
                TCP_TIME_WAIT,
                0,
            );
            d.expires_ms = (43 - i) * 1000;
            d
        })
        .collect();
    t.reconcile(NsSockets::build(1, &tws, &no_owners, 0));
    assert_eq!(t.drift_healed, 0, "TIME_WAIT is not drift");
    let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
    assert_eq!(a.cause, "time_wait");
    assert_eq!(a.holders.len(), 1);
    assert_eq!(a.holders[0].count, Some(3));
    assert_eq!(a.holders[0].expires_in_s, Some(41));
    assert!(
        a.hint
            .starts_with("3 TIME_WAIT sockets on 127.0.0.1:8080 expire within 41 s"),
        "{}",
        a.hint
    );
}

#[test]
fn listen_conflict_excludes_own_socket() {
    let mut t = PortTable::default();
    let mut mine = entry(Proto::Tcp, "127.0.0.1:9000", TCP_CLOSE, 99);
    mine.sk = 2;
    let mut other = entry(Proto::Tcp, "127.0.0.1:9000", TCP_CLOSE, 99);
    other.sk = 1;
    t.on_bind(1, other.clone());
    t.on_bind(1, mine);
    t.on_listen(1, other);
    let mut a = attempt("127.0.0.1", 9000, Proto::Tcp);
    a.op_listen = true;
    a.actor_sk = 2;
    let r = t.attribute(&a);
    assert_eq!(r.cause, "listener");
    assert_eq!(r.holders.len(), 1);
    assert_eq!(r.holders[0].state, "LISTEN");
}

#[test]
fn reconcile_keeps_event_facts_and_counts_drift() {
    let mut t = PortTable::default();
    let mut e = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242);
    e.since_ns = 5;
    e.inode = 77;
    t.on_bind(1, e);
    t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:9999", TCP_CLOSE, 1)); // gone in the kernel
    let snap_same = diag(Proto::Tcp, "0.0.0.0:8080", "0.0.0.0:0", TCP_LISTEN, 77);
    let snap_new = diag(Proto::Tcp, "0.0.0.0:7000", "0.0.0.0:0", TCP_LISTEN, 88);
    let owners = |ino: u64| (ino == 88).then(|| owner(555, "passed").unwrap());
    let snap = NsSockets::build(1, &[snap_same, snap_new], &owners, 0);
    let healed = t.reconcile(snap);
    assert_eq!(healed, 2, "one new, one vanished");
    assert_eq!(t.drift_healed, 2);
    let a = t.attribute(&attempt("0.0.0.0", 8080, Proto::Tcp));
    assert_eq!(a.holders[0].pid, Some(4242), "owner from events kept");
    assert!(a.holders[0].since.is_some());
    let b = t.attribute(&attempt("0.0.0.0", 7000, Proto::Tcp));
    assert_eq!(b.holders[0].pid, Some(555), "owner from the inode map");
    assert_eq!(
        t.attribute(&attempt("0.0.0.0", 9999, Proto::Tcp)).cause,
        "unknown"
    );
}

#[test]
fn owners_are_shared_per_process() {
    let mut t = PortTable::default();
    let a = t.owner(7, "nginx", None, 0);
    let b = t.owner(7, "nginx", None, 0);
    assert!(Arc::ptr_eq(&a, &b), "same process, same owner");
    let cmd: Option<Arc<str>> = Some("nginx -g daemon off;".into());
    let c = t.owner(7, "nginx", cmd.clone(), 0);
    assert!(
        !Arc::ptr_eq(&a, &c),
        "what events tell changed: a new owner"
    );
    assert_eq!(c.cmdline, cmd);
    assert!(Arc::ptr_eq(&c, &t.owner(7, "nginx", cmd.clone(), 0)));
    let d = t.owner(7, "nginx", cmd.clone(), 1000);
    assert_eq!((d.pid, d.uid), (7, 1000));
    assert!(!Arc::ptr_eq(&t.owner(8, "nginx", cmd.clone(), 1000), &d));
    // Once the process exits a reused pid gets an owner of its own.
    t.on_exit(7);
    assert!(!Arc::ptr_eq(&t.owner(7, "nginx", cmd, 1000), &d));
}

#[test]
fn addr_keeps_what_identifies_a_socket() {
    for s in [
        "127.0.0.1:80",
        "[::1]:443",
        "[fe80::1%3]:53",
        "[::ffff:10.0.0.1]:8",
    ] {
        let a = sa(s);
        assert_eq!(SocketAddr::from(Addr::from(a)), a, "{s}");
        assert_eq!(Addr::from(a).ip(), a.ip());
        assert_eq!(Addr::from(a).port(), a.port());
    }
    assert_ne!(
        Addr::from(sa("[fe80::1%3]:53")),
        Addr::from(sa("[fe80::1%4]:53"))
    );
}

/// A listener's port with more sockets than a linear scan handles: they are matched
/// by inode, or by address when the table's entry came from events (no inode).
#[test]
fn reconcile_of_a_big_bucket() {
    const N: u64 = 100;
    let mut t = PortTable::default();
    let conns = |n: u64| -> Vec<SockEntry> {
        (0..n)
            .map(|i| {
                let remote = format!("10.0.0.1:{}", 40000 + i);
                diag(Proto::Tcp, "10.0.0.2:8080", &remote, 1, 1000 + i)
            })
            .collect()
    };
    let server = |ino: u64| (ino >= 1000).then(|| owner(10, "server").unwrap());
    let mut snap = conns(N);
    assert_eq!(t.reconcile(NsSockets::build(1, &snap, &server, 0)), N);
    // The listener, from events: no inode, its own sk, since and owner.
    let mut l = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 42);
    (l.sk, l.since_ns) = (9, 5);
    t.on_bind(1, l);
    assert_eq!(t.len(), N as usize + 1);
    // Next pass, in another order: the listener (with its inode now), two connections
    // fewer, one new one.
    snap.reverse();
    snap.truncate(N as usize - 2);
    snap.push(diag(
        Proto::Tcp,
        "0.0.0.0:8080",
        "0.0.0.0:0",
        TCP_LISTEN,
        5000,
    ));
    snap.push(diag(Proto::Tcp, "10.0.0.2:8080", "10.0.0.1:50000", 1, 6000));
    let owners = |ino: u64| match ino {
        5000 => owner(41, "scanned"),
        6000 => owner(11, "worker"),
        i => server(i),
    };
    let healed = t.reconcile(NsSockets::build(1, &snap, &owners, 0));
    assert_eq!(healed, 3, "one new, two gone");
    assert_eq!(t.drift_healed, N + 3);
    assert_eq!(t.len(), N as usize);
    let mut a = attempt("0.0.0.0", 8080, Proto::Tcp);
    a.op_listen = true;
    let h = &t.attribute(&a).holders;
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].pid, Some(42), "the owner events saw is kept");
    assert!(h[0].since.is_some(), "since is kept");
    let rows: Vec<_> = t.rows().map(|(_, e)| e).collect();
    let listener = rows.iter().find(|e| e.state == TCP_LISTEN).unwrap();
    assert_eq!((listener.sk, listener.inode), (9, 5000));
    let new = rows.iter().find(|e| e.inode == 6000).unwrap();
    assert_eq!(new.owner.as_ref().map(|o| o.pid), Some(11));
    assert!(!rows.iter().any(|e| e.inode == 1000 || e.inode == 1001));
    // Nothing changed: nothing healed.
    assert_eq!(t.reconcile(NsSockets::build(1, &snap, &owners, 0)), 0);
}

fn web1() -> Arc<ContainerRef> {
    Arc::new(ContainerRef {
        engine: "docker".into(),
        id: "99c0b70358a8".into(),
        name: "web1".into(),
        image: "nginx:1.27".into(),
        compose_project: Some("shop".into()),
        compose_service: Some("web".into()),
    })
}

/// A binder's socket that no known container claims: `docker_stale`, and the hint
/// names the process to end.
#[test]
fn a_proxy_no_container_claims_is_docker_stale() {
    let mut t = PortTable::default();
    let mut proxy = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 31032);
    proxy.owner = owner(31032, "docker-proxy");
    t.on_bind(1, proxy);
    let mut place = |_: &Entry| {
        Some(Placement {
            container: None,
            via: Some("docker-proxy"),
            container_port: None,
            stale: true,
        })
    };
    let a = t.attribute_with(&attempt("127.0.0.1", 8080, Proto::Tcp), &mut place);
    assert_eq!(a.cause, "docker_stale");
    assert_eq!(a.holders[0].stale, Some(true));
    assert!(a.hint.starts_with("docker-proxy (pid 31032) still holds 0.0.0.0:8080 for a container the engine no longer knows"), "{}", a.hint);
    assert!(a.hint.contains("kill 31032"), "{}", a.hint);
}

#[test]
fn published_port_makes_the_cause_docker_published() {
    let mut t = PortTable::default();
    let mut proxy = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 31032);
    proxy.owner = owner(31032, "docker-proxy");
    t.on_bind(1, proxy);
    let mut place = |x: &Entry| {
        (x.owner.as_ref()?.comm.as_ref() == "docker-proxy").then(|| Placement {
            container: Some(web1()),
            via: Some("docker-proxy"),
            container_port: Some(80),
            stale: false,
        })
    };
    let a = t.attribute_with(&attempt("127.0.0.1", 8080, Proto::Tcp), &mut place);
    assert_eq!(a.cause, "docker_published");
    assert_eq!(a.holders[0].via.as_deref(), Some("docker-proxy"));
    assert_eq!(
        a.holders[0].container.as_deref().map(|c| &*c.name),
        Some("web1")
    );
    assert_eq!(
        a.hint,
        "container web1 (nginx:1.27, 99c0b70358a8) publishes 0.0.0.0:8080 -> 80/tcp through \
         docker-proxy (pid 31032); docker stop web1, or bind another port"
    );
    let v = serde_json::to_value(&a.holders[0]).unwrap();
    assert_eq!(v["container"]["compose_project"], "shop");
    assert_eq!(v["container_port"], 80);
    // Without placement the same socket is an ordinary listener.
    assert_eq!(
        t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp)).cause,
        "listener"
    );
}

#[test]
fn holder_in_a_container_and_an_actor_publishing() {
    let mut t = PortTable::default();
    t.on_bind(1, entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242));
    let mut place = |_: &Entry| {
        Some(Placement {
            container: Some(web1()),
            via: None,
            container_port: None,
            stale: false,
        })
    };
    let mut at = attempt("0.0.0.0", 8080, Proto::Tcp);
    at.publishing = Some("web2");
    let a = t.attribute_with(&at, &mut place);
    assert_eq!(a.cause, "listener");
    assert_eq!(
        a.hint,
        "pid 4242 (nginx) in container web1 listens on 0.0.0.0:8080; stop it or publish web2 \
         on another host port"
    );
    let v = serde_json::to_value(&a.holders[0]).unwrap();
    assert!(
        v.get("via").is_none() && v.get("container_port").is_none(),
        "{v}"
    );
}

#[test]
fn tcp_state_time_wait_entry_and_listener_stop() {
    let mut t = PortTable::default();
    let mut l = entry(Proto::Tcp, "0.0.0.0:8080", TCP_LISTEN, 4242);
    l.sk = 9;
    t.on_bind(1, l.clone());
    let mut tw = entry(Proto::Tcp, "127.0.0.1:8080", 0, 0);
    tw.remote = sa("127.0.0.1:50000").into();
    tw.since_ns = 0;
    t.on_tcp_state(1, &tw, 5, TCP_CLOSE);
    t.on_tcp_state(1, &l, TCP_LISTEN, TCP_CLOSE);
    let a = t.attribute(&attempt("127.0.0.1", 8080, Proto::Tcp));
    assert_eq!(a.cause, "time_wait");
    assert_eq!(a.holders[0].expires_in_s, Some(60));
}
