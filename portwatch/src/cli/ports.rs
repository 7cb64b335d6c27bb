//! `portwatch ports`: the port table, from the agent or from a snapshot of its own.

use std::{
    io::{BufRead, Write},
    path::Path,
};

use serde_json::Value;

use crate::{
    cli::PortsArgs,
    control::{self, Filter, PortRow, Request},
    error::{Error, Result},
    host::diag,
    kernel::decode::Clock,
    state::table::{NsSockets, PortTable},
};

/// The table as a one-shot snapshot (no agent running): sock_diag of every namespace plus
/// the /proc inode map.
pub(super) fn snapshot_table() -> (PortTable, usize) {
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
}
