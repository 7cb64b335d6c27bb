//! What users install, checked the way they use it: the .deb in a clean Debian 12 root, the
//! static binary on this host, the container image run exactly as README.md says, the
//! logrotate snippet against a real agent, and the Prometheus side (a real Prometheus
//! scraping the agent, promtool on its output and on packaging/portwatch.rules.yml).
//!
//! The artifacts come from `cargo xtask package`, run once per test binary. Tools these
//! tests need and a fresh machine lacks (debootstrap, prometheus, logrotate) are installed
//! with apt-get; the Debian 12 root is made once and cached as a tarball in
//! ~/.cache/portwatch/. Like every end-to-end test, these fail, never skip, without root,
//! Docker or the network they need.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use portwatch_tests::{docker::*, *};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const HOLD: &str = env!("CARGO_BIN_EXE_pw-hold");
/// The suite the package is for, and the mirror every Debian machine can reach.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into())
        .join(".cache/portwatch")
}

fn show(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run a command that must succeed; its output.
fn must(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", show(&o));
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A Debian package's command, installed with apt-get when it is missing. CI machines start
/// without these; apt-get update runs only when something is missing.
fn apt_tool(cmd: &str, pkg: &str) {
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(cmd).is_file());
    if on_path {
        return;
    }
    eprintln!("installing {pkg} (apt-get) for `{cmd}`");
    must(Command::new("apt-get").args(["update", "-qq"]));
    must(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("pwtest-pkg-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- the artifacts ----

struct Artifacts {
    deb: PathBuf,
    binary: PathBuf,
    image: String,
}

/// `cargo xtask package`, once for all the tests here: it is what CI and users run, and a
/// second run only rebuilds what changed.
fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        require_root();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let t = Instant::now();
        let o = Command::new(cargo)
            .args(["xtask", "package"])
            .current_dir(workspace())
            .stdin(Stdio::null())
            .output()
            .expect("running cargo xtask package");
        let err = String::from_utf8_lossy(&o.stderr);
        let tail: Vec<&str> = err.lines().rev().take(40).collect();
        assert!(
            o.status.success(),
            "`cargo xtask package` failed ({}); the end of its output:\n{}",
            o.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!(
            "cargo xtask package took {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let out = workspace().join("target/package");
        let a = Artifacts {
            deb: out.join(format!("portwatch_{VERSION}_amd64.deb")),
            binary: out.join(format!("portwatch-{VERSION}-x86_64-linux")),
            image: format!("portwatch:{VERSION}"),
        };
        assert!(a.deb.is_file(), "{} is missing", a.deb.display());
        assert!(a.binary.is_file(), "{} is missing", a.binary.display());
        a
    })
}

// ---- the .deb in a clean Debian 12 root ----

/// A minbase bookworm root as a tarball in the cache: debootstrap downloads about 30 MB of
/// packages, so it runs once per machine (delete the tarball to refresh it).
fn bookworm_tarball() -> PathBuf {
    let dir = cache_dir().join("debootstrap");
    let tarball = dir.join(format!("{SUITE}-minbase.tar.gz"));
    if tarball.is_file() {
        return tarball;
    }
    apt_tool("debootstrap", "debootstrap");
    std::fs::create_dir_all(&dir).unwrap();
    let build = TempDir::new("debootstrap");
    let root = build.path().join("root");
    let t = Instant::now();
    eprintln!(
        "debootstrap --variant=minbase {SUITE} (once; cached in {})",
        tarball.display()
    );
    must(
        Command::new("debootstrap")
            .args(["--variant=minbase", SUITE])
            .arg(&root)
            .arg(MIRROR),
    );
    // debootstrap leaves the packages it installed in apt's cache; a fresh install does not.
    for e in std::fs::read_dir(root.join("var/cache/apt/archives")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "deb") {
            std::fs::remove_file(p).unwrap();
        }
    }
    // Written aside and renamed, so an interrupted run never leaves a truncated cache.
    let partial = dir.join(format!("{SUITE}-minbase.tar.gz.partial"));
    must(
        Command::new("tar")
            .args(["--numeric-owner", "-czf"])
            .arg(&partial)
            .arg("-C")
            .arg(&root)
            .arg("."),
    );
    std::fs::rename(&partial, &tarball).unwrap();
    eprintln!(
        "debootstrap and tarball took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    tarball
}

/// `sh -c SCRIPT` chrooted into `root`, in a mount namespace of its own: /proc and /sys
/// (which doctor reads) are mounted there and vanish with it, even if the test panics.
fn in_root(root: &Path, script: &str) -> Output {
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "chroot"])
        .arg(root)
        .args([
            "/bin/sh",
            "-c",
            &format!(
                "mount -t proc proc /proc && mount -t sysfs -o ro sysfs /sys && {{ {script}; }}"
            ),
        ])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .expect("unshare/chroot")
}

fn in_root_ok(root: &Path, script: &str) -> String {
    let o = in_root(root, script);
    assert!(o.status.success(), "`{script}` in the root: {}", show(&o));
    stdout(&o)
}

/// Every path under `root` with its type, mode and link target. /proc, /sys and /dev are
/// mount points in use, not files of the system.
fn snapshot(root: &Path) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            let kind = if t.is_dir() {
                "d"
            } else if t.is_symlink() {
                "l"
            } else if t.is_file() {
                "f"
            } else if t.is_char_device() || t.is_block_device() {
                "c"
            } else {
                "o"
            };
            let target = if t.is_symlink() {
                format!(" -> {}", std::fs::read_link(&p).unwrap().to_string_lossy())
            } else {
                String::new()
            };
            set.insert(format!("{kind} {:o} /{rel}{target}", m.mode() & 0o7777));
            if t.is_dir() && !["proc", "sys", "dev"].contains(&rel.as_str()) {
                todo.push(p);
            }
        }
    }
    set
}

fn diff(before: &BTreeSet<String>, after: &BTreeSet<String>) -> String {
    let mut s = String::new();
    for x in after.difference(before) {
        s += &format!("  added   {x}\n");
    }
    for x in before.difference(after) {
        s += &format!("  removed {x}\n");
    }
    s
}

#[test]
fn deb_installs_runs_and_purges_cleanly_in_a_clean_debian_12() {
    let a = artifacts();
    let tarball = bookworm_tarball();
    let dir = TempDir::new("deb");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    must(
        Command::new("tar")
            .args(["--numeric-owner", "-xzf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&root),
    );
    let before = snapshot(&root);

    let deb_name = a.deb.file_name().unwrap().to_str().unwrap();
    std::fs::copy(&a.deb, root.join("tmp").join(deb_name)).unwrap();
    let out = in_root_ok(&root, &format!("dpkg -i /tmp/{deb_name}"));
    assert!(out.contains("Setting up portwatch"), "{out}");
    std::fs::remove_file(root.join("tmp").join(deb_name)).unwrap();

    let v = in_root_ok(&root, "portwatch --version");
    assert_eq!(v.trim(), format!("portwatch {VERSION}"));
    let man = in_root_ok(&root, "portwatch man");
    assert!(man.contains(".TH portwatch"), "{man}");
    let man_gz = in_root_ok(&root, "gzip -dc /usr/share/man/man1/portwatch.1.gz");
    assert_eq!(man_gz, man, "the installed man page is `portwatch man`");
    for f in [
        "usr/share/bash-completion/completions/portwatch",
        "usr/share/zsh/vendor-completions/_portwatch",
        "usr/share/fish/vendor_completions.d/portwatch.fish",
        "usr/share/doc/portwatch/copyright",
        "etc/logrotate.d/portwatch",
    ] {
        assert!(root.join(f).is_file(), "/{f} is not installed");
    }
    assert!(root.join("var/log/portwatch").is_dir());

    // doctor in a chroot: no tracefs and no agent, so some checks fail; it must still run
    // every check and say which.
    let o = in_root(&root, "portwatch doctor");
    let text = stdout(&o);
    let checks: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("PASS ") || l.starts_with("FAIL ") || l.starts_with("WARN "))
        .collect();
    assert!(
        checks.len() >= 10 && o.status.code().is_some(),
        "doctor did not run its checks: {}",
        show(&o)
    );
    for name in [
        "kernel",
        "btf",
        "privileges",
        "tracefs",
        "log path",
        "agent",
    ] {
        assert!(
            checks.iter().any(|l| l[5..].starts_with(name)),
            "doctor printed no `{name}` check:\n{text}"
        );
    }

    // The unit, at the path of Debian 12's units, pointing at the packaged binary, and
    // enabled as dh_installsystemd would (started too, where systemd runs: not here).
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/portwatch.service"))
        .expect("the unit is installed");
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/portwatch run --log-max-size 0"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/local"), "{unit}");
    let wants = root.join("etc/systemd/system/multi-user.target.wants/portwatch.service");
    assert_eq!(
        std::fs::read_link(&wants).expect("the unit is enabled"),
        Path::new("/lib/systemd/system/portwatch.service")
    );

    // Remove keeps conffiles, logs and the enablement state; purge takes all of it.
    in_root_ok(&root, "dpkg -r portwatch");
    let status = in_root_ok(&root, "dpkg-query -W -f '${Status}' portwatch");
    assert_eq!(status, "deinstall ok config-files");
    for gone in [
        "usr/bin/portwatch",
        "lib/systemd/system/portwatch.service",
        "usr/share/man/man1/portwatch.1.gz",
    ] {
        assert!(!root.join(gone).exists(), "/{gone} is left after dpkg -r");
    }
    assert!(root.join("etc/logrotate.d/portwatch").is_file());
    std::fs::write(
        root.join("var/log/portwatch/events.jsonl.1"),
        "{\"v\":1,\"type\":\"agent\"}\n",
    )
    .unwrap();
    in_root_ok(&root, "dpkg --purge portwatch");
    let after = snapshot(&root);
    assert!(
        before == after,
        "dpkg --purge left the root different from before the install:\n{}",
        diff(&before, &after)
    );
}

// ---- the static binary ----

/// PT_INTERP and DT_NEEDED from the ELF headers: a static binary has neither.
fn elf_dynamic_needs(path: &Path) -> (bool, usize) {
    let b = std::fs::read(path).unwrap();
    assert!(
        b.len() > 64 && &b[..4] == b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "not ELF64 LE"
    );
    let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    let (mut interp, mut needed) = (false, 0);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32::from_le_bytes(b[ph..ph + 4].try_into().unwrap());
        match p_type {
            3 => interp = true,
            2 => {
                let (off, size) = (u64_at(ph + 8), u64_at(ph + 32));
                for d in (off..off + size).step_by(16) {
                    match u64_at(d) {
                        0 => break,
                        1 => needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (interp, needed)
}

#[test]
fn static_binary_needs_no_library_and_runs_here() {
    let a = artifacts();
    let (interp, needed) = elf_dynamic_needs(&a.binary);
    assert!(
        !interp && needed == 0,
        "{} has a program interpreter ({interp}) or needs {needed} shared libraries",
        a.binary.display()
    );
    let v = must(Command::new(&a.binary).arg("--version"));
    assert_eq!(stdout(&v).trim(), format!("portwatch {VERSION}"));

    // Every kernel-side check passes with this binary; only "agent" (none is running) may
    // fail, and the Docker socket only warns.
    let o = Command::new(&a.binary).arg("doctor").output().unwrap();
    let text = stdout(&o);
    for l in text.lines() {
        assert!(
            l.starts_with("PASS ") || l.starts_with("WARN ") || l.starts_with("FAIL agent"),
            "doctor with the static binary: {l}\n{text}"
        );
    }
    assert!(text.contains("accepted by the verifier"), "{text}");

    let port = free_port(71);
    let rt = TempDir::new("static-rt");
    let agent = Agent::start_cmd(
        Command::new(&a.binary)
            .args(["run", "--no-log-file", "--runtime-dir"])
            .arg(rt.path())
            .args(["--port", &port.to_string()]),
    );
    let holder = Holder::start(HOLD, "tcp-listen", &format!("0.0.0.0:{port}"), None);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&addr, SOCK_STREAM, false);
    assert!(bind(&s, &addr).is_err(), "the port is held");
    let c = agent.wait_for("the conflict", |v| {
        v["type"] == "conflict" && v["port"] == port
    });
    assert_eq!(c["actor"]["pid"], std::process::id(), "{c}");
    assert_eq!(c["holders"][0]["pid"], holder.pid(), "{c}");
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
    let last = done.lines.last().unwrap();
    assert!(
        last["type"] == "agent" && last["event"] == "stopped",
        "{last}"
    );
}

// ---- the container image, run as README.md says ----

/// The `docker run` line of README.md, as arguments: the test runs what users copy.
fn documented_docker_run() -> Vec<String> {
    let md = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
    let block = md
        .split("```")
        .find(|b| b.starts_with("sh") && b.contains("docker run") && b.contains("portwatch:"))
        .expect("README.md has a ```sh block with the `docker run` line");
    let mut words = Vec::new();
    for l in block
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("docker run"))
    {
        let (body, more) = match l.strip_suffix('\\') {
            Some(body) => (body, true),
            None => (l, false),
        };
        words.extend(body.split_whitespace().map(str::to_string));
        if !more {
            break;
        }
    }
    words
}

/// The host's cgroup layout as the agent names it (`docker` `connected` record): cgroup2
/// alone, cgroup2 beside v1 controllers, or v1 only.
fn host_cgroup_layout() -> &'static str {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let fstypes: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split_once(" - ")?.1.split(' ').next())
        .collect();
    match (fstypes.contains(&"cgroup2"), fstypes.contains(&"cgroup")) {
        (true, false) => "v2",
        (true, true) => "hybrid",
        (false, _) => "v1",
    }
}

/// A container removed on drop, whatever happened.
struct Named(String);

impl Drop for Named {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

/// Holds a port as uid 65534, started before the agent: its owner is found only by walking
/// /proc, which in the container takes CAP_SYS_PTRACE (host processes have capabilities
/// the container lacks) and CAP_DAC_READ_SEARCH (another user's /proc/<pid>/fd).
struct NobodyHolder(Child);

impl NobodyHolder {
    fn start(addr: &str) -> NobodyHolder {
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                HOLD,
                "tcp-listen",
                addr,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("setpriv pw-hold");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "pw-hold as uid 65534 on {addr}");
        NobodyHolder(child)
    }
}

impl Drop for NobodyHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn container_image_run_as_documented_names_host_processes_and_containers() {
    require_docker();
    let a = artifacts();
    let mut args = documented_docker_run();
    assert_eq!(&args[..2], ["docker", "run"], "{args:?}");
    assert_eq!(
        args.last().map(String::as_str),
        Some(a.image.as_str()),
        "README.md runs another image than this version's: {args:?}"
    );
    // Attached instead of -d, so the test reads the records on stdout; a name of its own;
    // and the host side of the log and runtime directories in a temporary directory, so a
    // real agent on this host is not disturbed (or in the way).
    let name = unique("pkg-agent");
    let dirs = TempDir::new("container");
    let (log, run) = (dirs.path().join("log"), dirs.path().join("run"));
    args.retain(|x| x != "-d");
    let i = args.iter().position(|x| x == "--name").expect("--name");
    args[i + 1] = name.clone();
    for x in &mut args {
        if let Some(rest) = x.strip_prefix("/var/log/portwatch:") {
            *x = format!("{}:{rest}", log.display());
        } else if let Some(rest) = x.strip_prefix("/run/portwatch:") {
            *x = format!("{}:{rest}", run.display());
        }
    }
    assert!(
        log.to_str()
            .is_some_and(|l| args.iter().any(|x| x.starts_with(l))),
        "the documented line mounts no /var/log/portwatch: {args:?}"
    );
    let _ = docker(&["rm", "-f", &name]);
    let _guard = Named(name.clone());

    // (a) two host processes: the holder (uid 65534, there before the agent) and this test.
    let p1 = free_port(72);
    let holder = NobodyHolder::start(&format!("0.0.0.0:{p1}"));
    let agent = Agent::start_cmd(Command::new(&args[0]).args(&args[1..]));
    let joined = agent.wait_for("docker connected", |v| {
        v["type"] == "docker" && v["event"] == "connected"
    });
    assert_eq!(
        joined["cgroup"],
        host_cgroup_layout(),
        "the agent in the container sees another cgroup layout than the host: {joined}"
    );
    let addr: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let s = socket(&addr, SOCK_STREAM, false);
    assert!(bind(&s, &addr).is_err(), "{p1} is held");
    let c = agent.wait_for("the host conflict", |v| {
        v["type"] == "conflict" && v["port"] == p1
    });
    assert_eq!(c["actor"]["pid"], std::process::id(), "the host pid: {c}");
    let me = std::env::args().next().unwrap();
    let me = Path::new(&me).file_name().unwrap().to_str().unwrap();
    assert!(
        c["actor"]["cmdline"]
            .as_str()
            .is_some_and(|s| s.contains(me)),
        "{c}"
    );
    let h = &c["holders"][0];
    assert_eq!(h["pid"], holder.0.id(), "the holder's host pid: {c}");
    assert_eq!(h["uid"], 65534, "{c}");
    assert!(
        h["cmdline"]
            .as_str()
            .is_some_and(|s| s.contains("pw-hold tcp-listen")),
        "{c}"
    );
    assert_eq!(c["cause"], "listener", "{c}");
    assert_eq!(c["netns"], host_netns(), "{c}");

    // (b) two containers: B cannot publish the port A publishes.
    let p2 = free_port(73);
    let publish = format!("{p2}:80");
    let httpd = ["httpd", "-f", "-p", "80"];
    let ca = Container::running("pkg-a", &["-p", &publish], &httpd);
    let cb = Container::run("pkg-b", &["-p", &publish], &httpd);
    assert!(!cb.ok, "the second publisher must fail");
    let c = agent.wait_for("the container conflict", |v| {
        v["type"] == "conflict" && v["port"] == p2 && v["op"] == "docker_publish"
    });
    assert_eq!(c["actor"]["container"]["name"], cb.name.as_str(), "{c}");
    assert!(
        c["holders"].as_array().is_some_and(|hs| !hs.is_empty()
            && hs
                .iter()
                .all(|h| h["container"]["name"] == ca.name.as_str())),
        "{c}"
    );

    // `docker stop` sends SIGTERM; the agent says it stopped and exits 0 (docker run
    // returns the container's status). Signal 0 only waits.
    must(Command::new("docker").args(["stop", "-t", "20", &name]));
    let done = agent.stop_with(0);
    assert!(done.status.success(), "{:?}: {}", done.status, done.stderr);
    let last = done.lines.last().unwrap();
    assert!(
        last["type"] == "agent" && last["event"] == "stopped",
        "{last}"
    );

    // The same records reached the mounted log directory.
    let file = std::fs::read_to_string(log.join("events.jsonl")).expect("the log in the mount");
    assert!(file.contains(&format!("\"port\":{p1}")) && file.contains(&format!("\"port\":{p2}")));
}

// ---- the logrotate snippet, for real ----

/// logrotate with the shipped snippet, verbatim, against a real agent: the agent runs in a
/// mount namespace with tmpfs on /var/log and /run, so the snippet's own paths are used
/// without touching this host's.
#[test]
fn logrotate_snippet_rotates_and_the_agent_reopens_its_log() {
    require_root();
    apt_tool("logrotate", "logrotate");
    let snippet = workspace().join("packaging/deb/portwatch.logrotate");
    let port = free_port(74);
    let agent = Agent::start_cmd(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o mode=0755 tmpfs /var/log && \
                 mount -t tmpfs -o mode=0755 tmpfs /run && \
                 exec \"$0\" run --no-docker --log-max-size 0 --port \"$1\"",
            )
            .arg(agent_bin())
            .arg(port.to_string()),
    );
    let ns_root = PathBuf::from(format!("/proc/{}/root", agent.pid()));
    let log = ns_root.join("var/log/portwatch/events.jsonl");
    let _h = listener(&format!("0.0.0.0:{port}"));
    let conflict = || {
        let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let s = socket(&a, SOCK_STREAM, false);
        assert!(bind(&s, &a).is_err());
    };
    conflict();
    agent.wait_for("a conflict", |v| v["type"] == "conflict");
    let state = TempDir::new("logrotate");
    let rotate = || {
        must(
            Command::new("nsenter")
                .args([
                    "-t",
                    &agent.pid().to_string(),
                    "-m",
                    "logrotate",
                    "-f",
                    "--state",
                ])
                .arg(state.path().join("status"))
                .arg(&snippet),
        )
    };
    rotate();
    agent.wait_for("log_reopened", |v| {
        v["type"] == "agent" && v["event"] == "log_reopened"
    });
    let first = std::fs::read_to_string(ns_root.join("var/log/portwatch/events.jsonl.1"))
        .expect("events.jsonl.1 after the first rotation");
    assert!(first.contains("\"type\":\"conflict\""), "{first}");
    conflict();
    agent.wait_count("two conflicts", 2, Duration::from_secs(10), |v| {
        v["type"] == "conflict"
    });
    let now = std::fs::read_to_string(&log).unwrap();
    assert!(
        now.contains("log_reopened") && now.contains("\"type\":\"conflict\""),
        "the reopened log: {now}"
    );
    // A second rotation compresses the first (delaycompress).
    rotate();
    assert!(ns_root
        .join("var/log/portwatch/events.jsonl.2.gz")
        .is_file());
    let done = agent.stop();
    assert!(done.status.success(), "{}", done.stderr);
}

// ---- Prometheus ----

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET over HTTP/1.0 (the server closes after the body): status and body.
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// An agent serving /metrics on a free loopback port, with one conflict counted.
fn agent_with_metrics(offset: u16) -> (Agent, String, OwnedHolder) {
    let port = free_port(offset);
    let maddr = format!("127.0.0.1:{}", free_port(offset + 1));
    let agent = Agent::start(&[
        "--metrics-addr",
        &maddr,
        "--port",
        &port.to_string(),
        "--tw-interval",
        "1",
    ]);
    let h = listener(&format!("0.0.0.0:{port}"));
    let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = socket(&a, SOCK_STREAM, false);
    assert!(bind(&s, &a).is_err());
    agent.wait_for("a conflict", |v| v["type"] == "conflict");
    (agent, maddr, h)
}

type OwnedHolder = std::os::fd::OwnedFd;

fn metrics_text(maddr: &str) -> String {
    let (status, body) = http_get(maddr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// A Prometheus of its own (config and storage in a temporary directory), killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        apt_tool("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let rules = workspace().join("packaging/portwatch.rules.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: portwatch\n    static_configs:\n\
                 \x20     - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port(76));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Option<Value> {
        let (status, body) = http_get(&self.addr, path).ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (status == 200 && v["status"] == "success").then_some(v)
    }

    fn query(&self, q: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", urlencode(q)))
            .and_then(|v| v["data"]["result"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits up to 60 s for `what`.
    fn until<T>(&self, what: &str, f: impl Fn(&Prometheus) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: no {what} within 60 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sample_value(v: &Value) -> f64 {
    v["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn prometheus_scrapes_the_agent_and_evaluates_the_rules() {
    require_root();
    let (_agent, maddr, _h) = agent_with_metrics(77);
    let prom = Prometheus::start(&maddr);
    let up = prom.until("up{job=\"portwatch\"} == 1", |p| {
        p.query("up{job=\"portwatch\"}")
            .first()
            .map(sample_value)
            .filter(|v| *v == 1.0)
    });
    assert_eq!(up, 1.0);
    let conflicts = prom.until("a portwatch_conflicts_total series", |p| {
        p.query("portwatch_conflicts_total{cause=\"listener\"}")
            .first()
            .map(sample_value)
    });
    assert!(conflicts >= 1.0, "{conflicts}");
    for series in [
        "portwatch_records_total",
        "portwatch_lost_events_total",
        "portwatch_port_table_entries",
        "portwatch_docker_connected",
        "portwatch_log_write_errors",
    ] {
        assert!(!prom.query(series).is_empty(), "prometheus has no {series}");
    }
    // The rules file loads, and every rule has been evaluated without an error.
    let rules = prom.until("every rule evaluated", |p| {
        let v = p.api("/api/v1/rules")?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    });
    for r in &rules {
        assert_eq!(
            r["health"], "ok",
            "rule {} does not evaluate: {r}",
            r["name"]
        );
    }
    let per_minute = prom.until("the conflicts-per-minute recording rule", |p| {
        p.query("instance_cause:portwatch_conflicts:per_minute{cause=\"listener\"}")
            .first()
            .map(sample_value)
    });
    assert!(per_minute >= 0.0, "{per_minute}");
}

#[test]
fn promtool_check_metrics_passes_on_the_agents_output() {
    require_root();
    apt_tool("promtool", "prometheus");
    let (_agent, maddr, _h) = agent_with_metrics(81);
    let text = metrics_text(&maddr);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics on the agent's /metrics: {}\nthe output checked:\n{text}",
        show(&o)
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    apt_tool("promtool", "prometheus");
    let dir = workspace().join("packaging");
    let o = must(
        Command::new("promtool")
            .args(["check", "rules", "portwatch.rules.yml"])
            .current_dir(&dir),
    );
    assert!(stdout(&o).contains("SUCCESS"), "{}", show(&o));
    let o = must(
        Command::new("promtool")
            .args(["test", "rules", "portwatch.rules.test.yml"])
            .current_dir(&dir),
    );
    assert!(stdout(&o).contains("SUCCESS"), "{}", show(&o));
}

/// The series in packaging/portwatch.rules.test.yml are the agent's: every metric name
/// the rules read is one the agent serves, so a rename in the agent fails here, not in
/// production.
#[test]
fn the_rules_read_only_metrics_the_agent_serves() {
    require_root();
    let (agent, maddr, _h) = agent_with_metrics(84);
    // portwatch_time_wait_sockets has no sample, and no HELP or TYPE line, until a namespace
    // has a TIME_WAIT socket: make one, the client side closing first.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
    let (accepted, _) = server.accept().unwrap();
    drop(client);
    let _ = (&accepted).read(&mut [0u8; 1]);
    drop(accepted);
    let ns = host_netns();
    agent.wait_for("a time_wait record", |v| {
        v["type"] == "time_wait" && v["netns"] == ns
    });
    let text = metrics_text(&maddr);
    // Sample names, and the names of families that have no sample yet (no TIME_WAIT socket,
    // say): OpenMetrics declares a counter without its _total suffix.
    let mut served: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    for l in text.lines() {
        if let Some([name, kind]) = l
            .strip_prefix("# TYPE ")
            .map(|t| t.split_whitespace().collect::<Vec<_>>())
            .and_then(|v| <[&str; 2]>::try_from(v).ok())
        {
            if kind == "counter" && !name.ends_with("_total") {
                served.insert(format!("{name}_total"));
            } else {
                served.insert(name.to_string());
            }
        }
    }
    let rules = std::fs::read_to_string(workspace().join("packaging/portwatch.rules.yml")).unwrap();
    let used: BTreeSet<String> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("portwatch_"))
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "the rules read {missing:?}, which the agent does not serve:\n{text}"
    );
}

/// packaging/compose.yaml says what the documented `docker run` line says; this host has no
/// Compose v2 to run it with, so it is compared setting by setting.
#[test]
fn compose_file_matches_the_documented_docker_run() {
    let compose = std::fs::read_to_string(workspace().join("packaging/compose.yaml")).unwrap();
    let lines: Vec<&str> = compose.lines().map(str::trim).collect();
    let has = |l: &str| lines.contains(&l);
    let args = documented_docker_run();
    let mut i = 2;
    while i < args.len() {
        let (flag, value) = match args[i].split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (args[i].as_str(), args.get(i + 1).cloned()),
        };
        let takes_value = !args[i].contains('=') && ["-v", "--name", "--restart"].contains(&flag);
        let value = value.unwrap_or_default();
        match flag {
            "-d" | "--name" => {}
            "--restart" => assert!(has(&format!("restart: {value}")), "restart {value}"),
            "--pid" => assert!(has(&format!("pid: {value}")), "pid"),
            "--network" => assert!(has(&format!("network_mode: {value}")), "network"),
            "--cgroupns" => assert!(has(&format!("cgroup: {value}")), "cgroupns"),
            "--cap-drop" => assert!(has(&format!("cap_drop: [{value}]")), "cap_drop"),
            "--cap-add" => assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with("cap_add: [") && l.contains(value.as_str())),
                "cap_add {value}"
            ),
            "-v" => assert!(has(&format!("- {value}")), "volume {value}"),
            image if image.starts_with("portwatch:") => {
                assert!(has(&format!("image: {image}")), "image {image}");
            }
            other => panic!("compose_file_matches_the_documented_docker_run knows no {other}"),
        }
        i += if takes_value { 2 } else { 1 };
    }
    let caps = lines.iter().find(|l| l.starts_with("cap_add: [")).unwrap();
    assert_eq!(
        caps.matches(',').count() + 1,
        args.iter().filter(|a| a.starts_with("--cap-add")).count(),
        "compose adds other capabilities than the docs: {caps}"
    );
}
