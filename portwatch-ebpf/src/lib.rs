#![no_std]
// This file exists so that portwatch/build.rs can depend on this crate, which makes cargo
// rebuild the agent when the kernel programs change.
