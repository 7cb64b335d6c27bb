//! `portwatch doctor`: every prerequisite checked, with a fix for each.

use std::path::Path;

use crate::control::{self};

use crate::cli::render::Style;

struct Check {
    name: String,
    ok: bool,
    detail: String,
    fix: String,
}

pub fn doctor(runtime_dir: &Path, log_path: &Path, docker_sock: &Path, verbose: bool) -> u8 {
    let mut checks = Vec::new();
    let mut add = |name: &str, ok: bool, detail: String, fix: &str| {
        checks.push(Check {
            name: name.into(),
            ok,
            detail,
            fix: fix.into(),
        });
    };
    let release = crate::kernel::prereq::kernel_release();
    let kernel_ok =
        crate::kernel::prereq::kernel_version().is_some_and(crate::kernel::prereq::supported);
    add(
        "kernel",
        kernel_ok,
        format!("Linux {release}"),
        "portwatch needs Linux 5.8 or newer (ring buffer maps, CAP_BPF)",
    );
    let btf = Path::new(crate::kernel::prereq::BTF_PATH).exists();
    add(
        "btf",
        btf,
        crate::kernel::prereq::BTF_PATH.into(),
        "use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
    );
    let priv_ok = crate::kernel::prereq::check_privileges().is_ok();
    add(
        "privileges",
        priv_ok,
        if priv_ok {
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
    add(
        "tracefs",
        tracefs.is_some(),
        tracefs
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "not mounted".into()),
        "mount -t tracefs nodev /sys/kernel/tracing (portwatch run does this itself as root)",
    );
    for (_, cat, tp) in crate::kernel::probes::PROGRAMS {
        let ok = tracefs.is_some_and(|t| t.join("events").join(cat).join(tp).join("id").exists());
        add(
            &format!("tracepoint {cat}:{tp}"),
            ok,
            if ok {
                "present".into()
            } else {
                "missing".into()
            },
            "mount tracefs; a kernel without this tracepoint is not supported",
        );
    }
    // A tracepoint that exists proves nothing if the verifier rejects the program for it:
    // load every program `run` would load, with the same globals, then unload it.
    let mut degraded = Vec::new();
    let mut logs = Vec::new();
    if priv_ok && btf && kernel_ok {
        let (offsets, _) = crate::kernel::btf::resolve(Path::new(crate::kernel::prereq::BTF_PATH));
        let cfg = crate::kernel::probes::LoadConfig {
            tracefs: tracefs.unwrap_or(Path::new("/sys/kernel/tracing")),
            offsets,
            all_events: false,
            ports: &[],
            ringbuf_size: 4 << 20,
            hooks: crate::kernel::probes::HookChoice::Tracepoint,
        };
        // What the kernel offers for bind/listen/connect/close: trampolines are loaded (on
        // the functions its BTF names) and unloaded; either family works, so this informs.
        let offer = crate::kernel::probes::offer(&cfg);
        let detail = match &offer.trampoline {
            Ok(functions) => format!(
                "trampoline (fentry/fexit) available: `run` attaches {}",
                functions.join(", ")
            ),
            Err(why) => format!(
                "tracepoint only: trampolines unavailable ({why}); `run` attaches the \
                 syscall tracepoints"
            ),
        };
        add("hooks", true, detail, "");
        let trampoline_notes = offer.notes;
        match crate::kernel::probes::verify(&cfg) {
            Ok((verdicts, notes)) => {
                for v in verdicts {
                    let ok = v.result.is_ok();
                    if let Some(log) = v.log {
                        logs.push((v.program, log));
                    }
                    add(
                        &format!("program {}", v.program),
                        ok,
                        v.result
                            .err()
                            .unwrap_or_else(|| "accepted by the verifier".into()),
                        "portwatch run cannot start on this kernel; report it with this output",
                    );
                }
                degraded = notes;
                degraded.extend(trampoline_notes);
            }
            Err(e) => add(
                "programs",
                false,
                e.to_string(),
                "portwatch run cannot start on this kernel; report it with this output",
            ),
        }
    } else {
        add(
            "programs",
            false,
            "not loaded: needs root, kernel BTF and Linux 5.8+".into(),
            "fix the checks above, then run doctor again",
        );
    }
    let docker = std::os::unix::net::UnixStream::connect(docker_sock).is_ok();
    let docker_detail = if docker {
        docker_sock.display().to_string()
    } else {
        format!("{} (optional)", docker_sock.display())
    };
    let dir = log_path.parent().unwrap_or(Path::new("/"));
    let log_ok = std::fs::create_dir_all(dir).is_ok()
        && std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .is_ok();
    add(
        "log path",
        log_ok,
        log_path.display().to_string(),
        "make the directory writable by root or pass --log-file",
    );
    let agent = control::running_agent(runtime_dir);
    add(
        "agent",
        agent.is_some(),
        agent
            .map(|p| format!("running, pid {p}"))
            .unwrap_or_else(|| "not running".into()),
        "start it: sudo portwatch run (or systemctl start portwatch)",
    );
    let st = Style::for_stdout();
    // Docker is optional: without it records only lack container names, so it warns.
    let warn = (!docker).then_some((
        docker_detail,
        "start dockerd to get container names on records",
    ));
    let mut failed = 0;
    for c in &checks {
        let mark = if c.ok {
            st.paint("32", "PASS")
        } else {
            st.paint("31", "FAIL")
        };
        if c.ok {
            println!("{mark} {:<36} {}", c.name, c.detail);
        } else {
            failed += 1;
            println!("{mark} {:<36} {} -- fix: {}", c.name, c.detail, c.fix);
        }
    }
    if verbose {
        for (program, log) in &logs {
            println!("--- verifier log of {program} ---\n{}", log.trim_end());
        }
    } else if !logs.is_empty() {
        println!("(run `portwatch doctor --verbose` for the verifier's whole log)");
    }
    for note in &degraded {
        println!("{} {:<36} {note}", st.paint("33", "WARN"), "degraded");
    }
    if let Some((detail, fix)) = warn {
        println!(
            "{} {:<36} {detail} -- fix: {fix}",
            st.paint("33", "WARN"),
            "docker socket"
        );
    } else {
        println!(
            "{} {:<36} {}",
            st.paint("32", "PASS"),
            "docker socket",
            docker_sock.display()
        );
    }
    u8::from(failed > 0)
}
