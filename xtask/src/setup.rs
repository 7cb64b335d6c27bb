//! Idempotent machine setup. Each step checks first and only installs what is missing, so a
//! second run takes well under a second. Nothing here relies on something installed by hand.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use portwatch_tests::{docker as d, podman as pm};

use crate::{run, step};

/// What building the agent needs.
pub fn build() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    tracefs()
}

/// Debian packages the tests and benchmarks use, installed only when their command is
/// missing: `apt-get update` runs once, and only if something is missing.
pub fn apt_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| {
            !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(cmd).is_file())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} (apt-get)", missing.join(", ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("installing {} failed", missing.join(", ")))
}

/// What `vm-test` needs besides the build: qemu, and the tools that unpack Debian's kernel
/// packages and their compressed modules.
pub fn for_vm() -> Result<()> {
    build()?;
    apt_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dpkg-deb", "dpkg"),
        ("xz", "xz-utils"),
        ("zstd", "zstd"),
        ("ip", "iproute2"),
        ("ss", "iproute2"),
    ])
}

/// What running it on this host needs: a daemon to join as well.
pub fn for_run() -> Result<()> {
    build()?;
    dockerd()
}

/// What the tests need: the Docker test image as well, and Podman with its API service
/// and the same image.
pub fn for_tests() -> Result<()> {
    for_run()?;
    test_image()?;
    // The compose test runs Debian's docker-compose (1.29) against this dockerd.
    apt_tools(&[("docker-compose", "docker-compose")])?;
    podman()
}

/// Podman (Debian's, rootful) with its Docker-compatible API service running on
/// `pm::SOCKET`, and the test image in its store: installed, started and loaded only when
/// missing.
fn podman() -> Result<()> {
    if !pm::installed() {
        // With its recommends: netavark (the network backend publishing ports needs) and
        // the rest of a working rootful setup come that way.
        step("installing podman (apt-get)");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "podman"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .context("installing podman failed")?;
    }
    if pm::service_running() && pm::service_in_other_mount_ns() {
        step(
            "restarting Podman's API service: it runs in another mount namespace, where the \
             network namespaces podman makes here are not visible",
        );
        pm::stop_service(Duration::from_secs(10)).context("stopping the Podman service failed")?;
    }
    if !pm::service_running() {
        step(&format!(
            "starting Podman's API service on {} (log: {})",
            pm::SOCKET,
            pm::SERVICE_LOG
        ));
        pm::start_service(Path::new(pm::SERVICE_LOG), Duration::from_secs(30))
            .context("starting `podman system service` failed")?;
    }
    if !pm::image_present() {
        step(&format!(
            "loading the test image into Podman's store as {}",
            pm::IMAGE
        ));
        pm::load_image().context("loading the test image into Podman failed")?;
    }
    Ok(())
}

/// A running dockerd: installed from Debian's docker.io when missing, started in the
/// background when not running (fresh machines and CI have none running).
fn dockerd() -> Result<()> {
    if d::dockerd_running() {
        return Ok(());
    }
    if !d::dockerd_installed() {
        apt_tools(&[("dockerd", "docker.io")])?;
    }
    let timeout = Duration::from_secs(60);
    step(&format!(
        "starting dockerd in the background (log: {}); waiting up to {} s for `docker info`",
        d::DOCKERD_LOG,
        timeout.as_secs()
    ));
    let t = Instant::now();
    d::start_dockerd(Path::new(d::DOCKERD_LOG), timeout).context("starting dockerd failed")?;
    step(&format!(
        "dockerd answers after {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The image the Docker tests run, built once from Debian's busybox-static (nothing can be
/// pulled here); Docker keeps it, so later runs only check that it exists.
pub(crate) fn test_image() -> Result<()> {
    if d::image_present() {
        return Ok(());
    }
    step(&format!(
        "building the test image {} from Debian's busybox-static (once; Docker keeps it)",
        d::TEST_IMAGE
    ));
    d::build_image().context("building the Docker test image failed")
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
}

pub fn cache_dir() -> PathBuf {
    home().join(".cache/portwatch")
}

/// The eBPF crate is built with `cargo +nightly -Z build-std=core`, which needs rust-src.
fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs) and was not found")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (eBPF programs need -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        step("installing rust-src for the nightly toolchain");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker must link against an LLVM of the same major version as the nightly rustc.
/// A plain `cargo install bpf-linker` wants a system libLLVM of that version, which distros
/// rarely ship; instead link it against the nightly toolchain's own libLLVM through a
/// minimal LLVM prefix (an llvm-config that prints the version, and the library symlinked).
fn bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let sysroot = PathBuf::from(sysroot.trim());
    let vv =
        output(Command::new("rustc").args(["+nightly", "-vV"])).context("rustc +nightly -vV")?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV printed no LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let lib = std::fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("reading {}", sysroot.join("lib").display()))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so") || n.starts_with("libLLVM-"))
        .with_context(|| format!("no libLLVM in {}/lib", sysroot.display()))?;

    let prefix = cache_dir().join("rust-llvm");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    let llvm_config = prefix.join("bin/llvm-config");
    std::fs::write(&llvm_config, format!("#!/bin/sh\necho {llvm}\n"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&llvm_config, std::fs::Permissions::from_mode(0o755))?;
    for name in ["libLLVM.so".to_string(), lib.clone()] {
        let link = prefix.join("lib").join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&lib), &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    step(&format!(
        "building bpf-linker against the nightly toolchain's LLVM {llvm} (about 2 minutes the \
         first time; its build is cached in {})",
        cache_dir().display()
    ));
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env("CARGO_TARGET_DIR", cache_dir().join("bpf-linker-target")))
    .context("building bpf-linker failed; see the cargo output above")?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!(
            "bpf-linker was installed but does not run; is ~/.cargo/bin on PATH? \
             (export PATH=$HOME/.cargo/bin:$PATH)"
        );
    }
    Ok(())
}

/// Attaching tracepoints needs tracefs; fresh boots often do not mount it. The agent mounts
/// it too, but the benchmarks' peers (bpftrace, tcpstates) need it as well.
fn tracefs() -> Result<()> {
    for p in [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ] {
        if std::path::Path::new(p).is_dir() {
            return Ok(());
        }
    }
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    unsafe extern "C" {
        safe fn geteuid() -> u32;
    }
    if geteuid() != 0 {
        step(
            "tracefs is not mounted and this is not root: the agent will mount it when run as root",
        );
        return Ok(());
    }
    step("mounting tracefs at /sys/kernel/tracing");
    run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
