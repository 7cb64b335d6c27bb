//! `cargo xtask vm-test`: the agent and its end-to-end tests on Debian's distribution
//! kernels, each booted in qemu from an initramfs, and a kernel matrix of the results.
//!
//! An initramfs needs no disk image, no network and (almost) no modules: the guest is
//! busybox, the agent, the test binaries and the host's own iproute2, and its /init prints
//! marker lines on the serial console that this side parses. The same check script runs on
//! this host for the `host` row, so every row answers the same questions the same way.
//!
//! This file holds the commands, the matrix run and two small process helpers; the rest is
//! by concern: `guest` (what the rows run, and its limits), `row` (a row's console parsed
//! into results), `report` (the matrix), `runner` (a row's process under timeouts), `qemu`
//! (the command line and the accelerator), `initramfs` and `cpio` (the guest's image), `apt`
//! and `kernels` (Debian's packages, cached), and `bench` and `bench_result`
//! (`cargo xtask vm-bench`).

mod apt;
mod bench;
mod bench_result;
mod cpio;
mod guest;
mod initramfs;
mod kernels;
mod qemu;
mod report;
mod row;
mod runner;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::ValueEnum;

use crate::{setup, step, workspace_root};

use self::{
    apt::busybox,
    guest::{build_test_bins, CHECKS, CI_TESTS, TESTS},
    initramfs::{build_image, Payload},
    kernels::fetch_kernel,
    qemu::{detect_accel, Accel},
    report::{fmt_dur, write_matrix},
    row::Row,
    runner::{run_host, run_vm},
};

pub(crate) use apt::{deb_in, dpkg_extract, Apt};
pub use bench::{bench_cmd, VmBenchArgs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// Debian 11 (bullseye)
    #[value(name = "5.10")]
    V5_10,
    /// Debian 12 (bookworm)
    #[value(name = "6.1")]
    V6_1,
    /// Debian 13 (trixie)
    #[value(name = "6.12")]
    V6_12,
    /// Debian unstable: the newest kernel Debian ships
    Sid,
    /// This machine's own kernel, without a VM
    Host,
    /// 5.10, 6.1, 6.12, sid and host
    All,
}

impl Kernel {
    fn label(self) -> &'static str {
        match self {
            Kernel::V5_10 => "5.10",
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
            Kernel::Sid => "sid",
            Kernel::Host => "host",
            Kernel::All => "all",
        }
    }

    fn suite(self) -> Option<&'static str> {
        match self {
            Kernel::V5_10 => Some("bullseye"),
            Kernel::V6_1 => Some("bookworm"),
            Kernel::V6_12 => Some("trixie"),
            Kernel::Sid => Some("sid"),
            Kernel::Host | Kernel::All => None,
        }
    }
}

/// What `cargo xtask vm-test` and `cargo xtask test` run when no kernel is named: the
/// Debian kernels still in support.
pub const DEFAULT_KERNELS: &[Kernel] = &[Kernel::V5_10, Kernel::V6_1, Kernel::V6_12];

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel to test; repeatable. Default: 5.10, 6.1 and 6.12.
    #[arg(long = "kernel", value_enum, value_name = "KERNEL")]
    pub kernels: Vec<Kernel>,
    /// Only run the in-guest tests whose name contains this string.
    #[arg(long, value_name = "FILTER")]
    pub tests: Option<String>,
    /// Only the CI subset of the in-guest tests (marked in xtask/src/vm/guest.rs).
    #[arg(long)]
    pub ci: bool,
}

/// `cargo xtask vm-test`.
pub fn run_cmd(args: VmArgs) -> Result<()> {
    let kernels = if args.kernels.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        args.kernels
    };
    run_tests(&kernels, args.tests.as_deref(), args.ci)
}

/// The kernel matrix for these kernels with every in-guest test; results in target/vm/.
pub fn run_matrix(kernels: &[Kernel]) -> Result<()> {
    run_tests(kernels, None, false)
}

fn expand(kernels: &[Kernel]) -> Vec<Kernel> {
    let mut out = Vec::new();
    for &k in kernels {
        let ks: &[Kernel] = if k == Kernel::All {
            &[
                Kernel::V5_10,
                Kernel::V6_1,
                Kernel::V6_12,
                Kernel::Sid,
                Kernel::Host,
            ]
        } else {
            std::slice::from_ref(&k)
        };
        for &k in ks {
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

/// The in-guest tests to run, as (TARGET, NAME): the CI subset with `ci`, and those whose
/// name contains FILTER.
fn select_tests(filter: Option<&str>, ci: bool) -> Result<Vec<(&'static str, &'static str)>> {
    let tests: Vec<(&str, &str)> = TESTS
        .iter()
        .filter_map(|t| t.split_once("::"))
        .filter(|(_, name)| {
            (!ci || CI_TESTS.contains(name)) && filter.is_none_or(|f| name.contains(f))
        })
        .collect();
    if tests.is_empty() {
        bail!(
            "no in-guest test matches {:?}; they are:\n  {}",
            filter.unwrap_or_default(),
            TESTS.join("\n  ")
        );
    }
    Ok(tests)
}

fn run_tests(kernels: &[Kernel], filter: Option<&str>, ci: bool) -> Result<()> {
    let kernels = expand(kernels);
    let tests = select_tests(filter, ci)?;
    let vms = kernels.iter().any(|k| *k != Kernel::Host);
    if vms {
        setup::for_vm()?;
    } else {
        setup::build()?;
    }
    let agent = crate::build_agent(true)?;
    // The guests run the static musl build, the one `cargo xtask package` ships as
    // portwatch-<version>-x86_64-linux: it needs nothing from the guest's C library, and so
    // every kernel in the matrix also runs the binary users install.
    let guest_agent = if vms {
        crate::package::musl_target()?;
        Some(crate::package::build_static()?)
    } else {
        None
    };
    let bins = build_test_bins()?;
    let out_dir = workspace_root().join("target/vm");
    std::fs::create_dir_all(&out_dir)?;

    let busybox = if vms { Some(busybox()) } else { None };
    let mut accel: Option<Result<Accel, String>> = None;
    let mut rows = Vec::new();
    for &k in &kernels {
        let t = Instant::now();
        let mut row = Row::new(k, &out_dir);
        if k == Kernel::Host {
            run_host(&mut row, &agent, &bins, &tests);
        } else {
            let r = (|| -> Result<()> {
                let bb = busybox
                    .as_ref()
                    .expect("fetched when there are VMs")
                    .as_ref()
                    .map_err(|e| anyhow!("busybox: {e:#}"))?;
                let kf = fetch_kernel(k).context("fetching the kernel failed")?;
                row.release = Some(kf.release.clone());
                let a = accel
                    .get_or_insert_with(|| {
                        detect_accel(&kf, bb, &out_dir).map_err(|e| format!("{e:#}"))
                    })
                    .clone()
                    .map_err(|e| anyhow!("choosing the accelerator failed: {e}"))?;
                row.accel = a.name.to_string();
                let image = out_dir.join(format!("{}.cpio", k.label()));
                build_image(
                    &image,
                    bb,
                    &kf,
                    guest_agent.as_deref().unwrap_or(&agent),
                    &bins,
                    &Payload {
                        tests: &tests,
                        script: CHECKS,
                        extra: &[],
                    },
                )
                .context("building the initramfs failed")?;
                run_vm(&mut row, &kf, &a, &image, tests.len());
                Ok(())
            })();
            if let Err(e) = r {
                row.problem = Some(format!("{e:#}"));
            }
        }
        row.wall = t.elapsed();
        row.finish(&tests);
        match &row.problem {
            Some(p) => step(&format!("{}: {p}", k.label())),
            None => step(&format!(
                "{}: {} in {}",
                k.label(),
                row.tests_cell(),
                fmt_dur(row.wall)
            )),
        }
        rows.push(row);
    }

    write_matrix(&rows, &out_dir)?;
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.kernel.label().to_string())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix: failures on {}", failed.join(", "));
    }
    Ok(())
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_expands_once_and_in_order() {
        assert_eq!(
            expand(&[Kernel::V6_12, Kernel::All]),
            [
                Kernel::V6_12,
                Kernel::V5_10,
                Kernel::V6_1,
                Kernel::Sid,
                Kernel::Host
            ]
        );
    }
}
