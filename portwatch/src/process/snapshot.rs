//! A namespace's sock_diag dump, prepared off the processing thread: the sockets in the
//! table's layout, and the TCP counts the `time_wait` and `pressure` records need.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    host::diag,
    state::table::{self, NsSockets, Owner, Proto},
};

/// One namespace's sock_diag dump, prepared by `Snapshot::new` on the thread that took it
/// (everything but matching it against the table), so the processing thread spends little
/// time on it and the raw dump is freed before it is sent.
pub struct Snapshot {
    pub ns: diag::Namespace,
    /// The sockets in the table's layout; the reconciliation takes them.
    pub(super) sockets: NsSockets,
    /// Sockets in the dump, TIME_WAIT included.
    pub(super) len: usize,
    /// What `time_wait`/`pressure` records need from the dump.
    pub(super) counts: TwCounts,
    pub(super) port_range: Option<(u16, u16)>,
    /// Emit `time_wait`/`pressure` records for it (false for the start-up snapshot).
    pub(super) report: bool,
    pub(super) wall_ns: i128,
    /// When the owner scan behind it began (wall ns): a pass scans every process's fds
    /// once, before its dumps.
    pub owners_ns: i128,
    /// The kernel's cumulative TIME_WAIT (created, destroyed) in this namespace, read right
    /// after the dump, when the TIME_WAIT hooks are attached.
    pub tw_events: Option<(u64, u64)>,
}

impl Snapshot {
    /// A snapshot of a dump already read; `owners` maps socket inodes to their process
    /// (`diag::socket_owners`).
    pub fn new(
        ns: diag::Namespace,
        entries: &[diag::SockEntry],
        owners: Arc<HashMap<u64, Arc<Owner>>>,
        port_range: Option<(u16, u16)>,
        report: bool,
        wall_ns: i128,
    ) -> Snapshot {
        let mut b = SnapshotBuilder::new(ns.inode, owners, report, wall_ns);
        for d in entries {
            diag::Sink::push(&mut b, *d);
        }
        b.finish(ns, port_range)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// Builds a `Snapshot` while sock_diag is read (`diag::dump_into`), so that the raw dump
/// never is in memory as a whole.
pub struct SnapshotBuilder {
    sockets: NsSockets,
    owners: Arc<HashMap<u64, Arc<Owner>>>,
    len: usize,
    /// (local port, remote) of each TIME_WAIT socket, which the table keeps no remote of,
    /// for the `time_wait` record; only when it is reported.
    tw: Option<Vec<(u16, IpAddr, u16)>>,
    /// How long each TIME_WAIT socket has been in TIME_WAIT, from its timer; only when
    /// reported.
    tw_ages: TwAges,
    report: bool,
    wall_ns: i128,
}

impl diag::Sink for SnapshotBuilder {
    fn push(&mut self, d: diag::SockEntry) {
        self.len += 1;
        if let Some(tw) = &mut self.tw {
            if d.proto == Proto::Tcp && d.state == table::TCP_TIME_WAIT {
                tw.push((d.local.port(), d.remote.ip(), d.remote.port()));
                self.tw_ages.add(d.expires_ms);
            }
        }
        let owners = &self.owners;
        self.sockets.push(&d, &|ino| owners.get(&ino).cloned());
    }
}

impl SnapshotBuilder {
    /// `report`: the snapshot is to emit `time_wait`/`pressure` records (not at start-up).
    pub fn new(
        netns: u32,
        owners: Arc<HashMap<u64, Arc<Owner>>>,
        report: bool,
        wall_ns: i128,
    ) -> SnapshotBuilder {
        SnapshotBuilder {
            sockets: NsSockets::new(netns, wall_ns),
            owners,
            len: 0,
            tw: report.then(Vec::new),
            tw_ages: TwAges::default(),
            report,
            wall_ns,
        }
    }

    pub fn finish(mut self, ns: diag::Namespace, port_range: Option<(u16, u16)>) -> Snapshot {
        self.sockets.finish();
        let counts = match self.tw.take() {
            Some(tw) => {
                let tcp = self
                    .sockets
                    .entries()
                    .filter(|e| e.proto == Proto::Tcp)
                    .map(|e| (e.state, e.local.port(), e.remote.ip(), e.remote.port()))
                    .chain(
                        tw.iter()
                            .map(|&(lp, ip, rp)| (table::TCP_TIME_WAIT, lp, ip, rp)),
                    );
                let mut c = TwCounts::of(tcp, port_range.unwrap_or(DEFAULT_PORT_RANGE));
                c.ages = std::mem::take(&mut self.tw_ages);
                c
            }
            None => TwCounts::default(),
        };
        Snapshot {
            ns,
            sockets: self.sockets,
            len: self.len,
            counts,
            port_range,
            report: self.report,
            wall_ns: self.wall_ns,
            owners_ns: self.wall_ns,
            tw_events: None,
        }
    }
}

/// Linux's default net.ipv4.ip_local_port_range.
pub(super) const DEFAULT_PORT_RANGE: (u16, u16) = (32768, 60999);

/// Linux keeps a socket in TIME_WAIT for a fixed 60 s (TCP_TIMEWAIT_LEN).
pub(super) const TIME_WAIT_MS: u32 = 60_000;
/// Resolution of `TwAges`.
pub(super) const AGE_STEP_MS: u32 = 100;

/// TIME_WAIT sockets by time spent in TIME_WAIT, in 100 ms steps. The kernel reports each
/// one's remaining time (idiag_expires) and the total is fixed, so this tells how many
/// entered TIME_WAIT within any recent span: the `entered` of a `time_wait` record, with no
/// event per connection.
#[derive(Clone)]
pub(super) struct TwAges(pub(super) [u32; (TIME_WAIT_MS / AGE_STEP_MS) as usize + 1]);

impl Default for TwAges {
    fn default() -> TwAges {
        TwAges([0; (TIME_WAIT_MS / AGE_STEP_MS) as usize + 1])
    }
}

impl TwAges {
    pub(super) fn add(&mut self, expires_ms: u32) {
        let age = TIME_WAIT_MS.saturating_sub(expires_ms);
        self.0[(age / AGE_STEP_MS) as usize] += 1;
    }

    /// Sockets that entered TIME_WAIT less than `span_ms` before the dump.
    pub(super) fn younger_than(&self, span_ms: u64) -> u64 {
        let steps = span_ms
            .div_ceil(u64::from(AGE_STEP_MS))
            .min(self.0.len() as u64);
        self.0[..steps as usize].iter().map(|&n| u64::from(n)).sum()
    }
}

/// TCP sockets of one namespace counted for the `time_wait` and `pressure` records.
#[derive(Default)]
pub(super) struct TwCounts {
    /// TIME_WAIT sockets by age.
    pub(super) ages: TwAges,
    /// TIME_WAIT sockets.
    pub(super) total: u64,
    /// Server-side TIME_WAIT (local port listened on, or not ephemeral) by local port.
    pub(super) by_local: HashMap<u16, u64>,
    /// Client-side TIME_WAIT by destination.
    pub(super) by_remote: HashMap<(IpAddr, u16), u64>,
    /// Local ephemeral ports in use toward each destination, in any TCP state.
    pub(super) to_dst: HashMap<(IpAddr, u16), u64>,
}

/// TIME_WAIT sockets on one local port from which it counts as a server's port.
pub(super) const TW_CONCENTRATION: u32 = 4;

impl TwCounts {
    /// `tcp`: (state, local port, remote address, remote port) of each TCP socket.
    pub(super) fn of(
        tcp: impl Iterator<Item = (u8, u16, IpAddr, u16)> + Clone,
        range: (u16, u16),
    ) -> TwCounts {
        let eph = |p: u16| p >= range.0 && p <= range.1;
        let listening: std::collections::HashSet<u16> = tcp
            .clone()
            .filter(|s| s.0 == table::TCP_LISTEN)
            .map(|s| s.1)
            .collect();
        // Where TIME_WAIT sockets concentrate on one local port, that port served them, even
        // inside the ephemeral range and with its listener gone: that is the port a restart
        // will fail on. A client's source port shows up in TIME_WAIT toward one or two peers,
        // not dozens. Blind spot: a client that reuses one source port toward many peers
        // (possible once the range runs short) is counted under that port too.
        let mut per_local: HashMap<u16, u32> = HashMap::new();
        for (state, lp, ..) in tcp.clone() {
            if state == table::TCP_TIME_WAIT {
                *per_local.entry(lp).or_default() += 1;
            }
        }
        let concentrated = |p: u16| per_local.get(&p).is_some_and(|n| *n >= TW_CONCENTRATION);
        let mut c = TwCounts::default();
        for (state, lp, rip, rport) in tcp {
            let server_side = listening.contains(&lp) || !eph(lp) || concentrated(lp);
            if state == table::TCP_TIME_WAIT {
                c.total += 1;
                if server_side {
                    *c.by_local.entry(lp).or_default() += 1;
                } else {
                    *c.by_remote.entry((rip, rport)).or_default() += 1;
                }
            }
            if !server_side && rport != 0 && state != table::TCP_LISTEN {
                *c.to_dst.entry((rip, rport)).or_default() += 1;
            }
        }
        c
    }
}
