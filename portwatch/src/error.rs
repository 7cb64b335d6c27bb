//! Errors the agent can report. Every message says what failed, on what, and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "portwatch run needs root, or CAP_BPF and CAP_PERFMON (this process has {have}); \
         run it with sudo"
    )]
    NotPrivileged { have: String },

    #[error(
        "kernel BTF not found at {path}: portwatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.x have it)"
    )]
    NoBtf { path: PathBuf },

    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({source}); \
         run `mount -t tracefs nodev /sys/kernel/tracing` as root and try again"
    )]
    Tracefs {
        #[source]
        source: std::io::Error,
    },

    #[error("cannot read tracepoint {name} at {path} ({source}); is tracefs mounted?")]
    TracepointFormat {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "tracepoint {name} has no field '{field}' in its format file; this kernel is not supported"
    )]
    TracepointField {
        name: &'static str,
        field: &'static str,
    },

    // Boxed: aya's errors are large and would make every Result in the agent large.
    #[error("loading the eBPF programs into the kernel failed: {0}")]
    Load(Box<aya::EbpfError>),

    #[error(
        "attaching eBPF program {program} to tracepoint {category}:{tracepoint} failed: {source}; \
         check that tracefs is mounted and this kernel has the tracepoint (`portwatch doctor`)"
    )]
    Attach {
        program: &'static str,
        category: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error(
        "this kernel (Linux {release}) rejected eBPF program {program}: {reason}. portwatch \
         cannot run on it as built; `portwatch doctor` checks every program, and a report \
         with its output helps"
    )]
    Rejected {
        program: &'static str,
        release: String,
        reason: String,
        /// The verifier's whole log; `doctor --verbose` prints it.
        log: String,
    },

    #[error(
        "Linux {release} is too old: portwatch needs 5.8 or newer (its ring buffer map came \
         in 5.8); run it on a newer kernel"
    )]
    KernelTooOld { release: String },

    #[error(
        "--hooks trampoline: this kernel (Linux {release}) cannot carry portwatch's BPF \
         trampoline (fentry/fexit) programs: {reason}. Run with --hooks auto, which falls \
         back to syscall tracepoints, or --hooks tracepoint; `portwatch doctor` shows what \
         the kernel offers"
    )]
    NoTrampolines { release: String, reason: String },

    #[error("eBPF map {name} is missing or of the wrong type: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error(
        "cannot open log file {path} for appending ({source}); choose a writable path with \
         --log-file or fix its directory's permissions"
    )]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("too many --port values ({given}); at most {max} are supported")]
    TooManyPorts { given: usize, max: usize },

    #[error(
        "another portwatch agent is already running (pid {pid}, lock {lock}); stop it first \
         (`kill {pid}`) or give this one a different --runtime-dir"
    )]
    AlreadyRunning { pid: String, lock: PathBuf },

    #[error(
        "no portwatch agent is running (cannot connect to {path}: {source}); start one with \
         `sudo portwatch run`"
    )]
    NoAgent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the agent refused: {0}")]
    Agent(String),

    #[error("unknown group '{0}'; give a group name from /etc/group or a numeric gid")]
    UnknownGroup(String),

    #[error(
        "serving metrics on {addr} failed ({reason}); choose a free address with --metrics-addr"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        reason: String,
    },

    #[error(
        "--docker-host (or DOCKER_HOST) is {given:?}, which portwatch cannot use; give \
         unix:///path/to/docker.sock, a socket path, or tcp://HOST:PORT"
    )]
    DockerHost { given: String },

    #[error("{what} failed: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Why the Docker join is not (or no longer) connected. Written in `docker` records with
/// `event:"unavailable"`; the agent keeps running and retries.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error(
        "the Docker daemon at {endpoint} cannot be reached ({source}); start dockerd or point \
         --docker-host at it. portwatch keeps retrying and names containers again once it \
         answers"
    )]
    Unreachable {
        endpoint: String,
        #[source]
        source: bollard::errors::Error,
    },

    #[error("a Docker API request failed ({0}); the container index is resynced on reconnection")]
    Api(#[from] bollard::errors::Error),

    #[error(
        "the Docker event stream from {endpoint} ended ({why}); the daemon stopped or \
         restarted. portwatch reconnects and resyncs when it is back"
    )]
    StreamEnded { endpoint: String, why: String },

    #[error("the agent is stopping")]
    Stopped,
}

impl From<aya::EbpfError> for Error {
    fn from(e: aya::EbpfError) -> Self {
        Error::Load(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
