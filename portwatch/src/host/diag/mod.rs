//! Ground truth of every TCP and UDP socket, per network namespace, from netlink sock_diag
//! (INET_DIAG): what `ss -tuanp` shows, without running it. The tracepoints miss some
//! transitions (TIME_WAIT never shows up there, and sockets older than the agent are
//! invisible to it), so this is what start-up and the reconcile timer compare against.
//!
//! A netlink socket reports on the namespace it was created in. Foreign namespaces are
//! therefore read from a short-lived thread that has `setns`ed into them; the calling
//! thread never changes namespace, so the rest of the agent is never affected.

mod netlink;

use std::{
    collections::{hash_map::Entry, HashMap, HashSet},
    ffi::CStr,
    fmt::Display,
    fs::File,
    io::{self, Read},
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
};

use netlink::dump_here;

pub use crate::model::{Owner, Proto};

/// One socket as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEntry {
    /// Inode of the namespace (as /proc/<pid>/ns/net shows).
    pub netns: u32,
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state numbers (1 ESTABLISHED .. 10 LISTEN, 6 TIME_WAIT, 7 CLOSE). UDP uses
    /// the same numbers: 7 unconnected, 1 connected.
    pub state: u8,
    /// 0 for TIME_WAIT and request sockets: they have no file.
    pub inode: u64,
    pub uid: u32,
    /// Milliseconds until the socket's timer fires; for TIME_WAIT, until the port is free.
    pub expires_ms: u32,
    /// INET_DIAG_SKV6ONLY. The kernel reports it only for AF_INET6 sockets in LISTEN or
    /// CLOSE (7, bound or unconnected UDP); None for everything else.
    pub v6only: Option<bool>,
}

/// A network namespace and a file that can enter it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u32,
    /// `/proc/<pid>/ns/net`, `/var/run/netns/<name>`, or `/proc/self/ns/net`.
    pub path: PathBuf,
}

const OWN_NS: &str = "/proc/self/ns/net";
/// The calling thread's own, which differs from /proc/self's if someone setns'd it.
const THREAD_NS: &str = "/proc/thread-self/ns/net";
const NAMED_NS_DIR: &str = "/var/run/netns";
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Every distinct network namespace: this process's own (first), every one named in
/// /var/run/netns, and every one some process lives in; deduplicated by inode. Named
/// entries come before /proc ones because their path outlives any process. Processes that
/// exit mid-scan, and files in /var/run/netns that are not namespaces (a mount that `ip
/// netns delete` already removed), are skipped.
pub fn namespaces() -> Vec<Namespace> {
    let mut out = Vec::new();
    let Ok(own) = std::fs::metadata(OWN_NS) else {
        // No /proc: nothing else below can work either.
        return out;
    };
    // Every namespace file lives on the single nsfs superblock; a plain file that merely
    // sits in /var/run/netns does not.
    let nsfs = own.dev();
    let mut seen = HashSet::new();
    let mut add = |path: PathBuf| {
        let Ok(m) = std::fs::metadata(&path) else {
            return;
        };
        let Ok(inode) = u32::try_from(m.ino()) else {
            return;
        };
        if m.dev() == nsfs && seen.insert(inode) {
            out.push(Namespace { inode, path });
        }
    };
    add(PathBuf::from(OWN_NS));
    if let Ok(dir) = std::fs::read_dir(NAMED_NS_DIR) {
        let mut named: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        // Stable order, so the same namespace keeps the same path from one scan to the next.
        named.sort();
        named.into_iter().for_each(&mut add);
    }
    for pid in pids() {
        add(PathBuf::from(format!("/proc/{pid}/ns/net")));
    }
    out
}

/// All TCP and UDP sockets, IPv4 and IPv6, in every state (LISTEN, bound-but-idle CLOSE,
/// ESTABLISHED, TIME_WAIT, SYN_RECV request sockets, ...), of one namespace.
///
/// An error of kind `NotFound` means the namespace is gone (its process exited, or the pid
/// now belongs to a process in another namespace): skip it.
pub fn dump(ns: &Namespace) -> io::Result<Vec<SockEntry>> {
    dump_into(ns, Vec::new())
}

/// Where a dump puts the sockets as it reads them.
pub trait Sink: Send + 'static {
    fn push(&mut self, e: SockEntry);
}

impl Sink for Vec<SockEntry> {
    fn push(&mut self, e: SockEntry) {
        Vec::push(self, e);
    }
}

/// `dump`, handing each socket to `sink` as it is read rather than collecting them all
/// first: what the sink keeps of 100k sockets can be much less than 100k `SockEntry`s.
/// Returns the sink. On error, what it got so far is dropped.
pub fn dump_into<S: Sink>(ns: &Namespace, sink: S) -> io::Result<S> {
    let inode = ns.inode;
    in_namespace(ns, "sock_diag dump", move || dump_here(inode, sink))
}

/// Socket inode -> the process holding it, like `ss -p`, from one pass over
/// /proc/<pid>/fd. A socket shared by several processes (inherited across fork, as a
/// pre-forking server's listener is) maps to the lowest pid, usually the parent.
/// Processes that exit mid-scan or whose fds cannot be read are skipped.
///
/// One `Owner` per process, shared by all its sockets; its uid is the effective one, the one
/// the kernel checks permissions against, and its cmdline is left unknown.
pub fn socket_owners() -> HashMap<u64, Arc<Owner>> {
    socket_owners_on(1)
}

/// `socket_owners` with the /proc walk spread over `threads` threads. The walk is a
/// readlink per fd: with 100k sockets it took about 0.7 s on one thread here, the largest
/// part of a start-up that must not keep conflicts from being reported. Each thread takes the
/// next unwalked pid, so one process with most of the fds does not hold the others up; the
/// result is the same as with one thread (the lowest pid wins, whatever the order).
pub fn socket_owners_on(threads: usize) -> HashMap<u64, Arc<Owner>> {
    let pids: Vec<u32> = pids().collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let walk = || {
        let mut found: Vec<(Arc<Owner>, Vec<u64>)> = Vec::new();
        let mut inodes = Vec::new();
        let mut text = String::new();
        while let Some(&pid) = pids.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
            inodes.clear();
            socket_inodes(pid, &mut inodes);
            if inodes.is_empty() {
                continue;
            }
            let Some((comm, uid)) = comm_and_uid(pid, &mut text) else {
                continue;
            };
            let owner = Arc::new(Owner {
                pid,
                comm: comm.into(),
                cmdline: None,
                uid,
            });
            found.push((owner, std::mem::take(&mut inodes)));
        }
        found
    };
    let found: Vec<(Arc<Owner>, Vec<u64>)> = if threads <= 1 {
        walk()
    } else {
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(walk)).collect();
            let mut all = walk();
            for h in helpers {
                // A helper that panicked walked part of /proc: its pids are missing, which is
                // what a process exiting mid-walk looks like too.
                if let Ok(mut f) = h.join() {
                    all.append(&mut f);
                }
            }
            all
        })
    };
    let mut owners: HashMap<u64, Arc<Owner>> =
        HashMap::with_capacity(found.iter().map(|(_, i)| i.len()).sum());
    for (owner, inodes) in found {
        for inode in inodes {
            match owners.entry(inode) {
                Entry::Vacant(v) => {
                    v.insert(owner.clone());
                }
                Entry::Occupied(mut o) if o.get().pid > owner.pid => {
                    *o.get_mut() = owner.clone();
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    owners
}

/// The lowest and highest port of an `ip_local_port_range`.
pub type PortRange = (u16, u16);

/// `net.ipv4.ip_local_port_range` of a namespace, e.g. (32768, 60999): the ports `connect`
/// and `bind(port 0)` pick from there.
pub fn local_port_range(ns: &Namespace) -> io::Result<(u16, u16)> {
    in_namespace(ns, "reading ip_local_port_range", local_port_range_here)
}

/// One re-read of a namespace: its sockets, its ephemeral range, and which of `dsts` it has
/// no source address for. All three are taken inside one entry into the namespace, so a
/// path that stops leading there (its thread exited) cannot leave the dump without the
/// probes.
pub struct NsRead {
    pub entries: Vec<SockEntry>,
    pub range: Option<PortRange>,
    /// Destinations the namespace has no source address for (see [`source_available_here`]).
    pub no_source: Vec<std::net::SocketAddr>,
}

pub fn dump_with_sources(ns: &Namespace, dsts: Vec<std::net::SocketAddr>) -> io::Result<NsRead> {
    let inode = ns.inode;
    in_namespace(ns, "sock_diag dump", move || {
        let entries = dump_here(inode, Vec::new())?;
        let no_source = dsts
            .into_iter()
            .filter(|d| source_available_here(*d).ok() == Some(false))
            .collect();
        Ok(NsRead {
            entries,
            range: local_port_range_here().ok(),
            no_source,
        })
    })
}

/// The range of the namespace this thread is in: /proc/sys/net resolves against the
/// reading task's namespace.
fn local_port_range_here() -> io::Result<(u16, u16)> {
    let text = std::fs::read_to_string(PORT_RANGE)?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{PORT_RANGE} holds {text:?}, not two port numbers"),
        )),
    }
}

/// Whether the namespace this thread is in has a source address for `dst`: a UDP connect()
/// picks the route and source address the way TCP's does, without sending anything, and
/// fails with EADDRNOTAVAIL exactly when there is none (e.g. ::1 not configured). That tells
/// a connect's EADDRNOTAVAIL apart: no source address, or no free port.
fn source_available_here(dst: std::net::SocketAddr) -> io::Result<bool> {
    let any: std::net::SocketAddr = if dst.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    match s.connect(dst) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs `f` in namespace `ns`: on the calling thread when it already is there, else on a
/// dedicated thread that enters it first and exits afterwards. Errors name the action and
/// the namespace.
fn in_namespace<T, F>(ns: &Namespace, what: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let on = |e: io::Error, step: &dyn Display| {
        io::Error::new(
            e.kind(),
            format!(
                "{what} of netns {} ({}): {step}: {e}",
                ns.inode,
                ns.path.display()
            ),
        )
    };
    let here = std::fs::metadata(THREAD_NS).map_err(|e| on(e, &"reading our own netns"))?;
    if here.ino() == u64::from(ns.inode) {
        return f().map_err(|e| on(e, &"failed"));
    }
    let file = File::open(&ns.path).map_err(|e| {
        let e = if e.raw_os_error() == Some(libc::ESRCH) {
            io::Error::new(io::ErrorKind::NotFound, e)
        } else {
            e
        };
        on(e, &"opening the namespace")
    })?;
    let now = file.metadata().map_err(|e| on(e, &"stat"))?.ino();
    if now != u64::from(ns.inode) {
        // The pid exited and was reused by a process elsewhere: this path no longer leads
        // to the namespace the caller means.
        return Err(on(
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("path now leads to netns {now}"),
            ),
            &"namespace gone",
        ));
    }
    let worker = std::thread::Builder::new()
        .name("pw-netns".into())
        .spawn(move || -> io::Result<T> {
            // setns changes only this thread, which exits when `f` returns.
            if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                return Err(io::Error::other(format!("entering it: {e}")));
            }
            drop(file);
            f()
        })
        .map_err(|e| on(e, &"starting a thread to enter it"))?;
    match worker.join() {
        Ok(r) => r.map_err(|e| on(e, &"failed")),
        Err(_) => Err(on(io::Error::other("thread panicked"), &"failed")),
    }
}

/// Process ids under /proc (thread groups; threads share their leader's fds).
fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// Appends the inode of every socket among `pid`'s fds. Uses readdir/readlinkat on the fd
/// directory so that a process with 100k sockets costs 100k syscalls and no allocations.
fn socket_inodes(pid: u32, out: &mut Vec<u64>) {
    let mut path = [0u8; 32];
    let mut w = &mut path[..];
    if io::Write::write_fmt(&mut w, format_args!("/proc/{pid}/fd\0")).is_err() {
        return;
    }
    let Ok(path) = CStr::from_bytes_until_nul(&path) else {
        return;
    };
    let Some(mut dir) = Dir::open(path) else {
        return;
    };
    let fd = dir.fd();
    let mut link = [0u8; 64];
    while let Some(name) = dir.next() {
        // SAFETY: `name` is NUL-terminated and the fd belongs to the open directory; the
        // buffer pointer and length describe `link`.
        let n =
            unsafe { libc::readlinkat(fd, name.as_ptr(), link.as_mut_ptr().cast(), link.len()) };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        if let Some(inode) = link[..n]
            .strip_prefix(b"socket:[")
            .and_then(|s| s.strip_suffix(b"]"))
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse().ok())
        {
            out.push(inode);
        }
    }
}

/// comm and effective uid of `pid`, or None if it exited.
fn comm_and_uid(pid: u32, text: &mut String) -> Option<(String, u32)> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let comm = comm.strip_suffix('\n').unwrap_or(&comm).to_owned();
    text.clear();
    File::open(format!("/proc/{pid}/status"))
        .ok()?
        .read_to_string(text)
        .ok()?;
    // "Uid:\treal\teffective\tsaved\tfs"
    let uid = text
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((comm, uid))
}

/// A directory stream that yields entry names without allocating.
struct Dir(std::ptr::NonNull<libc::DIR>);

impl Dir {
    fn open(path: &CStr) -> Option<Self> {
        // SAFETY: `path` is NUL-terminated.
        let dir = unsafe { libc::opendir(path.as_ptr()) };
        std::ptr::NonNull::new(dir).map(Self)
    }

    fn fd(&self) -> libc::c_int {
        // SAFETY: the stream is open until drop.
        unsafe { libc::dirfd(self.0.as_ptr()) }
    }

    /// Next name other than "." and ".."; the name is valid until the next call.
    fn next(&mut self) -> Option<&CStr> {
        loop {
            // SAFETY: the stream is open. readdir's entry stays valid until the next readdir
            // on this stream, which `&mut self` rules out while the name is borrowed.
            let ent = unsafe { libc::readdir64(self.0.as_ptr()) };
            if ent.is_null() {
                return None;
            }
            // SAFETY: d_name is a NUL-terminated array inside the entry.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if name != c"." && name != c".." {
                return Some(name);
            }
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: opened by opendir and closed only here.
        unsafe { libc::closedir(self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests;
