//! Debian's packages with a private apt state under ~/.cache/portwatch, and busybox.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{run, setup, step};

/// apt with its own sources, lists and cache under ~/.cache/portwatch/apt/SUITE: the
/// host's sources and package state stay untouched.
pub(crate) struct Apt {
    dir: PathBuf,
    suite: &'static str,
}

impl Apt {
    pub(crate) fn new(suite: &'static str) -> Result<Apt> {
        let dir = setup::cache_dir().join("apt").join(suite);
        for d in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        std::fs::write(
            dir.join("sources.list"),
            format!("deb http://deb.debian.org/debian {suite} main\n"),
        )?;
        Ok(Apt { dir, suite })
    }

    fn opts(&self, cmd: &str) -> Command {
        let mut c = Command::new(cmd);
        let d = |p: &str| self.dir.join(p).display().to_string();
        for o in [
            format!("Dir::Etc::sourcelist={}", d("sources.list")),
            "Dir::Etc::sourceparts=-".into(),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::Cache={}", d("cache")),
            // Downloads land in root's cache directory, which apt's sandbox user cannot
            // write to.
            "APT::Sandbox::User=root".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    }

    fn has_lists(&self) -> bool {
        std::fs::read_dir(self.dir.join("lists")).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
        })
    }

    pub(super) fn update(&self) -> Result<()> {
        step(&format!(
            "apt-get update for Debian {} (private state in {})",
            self.suite,
            self.dir.display()
        ));
        run(self.opts("apt-get").args(["update", "-qq"]))
            .with_context(|| format!("apt-get update for {} failed", self.suite))
    }

    pub(crate) fn ensure_lists(&self) -> Result<()> {
        if self.has_lists() {
            Ok(())
        } else {
            self.update()
        }
    }

    pub(super) fn search(&self, re: &str) -> Result<Vec<String>> {
        let out = self
            .opts("apt-cache")
            .args(["search", "--names-only", re])
            .output()
            .context("could not run apt-cache")?;
        if !out.status.success() {
            bail!(
                "apt-cache search failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// Download PKGS into DIR; with stale lists (a package superseded since the last
    /// update), update once and retry.
    pub(crate) fn download(&self, pkgs: &[String], dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let get = || {
            self.opts("apt-get")
                .args(["download", "-qq"])
                .args(pkgs)
                .current_dir(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if get() {
            return Ok(());
        }
        self.update()?;
        if get() {
            return Ok(());
        }
        bail!("apt-get download {} failed", pkgs.join(" "))
    }
}

pub(crate) fn deb_in(dir: &Path, pkg: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
                && p.extension().is_some_and(|x| x == "deb")
        })
        .with_context(|| format!("no {pkg}_*.deb in {}", dir.display()))
}

pub(crate) fn dpkg_extract(deb: &Path, into: &Path) -> Result<()> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(into))
}

/// Debian's static busybox, from bookworm, downloaded once (the .deb stays in the cache).
pub(super) fn busybox() -> Result<PathBuf> {
    let dir = setup::cache_dir().join("vm");
    let bin = dir.join("busybox");
    if bin.is_file() {
        return Ok(bin);
    }
    step("fetching Debian's busybox-static (once)");
    let apt = Apt::new("bookworm")?;
    apt.ensure_lists()?;
    let debs = dir.join("debs");
    apt.download(&["busybox-static".into()], &debs)?;
    let x = dir.join("busybox-x");
    let _ = std::fs::remove_dir_all(&x);
    dpkg_extract(&deb_in(&debs, "busybox-static")?, &x)?;
    std::fs::copy(x.join("bin/busybox"), &bin).context("the package has no bin/busybox")?;
    let _ = std::fs::remove_dir_all(&x);
    Ok(bin)
}
