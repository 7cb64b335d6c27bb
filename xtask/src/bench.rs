//! `cargo xtask bench`: side-by-side benchmarks (filled in below).

use anyhow::Result;

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> Result<()> {
    anyhow::bail!("bench: not implemented yet")
}
