//! `portwatch attach`: the agent's recent past, then its live records.

use std::{
    io::{BufRead, Write},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    cli::AttachArgs,
    control::{self, Filter, Request},
    error::{Error, Result},
};

use crate::cli::render::{human_line, Style};

pub fn attach(a: &AttachArgs) -> Result<()> {
    let filter = Filter {
        port: a.port,
        pid: a.pid,
        container: a.container.clone(),
    };
    let since_s = a.since.map(|d| d.as_secs()).unwrap_or(0);
    let mut r = control::request(&a.runtime_dir, &Request::Attach { filter, since_s })?;
    let deadline = a.duration.map(|d| Instant::now() + d);
    if let Some(d) = deadline {
        // The read below blocks; a timeout on the socket ends it when the duration is up.
        let _ = r
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let _ = d;
    }
    let st = Style::for_stdout();
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(source) => {
                return Err(Error::Io {
                    what: "reading from the agent",
                    source,
                })
            }
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let (None, Some(e)) = (v["type"].as_str(), v["error"].as_str()) {
            return Err(Error::Agent(e.to_string()));
        }
        let ok = if a.json {
            out.write_all(line.as_bytes())
        } else {
            writeln!(out, "{}", human_line(&line, &st))
        };
        if ok.and_then(|_| out.flush()).is_err() {
            break; // stdout closed (e.g. piped into head)
        }
    }
    Ok(())
}
