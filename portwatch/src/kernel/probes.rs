//! Loading and attaching the kernel programs, and reading their loss counters.

use std::path::Path;

use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, RawTracePoint, TracePoint},
    Btf, Ebpf, EbpfLoader,
};
use portwatch_common::{kind, mask, Offsets, SetStateOffsets, MAX_FILTER_PORTS};

use crate::error::{Error, Result};

/// The kernel object, built by build.rs and embedded so the binary ships alone.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portwatch"));

/// (program, category, tracepoint). The state-change hook is attached, in order of
/// preference, as a BTF-typed tracepoint (`inet_sock_set_state_btf`), as a raw tracepoint
/// (`inet_sock_set_state_raw`), both when BTF gives the socket offsets they need, or as the
/// classic tracepoint program listed here.
pub const PROGRAMS: [(&str, &str, &str); 9] = [
    ("sys_enter_bind", "syscalls", "sys_enter_bind"),
    ("sys_exit_bind", "syscalls", "sys_exit_bind"),
    ("sys_enter_listen", "syscalls", "sys_enter_listen"),
    ("sys_exit_listen", "syscalls", "sys_exit_listen"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
];

/// The program on process exit: a scheduler tracepoint, attached with either family.
const EXIT_PROGRAM: (&str, &str, &str) = ("sched_process_exit", "sched", "sched_process_exit");

/// `--hooks`: which family carries bind, listen, connect and close.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// Trampolines where the kernel allows them, else tracepoints.
    #[default]
    Auto,
    Tracepoint,
    Trampoline,
}

/// The family attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `syscalls:sys_{enter,exit}_*`: every syscall of every task takes the traced path.
    Tracepoint,
    /// fentry/fexit on the kernel functions behind the calls: only those calls pay.
    Trampoline,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Tracepoint => "tracepoint",
            Family::Trampoline => "trampoline",
        }
    }
}

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

const fn hook(
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

const TIME_WAIT_HOOKS: [&str; 2] = ["tr_time_wait_gone", "tr_time_wait"];

pub struct LoadConfig<'a> {
    pub tracefs: &'a Path,
    pub offsets: Offsets,
    pub all_events: bool,
    pub ports: &'a [u16],
    pub ringbuf_size: u32,
    pub hooks: HookChoice,
}

/// The loaded programs. Keep this alive for as long as they must stay attached: dropping it
/// detaches everything (and the kernel does the same if the process dies).
pub struct Probes {
    ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    family: Family,
    /// Why `auto` picked the tracepoints, when it did.
    family_why: Option<String>,
    /// The kernel functions the trampoline programs are attached to, as program@function.
    functions: Vec<String>,
    /// Whether TIME_WAIT entries and exits are counted in the kernel (`TW_COUNTS`).
    tw_hooks: bool,
    attached: Vec<&'static str>,
    notes: Vec<String>,
    state: StateHook,
    /// The last `skipped_counts` read.
    skipped: std::cell::Cell<[u64; kind::COUNT as usize]>,
}

/// The BTF-typed (tp_btf) variant of the state-change program: plain loads from the socket.
pub const BTF_STATE_PROGRAM: &str = "inet_sock_set_state_btf";
/// The raw-tracepoint variant of the state-change program: a helper call per socket field.
pub const RAW_STATE_PROGRAM: &str = "inet_sock_set_state_raw";

pub fn load(cfg: &LoadConfig<'_>) -> Result<Probes> {
    let raw_state = raw_state_possible(&cfg.offsets);
    let mut notes = Vec::new();
    let mut ebpf = open(cfg)?;
    // aya's parse of the kernel's BTF, for the trampolines and the typed state tracepoint.
    let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"));
    let (family, family_why, mut plan) = match cfg.hooks {
        HookChoice::Tracepoint => (Family::Tracepoint, None, Plan::default()),
        choice => match btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|b| trampolines(&mut ebpf, b, true))
        {
            Ok(plan) => (Family::Trampoline, None, plan),
            Err(reason) if choice == HookChoice::Trampoline => {
                return Err(Error::NoTrampolines {
                    release: crate::kernel::prereq::kernel_release(),
                    reason,
                })
            }
            Err(reason) => (Family::Tracepoint, Some(reason), Plan::default()),
        },
    };
    notes.append(&mut plan.notes);

    let mut attached = plan.attached;
    let tracepoints: &[(&str, &str, &str)] = match family {
        Family::Tracepoint => &PROGRAMS[..PROGRAMS.len() - 1],
        Family::Trampoline => std::slice::from_ref(&EXIT_PROGRAM),
    };
    for &(program, category, tracepoint) in tracepoints {
        let p = tracepoint_program(&mut ebpf, program)
            .map_err(|e| attach_error(program, category, tracepoint, e))?;
        p.load()
            .map_err(|e| attach_error(program, category, tracepoint, e))?;
        p.attach(category, tracepoint)
            .map_err(|e| attach_error(program, category, tracepoint, e))?;
        attached.push(program);
    }

    // The state-change hook fires about ten times per TCP connection, on every connection
    // of the host: measured, attached it cost 3-4 % of loopback churn throughput by itself.
    // Default mode logs none of those transitions: listeners are seen at listen() and
    // close(), TIME_WAIT sockets come from sock_diag, which is their ground truth anyway
    // (the tracepoint never shows TIME_WAIT nor its expiry), and a conflict the table cannot
    // explain re-reads its namespace at once. So it is loaded now and attached only while
    // it is wanted: always with --all-events, otherwise while a client is attached to the
    // control socket (`set_state_hook`), which then gets LISTEN changes and TIME_WAIT
    // entries live (the kernel's default-mode filter).
    let (state_program, state_kind) = load_state(&mut ebpf, btf.as_ref(), raw_state, &mut notes)?;
    let mut probes_state = StateHook {
        program: state_program,
        kind: state_kind,
        link: None,
    };
    if cfg.all_events {
        probes_state.attach(&mut ebpf).map_err(|source| {
            attach_error(
                state_program,
                state_kind.category(),
                "inet_sock_set_state",
                source,
            )
        })?;
        attached.push(state_program);
    }

    let lost = ebpf
        .take_map("LOST")
        .ok_or(Error::Map {
            name: "LOST",
            source: Box::new(aya::maps::MapError::InvalidName {
                name: "LOST".into(),
            }),
        })
        .and_then(|m| {
            PerCpuArray::try_from(m).map_err(|source| Error::Map {
                name: "LOST",
                source: Box::new(source),
            })
        })?;
    Ok(Probes {
        ebpf,
        lost,
        family,
        family_why,
        functions: plan.functions,
        tw_hooks: plan.tw_hooks,
        attached,
        notes,
        state: probes_state,
        skipped: std::cell::Cell::new([0; kind::COUNT as usize]),
    })
}

/// The classic tracepoint program for TCP state changes, the last fallback of the hook.
const STATE_TRACEPOINT_PROGRAM: &str = "inet_sock_set_state";

/// Parse the embedded object and create its maps, with the loader's globals set. Nothing is
/// loaded into the verifier yet.
fn open(cfg: &LoadConfig<'_>) -> Result<Ebpf> {
    if cfg.ports.len() > MAX_FILTER_PORTS {
        return Err(Error::TooManyPorts {
            given: cfg.ports.len(),
            max: MAX_FILTER_PORTS,
        });
    }
    // The typed and raw tracepoints read the socket themselves; only the classic fallback
    // needs the record layout.
    let ss = if raw_state_possible(&cfg.offsets) {
        SetStateOffsets::default()
    } else {
        set_state_offsets(cfg.tracefs)?
    };
    let mut filter = [0u16; MAX_FILTER_PORTS];
    filter[..cfg.ports.len()].copy_from_slice(cfg.ports);
    let filter_n = cfg.ports.len() as u32;
    let event_mask = if cfg.all_events {
        mask::DEFAULT | mask::TCP_STATE_ALL
    } else {
        mask::DEFAULT
    };
    Ok(EbpfLoader::new()
        .override_global("EVENT_MASK", &event_mask, true)
        .override_global("OFFSETS", &cfg.offsets, true)
        .override_global("SS_OFF", &ss, true)
        .override_global("FILTER_PORTS", &filter, true)
        .override_global("FILTER_N", &filter_n, true)
        .map_max_entries("EVENTS", cfg.ringbuf_size)
        .map_max_entries("BULK", cfg.ringbuf_size)
        .load(EBPF_OBJECT)?)
}

/// What the trampoline family attached (or, for `doctor`, loaded).
#[derive(Default)]
struct Plan {
    attached: Vec<&'static str>,
    functions: Vec<String>,
    tw_hooks: bool,
    notes: Vec<String>,
}

/// Load (and with `attach`, attach) the trampoline family's programs on the functions this
/// kernel's BTF names with the expected parameter count. An `Err` says why the family
/// cannot run here; whatever of it had loaded is unloaded again.
fn trampolines(ebpf: &mut Ebpf, btf: &Btf, attach: bool) -> std::result::Result<Plan, String> {
    let r = try_trampolines(ebpf, btf, attach);
    if r.is_err() {
        unload_trampolines(
            ebpf,
            &TRAMPOLINES.iter().map(|h| h.program).collect::<Vec<_>>(),
        );
    }
    r
}

fn try_trampolines(ebpf: &mut Ebpf, btf: &Btf, attach: bool) -> std::result::Result<Plan, String> {
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
        let Some(function) = h
            .functions
            .iter()
            .find(|f| arity.get(**f) == Some(&h.params))
        else {
            let why = match h
                .functions
                .iter()
                .find_map(|f| arity.get(*f).map(|n| (f, n)))
            {
                Some((f, n)) => format!("{f} takes {n} parameters here, not {}", h.params),
                None => format!(
                    "the kernel's BTF has no function {}",
                    h.functions.join(" or ")
                ),
            };
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
fn unload_trampolines(ebpf: &mut Ebpf, programs: &[&str]) {
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

fn attach_loaded(ebpf: &mut Ebpf, h: &Hook) -> std::result::Result<(), String> {
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

fn load_trampoline(
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

/// What `doctor` reports of the hook families: whether the trampoline family loads here
/// (nothing is attached), on which functions, and what `run --hooks auto` would pick.
pub struct Offer {
    pub trampoline: std::result::Result<Vec<String>, String>,
    pub notes: Vec<String>,
}

pub fn offer(cfg: &LoadConfig<'_>) -> Offer {
    let r = open(cfg).map_err(|e| e.to_string()).and_then(|mut ebpf| {
        let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?;
        trampolines(&mut ebpf, &btf, false)
    });
    match r {
        Ok(plan) => Offer {
            trampoline: Ok(plan.functions),
            notes: plan.notes,
        },
        Err(e) => Offer {
            trampoline: Err(e),
            notes: Vec::new(),
        },
    }
}

fn raw_state_possible(o: &Offsets) -> bool {
    o.sock_ok == 1 && o.remote_ok == 1
}

fn tracepoint_program<'e>(
    ebpf: &'e mut Ebpf,
    program: &str,
) -> std::result::Result<&'e mut TracePoint, aya::programs::ProgramError> {
    ebpf.program_mut(program)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?
        .try_into()
}

/// What the kernel's verifier said about one program.
pub struct Verdict {
    pub program: &'static str,
    /// `Err` holds one line: the syscall's error and the verifier's own reason.
    pub result: std::result::Result<(), String>,
    /// The verifier's whole log when it rejected the program, for a bug report.
    pub log: Option<String>,
}

/// Load every program `run` would load, with the same globals, into this kernel's verifier,
/// then unload them all; nothing is attached. This is what lets `doctor` promise that `run`
/// starts: a tracepoint that exists proves nothing if the verifier rejects its program.
///
/// The state-change hook is reported for the variant `run` would pick, with the reasons it
/// skipped the better ones in `notes`.
pub fn verify(cfg: &LoadConfig<'_>) -> Result<(Vec<Verdict>, Vec<String>)> {
    let mut ebpf = open(cfg)?;
    let mut verdicts = Vec::with_capacity(PROGRAMS.len());
    for (program, _, _) in PROGRAMS {
        if program == STATE_TRACEPOINT_PROGRAM {
            continue;
        }
        let (result, log) = match tracepoint_program(&mut ebpf, program)
            .and_then(aya::programs::TracePoint::load)
        {
            Ok(()) => (Ok(()), None),
            Err(e) => (Err(one_line(&e)), full_log(&e)),
        };
        verdicts.push(Verdict {
            program,
            result,
            log,
        });
    }
    let mut notes = Vec::new();
    let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"));
    match load_state(
        &mut ebpf,
        btf.as_ref(),
        raw_state_possible(&cfg.offsets),
        &mut notes,
    ) {
        Ok((program, _)) => verdicts.push(Verdict {
            program,
            result: Ok(()),
            log: None,
        }),
        Err(Error::Rejected {
            program,
            reason,
            log,
            ..
        }) => verdicts.push(Verdict {
            program,
            result: Err(reason),
            log: Some(log),
        }),
        Err(Error::Attach {
            program, source, ..
        }) => verdicts.push(Verdict {
            program,
            result: Err(one_line(&source)),
            log: full_log(&source),
        }),
        Err(e) => return Err(e),
    }
    // Dropping `ebpf` unloads every program and map.
    Ok((verdicts, notes))
}

/// A program error as one line. A verifier rejection carries the whole instruction trace
/// (hundreds of lines); what the verifier objected to is its last line before the
/// statistics, e.g. `invalid read from stack R10 off=-304 size=8`.
pub fn one_line(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => match verifier_reason(&verifier_log.to_string()) {
            Some(reason) => format!("the verifier rejected it ({io_error}): {reason}"),
            None => format!("the kernel refused to load it: {io_error}"),
        },
        other => other.to_string(),
    }
}

/// The verifier's whole log, when the error carries one.
pub fn full_log(e: &aya::programs::ProgramError) -> Option<String> {
    match e {
        aya::programs::ProgramError::LoadError { verifier_log, .. } => {
            Some(verifier_log.to_string())
        }
        _ => None,
    }
}

/// The verifier's reason: the last log line that is not a statistic or a blank.
pub fn verifier_reason(log: &str) -> Option<String> {
    const STATS: [&str; 6] = [
        "processed ",
        "verification time",
        "stack depth",
        "max_states_per_insn",
        "peak_states",
        "mark_read",
    ];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
        .map(str::to_string)
}

/// Which program type carries the state-change hook.
#[derive(Clone, Copy)]
enum StateKind {
    Btf,
    Raw,
    Classic,
}

impl StateKind {
    fn category(self) -> &'static str {
        match self {
            StateKind::Btf => "tp_btf",
            StateKind::Raw => "raw_tracepoint",
            StateKind::Classic => "sock",
        }
    }
}

enum StateLink {
    Btf(aya::programs::tp_btf::BtfTracePointLinkId),
    Raw(aya::programs::raw_trace_point::RawTracePointLinkId),
    Classic(aya::programs::trace_point::TracePointLinkId),
}

/// The loaded state-change program and, while attached, its link.
struct StateHook {
    program: &'static str,
    kind: StateKind,
    link: Option<StateLink>,
}

impl StateHook {
    fn attach(&mut self, ebpf: &mut Ebpf) -> std::result::Result<(), aya::programs::ProgramError> {
        if self.link.is_some() {
            return Ok(());
        }
        let p = ebpf
            .program_mut(self.program)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?;
        self.link = Some(match self.kind {
            StateKind::Btf => StateLink::Btf(<&mut BtfTracePoint>::try_from(p)?.attach()?),
            StateKind::Raw => {
                StateLink::Raw(<&mut RawTracePoint>::try_from(p)?.attach("inet_sock_set_state")?)
            }
            StateKind::Classic => StateLink::Classic(
                <&mut TracePoint>::try_from(p)?.attach("sock", "inet_sock_set_state")?,
            ),
        });
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> std::result::Result<(), aya::programs::ProgramError> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        let p = ebpf
            .program_mut(self.program)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?;
        match link {
            StateLink::Btf(id) => <&mut BtfTracePoint>::try_from(p)?.detach(id),
            StateLink::Raw(id) => <&mut RawTracePoint>::try_from(p)?.detach(id),
            StateLink::Classic(id) => <&mut TracePoint>::try_from(p)?.detach(id),
        }
    }
}

/// Load (not attach) the state-change program: the typed tracepoint if the kernel takes it,
/// else the raw one, both when BTF gave the socket offsets; else the classic tracepoint.
fn load_state(
    ebpf: &mut Ebpf,
    btf: std::result::Result<&Btf, &String>,
    raw_state: bool,
    notes: &mut Vec<String>,
) -> Result<(&'static str, StateKind)> {
    let load_err = |program: &'static str, category: &'static str| {
        move |source: aya::programs::ProgramError| {
            attach_error(program, category, "inet_sock_set_state", source)
        }
    };
    if raw_state {
        // A tp_btf program is of the "tracing" type, which some kernels reject (or lack BTF
        // for): then the raw tracepoint, which needs neither, does the same work.
        match btf
            .map_err(std::clone::Clone::clone)
            .and_then(|b| load_btf_state(ebpf, b))
        {
            Ok(()) => return Ok((BTF_STATE_PROGRAM, StateKind::Btf)),
            Err(e) => notes.push(format!(
                "the typed tracepoint {BTF_STATE_PROGRAM} could not be loaded ({e}); using \
                 {RAW_STATE_PROGRAM}, which reads each socket field with a helper call and \
                 costs more per TCP state change"
            )),
        }
        let p: &mut RawTracePoint = ebpf
            .program_mut(RAW_STATE_PROGRAM)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
            .and_then(std::convert::TryInto::try_into)
            .map_err(load_err(RAW_STATE_PROGRAM, "raw_tracepoint"))?;
        p.load()
            .map_err(load_err(RAW_STATE_PROGRAM, "raw_tracepoint"))?;
        return Ok((RAW_STATE_PROGRAM, StateKind::Raw));
    }
    let p: &mut TracePoint = ebpf
        .program_mut("inet_sock_set_state")
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
        .and_then(std::convert::TryInto::try_into)
        .map_err(load_err("inet_sock_set_state", "sock"))?;
    p.load().map_err(load_err("inet_sock_set_state", "sock"))?;
    Ok(("inet_sock_set_state", StateKind::Classic))
}

/// Load the tp_btf state-change program. The kernel's own BTF names the tracepoint's
/// argument types, which is what lets the verifier accept plain loads.
fn load_btf_state(ebpf: &mut Ebpf, btf: &Btf) -> std::result::Result<(), String> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(BTF_STATE_PROGRAM)
        .ok_or_else(|| format!("{BTF_STATE_PROGRAM} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load("inet_sock_set_state", btf).map_err(|e| match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } => {
            format!("the kernel refused it: {io_error}")
        }
        _ => e.to_string(),
    })
}

impl Probes {
    /// Detach and unload every program, all at once. Each tracepoint detach waits for an RCU
    /// grace period in the kernel; one after the other that is about half a second for nine
    /// programs, while concurrent detaches share their grace periods.
    pub fn unload_programs(&mut self) {
        // Keep the skipped-run counts: unloading closes the programs they are read from.
        let _ = self.skipped_counts();
        std::thread::scope(|s| {
            for (_, p) in self.ebpf.programs_mut() {
                s.spawn(move || {
                    if let Ok(tp) = <&mut TracePoint>::try_from(&mut *p) {
                        let _ = tp.unload();
                    } else if let Ok(raw) = <&mut RawTracePoint>::try_from(&mut *p) {
                        let _ = raw.unload();
                    } else if let Ok(typed) = <&mut BtfTracePoint>::try_from(&mut *p) {
                        let _ = typed.unload();
                    } else if let Ok(fe) = <&mut FEntry>::try_from(&mut *p) {
                        let _ = fe.unload();
                    } else if let Ok(fx) = <&mut FExit>::try_from(p) {
                        let _ = fx.unload();
                    }
                });
            }
        });
    }

    /// The programs attached, by name, in attach order.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// The hook family attached, and why `auto` did not pick trampolines if it did not.
    pub fn family(&self) -> (Family, Option<&str>) {
        (self.family, self.family_why.as_deref())
    }

    /// The trampoline programs' kernel functions, as program@function.
    pub fn functions(&self) -> &[String] {
        &self.functions
    }

    /// The kernel's TIME_WAIT counters, when the TIME_WAIT hooks are attached.
    pub fn take_time_wait_counts(&mut self) -> Option<TimeWaitCounts> {
        if !self.tw_hooks {
            return None;
        }
        let m = self.ebpf.take_map("TW_COUNTS")?;
        PerCpuHashMap::try_from(m).ok().map(TimeWaitCounts)
    }

    /// Attach or detach the state-change hook (see `load`). Returns whether it changed.
    pub fn set_state_hook(&mut self, on: bool) -> std::result::Result<bool, String> {
        if on == self.state.link.is_some() {
            return Ok(false);
        }
        let r = if on {
            self.state.attach(&mut self.ebpf)
        } else {
            self.state.detach(&mut self.ebpf)
        };
        r.map(|()| true)
            .map_err(|e| format!("{}: {e}", self.state.program))
    }

    /// Why a preferred program was replaced by a fallback, one sentence each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The ring of prompt events (`EVENTS`) and the ring of a storm's later failures
    /// (`BULK`), which the agent reads only after the first: see the kernel side's emit().
    pub fn take_events(&mut self) -> Result<(RingBuf<MapData>, RingBuf<MapData>)> {
        Ok((self.take_ring("EVENTS")?, self.take_ring("BULK")?))
    }

    fn take_ring(&mut self, name: &'static str) -> Result<RingBuf<MapData>> {
        let m = self.ebpf.take_map(name).ok_or(Error::Map {
            name,
            source: Box::new(aya::maps::MapError::InvalidName { name: name.into() }),
        })?;
        RingBuf::try_from(m).map_err(|source| Error::Map {
            name,
            source: Box::new(source),
        })
    }

    /// Runs of each kind's programs that the kernel skipped, cumulative: since syscall
    /// tracepoints became faultable (6.14) their programs can be preempted, and a second
    /// run of the same program on that CPU is skipped by the kernel's recursion guard and
    /// counted in the program's `recursion_misses` (seen on 7.2 under a flood). An event
    /// lost that way is counted like a full ring buffer's.
    pub fn skipped_counts(&self) -> [u64; kind::COUNT as usize] {
        // Once the programs are unloaded their counts are gone: the last ones read stand.
        let mut out = self.skipped.get();
        let mut fresh = [0u64; kind::COUNT as usize];
        let mut any = false;
        for (name, p) in self.ebpf.programs() {
            let k = match name {
                n if n.contains("bind") => kind::BIND,
                n if n.contains("listen") => kind::LISTEN,
                n if n.contains("connect") => kind::CONNECT,
                n if n.contains("close") || n.contains("release") => kind::CLOSE,
                n if n.contains("time_wait") => kind::TCP_STATE,
                n if n.contains("exit") => kind::EXIT,
                _ => kind::TCP_STATE,
            };
            let Ok(fd) = p.fd() else {
                continue;
            };
            if let Some(n) = recursion_misses(std::os::fd::AsFd::as_fd(fd)) {
                fresh[k as usize] += n;
                any = true;
            }
        }
        if any {
            out = fresh;
            self.skipped.set(out);
        }
        out
    }

    /// Cumulative failed ring-buffer reserves per kind, summed over CPUs.
    pub fn lost_counts(&self) -> [u64; kind::COUNT as usize] {
        let mut out = [0u64; kind::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.lost.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }
}

/// TIME_WAIT sockets created and destroyed per network namespace since the hooks were
/// attached, counted in the kernel at `inet_twsk_alloc` and `inet_twsk_kill`.
pub struct TimeWaitCounts(PerCpuHashMap<MapData, u32, [u64; 2]>);

impl TimeWaitCounts {
    /// (created, destroyed) in namespace `netns`, summed over CPUs.
    pub fn get(&self, netns: u32) -> (u64, u64) {
        match self.0.get(&netns, 0) {
            Ok(v) => v.iter().fold((0, 0), |(a, b), x| (a + x[0], b + x[1])),
            Err(_) => (0, 0),
        }
    }
}

/// `bpf_prog_info.recursion_misses` of a loaded program (BPF_OBJ_GET_INFO_BY_FD); None
/// when the kernel does not say (before 5.12 the field is absent and stays 0).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // SAFETY: bpf_prog_info is plain old data; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: std::ptr::addr_of_mut!(info) as u64,
    };
    // SAFETY: the kernel writes at most info_len bytes into `info`, which outlives the call;
    // attr is as large as the union member this command reads.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            std::ptr::addr_of_mut!(attr),
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (rc == 0).then_some(info.recursion_misses)
}

/// Field offsets of `sock:inet_sock_set_state`, from its tracefs format file.
fn set_state_offsets(tracefs: &Path) -> Result<SetStateOffsets> {
    const NAME: &str = "sock:inet_sock_set_state";
    let path = tracefs.join("events/sock/inet_sock_set_state/format");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::TracepointFormat {
        name: NAME,
        path: path.clone(),
        source,
    })?;
    let get = |field: &'static str| {
        format_field_offset(&text, field).ok_or(Error::TracepointField { name: NAME, field })
    };
    Ok(SetStateOffsets {
        skaddr: get("skaddr")?,
        oldstate: get("oldstate")?,
        newstate: get("newstate")?,
        sport: get("sport")?,
        dport: get("dport")?,
        family: get("family")?,
        protocol: get("protocol")?,
        saddr: get("saddr")?,
        daddr: get("daddr")?,
        saddr_v6: get("saddr_v6")?,
        daddr_v6: get("daddr_v6")?,
        _pad: 0,
    })
}

/// Offset of `field` in a tracefs format file, whose lines look like
/// `field:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;` (arrays as `name[16]`).
pub fn format_field_offset(text: &str, field: &str) -> Option<u32> {
    for line in text.lines() {
        let line = line.trim();
        let Some(decl) = line.strip_prefix("field:") else {
            continue;
        };
        let Some((decl, rest)) = decl.split_once(';') else {
            continue;
        };
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("");
        let name = name.split('[').next().unwrap_or("");
        if name != field {
            continue;
        }
        let off = rest
            .split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?;
        return off.trim().parse().ok();
    }
    None
}

/// A failure to load or attach a program. A verifier rejection becomes one line with
/// the verifier's reason instead of its whole instruction trace.
pub(crate) fn attach_error(
    program: &'static str,
    category: &'static str,
    tracepoint: &'static str,
    source: aya::programs::ProgramError,
) -> Error {
    if matches!(source, aya::programs::ProgramError::LoadError { .. }) {
        return Error::Rejected {
            program,
            release: crate::kernel::prereq::kernel_release(),
            reason: one_line(&source),
            log: full_log(&source).unwrap_or_default(),
        };
    }
    Error::Attach {
        program,
        category,
        tracepoint,
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state\nID: 1519\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\n\
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;\n\
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";

    #[test]
    fn verifier_reason_is_the_last_line_before_the_statistics() {
        let log =
            "func#0 @0\n0: R1=ctx() R10=fp0\n; let fd = 2\n123: (79) r1 = *(u64 *)(r10 -304)\n\
                   invalid read from stack R10 off=-304 size=8\n\
                   processed 412 insns (limit 1000000) max_states_per_insn 1 total_states 30 \
                   peak_states 30 mark_read 12\n\n";
        assert_eq!(
            verifier_reason(log).as_deref(),
            Some("invalid read from stack R10 off=-304 size=8")
        );
        assert_eq!(verifier_reason("\n\n"), None);
    }

    #[test]
    fn parses_format_offsets() {
        assert_eq!(format_field_offset(FORMAT, "skaddr"), Some(8));
        assert_eq!(format_field_offset(FORMAT, "oldstate"), Some(16));
        assert_eq!(format_field_offset(FORMAT, "sport"), Some(24));
        assert_eq!(format_field_offset(FORMAT, "saddr"), Some(32));
        assert_eq!(format_field_offset(FORMAT, "saddr_v6"), Some(40));
        assert_eq!(format_field_offset(FORMAT, "daddr"), None);
    }
}
