//! "Container starts but port not accessible": a container publishes host port P to its
//! port C, but nothing in its network namespace listens on C where the published traffic
//! arrives. Most often the service listens on 127.0.0.1 only, which cannot be seen from the
//! host: Docker forwards published traffic to the container's own address.
//!
//! Pure judgement over the listeners the table holds for the container's namespace, tested
//! without a kernel; the processing thread decides when to look (a few seconds after the
//! container starts, after each re-read of its namespace, and on each listen there).

use std::net::IpAddr;

use serde::Serialize;

use crate::{engines::containers::PortMap, state::table::Proto};

/// A socket listening (TCP) or bound (UDP) on the container port, inside the container:
/// the schema's own type.
pub use portwatch_schema::Listening;

/// Whether published traffic for `pm` can reach a listener. `listeners` are (proto, local
/// address, port, listening-or-bound) of the namespace's sockets; `ips` the container's
/// addresses on its networks. Returns None when reachable, else what does listen on the
/// container port (possibly nothing).
pub fn judge(
    pm: &PortMap,
    listeners: impl Iterator<Item = (Proto, IpAddr, u16)>,
    ips: &[IpAddr],
) -> Option<Vec<Listening>> {
    let mut on_port = Vec::new();
    for (proto, addr, port) in listeners {
        if proto != pm.proto || port != pm.container_port {
            continue;
        }
        if addr.is_unspecified() || ips.contains(&addr) {
            return None;
        }
        let l = Listening { addr, port };
        if !on_port.contains(&l) {
            on_port.push(l);
        }
    }
    Some(on_port)
}

/// The hint for an unreachable published port.
pub fn hint(container: &str, pm: &PortMap, listening: &[Listening], comm: Option<&str>) -> String {
    let c = pm.container_port;
    let proto = pm.proto.name();
    match listening.first() {
        Some(l) if l.addr.is_loopback() => format!(
            "{} in {container} listens on {} only, which published traffic cannot reach; make \
             it listen on {}",
            comm.unwrap_or("the service"),
            crate::state::table::fmt_addr(l.addr, l.port),
            if l.addr.is_ipv4() {
                format!("0.0.0.0:{c}")
            } else {
                format!("[::]:{c}")
            }
        ),
        Some(l) => format!(
            "{} in {container} listens on {} only, not on the address published traffic \
             arrives at; make it listen on 0.0.0.0:{c}",
            comm.unwrap_or("the service"),
            crate::state::table::fmt_addr(l.addr, l.port),
        ),
        None => format!(
            "nothing in {container} listens on {proto} port {c}, which host port {} is \
             published to; start the service, or publish the port it does listen on",
            pm.host_port
        ),
    }
}

/// One published port as `check P` reports it.
#[derive(Debug, Serialize)]
pub struct Published {
    pub container: String,
    pub proto: &'static str,
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub container_port: u16,
    pub reachable: bool,
    /// What listens on the container port inside (when unreachable), possibly nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listening: Option<Vec<Listening>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(c: u16) -> PortMap {
        PortMap {
            proto: Proto::Tcp,
            host_ip: "0.0.0.0".parse().unwrap(),
            host_port: 8080,
            host_port_end: 8080,
            container_port: c,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_only_is_unreachable_and_says_so() {
        let ips = [ip("172.17.0.2")];
        let l = vec![(Proto::Tcp, ip("127.0.0.1"), 80)];
        let v = judge(&pm(80), l.into_iter(), &ips).unwrap();
        assert_eq!(
            v,
            [Listening {
                addr: ip("127.0.0.1"),
                port: 80
            }]
        );
        let h = hint("web1", &pm(80), &v, Some("nginx"));
        assert_eq!(
            h,
            "nginx in web1 listens on 127.0.0.1:80 only, which published traffic cannot \
             reach; make it listen on 0.0.0.0:80"
        );
    }

    #[test]
    fn wildcard_or_own_address_is_reachable() {
        let ips = [ip("172.17.0.2")];
        for a in ["0.0.0.0", "::", "172.17.0.2"] {
            let l = vec![(Proto::Tcp, ip("127.0.0.1"), 80), (Proto::Tcp, ip(a), 80)];
            assert_eq!(judge(&pm(80), l.into_iter(), &ips), None, "{a}");
        }
    }

    #[test]
    fn nothing_on_the_port_or_another_protocol() {
        let l = vec![
            (Proto::Udp, ip("0.0.0.0"), 80),
            (Proto::Tcp, ip("0.0.0.0"), 81),
        ];
        let v = judge(&pm(80), l.into_iter(), &[]).unwrap();
        assert!(v.is_empty());
        assert!(
            hint("web1", &pm(80), &v, None).starts_with("nothing in web1 listens on tcp port 80")
        );
    }
}
