//! Start-up prerequisites: privileges, kernel BTF and the tracefs mount.

use aya::util::KernelVersion;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_DEBUGFS: &str = "/sys/kernel/debug/tracing";

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process, from /proc/self/status.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Loading tracepoint programs needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN).
pub fn check_privileges() -> Result<()> {
    let caps = effective_caps();
    let has = |c: u32| caps & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    let euid = nix::unistd::geteuid();
    let mut have = vec![format!("uid {euid}")];
    have.push(
        if has(CAP_BPF) {
            "CAP_BPF"
        } else {
            "no CAP_BPF"
        }
        .into(),
    );
    have.push(
        if has(CAP_PERFMON) {
            "CAP_PERFMON"
        } else {
            "no CAP_PERFMON"
        }
        .into(),
    );
    Err(Error::NotPrivileged {
        have: have.join(", "),
    })
}

/// The running kernel's release, e.g. `6.1.0-50-cloud-amd64`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The running kernel's version as aya reads it (the release, with the real patch level
/// that Debian and Ubuntu put in /proc/version); None when it cannot be parsed.
pub fn kernel_version() -> Option<KernelVersion> {
    KernelVersion::current().ok()
}

/// The oldest kernel portwatch runs on: the ring buffer map came in 5.8.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 8, 0);

pub fn supported(v: KernelVersion) -> bool {
    v >= MIN_KERNEL
}

/// Refuse a kernel older than [`MIN_KERNEL`] with one line, before the verifier would
/// refuse it with a dump. An unparsable release is let through: the load then decides.
pub fn check_kernel() -> Result<()> {
    let release = kernel_release();
    match kernel_version() {
        Some(v) if !supported(v) => Err(Error::KernelTooOld { release }),
        _ => Ok(()),
    }
}

pub fn check_btf() -> Result<PathBuf> {
    let p = PathBuf::from(BTF_PATH);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::NoBtf { path: p })
    }
}

/// Where tracefs is, and whether portwatch had to mount it.
#[derive(Debug, Clone)]
pub struct Tracefs {
    pub path: PathBuf,
    pub mounted_by_us: bool,
}

/// Find tracefs, mounting it at /sys/kernel/tracing when it is missing (fresh boots often
/// do not mount it, and attaching a tracepoint needs its `events/` tree).
pub fn ensure_tracefs() -> Result<Tracefs> {
    for p in [TRACEFS, TRACEFS_DEBUGFS] {
        if Path::new(p).join("events").is_dir() {
            return Ok(Tracefs {
                path: p.into(),
                mounted_by_us: false,
            });
        }
    }
    nix::mount::mount(
        Some("nodev"),
        TRACEFS,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Tracefs { source: e.into() })?;
    Ok(Tracefs {
        path: TRACEFS.into(),
        mounted_by_us: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_against_the_minimum() {
        assert!(!supported(KernelVersion::new(5, 4, 0)));
        assert!(!supported(KernelVersion::new(5, 7, 255)));
        assert!(supported(KernelVersion::new(5, 8, 0)));
        assert!(supported(KernelVersion::new(5, 10, 240)));
        assert!(supported(KernelVersion::new(7, 2, 0)));
        let here = kernel_version().expect("this kernel's version parses");
        assert!(supported(here), "{here}");
    }

    #[test]
    fn cap_eff_parses() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(s), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }
}
