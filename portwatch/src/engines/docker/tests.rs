use super::*;

#[test]
fn endpoints() {
    assert_eq!(
        endpoint(Some("unix:///run/docker.sock")).unwrap(),
        Endpoint::Unix("/run/docker.sock".into())
    );
    assert_eq!(
        endpoint(Some("/tmp/d.sock")).unwrap(),
        Endpoint::Unix("/tmp/d.sock".into())
    );
    assert_eq!(
        endpoint(Some("tcp://127.0.0.1:2375")).unwrap(),
        Endpoint::Tcp("tcp://127.0.0.1:2375".into())
    );
    let e = endpoint(Some("ssh://lab1")).unwrap_err().to_string();
    assert!(e.contains("ssh://lab1") && e.contains("unix://"), "{e}");
    assert_eq!(
        Endpoint::Unix("/var/run/docker.sock".into()).to_string(),
        DEFAULT_HOST
    );
}

#[test]
fn cgroup_layouts() {
    let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  40 25 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
    assert_eq!(
        parse_cgroup_layout(hybrid),
        (CgroupMode::Hybrid, Some("/sys/fs/cgroup/unified"))
    );
    let v2 = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(
        parse_cgroup_layout(v2),
        (CgroupMode::V2, Some("/sys/fs/cgroup"))
    );
    let v1 = "35 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
    assert_eq!(parse_cgroup_layout(v1), (CgroupMode::V1, None));
}

#[test]
fn cgroup_paths_v1_and_v2() {
    let t = "4:memory:/docker/abc\n1:cpu:/docker/abc\n0::/docker/abc\n";
    assert_eq!(cgroup_paths(t), (Some("/docker/abc"), Some("/docker/abc")));
    let v1_only = "4:memory:/docker/abc\n";
    assert_eq!(cgroup_paths(v1_only), (None, Some("/docker/abc")));
}

fn join() -> Join<DockerMsg> {
    let (tx, _rx) = mpsc::channel(1);
    Join {
        ep: Endpoint::Unix(DEFAULT_HOST.into()),
        tx,
        view: HashMap::new(),
        synced_once: false,
        proc_root: PathBuf::from("/nonexistent"),
        cgroup2: None,
        engine: "docker",
    }
}

fn lifecycles(ms: &[DockerMsg]) -> Vec<(&'static str, String, bool)> {
    ms.iter()
        .map(|m| match m {
            DockerMsg::Lifecycle(l) => (l.event, l.container.r.name.to_string(), l.missed),
            other => panic!("not a lifecycle message: {other:?}"),
        })
        .collect()
}

fn c(digit: char, name: &str, state: State) -> Arc<Container> {
    let mut c = crate::engines::containers::tests::container(digit, name, state);
    if state.is_live() {
        c.published = vec![port_map("80/tcp", Some("0.0.0.0"), Some("8080")).unwrap()];
    }
    Arc::new(c)
}

#[test]
fn resync_reports_what_changed_meanwhile_once() {
    let mut j = join();
    // First sync: the baseline, nothing to report.
    let first = j.adopt(&[
        c('a', "stays", State::Running),
        c('b', "stops", State::Running),
        c('d', "goes", State::Running),
        c('e', "idle", State::Exited),
    ]);
    assert!(first.is_empty());
    // The daemon was away; meanwhile one stopped, one was removed, one started.
    let again = j.adopt(&[
        c('a', "stays", State::Running),
        c('b', "stops", State::Exited),
        c('e', "idle", State::Running),
        c('f', "new", State::Created),
    ]);
    let mut got = lifecycles(&again);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("destroy", "goes".into(), true),
            ("die", "goes".into(), true),
            ("die", "stops".into(), true),
            ("start", "idle".into(), true),
        ]
    );
    // The stopped one still says which ports it freed.
    let die = again.iter().find_map(|m| match m {
        DockerMsg::Lifecycle(l) if l.event == "die" && &*l.container.r.name == "stops" => Some(l),
        _ => None,
    });
    assert_eq!(die.unwrap().container.published.len(), 1);
    // The same state again: nothing new.
    let same = j.adopt(&[
        c('a', "stays", State::Running),
        c('b', "stops", State::Exited),
        c('e', "idle", State::Running),
        c('f', "new", State::Created),
    ]);
    assert!(same.is_empty(), "{same:?}");
}

#[test]
fn inspect_of_a_running_container() {
    // The shape Docker 20.10 (API 1.41) returns, trimmed to what is read.
    let json = r#"{
      "Id": "8b9af854e0580aa6a5fd34c75ca7350e8eb7253d0a0c2cc7007ab72f55a004a6",
      "Name": "/web1",
      "State": {"Status": "running", "Running": true, "Pid": 0, "Error": ""},
      "Config": {"Image": "nginx:1.27", "Labels": {"com.docker.compose.project": "shop",
                 "com.docker.compose.service": "web"}},
      "HostConfig": {"NetworkMode": "default",
                     "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}},
      "NetworkSettings": {
        "Ports": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"},
                             {"HostIp": "::", "HostPort": "8080"}], "443/tcp": null},
        "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}}
    }"#;
    let r: ContainerInspectResponse = serde_json::from_str(json).unwrap();
    let engine = Engine {
        name: "podman",
        endpoint: "unix:///run/podman/podman.sock".into(),
    };
    let c = container_from(&r, Path::new("/nonexistent"), None, &engine).unwrap();
    assert_eq!(c.r.engine, "podman");
    assert_eq!(&*c.endpoint, "unix:///run/podman/podman.sock");
    assert_eq!(&*c.r.id, "8b9af854e058");
    assert_eq!(&*c.r.name, "web1");
    assert_eq!(&*c.r.image, "nginx:1.27");
    assert_eq!(c.r.compose_project.as_deref(), Some("shop"));
    assert_eq!(c.r.compose_service.as_deref(), Some("web"));
    assert_eq!(c.state, State::Running);
    assert_eq!(c.published.len(), 2);
    assert_eq!(c.published[0].host_port, 8080);
    assert_eq!(c.bindings.len(), 1);
    assert_eq!(c.networks[0].ip, Some("172.17.0.2".parse().unwrap()));
    let v = serde_json::to_value(&*c.r).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"id":"8b9af854e058","engine":"podman","name":"web1",
                           "image":"nginx:1.27","compose_project":"shop","compose_service":"web"})
    );
}
