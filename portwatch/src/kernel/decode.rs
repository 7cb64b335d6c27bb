//! Decoding raw kernel events: addresses, errno and TCP state names, kernel time to wall time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portwatch_common::{Event, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

/// Copy an event out of a ring-buffer item. Items shorter than an `Event` (a newer or older
/// kernel side) are rejected rather than read past their end.
pub fn event_from_bytes(b: &[u8]) -> Option<Event> {
    if b.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is repr(C) plain integers, valid for any bit pattern;
    // read_unaligned because ring-buffer items are only 8-byte aligned by contract.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Event>()) })
}

pub fn family_name(f: u16) -> &'static str {
    match f {
        AF_INET => "ipv4",
        AF_INET6 => "ipv6",
        _ => "unknown",
    }
}

pub fn proto_name(p: u16) -> &'static str {
    match p {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "unknown",
    }
}

pub fn ip(family: u16, a: &[u8; 16]) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(*a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    }
}

/// Symbolic name of a (positive) errno, as scripts expect to match on it.
pub fn errno_name(e: i32) -> &'static str {
    // nix names every Linux errno by its Debug form; the names are made once, as the
    // `&'static str` records carry.
    static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        (0..=133)
            .map(|n| match nix::errno::Errno::from_raw(n) {
                nix::errno::Errno::UnknownErrno => "EOTHER",
                known => &*Box::leak(format!("{known:?}").into_boxed_str()),
            })
            .collect()
    });
    usize::try_from(e)
        .ok()
        .and_then(|i| names.get(i))
        .copied()
        .unwrap_or("EOTHER")
}

/// FIN_WAIT2 -> CLOSE or CLOSING -> CLOSE: how `inet_sock_set_state` shows a socket entering
/// TIME_WAIT (it never reports TCP_TIME_WAIT itself).
pub fn enters_time_wait(old: u16, new: u16) -> bool {
    new == 7 && (old == 5 || old == 11)
}

/// A `tcp_state` record's `time_wait`: the state tracepoint's pseudo-entry above, or a
/// TIME_WAIT socket made, as the trampoline family's TIME_WAIT hook reports it.
pub fn record_time_wait(e: &portwatch_common::Event) -> bool {
    enters_time_wait(e.old_state, e.new_state)
        || (e.flags & portwatch_common::flags::TW_HOOK != 0 && e.new_state == 6)
}

/// `sock_state` by name: what `tcp_state` records write.
pub fn tcp_state_name(s: u16) -> &'static str {
    sock_state(s).known().unwrap_or("UNKNOWN")
}

/// The kernel's TCP state number, as the record schema types it.
pub fn sock_state(s: u16) -> portwatch_schema::SockState {
    use portwatch_schema::SockState as S;
    match s {
        1 => S::Established,
        2 => S::SynSent,
        3 => S::SynRecv,
        4 => S::FinWait1,
        5 => S::FinWait2,
        6 => S::TimeWait,
        7 => S::Close,
        8 => S::CloseWait,
        9 => S::LastAck,
        10 => S::Listen,
        11 => S::Closing,
        12 => S::NewSynRecv,
        _ => S::Unknown,
    }
}

/// NUL-terminated kernel comm as text; invalid UTF-8 becomes U+FFFD, so JSON stays valid.
pub fn comm(c: &[u8; 16]) -> std::borrow::Cow<'_, str> {
    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end])
}

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock nanoseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Clock {
            offset_ns: real - mono,
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }

    pub fn now_wall_ns() -> i128 {
        clock_ns(libc::CLOCK_REALTIME)
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-25T08:31:31.123456789Z`.
pub fn rfc3339(wall_ns: i128) -> String {
    let mut b = [0u8; RFC3339_LEN];
    rfc3339_into(wall_ns, &mut b);
    // Only ASCII digits and separators were written, so this never falls back.
    std::str::from_utf8(&b).unwrap_or_default().to_owned()
}

/// Length of an `rfc3339` string (years 0000-9999).
pub const RFC3339_LEN: usize = 30;

/// `rfc3339` into a fixed buffer, without an allocation: humantime's formatter (which
/// writes the digits itself) on the instant, clamped to what `SystemTime` and four year
/// digits hold (1970 to 2554).
pub fn rfc3339_into(wall_ns: i128, b: &mut [u8; RFC3339_LEN]) {
    use std::io::Write;
    let ns = u64::try_from(wall_ns.clamp(0, i128::from(u64::MAX))).unwrap_or(0);
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    let mut w = &mut b[..];
    // 30 bytes is exactly the formatted length, so this cannot fail.
    let _ = write!(w, "{}", humantime::format_rfc3339_nanos(t));
}

/// `rfc3339_into` for a stream of instants close together, as records are: the date and time
/// of day are kept while the second stays the same, so most records only rewrite the nine
/// fraction digits.
#[derive(Default)]
pub struct TsCache {
    sec: Option<i64>,
    b: [u8; RFC3339_LEN],
}

impl TsCache {
    pub fn format(&mut self, wall_ns: i128) -> &[u8; RFC3339_LEN] {
        let w = wall_ns.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        let sec = w.div_euclid(1_000_000_000);
        if self.sec == Some(sec) {
            let mut v = w.rem_euclid(1_000_000_000) as u32;
            for c in self.b[20..29].iter_mut().rev() {
                *c = b'0' + (v % 10) as u8;
                v /= 10;
            }
        } else {
            rfc3339_into(wall_ns, &mut self.b);
            self.sec = Some(sec);
        }
        &self.b
    }
}

/// RFC 3339 `ts` (as portwatch writes it) to wall-clock ns; None when unparsable.
pub fn ts_ns(ts: &str) -> Option<i128> {
    let t = humantime::parse_rfc3339_weak(ts).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(d.as_nanos() as i128)
}

/// A `--since`/`--until` bound: a duration ago (`1d`, `90m`) or an RFC 3339 time.
pub fn parse_when(s: &str) -> std::result::Result<i128, String> {
    if let Some(t) = ts_ns(s) {
        return Ok(t);
    }
    humantime::parse_duration(s)
        .map(|d| Clock::now_wall_ns() - d.as_nanos() as i128)
        .map_err(|_| {
            format!(
                "'{s}' is neither a duration like 1d or 90m nor a time like 2026-11-30T03:12:00Z"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_wait_records_from_either_hook() {
        let mut e = portwatch_common::Event::zeroed();
        (e.old_state, e.new_state) = (5, 7);
        assert!(
            record_time_wait(&e),
            "FIN_WAIT2->CLOSE from the state tracepoint"
        );
        (e.old_state, e.new_state) = (5, 6);
        assert!(
            !record_time_wait(&e),
            "no such transition without the TIME_WAIT hook"
        );
        e.flags = portwatch_common::flags::TW_HOOK;
        assert!(
            record_time_wait(&e),
            "a TIME_WAIT socket made, from the hook"
        );
        (e.old_state, e.new_state) = (6, 7);
        assert!(!record_time_wait(&e), "its end is no entry");
    }

    #[test]
    fn errno_names() {
        for (n, name) in [
            (98, "EADDRINUSE"),
            (99, "EADDRNOTAVAIL"),
            (13, "EACCES"),
            (11, "EAGAIN"),
            (95, "EOPNOTSUPP"),
            (133, "EHWPOISON"),
            (0, "EOTHER"),
            (-98, "EOTHER"),
            (4096, "EOTHER"),
        ] {
            assert_eq!(errno_name(n), name, "{n}");
        }
    }

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2026-11-25T08:31:31.123456789Z
        let t = 1_795_595_491i128 * 1_000_000_000 + 123_456_789;
        assert_eq!(rfc3339(t), "2026-11-25T08:31:31.123456789Z");
        // leap day
        assert_eq!(
            rfc3339(951_782_400i128 * 1_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn ts_cache_matches_rfc3339() {
        let mut c = TsCache::default();
        let base = 1_795_595_491i128 * 1_000_000_000;
        // Same second, the next second, back in time, and a day boundary.
        for t in [
            base + 123_456_789,
            base + 999_999_999,
            base + 7,
            base + 1_000_000_000,
            base - 1,
            86_400 * 1_000_000_000 - 1,
            86_400 * 1_000_000_000,
            0,
        ] {
            assert_eq!(std::str::from_utf8(c.format(t)).unwrap(), rfc3339(t));
        }
    }

    #[test]
    fn addresses_and_names() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(ip(AF_INET, &a).to_string(), "127.0.0.1");
        let mut b = [0u8; 16];
        b[15] = 1;
        assert_eq!(ip(AF_INET6, &b).to_string(), "::1");
        assert_eq!(errno_name(98), "EADDRINUSE");
        assert_eq!(tcp_state_name(10), "LISTEN");
        assert_eq!(comm(b"nginx\0\0\0\0\0\0\0\0\0\0\0"), "nginx");
        assert_eq!(comm(b"a\"\\\xff\0\0\0\0\0\0\0\0\0\0\0\0"), "a\"\\\u{fffd}");
    }

    #[test]
    fn short_items_rejected() {
        assert!(event_from_bytes(&[0u8; 10]).is_none());
        let e = portwatch_common::Event::zeroed();
        // SAFETY: reading the bytes of a plain-old-data struct.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const portwatch_common::Event).cast::<u8>(),
                std::mem::size_of_val(&e),
            )
        };
        assert_eq!(event_from_bytes(bytes), Some(e));
    }
}
