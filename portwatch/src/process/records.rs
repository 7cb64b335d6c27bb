//! Records the processing thread writes itself: `agent`, `time_wait` and `pressure`.

use portwatch_schema::{PortCount, RemoteCount};

/// `type: "agent"`: lifecycle of the agent itself.
pub type AgentRecord = portwatch_schema::Agent;

pub(super) trait Counted {
    fn count(&self) -> u64;
}

impl Counted for PortCount {
    fn count(&self) -> u64 {
        self.count
    }
}

impl Counted for RemoteCount {
    fn count(&self) -> u64 {
        self.count
    }
}

/// The `n` largest, largest first; the record stays bounded however many ports there are.
pub(super) fn top_n<T: Counted>(it: impl Iterator<Item = T>, n: usize) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.count()));
    v.truncate(n);
    v
}
