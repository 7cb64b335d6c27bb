//! Constructors for the records whose fields are nearly all optional: the agent fills in
//! what each event says over `new(event)`.

use crate::{Agent, AgentEvent, Docker, DockerEvent};

impl Docker {
    /// A `docker` record with only its event: the agent fills what the event says.
    pub fn new(event: DockerEvent) -> Self {
        Docker {
            event,
            endpoint: None,
            engine: None,
            api_version: None,
            server_version: None,
            containers: None,
            running: None,
            sync_ms: None,
            cgroup: None,
            reason: None,
            container: None,
            pid: None,
            netns: None,
            cgroup_id: None,
            cgroup_path: None,
            network_mode: None,
            networks: None,
            ports: None,
            exit_code: None,
            missed: false,
            proto: None,
            host_ip: None,
            host_port: None,
            container_port: None,
            listening: None,
            hint: None,
        }
    }
}

impl Agent {
    /// An `agent` record with only its event: the agent fills what the event says.
    pub fn new(event: AgentEvent) -> Self {
        Agent {
            event,
            version: None,
            pid: None,
            mode: None,
            hooks: None,
            hooks_why: None,
            functions: None,
            programs: None,
            ports: None,
            ringbuf_bytes: None,
            netns_source: None,
            tracefs_mounted: None,
            startup_ms: None,
            log_file: None,
            table_size: None,
            namespaces: None,
            reason: None,
            records: None,
            lost_total: None,
            log_write_errors: None,
            stdout_write_errors: None,
            drift_healed: None,
            unwritten: None,
            failed_records: None,
            uptime_s: None,
        }
    }
}
