use super::*;
use std::{
    net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

/// Ports unlikely to collide with other tests running on this machine.
/// Above the default ephemeral range (32768-60999) and the e2e tests' ports, so that
/// neither a busy host's outgoing connections nor a concurrent test suite collide.
fn port(k: u16) -> u16 {
    assert!(k < 8);
    61000 + (std::process::id() % 500) as u16 * 8 + k
}

fn own_ns() -> Namespace {
    let inode = std::fs::metadata(OWN_NS).unwrap().ino() as u32;
    let ns = namespaces().into_iter().next().unwrap();
    assert_eq!(ns.inode, inode, "namespaces() lists our own first");
    ns
}

fn sock_inode(fd: &impl AsRawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

fn run(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace made with `ip netns add`, loopback up, deleted on drop.
struct TestNetns {
    name: String,
}

impl TestNetns {
    fn new(tag: &str) -> Self {
        let name = format!("pwdiag-{}-{tag}", std::process::id());
        // Left over from a run that was killed: start clean.
        let _ = Command::new("ip").args(["netns", "delete", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        run(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new(NAMED_NS_DIR).join(&self.name)
    }

    fn inode(&self) -> u32 {
        std::fs::metadata(self.path()).unwrap().ino() as u32
    }

    fn namespace(&self) -> Namespace {
        Namespace {
            inode: self.inode(),
            path: self.path(),
        }
    }

    /// Runs `f` on a thread inside the namespace; sockets it makes stay there.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // Only this scoped thread changes namespace.
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[test]
fn tcp_listener_with_inode_and_owner() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port(0)));
    let l = TcpListener::bind(addr).unwrap();
    let inode = sock_inode(&l);
    let ns = own_ns();
    let all = dump(&ns).unwrap();
    let e = all
        .iter()
        .find(|e| e.proto == Proto::Tcp && e.local == addr)
        .unwrap_or_else(|| panic!("{addr} missing from {} entries", all.len()));
    assert_eq!(e.state, 10);
    assert_eq!(e.inode, inode);
    assert_eq!(e.netns, ns.inode);
    assert_eq!(e.remote, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    // SAFETY: geteuid has no preconditions.
    assert_eq!(e.uid, nix::unistd::geteuid().as_raw());
    assert_eq!(e.v6only, None, "only AF_INET6 sockets carry v6only");
    let owners = socket_owners();
    let o = owners.get(&inode).expect("listener has no owner");
    assert_eq!(o.pid, std::process::id());
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(&*o.comm, comm.trim_end());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(o.uid, nix::unistd::geteuid().as_raw());
}

#[test]
fn shared_socket_goes_to_the_lowest_pid_on_any_thread_count() {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let inode = sock_inode(&l);
    // A child that inherits the listener (no CLOEXEC on a dup) and lives while we walk.
    // SAFETY: dup of an open fd.
    let fd = unsafe { libc::dup(l.as_raw_fd()) };
    assert!(fd >= 0);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    // SAFETY: our own dup, no longer needed here.
    unsafe { libc::close(fd) };
    let want = std::process::id().min(child.id());
    let one = socket_owners_on(1);
    let three = socket_owners_on(3);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(one.get(&inode).map(|o| o.pid), Some(want));
    assert_eq!(three.get(&inode).map(|o| o.pid), Some(want));
}

#[test]
fn bound_udp6_socket() {
    let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port(1)));
    let u = UdpSocket::bind(addr).unwrap();
    let all = dump(&own_ns()).unwrap();
    let e = all
        .iter()
        .find(|e| e.local == addr)
        .unwrap_or_else(|| panic!("{addr} missing"));
    assert_eq!(e.proto, Proto::Udp);
    assert!(e.local.is_ipv6());
    assert_eq!(e.state, 7, "unconnected UDP reports TCP_CLOSE");
    assert_eq!(e.inode, sock_inode(&u));
    assert!(e.v6only.is_some(), "AF_INET6 socket without SKV6ONLY");
    // The TCP side of the dump must not claim it.
    assert!(!all.iter().any(|e| e.proto == Proto::Tcp && e.local == addr));
}

#[test]
fn bound_but_idle_tcp_socket() {
    // std has no bind-without-listen for TCP.
    // SAFETY: plain socket calls on an fd this test owns and closes.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port(1).to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sin` is a valid sockaddr_in of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port(1)));
    let all = dump(&own_ns()).unwrap();
    let e = all
        .iter()
        .find(|e| e.proto == Proto::Tcp && e.local == addr)
        .expect("bound-only TCP socket missing: it holds its port all the same");
    assert_eq!((e.state, e.inode), (7, sock_inode(&fd)));
}

#[test]
fn time_wait_after_client_closes_first() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port(2)));
    let l = TcpListener::bind(addr).unwrap();
    let client = TcpStream::connect(addr).unwrap();
    let (server, _) = l.accept().unwrap();
    let client_addr = client.local_addr().unwrap();
    drop(client);
    // Waiting for EOF makes sure the client's FIN arrived, so the client is the active
    // closer and ends in TIME_WAIT once the server's FIN arrives.
    let mut b = [0u8; 1];
    assert_eq!((&server).read(&mut b).unwrap(), 0);
    drop(server);
    let ns = own_ns();
    let deadline = Instant::now() + Duration::from_secs(5);
    let tw = loop {
        let found = dump(&ns).unwrap().into_iter().find(|e| {
            e.proto == Proto::Tcp && e.local == client_addr && e.remote == addr && e.state == 6
        });
        match found {
            Some(e) => break e,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no TIME_WAIT entry for {client_addr} -> {addr}"),
        }
    };
    assert!(tw.expires_ms > 0 && tw.expires_ms <= 60_000, "{tw:?}");
    assert_eq!(tw.inode, 0);
}

#[test]
fn listener_in_another_namespace() {
    let tns = TestNetns::new("ns");
    // Its own port: the host-side check must not see another test's listener.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port(3)));
    let l = tns.enter(|| TcpListener::bind(addr).unwrap());
    let inode = sock_inode(&l);
    let nss = namespaces();
    let ns = nss
        .iter()
        .find(|n| n.inode == tns.inode())
        .unwrap_or_else(|| panic!("{} not in {nss:?}", tns.inode()));
    let inside = dump(ns).unwrap();
    let e = inside
        .iter()
        .find(|e| e.local == addr)
        .expect("listener missing from its namespace");
    assert_eq!((e.state, e.inode, e.netns), (10, inode, tns.inode()));
    let host = dump(&own_ns()).unwrap();
    assert!(
        !host.iter().any(|e| e.local.port() == addr.port()),
        "port {} leaked into the host dump",
        addr.port()
    );
    // fds are per process, not per namespace: the owner is still found.
    assert_eq!(socket_owners()[&inode].pid, std::process::id());
}

#[test]
fn port_range_is_per_namespace() {
    let tns = TestNetns::new("pr");
    let host = local_port_range(&own_ns()).unwrap();
    let text = std::fs::read_to_string(PORT_RANGE).unwrap();
    let mut it = text.split_whitespace().map(|s| s.parse::<u16>().unwrap());
    assert_eq!(Some(host), it.next().zip(it.next()));
    run(&[
        "ip",
        "netns",
        "exec",
        &tns.name,
        "sysctl",
        "-w",
        "net.ipv4.ip_local_port_range=40000 40010",
    ]);
    assert_eq!(local_port_range(&tns.namespace()).unwrap(), (40000, 40010));
    assert_eq!(local_port_range(&own_ns()).unwrap(), host);
    assert_ne!(host, (40000, 40010));
}

#[test]
fn vanished_namespace_is_not_found() {
    let gone = Namespace {
        inode: 1,
        path: PathBuf::from("/proc/4194304999/ns/net"),
    };
    assert_eq!(dump(&gone).unwrap_err().kind(), io::ErrorKind::NotFound);
    // A live path that leads to another namespace than the one asked for.
    let moved = Namespace {
        inode: 1,
        path: PathBuf::from(OWN_NS),
    };
    let err = local_port_range(&moved).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
}

/// 20k TIME_WAIT sockets in a test namespace, then time dump() of it.
/// `cargo test -p portwatch --bins diag::tests::timing -- --ignored --nocapture`
#[test]
#[ignore = "takes ~10 s and churns 20k loopback connections"]
fn timing_20k_time_wait() {
    const N: usize = 20_000;
    let tns = TestNetns::new("tw");
    // Loopback connects would otherwise recycle TIME_WAIT ports and keep the count low.
    run(&[
        "ip",
        "netns",
        "exec",
        &tns.name,
        "sysctl",
        "-qw",
        "net.ipv4.tcp_tw_reuse=0",
    ]);
    let churn = Instant::now();
    tns.enter(|| {
        let ls: Vec<TcpListener> = (0..2)
            .map(|k| TcpListener::bind((Ipv4Addr::LOCALHOST, port(k))).unwrap())
            .collect();
        for i in 0..N {
            let l = &ls[i % 2];
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            drop(c);
            drop(s);
        }
    });
    let churn = churn.elapsed();
    let ns = tns.namespace();
    let cpu = || {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `ru` is a valid, writable rusage.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        (us(ru.ru_utime), us(ru.ru_stime))
    };
    let mut times = Vec::new();
    let mut tw = 0;
    let before = cpu();
    for _ in 0..10 {
        let t = Instant::now();
        let v = dump(&ns).unwrap();
        times.push(t.elapsed());
        tw = v.iter().filter(|e| e.state == 6).count();
    }
    let after = cpu();
    times.sort();
    println!(
        "cpu per dump: user {:.1} ms, kernel {:.1} ms",
        (after.0 - before.0) / 10.0,
        (after.1 - before.1) / 10.0
    );
    let host = own_ns();
    let t = Instant::now();
    let h = dump(&host).unwrap().len();
    let th = t.elapsed();
    // The reference: ss reading the same namespace (parsing included, output discarded).
    let t = Instant::now();
    let ss = Command::new("ss")
        .args(["-N", &tns.name, "-tuanH"])
        .output()
        .unwrap();
    let tss = t.elapsed();
    println!(
        "churn {N} conns: {churn:?}; dump of netns with {tw} TIME_WAIT: min {:?} median {:?} \
         max {:?}; host dump ({h} sockets, same thread): {th:?}; `ss -N ns -tuanH`: {} \
         lines in {tss:?}",
        times[0],
        times[5],
        times[9],
        ss.stdout
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
    );
    assert!(tw >= N * 9 / 10, "only {tw} TIME_WAIT sockets");
}
