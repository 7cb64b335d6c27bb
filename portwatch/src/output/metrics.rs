//! Prometheus metrics (`--metrics-addr`, off by default). Counters are atomics updated by
//! the processing thread; a small HTTP server thread encodes them on each scrape.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc},
};

use portwatch_schema::Cause;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Static1 = [(&'static str, &'static str); 1];
type Ns = [(&'static str, String); 1];

pub struct Metrics {
    registry: Registry,
    conflicts: Family<Static1, Counter>,
    records: Family<Static1, Counter>,
    lost: Counter,
    time_wait: Family<Ns, Gauge>,
    table_size: Gauge,
    docker_connected: Gauge,
    log_errors: Gauge,
    reconcile_seconds: Gauge<f64, AtomicU64>,
    reconcile_sockets: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portwatch");
        let conflicts = Family::<Static1, Counter>::default();
        let records = Family::<Static1, Counter>::default();
        let lost = Counter::default();
        let time_wait = Family::<Ns, Gauge>::default();
        let table_size = Gauge::default();
        let docker_connected = Gauge::default();
        let log_errors = Gauge::default();
        let reconcile_seconds = Gauge::<f64, AtomicU64>::default();
        let reconcile_sockets = Gauge::default();
        registry.register("conflicts", "Port conflicts by cause", conflicts.clone());
        registry.register("records", "Records written, by type", records.clone());
        registry.register(
            "lost_events",
            "Kernel events lost (ring buffer or agent queue full)",
            lost.clone(),
        );
        registry.register(
            "time_wait_sockets",
            "TIME_WAIT sockets per network namespace",
            time_wait.clone(),
        );
        registry.register(
            "port_table_entries",
            "Sockets in the port table",
            table_size.clone(),
        );
        registry.register(
            "docker_connected",
            "1 when the Docker daemon is connected",
            docker_connected.clone(),
        );
        registry.register(
            "log_write_errors",
            "Records that could not be written to the log file",
            log_errors.clone(),
        );
        registry.register(
            "reconcile_seconds",
            "Duration of the last sock_diag reconciliation of one namespace",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_sockets",
            "Sockets in the last sock_diag reconciliation of one namespace",
            reconcile_sockets.clone(),
        );
        Metrics {
            reconcile_seconds,
            reconcile_sockets,
            registry,
            conflicts,
            records,
            lost,
            time_wait,
            table_size,
            docker_connected,
            log_errors,
        }
    }

    pub fn record_type(&self, ty: &'static str) {
        self.records.get_or_create(&[("type", ty)]).inc();
    }

    /// Count one written record, by the keys it was written with.
    pub fn record(&self, k: &crate::output::keys::Keys) {
        self.record_type(k.ty);
        match k.ty {
            "conflict" => {
                // A record stands for `count` identical failures (coalesced bursts).
                self.conflicts
                    .get_or_create(&[(
                        "cause",
                        // Known names only: a label's values stay bounded.
                        k.cause.as_ref().and_then(Cause::known).unwrap_or("unknown"),
                    )])
                    .inc_by(k.count.max(1));
            }
            "lost" => {
                self.lost.inc_by(k.count);
            }
            "time_wait" => {
                self.time_wait
                    .get_or_create(&[("netns", k.netns.to_string())])
                    .set(i64::try_from(k.total).unwrap_or(i64::MAX));
            }
            _ => {}
        }
    }

    pub fn set_table_size(&self, n: usize) {
        self.table_size.set(n as i64);
    }

    pub fn set_docker_connected(&self, up: bool) {
        self.docker_connected.set(i64::from(up));
    }

    pub fn set_reconcile(&self, sockets: usize, took: std::time::Duration) {
        self.reconcile_sockets.set(sockets as i64);
        self.reconcile_seconds.set(took.as_secs_f64());
    }

    pub fn set_log_errors(&self, n: u64) {
        self.log_errors.set(n as i64);
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// The Prometheus text format (0.0.4) from the OpenMetrics text prometheus-client writes, for
/// scrapers that do not ask for OpenMetrics (promtool check metrics, curl, older servers):
/// there a counter's HELP and TYPE name its samples, `_total` included, and there is no
/// `# EOF` or `# UNIT` line.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let (name, rest) = line.strip_prefix(p)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serve `/metrics` on `addr` from a thread. Returns an error if the address cannot be bound.
pub fn serve(addr: SocketAddr, m: Arc<Metrics>) -> Result<(), String> {
    let server = tiny_http::Server::http(addr).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("portwatch-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let resp = if req.url() == "/metrics" {
                    let openmetrics = req.headers().iter().any(|h| {
                        h.field.equiv("Accept")
                            && h.value.as_str().contains("application/openmetrics-text")
                    });
                    let (body, ct): (_, &[u8]) = if openmetrics {
                        (
                            m.encode(),
                            b"application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                    } else {
                        (
                            prometheus_text(&m.encode()),
                            b"text/plain; version=0.0.4; charset=utf-8",
                        )
                    };
                    let ct = tiny_http::Header::from_bytes(&b"Content-Type"[..], ct)
                        .expect("static header");
                    tiny_http::Response::from_string(body).with_header(ct)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::keys::Keys;

    #[test]
    fn counts_by_type_and_cause() {
        let m = Metrics::new();
        m.record(&Keys::from_value(
            &serde_json::json!({"v":1,"type":"conflict","cause":"listener"}),
        ));
        m.record(&Keys::from_value(
            &serde_json::json!({"v":1,"type":"conflict","cause":"listener"}),
        ));
        m.record(&Keys::from_value(
            &serde_json::json!({"v":1,"type":"lost","count":7}),
        ));
        m.record(&Keys::from_value(
            &serde_json::json!({"v":1,"type":"time_wait","netns":4_026_531_840_u32,"total":12}),
        ));
        m.set_table_size(42);
        let s = m.encode();
        assert!(
            s.contains(r#"portwatch_conflicts_total{cause="listener"} 2"#),
            "{s}"
        );
        assert!(
            s.contains(r#"portwatch_records_total{type="conflict"} 2"#),
            "{s}"
        );
        assert!(s.contains("portwatch_lost_events_total 7"), "{s}");
        assert!(
            s.contains(r#"portwatch_time_wait_sockets{netns="4026531840"} 12"#),
            "{s}"
        );
        assert!(s.contains("portwatch_port_table_entries 42"), "{s}");
    }
}
