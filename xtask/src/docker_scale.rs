//! `cargo xtask docker-scale`: what the Docker join costs with many containers.
//!
//! 1. An agent joins a daemon with no containers of ours; then N `sleep` containers, each
//!    publishing one port, are started while it runs. Reported: the agent's RSS before and
//!    after (per container), and how long after the last `docker run` returned the agent
//!    had written every `start` record.
//! 2. Fresh agents join the daemon with the N containers already there. Reported: the time
//!    from spawning the agent to its `connected` record, and the join's own `sync_ms`
//!    (connect, negotiate, list, inspect every container), median of three.
//!
//! `--engine` picks the daemon: Debian 12's Docker 20.10 (`docker`, the default), Docker 28
//! (`docker28`: 20.10 is stopped for the run and started again after it, see docker28.rs)
//! or Podman's Docker-compatible service (`podman`). The agent joins only that engine.
//!
//! The agents watch a port nothing uses (`--port 1`) and do not re-read sockets
//! (`--tw-interval 3600`): the port table then stays as it was at start, so the RSS delta
//! is the container index, not whatever else the host is doing. Results go to
//! target/bench/docker-scale.md.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use portwatch_tests::{
    docker::{engine as engine_cli, TEST_IMAGE},
    podman as pm,
};
use serde_json::Value;

use crate::{build_agent, docker28, step, workspace_root};

const LABEL: &str = "portwatch-scale=1";

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// How many containers to create.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=2000))]
    containers: u64,
    /// `docker run`s in flight while creating them.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// The engine to measure.
    #[arg(long, value_enum, default_value_t = EngineArg::Docker)]
    engine: EngineArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EngineArg {
    /// Debian 12's Docker 20.10.
    Docker,
    /// Docker 28 (Debian sid's), in place of 20.10 for the run.
    Docker28,
    /// Podman's Docker-compatible API service.
    Podman,
}

/// How to drive one engine: its CLI, the API socket the agent joins, and how to run the
/// test image there.
struct Engine {
    cli: &'static str,
    socket: &'static str,
    image: &'static str,
    run_args: &'static [&'static str],
}

impl EngineArg {
    fn engine(self) -> Engine {
        match self {
            EngineArg::Docker | EngineArg::Docker28 => Engine {
                cli: "docker",
                socket: "unix:///var/run/docker.sock",
                image: TEST_IMAGE,
                run_args: &[],
            },
            EngineArg::Podman => Engine {
                cli: "podman",
                socket: "unix:///run/podman/podman.sock",
                image: pm::IMAGE,
                run_args: &pm::ULIMITS,
            },
        }
    }
}

impl Engine {
    fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(engine_cli(self.cli, args)?)
    }
}

type Lines = Arc<Mutex<Vec<(Instant, Value)>>>;

/// Wall clock now, in ns since the epoch.
fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// A record's `ts` (`2026-11-25T09:34:25.231639983Z`) in ns since the epoch.
fn ts_ns(ts: &str) -> Option<i128> {
    let t = humantime::parse_rfc3339(ts).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    i128::try_from(d.as_nanos()).ok()
}

/// A release agent, its records with their arrival times.
struct Agent {
    child: Child,
    lines: Lines,
    spawned: Instant,
}

impl Agent {
    fn start(bin: &Path, e: &Engine) -> Result<Agent> {
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .args(["run", "--port", "1", "--tw-interval", "3600"])
            .args(["--docker-host", e.socket])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let lines: Lines = Arc::default();
        let out = child.stdout.take().expect("piped");
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                    // When it was read, to set against the record's own time.
                    v["_read_ns"] = Value::from(wall_ns() as i64);
                    l2.lock().unwrap().push((Instant::now(), v));
                }
            }
        });
        Ok(Agent {
            child,
            lines,
            spawned,
        })
    }

    /// Arrival time of the n-th record matching `pred`.
    fn wait_nth(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(hit) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, v)| pred(v))
                .nth(n - 1)
            {
                return Ok(hit.clone());
            }
            if Instant::now() >= deadline {
                bail!("the agent wrote no {n}th matching record within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connected(&self) -> Result<(Instant, Value)> {
        self.wait_nth(1, Duration::from_secs(120), |v| {
            v["type"] == "docker" && v["event"] == "connected"
        })
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

fn ours(e: &Engine) -> Result<Vec<String>> {
    let o = e.run(&["ps", "-aq", "--filter", &format!("label={LABEL}")])?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

fn remove_ours(e: &Engine) -> Result<()> {
    let ids = ours(e)?;
    for chunk in ids.chunks(50) {
        let mut args = vec!["rm", "-f"];
        args.extend(chunk.iter().map(String::as_str));
        e.run(&args)?;
    }
    Ok(())
}

/// N `sleep` containers, each publishing one random host port on 127.0.0.1.
fn create(e: &Engine, n: u64, parallel: usize) -> Result<()> {
    let next = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..parallel.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i as u64 >= n {
                    break;
                }
                let name = format!("pw-scale-{i}");
                let mut args = vec!["run", "-d", "--label", LABEL, "--name", &name];
                args.extend(e.run_args);
                args.extend(["-p", "127.0.0.1::80", e.image, "sleep", "86400"]);
                let o = e.run(&args);
                match o {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => failed.lock().unwrap().push(format!(
                        "{name}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => failed.lock().unwrap().push(format!("{name}: {e}")),
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    if !failed.is_empty() {
        bail!(
            "{} containers failed to start, e.g. {}",
            failed.len(),
            failed[0]
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(args: ScaleArgs) -> Result<()> {
    crate::setup::for_tests()?;
    let bin = build_agent(true)?;
    let n = args.containers;
    let e = args.engine.engine();
    let go = || -> Result<String> {
        remove_ours(&e)?;
        let result = measure(&bin, &e, n, args.parallel);
        step("removing the containers");
        remove_ours(&e)?;
        result
    };
    let report = if args.engine == EngineArg::Docker28 {
        docker28::with_docker28(|_| go())?
    } else {
        go()?
    };
    print!("{report}");
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let name = match args.engine {
        EngineArg::Docker => "docker-scale.md",
        EngineArg::Docker28 => "docker-scale-docker28.md",
        EngineArg::Podman => "docker-scale-podman.md",
    };
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, &report)?;
    step(&format!("written to {}", path.display()));
    Ok(())
}

fn measure(bin: &Path, e: &Engine, n: u64, parallel: usize) -> Result<String> {
    step("agent joining a daemon without our containers");
    let a = Agent::start(bin, e)?;
    a.connected()?;
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = a.rss_kib()?;

    step(&format!(
        "starting {n} containers ({parallel} at a time) while it runs"
    ));
    let t = Instant::now();
    create(e, n, parallel)?;
    let created = Instant::now();
    let create_s = t.elapsed().as_secs_f64();
    let is_start = |v: &Value| {
        v["type"] == "docker"
            && v["event"] == "start"
            && v["container"]["name"]
                .as_str()
                .is_some_and(|s| s.starts_with("pw-scale-"))
    };
    let (last, _) = a.wait_nth(n as usize, Duration::from_secs(120), is_start)?;
    let follow_ms = last.saturating_duration_since(created).as_secs_f64() * 1000.0;
    // Daemon's event time to the record on the agent's stdout: the event stream, an
    // inspect, /proc reads, the queue and the write.
    let mut lag: Vec<f64> = a
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| is_start(v))
        .filter_map(|(_, v)| {
            let ts = ts_ns(v["ts"].as_str()?)?;
            Some((i128::from(v["_read_ns"].as_i64()?) - ts) as f64 / 1e6)
        })
        .collect();
    lag.sort_by(f64::total_cmp);
    let lag_p50 = lag.get(lag.len() / 2).copied().unwrap_or(f64::NAN);
    let lag_p90 = lag.get(lag.len() * 9 / 10).copied().unwrap_or(f64::NAN);
    let lag_max = lag.last().copied().unwrap_or(f64::NAN);
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = a.rss_kib()?;
    drop(a);

    step(&format!(
        "fresh agents joining with {n} containers there (3 runs)"
    ));
    let (mut to_connected, mut sync, mut rss2) = (Vec::new(), Vec::new(), Vec::new());
    let mut ready_to_connected = Vec::new();
    let mut seen = 0;
    for _ in 0..3 {
        let a = Agent::start(bin, e)?;
        let (at, rec) = a.connected()?;
        let (ready, _) = a.wait_nth(1, Duration::from_secs(60), |v| {
            v["type"] == "agent" && v["event"] == "ready"
        })?;
        to_connected.push(at.duration_since(a.spawned).as_secs_f64() * 1000.0);
        ready_to_connected.push(at.saturating_duration_since(ready).as_secs_f64() * 1000.0);
        sync.push(rec["sync_ms"].as_f64().unwrap_or(f64::NAN));
        seen = rec["running"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(500));
        rss2.push(a.rss_kib()? as f64);
    }
    let per = |a: f64, b: f64| (a - b) / n as f64;
    let server = e.run(&[
        "version",
        "--format",
        "{{.Server.Version}} (API {{.Server.APIVersion}})",
    ])?;
    let cli = e.cli;
    Ok(format!(
        "# Container engine join with {n} containers\n\n\
         {} {}, {} cores. Release agent with --port 1 --tw-interval 3600 (see xtask/src/docker_scale.rs).\n\n\
         | measure | value |\n|---|---|\n\
         | creating {n} containers ({parallel} `{cli} run`s at a time) | {create_s:.1} s |\n\
         | last `start` record after the last `{cli} run` returned | {follow_ms:.0} ms (0: before it returned) |\n\
         | daemon's start event to the agent's `start` record, median / p90 / max | {lag_p50:.1} / {lag_p90:.1} / {lag_max:.1} ms |\n\
         | RSS with no containers / after {n} started | {rss0} KiB / {rss1} KiB |\n\
         | memory per container (RSS delta / {n}) | {:.1} KiB |\n\
         | fresh agent: spawn to `connected` (median of 3) | {:.0} ms |\n\
         | fresh agent: `ready` to `connected` (the join starts after `ready`; median of 3) | {:.0} ms |\n\
         | fresh agent: `sync_ms` (connect, negotiate, list, inspect all; median of 3) | {:.0} ms |\n\
         | running containers it reported | {seen} |\n\
         | fresh agent RSS after sync (median of 3) | {:.0} KiB ({:.1} KiB per container over the first agent's empty RSS) |\n",
        e.cli,
        String::from_utf8_lossy(&server.stdout).trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        per(rss1 as f64, rss0 as f64),
        median(to_connected),
        median(ready_to_connected),
        median(sync),
        median(rss2.clone()),
        per(median(rss2), rss0 as f64),
    ))
}

#[cfg(test)]
mod tests {
    use super::ts_ns;

    #[test]
    fn record_timestamps() {
        assert_eq!(ts_ns("1970-01-01T00:00:01.500000000Z"), Some(1_500_000_000));
        assert_eq!(
            ts_ns("2026-11-25T09:34:25.231639983Z"),
            Some(1_795_599_265 * 1_000_000_000 + 231_639_983)
        );
        assert_eq!(ts_ns("garbage"), None);
    }
}
