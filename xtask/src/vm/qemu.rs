//! qemu's command line and the accelerator (KVM or TCG) it runs with.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Result};

use super::{
    cpio::Cpio, guest::PROBE_INIT, initramfs::add_busybox, kernels::KernelFiles, output, row::Row,
    runner::supervise, Kernel,
};
use crate::{setup, step};

pub(super) fn qemu(accel: &Accel, vmlinuz: &Path, initrd: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // Single-threaded TCG: with a thread per vCPU, the guest kernel's live text patching
    // (enabling a tracepoint flips static keys through int3) raced the other vCPU's stale
    // translations and oopsed in syscall_exit_to_user_mode_prepare (seen on 6.12).
    // PORTWATCH_VM_TCG_THREAD=multi gives each vCPU a host thread (for vm-bench, where the
    // agent and the load should not share one).
    let accel_arg = if accel.name == "tcg" {
        match std::env::var("PORTWATCH_VM_TCG_THREAD").as_deref() {
            Ok("multi") => "tcg,thread=multi".to_string(),
            _ => "tcg,thread=single".to_string(),
        }
    } else {
        accel.name.to_string()
    };
    c.args(["-machine", "q35", "-accel", &accel_arg])
        .args(["-cpu", if accel.name == "kvm" { "host" } else { "max" }])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots at once, and -no-reboot turns that into qemu exiting. Under TCG
        // every syscall pays for the speculation mitigations, and the tests make millions.
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init mitigations=off",
        ]);
    c
}

#[derive(Clone)]
pub(super) struct Accel {
    pub(super) name: &'static str,
}

/// KVM where a guest actually boots with it, else TCG. Some hosts expose /dev/kvm yet hang
/// every guest (broken nested virtualisation), so a short probe boot decides, once per host
/// kernel; PORTWATCH_VM_ACCEL=kvm|tcg overrides.
pub(super) fn detect_accel(kf: &KernelFiles, busybox: &Path, out_dir: &Path) -> Result<Accel> {
    let chosen = |name: &'static str, why: &str| {
        step(&format!("accelerator: {name} ({why})"));
        Ok(Accel { name })
    };
    match std::env::var("PORTWATCH_VM_ACCEL").ok().as_deref() {
        Some("kvm") => return chosen("kvm", "PORTWATCH_VM_ACCEL"),
        Some("tcg") => return chosen("tcg", "PORTWATCH_VM_ACCEL"),
        Some("") | None => {}
        Some(x) => bail!("PORTWATCH_VM_ACCEL={x}: use kvm or tcg"),
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return chosen("tcg", "/dev/kvm is missing or not usable");
    }
    let host = output(Command::new("uname").arg("-r"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let cache = setup::cache_dir().join("vm").join(format!("accel-{host}"));
    let overrides = "PORTWATCH_VM_ACCEL=kvm|tcg overrides";
    match std::fs::read_to_string(&cache)
        .ok()
        .as_deref()
        .map(str::trim)
    {
        Some("kvm") => {
            return chosen(
                "kvm",
                &format!("probed earlier, cached in {}; {overrides}", cache.display()),
            )
        }
        Some("tcg") => {
            return chosen(
                "tcg",
                &format!(
                    "a KVM guest did not boot when probed, cached in {}; {overrides}",
                    cache.display()
                ),
            )
        }
        _ => {}
    }
    step("probing KVM with a short boot (up to 30 s, once per host kernel)");
    let image = out_dir.join("probe.cpio");
    let mut cpio = Cpio::default();
    add_busybox(&mut cpio, busybox)?;
    cpio.file("init", PROBE_INIT.as_bytes(), 0o755)?;
    std::fs::write(&image, cpio.finish())?;
    let mut row = Row::new(Kernel::Host, out_dir);
    row.log = out_dir.join("kvm-probe.log");
    let kvm = Accel { name: "kvm" };
    supervise(
        &mut row,
        qemu(&kvm, &kf.vmlinuz, &image),
        Some(Duration::from_secs(30)),
        Duration::from_secs(30),
    );
    let works = std::fs::read_to_string(&row.log).is_ok_and(|l| l.contains("PWVM|probe"));
    std::fs::create_dir_all(cache.parent().expect("has a parent"))?;
    std::fs::write(&cache, if works { "kvm\n" } else { "tcg\n" })?;
    if works {
        chosen("kvm", &format!("a probe boot worked; {overrides}"))
    } else {
        chosen(
            "tcg",
            &format!(
                "a KVM guest did not boot within 30 s (log: {}); cached in {}; {overrides}",
                row.log_rel(),
                cache.display()
            ),
        )
    }
}
