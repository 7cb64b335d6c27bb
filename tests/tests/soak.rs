//! The agent under mixed churn for ten minutes (PORTWATCH_SOAK_SECS): its memory must stay
//! flat. Reports the growth in MB per hour, and, from the agent's `status`, what grew with
//! it: the heap in use (a collection) or only RSS (memory the allocator holds).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use portwatch_tests::*;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// The agent's `status` over its control socket.
fn status(agent: &Agent) -> serde_json::Value {
    let mut s = UnixStream::connect(agent.runtime_dir().join("portwatch.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// What the agent holds, from `status`, for the report.
struct Held {
    table: u64,
    heap_kb: u64,
    window: u64,
}

impl Held {
    fn of(agent: &Agent) -> Held {
        let v = status(agent);
        Held {
            table: v["table_size"].as_u64().unwrap_or(0),
            heap_kb: v["heap"]["in_use_kb"].as_u64().unwrap_or(0),
            window: v["window"]["items"].as_u64().unwrap_or(0),
        }
    }
}

/// The lowest RSS over `n` samples 5 s apart, and the highest. A single sample can land on
/// a reconciliation, whose snapshot buffers live for a moment and are returned right after;
/// the floor is what stays.
fn rss_over(pid: u32, n: usize) -> (u64, u64) {
    let (mut lo, mut hi) = (u64::MAX, 0);
    for i in 0..n {
        if i > 0 {
            std::thread::sleep(Duration::from_secs(5));
        }
        let r = rss_kb(pid);
        lo = lo.min(r);
        hi = hi.max(r);
    }
    (lo, hi)
}

#[test]
fn memory_stays_flat_under_mixed_churn() {
    let secs: u64 = std::env::var("PORTWATCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    assert!(secs >= 60, "a soak shorter than a minute says nothing");
    let agent = Agent::start(&["--tw-interval", "5"]);
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(AtomicU64::new(0));
    let port = test_port(51);
    let addr = format!("127.0.0.1:{port}");
    let l = TcpListener::bind(&addr).unwrap();
    let mut workers = Vec::new();
    // Connection churn, about 1k/s: TIME_WAIT entries, state changes.
    {
        let (stop, conns, addr) = (stop.clone(), conns.clone(), addr.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..100 {
                    if let Ok(c) = TcpStream::connect(&addr) {
                        if let Ok((s, _)) = l.accept() {
                            drop(c);
                            drop(s);
                            conns.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }));
    }
    // Conflicts, successful binds and closes, UDP, and short-lived holder processes.
    {
        let stop = stop.clone();
        workers.push(std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                let s = socket(&a, SOCK_STREAM, false);
                let _ = bind(&s, &a); // EADDRINUSE: a conflict
                let b: SocketAddr = format!("127.0.0.1:{}", 31000 + (i % 500)).parse().unwrap();
                let u = socket(&b, SOCK_DGRAM, false);
                let _ = bind(&u, &b);
                drop((s, u));
                if i.is_multiple_of(20) {
                    let h = Holder::start(
                        env!("CARGO_BIN_EXE_pw-hold"),
                        "tcp-bind",
                        &format!("127.0.0.1:{}", 31600 + (i % 300)),
                        None,
                    );
                    drop(h);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        }));
    }
    let t0 = Instant::now();
    let warm = Duration::from_secs((secs / 5).max(30));
    std::thread::sleep(warm);
    // Start and end are each the floor of 30 s of samples (see rss_over).
    let held_start = Held::of(&agent);
    let (rss_start, mut peak) = rss_over(agent.pid(), 6);
    let end_from = Duration::from_secs(secs).saturating_sub(Duration::from_secs(25));
    while t0.elapsed() < end_from {
        std::thread::sleep(Duration::from_secs(5));
        peak = peak.max(rss_kb(agent.pid()));
    }
    let (rss_end, hi) = rss_over(agent.pid(), 6);
    peak = peak.max(hi);
    let held_end = Held::of(&agent);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let span_h = (t0.elapsed() - warm).as_secs_f64() / 3600.0;
    let growth_mb = (rss_end as f64 - rss_start as f64) / 1024.0;
    let per_hour = growth_mb / span_h;
    let done = agent.stop();
    // Identical failures are coalesced: each record stands for `count` of them.
    let conflicts: u64 = done
        .records
        .iter()
        .filter_map(Record::conflict)
        .map(|c| c.count)
        .sum();
    eprintln!(
        "soak {secs} s: {} connections, {conflicts} conflicts; RSS after warm-up {:.1} MB, at end {:.1} MB, peak {:.1} MB; growth {growth_mb:.2} MB = {per_hour:.2} MB/h",
        conns.load(Ordering::Relaxed),
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let mb = |kb: u64| kb as f64 / 1024.0;
    let held = format!(
        "heap in use {:.1} -> {:.1} MB, port table {} -> {} entries, attach window {} -> {} \
         items",
        mb(held_start.heap_kb),
        mb(held_end.heap_kb),
        held_start.table,
        held_end.table,
        held_start.window,
        held_end.window
    );
    eprintln!("soak: {held}");
    assert!(done.status.success());
    assert!(conflicts > 1000, "the churn made conflicts");
    // Flat: under 4 MB of growth after warm-up (bounded caches fill during warm-up).
    let heap_growth_mb = mb(held_end.heap_kb) - mb(held_start.heap_kb);
    let what = if heap_growth_mb > growth_mb / 2.0 {
        "the heap in use grew with it: a collection is growing (see the port table and the \
         window above)"
    } else {
        "the heap in use did not: the allocator holds memory that was freed (fragmentation)"
    };
    assert!(
        growth_mb < 4.0,
        "RSS grew {growth_mb:.2} MB ({per_hour:.2} MB/h) after warm-up; {what}; {held}"
    );
}
