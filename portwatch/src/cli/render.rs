//! Records for people: the readable one-line form `tail`, `attach` and `history` print.

use std::io::IsTerminal;

use portwatch_schema::{Actor, Body, Conflict, ConflictActor, Record};

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

fn addr_port(a: impl std::fmt::Display, p: u16) -> String {
    let a = a.to_string();
    if a.contains(':') {
        format!("[{a}]:{p}")
    } else {
        format!("{a}:{p}")
    }
}

/// `comm[pid] (container)`, from what a record knows of a process.
pub(super) fn who(pid: Option<u32>, comm: Option<&str>, container: Option<&str>) -> String {
    let mut s = match (pid, comm) {
        (Some(p), Some(c)) => format!("{c}[{p}]"),
        (Some(p), None) => format!("pid {p}"),
        _ => String::new(),
    };
    if let Some(c) = container {
        s.push_str(&format!(" ({c})"));
    }
    s
}

fn actor(a: &Actor) -> String {
    who(
        Some(a.pid),
        Some(&a.comm),
        a.container.as_ref().map(|c| &*c.name),
    )
}

/// One readable line for a log line; a line the schema cannot read is shown as it is.
pub fn human_line(line: &str, st: &Style) -> String {
    match Record::parse(line) {
        Ok(r) if !matches!(r.body, Body::Unknown) => human(&r, st),
        _ => line.trim_end().to_string(),
    }
}

/// One readable line for a record.
pub fn human(r: &Record, st: &Style) -> String {
    let ts = r.ts();
    // 2026-11-25T08:31:31.123456789Z -> 2026-11-25 08:31:31.123
    let t = if ts.len() >= 23 {
        format!("{} {}", &ts[..10], &ts[11..23])
    } else {
        ts.to_string()
    };
    format!("{} {}", st.paint("2", &t), body(r, st))
}

/// What follows the time on a record's readable line.
fn body(r: &Record, st: &Style) -> String {
    let ty = r.ty();
    match &r.body {
        Body::Conflict(c) => conflict_line(c, st),
        Body::Bind(o) | Body::Listen(o) | Body::Connect(o) | Body::Close(o) => format!(
            "{} {} {} {} by {} netns {}",
            st.paint("36", ty.as_str()),
            o.result,
            o.proto,
            addr_port(o.addr, o.port),
            actor(&o.actor),
            o.netns
        ),
        Body::Port(p) => format!(
            "{} {} {} {} by {} netns {}{}",
            st.paint("35", "port"),
            p.event,
            p.proto,
            addr_port(p.addr, p.port),
            p.actor
                .as_ref()
                .map(|a| who(
                    Some(a.pid),
                    Some(&a.comm),
                    a.container.as_ref().map(|c| &*c.name)
                ))
                .unwrap_or_default(),
            p.netns,
            match p.held_s {
                Some(h) => format!(" held {h}s ({})", p.reason.as_deref().unwrap_or("")),
                None => String::new(),
            }
        ),
        Body::Exit(x) => format!(
            "{} {} netns {}",
            st.paint("36", "exit"),
            actor(&x.actor),
            x.netns
        ),
        Body::TcpState(t) => format!(
            "{} {} {} -> {} peer {}:{}",
            st.paint("36", "tcp_state"),
            addr_port(t.addr, t.port),
            t.old_state,
            t.new_state,
            t.raddr,
            t.rport
        ),
        Body::Lost(l) => format!(
            "{} {} events (kernel {}, agent {}) {}",
            st.paint("1;35", "LOST"),
            l.count,
            l.kernel,
            l.agent,
            serde_json::to_string(&l.by_kind).unwrap_or_default()
        ),
        Body::Missed(m) => format!(
            "{} {} records (this client read too slowly)",
            st.paint("1;35", "MISSED"),
            m.count
        ),
        Body::TimeWait(t) => format!(
            "{} netns {} total {} (+{} -{}) top ports {}",
            st.paint("33", "time_wait"),
            t.netns,
            t.total,
            t.entered,
            t.expired,
            serde_json::to_string(&t.by_local_port).unwrap_or_default()
        ),
        Body::Pressure(p) => format!(
            "{} netns {} {}:{} {}% of ephemeral ports -- {}",
            st.paint("1;33", "PRESSURE"),
            p.netns,
            p.addr,
            p.port,
            p.pct,
            p.hint
        ),
        Body::Agent(a) => format!(
            "{} {}{}",
            st.paint("32", "agent"),
            a.event,
            a.reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        Body::Docker(d) => format!(
            "{} {} {}",
            st.paint("34", "docker"),
            d.event,
            d.container.as_ref().map_or("", |c| &c.name)
        ),
        Body::Unknown => serde_json::to_string(r).unwrap_or_default(),
    }
}

/// `CONFLICT x3 bind tcp 0.0.0.0:8080 by pid 42 (nginx) netns 4026531840 cause=listener
/// held by ... -- hint`.
fn conflict_line(c: &Conflict, st: &Style) -> String {
    let holders: Vec<String> = c
        .holders
        .iter()
        .map(|h| match h.count {
            Some(n) => format!("{n}x TIME_WAIT"),
            None => format!(
                "{} {} {}",
                who(
                    h.pid,
                    h.comm.as_deref(),
                    h.container.as_ref().map(|c| &*c.name)
                ),
                h.state,
                addr_port(h.addr, h.port)
            ),
        })
        .collect();
    let by = match &c.actor {
        ConflictActor::Process(a) => actor(a),
        ConflictActor::Container { container } => who(None, None, Some(&container.name)),
    };
    format!(
        "{}{} {} {} {} by {} netns {} cause={}{}{}",
        st.paint("1;31", "CONFLICT"),
        if c.count > 1 {
            format!(" x{}", c.count)
        } else {
            String::new()
        },
        c.op,
        c.proto,
        st.paint("1", &addr_port(c.addr, c.port)),
        by,
        c.netns,
        st.paint("33", c.cause.as_str()),
        if holders.is_empty() {
            String::new()
        } else {
            format!(" held by {}", holders.join(", "))
        },
        if c.hint.is_empty() {
            String::new()
        } else {
            format!(" -- {}", c.hint)
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_conflict_line() {
        let line = r#"{"v":1,"ts":"2026-11-25T08:31:31.123456789Z","type":"conflict","host":"h","op":"bind","error":"EADDRINUSE","errno":98,"proto":"tcp","family":"ipv4","addr":"127.0.0.1","port":8080,
                "netns":1,"fd":3,"actor":{"pid":5,"tid":5,"comm":"py","uid":0,"cmdline":null,"cgroup_id":1},"cause":"listener","hint":"stop it","count":1,"first_ts":"","last_ts":"",
                "holders":[{"pid":4,"comm":"nginx","state":"LISTEN","proto":"tcp","addr":"0.0.0.0","port":8080,"overlap":"wildcard"}]}"#;
        let s = human_line(line, &Style { color: false });
        assert_eq!(
            s,
            "2026-11-25 08:31:31.123 CONFLICT bind tcp 127.0.0.1:8080 by py[5] netns 1 cause=listener held by nginx[4] LISTEN 0.0.0.0:8080 -- stop it"
        );
    }

    #[test]
    fn a_line_the_schema_cannot_read_is_shown_as_it_is() {
        let st = Style { color: false };
        assert_eq!(
            human_line("{\"type\":\"future\"}\n", &st),
            "{\"type\":\"future\"}"
        );
        assert_eq!(
            human_line("{\"type\":\"exit\"}", &st),
            "{\"type\":\"exit\"}"
        );
    }
}
