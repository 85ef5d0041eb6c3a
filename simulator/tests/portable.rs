//! Export / import of event logs as JSON Lines: byte-identical round trip,
//! bad lines reported, nothing half-imported, parsers never panic.

use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, Limits, Metadata, NewEvent, StreamId};
use smartmsg_simulator::portable::{self, PortableError};
use smartmsg_simulator::{run_policy, PolicyName, RunOptions, Scenario, SimPopulation};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

fn read_log(dir: &std::path::Path) -> Vec<smartmsg_engine::RecordedEvent> {
    rt().block_on(async {
        let log = EmbeddedLog::open(dir).unwrap();
        portable::read_all(&log).await.unwrap()
    })
}

/// A simulated campaign (small scenario) in `root/<policy>`.
fn simulate(root: &std::path::Path) {
    let scenario = Scenario::small();
    let pop = Arc::new(SimPopulation::generate(&scenario).unwrap());
    let run = run_policy(
        &scenario,
        &pop,
        &RunOptions::new(PolicyName::Integrated, root.join("integrated")),
    )
    .unwrap();
    assert!(run.violations.is_empty());
}

#[test]
fn simulated_log_round_trips_byte_identically() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sim");
    simulate(&root);
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    // The simulation's root (one run) is accepted, as is the log itself.
    let n = portable::export(&root, &a).unwrap();
    assert!(n > 20, "{n} events");
    let text = std::fs::read_to_string(&a).unwrap();
    assert!(
        text.contains("\"payload_json\":{\"command\""),
        "campaign events as JSON"
    );
    let imported = dir.path().join("imported");
    assert_eq!(portable::import(&a, &imported).unwrap(), n);
    assert_eq!(portable::export(&imported.join("log"), &b).unwrap(), n);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let original = read_log(&root.join("integrated").join("log"));
    let copy = read_log(&imported.join("log"));
    assert_eq!(original.len() as u64, n);
    assert_eq!(original, copy);
    // Importing again into the now non-empty directory is refused.
    assert!(matches!(
        portable::import(&a, &imported),
        Err(PortableError::TargetNotEmpty { .. })
    ));
}

#[test]
fn odd_payloads_survive_as_base64() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let s = StreamId::new("s-1").unwrap();
    let t = StreamId::new("t-1").unwrap();
    let payloads: Vec<&[u8]> = vec![
        b"",
        b"\x00\xff\xfe binary",
        b"{\"a\": 1}\n",
        b"null",
        b" {\"b\":2}",
        b"{\"c\":[1,2.5e-3,\"x\\n\"]}",
    ];
    rt().block_on(async {
        let log = EmbeddedLog::open(&src).unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let kind = if i % 2 == 0 { "BatchSent" } else { "Opaque" };
            let stream = if i % 3 == 0 { &s } else { &t };
            let e = NewEvent::new(kind, i as u16, 1_000 + i as u64, Bytes::copy_from_slice(p))
                .with_metadata(Metadata {
                    correlation_id: Some(format!("c{i}")),
                    causation_id: (i % 2 == 1).then(|| "cause".to_owned()),
                });
            log.append(AppendTx::single(
                stream.clone(),
                ExpectedVersion::Any,
                vec![e],
            ))
            .await
            .unwrap();
        }
        // A transaction across two streams.
        log.append(
            AppendTx::single(
                s.clone(),
                ExpectedVersion::Any,
                vec![NewEvent::new("BatchSent", 1, 9, &b"{}"[..])],
            )
            .with_stream(
                t.clone(),
                ExpectedVersion::Any,
                vec![NewEvent::new("X", 1, 9, &b"y"[..])],
            ),
        )
        .await
        .unwrap();
    });
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    portable::export(&src, &a).unwrap();
    portable::import(&a, &dir.path().join("copy")).unwrap();
    portable::export(&dir.path().join("copy"), &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(read_log(&src), read_log(&dir.path().join("copy/log")));
}

#[test]
fn bad_lines_are_reported_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let good = |pos: u64, stream: &str, v: u64| {
        format!(
            r#"{{"position":{pos},"stream":"{stream}","version":{v},"kind":"K","schema":1,"timestamp_ms":5,"metadata":{{"correlation_id":null,"causation_id":null}},"payload_b64":"eA=="}}"#
        )
    };
    let lines = [
        good(0, "a", 1),
        "not json".to_owned(),
        good(2, "a", 3),
        good(3, "b", 1).replace("eA==", "e!=="),
        good(4, "a", 4),
        good(5, "b", 1).replace(r#","payload_b64":"eA==""#, ""),
    ];
    let file = dir.path().join("bad.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let target = dir.path().join("out");
    let err = portable::import(&file, &target).unwrap_err();
    let PortableError::BadLines { lines, .. } = &err else {
        panic!("{err}")
    };
    let nums: Vec<u64> = lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(nums, vec![2, 3, 4, 6], "{err}");
    assert!(lines[1].1.contains("version 3 where 2"), "{err}");
    assert!(lines[2].1.contains("payload_b64"), "{err}");
    assert!(lines[3].1.contains("no payload"), "{err}");
    assert!(!target.exists());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the input file remains");
    // Gap in positions.
    std::fs::write(&file, format!("{}\n{}\n", good(0, "a", 1), good(2, "a", 2))).unwrap();
    let err = portable::import(&file, &target).unwrap_err().to_string();
    assert!(err.contains("line 2: position 2 where 1"), "{err}");
    // A non-empty target is refused before anything is read.
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("x"), "x").unwrap();
    assert!(matches!(
        portable::import(&file, &target),
        Err(PortableError::TargetNotEmpty { .. })
    ));
    // An empty target is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(&file, format!("{}\n{}\n", good(0, "a", 1), good(1, "a", 2))).unwrap();
    assert_eq!(portable::import(&file, &empty).unwrap(), 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn line_parser_never_panics(s in "\\PC{0,200}") {
        let _ = portable::parse_line(&s, &Limits::default());
    }

    #[test]
    fn file_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = portable::parse_all(&bytes[..], &Limits::default());
    }

    #[test]
    fn mutated_envelopes_never_panic(cut in 0usize..300, byte in any::<u8>()) {
        let mut line = br#"{"position":0,"stream":"a","version":1,"kind":"BatchSent","schema":1,"timestamp_ms":5,"metadata":{"correlation_id":"c","causation_id":null},"payload_json":{"command":"x","batch":[1,2,{"z":null}]}}"#.to_vec();
        let at = cut % line.len();
        line[at] = byte;
        let _ = portable::parse_all(&line[..], &Limits::default());
    }

    #[test]
    fn base64_round_trips(data in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assert_eq!(portable::b64_decode(&portable::b64_encode(&data)).unwrap(), data);
    }
}

#[test]
fn a_log_larger_than_one_import_chunk_round_trips() {
    // 45,000 events (more than two of import's 20,000-event chunks), with
    // streams interleaved across the chunk boundaries.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    rt().block_on(async {
        let log = EmbeddedLog::open(&src).unwrap();
        for t in 0..45u64 {
            let mut tx = AppendTx::default();
            for s in 0..3u64 {
                let events: Vec<NewEvent> = (0..333 + s)
                    .map(|i| NewEvent::new("Opaque", 1, t * 1_000 + i, format!("{t}/{s}/{i}")))
                    .collect();
                tx = tx.with_stream(
                    StreamId::new(format!("s-{s}")).unwrap(),
                    ExpectedVersion::Any,
                    events,
                );
            }
            log.append(tx).await.unwrap();
        }
    });
    let a = dir.path().join("a.jsonl");
    let b = dir.path().join("b.jsonl");
    let n = portable::export(&src, &a).unwrap();
    assert_eq!(n, 45 * (333 + 334 + 335));
    assert_eq!(portable::import(&a, &dir.path().join("copy")).unwrap(), n);
    portable::export(&dir.path().join("copy"), &b).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(read_log(&src), read_log(&dir.path().join("copy/log")));
}
