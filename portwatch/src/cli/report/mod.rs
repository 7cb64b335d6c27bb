//! `portwatch report`: one .tar.gz holding what a port-conflict bug report asks for, so a
//! reporter runs one command instead of ten and a maintainer gets the same files every time.
//!
//! Gathering and writing are separate. Every part is gathered into memory first, each either
//! as its files or as the reason it is missing, because a report is wanted most when
//! something is broken: no agent, no daemon, no log. Only then is the bundle written, in one
//! go, to a temporary file that is renamed into place, so a failure leaves nothing
//! half-written. Writing last also lets a secret found late (a container's environment)
//! be scrubbed from files gathered before it (the log, the daemon's journal).

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
use serde::Serialize;
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

// ---- the bundle in memory ----

struct Entry {
    /// Path inside the bundle's top directory.
    name: String,
    about: String,
    data: Vec<u8>,
}

/// A part that could not be gathered: written as `MISSING-<part>.txt` and listed in the
/// README, so a reader sees the gap and its reason rather than guessing from an absence.
struct Missing {
    part: &'static str,
    what: &'static str,
    why: String,
}

#[derive(Default)]
struct Bundle {
    entries: Vec<Entry>,
    missing: Vec<Missing>,
    /// Values redacted from container and network metadata, scrubbed from every file last.
    secrets: BTreeSet<String>,
    summary: Vec<String>,
}

impl Bundle {
    fn add(&mut self, name: impl Into<String>, about: impl Into<String>, data: Vec<u8>) {
        self.entries.push(Entry {
            name: name.into(),
            about: about.into(),
            data,
        });
    }

    fn json(&mut self, name: &str, about: impl Into<String>, v: &impl Serialize) {
        let mut data = serde_json::to_vec_pretty(v).unwrap_or_default();
        data.push(b'\n');
        self.add(name, about, data);
    }

    fn jsonl<S: Serialize>(
        &mut self,
        name: &str,
        about: impl Into<String>,
        items: impl IntoIterator<Item = S>,
    ) {
        let mut data = Vec::new();
        for i in items {
            if serde_json::to_writer(&mut data, &i).is_ok() {
                data.push(b'\n');
            }
        }
        self.add(name, about, data);
    }

    fn missing(&mut self, part: &'static str, what: &'static str, why: String) {
        eprintln!("portwatch: missing {what}: {why}");
        self.missing.push(Missing { part, what, why });
    }

    /// The MISSING files and the README, which lists every file.
    fn finish(&mut self, header: &str) {
        for m in &self.missing {
            self.entries.push(Entry {
                name: format!("MISSING-{}.txt", m.part),
                about: format!("why the {} is missing", m.what),
                data: format!("missing {}: {}\n", m.what, m.why).into_bytes(),
            });
        }
        let readme = readme(header, &self.summary, &self.entries, &self.missing);
        self.entries.insert(
            0,
            Entry {
                name: "README.txt".into(),
                about: "this file".into(),
                data: readme.into_bytes(),
            },
        );
    }

    fn scrub(&mut self) {
        let secrets: Vec<&String> = self
            .secrets
            .iter()
            .filter(|s| s.len() >= MIN_SCRUB_LEN)
            .collect();
        for e in &mut self.entries {
            for s in &secrets {
                scrub(&mut e.data, s.as_bytes());
                // Inside JSON a value with quotes or backslashes is stored escaped.
                let escaped = serde_json::to_string(s).unwrap_or_default();
                if let Some(inner) = escaped.get(1..escaped.len().saturating_sub(1)) {
                    if inner != s.as_str() {
                        scrub(&mut e.data, inner.as_bytes());
                    }
                }
            }
        }
    }
}

/// Replace every occurrence of `needle` in `data` with REDACTED.
fn scrub(data: &mut Vec<u8>, needle: &[u8]) {
    if needle.is_empty() || data.len() < needle.len() {
        return;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    let mut hit = false;
    while i < data.len() {
        if data[i..].starts_with(needle) {
            out.extend_from_slice(REDACTED.as_bytes());
            i += needle.len();
            hit = true;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    if hit {
        *data = out;
    }
}

fn readme(header: &str, summary: &[String], entries: &[Entry], missing: &[Missing]) -> String {
    let mut s = String::from(header);
    if !summary.is_empty() {
        s.push_str("\nSummary\n");
        for l in summary {
            s.push_str(&format!("  {l}\n"));
        }
    }
    s.push_str("\nFiles\n");
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .chain(["README.txt".len()])
        .max()
        .unwrap_or(0);
    s.push_str(&format!("  {:<width$}  this file\n", "README.txt"));
    for e in entries {
        s.push_str(&format!("  {:<width$}  {}\n", e.name, e.about));
    }
    if !missing.is_empty() {
        s.push_str("\nMissing (each has its MISSING-<part>.txt above)\n");
        for m in missing {
            s.push_str(&format!("  {}: {}\n", m.what, m.why));
        }
    }
    s.push_str(&format!(
        "\nRedaction\n  Environment variables and labels whose name contains {} (in any case) \
         have their value replaced by {REDACTED} in docker/. Each such value of {MIN_SCRUB_LEN} \
         characters or more is also replaced wherever else it appears in this bundle. Nothing \
         else is redacted: command lines in the log and addresses in the port table are as \
         recorded. Read the files before you share them.\n",
        SECRET_NAMES.join(", ")
    ));
    s
}

// ---- redaction ----

fn secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_NAMES.iter().any(|s| upper.contains(s))
}

/// `NAME=value` entries, with secret values replaced and remembered.
fn redact_env(env: &[String], secrets: &mut BTreeSet<String>) -> Vec<String> {
    env.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if secret_name(k) => {
                if !v.is_empty() {
                    secrets.insert(v.to_string());
                }
                format!("{k}={REDACTED}")
            }
            _ => e.clone(),
        })
        .collect()
}

fn redact_map(
    m: Option<&HashMap<String, String>>,
    secrets: &mut BTreeSet<String>,
) -> BTreeMap<String, String> {
    m.into_iter()
        .flatten()
        .map(|(k, v)| {
            if secret_name(k) {
                if !v.is_empty() {
                    secrets.insert(v.clone());
                }
                (k.clone(), REDACTED.to_string())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

// ---- where the bundle goes ----

enum Target {
    Stdout,
    File(Partial),
}

/// The bundle's temporary file next to its destination, removed unless it was renamed into
/// place: an error (or a panic) halfway leaves no truncated archive that looks complete.
struct Partial {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<File>,
}

impl Partial {
    fn create(dest: PathBuf) -> std::io::Result<Partial> {
        let name = dest.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "that is not a file name")
        })?;
        let dir = dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.{}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        // 0600: the bundle holds command lines and container metadata of the whole host.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(Partial {
            tmp,
            dest,
            file: Some(file),
        })
    }

    fn persist(mut self) -> std::io::Result<u64> {
        let f = self.file.take().expect("persisted once");
        f.sync_all()?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest)?;
        self.tmp = PathBuf::new();
        Ok(std::fs::metadata(&self.dest)?.len())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `portwatch-report-lab1-20261130T031200Z`: sortable, and safe in a file name whatever
/// the host is called.
fn bundle_stem(host: &str, now_ns: i128) -> String {
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let ts = rfc3339(now_ns);
    let compact: String = ts[..19]
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("portwatch-report-{host}-{compact}Z")
}

fn target(output: Option<&Path>, stem: &str) -> Result<Target> {
    let default = format!("{stem}.tar.gz");
    let dest = match output {
        Some(p) if p == Path::new("-") => {
            if std::io::stdout().is_terminal() {
                return Err(Error::Io {
                    what: "writing the report to stdout",
                    source: std::io::Error::other(
                        "stdout is a terminal; redirect it (-o - > report.tar.gz) or give a \
                         file with -o",
                    ),
                });
            }
            return Ok(Target::Stdout);
        }
        Some(p) if p.is_dir() => p.join(default),
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(default),
    };
    Partial::create(dest.clone())
        .map(Target::File)
        .map_err(|e| Error::Io {
            what: "creating the report",
            source: std::io::Error::new(
                e.kind(),
                format!(
                    "cannot write {} ({e}); choose a writable file or directory with -o",
                    dest.display()
                ),
            ),
        })
}

// ---- host ----

#[derive(Serialize)]
struct Uname {
    sysname: String,
    nodename: String,
    release: String,
    version: String,
    machine: String,
}

fn uname() -> Option<Uname> {
    let u = nix::sys::utsname::uname().ok()?;
    let s = |f: &std::ffi::OsStr| f.to_string_lossy().into_owned();
    Some(Uname {
        sysname: s(u.sysname()),
        nodename: s(u.nodename()),
        release: s(u.release()),
        version: s(u.version()),
        machine: s(u.machine()),
    })
}

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[derive(Serialize)]
struct Host<'a> {
    hostname: &'a str,
    generated_at: String,
    portwatch_version: &'static str,
    command: Vec<String>,
    window_since: String,
    port: Option<u16>,
    euid: u32,
    uname: Option<Uname>,
    kernel_btf: bool,
    /// A port inside it can be taken as a client's source port before a service binds it.
    ip_local_port_range: Option<String>,
    ip_local_reserved_ports: Option<String>,
}

// ---- agent ----

/// The agent's `status` answer, or why there is none.
fn agent_status(runtime_dir: &Path) -> std::result::Result<Value, String> {
    let mut r = control::request(runtime_dir, &Request::Status).map_err(|e| e.to_string())?;
    let sock = control::socket_path(runtime_dir);
    let _ = r.get_ref().set_read_timeout(Some(STATUS_TIMEOUT));
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => {
            return Err(format!(
                "the agent at {} closed the connection without answering a status request",
                sock.display()
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "the agent at {} did not answer a status request within {} s ({e})",
                sock.display(),
                STATUS_TIMEOUT.as_secs()
            ))
        }
    }
    let v: Value = serde_json::from_str(&line).map_err(|e| {
        format!(
            "the agent at {} answered with something that is not JSON ({e})",
            sock.display()
        )
    })?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("the agent at {} refused: {e}", sock.display()));
    }
    Ok(v)
}

#[derive(Serialize)]
struct VerifierVerdict {
    program: &'static str,
    accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize)]
struct Hooks {
    /// From the newest `ready` record in the log: what the running agent attached.
    attached: Value,
    ready_at: Value,
    /// This kernel's verifier, asked now, as `portwatch doctor` does.
    verifier: Option<Vec<VerifierVerdict>>,
    verifier_notes: Vec<String>,
}

/// Load every program `run` would load into the verifier and unload it again, as doctor
/// does; the one-line reasons are what a kernel-support bug report needs.
fn verifier() -> std::result::Result<(Vec<VerifierVerdict>, Vec<String>), String> {
    use crate::kernel::prereq;
    let release = prereq::kernel_release();
    if prereq::kernel_version().is_none_or(|v| !prereq::supported(v)) {
        return Err(format!(
            "Linux {release} is older than 5.8, so the programs were not loaded"
        ));
    }
    prereq::check_privileges()
        .map_err(|e| format!("not checked: loading programs into the verifier needs root ({e})"))?;
    let btf = Path::new(prereq::BTF_PATH);
    if !btf.exists() {
        return Err(format!(
            "not checked: {} is missing (a kernel without BTF)",
            btf.display()
        ));
    }
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .ok_or("not checked: tracefs is not mounted (`portwatch run` mounts it itself)")?;
    let (offsets, _) = crate::kernel::btf::resolve(btf);
    let cfg = crate::kernel::probes::LoadConfig {
        tracefs,
        offsets,
        all_events: false,
        ports: &[],
        ringbuf_size: 4 << 20,
        hooks: crate::kernel::probes::HookChoice::Tracepoint,
    };
    let (verdicts, notes) = crate::kernel::probes::verify(&cfg).map_err(|e| e.to_string())?;
    Ok((
        verdicts
            .into_iter()
            .map(|v| VerifierVerdict {
                program: v.program,
                accepted: v.result.is_ok(),
                reason: v.result.err(),
            })
            .collect(),
        notes,
    ))
}

// ---- the log ----

/// One bundle file's records, the newest kept when there are too many.
#[derive(Default)]
struct Capped {
    lines: std::collections::VecDeque<Vec<u8>>,
    bytes: usize,
    dropped: u64,
}

impl Capped {
    fn push(&mut self, line: &[u8]) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line.to_vec());
        while self.bytes > MAX_RECORD_BYTES {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.len() + 1;
            self.dropped += 1;
        }
    }

    fn data(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(self.bytes);
        for l in &self.lines {
            d.extend_from_slice(l);
            d.push(b'\n');
        }
        d
    }

    fn about(&self, what: &str) -> String {
        let mut s = format!("{what}: {}", count(self.lines.len(), "record"));
        if self.dropped > 0 {
            s.push_str(&format!(
                " (the {} oldest left out to keep it under {} MiB)",
                self.dropped,
                MAX_RECORD_BYTES >> 20
            ));
        }
        s
    }
}

#[derive(Default)]
struct LogScan {
    files: Vec<PathBuf>,
    conflicts: Capped,
    ports: Capped,
    docker: Capped,
    lost: Capped,
    agent: Capped,
    lost_in_window: u64,
    /// The newest `ready` record, whenever it was written: the agent may have started long
    /// before the window.
    ready: Option<Value>,
    /// `port` and `conflict` records of the report's port, from the whole log: a holding
    /// that began before the window still shows where it began.
    history: Vec<Value>,
    malformed: u64,
    unreadable: Vec<String>,
}

/// The record's `type` without parsing it: the writer puts `"type":"..."` before any
/// nested object, so the first one is the record's own.
fn record_type(line: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"type\":\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = line[at..].iter().position(|&b| b == b'"')?;
    Some(&line[at..at + len])
}

fn scan_log(path: &Path, since_ns: i128, port: Option<u16>) -> LogScan {
    let mut s = LogScan::default();
    let filter = Filter {
        port,
        pid: None,
        container: None,
    };
    for f in tail::files(path).into_iter().filter(|f| f.exists()) {
        let r = match tail::open_any(&f) {
            Ok(r) => r,
            Err(e) => {
                s.unreadable.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        s.files.push(f.clone());
        for l in r.split(b'\n') {
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    // A truncated .gz ends here; what came before it is still good.
                    s.unreadable.push(format!("{}: {e}", f.display()));
                    break;
                }
            };
            let Some(ty) = record_type(&l) else {
                if !l.iter().all(u8::is_ascii_whitespace) {
                    s.malformed += 1;
                }
                continue;
            };
            let ty = match ty {
                b"conflict" | b"port" | b"docker" | b"lost" | b"agent" => ty.to_vec(),
                _ => continue,
            };
            let Ok(v) = serde_json::from_slice::<Value>(&l) else {
                s.malformed += 1;
                continue;
            };
            if ty == b"agent" && v["event"] == "ready" {
                s.ready = Some(v.clone());
            }
            if let Some(p) = port {
                if (ty == b"port" || ty == b"conflict") && v["port"] == p {
                    s.history.push(v.clone());
                }
            }
            let in_window = v["ts"]
                .as_str()
                .and_then(tail::ts_ns)
                .is_some_and(|t| t >= since_ns);
            if !in_window || !filter.matches(&v) {
                continue;
            }
            match ty.as_slice() {
                b"conflict" => s.conflicts.push(&l),
                b"port" => s.ports.push(&l),
                b"docker" => s.docker.push(&l),
                b"lost" => {
                    s.lost_in_window += v["count"].as_u64().unwrap_or(0);
                    s.lost.push(&l);
                }
                _ => s.agent.push(&l),
            }
        }
    }
    s
}

// ---- Docker ----

#[derive(Serialize)]
struct PortFacts {
    ip: Option<String>,
    private_port: u16,
    public_port: Option<u16>,
    proto: Option<String>,
}

#[derive(Serialize)]
struct BindingFacts {
    host_ip: Option<String>,
    host_port: Option<String>,
}

#[derive(Serialize)]
struct EndpointFacts {
    ip_address: Option<String>,
    gateway: Option<String>,
    global_ipv6_address: Option<String>,
    mac_address: Option<String>,
    aliases: Option<Vec<String>>,
}

/// What `docker ps -a` shows of a container, and what its inspect adds about ports. The
/// command line is left out: it is where secrets passed as arguments live, and a port
/// conflict does not need it.
#[derive(Serialize)]
struct ContainerFacts {
    id: String,
    names: Vec<String>,
    image: Option<String>,
    created: Option<String>,
    state: Option<String>,
    status: Option<String>,
    ports: Vec<PortFacts>,
    labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inspect: Option<InspectFacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inspect_error: Option<String>,
}

#[derive(Serialize)]
struct InspectFacts {
    env: Vec<String>,
    pid: Option<i64>,
    exit_code: Option<i64>,
    error: Option<String>,
    oom_killed: Option<bool>,
    started_at: Option<String>,
    finished_at: Option<String>,
    restart_count: Option<i64>,
    network_mode: Option<String>,
    publish_all_ports: Option<bool>,
    exposed_ports: Vec<String>,
    port_bindings: BTreeMap<String, Vec<BindingFacts>>,
    networks: BTreeMap<String, EndpointFacts>,
}

#[derive(Serialize)]
struct NetworkFacts {
    name: Option<String>,
    id: Option<String>,
    driver: Option<String>,
    scope: Option<String>,
    created: Option<String>,
    internal: Option<bool>,
    attachable: Option<bool>,
    enable_ipv6: Option<bool>,
    ipam: Option<bollard::models::Ipam>,
    options: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

struct DockerFacts {
    version: Value,
    server_version: String,
    api_version: String,
    containers: Vec<ContainerFacts>,
    networks: Vec<NetworkFacts>,
}

fn inspect_facts(r: ContainerInspectResponse, secrets: &mut BTreeSet<String>) -> InspectFacts {
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let host = r.host_config.unwrap_or_default();
    let port_bindings = host
        .port_bindings
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let b = v
                .unwrap_or_default()
                .into_iter()
                .map(|b| BindingFacts {
                    host_ip: b.host_ip,
                    host_port: b.host_port,
                })
                .collect();
            (k, b)
        })
        .collect();
    let networks = r
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, e)| {
            (
                k,
                EndpointFacts {
                    ip_address: e.ip_address.filter(|s| !s.is_empty()),
                    gateway: e.gateway.filter(|s| !s.is_empty()),
                    global_ipv6_address: e.global_ipv6_address.filter(|s| !s.is_empty()),
                    mac_address: e.mac_address.filter(|s| !s.is_empty()),
                    aliases: e.aliases,
                },
            )
        })
        .collect();
    InspectFacts {
        env: redact_env(&config.env.unwrap_or_default(), secrets),
        pid: state.pid,
        exit_code: state.exit_code,
        error: state.error.filter(|e| !e.is_empty()),
        oom_killed: state.oom_killed,
        started_at: state.started_at,
        finished_at: state.finished_at,
        restart_count: r.restart_count,
        network_mode: host.network_mode,
        publish_all_ports: host.publish_all_ports,
        exposed_ports: config.exposed_ports.unwrap_or_default(),
        port_bindings,
        networks,
    }
}

fn container_facts(
    c: ContainerSummary,
    inspected: std::result::Result<ContainerInspectResponse, String>,
    secrets: &mut BTreeSet<String>,
) -> ContainerFacts {
    let (inspect, inspect_error) = match inspected {
        Ok(r) => {
            // The summary's labels are the inspect's; both are redacted, so both are read
            // for secret values to scrub.
            let _ = redact_map(r.config.as_ref().and_then(|c| c.labels.as_ref()), secrets);
            (Some(inspect_facts(r, secrets)), None)
        }
        Err(e) => (None, Some(e)),
    };
    ContainerFacts {
        id: c.id.unwrap_or_default(),
        names: c
            .names
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.trim_start_matches('/').to_string())
            .collect(),
        image: c.image,
        created: c.created.map(|s| rfc3339(i128::from(s) * 1_000_000_000)),
        state: c.state.map(|s| s.to_string()),
        status: c.status,
        ports: c
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| PortFacts {
                ip: p.ip,
                private_port: p.private_port,
                public_port: p.public_port,
                proto: p.typ.map(|t| t.to_string()),
            })
            .collect(),
        labels: redact_map(c.labels.as_ref(), secrets),
        inspect,
        inspect_error,
    }
}

fn network_facts(n: Network, secrets: &mut BTreeSet<String>) -> NetworkFacts {
    NetworkFacts {
        options: redact_map(n.options.as_ref(), secrets),
        labels: redact_map(n.labels.as_ref(), secrets),
        name: n.name,
        id: n.id,
        driver: n.driver,
        scope: n.scope,
        created: n.created,
        internal: n.internal,
        attachable: n.attachable,
        enable_ipv6: n.enable_ipv6,
        ipam: n.ipam,
    }
}

async fn docker_facts(
    ep: &Endpoint,
    secrets: &mut BTreeSet<String>,
) -> std::result::Result<DockerFacts, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "the Docker daemon at {ep} cannot be reached ({e}); start dockerd, or point \
             --docker-host (or DOCKER_HOST) at it"
        )
    };
    let docker = docker::connect(ep).map_err(|e| unreachable(&e))?;
    let hello = async {
        let docker = docker.negotiate_version().await?;
        let v = docker.version().await?;
        Ok::<_, bollard::errors::Error>((docker, v))
    };
    let (docker, version): (Docker, _) =
        match tokio::time::timeout(DOCKER_HELLO_TIMEOUT, hello).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(unreachable(&e)),
            Err(_) => {
                return Err(unreachable(&format!(
                    "no answer within {} s",
                    DOCKER_HELLO_TIMEOUT.as_secs()
                )))
            }
        };
    let api = |what: &str, e: bollard::errors::Error| {
        format!("the Docker daemon at {ep} failed to {what} ({e})")
    };
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| api("list containers", e))?;
    let inspected: Vec<_> = stream::iter(list.iter().map(|c| {
        let docker = docker.clone();
        let id = c.id.clone().unwrap_or_default();
        async move {
            docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                // Removed between the list and the inspect, most likely.
                .map_err(|e| format!("inspect failed: {e}"))
        }
    }))
    .buffered(PARALLEL_INSPECTS)
    .collect()
    .await;
    let containers = list
        .into_iter()
        .zip(inspected)
        .map(|(c, i)| container_facts(c, i, secrets))
        .collect();
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(|e| api("list networks", e))?
        .into_iter()
        .map(|n| network_facts(n, secrets))
        .collect();
    Ok(DockerFacts {
        server_version: version.version.clone().unwrap_or_default(),
        api_version: docker.client_version().to_string(),
        version: serde_json::to_value(&version).unwrap_or_default(),
        containers,
        networks,
    })
}

/// `docker ps -a`, as a person reads it.
fn render_ps(cs: &[ContainerFacts]) -> String {
    let ports = |c: &ContainerFacts| {
        c.ports
            .iter()
            .map(|p| {
                let proto = p.proto.as_deref().unwrap_or("tcp");
                match (p.public_port, p.ip.as_deref()) {
                    (Some(pub_), Some(ip)) if ip.contains(':') => {
                        format!("[{ip}]:{pub_}->{}/{proto}", p.private_port)
                    }
                    (Some(pub_), ip) => {
                        format!("{}:{pub_}->{}/{proto}", ip.unwrap_or(""), p.private_port)
                    }
                    (None, _) => format!("{}/{proto}", p.private_port),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!(
        "{:<12}  {:<28}  {:<28}  {:<40}  NAMES\n",
        "CONTAINER ID", "IMAGE", "STATUS", "PORTS"
    );
    for c in cs {
        s.push_str(&format!(
            "{:<12}  {:<28}  {:<28}  {:<40}  {}\n",
            c.id.get(..12).unwrap_or(&c.id),
            c.image.as_deref().unwrap_or(""),
            c.status.as_deref().unwrap_or(""),
            ports(c),
            c.names.join(",")
        ));
    }
    s
}

// ---- the daemon's journal ----

/// `journalctl`'s "YYYY-MM-DD HH:MM:SS UTC".
fn journal_time(ns: i128) -> String {
    let t = rfc3339(ns);
    format!("{} {} UTC", &t[..10], &t[11..19])
}

/// The newest lines of dockerd's journal since `since_ns`, at most JOURNAL_MAX_BYTES.
fn journal(since_ns: i128) -> std::result::Result<(Vec<u8>, String), String> {
    let since = journal_time(since_ns);
    let args = [
        "-u",
        "docker",
        "--since",
        &since,
        "--no-pager",
        "-o",
        "short-iso-precise",
        "-n",
        JOURNAL_LINES,
    ];
    let shown = format!(
        "journalctl {}",
        args.map(|a| if a.contains(' ') {
            format!("'{a}'")
        } else {
            a.to_string()
        })
        .join(" ")
    );
    let mut child = Command::new("journalctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "journalctl is not installed, so this host has no systemd journal to read"
                    .to_string()
            }
            _ => format!("running journalctl failed: {e}"),
        })?;
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|r| Box::new(r) as _));
    let err = read(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + JOURNAL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{shown}` did not finish within {} s",
                    JOURNAL_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let mut out = out.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default())
        .trim()
        .trim_end_matches('.')
        .to_string();
    let entries = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && !l.starts_with(b"-- "))
        .count();
    if !status.success() || entries == 0 {
        return Err(format!(
            "`{shown}` found no entries{}{}; dockerd may not run under systemd here, and then \
             its log is wherever it was started to write",
            if status.success() {
                String::new()
            } else {
                format!(" ({status})")
            },
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ));
    }
    if out.len() > JOURNAL_MAX_BYTES {
        // Keep the newest, from a line boundary.
        let cut = out.len() - JOURNAL_MAX_BYTES;
        let start = out[cut..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(cut, |i| cut + i + 1);
        out.drain(..start);
        return Ok((
            out,
            format!(
                "the Docker daemon's journal for the window: `{shown}`, its newest {} MiB",
                JOURNAL_MAX_BYTES >> 20
            ),
        ));
    }
    Ok((
        out,
        format!(
            "the Docker daemon's journal for the window: `{shown}`, {}",
            count(entries, "line")
        ),
    ))
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
            scan.history.iter().cloned(),
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
