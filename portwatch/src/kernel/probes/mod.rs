//! Loading and attaching the kernel programs, and reading their loss counters.

mod state;
mod trampoline;
mod verify;

use state::*;
use trampoline::*;
#[cfg(test)]
use verify::verifier_reason;
pub use verify::{full_log, offer, one_line, verify};
use verify::{raw_state_possible, tracepoint_program};

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
