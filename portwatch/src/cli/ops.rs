//! Operator commands that talk to a running agent, or look for themselves when none runs:
//! `attach`, `ports`, `check` and `doctor`; and the human-readable rendering of records
//! shared with `tail`.

use std::{
    io::{BufRead, IsTerminal, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cli::{AttachArgs, CheckArgs, PortsArgs},
    control::{self, Filter, PortRow, Request},
    error::{Error, Result},
    host::diag,
    kernel::decode::Clock,
    state::table::{self, Attempt, NsSockets, PortTable, Proto},
};

// ---- rendering ----

pub struct Style {
    pub color: bool,
}

impl Style {
    pub fn for_stdout() -> Self {
        Style {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    pub fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

fn addr_port(v: &Value) -> String {
    let a = v["addr"].as_str().unwrap_or("?");
    let p = &v["port"];
    if a.contains(':') {
        format!("[{a}]:{p}")
    } else {
        format!("{a}:{p}")
    }
}

fn who(v: &Value) -> String {
    let mut s = match (v["pid"].as_u64(), v["comm"].as_str()) {
        (Some(p), Some(c)) => format!("{c}[{p}]"),
        (Some(p), None) => format!("pid {p}"),
        _ => String::new(),
    };
    if let Some(c) = v["container"]["name"].as_str() {
        s.push_str(&format!(" ({c})"));
    }
    s
}

/// One readable line for a record. Unknown types fall back to the raw JSON.
pub fn human(v: &Value, st: &Style) -> String {
    let ts = v["ts"].as_str().unwrap_or("");
    // 2026-11-25T08:31:31.123456789Z -> 2026-11-25 08:31:31.123
    let t = if ts.len() >= 23 {
        format!("{} {}", &ts[..10], &ts[11..23])
    } else {
        ts.to_string()
    };
    let ty = v["type"].as_str().unwrap_or("?");
    let body = match ty {
        "conflict" => {
            let holders: Vec<String> = v["holders"]
                .as_array()
                .map(|hs| {
                    hs.iter()
                        .map(|h| match h["count"].as_u64() {
                            Some(n) => format!("{n}x TIME_WAIT"),
                            None => format!(
                                "{} {} {}",
                                who(h),
                                h["state"].as_str().unwrap_or(""),
                                addr_port(h)
                            ),
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "{}{} {} {} {} by {} netns {} cause={}{}{}",
                st.paint("1;31", "CONFLICT"),
                match v["count"].as_u64() {
                    Some(n) if n > 1 => format!(" x{n}"),
                    _ => String::new(),
                },
                v["op"].as_str().unwrap_or(""),
                v["proto"].as_str().unwrap_or(""),
                st.paint("1", &addr_port(v)),
                who(&v["actor"]),
                v["netns"],
                st.paint("33", v["cause"].as_str().unwrap_or("")),
                if holders.is_empty() {
                    String::new()
                } else {
                    format!(" held by {}", holders.join(", "))
                },
                match v["hint"].as_str() {
                    Some(h) if !h.is_empty() => format!(" -- {h}"),
                    _ => String::new(),
                }
            )
        }
        "bind" | "listen" | "connect" | "close" => format!(
            "{} {} {} {} by {} netns {}",
            st.paint("36", ty),
            v["result"].as_str().unwrap_or(""),
            v["proto"].as_str().unwrap_or(""),
            addr_port(v),
            who(&v["actor"]),
            v["netns"]
        ),
        "port" => format!(
            "{} {} {} {} by {} netns {}{}",
            st.paint("35", "port"),
            v["event"].as_str().unwrap_or(""),
            v["proto"].as_str().unwrap_or(""),
            addr_port(v),
            who(&v["actor"]),
            v["netns"],
            match v["held_s"].as_f64() {
                Some(h) => format!(" held {h}s ({})", v["reason"].as_str().unwrap_or("")),
                None => String::new(),
            }
        ),
        "exit" => format!(
            "{} {} netns {}",
            st.paint("36", "exit"),
            who(&v["actor"]),
            v["netns"]
        ),
        "tcp_state" => format!(
            "{} {} {} -> {} peer {}:{}",
            st.paint("36", "tcp_state"),
            addr_port(v),
            v["old_state"].as_str().unwrap_or(""),
            v["new_state"].as_str().unwrap_or(""),
            v["raddr"].as_str().unwrap_or(""),
            v["rport"]
        ),
        "lost" => format!(
            "{} {} events (kernel {}, agent {}) {}",
            st.paint("1;35", "LOST"),
            v["count"],
            v["kernel"],
            v["agent"],
            v["by_kind"]
        ),
        "missed" => format!(
            "{} {} records (this client read too slowly)",
            st.paint("1;35", "MISSED"),
            v["count"]
        ),
        "time_wait" => format!(
            "{} netns {} total {} (+{} -{}) top ports {}",
            st.paint("33", "time_wait"),
            v["netns"],
            v["total"],
            v["entered"],
            v["expired"],
            v["by_local_port"]
        ),
        "pressure" => format!(
            "{} netns {} {}:{} {}% of ephemeral ports -- {}",
            st.paint("1;33", "PRESSURE"),
            v["netns"],
            v["addr"].as_str().unwrap_or(""),
            v["port"],
            v["pct"],
            v["hint"].as_str().unwrap_or("")
        ),
        "agent" => format!(
            "{} {}{}",
            st.paint("32", "agent"),
            v["event"].as_str().unwrap_or(""),
            v["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        "docker" => format!(
            "{} {} {}",
            st.paint("34", "docker"),
            v["event"].as_str().unwrap_or(""),
            v["container"]["name"].as_str().unwrap_or("")
        ),
        _ => v.to_string(),
    };
    format!("{} {body}", st.paint("2", &t))
}

// ---- ports ----

/// The table as a one-shot snapshot (no agent running): sock_diag of every namespace plus
/// the /proc inode map.
fn snapshot_table() -> (PortTable, usize) {
    let owners = diag::socket_owners();
    let wall = Clock::now_wall_ns();
    let mut t = PortTable::default();
    let nss = diag::namespaces();
    for ns in &nss {
        let Ok(entries) = diag::dump(ns) else {
            continue;
        };
        let lookup = |ino: u64| owners.get(&ino).cloned();
        t.reconcile(NsSockets::build(ns.inode, &entries, &lookup, wall));
    }
    (t, nss.len())
}

fn table_rows(t: &PortTable, filter: &Filter) -> Vec<PortRow> {
    // No engine to ask: no container names.
    crate::control::rows::table_rows(t, filter, &mut |_, _| None)
}

/// Rows from the running agent, or from a snapshot of our own when none runs.
pub(crate) fn rows(runtime_dir: &Path, filter: &Filter) -> Result<(Vec<PortRow>, &'static str)> {
    match control::request(
        runtime_dir,
        &Request::Ports {
            filter: filter.clone(),
        },
    ) {
        Ok(mut r) => {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|source| Error::Io {
                what: "reading the agent's answer",
                source,
            })?;
            let v: Value = serde_json::from_str(&line).map_err(|e| Error::Io {
                what: "parsing the agent's answer",
                source: std::io::Error::other(e),
            })?;
            if let (None, Some(e)) = (v["type"].as_str(), v["error"].as_str()) {
                return Err(Error::Agent(e.to_string()));
            }
            let rows: Vec<PortRow> = serde_json::from_value(v["ports"].clone()).unwrap_or_default();
            Ok((rows, "agent"))
        }
        Err(Error::NoAgent { .. }) => {
            let (t, _) = snapshot_table();
            Ok((table_rows(&t, filter), "snapshot"))
        }
        Err(e) => Err(e),
    }
}

pub fn ports(a: &PortsArgs) -> Result<()> {
    let filter = Filter {
        port: a.port,
        pid: None,
        container: a.container.clone(),
    };
    let (mut rows, source) = rows(&a.runtime_dir, &filter)?;
    if let Some(st) = &a.state {
        let want = st.to_ascii_uppercase();
        rows.retain(|r| r.state == want);
    }
    if let Some(c) = &a.container {
        rows.retain(|r| r.container.as_deref() == Some(c.as_str()));
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        for r in &rows {
            let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        }
        return Ok(());
    }
    let _ = writeln!(
        out,
        "PROTO {:<40} {:<12} {:<24} {:<16} NETNS",
        "LOCAL", "STATE", "PROCESS", "CONTAINER"
    );
    for r in &rows {
        let local = if r.addr.contains(':') {
            format!("[{}]:{}", r.addr, r.port)
        } else {
            format!("{}:{}", r.addr, r.port)
        };
        let state = match r.count {
            Some(n) => format!("{} x{n}", r.state),
            None => r.state.clone(),
        };
        let proc_ = match (r.pid, &r.comm) {
            (Some(p), Some(c)) => format!("{c}[{p}]"),
            (Some(p), None) => p.to_string(),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<5} {:<40} {:<12} {:<24} {:<16} {}",
            r.proto,
            local,
            state,
            proc_,
            match (r.stale, r.container.as_deref()) {
                // Left behind: the engines run no container with this port.
                (Some(true), Some(c)) => format!("{c} (stale)"),
                (Some(true), None) => "(stale)".into(),
                (_, c) => c.unwrap_or("-").into(),
            },
            r.netns
        );
    }
    if source == "snapshot" {
        eprintln!("(no agent running: one-shot snapshot from sock_diag and /proc)");
    }
    Ok(())
}

// ---- attach ----

pub fn attach(a: &AttachArgs) -> Result<()> {
    let filter = Filter {
        port: a.port,
        pid: a.pid,
        container: a.container.clone(),
    };
    let since_s = a.since.map(|d| d.as_secs()).unwrap_or(0);
    let mut r = control::request(&a.runtime_dir, &Request::Attach { filter, since_s })?;
    let deadline = a.duration.map(|d| Instant::now() + d);
    if let Some(d) = deadline {
        // The read below blocks; a timeout on the socket ends it when the duration is up.
        let _ = r
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let _ = d;
    }
    let st = Style::for_stdout();
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "reading from the agent",
                    source,
                })
            }
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let (None, Some(e)) = (v["type"].as_str(), v["error"].as_str()) {
            return Err(Error::Agent(e.to_string()));
        }
        let ok = if a.json {
            out.write_all(line.as_bytes())
        } else {
            writeln!(out, "{}", human(&v, &st))
        };
        if ok.and_then(|_| out.flush()).is_err() {
            break; // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}

// ---- check ----

/// Would a bind succeed right now? A real trial bind is the ground truth; the table says who
/// is in the way.
fn trial_bind(proto: Proto, addr: SocketAddr) -> std::io::Result<()> {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let ty = if proto == Proto::Tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket syscalls on an fd we own and close.
    unsafe {
        let fd = libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as _;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as _;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        let rc = libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len as _);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc == 0 {
            Ok(())
        } else {
            Err(err)
        }
    }
}

fn own_netns() -> u32 {
    std::fs::read_link("/proc/self/ns/net")
        .ok()
        .and_then(|l| crate::host::enrich::parse_ns_link(&l.to_string_lossy()))
        .unwrap_or(0)
}

/// This namespace's net.ipv4.ip_local_port_range (Linux's default when unreadable).
fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// Exit code: 0 free, 1 taken.
pub fn check(a: &CheckArgs) -> Result<u8> {
    let proto = if a.proto == "udp" {
        Proto::Udp
    } else {
        Proto::Tcp
    };
    let addr: IpAddr = a.addr;
    let (t, _) = snapshot_table();
    let netns = own_netns();
    let now = Clock::now_wall_ns();
    let ephemeral = local_port_range();
    let in_ephemeral = |p: u16| ephemeral.0 <= p && p <= ephemeral.1;
    let verdict = |port: u16| -> (bool, Option<table::Attribution>) {
        let free = trial_bind(proto, SocketAddr::new(addr, port)).is_ok();
        let attempt = Attempt {
            netns,
            proto,
            addr,
            port,
            op_listen: false,
            actor_pid: 0,
            actor_sk: 0,
            now_ns: now,
            proto_name: if proto == Proto::Tcp { "tcp" } else { "udp" },
            publishing: None,
            ephemeral,
        };
        let at = t.attribute(&attempt);
        // TIME_WAIT counts as taken for suggestions even when SO_REUSEADDR would get past it.
        let tw = at.holders.iter().any(|h| h.state == "TIME_WAIT");
        (free && !tw, (!free || tw).then_some(at))
    };
    let mut out = std::io::stdout().lock();
    let code = match a.port {
        Some(port) => {
            let (free, at) = verdict(port);
            let proto_s = if proto == Proto::Tcp { "tcp" } else { "udp" };
            let target = SocketAddr::new(addr, port);
            let published = published(&a.runtime_dir, port, proto_s);
            if a.json {
                let v = serde_json::json!({
                    "published": published,
                    "port": port, "proto": proto_s, "addr": addr, "free": free,
                    "in_ephemeral_range": in_ephemeral(port),
                    "ephemeral_range": [ephemeral.0, ephemeral.1],
                    "holders": at.as_ref().map(|a| &a.holders),
                    "cause": at.as_ref().map(|a| a.cause),
                    "overlap": at.as_ref().and_then(|a| a.overlap),
                    "hint": at.as_ref().map(|a| a.hint.clone()),
                });
                let _ = writeln!(out, "{v}");
            } else if free {
                let _ = writeln!(out, "{proto_s} {target} is free: a bind would succeed now");
            } else if let Some(at) = &at {
                let _ = writeln!(out, "{proto_s} {target} is taken: cause {}", at.cause);
                for h in &at.holders {
                    let v = serde_json::to_value(h).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  held by {} {} {}{}",
                        if who(&v).is_empty() {
                            "-".to_string()
                        } else {
                            who(&v)
                        },
                        h.state,
                        SocketAddr::new(h.addr, h.port),
                        h.count
                            .map(|n| format!(
                                " x{n}, first expires in {} s",
                                h.expires_in_s.unwrap_or(0)
                            ))
                            .unwrap_or_default()
                    );
                }
                if !at.hint.is_empty() {
                    let _ = writeln!(out, "  hint: {}", at.hint);
                } else if let Some(r) = &at.reason {
                    let _ = writeln!(out, "  {r}");
                }
            }
            if !a.json {
                for p in published.iter().flatten() {
                    let mapping = format!(
                        "{} publishes {} to {}/{}",
                        p["container"].as_str().unwrap_or("-"),
                        SocketAddr::new(
                            p["host_ip"]
                                .as_str()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(addr),
                            port
                        ),
                        p["container_port"],
                        p["proto"].as_str().unwrap_or(proto_s),
                    );
                    if p["reachable"] == true {
                        let _ = writeln!(out, "  {mapping}: a listener inside answers");
                    } else {
                        let _ = writeln!(
                            out,
                            "  unreachable: {mapping}, but nothing there listens where published \
                             traffic arrives\n  hint: {}",
                            p["hint"].as_str().unwrap_or_default()
                        );
                    }
                }
            }
            if !a.json && in_ephemeral(port) {
                let _ = writeln!(
                    out,
                    "  warning: {port} lies in this host's ip_local_port_range ({}-{}): an \
                     outbound connection may take it as its source port before the service \
                     binds it. Reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={port}",
                    ephemeral.0, ephemeral.1
                );
            }
            u8::from(!free)
        }
        None => 0,
    };
    if let Some(n) = a.suggest {
        let (lo, hi) = a.range.unwrap_or((1024, 65535));
        let mut found = Vec::new();
        // Ports outside the ephemeral range first: an outbound connection cannot take those
        // as its source port.
        let order = (lo..=hi)
            .filter(|p| !in_ephemeral(*p))
            .chain((lo..=hi).filter(|p| in_ephemeral(*p)));
        for p in order {
            if found.len() >= n {
                break;
            }
            if verdict(p).0 {
                found.push(p);
            }
        }
        if a.json {
            let _ = writeln!(out, "{}", serde_json::json!({ "free": found }));
        } else {
            for p in &found {
                let _ = writeln!(out, "{p}");
            }
        }
        if found.len() < n {
            eprintln!("portwatch: only {} free ports in {lo}-{hi}", found.len());
            return Ok(1);
        }
    }
    Ok(code)
}

/// What the running agent knows of containers publishing `port` (`proto` only): each
/// mapping judged reachable or not, re-checked as asked. None when no agent runs (the
/// container view is the agent's); an agent that cannot answer is said on stderr.
fn published(runtime_dir: &Path, port: u16, proto: &str) -> Option<Vec<Value>> {
    let answer = control::request(runtime_dir, &Request::Published { port }).and_then(|mut r| {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|source| Error::Io {
            what: "reading the agent's answer",
            source,
        })?;
        serde_json::from_str::<Value>(&line).map_err(|e| Error::Io {
            what: "parsing the agent's answer",
            source: std::io::Error::other(e),
        })
    });
    match answer {
        Ok(v) => {
            if let (None, Some(e)) = (v["type"].as_str(), v["error"].as_str()) {
                eprintln!("portwatch: warning: the agent did not say which containers publish {port}: {e}");
                return None;
            }
            let all = v["published"].as_array().cloned().unwrap_or_default();
            Some(all.into_iter().filter(|p| p["proto"] == proto).collect())
        }
        Err(Error::NoAgent { .. }) => None,
        Err(e) => {
            eprintln!("portwatch: warning: containers publishing {port} not checked: {e}");
            None
        }
    }
}

// ---- doctor ----

struct Check {
    name: String,
    ok: bool,
    detail: String,
    fix: String,
}

pub fn doctor(runtime_dir: &Path, log_path: &Path, docker_sock: &Path, verbose: bool) -> u8 {
    let mut checks = Vec::new();
    let mut add = |name: &str, ok: bool, detail: String, fix: &str| {
        checks.push(Check {
            name: name.into(),
            ok,
            detail,
            fix: fix.into(),
        });
    };
    let release = crate::kernel::prereq::kernel_release();
    let kernel_ok =
        crate::kernel::prereq::kernel_version().is_some_and(crate::kernel::prereq::supported);
    add(
        "kernel",
        kernel_ok,
        format!("Linux {release}"),
        "portwatch needs Linux 5.8 or newer (ring buffer maps, CAP_BPF)",
    );
    let btf = Path::new(crate::kernel::prereq::BTF_PATH).exists();
    add(
        "btf",
        btf,
        crate::kernel::prereq::BTF_PATH.into(),
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    );
    let priv_ok = crate::kernel::prereq::check_privileges().is_ok();
    add(
        "privileges",
        priv_ok,
        if priv_ok {
            "CAP_BPF+CAP_PERFMON or root".into()
        } else {
            "not root".into()
        },
        "run as root (sudo portwatch run)",
    );
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir());
    add(
        "tracefs",
        tracefs.is_some(),
        tracefs
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not mounted".into()),
        "mount -t tracefs nodev /sys/kernel/tracing (portwatch run does this itself as root)",
    );
    for (_, cat, tp) in crate::kernel::probes::PROGRAMS {
        let ok = tracefs.is_some_and(|t| t.join("events").join(cat).join(tp).join("id").exists());
        add(
            &format!("tracepoint {cat}:{tp}"),
            ok,
            if ok {
                "present".into()
            } else {
                "missing".into()
            },
            "mount tracefs; a kernel without this tracepoint is not supported",
        );
    }
    // A tracepoint that exists proves nothing if the verifier rejects the program for it:
    // load every program `run` would load, with the same globals, then unload it.
    let mut degraded = Vec::new();
    let mut logs = Vec::new();
    if priv_ok && btf && kernel_ok {
        let (offsets, _) = crate::kernel::btf::resolve(Path::new(crate::kernel::prereq::BTF_PATH));
        let cfg = crate::kernel::probes::LoadConfig {
            tracefs: tracefs.unwrap_or(Path::new("/sys/kernel/tracing")),
            offsets,
            all_events: false,
            ports: &[],
            ringbuf_size: 4 << 20,
            hooks: crate::kernel::probes::HookChoice::Tracepoint,
        };
        // What the kernel offers for bind/listen/connect/close: trampolines are loaded (on
        // the functions its BTF names) and unloaded; either family works, so this informs.
        let offer = crate::kernel::probes::offer(&cfg);
        let detail = match &offer.trampoline {
            Ok(functions) => format!(
                "trampoline (fentry/fexit) available: `run` attaches {}",
                functions.join(", ")
            ),
            Err(why) => format!(
                "tracepoint only: trampolines unavailable ({why}); `run` attaches the \
                 syscall tracepoints"
            ),
        };
        add("hooks", true, detail, "");
        let trampoline_notes = offer.notes;
        match crate::kernel::probes::verify(&cfg) {
            Ok((verdicts, notes)) => {
                for v in verdicts {
                    let ok = v.result.is_ok();
                    if let Some(log) = v.log {
                        logs.push((v.program, log));
                    }
                    add(
                        &format!("program {}", v.program),
                        ok,
                        v.result
                            .err()
                            .unwrap_or_else(|| "accepted by the verifier".into()),
                        "portwatch run cannot start on this kernel; report it with this output",
                    );
                }
                degraded = notes;
                degraded.extend(trampoline_notes);
            }
            Err(e) => add(
                "programs",
                false,
                e.to_string(),
                "portwatch run cannot start on this kernel; report it with this output",
            ),
        }
    } else {
        add(
            "programs",
            false,
            "not loaded: needs root, kernel BTF and Linux 5.8+".into(),
            "fix the checks above, then run doctor again",
        );
    }
    let docker = std::os::unix::net::UnixStream::connect(docker_sock).is_ok();
    let docker_detail = if docker {
        docker_sock.display().to_string()
    } else {
        format!("{} (optional)", docker_sock.display())
    };
    let dir = log_path.parent().unwrap_or(Path::new("/"));
    let log_ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .is_ok();
    add(
        "log path",
        log_ok,
        log_path.display().to_string(),
        "make the directory writable by root or pass --log-file",
    );
    let agent = control::running_agent(runtime_dir);
    add(
        "agent",
        agent.is_some(),
        agent
            .map(|p| format!("running, pid {p}"))
            .unwrap_or_else(|| "not running".into()),
        "start it: sudo portwatch run (or systemctl start portwatch)",
    );
    let st = Style::for_stdout();
    // Docker is optional: without it records only lack container names, so it warns.
    let warn = (!docker).then_some((
        docker_detail,
        "start dockerd to get container names on records",
    ));
    let mut failed = 0;
    for c in &checks {
        let mark = if c.ok {
            st.paint("32", "PASS")
        } else {
            st.paint("31", "FAIL")
        };
        if c.ok {
            println!("{mark} {:<36} {}", c.name, c.detail);
        } else {
            failed += 1;
            println!("{mark} {:<36} {} -- fix: {}", c.name, c.detail, c.fix);
        }
    }
    if verbose {
        for (program, log) in &logs {
            println!("--- verifier log of {program} ---\n{}", log.trim_end());
        }
    } else if !logs.is_empty() {
        println!("(run `portwatch doctor --verbose` for the verifier's whole log)");
    }
    for note in &degraded {
        println!("{} {:<36} {note}", st.paint("33", "WARN"), "degraded");
    }
    if let Some((detail, fix)) = warn {
        println!(
            "{} {:<36} {detail} -- fix: {fix}",
            st.paint("33", "WARN"),
            "docker socket"
        );
    } else {
        println!(
            "{} {:<36} {}",
            st.paint("32", "PASS"),
            "docker socket",
            docker_sock.display()
        );
    }
    u8::from(failed > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_counts_time_wait_per_port() {
        let row = |state: &str, port| PortRow {
            proto: "tcp".into(),
            addr: "127.0.0.1".into(),
            port,
            state: state.into(),
            pid: None,
            comm: None,
            container: None,
            netns: 1,
            count: None,
            stale: None,
        };
        let mut rows = vec![
            row("TIME_WAIT", 80),
            row("LISTEN", 80),
            row("TIME_WAIT", 80),
            row("TIME_WAIT", 81),
        ];
        crate::control::rows::fold_time_wait(&mut rows);
        assert_eq!(rows.len(), 3);
        let tw80 = rows
            .iter()
            .find(|r| r.port == 80 && r.state == "TIME_WAIT")
            .unwrap();
        assert_eq!(tw80.count, Some(2));
    }

    #[test]
    fn human_conflict_line() {
        let v: Value = serde_json::from_str(
            r#"{"ts":"2026-11-25T08:31:31.123456789Z","type":"conflict","op":"bind","proto":"tcp","addr":"127.0.0.1","port":8080,
                "netns":1,"actor":{"pid":5,"comm":"py"},"cause":"listener","hint":"stop it",
                "holders":[{"pid":4,"comm":"nginx","state":"LISTEN","addr":"0.0.0.0","port":8080}]}"#,
        )
        .unwrap();
        let s = human(&v, &Style { color: false });
        assert_eq!(
            s,
            "2026-11-25 08:31:31.123 CONFLICT bind tcp 127.0.0.1:8080 by py[5] netns 1 cause=listener held by nginx[4] LISTEN 0.0.0.0:8080 -- stop it"
        );
    }
}
