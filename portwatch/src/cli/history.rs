//! `portwatch history PORT`: who held a port, from when to when, the conflicts in between,
//! and the gaps, read from the log (rotated and compressed files included).
//!
//! Built from `port` records (open/close) and `conflict` records. A close record carries
//! its open's time (`since`), so a holding whose open was rotated out of the log still
//! shows where it began. A holding still open at the end of the log runs to "now".

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    path::PathBuf,
};

use serde::Serialize;
use serde_json::Value;

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
        actor: Value,
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
    Conflict { ts: String, record: Value },
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
type OpenKey = (String, String, u64, Option<u64>);

/// Build the timeline of `port` from records in log order.
pub fn timeline(
    records: impl Iterator<Item = Value>,
    port: u16,
    proto: Option<&str>,
    since_ns: Option<i128>,
    until_ns: Option<i128>,
) -> Vec<Item> {
    let mut open: HashMap<OpenKey, Value> = HashMap::new();
    let mut items = Vec::new();
    let key = |v: &Value| -> OpenKey {
        (
            v["proto"].as_str().unwrap_or("").to_string(),
            v["addr"].as_str().unwrap_or("").to_string(),
            v["netns"].as_u64().unwrap_or(0),
            v["actor"]["pid"].as_u64(),
        )
    };
    let held = |open: &Value, to: Option<String>, close: Option<&Value>| {
        let last = close.unwrap_or(open);
        Item::Held {
            from: close
                .and_then(|c| c["since"].as_str())
                .or(open["ts"].as_str())
                .unwrap_or("")
                .to_string(),
            to,
            proto: last["proto"].as_str().unwrap_or("").to_string(),
            addr: last["addr"].as_str().unwrap_or("").to_string(),
            port: last["port"].as_u64().unwrap_or(0) as u16,
            netns: last["netns"].as_u64().unwrap_or(0),
            actor: last["actor"].clone(),
            restarts: close
                .and_then(|c| c["restarts"].as_u64())
                .filter(|r| *r > 0),
            ended_by: close.and_then(|c| c["reason"].as_str()).map(str::to_string),
        }
    };
    for v in records {
        if v["port"].as_u64() != Some(u64::from(port)) {
            continue;
        }
        if proto.is_some_and(|p| v["proto"].as_str() != Some(p)) {
            continue;
        }
        match (v["type"].as_str(), v["event"].as_str()) {
            (Some("port"), Some("open")) => {
                open.insert(key(&v), v);
            }
            (Some("port"), Some("close")) => {
                // A close whose pid differs from the open (a restart coalesced into it)
                // still ends the same holding: match by address without the pid then.
                let k = key(&v);
                let o = open.remove(&k).or_else(|| {
                    let k2 = open
                        .keys()
                        .find(|o| o.0 == k.0 && o.1 == k.1 && o.2 == k.2)
                        .cloned()?;
                    open.remove(&k2)
                });
                let to = v["ts"].as_str().map(str::to_string);
                items.push(held(o.as_ref().unwrap_or(&v), to, Some(&v)));
            }
            (Some("conflict"), _) => items.push(Item::Conflict {
                ts: v["ts"].as_str().unwrap_or("").to_string(),
                record: v,
            }),
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
            let who = match (actor["comm"].as_str(), actor["pid"].as_u64()) {
                (Some(c), Some(p)) => format!("{c}[{p}]"),
                _ => "an unknown process".into(),
            };
            let container = actor["container"]["name"]
                .as_str()
                .map(|c| format!(" in container {c}"))
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
            match serde_json::from_slice::<Value>(&l) {
                Ok(v) if v.is_object() => records.push(v),
                _ => malformed += 1,
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

    fn port(ev: &str, ts: &str, pid: u64, extra: Value) -> Value {
        let mut v = json!({"v":1,"type":"port","event":ev,"ts":ts,"proto":"tcp","family":"ipv4",
            "addr":"0.0.0.0","port":8080,"netns":1,"actor":{"pid":pid,"comm":"nginx"}});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    #[test]
    fn holdings_conflicts_and_gaps_in_order() {
        let recs = vec![
            port("open", "2026-11-30T03:00:00.000000000Z", 10, json!({})),
            json!({"type":"conflict","ts":"2026-11-30T03:05:00.000000000Z","port":8080,"proto":"tcp","op":"bind"}),
            port(
                "close",
                "2026-11-30T03:10:00.000000000Z",
                10,
                json!({"since":"2026-11-30T03:00:00.000000000Z","reason":"close","restarts":0}),
            ),
            port("open", "2026-11-30T03:12:00.000000000Z", 11, json!({})),
            // Another port: ignored.
            json!({"type":"port","event":"open","ts":"2026-11-30T03:01:00.000000000Z","port":9090,"proto":"tcp"}),
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
                assert_eq!(actor["pid"], 11);
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
