//! Records for people: the readable one-line form `tail`, `attach` and `history` print.

use std::io::IsTerminal;

use serde_json::Value;

pub struct Style {
    pub color: bool,
}

impl Style {
    pub fn for_stdout() -> Self {
        Style {
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
        }
    }

    pub fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

fn addr_port(v: &Value) -> String {
    let a = v["addr"].as_str().unwrap_or("?");
    let p = &v["port"];
    if a.contains(':') {
        format!("[{a}]:{p}")
    } else {
        format!("{a}:{p}")
    }
}

pub(super) fn who(v: &Value) -> String {
    let mut s = match (v["pid"].as_u64(), v["comm"].as_str()) {
        (Some(p), Some(c)) => format!("{c}[{p}]"),
        (Some(p), None) => format!("pid {p}"),
        _ => String::new(),
    };
    if let Some(c) = v["container"]["name"].as_str() {
        s.push_str(&format!(" ({c})"));
    }
    s
}

/// One readable line for a record. Unknown types fall back to the raw JSON.
pub fn human(v: &Value, st: &Style) -> String {
    let ts = v["ts"].as_str().unwrap_or("");
    // 2026-11-25T08:31:31.123456789Z -> 2026-11-25 08:31:31.123
    let t = if ts.len() >= 23 {
        format!("{} {}", &ts[..10], &ts[11..23])
    } else {
        ts.to_string()
    };
    let ty = v["type"].as_str().unwrap_or("?");
    let body = match ty {
        "conflict" => conflict_line(v, st),
        "bind" | "listen" | "connect" | "close" => format!(
            "{} {} {} {} by {} netns {}",
            st.paint("36", ty),
            v["result"].as_str().unwrap_or(""),
            v["proto"].as_str().unwrap_or(""),
            addr_port(v),
            who(&v["actor"]),
            v["netns"]
        ),
        "port" => format!(
            "{} {} {} {} by {} netns {}{}",
            st.paint("35", "port"),
            v["event"].as_str().unwrap_or(""),
            v["proto"].as_str().unwrap_or(""),
            addr_port(v),
            who(&v["actor"]),
            v["netns"],
            match v["held_s"].as_f64() {
                Some(h) => format!(" held {h}s ({})", v["reason"].as_str().unwrap_or("")),
                None => String::new(),
            }
        ),
        "exit" => format!(
            "{} {} netns {}",
            st.paint("36", "exit"),
            who(&v["actor"]),
            v["netns"]
        ),
        "tcp_state" => format!(
            "{} {} {} -> {} peer {}:{}",
            st.paint("36", "tcp_state"),
            addr_port(v),
            v["old_state"].as_str().unwrap_or(""),
            v["new_state"].as_str().unwrap_or(""),
            v["raddr"].as_str().unwrap_or(""),
            v["rport"]
        ),
        "lost" => format!(
            "{} {} events (kernel {}, agent {}) {}",
            st.paint("1;35", "LOST"),
            v["count"],
            v["kernel"],
            v["agent"],
            v["by_kind"]
        ),
        "missed" => format!(
            "{} {} records (this client read too slowly)",
            st.paint("1;35", "MISSED"),
            v["count"]
        ),
        "time_wait" => format!(
            "{} netns {} total {} (+{} -{}) top ports {}",
            st.paint("33", "time_wait"),
            v["netns"],
            v["total"],
            v["entered"],
            v["expired"],
            v["by_local_port"]
        ),
        "pressure" => format!(
            "{} netns {} {}:{} {}% of ephemeral ports -- {}",
            st.paint("1;33", "PRESSURE"),
            v["netns"],
            v["addr"].as_str().unwrap_or(""),
            v["port"],
            v["pct"],
            v["hint"].as_str().unwrap_or("")
        ),
        "agent" => format!(
            "{} {}{}",
            st.paint("32", "agent"),
            v["event"].as_str().unwrap_or(""),
            v["reason"]
                .as_str()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ),
        "docker" => format!(
            "{} {} {}",
            st.paint("34", "docker"),
            v["event"].as_str().unwrap_or(""),
            v["container"]["name"].as_str().unwrap_or("")
        ),
        _ => v.to_string(),
    };
    format!("{} {body}", st.paint("2", &t))
}

/// `CONFLICT x3 bind tcp 0.0.0.0:8080 by pid 42 (nginx) netns 4026531840 cause=listener
/// held by ... -- hint`.
fn conflict_line(v: &Value, st: &Style) -> String {
    let holders: Vec<String> = v["holders"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| match h["count"].as_u64() {
                    Some(n) => format!("{n}x TIME_WAIT"),
                    None => format!(
                        "{} {} {}",
                        who(h),
                        h["state"].as_str().unwrap_or(""),
                        addr_port(h)
                    ),
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}{} {} {} {} by {} netns {} cause={}{}{}",
        st.paint("1;31", "CONFLICT"),
        match v["count"].as_u64() {
            Some(n) if n > 1 => format!(" x{n}"),
            _ => String::new(),
        },
        v["op"].as_str().unwrap_or(""),
        v["proto"].as_str().unwrap_or(""),
        st.paint("1", &addr_port(v)),
        who(&v["actor"]),
        v["netns"],
        st.paint("33", v["cause"].as_str().unwrap_or("")),
        if holders.is_empty() {
            String::new()
        } else {
            format!(" held by {}", holders.join(", "))
        },
        match v["hint"].as_str() {
            Some(h) if !h.is_empty() => format!(" -- {h}"),
            _ => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_conflict_line() {
        let v: Value = serde_json::from_str(
            r#"{"ts":"2026-11-25T08:31:31.123456789Z","type":"conflict","op":"bind","proto":"tcp","addr":"127.0.0.1","port":8080,
                "netns":1,"actor":{"pid":5,"comm":"py"},"cause":"listener","hint":"stop it",
                "holders":[{"pid":4,"comm":"nginx","state":"LISTEN","addr":"0.0.0.0","port":8080}]}"#,
        )
        .unwrap();
        let s = human(&v, &Style { color: false });
        assert_eq!(
            s,
            "2026-11-25 08:31:31.123 CONFLICT bind tcp 127.0.0.1:8080 by py[5] netns 1 cause=listener held by nginx[4] LISTEN 0.0.0.0:8080 -- stop it"
        );
    }
}
