//! What the rows run: the in-guest tests, the check script (guest and host) and the
//! guest's /init, their time limits, and the test binaries built for them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{cargo, step};

/// The in-guest tests, as TARGET::NAME. They need nothing but a kernel, root, `ip` and
/// `ss`; the Docker and soak tests stay on the host.
pub(super) const TESTS: &[&str] = &[
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
pub(super) const CI_TESTS: &[&str] = &[
    "listener_started_before_the_agent_is_attributed",
    "listen_time_conflict",
    "conflict_inside_a_namespace_names_the_holder_there",
    "ring_buffer_overflow_is_counted_exactly",
];

/// Test targets built for the guest (faults is not in TESTS yet but is built alongside).
const TEST_TARGETS: &[&str] = &["pipeline", "attribution", "faults"];

pub(super) const MARK: &str = "PWVM|";
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Seconds the agent gets to print `ready`, and each test to finish, in the guest.
pub(super) const READY_SECS: u32 = 60;
pub(super) const TEST_SECS: u32 = 300;
/// The whole row: boot, the agent check and doctor, then each test's share. A test takes
/// 3-30 s under TCG; one that hangs until TEST_SECS still leaves the rest their time.
pub(super) fn row_timeout(tests: usize) -> Duration {
    BOOT_TIMEOUT + Duration::from_secs(120 + 60 * tests as u64)
}

/// The checks every row runs, guest or host: start the agent alone and report its `agent`
/// records (or its stderr: a verifier rejection shows there) and what `doctor` says, then
/// run each test on its own. POSIX sh, so busybox ash and dash run it alike.
pub(super) const CHECKS: &str = r#"exec 2>&1
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
pub(super) const INIT: &str = r#"#!/bin/sh
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

pub(super) const PROBE_INIT: &str = "#!/bin/sh\necho PWVM|probe\npoweroff -f\n";

pub(super) struct TestBins {
    pub(super) by_target: HashMap<String, PathBuf>,
    pub(super) hold: PathBuf,
}

/// The end-to-end test binaries, built as `cargo test` would run them, and pw-hold: the
/// tests find it by its absolute compile-time path, so the guest has it at that path too.
pub(super) fn build_test_bins() -> Result<TestBins> {
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
pub(super) fn tests_list(
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
