//! `portwatch doctor`: every prerequisite checked, with a fix for each.

use std::path::Path;

use crate::{
    cli::render::Style,
    control,
    kernel::{btf, prereq, probes},
};

struct Check {
    name: String,
    ok: bool,
    detail: String,
    fix: String,
}

#[derive(Default)]
struct Checks {
    all: Vec<Check>,
    /// Verifier logs of rejected programs, for `--verbose`.
    logs: Vec<(&'static str, String)>,
    /// What works, but not as it should (printed as WARN).
    degraded: Vec<String>,
}

impl Checks {
    fn add(&mut self, name: &str, ok: bool, detail: String, fix: &str) {
        self.all.push(Check {
            name: name.into(),
            ok,
            detail,
            fix: fix.into(),
        });
    }
}

/// What the kernel and this host offer, before anything is loaded.
struct Host<'a> {
    kernel_ok: bool,
    btf: bool,
    privileged: bool,
    tracefs: Option<&'a Path>,
}

pub fn doctor(runtime_dir: &Path, log_path: &Path, docker_sock: &Path, verbose: bool) -> u8 {
    let mut c = Checks::default();
    let host = host_checks(&mut c);
    if host.privileged && host.btf && host.kernel_ok {
        program_checks(&mut c, host.tracefs);
    } else {
        c.add(
            "programs",
            false,
            "not loaded: needs root, kernel BTF and Linux 5.8+".into(),
            "fix the checks above, then run doctor again",
        );
    }
    local_checks(&mut c, runtime_dir, log_path);
    print(&c, docker_sock, verbose)
}

fn host_checks(c: &mut Checks) -> Host<'static> {
    let release = prereq::kernel_release();
    let kernel_ok = prereq::kernel_version().is_some_and(prereq::supported);
    c.add(
        "kernel",
        kernel_ok,
        format!("Linux {release}"),
        "portwatch needs Linux 5.8 or newer (ring buffer maps, CAP_BPF)",
    );
    let btf = Path::new(prereq::BTF_PATH).exists();
    c.add(
        "btf",
        btf,
        prereq::BTF_PATH.into(),
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    );
    let privileged = prereq::check_privileges().is_ok();
    c.add(
        "privileges",
        privileged,
        if privileged {
            "CAP_BPF+CAP_PERFMON or root".into()
        } else {
            "not root".into()
        },
        "run as root (sudo portwatch run)",
    );
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir());
    c.add(
        "tracefs",
        tracefs.is_some(),
        tracefs.map_or_else(|| "not mounted".into(), |p| p.display().to_string()),
        "mount -t tracefs nodev /sys/kernel/tracing (portwatch run does this itself as root)",
    );
    for (_, cat, tp) in probes::PROGRAMS {
        let ok = tracefs.is_some_and(|t| t.join("events").join(cat).join(tp).join("id").exists());
        c.add(
            &format!("tracepoint {cat}:{tp}"),
            ok,
            if ok { "present" } else { "missing" }.into(),
            "mount tracefs; a kernel without this tracepoint is not supported",
        );
    }
    Host {
        kernel_ok,
        btf,
        privileged,
        tracefs,
    }
}

/// A tracepoint that exists proves nothing if the verifier rejects the program for it:
/// load every program `run` would load, with the same globals, then unload it.
fn program_checks(c: &mut Checks, tracefs: Option<&Path>) {
    const REPORT: &str = "portwatch run cannot start on this kernel; report it with this output";
    let (offsets, _) = btf::resolve(Path::new(prereq::BTF_PATH));
    let cfg = probes::LoadConfig {
        tracefs: tracefs.unwrap_or(Path::new("/sys/kernel/tracing")),
        offsets,
        all_events: false,
        ports: &[],
        ringbuf_size: 4 << 20,
        hooks: probes::HookChoice::Tracepoint,
    };
    // What the kernel offers for bind/listen/connect/close: trampolines are loaded (on the
    // functions its BTF names) and unloaded; either family works, so this informs.
    let offer = probes::offer(&cfg);
    let detail = match &offer.trampoline {
        Ok(functions) => format!(
            "trampoline (fentry/fexit) available: `run` attaches {}",
            functions.join(", ")
        ),
        Err(why) => format!(
            "tracepoint only: trampolines unavailable ({why}); `run` attaches the syscall \
             tracepoints"
        ),
    };
    c.add("hooks", true, detail, "");
    match probes::verify(&cfg) {
        Ok((verdicts, notes)) => {
            for v in verdicts {
                if let Some(log) = v.log {
                    c.logs.push((v.program, log));
                }
                let ok = v.result.is_ok();
                let detail = v
                    .result
                    .err()
                    .unwrap_or_else(|| "accepted by the verifier".into());
                c.add(&format!("program {}", v.program), ok, detail, REPORT);
            }
            c.degraded = notes;
            c.degraded.extend(offer.notes);
        }
        Err(e) => c.add("programs", false, e.to_string(), REPORT),
    }
}

fn local_checks(c: &mut Checks, runtime_dir: &Path, log_path: &Path) {
    let dir = log_path.parent().unwrap_or(Path::new("/"));
    let log_ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .is_ok();
    c.add(
        "log path",
        log_ok,
        log_path.display().to_string(),
        "make the directory writable by root or pass --log-file",
    );
    let agent = control::running_agent(runtime_dir);
    c.add(
        "agent",
        agent.is_some(),
        agent.map_or_else(|| "not running".into(), |p| format!("running, pid {p}")),
        "start it: sudo portwatch run (or systemctl start portwatch)",
    );
}

/// PASS/FAIL per check, the verifier logs, WARN lines; the exit status is 1 if any failed.
fn print(c: &Checks, docker_sock: &Path, verbose: bool) -> u8 {
    let st = Style::for_stdout();
    let mut failed = 0;
    for c in &c.all {
        if c.ok {
            println!("{} {:<36} {}", st.paint("32", "PASS"), c.name, c.detail);
        } else {
            failed += 1;
            let mark = st.paint("31", "FAIL");
            println!("{mark} {:<36} {} -- fix: {}", c.name, c.detail, c.fix);
        }
    }
    if verbose {
        for (program, log) in &c.logs {
            println!("--- verifier log of {program} ---\n{}", log.trim_end());
        }
    } else if !c.logs.is_empty() {
        println!("(run `portwatch doctor --verbose` for the verifier's whole log)");
    }
    let warn = st.paint("33", "WARN");
    for note in &c.degraded {
        println!("{warn} {:<36} {note}", "degraded");
    }
    // Docker is optional: without it records only lack container names, so it warns.
    if std::os::unix::net::UnixStream::connect(docker_sock).is_ok() {
        let pass = st.paint("32", "PASS");
        println!("{pass} {:<36} {}", "docker socket", docker_sock.display());
    } else {
        println!(
            "{warn} {:<36} {} (optional) -- fix: start dockerd to get container names on records",
            "docker socket",
            docker_sock.display()
        );
    }
    u8::from(failed > 0)
}
