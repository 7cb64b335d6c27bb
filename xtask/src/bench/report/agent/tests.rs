use std::{path::PathBuf, time::Duration};

use super::*;

fn settings() -> Settings {
    Settings {
        window: Duration::from_secs(5),
        rounds: 3,
        clients: 4,
        keep_logs: false,
        dir: PathBuf::from("/tmp/bench"),
        agent: PathBuf::from("/tmp/bench/portwatch"),
        agent_args: Vec::new(),
        baseline: None,
        baseline_args: Vec::new(),
    }
}

fn host() -> Host {
    Host {
        date: "Tue Dec  1 12:00:00 UTC 2026".into(),
        kernel: "6.12.0".into(),
        cpu: "Test CPU".into(),
        cores: 2,
        load_start: "0.50 0.40 0.30".into(),
    }
}

fn result(lat_ms: Vec<f64>, attach: Option<AttachResult>) -> LatencyResult {
    LatencyResult {
        attach,
        sent: 200,
        lat_ms,
        churn_rate: 9_870.0,
        cpu_pct: 3.25,
        hwm_kib: 14_336,
        ready_wall: Duration::from_millis(412),
        startup_ms: Some(180),
        lost: 0,
        other_cpu: Some(12.4),
    }
}

/// A plain run that saw every probe, and an attach run that lost some and missed the target.
fn runs_full() -> LatencyRuns {
    let plain = result((1..=200).map(|i| f64::from(i) / 100.0).collect(), None);
    let mut attach = result(
        (1..=190).map(|i| f64::from(i) / 8.0).collect(),
        Some(AttachResult {
            reader_lines: vec![41_000, 40_950, 41_020],
            reader_missed: 7,
            reader_cpu_pct: 36.6,
            stalled_missed: Some(12_345),
        }),
    );
    attach.lost = 3;
    attach.other_cpu = None;
    attach.startup_ms = None;
    LatencyRuns { plain, attach }
}

/// No probe received; the attach run's stalled client never told how much it missed.
fn runs_sparse() -> LatencyRuns {
    let plain = result(Vec::new(), None);
    let attach = result(
        Vec::new(),
        Some(AttachResult {
            reader_lines: Vec::new(),
            reader_missed: 0,
            reader_cpu_pct: 0.0,
            stalled_missed: None,
        }),
    );
    LatencyRuns { plain, attach }
}

const LATENCY: &str = r#"
## 3. Conflict latency (failing bind → its line read from the agent's stdout)

200 probes per run, one every 20 ms, each on its own held port, under 10000 conn/s background churn; CLOCK_REALTIME just before bind() to the moment a reader thread got the line. Two runs, each with a fresh agent: one with nothing attached, one with 10 clients on the control socket (`{"cmd":"attach"}`), 9 reading everything and one that never reads. Attached clients get every event as a record, not only conflicts, so the stalled one falls behind at once; the reading clients run in the bench process and take CPU from the same 2 cores.

| metric | latency, no attach clients | latency, 10 attach clients, one stalled | target | result |
|---|---:|---:|---|---|
| probes received | 200/200 | 190/200 | all | PASS / MISS |
| p50 | 1.00 ms | 11.88 ms | ≤ 2 ms | PASS / MISS |
| p99 | 1.98 ms | 23.62 ms | ≤ 20 ms | PASS / MISS |
| max | 2.00 ms | 23.75 ms | – | info |
| lost records (agent) | 0 | 3 | 0 | PASS / MISS |
| background churn achieved | 9870 conn/s | 9870 conn/s | – | info |
| agent CPU (of one core) / other processes | 3.2% / 12% | 3.2% / –% | – | info |
| stalled client: records it was told it missed, when it read at last after the window | – | 12345 | – | info |
| 3 reading clients: lines read, min / max (records missed, all of them) | – | 40950 / 41020 (7) | – | info |
| 3 reading clients: CPU, summed (in the bench process, not in "other processes") | – | 37% of one core | – | info |

## 3. Conflict latency (failing bind → its line read from the agent's stdout)

200 probes per run, one every 20 ms, each on its own held port, under 10000 conn/s background churn; CLOCK_REALTIME just before bind() to the moment a reader thread got the line. Two runs, each with a fresh agent: one with nothing attached, one with 10 clients on the control socket (`{"cmd":"attach"}`), 9 reading everything and one that never reads. Attached clients get every event as a record, not only conflicts, so the stalled one falls behind at once; the reading clients run in the bench process and take CPU from the same 2 cores.

| metric | latency, no attach clients | latency, 10 attach clients, one stalled | target | result |
|---|---:|---:|---|---|
| probes received | 0/200 | 0/200 | all | MISS / MISS |
| p50 | NaN ms | NaN ms | ≤ 2 ms | MISS / MISS |
| p99 | NaN ms | NaN ms | ≤ 20 ms | MISS / MISS |
| max | NaN ms | NaN ms | – | info |
| lost records (agent) | 0 | 0 | 0 | PASS / PASS |
| background churn achieved | 9870 conn/s | 9870 conn/s | – | info |
| agent CPU (of one core) / other processes | 3.2% / 12% | 3.2% / 12% | – | info |
| stalled client: records it was told it missed, when it read at last after the window | – | ? (no note within 5 s) | – | info |
| 0 reading clients: lines read, min / max (records missed, all of them) | – | 0 / 0 (0) | – | info |
| 0 reading clients: CPU, summed (in the bench process, not in "other processes") | – | 0% of one core | – | info |

## 3. Conflict latency (failing bind → its line read from the agent's stdout)

200 probes per run, one every 20 ms, each on its own held port, under 10000 conn/s background churn; CLOCK_REALTIME just before bind() to the moment a reader thread got the line. Two runs, each with a fresh agent: one with nothing attached, one with 10 clients on the control socket (`{"cmd":"attach"}`), 9 reading everything and one that never reads. Attached clients get every event as a record, not only conflicts, so the stalled one falls behind at once; the reading clients run in the bench process and take CPU from the same 2 cores.

| metric | latency, no attach clients | latency, 10 attach clients, one stalled | target | result |
|---|---:|---:|---|---|
| probes received | 200/200 | 190/200 | all | PASS / MISS |
| p50 | 1.00 ms | 11.88 ms | ≤ 2 ms | PASS / MISS |
| p99 | 1.98 ms | 23.62 ms | ≤ 20 ms | PASS / MISS |
| max | 2.00 ms | 23.75 ms | – | info |
| lost records (agent) | 0 | 3 | 0 | PASS / MISS |
| background churn achieved | 9870 conn/s | 9870 conn/s | – | info |
| agent CPU (of one core) / other processes | 3.2% / 12% | 3.2% / –% | – | info |
"#;

#[test]
fn latency_section() {
    let mut m = String::new();
    render_latency(&mut m, &host(), &runs_full());
    render_latency(&mut m, &host(), &runs_sparse());
    let mut no_attach = runs_full();
    no_attach.attach.attach = None;
    render_latency(&mut m, &host(), &no_attach);
    assert_eq!(m, LATENCY);
}

fn report() -> Report {
    Report {
        ready: vec![
            (Duration::from_millis(420), Some(190)),
            (Duration::from_millis(380), None),
            (Duration::from_millis(1_620), Some(1_510)),
        ],
        hwm_default: 15_872,
        hwm_all: 22_016,
        ..Report::default()
    }
}

const COST: &str = r#"
## 4. Agent cost

| metric | value | target | result |
|---|---:|---|---|
| CPU, default mode, at 9870 conn/s (utime+stime over 5 s; other processes 12%) | 3.2% of one core | – | info |
| CPU, default mode, 10 attach clients (one stalled), at 9870 conn/s (other processes –%) | 3.2% of one core | – | info |
| CPU, --all-events, at 9650 conn/s (1234567 lines, 89 lost; other processes 7%) | 14.8% of one core | – | info |
| peak RSS (VmHWM), default, latency run | 14.0 MiB | – | info |
| peak RSS (VmHWM), default, latency run with 10 attach clients (one stalled) | 14.0 MiB | – | info |
| peak RSS (VmHWM), highest of all default-mode runs (incl. bind storm) | 15.5 MiB | – | info |
| peak RSS (VmHWM), highest of all --all-events runs | 21.5 MiB | – | info |
| ready: spawn → ready line, median / max of 3 starts | 420 / 1620 ms | ≤ 1500 ms | MISS |
| ready: startup_ms in the ready line, median / max | 850 / 1510 ms | ≤ 1500 ms | MISS |
| latency run: ready wall / startup_ms / lost records | 412 ms / 180 ms / 0 | – | info |

## 4. Agent cost

| metric | value | target | result |
|---|---:|---|---|
| peak RSS (VmHWM), highest of all default-mode runs (incl. bind storm) | 0.0 MiB | – | info |
| peak RSS (VmHWM), highest of all --all-events runs | 0.0 MiB | – | info |
| ready: spawn → ready line, median / max of 0 starts | NaN / 0 ms | ≤ 1500 ms | MISS |
| ready: startup_ms in the ready line, median / max | NaN / 0 ms | ≤ 1500 ms | MISS |
"#;

#[test]
fn cost_section() {
    let s = settings();
    let all = CostRow::new(9_650.0, 14.75, 1_234_567, 89, Some(7.0));
    let runs = runs_full();
    let mut m = String::new();
    render_cost(&mut m, &s, Some(&runs), Some(&all), &report());
    render_cost(&mut m, &s, None, None, &Report::default());
    assert_eq!(m, COST);
}
