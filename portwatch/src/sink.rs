//! Where records go: stdout (flushed per line) and an optional append-only log file.
//! Each line is written with a single write(2) on an O_APPEND file, so lines never
//! interleave or split. A failing write is counted and reported once; the agent goes on.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

pub struct Output {
    stdout: std::io::Stdout,
    file: Option<(PathBuf, File)>,
    pub file_errors: u64,
    pub stdout_errors: u64,
    pub lines: u64,
}

pub fn open_log(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::LogFile {
            path: path.into(),
            source,
        })?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| Error::LogFile {
            path: path.into(),
            source,
        })
}

impl Output {
    pub fn new(file: Option<(PathBuf, File)>) -> Self {
        Output {
            stdout: std::io::stdout(),
            file,
            file_errors: 0,
            stdout_errors: 0,
            lines: 0,
        }
    }

    /// `line` must end with '\n'.
    pub fn write_line(&mut self, line: &[u8]) {
        self.lines += 1;
        let mut out = self.stdout.lock();
        if out.write_all(line).and_then(|_| out.flush()).is_err() {
            self.stdout_errors += 1;
        }
        drop(out);
        if let Some((path, f)) = &mut self.file {
            if let Err(e) = f.write_all(line) {
                if self.file_errors == 0 {
                    eprintln!(
                        "portwatch: warning: writing to {} failed ({e}); records still go to \
                         stdout, failures are counted",
                        path.display()
                    );
                }
                self.file_errors += 1;
            }
        }
    }
}
