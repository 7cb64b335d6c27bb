//! Enrichment from /proc: command lines, and the network namespace when the kernel could
//! not read it. Pids from the kernel are not trusted blindly: a cached or freshly read
//! command line is only used when /proc/<pid>/comm still matches the comm the kernel saw,
//! so a reused pid or an exec in between does not put someone else's command line on a
//! record.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

/// tid -> (pid, comm, cmdline)
type Cached = (u32, Box<str>, Option<Arc<str>>);

/// Bounded cache of thread -> (pid, comm, cmdline). Only misses touch /proc.
pub struct ProcCache {
    root: PathBuf,
    map: HashMap<u32, Cached>,
    cap: usize,
}

impl ProcCache {
    pub fn new(root: impl Into<PathBuf>, cap: usize) -> Self {
        Self {
            root: root.into(),
            map: HashMap::with_capacity(cap.min(1024)),
            cap,
        }
    }

    /// Command line of process `pid` if its thread `tid` is still the one the kernel named
    /// `comm` (the kernel reports the thread's comm, which threads may rename).
    pub fn cmdline(&mut self, pid: u32, tid: u32, comm: &str) -> Option<Arc<str>> {
        if let Some((p, c, cmd)) = self.map.get(&tid) {
            if *p == pid && &**c == comm {
                return cmd.clone();
            }
        }
        let dir = self.root.join(pid.to_string());
        let same = |p: PathBuf| {
            std::fs::read(p)
                .is_ok_and(|c| String::from_utf8_lossy(&c).trim_end_matches('\n') == comm)
        };
        if !same(dir.join("task").join(tid.to_string()).join("comm")) && !same(dir.join("comm")) {
            // Exited and reused, or exec'd since: what /proc shows is not the actor.
            return None;
        }
        let raw = std::fs::read(dir.join("cmdline")).ok();
        let cmd = raw.map(|r| Arc::<str>::from(format_cmdline(&r)));
        if self.map.len() >= self.cap {
            self.map.clear();
        }
        self.map.insert(tid, (pid, comm.into(), cmd.clone()));
        cmd
    }

    /// Forget a process (it exited).
    pub fn forget(&mut self, pid: u32) {
        self.map.retain(|_, (p, _, _)| *p != pid);
    }

    /// `/proc/<pid>/ns/net` inode, for kernels where the programs cannot read it.
    pub fn netns(&self, pid: u32) -> u32 {
        std::fs::read_link(self.root.join(pid.to_string()).join("ns/net"))
            .ok()
            .and_then(|l| parse_ns_link(&l.to_string_lossy()))
            .unwrap_or(0)
    }
}

/// NUL-separated argv to one line; invalid UTF-8 becomes U+FFFD, so JSON stays valid.
pub fn format_cmdline(raw: &[u8]) -> String {
    let trimmed = raw.strip_suffix(b"\0").unwrap_or(raw);
    String::from_utf8_lossy(trimmed).replace('\0', " ")
}

/// `net:[4026531840]` -> 4026531840
pub fn parse_ns_link(s: &str) -> Option<u32> {
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_formatting() {
        assert_eq!(
            format_cmdline(b"nginx\0-g\0daemon off;\0"),
            "nginx -g daemon off;"
        );
        assert_eq!(format_cmdline(b"a\xffb\0"), "a\u{fffd}b");
        assert_eq!(format_cmdline(b""), "");
    }

    #[test]
    fn ns_link() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4026531840));
        assert_eq!(parse_ns_link("mnt:[1]"), None);
    }

    #[test]
    fn cache_checks_comm_against_fake_proc() {
        let dir = std::env::temp_dir().join(format!("pw-proc-{}", std::process::id()));
        let p = dir.join("4242");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("comm"), "nginx\n").unwrap();
        std::fs::write(p.join("cmdline"), b"nginx\0-g\0daemon off;\0").unwrap();
        let mut c = ProcCache::new(&dir, 8);
        std::fs::create_dir_all(p.join("task/4243")).unwrap();
        std::fs::write(p.join("task/4243/comm"), "worker-1\n").unwrap();
        assert_eq!(
            c.cmdline(4242, 4242, "nginx").as_deref(),
            Some("nginx -g daemon off;")
        );
        // A renamed thread is still this process.
        assert_eq!(
            c.cmdline(4242, 4243, "worker-1").as_deref(),
            Some("nginx -g daemon off;")
        );
        // The pid now belongs to someone else: no command line rather than a wrong one.
        assert_eq!(c.cmdline(4242, 4244, "sshd"), None);
        assert_eq!(c.cmdline(4343, 4343, "x"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
