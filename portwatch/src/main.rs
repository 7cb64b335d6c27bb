//! portwatch: who held this port when my bind failed, why, and what to do about it.
//!
//! Modules in the order an event travels: prereq/btf/probes (load and attach), decode
//! (kernel bytes to values), diag/table/enrich (the port table and /proc), process
//! (attribution and records), record (the JSON schema), sink (stdout and the log file),
//! control/metrics (attach, ports and Prometheus), agent (the pipeline that ties them).
//! Operator commands: ops (attach, ports, check, doctor), tail, history and report.

mod agent;
mod btf;
mod burst;
mod cli;
mod containers;
mod control;
mod decode;
mod diag;
mod docker;
mod enrich;
mod error;
mod heap;
mod history;
mod keys;
mod metrics;
mod model;
mod ops;
mod prereq;
mod probes;
mod process;
mod protocol;
mod reach;
mod record;
mod report;
mod rows;
mod service;
mod sink;
mod table;
mod tail;

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
        cli::Command::Attach(a) => ops::attach(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Ports(a) => ops::ports(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Check(a) => ops::check(&a).map_err(Into::into),
        cli::Command::Report(a) => report::run(&a).map(|()| 0).map_err(Into::into),
        cli::Command::Doctor(a) => Ok(ops::doctor(
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
