//! `portwatch report`, end to end: a bundle made while a real agent runs, with a real
//! conflict on a port a real container publishes, and that container holding secrets in its
//! environment and labels; a bundle made with neither agent nor daemon; and an output path
//! that cannot be written.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use portwatch_tests::{docker::*, schema::DockerEvent, *};
use serde_json::Value;

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("pw-report-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("report").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run portwatch report")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Untar with the system's tar (what a maintainer will use); return the bundle's top
/// directory and every file in it, relative to that directory.
fn untar(bundle: &Path, into: &Path) -> (PathBuf, Vec<String>) {
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(bundle)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(ok.success(), "tar -xzf {} failed", bundle.display());
    let tops: Vec<PathBuf> = std::fs::read_dir(into)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(tops.len(), 1, "one top directory: {tops:?}");
    let top = tops[0].clone();
    let mut files = Vec::new();
    let mut dirs = vec![top.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p.strip_prefix(&top).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    (top, files)
}

fn read(top: &Path, name: &str) -> String {
    std::fs::read_to_string(top.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn jsonl(top: &Path, name: &str) -> Vec<Value> {
    read(top, name)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: {e}: {l}")))
        .collect()
}

fn assert_readme_lists_every_file(top: &Path, files: &[String]) {
    let readme = read(top, "README.txt");
    for f in files {
        assert!(
            readme.contains(f.as_str()),
            "README.txt does not list {f}:\n{readme}"
        );
    }
}

#[test]
fn bundle_with_agent_conflict_and_a_container_with_secrets() {
    require_docker();
    let dir = TempDir::new("full");
    let log = dir.0.join("events.jsonl");
    let rt = dir.0.join("rt");
    let port = free_port(81);
    let agent = Agent::start(&[
        "--log-file",
        log.to_str().unwrap(),
        "--runtime-dir",
        rt.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--docker-host",
        "unix:///var/run/docker.sock",
    ]);
    agent.wait_record("docker connected", |r| {
        r.docker()
            .is_some_and(|d| d.event == DockerEvent::Connected)
    });

    let c = Container::running(
        "report",
        &[
            "-e",
            "API_TOKEN=supersecret",
            "--label",
            "db.password=hunter2",
            "-p",
            &format!("{port}:80"),
        ],
        &["httpd", "-f", "-p", "80"],
    );
    let id = c.short_id();
    agent.wait_record("docker start", |r| {
        r.docker().is_some_and(|d| {
            d.event == DockerEvent::Start && d.container.as_ref().is_some_and(|x| x.id == id)
        })
    });
    // The published port is held on the host: this bind is a real conflict.
    let a: SocketAddr = format!("0.0.0.0:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert_eq!(
        bind(&s, &a).unwrap_err().raw_os_error(),
        Some(libc::EADDRINUSE)
    );
    drop(s);
    agent.wait_record("conflict", |r| is_conflict_on(r, port));
    // Printed and logged are one write apart; the report reads the file. A line being
    // written as it is read is not whole yet: it does not read as a record.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| Record::parse(l).is_ok_and(|r| is_conflict_on(&r, port)))
    {
        assert!(
            Instant::now() < deadline,
            "the conflict never reached the log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let bundle = dir.0.join("bundle.tar.gz");
    let out = report(
        &[
            "--port",
            &port.to_string(),
            "--since",
            "10m",
            "-o",
            bundle.to_str().unwrap(),
            "--runtime-dir",
            rt.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
        ],
        &[],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(bundle.to_str().unwrap()), "{stdout}");
    assert!(stdout.contains(" bytes)"), "{stdout}");
    assert!(
        stderr.contains("collecting containers from unix://"),
        "{stderr}"
    );
    let size = std::fs::metadata(&bundle).unwrap().len();
    assert!(stdout.contains(&size.to_string()), "{stdout} vs {size}");

    let x = dir.0.join("x");
    std::fs::create_dir_all(&x).unwrap();
    let (top, files) = untar(&bundle, &x);
    eprintln!("bundle: {files:?}");
    assert_readme_lists_every_file(&top, &files);
    for f in [
        "README.txt",
        "host.json",
        "ports.jsonl",
        "log/conflicts.jsonl",
        "log/port-records.jsonl",
        "log/docker-records.jsonl",
        "agent/status.json",
        "agent/hooks.json",
        "agent/lost.json",
        "docker/containers.json",
        "docker/networks.json",
        "docker/version.json",
    ] {
        assert!(files.iter().any(|x| x == f), "{f} missing from {files:?}");
    }
    assert!(
        !files
            .iter()
            .any(|f| f == "MISSING-agent.txt" || f == "MISSING-docker.txt"),
        "{files:?}"
    );

    // The conflict, and the port's history with it. The bundle's log records are the
    // agent's lines as it wrote them: they read as conflict records; history's and ports'
    // own JSON stays JSON.
    let conflicts = records_in(read(&top, "log/conflicts.jsonl").as_bytes());
    assert!(
        conflicts.iter().any(|r| r
            .conflict()
            .is_some_and(|c| c.port == port && c.op == schema::Op::Bind)),
        "{conflicts:?}"
    );
    assert!(
        conflicts.iter().all(|r| is_conflict_on(r, port)),
        "{conflicts:?}"
    );
    let history = jsonl(&top, &format!("history-{port}.jsonl"));
    assert!(
        history.iter().any(|v| v["kind"] == "conflict"),
        "{history:?}"
    );
    let rows = jsonl(&top, "ports.jsonl");
    assert!(
        rows.iter()
            .any(|r| r["port"] == port && r["state"] == "LISTEN"),
        "{rows:?}"
    );

    // The container, by name, with its secrets' names but not their values.
    let containers: Value = serde_json::from_str(&read(&top, "docker/containers.json")).unwrap();
    let mine = containers
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["names"][0] == c.name.as_str())
        .unwrap_or_else(|| panic!("{} not in {containers}", c.name));
    assert_eq!(mine["labels"]["db.password"], "REDACTED", "{mine}");
    assert!(
        mine["inspect"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "API_TOKEN=REDACTED"),
        "{mine}"
    );
    assert_eq!(mine["state"], "running", "{mine}");
    assert!(read(&top, "docker/ps.txt").contains(&c.name));
    for f in &files {
        let bytes = std::fs::read(top.join(f)).unwrap();
        for secret in ["supersecret", "hunter2"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} leaked into {f}"
            );
        }
    }

    // The agent: its status with the version, and the hooks it attached.
    let ready = agent.ready_typed();
    let status: Value = serde_json::from_str(&read(&top, "agent/status.json")).unwrap();
    let version = ready
        .version
        .as_deref()
        .expect("the ready line has the version");
    assert_eq!(status["version"], version, "{status}");
    assert_eq!(status["pid"], agent.pid(), "{status}");
    let hooks: Value = serde_json::from_str(&read(&top, "agent/hooks.json")).unwrap();
    let attached: Option<Vec<String>> = serde_json::from_value(hooks["attached"].clone())
        .unwrap_or_else(|e| panic!("hooks.json's attached ({e}): {hooks}"));
    assert!(attached.is_some(), "{hooks}");
    assert_eq!(attached, ready.programs, "{hooks}");
    assert!(
        hooks["verifier"]
            .as_array()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|p| p["accepted"] == true)),
        "{hooks}"
    );
    let lost: Value = serde_json::from_str(&read(&top, "agent/lost.json")).unwrap();
    assert!(lost["lost_total"].is_u64(), "{lost}");
    let version: Value = serde_json::from_str(&read(&top, "docker/version.json")).unwrap();
    assert!(version["server"]["Version"].is_string(), "{version}");
    drop(c);
    agent.stop();
}

#[test]
fn bundle_without_agent_or_daemon_says_what_is_missing_and_why() {
    require_root();
    let dir = TempDir::new("bare");
    let rt = dir.0.join("no-agent-here");
    let log = dir.0.join("no-log.jsonl");
    // -o -: the bundle on stdout.
    let out = report(
        &[
            "--runtime-dir",
            rt.to_str().unwrap(),
            "--log-file",
            log.to_str().unwrap(),
            "-o",
            "-",
        ],
        &[("DOCKER_HOST", "unix:///nonexistent.sock")],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("collecting containers from unix:///nonexistent.sock"),
        "{stderr}"
    );
    let bundle = dir.0.join("stdout.tar.gz");
    std::fs::write(&bundle, &out.stdout).unwrap();
    let x = dir.0.join("x");
    std::fs::create_dir_all(&x).unwrap();
    let (top, files) = untar(&bundle, &x);
    eprintln!("bundle: {files:?}");
    assert_readme_lists_every_file(&top, &files);

    let agent = read(&top, "MISSING-agent.txt");
    assert!(agent.contains("no portwatch agent is running"), "{agent}");
    assert!(
        agent.contains(&rt.join("portwatch.sock").display().to_string()),
        "{agent}"
    );
    assert!(agent.contains("sudo portwatch run"), "{agent}");
    let docker = read(&top, "MISSING-docker.txt");
    assert!(docker.contains("unix:///nonexistent.sock"), "{docker}");
    assert!(docker.contains("cannot be reached"), "{docker}");
    let missing_log = read(&top, "MISSING-log.txt");
    assert!(
        missing_log.contains(&log.display().to_string()),
        "{missing_log}"
    );
    let readme = read(&top, "README.txt");
    assert!(readme.contains("no portwatch agent is running"), "{readme}");
    assert!(readme.contains("/nonexistent.sock"), "{readme}");
    // What could be gathered still is: the port table from a snapshot, and the host.
    assert!(files.iter().any(|f| f == "ports.jsonl"), "{files:?}");
    assert!(read(&top, "host.json").contains("\"release\""));
}

#[test]
fn an_unwritable_output_is_one_clear_error_and_leaves_nothing() {
    let dir = TempDir::new("bad-o");
    for bad in [
        PathBuf::from("/proc/nope/x.tar.gz"),
        // A regular file where a directory should be.
        dir.0.join("file").join("x.tar.gz"),
    ] {
        std::fs::write(dir.0.join("file"), b"").unwrap();
        let out = report(&["-o", bad.to_str().unwrap()], &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].starts_with("portwatch: error: "), "{stderr}");
        assert!(lines[0].contains(bad.to_str().unwrap()), "{stderr}");
        assert!(lines[0].contains("-o"), "{stderr}");
        assert!(out.stdout.is_empty());
        let left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["file"], "nothing else left behind");
    }
    // Flags are clap's: exit 2.
    let out = report(&["--since", "soon"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = report(&["--port", "0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
