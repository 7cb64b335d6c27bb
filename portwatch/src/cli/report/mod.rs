//! `portwatch report`: one .tar.gz holding what a port-conflict bug report asks for, so a
//! reporter runs one command instead of ten and a maintainer gets the same files every time.
//!
//! Gathering and writing are separate. Every part is gathered into memory first, each either
//! as its files or as the reason it is missing, because a report is wanted most when
//! something is broken: no agent, no daemon, no log. Only then is the bundle written, in one
//! go, to a temporary file that is renamed into place, so a failure leaves nothing
//! half-written. Writing last also lets a secret found late (a container's environment)
//! be scrubbed from files gathered before it (the log, the daemon's journal).

mod bundle;
mod engine;
mod facts;

use bundle::*;
use engine::*;
use facts::*;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{File, OpenOptions},
    io::{BufRead, IsTerminal, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bollard::{
    models::{ContainerInspectResponse, ContainerSummary, Network},
    query_parameters::{InspectContainerOptions, ListContainersOptions, ListNetworksOptions},
    Docker,
};
use futures_util::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    cli::history,
    cli::tail,
    cli::ReportArgs,
    control::{self, Filter, Request},
    engines::docker::{self, Endpoint},
    error::{Error, Result},
    kernel::decode::{rfc3339, Clock},
};

/// Names of environment variables and labels whose values never leave the host: a name
/// containing any of these (in any case) has its value replaced by [`REDACTED`].
const SECRET_NAMES: [&str; 4] = ["TOKEN", "PASSWORD", "SECRET", "KEY"];
const REDACTED: &str = "REDACTED";
/// A redacted value is also scrubbed from every other file, but only from this length on:
/// `SECRET_ENABLED=true` must not turn every "true" in the bundle into REDACTED.
const MIN_SCRUB_LEN: usize = 6;
/// Per log file in the bundle; the newest records are kept. Bursts already coalesce a retry
/// loop into a record a second, so only a host with thousands of failing services gets here.
const MAX_RECORD_BYTES: usize = 32 << 20;
/// The daemon's journal: its newest lines, at most this much of them.
const JOURNAL_LINES: &str = "20000";
const JOURNAL_MAX_BYTES: usize = 4 << 20;
/// journalctl on a huge, unindexed journal can take minutes; the report should not.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(30);
/// A daemon that is shutting down accepts connections and never answers them.
const DOCKER_HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Inspects in flight at once.
const PARALLEL_INSPECTS: usize = 8;
/// An agent that accepts a status request must answer it promptly; a wedged one should not
/// wedge the report too.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// "1 record", "2 records".
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

fn progress(msg: std::fmt::Arguments<'_>) {
    eprintln!("portwatch: {msg} ...");
}

// ---- the command ----

/// What every part of the report is gathered against.
struct Ctx<'a> {
    a: &'a ReportArgs,
    host: String,
    now_ns: i128,
    since_ns: i128,
}

impl Ctx<'_> {
    /// " about port P", or nothing.
    fn only(&self) -> String {
        self.a
            .port
            .map(|p| format!(" about port {p}"))
            .unwrap_or_default()
    }
}

pub fn run(a: &ReportArgs) -> Result<()> {
    let now_ns = Clock::now_wall_ns();
    let cx = Ctx {
        a,
        host: hostname(),
        now_ns,
        since_ns: now_ns - a.since.as_nanos() as i128,
    };
    let stem = bundle_stem(&cx.host, now_ns);
    // Before anything is gathered: a bad -o should fail in a moment, not after a minute.
    let target = target(a.output.as_deref(), &stem)?;
    let mut b = Bundle::default();

    gather_host(&mut b, &cx);
    let status = gather_agent(&mut b, &cx);
    gather_ports(&mut b, &cx, status.is_some());
    let scan = gather_log(&mut b, &cx);
    b.json(
        "agent/lost.json",
        "lost events: the agent's lost_total since it started, and the sum of the window's \
         `lost` records",
        &serde_json::json!({
            "lost_total": status.as_ref().map(|s| s["lost_total"].clone()),
            "lost_in_window": (!scan.files.is_empty()).then_some(scan.lost_in_window),
        }),
    );
    gather_hooks(&mut b, &cx, &scan);
    gather_docker(&mut b, &cx);
    gather_journal(&mut b, &cx);

    let header = format!(
        "portwatch report\n================\nhost {}, made {} by portwatch {} (`{}`)\n\
         window: the last {} (since {}), {}\n",
        cx.host,
        rfc3339(now_ns),
        env!("CARGO_PKG_VERSION"),
        std::env::args().collect::<Vec<_>>().join(" "),
        humantime::format_duration(a.since),
        rfc3339(cx.since_ns),
        a.port
            .map(|p| format!("port {p} only"))
            .unwrap_or_else(|| "every port".into())
    );
    b.finish(&header);
    b.scrub();
    write(target, &stem, &b.entries, now_ns)
}

fn write(target: Target, stem: &str, entries: &[Entry], now_ns: i128) -> Result<()> {
    let mtime = (now_ns / 1_000_000_000).max(0) as u64;
    match target {
        Target::Stdout => {
            write_tar(std::io::stdout().lock(), stem, entries, mtime)
                .and_then(|mut out| out.flush())
                .map_err(|source| Error::Io {
                    what: "writing the report to stdout",
                    source,
                })?;
            eprintln!(
                "portwatch: wrote the report to stdout ({} files)",
                entries.len()
            );
        }
        Target::File(mut partial) => {
            let dest = partial.dest.clone();
            let failed = |e: std::io::Error| Error::Io {
                what: "writing the report",
                source: std::io::Error::new(e.kind(), format!("{}: {e}", dest.display())),
            };
            let f = partial.file.take().expect("opened in target()");
            partial.file = Some(write_tar(f, stem, entries, mtime).map_err(failed)?);
            let size = partial.persist().map_err(failed)?;
            let shown = std::path::absolute(&dest).unwrap_or(dest.clone());
            println!("{} ({size} bytes)", shown.display());
        }
    }
    Ok(())
}

fn gather_host(b: &mut Bundle, cx: &Ctx<'_>) {
    progress(format_args!("collecting host facts"));
    b.json(
        "host.json",
        "this host: kernel (uname), BTF, the ephemeral port range, and how this report was made",
        &Host {
            hostname: &cx.host,
            generated_at: rfc3339(cx.now_ns),
            portwatch_version: env!("CARGO_PKG_VERSION"),
            command: std::env::args().collect(),
            window_since: rfc3339(cx.since_ns),
            port: cx.a.port,
            euid: euid(),
            uname: uname(),
            kernel_btf: Path::new(crate::kernel::prereq::BTF_PATH).exists(),
            ip_local_port_range: read_trim("/proc/sys/net/ipv4/ip_local_port_range"),
            ip_local_reserved_ports: read_trim("/proc/sys/net/ipv4/ip_local_reserved_ports"),
        },
    );
}

fn gather_agent(b: &mut Bundle, cx: &Ctx<'_>) -> Option<Value> {
    let sock = control::socket_path(&cx.a.runtime_dir);
    progress(format_args!(
        "asking the agent at {} for its status",
        sock.display()
    ));
    match agent_status(&cx.a.runtime_dir) {
        Ok(v) => {
            b.summary.push(format!(
                "agent: running, pid {}, version {}, up {} s, {} events lost since it started",
                v["pid"],
                v["version"].as_str().unwrap_or("?"),
                v["uptime_s"],
                v["lost_total"]
            ));
            b.json(
                "agent/status.json",
                "the running agent's status: version, uptime, table size, records written, \
                 lost_total (events lost since it started), log write errors",
                &v,
            );
            Some(v)
        }
        Err(why) => {
            b.summary
                .push("agent: no status (see MISSING-agent.txt)".to_string());
            b.missing("agent", "agent's status", why);
            None
        }
    }
}

fn gather_ports(b: &mut Bundle, cx: &Ctx<'_>, agent: bool) {
    progress(format_args!(
        "collecting the port table{}",
        if agent {
            " from the agent"
        } else {
            " (one-shot sock_diag snapshot: no agent)"
        }
    ));
    let filter = Filter {
        port: cx.a.port,
        pid: None,
        container: None,
    };
    match crate::cli::ports::rows(&cx.a.runtime_dir, &filter) {
        Ok((rows, source)) => {
            let from = if source == "agent" {
                "from the running agent"
            } else {
                "from a one-shot sock_diag and /proc snapshot taken now (no agent was running)"
            };
            b.summary.push(format!(
                "port table{}: {}, {from}",
                cx.only(),
                count(rows.len(), "row")
            ));
            b.jsonl(
                "ports.jsonl",
                format!(
                    "the port table now{}, as `portwatch ports --json` prints it, {from}",
                    cx.only()
                ),
                rows,
            );
        }
        Err(e) => b.missing("ports", "port table", e.to_string()),
    }
}

fn gather_log(b: &mut Bundle, cx: &Ctx<'_>) -> LogScan {
    let (a, only) = (cx.a, cx.only());
    progress(format_args!(
        "reading {} and its rotated files",
        a.log_file.display()
    ));
    let scan = scan_log(&a.log_file, cx.since_ns, a.port);
    if scan.files.is_empty() {
        let why = format!(
            "no log at {}{}; the agent writes it there when run as root, unless it was \
             started with another --log-file (give that path to report with --log-file)",
            a.log_file.display(),
            scan.unreadable
                .first()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        b.missing(
            "log",
            "log records (conflicts, port history, docker, lost)",
            why,
        );
        return scan;
    }
    let files = scan
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    b.summary.push(format!(
        "conflicts in the window{only}: {}; log read: {files}{}",
        scan.conflicts.lines.len(),
        if scan.malformed > 0 {
            format!(" ({} malformed lines skipped)", scan.malformed)
        } else {
            String::new()
        }
    ));
    for e in &scan.unreadable {
        b.summary.push(format!("log file not fully read: {e}"));
    }
    let parts = [
        ("log/conflicts.jsonl", &scan.conflicts, "`conflict` records"),
        (
            "log/port-records.jsonl",
            &scan.ports,
            "`port` records (a service port opened or closed)",
        ),
        (
            "log/docker-records.jsonl",
            &scan.docker,
            "`docker` records (containers started, died, destroyed, as the agent saw them)",
        ),
        (
            "log/lost-records.jsonl",
            &scan.lost,
            "`lost` records (events that did not reach the log, with counts)",
        ),
        (
            "log/agent-records.jsonl",
            &scan.agent,
            "`agent` records (ready, degraded, log errors, stopped)",
        ),
    ];
    for (name, c, what) in parts {
        let about = c.about(&format!("{what} in the window{only}, as logged"));
        b.add(name, about, c.data());
    }
    if let Some(p) = a.port {
        let items = history::timeline(
            // Lines the typed schema cannot read are left out of the timeline.
            scan.history
                .iter()
                .filter_map(|v| portwatch_schema::Record::deserialize(v).ok()),
            p,
            None,
            Some(cx.since_ns),
            None,
        );
        b.jsonl(
            &format!("history-{p}.jsonl"),
            format!(
                "who held port {p}, from when to when, with the conflicts and the gaps, as \
                 `portwatch history {p} --json` prints it, for what overlaps the window: {}",
                count(items.len(), "item")
            ),
            items,
        );
    }
    scan
}

fn gather_hooks(b: &mut Bundle, cx: &Ctx<'_>, scan: &LogScan) {
    progress(format_args!(
        "loading the programs into this kernel's verifier (as doctor does)"
    ));
    let (verdicts, notes) = match verifier() {
        Ok((v, n)) => {
            let rejected = v.iter().filter(|v| !v.accepted).count();
            b.summary.push(format!(
                "verifier: {} of {} programs accepted",
                v.len() - rejected,
                v.len()
            ));
            (Some(v), n)
        }
        Err(why) => {
            b.missing("verifier", "kernel verifier's verdicts", why);
            (None, Vec::new())
        }
    };
    if scan.ready.is_none() && !scan.files.is_empty() {
        b.missing(
            "ready-record",
            "list of attached programs (`ready` record)",
            format!(
                "the log at {} has no `ready` record (rotated out, or the agent never started)",
                cx.a.log_file.display()
            ),
        );
    }
    let ready = |k: &str| {
        scan.ready
            .as_ref()
            .map(|r| r[k].clone())
            .unwrap_or_default()
    };
    b.json(
        "agent/hooks.json",
        "the kernel hooks: `attached` and `ready_at` from the agent's newest `ready` record, \
         and `verifier`, every program loaded into this kernel's verifier now (accepted, or \
         its one-line reason, as `portwatch doctor` reports them)",
        &Hooks {
            attached: ready("programs"),
            ready_at: ready("ts"),
            verifier: verdicts,
            verifier_notes: notes,
        },
    );
}

fn gather_journal(b: &mut Bundle, cx: &Ctx<'_>) {
    progress(format_args!(
        "reading the Docker daemon's journal since {}",
        journal_time(cx.since_ns)
    ));
    match journal(cx.since_ns) {
        Ok((text, about)) => b.add("docker/journal.txt", about, text),
        Err(why) => b.missing("docker-journal", "Docker daemon's journal", why),
    }
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn gather_docker(b: &mut Bundle, cx: &Ctx<'_>) {
    let ep = match docker::endpoint(cx.a.docker_host.as_deref()) {
        Ok(ep) => ep,
        Err(e) => {
            b.missing(
                "docker",
                "Docker containers, networks and engine version",
                e.to_string(),
            );
            return;
        }
    };
    progress(format_args!("collecting containers from {ep}"));
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            b.missing(
                "docker",
                "Docker containers, networks and engine version",
                format!("starting the async runtime failed: {e}"),
            );
            return;
        }
    };
    let mut secrets = BTreeSet::new();
    let facts = rt.block_on(async {
        tokio::time::timeout(DOCKER_TIMEOUT, docker_facts(&ep, &mut secrets))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the Docker daemon at {ep} did not answer within {} s",
                    DOCKER_TIMEOUT.as_secs()
                ))
            })
    });
    b.secrets.extend(secrets);
    match facts {
        Ok(d) => {
            let running = d
                .containers
                .iter()
                .filter(|c| c.state.as_deref() == Some("running"))
                .count();
            b.summary.push(format!(
                "docker: engine {} (API {}) at {ep}; {}, {running} running; {}",
                d.server_version,
                d.api_version,
                count(d.containers.len(), "container"),
                count(d.networks.len(), "network")
            ));
            b.json(
                "docker/version.json",
                "the engine's version facts (`docker version`, from the API)",
                &serde_json::json!({
                    "endpoint": ep.to_string(),
                    "negotiated_api_version": d.api_version,
                    "server": d.version,
                }),
            );
            b.json(
                "docker/containers.json",
                format!(
                    "every container, running or not ({}): what `docker ps -a` shows (id, \
                     names, image, state, status, ports, labels, created) and from its \
                     inspect the environment, state, port bindings and networks; secrets \
                     redacted",
                    d.containers.len()
                ),
                &d.containers,
            );
            b.add(
                "docker/ps.txt",
                "the same containers as a `docker ps -a` table",
                render_ps(&d.containers).into_bytes(),
            );
            b.json(
                "docker/networks.json",
                "the engine's networks (`docker network ls` with driver, IPAM and options)",
                &d.networks,
            );
        }
        Err(why) => b.missing(
            "docker",
            "Docker containers, networks and engine version",
            why,
        ),
    }
}

fn write_tar<W: Write>(w: W, top: &str, entries: &[Entry], mtime: u64) -> std::io::Result<W> {
    let gz = flate2::write::GzEncoder::new(w, flate2::Compression::default());
    let mut t = tar::Builder::new(gz);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(e.data.len() as u64);
        h.set_mode(0o600);
        h.set_mtime(mtime);
        t.append_data(&mut h, format!("{top}/{}", e.name), e.data.as_slice())?;
    }
    let mut gz = t.into_inner()?;
    gz.flush()?;
    gz.finish()
}

#[cfg(test)]
mod tests;
