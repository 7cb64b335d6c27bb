//! Process exit and TCP state changes: `sched_process_exit`, and `inet_sock_set_state` as a
//! classic, raw and BTF-typed tracepoint.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use portwatch_common::{flags, kind, mask, Event, AF_INET6, IPPROTO_TCP};

use crate::maps::{event_mask, offsets, port_wanted, SS_OFF, TRACKED};
use crate::read::sock_netns;
use crate::reporting::{emit, fill_task};

const TCP_FIN_WAIT2: i32 = 5;
pub(crate) const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const TCP_CLOSING: i32 = 11;

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
pub(crate) fn state_event(sk: u64, sport: u16, old: i32, new: i32) -> Event {
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
pub(crate) fn set_sock_netns(e: &mut Event, ns: u32) {
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
