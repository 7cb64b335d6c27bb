//! The control protocol: what a client may ask the agent (JSON lines, one request per
//! connection) and the rows it gets back. Shared by the server (`control`), the processing
//! thread that answers, and the clients (`cli`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const DEFAULT_RUNTIME_DIR: &str = "/run/portwatch";

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("portwatch.sock")
}

/// What an attach or ports request selects. Empty matches everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Filter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.port.is_none() && self.pid.is_none() && self.container.is_none()
    }

    /// Does a record (one JSON object read back) match? See `matches_keys`. Readers take
    /// keys from the typed record (`Keys::of_record`); this form is for tests.
    #[cfg(test)]
    pub fn matches(&self, v: &Value) -> bool {
        self.is_empty() || self.matches_keys(&crate::output::keys::Keys::from_value(v))
    }

    /// Does a record match, by its keys? Agent, lost and missed records always do: an
    /// attached user must learn about lost events and the agent's state whatever the filter.
    pub fn matches_keys(&self, k: &crate::output::keys::Keys) -> bool {
        if self.is_empty() || matches!(k.ty, "agent" | "lost" | "missed") {
            return true;
        }
        if self.port.is_some_and(|p| !k.ports.contains(&p)) {
            return false;
        }
        if self.pid.is_some_and(|p| !k.pids.contains(&p)) {
            return false;
        }
        if let Some(c) = &self.container {
            let is = |n: &std::sync::Arc<crate::model::ContainerRef>| {
                &*n.name == c.as_str() || (!c.is_empty() && n.id.starts_with(c.as_str()))
            };
            if !k.containers.iter().any(is) {
                return false;
            }
        }
        true
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Attach {
        #[serde(default)]
        filter: Filter,
        /// Replay this many seconds of the recent past first.
        #[serde(default)]
        since_s: u64,
    },
    Ports {
        #[serde(default)]
        filter: Filter,
    },
    Status,
    /// The containers publishing host port `port`, each judged reachable or not.
    Published {
        port: u16,
    },
}

/// One row of the port table, as `portwatch ports` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortRow {
    pub proto: String,
    pub addr: String,
    pub port: u16,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    pub netns: u32,
    /// TIME_WAIT rows stand for this many sockets on the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// A published port's socket that no container the engines know runs or starts with:
    /// left behind (see the `docker_stale` cause).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale: Option<bool>,
}

impl PortRow {
    /// The container and staleness parts of a row, from where its owner stands.
    pub fn placed(p: Option<crate::state::table::Placement>) -> PortRow {
        PortRow {
            proto: String::new(),
            addr: String::new(),
            port: 0,
            state: String::new(),
            pid: None,
            comm: None,
            container: p
                .as_ref()
                .and_then(|p| p.container.as_ref())
                .map(|c| c.name.to_string()),
            netns: 0,
            count: None,
            stale: p.and_then(|p| p.stale.then_some(true)),
        }
    }
}
/// What the control server asks the processing thread, which answers on the channel each
/// request carries. The server only knows this type; the processing thread's own message
/// wraps it (`From<Query>`), so the control stage does not depend on the processing one.
pub enum Query {
    /// `portwatch attach`: replay the matching recent past, then stream live records.
    Attach {
        filter: Filter,
        since_s: u64,
        live: tokio::sync::mpsc::Sender<std::sync::Arc<[u8]>>,
        replay: tokio::sync::oneshot::Sender<Vec<std::sync::Arc<[u8]>>>,
    },
    /// `portwatch ports`: the current port table.
    Ports {
        filter: Filter,
        reply: tokio::sync::oneshot::Sender<Vec<PortRow>>,
    },
    Status {
        reply: tokio::sync::oneshot::Sender<Value>,
    },
    /// `check P`: the containers publishing host port P, and whether their mapping reaches
    /// a listener.
    Published {
        port: u16,
        reply: tokio::sync::oneshot::Sender<Vec<crate::engines::reach::Published>>,
    },
}
