//! Real sockets (plain syscalls and io_uring), test ports, network namespaces, and processes that hold a socket.

use super::*;

// ---- sockets ----

pub const SOCK_STREAM: i32 = libc::SOCK_STREAM;
pub const SOCK_DGRAM: i32 = libc::SOCK_DGRAM;

pub fn socket(addr: &SocketAddr, ty: i32, reuseaddr: bool) -> OwnedFd {
    let fam = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls on an fd we own.
    unsafe {
        let fd = libc::socket(fam, ty | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        if reuseaddr {
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            );
        }
        OwnedFd::from_raw_fd(fd)
    }
}

pub fn set_v6only(fd: &OwnedFd, on: bool) {
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt on an fd we own.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill one of its variants.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in);
                sin.sin_family = libc::AF_INET as _;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6);
                sin6.sin6_family = libc::AF_INET6 as _;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as _)
    }
}

pub fn bind(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn listen(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: listen on an fd we own.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 128) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn connect(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of the given length.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// bind() and listen() through io_uring (IORING_OP_BIND / IORING_OP_LISTEN, Linux 6.11+):
/// no bind or listen syscall is made, the kernel's socket layer is reached from
/// io_uring_enter (or an io-wq worker thread of this process).
pub mod uring {
    use std::{net::SocketAddr, os::fd::AsRawFd, os::fd::OwnedFd};

    use io_uring::{opcode, types, IoUring};

    fn submit_one(entry: io_uring::squeue::Entry) -> std::io::Result<()> {
        let mut ring = IoUring::new(4)?;
        // SAFETY: the entry's pointers (the sockaddr) outlive the wait below.
        unsafe { ring.submission().push(&entry.user_data(7)) }
            .map_err(|_| std::io::Error::other("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| std::io::Error::other("io_uring: no completion"))?;
        if cqe.result() < 0 {
            return Err(std::io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }

    pub fn bind(fd: &OwnedFd, addr: &SocketAddr) -> std::io::Result<()> {
        let (ss, len) = super::sockaddr(addr);
        let e = opcode::Bind::new(
            types::Fd(fd.as_raw_fd()),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
        .build();
        submit_one(e)
    }

    pub fn listen(fd: &OwnedFd) -> std::io::Result<()> {
        submit_one(opcode::Listen::new(types::Fd(fd.as_raw_fd()), 128).build())
    }
}

/// A held listener: bound and listening.
pub fn listener(addr: &str) -> OwnedFd {
    let a: SocketAddr = addr.parse().unwrap();
    let fd = socket(&a, SOCK_STREAM, false);
    bind(&fd, &a).unwrap_or_else(|e| panic!("holder bind {addr}: {e}"));
    listen(&fd).unwrap();
    fd
}

pub fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

pub fn netns_inode_of(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

pub fn host_netns() -> u64 {
    netns_inode_of("/proc/self/ns/net")
}

/// A port no test shares: tests run one at a time, but a leftover TIME_WAIT from an
/// earlier run must not make a bind fail unexpectedly.
pub fn test_port(offset: u16) -> u16 {
    // Below the ephemeral range (32768+), where client sockets of the churn tests live.
    let base = 10000 + (std::process::id() % 2000) as u16 * 10;
    base + offset
}

/// A TCP port that is free on 0.0.0.0 and [::] right now, below the ephemeral range: ports
/// that a daemon binds with SO_REUSEADDR (docker-proxy, dockerd) still fail on another
/// process's client-side TIME_WAIT, which a busy host leaves all over the ephemeral range.
pub fn free_port(offset: u16) -> u16 {
    let mut p = 10000 + (std::process::id() % 1000) as u16 * 20 + offset;
    for _ in 0..40 {
        let free = ["0.0.0.0", "[::]"].iter().all(|ip| {
            let a: SocketAddr = format!("{ip}:{p}").parse().unwrap();
            let s = socket(&a, SOCK_STREAM, false);
            if a.is_ipv6() {
                set_v6only(&s, true);
            }
            bind(&s, &a).is_ok()
        });
        if free {
            return p;
        }
        p = 10000 + (p - 10000 + 997) % 22000;
    }
    panic!("no free TCP port found below 32000");
}

// ---- network namespaces ----

/// `ip netns add` with Drop cleanup; loopback brought up.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> NetNs {
        let name = format!("pwtest-{}-{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name} failed");
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        NetNs { name }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// The inode as records carry it (`netns` is a u32 there).
    pub fn inode32(&self) -> u32 {
        u32::try_from(self.inode()).expect("namespace inodes fit in 32 bits")
    }

    pub fn inode(&self) -> u64 {
        netns_inode_of(&self.path())
    }

    /// Run `f` on a thread that has entered this namespace. Sockets created there belong
    /// to it, and the kernel sees that thread's tid as the actor.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let f2 = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only.
            let rc = unsafe { libc::setns(f2.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let ok = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "sysctl {key}={value} in {}", self.name);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A holder process (`pw-hold`), optionally inside a network namespace. Killed on drop.
pub struct Holder {
    child: Child,
}

impl Holder {
    pub fn start(bin: &str, mode: &str, addr: &str, netns: Option<&NetNs>) -> Holder {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, bin]);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args([mode, addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn pw-hold");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "pw-hold {mode} {addr} failed");
        Holder { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
