//! What the host tells: sock_diag dumps of every namespace, and /proc (owners, command lines).

pub mod diag;
pub mod enrich;
