//! The sock_diag thread: the start-up pass over every namespace, the periodic
//! reconciliation and TIME_WAIT summary, and namespace re-reads asked for by conflicts.

use super::*;

pub(super) fn diag_loop(
    tx: mpsc::Sender<Msg>,
    requests: std::sync::mpsc::Receiver<process::FreshRequest>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    first: tokio::sync::oneshot::Sender<()>,
    tw_counts: Option<probes::TimeWaitCounts>,
) {
    let mut last_dump: std::collections::HashMap<u32, Instant> = Default::default();
    let mut first = Some(first);
    loop {
        if first.is_none() {
            // The last pass's snapshots were reconciled and freed seconds ago: give the pages
            // back before this pass allocates again.
            heap::trim();
        }
        let wall_ns = Clock::now_wall_ns();
        // Start-up waits for this pass, so it may use every core; later passes run beside
        // the host's own work and take one.
        let threads = if first.is_some() {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
        } else {
            1
        };
        let owners = Arc::new(diag::socket_owners_on(threads));
        let namespaces = diag::namespaces();
        let live: Vec<u32> = namespaces.iter().map(|n| n.inode).collect();
        for ns in namespaces {
            // The snapshot is built here, off the processing thread, as the dump is read. It is
            // stamped when this namespace's dump begins, not the pass: the pass first scans
            // every process's fds, which on a slow host takes long enough that TIME_WAIT
            // ages measured against the pass's start counted sockets in two records.
            let builder = SnapshotBuilder::new(
                ns.inode,
                owners.clone(),
                first.is_none(),
                Clock::now_wall_ns(),
            );
            let builder = match diag::dump_into(&ns, builder) {
                Ok(b) => b,
                // Its last process just exited: the namespace is gone, nothing to report.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    eprintln!("portwatch: warning: {e}; the port table may miss that namespace");
                    continue;
                }
            };
            let port_range = diag::local_port_range(&ns).ok();
            let mut snap = builder.finish(ns, port_range);
            snap.owners_ns = wall_ns;
            snap.tw_events = tw_counts.as_ref().map(|c| c.get(snap.ns.inode));
            if tx.blocking_send(Msg::Snapshot(Box::new(snap))).is_err() {
                return;
            }
        }
        if tx
            .blocking_send(Msg::Namespaces {
                live,
                as_of: wall_ns,
            })
            .is_err()
        {
            return;
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match requests.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => {
                    if !serve_fresh(r, &requests, &tx, &mut last_dump, &stop) {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Dumps of one namespace for conflicts are at least this far apart: a storm of conflicts in
/// a namespace costs at most this many dumps a second, however many ask.
pub(super) const FRESH_MIN_GAP: Duration = Duration::from_millis(250);

/// Serve re-read requests: everything queued is merged per namespace first, then each
/// namespace is dumped once (waiting out FRESH_MIN_GAP since its last dump). Returns false
/// when the processing thread is gone.
pub(super) fn serve_fresh(
    first: process::FreshRequest,
    requests: &std::sync::mpsc::Receiver<process::FreshRequest>,
    tx: &mpsc::Sender<Msg>,
    last_dump: &mut std::collections::HashMap<u32, Instant>,
    stop: &AtomicBool,
) -> bool {
    let mut queue: Vec<process::FreshRequest> = vec![first];
    let merge = |queue: &mut Vec<process::FreshRequest>, r: process::FreshRequest| match queue
        .iter_mut()
        .find(|q| q.ns.inode == r.ns.inode)
    {
        Some(q) => q.merge(r),
        None => queue.push(r),
    };
    while let Ok(r) = requests.try_recv() {
        merge(&mut queue, r);
    }
    while !queue.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        // The namespace whose gap is over first.
        let ready_at = |r: &process::FreshRequest| {
            last_dump
                .get(&r.ns.inode)
                .map_or_else(Instant::now, |t| *t + FRESH_MIN_GAP)
        };
        let (i, at) = queue
            .iter()
            .enumerate()
            .map(|(i, r)| (i, ready_at(r)))
            .min_by_key(|(_, at)| *at)
            .expect("queue is not empty");
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait.min(Duration::from_millis(50)));
            while let Ok(r) = requests.try_recv() {
                merge(&mut queue, r);
            }
            continue;
        }
        let r = queue.swap_remove(i);
        last_dump.insert(r.ns.inode, Instant::now());
        let fresh = fresh_read(r);
        if tx.blocking_send(Msg::Fresh(Box::new(fresh))).is_err() {
            return false;
        }
        while let Ok(r) = requests.try_recv() {
            merge(&mut queue, r);
        }
    }
    true
}

/// One re-read: the namespace's sockets (with owners when asked) and the port counts.
pub(super) fn fresh_read(r: process::FreshRequest) -> process::Fresh {
    let as_of = Clock::now_wall_ns();
    let netns = r.ns.inode;
    let dsts = r.dsts.clone();
    let dumped = diag::dump_with_sources(&r.ns, dsts.clone())
        .map(|d| (r.ns, d))
        .or_else(|first| {
            // The thread whose path was given may be gone; the namespace may not be. The inode
            // is checked on the way in, so a reused path cannot lead elsewhere.
            match r.alt {
                Some(path) => {
                    let alt = diag::Namespace { inode: netns, path };
                    diag::dump_with_sources(&alt, dsts).map(|d| (alt, d))
                }
                None => Err(first),
            }
        });
    let (
        ns,
        diag::NsRead {
            entries,
            range,
            no_source,
        },
    ) = match dumped {
        Ok(x) => x,
        Err(e) => {
            return process::Fresh {
                netns,
                as_of,
                result: Err(format!("sock_diag dump failed: {e}")),
            }
        }
    };
    let counts = process::count_toward(&entries, &r.dsts);
    let snapshot = r.sockets.then(|| {
        // Owners of sockets the table did not know: one /proc walk, only on this miss path.
        let owners = Arc::new(diag::socket_owners());
        Box::new(process::Snapshot::new(
            ns, &entries, owners, None, false, as_of,
        ))
    });
    process::Fresh {
        netns,
        as_of,
        result: Ok(process::FreshData {
            snapshot,
            counts,
            range,
            no_source,
        }),
    }
}
