//! A port holder for the end-to-end tests, run as its own process so that holders have a
//! pid, comm and command line of their own (and can be started in another namespace with
//! `ip netns exec`).
//!
//!   pw-hold tcp-listen ADDR | tcp-bind ADDR | udp ADDR | tcp6-dual ADDR
//!
//! Prints "ready" once the socket is in place, then holds it until stdin closes.

use std::{io::Read, net::SocketAddr};

use portwatch_tests::{bind, listen, set_v6only, socket, SOCK_DGRAM, SOCK_STREAM};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, addr) = match args.as_slice() {
        [_, m, a] => (
            m.as_str(),
            a.parse::<SocketAddr>().expect("ADDR like 127.0.0.1:8080"),
        ),
        _ => {
            eprintln!("usage: pw-hold tcp-listen|tcp-bind|udp|tcp6-dual ADDR");
            std::process::exit(2);
        }
    };
    let fd = match mode {
        "udp" => socket(&addr, SOCK_DGRAM, false),
        _ => socket(&addr, SOCK_STREAM, false),
    };
    if mode == "tcp6-dual" {
        set_v6only(&fd, false);
    }
    bind(&fd, &addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    if mode == "tcp-listen" || mode == "tcp6-dual" {
        listen(&fd).expect("listen");
    }
    println!("ready");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(fd);
}
