//! `cargo xtask vm-test`: the agent and its end-to-end tests on Debian's distribution
//! kernels, each booted in qemu from an initramfs, and a kernel matrix of the results.
//!
//! An initramfs needs no disk image, no network and (almost) no modules: the guest is
//! busybox, the agent, the test binaries and the host's own iproute2, and its /init prints
//! marker lines on the serial console that this side parses. The same check script runs on
//! this host for the `host` row, so every row answers the same questions the same way.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::ValueEnum;
use serde_json::{json, Value};

use crate::{cargo, run, setup, step, workspace_root};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// Debian 11 (bullseye)
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm)
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13 (trixie)
    #[value(name = "6.12")]
    V6_12,
    /// Debian unstable: the newest kernel Debian ships
    Sid,
    /// This machine's own kernel, without a VM
    Host,
    /// 5.10, 6.1, 6.12, sid and host
    All,
}

impl Kernel {
    fn label(self) -> &'static str {
        match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
            Kernel::Sid => "sid",
            Kernel::Host => "host",
            Kernel::All => "all",
        }
    }

    fn suite(self) -> Option<&'static str> {
        match self {
            Kernel::V5_10 => Some("bullseye"),
            Kernel::V6_1 => Some("bookworm"),
            Kernel::V6_12 => Some("trixie"),
            Kernel::Sid => Some("sid"),
            Kernel::Host | Kernel::All => None,
        }
    }
}

/// What `cargo xtask vm-test` and `cargo xtask test` run when no kernel is named: the
/// Debian kernels still in support.
pub const DEFAULT_KERNELS: &[Kernel] = &[Kernel::V5_10, Kernel::V6_1, Kernel::V6_12];

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel to test; repeatable. Default: 5.10, 6.1 and 6.12.
    #[arg(long = "kernel", value_enum, value_name = "KERNEL")]
    pub kernels: Vec<Kernel>,
    /// Only run the in-guest tests whose name contains this string.
    #[arg(long, value_name = "FILTER")]
    pub tests: Option<String>,
    /// Only the CI subset of the in-guest tests (marked in xtask/src/vm.rs).
    #[arg(long)]
    pub ci: bool,
}

/// The in-guest tests, as TARGET::NAME. They need nothing but a kernel, root, `ip` and
/// `ss`; the Docker and soak tests stay on the host.
const TESTS: &[&str] = &[
    "pipeline::tcp_ipv4_loopback_conflict",
    "pipeline::ipv6_loopback_conflict",
    "pipeline::udp_conflict",
    "pipeline::wildcard_held_specific_attempted",
    "pipeline::listen_time_conflict",
    "pipeline::same_port_in_two_namespaces_is_no_conflict",
    "pipeline::ring_buffer_overflow_is_counted_exactly",
    "pipeline::connect_eaddrnotavail_names_the_destination",
    "attribution::listener_started_before_the_agent_is_attributed",
    "attribution::dual_stack_listener_blocks_ipv4",
    "attribution::restart_without_reuseaddr_hits_time_wait",
    "attribution::conflict_inside_a_namespace_names_the_holder_there",
    "attribution::ephemeral_exhaustion_counts_ports_toward_the_destination",
    "attribution::time_wait_counts_match_ss",
    "attribution::time_wait_entries_and_exits_are_counted",
    "attribution::udp_holder",
    "pipeline::io_uring_bind_and_listen_are_seen",
];

/// Tests that only one hook family on new enough kernels can pass, as FAMILY:MAJOR.MINOR
/// (they are `#[ignore]`d in a plain `cargo test`, which has neither guarantee).
const ONLY: &[(&str, &str)] = &[("io_uring_bind_and_listen_are_seen", "trampoline:6.11")];

/// `--ci`: a conflict with its holder and cause, the listen-time conflict, a namespace, and
/// exact loss accounting, for when minutes per kernel matter more than coverage.
const CI_TESTS: &[&str] = &[
    "listener_started_before_the_agent_is_attributed",
    "listen_time_conflict",
    "conflict_inside_a_namespace_names_the_holder_there",
    "ring_buffer_overflow_is_counted_exactly",
];

/// Test targets built for the guest (faults is not in TESTS yet but is built alongside).
const TEST_TARGETS: &[&str] = &["pipeline", "attribution", "faults"];

/// Socket diagnostics are modules in Debian's kernels, and with no modprobe in the guest
/// nothing autoloads them: without them `ss` and the agent's sock_diag see nothing.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "udp_diag"];

const MARK: &str = "PWVM|";
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds the agent gets to print `ready`, and each test to finish, in the guest.
const READY_SECS: u32 = 60;
const TEST_SECS: u32 = 300;
/// The whole row: boot, the agent check and doctor, then each test's share. A test takes
/// 3-30 s under TCG; one that hangs until TEST_SECS still leaves the rest their time.
fn row_timeout(tests: usize) -> Duration {
    BOOT_TIMEOUT + Duration::from_secs(120 + 60 * tests as u64)
}

/// The checks every row runs, guest or host: start the agent alone and report its `agent`
/// records (or its stderr: a verifier rejection shows there) and what `doctor` says, then
/// run each test on its own. POSIX sh, so busybox ash and dash run it alike.
const CHECKS: &str = r#"exec 2>&1
M=PWVM
now() { cut -d' ' -f1 /proc/uptime; }
w=${TMPDIR:-/tmp}/pwvm-checks.$$
rm -rf "$w"; mkdir -p "$w"
echo "$M|agent-start|$(now)"
"$PW_AGENT" run --no-log-file --no-docker --runtime-dir "$w/rt" >"$w/out" 2>"$w/err" </dev/null &
pid=$!
ready=0
i=0
while [ "$i" -lt "$((PW_READY_SECS * 10))" ]; do
  if grep -q '"event":"ready"' "$w/out"; then ready=1; break; fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
  i=$((i + 1))
done
# doctor while the agent still runs (if it does), so its agent check means something; this
# also gives degraded records, which follow ready, time to arrive.
timeout 120 "$PW_AGENT" doctor --runtime-dir "$w/rt" >"$w/doc" 2>&1 </dev/null
echo "$?" >"$w/doc-rc"
kill -TERM "$pid" 2>/dev/null
(sleep 20; kill -KILL "$pid") >/dev/null 2>&1 &
killer=$!
wait "$pid"
rc=$?
kill "$killer" 2>/dev/null
grep '"type":"agent"' "$w/out" | sed "s/^/$M|agent|/"
sed "s/^/$M|agent-stderr|/" "$w/err"
echo "$M|agent-exit|$rc|$ready"
sed "s/^/$M|doctor|/" "$w/doc"
echo "$M|doctor-exit|$(cat "$w/doc-rc")"
if [ "$ready" != 1 ]; then
  echo "$M|skip|the agent did not start"
else
  # Every test runs with each hook family the kernel has: trampolines where `auto` picked
  # them, and the syscall tracepoints everywhere. A line's third field, FAMILY:MAJOR.MINOR,
  # runs it only with that family on that kernel or newer.
  hooks=$(sed -n 's/.*"event":"ready".*"hooks":"\([a-z]*\)".*/\1/p' "$w/out" | head -n 1)
  fams=tracepoint
  [ "$hooks" = trampoline ] && fams="trampoline tracepoint"
  r=$(uname -r); maj=${r%%.*}; rest=${r#*.}; min=${rest%%.*}; min=${min%%[!0-9]*}
  kv=$((maj * 1000 + min))
  : >"$w/plan"
  for fam in $fams; do
    while read -r bin name only; do
      [ -n "$name" ] || continue
      flag=
      if [ -n "$only" ]; then
        ofam=${only%%:*}; ov=${only#*:}; omaj=${ov%%.*}; omin=${ov#*.}
        [ "$ofam" = "$fam" ] || continue
        [ "$kv" -ge "$((omaj * 1000 + omin))" ] || continue
        flag=--ignored
      fi
      echo "$fam $bin $name $flag" >>"$w/plan"
    done <"$PW_LIST"
  done
  echo "$M|families|$fams|$(wc -l <"$w/plan" | tr -d ' ')"
  while read -r fam bin name flag; do
    label="$name@$fam"
    t0=$(now)
    echo "$M|test-start|$label|$t0"
    PORTWATCH_HOOKS="$fam" PORTWATCH_BIN="$PW_AGENT" timeout "$PW_TEST_SECS" "$bin" --exact "$name" $flag --test-threads=1 >"$w/t" 2>&1 </dev/null
    rc=$?
    t1=$(now)
    if [ "$rc" = 0 ] && grep -q '^test result: ok. 1 passed' "$w/t"; then
      echo "$M|test|ok|$label|$t0|$t1|$rc"
    else
      sed "s/^/$M|test-out|$label|/" "$w/t"
      echo "$M|test|FAILED|$label|$t0|$t1|$rc"
    fi
  done <"$w/plan"
fi
rm -rf "$w"
echo "$M|done|$(now)"
"#;

/// The guest's /init. Busybox's ash runs its own `ip` applet whatever PATH says, so the real
/// iproute2 is called by its path (@IP@).
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
# No tmpfs on /tmp: the initramfs is in RAM already, and the test binaries and pw-hold sit
# at their build paths, which are under /tmp when the workspace is (a fresh clone in CI).
mkdir -p /tmp && chmod 1777 /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mkdir -p /run/netns
# Boot messages stay in the log; later ones would split the marker lines.
dmesg -n 1
hostname pwvm
while read -r m; do
  insmod "/lib/modules/pw/$m.ko" || echo "PWVM|warn|insmod $m failed"
done </pw/modules.list
@IP@ link set lo up
echo "PWVM|init|$(uname -r)|$(cut -d' ' -f1 /proc/uptime)"
PW_AGENT=/pw/bin/portwatch PW_LIST=/pw/tests.list PW_READY_SECS=@READY@ PW_TEST_SECS=@TEST@ sh /pw/checks.sh
poweroff -f
"#;

const PROBE_INIT: &str = "#!/bin/sh\necho PWVM|probe\npoweroff -f\n";

/// `cargo xtask vm-test`.
pub fn run_cmd(args: VmArgs) -> Result<()> {
    let kernels = if args.kernels.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        args.kernels
    };
    run_tests(&kernels, args.tests.as_deref(), args.ci)
}

/// The kernel matrix for these kernels with every in-guest test; results in target/vm/.
pub fn run_matrix(kernels: &[Kernel]) -> Result<()> {
    run_tests(kernels, None, false)
}

fn expand(kernels: &[Kernel]) -> Vec<Kernel> {
    let mut out = Vec::new();
    for &k in kernels {
        let ks: &[Kernel] = if k == Kernel::All {
            &[
                Kernel::V5_10,
                Kernel::V6_1,
                Kernel::V6_12,
                Kernel::Sid,
                Kernel::Host,
            ]
        } else {
            std::slice::from_ref(&k)
        };
        for &k in ks {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

fn run_tests(kernels: &[Kernel], filter: Option<&str>, ci: bool) -> Result<()> {
    let kernels = expand(kernels);
    let tests: Vec<(&str, &str)> = TESTS
        .iter()
        .filter_map(|t| t.split_once("::"))
        .filter(|(_, name)| {
            (!ci || CI_TESTS.contains(name)) && filter.is_none_or(|f| name.contains(f))
        })
        .collect();
    if tests.is_empty() {
        bail!(
            "no in-guest test matches {:?}; they are:\n  {}",
            filter.unwrap_or_default(),
            TESTS.join("\n  ")
        );
    }
    let vms = kernels.iter().any(|k| *k != Kernel::Host);
    if vms {
        setup::for_vm()?;
    } else {
        setup::build()?;
    }
    let agent = crate::build_agent(true)?;
    // The guests run the static musl build, the one `cargo xtask package` ships as
    // portwatch-<version>-x86_64-linux: it needs nothing from the guest's C library, and so
    // every kernel in the matrix also runs the binary users install.
    let guest_agent = if vms {
        crate::package::musl_target()?;
        Some(crate::package::build_static()?)
    } else {
        None
    };
    let bins = build_test_bins()?;
    let out_dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&out_dir)?;

    let busybox = if vms { Some(busybox()) } else { None };
    let mut accel: Option<Result<Accel, String>> = None;
    let mut rows = Vec::new();
    for &k in &kernels {
        let t = Instant::now();
        let mut row = Row::new(k, &out_dir);
        if k == Kernel::Host {
            run_host(&mut row, &agent, &bins, &tests);
        } else {
            let r = (|| -> Result<()> {
                let bb = busybox
                    .as_ref()
                    .expect("fetched when there are VMs")
                    .as_ref()
                    .map_err(|e| anyhow!("busybox: {e:#}"))?;
                let kf = fetch_kernel(k).context("fetching the kernel failed")?;
                row.release = Some(kf.release.clone());
                let a = accel
                    .get_or_insert_with(|| {
                        detect_accel(&kf, bb, &out_dir).map_err(|e| format!("{e:#}"))
                    })
                    .clone()
                    .map_err(|e| anyhow!("choosing the accelerator failed: {e}"))?;
                row.accel = a.name.to_string();
                let image = out_dir.join(format!("{}.cpio", k.label()));
                build_image(
                    &image,
                    bb,
                    &kf,
                    guest_agent.as_deref().unwrap_or(&agent),
                    &bins,
                    &Payload {
                        tests: &tests,
                        script: CHECKS,
                        extra: &[],
                    },
                )
                .context("building the initramfs failed")?;
                run_vm(&mut row, &kf, &a, &image, tests.len());
                Ok(())
            })();
            if let Err(e) = r {
                row.problem = Some(format!("{e:#}"));
            }
        }
        row.wall = t.elapsed();
        row.finish(&tests);
        match &row.problem {
            Some(p) => step(&format!("{}: {p}", k.label())),
            None => step(&format!(
                "{}: {} in {}",
                k.label(),
                row.tests_cell(),
                fmt_dur(row.wall)
            )),
        }
        rows.push(row);
    }

    let md = matrix_md(&rows);
    std::fs::write(out_dir.join("matrix.md"), &md)?;
    std::fs::write(
        out_dir.join("matrix.json"),
        serde_json::to_string_pretty(&Value::Array(rows.iter().map(Row::to_json).collect()))?,
    )?;
    println!("\n{md}");
    step(&format!(
        "matrix written to {} and matrix.json",
        out_dir.join("matrix.md").display()
    ));
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.kernel.label().to_string())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix: failures on {}", failed.join(", "));
    }
    Ok(())
}

// ---- results ----

struct TestResult {
    name: String,
    ok: bool,
    secs: Option<f64>,
    output: Vec<String>,
    exit: Option<i32>,
}

struct Row {
    kernel: Kernel,
    log: PathBuf,
    release: Option<String>,
    accel: String,
    booted_at: Option<f64>,
    agent: Vec<Value>,
    agent_stderr: Vec<String>,
    agent_exit: Option<i32>,
    doctor: Vec<String>,
    doctor_exit: Option<i32>,
    skipped: Option<String>,
    /// The hook families the tests ran with, and how many runs that planned.
    families: Vec<String>,
    planned: Option<usize>,
    running: Option<String>,
    tests: Vec<TestResult>,
    outputs: HashMap<String, Vec<String>>,
    warnings: Vec<String>,
    done: bool,
    panic_line: Option<String>,
    last_line: String,
    /// How qemu (or the host's check script) exited.
    exit: Option<String>,
    problem: Option<String>,
    wall: Duration,
}

impl Row {
    fn new(kernel: Kernel, out_dir: &Path) -> Row {
        Row {
            kernel,
            log: out_dir.join(format!("{}.log", kernel.label())),
            release: None,
            accel: "-".into(),
            booted_at: None,
            agent: Vec::new(),
            agent_stderr: Vec::new(),
            agent_exit: None,
            doctor: Vec::new(),
            doctor_exit: None,
            skipped: None,
            families: Vec::new(),
            planned: None,
            running: None,
            tests: Vec::new(),
            outputs: HashMap::new(),
            warnings: Vec::new(),
            done: false,
            panic_line: None,
            last_line: String::new(),
            exit: None,
            problem: None,
            wall: Duration::ZERO,
        }
    }

    fn log_rel(&self) -> String {
        self.log
            .strip_prefix(workspace_root())
            .unwrap_or(&self.log)
            .display()
            .to_string()
    }

    fn ready(&self) -> Option<&Value> {
        self.agent.iter().find(|v| v["event"] == "ready")
    }

    fn degraded(&self) -> Vec<String> {
        self.agent
            .iter()
            .filter(|v| v["event"] == "degraded")
            .map(|v| {
                let s = |k: &str| match &v[k] {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    x => Some(x.to_string()),
                };
                match (s("feature"), s("missing")) {
                    (Some(f), Some(m)) => format!("{f} (missing {m})"),
                    (Some(f), None) => f,
                    (None, Some(m)) => format!("missing {m}"),
                    (None, None) => s("reason").unwrap_or_else(|| v.to_string()),
                }
            })
            .collect()
    }

    /// One line of the console (or of the host's check script).
    fn line(&mut self, raw: &str) {
        if !raw.trim().is_empty() {
            self.last_line = raw.trim().to_string();
        }
        if self.panic_line.is_none() && raw.contains("Kernel panic") {
            self.panic_line = Some(raw.trim().to_string());
        }
        // Kernel messages can share a console line with a marker: it starts where MARK does.
        let Some(at) = raw.find(MARK) else { return };
        let mut f = raw[at + MARK.len()..].splitn(2, '|');
        let kind = f.next().unwrap_or_default();
        let rest = f.next().unwrap_or_default();
        let label = self.kernel.label();
        match kind {
            "init" => {
                let mut p = rest.split('|');
                self.release = p.next().map(str::to_string);
                self.booted_at = p.next().and_then(|s| s.parse().ok());
                step(&format!(
                    "{label}: {} is up after {:.1} s; starting the agent",
                    self.release.as_deref().unwrap_or("?"),
                    self.booted_at.unwrap_or_default()
                ));
            }
            "agent" => {
                if let Ok(v) = serde_json::from_str::<Value>(rest) {
                    self.agent.push(v);
                }
            }
            "agent-stderr" => self.agent_stderr.push(rest.to_string()),
            "agent-exit" => {
                self.agent_exit = rest.split('|').next().and_then(|s| s.parse().ok());
                match self.ready() {
                    Some(r) => step(&format!(
                        "{label}: agent ready in {} ms; programs: {}; degraded: {}",
                        r["startup_ms"],
                        programs(r),
                        self.degraded_cell()
                    )),
                    None => step(&format!(
                        "{label}: the agent did not start (exit {}): {}",
                        rest.split('|').next().unwrap_or("?"),
                        self.stderr_excerpt()
                    )),
                }
            }
            "doctor" => self.doctor.push(rest.to_string()),
            "doctor-exit" => self.doctor_exit = rest.parse().ok(),
            "skip" => self.skipped = Some(rest.to_string()),
            "families" => {
                let mut p = rest.split('|');
                self.families = p
                    .next()
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                self.planned = p.next().and_then(|n| n.trim().parse().ok());
                step(&format!(
                    "{label}: {} test runs with hooks: {}",
                    self.planned.map_or("?".into(), |n| n.to_string()),
                    self.families.join(", ")
                ));
            }
            "warn" => {
                step(&format!("{label}: {rest}"));
                self.warnings.push(rest.to_string());
            }
            "test-start" => {
                self.running = rest.split('|').next().map(str::to_string);
            }
            "test-out" => {
                if let Some((name, line)) = rest.split_once('|') {
                    self.outputs
                        .entry(name.to_string())
                        .or_default()
                        .push(line.to_string());
                }
            }
            "test" => {
                let p: Vec<&str> = rest.split('|').collect();
                if p.len() >= 2 {
                    let secs = match (p.get(2), p.get(3)) {
                        (Some(a), Some(b)) => match (a.parse::<f64>(), b.parse::<f64>()) {
                            (Ok(a), Ok(b)) => Some(b - a),
                            _ => None,
                        },
                        _ => None,
                    };
                    let ok = p[0] == "ok";
                    let exit = p.get(4).and_then(|s| s.parse().ok());
                    let output = self.outputs.remove(p[1]).unwrap_or_default();
                    step(&format!(
                        "{label}: {} {}{}{}",
                        p[1],
                        if ok { "ok" } else { "FAILED" },
                        secs.map(|s| format!(" ({s:.1} s)")).unwrap_or_default(),
                        if ok {
                            String::new()
                        } else {
                            format!(": {}", failure_excerpt(&output, exit, secs))
                        }
                    ));
                    self.tests.push(TestResult {
                        name: p[1].to_string(),
                        ok,
                        secs,
                        output,
                        exit,
                    });
                    self.running = None;
                }
            }
            "done" => self.done = true,
            _ => {}
        }
    }

    /// The line that says why the agent failed: the first one that names an error.
    fn stderr_excerpt(&self) -> String {
        let lines: Vec<&str> = self
            .agent_stderr
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        let pick = lines
            .iter()
            .find(|l| l.to_ascii_lowercase().contains("error"))
            .or(lines.first())
            .copied()
            .unwrap_or("(no stderr)");
        clip(pick, 240)
    }

    /// Decide what, if anything, makes this row a failure of the kernel itself.
    fn finish(&mut self, tests: &[(&str, &str)]) {
        if self.problem.is_some() {
            return;
        }
        let log = self.log_rel();
        if self.agent_exit.is_some() && self.ready().is_none() {
            self.problem = Some(format!(
                "the agent did not start (exit {}): {}; log: {log}",
                self.agent_exit.unwrap_or(-1),
                self.stderr_excerpt()
            ));
        } else if !self.done {
            let how = format!(
                "{}last line: {}",
                self.exit
                    .as_deref()
                    .map(|e| format!("{e}; "))
                    .unwrap_or_default(),
                clip(&self.last_line, 200)
            );
            let why = if self.booted_at.is_none() {
                match &self.panic_line {
                    Some(p) => format!("the kernel panicked before init: {}", clip(p, 200)),
                    None => format!("the guest stopped before init ({how})"),
                }
            } else {
                format!(
                    "stopped before the checks finished{} ({how})",
                    self.running
                        .as_deref()
                        .map(|t| format!(", during {t}"))
                        .unwrap_or_default(),
                )
            };
            self.problem = Some(format!("{why}; log: {log}"));
        } else if self.tests.len() < self.planned.unwrap_or(tests.len()) && self.skipped.is_none() {
            self.problem = Some(format!(
                "only {} of {} test runs reported; log: {log}",
                self.tests.len(),
                self.planned.unwrap_or(tests.len())
            ));
        } else if self.tests.iter().any(|t| !t.ok) {
            let names: Vec<&str> = self
                .tests
                .iter()
                .filter(|t| !t.ok)
                .map(|t| t.name.as_str())
                .collect();
            self.problem = Some(format!(
                "{} of {} tests failed: {}; log: {log}",
                names.len(),
                self.tests.len(),
                names.join(", ")
            ));
        }
    }

    fn failed(&self) -> bool {
        self.problem.is_some()
    }

    fn kernel_cell(&self) -> String {
        let k = self.kernel;
        let name = match k.suite() {
            Some(s) if s != k.label() => format!("{} ({s})", k.label()),
            _ => k.label().to_string(),
        };
        match &self.release {
            Some(r) => format!("{name} {r}"),
            None => name,
        }
    }

    fn degraded_cell(&self) -> String {
        let d = self.degraded();
        if d.is_empty() {
            "none".into()
        } else {
            d.join("; ")
        }
    }

    fn tests_cell(&self) -> String {
        if let Some(s) = &self.skipped {
            return format!("not run: {s}");
        }
        if self.tests.is_empty() {
            return "not run".into();
        }
        let passed = self.tests.iter().filter(|t| t.ok).count();
        let failed: Vec<&str> = self
            .tests
            .iter()
            .filter(|t| !t.ok)
            .map(|t| t.name.as_str())
            .collect();
        if failed.is_empty() {
            format!("{passed}/{} passed", self.tests.len())
        } else {
            format!(
                "{passed}/{} passed; failed: {}",
                self.tests.len(),
                failed.join(", ")
            )
        }
    }

    fn to_json(&self) -> Value {
        let ready = self.ready();
        json!({
            "kernel": self.kernel.label(),
            "suite": self.kernel.suite(),
            "release": self.release,
            "accelerator": self.accel,
            "ok": !self.failed(),
            "problem": self.problem,
            "log": self.log_rel(),
            "wall_s": (self.wall.as_secs_f64() * 10.0).round() / 10.0,
            "boot_s": self.booted_at.filter(|_| self.kernel != Kernel::Host),
            "ready": ready,
            "programs": ready.map(|r| r["programs"].clone()),
            "hooks": ready.map(|r| r["hooks"].clone()),
            "families": self.families,
            "startup_ms": ready.map(|r| r["startup_ms"].clone()),
            "degraded": self.agent.iter().filter(|v| v["event"] == "degraded").collect::<Vec<_>>(),
            "agent_exit": self.agent_exit,
            "agent_stderr": self.agent_stderr,
            "doctor_exit": self.doctor_exit,
            "doctor": self.doctor,
            "warnings": self.warnings,
            "tests_skipped": self.skipped,
            "tests": self.tests.iter().map(|t| json!({
                "name": t.name,
                "ok": t.ok,
                "secs": t.secs.map(|s| (s * 10.0).round() / 10.0),
                "exit": t.exit,
                "output": t.output,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The panic message of a failed test (the line after "panicked at"), or why it has none.
fn failure_excerpt(output: &[String], exit: Option<i32>, secs: Option<f64>) -> String {
    if secs.is_some_and(|s| s >= f64::from(TEST_SECS)) {
        return format!("killed after {TEST_SECS} s");
    }
    let msg = output
        .iter()
        .position(|l| l.contains("panicked at"))
        .and_then(|i| output.get(i + 1));
    match msg {
        Some(m) => clip(m.trim(), 200),
        None if output.iter().any(|l| l.contains("0 passed; 0 failed")) => {
            "no such test in the binary".into()
        }
        None => format!("exit {}", exit.map_or("?".into(), |e| e.to_string())),
    }
}

fn programs(ready: &Value) -> String {
    match ready["programs"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| p.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(_) => "none".into(),
        None => "-".into(),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn matrix_md(rows: &[Row]) -> String {
    let mut md = String::from(
        "| kernel | accel | hooks (`auto`) | programs attached | degraded | tests (every family) | ready | wall |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ready = r.ready();
        let cell = |s: String| s.replace('|', "\\|");
        let tests = match (&r.problem, ready) {
            (Some(p), None) if r.tests.is_empty() => format!("not run: {p}"),
            _ => r.tests_cell(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(r.kernel_cell()),
            r.accel,
            ready.and_then(|v| v["hooks"].as_str()).unwrap_or("-"),
            cell(ready.map(programs).unwrap_or_else(|| "-".into())),
            cell(if ready.is_some() {
                r.degraded_cell()
            } else {
                "-".into()
            }),
            cell(tests),
            ready
                .and_then(|v| v["startup_ms"].as_u64())
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "-".into()),
            fmt_dur(r.wall),
        ));
    }
    md
}

// ---- running a row ----

/// Run CMD with its output (stdout, then qemu's or the script's own complaints on stderr)
/// parsed line by line into ROW and copied to ROW's log; kill its process group when no
/// init marker came within `boot` or the whole run exceeds `total`.
fn supervise(row: &mut Row, mut cmd: Command, boot: Option<Duration>, total: Duration) {
    let mut log = match File::create(&row.log) {
        Ok(f) => f,
        Err(e) => {
            row.problem = Some(format!("cannot write {}: {e}", row.log.display()));
            return;
        }
    };
    let mut child: Child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            row.problem = Some(format!("could not start {cmd:?}: {e}"));
            return;
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let lines = |out: Box<dyn std::io::Read + Send>, tx: mpsc::Sender<String>| {
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    };
    lines(Box::new(stdout), tx.clone());
    lines(Box::new(stderr), tx);
    let mut take = |row: &mut Row, line: String| {
        let _ = writeln!(log, "{line}");
        row.line(&line);
    };
    let start = Instant::now();
    let timed_out = loop {
        let (limit, is_boot) = match boot {
            Some(b) if row.booted_at.is_none() => (b, true),
            _ => (total, false),
        };
        match rx.recv_timeout(limit.saturating_sub(start.elapsed())) {
            Ok(line) => take(row, line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => break Some((limit, is_boot)),
        }
    };
    if timed_out.is_some() {
        // SAFETY: signalling the process group of a child we started in its own group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        // What the killed group wrote last; a straggler outside it cannot hold us up.
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            take(row, line);
        }
    }
    row.exit = child.wait().ok().map(|s| s.to_string());
    let log = row.log_rel();
    if let Some((limit, is_boot)) = timed_out {
        row.problem = Some(if is_boot {
            format!(
                "boot timed out after {} s (no init marker); log: {log}",
                limit.as_secs()
            )
        } else {
            format!(
                "timed out after {} s{}; log: {log}",
                limit.as_secs(),
                row.running
                    .as_deref()
                    .map(|t| format!(" during {t}"))
                    .unwrap_or_default()
            )
        });
    }
}

fn run_vm(row: &mut Row, kf: &KernelFiles, accel: &Accel, image: &Path, tests: usize) {
    step(&format!(
        "{}: booting {} under {} (console: {})",
        row.kernel.label(),
        kf.release,
        accel.name,
        row.log_rel()
    ));
    supervise(
        row,
        qemu(accel, &kf.vmlinuz, image),
        Some(BOOT_TIMEOUT),
        row_timeout(tests),
    );
}

fn run_host(row: &mut Row, agent: &Path, bins: &TestBins, tests: &[(&str, &str)]) {
    let r = (|| -> Result<Command> {
        let dir = workspace_root().join("target/vm/host");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("checks.sh"), CHECKS)?;
        std::fs::write(
            dir.join("tests.list"),
            tests_list(bins, tests, |p| p.into())?,
        )?;
        let mut c = Command::new("sh");
        c.arg(dir.join("checks.sh"))
            .env("PW_AGENT", agent)
            .env("PW_LIST", dir.join("tests.list"))
            .env("PW_READY_SECS", READY_SECS.to_string())
            .env("PW_TEST_SECS", TEST_SECS.to_string());
        Ok(c)
    })();
    row.release = output(Command::new("uname").arg("-r")).map(|s| s.trim().to_string());
    row.accel = "none".into();
    // Nothing to boot: the agent check stands where init would be.
    row.booted_at = Some(0.0);
    match r {
        Ok(c) => {
            step(&format!(
                "host: {} without a VM (output: {})",
                row.release.as_deref().unwrap_or("?"),
                row.log_rel()
            ));
            supervise(row, c, None, row_timeout(tests.len()));
        }
        Err(e) => row.problem = Some(format!("{e:#}")),
    }
}

fn qemu(accel: &Accel, vmlinuz: &Path, initrd: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // Single-threaded TCG: with a thread per vCPU, the guest kernel's live text patching
    // (enabling a tracepoint flips static keys through int3) raced the other vCPU's stale
    // translations and oopsed in syscall_exit_to_user_mode_prepare (seen on 6.12).
    // PORTWATCH_VM_TCG_THREAD=multi gives each vCPU a host thread (for vm-bench, where the
    // agent and the load should not share one).
    let accel_arg = if accel.name == "tcg" {
        match std::env::var("PORTWATCH_VM_TCG_THREAD").as_deref() {
            Ok("multi") => "tcg,thread=multi".to_string(),
            _ => "tcg,thread=single".to_string(),
        }
    } else {
        accel.name.to_string()
    };
    c.args(["-machine", "q35", "-accel", &accel_arg])
        .args(["-cpu", if accel.name == "kvm" { "host" } else { "max" }])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots at once, and -no-reboot turns that into qemu exiting. Under TCG
        // every syscall pays for the speculation mitigations, and the tests make millions.
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init mitigations=off",
        ]);
    c
}

// ---- the accelerator ----

#[derive(Clone)]
struct Accel {
    name: &'static str,
}

/// KVM where a guest actually boots with it, else TCG. Some hosts expose /dev/kvm yet hang
/// every guest (broken nested virtualisation), so a short probe boot decides, once per host
/// kernel; PORTWATCH_VM_ACCEL=kvm|tcg overrides.
fn detect_accel(kf: &KernelFiles, busybox: &Path, out_dir: &Path) -> Result<Accel> {
    let chosen = |name: &'static str, why: &str| {
        step(&format!("accelerator: {name} ({why})"));
        Ok(Accel { name })
    };
    match std::env::var("PORTWATCH_VM_ACCEL").ok().as_deref() {
        Some("kvm") => return chosen("kvm", "PORTWATCH_VM_ACCEL"),
        Some("tcg") => return chosen("tcg", "PORTWATCH_VM_ACCEL"),
        Some("") | None => {}
        Some(x) => bail!("PORTWATCH_VM_ACCEL={x}: use kvm or tcg"),
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return chosen("tcg", "/dev/kvm is missing or not usable");
    }
    let host = output(Command::new("uname").arg("-r"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let cache = setup::cache_dir().join("vm").join(format!("accel-{host}"));
    let overrides = "PORTWATCH_VM_ACCEL=kvm|tcg overrides";
    match std::fs::read_to_string(&cache)
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("kvm") => {
            return chosen(
                "kvm",
                &format!("probed earlier, cached in {}; {overrides}", cache.display()),
            )
        }
        Some("tcg") => {
            return chosen(
                "tcg",
                &format!(
                    "a KVM guest did not boot when probed, cached in {}; {overrides}",
                    cache.display()
                ),
            )
        }
        _ => {}
    }
    step("probing KVM with a short boot (up to 30 s, once per host kernel)");
    let image = out_dir.join("probe.cpio");
    let mut cpio = Cpio::default();
    add_busybox(&mut cpio, busybox)?;
    cpio.file("init", PROBE_INIT.as_bytes(), 0o755)?;
    std::fs::write(&image, cpio.finish())?;
    let mut row = Row::new(Kernel::Host, out_dir);
    row.log = out_dir.join("kvm-probe.log");
    let kvm = Accel { name: "kvm" };
    supervise(
        &mut row,
        qemu(&kvm, &kf.vmlinuz, &image),
        Some(Duration::from_secs(30)),
        Duration::from_secs(30),
    );
    let works = std::fs::read_to_string(&row.log).is_ok_and(|l| l.contains("PWVM|probe"));
    std::fs::create_dir_all(cache.parent().expect("has a parent"))?;
    std::fs::write(&cache, if works { "kvm\n" } else { "tcg\n" })?;
    if works {
        chosen("kvm", &format!("a probe boot worked; {overrides}"))
    } else {
        chosen(
            "tcg",
            &format!(
                "a KVM guest did not boot within 30 s (log: {}); cached in {}; {overrides}",
                row.log_rel(),
                cache.display()
            ),
        )
    }
}

// ---- building what goes into the guest ----

struct TestBins {
    by_target: HashMap<String, PathBuf>,
    hold: PathBuf,
}

/// The end-to-end test binaries, built as `cargo test` would run them, and pw-hold: the
/// tests find it by its absolute compile-time path, so the guest has it at that path too.
fn build_test_bins() -> Result<TestBins> {
    step("building the end-to-end test binaries (debug)");
    let mut c = cargo();
    c.args(["test", "--package", "portwatch-tests", "--no-run"])
        .arg("--message-format=json-render-diagnostics");
    // Only the targets the guest runs: a test file elsewhere in the crate, half-written or
    // not, must not stop the matrix.
    for t in TEST_TARGETS {
        c.args(["--test", t]);
    }
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .context("could not start cargo")?;
    if !out.status.success() {
        bail!("building the test binaries failed; see cargo's output above");
    }
    let mut by_target = HashMap::new();
    let mut hold = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if name == "pw-hold" {
            hold = Some(PathBuf::from(exe));
        } else if TEST_TARGETS.contains(&name) {
            by_target.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for t in TEST_TARGETS {
        if !by_target.contains_key(*t) {
            bail!("cargo built no test binary for {t}");
        }
    }
    Ok(TestBins {
        by_target,
        hold: hold.context("cargo built no pw-hold")?,
    })
}

/// "BINARY NAME" lines for the check script; `at` maps a host path to where it runs.
fn tests_list(
    bins: &TestBins,
    tests: &[(&str, &str)],
    at: impl Fn(&Path) -> PathBuf,
) -> Result<String> {
    let mut s = String::new();
    for (target, name) in tests {
        let bin = bins
            .by_target
            .get(*target)
            .with_context(|| format!("no test binary for {target}"))?;
        let only = ONLY
            .iter()
            .find(|(n, _)| n == name)
            .map_or(String::new(), |(_, o)| format!(" {o}"));
        s.push_str(&format!("{} {name}{only}\n", at(bin).display()));
    }
    Ok(s)
}

/// What the guest runs: its script (`CHECKS` or `BENCH`), the tests it lists, and binaries
/// beyond the agent and the test binaries (at their host paths).
#[derive(Clone, Copy)]
struct Payload<'a> {
    tests: &'a [(&'a str, &'a str)],
    script: &'a str,
    extra: &'a [PathBuf],
}

/// The guest's initramfs. Our own binaries lose their debug sections on the way (smaller
/// archive, faster unpacking under TCG); their code is what the host runs.
fn build_image(
    image: &Path,
    busybox: &Path,
    kf: &KernelFiles,
    agent: &Path,
    bins: &TestBins,
    run: &Payload<'_>,
) -> Result<()> {
    let Payload {
        tests,
        script,
        extra,
    } = *run;
    step(&format!("building {}", image.display()));
    let mut cpio = Cpio::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "etc",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules/pw",
        "pw/bin",
        "pw/tests",
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens the console for init before any /dev is mounted.
    cpio.node("dev/console", 0o020600, 5, 1)?;
    cpio.symlink("var/run", "../run")?;
    cpio.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    cpio.file(
        "etc/hosts",
        b"127.0.0.1 localhost pwvm\n::1 localhost ip6-localhost\n",
        0o644,
    )?;
    add_busybox(&mut cpio, busybox)?;

    let ip = which("ip").context("iproute2's ip is not installed")?;
    let ss = which("ss").context("iproute2's ss is not installed")?;
    let strip_dir = workspace_root().join("target/vm/stripped");
    std::fs::create_dir_all(&strip_dir)?;
    let stripped = |p: &Path| -> Result<Vec<u8>> {
        let tmp = strip_dir.join(p.file_name().expect("a file"));
        let ok = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(p)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let bytes = std::fs::read(if ok { &tmp } else { p })
            .with_context(|| format!("reading {}", p.display()))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(bytes)
    };
    let mut elves: Vec<PathBuf> = vec![ip.clone(), ss.clone(), agent.into(), bins.hold.clone()];
    cpio.file(&rel(&ip), &std::fs::read(&ip)?, 0o755)?;
    cpio.file(&rel(&ss), &std::fs::read(&ss)?, 0o755)?;
    cpio.file("pw/bin/portwatch", &stripped(agent)?, 0o755)?;
    cpio.file(&rel(&bins.hold), &stripped(&bins.hold)?, 0o755)?;
    let guest_test = |p: &Path| Path::new("/pw/tests").join(p.file_name().expect("a file"));
    for bin in bins.by_target.values() {
        cpio.file(&rel(&guest_test(bin)), &stripped(bin)?, 0o755)?;
        elves.push(bin.clone());
    }
    for bin in extra {
        cpio.file(&rel(bin), &stripped(bin)?, 0o755)?;
        elves.push(bin.clone());
    }
    for lib in shared_libs(&elves)? {
        cpio.file(
            &rel(&lib),
            &std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?,
            0o755,
        )?;
    }

    let mut order = String::new();
    for m in &kf.modules {
        let name = m
            .file_stem()
            .expect("a module file")
            .to_string_lossy()
            .into_owned();
        cpio.file(
            &format!("lib/modules/pw/{name}.ko"),
            &std::fs::read(m)?,
            0o644,
        )?;
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("pw/modules.list", order.as_bytes(), 0o644)?;
    cpio.file("pw/checks.sh", script.as_bytes(), 0o755)?;
    cpio.file(
        "pw/tests.list",
        tests_list(bins, tests, guest_test)?.as_bytes(),
        0o644,
    )?;
    let init = INIT
        .replace("@IP@", &ip.display().to_string())
        .replace("@READY@", &READY_SECS.to_string())
        .replace("@TEST@", &TEST_SECS.to_string());
    cpio.file("init", init.as_bytes(), 0o755)?;
    std::fs::write(image, cpio.finish()).with_context(|| format!("writing {}", image.display()))
}

fn add_busybox(cpio: &mut Cpio, busybox: &Path) -> Result<()> {
    cpio.file("bin/busybox", &std::fs::read(busybox)?, 0o755)?;
    let list = output(Command::new(busybox).arg("--list")).context("busybox --list failed")?;
    for applet in list.lines().map(str::trim) {
        // The real iproute2 replaces busybox's ip, which has no netns.
        if applet.is_empty() || applet == "busybox" || applet == "ip" {
            continue;
        }
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    cpio.symlink("sbin/init", "../bin/busybox")
}

/// Every library `ldd` names for these binaries, and the dynamic loader.
fn shared_libs(elves: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for e in elves {
        let out = Command::new("ldd")
            .arg(e)
            .output()
            .with_context(|| format!("ldd {}", e.display()))?;
        if !out.status.success() {
            bail!(
                "ldd {} failed: {}",
                e.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                let p = PathBuf::from(p);
                if !libs.contains(&p) {
                    libs.push(p);
                }
            }
        }
    }
    Ok(libs)
}

fn rel(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_string()
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A cpio archive in the "newc" format, the one the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    seen: HashSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        if !self.seen.insert(name.to_string()) {
            bail!("{name} is in the initramfs twice");
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        let size = u32::try_from(data.len()).context("a file over 4 GiB")?;
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) -> Result<()> {
        if self.seen.contains(name) {
            return Ok(());
        }
        self.entry(name, 0o040755, (0, 0), &[])
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) -> Result<()> {
        self.entry(name, 0o100000 | perm, (0, 0), data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, 0o120777, (0, 0), target.as_bytes())
    }

    fn node(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, mode, (major, minor), &[])
    }

    fn finish(mut self) -> Vec<u8> {
        let _ = self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

// ---- Debian's kernels and busybox, with a private apt state ----

/// apt with its own sources, lists and cache under ~/.cache/portwatch/apt/SUITE: the
/// host's sources and package state stay untouched.
pub(crate) struct Apt {
    dir: PathBuf,
    suite: &'static str,
}

impl Apt {
    pub(crate) fn new(suite: &'static str) -> Result<Apt> {
        let dir = setup::cache_dir().join("apt").join(suite);
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(
            dir.join("sources.list"),
            format!("deb http://deb.debian.org/debian {suite} main\n"),
        )?;
        Ok(Apt { dir, suite })
    }

    fn opts(&self, cmd: &str) -> Command {
        let mut c = Command::new(cmd);
        let d = |p: &str| self.dir.join(p).display().to_string();
        for o in [
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            // Downloads land in root's cache directory, which apt's sandbox user cannot
            // write to.
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists")).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        })
    }

    fn update(&self) -> Result<()> {
        step(&format!(
            "apt-get update for Debian {} (private state in {})",
            self.suite,
            self.dir.display()
        ));
        run(self.opts("apt-get").args(["update", "-qq"]))
            .with_context(|| format!("apt-get update for {} failed", self.suite))
    }

    pub(crate) fn ensure_lists(&self) -> Result<()> {
        if self.has_lists() {
            Ok(())
        } else {
            self.update()
        }
    }

    fn search(&self, re: &str) -> Result<Vec<String>> {
        let out = self
            .opts("apt-cache")
            .args(["search", "--names-only", re])
            .output()
            .context("could not run apt-cache")?;
        if !out.status.success() {
            bail!(
                "apt-cache search failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// Download PKGS into DIR; with stale lists (a package superseded since the last
    /// update), update once and retry.
    pub(crate) fn download(&self, pkgs: &[String], dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let get = || {
            self.opts("apt-get")
                .args(["download", "-qq"])
                .args(pkgs)
                .current_dir(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if get() {
            return Ok(());
        }
        self.update()?;
        if get() {
            return Ok(());
        }
        bail!("apt-get download {} failed", pkgs.join(" "))
    }
}

pub(crate) fn deb_in(dir: &Path, pkg: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                && p.extension().is_some_and(|x| x == "deb")
        })
        .with_context(|| format!("no {pkg}_*.deb in {}", dir.display()))
}

pub(crate) fn dpkg_extract(deb: &Path, into: &Path) -> Result<()> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// Debian's static busybox, from bookworm, downloaded once (the .deb stays in the cache).
fn busybox() -> Result<PathBuf> {
    let dir = setup::cache_dir().join("vm");
    let bin = dir.join("busybox");
    if bin.is_file() {
        return Ok(bin);
    }
    step("fetching Debian's busybox-static (once)");
    let apt = Apt::new("bookworm")?;
    apt.ensure_lists()?;
    let debs = dir.join("debs");
    apt.download(&["busybox-static".into()], &debs)?;
    let x = dir.join("busybox-x");
    let _ = std::fs::remove_dir_all(&x);
    dpkg_extract(&deb_in(&debs, "busybox-static")?, &x)?;
    std::fs::copy(x.join("bin/busybox"), &bin).context("the package has no bin/busybox")?;
    let _ = std::fs::remove_dir_all(&x);
    Ok(bin)
}

struct KernelFiles {
    release: String,
    vmlinuz: PathBuf,
    /// Decompressed, in load order.
    modules: Vec<PathBuf>,
}

/// The suite's newest cloud kernel in ~/.cache/portwatch/kernels/SUITE: vmlinuz and the
/// few modules the guest loads. A complete cache is used as it is, without apt.
fn fetch_kernel(k: Kernel) -> Result<KernelFiles> {
    let suite = k.suite().expect("a Debian kernel");
    let dir = setup::cache_dir().join("kernels").join(suite);
    let marker = dir.join("complete");
    let load = |release: &str| -> Result<KernelFiles> {
        let order = std::fs::read_to_string(dir.join("modules.order"))?;
        Ok(KernelFiles {
            release: release.to_string(),
            vmlinuz: dir.join("vmlinuz"),
            modules: order
                .lines()
                .filter(|l| !l.is_empty())
                .map(|m| dir.join("modules").join(format!("{m}.ko")))
                .collect(),
        })
    };
    if let Ok(release) = std::fs::read_to_string(&marker) {
        if dir.join("vmlinuz").is_file() {
            return load(release.trim());
        }
    }
    let apt = Apt::new(suite)?;
    apt.ensure_lists()?;
    let find = |apt: &Apt| -> Result<Vec<String>> {
        Ok(apt
            .search("^linux-image-[0-9].*-cloud-amd64$")?
            .into_iter()
            .filter(|p| !p.contains("-unsigned") && !p.ends_with("-dbg"))
            .collect())
    };
    let mut images = find(&apt)?;
    if images.is_empty() {
        apt.update()?;
        images = find(&apt)?;
    }
    let release = newest(
        images
            .iter()
            .filter_map(|p| p.strip_prefix("linux-image-").map(str::to_string))
            .collect(),
    )
    .with_context(|| format!("Debian {suite} lists no linux-image-*-cloud-amd64"))?;
    step(&format!(
        "{}: fetching linux-image-{release} from Debian {suite} (once; cached in {})",
        k.label(),
        dir.display()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    let image = format!("linux-image-{release}");
    apt.download(std::slice::from_ref(&image), &debs)?;
    // sid splits the kernel into linux-binary-* (vmlinuz) and linux-modules-*, which its
    // linux-image-* only depends on.
    let deps = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb_in(&debs, &image)?)
            .arg("Depends"),
    )
    .unwrap_or_default();
    let parts: Vec<String> = deps
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .filter(|d| {
            *d == format!("linux-binary-{release}") || *d == format!("linux-modules-{release}")
        })
        .map(str::to_string)
        .collect();
    if !parts.is_empty() {
        apt.download(&parts, &debs)?;
    }
    let x = dir.join("x");
    for p in std::iter::once(&image).chain(&parts) {
        dpkg_extract(&deb_in(&debs, p)?, &x)?;
    }
    let vmlinuz = [
        x.join(format!("boot/vmlinuz-{release}")),
        x.join(format!("usr/lib/modules/{release}/vmlinuz")),
        x.join(format!("lib/modules/{release}/vmlinuz")),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release} in the packages"))?;
    std::fs::rename(&vmlinuz, dir.join("vmlinuz"))?;
    let mods = [
        x.join(format!("lib/modules/{release}")),
        x.join(format!("usr/lib/modules/{release}")),
    ]
    .into_iter()
    .find(|p| p.join("kernel").is_dir())
    .with_context(|| format!("no modules for {release} in the packages"))?;
    let order = extract_modules(&mods, &dir.join("modules"))?;
    std::fs::write(dir.join("modules.order"), order.join("\n") + "\n")?;
    let _ = std::fs::remove_dir_all(&x);
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::write(&marker, format!("{release}\n"))?;
    load(&release)
}

/// The newest of these Debian versions.
fn newest(versions: Vec<String>) -> Option<String> {
    versions.into_iter().reduce(|a, b| {
        let b_newer = Command::new("dpkg")
            .args(["--compare-versions", &b, "gt", &a])
            .status()
            .is_ok_and(|s| s.success());
        if b_newer {
            b
        } else {
            a
        }
    })
}

/// MODULES and what they depend on, decompressed into OUT; returns their load order.
/// Modules built into the kernel are simply absent from the tree and skipped.
fn extract_modules(tree: &Path, out: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(out)?;
    let mut files = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = n.find(".ko") {
                files.insert(n[..i].replace('-', "_"), p);
            }
        }
    }
    let mut order = Vec::new();
    let mut visiting = HashSet::new();
    for m in MODULES {
        add_module(m, &files, out, &mut order, &mut visiting)?;
    }
    Ok(order)
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    out: &Path,
    order: &mut Vec<String>,
    visiting: &mut HashSet<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) || !visiting.insert(name.clone()) {
        return Ok(());
    }
    let Some(src) = files.get(&name) else {
        return Ok(());
    };
    let s = src.to_string_lossy();
    let bytes = if s.ends_with(".ko") {
        std::fs::read(src)?
    } else {
        let tool = if s.ends_with(".xz") {
            "xz"
        } else if s.ends_with(".zst") {
            "zstd"
        } else if s.ends_with(".gz") {
            "gzip"
        } else {
            bail!("{s}: unknown module compression");
        };
        let o = Command::new(tool)
            .arg("-dc")
            .arg(src)
            .output()
            .with_context(|| format!("could not run {tool}"))?;
        if !o.status.success() {
            bail!("{tool} -dc {s} failed");
        }
        o.stdout
    };
    for dep in modinfo_depends(&bytes) {
        add_module(&dep, files, out, order, visiting)?;
    }
    std::fs::write(out.join(format!("{name}.ko")), &bytes)?;
    order.push(name);
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section: NUL-separated key=value strings.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- vm-bench: each hook family against no agent, side by side in one guest ----

#[derive(clap::Args)]
pub struct VmBenchArgs {
    /// Kernel to measure on; repeatable. Default: 6.1 and 6.12.
    #[arg(long = "kernel", value_enum, value_name = "KERNEL")]
    pub kernels: Vec<Kernel>,
    /// Rounds; each brackets every configuration between two no-agent windows.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds of loopback churn per window.
    #[arg(long, default_value_t = 5)]
    pub window: u32,
    /// getppid() calls per window.
    #[arg(long, default_value_t = 2_000_000)]
    pub syscalls: u64,
    /// Connections of the TIME_WAIT check.
    #[arg(long, default_value_t = 5000)]
    pub tw_conns: u32,
}

/// The configurations measured against no agent, in the order of round 1.
const BENCH_CFGS: [&str; 3] = ["tracepoint", "trampoline", "trampoline-all"];

/// The guest's script: windows of (syscall loop, churn) under each configuration, each
/// between two windows without an agent, then the TIME_WAIT check under the trampolines.
const BENCH: &str = r#"exec 2>&1
M=PWVM
w=/tmp/pwb; rm -rf $w; mkdir -p $w
L=@LOAD@
IP=@IP@
apid=
start() {
  : >$w/out
  "$PW_AGENT" run --no-log-file --no-docker --runtime-dir $w/rt "$@" >$w/out 2>$w/err </dev/null &
  apid=$!
  i=0
  while [ $i -lt 900 ]; do
    grep -q '"event":"ready"' $w/out && break
    kill -0 $apid 2>/dev/null || break
    sleep 0.1; i=$((i + 1))
  done
  if ! grep -q '"event":"ready"' $w/out; then
    sed "s/^/$M|agent-stderr|/" $w/err
    echo "$M|bench-error|the agent did not start with $*"
    return 1
  fi
  grep '"event":"ready"' $w/out | sed "s/^/$M|ready|/"
  sleep 2
}
stop() { kill -TERM $apid 2>/dev/null; wait $apid; apid=; }
# The agent's CPU time so far (utime + stime, in clock ticks), 0 without one.
ticks() {
  if [ -n "$apid" ] && [ -r /proc/$apid/stat ]; then
    set -- $(cat /proc/$apid/stat)
    echo $(( ${14} + ${15} ))
  else
    echo 0
  fi
}
window() {
  c=$1
  case $c in
    none) ;;
    tracepoint) start --hooks tracepoint || return ;;
    trampoline) start --hooks trampoline || return ;;
    trampoline-all) start --hooks trampoline --all-events || return ;;
  esac
  # The churn's TIME_WAIT sockets go with its namespace, before the next window: their
  # expiry 60 s later would otherwise land in some other configuration's window.
  $IP netns add cw && $IP -n cw link set lo up
  t0=$(ticks)
  sc=$($L syscall @SYSCALLS@)
  ch=$($IP netns exec cw $L churn @WINDOW@)
  t1=$(ticks)
  [ -n "$apid" ] && stop
  $IP netns del cw
  echo "$M|bench|$round|$step|$c|$sc|$ch|$((t1 - t0))"
  sleep 1
}
set -- @CFGS@
n=$#
round=1
while [ $round -le @ROUNDS@ ]; do
  step=0
  echo "$M|round|$round"
  j=0
  while [ $j -lt $n ]; do
    k=$(( (j + round - 1) % n + 1 ))
    eval t=\${$k}
    step=$((step + 1)); window none
    step=$((step + 1)); window "$t"
    j=$((j + 1))
  done
  step=$((step + 1)); window none
  round=$((round + 1))
done
# TIME_WAIT: counted by the kernel's hooks, against ss, in a namespace of its own.
$IP netns add twb && $IP -n twb link set lo up
start --hooks trampoline --tw-interval 1 && {
  $IP netns exec twb $L churn-n @TWCONNS@ >/dev/null
  sleep 3
  echo "$M|tw-ss|before|$($IP netns exec twb ss -Htan state time-wait | wc -l)"
  $IP netns exec twb ss -K -Htan state time-wait >/dev/null
  sleep 3
  echo "$M|tw-ss|after|$($IP netns exec twb ss -Htan state time-wait | wc -l)"
  ino=$(stat -L -c %i /run/netns/twb)
  grep '"type":"time_wait"' $w/out | grep "\"netns\":$ino," | sed "s/^/$M|tw|/"
  stop
}
echo "$M|done|$(cut -d' ' -f1 /proc/uptime)"
"#;

pub fn bench_cmd(args: VmBenchArgs) -> Result<()> {
    let kernels = if args.kernels.is_empty() {
        vec![Kernel::V6_1, Kernel::V6_12]
    } else {
        expand(&args.kernels)
    };
    if kernels.contains(&Kernel::Host) {
        bail!("vm-bench measures in VMs: the host has no trampolines (use `cargo xtask bench`)");
    }
    setup::for_vm()?;
    let agent = crate::build_agent(true)?;
    let bins = build_test_bins()?;
    step("building pw-load (release)");
    let st = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "portwatch-tests",
            "--bin",
            "pw-load",
        ])
        .status()
        .context("could not start cargo")?;
    if !st.success() {
        bail!("building pw-load failed; see cargo's output above");
    }
    let load = workspace_root().join("target/release/pw-load");
    let out_dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&out_dir)?;
    let bb = busybox().context("busybox")?;
    let ip = which("ip").context("iproute2's ip is not installed")?;
    let script = BENCH
        .replace("@LOAD@", &load.display().to_string())
        .replace("@IP@", &ip.display().to_string())
        .replace("@SYSCALLS@", &args.syscalls.to_string())
        .replace("@WINDOW@", &args.window.to_string())
        .replace("@ROUNDS@", &args.rounds.to_string())
        .replace("@TWCONNS@", &args.tw_conns.to_string())
        .replace("@CFGS@", &BENCH_CFGS.join(" "));
    let mut md = String::new();
    let mut all = Vec::new();
    for k in kernels {
        let kf = fetch_kernel(k).context("fetching the kernel failed")?;
        let accel = detect_accel(&kf, &bb, &out_dir)?;
        let image = out_dir.join(format!("bench-{}.cpio", k.label()));
        build_image(
            &image,
            &bb,
            &kf,
            &agent,
            &bins,
            &Payload {
                tests: &[],
                script: &script,
                extra: std::slice::from_ref(&load),
            },
        )?;
        let mut row = Row::new(k, &out_dir);
        row.log = out_dir.join(format!("bench-{}.log", k.label()));
        row.release = Some(kf.release.clone());
        row.accel = accel.name.to_string();
        let windows = (2 * BENCH_CFGS.len() + 1) as u64 * u64::from(args.rounds);
        let total =
            BOOT_TIMEOUT + Duration::from_secs(120 + windows * (u64::from(args.window) + 60));
        step(&format!(
            "{}: booting {} under {} for {} rounds of {} windows (log: {})",
            k.label(),
            kf.release,
            accel.name,
            args.rounds,
            2 * BENCH_CFGS.len() + 1,
            row.log_rel()
        ));
        supervise(
            &mut row,
            qemu(&accel, &kf.vmlinuz, &image),
            Some(BOOT_TIMEOUT),
            total,
        );
        let log = std::fs::read_to_string(&row.log).unwrap_or_default();
        let r = BenchResult::parse(&log);
        if let Some(p) = &row.problem {
            step(&format!("{}: {p}", k.label()));
        }
        if r.windows.is_empty() {
            bail!(
                "{}: no bench windows reported{}; log: {}",
                k.label(),
                r.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                row.log_rel()
            );
        }
        let table = r.markdown(&kf.release, accel.name, &args);
        println!("\n{table}");
        md.push_str(&table);
        md.push('\n');
        all.push(r.to_json(k.label(), &kf.release, accel.name));
    }
    std::fs::write(out_dir.join("bench.md"), &md)?;
    std::fs::write(
        out_dir.join("bench.json"),
        serde_json::to_string_pretty(&all)?,
    )?;
    step(&format!(
        "written to {} and bench.json",
        out_dir.join("bench.md").display()
    ));
    Ok(())
}

struct BenchWindow {
    round: u32,
    step: u32,
    cfg: String,
    /// ns per getppid() in the fastest tenth of the calls, and over all of them.
    syscall_ns: f64,
    syscall_mean_ns: f64,
    /// Connections per second over the window, and in its fastest second.
    conn_s: f64,
    conn_best_s: f64,
    failed: u64,
    /// The agent's CPU time during the window's load, in clock ticks (1/100 s).
    agent_ticks: Option<u64>,
}

/// One window against the no-agent windows around it: ratios of getppid()'s cost (1.0 =
/// the same) and of churn throughput (1.0 = the same).
struct Pair {
    syscall_best: f64,
    syscall_mean: f64,
    churn_best: f64,
    churn_mean: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct BenchResult {
    windows: Vec<BenchWindow>,
    hooks: HashMap<String, String>,
    tw: Vec<Value>,
    ss_before: Option<u64>,
    ss_after: Option<u64>,
    error: Option<String>,
}

impl BenchResult {
    fn parse(log: &str) -> BenchResult {
        let mut r = BenchResult::default();
        let mut last_ready: Option<Value> = None;
        for line in log.lines() {
            let Some(at) = line.find(MARK) else { continue };
            let f: Vec<&str> = line[at + MARK.len()..].split('|').collect();
            match f.as_slice() {
                ["ready", rest @ ..] => {
                    last_ready = serde_json::from_str(&rest.join("|")).ok();
                }
                ["bench", round, step, cfg, sc, sc_mean, ch, ch_best, failed, ticks] => {
                    let (Ok(round), Ok(step), Ok(sc), Ok(sc_mean), Ok(ch), Ok(ch_best)) = (
                        round.parse(),
                        step.parse(),
                        sc.parse(),
                        sc_mean.parse(),
                        ch.parse(),
                        ch_best.parse(),
                    ) else {
                        continue;
                    };
                    if let Some(v) = last_ready.take() {
                        let attached =
                            format!("{} ({})", v["hooks"].as_str().unwrap_or("?"), programs(&v));
                        r.hooks.entry(cfg.to_string()).or_insert(attached);
                    }
                    r.windows.push(BenchWindow {
                        round,
                        step,
                        cfg: cfg.to_string(),
                        syscall_ns: sc,
                        syscall_mean_ns: sc_mean,
                        conn_s: ch,
                        conn_best_s: ch_best,
                        failed: failed.parse().unwrap_or(0),
                        agent_ticks: ticks.parse().ok(),
                    });
                }
                ["tw", rest @ ..] => {
                    if let Ok(v) = serde_json::from_str::<Value>(&rest.join("|")) {
                        r.tw.push(v);
                    }
                }
                ["tw-ss", "before", n] => r.ss_before = n.trim().parse().ok(),
                ["tw-ss", "after", n] => r.ss_after = n.trim().parse().ok(),
                ["bench-error", e] => r.error = Some(e.to_string()),
                _ => {}
            }
        }
        r
    }

    /// Each window of `cfg` against the mean of the no-agent windows right before and after
    /// it, in the same round.
    fn paired(&self, cfg: &str) -> Vec<Pair> {
        let mut out = Vec::new();
        for (i, w) in self.windows.iter().enumerate() {
            if w.cfg != cfg || i == 0 {
                continue;
            }
            let (Some(a), Some(b)) = (self.windows.get(i - 1), self.windows.get(i + 1)) else {
                continue;
            };
            if a.cfg != "none" || b.cfg != "none" || a.round != w.round {
                continue;
            }
            let mean = |f: fn(&BenchWindow) -> f64| (f(a) + f(b)) / 2.0;
            out.push(Pair {
                syscall_best: w.syscall_ns / mean(|x| x.syscall_ns),
                syscall_mean: w.syscall_mean_ns / mean(|x| x.syscall_mean_ns),
                churn_best: w.conn_best_s / mean(|x| x.conn_best_s),
                churn_mean: w.conn_s / mean(|x| x.conn_s),
            });
        }
        out
    }

    fn markdown(&self, release: &str, accel: &str, args: &VmBenchArgs) -> String {
        let mut md = format!(
            "#### {release} ({accel}; {} rounds, {} getppid() calls and {} s of loopback \
             churn per window)\n\n\
             | configuration | hooks attached | getppid() ns, fastest tenth (median) | getppid() cost vs no agent: fastest tenth / all calls (paired medians) | churn conn/s, fastest second (median) | churn vs no agent: fastest second (paired median, min–max) / whole window (paired median) | agent CPU s per window (median) |\n\
             |---|---|---|---|---|---|---|\n",
            args.rounds, args.syscalls, args.window
        );
        for cfg in std::iter::once("none").chain(BENCH_CFGS) {
            let ws: Vec<&BenchWindow> = self.windows.iter().filter(|w| w.cfg == cfg).collect();
            let sc = median(ws.iter().map(|w| w.syscall_ns).collect());
            let ch = median(ws.iter().map(|w| w.conn_best_s).collect());
            let (cost, churn) = if cfg == "none" {
                ("–".to_string(), "–".to_string())
            } else {
                let p = self.paired(cfg);
                let pct = |v: Vec<f64>| median(v) * 100.0;
                let best: Vec<f64> = p.iter().map(|x| x.churn_best).collect();
                let lo = best.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = best.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (
                    format!(
                        "{:+.1}% / {:+.1}%",
                        pct(p.iter().map(|x| x.syscall_best).collect()) - 100.0,
                        pct(p.iter().map(|x| x.syscall_mean).collect()) - 100.0
                    ),
                    format!(
                        "{:.1}% ({:.1}–{:.1}%) / {:.1}%",
                        pct(best),
                        lo * 100.0,
                        hi * 100.0,
                        pct(p.iter().map(|x| x.churn_mean).collect())
                    ),
                )
            };
            let cpu = median(
                ws.iter()
                    .filter_map(|w| w.agent_ticks.map(|t| t as f64 / 100.0))
                    .collect(),
            );
            md.push_str(&format!(
                "| {cfg} | {} | {sc:.0} | {cost} | {ch:.0} | {churn} | {} |\n",
                self.hooks.get(cfg).map_or("–", String::as_str),
                if cfg == "none" || cpu.is_nan() {
                    "–".to_string()
                } else {
                    format!("{cpu:.2}")
                }
            ));
        }
        let failed: u64 = self.windows.iter().map(|w| w.failed).sum();
        if failed > 0 {
            md.push_str(&format!(
                "\n{failed} churn connects failed (EADDRNOTAVAIL while local ports sat in TIME_WAIT) and were retried.\n"
            ));
        }
        let sum = |k: &str| self.tw.iter().filter_map(|v| v[k].as_u64()).sum::<u64>();
        let by = self
            .tw
            .first()
            .and_then(|v| v["counted_by"].as_str())
            .unwrap_or("?");
        md.push_str(&format!(
            "\nTIME_WAIT, {} connections in a namespace of their own under `--hooks trampoline`: \
             `entered` {} and `expired` {} summed over {} `time_wait` records (counted_by: {by}); \
             `ss` saw {} TIME_WAIT sockets before `ss -K` and {} after; the last record's total: {}.\n",
            args.tw_conns,
            sum("entered"),
            sum("expired"),
            self.tw.len(),
            self.ss_before.map_or("?".into(), |n| n.to_string()),
            self.ss_after.map_or("?".into(), |n| n.to_string()),
            self.tw.last().map_or("?".into(), |v| v["total"].to_string()),
        ));
        md
    }

    fn to_json(&self, kernel: &str, release: &str, accel: &str) -> Value {
        json!({
            "kernel": kernel,
            "release": release,
            "accelerator": accel,
            "windows": self.windows.iter().map(|w| json!({
                "round": w.round, "step": w.step, "configuration": w.cfg,
                "syscall_ns_fastest_tenth": w.syscall_ns, "syscall_ns": w.syscall_mean_ns,
                "conn_per_s": w.conn_s, "conn_per_s_fastest_second": w.conn_best_s,
                "failed_connects": w.failed,
                "agent_cpu_ticks": w.agent_ticks,
            })).collect::<Vec<_>>(),
            "paired": BENCH_CFGS.iter().map(|c| {
                let p = self.paired(c);
                json!({
                    "configuration": c,
                    "syscall_cost_ratio_fastest_tenth": p.iter().map(|x| x.syscall_best).collect::<Vec<_>>(),
                    "syscall_cost_ratio": p.iter().map(|x| x.syscall_mean).collect::<Vec<_>>(),
                    "churn_ratio_fastest_second": p.iter().map(|x| x.churn_best).collect::<Vec<_>>(),
                    "churn_ratio": p.iter().map(|x| x.churn_mean).collect::<Vec<_>>(),
                })
            }).collect::<Vec<_>>(),
            "time_wait": {
                "records": self.tw,
                "ss_before_kill": self.ss_before,
                "ss_after_kill": self.ss_after,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(lines: &[&str], tests: &[(&str, &str)]) -> Row {
        let mut r = Row::new(Kernel::V5_10, Path::new("/nonexistent"));
        for l in lines {
            r.line(l);
        }
        r.finish(tests);
        r
    }

    #[test]
    fn an_agent_that_never_gets_ready_is_one_line_with_its_error() {
        let r = row(
            &[
                "[    0.000000] Linux version 5.10.0-32-cloud-amd64",
                "PWVM|init|5.10.0-32-cloud-amd64|3.30",
                "PWVM|agent-start|3.31",
                "PWVM|agent-stderr|Error: loading sys_exit_listen: the verifier rejected it",
                "PWVM|agent-stderr|0: (bf) r6 = r1",
                "PWVM|agent-exit|1|0",
                "PWVM|doctor|FAIL program sys_exit_listen rejected",
                "PWVM|doctor-exit|1",
                "PWVM|skip|the agent did not start",
                "PWVM|done|9.1",
            ],
            &[("pipeline", "udp_conflict")],
        );
        let p = r.problem.as_deref().unwrap();
        assert!(
            p.starts_with("the agent did not start (exit 1): Error: loading sys_exit_listen"),
            "{p}"
        );
        assert!(p.ends_with("log: /nonexistent/5.10.log"), "{p}");
        assert!(!p.contains('\n'));
        assert!(matrix_md(&[r]).contains("not run: the agent did not start"));
    }

    #[test]
    fn markers_are_found_behind_kernel_messages_and_carriage_returns() {
        let ready =
            r#"{"type":"agent","event":"ready","programs":["sys_enter_bind"],"startup_ms":2237}"#;
        let degraded =
            r#"{"type":"agent","event":"degraded","feature":"fexit","missing":"BPF trampolines"}"#;
        let r = row(
            &[
                "PWVM|init|6.12.117+deb13-cloud-amd64|3.2",
                &format!("PWVM|agent|{degraded}"),
                &format!("[   12.5] random: crng init done PWVM|agent|{ready}"),
                "PWVM|agent-exit|0|1",
                "PWVM|test-start|udp_conflict|10.0",
                "PWVM|test|ok|udp_conflict|10.0|13.25|0",
                "PWVM|test-start|udp_holder|13.3",
                "PWVM|test-out|udp_holder|thread 'udp_holder' panicked at tests/tests/attribution.rs:9:5:",
                "PWVM|test-out|udp_holder|assertion failed: holder",
                "PWVM|test|FAILED|udp_holder|13.3|15.0|101",
                "PWVM|done|15.1\r",
            ],
            &[("pipeline", "udp_conflict"), ("attribution", "udp_holder")],
        );
        assert_eq!(r.ready().unwrap()["startup_ms"], 2237);
        assert_eq!(r.degraded(), ["fexit (missing BPF trampolines)"]);
        assert_eq!(r.tests.len(), 2);
        assert!((r.tests[0].secs.unwrap() - 3.25).abs() < 1e-9);
        assert_eq!(
            failure_excerpt(&r.tests[1].output, r.tests[1].exit, r.tests[1].secs),
            "assertion failed: holder"
        );
        assert_eq!(
            r.problem.as_deref(),
            Some("1 of 2 tests failed: udp_holder; log: /nonexistent/5.10.log")
        );
    }

    #[test]
    fn a_guest_that_stops_early_says_where() {
        let r = row(
            &[
                "PWVM|init|6.1.0-50-cloud-amd64|4.2",
                r#"PWVM|agent|{"type":"agent","event":"ready","programs":[]}"#,
                "PWVM|agent-exit|0|1",
                "PWVM|test-start|time_wait_counts_match_ss|20.0",
                "[   30.1] Out of memory: Killed process 1 (init)",
            ],
            &[("attribution", "time_wait_counts_match_ss")],
        );
        let p = r.problem.unwrap();
        assert!(
            p.starts_with("stopped before the checks finished, during time_wait_counts_match_ss"),
            "{p}"
        );
        let r = row(
            &["[    3.5] Kernel panic - not syncing: VFS: Unable to mount root fs"],
            &[],
        );
        assert!(r
            .problem
            .unwrap()
            .starts_with("the kernel panicked before init"));
    }

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut c = Cpio::default();
        c.file("pw/a", b"hello", 0o644).unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        let b = c.finish();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        // The parent directory comes first, then the file.
        assert_eq!(&b[110..113], b"pw\0");
        assert!(b.windows(11).any(|w| w == b"TRAILER!!!\0"));
    }

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=inet_diag,foo-bar\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["inet_diag", "foo-bar"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
    }

    #[test]
    fn bench_windows_pair_with_the_no_agent_windows_around_them() {
        let log = "noise PWVM|round|1\n\
                   PWVM|bench|1|1|none|1000.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|ready|{\"hooks\":\"tracepoint\",\"programs\":[\"sys_enter_bind\"]}\n\
                   PWVM|bench|1|2|tracepoint|1300.0|1430.0|900.0|1080|0|45\n\
                   PWVM|bench|1|3|none|1000.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|ready|{\"hooks\":\"trampoline\",\"programs\":[\"tr_release\"]}\n\
                   PWVM|bench|1|4|trampoline|1010.0|1100.0|990.0|1200|2|40\n\
                   PWVM|bench|1|5|none|1020.0|1100.0|1000.0|1200|0|0\n\
                   PWVM|bench|1|6|trampoline-all|1.0|x\n\
                   PWVM|tw-ss|before|5000\n\
                   PWVM|tw|{\"total\":5000,\"entered\":5000,\"expired\":0,\"counted_by\":\"events\"}\n\
                   PWVM|done|9.0\n";
        let r = BenchResult::parse(log);
        assert_eq!(r.windows.len(), 5, "the malformed line is skipped");
        let tp = r.paired("tracepoint");
        assert_eq!(tp.len(), 1);
        assert!((tp[0].syscall_best - 1.3).abs() < 1e-9 && (tp[0].churn_mean - 0.9).abs() < 1e-9);
        assert!((tp[0].churn_best - 0.9).abs() < 1e-9 && (tp[0].syscall_mean - 1.3).abs() < 1e-9);
        let t = r.paired("trampoline");
        assert_eq!(t.len(), 1);
        assert!((t[0].syscall_best - 1.0).abs() < 1e-9 && (t[0].churn_mean - 0.99).abs() < 1e-9);
        assert_eq!(r.hooks["trampoline"], "trampoline (tr_release)");
        assert_eq!(r.windows[1].agent_ticks, Some(45));
        assert_eq!(r.ss_before, Some(5000));
        assert_eq!(r.tw.len(), 1);
        assert!(r.paired("trampoline-all").is_empty());
        assert!(r
            .markdown(
                "6.1",
                "tcg",
                &VmBenchArgs {
                    kernels: vec![],
                    rounds: 1,
                    window: 5,
                    syscalls: 10,
                    tw_conns: 5000
                }
            )
            .contains("| tracepoint | tracepoint (sys_enter_bind) | 1300 | +30.0% / +30.0% |"));
    }

    #[test]
    fn all_expands_once_and_in_order() {
        assert_eq!(
            expand(&[Kernel::V6_12, Kernel::All]),
            [
                Kernel::V6_12,
                Kernel::V5_10,
                Kernel::V6_1,
                Kernel::Sid,
                Kernel::Host
            ]
        );
    }
}
