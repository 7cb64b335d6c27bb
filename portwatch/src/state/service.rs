//! Service ports: when a port starts or stops being held, for `port` records and
//! `portwatch history`.
//!
//! A service port is a TCP listener, or a UDP socket bound to an explicit port. Ports bound
//! to 0 (the kernel picks an ephemeral one) and the client side of connections are not.
//!
//! Flapping is coalesced: a close is held for `FLAP_NS`; if the same (namespace, protocol,
//! address, port) is opened again within it, neither the close nor the new open is
//! written. The service goes on as one, its actor becomes the new process, and its
//! `restarts` counts the cycles absorbed, so a service restarting a hundred times a second
//! writes one `open`, and one `close` with `restarts` when it finally stops.
//!
//! Pure bookkeeping (no I/O, callers pass wall-clock ns), tested without a kernel.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::state::table::{Owner, Proto};

/// How long a close waits for a reopen before it is written.
pub const FLAP_NS: i128 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub netns: u32,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct Service {
    /// Kernel socket address (0 when only sock_diag saw it).
    pub sk: u64,
    pub owner: Option<Arc<Owner>>,
    pub cgroup_id: u64,
    /// Wall ns of the open (the first one, across coalesced restarts).
    pub opened_ns: i128,
    /// Open/close cycles coalesced into this service.
    pub restarts: u64,
    /// Already held when the agent started (or found by sock_diag, not by an event).
    pub existing: bool,
}

/// Why a service stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// close() of its socket.
    Close,
    /// Its socket vanished: the process exited or was killed, or its container stopped;
    /// a re-read of the namespace showed it gone.
    Gone,
}

impl Why {
    pub fn name(self) -> &'static str {
        match self {
            Why::Close => "close",
            Why::Gone => "gone",
        }
    }
}

#[derive(Debug)]
pub enum Change {
    Open(Key, Service),
    Close {
        key: Key,
        service: Service,
        at_ns: i128,
        why: Why,
    },
}

struct Closing {
    key: Key,
    service: Service,
    at_ns: i128,
    why: Why,
}

#[derive(Default)]
pub struct Services {
    open: HashMap<Key, Vec<Service>>,
    closing: Vec<Closing>,
    /// Open/close cycles absorbed since start.
    pub coalesced: u64,
}

impl Services {
    /// A service port was opened. Returns the `open` to write, or None when it resumes a
    /// service that closed less than `FLAP_NS` ago.
    pub fn open(&mut self, key: Key, mut s: Service) -> Option<Change> {
        let list = self.open.entry(key).or_default();
        if s.sk != 0 && list.iter().any(|x| x.sk == s.sk) {
            return None; // already known (a listen after its bind, say)
        }
        // A dump saw the socket before its event was processed (a namespace re-read between
        // the listen and its event): the open is written already; the event names the socket.
        let pid = |o: &Option<Arc<Owner>>| o.as_ref().map(|o| o.pid);
        if s.sk != 0 {
            if let Some(x) = list
                .iter_mut()
                .find(|x| x.sk == 0 && (x.owner.is_none() || pid(&x.owner) == pid(&s.owner)))
            {
                x.sk = s.sk;
                if x.owner.is_none() {
                    x.owner = s.owner;
                }
                return None;
            }
        }
        if let Some(i) = self.closing.iter().position(|c| c.key == key) {
            let c = self.closing.swap_remove(i);
            s.opened_ns = c.service.opened_ns;
            s.restarts = c.service.restarts + 1;
            s.existing = c.service.existing;
            self.coalesced += 1;
            self.open.entry(key).or_default().push(s);
            return None;
        }
        list.push(s.clone());
        Some(Change::Open(key, s))
    }

    /// close() of socket `sk` (or, without it, the socket `pid` held) on `port`.
    pub fn close(&mut self, netns: u32, proto: Proto, port: u16, sk: u64, pid: u32, at_ns: i128) {
        let keys: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.netns == netns && k.proto == proto && k.port == port)
            .copied()
            .collect();
        for key in keys {
            self.take_where(key, at_ns, Why::Close, |s| {
                if sk != 0 && s.sk != 0 {
                    s.sk == sk
                } else {
                    s.owner.as_ref().is_some_and(|o| o.pid == pid)
                }
            });
        }
    }

    /// The namespace was re-read at `as_of_ns`: services opened before it whose socket is
    /// not among `alive` are gone. `alive` says whether (key, sk) still exists.
    pub fn check(&mut self, netns: u32, as_of_ns: i128, alive: &dyn Fn(&Key, u64) -> bool) {
        let keys: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.netns == netns)
            .copied()
            .collect();
        for key in keys {
            self.take_where(key, as_of_ns, Why::Gone, |s| {
                s.opened_ns < as_of_ns && !alive(&key, s.sk)
            });
        }
    }

    fn take_where(&mut self, key: Key, at_ns: i128, why: Why, pick: impl Fn(&Service) -> bool) {
        let Some(list) = self.open.get_mut(&key) else {
            return;
        };
        let (gone, stay): (Vec<Service>, Vec<Service>) =
            std::mem::take(list).into_iter().partition(|s| pick(s));
        *list = stay;
        if list.is_empty() {
            self.open.remove(&key);
        }
        for service in gone {
            self.closing.push(Closing {
                key,
                service,
                at_ns,
                why,
            });
        }
    }

    /// Closes whose flap window is over at `now_ns` (all of them with `all`).
    pub fn due(&mut self, now_ns: i128, all: bool) -> Vec<Change> {
        let (out, keep): (Vec<Closing>, Vec<Closing>) = std::mem::take(&mut self.closing)
            .into_iter()
            .partition(|c| all || c.at_ns + FLAP_NS <= now_ns);
        self.closing = keep;
        out.into_iter()
            .map(|c| Change::Close {
                key: c.key,
                service: c.service,
                at_ns: c.at_ns,
                why: c.why,
            })
            .collect()
    }

    pub fn is_open(&self, key: &Key) -> bool {
        self.open.contains_key(key)
    }

    /// Namespaces where a service of `pid` is open.
    pub fn namespaces_of(&self, pid: u32) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, l)| {
                l.iter()
                    .any(|s| s.owner.as_ref().is_some_and(|o| o.pid == pid))
            })
            .map(|(k, _)| k.netns)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn len(&self) -> usize {
        self.open.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i128 = 1_000_000_000;

    fn key(port: u16) -> Key {
        Key {
            netns: 1,
            proto: Proto::Tcp,
            addr: "0.0.0.0".parse().unwrap(),
            port,
        }
    }

    fn svc(pid: u32, sk: u64, at: i128) -> Service {
        Service {
            sk,
            owner: Some(Arc::new(Owner {
                pid,
                comm: "srv".into(),
                cmdline: None,
                uid: 0,
            })),
            cgroup_id: 0,
            opened_ns: at,
            restarts: 0,
            existing: false,
        }
    }

    /// The dump saw the listener first: its event is the same service, not a second open.
    #[test]
    fn an_event_after_the_dump_that_saw_its_socket_is_no_second_open() {
        let mut s = Services::default();
        let mut seen = svc(7, 0, S);
        seen.existing = true;
        assert!(s.open(key(80), seen).is_some());
        assert!(s.open(key(80), svc(7, 0xabc, S + 1)).is_none());
        assert_eq!(s.len(), 1);
        // Another process's socket on the same address (SO_REUSEPORT) is its own service.
        assert!(s.open(key(80), svc(8, 0xdef, S + 2)).is_some());
    }

    #[test]
    fn open_then_close_writes_both_after_the_flap_window() {
        let mut s = Services::default();
        assert!(matches!(
            s.open(key(80), svc(1, 10, 0)),
            Some(Change::Open(..))
        ));
        s.close(1, Proto::Tcp, 80, 10, 1, 5 * S);
        assert!(s.due(5 * S + S / 2, false).is_empty(), "held for a reopen");
        let c = s.due(6 * S, false);
        assert_eq!(c.len(), 1);
        match &c[0] {
            Change::Close {
                service,
                at_ns,
                why,
                ..
            } => {
                assert_eq!(*at_ns, 5 * S);
                assert_eq!(*why, Why::Close);
                assert_eq!(service.opened_ns, 0);
            }
            Change::Open(..) => panic!("expected a close"),
        }
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn a_hundred_restarts_a_second_write_one_open_and_one_close() {
        let mut s = Services::default();
        let mut written = 0;
        for i in 0..100u64 {
            let t = i128::from(i) * S / 100;
            if s.open(key(80), svc(100 + i as u32, 1000 + i, t)).is_some() {
                written += 1;
            }
            s.close(1, Proto::Tcp, 80, 1000 + i, 100 + i as u32, t + S / 200);
            written += s.due(t + S / 200, false).len();
        }
        let last = s.due(10 * S, true);
        assert_eq!(written, 1, "only the first open");
        assert_eq!(last.len(), 1);
        match &last[0] {
            Change::Close { service, .. } => {
                assert_eq!(service.restarts, 99);
                assert_eq!(service.opened_ns, 0);
                assert_eq!(service.owner.as_ref().unwrap().pid, 199, "the latest actor");
            }
            Change::Open(..) => panic!("expected a close"),
        }
        assert_eq!(s.coalesced, 99);
    }

    #[test]
    fn vanished_sockets_close_but_newer_ones_stay() {
        let mut s = Services::default();
        s.open(key(80), svc(1, 10, 0));
        s.open(key(81), svc(1, 11, 0));
        s.open(key(82), svc(2, 12, 3 * S));
        // A dump at 2 s: 80 is gone, 81 alive; 82 was opened after the dump began.
        s.check(1, 2 * S, &|k, _| k.port == 81);
        let c = s.due(10 * S, true);
        assert_eq!(c.len(), 1);
        assert!(matches!(&c[0], Change::Close { key, why: Why::Gone, .. } if key.port == 80));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn close_by_pid_when_the_socket_is_unknown() {
        let mut s = Services::default();
        s.open(key(80), svc(7, 0, 0));
        s.open(key(80), svc(8, 0, 0));
        s.close(1, Proto::Tcp, 80, 0, 8, S);
        assert_eq!(s.len(), 1);
        assert_eq!(s.namespaces_of(7), vec![1]);
        assert!(s.namespaces_of(8).is_empty());
    }

    #[test]
    fn a_listen_after_its_bind_is_not_a_second_open() {
        let mut s = Services::default();
        assert!(s.open(key(80), svc(1, 10, 0)).is_some());
        assert!(s.open(key(80), svc(1, 10, 1)).is_none());
        assert_eq!(s.len(), 1);
    }
}
