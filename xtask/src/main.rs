//! Developer and operator tasks: `cargo xtask setup | run | test | lint | bench | vm-test`.
//!
//! Every task starts with `setup`, which installs what a fresh machine lacks (rust-src for
//! the nightly toolchain, bpf-linker built against that nightly's own libLLVM, the tracefs
//! mount, a running dockerd; for `test`, the Docker test image) and is fast when everything
//! is already there.

mod bench;
mod docker28;
mod docker_scale;
mod package;
mod setup;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "portwatch developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (rust-src, bpf-linker, tracefs mount, dockerd running, the
    /// Docker test image). Idempotent.
    Setup,
    /// Setup, build (release) and run the agent as root: `cargo xtask run -- --all-events`.
    Run {
        /// Arguments passed to `portwatch run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then run every test: unit tests and the privileged end-to-end tests, the
    /// ten-minute soak included.
    Test {
        /// Only run tests whose name contains this string.
        filter: Option<String>,
    },
    /// rustfmt check and clippy over the userspace crates and the eBPF crate.
    Lint,
    /// Only the soak: the agent under ten minutes of mixed churn (PORTWATCH_SOAK_SECS), RSS
    /// growth in MB/h.
    Soak,
    /// Setup, then the side-by-side benchmarks; results in target/bench/.
    Bench(bench::BenchArgs),
    /// Setup, then time the Docker join's sync and measure its memory with many containers;
    /// results in target/bench/docker-scale.md.
    DockerScale(docker_scale::ScaleArgs),
    /// Setup, then build what users install into target/package/: the .deb, the static
    /// binary portwatch-<version>-x86_64-linux, and the image portwatch:<version> in the
    /// local Docker engine.
    Package(package::PackageArgs),
    /// Setup, then boot the agent and its end-to-end tests in qemu on Debian's kernels (and
    /// optionally on this host) and print a kernel matrix; results in target/vm/. KVM when
    /// a guest boots with it, else TCG (PORTWATCH_VM_ACCEL=kvm|tcg overrides).
    VmTest(vm::VmArgs),
    /// Setup, then measure in qemu, side by side in one guest: a cheap syscall's cost and
    /// loopback churn under each hook family against no agent, and TIME_WAIT counted by the
    /// kernel against `ss`. Results in target/vm/bench.md and bench.json.
    VmBench(vm::VmBenchArgs),
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn step(msg: &str) {
    eprintln!("[xtask] {msg}");
}

/// Run a command, streaming its output; fail with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Build the agent and return the binary's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--package", "portwatch"]);
    if release {
        c.arg("--release");
    }
    step(&format!(
        "building portwatch ({}; the eBPF object is built too, the first time takes minutes)",
        if release { "release" } else { "debug" }
    ));
    run(&mut c)?;
    let bin = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("portwatch");
    if !bin.exists() {
        bail!("build finished but {} is missing", bin.display());
    }
    Ok(bin)
}

/// The end-to-end tests that run against each Docker engine in turn.
const DOCKER_SUITE: [&str; 2] = ["docker", "stale"];

/// The soak's test function (tests/tests/soak.rs).
const SOAK_TEST: &str = "memory_stays_flat_under_mixed_churn";

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::for_tests(),
        Cmd::Run { args } => run_cmd(args),
        Cmd::Test { filter } => test_cmd(filter),
        Cmd::Soak => soak_cmd(),
        Cmd::Lint => lint_cmd(),
        Cmd::Bench(args) => {
            setup::build()?;
            bench::run(args)
        }
        Cmd::DockerScale(args) => docker_scale::run(args),
        Cmd::Package(args) => package::run_cmd(args),
        Cmd::VmTest(args) => vm::run_cmd(args),
        Cmd::VmBench(args) => vm::bench_cmd(args),
    }
}

/// `cargo xtask run`: setup, build the release agent and exec it with `args`.
fn run_cmd(args: Vec<String>) -> Result<()> {
    setup::for_run()?;
    let bin = build_agent(true)?;
    step(&format!(
        "starting {} run {}",
        bin.display(),
        args.join(" ")
    ));
    let mut c = Command::new(&bin);
    c.arg("run").args(&args);
    use std::os::unix::process::CommandExt;
    // Replace xtask so signals (Ctrl-C, SIGTERM) reach the agent directly.
    Err(c.exec()).with_context(|| format!("could not exec {}", bin.display()))
}

/// `cargo xtask test`: unit tests, the end-to-end tests (Docker 28 too), the soak, the VM matrix.
fn test_cmd(filter: Option<String>) -> Result<()> {
    setup::for_tests()?;
    // The fault tests check with bpftool that nothing stays attached.
    setup::apt_tools(&[("bpftool", "bpftool"), ("ss", "iproute2"), ("gzip", "gzip")])?;
    // The end-to-end tests run the release agent: what users run, and what the
    // benchmarks measure.
    let bin = build_agent(true)?;
    step("unit tests");
    let mut c = cargo();
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "portwatch-ebpf",
        "--lib",
        "--bins",
    ]);
    if let Some(f) = &filter {
        c.arg(f);
    }
    run(&mut c)?;
    step("end-to-end tests against the real kernel (one at a time: they share it)");
    let mut c = cargo();
    c.args(["test", "--package", "portwatch-tests", "--tests"])
        .env("PORTWATCH_BIN", &bin);
    c.arg("--");
    if let Some(f) = &filter {
        c.arg(f);
    }
    c.args(["--test-threads=1", "--skip", SOAK_TEST]);
    run(&mut c)?;
    // The same Docker suite against Docker 28, which binds published ports in dockerd
    // itself; 20.10 runs again afterwards.
    step("the Docker suite against Docker 28 (Debian sid's docker.io), then 20.10 again");
    docker28::with_docker28(|env| {
        let mut c = cargo();
        c.args(["test", "--package", "portwatch-tests"])
            .args(DOCKER_SUITE.iter().flat_map(|t| ["--test", t]))
            .env("PORTWATCH_BIN", &bin)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--");
        if let Some(f) = &filter {
            c.arg(f);
        }
        run(c.arg("--test-threads=1"))
    })?;
    // The soak (tests/tests/soak.rs) last and on its own, with its output shown: ten
    // minutes of churn with the agent's RSS sampled, and the growth it reports is a
    // result to read even when it passes. PORTWATCH_SOAK_SECS changes its length.
    if filter.as_deref().is_none_or(|f| SOAK_TEST.contains(f)) {
        step("soak: the agent under mixed churn, RSS sampled (10 minutes by default)");
        run(cargo()
            .args(["test", "--package", "portwatch-tests", "--test", "soak"])
            .env("PORTWATCH_BIN", &bin)
            .args(["--", "--nocapture"]))?;
    }
    step("the end-to-end tests on Debian's kernels, in VMs");
    vm::run_matrix(vm::DEFAULT_KERNELS)
}

/// `cargo xtask soak`: setup, build the release agent and run the soak alone, output shown.
fn soak_cmd() -> Result<()> {
    setup::for_tests()?;
    let bin = build_agent(true)?;
    step("soak: the agent under mixed churn, RSS sampled (10 minutes by default)");
    run(cargo()
        .args(["test", "--package", "portwatch-tests", "--test", "soak"])
        .env("PORTWATCH_BIN", &bin)
        .args(["--", "--nocapture"]))
}

/// `cargo xtask lint`: rustfmt check, clippy on the userspace crates, then on the eBPF crate.
fn lint_cmd() -> Result<()> {
    setup::build()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "portwatch-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // `cargo +nightly` only works through rustup's proxy; $CARGO is the toolchain's
    // own binary, which does not understand `+toolchain`.
    run(Command::new("rustup")
        .current_dir(workspace_root().join("portwatch-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "portwatch-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
            // Map keys passed as `&key` to aya-ebpf's `impl Borrow<K>`: style only.
            // The programs are verified on five kernels as written, and a rewrite
            // would need that matrix again for no change in behaviour.
            "-A",
            "clippy::needless_borrows_for_generic_args",
        ]))
}
