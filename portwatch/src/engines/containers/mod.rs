//! The container index: which container a process, a network namespace or a published port
//! belongs to. The Docker thread (docker.rs) builds it from the daemon's list, inspect and
//! event stream and sends changes as messages; the processing thread keeps its own copy and
//! only reads it, so attributing a kernel event never waits on the daemon.
//!
//! Pure logic apart from the /proc fallback, which reads from a configurable root so the
//! tests can fake it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
};

use serde::{Serialize, Serializer};

use crate::model::Proto;

pub use crate::model::ContainerRef;

pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// Docker's container states, as `State.Status` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Created,
    Running,
    Paused,
    Restarting,
    Removing,
    Exited,
    Dead,
}

impl State {
    /// Its processes exist (a paused container still holds its sockets).
    pub fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Restarting)
    }
}

fn ser_proto<S: Serializer>(p: &Proto, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// One host port mapped to a container port. In `Container::published` (what the daemon
/// actually set up) `host_ip` is concrete and `host_port` a single port; in
/// `Container::bindings` (what `-p` asked for) `host_ip` may be unspecified ("all"), and
/// the port may be 0 (any free one) or a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortMap {
    #[serde(serialize_with = "ser_proto")]
    pub proto: Proto,
    pub host_ip: IpAddr,
    pub host_port: u16,
    /// Last port of a requested range (`-p 8000-8010:80`); equals `host_port` otherwise.
    #[serde(skip)]
    pub host_port_end: u16,
    pub container_port: u16,
}

impl PortMap {
    fn covers(&self, proto: Proto, ip: IpAddr, port: u16) -> bool {
        self.proto == proto
            && self.host_port != 0
            && (self.host_port..=self.host_port_end).contains(&port)
            && crate::model::overlap(ip, None, self.host_ip, None).is_some()
    }

    /// "80/tcp": the container side, as Docker writes it.
    pub fn target(&self) -> String {
        format!("{}/{}", self.container_port, self.proto.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    pub name: Box<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

/// Everything the agent keeps about one container.
#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub r: Arc<ContainerRef>,
    pub full_id: Box<str>,
    /// The API endpoint it was learnt from: each engine's sync replaces its own only.
    pub endpoint: Arc<str>,
    pub state: State,
    /// Main process, 0 unless live.
    pub pid: u32,
    /// Inode of its network namespace (`/proc/<pid>/ns/net`), when live.
    pub netns: Option<u32>,
    /// Inode of its cgroup v2 directory: what `bpf_get_current_cgroup_id()` returns for its
    /// processes. None on a cgroup v1-only host, or when it is not live.
    pub cgroup_id: Option<u64>,
    /// Its cgroup path (the v2 one, else a v1 controller's), e.g. `/docker/<id>`.
    pub cgroup_path: Option<Box<str>>,
    /// `HostConfig.NetworkMode`: `default`, `bridge`, `host`, `none`, a network name, or
    /// `container:<id>`.
    pub network_mode: Box<str>,
    pub networks: Vec<Network>,
    /// Ports the daemon published. Kept after the container stops (the daemon then reports
    /// none) so that `die` and `destroy` records can say which ports were freed.
    pub published: Vec<PortMap>,
    /// Ports it asks for (`HostConfig.PortBindings`), used when it starts.
    pub bindings: Vec<PortMap>,
}

impl Container {
    fn publishes(&self, proto: Proto, ip: IpAddr, port: u16) -> Option<&PortMap> {
        self.published.iter().find(|p| p.covers(proto, ip, port))
    }

    fn asks_for(&self, proto: Proto, ip: IpAddr, port: u16) -> bool {
        self.bindings.iter().any(|p| p.covers(proto, ip, port))
    }

    fn has_ip(&self, ip: IpAddr) -> bool {
        self.networks.iter().any(|n| n.ip == Some(ip))
    }
}

/// Whether the kernel's cgroup id can name a container on this host: the schema's type.
pub use portwatch_schema::CgroupMode;

/// A connection state change, lifecycle change or start failure from the Docker thread.
#[derive(Debug)]
pub enum DockerMsg {
    /// (Re)connected and fully synced: replaces the index.
    Connected(Box<Connected>),
    /// The daemon cannot be reached (at start, or it went away).
    Unavailable {
        endpoint: Box<str>,
        reason: String,
        ts_ns: i128,
    },
    /// A container changed in a way that is no lifecycle record (created, renamed, joined a
    /// network).
    Upsert(Arc<Container>),
    /// start, die or destroy.
    Lifecycle(Box<Lifecycle>),
    /// A start failed before the container ran (`State.Error`): port already allocated, or
    /// the proxy's bind failed.
    StartFailed {
        container: Arc<Container>,
        error: String,
        ts_ns: i128,
    },
    /// Once a second while connected: lets the processing thread time out start failures
    /// it is holding back.
    Tick,
}

#[derive(Debug)]
pub struct Connected {
    pub endpoint: Box<str>,
    /// `docker` or `podman`.
    pub engine: &'static str,
    pub api_version: String,
    pub server_version: String,
    pub containers: Vec<Arc<Container>>,
    pub sync_ms: u64,
    pub cgroup: CgroupMode,
    pub ts_ns: i128,
}

#[derive(Debug)]
pub struct Lifecycle {
    /// "start", "die" or "destroy".
    pub event: &'static str,
    pub container: Arc<Container>,
    pub exit_code: Option<i64>,
    pub ts_ns: i128,
    /// It happened while the agent was not connected; found when it resynced.
    pub missed: bool,
}

enum NetnsOwner {
    One(Arc<Container>),
    /// Several containers share it (`--network container:X`): the cgroup decides.
    Shared,
}

/// The processing thread's view of the daemon's containers, with the lookups attribution
/// needs. Rebuilt from scratch on every change: a few hundred containers take microseconds,
/// and changes come at human pace.
pub struct Index {
    by_id: HashMap<Box<str>, Arc<Container>>,
    by_cgroup: HashMap<u64, Arc<Container>>,
    by_netns: HashMap<u32, NetnsOwner>,
    /// The host's own network namespace: never a container's, even for `--network host`.
    host_netns: u32,
    /// Live containers without a network namespace of their own (`--network host`).
    host_network: usize,
    /// pid -> container from /proc/<pid>/cgroup, for processes that netns and cgroup id
    /// cannot place. Cleared on every index change and when a process exits.
    pid_cache: HashMap<u32, Option<Arc<Container>>>,
    proc_root: PathBuf,
    /// The daemon is reachable: start failures will be reported, so a proxy's failed bind
    /// may wait for its container's name.
    /// Endpoints of the engines connected now.
    pub connected: std::collections::HashSet<Box<str>>,
}

impl Index {
    pub fn new(host_netns: u32, proc_root: impl Into<PathBuf>) -> Self {
        Index {
            by_id: HashMap::new(),
            by_cgroup: HashMap::new(),
            by_netns: HashMap::new(),
            host_netns,
            host_network: 0,
            pid_cache: HashMap::new(),
            proc_root: proc_root.into(),
            connected: Default::default(),
        }
    }

    pub fn host_netns(&self) -> u32 {
        self.host_netns
    }

    /// Every container known.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Container>> {
        self.by_id.values()
    }

    pub fn get(&self, full_id: &str) -> Option<&Arc<Container>> {
        self.by_id.get(full_id)
    }

    /// A full sync of the engine at `endpoint`: its containers replace the ones it had;
    /// another engine's stay.
    pub fn replace_all(&mut self, endpoint: &str, cs: impl IntoIterator<Item = Arc<Container>>) {
        self.by_id.retain(|_, c| &*c.endpoint != endpoint);
        self.by_id
            .extend(cs.into_iter().map(|c| (c.full_id.clone(), c)));
        self.rebuild();
    }

    /// Whether any engine is connected.
    pub fn connected(&self) -> bool {
        !self.connected.is_empty()
    }

    pub fn upsert(&mut self, c: Arc<Container>) {
        self.by_id.insert(c.full_id.clone(), c);
        self.rebuild();
    }

    pub fn remove(&mut self, full_id: &str) {
        if self.by_id.remove(full_id).is_some() {
            self.rebuild();
        }
    }

    /// A process exited: its pid may be reused by someone else.
    pub fn forget_pid(&mut self, pid: u32) {
        self.pid_cache.remove(&pid);
    }

    fn rebuild(&mut self) {
        self.by_cgroup.clear();
        self.by_netns.clear();
        self.pid_cache.clear();
        self.host_network = 0;
        for c in self.by_id.values().filter(|c| c.state.is_live()) {
            if let Some(id) = c.cgroup_id {
                self.by_cgroup.insert(id, c.clone());
            }
            match c.netns {
                Some(ns) if ns != self.host_netns => {
                    self.by_netns
                        .entry(ns)
                        .and_modify(|o| *o = NetnsOwner::Shared)
                        .or_insert_with(|| NetnsOwner::One(c.clone()));
                }
                Some(_) => self.host_network += 1,
                None => {}
            }
        }
    }

    /// The container process `pid` runs in. `cgroup_id` is the kernel's (0 when unknown).
    /// Tried in order: the cgroup id (exact where cgroup2 is mounted), the network namespace
    /// when one container owns it, and /proc/<pid>/cgroup for what those two cannot tell
    /// (host-network containers, shared namespaces, cgroup v1-only hosts); that last read
    /// is cached per pid and only happens when such a container exists.
    pub fn container_of(&mut self, pid: u32, netns: u32, cgroup_id: u64) -> Option<Arc<Container>> {
        if self.by_id.is_empty() {
            return None;
        }
        if cgroup_id > 1 {
            if let Some(c) = self.by_cgroup.get(&cgroup_id) {
                return Some(c.clone());
            }
        }
        let ambiguous = match self.by_netns.get(&netns) {
            Some(NetnsOwner::One(c)) => return Some(c.clone()),
            Some(NetnsOwner::Shared) => true,
            None => netns == self.host_netns && self.host_network > 0,
        };
        if !ambiguous || pid == 0 {
            return None;
        }
        if let Some(c) = self.pid_cache.get(&pid) {
            return c.clone();
        }
        let found = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
            .ok()
            .and_then(|t| container_id_in_cgroup(&t).and_then(|id| self.by_id.get(id).cloned()));
        if self.pid_cache.len() >= 4096 {
            self.pid_cache.clear();
        }
        self.pid_cache.insert(pid, found.clone());
        found
    }

    /// The live container that publishes `ip:port/proto` on the host.
    pub fn publisher(
        &self,
        proto: Proto,
        ip: IpAddr,
        port: u16,
    ) -> Option<(&Arc<Container>, &PortMap)> {
        self.by_id
            .values()
            .filter(|c| c.state.is_live())
            .find_map(|c| c.publishes(proto, ip, port).map(|p| (c, p)))
    }

    /// The container with this address on one of its networks (docker-proxy's
    /// `-container-ip`).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Container>> {
        self.by_id.values().find(|c| c.has_ip(ip))
    }

    /// Containers that are not running but ask for `ip:port/proto`: the ones a failing
    /// proxy bind may be starting.
    /// Whether any container the engines know, running or about to (created, restarting),
    /// publishes or asks for this host port: a binder's socket on it is then in use, not
    /// left behind.
    pub fn claims(&self, proto: Proto, ip: IpAddr, port: u16) -> bool {
        self.by_id.values().any(|c| {
            (c.state.is_live() && c.publishes(proto, ip, port).is_some())
                || (c.state == State::Created && c.asks_for(proto, ip, port))
        })
    }

    pub fn starting(&self, proto: Proto, ip: IpAddr, port: u16) -> Vec<&Arc<Container>> {
        self.by_id
            .values()
            .filter(|c| !c.state.is_live() && c.asks_for(proto, ip, port))
            .collect()
    }
}

/// The 64-hex-digit container id in a /proc/<pid>/cgroup text: `/docker/<id>` (cgroupfs
/// driver), `/system.slice/docker-<id>.scope` (systemd driver), and nested forms.
pub fn container_id_in_cgroup(text: &str) -> Option<&str> {
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for seg in path.split('/').rev() {
            let seg = seg.strip_suffix(".scope").unwrap_or(seg);
            let seg = seg.rsplit('-').next().unwrap_or(seg);
            if seg.len() == 64 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Some(seg);
            }
        }
    }
    None
}

/// What a failed start's `State.Error` says about ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// `Bind for 0.0.0.0:8080 failed: port is already allocated`: dockerd's own allocator
    /// refused; no syscall failed.
    Allocated { ip: IpAddr, port: u16 },
    /// `Error starting userland proxy: listen tcp4 0.0.0.0:8080: bind: address already in
    /// use` (docker-proxy, up to Docker 27), or `failed to bind host port for
    /// 0.0.0.0:8080:172.17.0.2:80/tcp: address already in use` (dockerd, since 28): a real
    /// EADDRINUSE, which the kernel programs see.
    InUse { ip: IpAddr, port: u16 },
}

/// `0.0.0.0:8080`, `:::8080` or `[::]:8080` at the start of `s`.
fn host_port_prefix(s: &str) -> Option<(IpAddr, u16)> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, rest) = rest.split_once(']')?;
        let port = rest.strip_prefix(':')?;
        let port = port.split(|c: char| !c.is_ascii_digit()).next()?;
        return Some((ip.parse().ok()?, port.parse().ok()?));
    }
    let (ip, port) = s.rsplit_once(':')?;
    Some((ip.parse().ok()?, port.parse().ok()?))
}

pub fn parse_start_error(msg: &str) -> Option<StartError> {
    if msg.contains("port is already allocated") {
        let rest = msg.split("Bind for ").nth(1)?;
        let (hp, _) = rest.split_once(" failed")?;
        let (ip, port) = host_port_prefix(hp)?;
        return Some(StartError::Allocated { ip, port });
    }
    if msg.contains("address already in use") {
        // docker-proxy: "listen tcp4 0.0.0.0:8080: bind: ..."
        for proto in ["tcp4 ", "tcp6 ", "udp4 ", "udp6 ", "tcp ", "udp "] {
            if let Some(rest) = msg.split(&format!("listen {proto}")).nth(1) {
                let hp = rest.split(": ").next()?;
                let (ip, port) = host_port_prefix(hp)?;
                return Some(StartError::InUse { ip, port });
            }
        }
        // dockerd >= 28: "failed to bind host port for 0.0.0.0:8080:172.17.0.2:80/tcp: ..."
        if let Some(rest) = msg.split("host port for ").nth(1) {
            let hp = rest.split(": ").next()?;
            // host:port:container-ip:port/proto -> the first host:port.
            let (ip, rest) = if let Some(r) = hp.strip_prefix('[') {
                let (ip, r) = r.split_once(']')?;
                (ip.parse().ok()?, r.strip_prefix(':')?)
            } else {
                let (ip, r) = hp.split_once(':')?;
                (ip.parse().ok()?, r)
            };
            let port = rest.split(':').next()?.parse().ok()?;
            return Some(StartError::InUse { ip, port });
        }
    }
    None
}

/// `-p` specs as the daemon reports them: `"80/tcp" -> [{HostIp, HostPort}]`. An empty
/// HostIp means every address; an empty HostPort any free port; `8000-8010` a range.
pub fn port_map(key: &str, host_ip: Option<&str>, host_port: Option<&str>) -> Option<PortMap> {
    let (cport, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None, // sctp: not watched by the kernel programs
    };
    let container_port = cport.split('-').next()?.parse().ok()?;
    let host_ip = match host_ip.unwrap_or("") {
        "" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        s => s.trim_matches(|c| c == '[' || c == ']').parse().ok()?,
    };
    let (lo, hi) = match host_port.unwrap_or("") {
        "" => (0, 0),
        s => match s.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let p = s.parse().ok()?;
                (p, p)
            }
        },
    };
    Some(PortMap {
        proto,
        host_ip,
        host_port: lo,
        host_port_end: hi,
        container_port,
    })
}

/// docker-proxy's `-container-ip X` and `-host-port N`, from its command line.
pub fn proxy_args(cmdline: &str) -> (Option<IpAddr>, Option<u16>) {
    let mut it = cmdline.split(' ');
    let (mut ip, mut port) = (None, None);
    while let Some(a) = it.next() {
        match a {
            "-container-ip" => ip = it.next().and_then(|s| s.parse().ok()),
            "-host-port" => port = it.next().and_then(|s| s.parse().ok()),
            _ => {}
        }
    }
    (ip, port)
}

/// Kernel comm of the processes that bind published ports for the daemon.
pub fn docker_binder(comm: &str) -> Option<&'static str> {
    match comm {
        "docker-proxy" => Some("docker-proxy"),
        "dockerd" => Some("dockerd"),
        // Podman: the CLI (or its API service) binds a published port and hands the socket
        // to the container's conmon, which holds it; rootless, rootlessport does.
        "podman" => Some("podman"),
        "conmon" => Some("conmon"),
        "rootlessport" => Some("rootlessport"),
        _ => None,
    }
}

#[cfg(test)]
pub mod tests;
