//! Machine and peers: the host, and the tracers portwatch is compared with (an equivalent
//! bpftrace script, libbpf-tools' tcpstates). Tracer processes: each configuration's process,
//! started, waited for until it is attached, and stopped; and the agent's stdout read line by
//! line as it comes.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    cpu::read_loadavg,
    note,
    stats::{realtime_ns, record_type},
    Settings, READY_TIMEOUT,
};

pub(super) struct Host {
    pub(super) date: String,
    pub(super) kernel: String,
    pub(super) cpu: String,
    pub(super) cores: usize,
    pub(super) load_start: String,
}

impl Host {
    pub(super) fn probe() -> Host {
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
                .map(std::num::NonZero::get)
                .unwrap_or(0),
            load_start: read_loadavg(),
        }
    }
}

pub(super) struct Peers {
    pub(super) bpftrace: bool,
    pub(super) tcpstates: bool,
}

const TCPSTATES: &str = "/usr/sbin/tcpstates";

/// bpftrace and libbpf-tools, installed only when missing (`apt-get update` only if the
/// install fails, e.g. on a machine whose package lists were never fetched). A peer that still
/// cannot be found is left out of the comparison and reported as such, rather than failing the
/// whole bench.
pub(super) fn ensure_peers() -> Peers {
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
pub(super) const BPFTRACE_SCRIPT: &str = r#"
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
pub(super) const FLOOR_SCRIPT: &str = r#"
BEGIN { printf("ready\n"); }
tracepoint:syscalls:sys_enter_bind, tracepoint:syscalls:sys_exit_bind /pid == 0/ { @never = count(); }
"#;

// ---------------------------------------------------------------------------------------------
// Tracer processes

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Cfg {
    None,
    /// bpftrace with FLOOR_SCRIPT (churn only).
    Floor,
    PwDefault,
    /// `--baseline`: another build of portwatch, default mode (churn only).
    PwBaseline,
    PwAll,
    /// `--baseline` with `--all-events` (churn only): where the cost of writing each record
    /// shows.
    PwBaselineAll,
    Bpftrace,
    Tcpstates,
}

pub(super) const CONFIGS: [Cfg; 5] = [
    Cfg::None,
    Cfg::PwDefault,
    Cfg::PwAll,
    Cfg::Bpftrace,
    Cfg::Tcpstates,
];

impl Cfg {
    pub(super) fn name(self) -> &'static str {
        match self {
            Cfg::None => "no-tracer",
            Cfg::Floor => "syscall-tp-floor",
            Cfg::PwDefault => "portwatch-default",
            Cfg::PwBaseline => "portwatch-baseline",
            Cfg::PwAll => "portwatch-all-events",
            Cfg::PwBaselineAll => "portwatch-baseline-all-events",
            Cfg::Bpftrace => "bpftrace",
            Cfg::Tcpstates => "tcpstates",
        }
    }
    pub(super) fn label(self) -> &'static str {
        match self {
            Cfg::None => "no tracer",
            Cfg::Floor => "floor: syscall entry and exit tracepoints, never firing (bpftrace)",
            Cfg::PwDefault => "portwatch (default)",
            Cfg::PwBaseline => "portwatch (default), --baseline build",
            Cfg::PwAll => "portwatch --all-events",
            Cfg::PwBaselineAll => "portwatch --all-events, --baseline build",
            Cfg::Bpftrace => "bpftrace (same tracepoints, same facts)",
            Cfg::Tcpstates => "libbpf-tools tcpstates",
        }
    }
    pub(super) fn is_agent(self) -> bool {
        matches!(
            self,
            Cfg::PwDefault | Cfg::PwBaseline | Cfg::PwAll | Cfg::PwBaselineAll
        )
    }

    /// A portwatch configuration that writes every event (`--all-events`).
    pub(super) fn all_events(self) -> bool {
        matches!(self, Cfg::PwAll | Cfg::PwBaselineAll)
    }
}

/// A running tracer. Dropping it stops it: SIGINT (so it detaches and flushes), then SIGKILL
/// if it does not exit in time.
pub(super) struct Tracer {
    cfg: Cfg,
    pub(super) child: Child,
    pub(super) exited: Option<ExitStatus>,
    pub(super) spawned: Instant,
    pub(super) out: PathBuf,
    err: PathBuf,
    /// The agent's --runtime-dir (its control socket lives there), when the bench set one.
    pub(super) runtime_dir: Option<PathBuf>,
}

pub(super) enum Sink {
    /// stdout to a file: the tracer is never blocked and the bench spends nothing reading it.
    File,
    /// stdout through a pipe the caller reads (latency: arrival times of lines).
    Pipe,
}

impl Tracer {
    pub(super) fn spawn(
        s: &Settings,
        cfg: Cfg,
        tag: &str,
        sink: Sink,
    ) -> Result<(Tracer, Option<ChildStdout>)> {
        let out = s.dir.join(format!("{tag}.out"));
        let err = s.dir.join(format!("{tag}.err"));
        let (mut c, runtime_dir) = Self::command(s, cfg, tag)?;
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

    /// The command that starts `cfg`, and the agent's --runtime-dir if the bench set one.
    fn command(s: &Settings, cfg: Cfg, tag: &str) -> Result<(Command, Option<PathBuf>)> {
        let mut runtime_dir = None;
        let c = match cfg {
            Cfg::None => bail!("no tracer to spawn"),
            Cfg::PwDefault | Cfg::PwBaseline | Cfg::PwAll | Cfg::PwBaselineAll => {
                let (bin, args) = match (cfg, &s.baseline) {
                    (Cfg::PwBaseline | Cfg::PwBaselineAll, Some(b)) => (b, &s.baseline_args),
                    (Cfg::PwBaseline | Cfg::PwBaselineAll, None) => {
                        bail!("no --baseline binary given")
                    }
                    _ => (&s.agent, &s.agent_args),
                };
                let mut c = Command::new(bin);
                c.arg("run");
                // A runtime dir per start: the single-instance lock of an agent that is still
                // detaching must not refuse the next one.
                let mut args = args.iter();
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
                if cfg.all_events() {
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
        Ok((c, runtime_dir))
    }

    pub(super) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr_tail(&self) -> String {
        let s = fs::read_to_string(&self.err).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails with the tracer's stderr if it has exited.
    pub(super) fn check_alive(&mut self) -> Result<()> {
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
    pub(super) fn wait_ready_file(&mut self) -> Result<(Duration, String)> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&self.out) {
                let found = text.lines().find(|l| match self.cfg {
                    Cfg::PwDefault | Cfg::PwBaseline | Cfg::PwAll | Cfg::PwBaselineAll => {
                        l.contains("\"event\":\"ready\"")
                    }
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
    pub(super) fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
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

    pub(super) fn remove_logs(&self, keep: bool) {
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

/// Other processes that hold tracing eBPF programs (kprobe, tracepoint, perf_event, raw
/// tracepoint, tracing): another agent (a soak test, say) or a forgotten bpftrace. Their
/// hooks run in every configuration, "no tracer" included, so the comparison is skewed while
/// they live. `ours`: the bench's own tracer child, if one is running.
pub(super) fn foreign_tracers(ours: Option<i32>) -> Vec<String> {
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

/// Where a reader thread sends the agent's `ready` line, with when it was read.
type ReadyLine = mpsc::Receiver<(Instant, String)>;

/// A thread reading the agent's stdout until EOF (the agent exited; so bounded by its
/// life): each line is handed to `f` with the wall time it was read, and the `ready` line
/// is also sent on the returned channel. The thread returns `state`.
pub(super) fn read_agent_lines<S: Send + 'static>(
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
pub(super) fn wait_ready(t: &mut Tracer, ready: &ReadyLine) -> Result<(Instant, String)> {
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
