use super::*;
use portwatch_schema::Text;

pub fn container(id_digit: char, name: &str, state: State) -> Container {
    let full: String = std::iter::repeat_n(id_digit, 64).collect();
    Container {
        r: Arc::new(ContainerRef {
            id: Text::copy(&full[..12]),
            engine: "docker".into(),
            name: Text::copy(name),
            image: "nginx:1.27".into(),
            compose_project: None,
            compose_service: None,
        }),
        full_id: full.into(),
        endpoint: "unix:///var/run/docker.sock".into(),
        state,
        pid: 0,
        netns: None,
        cgroup_id: None,
        cgroup_path: None,
        network_mode: "default".into(),
        networks: Vec::new(),
        published: Vec::new(),
        bindings: Vec::new(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Each engine's sync replaces only its own containers: Docker and Podman joined at
/// once keep each other's.
#[test]
fn a_sync_replaces_only_its_own_engines_containers() {
    let mut idx = Index::new(1, "/nonexistent");
    let d = container('a', "d1", State::Running);
    let mut p = container('b', "p1", State::Running);
    p.endpoint = "unix:///run/podman/podman.sock".into();
    idx.replace_all("unix:///var/run/docker.sock", [Arc::new(d)]);
    idx.replace_all("unix:///run/podman/podman.sock", [Arc::new(p)]);
    assert_eq!(idx.iter().count(), 2);
    // Docker resyncs with nothing: its container goes, Podman's stays.
    idx.replace_all("unix:///var/run/docker.sock", []);
    let left: Vec<&str> = idx.iter().map(|c| &*c.r.name).collect();
    assert_eq!(left, ["p1"]);
}
#[test]
fn cgroup_ids_in_proc_text() {
    let id = "8b9af854e0580aa6a5fd34c75ca7350e8eb7253d0a0c2cc7007ab72f55a004a6";
    let v1 = format!("4:memory:/docker/{id}\n0::/docker/{id}\n");
    assert_eq!(container_id_in_cgroup(&v1), Some(id));
    let systemd = format!("0::/system.slice/docker-{id}.scope\n");
    assert_eq!(container_id_in_cgroup(&systemd), Some(id));
    assert_eq!(
        container_id_in_cgroup("0::/user.slice/session-3.scope\n"),
        None
    );
    assert_eq!(container_id_in_cgroup("0::/\n"), None);
}

#[test]
fn start_errors() {
    assert_eq!(
        parse_start_error(
            "driver failed programming external connectivity on endpoint pwy (d98e): Bind \
             for 0.0.0.0:18080 failed: port is already allocated"
        ),
        Some(StartError::Allocated {
            ip: ip("0.0.0.0"),
            port: 18080
        })
    );
    assert_eq!(
        parse_start_error("Bind for :::8080 failed: port is already allocated"),
        Some(StartError::Allocated {
            ip: ip("::"),
            port: 8080
        })
    );
    assert_eq!(
        parse_start_error(
            "driver failed programming external connectivity on endpoint pwz (4791): Error \
             starting userland proxy: listen tcp4 0.0.0.0:18081: bind: address already in use"
        ),
        Some(StartError::InUse {
            ip: ip("0.0.0.0"),
            port: 18081
        })
    );
    assert_eq!(
        parse_start_error(
            "failed to set up container networking: driver failed programming external \
             connectivity on endpoint web (ab): failed to bind host port for \
             0.0.0.0:8080:172.17.0.2:80/tcp: address already in use"
        ),
        Some(StartError::InUse {
            ip: ip("0.0.0.0"),
            port: 8080
        })
    );
    assert_eq!(
        parse_start_error(
            "failed to bind host port for [::]:8080:[fd00::2]:80/tcp: address already in use"
        ),
        Some(StartError::InUse {
            ip: ip("::"),
            port: 8080
        })
    );
    assert_eq!(parse_start_error("OCI runtime create failed"), None);
}

#[test]
fn port_maps() {
    let p = port_map("80/tcp", Some(""), Some("8080")).unwrap();
    assert_eq!(
        (p.proto, p.host_ip, p.host_port, p.container_port),
        (Proto::Tcp, ip("0.0.0.0"), 8080, 80)
    );
    assert!(p.covers(Proto::Tcp, ip("127.0.0.1"), 8080));
    assert!(
        p.covers(Proto::Tcp, ip("::"), 8080),
        "an empty HostIp takes IPv6 too"
    );
    assert!(!p.covers(Proto::Udp, ip("0.0.0.0"), 8080));
    let r = port_map("53/udp", Some("127.0.0.1"), Some("5000-5010")).unwrap();
    assert!(r.covers(Proto::Udp, ip("127.0.0.1"), 5005));
    assert!(!r.covers(Proto::Udp, ip("127.0.0.2"), 5005));
    assert!(!port_map("80/tcp", None, None)
        .unwrap()
        .covers(Proto::Tcp, ip("0.0.0.0"), 0));
    assert_eq!(port_map("80/sctp", None, Some("80")), None);
    assert_eq!(p.target(), "80/tcp");
}

#[test]
fn proxy_command_line() {
    let (ip_, port) = proxy_args(
        "/usr/sbin/docker-proxy -proto tcp -host-ip 0.0.0.0 -host-port 18080 -container-ip \
         172.17.0.2 -container-port 80",
    );
    assert_eq!(ip_, Some(ip("172.17.0.2")));
    assert_eq!(port, Some(18080));
}

#[test]
fn lookups_by_cgroup_netns_and_port() {
    let mut idx = Index::new(1000, "/nonexistent");
    let mut a = container('a', "web1", State::Running);
    a.pid = 10;
    a.netns = Some(2000);
    a.cgroup_id = Some(63);
    a.published = vec![port_map("80/tcp", Some("0.0.0.0"), Some("8080")).unwrap()];
    let mut b = container('b', "web2", State::Created);
    b.bindings = vec![port_map("80/tcp", Some(""), Some("8080")).unwrap()];
    idx.replace_all("unix:///var/run/docker.sock", [Arc::new(a), Arc::new(b)]);
    assert_eq!(&*idx.container_of(5, 0, 63).unwrap().r.name, "web1");
    assert_eq!(&*idx.container_of(5, 2000, 0).unwrap().r.name, "web1");
    assert!(
        idx.container_of(5, 1000, 1).is_none(),
        "host processes are no container's"
    );
    let (c, p) = idx.publisher(Proto::Tcp, ip("0.0.0.0"), 8080).unwrap();
    assert_eq!((&*c.r.name, p.container_port), ("web1", 80));
    assert!(idx.publisher(Proto::Udp, ip("0.0.0.0"), 8080).is_none());
    let s = idx.starting(Proto::Tcp, ip("0.0.0.0"), 8080);
    assert_eq!(s.len(), 1);
    assert_eq!(&*s[0].r.name, "web2");
    // Stopped: its namespace and published ports no longer place anyone.
    let mut a2 = (**idx.get(&"a".repeat(64)).unwrap()).clone();
    a2.state = State::Exited;
    idx.upsert(Arc::new(a2));
    assert!(idx.container_of(5, 2000, 63).is_none());
    assert!(idx.publisher(Proto::Tcp, ip("0.0.0.0"), 8080).is_none());
}

#[test]
fn host_network_container_found_through_proc() {
    let root = std::env::temp_dir().join(format!("pw-cg-{}", std::process::id()));
    let id = "c".repeat(64);
    std::fs::create_dir_all(root.join("77")).unwrap();
    std::fs::write(
        root.join("77/cgroup"),
        format!("4:memory:/docker/{id}\n0::/\n"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("78")).unwrap();
    std::fs::write(root.join("78/cgroup"), "0::/user.slice\n").unwrap();
    let mut idx = Index::new(1000, &root);
    let mut h = container('c', "hostnet", State::Running);
    h.pid = 77;
    h.netns = Some(1000);
    idx.replace_all("unix:///var/run/docker.sock", [Arc::new(h)]);
    assert_eq!(&*idx.container_of(77, 1000, 1).unwrap().r.name, "hostnet");
    assert!(idx.container_of(78, 1000, 1).is_none());
    std::fs::remove_dir_all(&root).unwrap();
}
