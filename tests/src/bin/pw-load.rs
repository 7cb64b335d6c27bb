//! Load for `cargo xtask vm-bench`, run inside the guest (and usable by hand):
//!
//!   pw-load syscall N        N getppid() calls in ten slices; prints the nanoseconds per
//!                            call of the fastest slice and of all: "BEST|MEAN"
//!   pw-load churn SECS       loopback TCP connections for SECS seconds, each connected,
//!                            accepted and closed (client first); prints connections/s over
//!                            the whole time and in the fastest second, and the connects
//!                            that failed: "MEAN|BEST|FAILED"
//!   pw-load churn-n N        exactly N such connections, the server closing only after
//!                            it saw the client's FIN: N TIME_WAIT sockets; prints the count
//!
//! One thread, nothing else running: what it measures is what the kernel (and any tracer
//! in it) costs per call. The fastest slice is what a host that steals time from its guests
//! (or other work on it) disturbed least: interference only ever slows a slice down.

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

fn usage() -> ! {
    eprintln!("usage: pw-load syscall N | churn SECS | churn-n N");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, n) = match args.as_slice() {
        [m, n] => (m.as_str(), n.parse::<u64>().unwrap_or_else(|_| usage())),
        _ => usage(),
    };
    match mode {
        "syscall" => {
            let slice = (n / 10).max(1);
            let mut best = f64::INFINITY;
            let t = Instant::now();
            for _ in 0..10 {
                let ts = Instant::now();
                for _ in 0..slice {
                    // SAFETY: getppid has no preconditions.
                    std::hint::black_box(unsafe { libc::syscall(libc::SYS_getppid) });
                }
                best = best.min(ts.elapsed().as_nanos() as f64 / slice as f64);
            }
            let mean = t.elapsed().as_nanos() as f64 / (slice * 10) as f64;
            println!("{best:.1}|{mean:.1}");
        }
        "churn" => {
            let (l, addr) = server();
            let t = Instant::now();
            let mut done = 0u64;
            let mut failed = 0u64;
            let mut best = 0u64;
            for _ in 0..n {
                let second = Instant::now() + Duration::from_secs(1);
                let mut in_second = 0u64;
                while Instant::now() < second {
                    match TcpStream::connect(addr) {
                        Ok(c) => {
                            let (s, _) = l.accept().expect("accept");
                            drop(c);
                            drop(s);
                            in_second += 1;
                        }
                        // Local ports all in TIME_WAIT toward the server: wait, count it.
                        Err(_) => {
                            failed += 1;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                done += in_second;
                best = best.max(in_second);
            }
            let rate = done as f64 / t.elapsed().as_secs_f64();
            println!("{rate:.1}|{best}|{failed}");
        }
        "churn-n" => {
            let (l, addr) = server();
            for _ in 0..n {
                let c = TcpStream::connect(addr).expect("connect");
                let (mut s, _) = l.accept().expect("accept");
                drop(c);
                let _ = s.read(&mut [0u8; 1]);
                drop(s);
            }
            println!("{n}");
        }
        _ => usage(),
    }
}

fn server() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let addr = l.local_addr().expect("local_addr");
    (l, addr)
}
