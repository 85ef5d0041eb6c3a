//! The stream DSL through the TestDriver: operators, joins, windows, late
//! records, emission strategies, restarts, and the exactly-once runner on
//! the in-memory log and store.

use std::sync::Arc;

use bytes::Bytes;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, restore_from_changelog, BuildError, EmitStrategy, EventLogSink, EventLogSource,
    InMemoryStore, KeyValueStore, LateReason, LateRecord, Record, RunnerConfig, StateCodec,
    StreamError, StreamRunner, TestDriver, Topology, Window, WindowStore, Windowed, Windows,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

fn w(start: u64, end: u64) -> Window {
    Window {
        start_ms: start,
        end_ms: end,
    }
}

#[test]
fn stateless_operators() {
    let t = Topology::new();
    let s = t.stream::<u32, String>("in");
    s.filter(|_, v| !v.is_empty())
        .map(|k, v| (v, k))
        .map_values(|k| k * 10)
        .to("mapped");
    s.flat_map(|k, v: String| {
        v.chars()
            .map(move |c| (k, c.to_string()))
            .collect::<Vec<_>>()
    })
    .to("chars");
    let parts = s.branch(vec![
        Box::new(|k, _| k % 2 == 0),
        Box::new(|_, v: &String| v.len() > 1),
    ]);
    parts[0].to("even");
    parts[1].to("long-odd");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("in", 1u32, "ab".to_string(), 5).unwrap();
    d.pipe("in", 2u32, String::new(), 6).unwrap();
    d.pipe("in", 3u32, "c".to_string(), 7).unwrap();
    assert_eq!(
        d.read_key_values::<String, u32>("mapped").unwrap(),
        vec![("ab".into(), 10), ("c".into(), 30)]
    );
    let chars = d.read_output::<u32, String>("chars").unwrap();
    assert_eq!(
        chars,
        vec![
            Record::new(1, "a".into(), 5),
            Record::new(1, "b".into(), 5),
            Record::new(3, "c".into(), 7)
        ]
    );
    assert_eq!(
        d.read_key_values::<u32, String>("even").unwrap(),
        vec![(2, String::new())]
    );
    assert_eq!(
        d.read_key_values::<u32, String>("long-odd").unwrap(),
        vec![(1, "ab".into())]
    );
    // Read outputs are taken.
    assert!(d.read_output::<u32, String>("even").unwrap().is_empty());
    assert_eq!(d.metrics().processed, 3);
}

#[test]
fn split_result_sends_errors_to_a_dead_letter_output() {
    let t = Topology::new();
    let (ok, bad) = t
        .stream::<u32, String>("raw")
        .map_values(|v| v.parse::<u64>().map_err(|e| format!("{v:?}: {e}")))
        .split_result();
    ok.to("numbers");
    bad.to("dead-letters");
    let mut d = TestDriver::new(t).unwrap();
    for (i, v) in ["1", "x", "3"].iter().enumerate() {
        d.pipe("raw", i as u32, v.to_string(), i as u64).unwrap();
    }
    assert_eq!(
        d.read_key_values::<u32, u64>("numbers").unwrap(),
        vec![(0, 1), (2, 3)]
    );
    let dead = d.read_key_values::<u32, String>("dead-letters").unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].1.contains("invalid digit"), "{dead:?}");
}

#[test]
fn stream_table_joins_inner_and_left_with_deletes() {
    let t = Topology::new();
    let users = t
        .stream::<u32, Option<String>>("users")
        .to_table_with_deletes("users");
    let clicks = t.stream::<u32, u64>("clicks");
    clicks
        .join(&users, |n, name: &String| format!("{name}:{n}"))
        .to("inner");
    clicks
        .left_join(&users, |n, name: Option<&String>| {
            format!("{}:{n}", name.map_or("?", |s| s.as_str()))
        })
        .to("left");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("clicks", 1u32, 5u64, 1).unwrap();
    d.pipe("users", 1u32, Some("ann".to_string()), 2).unwrap();
    d.pipe("clicks", 1u32, 6u64, 3).unwrap();
    d.pipe("users", 1u32, Some("bob".to_string()), 4).unwrap();
    d.pipe("clicks", 1u32, 7u64, 5).unwrap();
    d.pipe("users", 1u32, None::<String>, 6).unwrap();
    d.pipe("clicks", 1u32, 8u64, 7).unwrap();
    assert_eq!(
        d.read_key_values::<u32, String>("inner").unwrap(),
        vec![(1, "ann:6".into()), (1, "bob:7".into())]
    );
    assert_eq!(
        d.read_key_values::<u32, String>("left").unwrap(),
        vec![
            (1, "?:5".into()),
            (1, "ann:6".into()),
            (1, "bob:7".into()),
            (1, "?:8".into())
        ]
    );
    assert_eq!(d.table_get::<u32, String>("users", &1).unwrap(), None);
}

fn windowed_counts(emit: EmitStrategy) -> Topology {
    let t = Topology::new();
    t.stream::<String, u32>("events")
        .group_by_key()
        .windowed_by(Windows::tumbling(10).unwrap().grace(5))
        .emit(emit)
        .late_records_to("late")
        .count("counts")
        .to("out");
    t
}

#[test]
fn tumbling_windows_emit_on_close_with_grace_and_late_records() {
    let mut d = TestDriver::new(windowed_counts(EmitStrategy::OnWindowClose)).unwrap();
    let a = || "a".to_string();
    d.pipe("events", a(), 1u32, 1).unwrap();
    d.pipe("events", a(), 1u32, 9).unwrap();
    d.pipe("events", "b".to_string(), 1u32, 12).unwrap();
    // Out of order but within grace: window [0,10) closes at 15.
    d.pipe("events", a(), 1u32, 3).unwrap();
    assert!(d
        .read_output::<Windowed<String>, u64>("out")
        .unwrap()
        .is_empty());
    assert_eq!(
        d.window_get::<String, u64>("counts", &a(), 0).unwrap(),
        Some(3)
    );
    d.pipe("events", a(), 1u32, 15).unwrap(); // closes [0,10)
    let out = d.read_output::<Windowed<String>, u64>("out").unwrap();
    assert_eq!(
        out,
        vec![Record::new(
            Windowed {
                key: a(),
                window: w(0, 10)
            },
            3,
            9
        )]
    );
    // Late: [0,10) closed at 15.
    d.pipe("events", a(), 1u32, 4).unwrap();
    let late = d.read_output::<String, LateRecord<u32>>("late").unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(
        late[0].value.reason,
        LateReason::WindowClosed {
            window: w(0, 10),
            closed_at_ms: 15,
            stream_time_ms: 15
        }
    );
    assert_eq!(d.metrics().late_records, 1);
    assert_eq!(
        d.window_get::<String, u64>("counts", &a(), 0).unwrap(),
        None
    );
    d.advance_time(25).unwrap(); // closes [10,20)
    let out = d.read_key_values::<Windowed<String>, u64>("out").unwrap();
    assert_eq!(
        out,
        vec![
            (
                Windowed {
                    key: a(),
                    window: w(10, 20)
                },
                1
            ),
            (
                Windowed {
                    key: "b".into(),
                    window: w(10, 20)
                },
                1
            )
        ]
    );
    assert!(d
        .window_entries::<String, u64>("counts")
        .unwrap()
        .is_empty());
}

#[test]
fn on_update_emits_every_change() {
    let mut d = TestDriver::new(windowed_counts(EmitStrategy::OnUpdate)).unwrap();
    for ts in [1, 2, 11] {
        d.pipe("events", "k".to_string(), 0u32, ts).unwrap();
    }
    let out = d.read_key_values::<Windowed<String>, u64>("out").unwrap();
    let got: Vec<(u64, u64)> = out.iter().map(|(k, v)| (k.window.start_ms, *v)).collect();
    assert_eq!(got, vec![(0, 1), (0, 2), (10, 1)]);
    d.advance_time(100).unwrap();
    assert!(d
        .read_output::<Windowed<String>, u64>("out")
        .unwrap()
        .is_empty());
}

#[test]
fn hopping_windows_aggregate_and_reduce() {
    let t = Topology::new();
    let g = t.stream::<u8, u64>("in").group_by_key();
    let hop = Windows::hopping(10, 5).unwrap();
    g.windowed_by(hop)
        .emit(EmitStrategy::OnWindowClose)
        .aggregate("sums", || 0u64, |_, v, s| *s += v)
        .to("sums");
    g.windowed_by(hop)
        .emit(EmitStrategy::OnWindowClose)
        .reduce("maxes", |a, b| *a = (*a).max(b))
        .to("maxes");
    g.reduce("total-max", |a, b| *a = (*a).max(b))
        .to("running-max");
    g.count("totals").to("totals");
    let mut d = TestDriver::new(t).unwrap();
    for (ts, v) in [(1u64, 3u64), (6, 4), (12, 1)] {
        d.pipe("in", 7u8, v, ts).unwrap();
    }
    d.advance_time(1_000).unwrap();
    let sums: Vec<(u64, u64)> = d
        .read_key_values::<Windowed<u8>, u64>("sums")
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.window.start_ms, v))
        .collect();
    // windows [0,10) {1,6}, [5,15) {6,12}, [10,20) {12}
    assert_eq!(sums, vec![(0, 7), (5, 5), (10, 1)]);
    let maxes: Vec<(u64, u64)> = d
        .read_key_values::<Windowed<u8>, u64>("maxes")
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.window.start_ms, v))
        .collect();
    assert_eq!(maxes, vec![(0, 4), (5, 4), (10, 1)]);
    assert_eq!(
        d.read_key_values::<u8, u64>("running-max").unwrap(),
        vec![(7, 3), (7, 4), (7, 4)]
    );
    assert_eq!(
        d.read_key_values::<u8, u64>("totals").unwrap(),
        vec![(7, 1), (7, 2), (7, 3)]
    );
    assert_eq!(d.table_get::<u8, u64>("totals", &7).unwrap(), Some(3));
}

#[test]
fn commit_and_restart_resume_state_and_stream_time() {
    let mut d = TestDriver::new(windowed_counts(EmitStrategy::OnWindowClose)).unwrap();
    d.pipe("events", "a".to_string(), 1u32, 1).unwrap();
    d.pipe("events", "a".to_string(), 1u32, 2).unwrap();
    assert!(d.commit().unwrap() > 0);
    // Lost in the "crash": not committed.
    d.pipe("events", "a".to_string(), 1u32, 3).unwrap();
    let mut d = d
        .restart(windowed_counts(EmitStrategy::OnWindowClose))
        .unwrap();
    assert_eq!(d.stream_time(), 2);
    assert_eq!(
        d.window_get::<String, u64>("counts", &"a".into(), 0)
            .unwrap(),
        Some(2)
    );
    d.pipe("events", "a".to_string(), 1u32, 3).unwrap();
    d.advance_time(15).unwrap();
    assert_eq!(
        d.read_key_values::<Windowed<String>, u64>("out").unwrap()[0].1,
        3
    );
    // Closed windows are deleted from the store at the next commit.
    d.commit().unwrap();
    assert_eq!(d.store().len("counts"), 0);
    // The window store reads what commits wrote.
    d.pipe("events", "z".to_string(), 1u32, 21).unwrap();
    d.commit().unwrap();
    let ws = WindowStore::new(d.store(), "counts", Windows::tumbling(10).unwrap());
    assert_eq!(
        ws.fetch::<String, u64>(&"z".into(), 20).unwrap(),
        Some((1, 21))
    );
    let all = ws.fetch_range::<String, u64>(0, 100, 10).unwrap();
    assert_eq!(all.len(), 1);
    // And a store rebuilt from the changelog holds the same.
    let copy = InMemoryStore::new();
    restore_from_changelog(&copy, d.store()).unwrap();
    assert_eq!(
        copy.get("counts", &[&20u64.to_be_bytes()[..], b"z"].concat())
            .unwrap(),
        d.store()
            .get("counts", &[&20u64.to_be_bytes()[..], b"z"].concat())
            .unwrap()
    );
}

#[test]
fn build_errors_and_type_errors_are_typed() {
    let t = Topology::new();
    t.stream::<u32, u32>("a").group_by_key().count("s");
    t.stream::<u32, u32>("b").group_by_key().count("s");
    assert!(matches!(t.build(), Err(BuildError::DuplicateStore(_))));
    let t = Topology::new();
    t.stream::<u32, u32>("a").to("out");
    t.stream::<u32, u32>("a").to("bad name");
    assert!(matches!(t.build(), Err(BuildError::DuplicateInput(_))));
    let t = Topology::new();
    t.stream::<u32, u32>("a").to("o");
    t.stream::<u32, u64>("b").to("o");
    assert!(matches!(t.build(), Err(BuildError::OutputType(_))));
    let other = Topology::new();
    let table = other.stream::<u32, u32>("t").to_table("t");
    let t = Topology::new();
    t.stream::<u32, u32>("a").join(&table, |a, b| a + b).to("o");
    assert!(matches!(t.build(), Err(BuildError::ForeignTable(_))));

    let t = Topology::new();
    t.stream::<u32, u32>("a").to("o");
    let mut d = TestDriver::new(t).unwrap();
    assert!(matches!(
        d.pipe("a", 1u64, 1u32, 0),
        Err(StreamError::WrongType { .. })
    ));
    assert!(matches!(
        d.pipe("nope", 1u32, 1u32, 0),
        Err(StreamError::UnknownInput { .. })
    ));
    assert!(matches!(
        d.read_output::<u32, u32>("nope"),
        Err(StreamError::UnknownOutput { .. })
    ));
    // Bad bytes on a typed input: a typed error, not a panic.
    let r = d.task().process_bytes("a", &[1, 2], &[0, 0, 0, 1], 0);
    assert!(matches!(r, Err(StreamError::Decode { .. })), "{r:?}");
    assert!(!d.task().process_bytes("other", &[], &[], 0).unwrap());
}

#[test]
fn state_limits_are_enforced() {
    let t = Topology::with_limits({
        let mut built = smartmsg_engine::stream::TaskLimits::default();
        built.max_state_entries = 2;
        built.max_pending_outputs = 3;
        built
    });
    t.stream::<u32, u32>("a").group_by_key().count("c").to("o");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("a", 1u32, 0u32, 0).unwrap();
    d.pipe("a", 2u32, 0u32, 0).unwrap();
    assert!(matches!(
        d.pipe("a", 3u32, 0u32, 0),
        Err(StreamError::StateFull { .. })
    ));
    d.pipe("a", 1u32, 0u32, 0).unwrap();
    assert!(matches!(
        d.pipe("a", 1u32, 0u32, 0),
        Err(StreamError::OutputsFull { .. })
    ));
}

// ---------------------------------------------------------------------------
// The runner, on the in-memory log and store.

fn runner_topology() -> Topology {
    let t = Topology::new();
    t.stream::<Bytes, Bytes>("Click")
        .map(|k, v| (k, v.len() as u64))
        .group_by_key()
        .aggregate("sizes", || 0u64, |_, n, s| *s += n)
        .to("sizes");
    t
}

async fn append(log: &InMemoryLog, stream: &str, payloads: &[&str]) {
    let events = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| NewEvent::new("Click", 1, i as u64, p.to_string()))
        .collect();
    log.append(AppendTx::single(
        StreamId::new(stream).unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn runner_commits_atomically_and_redelivers_idempotently() {
    let log = Arc::new(InMemoryLog::new());
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    append(&log, "u1", &["ab", "c"]).await;
    append(&log, "u2", &["xyz"]).await;
    let open = || {
        StreamRunner::open(
            runner_topology(),
            store.clone(),
            EventLogSource::new(log.clone()),
            EventLogSink::new(log.clone()),
            RunnerConfig::new("clicks").with_batch(2),
        )
        .unwrap()
    };
    let mut r = open();
    let first = r.step().await.unwrap();
    assert_eq!((first.records, first.outputs, first.position), (2, 2, 2));
    drop(r); // crash after a commit and its delivery, before the next
    let mut r = open();
    let rest = r.run_until_idle().await.unwrap();
    // Record 2, then the 3 outputs appended so far (skipped: no such input).
    assert_eq!(rest.records, 1 + 2 + 1);
    assert_eq!(
        r.task()
            .table_get::<Bytes, u64>("sizes", &Bytes::from("u1"))
            .unwrap(),
        Some(3)
    );
    assert_eq!(
        r.task()
            .table_get::<Bytes, u64>("sizes", &Bytes::from("u2"))
            .unwrap(),
        Some(3)
    );
    assert_eq!(r.task().metrics().processed, 3);
    // Every output once in the log.
    let all = log.read_all(0, 100).await.unwrap();
    let outs: Vec<(Bytes, u64)> = all
        .iter()
        .filter(|e| e.kind == "sizes")
        .map(|e| {
            let (k, v) = envelope::decode(&e.payload).unwrap();
            (k, u64::decode(&v).unwrap())
        })
        .collect();
    assert_eq!(
        outs,
        vec![
            (Bytes::from("u1"), 2),
            (Bytes::from("u1"), 3),
            (Bytes::from("u2"), 3)
        ]
    );

    // A re-delivery of a commit's outbox (as after a crash between the
    // commit and the delivery) writes nothing new.
    let head = log.head().await.unwrap();
    let r2_store = InMemoryStore::new();
    restore_from_changelog(&r2_store, &*store).unwrap();
    let mut sink = EventLogSink::new(log.clone());
    use smartmsg_engine::stream::{OutputId, OutputRecord, Sink};
    let rec = OutputRecord {
        id: OutputId {
            commit: 0,
            index: 0,
        },
        output: "sizes".into(),
        key: b"u1".to_vec(),
        value: 2u64.to_bytes(),
        timestamp_ms: 0,
        headers: Default::default(),
    };
    let again = vec![
        rec.clone(),
        OutputRecord {
            id: OutputId {
                commit: 0,
                index: 1,
            },
            value: 3u64.to_bytes(),
            timestamp_ms: 1,
            ..rec
        },
    ];
    sink.send("clicks", &again).await.unwrap();
    assert_eq!(log.head().await.unwrap(), head, "re-delivery wrote nothing");
}

/// A punctuation record in the source closes windows exactly like the
/// records' own timestamps would, and outputs go to the streams the sink
/// names.
#[tokio::test]
async fn punctuations_in_the_source_close_windows() {
    use smartmsg_engine::stream::PUNCTUATE;
    let log = Arc::new(InMemoryLog::new());
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let stream = StreamId::new("in").unwrap();
    let ev = |kind: &str, key: &str, ts: u64| {
        NewEvent::new(
            kind,
            1,
            ts,
            envelope::encode(&key.to_string().to_bytes(), &1u32.to_bytes()),
        )
    };
    log.append(AppendTx::single(
        stream.clone(),
        ExpectedVersion::Any,
        vec![
            ev("events", "a", 1),
            ev("events", "a", 3),
            ev("events", "b", 12),
        ],
    ))
    .await
    .unwrap();
    let open = || {
        StreamRunner::open(
            windowed_counts(EmitStrategy::OnWindowClose),
            store.clone(),
            EventLogSource::with_envelopes(log.clone()),
            EventLogSink::with_streams(log.clone(), |o| format!("{o}-c1")),
            RunnerConfig::new("counts"),
        )
        .unwrap()
    };
    let mut r = open();
    r.run_until_idle().await.unwrap();
    let out = StreamId::new("out-c1").unwrap();
    // Stream time is 12: window [0, 10) closes at 15 (grace 5).
    assert_eq!(log.stream_version(&out).await.unwrap(), 0);
    log.append(AppendTx::single(
        stream,
        ExpectedVersion::Any,
        vec![NewEvent::new(PUNCTUATE, 1, 15, Bytes::new())],
    ))
    .await
    .unwrap();
    drop(r);
    let mut r = open();
    r.run_until_idle().await.unwrap();
    let got = log.read_stream(&out, 1, 10).await.unwrap();
    assert_eq!(got.len(), 1, "the punctuation closed window [0, 10)");
    let (k, v) = envelope::decode(&got[0].payload).unwrap();
    assert_eq!(Windowed::<String>::decode(&k).unwrap().key, "a");
    assert_eq!(u64::decode(&v).unwrap(), 2);
    assert_eq!(r.task().stream_time(), 15);
}
