//! A real compose project (Debian's docker-compose 1.29): two projects publish the same
//! host port, the second `up` fails with "port is already allocated". The log must say so
//! once, naming both containers, and nothing else: starting a container on a compose
//! network makes dockerd run iptables, whose UDP connect to [::1]:53 in the new namespace
//! fails with EADDRNOTAVAIL (no such address there), which is no port exhaustion.

use std::{path::PathBuf, process::Command, time::Duration};

use portwatch_tests::{
    docker::*,
    schema::{Cause, Op},
    *,
};

/// A compose project in a directory of its own, taken down on drop.
struct Project {
    dir: PathBuf,
    name: String,
}

impl Project {
    fn new(tag: &str, host_port: u16) -> Project {
        let name = unique(tag).replace('-', "");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("docker-compose.yml"),
            format!(
                "version: \"3\"\nservices:\n  web:\n    image: {TEST_IMAGE}\n    command: \
                 [\"httpd\", \"-f\", \"-p\", \"80\"]\n    ports:\n      - \"{host_port}:80\"\n"
            ),
        )
        .unwrap();
        Project { dir, name }
    }

    /// `docker-compose -p NAME ARGS`: (success, stderr).
    fn compose(&self, args: &[&str]) -> (bool, String) {
        let o = Command::new("docker-compose")
            .current_dir(&self.dir)
            .args(["-p", &self.name])
            .args(args)
            .output()
            .expect("docker-compose is installed by `cargo xtask test`");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-t", "0"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_second_project_on_the_same_port_is_one_record_and_no_false_exhaustion() {
    require_docker();
    let port = free_port(97);
    // No --port filter: the iptables connect on port 53 must be seen if it is reported.
    let agent = Agent::start(&["--docker-host", "unix:///var/run/docker.sock"]);
    wait_docker_connected(&agent);
    let one = Project::new("cmpa", port);
    let two = Project::new("cmpb", port);
    let (ok, err) = one.compose(&["up", "-d"]);
    assert!(ok, "the first project starts: {err}");
    let (ok, err) = two.compose(&["up", "-d"]);
    assert!(!ok, "the second project must fail");
    assert!(
        err.contains("port is already allocated"),
        "docker-compose said: {err}"
    );

    let first = format!("{}_web_1", one.name);
    let second = format!("{}_web_1", two.name);
    let is_publish = |r: &Record| {
        r.conflict()
            .is_some_and(|c| c.op == Op::DockerPublish && c.port == port)
    };
    let r = agent.wait_record("docker_publish conflict", is_publish);
    let c = r.conflict().expect("matched as a conflict");
    assert_eq!(c.cause, Cause::PortAlreadyAllocated, "{c:?}");
    assert_eq!(
        c.actor.container().map(|x| x.name.as_str()),
        Some(second.as_str()),
        "{c:?}"
    );
    assert_eq!(
        c.holders
            .first()
            .and_then(|h| h.container.as_ref())
            .map(|x| x.name.as_str()),
        Some(first.as_str()),
        "{c:?}"
    );
    // Time for a duplicate, or the iptables connects' records, to show up.
    std::thread::sleep(Duration::from_secs(3));
    let done = agent.stop();
    let publish: Vec<&Record> = done.records.iter().filter(|r| is_publish(r)).collect();
    assert_eq!(publish.len(), 1, "one record for one failure: {publish:?}");
    let exhausted: Vec<&Record> = done
        .records
        .iter()
        .filter(|r| {
            r.conflict()
                .is_some_and(|c| c.cause == Cause::EphemeralExhausted)
        })
        .collect();
    assert!(exhausted.is_empty(), "no port was exhausted: {exhausted:?}");
    let count = publish[0].conflict().map(|c| c.count);
    assert_eq!(count, Some(1), "{:?}", publish[0]);
}
