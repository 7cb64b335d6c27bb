//! `cargo xtask package`: what users install, in target/package/.
//!
//! - `portwatch_<version>_amd64.deb`: the glibc build (its allocator tuning in heap.rs is
//!   glibc's), the systemd unit, a logrotate snippet, the man page, completions and
//!   /var/log/portwatch. Assembled in a staging tree and built with `dpkg-deb`; the library
//!   dependencies come from `dpkg-shlibdeps`, as in any Debian package.
//! - `portwatch-<version>-x86_64-linux`: the musl build, statically linked, so it runs on any
//!   x86_64 kernel the agent supports whatever its C library.
//! - the image `portwatch:<version>` in the local Docker engine: that static binary `FROM
//!   scratch`, so nothing is pulled.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{run, setup, step, workspace_root};

/// The static build's target. Its standard library comes from rustup (self-contained musl
/// and crt objects); no C compiler for musl is needed while no dependency builds C code.
const MUSL: &str = "x86_64-unknown-linux-musl";
const DEB_ARCH: &str = "amd64";
const UNIT: &str = "portwatch.service";
/// The line in packaging/portwatch.service that points at a hand install.
const UNIT_EXEC: &str = "ExecStart=/usr/local/bin/portwatch run";

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Build the .deb and the static binary only (no Docker engine needed).
    #[arg(long)]
    pub no_image: bool,
}

pub fn run_cmd(args: PackageArgs) -> Result<()> {
    if args.no_image {
        setup::build()?;
    } else {
        setup::for_run()?;
    }
    setup::apt_tools(&[
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("objdump", "binutils"),
        ("strip", "binutils"),
        ("gzip", "gzip"),
        ("md5sum", "coreutils"),
    ])?;
    ensure!(
        cfg!(target_arch = "x86_64"),
        "packaging builds x86_64 artifacts and runs them, so it must run on x86_64"
    );
    musl_target()?;
    let glibc = crate::build_agent(true)?;
    let musl = build_static()?;
    let version = version_of(&glibc)?;
    let musl_version = version_of(&musl)?;
    ensure!(
        version == musl_version,
        "the glibc build says {version} and the musl build {musl_version}: one of them is stale"
    );

    let out = workspace_root().join("target/package");
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let bin = static_binary(&musl, &version, &out)?;
    let deb = deb(&glibc, &version, &out)?;
    let image = if args.no_image {
        None
    } else {
        Some(image(&bin, &version, &out)?)
    };

    step("done:");
    for p in [&deb, &bin] {
        let len = fs::metadata(p)?.len();
        step(&format!("  {} ({:.1} MB)", p.display(), len as f64 / 1e6));
    }
    if let Some(image) = image {
        let size = capture(Command::new("docker").args([
            "image",
            "inspect",
            "--format",
            "{{.Size}}",
            &image,
        ]))?;
        let size: f64 = size.trim().parse().unwrap_or(0.0);
        step(&format!(
            "  image {image} ({:.1} MB) in the local Docker engine",
            size / 1e6
        ));
    }
    Ok(())
}

/// stdout of a command that must succeed.
fn capture(cmd: &mut Command) -> Result<String> {
    let o = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed with {}", o.status);
    }
    String::from_utf8(o.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

pub(crate) fn musl_target() -> Result<()> {
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|l| l.trim() == MUSL) {
        return Ok(());
    }
    step(&format!("installing the {MUSL} standard library (rustup)"));
    run(Command::new("rustup").args(["target", "add", MUSL]))
}

/// The eBPF object is the same for both builds: portwatch/build.rs builds it for bpfel from
/// the target's endianness, whatever the userspace target.
pub(crate) fn build_static() -> Result<PathBuf> {
    step(&format!(
        "building portwatch for {MUSL} (release; the first build takes minutes)"
    ));
    run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "portwatch",
        "--target",
        MUSL,
    ]))?;
    let bin = workspace_root()
        .join("target")
        .join(MUSL)
        .join("release/portwatch");
    ensure!(
        bin.exists(),
        "build finished but {} is missing",
        bin.display()
    );
    Ok(bin)
}

/// `portwatch --version` prints `portwatch 0.1.0`; running it also proves the binary starts.
fn version_of(bin: &Path) -> Result<String> {
    let out = capture(Command::new(bin).arg("--version"))?;
    out.trim()
        .strip_prefix("portwatch ")
        .map(str::to_string)
        .with_context(|| format!("{} --version printed {out:?}", bin.display()))
}

/// Debian's dh_strip flags: symbols and debug info go, the build id stays. The embedded eBPF
/// object is data, so stripping leaves its BTF alone.
fn strip(from: &Path, to: &Path) -> Result<()> {
    run(Command::new("strip")
        .args([
            "--strip-unneeded",
            "--remove-section=.comment",
            "--remove-section=.note",
            "-o",
        ])
        .arg(to)
        .arg(from))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Shared libraries a binary loads (DT_NEEDED) and whether it asks for a program
/// interpreter, from `objdump -p`.
fn dynamic_needs(bin: &Path) -> Result<(Vec<String>, bool)> {
    let text = capture(Command::new("objdump").arg("-p").arg(bin))?;
    let needed = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("NEEDED"))
        .map(|s| s.trim().to_string())
        .collect();
    let interp = text.lines().any(|l| l.trim_start().starts_with("INTERP"));
    Ok((needed, interp))
}

/// The newest GLIBC_x.y symbol version a binary imports, from `objdump -T`: the oldest glibc
/// it runs on.
fn min_glibc(bin: &Path) -> Result<Option<String>> {
    let text = capture(Command::new("objdump").arg("-T").arg(bin))?;
    let parse = |v: &str| -> Vec<u32> { v.split('.').filter_map(|n| n.parse().ok()).collect() };
    Ok(text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        .max_by_key(|v| parse(v))
        .map(str::to_string))
}

fn static_binary(musl: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    let dest = out.join(format!("portwatch-{version}-x86_64-linux"));
    step(&format!(
        "{}: the static musl build, stripped",
        dest.display()
    ));
    strip(musl, &dest)?;
    let (needed, interp) = dynamic_needs(&dest)?;
    ensure!(
        needed.is_empty() && !interp,
        "{} is not static: it needs {needed:?}{}",
        dest.display(),
        if interp {
            " and a program interpreter"
        } else {
            ""
        }
    );
    let v = version_of(&dest)?;
    ensure!(v == version, "the stripped binary says {v}, not {version}");
    Ok(dest)
}

/// Write a file into the staging tree, creating its directories.
fn put(root: &Path, rel: &str, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().expect("a file in a directory"))?;
    fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    Ok(p)
}

/// Every file and every directory under `dir`, relative to it, sorted.
fn tree(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let rel = e.path().strip_prefix(dir)?.to_path_buf();
            if e.file_type()?.is_dir() {
                todo.push(e.path());
                dirs.push(rel);
            } else {
                files.push(rel);
            }
        }
    }
    files.sort();
    dirs.sort();
    Ok((files, dirs))
}

/// The unit in packaging/ is for a hand install in /usr/local; the package's binary is in
/// /usr/bin, and logrotate rotates its log.
fn packaged_unit() -> Result<String> {
    let src = workspace_root().join("packaging").join(UNIT);
    let unit = fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    ensure!(
        unit.lines().filter(|l| l.trim() == UNIT_EXEC).count() == 1,
        "{} has no line `{UNIT_EXEC}` (exactly once) to point at /usr/bin",
        src.display()
    );
    Ok(unit
        .lines()
        .map(|l| {
            if l.trim() == UNIT_EXEC {
                "# /etc/logrotate.d/portwatch rotates the log; the agent's own size rotation \
                 would\n# rename the same events.jsonl.N files.\n\
                 ExecStart=/usr/bin/portwatch run --log-max-size 0"
                    .to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
}

fn deb(glibc: &Path, version: &str, out: &Path) -> Result<PathBuf> {
    let packaging = workspace_root().join("packaging");
    let build = out.join("deb");
    let _ = fs::remove_dir_all(&build);
    // dpkg-shlibdeps expects Debian's source layout: debian/control and the package's tree
    // in debian/<package>/.
    let root = build.join("debian/portwatch");
    fs::create_dir_all(&root)?;
    fs::write(
        build.join("debian/control"),
        format!("Source: portwatch\n\nPackage: portwatch\nArchitecture: {DEB_ARCH}\n"),
    )?;

    let bin = stage_tree(glibc, &root, &packaging)?;

    let (files, dirs) = tree(&root)?;
    let read = |name: &str| deb_file(&packaging, name);
    let debian = root.join("DEBIAN");
    // dpkg-shlibdeps finds the package's root by its DEBIAN directory.
    fs::create_dir_all(&debian)?;
    // The tree's modes are what dpkg installs; the umask of whoever packages must not matter.
    for d in &dirs {
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o755))?;
    }
    let depends = shlib_depends(&build, &bin)?;
    let mut installed_kib = 0u64;
    for f in &files {
        installed_kib += fs::symlink_metadata(root.join(f))?.len().div_ceil(1024);
    }

    let control = control_file(version, &depends, installed_kib);
    put(&debian, "control", control.as_bytes(), 0o644)?;
    // Policy: every file under /etc is a conffile, kept on remove and removed on purge.
    put(&debian, "conffiles", b"/etc/logrotate.d/portwatch\n", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        put(&debian, script, &read(script)?, 0o755)?;
    }
    let sums = capture(Command::new("md5sum").args(&files).current_dir(&root))?;
    put(&debian, "md5sums", sums.as_bytes(), 0o644)?;

    let deb = out.join(format!("portwatch_{version}_{DEB_ARCH}.deb"));
    step(&format!("{}: dpkg-deb --build", deb.display()));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb))?;
    Ok(deb)
}

/// A file of packaging/deb/.
fn deb_file(packaging: &Path, name: &str) -> Result<Vec<u8>> {
    let p = packaging.join("deb").join(name);
    fs::read(&p).with_context(|| format!("reading {}", p.display()))
}

/// The package's files in the staging tree `root`; returns the stripped binary's path.
fn stage_tree(glibc: &Path, root: &Path, packaging: &Path) -> Result<PathBuf> {
    let bin = root.join("usr/bin/portwatch");
    fs::create_dir_all(bin.parent().expect("usr/bin"))?;
    strip(glibc, &bin)?;
    put(
        root,
        &format!("lib/systemd/system/{UNIT}"),
        packaged_unit()?.as_bytes(),
        0o644,
    )?;
    let read = |name: &str| deb_file(packaging, name);
    put(
        root,
        "etc/logrotate.d/portwatch",
        &read("portwatch.logrotate")?,
        0o644,
    )?;
    put(
        root,
        "usr/share/doc/portwatch/copyright",
        &read("copyright")?,
        0o644,
    )?;

    let man = capture(Command::new(&bin).arg("man"))?;
    ensure!(
        man.contains(".TH portwatch"),
        "`portwatch man` printed no man page"
    );
    put(
        root,
        "usr/share/man/man1/portwatch.1.gz",
        &gzip(man.as_bytes())?,
        0o644,
    )?;
    // The directories Debian's bash-completion, zsh and fish packages read vendor files from.
    for (shell, rel) in [
        ("bash", "usr/share/bash-completion/completions/portwatch"),
        ("zsh", "usr/share/zsh/vendor-completions/_portwatch"),
        ("fish", "usr/share/fish/vendor_completions.d/portwatch.fish"),
    ] {
        let text = capture(Command::new(&bin).args(["completions", shell]))?;
        ensure!(!text.is_empty(), "`portwatch completions {shell}` is empty");
        put(root, rel, text.as_bytes(), 0o644)?;
    }
    // Shipped so dpkg owns it; the unit's LogsDirectory= would also create it, but only at
    // first start, and a package installed without starting would leave `portwatch tail`
    // nothing to read.
    fs::create_dir_all(root.join("var/log/portwatch"))?;
    Ok(bin)
}

/// The binary's library dependencies from dpkg-shlibdeps, and the oldest glibc it needs noted.
fn shlib_depends(build: &Path, bin: &Path) -> Result<String> {
    let shlibs = capture(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "-edebian/portwatch/usr/bin/portwatch"])
            .current_dir(build),
    )?;
    let depends = shlibs
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_string();
    let glibc_min = min_glibc(bin)?.context("the glibc build imports no GLIBC_ symbols")?;
    step(&format!(
        "the .deb's binary needs glibc >= {glibc_min} (objdump -T); dpkg-shlibdeps: {depends}"
    ));
    Ok(depends)
}

/// DEBIAN/control for `version` with these dependencies and installed size.
fn control_file(version: &str, depends: &str, installed_kib: u64) -> String {
    let maintainer = match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(name), Ok(mail)) => format!("{name} <{mail}>"),
        _ => "portwatch maintainers <portwatch@localhost>".to_string(),
    };
    format!(
        "Package: portwatch\n\
         Version: {version}\n\
         Architecture: {DEB_ARCH}\n\
         Maintainer: {maintainer}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}, init-system-helpers (>= 1.54~)\n\
         Recommends: logrotate\n\
         Section: admin\n\
         Priority: optional\n\
         Description: who held a port when a bind failed, why, and what to do\n \
         portwatch loads eBPF tracepoint programs that report every failed bind(),\n \
         listen() and connect() with the process that tried and the sockets that hold\n \
         the port, as JSON lines in /var/log/portwatch/events.jsonl. On a host with\n \
         Docker it names containers, and reports Docker's own port failures.\n"
    )
}

/// `gzip -9n`: no name or timestamp in the header, as Debian compresses man pages.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .arg("-9n")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start gzip")?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let o = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    ensure!(o.status.success(), "gzip failed with {}", o.status);
    Ok(o.stdout)
}

/// `docker build` of packaging/Dockerfile from a context holding only the static binary.
fn image(bin: &Path, version: &str, out: &Path) -> Result<String> {
    let tag = format!("portwatch:{version}");
    let ctx = out.join("image");
    let _ = fs::remove_dir_all(&ctx);
    fs::create_dir_all(&ctx)?;
    fs::copy(bin, ctx.join("portwatch"))?;
    step(&format!("image {tag}: docker build (FROM scratch)"));
    run(Command::new("docker")
        .args(["build", "--quiet", "--tag", &tag, "--build-arg"])
        .arg(format!("VERSION={version}"))
        .arg("--file")
        .arg(workspace_root().join("packaging/Dockerfile"))
        .arg(&ctx))?;
    let printed = capture(Command::new("docker").args(["run", "--rm", &tag, "--version"]))?;
    ensure!(
        printed.trim() == format!("portwatch {version}"),
        "`docker run --rm {tag} --version` printed {printed:?}"
    );
    Ok(tag)
}
