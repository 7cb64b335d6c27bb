//! The control protocol: what a client may ask the agent (JSON lines, one request per
//! connection) and the rows it gets back. Shared by the server (`control`), the processing
//! thread that answers, and the clients (`ops`, `tail`).

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

    /// Does a record (one JSON object) match? Agent and lost records always do: an attached
    /// user must learn about lost events and the agent's state whatever the filter.
    pub fn matches(&self, v: &Value) -> bool {
        if self.is_empty() || v["type"] == "agent" || v["type"] == "lost" || v["type"] == "missed" {
            return true;
        }
        let holders = v["holders"].as_array();
        let any_holder = |f: &dyn Fn(&Value) -> bool| holders.is_some_and(|h| h.iter().any(f));
        if let Some(p) = self.port {
            let ok = v["port"] == p
                || v["rport"] == p
                || v["destination"]["port"] == p
                || any_holder(&|h| h["port"] == p)
                || v["ports"]
                    .as_array()
                    .is_some_and(|ps| ps.iter().any(|x| x["host_port"] == p));
            if !ok {
                return false;
            }
        }
        if let Some(pid) = self.pid {
            let ok = v["actor"]["pid"] == pid
                || v["context_pid"] == pid
                || any_holder(&|h| h["pid"] == pid);
            if !ok {
                return false;
            }
        }
        if let Some(c) = &self.container {
            let is = |x: &Value| {
                x["name"].as_str() == Some(c.as_str())
                    || x["id"]
                        .as_str()
                        .is_some_and(|id| !c.is_empty() && id.starts_with(c.as_str()))
            };
            let ok = is(&v["actor"]["container"])
                || is(&v["container"])
                || any_holder(&|h| is(&h["container"]));
            if !ok {
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
    pub fn placed(p: Option<crate::table::Placement>) -> PortRow {
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
