//! The churn: loopback connect/accept/close, paced or as fast as possible, by client threads
//! and one acceptor in a network namespace of its own.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{errno, loopback, Fd, OwnNetns, Pacer, SIN_LEN};
use crate::bench::CHURN_MAX_LAG;

/// A counter on its own cache line, so client threads do not slow each other down.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

/// Loopback connect/accept/close churn. The server closes first (it accepts and closes at
/// once; the client reads until EOF, then closes), so every connection ends deterministically
/// with the server side going FIN_WAIT2 -> TIME_WAIT: the transition portwatch reports by
/// default. The TIME_WAIT side is the server's, so clients never run out of ephemeral ports.
pub(in crate::bench) struct Churn {
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
    pub(in crate::bench) fn start(
        clients: usize,
        rate: Option<f64>,
        max_run: Duration,
    ) -> Result<Churn> {
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

    pub(in crate::bench) fn completed(&self) -> u64 {
        self.done.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    pub(in crate::bench) fn failures(&self) -> u64 {
        self.failed.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    /// Clients first (they may wait on the server), then the server, then its socket.
    pub(in crate::bench) fn finish(&mut self) {
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
