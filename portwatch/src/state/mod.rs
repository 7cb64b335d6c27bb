//! What the agent knows: the port table (who holds which port, and the attribution of a
//! conflict), bursts of identical failures, and service ports.

pub mod burst;
pub mod service;
pub mod table;
