//! Agent output: the agent's records and the peers' lines, read back and counted. And the
//! statistics the report is built from (medians, percentiles, a confidence interval), and the
//! wall clock latencies are measured on.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
};

use anyhow::{Context as _, Result};

/// What one agent run wrote, read back from its stdout file.
#[derive(Default, Debug)]
pub(super) struct AgentLog {
    pub(super) lines: u64,
    pub(super) startup_ms: Option<u64>,
    pub(super) stopped: bool,
    /// Failures in conflict records with op=bind for the port asked about: the sum of their
    /// `count`s (identical failures are coalesced, one record standing for many).
    pub(super) conflicts_bind: u64,
    pub(super) lost_bind: u64,
    pub(super) lost_count: u64,
    pub(super) lost_kernel: u64,
    pub(super) lost_agent: u64,
    lost_records: u64,
}

/// The number after `"key":` in a JSON line (flat scan: the agent's records are one line and
/// field names are unique within the scanned slice).
pub(super) fn json_u64(s: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = s.find(&pat)? + pat.len();
    let digits: &str = &s[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A conflict record's `count`: the failures it stands for. The record's own `count` comes
/// after its holders (a TIME_WAIT holder has a `count` of its own), so the last one is it.
fn record_count(line: &str) -> u64 {
    line.rfind("\"count\":")
        .and_then(|i| json_u64(&line[i..], "count"))
        .unwrap_or(1)
}

/// `"type":"…"` sits near the start of every record (after `v` and the fixed-width `ts`).
pub(super) fn record_type(line: &str) -> &str {
    let head = &line[..line.len().min(120)];
    head.find("\"type\":\"")
        .map(|i| {
            let t = &head[i + 8..];
            &t[..t.find('"').unwrap_or(0)]
        })
        .unwrap_or("")
}

#[derive(Default)]
pub(super) struct LineStats {
    pub(super) log: AgentLog,
}

impl LineStats {
    pub(super) fn feed(&mut self, line: &str, port: Option<u16>) {
        let l = &mut self.log;
        l.lines += 1;
        match record_type(line) {
            "conflict" => {
                if let Some(p) = port {
                    if line.contains("\"op\":\"bind\"")
                        && json_u64(line, "port") == Some(u64::from(p))
                    {
                        l.conflicts_bind += record_count(line);
                    }
                }
            }
            "lost" => {
                l.lost_records += 1;
                l.lost_count += json_u64(line, "count").unwrap_or(0);
                l.lost_kernel += json_u64(line, "kernel").unwrap_or(0);
                l.lost_agent += json_u64(line, "agent").unwrap_or(0);
                if let Some(i) = line.find("\"by_kind\":{") {
                    let by = &line[i..];
                    let by = &by[..by.find('}').unwrap_or(by.len())];
                    l.lost_bind += json_u64(by, "bind").unwrap_or(0);
                }
            }
            "agent" => {
                if line.contains("\"event\":\"ready\"") {
                    l.startup_ms = json_u64(line, "startup_ms");
                } else if line.contains("\"event\":\"stopped\"") {
                    l.stopped = true;
                }
            }
            _ => {}
        }
    }
}

pub(super) fn parse_agent_log(path: &Path, port: Option<u16>) -> Result<AgentLog> {
    let f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(4096);
    let mut st = LineStats::default();
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if let Ok(line) = std::str::from_utf8(&buf) {
            st.feed(line, port);
        }
    }
    Ok(st.log)
}

/// Lines and "Lost N events" notices in a peer's output (bpftrace, tcpstates).
pub(super) fn parse_peer_log(path: &Path) -> (u64, u64) {
    let Ok(f) = fs::File::open(path) else {
        return (0, 0);
    };
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::with_capacity(512);
    let (mut lines, mut lost) = (0u64, 0u64);
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        lines += 1;
        // bpftrace: "Lost 123 events"; libbpf-tools: "lost 123 events on CPU #0".
        if buf.len() < 64 && (buf.starts_with(b"Lost ") || buf.starts_with(b"lost ")) {
            if let Some(n) = std::str::from_utf8(&buf[5..])
                .ok()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u64>().ok())
            {
                lost += n;
            }
        }
    }
    (lines, lost)
}

/// A distribution-free confidence interval for the median: the k-th smallest and k-th
/// largest of `v`, with k the largest for which both tails of Binomial(n, 1/2) below k hold at
/// most 2.5 % each. Returns (low, high, coverage), or None below 6 values, where even min–max
/// covers the median with less than 95 % (97 % at 6, 75 % at 3).
pub(super) fn median_ci(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    if n < 6 {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    // cdf[j] = P(B <= j)
    let mut cdf = Vec::with_capacity(n + 1);
    let (mut c, mut acc) = (1.0f64, 0.0f64);
    let total = 2f64.powi(n as i32);
    for j in 0..=n {
        if j > 0 {
            c = c * (n + 1 - j) as f64 / j as f64;
        }
        acc += c / total;
        cdf.push(acc);
    }
    let k = (1..=n / 2).rev().find(|&k| 2.0 * cdf[k - 1] <= 0.05)?;
    Some((v[k - 1], v[n - k], 1.0 - 2.0 * cdf[k - 1]))
}

pub(super) fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

pub(super) fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

pub(super) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let k = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[k.clamp(1, sorted.len()) - 1]
}

/// The probes' latencies in ms, sorted, for those whose line arrived (a probe's arrival is
/// 0 until its line is read; both times are wall-clock ns).
pub(super) fn probe_latencies(
    arrivals: &[std::sync::atomic::AtomicI64],
    sent_at: &[i64],
) -> Vec<f64> {
    let mut lat_ms: Vec<f64> = arrivals
        .iter()
        .zip(sent_at)
        .filter_map(|(a, &s0)| {
            let a = a.load(std::sync::atomic::Ordering::Relaxed);
            (a != 0).then(|| (a - s0) as f64 / 1e6)
        })
        .collect();
    lat_ms.sort_by(f64::total_cmp);
    lat_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median's interval from order statistics, against binomial tables: k = 1 at n = 6
    /// (coverage 1 - 2/64), k = 3 at n = 12 (1 - 2*79/4096), k = 6 at n = 20; none below 6.
    #[test]
    fn median_ci_uses_binomial_order_statistics() {
        let v = |n: usize| (1..=n).rev().map(|x| x as f64).collect::<Vec<_>>();
        assert_eq!(median_ci(&v(5)), None);
        let (a, b, c) = median_ci(&v(6)).unwrap();
        assert_eq!((a, b), (1.0, 6.0));
        assert!((c - (1.0 - 2.0 / 64.0)).abs() < 1e-12);
        let (a, b, c) = median_ci(&v(12)).unwrap();
        assert_eq!((a, b), (3.0, 10.0));
        assert!((c - (1.0 - 2.0 * 79.0 / 4096.0)).abs() < 1e-12);
        let (a, b, c) = median_ci(&v(20)).unwrap();
        assert_eq!((a, b), (6.0, 15.0));
        assert!((0.95..0.96).contains(&c), "{c}");
    }
}
