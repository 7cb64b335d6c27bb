//! Command line: one subcommand per user task.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
        sudo portwatch run --log-file /var/log/portwatch/events.jsonl\n  \
        sudo portwatch run --all-events --port 8080 --port 8443\n  \
        sudo portwatch run --docker-host unix:///run/user/1000/docker.sock")]
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Also append every record to this file (created if missing).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,

    /// Log every bind, listen, close, exit and tcp_state record, not only conflicts.
    #[arg(long)]
    pub all_events: bool,

    /// Only watch these ports (repeatable, at most 16). Filtered in the kernel.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least 4096.
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

    /// The Docker daemon to join: unix:///path, a socket path, or tcp://HOST:PORT (default:
    /// $DOCKER_HOST, else unix:///var/run/docker.sock). Conflicts then name containers,
    /// and Docker's own port failures become conflict records.
    #[arg(long, value_name = "URL", conflicts_with = "no_docker")]
    pub docker_host: Option<String>,

    /// Do not join the Docker daemon (no container names, no `docker` records).
    #[arg(long)]
    pub no_docker: bool,

    /// Do not read the network namespace in the kernel; read /proc/<pid>/ns/net instead
    /// (the fallback used when kernel offsets cannot be resolved from BTF).
    #[arg(long, hide = true)]
    pub no_btf_offsets: bool,
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
    fn ringbuf_size_must_be_power_of_two() {
        assert_eq!(parse_ringbuf_size("4096"), Ok(4096));
        assert!(parse_ringbuf_size("5000").is_err());
        assert!(parse_ringbuf_size("1024").is_err());
        assert!(parse_ringbuf_size("x").is_err());
    }

    #[test]
    fn port_zero_rejected() {
        assert!(Cli::try_parse_from(["portwatch", "run", "--port", "0"]).is_err());
        let c =
            Cli::try_parse_from(["portwatch", "run", "--port", "80", "--port", "8080"]).unwrap();
        let Command::Run(r) = c.command;
        assert_eq!(r.ports, vec![80, 8080]);
    }
}
