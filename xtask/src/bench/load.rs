//! Load generators. Sockets (raw libc: no allocation, no wrappers in the hot loops): the
//! churn (connect/accept/close, paced or not, in a network namespace of its own), the bind
//! storm's workers, the clients on the agent's control socket, and the listeners holding the
//! latency probes' ports.
//!
//! The generators are in `churn`, `storm` and `attach`; here are what they share (socket
//! helpers, the pacer, the bench's own network namespace) and the probes' listeners.

mod attach;
mod churn;
mod storm;

use std::{
    sync::{
        atomic::{AtomicI64, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

pub(super) use self::{
    attach::AttachClients,
    churn::Churn,
    storm::{storm_worker, StormCount},
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
