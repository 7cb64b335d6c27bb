//! portwatch kernel programs: tracepoints only (this kernel family may lack kprobes/fentry).
//!
//! Every hook is thin: `match try_x(&ctx) { Ok(v) | Err(v) => v }`. Events are reserved in
//! the `EVENTS` ring buffer, written and submitted; a failed reserve is counted per kind in
//! the per-CPU `LOST` array, which the agent turns into `lost` records. Nothing is dropped
//! silently.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no compare-and-swap, so core's atomic types offer no
// fetch_add there, while the instruction itself (BPF_ATOMIC | BPF_ADD) exists.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{btf_tracepoint, fentry, fexit, map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, RawTracePointContext, TracePointContext,
    },
    EbpfContext,
};
use portwatch_common::{
    flags, kind, mask, Event, Offsets, SetStateOffsets, AF_INET, AF_INET6, IPPROTO_TCP,
    MAX_FILTER_PORTS,
};

// ---- Loader-set globals (read-only after load, like libbpf-tools' `const volatile`). ----

/// Which event classes to emit (`portwatch_common::mask`).
#[unsafe(no_mangle)]
static EVENT_MASK: u32 = mask::DEFAULT;
/// Kernel struct offsets resolved from BTF by the agent.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::zeroed();
/// `sock:inet_sock_set_state` record layout parsed from tracefs by the agent.
#[unsafe(no_mangle)]
static SS_OFF: SetStateOffsets = SetStateOffsets::zeroed();
/// Optional port filter: when `FILTER_N > 0`, only these ports are reported.
#[unsafe(no_mangle)]
static FILTER_PORTS: [u16; MAX_FILTER_PORTS] = [0; MAX_FILTER_PORTS];
#[unsafe(no_mangle)]
static FILTER_N: u32 = 0;

// ---- Maps ----

/// 4 MiB by default; the agent overrides the size (`--ringbuf-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Repeats of one failure (same process, call, port and error) faster than one per
/// `PROMPT_GAP_NS`: submitted without a wakeup, to a ring of their own that the agent reads
/// after `EVENTS`. A storm of failing calls then queues behind nothing else: the first of
/// each failure, and every other failure, still goes to `EVENTS` and wakes the agent at
/// once. Same size as `EVENTS`.
#[map]
static BULK: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Repeats of a failure closer together than this after its last prompt one go to `BULK`.
const PROMPT_GAP_NS: u64 = 100_000_000;

/// When each failure (`prompt_key`) last went to `EVENTS` (ktime ns). LRU: a failure that
/// falls out only gets its next repeat sent promptly again.
#[map]
static PROMPT_AT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(8192, 0);

/// Failed ring-buffer reserves, per kind, per CPU.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(kind::COUNT, 0);

/// The sockaddr a thread passed to bind(), kept from sys_enter_bind to sys_exit_bind. It is
/// read at entry because that is what was *attempted*; the kernel resets the socket's port
/// when the bind fails, so reading the socket afterwards (as bindsnoop does) shows port 0.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingBind {
    fd: i32,
    family: u16,
    port: u16,
    addr: [u8; 16],
}

#[map]
static BIND_PENDING: HashMap<u64, PendingBind> = HashMap::with_max_entries(8192, 0);

/// connect(): only the fd and the user's sockaddr pointer are kept at entry, because connect
/// is hot and only EADDRNOTAVAIL is reported; the sockaddr is read at exit, in the same task.
#[repr(C)]
#[derive(Clone, Copy)]
struct PendingConnect {
    uaddr: u64,
    fd: i32,
    tid: u32,
}

/// Slots of `CONNECT_PENDING`, a power of two.
const CONNECT_SLOTS: u32 = 65536;

/// Direct-mapped by thread id (tid % CONNECT_SLOTS), each slot stamped with its tid. Every
/// connect() on the host passes here, and a hash insert and delete per connect cost more
/// than the rest of the hook: an array slot is a plain store, and nothing needs removing
/// because the exit only looks when the connect failed. Two threads whose tids share a slot
/// and connect at the same moment overwrite each other; the exit then finds another tid
/// and counts the failure as lost instead of naming a wrong destination.
#[map]
static CONNECT_PENDING: Array<PendingConnect> = Array::with_max_entries(CONNECT_SLOTS, 0);

#[map]
static LISTEN_PENDING: HashMap<u64, i32> = HashMap::with_max_entries(8192, 0);

/// What portwatch saw bound, keyed by (tgid << 32 | fd). Lets listen() name its address and
/// close() be filtered in the kernel. LRU so that fds of processes that died without close()
/// (the kernel closes those without a syscall) age out instead of filling the map.
#[repr(C)]
#[derive(Clone, Copy)]
struct Bound {
    family: u16,
    port: u16,
    proto: u16,
    _pad: u16,
    addr: [u8; 16],
    sk: u64,
}

#[map]
static BOUND: LruHashMap<u64, Bound> = LruHashMap::with_max_entries(65536, 0);

/// Slots of `BOUND_HINT`, a power of two.
const HINT_SLOTS: u32 = 65536;

/// A counting filter in front of `BOUND`: each slot counts the `BOUND` entries whose
/// (tgid, fd) hashes to it. Every close() on the host checks its slot first, and an array
/// load is a few instructions where a hash lookup is a helper call: on a host churning
/// connections, almost every close is of an fd portwatch never saw bound. A count left
/// behind by an entry the LRU evicted, or by a process that died without close(), only sends
/// that slot's closes on to the hash lookup, which then misses as before.
#[map]
static BOUND_HINT: Array<u64> = Array::with_max_entries(HINT_SLOTS, 0);

#[inline(always)]
fn hint_slot(key: u64) -> u32 {
    // Fibonacci hashing of (tgid << 32 | fd): the top bits of the product mix both halves.
    ((key.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 48) as u32 & (HINT_SLOTS - 1)
}

/// Add one to a per-CPU loss counter. Atomically, although the slot is per CPU: syscall
/// tracepoints became faultable (6.14), and their programs may then be preempted with only
/// migration disabled, so two programs on one CPU can interleave a plain read-modify-write
/// and lose a count. With a plain increment, Debian sid's 7.2 under a flood left 1.7 % of
/// the failures neither written nor counted.
#[inline(always)]
fn count_lost(p: *mut u64) {
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
fn hint_add(key: u64, delta: u64) {
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
static TRACKED: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// TIME_WAIT sockets created (`[0]`, at `inet_twsk_alloc`) and destroyed (`[1]`, at
/// `inet_twsk_kill`: expiry or early kill), per network namespace, per CPU. Exact counts
/// that cost a map update per socket instead of a ring-buffer record; the agent reads them
/// for its `time_wait` records.
#[map]
static TW_COUNTS: LruPerCpuHashMap<u32, [u64; 2]> = LruPerCpuHashMap::with_max_entries(4096, 0);

// ---- Helpers ----

const EADDRNOTAVAIL: i32 = 99;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const TCP_CLOSING: i32 = 11;

/// Syscall tracepoint records: 8 bytes of common header, `__syscall_nr` padded to 8, then
/// the arguments as 8-byte slots (sys_enter) or the return value (sys_exit).
const SYSCALL_ARG0: usize = 16;
const SYSCALL_ARG1: usize = 24;
const SYSCALL_RET: usize = 16;

/// One 8-byte slot of a syscall tracepoint record, loaded straight from the context. The
/// verifier allows direct, constant-offset reads of a tracepoint record, which costs a load
/// instead of a `bpf_probe_read_kernel` call on every bind, connect and close on the host.
#[inline(always)]
fn sys_slot(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: `off` is one of the constants above, inside every syscall record.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const u64) }
}

#[inline(always)]
fn event_mask() -> u32 {
    // SAFETY: a plain read of a loader-initialised global.
    unsafe { core::ptr::read_volatile(&EVENT_MASK) }
}

#[inline(always)]
fn offsets() -> Offsets {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn port_wanted(port: u16) -> bool {
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
unsafe fn read_ptr(base: u64, off: u32) -> Option<u64> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses (it returns an error).
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64).ok() }
}

/// Network namespace inode of the current task: task->nsproxy->net_ns->ns.inum.
#[inline(always)]
fn current_netns(o: &Offsets) -> u32 {
    if o.netns_ok == 0 {
        return 0;
    }
    // SAFETY: every read goes through bpf_probe_read_kernel.
    unsafe {
        let task = bpf_get_current_task();
        let Some(nsproxy) = read_ptr(task, o.task_nsproxy) else {
            return 0;
        };
        let Some(net) = read_ptr(nsproxy, o.nsproxy_net) else {
            return 0;
        };
        if net == 0 {
            return 0;
        }
        bpf_probe_read_kernel((net + u64::from(o.net_inum)) as *const u32).unwrap_or(0)
    }
}

/// Network namespace inode of a socket: sk->__sk_common.skc_net->ns.inum.
#[inline(always)]
fn sock_netns(o: &Offsets, sk: u64) -> u32 {
    if o.netns_ok == 0 || o.sock_ok == 0 {
        return 0;
    }
    // SAFETY: every read goes through bpf_probe_read_kernel.
    unsafe {
        let Some(net) = read_ptr(sk, o.skc_net) else {
            return 0;
        };
        if net == 0 {
            return 0;
        }
        bpf_probe_read_kernel((net + u64::from(o.net_inum)) as *const u32).unwrap_or(0)
    }
}

/// `struct sock *` behind the current task's fd: task->files->fdt->fd[fd]->private_data->sk.
/// Only called on fds a bind/listen syscall accepted, so private_data is a `struct socket`.
///
/// Returns 0 when any step fails, not `Option<u64>`: LLVM keeps an `Option`'s payload in a
/// stack slot that the `None` paths never write, then loads it before testing the
/// discriminant. Verifiers before 6.3 (Debian 11 and 12) reject that load ("invalid read
/// from stack") even though its value is never used; a plain integer has no such slot.
#[inline(always)]
fn sock_of_fd(o: &Offsets, fd: i32) -> u64 {
    if o.sock_ok == 0 || fd < 0 {
        return 0;
    }
    // SAFETY: every read goes through bpf_probe_read_kernel.
    unsafe {
        let task = bpf_get_current_task();
        let files = read_ptr0(task, o.task_files);
        let fdt = read_ptr0(files, o.files_fdt);
        if fdt == 0 {
            return 0;
        }
        let max: u32 =
            bpf_probe_read_kernel((fdt + u64::from(o.fdt_max_fds)) as *const u32).unwrap_or(0);
        if fd as u32 >= max {
            return 0;
        }
        let arr = read_ptr0(fdt, o.fdt_fd);
        let file = read_ptr0(arr, (fd as u32) * 8);
        let socket = read_ptr0(file, o.file_private);
        read_ptr0(socket, o.socket_sk)
    }
}

/// `*(base + off)` as a u64, 0 when `base` is 0 or the read fails (see `sock_of_fd` for why
/// not an `Option`).
#[inline(always)]
unsafe fn read_ptr0(base: u64, off: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses (it returns an error).
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64).unwrap_or(0) }
}

#[inline(always)]
fn sock_proto(o: &Offsets, sk: u64) -> u16 {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { bpf_probe_read_kernel((sk + u64::from(o.sk_protocol)) as *const u16).unwrap_or(0) }
}

/// Fill the fields every event carries, from the current task.
#[inline(always)]
fn fill_task(e: &mut Event, k: u32, o: &Offsets) {
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
fn emit(e: &Event) {
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

/// Read a user sockaddr; only AF_INET and AF_INET6 are of interest.
#[inline(always)]
unsafe fn read_sockaddr(uaddr: u64) -> Option<(u16, u16, [u8; 16])> {
    if uaddr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_user tolerates bad pointers (EFAULT binds are ignored).
    unsafe {
        let family: u16 = bpf_probe_read_user(uaddr as *const u16).ok()?;
        let port_be: u16 = bpf_probe_read_user((uaddr + 2) as *const u16).ok()?;
        let mut addr = [0u8; 16];
        match family {
            AF_INET => {
                let a: [u8; 4] = bpf_probe_read_user((uaddr + 4) as *const [u8; 4]).ok()?;
                addr[0] = a[0];
                addr[1] = a[1];
                addr[2] = a[2];
                addr[3] = a[3];
            }
            AF_INET6 => {
                addr = bpf_probe_read_user((uaddr + 8) as *const [u8; 16]).ok()?;
            }
            _ => return None,
        }
        Some((family, u16::from_be(port_be), addr))
    }
}

/// A kernel copy of a sockaddr (`struct sockaddr_storage *`), as io_uring passes it.
#[inline(always)]
unsafe fn read_sockaddr_kernel(kaddr: u64) -> Option<(u16, u16, [u8; 16])> {
    if kaddr == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad pointers.
    unsafe {
        let family: u16 = bpf_probe_read_kernel(kaddr as *const u16).ok()?;
        let port_be: u16 = bpf_probe_read_kernel((kaddr + 2) as *const u16).ok()?;
        let mut addr = [0u8; 16];
        match family {
            AF_INET => {
                let a: [u8; 4] = bpf_probe_read_kernel((kaddr + 4) as *const [u8; 4]).ok()?;
                addr[0] = a[0];
                addr[1] = a[1];
                addr[2] = a[2];
                addr[3] = a[3];
            }
            AF_INET6 => {
                addr = bpf_probe_read_kernel((kaddr + 8) as *const [u8; 16]).ok()?;
            }
            _ => return None,
        }
        Some((family, u16::from_be(port_be), addr))
    }
}

#[inline(always)]
fn fd_key(tgid: u32, fd: i32) -> u64 {
    (u64::from(tgid) << 32) | u64::from(fd as u32)
}

// ---- bind ----

#[tracepoint]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    match try_enter_bind(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_enter_bind(ctx: &TracePointContext) -> Result<u32, u32> {
    enter_bind(
        sys_slot(ctx, SYSCALL_ARG0) as i32,
        sys_slot(ctx, SYSCALL_ARG1),
    )
}

/// bind() entered with (fd, user sockaddr): keep what is attempted until the exit.
#[inline(always)]
fn enter_bind(fd: i32, uaddr: u64) -> Result<u32, u32> {
    if event_mask() & mask::BIND == 0 {
        return Ok(0);
    }
    // SAFETY: see read_sockaddr.
    let Some((family, port, addr)) = (unsafe { read_sockaddr(uaddr) }) else {
        return Ok(0);
    };
    if !port_wanted(port) {
        return Ok(0);
    }
    let p = PendingBind {
        fd,
        family,
        port,
        addr,
    };
    let _ = BIND_PENDING.insert(&bpf_get_current_pid_tgid(), &p, 0);
    Ok(0)
}

#[tracepoint]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    match try_exit_bind(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_exit_bind(ctx: &TracePointContext) -> Result<u32, u32> {
    exit_bind(sys_slot(ctx, SYSCALL_RET) as i64, false)
}

/// bind() returned `ret`: report it with what `enter_bind` kept. `by_sock`: the trampoline
/// family, whose close hook sees socket releases, not fds (see `remember_bound`).
#[inline(always)]
fn exit_bind(ret: i64, by_sock: bool) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(p) = (unsafe { BIND_PENDING.get(&id) }).copied() else {
        return Ok(0);
    };
    let _ = BIND_PENDING.remove(&id);
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::BIND, &o);
    e.fd = p.fd;
    e.ret = ret as i32;
    e.family = p.family;
    e.port = p.port;
    e.addr = p.addr;
    e.flags = flags::FROM_SOCKADDR;
    let sk = sock_of_fd(&o, p.fd);
    if sk != 0 {
        e.sk = sk;
        e.proto = sock_proto(&o, sk);
    }
    if ret == 0 {
        remember_bound(&e, by_sock);
    }
    emit(&e);
    Ok(0)
}

/// A successful bind: remember its address for listen() and close(), keyed by (tgid, fd)
/// for the syscall tracepoints or by the socket for the trampoline hooks (whose close hook
/// sees the socket being released, not an fd).
#[inline(always)]
fn remember_bound(e: &Event, by_sock: bool) {
    let b = Bound {
        family: e.family,
        port: e.port,
        proto: e.proto,
        _pad: 0,
        addr: e.addr,
        sk: e.sk,
    };
    let key = if by_sock { e.sk } else { fd_key(e.pid, e.fd) };
    if key == 0 {
        return;
    }
    if BOUND.insert(&key, &b, 0).is_ok() {
        hint_add(key, 1);
    }
    let _ = TRACKED.insert(&e.pid, &1, 0);
}

// ---- listen ----

#[tracepoint]
pub fn sys_enter_listen(ctx: TracePointContext) -> u32 {
    match try_enter_listen(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_enter_listen(ctx: &TracePointContext) -> Result<u32, u32> {
    enter_listen(sys_slot(ctx, SYSCALL_ARG0) as i32)
}

#[inline(always)]
fn enter_listen(fd: i32) -> Result<u32, u32> {
    if event_mask() & mask::LISTEN == 0 {
        return Ok(0);
    }
    let _ = LISTEN_PENDING.insert(&bpf_get_current_pid_tgid(), &fd, 0);
    Ok(0)
}

#[tracepoint]
pub fn sys_exit_listen(ctx: TracePointContext) -> u32 {
    match try_exit_listen(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_exit_listen(ctx: &TracePointContext) -> Result<u32, u32> {
    exit_listen(sys_slot(ctx, SYSCALL_RET) as i64, false)
}

#[inline(always)]
fn exit_listen(ret: i64, by_sock: bool) -> Result<u32, u32> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before removal.
    let Some(fd) = (unsafe { LISTEN_PENDING.get(&id) }).copied() else {
        return Ok(0);
    };
    let _ = LISTEN_PENDING.remove(&id);
    let o = offsets();
    let sk = sock_of_fd(&o, fd);
    report_listen(ret, fd, sk, by_sock)
}

/// A listen() on `sk` (0 when unknown) returned `ret`: name its address from what was seen
/// bound, else from the socket itself.
#[inline(always)]
fn report_listen(ret: i64, fd: i32, sk: u64, by_sock: bool) -> Result<u32, u32> {
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::LISTEN, &o);
    e.fd = fd;
    e.ret = ret as i32;
    let key = if by_sock { sk } else { fd_key(e.pid, fd) };
    let bound = if key == 0 {
        None
    } else {
        // SAFETY: copied out immediately.
        unsafe { BOUND.get(&key) }.copied()
    };
    if let Some(b) = bound {
        e.family = b.family;
        e.port = b.port;
        e.addr = b.addr;
        e.proto = b.proto;
        e.flags = flags::FROM_SOCKADDR;
    } else if sk != 0 {
        // Bound before portwatch started, or implicitly by listen(): ask the socket.
        // SAFETY: bpf_probe_read_kernel.
        unsafe {
            e.family =
                bpf_probe_read_kernel((sk + u64::from(o.skc_family)) as *const u16).unwrap_or(0);
            e.port = bpf_probe_read_kernel((sk + u64::from(o.skc_num)) as *const u16).unwrap_or(0);
            if e.family == AF_INET6 {
                e.addr =
                    bpf_probe_read_kernel((sk + u64::from(o.skc_v6_rcv_saddr)) as *const [u8; 16])
                        .unwrap_or([0; 16]);
            } else {
                let a: [u8; 4] =
                    bpf_probe_read_kernel((sk + u64::from(o.skc_rcv_saddr)) as *const [u8; 4])
                        .unwrap_or([0; 4]);
                e.addr[0] = a[0];
                e.addr[1] = a[1];
                e.addr[2] = a[2];
                e.addr[3] = a[3];
            }
        }
        e.proto = sock_proto(&o, sk);
        e.flags = flags::FROM_SOCK;
    } else {
        return Ok(0);
    }
    if e.family != AF_INET && e.family != AF_INET6 {
        return Ok(0);
    }
    if !port_wanted(e.port) {
        return Ok(0);
    }
    e.sk = sk;
    if ret == 0 && by_sock && e.flags & flags::FROM_SOCK != 0 {
        // Bound before portwatch started, or implicitly: its release is reported too.
        remember_bound(&e, by_sock);
    }
    emit(&e);
    Ok(0)
}

// ---- connect (EADDRNOTAVAIL only) ----

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    match try_enter_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_enter_connect(ctx: &TracePointContext) -> Result<u32, u32> {
    if event_mask() & mask::CONNECT == 0 {
        return Ok(0);
    }
    let fd: u64 = sys_slot(ctx, SYSCALL_ARG0);
    let uaddr: u64 = sys_slot(ctx, SYSCALL_ARG1);
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(p) = CONNECT_PENDING.get_ptr_mut(tid & (CONNECT_SLOTS - 1)) {
        // SAFETY: an in-bounds array slot; a racing writer can only be another tid, which
        // the stamp tells apart at exit.
        unsafe {
            (*p).uaddr = uaddr;
            (*p).fd = fd as i32;
            (*p).tid = tid;
        }
    }
    Ok(0)
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    match try_exit_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_exit_connect(ctx: &TracePointContext) -> Result<u32, u32> {
    let ret: i64 = sys_slot(ctx, SYSCALL_RET) as i64;
    if ret as i32 != -EADDRNOTAVAIL {
        return Ok(0);
    }
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(p) = CONNECT_PENDING.get(tid & (CONNECT_SLOTS - 1)).copied() else {
        return Ok(0);
    };
    if p.tid != tid {
        if let Some(l) = LOST.get_ptr_mut(kind::CONNECT) {
            count_lost(l);
        }
        return Ok(0);
    }
    connect_failed(ret, p.fd, p.uaddr)
}

/// A connect(fd, uaddr) that failed with EADDRNOTAVAIL, in the task that called it.
#[inline(always)]
fn connect_failed(ret: i64, fd: i32, uaddr: u64) -> Result<u32, u32> {
    // SAFETY: the calling task, so the user pointer is still this process's memory.
    let Some((family, port, addr)) = (unsafe { read_sockaddr(uaddr) }) else {
        return Ok(0);
    };
    if !port_wanted(port) {
        return Ok(0);
    }
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::CONNECT, &o);
    e.fd = fd;
    e.ret = ret as i32;
    e.family = family;
    e.rport = port;
    e.raddr = addr;
    e.flags = flags::FROM_SOCKADDR;
    let sk = sock_of_fd(&o, fd);
    if sk != 0 {
        e.sk = sk;
        e.proto = sock_proto(&o, sk);
    }
    emit(&e);
    Ok(0)
}

// ---- close of a tracked fd ----

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    match try_enter_close(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_enter_close(ctx: &TracePointContext) -> Result<u32, u32> {
    let fd: u64 = sys_slot(ctx, SYSCALL_ARG0);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = fd_key(tgid, fd as i32);
    // The in-kernel filter: only fds portwatch saw bound go further. The hint is checked
    // first; it is never zero for an fd that has an entry.
    match BOUND_HINT.get(hint_slot(key)) {
        Some(n) if *n != 0 => {}
        _ => return Ok(0),
    }
    // SAFETY: copied out before removal.
    let Some(b) = (unsafe { BOUND.get(&key) }).copied() else {
        return Ok(0);
    };
    if BOUND.remove(&key).is_ok() {
        hint_add(key, u64::MAX);
    }
    if event_mask() & mask::CLOSE == 0 {
        return Ok(0);
    }
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::CLOSE, &o);
    e.fd = fd as i32;
    e.family = b.family;
    e.port = b.port;
    e.addr = b.addr;
    e.proto = b.proto;
    e.sk = b.sk;
    emit(&e);
    Ok(0)
}

// ---- process exit ----

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Only the thread-group leader's exit means the process (and its fds) is going away.
    if tgid != pid_tgid as u32 {
        return 0;
    }
    // SAFETY: existence check only.
    if unsafe { TRACKED.get(&tgid) }.is_none() {
        return 0;
    }
    let _ = TRACKED.remove(&tgid);
    if event_mask() & mask::EXIT == 0 {
        return 0;
    }
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::EXIT, &o);
    emit(&e);
    0
}

// ---- TCP state changes ----

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_set_state(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_set_state(ctx: &TracePointContext) -> Result<u32, u32> {
    let m = event_mask();
    if m & (mask::TCP_STATE | mask::TCP_STATE_ALL) == 0 {
        return Ok(0);
    }
    // SAFETY: a plain read of a loader-initialised global.
    let so = unsafe { core::ptr::read_volatile(&SS_OFF) };
    // SAFETY: offsets come from the tracepoint's own format file.
    let proto: u16 = unsafe { ctx.read_at(so.protocol as usize) }.map_err(|_| 1u32)?;
    if proto != IPPROTO_TCP {
        return Ok(0);
    }
    // SAFETY: as above, bpf_probe_read at the format file's offsets.
    let old: i32 = unsafe { ctx.read_at(so.oldstate as usize) }.map_err(|_| 1u32)?;
    // SAFETY: as above.
    let new: i32 = unsafe { ctx.read_at(so.newstate as usize) }.map_err(|_| 1u32)?;
    if !state_interesting(m, old, new) {
        return Ok(0);
    }
    // SAFETY: as above.
    let sport: u16 = unsafe { ctx.read_at(so.sport as usize) }.map_err(|_| 1u32)?;
    if !port_wanted(sport) {
        return Ok(0);
    }
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::TCP_STATE, &o);
    // SAFETY: tracepoint record reads at format-file offsets.
    unsafe {
        e.sk = ctx.read_at(so.skaddr as usize).unwrap_or(0);
        e.family = ctx.read_at(so.family as usize).unwrap_or(0);
        e.rport = ctx.read_at(so.dport as usize).unwrap_or(0);
        if e.family == AF_INET6 {
            e.addr = ctx.read_at(so.saddr_v6 as usize).unwrap_or([0; 16]);
            e.raddr = ctx.read_at(so.daddr_v6 as usize).unwrap_or([0; 16]);
        } else {
            let s: [u8; 4] = ctx.read_at(so.saddr as usize).unwrap_or([0; 4]);
            let d: [u8; 4] = ctx.read_at(so.daddr as usize).unwrap_or([0; 4]);
            e.addr[0] = s[0];
            e.addr[1] = s[1];
            e.addr[2] = s[2];
            e.addr[3] = s[3];
            e.raddr[0] = d[0];
            e.raddr[1] = d[1];
            e.raddr[2] = d[2];
            e.raddr[3] = d[3];
        }
    }
    e.port = sport;
    e.proto = IPPROTO_TCP;
    e.old_state = old as u16;
    e.new_state = new as u16;
    let ns = sock_netns(&o, e.sk);
    set_sock_netns(&mut e, ns);
    emit(&e);
    Ok(0)
}

/// The part of a `tcp_state` event the raw and typed programs fill alike, before reading
/// the socket's addresses. Most state changes run in softirq context, where the current
/// task is whoever was interrupted: only its pid is kept (as `context_pid`); no comm, uid or
/// cgroup.
#[inline(always)]
fn state_event(sk: u64, sport: u16, old: i32, new: i32) -> Event {
    let mut e = Event::zeroed();
    let pid_tgid = bpf_get_current_pid_tgid();
    e.kind = kind::TCP_STATE;
    // SAFETY: a helper without preconditions.
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.pid = (pid_tgid >> 32) as u32;
    e.tid = pid_tgid as u32;
    e.sk = sk;
    e.port = sport;
    e.proto = IPPROTO_TCP;
    e.old_state = old as u16;
    e.new_state = new as u16;
    e
}

/// State changes often run in softirq context, where the current task's namespace is
/// unrelated: the one read from the socket wins when there is one.
#[inline(always)]
fn set_sock_netns(e: &mut Event, ns: u32) {
    if ns != 0 {
        e.netns = ns;
        e.flags |= flags::NETNS_FROM_SOCK;
    }
}

/// The same facts as `inet_sock_set_state` above, from the raw tracepoint: the kernel passes
/// (sk, oldstate, newstate) and builds no trace record, and uninteresting transitions are
/// dropped before any helper call. The tracepoint fires about nine times per TCP connection,
/// so this is most of what portwatch costs a host that churns connections. Attached instead
/// of the classic program when BTF gave the socket's remote-end offsets (`remote_ok`).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state_raw(ctx: RawTracePointContext) -> i32 {
    let _ = try_set_state_raw(&ctx);
    0
}

#[inline(always)]
fn state_interesting(m: u32, old: i32, new: i32) -> bool {
    // Default: LISTEN start/stop and TIME_WAIT entry. The tracepoint never reports
    // TCP_TIME_WAIT itself: a socket entering it shows as FIN_WAIT2->CLOSE or
    // CLOSING->CLOSE (blind spot: a FIN_WAIT2 timeout without TIME_WAIT looks the same).
    m & mask::TCP_STATE_ALL != 0
        || old == TCP_LISTEN
        || new == TCP_LISTEN
        || (new == TCP_CLOSE && (old == TCP_FIN_WAIT2 || old == TCP_CLOSING))
}

fn try_set_state_raw(ctx: &RawTracePointContext) -> Result<(), i64> {
    let m = event_mask();
    if m & (mask::TCP_STATE | mask::TCP_STATE_ALL) == 0 {
        return Ok(());
    }
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if sk == 0 || !state_interesting(m, old, new) {
        return Ok(());
    }
    let o = offsets();
    // SAFETY: every read of the socket goes through bpf_probe_read_kernel.
    unsafe {
        let rd16 = |off: u32| bpf_probe_read_kernel((sk + u64::from(off)) as *const u16);
        if rd16(o.sk_protocol)? != IPPROTO_TCP {
            return Ok(());
        }
        let sport = u16::from_be(rd16(o.inet_sport)?);
        if !port_wanted(sport) {
            return Ok(());
        }
        let mut e = state_event(sk, sport, old, new);
        e.family = rd16(o.skc_family)?;
        e.rport = u16::from_be(rd16(o.skc_dport)?);
        if e.family == AF_INET6 {
            e.addr = bpf_probe_read_kernel((sk + u64::from(o.skc_v6_rcv_saddr)) as *const [u8; 16])
                .unwrap_or([0; 16]);
            e.raddr = bpf_probe_read_kernel((sk + u64::from(o.skc_v6_daddr)) as *const [u8; 16])
                .unwrap_or([0; 16]);
        } else {
            let s: [u8; 4] =
                bpf_probe_read_kernel((sk + u64::from(o.skc_rcv_saddr)) as *const [u8; 4])
                    .unwrap_or([0; 4]);
            let d: [u8; 4] = bpf_probe_read_kernel((sk + u64::from(o.skc_daddr)) as *const [u8; 4])
                .unwrap_or([0; 4]);
            e.addr[..4].copy_from_slice(&s);
            e.raddr[..4].copy_from_slice(&d);
        }
        set_sock_netns(&mut e, sock_netns(&o, sk));
        emit(&e);
    }
    Ok(())
}

/// The state-change program as a BTF-typed tracepoint (tp_btf): the kernel's verifier knows
/// `sk` is a `struct sock *`, so its fields are read with plain loads (each guarded by the
/// kernel's exception table) instead of a `bpf_probe_read_kernel` call per field. The
/// offsets are constants to the verifier because they sit in frozen read-only data.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let m = event_mask();
    if m & (mask::TCP_STATE | mask::TCP_STATE_ALL) == 0 || sk.is_null() {
        return 0;
    }
    if !state_interesting(m, old, new) {
        return 0;
    }
    let o = offsets();
    // SAFETY: loads from a BTF-typed kernel pointer; the verifier rewrites them into
    // fault-tolerant loads and checks each offset against struct sock.
    unsafe {
        let rd16 = |off: u32| core::ptr::read_volatile(sk.add(off as usize) as *const u16);
        let rd32 = |off: u32| core::ptr::read_volatile(sk.add(off as usize) as *const u32);
        let rd64 = |off: u32| core::ptr::read_volatile(sk.add(off as usize) as *const u64);
        // NULL unless a full TCP socket; the result is typed `struct tcp_sock *`, which
        // holds inet_sport (beyond `struct sock`, so not readable through `sk`).
        let tp = aya_ebpf::helpers::generated::bpf_skc_to_tcp_sock(sk as *mut _) as *const u8;
        if tp.is_null() {
            return 0;
        }
        let sport = u16::from_be(core::ptr::read_volatile(
            tp.add(o.inet_sport as usize) as *const u16
        ));
        if !port_wanted(sport) {
            return 0;
        }
        let mut e = state_event(sk as u64, sport, old, new);
        e.family = rd16(o.skc_family);
        e.rport = u16::from_be(rd16(o.skc_dport));
        if e.family == AF_INET6 {
            let a = [rd64(o.skc_v6_rcv_saddr), rd64(o.skc_v6_rcv_saddr + 8)];
            let b = [rd64(o.skc_v6_daddr), rd64(o.skc_v6_daddr + 8)];
            e.addr = core::mem::transmute::<[u64; 2], [u8; 16]>(a);
            e.raddr = core::mem::transmute::<[u64; 2], [u8; 16]>(b);
        } else {
            e.addr[..4].copy_from_slice(&rd32(o.skc_rcv_saddr).to_ne_bytes());
            e.raddr[..4].copy_from_slice(&rd32(o.skc_daddr).to_ne_bytes());
        }
        if o.netns_ok != 0 {
            let net = rd64(o.skc_net) as *const u8;
            if !net.is_null() {
                let ns = core::ptr::read_volatile(net.add(o.net_inum as usize) as *const u32);
                set_sock_netns(&mut e, ns);
            }
        }
        emit(&e);
    }
    0
}

// ---- Trampoline family (fentry/fexit) ----
//
// The same facts as the syscall tracepoints above, from programs on the kernel functions
// behind bind, listen and connect. A syscall tracepoint puts every syscall of every task on
// the traced path; these run only when their function does. The agent attaches one family
// or the other, never both, and names the functions from the running kernel's BTF: the
// `function` below is only the default it overrides. fexit programs read the return value
// as the argument after the last one (`bpf_get_func_ret` needs 5.17).

/// bind(fd, uaddr, len) entered: the attempted address, from the user's sockaddr.
#[fentry(function = "__sys_bind")]
pub fn tr_bind_enter(ctx: FEntryContext) -> u32 {
    let fd: i32 = ctx.arg(0);
    let uaddr: u64 = ctx.arg(1);
    match enter_bind(fd, uaddr) {
        Ok(v) | Err(v) => v,
    }
}

#[fexit(function = "__sys_bind")]
pub fn tr_bind_exit(ctx: FExitContext) -> u32 {
    let ret: i32 = ctx.arg(3);
    match exit_bind(i64::from(ret), true) {
        Ok(v) | Err(v) => v,
    }
}

/// `__sys_bind_socket(sock, kaddr, len)` (6.11+): what both bind(2) and io_uring's
/// IORING_OP_BIND call. A bind(2) is reported by the two programs above, which set
/// `BIND_PENDING` first; only a bind without one (io_uring, no fd) is reported here.
#[fexit(function = "__sys_bind_socket")]
pub fn tr_bind_socket_exit(ctx: FExitContext) -> u32 {
    let sock: u64 = ctx.arg(0);
    let kaddr: u64 = ctx.arg(1);
    let ret: i32 = ctx.arg(3);
    match bind_socket(sock, kaddr, ret) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn bind_socket(sock: u64, kaddr: u64, ret: i32) -> Result<u32, u32> {
    if event_mask() & mask::BIND == 0 {
        return Ok(0);
    }
    // SAFETY: an existence check only.
    if unsafe { BIND_PENDING.get(&bpf_get_current_pid_tgid()) }.is_some() {
        return Ok(0);
    }
    // SAFETY: see read_sockaddr_kernel.
    let Some((family, port, addr)) = (unsafe { read_sockaddr_kernel(kaddr) }) else {
        return Ok(0);
    };
    if !port_wanted(port) {
        return Ok(0);
    }
    let o = offsets();
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::BIND, &o);
    e.ret = ret;
    e.family = family;
    e.port = port;
    e.addr = addr;
    e.flags = flags::FROM_SOCKADDR;
    // SAFETY: bpf_probe_read_kernel.
    let sk = unsafe { read_ptr0(sock, o.socket_sk) };
    if sk != 0 {
        e.sk = sk;
        e.proto = sock_proto(&o, sk);
        set_sock_netns(&mut e, sock_netns(&o, sk));
    }
    if ret == 0 {
        remember_bound(&e, true);
    }
    emit(&e);
    Ok(0)
}

#[fentry(function = "__sys_listen")]
pub fn tr_listen_enter(ctx: FEntryContext) -> u32 {
    let fd: i32 = ctx.arg(0);
    match enter_listen(fd) {
        Ok(v) | Err(v) => v,
    }
}

#[fexit(function = "__sys_listen")]
pub fn tr_listen_exit(ctx: FExitContext) -> u32 {
    let ret: i32 = ctx.arg(2);
    match exit_listen(i64::from(ret), true) {
        Ok(v) | Err(v) => v,
    }
}

/// `__sys_listen_socket(sock, backlog)` (6.11+), as `tr_bind_socket_exit` is for bind.
#[fexit(function = "__sys_listen_socket")]
pub fn tr_listen_socket_exit(ctx: FExitContext) -> u32 {
    let sock: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(2);
    if event_mask() & mask::LISTEN == 0 {
        return 0;
    }
    // SAFETY: an existence check only.
    if unsafe { LISTEN_PENDING.get(&bpf_get_current_pid_tgid()) }.is_some() {
        return 0;
    }
    let o = offsets();
    // SAFETY: bpf_probe_read_kernel.
    let sk = unsafe { read_ptr0(sock, o.socket_sk) };
    if sk == 0 {
        return 0;
    }
    match report_listen(i64::from(ret), -1, sk, true) {
        Ok(v) | Err(v) => v,
    }
}

/// connect(fd, uaddr, len) returned: only EADDRNOTAVAIL is reported, as above. One fexit
/// and nothing at entry: the arguments are still there at exit.
#[fexit(function = "__sys_connect")]
pub fn tr_connect_exit(ctx: FExitContext) -> u32 {
    let ret: i32 = ctx.arg(3);
    if ret != -EADDRNOTAVAIL || event_mask() & mask::CONNECT == 0 {
        return 0;
    }
    let fd: i32 = ctx.arg(0);
    let uaddr: u64 = ctx.arg(1);
    match connect_failed(i64::from(ret), fd, uaddr) {
        Ok(v) | Err(v) => v,
    }
}

/// `inet_release(sock)`: an IPv4 or IPv6 socket's last reference is gone (its last close,
/// from any process, or its holder's exit). Sockets portwatch saw bound or listening are
/// reported as `close`; everything else stops at the counting filter.
#[fentry(function = "inet_release")]
pub fn tr_release(ctx: FEntryContext) -> u32 {
    let sock: u64 = ctx.arg(0);
    let o = offsets();
    // SAFETY: bpf_probe_read_kernel.
    let sk = unsafe { read_ptr0(sock, o.socket_sk) };
    if sk == 0 {
        return 0;
    }
    match BOUND_HINT.get(hint_slot(sk)) {
        Some(n) if *n != 0 => {}
        _ => return 0,
    }
    // SAFETY: copied out before removal.
    let Some(b) = (unsafe { BOUND.get(&sk) }).copied() else {
        return 0;
    };
    if BOUND.remove(&sk).is_ok() {
        hint_add(sk, u64::MAX);
    }
    if event_mask() & mask::CLOSE == 0 {
        return 0;
    }
    let mut e = Event::zeroed();
    fill_task(&mut e, kind::CLOSE, &o);
    e.family = b.family;
    e.port = b.port;
    e.addr = b.addr;
    e.proto = b.proto;
    e.sk = sk;
    set_sock_netns(&mut e, sock_netns(&o, sk));
    emit(&e);
    0
}

const TCP_TIME_WAIT: i32 = 6;

/// Count a TIME_WAIT socket's creation (`which` 0) or destruction (1) in its namespace.
/// Atomically, as `count_lost` does: a softirq may interrupt a process-context run on the
/// same CPU.
#[inline(always)]
fn tw_count(ns: u32, which: usize) {
    const BPF_NOEXIST: u64 = 1;
    if TW_COUNTS.get_ptr_mut(ns).is_none() {
        let v = [0u64; 2];
        // Another CPU (or a nested run) may create it first: then this one finds it below.
        let _ = TW_COUNTS.insert(ns, v, BPF_NOEXIST);
    }
    if let Some(p) = TW_COUNTS.get_ptr_mut(ns) {
        // SAFETY: this CPU's value of an entry of this map, 8-byte aligned, valid for the run.
        unsafe {
            let slot = (p as *mut u64).add(which & 1);
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, 1,
            );
        }
    }
}

/// The 4-tuple of a TIME_WAIT socket (a `struct sock` or the `struct inet_timewait_sock`
/// that replaces it: both start with `struct sock_common`), as a `tcp_state` event.
#[inline(always)]
fn tw_event(sk: u64, ns: u32, old: i32, new: i32) {
    let o = offsets();
    // SAFETY: every read goes through bpf_probe_read_kernel.
    unsafe {
        let rd16 =
            |off: u32| bpf_probe_read_kernel((sk + u64::from(off)) as *const u16).unwrap_or(0);
        let sport = rd16(o.skc_num);
        if !port_wanted(sport) {
            return;
        }
        let mut e = state_event(sk, sport, old, new);
        e.family = rd16(o.skc_family);
        e.rport = u16::from_be(rd16(o.skc_dport));
        if e.family == AF_INET6 {
            e.addr = bpf_probe_read_kernel((sk + u64::from(o.skc_v6_rcv_saddr)) as *const [u8; 16])
                .unwrap_or([0; 16]);
            e.raddr = bpf_probe_read_kernel((sk + u64::from(o.skc_v6_daddr)) as *const [u8; 16])
                .unwrap_or([0; 16]);
        } else {
            let s: [u8; 4] =
                bpf_probe_read_kernel((sk + u64::from(o.skc_rcv_saddr)) as *const [u8; 4])
                    .unwrap_or([0; 4]);
            let d: [u8; 4] = bpf_probe_read_kernel((sk + u64::from(o.skc_daddr)) as *const [u8; 4])
                .unwrap_or([0; 4]);
            e.addr[..4].copy_from_slice(&s);
            e.raddr[..4].copy_from_slice(&d);
        }
        e.flags |= flags::TW_HOOK;
        set_sock_netns(&mut e, ns);
        emit(&e);
    }
}

/// `inet_twsk_alloc(sk, death_row, state)` returned: a closing TCP socket is being replaced
/// by a TIME_WAIT socket (or one in its FIN_WAIT2 substate, which turns TIME_WAIT on the
/// peer's FIN), which `tcp_time_wait` then hashes. Counted here and not at `tcp_time_wait`
/// because that one also runs when no TIME_WAIT socket can be made (the
/// `tcp_max_tw_buckets` limit or no memory: `TCPTimeWaitOverflow`), and this one's result
/// says whether one was.
#[fexit(function = "inet_twsk_alloc")]
pub fn tr_time_wait(ctx: FExitContext) -> u32 {
    let tw: u64 = ctx.arg(3);
    if tw == 0 {
        return 0;
    }
    let o = offsets();
    let ns = sock_netns(&o, tw);
    tw_count(ns, 0);
    if event_mask() & mask::TCP_STATE_ALL != 0 {
        let state: i32 = ctx.arg(2);
        tw_event(tw, ns, state, TCP_TIME_WAIT);
    }
    0
}

/// `inet_twsk_kill(tw)`: a TIME_WAIT socket goes, at expiry or taken over early.
#[fentry(function = "inet_twsk_kill")]
pub fn tr_time_wait_gone(ctx: FEntryContext) -> u32 {
    let tw: u64 = ctx.arg(0);
    let o = offsets();
    let ns = sock_netns(&o, tw);
    tw_count(ns, 1);
    if event_mask() & mask::TCP_STATE_ALL != 0 {
        tw_event(tw, ns, TCP_TIME_WAIT, TCP_CLOSE);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
