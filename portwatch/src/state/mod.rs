//! What the agent knows: the port table and its model, bursts, service ports, rows for `ports`.

pub mod burst;
pub mod service;
pub mod table;
