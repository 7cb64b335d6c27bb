//! The matrix's summaries: a row's table cells and JSON, the markdown table, and the files
//! matrix.md and matrix.json.

use std::{path::Path, time::Duration};

use anyhow::Result;
use serde_json::{json, Value};

use super::{row::Row, Kernel};
use crate::step;

impl Row {
    fn kernel_cell(&self) -> String {
        let k = self.kernel;
        let name = match k.suite() {
            Some(s) if s != k.label() => format!("{} ({s})", k.label()),
            _ => k.label().to_string(),
        };
        match &self.release {
            Some(r) => format!("{name} {r}"),
            None => name,
        }
    }

    pub(super) fn degraded_cell(&self) -> String {
        let d = self.degraded();
        if d.is_empty() {
            "none".into()
        } else {
            d.join("; ")
        }
    }

    pub(super) fn tests_cell(&self) -> String {
        if let Some(s) = &self.skipped {
            return format!("not run: {s}");
        }
        if self.tests.is_empty() {
            return "not run".into();
        }
        let passed = self.tests.iter().filter(|t| t.ok).count();
        let failed: Vec<&str> = self
            .tests
            .iter()
            .filter(|t| !t.ok)
            .map(|t| t.name.as_str())
            .collect();
        if failed.is_empty() {
            format!("{passed}/{} passed", self.tests.len())
        } else {
            format!(
                "{passed}/{} passed; failed: {}",
                self.tests.len(),
                failed.join(", ")
            )
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let ready = self.ready();
        json!({
            "kernel": self.kernel.label(),
            "suite": self.kernel.suite(),
            "release": self.release,
            "accelerator": self.accel,
            "ok": !self.failed(),
            "problem": self.problem,
            "log": self.log_rel(),
            "wall_s": (self.wall.as_secs_f64() * 10.0).round() / 10.0,
            "boot_s": self.booted_at.filter(|_| self.kernel != Kernel::Host),
            "ready": ready,
            "programs": ready.map(|r| r["programs"].clone()),
            "hooks": ready.map(|r| r["hooks"].clone()),
            "families": self.families,
            "startup_ms": ready.map(|r| r["startup_ms"].clone()),
            "degraded": self.agent.iter().filter(|v| v["event"] == "degraded").collect::<Vec<_>>(),
            "agent_exit": self.agent_exit,
            "agent_stderr": self.agent_stderr,
            "doctor_exit": self.doctor_exit,
            "doctor": self.doctor,
            "warnings": self.warnings,
            "tests_skipped": self.skipped,
            "tests": self.tests.iter().map(|t| json!({
                "name": t.name,
                "ok": t.ok,
                "secs": t.secs.map(|s| (s * 10.0).round() / 10.0),
                "exit": t.exit,
                "output": t.output,
            })).collect::<Vec<_>>(),
        })
    }
}

pub(super) fn programs(ready: &Value) -> String {
    match ready["programs"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| p.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        Some(_) => "none".into(),
        None => "-".into(),
    }
}

pub(super) fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub(super) fn matrix_md(rows: &[Row]) -> String {
    let mut md = String::from(
        "| kernel | accel | hooks (`auto`) | programs attached | degraded | tests (every family) | ready | wall |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ready = r.ready();
        let cell = |s: String| s.replace('|', "\\|");
        let tests = match (&r.problem, ready) {
            (Some(p), None) if r.tests.is_empty() => format!("not run: {p}"),
            _ => r.tests_cell(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(r.kernel_cell()),
            r.accel,
            ready.and_then(|v| v["hooks"].as_str()).unwrap_or("-"),
            cell(ready.map(programs).unwrap_or_else(|| "-".into())),
            cell(if ready.is_some() {
                r.degraded_cell()
            } else {
                "-".into()
            }),
            cell(tests),
            ready
                .and_then(|v| v["startup_ms"].as_u64())
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_else(|| "-".into()),
            fmt_dur(r.wall),
        ));
    }
    md
}

/// matrix.md and matrix.json in OUT_DIR, and the table on stdout.
pub(super) fn write_matrix(rows: &[Row], out_dir: &Path) -> Result<()> {
    let md = matrix_md(rows);
    std::fs::write(out_dir.join("matrix.md"), &md)?;
    std::fs::write(
        out_dir.join("matrix.json"),
        serde_json::to_string_pretty(&Value::Array(rows.iter().map(Row::to_json).collect()))?,
    )?;
    println!("\n{md}");
    step(&format!(
        "matrix written to {} and matrix.json",
        out_dir.join("matrix.md").display()
    ));
    Ok(())
}
