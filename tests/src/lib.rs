//! Helpers for portwatch's end-to-end tests: start the real agent, make real sockets (in
//! real network namespaces), read its JSON. The tests need root and a kernel with BTF and
//! tracepoints; they fail (never skip) when those are missing, because CI runs as root.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

pub use portwatch_schema::{self as schema, Body, Record};
use serde_json::Value;

pub mod docker;
pub mod podman;

mod agent;
mod net;
mod records;

pub use agent::*;
pub use net::*;
pub use records::*;
