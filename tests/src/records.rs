//! Reading records: by type and port, from log files and attach output, and their timestamps.

use super::*;

/// Records of one type for one port.
pub fn of_type<'a>(lines: &'a [Value], ty: &str, port: u16) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|v| v["type"] == ty && v["port"] == port)
        .collect()
}

/// The `port` at a record's top level, for the types that have one (what `of_type` matches).
pub fn port_of(r: &Record) -> Option<u16> {
    match &r.body {
        Body::Conflict(c) => Some(c.port),
        Body::Port(p) => Some(p.port),
        Body::Bind(s) | Body::Listen(s) | Body::Connect(s) | Body::Close(s) => Some(s.port),
        Body::TcpState(t) => Some(t.port),
        Body::Pressure(p) => Some(p.port),
        _ => None,
    }
}

/// `of_type`, typed: records of one type for one port.
pub fn records_of(records: &[Record], ty: schema::Type, port: u16) -> Vec<&Record> {
    records
        .iter()
        .filter(|r| r.ty() == ty && port_of(r) == Some(port))
        .collect()
}

pub fn assert_rfc3339(ts: &Value) {
    let s = ts.as_str().expect("ts is a string");
    // 2026-11-25T08:31:31.123456789Z
    let ok = s.len() >= 27
        && s.ends_with('Z')
        && s.as_bytes()[4] == b'-'
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && (6..=9).contains(&(s.len() - 21))
        && s[20..s.len() - 1].bytes().all(|b| b.is_ascii_digit());
    assert!(
        ok,
        "ts {s:?} is not RFC 3339 UTC with 6-9 fractional digits"
    );
}

// ---- typed records read from text ----

/// Every line of `text` read into the typed schema: a log file, or the output of
/// `portwatch attach --json` or `tail --json` (agent records, one per line). A line that does
/// not read, or is of a type the schema does not know, fails the test, as it does on stdout.
pub fn records_in(text: &[u8]) -> Vec<Record> {
    String::from_utf8_lossy(text)
        .lines()
        .map(|l| match Record::parse(l) {
            Ok(r) if !matches!(r.body, Body::Unknown) => r,
            Ok(_) => panic!("a record of a type the typed schema does not know: {l}"),
            Err(e) => panic!("not a record of the typed schema ({e}): {l}"),
        })
        .collect()
}

/// `records_in` of a file the agent wrote (its log).
pub fn log_records(path: &std::path::Path) -> Vec<Record> {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    records_in(&text)
}

/// One line of an attach stream (the control socket's answer to `{"cmd":"attach"}`): an
/// agent record, or the attach protocol's own error line (`{"error": ...}`, no `type`), which
/// is no record and stays JSON.
#[derive(Debug)]
pub enum AttachLine {
    Record(Box<Record>),
    Error(Value),
}

/// Reads one attach line; a line that is neither a record nor an error line fails the test.
pub fn attach_line(line: &str) -> AttachLine {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("attach line is not JSON ({e}): {line}"));
    if v.get("type").is_none() && v["error"].is_string() {
        return AttachLine::Error(v);
    }
    let mut r = records_in(line.as_bytes());
    assert_eq!(r.len(), 1, "one record per attach line: {line}");
    AttachLine::Record(Box::new(r.remove(0)))
}

/// The record is a conflict on `port`.
pub fn is_conflict_on(r: &Record, port: u16) -> bool {
    r.conflict().is_some_and(|c| c.port == port)
}

/// The record is the agent's own `event`.
pub fn is_agent_event(r: &Record, event: schema::AgentEvent) -> bool {
    r.agent().is_some_and(|a| a.event == event)
}

/// A conflict record's body; fails the test on any other record.
pub fn conflict_body(r: &Record) -> &schema::Conflict {
    r.conflict()
        .unwrap_or_else(|| panic!("not a conflict: {r:?}"))
}

/// A conflict's first holder; fails the test when it has none.
pub fn first_holder(c: &schema::Conflict) -> &schema::Holder {
    c.holders
        .first()
        .unwrap_or_else(|| panic!("no holders: {c:?}"))
}
