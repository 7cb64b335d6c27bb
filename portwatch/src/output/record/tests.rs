use super::*;

/// The hand-written tcp_state encoder must match serde's output byte for byte.
#[test]
fn tcp_state_fast_path_matches_serde() {
    let mut e = Event::zeroed();
    e.kind = kind::TCP_STATE;
    e.pid = 77;
    e.family = AF_INET;
    e.port = 8080;
    e.rport = 41000;
    e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    e.raddr[..4].copy_from_slice(&[10, 1, 2, 3]);
    e.old_state = 5;
    e.new_state = 7;
    e.netns = 4026531840;
    let mut v6 = e;
    v6.family = portwatch_common::AF_INET6;
    v6.addr = [0; 16];
    v6.addr[15] = 1;
    v6.raddr = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    v6.old_state = 10;
    let mut wide = e;
    wide.addr[..4].copy_from_slice(&[192, 168, 255, 0]);
    wide.raddr[..4].copy_from_slice(&[9, 99, 100, 255]);
    wide.port = 0;
    wide.rport = 65535;
    wide.pid = u32::MAX;
    for (e, host) in [(e, "lab1"), (wide, "lab1"), (v6, "we\"ird\\host\u{1}é")] {
        let wall = 1_764_000_000_123_456_789;
        let r = record(&Text::copy(host), wall, tcp_state(&e));
        let mut fast = b"left alone".to_vec();
        write_tcp_state(
            &mut fast,
            crate::kernel::decode::rfc3339(wall).as_bytes(),
            serde_json::to_string(host).unwrap().as_bytes(),
            &e,
        );
        let fast = fast.split_off(10);
        assert_eq!(
            String::from_utf8(fast).unwrap(),
            serde_json::to_string(&r).unwrap()
        );
    }
}
use portwatch_common::{kind, AF_INET, IPPROTO_TCP};

fn bind_fail() -> Event {
    let mut e = Event::zeroed();
    e.kind = kind::BIND;
    e.pid = 4242;
    e.tid = 4243;
    e.ret = -98;
    e.family = AF_INET;
    e.proto = IPPROTO_TCP;
    e.port = 8080;
    e.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
    e.comm[..5].copy_from_slice(b"nginx");
    e.netns = 4026531840;
    e
}

#[test]
fn conflict_has_schema_v1_fields() {
    let e = bind_fail();
    assert!(is_conflict(&e, Kind::Bind));
    let c = record(
        &Text::from("lab1"),
        0,
        Body::Conflict(conflict(
            &crate::kernel::decode::rfc3339(0),
            &e,
            Kind::Bind,
            e.netns,
            actor(&e, None),
        )),
    );
    let v: serde_json::Value = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(v["v"], 1);
    assert_eq!(v["type"], "conflict");
    assert_eq!(v["host"], "lab1");
    assert_eq!(v["ts"], "1970-01-01T00:00:00.000000000Z");
    assert_eq!(v["op"], "bind");
    assert_eq!(v["error"], "EADDRINUSE");
    assert_eq!(v["errno"], 98);
    assert_eq!(v["proto"], "tcp");
    assert_eq!(v["family"], "ipv4");
    assert_eq!(v["addr"], "127.0.0.1");
    assert_eq!(v["port"], 8080);
    assert_eq!(v["netns"], 4026531840u64);
    assert_eq!(v["actor"]["pid"], 4242);
    assert_eq!(v["actor"]["tid"], 4243);
    assert_eq!(v["actor"]["comm"], "nginx");
    assert!(v["actor"]["cmdline"].is_null());
    assert!(v["holders"].as_array().unwrap().is_empty());
    assert_eq!(v["cause"], "unknown");
}

#[test]
fn successful_bind_is_not_a_conflict() {
    let mut e = bind_fail();
    e.ret = 0;
    assert!(!is_conflict(&e, Kind::Bind));
    e.kind = kind::CONNECT;
    e.ret = -111;
    assert!(!is_conflict(&e, Kind::Connect));
    e.ret = -99;
    assert!(is_conflict(&e, Kind::Connect));
}
