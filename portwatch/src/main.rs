//! portwatch: who held this port when my bind failed, why, and what to do about it.
//!
//! Folders in the order an event travels (docs/architecture.md has the stage map):
//! `kernel` (prerequisites, BTF, the programs, decoding their events), `host` (sock_diag
//! and /proc), `state` (the port table, bursts, service ports), `engines` (Docker and
//! Podman), `process` (the processing thread: attribution, correlation, TIME_WAIT and
//! fan-out), `output` (the record schema, keys, sink, metrics), `control` (the socket and
//! its protocol), and `agent`, which wires them. `cli` holds the arguments and the
//! operator commands: ops (attach, ports, check, doctor), tail, history and report.

mod agent;
mod cli;
mod control;
mod engines;
mod error;
mod heap;
mod host;
mod kernel;
mod model;
mod output;
mod process;
mod state;

use cli::{attach::attach, check::check, doctor::doctor, history, ports::ports, report, tail};

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result: anyhow::Result<u8> = match cli.command {
        cli::Command::Run(args) => {
            heap::tune();
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("starting the async runtime failed: {e}"))
                .and_then(|rt| {
                    rt.block_on(agent::run(args))
                        .map(|()| 0)
                        .map_err(Into::into)
                })
        }
        cli::Command::Tail(a) => tail::run(&a).map(|()| 0).map_err(Into::into),
        cli::Command::History(a) => history::run(&a).map_err(Into::into),
        cli::Command::Attach(a) => attach(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Ports(a) => ports(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Check(a) => check(&a).map_err(Into::into),
        cli::Command::Report(a) => report::run(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Doctor(a) => Ok(doctor(
            &a.runtime_dir,
            &a.log_file,
            &a.docker_socket,
            a.verbose,
        )),
        cli::Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut cli::Cli::command(),
                "portwatch",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        cli::Command::Man => clap_mangen::Man::new(cli::Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| 0)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line: what failed, on what, what to do. Our errors already name their cause.
            eprintln!("portwatch: error: {e}");
            ExitCode::FAILURE
        }
    }
}
