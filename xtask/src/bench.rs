//! `cargo xtask bench`: side-by-side benchmarks of the release agent, in one run.
//!
//! 1. Loopback TCP churn (connect/accept/close) with no tracer, portwatch (default and
//!    `--all-events`), an equivalent bpftrace script and libbpf-tools' tcpstates, interleaved
//!    over rounds so that drift on a noisy machine hits every configuration alike.
//!    1b. The same configurations at several offered (paced) churn rates: achieved throughput
//!    and tracer CPU against offered rate.
//! 2. Bind storm: failing binds at controlled rates; every generated failure must come out
//!    in a conflict record's `count` or be counted in a `lost` record.
//!    2b. Exhaustion storm (bench/exhaustion.rs): connect() failing with EADDRNOTAVAIL at max
//!    rate in a namespace with every ephemeral port taken, against the latency of an
//!    unrelated conflict on the host, the agent's CPU, the accounting and the time from
//!    SIGTERM to exit.
//! 3. Latency from a failing bind to its conflict line on the agent's stdout: with nothing
//!    attached, and with ten clients on the control socket, one of which never reads.
//! 4. The agent's own cost: CPU, peak RSS, time to ready.
//!
//! Results go to target/bench/results.md (printed too), target/bench/churn.png (the sweep:
//! throughput against churn rate per tracer) and target/bench/churn-max.png (the max-rate
//! rounds).
//!
//! Load generators call libc directly on pre-built socket addresses: no allocation and no
//! std wrappers in the measured loops, so the generator itself costs as little as possible and
//! the same in every configuration. Every child process is owned by a guard that stops it
//! (SIGINT, then SIGKILL) when dropped, and is also told by the kernel (PR_SET_PDEATHSIG) if
//! this process dies without unwinding.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod exhaustion;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Seconds of measurement per configuration (churn rounds, each bind-storm rate, the cost
    /// runs). Default 10, or 3 with --quick. Each point of the churn rate sweep gets half of
    /// it (5 s, or 1 s with --quick).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=600))]
    duration: Option<u64>,
    /// Smoke run: 3 s per configuration, a single churn round, and a sweep of 3 rates
    /// (5k, 15k and max conn/s) at 1 s each.
    #[arg(long)]
    quick: bool,
    /// Interleaved churn rounds (default 3, or 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: Option<u32>,
    /// Client threads of the churn load generator.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..=16))]
    clients: u32,
    /// Keep the tracers' output files in target/bench/ (they can reach hundreds of MB each).
    #[arg(long)]
    keep_logs: bool,
    /// Run only these parts (repeatable; default: all): churn (1, max rate), sweep (1b,
    /// achieved against offered churn rate, churn.png), storm (2, failing binds, and 2b,
    /// ephemeral port exhaustion), latency (3, without and with attach clients, and the
    /// default-mode cost), cost (the --all-events cost).
    #[arg(long, value_enum, value_name = "PART")]
    only: Vec<Part>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Churn,
    Sweep,
    Storm,
    Latency,
    Cost,
}

/// How far behind its schedule a paced churn client may fall and still catch up.
const CHURN_MAX_LAG: Duration = Duration::from_millis(10);
/// Background churn rate for the latency and cost runs (connections/s).
const BACKGROUND_RATE: f64 = 10_000.0;
/// Latency probes: count and spacing.
const PROBES: usize = 200;
const PROBE_SPACING: Duration = Duration::from_millis(20);
/// Bind storm: one attempt in this many is a successful bind (fresh socket, port 0, close).
const OK_BIND_EVERY: u64 = 10;
/// Time given to a tracer to attach (bpftrace compiles its script first).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after a tracer is ready, so its start-up work does not overlap the measurement.
const SETTLE: Duration = Duration::from_millis(300);
/// Load runs this long before the measured window opens (connection setup, caches).
const WARM: Duration = Duration::from_millis(500);

pub fn run(args: BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bench needs root: the agent, bpftrace and tcpstates load eBPF programs and attach \
             tracepoints (run `sudo -E cargo xtask bench`)"
        );
    }
    let secs = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
    let dir = crate::workspace_root().join("target").join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = bench_lock(&dir)?;
    let built = crate::build_agent(true)?;
    // A private copy: others rebuilding target/release/portwatch during the run must not
    // change what is measured between one round and the next.
    let agent = dir.join("portwatch");
    let _ = fs::remove_file(&agent);
    fs::copy(&built, &agent)
        .with_context(|| format!("copying {} to {}", built.display(), agent.display()))?;
    let cfg = Settings {
        window: Duration::from_secs(secs),
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
        clients: args.clients as usize,
        keep_logs: args.keep_logs,
        agent_args: agent_args(&agent, &dir),
        dir,
        agent,
    };
    let peers = ensure_peers();
    let script = cfg.dir.join("peer.bt");
    fs::write(&script, BPFTRACE_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
    let floor = cfg.dir.join("floor.bt");
    fs::write(&floor, FLOOR_SCRIPT).with_context(|| format!("writing {}", floor.display()))?;

    let host = Host::probe();
    let started = Instant::now();
    let mut report = Report {
        quiet_budget: if args.quick {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(90)
        },
        ..Default::default()
    };

    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let churn = if want(Part::Churn) {
        Some(churn_phase(&cfg, &peers, &mut report)?)
    } else {
        None
    };
    let sweep = if want(Part::Sweep) {
        let rates = if args.quick {
            &SWEEP_RATES_QUICK[..]
        } else {
            &SWEEP_RATES[..]
        };
        let window = Duration::from_secs((secs / 2).max(1));
        Some(sweep_phase(&cfg, &peers, rates, window, &mut report)?)
    } else {
        None
    };
    let storm = if want(Part::Storm) {
        Some(bind_storm_phase(&cfg, &mut report)?)
    } else {
        None
    };
    let exhaust = if want(Part::Storm) {
        Some(exhaustion::exhaustion_storm_phase(&cfg, &mut report)?)
    } else {
        None
    };
    let lat = if want(Part::Latency) {
        Some(LatencyRuns {
            plain: latency_cost_phase(&cfg, &mut report, false)?,
            attach: latency_cost_phase(&cfg, &mut report, true)?,
        })
    } else {
        None
    };
    let all_cost = if want(Part::Cost) {
        Some(cost_all_events(&cfg, &mut report)?)
    } else {
        None
    };

    let host_end_load = read_loadavg();
    let md = render_markdown(
        &cfg,
        &host,
        &host_end_load,
        churn.as_ref(),
        sweep.as_ref(),
        storm.as_deref(),
        exhaust.as_ref(),
        lat.as_ref(),
        all_cost.as_ref(),
        &report,
    );
    let out = cfg.dir.join("results.md");
    fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    note(&format!("wrote {}", out.display()));
    if let Some(c) = &churn {
        let path = cfg.dir.join("churn-rounds.csv");
        fs::write(&path, c.csv()).with_context(|| format!("writing {}", path.display()))?;
        note(&format!("wrote {}", path.display()));
    }
    // churn.png: the sweep (throughput against churn rate); churn-max.png: the max-rate rounds.
    let pngs: [(&str, Option<Result<()>>); 2] = [
        (
            "churn.png",
            sweep
                .as_ref()
                .map(|sw| write_sweep_png(&cfg.dir.join("churn.png"), sw)),
        ),
        (
            "churn-max.png",
            churn
                .as_ref()
                .map(|c| write_churn_png(&cfg.dir.join("churn-max.png"), c)),
        ),
    ];
    for (name, r) in pngs {
        match r {
            Some(Ok(())) => note(&format!("wrote {}", cfg.dir.join(name).display())),
            Some(Err(e)) => note(&format!("{name} skipped: {e:#}")),
            None => {}
        }
    }
    note(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// One bench at a time: two would load the same 2 cores, see each other's agents as foreign
/// tracers, and overwrite each other's files in target/bench/. The lock is released when the
/// returned file is dropped (or the process dies).
fn bench_lock(dir: &Path) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join(".lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another `cargo xtask bench` is running ({}); two at once would measure each other. \
             Wait for it to finish.",
            if holder.trim().is_empty() {
                "pid unknown".to_string()
            } else {
                format!("pid {}", holder.trim())
            }
        );
    }
    let _ = f.set_len(0);
    let _ = fs::write(&path, std::process::id().to_string());
    Ok(f)
}

struct Settings {
    window: Duration,
    rounds: u32,
    clients: usize,
    keep_logs: bool,
    dir: PathBuf,
    agent: PathBuf,
    /// Added to every `portwatch run`.
    agent_args: Vec<std::ffi::OsString>,
}

/// Options the bench adds to `portwatch run`, when this build of the agent has them:
/// `--no-log-file`, because as root the agent otherwise appends every record to
/// /var/log/portwatch (a bench would write gigabytes there and rotate away real records;
/// stdout carries the same lines); and a private `--runtime-dir`, so the bench neither takes
/// the host-wide single-instance lock from a real agent or the end-to-end tests, nor fails
/// because one of them holds it.
fn agent_args(agent: &Path, dir: &Path) -> Vec<std::ffi::OsString> {
    let help = Command::new(agent)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut v = Vec::new();
    if help.contains("--no-log-file") {
        v.push("--no-log-file".into());
    }
    if help.contains("--runtime-dir") {
        let run = dir.join("run");
        let _ = fs::create_dir_all(&run);
        v.push("--runtime-dir".into());
        v.push(run.into_os_string());
    }
    v
}

fn note(msg: &str) {
    eprintln!("[bench] {msg}");
}

// ---------------------------------------------------------------------------------------------
// Machine and peers

struct Host {
    date: String,
    kernel: String,
    cpu: String,
    cores: usize,
    load_start: String,
}

impl Host {
    fn probe() -> Host {
        let cmd = |c: &str, a: &[&str]| {
            Command::new(c)
                .args(a)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_string())
            })
            .unwrap_or_else(|| "?".into());
        Host {
            date: cmd("date", &["-u"]),
            kernel: cmd("uname", &["-r"]),
            cpu,
            cores: thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            load_start: read_loadavg(),
        }
    }
}

fn read_loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Peers {
    bpftrace: bool,
    tcpstates: bool,
}

const TCPSTATES: &str = "/usr/sbin/tcpstates";

/// bpftrace and libbpf-tools, installed only when missing (`apt-get update` only if the
/// install fails, e.g. on a machine whose package lists were never fetched). A peer that still
/// cannot be found is left out of the comparison and reported as such, rather than failing the
/// whole bench.
fn ensure_peers() -> Peers {
    let have = || Peers {
        bpftrace: Command::new("bpftrace")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        tcpstates: Path::new(TCPSTATES).exists() && Path::new("/usr/bin/stdbuf").exists(),
    };
    let p = have();
    if p.bpftrace && p.tcpstates {
        return p;
    }
    note("installing bpftrace and libbpf-tools (the peers to compare against)");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "bpftrace", "libbpf-tools"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        install();
    }
    let p = have();
    if !p.bpftrace {
        note("WARNING: bpftrace is still missing; it is left out of the churn comparison");
    }
    if !p.tcpstates {
        note("WARNING: /usr/sbin/tcpstates is still missing; it is left out of the comparison");
    }
    p
}

/// The same tracepoints as portwatch, printing the same facts as `portwatch --all-events`:
/// every bind and listen with its result, connect only when it fails with EADDRNOTAVAIL, close
/// of an fd seen bound, exit of a process that bound one, and every TCP state change with
/// addresses and the socket's network namespace. Kept deliberately lean (one map update per
/// syscall, like portwatch) so the comparison is fair to bpftrace. IPv4 addresses only.
const BPFTRACE_SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:syscalls:sys_enter_bind {
  $sa = (struct sockaddr_in *)uptr(args->umyaddr);
  if ($sa->sin_family == 2 || $sa->sin_family == 10) {
    @b[tid] = (args->fd, $sa->sin_family, ($sa->sin_port >> 8) | (($sa->sin_port & 0xff) << 8),
               $sa->sin_addr.s_addr);
  }
}
tracepoint:syscalls:sys_exit_bind /@b[tid].1/ {
  $b = @b[tid];
  printf("%lu bind pid=%d tid=%d comm=%s uid=%d cgroup=%lu netns=%u fd=%d family=%d addr=%s port=%d ret=%d\n",
    nsecs, pid, tid, comm, uid, cgroup, curtask->nsproxy->net_ns->ns.inum, $b.0, $b.1, ntop($b.3),
    $b.2, args->ret);
  if (args->ret == 0) { @bound[pid, $b.0] = 1; @tracked[pid] = 1; }
  delete(@b[tid]);
}
tracepoint:syscalls:sys_enter_listen { @l[tid] = args->fd + 1; }
tracepoint:syscalls:sys_exit_listen /@l[tid]/ {
  printf("%lu listen pid=%d tid=%d comm=%s uid=%d cgroup=%lu netns=%u fd=%d ret=%d\n",
    nsecs, pid, tid, comm, uid, cgroup, curtask->nsproxy->net_ns->ns.inum, @l[tid] - 1, args->ret);
  delete(@l[tid]);
}
tracepoint:syscalls:sys_enter_connect { @c[tid] = ((uint64)args->uservaddr, args->fd); }
tracepoint:syscalls:sys_exit_connect /@c[tid].0/ {
  if (args->ret == -99) {
    $sa = (struct sockaddr_in *)uptr(@c[tid].0);
    printf("%lu connect pid=%d tid=%d comm=%s uid=%d cgroup=%lu netns=%u fd=%d raddr=%s rport=%d ret=%d\n",
      nsecs, pid, tid, comm, uid, cgroup, curtask->nsproxy->net_ns->ns.inum, @c[tid].1,
      ntop($sa->sin_addr.s_addr), ($sa->sin_port >> 8) | (($sa->sin_port & 0xff) << 8), args->ret);
  }
  delete(@c[tid]);
}
tracepoint:syscalls:sys_enter_close /@bound[pid, args->fd]/ {
  printf("%lu close pid=%d tid=%d comm=%s fd=%d\n", nsecs, pid, tid, comm, args->fd);
  delete(@bound[pid, args->fd]);
}
tracepoint:sched:sched_process_exit /pid == tid && @tracked[pid]/ {
  printf("%lu exit pid=%d comm=%s\n", nsecs, pid, comm);
  delete(@tracked[pid]);
}
tracepoint:sock:inet_sock_set_state /args->protocol == 6/ {
  $sk = (struct sock *)args->skaddr;
  printf("%lu tcp_state sk=%p family=%d %s:%d -> %s:%d %d->%d netns=%u cpu_pid=%d\n",
    nsecs, args->skaddr, args->family, ntop(args->saddr), args->sport, ntop(args->daddr),
    args->dport, args->oldstate, args->newstate, $sk->__sk_common.skc_net.net->ns.inum, pid);
}
END { clear(@b); clear(@l); clear(@c); clear(@bound); clear(@tracked); }
"#;

/// The floor under any tool built on syscall tracepoints: one entry and one exit tracepoint
/// whose filter never passes. Enabling any syscall tracepoint makes every syscall of every
/// task take the kernel's traced entry and exit path; this configuration measures that cost
/// alone, side by side with the tracers that pay it.
const FLOOR_SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:syscalls:sys_enter_bind, tracepoint:syscalls:sys_exit_bind /pid == 0/ { @never = count(); }
"#;

// ---------------------------------------------------------------------------------------------
// Tracer processes

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cfg {
    None,
    /// bpftrace with FLOOR_SCRIPT (churn only).
    Floor,
    PwDefault,
    PwAll,
    Bpftrace,
    Tcpstates,
}

const CONFIGS: [Cfg; 5] = [
    Cfg::None,
    Cfg::PwDefault,
    Cfg::PwAll,
    Cfg::Bpftrace,
    Cfg::Tcpstates,
];

impl Cfg {
    fn name(self) -> &'static str {
        match self {
            Cfg::None => "no-tracer",
            Cfg::Floor => "syscall-tp-floor",
            Cfg::PwDefault => "portwatch-default",
            Cfg::PwAll => "portwatch-all-events",
            Cfg::Bpftrace => "bpftrace",
            Cfg::Tcpstates => "tcpstates",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Cfg::None => "no tracer",
            Cfg::Floor => "floor: syscall entry and exit tracepoints, never firing (bpftrace)",
            Cfg::PwDefault => "portwatch (default)",
            Cfg::PwAll => "portwatch --all-events",
            Cfg::Bpftrace => "bpftrace (same tracepoints, same facts)",
            Cfg::Tcpstates => "libbpf-tools tcpstates",
        }
    }
    fn is_agent(self) -> bool {
        matches!(self, Cfg::PwDefault | Cfg::PwAll)
    }
}

/// A running tracer. Dropping it stops it: SIGINT (so it detaches and flushes), then SIGKILL
/// if it does not exit in time.
struct Tracer {
    cfg: Cfg,
    child: Child,
    exited: Option<ExitStatus>,
    spawned: Instant,
    out: PathBuf,
    err: PathBuf,
    /// The agent's --runtime-dir (its control socket lives there), when the bench set one.
    runtime_dir: Option<PathBuf>,
}

enum Sink {
    /// stdout to a file: the tracer is never blocked and the bench spends nothing reading it.
    File,
    /// stdout through a pipe the caller reads (latency: arrival times of lines).
    Pipe,
}

impl Tracer {
    fn spawn(
        s: &Settings,
        cfg: Cfg,
        tag: &str,
        sink: Sink,
    ) -> Result<(Tracer, Option<ChildStdout>)> {
        let out = s.dir.join(format!("{tag}.out"));
        let err = s.dir.join(format!("{tag}.err"));
        let mut runtime_dir = None;
        let mut c = match cfg {
            Cfg::None => bail!("no tracer to spawn"),
            Cfg::PwDefault | Cfg::PwAll => {
                let mut c = Command::new(&s.agent);
                c.arg("run");
                // A runtime dir per start: the single-instance lock of an agent that is still
                // detaching must not refuse the next one.
                let mut args = s.agent_args.iter();
                while let Some(a) = args.next() {
                    c.arg(a);
                    if a == "--runtime-dir" {
                        let _ = args.next();
                        let run = s.dir.join(format!("run-{tag}"));
                        let _ = fs::create_dir_all(&run);
                        c.arg(&run);
                        runtime_dir = Some(run);
                    }
                }
                if cfg == Cfg::PwAll {
                    c.arg("--all-events");
                }
                c
            }
            Cfg::Bpftrace | Cfg::Floor => {
                let mut c = Command::new("bpftrace");
                c.arg(s.dir.join(if cfg == Cfg::Floor {
                    "floor.bt"
                } else {
                    "peer.bt"
                }));
                c
            }
            Cfg::Tcpstates => {
                // Block-buffered otherwise: lines would reach the file in 4 KiB bursts.
                let mut c = Command::new("stdbuf");
                c.args(["-oL", TCPSTATES]);
                c
            }
        };
        if matches!(cfg, Cfg::Bpftrace | Cfg::Floor | Cfg::Tcpstates) {
            ensure_tracefs();
        }
        c.stdin(Stdio::null());
        c.stderr(fs::File::create(&err).with_context(|| format!("creating {}", err.display()))?);
        match sink {
            Sink::File => {
                c.stdout(
                    fs::File::create(&out)
                        .with_context(|| format!("creating {}", out.display()))?,
                );
            }
            Sink::Pipe => {
                c.stdout(Stdio::piped());
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. If the bench
        // dies without running destructors (SIGKILL), the kernel sends SIGINT to the tracer so
        // no eBPF program stays attached behind our back. stdbuf's exec keeps the setting.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGINT as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = Instant::now();
        let mut child = c
            .spawn()
            .with_context(|| format!("starting {} ({c:?})", cfg.name()))?;
        let stdout = child.stdout.take();
        Ok((
            Tracer {
                cfg,
                child,
                exited: None,
                spawned,
                out,
                err,
                runtime_dir,
            },
            stdout,
        ))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr_tail(&self) -> String {
        let s = fs::read_to_string(&self.err).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails with the tracer's stderr if it has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            self.exited = Some(st);
            bail!(
                "{} exited early ({st}); its stderr:\n{}",
                self.cfg.name(),
                self.stderr_tail()
            );
        }
        Ok(())
    }

    /// Poll the output file until the tracer says it is attached. Returns the wall time from
    /// spawn to that line (2 ms granularity) and the line itself.
    fn wait_ready_file(&mut self) -> Result<(Duration, String)> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&self.out) {
                let found = text.lines().find(|l| match self.cfg {
                    Cfg::PwDefault | Cfg::PwAll => l.contains("\"event\":\"ready\""),
                    Cfg::Bpftrace | Cfg::Floor => *l == "ready",
                    Cfg::Tcpstates => l.starts_with("SKADDR"),
                    Cfg::None => true,
                });
                if let Some(l) = found {
                    return Ok((self.spawned.elapsed(), l.to_string()));
                }
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} did not report ready within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.cfg.name(),
                    self.stderr_tail()
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGINT, then wait (bounded); SIGKILL if it does not exit in time.
    fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.exited {
            return Ok(st);
        }
        // SAFETY: kill(2) on our own child's pid, which cannot have been reaped (and reused)
        // because only this struct waits for it.
        unsafe { libc::kill(self.pid(), libc::SIGINT) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                self.exited = Some(st);
                return Ok(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let st = self.child.wait()?;
        self.exited = Some(st);
        bail!(
            "{} did not stop within {grace:?} of SIGINT and was killed",
            self.cfg.name()
        )
    }

    fn remove_logs(&self, keep: bool) {
        if !keep {
            let _ = fs::remove_file(&self.out);
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.stop(Duration::from_secs(5));
        }
    }
}

/// The peers attach through tracefs. Setup mounted it, but on a shared machine something
/// (a fresh-machine test, say) may unmount it mid-run; the agent mounts it itself, the peers
/// do not. Best effort: if this fails, the peer's own error says why.
fn ensure_tracefs() {
    let dir = Path::new("/sys/kernel/tracing");
    if !dir.join("events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev"])
            .arg(dir)
            .status();
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// CPU time of every task on the machine (user + nice + system, all cores), in seconds.
/// irq/softirq time is left out on both sides of the "other processes" subtraction, as it is
/// not charged to any process.
fn system_cpu_seconds() -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(f.iter().sum::<u64>() as f64 / hz)
}

/// System-wide softirq time, in seconds. Loopback TCP is processed in softirq context (and
/// so are the tracepoint programs that fire there); with IRQ time accounting that time is
/// charged to no process, so the per-connection CPU cost adds it explicitly.
fn softirq_seconds() -> Option<f64> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    let v: u64 = s.lines().next()?.split_whitespace().nth(7)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(v as f64 / hz)
}

/// CPU used by everything except the bench and the tracer under test, as % of one core:
/// other engineers' builds, daemons, kernel threads. A high figure marks a noisy window.
struct OtherCpu {
    sys: Option<f64>,
    own: Option<f64>,
    tracer: Option<f64>,
    at: Instant,
    tracer_pid: Option<i32>,
}

impl OtherCpu {
    fn start(tracer_pid: Option<i32>) -> OtherCpu {
        OtherCpu {
            sys: system_cpu_seconds(),
            own: cpu_seconds(std::process::id() as i32),
            tracer: tracer_pid.and_then(cpu_seconds),
            at: Instant::now(),
            tracer_pid,
        }
    }
    fn pct(&self) -> Option<f64> {
        let el = self.at.elapsed().as_secs_f64();
        let sys = system_cpu_seconds()? - self.sys?;
        let own = cpu_seconds(std::process::id() as i32)? - self.own?;
        let tr = match (self.tracer_pid, self.tracer) {
            (Some(p), Some(t0)) => cpu_seconds(p)? - t0,
            _ => 0.0,
        };
        Some(((sys - own - tr) / el * 100.0).max(0.0))
    }
}

/// Before a measurement, wait (bounded) until other processes are nearly idle and no foreign
/// tracer is attached: the machine is shared (builds, soak tests), and 2 cores leave no
/// headroom. The total wait over the whole bench is capped by `quiet_budget`; when it is
/// spent, measurements go ahead and the noise shows in the "other CPU" column and warnings.
fn wait_for_quiet(rep: &mut Report) {
    let start = Instant::now();
    let limit = rep.quiet_budget.min(Duration::from_secs(15));
    let mut said = false;
    loop {
        let o = OtherCpu::start(None);
        thread::sleep(Duration::from_millis(500));
        let busy = o.pct().unwrap_or(0.0);
        let foreign = foreign_tracers(None);
        for f in &foreign {
            if rep.foreign.insert(f.clone()) {
                note(&format!(
                    "WARNING: another process has tracing eBPF programs loaded: {f}; its hooks \
                     run under every configuration, \"no tracer\" included"
                ));
            }
        }
        let why = format!(
            "other processes use {busy:.0}% of a core{}",
            if foreign.is_empty() {
                ""
            } else {
                " and a foreign tracer is attached"
            }
        );
        if busy < NOISY_OTHER_CPU && foreign.is_empty() {
            break;
        }
        if start.elapsed() >= limit {
            note(&format!(
                "{why}; measuring anyway (wait budget left: {:.0} s)",
                rep.quiet_budget
                    .saturating_sub(start.elapsed())
                    .as_secs_f64()
            ));
            break;
        }
        if !said {
            note(&format!("waiting for the machine to quiet down: {why}"));
            said = true;
        }
    }
    rep.quiet_budget = rep.quiet_budget.saturating_sub(start.elapsed());
}

/// Other processes that hold tracing eBPF programs (kprobe, tracepoint, perf_event, raw
/// tracepoint, tracing): another agent (a soak test, say) or a forgotten bpftrace. Their
/// hooks run in every configuration, "no tracer" included, so the comparison is skewed while
/// they live. `ours`: the bench's own tracer child, if one is running.
fn foreign_tracers(ours: Option<i32>) -> Vec<String> {
    const TRACING: [u32; 6] = [2, 5, 7, 17, 24, 26];
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me || ours.is_some_and(|o| o as u32 == pid) {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let tracing = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:bpf-prog")
                && fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                    .ok()
                    .and_then(|info| {
                        info.lines()
                            .find_map(|l| l.strip_prefix("prog_type:"))
                            .and_then(|v| v.trim().parse::<u32>().ok())
                    })
                    .is_some_and(|t| TRACING.contains(&t))
        });
        if tracing {
            let cmd = fs::read(p.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let cmd: String = cmd.trim().chars().take(120).collect();
            out.push(format!("pid {pid} ({cmd})"));
        }
    }
    out
}

/// Peak resident set size (VmHWM) in KiB.
fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Sockets (raw libc: no allocation, no wrappers in the hot loops)

fn loopback(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    }
}

const SIN_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// A file descriptor closed on drop (listeners and other long-lived sockets).
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own this fd.
        unsafe { libc::close(self.0) };
    }
}

fn tcp_socket() -> Result<Fd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket(): {}", std::io::Error::last_os_error());
    }
    Ok(Fd(fd))
}

/// # Safety
/// `fd` must be a socket.
unsafe fn bind_to(fd: i32, sa: &libc::sockaddr_in) -> i32 {
    // SAFETY: `sa` is a valid sockaddr_in of SIN_LEN bytes.
    unsafe { libc::bind(fd, (sa as *const libc::sockaddr_in).cast(), SIN_LEN) }
}

/// A listener on 127.0.0.1 (port 0: the kernel picks). Deliberately without SO_REUSEADDR, so a
/// bind to its port fails with EADDRINUSE.
fn listener(port: u16, backlog: i32) -> Result<(Fd, u16)> {
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

/// A counter on its own cache line, so client threads do not slow each other down.
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

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
struct OwnNetns {
    fd: Fd,
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
    fn enter(&self) -> Result<()> {
        // SAFETY: a namespace fd we own.
        if unsafe { libc::setns(self.fd.0, libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Bring `lo` up in the calling thread's network namespace (a new one starts with it down).
fn loopback_up() -> Result<()> {
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

/// Loopback connect/accept/close churn. The server closes first (it accepts and closes at
/// once; the client reads until EOF, then closes), so every connection ends deterministically
/// with the server side going FIN_WAIT2 -> TIME_WAIT: the transition portwatch reports by
/// default. The TIME_WAIT side is the server's, so clients never run out of ephemeral ports.
struct Churn {
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
    fn start(clients: usize, rate: Option<f64>, max_run: Duration) -> Result<Churn> {
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
                        client_loop(port, pacer, &stop, &done[i].0, &failed[i].0, deadline)
                    })?,
            );
        }
        Ok(c)
    }

    fn completed(&self) -> u64 {
        self.done.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    fn failures(&self) -> u64 {
        self.failed.iter().map(|p| p.0.load(Relaxed)).sum()
    }

    /// Clients first (they may wait on the server), then the server, then its socket.
    fn finish(&mut self) {
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
                thread::sleep(Duration::from_millis(1))
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

/// Above this much CPU used by other processes during a window (% of one core), the window
/// is marked noisy: on 2 cores that is a large share of what the load generator could use.
const NOISY_OTHER_CPU: f64 = 30.0;

/// Run the churn for `window` after WARM: connections/s, failures, the tracer's CPU, and
/// whether anything foreign (CPU hogs, another tracer) disturbed the window.
fn measure_churn(
    clients: usize,
    rate: Option<f64>,
    window: Duration,
    tracer_pid: Option<i32>,
) -> Result<ChurnSample> {
    // The scan for foreign tracers reads every fd of every process: with a process holding
    // 100k sockets it takes seconds. It runs before the load, never between the count and the
    // clock that bound the window.
    let foreign_before = !foreign_tracers(tracer_pid).is_empty();
    let mut churn = Churn::start(clients, rate, WARM + window + Duration::from_secs(30))?;
    thread::sleep(WARM);
    let cpu0 = tracer_pid.and_then(cpu_seconds);
    let own0 = cpu_seconds(std::process::id() as i32);
    let sirq0 = softirq_seconds();
    let other = OtherCpu::start(tracer_pid);
    let (c0, t0) = (churn.completed(), Instant::now());
    thread::sleep(window);
    let (c1, el) = (churn.completed(), t0.elapsed().as_secs_f64());
    let cpu1 = tracer_pid.and_then(cpu_seconds);
    let own1 = cpu_seconds(std::process::id() as i32);
    let sirq1 = softirq_seconds();
    let other_cpu = other.pct();
    let failures = churn.failures();
    churn.finish();
    let foreign = foreign_before || !foreign_tracers(tracer_pid).is_empty();
    Ok(ChurnSample {
        rate: (c1 - c0) as f64 / el,
        failures,
        tracer_cpu: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / el * 100.0),
            _ => None,
        },
        noisy: foreign || other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU),
        other_cpu,
        cpu_us_per_conn: (|| {
            let tracer = match (cpu0, cpu1) {
                (Some(a), Some(b)) => b - a,
                (None, None) if tracer_pid.is_none() => 0.0,
                _ => return None,
            };
            let total = own1? - own0? + sirq1? - sirq0? + tracer;
            (c1 > c0).then(|| total / (c1 - c0) as f64 * 1e6)
        })(),
    })
}

struct ChurnSample {
    rate: f64,
    failures: u64,
    tracer_cpu: Option<f64>,
    /// CPU of everything else on the machine during the window (% of one core).
    other_cpu: Option<f64>,
    /// Another tracer was attached, or other processes used more than NOISY_OTHER_CPU.
    noisy: bool,
    /// CPU spent per completed connection: the bench's own threads (load generator, mostly
    /// kernel time in syscalls, where the tracepoint programs run) + the tracer process +
    /// softirq time. Contention from other processes moves it far less than throughput.
    cpu_us_per_conn: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// Agent output

/// What one agent run wrote, read back from its stdout file.
#[derive(Default, Debug)]
struct AgentLog {
    lines: u64,
    startup_ms: Option<u64>,
    stopped: bool,
    /// Failures in conflict records with op=bind for the port asked about: the sum of their
    /// `count`s (identical failures are coalesced, one record standing for many).
    conflicts_bind: u64,
    lost_bind: u64,
    lost_count: u64,
    lost_kernel: u64,
    lost_agent: u64,
    lost_records: u64,
}

/// The number after `"key":` in a JSON line (flat scan: the agent's records are one line and
/// field names are unique within the scanned slice).
fn json_u64(s: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = s.find(&pat)? + pat.len();
    let digits: &str = &s[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A conflict record's `count`: the failures it stands for. The record's own `count` comes
/// after its holders (a TIME_WAIT holder has a `count` of its own), so the last one is it.
fn record_count(line: &str) -> u64 {
    line.rfind("\"count\":")
        .and_then(|i| json_u64(&line[i..], "count"))
        .unwrap_or(1)
}

/// `"type":"…"` sits near the start of every record (after `v` and the fixed-width `ts`).
fn record_type(line: &str) -> &str {
    let head = &line[..line.len().min(120)];
    head.find("\"type\":\"")
        .map(|i| {
            let t = &head[i + 8..];
            &t[..t.find('"').unwrap_or(0)]
        })
        .unwrap_or("")
}

#[derive(Default)]
struct LineStats {
    log: AgentLog,
}

impl LineStats {
    fn feed(&mut self, line: &str, port: Option<u16>) {
        let l = &mut self.log;
        l.lines += 1;
        match record_type(line) {
            "conflict" => {
                if let Some(p) = port {
                    if line.contains("\"op\":\"bind\"") && json_u64(line, "port") == Some(p as u64)
                    {
                        l.conflicts_bind += record_count(line);
                    }
                }
            }
            "lost" => {
                l.lost_records += 1;
                l.lost_count += json_u64(line, "count").unwrap_or(0);
                l.lost_kernel += json_u64(line, "kernel").unwrap_or(0);
                l.lost_agent += json_u64(line, "agent").unwrap_or(0);
                if let Some(i) = line.find("\"by_kind\":{") {
                    let by = &line[i..];
                    let by = &by[..by.find('}').unwrap_or(by.len())];
                    l.lost_bind += json_u64(by, "bind").unwrap_or(0);
                }
            }
            "agent" => {
                if line.contains("\"event\":\"ready\"") {
                    l.startup_ms = json_u64(line, "startup_ms");
                } else if line.contains("\"event\":\"stopped\"") {
                    l.stopped = true;
                }
            }
            _ => {}
        }
    }
}

fn parse_agent_log(path: &Path, port: Option<u16>) -> Result<AgentLog> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(4096);
    let mut st = LineStats::default();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if let Ok(line) = std::str::from_utf8(&buf) {
            st.feed(line, port);
        }
    }
    Ok(st.log)
}

/// Lines and "Lost N events" notices in a peer's output (bpftrace, tcpstates).
fn parse_peer_log(path: &Path) -> (u64, u64) {
    let Ok(f) = fs::File::open(path) else {
        return (0, 0);
    };
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(512);
    let (mut lines, mut lost) = (0u64, 0u64);
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        lines += 1;
        // bpftrace: "Lost 123 events"; libbpf-tools: "lost 123 events on CPU #0".
        if buf.len() < 64 && (buf.starts_with(b"Lost ") || buf.starts_with(b"lost ")) {
            if let Some(n) = std::str::from_utf8(&buf[5..])
                .ok()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok())
            {
                lost += n;
            }
        }
    }
    (lines, lost)
}

/// What every phase adds to: agent ready times and peak RSS, warnings, the time left for
/// waiting on a busy machine, and the foreign tracers seen.
#[derive(Default)]
struct Report {
    /// (spawn -> ready line wall time, startup_ms from the line)
    ready: Vec<(Duration, Option<u64>)>,
    /// Peak VmHWM over all agent runs, per mode (KiB).
    hwm_default: u64,
    hwm_all: u64,
    warnings: Vec<String>,
    /// What is left of the total time wait_for_quiet may spend.
    quiet_budget: Duration,
    /// Foreign tracers seen between runs.
    foreign: std::collections::BTreeSet<String>,
}

impl Report {
    fn agent_ready(&mut self, wall: Duration, line: &str) {
        self.ready.push((wall, json_u64(line, "startup_ms")));
    }
    fn hwm(&mut self, cfg: Cfg, pid: i32) {
        let v = vm_hwm_kib(pid).unwrap_or(0);
        let slot = if cfg == Cfg::PwAll {
            &mut self.hwm_all
        } else {
            &mut self.hwm_default
        };
        *slot = (*slot).max(v);
    }
    fn warn(&mut self, w: String) {
        note(&format!("WARNING: {w}"));
        self.warnings.push(w);
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Churn

struct ChurnResult {
    cfgs: Vec<Cfg>,
    /// Per configuration (same order as cfgs): per-window samples (a tracer has one per
    /// round; no tracer has one more than there are tracers per round).
    samples: Vec<Vec<ChurnSample>>,
    /// Per configuration: records lost by the tracer (agent lost records / "Lost N events").
    lost: Vec<u64>,
    /// Per configuration: output lines written.
    lines: Vec<u64>,
    /// Every window in the order run: the bracketed ratios and churn-rounds.csv.
    windows: Vec<ChurnWindow>,
}

struct ChurnWindow {
    round: u32,
    step: usize,
    cfg: Cfg,
    rate: f64,
    /// A tracer's bracketed ratio, once the no-tracer window after it has run.
    paired: Option<f64>,
}

impl ChurnResult {
    fn median_rate(&self, c: Cfg) -> Option<f64> {
        let i = self.cfgs.iter().position(|&x| x == c)?;
        median(self.samples[i].iter().map(|s| s.rate).collect())
    }
    /// Median over rounds of the bracketed ratio (see `churn_phase`): the figure the targets
    /// are judged on.
    fn paired(&self, c: Cfg) -> Option<f64> {
        median(self.bracketed(c))
    }
    /// Per round, the tracer's throughput relative to the mean of the two no-tracer windows
    /// right before and after it (empty for no tracer).
    fn bracketed(&self, c: Cfg) -> Vec<f64> {
        self.windows
            .iter()
            .filter(|w| w.cfg == c)
            .filter_map(|w| w.paired)
            .collect()
    }
    /// churn-rounds.csv: one line per window, so the medians and intervals can be redone.
    fn csv(&self) -> String {
        let mut c = String::from("round,step,configuration,conn_per_s,paired\n");
        for w in &self.windows {
            let _ = writeln!(
                c,
                "{},{},{},{:.0},{}",
                w.round,
                w.step,
                w.cfg.name(),
                w.rate,
                w.paired.map_or(String::new(), |p| format!("{p:.4}"))
            );
        }
        c
    }
}

/// A distribution-free confidence interval for the median: the k-th smallest and k-th
/// largest of `v`, with k the largest for which both tails of Binomial(n, 1/2) below k hold at
/// most 2.5 % each. Returns (low, high, coverage), or None below 6 values, where even min–max
/// covers the median with less than 95 % (97 % at 6, 75 % at 3).
fn median_ci(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    if n < 6 {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    // cdf[j] = P(B <= j)
    let mut cdf = Vec::with_capacity(n + 1);
    let (mut c, mut acc) = (1.0f64, 0.0f64);
    let total = 2f64.powi(n as i32);
    for j in 0..=n {
        if j > 0 {
            c = c * (n + 1 - j) as f64 / j as f64;
        }
        acc += c / total;
        cdf.push(acc);
    }
    let k = (1..=n / 2).rev().find(|&k| 2.0 * cdf[k - 1] <= 0.05)?;
    Some((v[k - 1], v[n - k], 1.0 - 2.0 * cdf[k - 1]))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The configurations this machine can run: all of CONFIGS but the peers that are missing.
fn available_cfgs(peers: &Peers) -> Vec<Cfg> {
    CONFIGS
        .into_iter()
        .filter(|c| match c {
            Cfg::Bpftrace => peers.bpftrace,
            Cfg::Tcpstates => peers.tcpstates,
            _ => true,
        })
        .collect()
}

fn churn_phase(s: &Settings, peers: &Peers, rep: &mut Report) -> Result<ChurnResult> {
    let mut cfgs = available_cfgs(peers);
    if peers.bpftrace {
        cfgs.insert(1, Cfg::Floor);
    }
    let mut res = ChurnResult {
        samples: cfgs.iter().map(|_| Vec::new()).collect(),
        lost: vec![0; cfgs.len()],
        lines: vec![0; cfgs.len()],
        cfgs: cfgs.clone(),
        windows: Vec::new(),
    };
    let none_i = cfgs
        .iter()
        .position(|&c| c == Cfg::None)
        .context("no-tracer configuration missing")?;
    let tracers: Vec<usize> = (0..cfgs.len()).filter(|&i| i != none_i).collect();
    // Fill the TIME_WAIT table towards its steady state (capped by tcp_max_tw_buckets; each
    // agent's start-up snapshot and the kernel's lookups depend on it) and warm caches, so the
    // first configuration measured is not favoured.
    let warm = s.window;
    note(&format!(
        "churn: warm-up {:.0} s without tracer",
        warm.as_secs_f64()
    ));
    measure_churn(s.clients, None, warm, None)?;

    // Each round brackets every tracer between two no-tracer windows:
    //   none, T1, none, T2, none, T3, none, T4, none
    // with the tracers' order rotated from round to round. On a shared machine throughput
    // drifts by 10-20 % over tens of seconds; a tracer compared with the mean of the two
    // no-tracer windows right around it is compared with the same machine, which a median over
    // windows minutes apart is not.
    let steps = 2 * tracers.len() + 1;
    for round in 0..s.rounds {
        let mut before: Option<f64> = None;
        // The last tracer window's row in res.windows, until the no-tracer window after it.
        let mut pending: Option<usize> = None;
        for step in 0..steps {
            let i = if step % 2 == 0 {
                none_i
            } else {
                tracers[(step / 2 + round as usize) % tracers.len()]
            };
            let cfg = cfgs[i];
            wait_for_quiet(rep);
            note(&format!(
                "churn: round {}/{}, step {}/{}: {} ({} s, {} clients)",
                round + 1,
                s.rounds,
                step + 1,
                steps,
                cfg.name(),
                s.window.as_secs(),
                s.clients
            ));
            let tag = format!("churn-{}-r{}", cfg.name(), round + 1);
            let (sample, lines, lost) = churn_point(s, cfg, None, s.window, &tag, rep)?;
            res.lines[i] += lines;
            res.lost[i] += lost;
            let mut detail = sample_detail(&sample);
            if i == none_i {
                if let (Some(row), Some(b)) = (pending.take(), before) {
                    let w = &mut res.windows[row];
                    let ratio = w.rate / ((b + sample.rate) / 2.0);
                    w.paired = Some(ratio);
                    detail.push_str(&format!(
                        "; {} at {:.1}% of the no-tracer windows around it",
                        w.cfg.name(),
                        ratio * 100.0
                    ));
                }
                before = Some(sample.rate);
            } else {
                pending = Some(res.windows.len());
            }
            res.windows.push(ChurnWindow {
                round: round + 1,
                step: step + 1,
                cfg,
                rate: sample.rate,
                paired: None,
            });
            note(&format!(
                "churn: round {}/{}, step {}/{}: {}: {:.0} conn/s{}",
                round + 1,
                s.rounds,
                step + 1,
                steps,
                cfg.name(),
                sample.rate,
                detail
            ));
            res.samples[i].push(sample);
        }
    }
    Ok(res)
}

/// ", tracer X% CPU, N failed connections" for a progress line, each part only when known.
fn sample_detail(sample: &ChurnSample) -> String {
    let mut d = String::new();
    if let Some(c) = sample.tracer_cpu {
        d.push_str(&format!(", tracer {c:.1}% CPU"));
    }
    if sample.failures > 0 {
        d.push_str(&format!(", {} failed connections", sample.failures));
    }
    d
}

/// One churn window under `cfg` at `rate` (None: as fast as possible): start the tracer, wait
/// until it is attached, measure, stop it and read back what it wrote. Returns the sample and
/// the tracer's output lines and lost records (0 and 0 without a tracer).
fn churn_point(
    s: &Settings,
    cfg: Cfg,
    rate: Option<f64>,
    window: Duration,
    tag: &str,
    rep: &mut Report,
) -> Result<(ChurnSample, u64, u64)> {
    if cfg == Cfg::None {
        return Ok((measure_churn(s.clients, rate, window, None)?, 0, 0));
    }
    let (mut t, _) = Tracer::spawn(s, cfg, tag, Sink::File)?;
    let (wall, line) = t.wait_ready_file()?;
    if cfg.is_agent() {
        rep.agent_ready(wall, &line);
    }
    thread::sleep(SETTLE);
    let sample = measure_churn(s.clients, rate, window, Some(t.pid()))?;
    if cfg.is_agent() {
        rep.hwm(cfg, t.pid());
    }
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let (lines, lost) = if cfg.is_agent() {
        let log = parse_agent_log(&t.out, None)?;
        if !log.stopped {
            rep.warn(format!("{tag}: no 'stopped' record"));
        }
        (log.lines, log.lost_count)
    } else {
        parse_peer_log(&t.out)
    };
    t.remove_logs(s.keep_logs);
    Ok((sample, lines, lost))
}

// ---------------------------------------------------------------------------------------------
// 1b. Churn rate sweep: achieved throughput against offered rate

/// Offered rates of the sweep (total connections/s over all clients); None = unpaced, as fast
/// as possible. The no-tracer maximum on the 2-core reference machine is 12k-24k conn/s, so the
/// paced steps reach from light load to just under it, and the peers saturate between them.
const SWEEP_RATES: [Option<f64>; 6] = [
    Some(2_000.0),
    Some(5_000.0),
    Some(10_000.0),
    Some(15_000.0),
    Some(20_000.0),
    None,
];
const SWEEP_RATES_QUICK: [Option<f64>; 3] = [Some(5_000.0), Some(15_000.0), None];

struct SweepResult {
    cfgs: Vec<Cfg>,
    /// Offered rates, ascending, None (unpaced) last.
    rates: Vec<Option<f64>>,
    window: Duration,
    /// [rate][configuration], same orders as `rates` and `cfgs`.
    samples: Vec<Vec<ChurnSample>>,
    /// Per configuration: records lost by the tracer over the whole sweep.
    lost: Vec<u64>,
}

impl SweepResult {
    fn cfg_index(&self, c: Cfg) -> Option<usize> {
        self.cfgs.iter().position(|&x| x == c)
    }
}

fn rate_label(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.0}")).unwrap_or_else(|| "max".into())
}

/// Every configuration at each offered rate, one window per point. At each rate the
/// configurations run one after the other (order rotated from rate to rate), as the churn
/// rounds do, so drift on a shared machine hits them alike. Each point starts its tracer
/// afresh, so no tracer carries state or a backlog from one rate into the next.
fn sweep_phase(
    s: &Settings,
    peers: &Peers,
    rates: &[Option<f64>],
    window: Duration,
    rep: &mut Report,
) -> Result<SweepResult> {
    let cfgs = available_cfgs(peers);
    let mut res = SweepResult {
        cfgs: cfgs.clone(),
        rates: rates.to_vec(),
        window,
        samples: Vec::new(),
        lost: vec![0; cfgs.len()],
    };
    // Bring the TIME_WAIT table near its steady state first, as the churn phase does, so the
    // lowest rates are not measured against an empty table and the highest against a full one.
    note(&format!(
        "sweep: warm-up {:.0} s without tracer",
        window.as_secs_f64()
    ));
    measure_churn(s.clients, None, window, None)?;
    let n = cfgs.len();
    for (ri, &rate) in rates.iter().enumerate() {
        let mut row: Vec<Option<ChurnSample>> = (0..n).map(|_| None).collect();
        for k in 0..n {
            let i = (k + ri) % n;
            let cfg = cfgs[i];
            wait_for_quiet(rep);
            let tag = format!("sweep-{}-{}", cfg.name(), rate_label(rate));
            let (sample, _, lost) = churn_point(s, cfg, rate, window, &tag, rep)?;
            res.lost[i] += lost;
            note(&format!(
                "sweep: {} at {} conn/s offered: {:.0} achieved{}",
                cfg.name(),
                rate_label(rate),
                sample.rate,
                sample_detail(&sample)
            ));
            row[i] = Some(sample);
        }
        let row = row.into_iter().collect::<Option<Vec<_>>>();
        res.samples
            .push(row.context("a sweep configuration was skipped")?);
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// 2. Bind storm

struct StormRow {
    label: String,
    target: Option<f64>,
    ok_binds: bool,
    secs: f64,
    failing: u64,
    eaddrinuse: u64,
    ok: u64,
    other_errors: u64,
    other_cpu: Option<f64>,
    /// Another tracer was attached or other processes were busy: foreign binds possible.
    busy_host: bool,
    log: AgentLog,
}

impl StormRow {
    /// Does the accounting close? `lost` records count per kind and host-wide, not per port:
    /// a lost bind may be one of our ok binds, or another process's bind. So received + lost
    /// may exceed what we generated by at most our ok binds, or by what other processes bound
    /// meanwhile (only possible when the host was busy). Falling short is always a failure:
    /// events vanished without being counted.
    fn accounting(&self) -> (String, bool) {
        let seen = self.log.conflicts_bind + self.log.lost_bind;
        if seen == self.failing {
            return ("exact".into(), true);
        }
        if seen < self.failing {
            return (format!("MISMATCH: {} missing", self.failing - seen), false);
        }
        let over = seen - self.failing;
        if self.ok_binds && over <= self.ok {
            (format!("closes (+{over}: lost includes ok binds)"), true)
        } else if self.busy_host {
            (
                format!("closes (+{over}: lost includes other processes' binds; host busy)"),
                true,
            )
        } else {
            (format!("MISMATCH: {over} too many"), false)
        }
    }
}

#[derive(Default)]
struct StormCount {
    failing: u64,
    eaddrinuse: u64,
    ok: u64,
    other: u64,
}

/// Failing binds to `port` (held by a listener) on one reused socket: a bind that fails leaves
/// the socket unbound, so no socket()/close() is needed per attempt, which is what makes
/// 100k+/s possible. Every OK_BIND_EVERY-th attempt (when `ok_binds`) is a successful bind on a
/// fresh socket to 127.0.0.1:0, closed at once: the realistic mix the kernel side must also
/// carry (bind ok + close of a tracked fd).
fn storm_worker(port: u16, per_sec: Option<f64>, ok_binds: bool, until: Instant) -> StormCount {
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

fn bind_storm_phase(s: &Settings, rep: &mut Report) -> Result<Vec<StormRow>> {
    // One holder for the whole phase, created before any agent starts (its own listen is not
    // part of the counts).
    let (_holder, port) = listener(0, 16)?;
    let plan: [(Option<f64>, bool, &str); 4] = [
        (Some(10_000.0), true, "10k/s"),
        (Some(50_000.0), true, "50k/s"),
        (None, true, "max"),
        (None, false, "max, failing binds only"),
    ];
    let threads = 2;
    let mut rows = Vec::new();
    for (k, (rate, ok_binds, label)) in plan.into_iter().enumerate() {
        wait_for_quiet(rep);
        note(&format!(
            "bind storm: {label} on 127.0.0.1:{port} for {} s ({}/{})",
            s.window.as_secs(),
            k + 1,
            plan.len()
        ));
        let tag = format!("storm-{}", k + 1);
        let (mut t, _) = Tracer::spawn(s, Cfg::PwDefault, &tag, Sink::File)?;
        let (wall, line) = t.wait_ready_file()?;
        rep.agent_ready(wall, &line);
        thread::sleep(SETTLE);
        let foreign_before = !foreign_tracers(Some(t.pid())).is_empty();
        let other = OtherCpu::start(Some(t.pid()));
        let t0 = Instant::now();
        let until = t0 + s.window;
        let workers: Vec<JoinHandle<StormCount>> = (0..threads)
            .map(|i| {
                let per = rate.map(|r| r / threads as f64);
                thread::Builder::new()
                    .name(format!("bench-storm{i}"))
                    .spawn(move || storm_worker(port, per, ok_binds, until))
            })
            .collect::<std::io::Result<_>>()?;
        let mut tot = StormCount::default();
        for w in workers {
            let c = w
                .join()
                .map_err(|_| anyhow::anyhow!("a bind storm thread panicked"))?;
            tot.failing += c.failing;
            tot.eaddrinuse += c.eaddrinuse;
            tot.ok += c.ok;
            tot.other += c.other;
        }
        let secs = t0.elapsed().as_secs_f64();
        let other_cpu = other.pct();
        let busy_host = foreign_before
            || !foreign_tracers(Some(t.pid())).is_empty()
            || other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU);
        rep.hwm(Cfg::PwDefault, t.pid());
        t.check_alive()?;
        // SIGINT: the agent drains the ring buffer and writes the final `lost` record.
        t.stop(Duration::from_secs(60))?;
        let log = parse_agent_log(&t.out, Some(port))?;
        if !log.stopped {
            rep.warn(format!("{tag}: no 'stopped' record"));
        }
        t.remove_logs(s.keep_logs);
        let row = StormRow {
            label: label.into(),
            target: rate,
            ok_binds,
            secs,
            failing: tot.failing,
            eaddrinuse: tot.eaddrinuse,
            ok: tot.ok,
            other_errors: tot.other,
            other_cpu,
            busy_host,
            log,
        };
        note(&format!(
            "bind storm: {label}: {} failing binds ({:.0}/s), {} conflicts received, {} lost \
             (kernel {}, agent {}): {}",
            row.failing,
            row.failing as f64 / secs,
            row.log.conflicts_bind,
            row.log.lost_bind,
            row.log.lost_kernel,
            row.log.lost_agent,
            row.accounting().0
        ));
        rows.push(row);
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// 3 + 4. Latency under background churn, and the agent's cost

/// Both latency runs: the agent alone, then with clients attached to its control socket.
struct LatencyRuns {
    plain: LatencyResult,
    attach: LatencyResult,
}

struct LatencyResult {
    /// Set for the run with clients on the control socket.
    attach: Option<AttachResult>,
    sent: usize,
    lat_ms: Vec<f64>,
    churn_rate: f64,
    cpu_pct: f64,
    hwm_kib: u64,
    ready_wall: Duration,
    startup_ms: Option<u64>,
    lost: u64,
    other_cpu: Option<f64>,
}

fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let k = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[k.clamp(1, sorted.len()) - 1]
}

/// Readers among the attach clients of the second latency run; one more client never reads.
const ATTACH_READERS: usize = 9;
/// What the agent sends a client that could not take some records, once it can take one.
const MISSED_PREFIX: &[u8] = b"{\"v\":1,\"type\":\"missed\"";

struct AttachResult {
    /// Lines read by each reading client over the agent's life (replay included).
    reader_lines: Vec<u64>,
    /// Records the reading clients were told they missed (0 if they kept up).
    reader_missed: u64,
    /// CPU the reading clients used, summed, in % of one core over their run. They run in
    /// the bench process, so "other processes" does not include them.
    reader_cpu_pct: f64,
    /// Records the stalled client was told it missed when it read at last, after the window
    /// (None: no `missed` note came in time).
    stalled_missed: Option<u64>,
}

#[derive(Default)]
struct ReaderCount {
    lines: u64,
    missed: u64,
    /// The reading thread's own CPU time and how long it ran (connect to EOF).
    cpu_s: f64,
    ran_s: f64,
}

fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Clients on the agent's control socket: ATTACH_READERS that read everything, and one that
/// sends the attach request and then reads nothing. An attached client gets every event as a
/// record (the live detail), not only conflicts: under the background churn that is tens of
/// thousands of lines a second per client, so the stalled one falls behind within a second.
struct AttachClients {
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
    fn connect(sock: &Path) -> Result<AttachClients> {
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
    fn stalled_missed(&self, limit: Duration) -> Option<u64> {
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
    fn finish(self) -> Vec<ReaderCount> {
        drop(self.stalled);
        self.readers
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    }
}

/// Conflict latency and the agent's cost under background churn. With `attach`, the same
/// again with ten clients on the agent's control socket, one of which never reads: a stalled
/// client must not slow logging down.
fn latency_cost_phase(s: &Settings, rep: &mut Report, attach: bool) -> Result<LatencyResult> {
    let (tag, what) = if attach {
        (
            "latency-attach",
            format!(
                "latency, {} attach clients, one stalled",
                ATTACH_READERS + 1
            ),
        )
    } else {
        ("latency", "latency, no attach clients".to_string())
    };
    note(&format!(
        "{what} (+ cost): portwatch default, {PROBES} probe binds every {} ms under {:.0} \
         conn/s churn, {} s window",
        PROBE_SPACING.as_millis(),
        BACKGROUND_RATE,
        s.window.as_secs()
    ));
    wait_for_quiet(rep);
    // One holder per probe so each conflict is known by its port. Created before the agent
    // starts: their listen() calls are not part of what is measured.
    let probes = ProbeHolders::new(PROBES)?;
    let (holders, arrivals) = (&probes.holders, probes.arrivals.clone());

    let (mut t, stdout) = Tracer::spawn(s, Cfg::PwDefault, tag, Sink::Pipe)?;
    let stdout = stdout.context("agent stdout pipe")?;
    let marks = probes.marks();
    let (reader, ready_rx) = read_agent_lines(
        stdout,
        "bench-reader",
        LineStats::default(),
        move |st, line, now| {
            if record_type(line) == "conflict" && line.contains("\"op\":\"bind\"") {
                if let Some(p) = json_u64(line, "port") {
                    marks.arrived(p, now);
                }
            }
            st.feed(line, None);
        },
    )?;
    let (ready_at, line) = wait_ready(&mut t, &ready_rx)?;
    let ready_wall = ready_at - t.spawned;
    rep.agent_ready(ready_wall, &line);
    // The control socket is bound before the ready line is printed.
    let clients = if attach {
        let dir = t.runtime_dir.as_ref().context(
            "this agent build has no --runtime-dir, so the bench cannot find its control socket",
        )?;
        Some(AttachClients::connect(&dir.join("portwatch.sock"))?)
    } else {
        None
    };
    thread::sleep(SETTLE);

    let mut churn = Churn::start(
        s.clients,
        Some(BACKGROUND_RATE),
        WARM + s.window * 2 + Duration::from_secs(30),
    )?;
    thread::sleep(WARM);
    let (c0, cpu0, t0) = (churn.completed(), cpu_seconds(t.pid()), Instant::now());
    let other = OtherCpu::start(Some(t.pid()));

    // Probes: one reused socket (a failed bind leaves it unbound), spaced in time.
    let probe = tcp_socket()?;
    let mut sent_at = vec![0i64; PROBES];
    let mut sent = 0;
    for (i, (_, port)) in holders.iter().enumerate() {
        let due = t0 + PROBE_SPACING * i as u32;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let sa = loopback(*port);
        sent_at[i] = realtime_ns();
        // SAFETY: our socket, a valid sockaddr.
        let r = unsafe { bind_to(probe.0, &sa) };
        if r == 0 || errno() != libc::EADDRINUSE {
            bail!("probe bind to 127.0.0.1:{port} did not fail with EADDRINUSE");
        }
        sent += 1;
    }
    // The rest of the window: churn only (the CPU figure covers the whole window).
    if let Some(d) = (t0 + s.window).checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
    let el = t0.elapsed().as_secs_f64();
    let (c1, cpu1) = (churn.completed(), cpu_seconds(t.pid()));
    let other_cpu = other.pct();
    // After the window (the probes are all sent): the churn still makes records to publish.
    let stalled_missed = clients
        .as_ref()
        .and_then(|c| c.stalled_missed(Duration::from_secs(5)));
    churn.finish();
    let hwm = vm_hwm_kib(t.pid()).unwrap_or(0);
    rep.hwm(Cfg::PwDefault, t.pid());
    // Late lines get up to 2 s more (bounded wait).
    let wait_until = Instant::now() + Duration::from_secs(2);
    while arrivals.iter().any(|a| a.load(Relaxed) == 0) && Instant::now() < wait_until {
        thread::sleep(Duration::from_millis(10));
    }
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let log = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))?
        .log;
    if !log.stopped {
        rep.warn(format!("{what}: no 'stopped' record"));
    }
    let attach_res = clients.map(|c| {
        let counts = c.finish();
        AttachResult {
            reader_lines: counts.iter().map(|n| n.lines).collect(),
            reader_missed: counts.iter().map(|n| n.missed).sum(),
            reader_cpu_pct: counts
                .iter()
                .filter(|n| n.ran_s > 0.0)
                .map(|n| n.cpu_s / n.ran_s * 100.0)
                .sum(),
            stalled_missed,
        }
    });
    // Per-probe detail, in send order, to see when slow ones happened (e.g. periodic work).
    let mut csv = String::from("probe,port,sent_realtime_ns,latency_ms\n");
    for (i, (a, &s0)) in arrivals.iter().zip(&sent_at).enumerate() {
        let a = a.load(Relaxed);
        let l = if a != 0 {
            format!("{:.3}", (a - s0) as f64 / 1e6)
        } else {
            "missing".into()
        };
        let _ = writeln!(csv, "{i},{},{s0},{l}", holders[i].1);
    }
    let _ = fs::write(s.dir.join(format!("{tag}.csv")), csv);
    let mut lat_ms: Vec<f64> = arrivals
        .iter()
        .zip(&sent_at)
        .filter_map(|(a, &s0)| {
            let a = a.load(Relaxed);
            (a != 0).then(|| (a - s0) as f64 / 1e6)
        })
        .collect();
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    let r = LatencyResult {
        attach: attach_res,
        sent,
        churn_rate: (c1 - c0) as f64 / el,
        cpu_pct: match (cpu0, cpu1) {
            (Some(a), Some(b)) => (b - a) / el * 100.0,
            _ => f64::NAN,
        },
        hwm_kib: hwm,
        ready_wall,
        startup_ms: log.startup_ms,
        lost: log.lost_count,
        other_cpu,
        lat_ms,
    };
    note(&format!(
        "{what}: {}/{} probes seen, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; agent {:.1}% CPU \
         at {:.0} conn/s, VmHWM {} KiB, {} lost{}",
        r.lat_ms.len(),
        r.sent,
        pct(&r.lat_ms, 50.0),
        pct(&r.lat_ms, 99.0),
        r.lat_ms.last().copied().unwrap_or(f64::NAN),
        r.cpu_pct,
        r.churn_rate,
        r.hwm_kib,
        r.lost,
        match &r.attach {
            Some(a) => format!(
                "; reading clients got {}..{} lines ({} missed, {:.0}% CPU), the stalled one \
                 missed {}",
                a.reader_lines.iter().min().unwrap_or(&0),
                a.reader_lines.iter().max().unwrap_or(&0),
                a.reader_missed,
                a.reader_cpu_pct,
                a.stalled_missed
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "? (no note)".into())
            ),
            None => String::new(),
        }
    ));
    Ok(r)
}

struct CostRow {
    churn_rate: f64,
    cpu_pct: f64,
    hwm_kib: u64,
    lines: u64,
    lost: u64,
    other_cpu: Option<f64>,
}

/// The agent's cost in --all-events mode under the same background churn (output to a file).
fn cost_all_events(s: &Settings, rep: &mut Report) -> Result<CostRow> {
    note(&format!(
        "cost: portwatch --all-events under {:.0} conn/s churn, {} s",
        BACKGROUND_RATE,
        s.window.as_secs()
    ));
    wait_for_quiet(rep);
    let (mut t, _) = Tracer::spawn(s, Cfg::PwAll, "cost-all-events", Sink::File)?;
    let (wall, line) = t.wait_ready_file()?;
    rep.agent_ready(wall, &line);
    thread::sleep(SETTLE);
    let smp = measure_churn(s.clients, Some(BACKGROUND_RATE), s.window, Some(t.pid()))?;
    let hwm = vm_hwm_kib(t.pid()).unwrap_or(0);
    rep.hwm(Cfg::PwAll, t.pid());
    t.check_alive()?;
    t.stop(Duration::from_secs(30))?;
    let log = parse_agent_log(&t.out, None)?;
    t.remove_logs(s.keep_logs);
    let r = CostRow {
        churn_rate: smp.rate,
        cpu_pct: smp.tracer_cpu.unwrap_or(f64::NAN),
        hwm_kib: hwm,
        lines: log.lines,
        lost: log.lost_count,
        other_cpu: smp.other_cpu,
    };
    note(&format!(
        "cost: --all-events {:.1}% CPU at {:.0} conn/s, {} lines, {} lost, VmHWM {} KiB",
        r.cpu_pct, r.churn_rate, r.lines, r.lost, r.hwm_kib
    ));
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Report

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.filter(|x| x.is_finite())
        .map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "–".into())
}

#[allow(clippy::too_many_arguments)]
fn render_markdown(
    s: &Settings,
    host: &Host,
    load_end: &str,
    churn: Option<&ChurnResult>,
    sweep: Option<&SweepResult>,
    storm: Option<&[StormRow]>,
    exhaust: Option<&exhaustion::ExhaustResult>,
    lat_runs: Option<&LatencyRuns>,
    all: Option<&CostRow>,
    rep: &Report,
) -> String {
    let mut m = String::new();
    let mut noisy: Vec<String> = Vec::new();
    let _ = writeln!(m, "# portwatch bench\n");
    let _ = writeln!(m, "| | |\n|---|---|");
    let _ = writeln!(m, "| date | {} |", host.date);
    let _ = writeln!(m, "| kernel | {} |", host.kernel);
    let _ = writeln!(m, "| CPU | {} ({} cores) |", host.cpu, host.cores);
    let _ = writeln!(
        m,
        "| load average (1/5/15 min) at start / end | {} / {} |",
        host.load_start, load_end
    );
    let _ = writeln!(
        m,
        "| settings | {} s per configuration, {} churn round(s), {} client threads + 1 acceptor; \
         agent: `portwatch run {}` (a private copy of the release build) |",
        s.window.as_secs(),
        s.rounds,
        s.clients,
        s.agent_args
            .iter()
            .map(|a| {
                let a = a.to_string_lossy();
                // Keep the table short: the runtime dir is under target/bench/.
                if a.starts_with('/') {
                    "target/bench/run".to_string()
                } else {
                    a.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    );

    if let Some(churn) = churn {
        // 1
        let base = churn.median_rate(Cfg::None);
        let churn_noisy = churn.samples.iter().flatten().any(|x| x.noisy);
        let none_i = churn.cfgs.iter().position(|&c| c == Cfg::None);
        let base_cost = none_i.and_then(|n| {
            median(
                churn.samples[n]
                    .iter()
                    .filter_map(|x| x.cpu_us_per_conn)
                    .collect(),
            )
        });
        let _ = writeln!(
            m,
            "\n## 1. Loopback TCP churn (connect/accept/close on 127.0.0.1)\n"
        );
        let _ = writeln!(
            m,
            "Completed connections/s over each {} s window, median over rounds. Each round runs \
             every tracer between two no-tracer windows (none, T1, none, T2, ..., none; tracer \
             order rotated each round), each window in a fresh network namespace. The server \
             accepts and closes first, so each \
             connection leaves a server-side TIME_WAIT on the listening port, as a busy HTTP server \
             does. *paired* = the tracer's throughput over the mean of the two no-tracer windows \
             around it, median over rounds (min–max in brackets, then from 6 rounds on a \
             distribution-free confidence interval of that median, at the coverage shown, at \
             least 95 %): it cancels the drift of a shared machine, so the targets are judged on \
             it. Every window is in churn-rounds.csv. *vs no tracer* = ratio of the \
             medians over all windows. *CPU µs/conn* = (bench threads + tracer + softirq CPU) / connections, median: \
             it moves far less with contention than throughput does, so it is the steadier \
             comparison on a shared machine. Tracer CPU = % of one core; other CPU = everything else on the machine (builds, \
             daemons, kernel threads) during the window, % of one core, median (max). Lost = \
             records the tracer reported dropped, summed over rounds.\n",
            s.window.as_secs()
        );
        let _ = writeln!(
            m,
            "| configuration | median conn/s | rounds min–max | vs no tracer | paired | CPU µs/conn (vs none) | tracer CPU % | other CPU % | clean rounds | lines | lost | target | result |"
        );
        let _ = writeln!(
            m,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        );
        for (i, &c) in churn.cfgs.iter().enumerate() {
            let rates: Vec<f64> = churn.samples[i].iter().map(|x| x.rate).collect();
            let lo = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rates.iter().copied().fold(0.0, f64::max);
            let med = churn.median_rate(c).unwrap_or(f64::NAN);
            let ratio = base.map(|b| med / b).unwrap_or(f64::NAN);
            let br = churn.bracketed(c);
            let paired = churn.paired(c).map(|p| {
                let lo = br.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = br.iter().copied().fold(0.0, f64::max);
                let ci = median_ci(&br).map_or(String::new(), |(a, b, cov)| {
                    format!("; {:.0}% CI {:.1}–{:.1}", cov * 100.0, a * 100.0, b * 100.0)
                });
                format!(
                    "{:.1}% ({:.1}–{:.1}{ci})",
                    p * 100.0,
                    lo * 100.0,
                    hi * 100.0
                )
            });
            let cpu = median(
                churn.samples[i]
                    .iter()
                    .filter_map(|x| x.tracer_cpu)
                    .collect(),
            );
            let others: Vec<f64> = churn.samples[i]
                .iter()
                .filter_map(|x| x.other_cpu)
                .collect();
            let other_max = others.iter().copied().fold(0.0, f64::max);
            let clean = churn.samples[i].iter().filter(|x| !x.noisy).count();
            let cost = median(
                churn.samples[i]
                    .iter()
                    .filter_map(|x| x.cpu_us_per_conn)
                    .collect(),
            );
            if clean < churn.samples[i].len() {
                noisy.push(format!(
                    "churn {}: {} of {} rounds noisy (another tracer attached, or other processes \
                     above {NOISY_OTHER_CPU:.0}% of a core; up to {other_max:.0}%)",
                    c.name(),
                    churn.samples[i].len() - clean,
                    churn.samples[i].len()
                ));
            }
            let (target, res) = match c {
                Cfg::PwDefault => (
                    "≥ 97% paired",
                    verdict(churn.paired(c).is_some_and(|p| p >= 0.97)),
                ),
                Cfg::PwAll => (
                    "≥ 93% paired",
                    verdict(churn.paired(c).is_some_and(|p| p >= 0.93)),
                ),
                _ => ("–", "–"),
            };
            let res = if res != "–" && churn_noisy {
                format!("{res} (noisy run)")
            } else {
                res.to_string()
            };
            let dash = |v: u64| {
                if c == Cfg::None {
                    "–".to_string()
                } else {
                    v.to_string()
                }
            };
            let _ = writeln!(
                m,
                "| {} | {:.0} | {:.0}–{:.0} | {:.1}% | {} | {} | {} | {} ({:.0}) | {}/{} | {} | {} | {} | {} |",
                c.label(),
                med,
                lo,
                hi,
                ratio * 100.0,
                paired.unwrap_or_else(|| "–".into()),
                match (cost, base_cost) {
                    (Some(x), Some(b)) if c != Cfg::None => {
                        format!("{x:.1} ({:+.0}%)", (x / b - 1.0) * 100.0)
                    }
                    _ => fmt_opt(cost, 1),
                },
                fmt_opt(cpu, 1),
                fmt_opt(median(others.clone()), 0),
                other_max,
                clean,
                churn.samples[i].len(),
                dash(churn.lines[i]),
                dash(churn.lost[i]),
                target,
                res
            );
        }
        for pw in [Cfg::PwDefault, Cfg::PwAll] {
            let mine = churn.paired(pw);
            let peers: Vec<(Cfg, f64)> = [Cfg::Bpftrace, Cfg::Tcpstates]
                .into_iter()
                .filter_map(|p| churn.paired(p).map(|r| (p, r)))
                .collect();
            let ok = peers.len() == 2 && mine.is_some_and(|x| peers.iter().all(|(_, r)| x > *r));
            let detail = peers
                .iter()
                .map(|(p, r)| format!("{} {:.1}%", p.name(), r * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                m,
                "| {} cheaper than bpftrace and tcpstates | paired {:.1}% vs {} | | | | | | | | | higher throughput than both | {}{} |",
                pw.label(),
                mine.unwrap_or(f64::NAN) * 100.0,
                if detail.is_empty() {
                    "peers missing".into()
                } else {
                    detail
                },
                verdict(ok),
                if churn_noisy { " (noisy run)" } else { "" }
            );
        }
    }
    if let Some(sw) = sweep {
        // 1b
        let _ = writeln!(
            m,
            "\n## 1b. Churn rate sweep: achieved against offered connections/s\n"
        );
        let _ = writeln!(
            m,
            "The same churn and configurations at each offered rate: {} client threads, each \
             pacing its share on a deadline schedule (*max* = unpaced), one {} s window per point, \
             configurations in rotated order at each rate, each tracer started afresh per point. \
             A tracer that keeps up gives achieved = offered; below that, the gap is the \
             throughput it costs. Plotted in churn.png.\n",
            s.clients,
            sw.window.as_secs()
        );
        let head = |m: &mut String, cfgs: &[Cfg]| {
            let _ = writeln!(
                m,
                "| offered conn/s | {} |",
                cfgs.iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            let _ = writeln!(m, "|---:|{}", "---:|".repeat(cfgs.len()));
        };
        let _ = writeln!(m, "Achieved conn/s:\n");
        head(&mut m, &sw.cfgs);
        for (ri, &r) in sw.rates.iter().enumerate() {
            let cells: Vec<String> = sw.samples[ri]
                .iter()
                .map(|x| format!("{:.0}", x.rate))
                .collect();
            let _ = writeln!(m, "| {} | {} |", rate_label(r), cells.join(" | "));
        }
        let traced: Vec<Cfg> = sw
            .cfgs
            .iter()
            .copied()
            .filter(|&c| c != Cfg::None)
            .collect();
        if !traced.is_empty() {
            let _ = writeln!(
                m,
                "\nTracer CPU, % of one core (the tracer process's utime + stime; eBPF programs \
                 run in the churning threads and are not in it):\n"
            );
            head(&mut m, &traced);
            for (ri, &r) in sw.rates.iter().enumerate() {
                let cells: Vec<String> = traced
                    .iter()
                    .filter_map(|&c| sw.cfg_index(c))
                    .map(|i| fmt_opt(sw.samples[ri][i].tracer_cpu, 1))
                    .collect();
                let _ = writeln!(m, "| {} | {} |", rate_label(r), cells.join(" | "));
            }
            let _ = writeln!(
                m,
                "\nRecords lost over the sweep: {}.",
                traced
                    .iter()
                    .filter_map(|&c| sw.cfg_index(c).map(|i| format!(
                        "{} {}",
                        c.name(),
                        sw.lost[i]
                    )))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // Noise, failed connections, and pacing: with no tracer, a paced rate below the unpaced
        // maximum must be met, or the generator (or a busy machine) is what was measured.
        let none_i = sw.cfg_index(Cfg::None);
        let none_max = none_i.and_then(|n| {
            sw.rates
                .iter()
                .position(|r| r.is_none())
                .map(|ri| sw.samples[ri][n].rate)
        });
        let (mut noisy_pts, mut failed, mut other_max) = (0, 0u64, 0.0f64);
        for (ri, &r) in sw.rates.iter().enumerate() {
            for x in &sw.samples[ri] {
                noisy_pts += usize::from(x.noisy);
                failed += x.failures;
                other_max = other_max.max(x.other_cpu.unwrap_or(0.0));
            }
            if let (Some(n), Some(off), Some(top)) = (none_i, r, none_max) {
                let got = sw.samples[ri][n].rate;
                if off < top * 0.9 && got < off * 0.97 {
                    noisy.push(format!(
                        "sweep: with no tracer only {got:.0} of {off:.0} offered conn/s were \
                         achieved, below the unpaced maximum ({top:.0}): pacing or machine noise"
                    ));
                }
            }
        }
        let points = sw.rates.len() * sw.cfgs.len();
        if noisy_pts > 0 {
            noisy.push(format!(
                "sweep: {noisy_pts} of {points} points noisy (another tracer attached, or other \
                 processes above {NOISY_OTHER_CPU:.0}% of a core; up to {other_max:.0}%)"
            ));
        }
        if failed > 0 {
            noisy.push(format!(
                "sweep: {failed} failed connections over all points"
            ));
        }
    }
    if let Some(storm) = storm {
        // 2
        let _ = writeln!(
            m,
            "\n## 2. Bind storm (EADDRINUSE on a port held by a listener; portwatch default, no port filter)\n"
        );
        let _ = writeln!(
            m,
            "2 threads, {} s per rate. *ok binds*: every {}th attempt is a successful bind to \
             127.0.0.1:0 plus close (bind ok and close events the kernel side carries too). \
             *received* = failures in conflict records with op=bind for the port (the sum of their \
             `count`: identical failures are coalesced); *lost* = sum of by_kind.bind \
             over `lost` records, read after SIGINT so the final one is included. `lost` counts \
             per kind and host-wide, so under loss a lost bind may be one of our ok binds or \
             another process's: the check is then generated ≤ received + lost ≤ generated + ok \
             binds (+ other processes' binds, possible only on a busy host). The last row has no \
             ok binds: on a quiet host it must be exact. Falling short is always a MISS.\n",
            s.window.as_secs(),
            OK_BIND_EVERY
        );
        let _ = writeln!(
            m,
            "| rate | achieved failing/s | failing binds | ok binds | received | lost (bind) | lost kernel / agent (all kinds) | generated = received + lost | other CPU % | target | result |"
        );
        let _ = writeln!(m, "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|");
        for r in storm {
            let (acc, acc_ok) = r.accounting();
            let low = r.target.is_some_and(|t| t <= 50_000.0);
            let (target, res) = if low {
                (
                    "0 lost, exact",
                    verdict(r.log.lost_bind == 0 && r.log.lost_count == 0 && acc_ok),
                )
            } else {
                ("accounting closes", verdict(acc_ok))
            };
            if r.other_cpu.is_some_and(|o| o > NOISY_OTHER_CPU) {
                noisy.push(format!(
                    "bind storm {}: other processes used {:.0}% of a core",
                    r.label,
                    r.other_cpu.unwrap_or(0.0)
                ));
            }
            let _ = writeln!(
                m,
                "| {} | {:.0} | {} | {} | {} | {} | {} / {} | {}{} | {} | {} | {} |",
                r.label,
                r.failing as f64 / r.secs,
                r.failing,
                r.ok,
                r.log.conflicts_bind,
                r.log.lost_bind,
                r.log.lost_kernel,
                r.log.lost_agent,
                acc,
                if r.other_errors > 0 || r.eaddrinuse != r.failing {
                    format!(
                        " ({} non-EADDRINUSE, {} other errors)",
                        r.failing - r.eaddrinuse,
                        r.other_errors
                    )
                } else {
                    String::new()
                },
                fmt_opt(r.other_cpu, 0),
                target,
                res
            );
        }
    }
    if let Some(r) = exhaust {
        exhaustion::render(&mut m, r, &mut noisy);
    }
    if let Some(runs) = lat_runs {
        // 3
        let both = [&runs.plain, &runs.attach];
        let _ = writeln!(
            m,
            "\n## 3. Conflict latency (failing bind → its line read from the agent's stdout)\n"
        );
        let _ = writeln!(
            m,
            "{} probes per run, one every {} ms, each on its own held port, under {:.0} conn/s \
             background churn; CLOCK_REALTIME just before bind() to the moment a reader thread \
             got the line. Two runs, each with a fresh agent: one with nothing attached, one with \
             {} clients on the control socket (`{{\"cmd\":\"attach\"}}`), {} reading everything \
             and one that never reads. Attached clients get every event as a record, not only \
             conflicts, so the stalled one falls behind at once; the reading clients run in the \
             bench process and take CPU from the same {} cores.\n",
            PROBES,
            PROBE_SPACING.as_millis(),
            BACKGROUND_RATE,
            ATTACH_READERS + 1,
            ATTACH_READERS,
            host.cores
        );
        let _ = writeln!(
            m,
            "| metric | latency, no attach clients | latency, {} attach clients, one stalled | \
             target | result |\n|---|---:|---:|---|---|",
            ATTACH_READERS + 1
        );
        let row = |m: &mut String,
                   name: &str,
                   v: &dyn Fn(&LatencyResult) -> String,
                   target: &str,
                   ok: Option<&dyn Fn(&LatencyResult) -> bool>| {
            let res = match ok {
                Some(f) => both.map(|l| verdict(f(l))).join(" / "),
                None => "info".into(),
            };
            let _ = writeln!(
                m,
                "| {name} | {} | {} | {target} | {res} |",
                v(both[0]),
                v(both[1])
            );
        };
        let all_seen = |l: &LatencyResult| l.lat_ms.len() == l.sent;
        let p50 = |l: &LatencyResult| pct(&l.lat_ms, 50.0);
        let p99 = |l: &LatencyResult| pct(&l.lat_ms, 99.0);
        row(
            &mut m,
            "probes received",
            &|l| format!("{}/{}", l.lat_ms.len(), l.sent),
            "all",
            Some(&all_seen),
        );
        row(
            &mut m,
            "p50",
            &|l| format!("{:.2} ms", p50(l)),
            "≤ 2 ms",
            Some(&|l| p50(l) <= 2.0),
        );
        row(
            &mut m,
            "p99",
            &|l| format!("{:.2} ms", p99(l)),
            "≤ 20 ms",
            Some(&|l| p99(l) <= 20.0 && all_seen(l)),
        );
        row(
            &mut m,
            "max",
            &|l| format!("{:.2} ms", l.lat_ms.last().copied().unwrap_or(f64::NAN)),
            "–",
            None,
        );
        row(
            &mut m,
            "lost records (agent)",
            &|l| l.lost.to_string(),
            "0",
            Some(&|l| l.lost == 0),
        );
        row(
            &mut m,
            "background churn achieved",
            &|l| format!("{:.0} conn/s", l.churn_rate),
            "–",
            None,
        );
        row(
            &mut m,
            "agent CPU (of one core) / other processes",
            &|l| format!("{:.1}% / {}%", l.cpu_pct, fmt_opt(l.other_cpu, 0)),
            "–",
            None,
        );
        if let Some(a) = &runs.attach.attach {
            let _ = writeln!(
                m,
                "| stalled client: records it was told it missed, when it read at last after \
                 the window | – | {} | – | info |",
                a.stalled_missed
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "? (no note within 5 s)".into())
            );
            let _ = writeln!(
                m,
                "| {} reading clients: lines read, min / max (records missed, all of them) | – \
                 | {} / {} ({}) | – | info |",
                a.reader_lines.len(),
                a.reader_lines.iter().min().unwrap_or(&0),
                a.reader_lines.iter().max().unwrap_or(&0),
                a.reader_missed
            );
            let _ = writeln!(
                m,
                "| {} reading clients: CPU, summed (in the bench process, not in \"other \
                 processes\") | – | {:.0}% of one core | – | info |",
                a.reader_lines.len(),
                a.reader_cpu_pct
            );
        }
    }
    // 4
    let ready: Vec<f64> = rep.ready.iter().map(|r| r.0.as_secs_f64()).collect();
    let ready_med = median(ready.clone()).unwrap_or(f64::NAN);
    let ready_max = ready.iter().copied().fold(0.0, f64::max);
    let su: Vec<f64> = rep
        .ready
        .iter()
        .filter_map(|r| r.1.map(|v| v as f64))
        .collect();
    let su_med = median(su.clone()).unwrap_or(f64::NAN);
    let su_max = su.iter().copied().fold(0.0, f64::max);
    let lat = lat_runs.map(|r| &r.plain);
    let _ = writeln!(m, "\n## 4. Agent cost\n");
    let _ = writeln!(
        m,
        "| metric | value | target | result |\n|---|---:|---|---|"
    );
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| CPU, default mode, at {:.0} conn/s (utime+stime over {} s; other processes {}%) | {:.1}% of one core | – | info |",
            lat.churn_rate,
            s.window.as_secs(),
            fmt_opt(lat.other_cpu, 0),
            lat.cpu_pct
        );
    }
    if let Some(att) = lat_runs.map(|r| &r.attach) {
        let _ = writeln!(
            m,
            "| CPU, default mode, {} attach clients (one stalled), at {:.0} conn/s (other processes {}%) | {:.1}% of one core | – | info |",
            ATTACH_READERS + 1,
            att.churn_rate,
            fmt_opt(att.other_cpu, 0),
            att.cpu_pct
        );
    }
    if let Some(all) = all {
        let _ = writeln!(
            m,
            "| CPU, --all-events, at {:.0} conn/s ({} lines, {} lost; other processes {}%) | {:.1}% of one core | – | info |",
            all.churn_rate,
            all.lines,
            all.lost,
            fmt_opt(all.other_cpu, 0),
            all.cpu_pct
        );
    }
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| peak RSS (VmHWM), default, latency run | {:.1} MiB | – | info |",
            lat.hwm_kib as f64 / 1024.0
        );
    }
    if let Some(att) = lat_runs.map(|r| &r.attach) {
        let _ = writeln!(
            m,
            "| peak RSS (VmHWM), default, latency run with {} attach clients (one stalled) | {:.1} MiB | – | info |",
            ATTACH_READERS + 1,
            att.hwm_kib as f64 / 1024.0
        );
    }
    let _ = writeln!(
        m,
        "| peak RSS (VmHWM), highest of all default-mode runs (incl. bind storm) | {:.1} MiB | – | info |",
        rep.hwm_default as f64 / 1024.0
    );
    let _ = writeln!(
        m,
        "| peak RSS (VmHWM), highest of all --all-events runs | {:.1} MiB | – | info |",
        rep.hwm_all as f64 / 1024.0
    );
    let _ = writeln!(
        m,
        "| ready: spawn → ready line, median / max of {} starts | {:.0} / {:.0} ms | ≤ 1500 ms | {} |",
        ready.len(),
        ready_med * 1000.0,
        ready_max * 1000.0,
        verdict(!ready.is_empty() && ready_max <= 1.5)
    );
    let _ = writeln!(
        m,
        "| ready: startup_ms in the ready line, median / max | {su_med:.0} / {su_max:.0} ms | ≤ 1500 ms | {} |",
        verdict(!su.is_empty() && su_max <= 1500.0)
    );
    if let Some(lat) = lat {
        let _ = writeln!(
            m,
            "| latency run: ready wall / startup_ms / lost records | {:.0} ms / {} ms / {} | – | info |",
            lat.ready_wall.as_secs_f64() * 1000.0,
            lat.startup_ms
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into()),
            lat.lost
        );
    }
    for f in &rep.foreign {
        noisy.push(format!(
            "another process had tracing eBPF programs loaded during the bench: {f}; its hooks \
             ran under every configuration, \"no tracer\" included"
        ));
    }
    if !rep.warnings.is_empty() || !noisy.is_empty() {
        let _ = writeln!(m, "\n## Warnings\n");
        for w in rep.warnings.iter().chain(&noisy) {
            let _ = writeln!(m, "- {w}");
        }
    }
    m
}

// ---------------------------------------------------------------------------------------------
// churn.png: a bar chart written without a plotting dependency (a tiny RGB canvas, a 5x7 font,
// and a PNG encoder using stored deflate blocks: the file is larger but needs no zlib).

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![[255, 255, 255]; w * h],
        }
    }
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.max(0)..y1.min(self.h as i64) {
            for x in x0.max(0)..x1.min(self.w as i64) {
                self.px[y as usize * self.w + x as usize] = c;
            }
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let cols = glyph(ch.to_ascii_uppercase());
            for (i, col) in cols.iter().enumerate() {
                for row in 0..7 {
                    if col >> row & 1 == 1 {
                        let px = cx + i as i64 * scale;
                        let py = y + row * scale;
                        self.rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
    }
    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale
    }
    /// A straight line `thick` pixels wide; `dash`: (on, off) lengths in pixels, or solid.
    fn line(
        &mut self,
        (x0, y0): (i64, i64),
        (x1, y1): (i64, i64),
        thick: i64,
        dash: Option<(i64, i64)>,
        c: [u8; 3],
    ) {
        let (dx, dy) = (x1 - x0, y1 - y0);
        let n = dx.abs().max(dy.abs()).max(1);
        let h = thick / 2;
        for k in 0..=n {
            if dash.is_some_and(|(on, off)| k % (on + off) >= on) {
                continue;
            }
            let x = x0 + (dx * k + n / 2 * dx.signum()) / n;
            let y = y0 + (dy * k + n / 2 * dy.signum()) / n;
            self.rect(x - h, y - h, x - h + thick, y - h + thick, c);
        }
    }
    /// A filled marker about 2r+1 pixels across: shapes tell overlapping series apart.
    /// `hollow`: only the outline, for points taken while the machine was noisy.
    fn marker(&mut self, x: i64, y: i64, shape: Marker, c: [u8; 3], hollow: bool) {
        self.shape(x, y, shape, 5, c);
        if hollow {
            self.shape(x, y, shape, 3, [255, 255, 255]);
        }
    }
    fn shape(&mut self, x: i64, y: i64, shape: Marker, r: i64, c: [u8; 3]) {
        for oy in -r..=r {
            for ox in -r..=r {
                let inside = match shape {
                    Marker::Square => ox.abs() < r && oy.abs() < r,
                    Marker::Diamond => ox.abs() + oy.abs() <= r + 1,
                    Marker::Up => oy < r && 2 * ox.abs() <= oy + r,
                    Marker::Down => oy > -r && 2 * ox.abs() <= r - oy,
                    Marker::Disc => ox * ox + oy * oy <= r * r,
                };
                if inside {
                    self.rect(x + ox, y + oy, x + ox + 1, y + oy + 1, c);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Marker {
    Square,
    Diamond,
    Up,
    Down,
    Disc,
}

/// Columns of a 5x7 glyph, bit 0 at the top (the classic HD44780-style font).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0x3E, 0x51, 0x49, 0x45, 0x3E],
        '1' => [0x00, 0x42, 0x7F, 0x40, 0x00],
        '2' => [0x42, 0x61, 0x51, 0x49, 0x46],
        '3' => [0x21, 0x41, 0x45, 0x4B, 0x31],
        '4' => [0x18, 0x14, 0x12, 0x7F, 0x10],
        '5' => [0x27, 0x45, 0x45, 0x45, 0x39],
        '6' => [0x3C, 0x4A, 0x49, 0x49, 0x30],
        '7' => [0x01, 0x71, 0x09, 0x05, 0x03],
        '8' => [0x36, 0x49, 0x49, 0x49, 0x36],
        '9' => [0x06, 0x49, 0x49, 0x29, 0x1E],
        'A' => [0x7E, 0x11, 0x11, 0x11, 0x7E],
        'B' => [0x7F, 0x49, 0x49, 0x49, 0x36],
        'C' => [0x3E, 0x41, 0x41, 0x41, 0x22],
        'D' => [0x7F, 0x41, 0x41, 0x22, 0x1C],
        'E' => [0x7F, 0x49, 0x49, 0x49, 0x41],
        'F' => [0x7F, 0x09, 0x09, 0x09, 0x01],
        'G' => [0x3E, 0x41, 0x49, 0x49, 0x7A],
        'H' => [0x7F, 0x08, 0x08, 0x08, 0x7F],
        'I' => [0x00, 0x41, 0x7F, 0x41, 0x00],
        'J' => [0x20, 0x40, 0x41, 0x3F, 0x01],
        'K' => [0x7F, 0x08, 0x14, 0x22, 0x41],
        'L' => [0x7F, 0x40, 0x40, 0x40, 0x40],
        'M' => [0x7F, 0x02, 0x0C, 0x02, 0x7F],
        'N' => [0x7F, 0x04, 0x08, 0x10, 0x7F],
        'O' => [0x3E, 0x41, 0x41, 0x41, 0x3E],
        'P' => [0x7F, 0x09, 0x09, 0x09, 0x06],
        'Q' => [0x3E, 0x41, 0x51, 0x21, 0x5E],
        'R' => [0x7F, 0x09, 0x19, 0x29, 0x46],
        'S' => [0x46, 0x49, 0x49, 0x49, 0x31],
        'T' => [0x01, 0x01, 0x7F, 0x01, 0x01],
        'U' => [0x3F, 0x40, 0x40, 0x40, 0x3F],
        'V' => [0x1F, 0x20, 0x40, 0x20, 0x1F],
        'W' => [0x3F, 0x40, 0x38, 0x40, 0x3F],
        'X' => [0x63, 0x14, 0x08, 0x14, 0x63],
        'Y' => [0x07, 0x08, 0x70, 0x08, 0x07],
        'Z' => [0x61, 0x51, 0x49, 0x45, 0x43],
        '%' => [0x23, 0x13, 0x08, 0x64, 0x62],
        '.' => [0x00, 0x60, 0x60, 0x00, 0x00],
        ',' => [0x00, 0x50, 0x30, 0x00, 0x00],
        '-' => [0x08, 0x08, 0x08, 0x08, 0x08],
        '/' => [0x20, 0x10, 0x08, 0x04, 0x02],
        ':' => [0x00, 0x36, 0x36, 0x00, 0x00],
        '(' => [0x00, 0x1C, 0x22, 0x41, 0x00],
        ')' => [0x00, 0x41, 0x22, 0x1C, 0x00],
        '=' => [0x14, 0x14, 0x14, 0x14, 0x14],
        '+' => [0x08, 0x08, 0x3E, 0x08, 0x08],
        ';' => [0x00, 0x56, 0x36, 0x00, 0x00],
        _ => [0; 5],
    }
}

fn write_churn_png(path: &Path, churn: &ChurnResult) -> Result<()> {
    let base = churn.median_rate(Cfg::None).context("no baseline")?;
    let top = churn
        .samples
        .iter()
        .flatten()
        .map(|s| s.rate)
        .fold(base, f64::max)
        * 1.15;
    let (w, h) = (900usize, 480usize);
    let (left, right, plot_top, plot_bot) = (70i64, 880i64, 60i64, 400i64);
    let mut cv = Canvas::new(w, h);
    let ink = [40, 40, 40];
    cv.text(
        left,
        18,
        "LOOPBACK TCP CHURN: CONNECTIONS/S (MEDIAN, DOTS = ROUNDS)",
        2,
        ink,
    );
    let y_of = |v: f64| plot_bot - ((v / top) * (plot_bot - plot_top) as f64) as i64;
    // Axis, gridlines every 5000 conn/s.
    let step = if top > 60_000.0 { 10_000.0 } else { 5_000.0 };
    let mut g = 0.0;
    while g <= top {
        let y = y_of(g);
        cv.rect(left, y, right, y + 1, [225, 225, 225]);
        let lbl = format!("{}K", (g / 1000.0) as u64);
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += step;
    }
    cv.rect(left, plot_top, left + 1, plot_bot, ink);
    cv.rect(left, plot_bot, right, plot_bot + 1, ink);
    // Target lines: 97% and 93% of no tracer.
    for (f, c) in [(0.97, [0, 150, 0]), (0.93, [220, 140, 0])] {
        let y = y_of(base * f);
        let mut x = left;
        while x < right {
            cv.rect(x, y, (x + 6).min(right), y + 1, c);
            x += 10;
        }
        let lbl = format!("{:.0}%", f * 100.0);
        cv.text(right - Canvas::text_width(&lbl, 1), y - 9, &lbl, 1, c);
    }
    let n = churn.cfgs.len() as i64;
    let slot = (right - left) / n;
    for (i, &c) in churn.cfgs.iter().enumerate() {
        let Some(med) = churn.median_rate(c) else {
            continue;
        };
        let x0 = left + slot * i as i64 + slot / 5;
        let x1 = x0 + slot * 3 / 5;
        let color = style(c).0;
        cv.rect(x0, y_of(med), x1, plot_bot, color);
        for s in &churn.samples[i] {
            let y = y_of(s.rate);
            let xm = (x0 + x1) / 2;
            cv.rect(xm - 3, y - 3, xm + 4, y + 4, ink);
        }
        let val = format!("{:.0} ({:.1}%)", med, med / base * 100.0);
        let cx = (x0 + x1) / 2;
        cv.text(
            cx - Canvas::text_width(&val, 1) / 2,
            y_of(med) - 14,
            &val,
            1,
            ink,
        );
        let name = match c {
            Cfg::None => "NO TRACER",
            Cfg::PwDefault => "PORTWATCH",
            Cfg::PwAll => "PORTWATCH ALL",
            Cfg::Bpftrace => "BPFTRACE",
            Cfg::Floor => "FLOOR",
            Cfg::Tcpstates => "TCPSTATES",
        };
        cv.text(
            cx - Canvas::text_width(name, 2) / 2,
            plot_bot + 12,
            name,
            2,
            ink,
        );
        if c == Cfg::PwAll {
            let sub = "(--ALL-EVENTS)";
            cv.text(
                cx - Canvas::text_width(sub, 1) / 2,
                plot_bot + 32,
                sub,
                1,
                ink,
            );
        }
    }
    fs::write(path, encode_png(&cv)?).with_context(|| format!("writing {}", path.display()))
}

/// Colour and marker of each configuration, the same in both plots (index into CONFIGS).
const COLORS: [[u8; 3]; 5] = [
    [120, 120, 120],
    [30, 110, 200],
    [90, 160, 230],
    [200, 70, 60],
    [230, 150, 60],
];
const MARKERS: [Marker; 5] = [
    Marker::Square,
    Marker::Disc,
    Marker::Diamond,
    Marker::Up,
    Marker::Down,
];

fn style(c: Cfg) -> ([u8; 3], Marker) {
    if c == Cfg::Floor {
        return ([150, 150, 150], MARKERS[0]);
    }
    let k = CONFIGS.iter().position(|&x| x == c).unwrap_or(0);
    (COLORS[k], MARKERS[k])
}

/// A round grid step giving about 4-8 lines up to `top`.
fn grid_step(top: f64) -> f64 {
    let raw = top / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|&st| st >= raw)
        .unwrap_or(10.0 * mag)
}

fn thousands(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v % 1000.0 == 0.0 {
        format!("{}K", (v / 1000.0) as u64)
    } else {
        format!("{:.1}K", v / 1000.0)
    }
}

/// A plotted point: pixel position, and whether it was measured on a noisy machine.
type Pt = (i64, i64, bool);

/// churn.png: achieved connections/s against offered rate, one line per configuration, with
/// the ideal achieved = offered line; the unpaced (max) points sit in a column of their own at
/// the right. Below it, each tracer's CPU at the same rates.
fn write_sweep_png(path: &Path, sw: &SweepResult) -> Result<()> {
    let paced: Vec<(usize, f64)> = sw
        .rates
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    let max_i = sw.rates.iter().position(|r| r.is_none());
    let x_hi = paced.iter().map(|p| p.1).fold(0.0, f64::max);
    if x_hi <= 0.0 || sw.samples.is_empty() {
        bail!("no paced rates");
    }
    let x_top = x_hi * 1.08;
    let y_top = sw
        .samples
        .iter()
        .flatten()
        .map(|x| x.rate)
        .fold(x_hi, f64::max)
        * 1.1;
    let cpu_top = sw
        .samples
        .iter()
        .flatten()
        .filter_map(|x| x.tracer_cpu)
        .fold(10.0, f64::max)
        * 1.15;

    let (w, h) = (1020usize, 770usize);
    let (left, right) = (80i64, 770i64);
    let (top1, bot1) = (76i64, 450i64);
    let (top2, bot2) = (548i64, 720i64);
    // Paced rates map onto [left, num_right]; the unpaced column sits at max_x.
    let num_right = right - 80;
    let max_x = right - 32;
    let ink = [40, 40, 40];
    let grid = [225, 225, 225];
    let mut cv = Canvas::new(w, h);
    cv.text(
        left,
        16,
        "LOOPBACK TCP CHURN: ACHIEVED AGAINST OFFERED RATE",
        2,
        ink,
    );
    let x_of = |v: f64| left + (v / x_top * (num_right - left) as f64).round() as i64;
    let y1_of = |v: f64| bot1 - (v / y_top * (bot1 - top1) as f64).round() as i64;
    let y2_of = |v: f64| bot2 - (v / cpu_top * (bot2 - top2) as f64).round() as i64;

    // Grids, axes and labels of both panels.
    let mut g = 0.0;
    let st = grid_step(y_top);
    while g <= y_top {
        let y = y1_of(g);
        cv.rect(left, y, right, y + 1, grid);
        let lbl = thousands(g);
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += st;
    }
    let mut g = 0.0;
    let st = grid_step(cpu_top);
    while g <= cpu_top {
        let y = y2_of(g);
        cv.rect(left, y, right, y + 1, grid);
        let lbl = format!("{g:.0}%");
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += st;
    }
    let mut g = 0.0;
    let st = grid_step(x_top);
    while g <= x_top {
        let x = x_of(g);
        for (t, b) in [(top1, bot1), (top2, bot2)] {
            cv.rect(x, t, x + 1, b, grid);
            let lbl = thousands(g);
            cv.text(x - Canvas::text_width(&lbl, 1) / 2, b + 8, &lbl, 1, ink);
        }
        g += st;
    }
    for (t, b) in [(top1, bot1), (top2, bot2)] {
        cv.rect(left, t, left + 1, b, ink);
        cv.rect(left, b, right, b + 1, ink);
        if max_i.is_some() {
            // The break between the paced axis and the unpaced column.
            cv.line(
                (max_x - 26, t),
                (max_x - 26, b),
                1,
                Some((3, 4)),
                [150, 150, 150],
            );
            cv.text(
                max_x - Canvas::text_width("MAX", 1) / 2,
                b + 8,
                "MAX",
                1,
                ink,
            );
        }
    }
    cv.text(left - 60, top1 - 22, "ACHIEVED CONN/S", 1, ink);
    cv.text(
        left - 60,
        top2 - 22,
        "TRACER CPU, % OF ONE CORE (TRACER PROCESS ONLY)",
        1,
        ink,
    );
    let xlabel = format!(
        "OFFERED CONN/S ({} S PER POINT, PACED; MAX = UNPACED)",
        sw.window.as_secs()
    );
    cv.text(
        (left + right) / 2 - Canvas::text_width(&xlabel, 1) / 2,
        bot2 + 26,
        &xlabel,
        1,
        ink,
    );

    // The ideal: every offered connection achieved.
    let ideal = [150, 150, 150];
    cv.line(
        (x_of(0.0), y1_of(0.0)),
        (x_of(x_top), y1_of(x_top)),
        2,
        Some((8, 6)),
        ideal,
    );

    // One line per configuration; the unpaced point joined by a dotted line.
    let mut any_noisy = false;
    for (ci, &c) in sw.cfgs.iter().enumerate() {
        let (color, mk) = style(c);
        // (x, y, noisy) per paced rate, then the unpaced point.
        let at = |ri: usize, x: i64, v: Option<f64>, y_of: &dyn Fn(f64) -> i64| {
            v.map(|v| (x, y_of(v), sw.samples[ri][ci].noisy))
        };
        let rate = |ri: usize| Some(sw.samples[ri][ci].rate);
        let cpu = |ri: usize| sw.samples[ri][ci].tracer_cpu;
        let mut series: Vec<(Vec<Pt>, Option<Pt>)> = Vec::new();
        series.push((
            paced
                .iter()
                .filter_map(|&(ri, r)| at(ri, x_of(r), rate(ri), &y1_of))
                .collect(),
            max_i.and_then(|ri| at(ri, max_x, rate(ri), &y1_of)),
        ));
        if c != Cfg::None {
            series.push((
                paced
                    .iter()
                    .filter_map(|&(ri, r)| at(ri, x_of(r), cpu(ri), &y2_of))
                    .collect(),
                max_i.and_then(|ri| at(ri, max_x, cpu(ri), &y2_of)),
            ));
        }
        for (pts, mx) in series {
            for p in pts.windows(2) {
                cv.line((p[0].0, p[0].1), (p[1].0, p[1].1), 3, None, color);
            }
            if let (Some(last), Some(m)) = (pts.last(), mx) {
                cv.line((last.0, last.1), (m.0, m.1), 1, Some((2, 3)), color);
            }
            for (x, y, noisy) in pts.into_iter().chain(mx) {
                any_noisy |= noisy;
                cv.marker(x, y, mk, color, noisy);
            }
        }
    }

    // Legend, right of the top panel.
    let lx = right + 20;
    let mut ly = top1 + 10;
    for &c in &sw.cfgs {
        let (color, mk) = style(c);
        cv.line((lx, ly), (lx + 26, ly), 3, None, color);
        cv.marker(lx + 13, ly, mk, color, false);
        let name = match c {
            Cfg::None => "NO TRACER",
            Cfg::PwDefault => "PORTWATCH (DEFAULT)",
            Cfg::PwAll => "PORTWATCH --ALL-EVENTS",
            Cfg::Bpftrace => "BPFTRACE",
            Cfg::Floor => "FLOOR",
            Cfg::Tcpstates => "TCPSTATES",
        };
        cv.text(lx + 34, ly - 3, name, 1, ink);
        ly += 22;
    }
    cv.line((lx, ly), (lx + 26, ly), 2, Some((8, 6)), ideal);
    cv.text(lx + 34, ly - 3, "ACHIEVED = OFFERED", 1, ink);
    if any_noisy {
        ly += 22;
        cv.marker(lx + 13, ly, Marker::Square, ink, true);
        cv.text(lx + 34, ly - 3, "NOISY POINT (SEE", 1, ink);
        cv.text(lx + 34, ly + 9, "WARNINGS IN RESULTS.MD)", 1, ink);
    }
    fs::write(path, encode_png(&cv)?).with_context(|| format!("writing {}", path.display()))
}

/// The canvas as an 8-bit RGB PNG, by the `png` crate.
fn encode_png(cv: &Canvas) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, cv.w as u32, cv.h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = cv.px.iter().flatten().copied().collect();
    let mut w = enc.write_header().context("encoding the PNG header")?;
    w.write_image_data(&data).context("encoding the PNG data")?;
    w.finish().context("finishing the PNG")?;
    Ok(out)
}

/// One listener per unrelated-conflict probe, each on a port of its own, so that a probe's
/// conflict line is known by its port; and when each probe's line arrived (wall ns, 0 until
/// it does).
struct ProbeHolders {
    holders: Vec<(Fd, u16)>,
    index: Arc<Vec<u16>>,
    arrivals: Arc<Vec<AtomicI64>>,
}

/// What a reader thread needs to time the probes' lines.
struct ProbeMarks {
    index: Arc<Vec<u16>>,
    arrivals: Arc<Vec<AtomicI64>>,
}

impl ProbeHolders {
    fn new(n: usize) -> Result<ProbeHolders> {
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

    fn marks(&self) -> ProbeMarks {
        ProbeMarks {
            index: self.index.clone(),
            arrivals: self.arrivals.clone(),
        }
    }
}

impl ProbeMarks {
    /// A conflict line on `port` arrived at `now`: the first one of a probe is its time.
    /// Whether `port` is a probe's.
    fn arrived(&self, port: u64, now: i64) -> bool {
        let i = self.index[port as usize & 0xffff];
        if i == u16::MAX {
            return false;
        }
        let _ = self.arrivals[i as usize].compare_exchange(0, now, Relaxed, Relaxed);
        true
    }
}

/// Where a reader thread sends the agent's `ready` line, with when it was read.
type ReadyLine = mpsc::Receiver<(Instant, String)>;

/// A thread reading the agent's stdout until EOF (the agent exited; so bounded by its
/// life): each line is handed to `f` with the wall time it was read, and the `ready` line
/// is also sent on the returned channel. The thread returns `state`.
fn read_agent_lines<S: Send + 'static>(
    stdout: ChildStdout,
    name: &str,
    mut state: S,
    mut f: impl FnMut(&mut S, &str, i64) + Send + 'static,
) -> Result<(thread::JoinHandle<S>, ReadyLine)> {
    let (ready_tx, ready_rx) = mpsc::channel::<(Instant, String)>();
    let h = thread::Builder::new().name(name.into()).spawn(move || {
        let mut r = BufReader::with_capacity(1 << 16, stdout);
        let mut buf = Vec::with_capacity(4096);
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let now = realtime_ns();
            let Ok(line) = std::str::from_utf8(&buf) else {
                continue;
            };
            if record_type(line) == "agent" && line.contains("\"event\":\"ready\"") {
                let _ = ready_tx.send((Instant::now(), line.to_string()));
            }
            f(&mut state, line, now);
        }
        state
    })?;
    Ok((h, ready_rx))
}

/// The agent's `ready` line (when it was read, and the line), or why it never came.
fn wait_ready(t: &mut Tracer, ready: &ReadyLine) -> Result<(Instant, String)> {
    match ready.recv_timeout(READY_TIMEOUT) {
        Ok(v) => Ok(v),
        Err(_) => {
            t.check_alive()?;
            bail!(
                "the agent did not report ready within {READY_TIMEOUT:?}:\n{}",
                t.stderr_tail()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rate: f64, cpu: Option<f64>) -> ChurnSample {
        ChurnSample {
            rate,
            failures: 0,
            tracer_cpu: cpu,
            other_cpu: Some(0.0),
            noisy: false,
            cpu_us_per_conn: None,
        }
    }

    /// The median's interval from order statistics, against binomial tables: k = 1 at n = 6
    /// (coverage 1 - 2/64), k = 3 at n = 12 (1 - 2*79/4096), k = 6 at n = 20; none below 6.
    #[test]
    fn median_ci_uses_binomial_order_statistics() {
        let v = |n: usize| (1..=n).rev().map(|x| x as f64).collect::<Vec<_>>();
        assert_eq!(median_ci(&v(5)), None);
        let (a, b, c) = median_ci(&v(6)).unwrap();
        assert_eq!((a, b), (1.0, 6.0));
        assert!((c - (1.0 - 2.0 / 64.0)).abs() < 1e-12);
        let (a, b, c) = median_ci(&v(12)).unwrap();
        assert_eq!((a, b), (3.0, 10.0));
        assert!((c - (1.0 - 2.0 * 79.0 / 4096.0)).abs() < 1e-12);
        let (a, b, c) = median_ci(&v(20)).unwrap();
        assert_eq!((a, b), (6.0, 15.0));
        assert!((0.95..0.96).contains(&c), "{c}");
    }

    /// The sweep plot renders from plausible numbers (set BENCH_PLOT_OUT to keep the file).
    #[test]
    fn sweep_png_renders() {
        let rates = SWEEP_RATES.to_vec();
        let caps = [23_500.0, 20_300.0, 14_700.0, 9_100.0, 12_400.0];
        let cpu_per_k = [0.0, 0.08, 1.4, 6.2, 4.0];
        let samples = rates
            .iter()
            .map(|r| {
                CONFIGS
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        let got = r.map_or(caps[i], |r: f64| r.min(caps[i]) * 0.995);
                        let cpu = (i > 0).then(|| got / 1000.0 * cpu_per_k[i]);
                        let mut x = sample(got, cpu);
                        x.noisy = i == 3 && r.is_none();
                        x
                    })
                    .collect()
            })
            .collect();
        let sw = SweepResult {
            cfgs: CONFIGS.to_vec(),
            rates,
            window: Duration::from_secs(5),
            samples,
            lost: vec![0; CONFIGS.len()],
        };
        let path = std::env::var_os("BENCH_PLOT_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("sweep-{}.png", std::process::id()))
            });
        write_sweep_png(&path, &sw).unwrap();
        let png = fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        if std::env::var_os("BENCH_PLOT_OUT").is_none() {
            let _ = fs::remove_file(&path);
        }
    }

    #[test]
    fn grid_steps_are_round() {
        assert_eq!(grid_step(25_000.0), 5_000.0);
        assert_eq!(grid_step(12.0), 2.0);
        assert_eq!(grid_step(70.0), 20.0);
    }
}
