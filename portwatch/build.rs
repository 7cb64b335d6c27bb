use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the kernel programs (portwatch-ebpf) for the BPF target with the nightly toolchain
/// and leaves the object in OUT_DIR, where src/probes.rs embeds it: the agent ships alone.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .context("workspace root")?
        .join("portwatch-ebpf");
    let root = root.to_str().context("non-UTF-8 workspace path")?;
    aya_build::build_ebpf(
        [Package {
            name: "portwatch-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed; run `cargo xtask setup` to install rust-src for \
         the nightly toolchain and bpf-linker",
    )
}
