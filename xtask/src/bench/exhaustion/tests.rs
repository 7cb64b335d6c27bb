use super::*;

/// A storm that met every target: no noise, the accounting balanced.
fn clean() -> ExhaustResult {
    ExhaustResult {
        window_s: 10.02,
        failures: 1_234_567,
        rate: 118_003.4,
        unexpected: 0,
        records: 11,
        counted: 1_234_000,
        dest_ok: 11,
        probes_sent: 4,
        probe_counted: 4,
        lost_connect: 500,
        lost_bind: 0,
        unwritten: Some(67),
        lat_ms: vec![0.41, 0.52, 0.63, 1.9],
        cpu_pct: 12.345,
        other_cpu: Some(4.2),
        sigterm: Duration::from_millis(37),
        exited_ok: true,
        hwm_kib: 20_480,
    }
}

/// A storm that missed: attempts that did not fail, probes missing, no `stopped` record, a
/// slow and failed exit, and other processes busy.
fn missed() -> ExhaustResult {
    ExhaustResult {
        window_s: 3.5,
        failures: 0,
        rate: 0.0,
        unexpected: 7,
        records: 0,
        counted: 0,
        dest_ok: 0,
        probes_sent: 70,
        probe_counted: 3,
        lost_connect: 0,
        lost_bind: 2,
        unwritten: None,
        lat_ms: vec![25.5, 31.25],
        cpu_pct: 40.0,
        other_cpu: Some(55.5),
        sigterm: Duration::from_millis(1500),
        exited_ok: false,
        hwm_kib: 1_000,
    }
}

fn rendered(r: &ExhaustResult) -> (String, Vec<String>) {
    let mut m = String::new();
    let mut noisy = Vec::new();
    render(&mut m, r, &mut noisy);
    (m, noisy)
}

/// Section 2b for `clean()`, byte for byte.
const CLEAN: &str = r#"
## 2b. Exhaustion storm (connect EADDRNOTAVAIL at max rate; portwatch default, no port filter)

One thread calls connect() on a fresh socket as fast as it can, in a namespace whose ip_local_port_range (40000-41999) is all held by connections to 127.0.0.1:9000, so every attempt fails with EADDRNOTAVAIL. Identical failures are coalesced into about one record a second, each with `destination` counts from a re-read of the namespace. Meanwhile a bind on the host fails every 50 ms, each on a port of its own (none coalesced): latency from CLOCK_REALTIME just before that bind() to the moment the bench read its line. CPU = the agent's utime + stime over the 10.0 s window. At the end the storm stops and SIGTERM follows at once (the storm's last window still open in the agent); exit time polled every 1 ms. *accounting* = sum of `count` over the storm's and the probes' records + `lost` (by_kind connect + bind) + `unwritten` against the failures made.

| metric | value | target | result |
|---|---:|---|---|
| storm: EADDRNOTAVAIL per second (in the window) / in all | 118003 / 1234567 | – | PASS |
| agent CPU (of one core) / other processes | 12.3% / 4% | ≤ 25% | PASS |
| unrelated conflict latency p50 | 0.52 ms | – | info |
| unrelated conflict latency p99 (probes received) | 1.90 ms (4/4) | ≤ 20 ms, all received | PASS |
| storm records written / failures they count | 11 / 1234000 | ≈ 1 per second | PASS |
| storm records with destination.as_of ≥ first_ts | 11 of 11 | all | PASS |
| accounting: counts + lost + unwritten / failures | 1234004 + 500 + 67 = 1234571 / 1234571 | equal | PASS |
| SIGTERM → exit (storm stopped just before) | 37 ms | < 1 s | PASS |
| peak RSS (VmHWM) | 20.0 MiB | – | info |
"#;

/// Section 2b for `missed()`, byte for byte.
const MISSED: &str = r#"
## 2b. Exhaustion storm (connect EADDRNOTAVAIL at max rate; portwatch default, no port filter)

One thread calls connect() on a fresh socket as fast as it can, in a namespace whose ip_local_port_range (40000-41999) is all held by connections to 127.0.0.1:9000, so every attempt fails with EADDRNOTAVAIL. Identical failures are coalesced into about one record a second, each with `destination` counts from a re-read of the namespace. Meanwhile a bind on the host fails every 50 ms, each on a port of its own (none coalesced): latency from CLOCK_REALTIME just before that bind() to the moment the bench read its line. CPU = the agent's utime + stime over the 3.5 s window. At the end the storm stops and SIGTERM follows at once (the storm's last window still open in the agent); exit time polled every 1 ms. *accounting* = sum of `count` over the storm's and the probes' records + `lost` (by_kind connect + bind) + `unwritten` against the failures made.

| metric | value | target | result |
|---|---:|---|---|
| storm: EADDRNOTAVAIL per second (in the window) / in all | 0 / 0 (7 attempts did not fail with EADDRNOTAVAIL) | – | MISS |
| agent CPU (of one core) / other processes | 40.0% / 56% | ≤ 25% | MISS |
| unrelated conflict latency p50 | 25.50 ms | – | info |
| unrelated conflict latency p99 (probes received) | 31.25 ms (2/70) | ≤ 20 ms, all received | MISS |
| storm records written / failures they count | 0 / 0 | ≈ 1 per second | MISS |
| storm records with destination.as_of ≥ first_ts | 0 of 0 | all | PASS |
| accounting: counts + lost + unwritten / failures | 3 + 2 + ? = 5 / 70 | equal | MISS |
| SIGTERM → exit (storm stopped just before) | 1500 ms, exit status not 0 | < 1 s | MISS |
| peak RSS (VmHWM) | 1.0 MiB | – | info |
"#;

#[test]
fn render_writes_section_2b_for_a_clean_storm() {
    let (m, noisy) = rendered(&clean());
    assert_eq!(m, CLEAN);
    assert!(noisy.is_empty(), "{noisy:?}");
}

#[test]
fn render_writes_section_2b_and_the_noise_for_a_missed_storm() {
    let (m, noisy) = rendered(&missed());
    assert_eq!(m, MISSED);
    assert_eq!(
        noisy,
        ["exhaustion storm: other processes used 56% of a core"]
    );
}
