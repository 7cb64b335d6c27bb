//! The bundle in memory, redaction, and where it is written.

use super::*;

pub(super) struct Entry {
    /// Path inside the bundle's top directory.
    pub(super) name: String,
    pub(super) about: String,
    pub(super) data: Vec<u8>,
}

/// A part that could not be gathered: written as `MISSING-<part>.txt` and listed in the
/// README, so a reader sees the gap and its reason rather than guessing from an absence.
pub(super) struct Missing {
    pub(super) part: &'static str,
    pub(super) what: &'static str,
    pub(super) why: String,
}

#[derive(Default)]
pub(super) struct Bundle {
    pub(super) entries: Vec<Entry>,
    pub(super) missing: Vec<Missing>,
    /// Values redacted from container and network metadata, scrubbed from every file last.
    pub(super) secrets: BTreeSet<String>,
    pub(super) summary: Vec<String>,
}

impl Bundle {
    pub(super) fn add(&mut self, name: impl Into<String>, about: impl Into<String>, data: Vec<u8>) {
        self.entries.push(Entry {
            name: name.into(),
            about: about.into(),
            data,
        });
    }

    pub(super) fn json(&mut self, name: &str, about: impl Into<String>, v: &impl Serialize) {
        let mut data = serde_json::to_vec_pretty(v).unwrap_or_default();
        data.push(b'\n');
        self.add(name, about, data);
    }

    pub(super) fn jsonl<S: Serialize>(
        &mut self,
        name: &str,
        about: impl Into<String>,
        items: impl IntoIterator<Item = S>,
    ) {
        let mut data = Vec::new();
        for i in items {
            if serde_json::to_writer(&mut data, &i).is_ok() {
                data.push(b'\n');
            }
        }
        self.add(name, about, data);
    }

    pub(super) fn missing(&mut self, part: &'static str, what: &'static str, why: String) {
        eprintln!("portwatch: missing {what}: {why}");
        self.missing.push(Missing { part, what, why });
    }

    /// The MISSING files and the README, which lists every file.
    pub(super) fn finish(&mut self, header: &str) {
        for m in &self.missing {
            self.entries.push(Entry {
                name: format!("MISSING-{}.txt", m.part),
                about: format!("why the {} is missing", m.what),
                data: format!("missing {}: {}\n", m.what, m.why).into_bytes(),
            });
        }
        let readme = readme(header, &self.summary, &self.entries, &self.missing);
        self.entries.insert(
            0,
            Entry {
                name: "README.txt".into(),
                about: "this file".into(),
                data: readme.into_bytes(),
            },
        );
    }

    pub(super) fn scrub(&mut self) {
        let secrets: Vec<&String> = self
            .secrets
            .iter()
            .filter(|s| s.len() >= MIN_SCRUB_LEN)
            .collect();
        for e in &mut self.entries {
            for s in &secrets {
                scrub(&mut e.data, s.as_bytes());
                // Inside JSON a value with quotes or backslashes is stored escaped.
                let escaped = serde_json::to_string(s).unwrap_or_default();
                if let Some(inner) = escaped.get(1..escaped.len().saturating_sub(1)) {
                    if inner != s.as_str() {
                        scrub(&mut e.data, inner.as_bytes());
                    }
                }
            }
        }
    }
}

/// Replace every occurrence of `needle` in `data` with REDACTED.
pub(super) fn scrub(data: &mut Vec<u8>, needle: &[u8]) {
    if needle.is_empty() || data.len() < needle.len() {
        return;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    let mut hit = false;
    while i < data.len() {
        if data[i..].starts_with(needle) {
            out.extend_from_slice(REDACTED.as_bytes());
            i += needle.len();
            hit = true;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    if hit {
        *data = out;
    }
}

pub(super) fn readme(
    header: &str,
    summary: &[String],
    entries: &[Entry],
    missing: &[Missing],
) -> String {
    let mut s = String::from(header);
    if !summary.is_empty() {
        s.push_str("\nSummary\n");
        for l in summary {
            s.push_str(&format!("  {l}\n"));
        }
    }
    s.push_str("\nFiles\n");
    let width = entries
        .iter()
        .map(|e| e.name.len())
        .chain(["README.txt".len()])
        .max()
        .unwrap_or(0);
    s.push_str(&format!("  {:<width$}  this file\n", "README.txt"));
    for e in entries {
        s.push_str(&format!("  {:<width$}  {}\n", e.name, e.about));
    }
    if !missing.is_empty() {
        s.push_str("\nMissing (each has its MISSING-<part>.txt above)\n");
        for m in missing {
            s.push_str(&format!("  {}: {}\n", m.what, m.why));
        }
    }
    s.push_str(&format!(
        "\nRedaction\n  Environment variables and labels whose name contains {} (in any case) \
         have their value replaced by {REDACTED} in docker/. Each such value of {MIN_SCRUB_LEN} \
         characters or more is also replaced wherever else it appears in this bundle. Nothing \
         else is redacted: command lines in the log and addresses in the port table are as \
         recorded. Read the files before you share them.\n",
        SECRET_NAMES.join(", ")
    ));
    s
}

// ---- redaction ----

pub(super) fn secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SECRET_NAMES.iter().any(|s| upper.contains(s))
}

/// `NAME=value` entries, with secret values replaced and remembered.
pub(super) fn redact_env(env: &[String], secrets: &mut BTreeSet<String>) -> Vec<String> {
    env.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) if secret_name(k) => {
                if !v.is_empty() {
                    secrets.insert(v.to_string());
                }
                format!("{k}={REDACTED}")
            }
            _ => e.clone(),
        })
        .collect()
}

pub(super) fn redact_map(
    m: Option<&HashMap<String, String>>,
    secrets: &mut BTreeSet<String>,
) -> BTreeMap<String, String> {
    m.into_iter()
        .flatten()
        .map(|(k, v)| {
            if secret_name(k) {
                if !v.is_empty() {
                    secrets.insert(v.clone());
                }
                (k.clone(), REDACTED.to_string())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect()
}

// ---- where the bundle goes ----

pub(super) enum Target {
    Stdout,
    File(Partial),
}

/// The bundle's temporary file next to its destination, removed unless it was renamed into
/// place: an error (or a panic) halfway leaves no truncated archive that looks complete.
pub(super) struct Partial {
    pub(super) tmp: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) file: Option<File>,
}

impl Partial {
    pub(super) fn create(dest: PathBuf) -> std::io::Result<Partial> {
        let name = dest.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "that is not a file name")
        })?;
        let dir = dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.{}.partial",
            name.to_string_lossy(),
            std::process::id()
        ));
        // 0600: the bundle holds command lines and container metadata of the whole host.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        Ok(Partial {
            tmp,
            dest,
            file: Some(file),
        })
    }

    pub(super) fn persist(mut self) -> std::io::Result<u64> {
        let f = self.file.take().expect("persisted once");
        f.sync_all()?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest)?;
        self.tmp = PathBuf::new();
        Ok(std::fs::metadata(&self.dest)?.len())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `portwatch-report-lab1-20261130T031200Z`: sortable, and safe in a file name whatever
/// the host is called.
pub(super) fn bundle_stem(host: &str, now_ns: i128) -> String {
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let ts = rfc3339(now_ns);
    let compact: String = ts[..19]
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!("portwatch-report-{host}-{compact}Z")
}

pub(super) fn target(output: Option<&Path>, stem: &str) -> Result<Target> {
    let default = format!("{stem}.tar.gz");
    let dest = match output {
        Some(p) if p == Path::new("-") => {
            if std::io::stdout().is_terminal() {
                return Err(Error::Io {
                    what: "writing the report to stdout",
                    source: std::io::Error::other(
                        "stdout is a terminal; redirect it (-o - > report.tar.gz) or give a \
                         file with -o",
                    ),
                });
            }
            return Ok(Target::Stdout);
        }
        Some(p) if p.is_dir() => p.join(default),
        Some(p) => p.to_path_buf(),
        None => PathBuf::from(default),
    };
    Partial::create(dest.clone())
        .map(Target::File)
        .map_err(|e| Error::Io {
            what: "creating the report",
            source: std::io::Error::new(
                e.kind(),
                format!(
                    "cannot write {} ({e}); choose a writable file or directory with -o",
                    dest.display()
                ),
            ),
        })
}
