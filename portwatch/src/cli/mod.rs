//! Command line: one subcommand per user task. Doc comments are the help text.

pub mod attach;
pub mod check;
pub mod doctor;
pub mod history;
pub mod ports;
pub mod render;
pub mod report;
pub mod tail;

use std::{net::IpAddr, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{control::DEFAULT_RUNTIME_DIR, output::sink::DEFAULT_LOG};

#[derive(Debug, Parser)]
#[command(
    name = "portwatch",
    version,
    about = "Watch every port on this host: who held it when a bind failed, why, and what to do",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs and log port conflicts as JSON lines (needs root).
    #[command(after_help = "Examples:\n  \
        sudo portwatch run\n  \
        sudo portwatch run --log-file /var/log/portwatch/events.jsonl --log-max-size 50M\n  \
        sudo portwatch run --all-events --port 8080 --port 8443\n  \
        sudo portwatch run --metrics-addr 127.0.0.1:9560\n  \
        sudo portwatch run --docker-host unix:///run/user/1000/docker.sock")]
    Run(RunArgs),

    /// Read the JSON log: readable on a terminal, filtered, followed across rotation.
    #[command(after_help = "Examples:\n  \
        portwatch tail -f\n  \
        portwatch tail --since 10m --type conflict --port 8080\n  \
        portwatch tail /var/log/portwatch/events.jsonl --container web1 --json | jq .hint")]
    Tail(TailArgs),

    /// Who held PORT, from when to when, the conflicts in between, and the gaps (from the log).
    #[command(after_help = "Examples:\n  \
        portwatch history 8080\n  \
        portwatch history 8080 --since 1d --proto tcp\n  \
        portwatch history 8080 /var/log/portwatch/events.jsonl --since 2026-11-30T03:00:00Z --until 2026-11-30T04:00:00Z --json")]
    History(HistoryArgs),

    /// Attach to the running agent: replay the recent past, then stream live detail.
    #[command(after_help = "Examples:\n  \
        sudo portwatch attach --port 8080 --since 60s\n  \
        sudo portwatch attach --container web1 --duration 2m --json")]
    Attach(AttachArgs),

    /// Show who holds which port now (from the agent, or a one-shot snapshot).
    #[command(after_help = "Examples:\n  \
        sudo portwatch ports\n  \
        sudo portwatch ports --port 8080\n  \
        sudo portwatch ports --state listen --json")]
    Ports(PortsArgs),

    /// Would binding PORT succeed right now? Exit 0 if yes, 1 if not (with who and why).
    #[command(after_help = "Examples:\n  \
        portwatch check 8080\n  \
        portwatch check 5353 --proto udp --addr 127.0.0.1\n  \
        portwatch check --suggest 3 --range 8080-8090")]
    Check(CheckArgs),

    /// Check this host for everything portwatch needs, with a fix for each failure.
    #[command(after_help = "Example:\n  sudo portwatch doctor")]
    Doctor(DoctorArgs),

    /// Gather what a port-conflict bug report needs into one .tar.gz: the port table, the
    /// window's conflicts and port history, every container and network (secrets redacted),
    /// the agent's status and hooks, and the Docker engine's version and journal.
    #[command(after_help = "Examples:\n  \
        sudo portwatch report\n  \
        sudo portwatch report --port 8080 --since 10m -o /tmp/report.tar.gz\n  \
        sudo portwatch report --since 2h -o /tmp")]
    Report(ReportArgs),

    /// Print shell completions.
    #[command(
        after_help = "Example:\n  portwatch completions bash > /etc/bash_completion.d/portwatch"
    )]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff).
    #[command(after_help = "Example:\n  portwatch man > /usr/local/share/man/man1/portwatch.1")]
    Man,
}

/// `10m`, `60s`, `2h`.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration like 30s, 10m or 2h ({e})"))
}

/// `100M`, `1G`, `65536`.
fn size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("'{s}' is not a size like 100M, 1G or 65536"))
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("'{s}' is not a range like 8080-8090"))?;
    let a: u16 = a.parse().map_err(|_| format!("'{a}' is not a port"))?;
    let b: u16 = b.parse().map_err(|_| format!("'{b}' is not a port"))?;
    if a == 0 || a > b {
        return Err(format!(
            "'{s}': the range must go from a low port (>= 1) to a higher one"
        ));
    }
    Ok((a, b))
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Append every record to this file (created with its directory if missing).
    /// As root the default is /var/log/portwatch/events.jsonl.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Write no log file (stdout only).
    #[arg(long, conflicts_with = "log_file")]
    pub no_log_file: bool,

    /// Rotate the log file when it would grow past this size (0: never).
    #[arg(long, value_name = "SIZE", default_value = "100M", value_parser = size)]
    pub log_max_size: u64,

    /// Rotated log files to keep (events.jsonl.1 ... .N).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub log_keep: u32,

    /// Log every bind, listen, close, exit and tcp_state record, not only conflicts.
    #[arg(long)]
    pub all_events: bool,

    /// Which kernel hooks carry bind, listen, connect and close: `trampoline` (fentry/fexit
    /// on the kernel functions behind them; only those calls pay), `tracepoint` (the
    /// syscall tracepoints; every syscall on the host pays a little), or `auto`: trampolines
    /// where the kernel allows them, else tracepoints.
    #[arg(long, value_enum, value_name = "FAMILY", default_value_t = crate::kernel::probes::HookChoice::Auto, env = "PORTWATCH_HOOKS")]
    pub hooks: crate::kernel::probes::HookChoice,

    /// Only watch these ports (repeatable, at most 16). Filtered in the kernel.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Size of each kernel-to-agent ring buffer in bytes (one for prompt events, one for a
    /// storm's repeated failures): a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = parse_ringbuf_size)]
    pub ringbuf_size: u32,

    /// Host name written in every record (default: the kernel's hostname).
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,

    /// Interval between checks of the kernel's loss counters, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=60000))]
    pub lost_interval_ms: u64,

    /// Seconds between sock_diag reconciliations of the port table, each followed by one
    /// `time_wait` record per network namespace that has TIME_WAIT sockets.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub tw_interval: u64,

    /// Emit a `pressure` record when one destination takes this share (percent) of the
    /// ephemeral port range.
    #[arg(long, value_name = "PCT", default_value_t = 50.0)]
    pub pressure_pct: f64,

    /// How much recent past `attach` can replay.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = duration)]
    pub window: Duration,

    /// Directory for the control socket and the single-instance lock.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,

    /// Also let members of this group (name or gid) use the control socket.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Serve Prometheus metrics on this address (off by default; use a loopback address
    /// unless you mean to expose them).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A container engine's Docker API to join: unix:///path, a socket path, or
    /// tcp://HOST:PORT; repeat it to join several (Docker and Podman). Default: $DOCKER_HOST,
    /// else unix:///var/run/docker.sock, plus Podman's unix:///run/podman/podman.sock when
    /// that socket exists. Conflicts then name containers, and the engines' own port
    /// failures become conflict records.
    #[arg(long, value_name = "URL", conflicts_with = "no_docker")]
    pub docker_host: Vec<String>,

    /// Do not join the Docker daemon (no container names, no `docker` records).
    #[arg(long)]
    pub no_docker: bool,

    /// Do not read the network namespace in the kernel; read /proc/<pid>/ns/net instead
    /// (the fallback used when kernel offsets cannot be resolved from BTF).
    #[arg(long, hide = true)]
    pub no_btf_offsets: bool,
}

impl RunArgs {
    /// The log file: explicit, or the default when root and not disabled.
    pub fn log_path(&self) -> Option<PathBuf> {
        if self.no_log_file {
            return None;
        }
        self.log_file.clone().or_else(|| {
            // SAFETY: no preconditions.
            nix::unistd::geteuid()
                .is_root()
                .then(|| PathBuf::from(DEFAULT_LOG))
        })
    }
}

#[derive(Debug, Args)]
pub struct TailArgs {
    /// Log file (default: /var/log/portwatch/events.jsonl). Rotated files next to it
    /// (PATH.1, PATH.2.gz, ...) are read first, oldest first.
    pub path: Option<PathBuf>,
    /// Keep reading as records arrive, across rotation.
    #[arg(short, long)]
    pub follow: bool,
    /// Only records newer than this (e.g. 10m).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub since: Option<Duration>,
    /// Only records of this type (conflict, lost, time_wait, bind, ...).
    #[arg(long = "type", value_name = "TYPE")]
    pub r#type: Option<String>,
    /// Only records about this port.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Only records about this container (name or id prefix).
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// Print the raw JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The port.
    pub port: u16,
    /// Log file (default: /var/log/portwatch/events.jsonl). Rotated and compressed files next
    /// to it are read too, oldest first.
    pub path: Option<PathBuf>,
    /// Only what overlaps the time from this (a duration ago like 1d or 90m, or an RFC 3339
    /// time).
    #[arg(long, value_name = "WHEN", value_parser = crate::kernel::decode::parse_when)]
    pub since: Option<i128>,
    /// Only what overlaps the time up to this (same forms as --since).
    #[arg(long, value_name = "WHEN", value_parser = crate::kernel::decode::parse_when)]
    pub until: Option<i128>,
    /// Only this protocol.
    #[arg(long, value_parser = ["tcp", "udp"])]
    pub proto: Option<String>,
    /// One JSON object per line: {"kind":"held"|"free"|"conflict",...}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Container name or id prefix.
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Replay this much of the recent past first (the agent keeps --window, 5m by default).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub since: Option<Duration>,
    /// Stop after this long (default: until interrupted).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub duration: Option<Duration>,
    /// Print the raw JSON lines.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PortsArgs {
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    #[arg(long, value_name = "NAME")]
    pub container: Option<String>,
    /// Only this state: listen, bound, udp, established, time_wait, ...
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The port to check.
    #[arg(required_unless_present = "suggest")]
    pub port: Option<u16>,
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
    pub proto: String,
    #[arg(long, default_value = "0.0.0.0")]
    pub addr: IpAddr,
    /// Print N free ports (TIME_WAIT and published ports count as taken).
    #[arg(long, value_name = "N")]
    pub suggest: Option<usize>,
    /// Where --suggest looks, e.g. 8080-8090 (default 1024-65535).
    #[arg(long, value_name = "LO-HI", value_parser = port_range, requires = "suggest")]
    pub range: Option<(u16, u16)>,
    #[arg(long)]
    pub json: bool,
    /// Where the running agent's control socket is: it says which containers publish the
    /// port and whether a listener inside answers.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    #[arg(long, value_name = "PATH", default_value = DEFAULT_LOG)]
    pub log_file: PathBuf,
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// Print the kernel verifier's whole log for each program it rejects (for a bug report).
    #[arg(long)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Only this port: its table rows, records and history (default: every port).
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// How far back to take records and the Docker daemon's journal.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = duration)]
    pub since: Duration,
    /// Write the bundle here: a file, an existing directory, or - for stdout (default:
    /// portwatch-report-<host>-<UTC time>.tar.gz in the current directory).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The agent's log file (rotated and compressed files next to it are read too).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_LOG)]
    pub log_file: PathBuf,
    /// The agent's runtime directory (its control socket).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,
    /// The Docker daemon: unix:///path, a socket path, or tcp://HOST:PORT (default:
    /// $DOCKER_HOST, else unix:///var/run/docker.sock).
    #[arg(long, value_name = "URL")]
    pub docker_host: Option<String>,
}

fn parse_ringbuf_size(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of bytes"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!(
            "{v} is not a power of two of at least 4096 (try 4096, 65536 or 4194304)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_an_example() {
        for sc in Cli::command().get_subcommands() {
            let help = sc
                .get_after_help()
                .map(std::string::ToString::to_string)
                .unwrap_or_default();
            assert!(help.contains("Example"), "{} has no example", sc.get_name());
        }
    }

    #[test]
    fn ringbuf_size_must_be_power_of_two() {
        assert_eq!(parse_ringbuf_size("4096"), Ok(4096));
        assert!(parse_ringbuf_size("5000").is_err());
        assert!(parse_ringbuf_size("1024").is_err());
        assert!(parse_ringbuf_size("x").is_err());
    }

    #[test]
    fn sizes_ranges_durations() {
        assert_eq!(size("100M"), Ok(100 << 20));
        assert_eq!(size("4096"), Ok(4096));
        assert!(size("lots").is_err());
        assert_eq!(port_range("8080-8090"), Ok((8080, 8090)));
        assert!(port_range("9-1").is_err());
        assert_eq!(duration("10m"), Ok(Duration::from_secs(600)));
        assert!(duration("soon").is_err());
    }

    #[test]
    fn port_zero_rejected() {
        assert!(Cli::try_parse_from(["portwatch", "run", "--port", "0"]).is_err());
        let c =
            Cli::try_parse_from(["portwatch", "run", "--port", "80", "--port", "8080"]).unwrap();
        let Command::Run(r) = c.command else { panic!() };
        assert_eq!(r.ports, vec![80, 8080]);
    }
}
