//! Reads of kernel and user memory: pointers, sockaddrs, network namespaces and the socket
//! behind an fd.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user};
use portwatch_common::{Offsets, AF_INET, AF_INET6};

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
pub(crate) fn current_netns(o: &Offsets) -> u32 {
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
pub(crate) fn sock_netns(o: &Offsets, sk: u64) -> u32 {
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
pub(crate) fn sock_of_fd(o: &Offsets, fd: i32) -> u64 {
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
pub(crate) unsafe fn read_ptr0(base: u64, off: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_kernel tolerates bad addresses (it returns an error).
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64).unwrap_or(0) }
}

#[inline(always)]
pub(crate) fn sock_proto(o: &Offsets, sk: u64) -> u16 {
    // SAFETY: bpf_probe_read_kernel.
    unsafe { bpf_probe_read_kernel((sk + u64::from(o.sk_protocol)) as *const u16).unwrap_or(0) }
}

/// Read a user sockaddr; only AF_INET and AF_INET6 are of interest.
#[inline(always)]
pub(crate) unsafe fn read_sockaddr(uaddr: u64) -> Option<(u16, u16, [u8; 16])> {
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
pub(crate) unsafe fn read_sockaddr_kernel(kaddr: u64) -> Option<(u16, u16, [u8; 16])> {
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
