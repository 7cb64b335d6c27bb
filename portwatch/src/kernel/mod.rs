//! The kernel side: prerequisites, BTF offsets, loading and attaching the programs, and decoding
//! their events.

pub mod btf;
pub mod decode;
pub mod prereq;
pub mod probes;
