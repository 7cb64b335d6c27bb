//! The bind storm's workers: failing binds to a held port, with successful ones mixed in.

use std::time::Instant;

use super::{bind_to, errno, loopback, tcp_socket, Pacer};
use crate::bench::OK_BIND_EVERY;

#[derive(Default)]
pub(in crate::bench) struct StormCount {
    pub(in crate::bench) failing: u64,
    pub(in crate::bench) eaddrinuse: u64,
    pub(in crate::bench) ok: u64,
    pub(in crate::bench) other: u64,
}

/// Failing binds to `port` (held by a listener) on one reused socket: a bind that fails leaves
/// the socket unbound, so no socket()/close() is needed per attempt, which is what makes
/// 100k+/s possible. Every OK_BIND_EVERY-th attempt (when `ok_binds`) is a successful bind on a
/// fresh socket to 127.0.0.1:0, closed at once: the realistic mix the kernel side must also
/// carry (bind ok + close of a tracked fd).
pub(in crate::bench) fn storm_worker(
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
