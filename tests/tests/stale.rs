//! Stale holders: a published port's socket that no container the engine knows runs or
//! starts with ("port is already allocated" / "address already in use" and no container
//! uses the port; moby#20486, #36591, libnetwork#1790).
//!
//! Killing dockerd with SIGKILL does not leave one, on Debian 12's 20.10 or on Docker 28:
//! their docker-proxy processes die with it (they run with a parent-death signal; 28's
//! hold the socket dockerd opened and passed them), the container's shim lives on without
//! a port, and 20.10's restarted daemon stops the container. So the left-behind state is made directly, with a real process: the
//! very docker-proxy binary dockerd runs, holding a host port for a container address no
//! container has, as a leaked proxy does. The daemon runs and is joined throughout.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use libc::SOCK_STREAM;
use portwatch_tests::{
    docker::*,
    schema::{Cause, DockerEvent},
    *,
};
use serde_json::Value;

/// A docker-proxy that no dockerd started, killed on drop.
struct LeftProxy(Child);

impl LeftProxy {
    fn start(port: u16) -> LeftProxy {
        use std::os::{fd::AsRawFd, unix::process::CommandExt};
        // docker-proxy reports that it listens on fd 3, as dockerd gives it a pipe there.
        let ready = std::fs::File::create("/dev/null").unwrap();
        let fd = ready.as_raw_fd();
        // The engine's own: Docker 28's when the suite runs against it.
        let mut cmd = Command::new(engine_binary("docker-proxy"));
        cmd.args(["-proto", "tcp", "-host-ip", "0.0.0.0", "-host-port"])
            .arg(port.to_string())
            .args(["-container-ip", "172.31.254.250", "-container-port", "80"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 and fcntl are async-signal-safe; `fd` stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                let rc = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("docker-proxy (docker.io) is installed with dockerd");
        drop(ready);
        // It listens within a moment; a bind then fails.
        let a: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while bind(&socket(&a, SOCK_STREAM, false), &a).is_ok() {
            if Instant::now() >= deadline {
                let mut child = child;
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "docker-proxy never listened on {port}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        LeftProxy(child)
    }
}

impl Drop for LeftProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_proxy_left_behind_is_docker_stale_and_ports_marks_it() {
    require_docker();
    let port = free_port(95);
    let agent = Agent::start(&[
        "--docker-host",
        "unix:///var/run/docker.sock",
        "--port",
        &port.to_string(),
    ]);
    wait_docker_connected(&agent);
    let proxy = LeftProxy::start(port);
    let pid = proxy.0.id();

    let a: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    let me = std::process::id();
    let mine = |port: u16| {
        move |r: &Record| {
            r.conflict()
                .is_some_and(|c| c.port == port && c.actor.process().is_some_and(|p| p.pid == me))
        }
    };
    let r = agent.wait_record("the conflict", mine(port));
    let c = r.conflict().expect("matched as a conflict");
    assert_eq!(c.cause, Cause::DockerStale, "{c:?}");
    let h = c
        .holders
        .first()
        .unwrap_or_else(|| panic!("no holders: {c:?}"));
    assert_eq!(h.pid, Some(pid), "{c:?}");
    assert_eq!(h.comm.as_deref(), Some("docker-proxy"), "{c:?}");
    assert_eq!(h.via.as_deref(), Some("docker-proxy"), "{c:?}");
    assert_eq!(h.stale, Some(true), "{c:?}");
    let hint = &c.hint;
    assert!(
        hint.contains(&format!("kill {pid}")) && hint.contains("left behind"),
        "{hint}"
    );

    // `ports` marks the socket, in JSON and on the terminal.
    let ports = |json: bool| {
        let rt = agent.runtime_dir().to_str().unwrap().to_string();
        let p = port.to_string();
        let mut args = vec!["ports", "--port", p.as_str(), "--runtime-dir", rt.as_str()];
        if json {
            args.push("--json");
        }
        let o = Command::new(agent_bin()).args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let rows: Vec<Value> = ports(true)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = rows
        .iter()
        .find(|r| r["pid"] == pid)
        .unwrap_or_else(|| panic!("no row of the proxy: {rows:?}"));
    assert_eq!(row["stale"], true, "{row}");
    let text = ports(false);
    assert!(
        text.lines()
            .any(|l| l.contains("docker-proxy") && l.contains("(stale)")),
        "{text}"
    );

    // A container that publishes a port is not stale: the same check, the other answer.
    drop(proxy);
    let port2 = free_port(96);
    let agent2 = Agent::start(&[
        "--docker-host",
        "unix:///var/run/docker.sock",
        "--port",
        &port2.to_string(),
    ]);
    wait_docker_connected(&agent2);
    let web = Container::running(
        "stale-web",
        &["-p", &format!("{port2}:80")],
        &["httpd", "-f", "-p", "80"],
    );
    wait_container_event(&agent2, DockerEvent::Start, &web.short_id());
    let a2: SocketAddr = format!("0.0.0.0:{port2}").parse().unwrap();
    let s2 = socket(&a2, SOCK_STREAM, false);
    assert!(bind(&s2, &a2).is_err());
    let r = agent2.wait_record("the published conflict", mine(port2));
    let c = r.conflict().expect("matched as a conflict");
    assert_eq!(c.cause, Cause::DockerPublished, "{c:?}");
    assert!(c.holders.first().is_none_or(|h| h.stale.is_none()), "{c:?}");
    // Absent, not null: the typed record cannot tell the two apart.
    let line = agent2.raw_line(&r);
    assert!(line["holders"][0].get("stale").is_none(), "{line}");
}
