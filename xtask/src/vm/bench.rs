//! `cargo xtask vm-bench`: each hook family against no agent, side by side in one guest.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

use super::{
    apt::busybox,
    bench_result::BenchResult,
    expand,
    guest::{build_test_bins, BOOT_TIMEOUT},
    initramfs::{build_image, Payload},
    kernels::fetch_kernel,
    qemu::{detect_accel, qemu},
    row::Row,
    runner::supervise,
    which, Kernel,
};
use crate::{cargo, setup, step, workspace_root};

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
pub(super) const BENCH_CFGS: [&str; 3] = ["tracepoint", "trampoline", "trampoline-all"];

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
    let load = build_pw_load()?;
    let out_dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&out_dir)?;
    let bb = busybox().context("busybox")?;
    let ip = which("ip").context("iproute2's ip is not installed")?;
    let script = bench_script(&load, &ip, &args);
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

/// The load generator the guest runs, built in release.
fn build_pw_load() -> Result<PathBuf> {
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
    Ok(workspace_root().join("target/release/pw-load"))
}

/// `BENCH` with the load generator, iproute2's ip and the command's settings filled in.
fn bench_script(load: &Path, ip: &Path, args: &VmBenchArgs) -> String {
    BENCH
        .replace("@LOAD@", &load.display().to_string())
        .replace("@IP@", &ip.display().to_string())
        .replace("@SYSCALLS@", &args.syscalls.to_string())
        .replace("@WINDOW@", &args.window.to_string())
        .replace("@ROUNDS@", &args.rounds.to_string())
        .replace("@TWCONNS@", &args.tw_conns.to_string())
        .replace("@CFGS@", &BENCH_CFGS.join(" "))
}
