//! The port table as the rows `portwatch ports` shows, for the agent's answer and for the
//! one-shot snapshot alike.

use std::collections::HashMap;

use crate::{
    control::protocol::{Filter, PortRow},
    kernel::decode::Clock,
    state::table::{Entry, Placement, PortTable},
};

/// The table as `ports` rows: the sockets `filter` selects, each placed (container, stale)
/// by `place`, then TIME_WAIT folded to one row per port with its count.
pub fn table_rows(
    t: &PortTable,
    filter: &Filter,
    place: &mut dyn FnMut(u32, &Entry) -> Option<Placement>,
) -> Vec<PortRow> {
    let mut rows: Vec<PortRow> = t
        .rows()
        .filter(|(_, e)| filter.port.is_none_or(|p| e.local.port() == p))
        .filter(|(_, e)| {
            filter
                .pid
                .is_none_or(|p| e.owner.as_ref().is_some_and(|o| o.pid == p))
        })
        .map(|(ns, e)| PortRow {
            proto: e.proto.name().into(),
            addr: e.local.ip().to_string(),
            port: e.local.port(),
            state: e.state_name().into(),
            pid: e.owner.as_ref().map(|o| o.pid),
            comm: e.owner.as_ref().map(|o| o.comm.to_string()),
            netns: ns,
            count: None,
            ..PortRow::placed(place(ns, e))
        })
        .collect();
    add_time_wait_rows(&mut rows, t, filter);
    fold_time_wait(&mut rows);
    rows
}

/// The table's TIME_WAIT sockets (kept as counts per port) as rows, for `ports`.
pub fn add_time_wait_rows(rows: &mut Vec<PortRow>, t: &PortTable, filter: &Filter) {
    let now = Clock::now_wall_ns();
    rows.extend(
        t.time_wait_rows(now)
            .filter(|r| filter.port.is_none_or(|p| r.2 == p))
            .map(|(ns, addr, port, n)| PortRow {
                proto: "tcp".into(),
                addr: addr.to_string(),
                port,
                state: "TIME_WAIT".into(),
                pid: None,
                comm: None,
                container: None,
                netns: ns,
                count: Some(n as u32),
                stale: None,
            }),
    );
}

/// TIME_WAIT sockets are many and ownerless: show one row per port with a count.
pub fn fold_time_wait(rows: &mut Vec<PortRow>) {
    let mut tw: HashMap<(u32, String, u16), u32> = HashMap::new();
    rows.retain(|r| {
        if r.state == "TIME_WAIT" {
            *tw.entry((r.netns, r.addr.clone(), r.port)).or_default() += r.count.unwrap_or(1);
            false
        } else {
            true
        }
    });
    for ((netns, addr, port), n) in tw {
        rows.push(PortRow {
            proto: "tcp".into(),
            addr,
            port,
            state: "TIME_WAIT".into(),
            pid: None,
            comm: None,
            container: None,
            netns,
            count: Some(n),
            stale: None,
        });
    }
    rows.sort_by(|a, b| {
        (a.port, &a.proto, a.netns, &a.state).cmp(&(b.port, &b.proto, b.netns, &b.state))
    });
}
