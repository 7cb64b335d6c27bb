//! The trampoline family (fentry/fexit): each program's kernel functions looked up in the
//! running kernel's BTF, loaded, and attached, or the reason the family cannot be used.

use super::*;

/// One trampoline program: the kernel functions it may attach to, in order of preference,
/// and the parameter count it was written for.
pub struct Hook {
    pub program: &'static str,
    /// fexit (after the function returns) or fentry.
    pub exit: bool,
    pub functions: &'static [&'static str],
    pub params: usize,
    /// Without it the family cannot report what the tracepoints do.
    pub required: bool,
}

pub(super) const fn hook(
    program: &'static str,
    exit: bool,
    functions: &'static [&'static str],
    params: usize,
    required: bool,
) -> Hook {
    Hook {
        program,
        exit,
        functions,
        params,
        required,
    }
}

/// The trampoline family. The `_socket` functions (6.11+) are what io_uring's
/// IORING_OP_BIND/LISTEN call; the two TIME_WAIT hooks go together or not at all.
pub const TRAMPOLINES: [Hook; 10] = [
    hook("tr_release", false, &["inet_release"], 1, true),
    hook("tr_bind_exit", true, &["__sys_bind"], 3, true),
    hook("tr_bind_enter", false, &["__sys_bind"], 3, true),
    hook(
        "tr_bind_socket_exit",
        true,
        &["__sys_bind_socket"],
        3,
        false,
    ),
    hook("tr_listen_exit", true, &["__sys_listen"], 2, true),
    hook("tr_listen_enter", false, &["__sys_listen"], 2, true),
    hook(
        "tr_listen_socket_exit",
        true,
        &["__sys_listen_socket"],
        2,
        false,
    ),
    hook("tr_connect_exit", true, &["__sys_connect"], 3, true),
    hook("tr_time_wait_gone", false, &["inet_twsk_kill"], 1, false),
    hook("tr_time_wait", true, &["inet_twsk_alloc"], 3, false),
];

pub(super) const TIME_WAIT_HOOKS: [&str; 2] = ["tr_time_wait_gone", "tr_time_wait"];

/// What the trampoline family attached (or, for `doctor`, loaded).
#[derive(Default)]
pub(super) struct Plan {
    pub(super) attached: Vec<&'static str>,
    pub(super) functions: Vec<String>,
    pub(super) tw_hooks: bool,
    pub(super) notes: Vec<String>,
}

/// Load (and with `attach`, attach) the trampoline family's programs on the functions this
/// kernel's BTF names with the expected parameter count. An `Err` says why the family
/// cannot run here; whatever of it had loaded is unloaded again.
pub(super) fn trampolines(
    ebpf: &mut Ebpf,
    btf: &Btf,
    attach: bool,
) -> std::result::Result<Plan, String> {
    let r = try_trampolines(ebpf, btf, attach);
    if r.is_err() {
        unload_trampolines(
            ebpf,
            &TRAMPOLINES.iter().map(|h| h.program).collect::<Vec<_>>(),
        );
    }
    r
}

pub(super) fn try_trampolines(
    ebpf: &mut Ebpf,
    btf: &Btf,
    attach: bool,
) -> std::result::Result<Plan, String> {
    // Kernels without BPF trampolines refuse every fentry/fexit program: find out with one
    // before parsing the BTF for the others' signatures.
    let first = &TRAMPOLINES[0];
    load_trampoline(ebpf, first, first.functions[0], btf, false).map_err(|e| {
        format!(
            "{} on {}: {e}{}",
            first.program,
            first.functions[0],
            if e.contains("Operation not permitted") || e.contains("not supported") {
                " (a kernel built without BPF trampolines refuses every fentry/fexit program)"
            } else {
                ""
            }
        )
    })?;
    let names: Vec<&str> = TRAMPOLINES
        .iter()
        .flat_map(|h| h.functions.iter().copied())
        .collect();
    let arity =
        crate::kernel::btf::function_arity(Path::new(crate::kernel::prereq::BTF_PATH), &names)?;
    let mut plan = Plan::default();
    let mut tw_loaded = 0;
    for (i, h) in TRAMPOLINES.iter().enumerate() {
        let function = match function_for(h, &arity) {
            Ok(f) => f,
            Err(why) => {
                if h.required {
                    return Err(why);
                }
                // The io_uring variants exist from 6.11 on; before, there is nothing to miss.
                // Without the TIME_WAIT hooks the counts come from the dumps: say so.
                if TIME_WAIT_HOOKS.contains(&h.program) {
                    plan.notes.push(format!(
                        "{}: not attached ({why}): TIME_WAIT entries and expiries are derived \
                         from sock_diag dumps",
                        h.program
                    ));
                }
                continue;
            }
        };
        if h.program == TIME_WAIT_HOOKS[1] && tw_loaded == 0 {
            // Its partner did not load: counting entries without exits would be wrong.
            continue;
        }
        // The first one is loaded already (on the same function: inet_release).
        let r = if i == 0 {
            if attach {
                attach_loaded(ebpf, h)
            } else {
                Ok(())
            }
        } else {
            load_trampoline(ebpf, h, function, btf, attach)
        };
        match r {
            Ok(()) => {
                plan.attached.push(h.program);
                plan.functions.push(format!("{}@{function}", h.program));
                if TIME_WAIT_HOOKS.contains(&h.program) {
                    tw_loaded += 1;
                }
            }
            Err(e) if h.required => return Err(format!("{} on {function}: {e}", h.program)),
            Err(e) => plan
                .notes
                .push(format!("{} on {function}: not attached: {e}", h.program)),
        }
    }
    plan.tw_hooks = tw_loaded == TIME_WAIT_HOOKS.len();
    if !plan.tw_hooks {
        if tw_loaded == 1 {
            plan.notes.push(
                "TIME_WAIT exits could be hooked but not entries: TIME_WAIT counts come from \
                 sock_diag dumps"
                    .into(),
            );
        }
        plan.attached.retain(|p| !TIME_WAIT_HOOKS.contains(p));
        plan.functions.retain(|f| {
            !TIME_WAIT_HOOKS
                .iter()
                .any(|p| f.starts_with(&format!("{p}@")))
        });
        unload_trampolines(ebpf, &TIME_WAIT_HOOKS);
    }
    Ok(plan)
}

/// Unload (and so detach) these trampoline programs, where loaded.
pub(super) fn unload_trampolines(ebpf: &mut Ebpf, programs: &[&str]) {
    for p in programs {
        let Some(prog) = ebpf.program_mut(p) else {
            continue;
        };
        if let Ok(fe) = <&mut FEntry>::try_from(&mut *prog) {
            let _ = fe.unload();
        } else if let Ok(fx) = <&mut FExit>::try_from(prog) {
            let _ = fx.unload();
        }
    }
}

pub(super) fn attach_loaded(ebpf: &mut Ebpf, h: &Hook) -> std::result::Result<(), String> {
    let prog = ebpf
        .program_mut(h.program)
        .ok_or_else(|| format!("{} missing from the object", h.program))?;
    if h.exit {
        let p: &mut FExit = prog
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.attach().map(|_| ()).map_err(|e| e.to_string())
    } else {
        let p: &mut FEntry = prog
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        p.attach().map(|_| ()).map_err(|e| e.to_string())
    }
}

pub(super) fn load_trampoline(
    ebpf: &mut Ebpf,
    h: &Hook,
    function: &str,
    btf: &Btf,
    attach: bool,
) -> std::result::Result<(), String> {
    let prog = ebpf
        .program_mut(h.program)
        .ok_or_else(|| format!("{} missing from the object", h.program))?;
    let refused = |e: aya::programs::ProgramError| match &e {
        aya::programs::ProgramError::LoadError { .. } => one_line(&e),
        _ => e.to_string(),
    };
    if h.exit {
        let p: &mut FExit = prog.try_into().map_err(refused)?;
        p.load(function, btf).map_err(refused)?;
        if attach {
            p.attach().map_err(refused)?;
        }
    } else {
        let p: &mut FEntry = prog.try_into().map_err(refused)?;
        p.load(function, btf).map_err(refused)?;
        if attach {
            p.attach().map_err(refused)?;
        }
    }
    Ok(())
}

/// The first of the hook's kernel functions whose parameter count in this kernel's BTF is
/// the one the program was written for; else why none is.
fn function_for(
    h: &Hook,
    arity: &std::collections::HashMap<String, usize>,
) -> std::result::Result<&'static str, String> {
    if let Some(f) = h
        .functions
        .iter()
        .find(|f| arity.get(**f) == Some(&h.params))
    {
        return Ok(f);
    }
    Err(
        match h
            .functions
            .iter()
            .find_map(|f| arity.get(*f).map(|n| (f, n)))
        {
            Some((f, n)) => format!("{f} takes {n} parameters here, not {}", h.params),
            None => format!(
                "the kernel's BTF has no function {}",
                h.functions.join(" or ")
            ),
        },
    )
}
