//! From the engine's answers to the index's terms: a container from its inspect, its
//! lifecycle message, its cgroup, state and published ports, which engine answered.

use super::*;
use portwatch_schema::Text;

pub(super) fn lifecycle(
    event: &'static str,
    container: Arc<Container>,
    exit_code: Option<i64>,
    ts_ns: i128,
    missed: bool,
) -> DockerMsg {
    DockerMsg::Lifecycle(Box::new(Lifecycle {
        event,
        container,
        exit_code,
        ts_ns,
        missed,
    }))
}

/// `now`, with the published ports of `before` when it has none of its own (the daemon
/// reports none once a container stops).
pub(super) fn keep_ports(now: &Container, before: &Container) -> Container {
    let mut c = now.clone();
    if c.published.is_empty() {
        c.published = before.published.clone();
    }
    c
}

/// The cgroup layout of this host, and where cgroup2 is mounted if it is.
pub(super) fn cgroup_layout() -> (CgroupMode, Option<PathBuf>) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mode, mount) = parse_cgroup_layout(&text);
    (mode, mount.map(PathBuf::from))
}

/// From /proc/self/mountinfo: `... <mount point> <options> - <fstype> <source> ...`.
pub(super) fn parse_cgroup_layout(mountinfo: &str) -> (CgroupMode, Option<&str>) {
    let mut v2 = None;
    let mut v1 = false;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount = left.split(' ').nth(4).unwrap_or("");
        match right.split(' ').next() {
            Some("cgroup2") => v2 = v2.or(Some(mount)),
            Some("cgroup") => v1 = true,
            _ => {}
        }
    }
    let mode = match (v2, v1) {
        (Some(_), false) => CgroupMode::V2,
        (Some(_), true) => CgroupMode::Hybrid,
        (None, _) => CgroupMode::V1,
    };
    (mode, v2)
}

/// The v2 path (`0::/docker/<id>`), else the first v1 controller's path, from
/// /proc/<pid>/cgroup.
pub(super) fn cgroup_paths(text: &str) -> (Option<&str>, Option<&str>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(h), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if h == "0" && ctl.is_empty() {
            v2 = Some(path);
        } else if v1.is_none() && path != "/" {
            v1 = Some(path);
        }
    }
    (v2, v1)
}

pub(super) fn state_of(s: Option<ContainerStateStatusEnum>) -> State {
    match s {
        Some(ContainerStateStatusEnum::RUNNING) => State::Running,
        Some(ContainerStateStatusEnum::PAUSED) => State::Paused,
        Some(ContainerStateStatusEnum::RESTARTING) => State::Restarting,
        Some(ContainerStateStatusEnum::REMOVING) => State::Removing,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::STOPPING) => {
            State::Exited
        }
        Some(ContainerStateStatusEnum::DEAD) => State::Dead,
        _ => State::Created,
    }
}

pub(super) fn port_maps(
    m: Option<&HashMap<String, Option<Vec<bollard::models::PortBinding>>>>,
) -> Vec<PortMap> {
    let mut out: Vec<PortMap> = m
        .into_iter()
        .flatten()
        .flat_map(|(k, v)| {
            v.iter()
                .flatten()
                .filter_map(move |b| port_map(k, b.host_ip.as_deref(), b.host_port.as_deref()))
        })
        .collect();
    // Map order is random; records should not be.
    out.sort_by_key(|p| (p.host_port, p.container_port, p.proto, p.host_ip));
    out
}

/// The index entry for one inspect response; /proc gives the namespace and cgroup.
/// Which engine answers at an endpoint.
#[derive(Clone, Debug)]
pub(super) struct Engine {
    /// `docker` or `podman`.
    pub(super) name: &'static str,
    pub(super) endpoint: Arc<str>,
}

/// Podman's Docker-compatible API names itself among the version's components.
pub(super) fn engine_name(v: &bollard::models::SystemVersion) -> &'static str {
    let podman = v
        .components
        .iter()
        .flatten()
        .any(|c| c.name.to_ascii_lowercase().contains("podman"));
    if podman {
        "podman"
    } else {
        "docker"
    }
}

pub(super) fn container_from(
    r: &ContainerInspectResponse,
    proc_root: &Path,
    cgroup2: Option<&Path>,
    engine: &Engine,
) -> Option<Container> {
    let full_id: Box<str> = r.id.as_deref()?.into();
    let config = r.config.as_ref();
    let labels = config.and_then(|c| c.labels.as_ref());
    let label = |k: &str| labels.and_then(|l| l.get(k)).map(|s| Text::copy(s));
    let st = r.state.as_ref();
    let state = state_of(st.and_then(|s| s.status));
    let pid = st
        .and_then(|s| s.pid)
        .filter(|_| state.is_live())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(0);
    let (mut netns, mut cgroup_id, mut cgroup_path) = (None, None, None);
    if pid != 0 {
        let dir = proc_root.join(pid.to_string());
        netns = std::fs::metadata(dir.join("ns/net"))
            .ok()
            .and_then(|m| u32::try_from(m.ino()).ok());
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup")) {
            let (v2, v1) = cgroup_paths(&text);
            if let (Some(p), Some(root)) = (v2.filter(|p| *p != "/"), cgroup2) {
                cgroup_id = std::fs::metadata(root.join(p.trim_start_matches('/')))
                    .ok()
                    .map(|m| m.ino());
            }
            cgroup_path = v2.filter(|p| *p != "/").or(v1).map(Into::into);
        }
    }
    let host_config = r.host_config.as_ref();
    let ns = r.network_settings.as_ref();
    let mut networks: Vec<Network> = ns
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flatten()
        .map(|(name, e)| Network {
            name: name.as_str().into(),
            ip: e
                .ip_address
                .as_deref()
                .filter(|s| !s.is_empty())
                .and_then(|s| s.parse::<IpAddr>().ok()),
        })
        .collect();
    networks.sort_by(|a, b| a.name.cmp(&b.name));
    Some(Container {
        r: Arc::new(ContainerRef {
            id: Text::copy(full_id.get(..12).unwrap_or(&full_id)),
            engine: engine.name.into(),
            name: Text::copy(r.name.as_deref().unwrap_or("").trim_start_matches('/')),
            image: Text::copy(config.and_then(|c| c.image.as_deref()).unwrap_or("")),
            compose_project: label(COMPOSE_PROJECT),
            compose_service: label(COMPOSE_SERVICE),
        }),
        full_id,
        endpoint: engine.endpoint.clone(),
        state,
        pid,
        netns,
        cgroup_id,
        cgroup_path,
        network_mode: host_config
            .and_then(|h| h.network_mode.as_deref())
            .unwrap_or("default")
            .into(),
        networks,
        published: if state.is_live() {
            port_maps(ns.and_then(|n| n.ports.as_ref()))
        } else {
            Vec::new()
        },
        bindings: port_maps(host_config.and_then(|h| h.port_bindings.as_ref())),
    })
}
