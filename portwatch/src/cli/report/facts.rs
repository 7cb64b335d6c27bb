//! Facts about this host and the agent: uname, status, hooks and verifier verdicts, and
//! the log scanned for the window.

use super::*;
use crate::output::keys::Keys;

#[derive(Serialize)]
pub(super) struct Uname {
    pub(super) sysname: String,
    pub(super) nodename: String,
    pub(super) release: String,
    pub(super) version: String,
    pub(super) machine: String,
}

pub(super) fn uname() -> Option<Uname> {
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

pub(super) fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

#[derive(Serialize)]
pub(super) struct Host<'a> {
    pub(super) hostname: &'a str,
    pub(super) generated_at: String,
    pub(super) portwatch_version: &'static str,
    pub(super) command: Vec<String>,
    pub(super) window_since: String,
    pub(super) port: Option<u16>,
    pub(super) euid: u32,
    pub(super) uname: Option<Uname>,
    pub(super) kernel_btf: bool,
    /// A port inside it can be taken as a client's source port before a service binds it.
    pub(super) ip_local_port_range: Option<String>,
    pub(super) ip_local_reserved_ports: Option<String>,
}

// ---- agent ----

/// The agent's `status` answer, or why there is none.
pub(super) fn agent_status(runtime_dir: &Path) -> std::result::Result<Value, String> {
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
pub(super) struct VerifierVerdict {
    pub(super) program: &'static str,
    pub(super) accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) reason: Option<String>,
}

#[derive(Serialize)]
pub(super) struct Hooks {
    /// From the newest `ready` record in the log: what the running agent attached.
    pub(super) attached: Value,
    pub(super) ready_at: Value,
    /// This kernel's verifier, asked now, as `portwatch doctor` does.
    pub(super) verifier: Option<Vec<VerifierVerdict>>,
    pub(super) verifier_notes: Vec<String>,
}

/// Load every program `run` would load into the verifier and unload it again, as doctor
/// does; the one-line reasons are what a kernel-support bug report needs.
pub(super) fn verifier() -> std::result::Result<(Vec<VerifierVerdict>, Vec<String>), String> {
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
pub(super) struct Capped {
    pub(super) lines: std::collections::VecDeque<Vec<u8>>,
    pub(super) bytes: usize,
    pub(super) dropped: u64,
}

impl Capped {
    pub(super) fn push(&mut self, line: &[u8]) {
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

    pub(super) fn data(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(self.bytes);
        for l in &self.lines {
            d.extend_from_slice(l);
            d.push(b'\n');
        }
        d
    }

    pub(super) fn about(&self, what: &str) -> String {
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
pub(super) struct LogScan {
    pub(super) files: Vec<PathBuf>,
    pub(super) conflicts: Capped,
    pub(super) ports: Capped,
    pub(super) docker: Capped,
    pub(super) lost: Capped,
    pub(super) agent: Capped,
    pub(super) lost_in_window: u64,
    /// The newest `ready` record, whenever it was written: the agent may have started long
    /// before the window.
    pub(super) ready: Option<Value>,
    /// `port` and `conflict` records of the report's port, from the whole log: a holding
    /// that began before the window still shows where it began.
    pub(super) history: Vec<Value>,
    pub(super) malformed: u64,
    pub(super) unreadable: Vec<String>,
}

/// The record's `type` without parsing it: the writer puts `"type":"..."` before any
/// nested object, so the first one is the record's own.
pub(super) fn record_type(line: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"type\":\"";
    let at = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let len = line[at..].iter().position(|&b| b == b'"')?;
    Some(&line[at..at + len])
}

pub(super) fn scan_log(path: &Path, since_ns: i128, port: Option<u16>) -> LogScan {
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
            if !in_window || !matches(&filter, &l, &v) {
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

/// Does a log line match the filter: by the keys of its typed record, or of its JSON for a
/// line the schema cannot read.
fn matches(filter: &Filter, line: &[u8], v: &Value) -> bool {
    if filter.is_empty() {
        return true;
    }
    let keys = match serde_json::from_slice::<portwatch_schema::Record>(line) {
        Ok(r) if !matches!(r.body, portwatch_schema::Body::Unknown) => Keys::of_record(&r),
        _ => Keys::from_value(v),
    };
    filter.matches_keys(&keys)
}
