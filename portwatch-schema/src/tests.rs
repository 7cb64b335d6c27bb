use super::*;

fn round_trip(line: &str) -> Record {
    let r = Record::parse(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(serde_json::to_string(&r).unwrap(), line);
    r
}

#[test]
fn a_line_reads_into_its_type_and_writes_back_the_same_bytes() {
    let r = round_trip(
        r#"{"v":1,"ts":"2025-11-24T16:00:00.123456789Z","type":"exit","host":"lab1","netns":4026531840,"actor":{"pid":4242,"tid":4243,"comm":"nginx","uid":1000,"cmdline":null,"cgroup_id":77}}"#,
    );
    assert_eq!(r.ty(), Type::Exit);
    assert_eq!(r.netns(), Some(4_026_531_840));
    let m = round_trip(r#"{"v":1,"type":"missed","count":3}"#);
    assert_eq!(m.body, Body::Missed(Missed { count: 3 }));
}

#[test]
fn names_read_known_and_keep_unknown() {
    let c: Cause = serde_json::from_str(r#""listener""#).unwrap();
    assert_eq!(c, Cause::Listener);
    let c: Cause = serde_json::from_str(r#""a_new_cause""#).unwrap();
    assert_eq!(c, Cause::Other("a_new_cause".into()));
    assert_eq!(serde_json::to_string(&c).unwrap(), r#""a_new_cause""#);
    assert_eq!(Cause::parse("time_wait"), Cause::TimeWait);
    for c in Cause::KNOWN {
        assert_eq!(&Cause::parse(c.as_str()), c);
    }
    assert_eq!(SockState::parse("LISTEN"), "LISTEN");
}

#[test]
fn an_unknown_type_is_no_error_and_a_wrong_shape_is() {
    let r = Record::parse(r#"{"v":1,"ts":"x","type":"future","host":"h","n":1}"#).unwrap();
    assert_eq!(r.body, Body::Unknown);
    let e = Record::parse(r#"{"v":1,"ts":"x","type":"exit","host":"h","netns":"seven"}"#);
    assert!(e.is_err());
    assert!(Record::parse("not json").is_err());
}

/// The agent's golden records (one per record type, the contract of schema v1) read into
/// these types and write back byte for byte: no field unknown here, none dropped, none
/// reordered, null where the agent writes null.
#[test]
fn every_golden_record_of_the_agent_round_trips() {
    let golden = include_str!("../../portwatch/src/process/golden.rs");
    let mut n = 0;
    for part in golden.split("r#\"").skip(1) {
        let Some((json, _)) = part.split_once("\"#") else {
            continue;
        };
        if !json.starts_with("{\"v\":") {
            continue;
        }
        let r = round_trip(json);
        assert!(!matches!(r.body, Body::Unknown), "{json}");
        n += 1;
    }
    assert_eq!(n, 17, "every golden record was read");
}
