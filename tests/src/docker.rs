//! A real Docker daemon for the end-to-end tests, and for `cargo xtask setup`, which uses the
//! same code to start it and to build the test image: one way to do each, whoever asks.
//!
//! Nothing is pulled (this host reaches no registry): the test image is a rootfs holding
//! Debian's statically linked busybox and a few of its applets, imported with
//! `docker import`.

use std::{
    ffi::OsString,
    fs::OpenOptions,
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    schema::{self, DockerEvent},
    Agent, Record,
};

/// The image every Docker test runs: `sh`, `httpd`, `nc`, `sleep` from busybox-static.
pub const TEST_IMAGE: &str = "portwatch-test:busybox";
/// Where a dockerd started by the project logs.
pub const DOCKERD_LOG: &str = "/var/log/portwatch-dockerd.log";
const DOCKERD_PID: &str = "/var/run/docker.pid";
const APPLETS: [&str; 4] = ["sh", "httpd", "nc", "sleep"];

fn err(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// `docker ARGS`, output captured. Errors only when the CLI cannot be started.
pub fn docker(args: &[&str]) -> io::Result<Output> {
    engine("docker", args)
}

/// `CLI ARGS` for an engine's CLI (`docker`, `podman`), output captured.
pub fn engine(cli: &str, args: &[&str]) -> io::Result<Output> {
    Command::new(cli)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            err(format!(
                "running `{cli} {}`: {e}; is the {cli} CLI installed?",
                args.join(" ")
            ))
        })
}

/// The daemon answers `docker info` within 10 s. Bounded: a daemon that is shutting down
/// may accept the connection and never answer, and the CLI would wait forever.
pub fn dockerd_running() -> bool {
    let Ok(mut child) = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// dockerd is installed.
pub fn dockerd_installed() -> bool {
    Command::new("dockerd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Extra arguments for every dockerd the tests start: `cargo xtask test` sets them (with
/// PATH) when it runs the Docker suite against another engine, so that a test that stops
/// and restarts the daemon gets the same engine back.
pub const DOCKERD_ARGS_ENV: &str = "PORTWATCH_DOCKERD_ARGS";

/// `DOCKERD_ARGS_ENV` in `env` when it is there, else in this process's environment,
/// split on whitespace.
pub fn dockerd_args(env: &[(&str, OsString)]) -> Vec<String> {
    let value = env
        .iter()
        .find(|(k, _)| *k == DOCKERD_ARGS_ENV)
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var_os(DOCKERD_ARGS_ENV))
        .unwrap_or_default();
    value
        .to_string_lossy()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The first `name` on PATH, else in /usr/sbin (where Debian puts docker-proxy).
pub fn engine_binary(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Start dockerd in the background (its own session, so it outlives the caller), logging
/// to `log`, and wait until `docker info` answers.
pub fn start_dockerd(log: &Path, timeout: Duration) -> io::Result<()> {
    start_dockerd_with(log, timeout, &[], &[])
}

/// `start_dockerd` with `env` set for dockerd (PATH picks the engine, `DOCKERD_ARGS_ENV`
/// its arguments) and `extra` arguments after `DOCKERD_ARGS_ENV`'s.
pub fn start_dockerd_with(
    log: &Path,
    timeout: Duration,
    env: &[(&str, OsString)],
    extra: &[&str],
) -> io::Result<()> {
    let mut cmd = Command::new("dockerd");
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .args(dockerd_args(env))
        .args(extra);
    start_daemon(
        cmd,
        "dockerd",
        "apt-get install docker.io",
        log,
        timeout,
        dockerd_running,
    )
}

/// Start a daemon `cmd` (`what`, installed by `install`) in its own process group, so it
/// outlives the caller, with its output appended to `log`; wait until `up` says it answers.
pub(crate) fn start_daemon(
    mut cmd: Command,
    what: &str,
    install: &str,
    log: &Path,
    timeout: Duration,
    up: fn() -> bool,
) -> io::Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| err(format!("opening {}: {e}", log.display())))?;
    let out2 = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(out2)
        .process_group(0)
        .spawn()
        .map_err(|e| err(format!("starting {what}: {e}; install it with `{install}`")))?;
    let deadline = Instant::now() + timeout;
    loop {
        if up() {
            // This process is its parent until it exits: reap it when it does, or it stays
            // a zombie that still looks alive to the next stop.
            std::thread::spawn(move || child.wait());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(err(format!(
                "{what} exited with {status} before answering; the end of {}:\n{}",
                log.display(),
                log_tail(log)
            )));
        }
        if Instant::now() >= deadline {
            return Err(err(format!(
                "{what} did not answer within {} s; the end of {}:\n{}",
                timeout.as_secs(),
                log.display(),
                log_tail(log)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn daemon_pid() -> Option<i32> {
    std::fs::read_to_string(DOCKERD_PID)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// SIGTERM to the running dockerd (by the pid it wrote), then wait until it is gone. Debian's
/// 20.10 sometimes lingers after logging "Daemon shutdown complete" (its gRPC client keeps
/// redialling the containerd it already stopped); once its API is gone for `grace`, it
/// gets SIGKILL, so a new one can take the pid file.
pub fn stop_dockerd(grace: Duration) -> io::Result<()> {
    let Some(pid) = daemon_pid() else {
        return if dockerd_running() {
            Err(err(format!(
                "dockerd answers but {DOCKERD_PID} names no pid"
            )))
        } else {
            Ok(())
        };
    };
    // A zombie has exited: only its parent has not reaped it yet.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    let mut api_gone: Option<Instant> = None;
    while alive() {
        if api_gone.is_none() && !dockerd_running() {
            api_gone = Some(Instant::now());
        }
        if api_gone.is_some_and(|t| t.elapsed() >= grace) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if started.elapsed() >= grace * 4 + Duration::from_secs(60) {
            return Err(err(format!(
                "dockerd (pid {pid}) did not exit within {} s of SIGTERM",
                started.elapsed().as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The test image exists.
pub fn image_present() -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", TEST_IMAGE])
        .is_ok_and(|o| o.status.success())
}

/// The statically linked busybox: the installed busybox-static's, or one extracted from
/// its package (downloaded, not installed, so a dynamic busybox on the host stays).
fn static_busybox(work: &Path) -> io::Result<PathBuf> {
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "busybox-static"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    if installed && Path::new("/bin/busybox").exists() {
        return Ok("/bin/busybox".into());
    }
    let download = || {
        Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(work)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        // A fresh machine has no package lists yet.
        let _ = Command::new("apt-get").arg("update").status();
        if !download() {
            return Err(err(
                "`apt-get download busybox-static` failed; check that Debian's package \
                 repositories are reachable"
                    .into(),
            ));
        }
    }
    let deb = std::fs::read_dir(work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| err("apt-get download left no .deb".into()))?;
    let x = work.join("pkg");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .status()?;
    if !ok.success() {
        return Err(err(format!("dpkg-deb -x {} failed", deb.display())));
    }
    Ok(x.join("bin/busybox"))
}

/// Build and import the test image: a rootfs of /bin/busybox plus applet symlinks, piped
/// as a tar into `docker import`.
pub fn build_image() -> io::Result<()> {
    let work = std::env::temp_dir().join(format!("portwatch-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = (|| {
        let busybox = static_busybox(&work)?;
        let root = work.join("rootfs");
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::copy(&busybox, root.join("bin/busybox"))?;
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
        }
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()?;
        let import = Command::new("docker")
            .args(["import", "-", TEST_IMAGE])
            .stdin(tar.stdout.take().expect("piped"))
            .output()?;
        let tar_ok = tar.wait()?.success();
        if !tar_ok || !import.status.success() {
            return Err(err(format!(
                "docker import of the test image failed: {}",
                String::from_utf8_lossy(&import.stderr).trim()
            )));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

// ---- guards for the tests ----

/// A name no other test or run shares.
pub fn unique(tag: &str) -> String {
    format!("pwt-{}-{tag}", std::process::id())
}

fn must(args: &[&str]) -> String {
    let o = docker(args).unwrap();
    assert!(
        o.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A container removed (with `docker rm -f`, or `podman rm -f`) on drop, whether or not it
/// ever started.
pub struct Container {
    /// The engine's CLI: `docker` or `podman`.
    pub cli: &'static str,
    pub name: String,
    /// Full id, when `docker run` got as far as creating it.
    pub id: Option<String>,
    /// What `docker run` printed on stderr (its error, when it failed).
    pub stderr: String,
    pub ok: bool,
}

impl Container {
    /// `docker run -d --name NAME ARGS... portwatch-test:busybox CMD...`; never panics on a
    /// failed start, so a test can expect one.
    pub fn run(tag: &str, args: &[&str], cmd: &[&str]) -> Container {
        Self::run_on("docker", TEST_IMAGE, &unique(tag), args, cmd)
    }

    /// `CLI run -d --name NAME ARGS... IMAGE CMD...` with the engine's own CLI.
    pub fn run_on(
        cli: &'static str,
        image: &str,
        name: &str,
        args: &[&str],
        cmd: &[&str],
    ) -> Container {
        let name = name.to_string();
        let _ = engine(cli, &["rm", "-f", &name]);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        all.push(image);
        all.extend_from_slice(cmd);
        let o = engine(cli, &all).unwrap();
        let id = engine(cli, &["inspect", "--format", "{{.Id}}", &name])
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        Container {
            cli,
            name,
            id,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            ok: o.status.success(),
        }
    }

    /// Like `run`, but the container must be running.
    pub fn running(tag: &str, args: &[&str], cmd: &[&str]) -> Container {
        Self::run(tag, args, cmd).started()
    }

    /// This container, which must have started.
    pub fn started(self) -> Container {
        assert!(
            self.ok,
            "{} run {} failed: {}",
            self.cli, self.name, self.stderr
        );
        self
    }

    pub fn short_id(&self) -> String {
        self.id.as_deref().expect("container was created")[..12].to_string()
    }

    pub fn pid(&self) -> u32 {
        must(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .parse()
            .unwrap()
    }

    /// `docker exec NAME CMD...`
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut all = vec!["exec", &*self.name];
        all.extend_from_slice(cmd);
        docker(&all).unwrap()
    }

    /// `docker exec -d NAME CMD...`
    pub fn exec_detached(&self, cmd: &[&str]) {
        let mut all = vec!["exec", "-d", &*self.name];
        all.extend_from_slice(cmd);
        must(&all);
    }

    pub fn stop(&self) {
        must(&["stop", "-t", "0", &self.name]);
    }

    pub fn remove(&self) {
        must(&["rm", "-f", &self.name]);
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = engine(self.cli, &["rm", "-f", &self.name]);
    }
}

/// A user-defined bridge network, removed on drop.
pub struct Network {
    pub name: String,
}

impl Network {
    pub fn new(tag: &str) -> Network {
        let name = unique(tag);
        let _ = docker(&["network", "rm", &name]);
        must(&["network", "create", "--driver", "bridge", &name]);
        Network { name }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = docker(&["network", "rm", &self.name]);
    }
}

/// Stops dockerd for a test; whatever happens, dockerd runs again when this is dropped, so
/// one failing test does not take the daemon away from the next.
pub struct DockerdOutage;

impl DockerdOutage {
    pub fn begin() -> DockerdOutage {
        stop_dockerd(Duration::from_secs(60)).expect("stopping dockerd");
        assert!(
            !dockerd_running(),
            "dockerd still answers after it was stopped"
        );
        DockerdOutage
    }

    /// Start dockerd again; returns when `docker info` answers.
    pub fn end(&self) {
        start_dockerd(Path::new(DOCKERD_LOG), Duration::from_secs(60)).expect("starting dockerd");
    }
}

impl Drop for DockerdOutage {
    fn drop(&mut self) {
        if !dockerd_running() {
            if let Err(e) = start_dockerd(Path::new(DOCKERD_LOG), Duration::from_secs(60)) {
                eprintln!("restarting dockerd after the test failed: {e}");
            }
        }
    }
}

/// dockerd restarted with extra arguments for one test; dropped, it is restarted as it was,
/// so a failing test does not leave the next with another daemon configuration.
pub struct DaemonWith;

impl DaemonWith {
    pub fn start(extra: &[&str]) -> DaemonWith {
        stop_dockerd(Duration::from_secs(60)).expect("stopping dockerd");
        start_dockerd_with(Path::new(DOCKERD_LOG), Duration::from_secs(60), &[], extra)
            .unwrap_or_else(|e| panic!("starting dockerd {}: {e}", extra.join(" ")));
        DaemonWith
    }
}

impl Drop for DaemonWith {
    fn drop(&mut self) {
        let back = stop_dockerd(Duration::from_secs(60))
            .and_then(|()| start_dockerd(Path::new(DOCKERD_LOG), Duration::from_secs(60)));
        if let Err(e) = back {
            eprintln!("restarting dockerd as it was: {e}");
        }
    }
}

// ---- records about the engines ----

/// A `type:"docker"` record's body, when its `event` is `event`.
pub fn docker_event(r: &Record, event: DockerEvent) -> Option<&schema::Docker> {
    r.docker().filter(|d| d.event == event)
}

/// A `type:"docker"` record of `event` about the container whose short id is `id`.
pub fn is_container_event(r: &Record, event: DockerEvent, id: &str) -> bool {
    docker_event(r, event).is_some_and(|d| d.container.as_ref().is_some_and(|c| c.id == id))
}

/// Waits for the agent's first `docker` `connected` record; its body.
pub fn wait_docker_connected(agent: &Agent) -> schema::Docker {
    let r = agent.wait_record("docker connected", |r| {
        docker_event(r, DockerEvent::Connected).is_some()
    });
    r.docker().cloned().expect("matched as a docker record")
}

/// Waits for the first `docker` record of `event` about the container whose short id is
/// `id`.
pub fn wait_container_event(agent: &Agent, event: DockerEvent, id: &str) -> Record {
    agent.wait_record(&format!("docker {event} of {id}"), |r| {
        is_container_event(r, event.clone(), id)
    })
}

/// Fails the test (never skips) when the daemon or the image is missing.
pub fn require_docker() {
    crate::require_root();
    assert!(
        dockerd_running(),
        "dockerd is not running: `cargo xtask test` starts it (and installs docker.io if needed)"
    );
    assert!(
        image_present(),
        "the test image {TEST_IMAGE} is missing: `cargo xtask test` builds it"
    );
}
