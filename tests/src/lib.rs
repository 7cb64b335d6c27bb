//! Helpers for portwatch's end-to-end tests: start the real agent, make real sockets (in
//! real network namespaces), read its JSON. The tests need root and a kernel with BTF and
//! tracepoints; they fail (never skip) when those are missing, because CI runs as root.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

pub use portwatch_schema::{self as schema, Body, Record};
use serde_json::Value;

pub mod docker;
pub mod podman;

pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the end-to-end tests load eBPF programs and need root: run `sudo cargo xtask test`"
    );
}

/// The agent binary: $PORTWATCH_BIN (set by `cargo xtask test`), else the agent built in
/// the same profile as these tests (`cargo test --release` tests target/release/portwatch),
/// so a hand-run suite never silently tests a stale binary of the other profile.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTWATCH_BIN") {
        return PathBuf::from(p);
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(profile)
        .join("portwatch");
    assert!(
        p.exists(),
        "{} not found: build it first (`cargo build{} -p portwatch`; `cargo xtask test` does \
         it all) or set PORTWATCH_BIN",
        p.display(),
        if profile == "release" {
            " --release"
        } else {
            ""
        }
    );
    p
}

#[derive(Default)]
struct Lines {
    lines: Vec<Value>,
    /// The same lines read into the typed schema (the one `tail` and `history` use).
    records: Vec<Record>,
    /// Lines that are JSON but that the typed schema cannot read, with why.
    untyped: Vec<String>,
    /// When each of `lines` was read from the agent's stdout, before any lock: what
    /// latency measurements time (a test thread contending for the lock must not count).
    read_at: Vec<std::time::SystemTime>,
    raw_bad: Vec<String>,
    eof: bool,
}

/// A running `portwatch run`, its stdout parsed line by line.
pub struct Agent {
    child: Child,
    shared: Arc<(Mutex<Lines>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    pub ready: Value,
    runtime_dir: PathBuf,
}

static NEXT_RT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub struct Finished {
    pub lines: Vec<Value>,
    /// `lines`, typed.
    pub records: Vec<Record>,
    pub status: std::process::ExitStatus,
    pub stderr: String,
}

impl Agent {
    /// Start `portwatch run ARGS`. Unless ARGS say otherwise, the agent writes no log file
    /// and gets a runtime directory (control socket, lock) of its own.
    pub fn start(args: &[&str]) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run").args(args);
        if !args
            .iter()
            .any(|a| a.starts_with("--log-file") || *a == "--no-log-file")
        {
            cmd.arg("--no-log-file");
        }
        let rt = if let Some(i) = args.iter().position(|a| *a == "--runtime-dir") {
            PathBuf::from(args[i + 1])
        } else {
            let d = std::env::temp_dir().join(format!(
                "pwtest-rt-{}-{}",
                std::process::id(),
                NEXT_RT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            cmd.arg("--runtime-dir").arg(&d);
            d
        };
        let mut a = Self::start_cmd(&mut cmd);
        a.runtime_dir = rt;
        a
    }

    /// The agent's runtime directory (pass it to attach/ports as --runtime-dir).
    pub fn runtime_dir(&self) -> &std::path::Path {
        &self.runtime_dir
    }

    pub fn start_cmd(cmd: &mut Command) -> Agent {
        require_root();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn portwatch");
        let shared = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let out = child.stdout.take().unwrap();
        let s2 = shared.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let at = std::time::SystemTime::now();
                let (m, cv) = &*s2;
                let mut g = m.lock().unwrap();
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        g.lines.push(v);
                        g.read_at.push(at);
                        match Record::parse(&line) {
                            Ok(r) if !matches!(r.body, Body::Unknown) => g.records.push(r),
                            Ok(_) => g.untyped.push(format!("unknown type: {line}")),
                            Err(e) => g.untyped.push(format!("{e}: {line}")),
                        }
                    }
                    Err(_) => g.raw_bad.push(line),
                }
                cv.notify_all();
            }
            let (m, cv) = &*s2;
            m.lock().unwrap().eof = true;
            cv.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let e2 = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = e2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut a = Agent {
            child,
            shared,
            stderr,
            ready: Value::Null,
            runtime_dir: PathBuf::from("/run/portwatch"),
        };
        a.ready = a
            .try_wait_for(Duration::from_secs(30), |v| {
                v["type"] == "agent" && v["event"] == "ready"
            })
            .unwrap_or_else(|| {
                panic!(
                    "agent did not print its ready line; stderr: {}",
                    a.stderr.lock().unwrap()
                )
            });
        a
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// First record (in order) matching `pred`, waiting up to `timeout`.
    pub fn try_wait_for(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(v) = g.lines.iter().find(|v| pred(v)) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if now >= deadline || g.eof {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// First typed record (in order) matching `pred`, waiting up to 10 s.
    pub fn wait_record(&self, what: &str, pred: impl Fn(&Record) -> bool) -> Record {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(r) = g.records.iter().find(|r| pred(r)) {
                return r.clone();
            }
            let now = Instant::now();
            if now >= deadline || g.eof {
                drop(g);
                panic!(
                    "no record matching {what} within 10 s; got:\n{}\nstderr:\n{}",
                    self.dump(),
                    self.stderr.lock().unwrap()
                );
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// The line `r` was read from, as the agent wrote it: only there is an absent field told
    /// from a null one, or an object's keys counted.
    pub fn raw_line(&self, r: &Record) -> Value {
        self.wait_for("the record's own line", |v| {
            serde_json::from_value::<Record>(v.clone()).is_ok_and(|x| x == *r)
        })
    }

    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_wait_for(Duration::from_secs(10), pred)
            .unwrap_or_else(|| {
                panic!(
                    "no record matching {what} within 10 s; got:\n{}\nstderr:\n{}",
                    self.dump(),
                    self.stderr.lock().unwrap()
                )
            })
    }

    /// Waits until at least `n` records match `pred`; returns them all.
    pub fn wait_count(
        &self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        loop {
            let found: Vec<Value> = g.lines.iter().filter(|v| pred(v)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            if now >= deadline || g.eof {
                drop(g);
                panic!(
                    "{} of {n} records matching {what} within {} s; got:\n{}",
                    found.len(),
                    timeout.as_secs(),
                    self.dump()
                );
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn snapshot(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().lines.clone()
    }

    /// `snapshot`, typed: every record read so far.
    pub fn snapshot_records(&self) -> Vec<Record> {
        self.shared.0.lock().unwrap().records.clone()
    }

    /// The ready record (`ready`), typed.
    pub fn ready_typed(&self) -> schema::Agent {
        let g = self.shared.0.lock().unwrap();
        g.records
            .iter()
            .find_map(|r| r.agent().filter(|a| a.event == schema::AgentEvent::Ready))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "the ready line does not read as a typed record: {:?}",
                    g.untyped
                )
            })
    }

    pub fn dump(&self) -> String {
        self.snapshot()
            .iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGINT (or `sig`), wait for exit; every line the agent wrote.
    pub fn stop_with(mut self, sig: i32) -> Finished {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // Wait for the reader to see EOF so every line is in.
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap();
        while !g.eof {
            g = cv.wait_timeout(g, Duration::from_secs(5)).unwrap().0;
        }
        assert!(
            g.raw_bad.is_empty(),
            "agent wrote lines that are not JSON: {:?}",
            g.raw_bad
        );
        assert!(
            g.untyped.is_empty(),
            "agent wrote lines the typed schema (portwatch-schema) cannot read: {:?}",
            g.untyped
        );
        let lines = std::mem::take(&mut g.lines);
        let records = std::mem::take(&mut g.records);
        g.read_at.clear();
        drop(g);
        Finished {
            lines,
            records,
            status,
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }

    pub fn stop(self) -> Finished {
        self.stop_with(libc::SIGINT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- sockets ----

pub const SOCK_STREAM: i32 = libc::SOCK_STREAM;
pub const SOCK_DGRAM: i32 = libc::SOCK_DGRAM;

pub fn socket(addr: &SocketAddr, ty: i32, reuseaddr: bool) -> OwnedFd {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on an fd we own.
    unsafe {
        let fd = libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        if reuseaddr {
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            );
        }
        OwnedFd::from_raw_fd(fd)
    }
}

pub fn set_v6only(fd: &OwnedFd, on: bool) {
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt on an fd we own.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill one of its variants.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as _;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as _;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as _)
    }
}

pub fn bind(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn listen(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: listen on an fd we own.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn connect(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of the given length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// bind() and listen() through io_uring (IORING_OP_BIND / IORING_OP_LISTEN, Linux 6.11+):
/// no bind or listen syscall is made, the kernel's socket layer is reached from
/// io_uring_enter (or an io-wq worker thread of this process).
pub mod uring {
    use std::{net::SocketAddr, os::fd::AsRawFd, os::fd::OwnedFd};

    use io_uring::{opcode, types, IoUring};

    fn submit_one(entry: io_uring::squeue::Entry) -> std::io::Result<()> {
        let mut ring = IoUring::new(4)?;
        // SAFETY: the entry's pointers (the sockaddr) outlive the wait below.
        unsafe { ring.submission().push(&entry.user_data(7)) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| std::io::Error::other("io_uring: no completion"))?;
        if cqe.result() < 0 {
            return Err(std::io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    pub fn bind(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
        let (ss, len) = super::sockaddr(addr);
        let e = opcode::Bind::new(
            types::Fd(fd.as_raw_fd()),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
        .build();
        submit_one(e)
    }

    pub fn listen(fd: &OwnedFd) -> std::io::Result<()> {
        submit_one(opcode::Listen::new(types::Fd(fd.as_raw_fd()), 128).build())
    }
}

/// A held listener: bound and listening.
pub fn listener(addr: &str) -> OwnedFd {
    let a: SocketAddr = addr.parse().unwrap();
    let fd = socket(&a, SOCK_STREAM, false);
    bind(&fd, &a).unwrap_or_else(|e| panic!("holder bind {addr}: {e}"));
    listen(&fd).unwrap();
    fd
}

pub fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

pub fn netns_inode_of(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

pub fn host_netns() -> u64 {
    netns_inode_of("/proc/self/ns/net")
}

/// A port no test shares: tests run one at a time, but a leftover TIME_WAIT from an
/// earlier run must not make a bind fail unexpectedly.
pub fn test_port(offset: u16) -> u16 {
    // Below the ephemeral range (32768+), where client sockets of the churn tests live.
    let base = 10000 + (std::process::id() % 2000) as u16 * 10;
    base + offset
}

/// A TCP port that is free on 0.0.0.0 and [::] right now, below the ephemeral range: ports
/// that a daemon binds with SO_REUSEADDR (docker-proxy, dockerd) still fail on another
/// process's client-side TIME_WAIT, which a busy host leaves all over the ephemeral range.
pub fn free_port(offset: u16) -> u16 {
    let mut p = 10000 + (std::process::id() % 1000) as u16 * 20 + offset;
    for _ in 0..40 {
        let free = ["0.0.0.0", "[::]"].iter().all(|ip| {
            let a: SocketAddr = format!("{ip}:{p}").parse().unwrap();
            let s = socket(&a, SOCK_STREAM, false);
            if a.is_ipv6() {
                set_v6only(&s, true);
            }
            bind(&s, &a).is_ok()
        });
        if free {
            return p;
        }
        p = 10000 + (p - 10000 + 997) % 22000;
    }
    panic!("no free TCP port found below 32000");
}

// ---- network namespaces ----

/// `ip netns add` with Drop cleanup; loopback brought up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("pwtest-{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name} failed");
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        NetNs { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// The inode as records carry it (`netns` is a u32 there).
    pub fn inode32(&self) -> u32 {
        u32::try_from(self.inode()).expect("namespace inodes fit in 32 bits")
    }

    pub fn inode(&self) -> u64 {
        netns_inode_of(&self.path())
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created there belong
    /// to it, and the kernel sees that thread's tid as the actor.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let f2 = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only.
            let rc = unsafe { libc::setns(f2.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "sysctl {key}={value} in {}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Records of one type for one port.
pub fn of_type<'a>(lines: &'a [Value], ty: &str, port: u16) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["type"] == ty && v["port"] == port)
        .collect()
}

/// The `port` at a record's top level, for the types that have one (what `of_type` matches).
pub fn port_of(r: &Record) -> Option<u16> {
    match &r.body {
        Body::Conflict(c) => Some(c.port),
        Body::Port(p) => Some(p.port),
        Body::Bind(s) | Body::Listen(s) | Body::Connect(s) | Body::Close(s) => Some(s.port),
        Body::TcpState(t) => Some(t.port),
        Body::Pressure(p) => Some(p.port),
        _ => None,
    }
}

/// `of_type`, typed: records of one type for one port.
pub fn records_of(records: &[Record], ty: schema::Type, port: u16) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| r.ty() == ty && port_of(r) == Some(port))
        .collect()
}

pub fn assert_rfc3339(ts: &Value) {
    let s = ts.as_str().expect("ts is a string");
    // 2026-11-25T08:31:31.123456789Z
    let ok = s.len() >= 27
        && s.ends_with('Z')
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && (6..=9).contains(&(s.len() - 21))
        && s[20..s.len() - 1].bytes().all(|b| b.is_ascii_digit());
    assert!(
        ok,
        "ts {s:?} is not RFC 3339 UTC with 6-9 fractional digits"
    );
}

/// A holder process (`pw-hold`), optionally inside a network namespace. Killed on drop.
pub struct Holder {
    child: Child,
}

impl Holder {
    pub fn start(bin: &str, mode: &str, addr: &str, netns: Option<&NetNs>) -> Holder {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, bin]);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args([mode, addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pw-hold");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "pw-hold {mode} {addr} failed");
        Holder { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- arrival times ----

/// Records matching a predicate, each with the wall-clock time (CLOCK_REALTIME) at which it
/// reached the test. A latency measured from a timestamp taken in another process (just
/// before its failing syscall) needs the arrival on the same clock, and per line: the
/// records themselves only say when the kernel saw the failure.
pub struct Arrivals {
    got: Arc<Mutex<Vec<(Value, std::time::SystemTime)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<(Mutex<Lines>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    /// Start timing the arrival of every record matching `pred` read from now on (records
    /// already read are not included). The watcher wakes on each line the reader adds, so
    /// the time taken is within microseconds of the line's arrival.
    pub fn watch_arrivals(&self, pred: impl Fn(&Value) -> bool + Send + 'static) -> Arrivals {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = self.shared.clone();
        let mut seen = shared.0.lock().unwrap().lines.len();
        let thread = std::thread::spawn({
            let (got, stop, shared) = (got.clone(), stop.clone(), shared.clone());
            move || {
                let (m, cv) = &*shared;
                let mut g = m.lock().unwrap();
                loop {
                    // stop_with() takes the lines away at the end: nothing more to time.
                    if g.lines.len() < seen {
                        return;
                    }
                    if g.lines.len() > seen {
                        let mut out = got.lock().unwrap();
                        for (v, at) in g.lines[seen..].iter().zip(&g.read_at[seen..]) {
                            if pred(v) {
                                out.push((v.clone(), *at));
                            }
                        }
                        seen = g.lines.len();
                    }
                    if g.eof || stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    g = cv.wait_timeout(g, Duration::from_millis(100)).unwrap().0;
                }
            }
        });
        Arrivals {
            got,
            stop,
            shared,
            thread: Some(thread),
        }
    }
}

impl Arrivals {
    /// What arrived so far: each record with its arrival time.
    pub fn so_far(&self) -> Vec<(Value, std::time::SystemTime)> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `Arrivals`, typed.
pub struct RecordArrivals(Arrivals);

impl Agent {
    /// `watch_arrivals`, typed: lines the typed schema cannot read never match.
    pub fn watch_record_arrivals(
        &self,
        pred: impl Fn(&Record) -> bool + Send + 'static,
    ) -> RecordArrivals {
        RecordArrivals(self.watch_arrivals(move |v| {
            serde_json::from_value::<Record>(v.clone()).is_ok_and(|r| pred(&r))
        }))
    }
}

impl RecordArrivals {
    /// What arrived so far: each record with its arrival time.
    pub fn so_far(&self) -> Vec<(Record, std::time::SystemTime)> {
        self.0
            .so_far()
            .into_iter()
            .map(|(v, at)| {
                let r = serde_json::from_value(v).expect("it was read as a record when it matched");
                (r, at)
            })
            .collect()
    }
}

// ---- typed records read from text ----

/// Every line of `text` read into the typed schema: a log file, or the output of
/// `portwatch attach --json` or `tail --json` (agent records, one per line). A line that does
/// not read, or is of a type the schema does not know, fails the test, as it does on stdout.
pub fn records_in(text: &[u8]) -> Vec<Record> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|l| match Record::parse(l) {
            Ok(r) if !matches!(r.body, Body::Unknown) => r,
            Ok(_) => panic!("a record of a type the typed schema does not know: {l}"),
            Err(e) => panic!("not a record of the typed schema ({e}): {l}"),
        })
        .collect()
}

/// `records_in` of a file the agent wrote (its log).
pub fn log_records(path: &std::path::Path) -> Vec<Record> {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    records_in(&text)
}

/// One line of an attach stream (the control socket's answer to `{"cmd":"attach"}`): an
/// agent record, or the attach protocol's own error line (`{"error": ...}`, no `type`), which
/// is no record and stays JSON.
#[derive(Debug)]
pub enum AttachLine {
    Record(Box<Record>),
    Error(Value),
}

/// Reads one attach line; a line that is neither a record nor an error line fails the test.
pub fn attach_line(line: &str) -> AttachLine {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("attach line is not JSON ({e}): {line}"));
    if v.get("type").is_none() && v["error"].is_string() {
        return AttachLine::Error(v);
    }
    let mut r = records_in(line.as_bytes());
    assert_eq!(r.len(), 1, "one record per attach line: {line}");
    AttachLine::Record(Box::new(r.remove(0)))
}

/// The record is a conflict on `port`.
pub fn is_conflict_on(r: &Record, port: u16) -> bool {
    r.conflict().is_some_and(|c| c.port == port)
}

/// The record is the agent's own `event`.
pub fn is_agent_event(r: &Record, event: schema::AgentEvent) -> bool {
    r.agent().is_some_and(|a| a.event == event)
}
