//! Where records go: stdout (flushed per line) and the log file.
//!
//! The log file is append-only, rotated by size (`--log-max-size`, `--log-keep`), and
//! reopened on SIGHUP so logrotate works too. Each line is one write(2) on an O_APPEND file,
//! and a write that fails half-way (a full disk) is cut back to the last whole line, so no
//! record is ever split. A failing write is counted and reported; the agent keeps going and
//! resumes writing when the path is writable or space returns.
//!
//! Rotation is done here rather than with a rotation crate: the candidates we looked at
//! (file-rotate 0.8) panic when the directory cannot be created and drop writes silently when
//! the file cannot be reopened, and both break the "never lose a record silently" rule.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::error::{Error, Result};

pub const DEFAULT_LOG: &str = "/var/log/portwatch/events.jsonl";

pub fn open_log(path: &Path) -> Result<File> {
    open_append(path).map_err(|source| Error::LogFile {
        path: path.into(),
        source,
    })
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Path of the n-th rotated file: events.jsonl.1, events.jsonl.2, ...
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// What happened to the log file on a write, for the caller to report.
#[derive(Debug, PartialEq, Eq)]
pub enum LogEvent {
    Ok,
    /// First failure after a good stretch: report it.
    Failed(String),
    /// Still failing (counted, not reported again).
    StillFailing,
    /// Writing works again after `failed` lost lines.
    Resumed {
        failed: u64,
    },
}

pub struct LogFile {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    file: Option<File>,
    len: u64,
    /// Lines that could not be written, since start.
    pub errors: u64,
    failing_since: Option<u64>,
    retry_at: Option<Instant>,
}

impl LogFile {
    pub fn new(path: PathBuf, file: File, max_size: u64, keep: u32) -> Self {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        LogFile {
            path,
            max_size,
            keep,
            file: Some(file),
            len,
            errors: 0,
            failing_since: None,
            retry_at: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SIGHUP: close and reopen by name (after an external rotation, say).
    pub fn reopen(&mut self) {
        self.file = None;
        self.retry_at = None;
    }

    fn ensure_open(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(std::io::Error::other("waiting before retrying to open"));
        }
        match open_append(&self.path) {
            Ok(f) => {
                self.len = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
                self.retry_at = None;
                Ok(())
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                Err(e)
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(rotated(&self.path, self.keep));
            for n in (1..self.keep).rev() {
                let from = rotated(&self.path, n);
                if from.exists() {
                    std::fs::rename(&from, rotated(&self.path, n + 1))?;
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.len = 0;
        self.ensure_open()
    }

    /// Write one whole line (ending in '\n').
    #[cfg(test)]
    pub fn write_line(&mut self, line: &[u8]) -> LogEvent {
        self.write_lines(line)
    }

    /// Write whole lines (each ending in '\n'), rotating between lines where the size limit
    /// falls, so no line is ever split across files.
    pub fn write_lines(&mut self, mut buf: &[u8]) -> LogEvent {
        let mut result = LogEvent::Ok;
        while !buf.is_empty() {
            // The longest run of whole lines that fits before the limit (at least one line).
            // Usually everything fits and nothing needs scanning: this runs on every batch.
            let room = if self.max_size == 0 {
                u64::MAX
            } else {
                self.max_size.saturating_sub(self.len)
            };
            let end = if (buf.len() as u64) <= room {
                buf.len()
            } else {
                let cut = room as usize; // < buf.len()
                match buf[..cut].iter().rposition(|b| *b == b'\n') {
                    Some(i) => i + 1,
                    None => buf
                        .iter()
                        .position(|b| *b == b'\n')
                        .map_or(buf.len(), |i| i + 1),
                }
            };
            let (chunk, rest) = buf.split_at(end);
            let ev = self.write_chunk(chunk);
            // Report the most significant thing that happened in this batch.
            result = match (result, ev) {
                (LogEvent::Failed(r), _) | (_, LogEvent::Failed(r)) => LogEvent::Failed(r),
                (LogEvent::Resumed { failed }, _) | (_, LogEvent::Resumed { failed }) => {
                    LogEvent::Resumed { failed }
                }
                (LogEvent::StillFailing, _) | (_, LogEvent::StillFailing) => LogEvent::StillFailing,
                _ => LogEvent::Ok,
            };
            buf = rest;
        }
        result
    }

    fn write_chunk(&mut self, chunk: &[u8]) -> LogEvent {
        let r = (|| -> std::io::Result<()> {
            self.ensure_open()?;
            if self.max_size > 0 && self.len > 0 && self.len + chunk.len() as u64 > self.max_size {
                self.rotate()?;
            }
            let f = self.file.as_mut().expect("opened above");
            match f.write(chunk) {
                Ok(n) if n == chunk.len() => {
                    self.len += n as u64;
                    Ok(())
                }
                Ok(n) => {
                    // Disk full part-way: cut the partial lines off again.
                    let _ = f.set_len(self.len);
                    Err(std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!("short write ({n} of {} bytes)", chunk.len()),
                    ))
                }
                Err(e) => {
                    let _ = f.set_len(self.len);
                    Err(e)
                }
            }
        })();
        match r {
            Ok(()) => match self.failing_since.take() {
                Some(at) => LogEvent::Resumed {
                    failed: self.errors - at,
                },
                None => LogEvent::Ok,
            },
            Err(e) => {
                if e.kind() != std::io::ErrorKind::StorageFull
                    && e.raw_os_error() != Some(libc::ENOSPC)
                {
                    // The file may have been removed or its directory made unwritable: reopen.
                    self.file = None;
                    if self.retry_at.is_none() {
                        self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
                let first = self.failing_since.is_none();
                if first {
                    self.failing_since = Some(self.errors);
                }
                // Counted only here, on the rare failing path.
                self.errors += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                if first {
                    LogEvent::Failed(format!("writing {} failed: {e}", self.path.display()))
                } else {
                    LogEvent::StillFailing
                }
            }
        }
    }
}

/// Lines are collected per batch of events and written with one write(2) per sink when the
/// batch is done (`flush`): complete lines, no delay beyond the batch, and a syscall per
/// batch instead of two per record.
pub struct Output {
    stdout: std::io::Stdout,
    pub log: Option<LogFile>,
    pub stdout_errors: u64,
    pub lines: u64,
    out_buf: Vec<u8>,
    log_buf: Vec<u8>,
}

impl Output {
    pub fn new(log: Option<LogFile>) -> Self {
        Output {
            stdout: std::io::stdout(),
            log,
            stdout_errors: 0,
            lines: 0,
            out_buf: Vec::with_capacity(64 * 1024),
            log_buf: Vec::with_capacity(64 * 1024),
        }
    }

    pub fn log_errors(&self) -> u64 {
        self.log.as_ref().map_or(0, |l| l.errors)
    }

    /// A line for stdout only (a notice about the log file itself).
    pub fn stdout_line(&mut self, line: &[u8]) {
        self.out_buf.extend_from_slice(line);
    }

    /// `line` must end with '\n'. Written at the next `flush`.
    pub fn write_line(&mut self, line: &[u8]) {
        self.lines += 1;
        self.out_buf.extend_from_slice(line);
        if self.log.is_some() {
            self.log_buf.extend_from_slice(line);
        }
    }

    /// Write what is pending; returns what happened to the log file.
    pub fn flush(&mut self) -> LogEvent {
        if !self.out_buf.is_empty() {
            let mut out = self.stdout.lock();
            if out
                .write_all(&self.out_buf)
                .and_then(|_| out.flush())
                .is_err()
            {
                self.stdout_errors += 1;
            }
            self.out_buf.clear();
        }
        let ev = match &mut self.log {
            Some(l) if !self.log_buf.is_empty() => l.write_lines(&self.log_buf),
            _ => LogEvent::Ok,
        };
        self.log_buf.clear();
        ev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pw-sink-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotates_by_size_without_splitting_lines() {
        let d = tmp("rot");
        let p = d.join("events.jsonl");
        let mut l = LogFile::new(p.clone(), open_log(&p).unwrap(), 100, 2);
        for i in 0..30 {
            assert_eq!(
                l.write_line(format!("{{\"n\":{i:02}}}\n").as_bytes()),
                LogEvent::Ok
            );
        }
        let all: Vec<String> = [rotated(&p, 2), rotated(&p, 1), p.clone()]
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(!rotated(&p, 3).exists(), "only --log-keep files are kept");
        for f in [rotated(&p, 2), rotated(&p, 1), p.clone()] {
            let s = std::fs::read_to_string(&f).unwrap();
            assert!(s.len() <= 100, "{} is {} bytes", f.display(), s.len());
            assert!(s.ends_with('\n'));
        }
        // Newest lines, in order, none split.
        let expect: Vec<String> = (30 - all.len()..30)
            .map(|i| format!("{{\"n\":{i:02}}}"))
            .collect();
        assert_eq!(all, expect);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_batch_of_lines_rotates_between_lines() {
        let d = tmp("batch");
        let p = d.join("events.jsonl");
        let mut l = LogFile::new(p.clone(), open_log(&p).unwrap(), 25, 3);
        let batch: String = (0..6).map(|i| format!("line-{i}\n")).collect(); // 7 bytes each
        assert_eq!(l.write_lines(batch.as_bytes()), LogEvent::Ok);
        assert_eq!(
            std::fs::read_to_string(rotated(&p, 1)).unwrap(),
            "line-0\nline-1\nline-2\n"
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "line-3\nline-4\nline-5\n"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn failure_is_counted_and_resumes() {
        let d = tmp("fail");
        let p = d.join("sub/events.jsonl");
        let mut l = LogFile::new(p.clone(), open_log(&p).unwrap(), 0, 1);
        assert_eq!(l.write_line(b"a\n"), LogEvent::Ok);
        // The directory goes away and a plain file takes its place: opening fails.
        std::fs::remove_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub"), "x").unwrap();
        l.reopen();
        assert!(matches!(l.write_line(b"b\n"), LogEvent::Failed(_)));
        assert_eq!(l.write_line(b"c\n"), LogEvent::StillFailing);
        assert_eq!(l.errors, 2);
        std::fs::remove_file(d.join("sub")).unwrap();
        l.retry_at = None;
        assert_eq!(l.write_line(b"d\n"), LogEvent::Resumed { failed: 2 });
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "d\n");
        let _ = std::fs::remove_dir_all(d);
    }
}
