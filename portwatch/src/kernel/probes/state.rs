//! The TCP state-change hook: a BTF-typed tracepoint, else a raw one, else the classic
//! tracepoint with offsets from its tracefs format file; attached only while wanted.

use super::*;

/// The classic tracepoint program for TCP state changes, the last fallback of the hook.
pub(super) const STATE_TRACEPOINT_PROGRAM: &str = "inet_sock_set_state";

/// Which program type carries the state-change hook.
#[derive(Clone, Copy)]
pub(super) enum StateKind {
    Btf,
    Raw,
    Classic,
}

impl StateKind {
    pub(super) fn category(self) -> &'static str {
        match self {
            StateKind::Btf => "tp_btf",
            StateKind::Raw => "raw_tracepoint",
            StateKind::Classic => "sock",
        }
    }
}

pub(super) enum StateLink {
    Btf(aya::programs::tp_btf::BtfTracePointLinkId),
    Raw(aya::programs::raw_trace_point::RawTracePointLinkId),
    Classic(aya::programs::trace_point::TracePointLinkId),
}

/// The loaded state-change program and, while attached, its link.
pub(super) struct StateHook {
    pub(super) program: &'static str,
    pub(super) kind: StateKind,
    pub(super) link: Option<StateLink>,
}

impl StateHook {
    pub(super) fn attach(
        &mut self,
        ebpf: &mut Ebpf,
    ) -> std::result::Result<(), aya::programs::ProgramError> {
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

    pub(super) fn detach(
        &mut self,
        ebpf: &mut Ebpf,
    ) -> std::result::Result<(), aya::programs::ProgramError> {
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
pub(super) fn load_state(
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
pub(super) fn load_btf_state(ebpf: &mut Ebpf, btf: &Btf) -> std::result::Result<(), String> {
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

/// Field offsets of `sock:inet_sock_set_state`, from its tracefs format file.
pub(super) fn set_state_offsets(tracefs: &Path) -> Result<SetStateOffsets> {
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
