//! `portwatch check PORT`: would a bind succeed now, and if not, who holds it.

use std::{
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde_json::Value;

use crate::{
    cli::CheckArgs,
    control::{self, Request},
    error::{Error, Result},
    kernel::decode::Clock,
    state::table::PortTable,
    state::table::{self, Attempt, Proto},
};

use crate::cli::{ports::snapshot_table, render::who};

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
/// What a check looks at: this namespace's table and port range, at one moment.
struct Probe {
    proto: Proto,
    addr: IpAddr,
    table: PortTable,
    netns: u32,
    now: i128,
    ephemeral: (u16, u16),
}

impl Probe {
    fn proto_name(&self) -> &'static str {
        if self.proto == Proto::Tcp {
            "tcp"
        } else {
            "udp"
        }
    }

    fn in_ephemeral(&self, p: u16) -> bool {
        self.ephemeral.0 <= p && p <= self.ephemeral.1
    }

    /// Free for a service (a trial bind succeeds and no TIME_WAIT socket is on it), and
    /// the attribution when it is not.
    fn verdict(&self, port: u16) -> (bool, Option<table::Attribution>) {
        let free = trial_bind(self.proto, SocketAddr::new(self.addr, port)).is_ok();
        let attempt = Attempt {
            netns: self.netns,
            proto: self.proto,
            addr: self.addr,
            port,
            op_listen: false,
            actor_sk: 0,
            now_ns: self.now,
            proto_name: self.proto_name(),
            publishing: None,
            ephemeral: self.ephemeral,
        };
        let at = self.table.attribute(&attempt);
        // TIME_WAIT counts as taken for suggestions even when SO_REUSEADDR would get past it.
        let tw = at.holders.iter().any(|h| h.state == "TIME_WAIT");
        (free && !tw, (!free || tw).then_some(at))
    }
}

pub fn check(a: &CheckArgs) -> Result<u8> {
    let probe = Probe {
        proto: if a.proto == "udp" {
            Proto::Udp
        } else {
            Proto::Tcp
        },
        addr: a.addr,
        table: snapshot_table().0,
        netns: own_netns(),
        now: Clock::now_wall_ns(),
        ephemeral: local_port_range(),
    };
    let mut out = std::io::stdout().lock();
    let code = a.port.map_or(0, |port| one_port(&mut out, a, &probe, port));
    if let Some(n) = a.suggest {
        if !suggest(&mut out, a, &probe, n) {
            return Ok(1);
        }
    }
    Ok(code)
}

/// `check PORT`: free or taken (holders, cause, hint), the containers publishing it, and a
/// warning when it lies in the ephemeral range. Returns the exit status.
fn one_port(out: &mut impl Write, a: &CheckArgs, probe: &Probe, port: u16) -> u8 {
    let (free, at) = probe.verdict(port);
    let proto_s = probe.proto_name();
    let published = published(&a.runtime_dir, port, proto_s);
    let (lo, hi) = probe.ephemeral;
    if a.json {
        let v = serde_json::json!({
            "published": published,
            "port": port, "proto": proto_s, "addr": probe.addr, "free": free,
            "in_ephemeral_range": probe.in_ephemeral(port),
            "ephemeral_range": [lo, hi],
            "holders": at.as_ref().map(|a| &a.holders),
            "cause": at.as_ref().map(|a| a.cause.clone()),
            "overlap": at.as_ref().and_then(|a| a.overlap),
            "hint": at.as_ref().map(|a| a.hint.clone()),
        });
        let _ = writeln!(out, "{v}");
        return u8::from(!free);
    }
    let target = SocketAddr::new(probe.addr, port);
    if free {
        let _ = writeln!(out, "{proto_s} {target} is free: a bind would succeed now");
    } else if let Some(at) = &at {
        print_taken(out, proto_s, target, at);
    }
    for p in published.iter().flatten() {
        print_published(out, p, target, proto_s);
    }
    if probe.in_ephemeral(port) {
        let _ = writeln!(
            out,
            "  warning: {port} lies in this host's ip_local_port_range ({lo}-{hi}): an \
             outbound connection may take it as its source port before the service binds it. \
             Reserve it: sysctl -w net.ipv4.ip_local_reserved_ports={port}"
        );
    }
    u8::from(!free)
}

fn print_taken(out: &mut impl Write, proto_s: &str, target: SocketAddr, at: &table::Attribution) {
    let _ = writeln!(out, "{proto_s} {target} is taken: cause {}", at.cause);
    for h in &at.holders {
        let who = who(
            h.pid,
            h.comm.as_deref(),
            h.container.as_ref().map(|c| &*c.name),
        );
        let tw = h
            .count
            .map(|n| format!(" x{n}, first expires in {} s", h.expires_in_s.unwrap_or(0)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  held by {} {} {}{tw}",
            if who.is_empty() { "-" } else { &who },
            h.state,
            SocketAddr::new(h.addr, h.port),
        );
    }
    if !at.hint.is_empty() {
        let _ = writeln!(out, "  hint: {}", at.hint);
    } else if let Some(r) = &at.reason {
        let _ = writeln!(out, "  {r}");
    }
}

/// One container publishing the port, as the agent judged it.
fn print_published(out: &mut impl Write, p: &Value, target: SocketAddr, proto_s: &str) {
    let host_ip = p["host_ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(target.ip());
    let mapping = format!(
        "{} publishes {} to {}/{}",
        p["container"].as_str().unwrap_or("-"),
        SocketAddr::new(host_ip, target.port()),
        p["container_port"],
        p["proto"].as_str().unwrap_or(proto_s),
    );
    if p["reachable"] == true {
        let _ = writeln!(out, "  {mapping}: a listener inside answers");
    } else {
        let _ = writeln!(
            out,
            "  unreachable: {mapping}, but nothing there listens where published traffic \
             arrives\n  hint: {}",
            p["hint"].as_str().unwrap_or_default()
        );
    }
}

/// `--suggest N`: free ports in the range, those outside the ephemeral range first (an
/// outbound connection cannot take them as its source port). False if fewer were found.
fn suggest(out: &mut impl Write, a: &CheckArgs, probe: &Probe, n: usize) -> bool {
    let (lo, hi) = a.range.unwrap_or((1024, 65535));
    let order = (lo..=hi)
        .filter(|p| !probe.in_ephemeral(*p))
        .chain((lo..=hi).filter(|p| probe.in_ephemeral(*p)));
    let found: Vec<u16> = order.filter(|p| probe.verdict(*p).0).take(n).collect();
    if a.json {
        let _ = writeln!(out, "{}", serde_json::json!({ "free": found }));
    } else {
        for p in &found {
            let _ = writeln!(out, "{p}");
        }
    }
    if found.len() < n {
        eprintln!("portwatch: only {} free ports in {lo}-{hi}", found.len());
        return false;
    }
    true
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
