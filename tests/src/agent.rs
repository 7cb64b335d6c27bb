//! A running `portwatch run`: its stdout read line by line, as JSON and typed, and the arrival times of chosen records.

use super::*;

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
    /// When each of `records` was read (as `read_at`).
    records_at: Vec<std::time::SystemTime>,
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
        // One thread only reads lines off the pipe and times them; another parses them. A
        // record's arrival is when its line left the pipe, however long the lines before it
        // took to parse (a storm's records can be hundreds of KB each).
        let (tx, rx) = std::sync::mpsc::channel::<(String, std::time::SystemTime)>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((line, std::time::SystemTime::now())).is_err() {
                    break;
                }
            }
        });
        let s2 = shared.clone();
        std::thread::spawn(move || {
            for (line, at) in rx {
                let parsed = serde_json::from_str::<Value>(&line).map(|v| {
                    let typed = match Record::parse(&line) {
                        Ok(r) if !matches!(r.body, Body::Unknown) => Ok(r),
                        Ok(_) => Err(format!("unknown type: {line}")),
                        Err(e) => Err(format!("{e}: {line}")),
                    };
                    (v, typed)
                });
                let (m, cv) = &*s2;
                let mut g = m.lock().unwrap();
                match parsed {
                    Ok((v, typed)) => {
                        g.lines.push(v);
                        g.read_at.push(at);
                        match typed {
                            Ok(r) => {
                                g.records.push(r);
                                g.records_at.push(at);
                            }
                            Err(why) => g.untyped.push(why),
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
        g.records_at.clear();
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

// ---- arrival times ----

/// Records matching a predicate, each with the wall-clock time (CLOCK_REALTIME) at which it
/// reached the test. A latency measured from a timestamp taken in another process (just
/// before its failing syscall) needs the arrival on the same clock, and per line: the
/// records themselves only say when the kernel saw the failure.
pub struct Arrivals<T = Value> {
    got: Arc<Mutex<Vec<(T, std::time::SystemTime)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<(Mutex<Lines>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// `Arrivals`, typed: lines the typed schema cannot read never match.
pub type RecordArrivals = Arrivals<Record>;

type View<T> = fn(&Lines) -> (&[T], &[std::time::SystemTime]);

impl Agent {
    /// Start timing the arrival of every record matching `pred` read from now on (records
    /// already read are not included). The watcher wakes on each line the reader adds, so
    /// the time taken is within microseconds of the line's arrival.
    pub fn watch_arrivals(&self, pred: impl Fn(&Value) -> bool + Send + 'static) -> Arrivals {
        self.watch(|l| (&l.lines, &l.read_at), pred)
    }

    /// `watch_arrivals`, typed: over the records the parser thread already read.
    pub fn watch_record_arrivals(
        &self,
        pred: impl Fn(&Record) -> bool + Send + 'static,
    ) -> RecordArrivals {
        self.watch(|l| (&l.records, &l.records_at), pred)
    }

    fn watch<T: Clone + Send + 'static>(
        &self,
        view: View<T>,
        pred: impl Fn(&T) -> bool + Send + 'static,
    ) -> Arrivals<T> {
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = self.shared.clone();
        let mut seen = view(&shared.0.lock().unwrap()).0.len();
        let thread = std::thread::spawn({
            let (got, stop, shared) = (got.clone(), stop.clone(), shared.clone());
            move || {
                let (m, cv) = &*shared;
                let mut g = m.lock().unwrap();
                loop {
                    let (items, at) = view(&g);
                    // stop_with() takes the lines away at the end: nothing more to time.
                    if items.len() < seen {
                        return;
                    }
                    if items.len() > seen {
                        let mut out = got.lock().unwrap();
                        for (v, at) in items[seen..].iter().zip(&at[seen..]) {
                            if pred(v) {
                                out.push((v.clone(), *at));
                            }
                        }
                        seen = items.len();
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

impl<T: Clone> Arrivals<T> {
    /// What arrived so far: each record with its arrival time.
    pub fn so_far(&self) -> Vec<(T, std::time::SystemTime)> {
        self.got.lock().unwrap().clone()
    }
}

impl<T> Drop for Arrivals<T> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
