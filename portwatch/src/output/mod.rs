//! Records out: the schema, their keys, the stdout/log sink and the Prometheus metrics.

pub mod keys;
pub mod metrics;
pub mod record;
pub mod sink;
