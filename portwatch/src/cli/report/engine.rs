//! Facts from the container engine (containers, networks, version) and its journal.

use super::*;

#[derive(Serialize)]
pub(super) struct PortFacts {
    pub(super) ip: Option<String>,
    pub(super) private_port: u16,
    public_port: Option<u16>,
    pub(super) proto: Option<String>,
}

#[derive(Serialize)]
pub(super) struct BindingFacts {
    pub(super) host_ip: Option<String>,
    pub(super) host_port: Option<String>,
}

#[derive(Serialize)]
pub(super) struct EndpointFacts {
    pub(super) ip_address: Option<String>,
    pub(super) gateway: Option<String>,
    pub(super) global_ipv6_address: Option<String>,
    pub(super) mac_address: Option<String>,
    pub(super) aliases: Option<Vec<String>>,
}

/// What `docker ps -a` shows of a container, and what its inspect adds about ports. The
/// command line is left out: it is where secrets passed as arguments live, and a port
/// conflict does not need it.
#[derive(Serialize)]
pub(super) struct ContainerFacts {
    pub(super) id: String,
    pub(super) names: Vec<String>,
    pub(super) image: Option<String>,
    pub(super) created: Option<String>,
    pub(super) state: Option<String>,
    pub(super) status: Option<String>,
    pub(super) ports: Vec<PortFacts>,
    pub(super) labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) inspect: Option<InspectFacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) inspect_error: Option<String>,
}

#[derive(Serialize)]
pub(super) struct InspectFacts {
    pub(super) env: Vec<String>,
    pub(super) pid: Option<i64>,
    pub(super) exit_code: Option<i64>,
    pub(super) error: Option<String>,
    pub(super) oom_killed: Option<bool>,
    pub(super) started_at: Option<String>,
    pub(super) finished_at: Option<String>,
    pub(super) restart_count: Option<i64>,
    pub(super) network_mode: Option<String>,
    publish_all_ports: Option<bool>,
    pub(super) exposed_ports: Vec<String>,
    pub(super) port_bindings: BTreeMap<String, Vec<BindingFacts>>,
    pub(super) networks: BTreeMap<String, EndpointFacts>,
}

#[derive(Serialize)]
pub(super) struct NetworkFacts {
    pub(super) name: Option<String>,
    pub(super) id: Option<String>,
    pub(super) driver: Option<String>,
    pub(super) scope: Option<String>,
    pub(super) created: Option<String>,
    pub(super) internal: Option<bool>,
    pub(super) attachable: Option<bool>,
    pub(super) enable_ipv6: Option<bool>,
    pub(super) ipam: Option<bollard::models::Ipam>,
    pub(super) options: BTreeMap<String, String>,
    pub(super) labels: BTreeMap<String, String>,
}

pub(super) struct DockerFacts {
    pub(super) version: Value,
    pub(super) server_version: String,
    pub(super) api_version: String,
    pub(super) containers: Vec<ContainerFacts>,
    pub(super) networks: Vec<NetworkFacts>,
}

pub(super) fn inspect_facts(
    r: ContainerInspectResponse,
    secrets: &mut BTreeSet<String>,
) -> InspectFacts {
    let config = r.config.unwrap_or_default();
    let state = r.state.unwrap_or_default();
    let host = r.host_config.unwrap_or_default();
    let port_bindings = host
        .port_bindings
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let b = v
                .unwrap_or_default()
                .into_iter()
                .map(|b| BindingFacts {
                    host_ip: b.host_ip,
                    host_port: b.host_port,
                })
                .collect();
            (k, b)
        })
        .collect();
    let networks = r
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, e)| {
            (
                k,
                EndpointFacts {
                    ip_address: e.ip_address.filter(|s| !s.is_empty()),
                    gateway: e.gateway.filter(|s| !s.is_empty()),
                    global_ipv6_address: e.global_ipv6_address.filter(|s| !s.is_empty()),
                    mac_address: e.mac_address.filter(|s| !s.is_empty()),
                    aliases: e.aliases,
                },
            )
        })
        .collect();
    InspectFacts {
        env: redact_env(&config.env.unwrap_or_default(), secrets),
        pid: state.pid,
        exit_code: state.exit_code,
        error: state.error.filter(|e| !e.is_empty()),
        oom_killed: state.oom_killed,
        started_at: state.started_at,
        finished_at: state.finished_at,
        restart_count: r.restart_count,
        network_mode: host.network_mode,
        publish_all_ports: host.publish_all_ports,
        exposed_ports: config.exposed_ports.unwrap_or_default(),
        port_bindings,
        networks,
    }
}

pub(super) fn container_facts(
    c: ContainerSummary,
    inspected: std::result::Result<ContainerInspectResponse, String>,
    secrets: &mut BTreeSet<String>,
) -> ContainerFacts {
    let (inspect, inspect_error) = match inspected {
        Ok(r) => {
            // The summary's labels are the inspect's; both are redacted, so both are read
            // for secret values to scrub.
            let _ = redact_map(r.config.as_ref().and_then(|c| c.labels.as_ref()), secrets);
            (Some(inspect_facts(r, secrets)), None)
        }
        Err(e) => (None, Some(e)),
    };
    ContainerFacts {
        id: c.id.unwrap_or_default(),
        names: c
            .names
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.trim_start_matches('/').to_string())
            .collect(),
        image: c.image,
        created: c.created.map(|s| rfc3339(i128::from(s) * 1_000_000_000)),
        state: c.state.map(|s| s.to_string()),
        status: c.status,
        ports: c
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| PortFacts {
                ip: p.ip,
                private_port: p.private_port,
                public_port: p.public_port,
                proto: p.typ.map(|t| t.to_string()),
            })
            .collect(),
        labels: redact_map(c.labels.as_ref(), secrets),
        inspect,
        inspect_error,
    }
}

pub(super) fn network_facts(n: Network, secrets: &mut BTreeSet<String>) -> NetworkFacts {
    NetworkFacts {
        options: redact_map(n.options.as_ref(), secrets),
        labels: redact_map(n.labels.as_ref(), secrets),
        name: n.name,
        id: n.id,
        driver: n.driver,
        scope: n.scope,
        created: n.created,
        internal: n.internal,
        attachable: n.attachable,
        enable_ipv6: n.enable_ipv6,
        ipam: n.ipam,
    }
}

pub(super) async fn docker_facts(
    ep: &Endpoint,
    secrets: &mut BTreeSet<String>,
) -> std::result::Result<DockerFacts, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "the Docker daemon at {ep} cannot be reached ({e}); start dockerd, or point \
             --docker-host (or DOCKER_HOST) at it"
        )
    };
    let docker = docker::connect(ep).map_err(|e| unreachable(&e))?;
    let hello = async {
        let docker = docker.negotiate_version().await?;
        let v = docker.version().await?;
        Ok::<_, bollard::errors::Error>((docker, v))
    };
    let (docker, version): (Docker, _) =
        match tokio::time::timeout(DOCKER_HELLO_TIMEOUT, hello).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return Err(unreachable(&e)),
            Err(_) => {
                return Err(unreachable(&format!(
                    "no answer within {} s",
                    DOCKER_HELLO_TIMEOUT.as_secs()
                )))
            }
        };
    let api = |what: &str, e: bollard::errors::Error| {
        format!("the Docker daemon at {ep} failed to {what} ({e})")
    };
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| api("list containers", e))?;
    let inspected: Vec<_> = stream::iter(list.iter().map(|c| {
        let docker = docker.clone();
        let id = c.id.clone().unwrap_or_default();
        async move {
            docker
                .inspect_container(&id, None::<InspectContainerOptions>)
                .await
                // Removed between the list and the inspect, most likely.
                .map_err(|e| format!("inspect failed: {e}"))
        }
    }))
    .buffered(PARALLEL_INSPECTS)
    .collect()
    .await;
    let containers = list
        .into_iter()
        .zip(inspected)
        .map(|(c, i)| container_facts(c, i, secrets))
        .collect();
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(|e| api("list networks", e))?
        .into_iter()
        .map(|n| network_facts(n, secrets))
        .collect();
    Ok(DockerFacts {
        server_version: version.version.clone().unwrap_or_default(),
        api_version: docker.client_version().to_string(),
        version: serde_json::to_value(&version).unwrap_or_default(),
        containers,
        networks,
    })
}

/// `docker ps -a`, as a person reads it.
pub(super) fn render_ps(cs: &[ContainerFacts]) -> String {
    let ports = |c: &ContainerFacts| {
        c.ports
            .iter()
            .map(|p| {
                let proto = p.proto.as_deref().unwrap_or("tcp");
                match (p.public_port, p.ip.as_deref()) {
                    (Some(pub_), Some(ip)) if ip.contains(':') => {
                        format!("[{ip}]:{pub_}->{}/{proto}", p.private_port)
                    }
                    (Some(pub_), ip) => {
                        format!("{}:{pub_}->{}/{proto}", ip.unwrap_or(""), p.private_port)
                    }
                    (None, _) => format!("{}/{proto}", p.private_port),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut s = format!(
        "{:<12}  {:<28}  {:<28}  {:<40}  NAMES\n",
        "CONTAINER ID", "IMAGE", "STATUS", "PORTS"
    );
    for c in cs {
        s.push_str(&format!(
            "{:<12}  {:<28}  {:<28}  {:<40}  {}\n",
            c.id.get(..12).unwrap_or(&c.id),
            c.image.as_deref().unwrap_or(""),
            c.status.as_deref().unwrap_or(""),
            ports(c),
            c.names.join(",")
        ));
    }
    s
}

// ---- the daemon's journal ----

/// `journalctl`'s "YYYY-MM-DD HH:MM:SS UTC".
pub(super) fn journal_time(ns: i128) -> String {
    let t = rfc3339(ns);
    format!("{} {} UTC", &t[..10], &t[11..19])
}

/// The newest lines of dockerd's journal since `since_ns`, at most JOURNAL_MAX_BYTES.
pub(super) fn journal(since_ns: i128) -> std::result::Result<(Vec<u8>, String), String> {
    let since = journal_time(since_ns);
    let args = [
        "-u",
        "docker",
        "--since",
        &since,
        "--no-pager",
        "-o",
        "short-iso-precise",
        "-n",
        JOURNAL_LINES,
    ];
    let shown = format!(
        "journalctl {}",
        args.map(|a| if a.contains(' ') {
            format!("'{a}'")
        } else {
            a.to_string()
        })
        .join(" ")
    );
    let (status, mut out, err) = run_journalctl(
        Command::new("journalctl").args(args),
        &shown,
        JOURNAL_TIMEOUT,
    )?;
    let entries = out
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && !l.starts_with(b"-- "))
        .count();
    if !status.success() || entries == 0 {
        return Err(format!(
            "`{shown}` found no entries{}{}; dockerd may not run under systemd here, and then \
             its log is wherever it was started to write",
            if status.success() {
                String::new()
            } else {
                format!(" ({status})")
            },
            if err.is_empty() {
                String::new()
            } else {
                format!(": {err}")
            }
        ));
    }
    if out.len() > JOURNAL_MAX_BYTES {
        // Keep the newest, from a line boundary.
        let cut = out.len() - JOURNAL_MAX_BYTES;
        let start = out[cut..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(cut, |i| cut + i + 1);
        out.drain(..start);
        return Ok((
            out,
            format!(
                "the Docker daemon's journal for the window: `{shown}`, its newest {} MiB",
                JOURNAL_MAX_BYTES >> 20
            ),
        ));
    }
    Ok((
        out,
        format!(
            "the Docker daemon's journal for the window: `{shown}`, {}",
            count(entries, "line")
        ),
    ))
}

/// Run journalctl with its output read in full, killed past `timeout`. Errors say what
/// failed and how (`shown` is the command as a user would type it).
fn run_journalctl(
    cmd: &mut Command,
    shown: &str,
    timeout: Duration,
) -> std::result::Result<(std::process::ExitStatus, Vec<u8>, String), String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                "journalctl is not installed, so this host has no systemd journal to read"
                    .to_string()
            }
            _ => format!("running journalctl failed: {e}"),
        })?;
    let read = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = read(child.stdout.take().map(|r| Box::new(r) as _));
    let err = read(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{shown}` did not finish within {} s",
                    timeout.as_secs()
                ));
            }
        }
    };
    let out = out.join().unwrap_or_default();
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default())
        .trim()
        .trim_end_matches('.')
        .to_string();
    Ok((status, out, err))
}
