//! The sock_diag dump itself, in the namespace the calling thread is in: the INET_DIAG
//! requests for TCP and UDP over IPv4 and IPv6, and each reply's `inet_diag_msg` parsed into
//! a [`SockEntry`].

use std::{
    fmt::Display,
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr, SocketAddrV6},
};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NlasIterator, Parseable,
    NLMSG_ALIGNTO, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{
        AF_INET, AF_INET6, INET_DIAG_SKV6ONLY, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY,
    },
    inet::{
        ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId,
        SocketIdBuffer, StateFlags,
    },
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

use super::{Proto, Sink, SockEntry};

/// `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;
/// Larger than any one datagram of a dump: the kernel caps those at 32 KiB, and reports a
/// bigger one as truncated (MSG_TRUNC) rather than losing sockets silently.
const RECV_BUF: usize = 64 * 1024;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = size_of::<InetResponseBuffer>();
/// `idiag_expires` follows family, state, timer, retrans and the socket id. Read by hand
/// because the crate's parsed header drops it for TIME_WAIT sockets, where it matters most.
const EXPIRES_AT: usize = 4 + size_of::<SocketIdBuffer>();
const _: () = assert!(MSG_LEN == 72 && EXPIRES_AT == 52);

/// Dumps the namespace the calling thread is in.
pub(super) fn dump_here<S: Sink>(netns: u32, mut out: S) -> io::Result<S> {
    let sock = Socket::new(NETLINK_SOCK_DIAG)
        .map_err(|e| io::Error::new(e.kind(), format!("opening a sock_diag socket: {e}")))?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to the kernel: {e}")))?;
    let mut buf = vec![0u8; RECV_BUF];
    let mut seq = 0;
    for (protocol, proto) in [(IPPROTO_TCP, Proto::Tcp), (IPPROTO_UDP, Proto::Udp)] {
        for family in [AF_INET, AF_INET6] {
            seq += 1;
            let label = || {
                let p = if proto == Proto::Tcp { "tcp" } else { "udp" };
                let v = if family == AF_INET { "4" } else { "6" };
                format!("dumping {p}{v}")
            };
            request(&sock, seq, family, protocol)
                .and_then(|()| receive(&sock, &mut buf, seq, netns, proto, &mut out))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", label())))?;
        }
    }
    Ok(out)
}

fn request(sock: &Socket, seq: u32, family: u8, protocol: u8) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut msg = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol,
            extensions: ExtensionFlags::empty(),
            // Every bit, not just the states the crate names: bit 13 (TCP_BOUND_INACTIVE)
            // is what makes the kernel list sockets that are bound but neither listening nor
            // connected, and they hold ports too.
            states: StateFlags::from_bits_retain(u32::MAX),
            socket_id,
        })
        .into(),
    );
    msg.finalize();
    let mut bytes = [0u8; 128];
    let len = msg.buffer_len();
    msg.serialize(&mut bytes[..len]);
    let sent = sock.send(&bytes[..len], 0)?;
    if sent != len {
        return Err(io::Error::other(format!(
            "sent {sent} of {len} request bytes"
        )));
    }
    Ok(())
}

/// Reads the multipart reply to request `seq` up to NLMSG_DONE, appending to `out`.
fn receive(
    sock: &Socket,
    buf: &mut [u8],
    seq: u32,
    netns: u32,
    proto: Proto,
    out: &mut dyn Sink,
) -> io::Result<()> {
    loop {
        let n = loop {
            match sock.recv(&mut &mut buf[..], libc::MSG_TRUNC) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "a {n}-byte reply does not fit the {}-byte buffer",
                buf.len()
            )));
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the kernel ended the reply without NLMSG_DONE",
            ));
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let msg = NetlinkBuffer::new_checked(rest).map_err(invalid)?;
            let len = msg.length() as usize;
            let payload = &rest[NLMSG_HDRLEN..len];
            rest = &rest[align(len).min(rest.len())..];
            if msg.sequence_number() != seq {
                // Left over from an earlier request that failed half-way; not ours.
                continue;
            }
            match msg.message_type() {
                SOCK_DIAG_BY_FAMILY => out.push(entry(payload, netns, proto)?),
                NLMSG_DONE => {
                    // A dump that failed part-way says so here, not with NLMSG_ERROR.
                    let code = DoneBuffer::new_checked(payload).map_err(invalid)?.code();
                    return if code < 0 {
                        Err(io::Error::from_raw_os_error(-code))
                    } else {
                        Ok(())
                    };
                }
                NLMSG_ERROR => {
                    let err = ErrorBuffer::new_checked(payload).map_err(invalid)?;
                    return match err.code() {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }
}

/// One `inet_diag_msg` and its attributes to an entry; allocates nothing.
fn entry(payload: &[u8], netns: u32, proto: Proto) -> io::Result<SockEntry> {
    if payload.len() < MSG_LEN {
        return Err(invalid(format!(
            "a {}-byte inet_diag_msg, expected at least {MSG_LEN}",
            payload.len()
        )));
    }
    let header = InetResponseHeader::parse(&payload[..MSG_LEN]).map_err(invalid)?;
    let id = &header.socket_id;
    let mut expires = [0u8; 4];
    expires.copy_from_slice(&payload[EXPIRES_AT..EXPIRES_AT + 4]);
    let mut v6only = None;
    if header.family == AF_INET6 {
        for nla in NlasIterator::new(&payload[MSG_LEN..]) {
            let nla = nla.map_err(invalid)?;
            if nla.kind() == INET_DIAG_SKV6ONLY {
                v6only = nla.value().first().map(|&b| b != 0);
            }
        }
    }
    Ok(SockEntry {
        netns,
        proto,
        local: sockaddr(id.source_address, id.source_port, id.interface_id),
        remote: sockaddr(id.destination_address, id.destination_port, id.interface_id),
        state: header.state,
        inode: u64::from(header.inode),
        uid: header.uid,
        expires_ms: u32::from_ne_bytes(expires),
        v6only,
    })
}

/// A link-local IPv6 address means nothing without its interface, so it keeps the one
/// the socket is bound to as scope id.
fn sockaddr(ip: IpAddr, port: u16, ifindex: u32) -> SocketAddr {
    match ip {
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            SocketAddr::V6(SocketAddrV6::new(v6, port, 0, ifindex))
        }
        ip => SocketAddr::new(ip, port),
    }
}

fn align(len: usize) -> usize {
    let a = usize::from(NLMSG_ALIGNTO);
    len.div_ceil(a) * a
}

fn invalid(e: impl Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed sock_diag reply: {e}"),
    )
}
