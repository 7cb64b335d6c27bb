//! The loader-set globals and every map, with the small helpers that read the globals and
//! compute map keys and slots.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use portwatch_common::{kind, mask, Offsets, SetStateOffsets, MAX_FILTER_PORTS};

// ---- Loader-set globals (read-only after load, like libbpf-tools' `const volatile`). ----

/// Which event classes to emit (`portwatch_common::mask`).
#[unsafe(no_mangle)]
static EVENT_MASK: u32 = mask::DEFAULT;
/// Kernel struct offsets resolved from BTF by the agent.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::zeroed();
/// `sock:inet_sock_set_state` record layout parsed from tracefs by the agent.
#[unsafe(no_mangle)]
pub(crate) static SS_OFF: SetStateOffsets = SetStateOffsets::zeroed();
/// Optional port filter: when `FILTER_N > 0`, only these ports are reported.
#[unsafe(no_mangle)]
static FILTER_PORTS: [u16; MAX_FILTER_PORTS] = [0; MAX_FILTER_PORTS];
#[unsafe(no_mangle)]
static FILTER_N: u32 = 0;

// ---- Maps ----

/// 4 MiB by default; the agent overrides the size (`--ringbuf-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Repeats of one failure (same process, call, port and error) faster than one per
/// `PROMPT_GAP_NS`: submitted without a wakeup, to a ring of their own that the agent reads
/// after `EVENTS`. A storm of failing calls then queues behind nothing else: the first of
/// each failure, and every other failure, still goes to `EVENTS` and wakes the agent at
/// once. Same size as `EVENTS`.
#[map]
pub(crate) static BULK: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Repeats of a failure closer together than this after its last prompt one go to `BULK`.
pub(crate) const PROMPT_GAP_NS: u64 = 100_000_000;

/// When each failure (`prompt_key`) last went to `EVENTS` (ktime ns). LRU: a failure that
/// falls out only gets its next repeat sent promptly again.
#[map]
pub(crate) static PROMPT_AT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// Failed ring-buffer reserves, per kind, per CPU.
#[map]
pub(crate) static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(kind::COUNT, 0);

/// The sockaddr a thread passed to bind(), kept from sys_enter_bind to sys_exit_bind. It is
/// read at entry because that is what was *attempted*; the kernel resets the socket's port
/// when the bind fails, so reading the socket afterwards (as bindsnoop does) shows port 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PendingBind {
    pub(crate) fd: i32,
    pub(crate) family: u16,
    pub(crate) port: u16,
    pub(crate) addr: [u8; 16],
}

#[map]
pub(crate) static BIND_PENDING: HashMap<u64, PendingBind> = HashMap::with_max_entries(8192, 0);

/// connect(): only the fd and the user's sockaddr pointer are kept at entry, because connect
/// is hot and only EADDRNOTAVAIL is reported; the sockaddr is read at exit, in the same task.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct PendingConnect {
    pub(crate) uaddr: u64,
    pub(crate) fd: i32,
    pub(crate) tid: u32,
}

/// Slots of `CONNECT_PENDING`, a power of two.
pub(crate) const CONNECT_SLOTS: u32 = 65536;

/// Direct-mapped by thread id (tid % CONNECT_SLOTS), each slot stamped with its tid. Every
/// connect() on the host passes here, and a hash insert and delete per connect cost more
/// than the rest of the hook: an array slot is a plain store, and nothing needs removing
/// because the exit only looks when the connect failed. Two threads whose tids share a slot
/// and connect at the same moment overwrite each other; the exit then finds another tid
/// and counts the failure as lost instead of naming a wrong destination.
#[map]
pub(crate) static CONNECT_PENDING: Array<PendingConnect> =
    Array::with_max_entries(CONNECT_SLOTS, 0);

#[map]
pub(crate) static LISTEN_PENDING: HashMap<u64, i32> = HashMap::with_max_entries(8192, 0);

/// What portwatch saw bound, keyed by (tgid << 32 | fd). Lets listen() name its address and
/// close() be filtered in the kernel. LRU so that fds of processes that died without close()
/// (the kernel closes those without a syscall) age out instead of filling the map.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Bound {
    pub(crate) family: u16,
    pub(crate) port: u16,
    pub(crate) proto: u16,
    pub(crate) _pad: u16,
    pub(crate) addr: [u8; 16],
    pub(crate) sk: u64,
}

#[map]
pub(crate) static BOUND: LruHashMap<u64, Bound> = LruHashMap::with_max_entries(65536, 0);

/// Slots of `BOUND_HINT`, a power of two.
const HINT_SLOTS: u32 = 65536;

/// A counting filter in front of `BOUND`: each slot counts the `BOUND` entries whose
/// (tgid, fd) hashes to it. Every close() on the host checks its slot first, and an array
/// load is a few instructions where a hash lookup is a helper call: on a host churning
/// connections, almost every close is of an fd portwatch never saw bound. A count left
/// behind by an entry the LRU evicted, or by a process that died without close(), only sends
/// that slot's closes on to the hash lookup, which then misses as before.
#[map]
pub(crate) static BOUND_HINT: Array<u64> = Array::with_max_entries(HINT_SLOTS, 0);

#[inline(always)]
pub(crate) fn hint_slot(key: u64) -> u32 {
    // Fibonacci hashing of (tgid << 32 | fd): the top bits of the product mix both halves.
    ((key.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 48) as u32 & (HINT_SLOTS - 1)
}

/// Add one to a per-CPU loss counter. Atomically, although the slot is per CPU: syscall
/// tracepoints became faultable (6.14), and their programs may then be preempted with only
/// migration disabled, so two programs on one CPU can interleave a plain read-modify-write
/// and lose a count. With a plain increment, Debian sid's 7.2 under a flood left 1.7 % of
/// the failures neither written nor counted.
#[inline(always)]
pub(crate) fn count_lost(p: *mut u64) {
    // SAFETY: an in-bounds, 8-byte aligned slot of an array map, valid for the run.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, 1,
        )
    };
}

/// Add `delta` (1, or u64::MAX for -1) to the slot of `key`, atomically: binds and closes
/// of the same slot may run on two CPUs at once.
#[inline(always)]
pub(crate) fn hint_add(key: u64, delta: u64) {
    if let Some(p) = BOUND_HINT.get_ptr_mut(hint_slot(key)) {
        // SAFETY: an in-bounds, 8-byte aligned slot of an array map, valid for the run.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, delta,
            )
        };
    }
}

/// Processes that hold a socket portwatch saw bound: their exit is reported.
#[map]
pub(crate) static TRACKED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// TIME_WAIT sockets created (`[0]`, at `inet_twsk_alloc`) and destroyed (`[1]`, at
/// `inet_twsk_kill`: expiry or early kill), per network namespace, per CPU. Exact counts
/// that cost a map update per socket instead of a ring-buffer record; the agent reads them
/// for its `time_wait` records.
#[map]
pub(crate) static TW_COUNTS: LruPerCpuHashMap<u32, [u64; 2]> =
    LruPerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
pub(crate) fn event_mask() -> u32 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { core::ptr::read_volatile(&EVENT_MASK) }
}

#[inline(always)]
pub(crate) fn offsets() -> Offsets {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn port_wanted(port: u16) -> bool {
    // SAFETY: as above.
    let n = unsafe { core::ptr::read_volatile(&FILTER_N) };
    if n == 0 {
        return true;
    }
    // SAFETY: as above.
    let ports = unsafe { core::ptr::read_volatile(&FILTER_PORTS) };
    let mut i = 0;
    while i < MAX_FILTER_PORTS {
        if i as u32 >= n {
            break;
        }
        if ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(always)]
pub(crate) fn fd_key(tgid: u32, fd: i32) -> u64 {
    (u64::from(tgid) << 32) | u64::from(fd as u32)
}
