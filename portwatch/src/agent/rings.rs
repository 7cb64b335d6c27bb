//! The ring-buffer side of `run`: draining both rings into the bounded queue in batches,
//! the event loop that wakes for them, and the loss counters.

use super::*;

/// Largest batch: one queue slot carries up to this many events.
pub(super) const BATCH: usize = 256;

/// How often events submitted without a wakeup are collected.
pub(super) const DRAIN_MS: u64 = 50;

/// Queue slots the storm ring leaves free: at most 64 of its batches (a few ms of work)
/// wait ahead of a
/// prompt event.
pub(super) const BULK_ROOM: usize = QUEUE - 64;

/// Events lost since the last `lost` record: the kernel's (ring buffer full, or runs the
/// kernel skipped) and the agent's (queue full).
pub(super) struct LostCounter {
    pub(super) agent: Arc<[AtomicU64; KINDS]>,
    pub(super) last_kernel: [u64; KINDS],
    pub(super) last_agent: [u64; KINDS],
}

impl Default for LostCounter {
    fn default() -> Self {
        LostCounter {
            agent: Arc::new(Default::default()),
            last_kernel: [0; KINDS],
            last_agent: [0; KINDS],
        }
    }
}

impl LostCounter {
    pub(super) fn check(&mut self, probes: &probes::Probes) -> Option<Msg> {
        let full = probes.lost_counts();
        let skipped = probes.skipped_counts();
        let k: [u64; KINDS] = std::array::from_fn(|i| full[i] + skipped[i]);
        let a: [u64; KINDS] = std::array::from_fn(|i| self.agent[i].load(Ordering::Relaxed));
        let dk: [u64; KINDS] = std::array::from_fn(|i| k[i].saturating_sub(self.last_kernel[i]));
        let da: [u64; KINDS] = std::array::from_fn(|i| a[i] - self.last_agent[i]);
        self.last_kernel = k;
        self.last_agent = a;
        (dk.iter().chain(da.iter()).any(|&x| x > 0)).then_some(Msg::Lost {
            kernel: dk,
            agent: da,
        })
    }
}

/// The two ring buffers (prompt events, and the storm ring read with most of the queue
/// kept free) and the batches being gathered from each.
pub(super) struct Rings {
    pub(super) ring: AsyncFd<RingBuf<MapData>>,
    pub(super) bulk: RingBuf<MapData>,
    pub(super) scratch: Vec<Event>,
    pub(super) bulk_scratch: Vec<Event>,
    /// The storm ring still held events when its last drain stopped.
    pub(super) bulk_left: bool,
}

impl Rings {
    pub(super) fn new(ring: RingBuf<MapData>, bulk: RingBuf<MapData>) -> Result<Rings> {
        // SAFETY: the ring buffer's fd stays open for as long as the AsyncFd owns it, and it
        // is only used for readiness (epoll), never read or closed behind tokio's back.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io {
                what: "registering the ring buffer with the event loop",
                source: e.into_parts().1,
            })?;
        Ok(Rings {
            ring,
            bulk,
            scratch: Vec::new(),
            bulk_scratch: Vec::new(),
            bulk_left: false,
        })
    }

    pub(super) fn drain_bulk(&mut self, tx: &mpsc::Sender<Msg>) {
        self.bulk_left = drain(&mut self.bulk, tx, &mut self.bulk_scratch, BULK_ROOM);
    }

    pub(super) fn drain_both(&mut self, tx: &mpsc::Sender<Msg>) {
        drain(self.ring.get_mut(), tx, &mut self.scratch, 0);
        self.drain_bulk(tx);
    }

    /// At stop, after the programs are gone: everything left goes to the processing thread
    /// within DRAIN_AT_STOP, and what cannot is counted as lost, never silent.
    pub(super) async fn drain_at_stop(
        &mut self,
        tx: &mpsc::Sender<Msg>,
        lost: &[AtomicU64; KINDS],
    ) {
        const DRAIN_AT_STOP: Duration = Duration::from_millis(200);
        let give_up = tokio::time::Instant::now() + DRAIN_AT_STOP;
        while drain(self.ring.get_mut(), tx, &mut self.scratch, 0)
            | drain(&mut self.bulk, tx, &mut self.bulk_scratch, 0)
        {
            if tokio::time::Instant::now() >= give_up {
                let lose = |ev: &Event| {
                    lost[(ev.kind as usize).min(KINDS - 1)].fetch_add(1, Ordering::Relaxed);
                };
                self.scratch
                    .drain(..)
                    .chain(self.bulk_scratch.drain(..))
                    .for_each(|ev| lose(&ev));
                for r in [self.ring.get_mut(), &mut self.bulk] {
                    while let Some(item) = r.next() {
                        if let Some(ev) = decode::event_from_bytes(&item) {
                            lose(&ev);
                        }
                    }
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The event loop: drain the rings (on wakeup, and every DRAIN_MS for events submitted
/// without one), count losses, turn the state hook on while clients are attached, reopen
/// the log on SIGHUP; returns on SIGINT or SIGTERM.
pub(super) async fn watch(
    args: &RunArgs,
    probes: &mut probes::Probes,
    rings: &mut Rings,
    lost: &mut LostCounter,
    tx: &mpsc::Sender<Msg>,
    attach_clients: &std::sync::atomic::AtomicUsize,
    signals: [&mut tokio::signal::unix::Signal; 3],
) -> Result<()> {
    let mut lost_tick = tokio::time::interval(Duration::from_millis(args.lost_interval_ms));
    lost_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Events that need no prompt handling are submitted without a wakeup (see the kernel
    // side's emit()); this tick collects them.
    let mut drain_tick = tokio::time::interval(Duration::from_millis(DRAIN_MS));
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state_hook_failed = false;
    let [sigint, sigterm, sighup] = signals;
    loop {
        tokio::select! {
            _ = drain_tick.tick() => {
                rings.drain_both(tx);
                // Coalescing windows and held conflicts are timed on the processing thread;
                // a full queue means it is busy, and the next tick will do.
                let _ = tx.try_send(Msg::Tick);
                // Default mode: TCP state changes only while someone attached wants the
                // live detail (see probes::load).
                if !args.all_events && !state_hook_failed {
                    let want = attach_clients.load(Ordering::Relaxed) > 0;
                    if let Err(e) = probes.set_state_hook(want) {
                        eprintln!(
                            "portwatch: warning: attaching clients get no tcp_state records: {e}"
                        );
                        state_hook_failed = true;
                    }
                }
            }
            guard = rings.ring.readable_mut() => {
                let mut guard = guard.map_err(|source| Error::Io { what: "waiting on the ring buffer", source })?;
                drain(guard.get_inner_mut(), tx, &mut rings.scratch, 0);
                guard.clear_ready();
                // Field by field: the guard still borrows the prompt ring.
                rings.bulk_left = drain(&mut rings.bulk, tx, &mut rings.bulk_scratch, BULK_ROOM);
            }
            _ = tokio::time::sleep(Duration::from_millis(1)), if rings.bulk_left => {
                rings.drain_bulk(tx);
            }
            _ = lost_tick.tick() => {
                if let Some(m) = lost.check(probes) { let _ = tx.send(m).await; }
            }
            _ = sighup.recv() => { let _ = tx.send(Msg::Reopen).await; }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    Ok(())
}

/// Decode only; never block. Events go to the processing thread in batches (one wakeup of
/// that thread per batch, not per event). When its queue is full, draining stops and the
/// rest waits in the kernel's ring buffer (several MB) until the next drain: a burst of
/// conflicts, each woken on its own and so each a tiny batch, would otherwise overflow the
/// queue long before the ring. Only a full ring loses events, and the kernel counts those
/// exactly. Returns true when events were left behind for that reason.
///
/// `keep_free`: stop (returning true) while fewer queue slots than that are free. The
/// storm ring is read with most of the queue kept free, so that its backlog waits in the
/// kernel rather than in front of the next prompt event, and read again a millisecond later.
pub(super) fn drain(
    ring: &mut RingBuf<MapData>,
    tx: &mpsc::Sender<Msg>,
    scratch: &mut Vec<Event>,
    keep_free: usize,
) -> bool {
    // Events are gathered in `scratch` (kept across calls) and each batch is sent as an
    // exact-size copy: most wakeups find a few events, and a full-size buffer per wakeup
    // made every queued batch cost 32 KiB whatever it held. While the processing thread is
    // busy with a large reconciliation the queue fills up with them (8 MB of mostly empty
    // batches at the heap's peak in a soak), all freed again moments later.
    // A batch the queue refused stays in `scratch` and goes first next time.
    let flush = |batch: &mut Vec<Event>| -> bool {
        if batch.is_empty() {
            return true;
        }
        match tx.try_send(Msg::Events(batch.as_slice().to_vec())) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                batch.clear();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => false,
        }
    };
    if scratch.len() >= BATCH && !flush(scratch) {
        return true;
    }
    loop {
        if tx.capacity() < keep_free {
            return true;
        }
        let Some(item) = ring.next() else {
            break;
        };
        let Some(e) = decode::event_from_bytes(&item) else {
            continue;
        };
        drop(item);
        if scratch.capacity() == 0 {
            scratch.reserve_exact(BATCH);
        }
        scratch.push(e);
        if scratch.len() >= BATCH && !flush(scratch) {
            return true;
        }
    }
    !flush(scratch)
}
