//! Debian's cloud kernels: fetched once per suite, cached under
//! ~/.cache/portwatch/kernels, with the few modules the guest loads.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::{
    apt::{deb_in, dpkg_extract, Apt},
    output, Kernel,
};
use crate::{setup, step};

/// Socket diagnostics are modules in Debian's kernels, and with no modprobe in the guest
/// nothing autoloads them: without them `ss` and the agent's sock_diag see nothing.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "udp_diag"];

pub(super) struct KernelFiles {
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
    /// Decompressed, in load order.
    pub(super) modules: Vec<PathBuf>,
}

/// The suite's newest cloud kernel in ~/.cache/portwatch/kernels/SUITE: vmlinuz and the
/// few modules the guest loads. A complete cache is used as it is, without apt.
pub(super) fn fetch_kernel(k: Kernel) -> Result<KernelFiles> {
    let suite = k.suite().expect("a Debian kernel");
    let dir = setup::cache_dir().join("kernels").join(suite);
    let marker = dir.join("complete");
    let load = |release: &str| -> Result<KernelFiles> {
        let order = std::fs::read_to_string(dir.join("modules.order"))?;
        Ok(KernelFiles {
            release: release.to_string(),
            vmlinuz: dir.join("vmlinuz"),
            modules: order
                .lines()
                .filter(|l| !l.is_empty())
                .map(|m| dir.join("modules").join(format!("{m}.ko")))
                .collect(),
        })
    };
    if let Ok(release) = std::fs::read_to_string(&marker) {
        if dir.join("vmlinuz").is_file() {
            return load(release.trim());
        }
    }
    let apt = Apt::new(suite)?;
    apt.ensure_lists()?;
    let find = |apt: &Apt| -> Result<Vec<String>> {
        Ok(apt
            .search("^linux-image-[0-9].*-cloud-amd64$")?
            .into_iter()
            .filter(|p| !p.contains("-unsigned") && !p.ends_with("-dbg"))
            .collect())
    };
    let mut images = find(&apt)?;
    if images.is_empty() {
        apt.update()?;
        images = find(&apt)?;
    }
    let release = newest(
        images
            .iter()
            .filter_map(|p| p.strip_prefix("linux-image-").map(str::to_string))
            .collect(),
    )
    .with_context(|| format!("Debian {suite} lists no linux-image-*-cloud-amd64"))?;
    step(&format!(
        "{}: fetching linux-image-{release} from Debian {suite} (once; cached in {})",
        k.label(),
        dir.display()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let debs = dir.join("debs");
    let image = format!("linux-image-{release}");
    apt.download(std::slice::from_ref(&image), &debs)?;
    // sid splits the kernel into linux-binary-* (vmlinuz) and linux-modules-*, which its
    // linux-image-* only depends on.
    let deps = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb_in(&debs, &image)?)
            .arg("Depends"),
    )
    .unwrap_or_default();
    let parts: Vec<String> = deps
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .filter(|d| {
            *d == format!("linux-binary-{release}") || *d == format!("linux-modules-{release}")
        })
        .map(str::to_string)
        .collect();
    if !parts.is_empty() {
        apt.download(&parts, &debs)?;
    }
    let x = dir.join("x");
    for p in std::iter::once(&image).chain(&parts) {
        dpkg_extract(&deb_in(&debs, p)?, &x)?;
    }
    let vmlinuz = [
        x.join(format!("boot/vmlinuz-{release}")),
        x.join(format!("usr/lib/modules/{release}/vmlinuz")),
        x.join(format!("lib/modules/{release}/vmlinuz")),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz for {release} in the packages"))?;
    std::fs::rename(&vmlinuz, dir.join("vmlinuz"))?;
    let mods = [
        x.join(format!("lib/modules/{release}")),
        x.join(format!("usr/lib/modules/{release}")),
    ]
    .into_iter()
    .find(|p| p.join("kernel").is_dir())
    .with_context(|| format!("no modules for {release} in the packages"))?;
    let order = extract_modules(&mods, &dir.join("modules"))?;
    std::fs::write(dir.join("modules.order"), order.join("\n") + "\n")?;
    let _ = std::fs::remove_dir_all(&x);
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::write(&marker, format!("{release}\n"))?;
    load(&release)
}

/// The newest of these Debian versions.
fn newest(versions: Vec<String>) -> Option<String> {
    versions.into_iter().reduce(|a, b| {
        let b_newer = Command::new("dpkg")
            .args(["--compare-versions", &b, "gt", &a])
            .status()
            .is_ok_and(|s| s.success());
        if b_newer {
            b
        } else {
            a
        }
    })
}

/// MODULES and what they depend on, decompressed into OUT; returns their load order.
/// Modules built into the kernel are simply absent from the tree and skipped.
fn extract_modules(tree: &Path, out: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(out)?;
    let mut files = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(i) = n.find(".ko") {
                files.insert(n[..i].replace('-', "_"), p);
            }
        }
    }
    let mut order = Vec::new();
    let mut visiting = HashSet::new();
    for m in MODULES {
        add_module(m, &files, out, &mut order, &mut visiting)?;
    }
    Ok(order)
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    out: &Path,
    order: &mut Vec<String>,
    visiting: &mut HashSet<String>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if order.contains(&name) || !visiting.insert(name.clone()) {
        return Ok(());
    }
    let Some(src) = files.get(&name) else {
        return Ok(());
    };
    let s = src.to_string_lossy();
    let bytes = if s.ends_with(".ko") {
        std::fs::read(src)?
    } else {
        let tool = if s.ends_with(".xz") {
            "xz"
        } else if s.ends_with(".zst") {
            "zstd"
        } else if s.ends_with(".gz") {
            "gzip"
        } else {
            bail!("{s}: unknown module compression");
        };
        let o = Command::new(tool)
            .arg("-dc")
            .arg(src)
            .output()
            .with_context(|| format!("could not run {tool}"))?;
        if !o.status.success() {
            bail!("{tool} -dc {s} failed");
        }
        o.stdout
    };
    for dep in modinfo_depends(&bytes) {
        add_module(&dep, files, out, order, visiting)?;
    }
    std::fs::write(out.join(format!("{name}.ko")), &bytes)?;
    order.push(name);
    Ok(())
}

/// The `depends=` entry of a module's .modinfo section: NUL-separated key=value strings.
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_dependencies_come_from_modinfo() {
        let ko = b"\x7fELF....\0license=GPL\0depends=inet_diag,foo-bar\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["inet_diag", "foo-bar"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
    }
}
