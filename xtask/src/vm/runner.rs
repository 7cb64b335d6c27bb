//! Running a row: a qemu guest or the host's check script, its output parsed into the
//! row and copied to its log, under the boot and whole-row timeouts.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{
    guest::{row_timeout, tests_list, TestBins, BOOT_TIMEOUT, CHECKS, READY_SECS, TEST_SECS},
    kernels::KernelFiles,
    output,
    qemu::{qemu, Accel},
    row::Row,
};
use crate::{step, workspace_root};

/// Run CMD with its output (stdout, then qemu's or the script's own complaints on stderr)
/// parsed line by line into ROW and copied to ROW's log; kill its process group when no
/// init marker came within `boot` or the whole run exceeds `total`.
pub(super) fn supervise(row: &mut Row, mut cmd: Command, boot: Option<Duration>, total: Duration) {
    let mut log = match File::create(&row.log) {
        Ok(f) => f,
        Err(e) => {
            row.problem = Some(format!("cannot write {}: {e}", row.log.display()));
            return;
        }
    };
    let mut child: Child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            row.problem = Some(format!("could not start {cmd:?}: {e}"));
            return;
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let lines = |out: Box<dyn std::io::Read + Send>, tx: mpsc::Sender<String>| {
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    };
    lines(Box::new(stdout), tx.clone());
    lines(Box::new(stderr), tx);
    let mut take = |row: &mut Row, line: String| {
        let _ = writeln!(log, "{line}");
        row.line(&line);
    };
    let start = Instant::now();
    let timed_out = loop {
        let (limit, is_boot) = match boot {
            Some(b) if row.booted_at.is_none() => (b, true),
            _ => (total, false),
        };
        match rx.recv_timeout(limit.saturating_sub(start.elapsed())) {
            Ok(line) => take(row, line),
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            Err(mpsc::RecvTimeoutError::Timeout) => break Some((limit, is_boot)),
        }
    };
    if timed_out.is_some() {
        // SAFETY: signalling the process group of a child we started in its own group.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        // What the killed group wrote last; a straggler outside it cannot hold us up.
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
            take(row, line);
        }
    }
    row.exit = child.wait().ok().map(|s| s.to_string());
    let log = row.log_rel();
    if let Some((limit, is_boot)) = timed_out {
        row.problem = Some(if is_boot {
            format!(
                "boot timed out after {} s (no init marker); log: {log}",
                limit.as_secs()
            )
        } else {
            format!(
                "timed out after {} s{}; log: {log}",
                limit.as_secs(),
                row.running
                    .as_deref()
                    .map(|t| format!(" during {t}"))
                    .unwrap_or_default()
            )
        });
    }
}

pub(super) fn run_vm(row: &mut Row, kf: &KernelFiles, accel: &Accel, image: &Path, tests: usize) {
    step(&format!(
        "{}: booting {} under {} (console: {})",
        row.kernel.label(),
        kf.release,
        accel.name,
        row.log_rel()
    ));
    supervise(
        row,
        qemu(accel, &kf.vmlinuz, image),
        Some(BOOT_TIMEOUT),
        row_timeout(tests),
    );
}

pub(super) fn run_host(row: &mut Row, agent: &Path, bins: &TestBins, tests: &[(&str, &str)]) {
    let r = (|| -> Result<Command> {
        let dir = workspace_root().join("target/vm/host");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("checks.sh"), CHECKS)?;
        std::fs::write(
            dir.join("tests.list"),
            tests_list(bins, tests, |p| p.into())?,
        )?;
        let mut c = Command::new("sh");
        c.arg(dir.join("checks.sh"))
            .env("PW_AGENT", agent)
            .env("PW_LIST", dir.join("tests.list"))
            .env("PW_READY_SECS", READY_SECS.to_string())
            .env("PW_TEST_SECS", TEST_SECS.to_string());
        Ok(c)
    })();
    row.release = output(Command::new("uname").arg("-r")).map(|s| s.trim().to_string());
    row.accel = "none".into();
    // Nothing to boot: the agent check stands where init would be.
    row.booted_at = Some(0.0);
    match r {
        Ok(c) => {
            step(&format!(
                "host: {} without a VM (output: {})",
                row.release.as_deref().unwrap_or("?"),
                row.log_rel()
            ));
            supervise(row, c, None, row_timeout(tests.len()));
        }
        Err(e) => row.problem = Some(format!("{e:#}")),
    }
}
