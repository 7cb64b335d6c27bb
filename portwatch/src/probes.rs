//! Loading and attaching the kernel programs, and reading their loss counters.

use std::path::Path;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, RawTracePoint, TracePoint},
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

pub struct LoadConfig<'a> {
    pub tracefs: &'a Path,
    pub offsets: Offsets,
    pub all_events: bool,
    pub ports: &'a [u16],
    pub ringbuf_size: u32,
}

/// The loaded programs. Keep this alive for as long as they must stay attached: dropping it
/// detaches everything (and the kernel does the same if the process dies).
pub struct Probes {
    ebpf: Ebpf,
    lost: PerCpuArray<MapData, u64>,
    attached: Vec<&'static str>,
    notes: Vec<String>,
}

/// The BTF-typed (tp_btf) variant of the state-change program: plain loads from the socket.
pub const BTF_STATE_PROGRAM: &str = "inet_sock_set_state_btf";
/// The raw-tracepoint variant of the state-change program: a helper call per socket field.
pub const RAW_STATE_PROGRAM: &str = "inet_sock_set_state_raw";

pub fn load(cfg: &LoadConfig<'_>) -> Result<Probes> {
    if cfg.ports.len() > MAX_FILTER_PORTS {
        return Err(Error::TooManyPorts {
            given: cfg.ports.len(),
            max: MAX_FILTER_PORTS,
        });
    }
    // The typed and raw tracepoints read the socket themselves; only the classic fallback
    // needs the record layout, and only --all-events attaches any of them.
    let raw_state = cfg.offsets.sock_ok == 1 && cfg.offsets.remote_ok == 1;
    let ss = if raw_state || !cfg.all_events {
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

    let mut ebpf = EbpfLoader::new()
        .override_global("EVENT_MASK", &event_mask, true)
        .override_global("OFFSETS", &cfg.offsets, true)
        .override_global("SS_OFF", &ss, true)
        .override_global("FILTER_PORTS", &filter, true)
        .override_global("FILTER_N", &filter_n, true)
        .map_max_entries("EVENTS", cfg.ringbuf_size)
        .load(EBPF_OBJECT)?;

    let mut attached = Vec::with_capacity(PROGRAMS.len());
    let mut notes = Vec::new();
    for (program, category, tracepoint) in PROGRAMS {
        // The state-change hook fires about ten times per TCP connection, on every
        // connection of the host: measured, it cost 3-4 % of loopback churn throughput by
        // itself. Default mode needs none of those transitions: listeners are seen at
        // listen() and close(), TIME_WAIT sockets come from sock_diag, which is their ground
        // truth anyway (the tracepoint never shows TIME_WAIT nor its expiry), and a conflict
        // the table cannot explain re-reads its namespace at once. Only --all-events, which
        // logs every transition, attaches it.
        if program == "inet_sock_set_state" && !cfg.all_events {
            continue;
        }
        if raw_state && program == "inet_sock_set_state" {
            // A tp_btf program is of the "tracing" type, which some kernels reject (or lack
            // BTF for): then the raw tracepoint, which needs neither, does the same work.
            match attach_btf_state(&mut ebpf, tracepoint) {
                Ok(()) => {
                    attached.push(BTF_STATE_PROGRAM);
                    continue;
                }
                Err(e) => notes.push(format!(
                    "the typed tracepoint {BTF_STATE_PROGRAM} could not be attached ({e}); \
                     using {RAW_STATE_PROGRAM}, which reads each socket field with a helper \
                     call and costs more per TCP state change"
                )),
            }
            let program = RAW_STATE_PROGRAM;
            let attach = |ebpf: &mut Ebpf| -> Result<(), aya::programs::ProgramError> {
                let p: &mut RawTracePoint = ebpf
                    .program_mut(program)
                    .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?
                    .try_into()?;
                p.load()?;
                p.attach(tracepoint)?;
                Ok(())
            };
            attach(&mut ebpf).map_err(|source| Error::Attach {
                program,
                category: "raw_tracepoint",
                tracepoint,
                source: Box::new(source),
            })?;
            attached.push(program);
            continue;
        }
        let attach = |ebpf: &mut Ebpf| -> Result<(), aya::programs::ProgramError> {
            let p: &mut TracePoint = ebpf
                .program_mut(program)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?
                .try_into()?;
            p.load()?;
            p.attach(category, tracepoint)?;
            Ok(())
        };
        attach(&mut ebpf).map_err(|source| Error::Attach {
            program,
            category,
            tracepoint,
            source: Box::new(source),
        })?;
        attached.push(program);
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
        attached,
        notes,
    })
}

/// Load and attach the tp_btf state-change program. The kernel's own BTF names the
/// tracepoint's argument types, which is what lets the verifier accept plain loads.
fn attach_btf_state(ebpf: &mut Ebpf, tracepoint: &str) -> std::result::Result<(), String> {
    let btf = Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?;
    let p: &mut BtfTracePoint = ebpf
        .program_mut(BTF_STATE_PROGRAM)
        .ok_or_else(|| format!("{BTF_STATE_PROGRAM} missing from the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load(tracepoint, &btf).map_err(|e| match &e {
        aya::programs::ProgramError::LoadError { io_error, .. } => {
            format!("the kernel refused it: {io_error}")
        }
        _ => e.to_string(),
    })?;
    p.attach().map_err(|e| e.to_string())?;
    Ok(())
}

impl Probes {
    /// Detach and unload every program, all at once. Each tracepoint detach waits for an RCU
    /// grace period in the kernel; one after the other that is about half a second for nine
    /// programs, while concurrent detaches share their grace periods.
    pub fn detach(mut self) {
        std::thread::scope(|s| {
            for (_, p) in self.ebpf.programs_mut() {
                s.spawn(move || {
                    if let Ok(tp) = <&mut TracePoint>::try_from(&mut *p) {
                        let _ = tp.unload();
                    } else if let Ok(raw) = <&mut RawTracePoint>::try_from(&mut *p) {
                        let _ = raw.unload();
                    } else if let Ok(typed) = <&mut BtfTracePoint>::try_from(p) {
                        let _ = typed.unload();
                    }
                });
            }
        });
    }

    /// The programs attached, by name, in attach order.
    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Why a preferred program was replaced by a fallback, one sentence each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let m = self.ebpf.take_map("EVENTS").ok_or(Error::Map {
            name: "EVENTS",
            source: Box::new(aya::maps::MapError::InvalidName {
                name: "EVENTS".into(),
            }),
        })?;
        RingBuf::try_from(m).map_err(|source| Error::Map {
            name: "EVENTS",
            source: Box::new(source),
        })
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
    fn parses_format_offsets() {
        assert_eq!(format_field_offset(FORMAT, "skaddr"), Some(8));
        assert_eq!(format_field_offset(FORMAT, "oldstate"), Some(16));
        assert_eq!(format_field_offset(FORMAT, "sport"), Some(24));
        assert_eq!(format_field_offset(FORMAT, "saddr"), Some(32));
        assert_eq!(format_field_offset(FORMAT, "saddr_v6"), Some(40));
        assert_eq!(format_field_offset(FORMAT, "daddr"), None);
    }
}
