//! A namespace's dump taken into the table, and the `time_wait`/`pressure` records it
//! yields.

use super::*;
use portwatch_schema::{Busiest, Ephemeral, PortCount, Pressure, RemoteCount, TimeWait};

/// How long before a dump an exit may still have left its sockets in it.
const EXIT_SLACK_NS: i128 = 1_000_000_000;

impl Processor {
    pub(super) fn reconcile(&mut self, s: &mut Snapshot) -> u64 {
        self.ns_paths.insert(s.ns.inode, s.ns.path.clone());
        if let Some(r) = s.port_range {
            self.port_ranges.insert(s.ns.inode, r);
        }
        let sockets = std::mem::take(&mut s.sockets);
        let healed = self.table.reconcile(sockets);
        // Sockets of processes that exited after this dump, or the owner scan before it,
        // began: the dump saw them alive. A process's sockets close a little after its exit
        // event (the kernel tears its memory down in between, milliseconds for a large one),
        // so exits shortly before count too: a dump in that gap still shows the socket, and
        // once the namespace is gone its inode number may be another's.
        let since = s.wall_ns.min(s.owners_ns) - EXIT_SLACK_NS;
        let gone: Vec<u32> = self
            .recent_exits
            .iter()
            .filter(|(_, t)| *t >= since)
            .map(|(p, _)| *p)
            .collect();
        for pid in gone {
            self.table.on_exit_in(s.ns.inode, pid);
        }
        self.check_services(s.ns.inode, s.wall_ns);
        self.reach_netns(s.ns.inode, true);
        healed
    }

    pub(super) fn snapshot(&mut self, s: &mut Snapshot) {
        let t = Instant::now();
        let drift_before = self.table.drift_healed;
        self.reconcile(s);
        if !s.report {
            // The start-up snapshot fills an empty table: that is not drift the events missed.
            self.table.drift_healed = drift_before;
        }
        // The cost of one pass on the processing thread, for `status` and the metrics.
        self.last_reconcile = (s.len, t.elapsed());
        if let Some(m) = &self.cfg.metrics {
            m.set_reconcile(s.len, self.last_reconcile.1);
            m.set_table_size(self.table.len());
            m.set_log_errors(self.out.log_errors());
        }
        if s.report {
            self.time_wait(s);
        }
    }

    /// One `time_wait` record per namespace with any TIME_WAIT, and `pressure` records when
    /// a destination takes more than the threshold of the ephemeral range.
    pub(super) fn time_wait(&mut self, s: &mut Snapshot) {
        let netns = s.ns.inode;
        let range = s.port_range.unwrap_or(DEFAULT_PORT_RANGE);
        let TwCounts {
            ages,
            total,
            by_local,
            by_remote,
            to_dst,
        } = std::mem::take(&mut s.counts);
        let size = f64::from(range.1.saturating_sub(range.0)) + 1.0;
        let busiest = to_dst
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|((a, p), n)| Busiest {
                addr: *a,
                port: *p,
                in_use: *n,
                pct: (*n as f64 * 1000.0 / size).round() / 10.0,
            });
        let st = self.tw.entry(netns).or_default();
        // Entered since the previous record's dump (since start-up for the first one), from
        // the sockets' own timers. A socket that entered and left TIME_WAIT between two
        // dumps (taken over early by a new connection) is in neither count.
        let span_ms = match st.last_wall_ns {
            Some(w) => (s.wall_ns - w).max(0) / 1_000_000,
            None => self.started.elapsed().as_millis() as i128,
        };
        let (entered, expired, counted_by) = match s.tw_events {
            // Since the previous record, or since the hooks were attached (start-up). A
            // count that went down was evicted from the kernel's map and starts over.
            Some((c, d)) => {
                let (pc, pd) = match st.last_events {
                    Some((pc, pd)) if pc <= c && pd <= d => (pc, pd),
                    _ => (0, 0),
                };
                st.last_events = Some((c, d));
                (c - pc, d - pd, Text::from_static("events"))
            }
            None => {
                let entered = ages.younger_than(span_ms as u64);
                (
                    entered,
                    (st.last_total + entered).saturating_sub(total),
                    Text::from_static("dumps"),
                )
            }
        };
        let had = st.last_total > 0;
        st.last_total = total;
        st.last_wall_ns = Some(s.wall_ns);
        let pressure = pressure_records(st, netns, range, &to_dst, self.cfg.pressure_pct);
        if total > 0 || had {
            let top = self.cfg.top;
            let r = TimeWait {
                netns,
                total,
                entered,
                expired,
                counted_by,
                by_local_port: top_n(
                    by_local
                        .into_iter()
                        .map(|(port, count)| PortCount { port, count }),
                    top,
                ),
                by_remote: top_n(
                    by_remote
                        .into_iter()
                        .map(|((addr, port), count)| RemoteCount { addr, port, count }),
                    top,
                ),
                ephemeral: Ephemeral {
                    range: [range.0, range.1],
                    busiest,
                },
            };
            self.emit_body(s.wall_ns, Body::TimeWait(r));
        }
        for p in pressure {
            self.emit_body(s.wall_ns, Body::Pressure(p));
        }
    }
}

/// `pressure` records: a destination taking at least `threshold` % of the namespace's
/// ephemeral range, once per crossing, re-armed when it falls below.
pub(super) fn pressure_records(
    st: &mut TwState,
    netns: u32,
    range: (u16, u16),
    to_dst: &HashMap<(IpAddr, u16), u64>,
    threshold: f64,
) -> Vec<Pressure> {
    let size = f64::from(range.1.saturating_sub(range.0)) + 1.0;
    let mut out = Vec::new();
    for ((a, p), n) in to_dst {
        let pct = *n as f64 * 100.0 / size;
        if pct < threshold {
            st.pressured.remove(&(*a, *p));
            continue;
        }
        if st.pressured.insert((*a, *p)) {
            out.push(Pressure {
                netns,
                addr: *a,
                port: *p,
                in_use: *n,
                range: [range.0, range.1],
                pct: (pct * 10.0).round() / 10.0,
                threshold_pct: threshold,
                hint: format!(
                    "{n} of {} local ports toward {} are taken; connects to it will fail with \
                     EADDRNOTAVAIL soon: reuse connections or widen net.ipv4.ip_local_port_range",
                    size as u64,
                    SocketAddr::new(*a, *p)
                ),
            });
        }
    }
    out
}
