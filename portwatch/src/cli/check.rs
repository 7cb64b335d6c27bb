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
