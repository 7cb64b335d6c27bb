//! Load generators. Sockets (raw libc: no allocation, no wrappers in the hot loops): the
//! churn (connect/accept/close, paced or not, in a network namespace of its own), the bind
//! storm's workers, the clients on the agent's control socket, and the listeners holding the
//! latency probes' ports.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    cpu::thread_cpu_seconds, stats::json_u64, ATTACH_READERS, CHURN_MAX_LAG, OK_BIND_EVERY,
};

pub(super) fn loopback(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    }
}

pub(super) const SIN_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A file descriptor closed on drop (listeners and other long-lived sockets).
pub(super) struct Fd(pub(super) i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this fd.
        unsafe { libc::close(self.0) };
    }
}

pub(super) fn tcp_socket() -> Result<Fd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket(): {}", std::io::Error::last_os_error());
    }
    Ok(Fd(fd))
}

/// # Safety
/// `fd` must be a socket.
pub(super) unsafe fn bind_to(fd: i32, sa: &libc::sockaddr_in) -> i32 {
    // SAFETY: `sa` is a valid sockaddr_in of SIN_LEN bytes.
    unsafe { libc::bind(fd, (sa as *const libc::sockaddr_in).cast(), SIN_LEN) }
}

/// A listener on 127.0.0.1 (port 0: the kernel picks). Deliberately without SO_REUSEADDR, so a
/// bind to its port fails with EADDRINUSE.
pub(super) fn listener(port: u16, backlog: i32) -> Result<(Fd, u16)> {
    let fd = tcp_socket()?;
    // SAFETY: fd is a socket; `sa` and `len` describe a valid buffer.
    unsafe {
        if bind_to(fd.0, &loopback(port)) != 0 {
            bail!("bind 127.0.0.1:{port}: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd.0, backlog) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        let mut sa = loopback(0);
        let mut len = SIN_LEN;
        if libc::getsockname(fd.0, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) != 0 {
            bail!("getsockname: {}", std::io::Error::last_os_error());
        }
        Ok((fd, u16::from_be(sa.sin_port)))
    }
}

/// Spreads operations evenly in time for one thread, on a deadline schedule: operation n is
/// due at start + n * interval, whatever the previous sleeps overshot, so timer slack and
/// syscall time do not accumulate into a lower rate. A thread that falls behind (busy
/// machine) catches up at most `max_lag` worth of work instead of bursting an unbounded
/// backlog; work later than that is skipped, as a client that gave up would.
struct Pacer {
    start: Instant,
    interval_ns: u64,
    max_lag_ns: u64,
    n: u64,
}

impl Pacer {
    fn new(per_sec: f64) -> Pacer {
        Pacer::starting_at(per_sec, Instant::now(), Duration::from_millis(50))
    }

    /// `start` may lie in the future: the first operation waits for it. Threads sharing a
    /// rate use it to interleave their schedules instead of all firing at the same instants.
    fn starting_at(per_sec: f64, start: Instant, max_lag: Duration) -> Pacer {
        Pacer {
            start,
            interval_ns: (1e9 / per_sec).max(1.0) as u64,
            max_lag_ns: max_lag.as_nanos() as u64,
            n: 0,
        }
    }

    fn wait(&mut self) {
        let due = self.start + Duration::from_nanos(self.n * self.interval_ns);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        } else if (now - due).as_nanos() as u64 > self.max_lag_ns {
            let behind = (now - self.start).as_nanos() as u64 - self.max_lag_ns;
            self.n = behind / self.interval_ns;
        }
        self.n += 1;
    }
}

/// A counter on its own cache line, so client threads do not slow each other down.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// A network namespace of the bench's own, alive while this fd is open: each churn runs in a
/// fresh one. Two things would otherwise carry over from one configuration to the next and
/// decide the result more than the tracer does:
/// - connection tracking. Docker's iptables rules turn nf_conntrack on in the host namespace,
///   where every loopback connection then holds an entry for 120 s after it closes. At
///   16k conn/s the table (262,144 entries here) is full within 20 s, after which the kernel
///   drops SYNs ("nf_conntrack: table full, dropping packet") and the churn collapses to a
///   few connections a second. A new namespace has no iptables rules, so no conntrack hook.
/// - the TIME_WAIT sockets of earlier rounds, which are per namespace and go with it.
///
/// Every tracer compared here watches all namespaces, so what they see is unchanged.
pub(super) struct OwnNetns {
    pub(super) fd: Fd,
}

impl OwnNetns {
    /// A new namespace with loopback up, and a listener on 127.0.0.1 in it. Made by a
    /// short-lived thread, because unshare(CLONE_NEWNET) moves only the calling thread.
    fn with_listener(backlog: i32) -> Result<(OwnNetns, Fd, u16)> {
        thread::Builder::new()
            .name("bench-netns".into())
            .spawn(move || -> Result<(OwnNetns, Fd, u16)> {
                // SAFETY: plain syscalls; this thread exits right after.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        bail!(
                            "unshare(CLONE_NEWNET): {} (the bench runs as root)",
                            std::io::Error::last_os_error()
                        );
                    }
                    let path = c"/proc/thread-self/ns/net";
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        bail!(
                            "open /proc/thread-self/ns/net: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                    let ns = OwnNetns { fd: Fd(fd) };
                    loopback_up()?;
                    let (lfd, port) = listener(0, backlog)?;
                    Ok((ns, lfd, port))
                }
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?
    }

    /// Move the calling thread into this namespace (new sockets are then made in it).
    pub(super) fn enter(&self) -> Result<()> {
        // SAFETY: a namespace fd we own.
        if unsafe { libc::setns(self.fd.0, libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Bring `lo` up in the calling thread's network namespace (a new one starts with it down).
pub(super) fn loopback_up() -> Result<()> {
    let s = tcp_socket()?;
    // SAFETY: `ifr` is a zeroed ifreq with a NUL-terminated name; SIOC[GS]IFFLAGS read and
    // write only its flags.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, b) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *b as libc::c_char;
        }
        if libc::ioctl(s.0, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            bail!("SIOCGIFFLAGS lo: {}", std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.0, libc::SIOCSIFFLAGS, &ifr) != 0 {
            bail!("SIOCSIFFLAGS lo up: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Loopback connect/accept/close churn. The server closes first (it accepts and closes at
/// once; the client reads until EOF, then closes), so every connection ends deterministically
/// with the server side going FIN_WAIT2 -> TIME_WAIT: the transition portwatch reports by
/// default. The TIME_WAIT side is the server's, so clients never run out of ephemeral ports.
pub(super) struct Churn {
    stop: Arc<AtomicBool>,
    done: Arc<Vec<Padded>>,
    failed: Arc<Vec<Padded>>,
    clients: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
    lfd: Option<Fd>,
    /// Kept open until the threads are done; the namespace goes with the last reference.
    _netns: Arc<OwnNetns>,
}

impl Churn {
    /// `rate`: total connections/s over all clients, or None for as fast as possible.
    /// `max_run`: hard bound on the threads' lifetime even if nobody stops them.
    pub(super) fn start(clients: usize, rate: Option<f64>, max_run: Duration) -> Result<Churn> {
        let (netns, lfd, port) = OwnNetns::with_listener(4096)?;
        let netns = Arc::new(netns);
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Vec<Padded>> = Arc::new((0..clients).map(|_| Padded::default()).collect());
        let failed: Arc<Vec<Padded>> = Arc::new((0..clients).map(|_| Padded::default()).collect());
        let deadline = Instant::now() + max_run;
        let server = {
            let fd = lfd.0;
            thread::Builder::new()
                .name("bench-accept".into())
                .spawn(move || accept_loop(fd, deadline))?
        };
        let mut c = Churn {
            stop,
            done,
            failed,
            clients: Vec::new(),
            server: Some(server),
            lfd: Some(lfd),
            _netns: netns.clone(),
        };
        // Each client paces its share of the rate on its own schedule, offset by a fraction of
        // the interval so that together they are evenly spread (not all connecting at once).
        // A backlog left by a stall (the machine is shared) is caught up only up to
        // CHURN_MAX_LAG: the sweep's windows are 1-5 s, and a 50 ms burst carried into one would
        // show as up to 5% more achieved than offered.
        let t0 = Instant::now();
        for i in 0..clients {
            let (stop, done, failed) = (c.stop.clone(), c.done.clone(), c.failed.clone());
            let netns = netns.clone();
            let pacer = rate.map(|r| {
                let per_thread = r / clients as f64;
                let offset = Duration::from_secs_f64(i as f64 / r);
                Pacer::starting_at(per_thread, t0 + offset, CHURN_MAX_LAG)
            });
            c.clients.push(
                thread::Builder::new()
                    .name(format!("bench-client{i}"))
                    .spawn(move || {
                        if let Err(e) = netns.enter() {
                            eprintln!("bench: client {i}: {e:#}");
                            failed[i].0.fetch_add(1, Relaxed);
                            return;
                        }
                        client_loop(port, pacer, &stop, &done[i].0, &failed[i].0, deadline);
                    })?,
            );
        }
        Ok(c)
    }

    pub(super) fn completed(&self) -> u64 {
        self.done.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    pub(super) fn failures(&self) -> u64 {
        self.failed.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    /// Clients first (they may wait on the server), then the server, then its socket.
    pub(super) fn finish(&mut self) {
        self.stop.store(true, Relaxed);
        for h in self.clients.drain(..) {
            let _ = h.join();
        }
        if let Some(l) = &self.lfd {
            // Wakes the acceptor blocked in accept() (it returns EINVAL).
            // SAFETY: our listening socket.
            unsafe { libc::shutdown(l.0, libc::SHUT_RDWR) };
        }
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        self.lfd = None;
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Accepts and closes at once. It deliberately ignores the stop flag: a client that connected
/// just before stopping waits in read() for this close, so the acceptor runs until `finish`
/// shuts the listener down (after joining the clients), or until its own deadline. Whichever
/// way it ends, it shuts the listener down itself, which resets connections still queued, so
/// no client can be left waiting on an acceptor that is gone.
fn accept_loop(lfd: i32, deadline: Instant) {
    // accept() gives up after this long when idle (SO_RCVTIMEO applies to accept), so the
    // deadline is checked even if no client ever connects.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: lfd stays open until this thread is joined; `tv` is a valid timeval.
    unsafe {
        libc::setsockopt(
            lfd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    while Instant::now() < deadline {
        // SAFETY: as above.
        let fd = unsafe {
            libc::accept4(
                lfd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: the accepted fd is ours.
            unsafe { libc::close(fd) };
            continue;
        }
        match errno() {
            libc::EINTR | libc::ECONNABORTED | libc::EAGAIN => {}
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                thread::sleep(Duration::from_millis(1));
            }
            _ => break, // EINVAL after shutdown(): we are done.
        }
    }
    // SAFETY: as above.
    unsafe { libc::shutdown(lfd, libc::SHUT_RDWR) };
}

fn client_loop(
    port: u16,
    mut pacer: Option<Pacer>,
    stop: &AtomicBool,
    done: &AtomicU64,
    failed: &AtomicU64,
    deadline: Instant,
) {
    let sa = loopback(port);
    let mut buf = [0u8; 16];
    while !stop.load(Relaxed) && Instant::now() < deadline {
        if let Some(p) = &mut pacer {
            p.wait();
        }
        // SAFETY: plain syscalls on an fd this loop owns; `sa` and `buf` outlive them.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                failed.fetch_add(1, Relaxed);
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            let mut ok = libc::connect(fd, (&sa as *const libc::sockaddr_in).cast(), SIN_LEN) == 0;
            if ok {
                // Wait for the server's close (EOF); no data is ever sent.
                loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n == 0 {
                        break;
                    }
                    if n < 0 && errno() != libc::EINTR {
                        ok = false;
                        break;
                    }
                }
            }
            libc::close(fd);
            if ok {
                done.fetch_add(1, Relaxed);
            } else {
                failed.fetch_add(1, Relaxed);
            }
        }
    }
}

#[derive(Default)]
pub(super) struct StormCount {
    pub(super) failing: u64,
    pub(super) eaddrinuse: u64,
    pub(super) ok: u64,
    pub(super) other: u64,
}

/// Failing binds to `port` (held by a listener) on one reused socket: a bind that fails leaves
/// the socket unbound, so no socket()/close() is needed per attempt, which is what makes
/// 100k+/s possible. Every OK_BIND_EVERY-th attempt (when `ok_binds`) is a successful bind on a
/// fresh socket to 127.0.0.1:0, closed at once: the realistic mix the kernel side must also
/// carry (bind ok + close of a tracked fd).
pub(super) fn storm_worker(
    port: u16,
    per_sec: Option<f64>,
    ok_binds: bool,
    until: Instant,
) -> StormCount {
    let target = loopback(port);
    let any = loopback(0);
    let mut c = StormCount::default();
    let Ok(sock) = tcp_socket() else {
        c.other += 1;
        return c;
    };
    let mut pacer = per_sec.map(Pacer::new);
    let mut i: u64 = 0;
    while Instant::now() < until {
        if let Some(p) = &mut pacer {
            p.wait();
        }
        i += 1;
        // SAFETY: plain syscalls on sockets owned here; the sockaddrs outlive the calls.
        unsafe {
            if ok_binds && i.is_multiple_of(OK_BIND_EVERY) {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd >= 0 {
                    if bind_to(fd, &any) == 0 {
                        c.ok += 1;
                    } else {
                        c.other += 1;
                    }
                    libc::close(fd);
                }
                continue;
            }
            if bind_to(sock.0, &target) == 0 {
                // Cannot happen while the listener holds the port; counted, never hidden.
                c.other += 1;
                break;
            }
            c.failing += 1;
            if errno() == libc::EADDRINUSE {
                c.eaddrinuse += 1;
            }
        }
    }
    c
}

/// What the agent sends a client that could not take some records, once it can take one.
const MISSED_PREFIX: &[u8] = b"{\"v\":1,\"type\":\"missed\"";

#[derive(Default)]
pub(super) struct ReaderCount {
    pub(super) lines: u64,
    pub(super) missed: u64,
    /// The reading thread's own CPU time and how long it ran (connect to EOF).
    pub(super) cpu_s: f64,
    pub(super) ran_s: f64,
}

/// Clients on the agent's control socket: ATTACH_READERS that read everything, and one that
/// sends the attach request and then reads nothing. An attached client gets every event as a
/// record (the live detail), not only conflicts: under the background churn that is tens of
/// thousands of lines a second per client, so the stalled one falls behind within a second.
pub(super) struct AttachClients {
    stalled: std::os::unix::net::UnixStream,
    readers: Vec<JoinHandle<ReaderCount>>,
}

fn attach_client(sock: &Path) -> Result<std::os::unix::net::UnixStream> {
    use std::io::Write as _;
    let mut c = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connecting to {}", sock.display()))?;
    c.write_all(b"{\"cmd\":\"attach\"}\n")
        .with_context(|| format!("attach request on {}", sock.display()))?;
    Ok(c)
}

impl AttachClients {
    pub(super) fn connect(sock: &Path) -> Result<AttachClients> {
        let stalled = attach_client(sock)?;
        let mut readers = Vec::with_capacity(ATTACH_READERS);
        for i in 0..ATTACH_READERS {
            let c = attach_client(sock)?;
            // Backstop only: the agent sends lines all the time under churn, and EOF when it
            // exits.
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            readers.push(
                thread::Builder::new()
                    .name(format!("bench-attach-{i}"))
                    .spawn(move || {
                        let t0 = Instant::now();
                        let mut r = BufReader::with_capacity(1 << 18, c);
                        let mut buf = Vec::with_capacity(4096);
                        let mut n = ReaderCount::default();
                        loop {
                            buf.clear();
                            match r.read_until(b'\n', &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                            n.lines += 1;
                            if buf.len() < 64 && buf.starts_with(MISSED_PREFIX) {
                                let l = String::from_utf8_lossy(&buf);
                                n.missed += json_u64(&l, "count").unwrap_or(0);
                            }
                        }
                        n.cpu_s = thread_cpu_seconds();
                        n.ran_s = t0.elapsed().as_secs_f64();
                        n
                    })?,
            );
        }
        Ok(AttachClients { stalled, readers })
    }

    /// The stalled client reads at last. The agent tells it how many records it missed as
    /// soon as there is room for the note, so this needs the churn still running (new
    /// records to publish). None if no note came within `limit`.
    pub(super) fn stalled_missed(&self, limit: Duration) -> Option<u64> {
        let deadline = Instant::now() + limit;
        self.stalled
            .set_read_timeout(Some(Duration::from_millis(100)))
            .ok()?;
        let mut r = BufReader::with_capacity(1 << 18, &self.stalled);
        let mut buf = Vec::with_capacity(4096);
        while Instant::now() < deadline {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return None,
            }
            if buf.len() < 64 && buf.starts_with(MISSED_PREFIX) {
                return json_u64(&String::from_utf8_lossy(&buf), "count");
            }
        }
        None
    }

    /// After the agent exited: what each reader read.
    pub(super) fn finish(self) -> Vec<ReaderCount> {
        drop(self.stalled);
        self.readers
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    }
}

/// One listener per unrelated-conflict probe, each on a port of its own, so that a probe's
/// conflict line is known by its port; and when each probe's line arrived (wall ns, 0 until
/// it does).
pub(super) struct ProbeHolders {
    pub(super) holders: Vec<(Fd, u16)>,
    index: Arc<Vec<u16>>,
    pub(super) arrivals: Arc<Vec<AtomicI64>>,
}

/// What a reader thread needs to time the probes' lines.
pub(super) struct ProbeMarks {
    index: Arc<Vec<u16>>,
    arrivals: Arc<Vec<AtomicI64>>,
}

impl ProbeHolders {
    pub(super) fn new(n: usize) -> Result<ProbeHolders> {
        let holders: Vec<(Fd, u16)> = (0..n).map(|_| listener(0, 1)).collect::<Result<_>>()?;
        let mut index = vec![u16::MAX; 65536];
        for (i, (_, p)) in holders.iter().enumerate() {
            index[*p as usize] = i as u16;
        }
        Ok(ProbeHolders {
            holders,
            index: Arc::new(index),
            arrivals: Arc::new((0..n).map(|_| AtomicI64::new(0)).collect()),
        })
    }

    pub(super) fn marks(&self) -> ProbeMarks {
        ProbeMarks {
            index: self.index.clone(),
            arrivals: self.arrivals.clone(),
        }
    }
}

impl ProbeMarks {
    /// A conflict line on `port` arrived at `now`: the first one of a probe is its time.
    /// Whether `port` is a probe's.
    pub(super) fn arrived(&self, port: u64, now: i64) -> bool {
        let i = self.index[port as usize & 0xffff];
        if i == u16::MAX {
            return false;
        }
        let _ = self.arrivals[i as usize].compare_exchange(0, now, Relaxed, Relaxed);
        true
    }
}
