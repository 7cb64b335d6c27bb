//! The guest's initramfs: busybox, iproute2, the agent, the test binaries, their shared
//! libraries, the kernel's modules, and the scripts.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{
    cpio::Cpio,
    guest::{tests_list, TestBins, INIT, READY_SECS, TEST_SECS},
    kernels::KernelFiles,
    output, which,
};
use crate::{step, workspace_root};

/// What the guest runs: its script (`CHECKS` or `BENCH`), the tests it lists, and binaries
/// beyond the agent and the test binaries (at their host paths).
#[derive(Clone, Copy)]
pub(super) struct Payload<'a> {
    pub(super) tests: &'a [(&'a str, &'a str)],
    pub(super) script: &'a str,
    pub(super) extra: &'a [PathBuf],
}

/// The guest's initramfs. Our own binaries lose their debug sections on the way (smaller
/// archive, faster unpacking under TCG); their code is what the host runs.
pub(super) fn build_image(
    image: &Path,
    busybox: &Path,
    kf: &KernelFiles,
    agent: &Path,
    bins: &TestBins,
    run: &Payload<'_>,
) -> Result<()> {
    let Payload {
        tests,
        script,
        extra,
    } = *run;
    step(&format!("building {}", image.display()));
    let mut cpio = Cpio::default();
    add_skeleton(&mut cpio)?;
    add_busybox(&mut cpio, busybox)?;

    let ip = which("ip").context("iproute2's ip is not installed")?;
    let ss = which("ss").context("iproute2's ss is not installed")?;
    let strip_dir = workspace_root().join("target/vm/stripped");
    std::fs::create_dir_all(&strip_dir)?;
    let stripped = |p: &Path| -> Result<Vec<u8>> {
        let tmp = strip_dir.join(p.file_name().expect("a file"));
        let ok = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(p)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let bytes = std::fs::read(if ok { &tmp } else { p })
            .with_context(|| format!("reading {}", p.display()))?;
        let _ = std::fs::remove_file(&tmp);
        Ok(bytes)
    };
    let mut elves: Vec<PathBuf> = vec![ip.clone(), ss.clone(), agent.into(), bins.hold.clone()];
    cpio.file(&rel(&ip), &std::fs::read(&ip)?, 0o755)?;
    cpio.file(&rel(&ss), &std::fs::read(&ss)?, 0o755)?;
    cpio.file("pw/bin/portwatch", &stripped(agent)?, 0o755)?;
    cpio.file(&rel(&bins.hold), &stripped(&bins.hold)?, 0o755)?;
    let guest_test = |p: &Path| Path::new("/pw/tests").join(p.file_name().expect("a file"));
    for bin in bins.by_target.values() {
        cpio.file(&rel(&guest_test(bin)), &stripped(bin)?, 0o755)?;
        elves.push(bin.clone());
    }
    for bin in extra {
        cpio.file(&rel(bin), &stripped(bin)?, 0o755)?;
        elves.push(bin.clone());
    }
    for lib in shared_libs(&elves)? {
        cpio.file(
            &rel(&lib),
            &std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?,
            0o755,
        )?;
    }

    add_modules(&mut cpio, kf)?;
    cpio.file("pw/checks.sh", script.as_bytes(), 0o755)?;
    cpio.file(
        "pw/tests.list",
        tests_list(bins, tests, guest_test)?.as_bytes(),
        0o644,
    )?;
    let init = INIT
        .replace("@IP@", &ip.display().to_string())
        .replace("@READY@", &READY_SECS.to_string())
        .replace("@TEST@", &TEST_SECS.to_string());
    cpio.file("init", init.as_bytes(), 0o755)?;
    std::fs::write(image, cpio.finish()).with_context(|| format!("writing {}", image.display()))
}

/// The directories, /dev/console, and the few files in /etc every guest has.
fn add_skeleton(cpio: &mut Cpio) -> Result<()> {
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "root",
        "etc",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "lib/modules/pw",
        "pw/bin",
        "pw/tests",
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens the console for init before any /dev is mounted.
    cpio.node("dev/console", 0o020600, 5, 1)?;
    cpio.symlink("var/run", "../run")?;
    cpio.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    cpio.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    cpio.file(
        "etc/hosts",
        b"127.0.0.1 localhost pwvm\n::1 localhost ip6-localhost\n",
        0o644,
    )?;
    Ok(())
}

/// The kernel's modules, decompressed, and the order /init loads them in.
fn add_modules(cpio: &mut Cpio, kf: &KernelFiles) -> Result<()> {
    let mut order = String::new();
    for m in &kf.modules {
        let name = m
            .file_stem()
            .expect("a module file")
            .to_string_lossy()
            .into_owned();
        cpio.file(
            &format!("lib/modules/pw/{name}.ko"),
            &std::fs::read(m)?,
            0o644,
        )?;
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("pw/modules.list", order.as_bytes(), 0o644)
}

pub(super) fn add_busybox(cpio: &mut Cpio, busybox: &Path) -> Result<()> {
    cpio.file("bin/busybox", &std::fs::read(busybox)?, 0o755)?;
    let list = output(Command::new(busybox).arg("--list")).context("busybox --list failed")?;
    for applet in list.lines().map(str::trim) {
        // The real iproute2 replaces busybox's ip, which has no netns.
        if applet.is_empty() || applet == "busybox" || applet == "ip" {
            continue;
        }
        cpio.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    cpio.symlink("sbin/init", "../bin/busybox")
}

/// Every library `ldd` names for these binaries, and the dynamic loader.
fn shared_libs(elves: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for e in elves {
        let out = Command::new("ldd")
            .arg(e)
            .output()
            .with_context(|| format!("ldd {}", e.display()))?;
        if !out.status.success() {
            bail!(
                "ldd {} failed: {}",
                e.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                let p = PathBuf::from(p);
                if !libs.contains(&p) {
                    libs.push(p);
                }
            }
        }
    }
    Ok(libs)
}

fn rel(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_string()
}
