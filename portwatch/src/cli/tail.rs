//! `portwatch tail`: read the JSON log comfortably: rotated and compressed files included,
//! filtered, readable or raw, and followed across rotation. Malformed lines are skipped and
//! counted, never fatal.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::{
    cli::render::{human, Style},
    cli::TailArgs,
    control::Filter,
    error::{Error, Result},
    kernel::decode::Clock,
    output::{keys::Keys, sink::rotated},
};
use portwatch_schema::{Body, Record};

/// A line of the log as read: the typed record, or, for a line the schema cannot read (a
/// newer agent's type, or a field of another shape), its JSON, still filtered and shown
/// raw.
enum Seen {
    Typed(Box<Record>),
    Raw(Value),
}

impl Seen {
    /// None for a line that is no JSON object with a `type`: malformed.
    fn read(line: &str) -> Option<Seen> {
        match Record::parse(line) {
            Ok(r) if !matches!(r.body, Body::Unknown) => return Some(Seen::Typed(Box::new(r))),
            _ => {}
        }
        let v = serde_json::from_str::<Value>(line).ok()?;
        v["type"].as_str()?;
        Some(Seen::Raw(v))
    }

    fn ty(&self) -> &str {
        match self {
            Seen::Typed(r) => r.ty().known().unwrap_or(""),
            Seen::Raw(v) => v["type"].as_str().unwrap_or(""),
        }
    }

    fn ts(&self) -> Option<&str> {
        match self {
            Seen::Typed(r) => r.ts.as_deref(),
            Seen::Raw(v) => v["ts"].as_str(),
        }
    }

    fn keys(&self) -> Keys {
        match self {
            Seen::Typed(r) => Keys::of_record(r),
            Seen::Raw(v) => Keys::from_value(v),
        }
    }
}

struct Printer {
    filter: Filter,
    ty: Option<String>,
    since_ns: Option<i128>,
    json: bool,
    style: Style,
    malformed: u64,
    shown: u64,
}

pub(crate) use crate::kernel::decode::ts_ns;

impl Printer {
    fn line(&mut self, out: &mut impl Write, line: &str) -> std::io::Result<()> {
        if line.trim().is_empty() {
            return Ok(());
        }
        let Some(seen) = Seen::read(line) else {
            self.malformed += 1;
            return Ok(());
        };
        if self.ty.as_deref().is_some_and(|t| t != seen.ty()) {
            return Ok(());
        }
        if let Some(since) = self.since_ns {
            if seen.ts().and_then(ts_ns).is_some_and(|t| t < since) {
                return Ok(());
            }
        }
        if !self.filter.is_empty() && !self.filter.matches_keys(&seen.keys()) {
            return Ok(());
        }
        self.shown += 1;
        match seen {
            Seen::Typed(r) if !self.json => writeln!(out, "{}", human(&r, &self.style)),
            _ => writeln!(out, "{}", line.trim_end()),
        }
    }

    fn reader(&mut self, out: &mut impl Write, r: impl BufRead) -> std::io::Result<()> {
        // Lines are read as bytes: a log with invalid UTF-8 is malformed there, not fatal.
        for l in r.split(b'\n') {
            let l = l?;
            match std::str::from_utf8(&l) {
                Ok(s) => self.line(out, s)?,
                Err(_) => self.malformed += 1,
            }
        }
        Ok(())
    }
}

/// Oldest first: events.jsonl.N[.gz] ... events.jsonl.1[.gz], then events.jsonl.
pub(crate) fn files(path: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for n in (1..=100).rev() {
        let p = rotated(path, n);
        let mut gz = p.as_os_str().to_owned();
        gz.push(".gz");
        let gz = PathBuf::from(gz);
        if gz.exists() {
            v.push(gz);
        } else if p.exists() {
            v.push(p);
        }
    }
    v.push(path.to_path_buf());
    v
}

pub(crate) fn open_any(p: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let f = File::open(p)?;
    if p.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            f,
        ))))
    } else {
        Ok(Box::new(BufReader::new(f)))
    }
}

pub fn run(a: &TailArgs) -> Result<()> {
    let path = a
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::output::sink::DEFAULT_LOG));
    if !path.exists() && !a.follow {
        return Err(Error::Io {
            what: "opening the log",
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} does not exist; is the agent writing elsewhere (--log-file)?",
                    path.display()
                ),
            ),
        });
    }
    let mut p = Printer {
        filter: Filter {
            port: a.port,
            pid: None,
            container: a.container.clone(),
        },
        ty: a.r#type.clone(),
        since_ns: a.since.map(|d| Clock::now_wall_ns() - d.as_nanos() as i128),
        json: a.json,
        style: Style::for_stdout(),
        malformed: 0,
        shown: 0,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io = |source| Error::Io {
        what: "reading the log",
        source,
    };
    let list = files(&path);
    let (current, older) = list
        .split_last()
        .expect("files() always lists the current log");
    for f in older {
        match open_any(f) {
            Ok(r) => p.reader(&mut out, r).map_err(io)?,
            Err(e) => eprintln!("portwatch: warning: skipping {}: {e}", f.display()),
        }
    }
    if !a.follow {
        if current.exists() {
            p.reader(&mut out, open_any(current).map_err(io)?)
                .map_err(io)?;
        }
        let _ = out.flush();
        if p.malformed > 0 {
            eprintln!("portwatch: skipped {} malformed lines", p.malformed);
        }
        return Ok(());
    }
    let _ = out.flush();
    follow(&mut p, current, &mut out)
}

/// Follow the current file; when it is rotated (a new inode at the path, or truncated),
/// finish the old one and continue with the new one from its start.
fn follow(p: &mut Printer, path: &Path, out: &mut impl Write) -> Result<()> {
    let mut file: Option<(File, u64)> = None;
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reported = 0;
    loop {
        if file.is_none() {
            if let Ok(f) = File::open(path) {
                let ino = f.metadata().map(|m| m.ino()).unwrap_or(0);
                file = Some((f, ino));
                pending.clear();
            }
        }
        let mut progressed = false;
        if let Some((f, ino)) = &mut file {
            loop {
                let n = f.read(&mut buf).map_err(|source| Error::Io {
                    what: "reading the log",
                    source,
                })?;
                if n == 0 {
                    break;
                }
                progressed = true;
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    match std::str::from_utf8(&line) {
                        Ok(s) => {
                            if p.line(out, s).is_err() {
                                return Ok(()); // stdout closed
                            }
                        }
                        Err(_) => p.malformed += 1,
                    }
                }
            }
            if out.flush().is_err() {
                return Ok(());
            }
            // Rotated away, or truncated in place?
            let now = std::fs::metadata(path).ok();
            let pos = f.stream_position().unwrap_or(0);
            match now {
                Some(m) if m.ino() != *ino => file = None,
                Some(m) if m.len() < pos => {
                    let _ = f.seek(SeekFrom::Start(0));
                }
                None => file = None,
                _ => {}
            }
        }
        if p.malformed > reported {
            eprintln!("portwatch: skipped {} malformed lines so far", p.malformed);
            reported = p.malformed;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_timestamps() {
        let t = ts_ns("2026-11-25T08:31:31.123456789Z").unwrap();
        assert_eq!(t, 1_795_595_491i128 * 1_000_000_000 + 123_456_789);
        assert_eq!(
            crate::kernel::decode::rfc3339(t),
            "2026-11-25T08:31:31.123456789Z"
        );
        assert_eq!(
            ts_ns("2026-11-25T08:31:31.123456Z").unwrap() % 1_000_000_000,
            123_456_000
        );
        assert!(ts_ns("garbage").is_none());
    }

    #[test]
    fn reads_rotated_and_compressed_files_and_counts_malformed() {
        let d = std::env::temp_dir().join(format!("pw-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("events.jsonl");
        let rec = |n: u32| {
            format!("{{\"v\":1,\"ts\":\"2026-11-25T08:00:0{n}.000000000Z\",\"type\":\"conflict\",\"port\":{n}}}\n")
        };
        // .2.gz (oldest), .1, current with junk in it
        let mut gz = flate2::write::GzEncoder::new(
            File::create(rotated(&p, 2).with_extension("2.gz")).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(rec(1).as_bytes()).unwrap();
        gz.finish().unwrap();
        std::fs::write(rotated(&p, 1), rec(2)).unwrap();
        std::fs::write(
            &p,
            format!("{}not json\n{{\"half\":\n\u{0}\n{}", rec(3), rec(4)),
        )
        .unwrap();
        assert_eq!(files(&p).len(), 3);
        let mut pr = Printer {
            filter: Filter::default(),
            ty: None,
            since_ns: None,
            json: true,
            style: Style { color: false },
            malformed: 0,
            shown: 0,
        };
        let mut out = Vec::new();
        for f in files(&p) {
            pr.reader(&mut out, open_any(&f).unwrap()).unwrap();
        }
        let s = String::from_utf8(out).unwrap();
        let ports: Vec<u64> = s
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["port"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 4], "oldest first, gz included");
        assert_eq!(pr.malformed, 3);
        let _ = std::fs::remove_dir_all(d);
    }
}
