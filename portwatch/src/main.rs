//! portwatch: who held this port when my bind failed, why, and what to do about it.
//!
//! Modules in the order an event travels: prereq/btf/probes (load and attach), decode
//! (kernel bytes to values), enrich (/proc), diag/table (the port table), docker/containers
//! (the container index), process (attribution), record (the JSON schema), sink (outputs),
//! agent (the pipeline that ties them), cli.

mod agent;
mod btf;
mod cli;
mod containers;
mod decode;
mod diag;
mod docker;
mod enrich;
mod error;
mod prereq;
mod probes;
mod process;
mod record;
mod sink;
mod table;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match rt {
                Ok(rt) => rt.block_on(agent::run(args)).map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed, on what, what to do.
            eprintln!("portwatch: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
