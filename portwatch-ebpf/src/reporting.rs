//! Events: the per-task fields, and the submit to `EVENTS` or `BULK` with its wakeup policy.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
    bpf_get_current_uid_gid, bpf_ktime_get_ns,
};
use portwatch_common::{kind, Event, Offsets};

use crate::maps::{count_lost, BULK, EVENTS, LOST, PROMPT_AT, PROMPT_GAP_NS};
use crate::read::current_netns;

/// Fill the fields every event carries, from the current task.
#[inline(always)]
pub(crate) fn fill_task(e: &mut Event, k: u32, o: &Offsets) {
    let pid_tgid = bpf_get_current_pid_tgid();
    e.kind = k;
    // SAFETY: helpers without preconditions.
    unsafe {
        e.ts_ns = bpf_ktime_get_ns();
        e.cgroup_id = bpf_get_current_cgroup_id();
    }
    e.pid = (pid_tgid >> 32) as u32;
    e.tid = pid_tgid as u32;
    e.uid = bpf_get_current_uid_gid() as u32;
    e.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    e.netns = current_netns(o);
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Reserve, write, submit; count the loss when the ring buffer is full.
///
/// Only failures wake the agent at once (a conflict must reach the log within
/// milliseconds). Everything else is submitted without a wakeup and collected by the agent's
/// periodic drain: at thousands of connections a second, a wakeup per TIME_WAIT entry would
/// cost the agent more than the events themselves. A failure forces its wakeup: the default
/// only wakes a reader that has consumed everything before the record, which is never the
/// case while unwoken records wait in front of it.
#[inline(always)]
pub(crate) fn emit(e: &Event) {
    let urgent = e.ret < 0 && prompt(prompt_key(e), e.ts_ns);
    // Successes (the table's facts) stay in EVENTS, in order with the prompt failures that
    // are attributed against them.
    let ring = if e.ret < 0 && !urgent { &BULK } else { &EVENTS };
    match ring.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(*e);
            entry.submit(if urgent {
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            });
        }
        None => {
            if let Some(p) = LOST.get_ptr_mut(e.kind) {
                count_lost(p);
            }
        }
    }
}

/// What makes failures repeats of one another here: the process, the call, the port (the
/// destination's for connect) and the error, as the agent's coalescing has it (it also
/// compares addresses; two addresses on one port share a key here and only lose a wakeup).
#[inline(always)]
fn prompt_key(e: &Event) -> u64 {
    let port = if e.kind == kind::CONNECT {
        e.rport
    } else {
        e.port
    };
    (u64::from(e.pid) << 32)
        | (u64::from(e.kind & 0xff) << 24)
        | (u64::from(port) << 8)
        | u64::from(e.ret.unsigned_abs() & 0xff)
}

/// Whether this failure goes out promptly: the first of its key, or the first
/// `PROMPT_GAP_NS` after the last prompt one. Two CPUs may both find the gap passed and
/// both send promptly; that only costs a wakeup.
#[inline(always)]
fn prompt(key: u64, now: u64) -> bool {
    // SAFETY: the value is a plain u64 in a map this program owns.
    if let Some(t) = unsafe { PROMPT_AT.get(&key) } {
        if now.wrapping_sub(*t) < PROMPT_GAP_NS {
            return false;
        }
    }
    let _ = PROMPT_AT.insert(&key, &now, 0);
    true
}
