//! Reconciliation: a namespace's sock_diag dump merged into the table (what events missed
//! healed and counted, what they knew kept), and namespaces that are gone pruned.

use super::*;

/// One namespace's sockets from sock_diag, already in the table's layout (buckets by port,
/// owners looked up, TIME_WAIT expiries sorted). Built off the processing thread, so that
/// `PortTable::reconcile` only has to match it against the table and swap it in.
#[derive(Default)]
pub struct NsSockets {
    netns: u32,
    /// When the dump was taken: TIME_WAIT expiries count from there.
    wall_ns: i128,
    ports: HashMap<Key, Bucket>,
    tw: HashMap<(u32, u16), TwBucket>,
}

impl NsSockets {
    pub fn new(netns: u32, wall_ns: i128) -> NsSockets {
        NsSockets {
            netns,
            wall_ns,
            ..Default::default()
        }
    }

    /// All of a dump at once; `owners` maps a socket inode to the process holding it.
    pub fn build(
        netns: u32,
        entries: &[crate::host::diag::SockEntry],
        owners: &dyn Fn(u64) -> Option<Arc<Owner>>,
        wall_ns: i128,
    ) -> NsSockets {
        let mut s = NsSockets::new(netns, wall_ns);
        for d in entries {
            s.push(d, owners);
        }
        s.finish();
        s
    }

    /// One socket of the dump, as it is read.
    pub fn push(
        &mut self,
        d: &crate::host::diag::SockEntry,
        owners: &dyn Fn(u64) -> Option<Arc<Owner>>,
    ) {
        if d.proto == Proto::Tcp && d.state == TCP_TIME_WAIT {
            let exp = self.wall_ns + i128::from(d.expires_ms) * 1_000_000;
            let b = self.tw.entry((self.netns, d.local.port())).or_default();
            match b.iter_mut().find(|(a, _)| *a == d.local.ip()) {
                Some((_, q)) => q.push_back(exp),
                None => b.push((d.local.ip(), VecDeque::from([exp]))),
            }
            return;
        }
        let owner = if d.inode != 0 { owners(d.inode) } else { None };
        self.ports
            .entry((self.netns, d.proto, d.local.port()))
            .or_default()
            .push(Entry::from_diag(d, owner));
    }

    /// After the last `push`.
    pub fn finish(&mut self) {
        for q in self.tw.values_mut().flatten().map(|(_, q)| q) {
            q.make_contiguous().sort_unstable();
        }
        // A Vec's first push reserves room for 4 entries; most buckets hold one socket
        // (a connection's own ephemeral port), so this halves the table's size.
        for b in self.ports.values_mut() {
            b.shrink_to_fit();
        }
    }

    /// The sockets other than TIME_WAIT.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> + Clone {
        self.ports.values().flatten()
    }
}

/// Buckets up to this size are matched by a linear scan; bigger ones (a listener's port
/// with thousands of accepted connections) through an index, or a reconciliation would be
/// quadratic in them.
const SCAN_MAX: usize = 16;

/// Matches a snapshot's bucket against the table's old one for the same key: each snapshot
/// entry that is a socket the table had takes over what the table knew (`carry_from`).
/// A socket matches by inode, else by address (an entry from events has no inode).
/// Returns (snapshot entries the table lacked, old entries that no longer exist).
/// Whether a row the table has without `sk` can be the socket an event of `pid` names: its
/// owner is that process, or unknown (a dump whose /proc walk ran before the socket was
/// made, e.g. in a namespace born during the pass). Adopting the ownerless row keeps one
/// row per socket, with the owner the event knows.
pub(super) fn owned_by(x: &Entry, pid: Option<u32>) -> bool {
    match &x.owner {
        Some(o) => Some(o.pid) == pid,
        None => true,
    }
}

fn merge_bucket(old: Bucket, new: &mut [Entry]) -> (u64, u64) {
    let mut old: Vec<Option<Entry>> = old.into_iter().map(Some).collect();
    let mut added = 0u64;
    if old.len() <= SCAN_MAX {
        for e in new.iter_mut() {
            let by_inode = || {
                old.iter().position(|x| {
                    x.as_ref()
                        .is_some_and(|x| x.inode != 0 && x.inode == e.inode)
                })
            };
            let key = e.addr_key();
            let by_addr = || {
                old.iter()
                    .position(|x| x.as_ref().is_some_and(|x| x.addr_key() == key))
            };
            match by_inode().or_else(by_addr).and_then(|i| old[i].take()) {
                Some(p) => e.carry_from(p),
                None => added += 1,
            }
        }
    } else {
        let mut by_inode: HashMap<u32, usize> = HashMap::with_capacity(old.len());
        for (i, x) in old.iter().enumerate() {
            if let Some(x) = x.as_ref().filter(|x| x.inode != 0) {
                by_inode.entry(x.inode).or_insert(i);
            }
        }
        // Sorted by address, built only if some entry is not found by its inode.
        let mut by_addr: Option<Vec<(AddrKey, usize)>> = None;
        for e in new.iter_mut() {
            let mut hit = (e.inode != 0)
                .then(|| by_inode.get(&e.inode).copied())
                .flatten()
                .filter(|&i| old[i].is_some());
            if hit.is_none() {
                let idx = by_addr.get_or_insert_with(|| {
                    let mut v: Vec<(AddrKey, usize)> = old
                        .iter()
                        .enumerate()
                        .filter_map(|(i, x)| Some((x.as_ref()?.addr_key(), i)))
                        .collect();
                    v.sort_unstable();
                    v
                });
                let key = e.addr_key();
                let from = idx.partition_point(|(k, _)| *k < key);
                hit = idx[from..]
                    .iter()
                    .take_while(|(k, _)| *k == key)
                    .map(|(_, i)| *i)
                    .find(|&i| old[i].is_some());
            }
            match hit.and_then(|i| old[i].take()) {
                Some(p) => e.carry_from(p),
                None => added += 1,
            }
        }
    }
    (added, vanished(old.iter().flatten()))
}

/// Old entries that reconciliation did not find again, as drift. A TIME_WAIT entry that
/// is gone simply expired.
fn vanished<'a>(old: impl Iterator<Item = &'a Entry>) -> u64 {
    old.filter(|x| x.state != TCP_TIME_WAIT).count() as u64
}

impl PortTable {
    /// Replace one namespace's entries with a sock_diag snapshot. What events told us about a
    /// socket (owner, since, sk) is kept when the snapshot has the same socket; new sockets
    /// keep the owner the snapshot found for them. Returns the number of entries healed:
    /// sockets the table lacked plus sockets it had that no longer exist.
    pub fn reconcile(&mut self, snap: NsSockets) -> u64 {
        let netns = snap.netns;
        let mut old: HashMap<Key, Bucket> = HashMap::new();
        self.ports.retain(|k, b| {
            if k.0 == netns {
                old.insert(*k, std::mem::take(b));
                false
            } else {
                true
            }
        });
        // TIME_WAIT: the snapshot is the truth, events since then are re-added by the kernel's
        // next entries.
        self.tw.retain(|k, _| k.0 != netns);
        self.tw.extend(snap.tw);
        let mut healed = 0u64;
        self.ports.reserve(snap.ports.len());
        for (key, mut b) in snap.ports {
            healed += match old.remove(&key) {
                Some(o) => {
                    let (added, gone) = merge_bucket(o, &mut b);
                    added + gone
                }
                None => b.len() as u64,
            };
            self.ports.insert(key, b);
        }
        // What the table had but the kernel no longer does.
        healed += vanished(old.values().flatten());
        self.drift_healed += healed;
        healed
    }

    /// Forget namespaces that no longer exist: `live` is every namespace a pass that began at
    /// `as_of` (wall ns) found. Entries an event added after that may belong to a namespace
    /// made since, and stay. Without this, sockets of a dead namespace (brought back by a
    /// dump that raced its last exit) would stay forever, and show up as holders in a new
    /// namespace that reuses the inode number. Returns the namespaces dropped.
    pub fn prune_namespaces(
        &mut self,
        live: &std::collections::HashSet<u32>,
        as_of: i128,
    ) -> Vec<u32> {
        let mut dropped = std::collections::BTreeSet::new();
        self.ports.retain(|k, b| {
            if live.contains(&k.0) {
                return true;
            }
            b.retain(|x| i128::from(x.since_ns) >= as_of);
            if b.is_empty() {
                dropped.insert(k.0);
                false
            } else {
                true
            }
        });
        self.tw.retain(|k, _| {
            let keep = live.contains(&k.0);
            if !keep {
                dropped.insert(k.0);
            }
            keep
        });
        dropped.into_iter().collect()
    }
}
