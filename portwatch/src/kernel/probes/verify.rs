//! For `doctor` and `report`: what each family offers here, every program through the
//! verifier (loaded and unloaded, nothing attached), and the verifier's reason in one line.

use super::*;

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

pub(super) fn raw_state_possible(o: &Offsets) -> bool {
    o.sock_ok == 1 && o.remote_ok == 1
}

pub(super) fn tracepoint_program<'e>(
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
