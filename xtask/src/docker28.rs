//! Docker 28 beside Debian 12's 20.10: `cargo xtask test` runs the Docker suite against each
//! in turn.
//!
//! Docker 28 is Debian sid's `docker.io` (28.5.2) with sid's `containerd` (2.1) and
//! `tini-static` (as `docker-init`), fetched once with a private apt state into
//! `~/.cache/portwatch/engines/docker-28/bin`. These binaries run on this host's glibc; sid's
//! `runc` does not (it needs glibc 2.38), so the host's own runc (bookworm's 1.1.5, installed
//! with 20.10) serves both engines.
//!
//! The engine keeps its own data and exec roots, so neither sees the other's containers,
//! images or networks. It answers on the default socket and writes the default pid file, so
//! the tests and the agent find it where they find 20.10. One runs at a time: 20.10 is
//! stopped first, and started again afterwards whatever happened.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use portwatch_tests::docker as d;

use crate::{setup, step, vm};

/// Docker 28's own state: images, containers, volumes.
pub const DATA_ROOT: &str = "/var/lib/docker28";
/// Docker 28's own runtime state (its containerd's socket among it).
pub const EXEC_ROOT: &str = "/var/run/docker28";
/// Where Docker 28's log goes (20.10 logs to `d::DOCKERD_LOG`).
pub const LOG: &str = "/var/log/portwatch-dockerd28.log";

/// (package, file in it, name in bin/).
const FILES: [(&str, &str, &str); 5] = [
    ("docker.io", "usr/sbin/dockerd", "dockerd"),
    ("docker.io", "usr/sbin/docker-proxy", "docker-proxy"),
    ("containerd", "usr/bin/containerd", "containerd"),
    (
        "containerd",
        "usr/bin/containerd-shim-runc-v2",
        "containerd-shim-runc-v2",
    ),
    ("tini-static", "usr/bin/tini-static", "docker-init"),
];

fn dir() -> PathBuf {
    setup::cache_dir().join("engines").join("docker-28")
}

/// The engine's binaries, fetched and extracted the first time; later calls only check
/// that they are there.
pub fn fetch() -> Result<PathBuf> {
    let bin = dir().join("bin");
    if FILES.iter().all(|(_, _, name)| bin.join(name).is_file()) {
        return Ok(bin);
    }
    step(&format!(
        "fetching Docker 28 (Debian sid's docker.io, containerd and tini-static, about 50 MB) \
         into {} (once)",
        dir().display()
    ));
    let apt = vm::Apt::new("sid")?;
    apt.ensure_lists()?;
    let debs = dir().join("debs");
    let mut pkgs: Vec<String> = FILES.iter().map(|(p, _, _)| p.to_string()).collect();
    pkgs.dedup();
    apt.download(&pkgs, &debs)?;
    // Into a scratch directory first, so an interrupted fetch leaves no half-filled bin/.
    let x = dir().join("x");
    let staged = dir().join("bin.new");
    for d in [&x, &staged] {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::create_dir_all(&staged)?;
    for p in &pkgs {
        vm::dpkg_extract(&vm::deb_in(&debs, p)?, &x)?;
    }
    for (pkg, file, name) in FILES {
        std::fs::copy(x.join(file), staged.join(name))
            .with_context(|| format!("the {pkg} package has no {file}"))?;
    }
    let _ = std::fs::remove_dir_all(&bin);
    std::fs::rename(&staged, &bin)?;
    let _ = std::fs::remove_dir_all(&x);
    Ok(bin)
}

/// `bin` first on PATH.
fn path_with(bin: &Path) -> Result<OsString> {
    let old = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&old)))
        .context("PATH cannot hold the engine's directory")
}

/// The environment that makes `dockerd` (and a test's restart of it) Docker 28.
pub fn env(bin: &Path) -> Result<Vec<(&'static str, OsString)>> {
    Ok(vec![
        ("PATH", path_with(bin)?),
        (
            d::DOCKERD_ARGS_ENV,
            format!("--data-root {DATA_ROOT} --exec-root {EXEC_ROOT}").into(),
        ),
    ])
}

/// The daemon's version, from its API.
pub fn server_version() -> Option<String> {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run `f` with Docker 28 answering on the default socket instead of 20.10. `f` gets the
/// environment its commands need (for tests that restart the daemon). 20.10 runs again
/// afterwards, also when `f` or the switch failed.
pub fn with_docker28<T>(f: impl FnOnce(&[(&'static str, OsString)]) -> Result<T>) -> Result<T> {
    let bin = fetch()?;
    let env = env(&bin)?;
    let result = switch_to_28(&env).and_then(|()| f(&env));
    let back = back_to_20();
    let r = result?;
    back?;
    Ok(r)
}

fn switch_to_28(env: &[(&'static str, OsString)]) -> Result<()> {
    step("stopping Docker 20.10 for the Docker 28 run");
    d::stop_dockerd(Duration::from_secs(60)).context("stopping Docker 20.10 failed")?;
    step(&format!(
        "starting Docker 28 (data root {DATA_ROOT}, log {LOG}); waiting up to 60 s for it"
    ));
    let t = Instant::now();
    let started = d::start_dockerd_with(Path::new(LOG), Duration::from_secs(60), env, &[]);
    started.context("starting Docker 28 failed")?;
    let version = server_version().unwrap_or_default();
    if !version.starts_with("28.") {
        bail!("the daemon on the default socket is {version:?}, not Docker 28");
    }
    step(&format!(
        "Docker {version} answers after {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    // Docker 28 keeps its own images: the first run builds the test image there.
    setup::test_image()
}

fn back_to_20() -> Result<()> {
    let is_28 = server_version().is_some_and(|v| v.starts_with("28."));
    if is_28 || !d::dockerd_running() {
        step("stopping Docker 28; starting Docker 20.10 again");
        d::stop_dockerd(Duration::from_secs(60)).context("stopping Docker 28 failed")?;
    }
    if !d::dockerd_running() {
        d::start_dockerd(Path::new(d::DOCKERD_LOG), Duration::from_secs(60))
            .context("starting Docker 20.10 again failed")?;
    }
    match server_version() {
        Some(v) if !v.starts_with("28.") => Ok(()),
        v => bail!("after the Docker 28 run the default socket answers as {v:?}, not 20.10"),
    }
}
