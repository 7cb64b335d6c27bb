//! One row of the matrix: the console (or the host's check script) parsed line by line
//! into the agent's records, the tests' results, and what makes the row a failure.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{
    guest::{MARK, TEST_SECS},
    report::programs,
    Kernel,
};
use crate::{step, workspace_root};

pub(super) struct TestResult {
    pub(super) name: String,
    pub(super) ok: bool,
    pub(super) secs: Option<f64>,
    pub(super) output: Vec<String>,
    pub(super) exit: Option<i32>,
}

pub(super) struct Row {
    pub(super) kernel: Kernel,
    pub(super) log: PathBuf,
    pub(super) release: Option<String>,
    pub(super) accel: String,
    pub(super) booted_at: Option<f64>,
    pub(super) agent: Vec<Value>,
    pub(super) agent_stderr: Vec<String>,
    pub(super) agent_exit: Option<i32>,
    pub(super) doctor: Vec<String>,
    pub(super) doctor_exit: Option<i32>,
    pub(super) skipped: Option<String>,
    /// The hook families the tests ran with, and how many runs that planned.
    pub(super) families: Vec<String>,
    planned: Option<usize>,
    pub(super) running: Option<String>,
    pub(super) tests: Vec<TestResult>,
    outputs: HashMap<String, Vec<String>>,
    pub(super) warnings: Vec<String>,
    done: bool,
    panic_line: Option<String>,
    last_line: String,
    /// How qemu (or the host's check script) exited.
    pub(super) exit: Option<String>,
    pub(super) problem: Option<String>,
    pub(super) wall: Duration,
}

impl Row {
    pub(super) fn new(kernel: Kernel, out_dir: &Path) -> Row {
        Row {
            kernel,
            log: out_dir.join(format!("{}.log", kernel.label())),
            release: None,
            accel: "-".into(),
            booted_at: None,
            agent: Vec::new(),
            agent_stderr: Vec::new(),
            agent_exit: None,
            doctor: Vec::new(),
            doctor_exit: None,
            skipped: None,
            families: Vec::new(),
            planned: None,
            running: None,
            tests: Vec::new(),
            outputs: HashMap::new(),
            warnings: Vec::new(),
            done: false,
            panic_line: None,
            last_line: String::new(),
            exit: None,
            problem: None,
            wall: Duration::ZERO,
        }
    }

    pub(super) fn log_rel(&self) -> String {
        self.log
            .strip_prefix(workspace_root())
            .unwrap_or(&self.log)
            .display()
            .to_string()
    }

    pub(super) fn ready(&self) -> Option<&Value> {
        self.agent.iter().find(|v| v["event"] == "ready")
    }

    pub(super) fn degraded(&self) -> Vec<String> {
        self.agent
            .iter()
            .filter(|v| v["event"] == "degraded")
            .map(|v| {
                let s = |k: &str| match &v[k] {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    x => Some(x.to_string()),
                };
                match (s("feature"), s("missing")) {
                    (Some(f), Some(m)) => format!("{f} (missing {m})"),
                    (Some(f), None) => f,
                    (None, Some(m)) => format!("missing {m}"),
                    (None, None) => s("reason").unwrap_or_else(|| v.to_string()),
                }
            })
            .collect()
    }

    /// One line of the console (or of the host's check script).
    pub(super) fn line(&mut self, raw: &str) {
        if !raw.trim().is_empty() {
            self.last_line = raw.trim().to_string();
        }
        if self.panic_line.is_none() && raw.contains("Kernel panic") {
            self.panic_line = Some(raw.trim().to_string());
        }
        // Kernel messages can share a console line with a marker: it starts where MARK does.
        let Some(at) = raw.find(MARK) else { return };
        let mut f = raw[at + MARK.len()..].splitn(2, '|');
        let kind = f.next().unwrap_or_default();
        let rest = f.next().unwrap_or_default();
        let label = self.kernel.label();
        match kind {
            "init" => {
                let mut p = rest.split('|');
                self.release = p.next().map(str::to_string);
                self.booted_at = p.next().and_then(|s| s.parse().ok());
                step(&format!(
                    "{label}: {} is up after {:.1} s; starting the agent",
                    self.release.as_deref().unwrap_or("?"),
                    self.booted_at.unwrap_or_default()
                ));
            }
            "agent" => {
                if let Ok(v) = serde_json::from_str::<Value>(rest) {
                    self.agent.push(v);
                }
            }
            "agent-stderr" => self.agent_stderr.push(rest.to_string()),
            "agent-exit" => self.on_agent_exit(rest),
            "doctor" => self.doctor.push(rest.to_string()),
            "doctor-exit" => self.doctor_exit = rest.parse().ok(),
            "skip" => self.skipped = Some(rest.to_string()),
            "families" => self.on_families(rest),
            "warn" => {
                step(&format!("{label}: {rest}"));
                self.warnings.push(rest.to_string());
            }
            "test-start" => {
                self.running = rest.split('|').next().map(str::to_string);
            }
            "test-out" => {
                if let Some((name, line)) = rest.split_once('|') {
                    self.outputs
                        .entry(name.to_string())
                        .or_default()
                        .push(line.to_string());
                }
            }
            "test" => self.on_test(rest),
            "done" => self.done = true,
            _ => {}
        }
    }

    /// `agent-exit|RC|READY`: the agent stopped; say whether it had started.
    fn on_agent_exit(&mut self, rest: &str) {
        let label = self.kernel.label();
        self.agent_exit = rest.split('|').next().and_then(|s| s.parse().ok());
        match self.ready() {
            Some(r) => step(&format!(
                "{label}: agent ready in {} ms; programs: {}; degraded: {}",
                r["startup_ms"],
                programs(r),
                self.degraded_cell()
            )),
            None => step(&format!(
                "{label}: the agent did not start (exit {}): {}",
                rest.split('|').next().unwrap_or("?"),
                self.stderr_excerpt()
            )),
        }
    }

    /// `families|FAMILIES|RUNS`: the hook families the tests run with, and how many runs.
    fn on_families(&mut self, rest: &str) {
        let label = self.kernel.label();
        let mut p = rest.split('|');
        self.families = p
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        self.planned = p.next().and_then(|n| n.trim().parse().ok());
        step(&format!(
            "{label}: {} test runs with hooks: {}",
            self.planned.map_or("?".into(), |n| n.to_string()),
            self.families.join(", ")
        ));
    }

    /// `test|ok or FAILED|NAME@FAMILY|START|END|RC`: one test run finished.
    fn on_test(&mut self, rest: &str) {
        let label = self.kernel.label();
        let p: Vec<&str> = rest.split('|').collect();
        if p.len() >= 2 {
            let secs = match (p.get(2), p.get(3)) {
                (Some(a), Some(b)) => match (a.parse::<f64>(), b.parse::<f64>()) {
                    (Ok(a), Ok(b)) => Some(b - a),
                    _ => None,
                },
                _ => None,
            };
            let ok = p[0] == "ok";
            let exit = p.get(4).and_then(|s| s.parse().ok());
            let output = self.outputs.remove(p[1]).unwrap_or_default();
            step(&format!(
                "{label}: {} {}{}{}",
                p[1],
                if ok { "ok" } else { "FAILED" },
                secs.map(|s| format!(" ({s:.1} s)")).unwrap_or_default(),
                if ok {
                    String::new()
                } else {
                    format!(": {}", failure_excerpt(&output, exit, secs))
                }
            ));
            self.tests.push(TestResult {
                name: p[1].to_string(),
                ok,
                secs,
                output,
                exit,
            });
            self.running = None;
        }
    }

    /// The line that says why the agent failed: the first one that names an error.
    fn stderr_excerpt(&self) -> String {
        let lines: Vec<&str> = self
            .agent_stderr
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        let pick = lines
            .iter()
            .find(|l| l.to_ascii_lowercase().contains("error"))
            .or(lines.first())
            .copied()
            .unwrap_or("(no stderr)");
        clip(pick, 240)
    }

    /// Decide what, if anything, makes this row a failure of the kernel itself.
    pub(super) fn finish(&mut self, tests: &[(&str, &str)]) {
        if self.problem.is_some() {
            return;
        }
        let log = self.log_rel();
        if self.agent_exit.is_some() && self.ready().is_none() {
            self.problem = Some(format!(
                "the agent did not start (exit {}): {}; log: {log}",
                self.agent_exit.unwrap_or(-1),
                self.stderr_excerpt()
            ));
        } else if !self.done {
            let how = format!(
                "{}last line: {}",
                self.exit
                    .as_deref()
                    .map(|e| format!("{e}; "))
                    .unwrap_or_default(),
                clip(&self.last_line, 200)
            );
            let why = if self.booted_at.is_none() {
                match &self.panic_line {
                    Some(p) => format!("the kernel panicked before init: {}", clip(p, 200)),
                    None => format!("the guest stopped before init ({how})"),
                }
            } else {
                format!(
                    "stopped before the checks finished{} ({how})",
                    self.running
                        .as_deref()
                        .map(|t| format!(", during {t}"))
                        .unwrap_or_default(),
                )
            };
            self.problem = Some(format!("{why}; log: {log}"));
        } else if self.tests.len() < self.planned.unwrap_or(tests.len()) && self.skipped.is_none() {
            self.problem = Some(format!(
                "only {} of {} test runs reported; log: {log}",
                self.tests.len(),
                self.planned.unwrap_or(tests.len())
            ));
        } else if self.tests.iter().any(|t| !t.ok) {
            let names: Vec<&str> = self
                .tests
                .iter()
                .filter(|t| !t.ok)
                .map(|t| t.name.as_str())
                .collect();
            self.problem = Some(format!(
                "{} of {} tests failed: {}; log: {log}",
                names.len(),
                self.tests.len(),
                names.join(", ")
            ));
        }
    }

    pub(super) fn failed(&self) -> bool {
        self.problem.is_some()
    }
}

/// The panic message of a failed test (the line after "panicked at"), or why it has none.
fn failure_excerpt(output: &[String], exit: Option<i32>, secs: Option<f64>) -> String {
    if secs.is_some_and(|s| s >= f64::from(TEST_SECS)) {
        return format!("killed after {TEST_SECS} s");
    }
    let msg = output
        .iter()
        .position(|l| l.contains("panicked at"))
        .and_then(|i| output.get(i + 1));
    match msg {
        Some(m) => clip(m.trim(), 200),
        None if output.iter().any(|l| l.contains("0 passed; 0 failed")) => {
            "no such test in the binary".into()
        }
        None => format!("exit {}", exit.map_or("?".into(), |e| e.to_string())),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::report::matrix_md;

    fn row(lines: &[&str], tests: &[(&str, &str)]) -> Row {
        let mut r = Row::new(Kernel::V5_10, Path::new("/nonexistent"));
        for l in lines {
            r.line(l);
        }
        r.finish(tests);
        r
    }

    #[test]
    fn an_agent_that_never_gets_ready_is_one_line_with_its_error() {
        let r = row(
            &[
                "[    0.000000] Linux version 5.10.0-32-cloud-amd64",
                "PWVM|init|5.10.0-32-cloud-amd64|3.30",
                "PWVM|agent-start|3.31",
                "PWVM|agent-stderr|Error: loading sys_exit_listen: the verifier rejected it",
                "PWVM|agent-stderr|0: (bf) r6 = r1",
                "PWVM|agent-exit|1|0",
                "PWVM|doctor|FAIL program sys_exit_listen rejected",
                "PWVM|doctor-exit|1",
                "PWVM|skip|the agent did not start",
                "PWVM|done|9.1",
            ],
            &[("pipeline", "udp_conflict")],
        );
        let p = r.problem.as_deref().unwrap();
        assert!(
            p.starts_with("the agent did not start (exit 1): Error: loading sys_exit_listen"),
            "{p}"
        );
        assert!(p.ends_with("log: /nonexistent/5.10.log"), "{p}");
        assert!(!p.contains('\n'));
        assert!(matrix_md(&[r]).contains("not run: the agent did not start"));
    }

    #[test]
    fn markers_are_found_behind_kernel_messages_and_carriage_returns() {
        let ready =
            r#"{"type":"agent","event":"ready","programs":["sys_enter_bind"],"startup_ms":2237}"#;
        let degraded =
            r#"{"type":"agent","event":"degraded","feature":"fexit","missing":"BPF trampolines"}"#;
        let r = row(
            &[
                "PWVM|init|6.12.117+deb13-cloud-amd64|3.2",
                &format!("PWVM|agent|{degraded}"),
                &format!("[   12.5] random: crng init done PWVM|agent|{ready}"),
                "PWVM|agent-exit|0|1",
                "PWVM|test-start|udp_conflict|10.0",
                "PWVM|test|ok|udp_conflict|10.0|13.25|0",
                "PWVM|test-start|udp_holder|13.3",
                "PWVM|test-out|udp_holder|thread 'udp_holder' panicked at tests/tests/attribution.rs:9:5:",
                "PWVM|test-out|udp_holder|assertion failed: holder",
                "PWVM|test|FAILED|udp_holder|13.3|15.0|101",
                "PWVM|done|15.1\r",
            ],
            &[("pipeline", "udp_conflict"), ("attribution", "udp_holder")],
        );
        assert_eq!(r.ready().unwrap()["startup_ms"], 2237);
        assert_eq!(r.degraded(), ["fexit (missing BPF trampolines)"]);
        assert_eq!(r.tests.len(), 2);
        assert!((r.tests[0].secs.unwrap() - 3.25).abs() < 1e-9);
        assert_eq!(
            failure_excerpt(&r.tests[1].output, r.tests[1].exit, r.tests[1].secs),
            "assertion failed: holder"
        );
        assert_eq!(
            r.problem.as_deref(),
            Some("1 of 2 tests failed: udp_holder; log: /nonexistent/5.10.log")
        );
    }

    #[test]
    fn a_guest_that_stops_early_says_where() {
        let r = row(
            &[
                "PWVM|init|6.1.0-50-cloud-amd64|4.2",
                r#"PWVM|agent|{"type":"agent","event":"ready","programs":[]}"#,
                "PWVM|agent-exit|0|1",
                "PWVM|test-start|time_wait_counts_match_ss|20.0",
                "[   30.1] Out of memory: Killed process 1 (init)",
            ],
            &[("attribution", "time_wait_counts_match_ss")],
        );
        let p = r.problem.unwrap();
        assert!(
            p.starts_with("stopped before the checks finished, during time_wait_counts_match_ss"),
            "{p}"
        );
        let r = row(
            &["[    3.5] Kernel panic - not syncing: VFS: Unable to mount root fs"],
            &[],
        );
        assert!(r
            .problem
            .unwrap()
            .starts_with("the kernel panicked before init"));
    }
}
