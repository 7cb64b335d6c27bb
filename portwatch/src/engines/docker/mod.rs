//! The Docker join: a thread of its own that keeps a container index from the daemon's
//! list, inspect and event stream, and sends every change to the processing thread as a
//! message. The processing thread never talks to the daemon: a slow or absent daemon can
//! delay container names, never a record.
//!
//! Connection: `--docker-host`, else `DOCKER_HOST`, else `unix:///var/run/docker.sock`; the
//! API version is negotiated (Debian's Docker 20.10 speaks 1.41). Without a daemon the
//! agent runs as before, says `unavailable` once, and retries with a backoff capped at 1 s,
//! so a daemon that comes back is joined within a few seconds.
//!
//! Sync without gaps: the event stream is read from the moment just before the list, so a
//! change during the sync is replayed rather than lost. Replays are harmless: every
//! lifecycle record goes through a per-container state (`announced`), so each start, die
//! and destroy is written once, whether it came live, replayed, or was found missing at a
//! resync.

mod convert;
mod events;

use convert::*;

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bollard::{
    models::{
        ContainerInspectResponse, ContainerStateStatusEnum, EventMessage, EventMessageTypeEnum,
    },
    query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions},
    Docker, API_DEFAULT_VERSION,
};
use futures_util::{stream, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::{
    engines::containers::{
        port_map, CgroupMode, Connected, Container, ContainerRef, DockerMsg, Lifecycle, Network,
        PortMap, State, COMPOSE_PROJECT, COMPOSE_SERVICE,
    },
    error::{DockerError, Error},
    kernel::decode::Clock,
};

pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";
/// Per request (not for the event stream, which stays open).
const REQUEST_TIMEOUT_S: u64 = 10;
/// Inspects in flight during a sync, and ahead of the event loop.
const PARALLEL: usize = 8;
/// How long a container that never ran may take to show why its start failed.
const START_ERROR_WAIT: Duration = Duration::from_secs(3);

/// `PORTWATCH_TRACE_DOCKER=1`: every event and decision on stderr, for debugging the join.
fn trace(args: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("PORTWATCH_TRACE_DOCKER").is_some_and(|v| v != "0")) {
        eprintln!("portwatch: docker: {args}");
    }
}

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// `--docker-host`, else `DOCKER_HOST`, else the default socket. A bare path is a Unix
/// socket.
pub fn endpoint(flag: Option<&str>) -> Result<Endpoint, Error> {
    let env = std::env::var("DOCKER_HOST").ok().filter(|s| !s.is_empty());
    let given = flag
        .map(str::to_string)
        .or(env)
        .unwrap_or_else(|| DEFAULT_HOST.into());
    if let Some(p) = given.strip_prefix("unix://") {
        Ok(Endpoint::Unix(p.into()))
    } else if given.starts_with('/') {
        Ok(Endpoint::Unix(given.into()))
    } else if given.starts_with("tcp://") || given.starts_with("http://") {
        Ok(Endpoint::Tcp(given))
    } else {
        Err(Error::DockerHost { given })
    }
}

/// Podman's Docker-compatible API, as `podman system service` serves it for root.
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// The engines `run` joins: each `--docker-host`; without any, the default one (`endpoint`)
/// and Podman's socket when it exists.
pub fn endpoints(flags: &[String]) -> Result<Vec<Endpoint>, Error> {
    if !flags.is_empty() {
        let mut out = Vec::new();
        for f in flags {
            let ep = endpoint(Some(f))?;
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
        return Ok(out);
    }
    let mut out = vec![endpoint(None)?];
    let podman = Endpoint::Unix(PODMAN_SOCKET.into());
    if Path::new(PODMAN_SOCKET).exists() && !out.contains(&podman) {
        out.push(podman);
    }
    Ok(out)
}

pub(crate) fn connect(ep: &Endpoint) -> Result<Docker, bollard::errors::Error> {
    match ep {
        Endpoint::Unix(p) => {
            Docker::connect_with_unix(&p.to_string_lossy(), REQUEST_TIMEOUT_S, API_DEFAULT_VERSION)
        }
        Endpoint::Tcp(a) => Docker::connect_with_http(a, REQUEST_TIMEOUT_S, API_DEFAULT_VERSION),
    }
}

fn now_ns() -> i128 {
    Clock::now_wall_ns()
}

/// What the Docker thread remembers of one container between events.
struct Tracked {
    c: Arc<Container>,
    /// The last lifecycle record written says it runs.
    announced_running: bool,
}

/// What an inspect needs; cloned into the futures that inspect ahead of the event loop.
#[derive(Clone)]
struct Inspector {
    docker: Docker,
    engine: Engine,
    proc_root: PathBuf,
    cgroup2: Option<PathBuf>,
}

/// What the daemon said about an event's container, fetched ahead of the event loop.
type Inspected = Option<(Arc<Container>, Option<String>)>;

impl Inspector {
    /// The container and, if its last start failed, why (`State.Error`). None when it is
    /// gone already (removed between event and inspect, or a 404).
    async fn inspect(&self, id: &str) -> Inspected {
        let r = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .ok()?;
        let c = container_from(&r, &self.proc_root, self.cgroup2.as_deref(), &self.engine)?;
        let error = r.state.and_then(|s| s.error).filter(|e| !e.is_empty());
        Some((Arc::new(c), error))
    }

    /// The inspect an event needs, if any. Runs ahead of the event loop, several at a
    /// time: on a busy daemon an inspect takes tens of milliseconds, and a burst of starts
    /// would otherwise queue them one after another.
    async fn prepare(&self, ev: &EventMessage) -> Inspected {
        let action = ev.action.as_deref().unwrap_or("");
        match ev.typ {
            Some(EventMessageTypeEnum::CONTAINER) => match action {
                "create" | "rename" | "update" | "start" => {
                    self.inspect(ev.actor.as_ref()?.id.as_deref()?).await
                }
                _ => None,
            },
            // A connect is mostly part of a start, and the start event that follows is
            // inspected; a running container that joins another network is seen with it at
            // its next inspect. Attribution does not depend on it.
            Some(EventMessageTypeEnum::NETWORK) if action == "disconnect" => {
                let id = ev.actor.as_ref()?.attributes.as_ref()?.get("container")?;
                let (mut c, mut error) = self.inspect(id).await?;
                // A stop ends with this event too, and then State.Error is empty. A
                // container that never ran and is disconnected failed to start. Docker
                // 20.10 holds the container's lock until it has recorded State.Error, so
                // the first inspect sees it; no daemon promises that order, so a container
                // that never ran is read again for a while before its error is taken to be
                // empty.
                let waited = Instant::now();
                while error.is_none()
                    && c.state == State::Created
                    && waited.elapsed() < START_ERROR_WAIT
                {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                    (c, error) = self.inspect(id).await?;
                }
                trace(format_args!(
                    "{} disconnected while {:?}; State.Error after {:?}: {:?}",
                    c.r.name,
                    c.state,
                    waited.elapsed(),
                    error
                ));
                Some((c, error))
            }
            _ => None,
        }
    }
}

struct Join<M> {
    ep: Endpoint,
    /// The processing thread's queue, whatever its message type: it takes `DockerMsg`s.
    tx: mpsc::Sender<M>,
    view: HashMap<Box<str>, Tracked>,
    /// A sync has completed before: the next one reports what changed meanwhile.
    synced_once: bool,
    proc_root: PathBuf,
    cgroup2: Option<PathBuf>,
    /// What the daemon said it is, at the last hello.
    engine: &'static str,
}

/// Runs until `stop` turns true. Owns a current-thread runtime, so nothing here shares a
/// thread with the ring-buffer drain.
pub fn run<M: From<DockerMsg> + Send>(
    ep: Endpoint,
    tx: mpsc::Sender<M>,
    stop: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!(
                "portwatch: warning: starting the Docker thread's runtime failed ({e}); \
                 conflicts will not name containers"
            );
            return;
        }
    };
    let mut j = Join {
        ep,
        tx,
        view: HashMap::new(),
        synced_once: false,
        proc_root: PathBuf::from("/proc"),
        cgroup2: None,
        engine: "docker",
    };
    rt.block_on(j.run(stop));
}

impl<M: From<DockerMsg> + Send> Join<M> {
    /// Every container, inspected (running or not: a stopped one's port bindings matter the
    /// moment it starts).
    async fn sync(&self, docker: &Docker) -> Result<Vec<Arc<Container>>, DockerError> {
        let list = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                ..Default::default()
            }))
            .await?;
        let ids: Vec<String> = list.into_iter().filter_map(|c| c.id).collect();
        let insp = self.inspector(docker);
        let inspected: Vec<Inspected> = stream::iter(ids)
            .map(|id| {
                let insp = &insp;
                async move { insp.inspect(&id).await }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        Ok(inspected.into_iter().flatten().map(|(c, _)| c).collect())
    }

    fn inspector(&self, docker: &Docker) -> Inspector {
        Inspector {
            docker: docker.clone(),
            engine: Engine {
                name: self.engine,
                endpoint: self.ep.to_string().into(),
            },
            proc_root: self.proc_root.clone(),
            cgroup2: self.cgroup2.clone(),
        }
    }

    /// Take a fresh sync as the view; the lifecycle records for what changed while nobody
    /// was listening (none on the first sync: what runs then is the baseline).
    fn adopt(&mut self, now: &[Arc<Container>]) -> Vec<DockerMsg> {
        let ts_ns = now_ns();
        let mut missed = Vec::new();
        let mut old = std::mem::take(&mut self.view);
        for c in now {
            let live = c.state.is_live();
            let prev = old.remove(&c.full_id);
            let was = prev.as_ref().is_some_and(|t| t.announced_running);
            if self.synced_once && live != was {
                let c = match (&prev, live) {
                    // Stopped meanwhile: report the ports it had.
                    (Some(p), false) => Arc::new(keep_ports(c, &p.c)),
                    _ => c.clone(),
                };
                missed.push(lifecycle(
                    if live { "start" } else { "die" },
                    c,
                    None,
                    ts_ns,
                    true,
                ));
            }
            self.view.insert(
                c.full_id.clone(),
                Tracked {
                    c: c.clone(),
                    announced_running: live,
                },
            );
        }
        if self.synced_once {
            for (_, t) in old {
                if t.announced_running {
                    missed.push(lifecycle("die", t.c.clone(), None, ts_ns, true));
                }
                missed.push(lifecycle("destroy", t.c, None, ts_ns, true));
            }
        }
        self.synced_once = true;
        missed
    }
}

#[cfg(test)]
mod tests;
