use super::*;

#[test]
fn secret_names_are_redacted_and_remembered() {
    let mut s = BTreeSet::new();
    let env = redact_env(
        &[
            "API_TOKEN=supersecret".into(),
            "PATH=/bin".into(),
            "db_password=hunter22".into(),
            "SSH_KEY=".into(),
            "NOVALUE".into(),
        ],
        &mut s,
    );
    assert_eq!(
        env,
        [
            "API_TOKEN=REDACTED",
            "PATH=/bin",
            "db_password=REDACTED",
            "SSH_KEY=REDACTED",
            "NOVALUE"
        ]
    );
    let labels = HashMap::from([
        ("db.password".to_string(), "hunter2".to_string()),
        ("com.docker.compose.service".to_string(), "web".to_string()),
        ("Secret-Thing".to_string(), "x".to_string()),
    ]);
    let m = redact_map(Some(&labels), &mut s);
    assert_eq!(m["db.password"], "REDACTED");
    assert_eq!(m["Secret-Thing"], "REDACTED");
    assert_eq!(m["com.docker.compose.service"], "web");
    assert_eq!(
        s.into_iter().collect::<Vec<_>>(),
        ["hunter2", "hunter22", "supersecret", "x"]
    );
}

#[test]
fn scrub_replaces_long_secrets_everywhere_and_leaves_short_ones() {
    let mut b = Bundle::default();
    b.secrets.extend([
        "supersecret".to_string(),
        "true".to_string(),
        "a\"bcdef".to_string(),
    ]);
    b.add("x", "", b"run --token=supersecret --debug=true".to_vec());
    b.json("y.json", "", &serde_json::json!({"cmdline": "pw a\"bcdef"}));
    b.scrub();
    assert_eq!(b.entries[0].data, b"run --token=REDACTED --debug=true");
    let y = String::from_utf8(b.entries[1].data.clone()).unwrap();
    assert!(y.contains("pw REDACTED"), "{y}");
}

#[test]
fn stem_is_safe_and_sortable() {
    let ns = tail::ts_ns("2026-11-30T03:12:45.5Z").unwrap();
    assert_eq!(
        bundle_stem("lab 1/a", ns),
        "portwatch-report-lab_1_a-20261130T031245Z"
    );
    assert_eq!(journal_time(ns), "2026-11-30 03:12:45 UTC");
}

#[test]
fn readme_lists_every_file_and_why_parts_are_missing() {
    let mut b = Bundle::default();
    b.add("host.json", "this host", b"{}".to_vec());
    b.missing("agent", "agent's status", "no agent running".into());
    b.finish("portwatch report\n");
    let names: Vec<&str> = b.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["README.txt", "host.json", "MISSING-agent.txt"]);
    let readme = String::from_utf8(b.entries[0].data.clone()).unwrap();
    for n in names {
        assert!(readme.contains(n), "{n} not in\n{readme}");
    }
    assert!(readme.contains("agent's status: no agent running"));
}

#[test]
fn log_scan_keeps_the_window_and_the_port() {
    let d = std::env::temp_dir().join(format!("pw-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("events.jsonl");
    let rec = |ts: &str, ty: &str, port: u16, extra: &str| {
        format!(
            "{{\"v\":1,\"ts\":\"{ts}\",\"type\":\"{ty}\",\"host\":\"h\",\"port\":{port}{extra}}}\n"
        )
    };
    let old = "2026-11-30T01:00:00.000000000Z";
    let new = "2026-11-30T03:00:00.000000000Z";
    let log = [
        rec(old, "agent", 0, ",\"event\":\"ready\",\"programs\":[\"a\"]"),
        rec(old, "port", 8080, ",\"event\":\"open\",\"proto\":\"tcp\",\"family\":\"ipv4\",\"addr\":\"0.0.0.0\",\"netns\":1,\"actor\":{\"pid\":5,\"comm\":\"nginx\",\"cmdline\":null,\"uid\":0}"),
        rec(old, "conflict", 8080, ""),
        rec(new, "conflict", 8080, ""),
        rec(new, "conflict", 9090, ""),
        rec(new, "bind", 8080, ""),
        rec(new, "lost", 0, ",\"count\":3"),
        "not json\n".to_string(),
    ]
    .concat();
    std::fs::write(&p, log).unwrap();
    let since = tail::ts_ns("2026-11-30T02:00:00Z").unwrap();
    let s = scan_log(&p, since, Some(8080));
    assert_eq!(s.conflicts.lines.len(), 1);
    assert_eq!(s.lost_in_window, 3);
    assert_eq!(s.malformed, 1);
    assert_eq!(s.ready.as_ref().unwrap()["programs"][0], "a");
    // The open before the window still starts the holding that runs into it.
    assert_eq!(s.history.len(), 3);
    let typed = s
        .history
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok());
    let t = history::timeline(typed, 8080, None, Some(since), None);
    assert!(
        matches!(t.first(), Some(history::Item::Held { .. })),
        "{t:?}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn an_unwritable_output_fails_at_once_and_leaves_nothing() {
    let e = target(Some(Path::new("/proc/nope/x.tar.gz")), "s")
        .err()
        .unwrap();
    let msg = e.to_string();
    assert!(msg.contains("/proc/nope/x.tar.gz"), "{msg}");
    let d = std::env::temp_dir().join(format!("pw-report-out-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let Ok(Target::File(p)) = target(Some(&d), "stem") else {
        panic!("a directory takes the default name")
    };
    assert_eq!(p.dest, d.join("stem.tar.gz"));
    let tmp = p.tmp.clone();
    assert!(tmp.exists());
    drop(p);
    assert!(!tmp.exists(), "an unfinished bundle is removed");
    let _ = std::fs::remove_dir_all(d);
}
