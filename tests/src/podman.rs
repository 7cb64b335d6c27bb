//! A real Podman (Debian's 4.3, rootful) for the end-to-end tests, and for `cargo xtask
//! setup`, which uses the same code to start its Docker-compatible API service and to put
//! the test image into its store.
//!
//! Podman's default RLIMIT_NOFILE (1048576) is above this sandbox's hard limit, so every
//! container here runs with `ULIMITS`; nothing in the host's containers.conf is changed.

use std::{
    io::{self, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::docker::{unique, Container, TEST_IMAGE};

/// Where the API service listens (the agent joins it there by default when it exists).
pub const SOCKET: &str = "/run/podman/podman.sock";
/// Where a service started by the project logs.
pub const SERVICE_LOG: &str = "/var/log/portwatch-podman.log";
/// The test image as Podman names it once loaded from Docker's store.
pub const IMAGE: &str = "localhost/portwatch-test:busybox";
/// Limits every test container runs with (see the module's note).
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// `podman ARGS`, output captured. Errors only when the CLI cannot be started.
pub fn podman(args: &[&str]) -> io::Result<Output> {
    crate::docker::engine("podman", args)
}

pub fn installed() -> bool {
    Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The API service answers `GET /_ping` within 2 s.
pub fn service_running() -> bool {
    let Ok(mut s) = UnixStream::connect(SOCKET) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).contains(" 200 ")
}

/// Pids of the `podman system service` processes serving `SOCKET`.
pub fn service_pids() -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                args.first().is_some_and(|a| a.ends_with(b"podman"))
                    && args
                        .windows(2)
                        .any(|w| w == [&b"system"[..], &b"service"[..]])
                    && args.iter().any(|a| a.ends_with(SOCKET.as_bytes()))
            })
        })
        .collect()
}

/// A service started from another mount namespace (a private one a test harness made,
/// since gone) cannot open the network namespaces the podman CLI mounts under /run/netns
/// here: every inspect of a running container then fails with "unknown FS magic". True
/// when some service process is in one.
pub fn service_in_other_mount_ns() -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let ours = ns("self");
    service_pids()
        .iter()
        .any(|p| ns(&p.to_string()).is_some_and(|n| Some(n) != ours))
}

/// SIGTERM to every service process, then wait (up to `grace`) until they are gone.
pub fn stop_service(grace: Duration) -> io::Result<()> {
    for pid in service_pids() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let deadline = std::time::Instant::now() + grace;
    while !service_pids().is_empty() {
        if std::time::Instant::now() >= deadline {
            for pid in service_pids() {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if service_pids().is_empty() {
        Ok(())
    } else {
        Err(err("`podman system service` did not exit".into()))
    }
}

/// Start `podman system service` on `SOCKET` in the background (its own process group, so
/// it outlives the caller), logging to `log`, and wait until it answers.
pub fn start_service(log: &Path, timeout: Duration) -> io::Result<()> {
    if let Some(dir) = Path::new(SOCKET).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut cmd = Command::new("podman");
    cmd.args(["system", "service", "-t", "0", &format!("unix://{SOCKET}")]);
    crate::docker::start_daemon(
        cmd,
        "`podman system service`",
        "apt-get install podman",
        log,
        timeout,
        service_running,
    )
}

pub fn image_present() -> bool {
    podman(&["image", "exists", IMAGE]).is_ok_and(|o| o.status.success())
}

/// Copy the Docker test image into Podman's store (`docker save | podman load`).
pub fn load_image() -> io::Result<()> {
    let mut save = Command::new("docker")
        .args(["save", TEST_IMAGE])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("running `docker save`: {e}")))?;
    let o = Command::new("podman")
        .arg("load")
        .stdin(save.stdout.take().expect("piped"))
        .output()
        .map_err(|e| err(format!("running `podman load`: {e}")))?;
    let saved = save.wait()?.success();
    if !saved || !o.status.success() || !image_present() {
        return Err(err(format!(
            "docker save {TEST_IMAGE} | podman load failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

pub fn require_podman() {
    crate::require_root();
    assert!(
        service_running(),
        "Podman's API service does not answer on {SOCKET}: `cargo xtask test` starts it (and \
         installs podman if needed)"
    );
    assert!(
        image_present(),
        "the test image {IMAGE} is missing from Podman's store: `cargo xtask test` loads it"
    );
}

/// `podman run -d --name NAME ULIMITS ARGS... IMAGE CMD...`; a failed start is returned,
/// not a panic, so a test can expect one. Removed on drop.
pub fn run(tag: &str, args: &[&str], cmd: &[&str]) -> Container {
    let mut all: Vec<&str> = ULIMITS.to_vec();
    all.extend_from_slice(args);
    Container::run_on("podman", IMAGE, &unique(&format!("pod-{tag}")), &all, cmd)
}

/// `run`, and the container must have started.
pub fn running(tag: &str, args: &[&str], cmd: &[&str]) -> Container {
    run(tag, args, cmd).started()
}
