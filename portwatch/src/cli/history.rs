//! `portwatch history PORT`: who held a port, from when to when, the conflicts in between,
//! and the gaps, read from the log (rotated and compressed files included).
//!
//! Built from `port` records (open/close) and `conflict` records. A close record carries
//! its open's time (`since`), so a holding whose open was rotated out of the log still
//! shows where it began. A holding still open at the end of the log runs to "now".

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    net::IpAddr,
    path::PathBuf,
};

use portwatch_schema::{Body, Port, PortActor, PortEvent, Proto, Record};
use serde::Serialize;

use crate::{
    cli::render::{human, Style},
    cli::tail,
    cli::HistoryArgs,
    error::{Error, Result},
    kernel::decode::Clock,
};

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    /// The port was held by one socket from `from` to `to` (null: still held at the end).
    Held {
        from: String,
        to: Option<String>,
        proto: String,
        addr: String,
        port: u16,
        netns: u64,
        actor: Option<Box<PortActor>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        restarts: Option<u64>,
        /// `close` or `gone` when it ended.
        #[serde(skip_serializing_if = "Option::is_none")]
        ended_by: Option<String>,
    },
    /// Nobody held it (as far as the log shows) between two holdings.
    Free {
        from: String,
        to: String,
        seconds: f64,
    },
    /// A conflict on the port: the record as logged.
    Conflict { ts: String, record: Box<Record> },
}

impl Item {
    fn start(&self) -> &str {
        match self {
            Item::Held { from, .. } | Item::Free { from, .. } => from,
            Item::Conflict { ts, .. } => ts,
        }
    }
}

/// Holdings keyed by what identifies one socket's time on the port.
type OpenKey = (Proto, IpAddr, u32, Option<u32>);

fn key(p: &Port) -> OpenKey {
    (
        p.proto.clone(),
        p.addr,
        p.netns,
        p.actor.as_ref().map(|a| a.pid),
    )
}

/// One holding: from its open (or the close's `since`, when the open was rotated out) to
/// `to`.
fn held(open: &(String, Port), to: Option<String>, close: Option<&Port>) -> Item {
    let last = close.unwrap_or(&open.1);
    Item::Held {
        from: close
            .and_then(|c| c.since.clone())
            .unwrap_or_else(|| open.0.clone()),
        to,
        proto: last.proto.to_string(),
        addr: last.addr.to_string(),
        port: last.port,
        netns: u64::from(last.netns),
        actor: last.actor.clone().map(Box::new),
        restarts: close.and_then(|c| c.restarts).filter(|r| *r > 0),
        ended_by: close.and_then(|c| c.reason.as_deref().map(str::to_owned)),
    }
}

/// Build the timeline of `port` from records in log order.
pub fn timeline(
    records: impl Iterator<Item = Record>,
    port: u16,
    proto: Option<&str>,
    since_ns: Option<i128>,
    until_ns: Option<i128>,
) -> Vec<Item> {
    let mut open: HashMap<OpenKey, (String, Port)> = HashMap::new();
    let mut items = Vec::new();
    for r in records {
        let ts = r.ts().to_string();
        match r.body {
            Body::Port(p) if p.port == port && proto.is_none_or(|x| p.proto == x) => {
                if p.event == PortEvent::Open {
                    open.insert(key(&p), (ts, p));
                    continue;
                }
                // A close whose pid differs from the open (a restart coalesced into it)
                // still ends the same holding: match by address without the pid then.
                let k = key(&p);
                let o = open.remove(&k).or_else(|| {
                    let k2 = open
                        .keys()
                        .find(|o| o.0 == k.0 && o.1 == k.1 && o.2 == k.2)
                        .cloned()?;
                    open.remove(&k2)
                });
                let this = (ts.clone(), p);
                items.push(held(o.as_ref().unwrap_or(&this), Some(ts), Some(&this.1)));
            }
            Body::Conflict(ref c) if c.port == port && proto.is_none_or(|x| c.proto == x) => {
                items.push(Item::Conflict {
                    ts,
                    record: Box::new(r),
                });
            }
            _ => {}
        }
    }
    items.extend(open.values().map(|o| held(o, None, None)));
    let end = |i: &Item| -> Option<i128> {
        match i {
            Item::Held { to: Some(t), .. } => tail::ts_ns(t),
            Item::Held { to: None, .. } => Some(i128::MAX),
            Item::Free { to, .. } => tail::ts_ns(to),
            Item::Conflict { ts, .. } => tail::ts_ns(ts),
        }
    };
    items.retain(|i| {
        let s = tail::ts_ns(i.start()).unwrap_or(0);
        let e = end(i).unwrap_or(s);
        since_ns.is_none_or(|t| e >= t) && until_ns.is_none_or(|t| s <= t)
    });
    items.sort_by_key(|i| {
        (
            tail::ts_ns(i.start()).unwrap_or(0),
            matches!(i, Item::Conflict { .. }),
        )
    });
    with_gaps(items)
}

/// Insert `Free` items where no holding covers the time between two holdings.
fn with_gaps(items: Vec<Item>) -> Vec<Item> {
    let mut out = Vec::with_capacity(items.len());
    let mut covered_to: Option<(i128, String)> = None;
    for i in items {
        if let Item::Held { from, to, .. } = &i {
            let start = tail::ts_ns(from).unwrap_or(0);
            if let Some((end, end_s)) = &covered_to {
                if start > *end {
                    out.push(Item::Free {
                        from: end_s.clone(),
                        to: from.clone(),
                        seconds: ((start - end) as f64 / 1e6).round() / 1e3,
                    });
                }
            }
            let this_end = to.as_deref().map_or(Some((i128::MAX, String::new())), |t| {
                tail::ts_ns(t).map(|n| (n, t.to_string()))
            });
            if let Some(e) = this_end {
                if covered_to.as_ref().is_none_or(|c| e.0 > c.0) {
                    covered_to = Some(e);
                }
            }
        }
        out.push(i);
    }
    out
}

fn short(ts: &str) -> String {
    // 2026-11-25T08:31:31.123456789Z -> 2026-11-25 08:31:31.123
    if ts.len() >= 23 {
        format!("{} {}", &ts[..10], &ts[11..23])
    } else {
        ts.to_string()
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else {
        humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
    }
}

fn render(i: &Item, st: &Style, now_ns: i128) -> String {
    match i {
        Item::Held {
            from,
            to,
            proto,
            addr,
            port,
            netns,
            actor,
            restarts,
            ended_by,
        } => {
            let who = match actor {
                Some(a) => format!("{}[{}]", a.comm, a.pid),
                None => "an unknown process".into(),
            };
            let container = actor
                .as_ref()
                .and_then(|a| a.container.as_ref())
                .map(|c| format!(" in container {}", c.name))
                .unwrap_or_default();
            let start = tail::ts_ns(from).unwrap_or(now_ns);
            let stop = to.as_deref().and_then(tail::ts_ns).unwrap_or(now_ns);
            let sock = if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            };
            let mut s = format!(
                "{} .. {}  {}  {proto} {sock} by {who}{container} (netns {netns}), {}",
                short(from),
                to.as_deref()
                    .map_or_else(|| "now                    ".into(), short),
                st.paint("32", "HELD"),
                duration((stop - start) as f64 / 1e9),
            );
            if let Some(r) = restarts {
                s.push_str(&format!(", {r} quick restarts"));
            }
            if ended_by.as_deref() == Some("gone") {
                s.push_str(", ended when its process or container went away");
            }
            s
        }
        Item::Free { from, to, seconds } => format!(
            "{} .. {}  {}  nobody held it, {}",
            short(from),
            short(to),
            st.paint("2", "FREE"),
            duration(*seconds)
        ),
        Item::Conflict { record, .. } => human(record, st),
    }
}

pub fn run(a: &HistoryArgs) -> Result<u8> {
    let path = a
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::output::sink::DEFAULT_LOG));
    if !path.exists() {
        return Err(Error::Io {
            what: "opening the log",
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} does not exist; is the agent writing elsewhere (--log-file)? Give that \
                     path after the port",
                    path.display()
                ),
            ),
        });
    }
    let mut malformed = 0u64;
    let mut records = Vec::new();
    for f in tail::files(&path) {
        let r = match tail::open_any(&f) {
            Ok(r) => r,
            Err(e) if f == path => {
                return Err(Error::Io {
                    what: "reading the log",
                    source: e,
                })
            }
            Err(e) => {
                eprintln!("portwatch: warning: skipping {}: {e}", f.display());
                continue;
            }
        };
        for l in r.split(b'\n') {
            let Ok(l) = l else {
                malformed += 1;
                break;
            };
            if l.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            // Only lines about this port are parsed whole.
            let needle = format!("\"port\":{}", a.port);
            if !l.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                continue;
            }
            match serde_json::from_slice::<Record>(&l) {
                Ok(r) => records.push(r),
                Err(_) => malformed += 1,
            }
        }
    }
    let items = timeline(
        records.into_iter(),
        a.port,
        a.proto.as_deref(),
        a.since,
        a.until,
    );
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let st = Style::for_stdout();
    let now = Clock::now_wall_ns();
    let io = |source| Error::Io {
        what: "writing the history",
        source,
    };
    if items.is_empty() && !a.json {
        writeln!(
            out,
            "no holder and no conflict of port {} in {}{}",
            a.port,
            path.display(),
            if a.since.is_some() || a.until.is_some() {
                " in that window"
            } else {
                ""
            }
        )
        .map_err(io)?;
    }
    for i in &items {
        if a.json {
            serde_json::to_writer(&mut out, i).map_err(|e| io(e.into()))?;
            writeln!(out).map_err(io)?;
        } else {
            writeln!(out, "{}", render(i, &st, now)).map_err(io)?;
        }
    }
    out.flush().map_err(io)?;
    if malformed > 0 {
        eprintln!("portwatch: skipped {malformed} malformed lines");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::decode::parse_when;
    use serde_json::json;

    fn port(ev: &str, ts: &str, pid: u64, extra: serde_json::Value) -> Record {
        let mut v = json!({"v":1,"type":"port","event":ev,"ts":ts,"host":"h","proto":"tcp",
            "family":"ipv4","addr":"0.0.0.0","port":8080,"netns":1,
            "actor":{"pid":pid,"comm":"nginx","cmdline":null,"uid":0}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn conflict(ts: &str) -> Record {
        serde_json::from_value(
            json!({"v":1,"type":"conflict","ts":ts,"host":"h","op":"bind",
            "error":"EADDRINUSE","errno":98,"proto":"tcp","family":"ipv4","addr":"0.0.0.0",
            "port":8080,"netns":1,"fd":3,"actor":{"pid":12,"tid":12,"comm":"py","uid":0,
            "cmdline":null,"cgroup_id":1},"holders":[],"cause":"unknown","hint":"","count":1,
            "first_ts":ts,"last_ts":ts}),
        )
        .unwrap()
    }

    #[test]
    fn holdings_conflicts_and_gaps_in_order() {
        let recs = vec![
            port("open", "2026-11-30T03:00:00.000000000Z", 10, json!({})),
            conflict("2026-11-30T03:05:00.000000000Z"),
            port(
                "close",
                "2026-11-30T03:10:00.000000000Z",
                10,
                json!({"since":"2026-11-30T03:00:00.000000000Z","reason":"close","restarts":0}),
            ),
            port("open", "2026-11-30T03:12:00.000000000Z", 11, json!({})),
            // Another port: ignored.
            {
                let mut r = port("open", "2026-11-30T03:01:00.000000000Z", 13, json!({}));
                if let Body::Port(p) = &mut r.body {
                    p.port = 9090;
                }
                r
            },
        ];
        let t = timeline(recs.into_iter(), 8080, None, None, None);
        let kinds: Vec<&str> = t
            .iter()
            .map(|i| match i {
                Item::Held { .. } => "held",
                Item::Free { .. } => "free",
                Item::Conflict { .. } => "conflict",
            })
            .collect();
        assert_eq!(kinds, ["held", "conflict", "free", "held"]);
        match &t[2] {
            Item::Free { seconds, .. } => assert_eq!(*seconds, 120.0),
            _ => unreachable!(),
        }
        match &t[3] {
            Item::Held { to, actor, .. } => {
                assert_eq!(*to, None, "still held at the end of the log");
                assert_eq!(actor.as_ref().map(|a| a.pid), Some(11));
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_close_whose_open_was_rotated_out_starts_at_its_since() {
        let recs = vec![port(
            "close",
            "2026-11-30T05:00:00.000000000Z",
            10,
            json!({"since":"2026-11-30T01:00:00.000000000Z","reason":"gone","restarts":3}),
        )];
        let t = timeline(recs.into_iter(), 8080, Some("tcp"), None, None);
        assert_eq!(t.len(), 1);
        match &t[0] {
            Item::Held {
                from,
                restarts,
                ended_by,
                ..
            } => {
                assert_eq!(from, "2026-11-30T01:00:00.000000000Z");
                assert_eq!(*restarts, Some(3));
                assert_eq!(ended_by.as_deref(), Some("gone"));
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_window_keeps_what_overlaps_it() {
        let recs = vec![
            port("open", "2026-11-30T01:00:00.000000000Z", 10, json!({})),
            port(
                "close",
                "2026-11-30T02:00:00.000000000Z",
                10,
                json!({"since":"2026-11-30T01:00:00.000000000Z"}),
            ),
            port("open", "2026-11-30T04:00:00.000000000Z", 11, json!({})),
        ];
        let since = tail::ts_ns("2026-11-30T01:30:00Z");
        let until = tail::ts_ns("2026-11-30T03:00:00Z");
        let t = timeline(recs.into_iter(), 8080, None, since, until);
        assert_eq!(t.len(), 1, "{t:?}");
        let udp = timeline(
            vec![port(
                "open",
                "2026-11-30T01:00:00.000000000Z",
                10,
                json!({}),
            )]
            .into_iter(),
            8080,
            Some("udp"),
            None,
            None,
        );
        assert!(udp.is_empty());
    }

    #[test]
    fn when_parses_durations_and_times() {
        assert_eq!(
            parse_when("2026-11-30T03:12:00Z").unwrap(),
            tail::ts_ns("2026-11-30T03:12:00Z").unwrap()
        );
        assert!(parse_when("1d").unwrap() < Clock::now_wall_ns());
        assert!(parse_when("yesterday-ish").is_err());
    }
}
