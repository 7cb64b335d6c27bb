//! Types shared by the kernel programs (`portwatch-ebpf`) and the agent (`portwatch`).
//!
//! Everything here crosses the kernel/user boundary through the ring buffer or through
//! loader-set globals, so it is `#[repr(C)]`, `Copy`, made of fixed-width integers only and
//! padded explicitly. Kinds travel as `u32` and are decoded with `TryFrom`, never transmuted.
#![no_std]

/// Event kinds, as sent in [`Event::kind`].
pub mod kind {
    pub const BIND: u32 = 1;
    pub const LISTEN: u32 = 2;
    pub const CONNECT: u32 = 3;
    pub const CLOSE: u32 = 4;
    pub const EXIT: u32 = 5;
    pub const TCP_STATE: u32 = 6;
    /// One past the largest kind: the length of the per-kind loss counters.
    pub const COUNT: u32 = 7;
}

/// Bits of the loader global `EVENT_MASK`: which event classes the kernel emits.
pub mod mask {
    use super::kind;
    pub const BIND: u32 = 1 << kind::BIND;
    pub const LISTEN: u32 = 1 << kind::LISTEN;
    pub const CONNECT: u32 = 1 << kind::CONNECT;
    pub const CLOSE: u32 = 1 << kind::CLOSE;
    pub const EXIT: u32 = 1 << kind::EXIT;
    /// LISTEN start/stop and TIME_WAIT entry (FIN_WAIT2->CLOSE, CLOSING->CLOSE) only.
    pub const TCP_STATE: u32 = 1 << kind::TCP_STATE;
    /// Every TCP state transition (verbose; `--all-events`).
    pub const TCP_STATE_ALL: u32 = 1 << 16;
    pub const DEFAULT: u32 = BIND | LISTEN | CONNECT | CLOSE | EXIT | TCP_STATE;
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// The socket's address was read from the user's sockaddr (bind/connect).
    pub const FROM_SOCKADDR: u32 = 1 << 0;
    /// The socket's address was read from the kernel socket (listen without a seen bind).
    pub const FROM_SOCK: u32 = 1 << 1;
    /// The network namespace inode is the socket's own (not the current task's).
    pub const NETNS_FROM_SOCK: u32 = 1 << 2;
    /// A TIME_WAIT entry or exit seen at `tcp_time_wait`/`inet_twsk_kill` (trampolines).
    pub const TW_HOOK: u32 = 1 << 3;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u16 = 17;

/// Largest number of ports the in-kernel port filter holds (`--port` may repeat).
pub const MAX_FILTER_PORTS: usize = 16;

/// One kernel event.
///
/// Layout (120 bytes, 8-byte aligned so `bpf_ringbuf_reserve` can hold it): the three `u64`
/// come first, then `u32`s, then `u16`s, then byte arrays, so no implicit padding exists;
/// `_pad` rounds the size up to a multiple of 8. Ports are in host byte order; addresses are
/// network order, IPv4 in the first 4 bytes of the 16.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    /// Kernel address of the `struct sock`, an opaque id to correlate events (0 if unknown).
    pub sk: u64,
    pub kind: u32,
    /// Thread group id (what userspace calls the pid).
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Inode of the network namespace (0 when the kernel could not read it).
    pub netns: u32,
    pub fd: i32,
    /// Syscall result: 0 or a negative errno.
    pub ret: i32,
    pub flags: u32,
    pub family: u16,
    /// IPPROTO_TCP / IPPROTO_UDP, 0 when unknown.
    pub proto: u16,
    /// Attempted / local port.
    pub port: u16,
    /// Remote port (connect destination, tcp_state peer).
    pub rport: u16,
    pub old_state: u16,
    pub new_state: u16,
    pub _pad0: u32,
    /// Attempted / local address.
    pub addr: [u8; 16],
    /// Remote address.
    pub raddr: [u8; 16],
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<Event>() == 120);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

impl Event {
    pub const fn zeroed() -> Self {
        Self {
            ts_ns: 0,
            cgroup_id: 0,
            sk: 0,
            kind: 0,
            pid: 0,
            tid: 0,
            uid: 0,
            netns: 0,
            fd: -1,
            ret: 0,
            flags: 0,
            family: 0,
            proto: 0,
            port: 0,
            rport: 0,
            old_state: 0,
            new_state: 0,
            _pad0: 0,
            addr: [0; 16],
            raddr: [0; 16],
            comm: [0; 16],
        }
    }
}

/// Kernel struct member offsets, resolved by the agent from /sys/kernel/btf/vmlinux at load
/// time and handed to the programs as the global `OFFSETS`. Rust eBPF has no CO-RE, so this
/// is how the programs stay correct across kernel builds. `netns_ok`/`sock_ok` are 0 when a
/// path could not be resolved; the programs then skip that read and the agent falls back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub netns_ok: u32,
    pub sock_ok: u32,
    /// task_struct.nsproxy
    pub task_nsproxy: u32,
    /// nsproxy.net_ns
    pub nsproxy_net: u32,
    /// net.ns.inum
    pub net_inum: u32,
    /// task_struct.files
    pub task_files: u32,
    /// files_struct.fdt
    pub files_fdt: u32,
    /// fdtable.max_fds
    pub fdt_max_fds: u32,
    /// fdtable.fd
    pub fdt_fd: u32,
    /// file.private_data
    pub file_private: u32,
    /// socket.sk
    pub socket_sk: u32,
    /// sock.sk_protocol (u16)
    pub sk_protocol: u32,
    /// sock.__sk_common.skc_net
    pub skc_net: u32,
    /// sock.__sk_common.skc_family (u16)
    pub skc_family: u32,
    /// sock.__sk_common.skc_num (u16, host order)
    pub skc_num: u32,
    /// sock.__sk_common.skc_rcv_saddr (be32)
    pub skc_rcv_saddr: u32,
    /// sock.__sk_common.skc_v6_rcv_saddr (16 bytes)
    pub skc_v6_rcv_saddr: u32,
    /// 1 when the remote-end fields below resolved: the state-change program then reads the
    /// socket itself from a raw tracepoint instead of the classic tracepoint's record.
    pub remote_ok: u32,
    /// sock.__sk_common.skc_daddr (be32)
    pub skc_daddr: u32,
    /// sock.__sk_common.skc_dport (be16)
    pub skc_dport: u32,
    /// sock.__sk_common.skc_v6_daddr (16 bytes)
    pub skc_v6_daddr: u32,
    /// inet_sock.inet_sport (be16). Not skc_num: the kernel zeroes that when it releases the
    /// port, just before a closing socket's last state change.
    pub inet_sport: u32,
}

/// Field offsets of the `sock:inet_sock_set_state` tracepoint record, parsed by the agent
/// from tracefs' `format` file so the program does not depend on one kernel's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetStateOffsets {
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    pub _pad: u32,
}

impl Offsets {
    pub const fn zeroed() -> Self {
        Self {
            netns_ok: 0,
            sock_ok: 0,
            task_nsproxy: 0,
            nsproxy_net: 0,
            net_inum: 0,
            task_files: 0,
            files_fdt: 0,
            fdt_max_fds: 0,
            fdt_fd: 0,
            file_private: 0,
            socket_sk: 0,
            sk_protocol: 0,
            skc_net: 0,
            skc_family: 0,
            skc_num: 0,
            skc_rcv_saddr: 0,
            skc_v6_rcv_saddr: 0,
            remote_ok: 0,
            skc_daddr: 0,
            skc_dport: 0,
            skc_v6_daddr: 0,
            inet_sport: 0,
        }
    }
}

impl SetStateOffsets {
    pub const fn zeroed() -> Self {
        Self {
            skaddr: 0,
            oldstate: 0,
            newstate: 0,
            sport: 0,
            dport: 0,
            family: 0,
            protocol: 0,
            saddr: 0,
            daddr: 0,
            saddr_v6: 0,
            daddr_v6: 0,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are #[repr(C)], Copy, made of integers and integer arrays only, with
    // explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SetStateOffsets {}
}

/// Event kinds decoded on the user side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Bind,
    Listen,
    Connect,
    Close,
    Exit,
    TcpState,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Bind,
        Kind::Listen,
        Kind::Connect,
        Kind::Close,
        Kind::Exit,
        Kind::TcpState,
    ];

    /// The record `type` / `op` name used in the JSON schema.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Bind => "bind",
            Kind::Listen => "listen",
            Kind::Connect => "connect",
            Kind::Close => "close",
            Kind::Exit => "exit",
            Kind::TcpState => "tcp_state",
        }
    }

    pub const fn raw(self) -> u32 {
        match self {
            Kind::Bind => kind::BIND,
            Kind::Listen => kind::LISTEN,
            Kind::Connect => kind::CONNECT,
            Kind::Close => kind::CLOSE,
            Kind::Exit => kind::EXIT,
            Kind::TcpState => kind::TCP_STATE,
        }
    }
}

/// An unknown kind number: the kernel side is newer than the agent, or memory was corrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownKind(pub u32);

impl TryFrom<u32> for Kind {
    type Error = UnknownKind;
    fn try_from(v: u32) -> Result<Self, Self::Error> {
        Ok(match v {
            kind::BIND => Kind::Bind,
            kind::LISTEN => Kind::Listen,
            kind::CONNECT => Kind::Connect,
            kind::CLOSE => Kind::Close,
            kind::EXIT => Kind::Exit,
            kind::TCP_STATE => Kind::TcpState,
            other => return Err(UnknownKind(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::try_from(k.raw()), Ok(k));
            assert!(k.raw() < kind::COUNT);
        }
        assert_eq!(Kind::try_from(0), Err(UnknownKind(0)));
        assert_eq!(Kind::try_from(99), Err(UnknownKind(99)));
    }

    #[test]
    fn offsets_are_8_byte_multiples() {
        assert_eq!(core::mem::size_of::<Offsets>() % 8, 0);
        assert_eq!(core::mem::size_of::<SetStateOffsets>() % 8, 0);
    }
}
