//! The clients on the agent's control socket: attached readers that read everything, and
//! one that never reads until asked how many records it missed.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::bench::{cpu::thread_cpu_seconds, stats::json_u64, ATTACH_READERS};

/// What the agent sends a client that could not take some records, once it can take one.
const MISSED_PREFIX: &[u8] = b"{\"v\":1,\"type\":\"missed\"";

#[derive(Default)]
pub(in crate::bench) struct ReaderCount {
    pub(in crate::bench) lines: u64,
    pub(in crate::bench) missed: u64,
    /// The reading thread's own CPU time and how long it ran (connect to EOF).
    pub(in crate::bench) cpu_s: f64,
    pub(in crate::bench) ran_s: f64,
}

/// Clients on the agent's control socket: ATTACH_READERS that read everything, and one that
/// sends the attach request and then reads nothing. An attached client gets every event as a
/// record (the live detail), not only conflicts: under the background churn that is tens of
/// thousands of lines a second per client, so the stalled one falls behind within a second.
pub(in crate::bench) struct AttachClients {
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
    pub(in crate::bench) fn connect(sock: &Path) -> Result<AttachClients> {
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
    pub(in crate::bench) fn stalled_missed(&self, limit: Duration) -> Option<u64> {
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
    pub(in crate::bench) fn finish(self) -> Vec<ReaderCount> {
        drop(self.stalled);
        self.readers
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    }
}
