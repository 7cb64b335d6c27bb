//! Container engines: the Docker API client, the container index, published ports' reachability.

pub mod containers;
pub mod docker;
pub mod reach;
