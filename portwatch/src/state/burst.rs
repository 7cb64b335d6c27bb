//! Bursts of identical failures become one record.
//!
//! A process that retries a failing bind in a loop, or a client that hits `EADDRNOTAVAIL`
//! 40,000 times in eight seconds, is one fact repeated. Writing each repeat would bury
//! every other conflict on the host under identical lines, and attributing each would cost
//! the processing thread time it needs for the rest.
//!
//! The rule (documented in docs/schema.md):
//! - failures are identical when the same process (tgid) made the same op, with the same
//!   protocol, family, address, port and error;
//! - the first failure of a burst is written at once, with `count: 1`;
//! - the identical failures that follow within one second of the window's start (by the
//!   kernel's timestamps) are absorbed; when the window closes, one record stands for them
//!   with `count` (how many), `first_ts` and `last_ts`, and a new window starts;
//! - a window that closes having absorbed nothing ends the burst, so the next failure is
//!   written at once again.
//!
//! So the `count`s of the written records, plus what the kernel and agent report as lost,
//! add up to the failures exactly. This module is pure bookkeeping: no I/O, no clock of its
//! own (callers pass wall-clock nanoseconds), so it is tested without a kernel.

use std::collections::HashMap;

use portwatch_common::{Event, Kind};

/// Nanoseconds a window lasts.
pub const WINDOW_NS: i128 = 1_000_000_000;
/// Bursts tracked at once. Beyond this (tens of thousands of distinct failing actors at
/// the same moment), new failures are written one by one rather than grow the agent.
pub const MAX_BURSTS: usize = 16_384;

/// What makes two failures identical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pid: u32,
    kind: u32,
    proto: u16,
    family: u16,
    addr: [u8; 16],
    port: u16,
    ret: i32,
}

impl Key {
    /// For `connect`, the address and port are the destination's.
    pub fn of(e: &Event, k: Kind) -> Key {
        let (addr, port) = if k == Kind::Connect {
            (e.raddr, e.rport)
        } else {
            (e.addr, e.port)
        };
        Key {
            pid: e.pid,
            kind: e.kind,
            proto: e.proto,
            family: e.family,
            addr,
            port,
            ret: e.ret,
        }
    }
}

/// Failures a written record stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub count: u64,
    pub first_ns: i128,
    pub last_ns: i128,
}

impl Span {
    pub fn single(wall: i128) -> Span {
        Span {
            count: 1,
            first_ns: wall,
            last_ns: wall,
        }
    }
}

/// A window's absorbed failures, to be written as one record. The last event stands for
/// them (its fd, tid and comm are the latest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub event: Event,
    pub kind: Kind,
    pub netns: u32,
    pub span: Span,
}

struct Burst {
    window_start: i128,
    absorbed: Option<Summary>,
}

/// What to do with a failure.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it now: it starts a burst (or coalescing is full).
    Write,
    /// Absorbed into the current window; nothing to write now.
    Absorbed,
}

#[derive(Default)]
pub struct Bursts {
    map: HashMap<Key, Burst>,
    /// Failures absorbed and not yet written (for the shutdown accounting).
    held: u64,
}

impl Bursts {
    /// Offer one failure at wall time `wall`. A window it falls past is closed first, and
    /// its summary (if any) is returned for writing before this failure.
    pub fn offer(
        &mut self,
        e: &Event,
        k: Kind,
        netns: u32,
        wall: i128,
    ) -> (Verdict, Option<Summary>) {
        let key = Key::of(e, k);
        if let Some(b) = self.map.get_mut(&key) {
            if wall < b.window_start + WINDOW_NS {
                absorb(&mut b.absorbed, e, k, netns, wall);
                self.held += 1;
                return (Verdict::Absorbed, None);
            }
            // Past its window: a window that absorbed something keeps the burst going
            // (this failure opens the next window); an empty one ended it.
            match b.absorbed.take() {
                Some(s) => {
                    self.held -= s.span.count;
                    b.window_start = wall;
                    absorb(&mut b.absorbed, e, k, netns, wall);
                    self.held += 1;
                    return (Verdict::Absorbed, Some(s));
                }
                None => {
                    self.map.remove(&key);
                }
            }
        }
        if self.map.len() >= MAX_BURSTS {
            return (Verdict::Write, None);
        }
        self.map.insert(
            key,
            Burst {
                window_start: wall,
                absorbed: None,
            },
        );
        (Verdict::Write, None)
    }

    /// Close every window that ended before `now` (wall ns): the summaries to write, oldest
    /// window first. Bursts whose window absorbed nothing end here.
    pub fn due(&mut self, now: i128) -> Vec<Summary> {
        let mut out = Vec::new();
        self.map.retain(|_, b| {
            if now < b.window_start + WINDOW_NS {
                return true;
            }
            match b.absorbed.take() {
                Some(s) => {
                    b.window_start = now;
                    out.push(s);
                    true
                }
                None => false,
            }
        });
        for s in &out {
            self.held -= s.span.count;
        }
        out.sort_by_key(|s| s.span.first_ns);
        out
    }

    /// Every absorbed failure, at shutdown.
    pub fn drain(&mut self) -> Vec<Summary> {
        let mut out: Vec<Summary> = self
            .map
            .drain()
            .filter_map(|(_, mut b)| b.absorbed.take())
            .collect();
        self.held = 0;
        out.sort_by_key(|s| s.span.first_ns);
        out
    }

    /// Failures absorbed and not written yet.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Bursts being tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

fn absorb(slot: &mut Option<Summary>, e: &Event, k: Kind, netns: u32, wall: i128) {
    match slot {
        // A storm's later failures come through a second ring (see the kernel side's
        // emit()), so they may arrive after newer ones: the span is min..max, and the
        // newest event stands for it.
        Some(s) => {
            if wall >= s.span.last_ns {
                s.event = *e;
                s.span.last_ns = wall;
            }
            s.span.first_ns = s.span.first_ns.min(wall);
            s.span.count += 1;
        }
        None => {
            *slot = Some(Summary {
                event: *e,
                kind: k,
                netns,
                span: Span::single(wall),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i128 = 1_000_000_000;

    fn fail(pid: u32, port: u16) -> Event {
        let mut e = Event::zeroed();
        e.kind = portwatch_common::kind::BIND;
        e.pid = pid;
        e.tid = pid;
        e.family = portwatch_common::AF_INET;
        e.proto = portwatch_common::IPPROTO_TCP;
        e.port = port;
        e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.ret = -98;
        e
    }

    /// Offer `n` identical failures `step` ns apart from `t0`; return (written, summaries).
    fn storm(b: &mut Bursts, e: &Event, t0: i128, step: i128, n: u64) -> (u64, Vec<Summary>) {
        let mut written = 0;
        let mut sums = Vec::new();
        for i in 0..n {
            let (v, s) = b.offer(e, Kind::Bind, 1, t0 + i128::from(i) * step);
            written += u64::from(v == Verdict::Write);
            sums.extend(s);
        }
        (written, sums)
    }

    #[test]
    fn first_failure_is_written_at_once_and_repeats_are_absorbed() {
        let mut b = Bursts::default();
        let e = fail(10, 8080);
        assert_eq!(b.offer(&e, Kind::Bind, 1, 0), (Verdict::Write, None));
        assert_eq!(b.offer(&e, Kind::Bind, 1, S / 2).0, Verdict::Absorbed);
        assert_eq!(b.held(), 1);
        // Not yet due half a second in.
        assert!(b.due(S / 2).is_empty());
        let sums = b.due(S);
        assert_eq!(sums.len(), 1);
        assert_eq!(
            sums[0].span,
            Span {
                count: 1,
                first_ns: S / 2,
                last_ns: S / 2
            }
        );
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn counts_add_up_exactly_over_a_long_storm() {
        let mut b = Bursts::default();
        let e = fail(10, 8080);
        // 40,000 failures over 8 s, with ticks every 100 ms in between.
        let n = 40_000u64;
        let step = 8 * S / i128::from(n);
        let mut written = 0;
        let mut records = 0;
        let mut total = 0;
        for i in 0..n {
            let t = i128::from(i) * step;
            let (v, s) = b.offer(&e, Kind::Bind, 1, t);
            if v == Verdict::Write {
                written += 1;
                records += 1;
                total += 1;
            }
            for s in s
                .into_iter()
                .chain(if i % 500 == 0 { b.due(t) } else { vec![] })
            {
                records += 1;
                total += s.span.count;
            }
        }
        for s in b.drain() {
            records += 1;
            total += s.span.count;
        }
        assert_eq!(written, 1, "only the first is written at once");
        assert_eq!(total, n, "every failure is in exactly one count");
        assert!(records <= 10, "about one record per second: {records}");
    }

    #[test]
    fn a_quiet_window_ends_the_burst() {
        let mut b = Bursts::default();
        let e = fail(10, 8080);
        assert_eq!(b.offer(&e, Kind::Bind, 1, 0).0, Verdict::Write);
        assert!(b.due(S).is_empty(), "nothing absorbed: the burst ends");
        assert_eq!(b.len(), 0);
        assert_eq!(b.offer(&e, Kind::Bind, 1, 2 * S).0, Verdict::Write);
    }

    #[test]
    fn different_actors_ports_or_errors_are_not_merged() {
        let mut b = Bursts::default();
        let mut other_err = fail(10, 8080);
        other_err.ret = -13;
        for e in [fail(10, 8080), fail(11, 8080), fail(10, 8081), other_err] {
            assert_eq!(b.offer(&e, Kind::Bind, 1, 0).0, Verdict::Write);
        }
        // Threads of one process are one actor.
        let mut thread = fail(10, 8080);
        thread.tid = 12;
        assert_eq!(b.offer(&thread, Kind::Bind, 1, 1).0, Verdict::Absorbed);
    }

    #[test]
    fn a_failure_past_the_window_carries_the_burst_on() {
        let mut b = Bursts::default();
        let e = fail(10, 8080);
        let (w, sums) = storm(&mut b, &e, 0, S / 10, 15);
        assert_eq!(w, 1);
        // The 11th failure (t = 1.0 s) closed the first window with the 9 absorbed in it.
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[0].span.count, 9);
        assert_eq!(b.held(), 5);
        let rest: u64 = b.drain().iter().map(|s| s.span.count).sum();
        assert_eq!(1 + 9 + rest, 15);
    }

    #[test]
    fn coalescing_is_bounded() {
        let mut b = Bursts::default();
        for pid in 0..MAX_BURSTS as u32 {
            b.offer(&fail(pid, 1), Kind::Bind, 1, 0);
        }
        let e = fail(u32::MAX, 1);
        assert_eq!(b.offer(&e, Kind::Bind, 1, 0).0, Verdict::Write);
        assert_eq!(
            b.offer(&e, Kind::Bind, 1, 1).0,
            Verdict::Write,
            "not tracked"
        );
        assert_eq!(b.len(), MAX_BURSTS);
    }
}
