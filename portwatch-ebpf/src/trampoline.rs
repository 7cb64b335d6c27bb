//! The fentry/fexit programs: bind, listen and connect from the kernel functions behind
//! them, socket release, and TIME_WAIT creation and destruction.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use portwatch_common::{flags, kind, mask, Event, AF_INET6};

use crate::maps::{
    event_mask, hint_add, hint_slot, offsets, port_wanted, BIND_PENDING, BOUND, BOUND_HINT,
    LISTEN_PENDING, TW_COUNTS,
};
use crate::read::{read_ptr0, read_sockaddr_kernel, sock_netns, sock_proto};
use crate::reporting::{emit, fill_task};
use crate::state::{set_sock_netns, state_event, TCP_CLOSE};
use crate::syscalls::{
    connect_failed, enter_bind, enter_listen, exit_bind, exit_listen, remember_bound,
    report_listen, EADDRNOTAVAIL,
};

// ---- Trampoline family (fentry/fexit) ----
//
// The same facts as the syscall tracepoints (`syscalls.rs`), from programs on the kernel
// functions behind bind, listen and connect. A syscall tracepoint puts every syscall of
// every task on the traced path; these run only when their function does. The agent
// attaches one family or the other, never both, and names the functions from the running
// kernel's BTF: the `function` below is only the default it overrides. fexit programs read
// the return value as the argument after the last one (`bpf_get_func_ret` needs 5.17).

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

/// connect(fd, uaddr, len) returned: only EADDRNOTAVAIL is reported, as by its tracepoint.
/// One fexit and nothing at entry: the arguments are still there at exit.
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
