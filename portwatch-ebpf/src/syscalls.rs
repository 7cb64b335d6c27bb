//! The syscall tracepoint programs (bind, listen, connect, close), and the bind, listen and
//! connect steps the trampoline programs share with them.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use portwatch_common::{flags, kind, mask, Event, AF_INET, AF_INET6};

use crate::maps::{
    count_lost, event_mask, fd_key, hint_add, hint_slot, offsets, port_wanted, Bound, PendingBind,
    BIND_PENDING, BOUND, BOUND_HINT, CONNECT_PENDING, CONNECT_SLOTS, LISTEN_PENDING, LOST, TRACKED,
};
use crate::read::{read_sockaddr, sock_of_fd, sock_proto};
use crate::reporting::{emit, fill_task};

pub(crate) const EADDRNOTAVAIL: i32 = 99;

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
pub(crate) fn enter_bind(fd: i32, uaddr: u64) -> Result<u32, u32> {
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
pub(crate) fn exit_bind(ret: i64, by_sock: bool) -> Result<u32, u32> {
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
pub(crate) fn remember_bound(e: &Event, by_sock: bool) {
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
pub(crate) fn enter_listen(fd: i32) -> Result<u32, u32> {
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
pub(crate) fn exit_listen(ret: i64, by_sock: bool) -> Result<u32, u32> {
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
pub(crate) fn report_listen(ret: i64, fd: i32, sk: u64, by_sock: bool) -> Result<u32, u32> {
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
pub(crate) fn connect_failed(ret: i64, fd: i32, uaddr: u64) -> Result<u32, u32> {
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
