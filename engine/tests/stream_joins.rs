//! Stream-stream joins (inner, left, outer) and merge: examples, a
//! brute-force reference model under proptest (random keys, out-of-order
//! and late records, random windows and grace, a crash and restore
//! mid-stream), and the exactly-once runner on the in-memory log across
//! reopens.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use common::{append_then_close, crash_and_reopen, open_on_log, replay_with_crash, FAR};
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, BuildError, Headers, InMemoryStore, JoinWindows, KeyValueStore, Record, RunnerConfig,
    StateCodec, TestDriver, Topology,
};
use smartmsg_engine::{EventLog, NewEvent};

fn hdr(id: u8) -> Headers {
    Headers::new()
        .with("i", id.to_string().into_bytes())
        .unwrap()
}

fn hdr_id(h: &Headers) -> u8 {
    std::str::from_utf8(h.last("i").expect("header i"))
        .unwrap()
        .parse()
        .unwrap()
}

type Pair = (Option<u8>, Option<u8>);

/// The three joins of "left" and "right" (values are record ids), each to
/// an output of its name, and a merge of both inputs.
fn joins(before: u64, after: u64, grace: u64) -> Topology {
    let t = Topology::new();
    let l = t.stream::<u8, u8>("left");
    let r = t.stream::<u8, u8>("right");
    let jw = JoinWindows::of(before, after).grace(grace);
    l.join_stream(&r, jw, "inner", |a, b| (Some(*a), Some(*b)))
        .to("inner");
    l.left_join_stream(&r, jw, "left-join", |a, b| (Some(*a), b.copied()))
        .to("left");
    l.outer_join_stream(&r, jw, "outer-join", |a, b| (a.copied(), b.copied()))
        .to("outer");
    t
}

#[test]
fn inner_join_pairs_records_within_the_window_as_they_arrive() {
    let mut d = TestDriver::new(joins(10, 5, 0)).unwrap();
    // Left at 100 joins right records in [90, 105].
    d.pipe_with_headers("left", 1u8, 0u8, 100, hdr(0)).unwrap();
    d.pipe_with_headers("right", 1u8, 1u8, 89, hdr(1)).unwrap(); // too early
    d.pipe_with_headers("right", 1u8, 2u8, 90, hdr(2)).unwrap();
    d.pipe_with_headers("right", 2u8, 3u8, 100, hdr(3)).unwrap(); // other key
    d.pipe_with_headers("right", 1u8, 4u8, 105, hdr(4)).unwrap();
    d.pipe_with_headers("right", 1u8, 5u8, 106, hdr(5)).unwrap(); // too late
                                                                  // A second left record joins the right ones already kept.
    d.pipe_with_headers("left", 1u8, 6u8, 101, hdr(6)).unwrap();
    let out = d.read_output::<u8, Pair>("inner").unwrap();
    let got: Vec<(u8, Pair, u64, u8)> = out
        .iter()
        .map(|r| (r.key, r.value, r.timestamp_ms, hdr_id(&r.headers)))
        .collect();
    assert_eq!(
        got,
        vec![
            // The later timestamp, the headers of the record that arrived
            // second.
            (1, (Some(0), Some(2)), 100, 2),
            (1, (Some(0), Some(4)), 105, 4),
            // 101 joins [91, 106], in timestamp order.
            (1, (Some(6), Some(4)), 105, 6),
            (1, (Some(6), Some(5)), 106, 6),
        ]
    );
}

#[test]
fn left_and_outer_joins_emit_unmatched_records_only_when_no_match_can_come() {
    // before 10, after 5, grace 3: retention 18.
    let mut d = TestDriver::new(joins(10, 5, 3)).unwrap();
    d.pipe_with_headers("left", 1u8, 0u8, 100, hdr(0)).unwrap();
    d.pipe_with_headers("right", 2u8, 1u8, 100, hdr(1)).unwrap();
    // Stream time 118 = 100 + 18: left 0's window [90, 105] closed at
    // 105 + 3, but a right record at 105 is still on time (its own window
    // closes after 105 + 10 + 3 = 118) and may join it: nothing is
    // unmatched yet.
    d.advance_time(118).unwrap();
    assert!(d.read_output::<u8, Pair>("left").unwrap().is_empty());
    assert!(d.read_output::<u8, Pair>("outer").unwrap().is_empty());
    d.pipe_with_headers("right", 1u8, 2u8, 105, hdr(2)).unwrap();
    assert_eq!(
        d.read_key_values::<u8, Pair>("inner").unwrap(),
        vec![(1, (Some(0), Some(2)))]
    );
    assert_eq!(
        d.read_key_values::<u8, Pair>("left").unwrap(),
        vec![(1, (Some(0), Some(2)))]
    );
    d.pipe_with_headers("left", 3u8, 3u8, 110, hdr(3)).unwrap();
    // 119 > 118: left 0 (matched) and right 1 (unmatched) expire.
    d.advance_time(119).unwrap();
    assert!(d.read_output::<u8, Pair>("left").unwrap().is_empty());
    let outer = d.read_output::<u8, Pair>("outer").unwrap();
    assert_eq!(outer.len(), 2);
    assert_eq!(outer[0].value, (Some(0), Some(2)));
    assert_eq!(
        (outer[1].key, outer[1].value, outer[1].timestamp_ms),
        (2, (None, Some(1)), 100)
    );
    assert_eq!(
        hdr_id(&outer[1].headers),
        1,
        "an unmatched record keeps its headers"
    );
    // Left 3 at 110 expires after 128.
    d.advance_time(128).unwrap();
    assert!(d.read_output::<u8, Pair>("left").unwrap().is_empty());
    d.advance_time(129).unwrap();
    let left = d.read_output::<u8, Pair>("left").unwrap();
    assert_eq!(
        left,
        vec![Record::new(3, (Some(3), None), 110).with_headers(hdr(3))]
    );
    assert!(d.join_buffer::<u8, u8, u8>("left-join").unwrap().is_empty());
}

#[test]
fn late_records_join_nothing_and_are_counted() {
    let mut d = TestDriver::new(joins(10, 5, 0)).unwrap();
    d.pipe("right", 1u8, 0u8, 100).unwrap();
    d.advance_time(110).unwrap();
    // A left record at 104 (104 + 5 < 110) is late for all three joins,
    // though right 0 is within its window.
    d.pipe("left", 1u8, 1u8, 104).unwrap();
    assert_eq!(d.metrics().late_records, 3);
    assert!(d.read_output::<u8, Pair>("inner").unwrap().is_empty());
    // One at 105 is on time (105 + 5 = 110) and joins right 0.
    d.pipe("left", 1u8, 2u8, 105).unwrap();
    assert_eq!(d.metrics().late_records, 3);
    assert_eq!(
        d.read_key_values::<u8, Pair>("inner").unwrap(),
        vec![(1, (Some(2), Some(0)))]
    );
    assert_eq!(
        d.join_buffer::<u8, u8, u8>("inner").unwrap(),
        vec![(true, 105, 1), (false, 100, 1)]
    );
    d.advance_time(1_000).unwrap();
    // The late record is never emitted unmatched either.
    assert_eq!(
        d.read_key_values::<u8, Pair>("outer").unwrap(),
        vec![(1, (Some(2), Some(0)))]
    );
}

#[test]
fn merge_and_foreign_streams() {
    let t = Topology::new();
    let a = t.stream::<u8, u64>("a");
    let b = t.stream::<u8, u64>("b").map_values(|v| v * 10);
    let m = a.merge(&b);
    m.to("merged");
    m.group_by_key().count("n").to("counts");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe_with_headers("a", 1u8, 1u64, 5, hdr(1)).unwrap();
    d.pipe("b", 1u8, 2u64, 6).unwrap();
    d.pipe("a", 2u8, 3u64, 7).unwrap();
    let merged = d.read_output::<u8, u64>("merged").unwrap();
    assert_eq!(
        merged,
        vec![
            Record::new(1, 1, 5).with_headers(hdr(1)),
            Record::new(1, 20, 6),
            Record::new(2, 3, 7)
        ]
    );
    assert_eq!(d.table_get::<u8, u64>("n", &1).unwrap(), Some(2));

    let other = Topology::new();
    let foreign = other.stream::<u8, u8>("x");
    let t = Topology::new();
    let s = t.stream::<u8, u8>("s");
    s.join_stream(&foreign, JoinWindows::symmetric(5), "j", |a, b| a + b)
        .to("o");
    assert!(matches!(t.build(), Err(BuildError::ForeignStream(_))));
    let t = Topology::new();
    t.stream::<u8, u8>("s").merge(&foreign).to("o");
    assert!(matches!(t.build(), Err(BuildError::ForeignStream(_))));
}

#[test]
fn join_windows_accessors() {
    let w = JoinWindows::of(3, 7).grace(2);
    assert_eq!(
        (w.before_ms(), w.after_ms(), w.grace_ms(), w.retention_ms()),
        (3, 7, 2, 12)
    );
    assert_eq!(JoinWindows::symmetric(4), JoinWindows::of(4, 4));
    assert_eq!(
        JoinWindows::of(u64::MAX, 1).grace(1).retention_ms(),
        u64::MAX
    );
}

#[test]
fn join_state_is_written_behind_and_restored() {
    let mut d = TestDriver::new(joins(10, 5, 0)).unwrap();
    d.pipe_with_headers("left", 1u8, 0u8, 100, hdr(0)).unwrap();
    d.commit().unwrap();
    assert_eq!(d.store().len("outer-join"), 1);
    d.pipe("right", 1u8, 1u8, 104).unwrap(); // matches: the flag is stored
    d.commit().unwrap();
    assert_eq!(d.store().len("outer-join"), 2);
    let mut d = d.restart(joins(10, 5, 0)).unwrap();
    assert_eq!(
        d.join_buffer::<u8, u8, u8>("outer-join").unwrap(),
        vec![(true, 100, 1), (false, 104, 1)]
    );
    d.advance_time(1_000).unwrap();
    // Both matched before the restart: nothing unmatched after it.
    assert!(d.read_output::<u8, Pair>("outer").unwrap().is_empty());
    d.commit().unwrap();
    assert_eq!(d.store().len("outer-join"), 0);
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A record (left or right) of `key` at `ts`; its value and header are
    /// its index among records.
    Rec { left: bool, key: u8, ts: u64 },
    /// Stream time moves to this.
    Advance(u64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => (any::<bool>(), 0u8..3, 0u64..200).prop_map(|(left, key, ts)| Ev::Rec { left, key, ts }),
        1 => (0u64..230).prop_map(Ev::Advance),
    ]
}

/// An output: step, key, (left id, right id), timestamp, header id.
type Out = (usize, u8, Pair, u64, u8);

#[derive(Debug, Clone)]
struct Rec {
    left: bool,
    key: u8,
    id: u8,
    ts: u64,
    expired: bool,
}

#[derive(Default)]
struct Want {
    inner: Vec<Out>,
    left: Vec<Out>,
    outer: Vec<Out>,
    /// After each step: the records a join keeps, as `(left, ts, key)`,
    /// left first, each side by timestamp then arrival.
    kept: Vec<Vec<(bool, u64, u8)>>,
}

/// Every on-time record ever seen, scanned by brute force.
fn model(events: &[Ev], before: u64, after: u64, grace: u64) -> Want {
    let retention = before + after + grace;
    let joins = |l: &Rec, r: &Rec| l.key == r.key && r.ts + before >= l.ts && r.ts <= l.ts + after;
    let mut want = Want::default();
    let mut seen: Vec<Rec> = Vec::new();
    let mut st = 0u64;
    let mut id = 0u8;
    let advance = |st: &mut u64, to: u64, step: usize, seen: &mut Vec<Rec>, want: &mut Want| {
        if to <= *st {
            return;
        }
        *st = to;
        let mut gone: Vec<usize> = (0..seen.len())
            .filter(|&i| !seen[i].expired && seen[i].ts + retention < *st)
            .collect();
        // By timestamp, left first, then arrival.
        gone.sort_by_key(|&i| (seen[i].ts, !seen[i].left, i));
        for i in gone {
            seen[i].expired = true;
            let me = &seen[i];
            let matched = seen
                .iter()
                .any(|o| o.left != me.left && if me.left { joins(me, o) } else { joins(o, me) });
            if matched {
                continue;
            }
            if me.left {
                let o = (step, me.key, (Some(me.id), None), me.ts, me.id);
                want.left.push(o);
                want.outer.push(o);
            } else {
                want.outer
                    .push((step, me.key, (None, Some(me.id)), me.ts, me.id));
            }
        }
    };
    for (step, e) in events.iter().enumerate() {
        match *e {
            Ev::Advance(to) => advance(&mut st, to, step, &mut seen, &mut want),
            Ev::Rec { left, key, ts } => {
                let me = Rec {
                    left,
                    key,
                    id,
                    ts,
                    expired: false,
                };
                id += 1;
                advance(&mut st, ts, step, &mut seen, &mut want);
                let reach = if left { after } else { before };
                if ts + reach + grace >= st {
                    let mut partners: Vec<&Rec> = seen
                        .iter()
                        .filter(|o| {
                            o.left != left && if left { joins(&me, o) } else { joins(o, &me) }
                        })
                        .collect();
                    partners.sort_by_key(|o| o.ts); // stable: then arrival
                    for o in partners {
                        let pair = if left {
                            (Some(me.id), Some(o.id))
                        } else {
                            (Some(o.id), Some(me.id))
                        };
                        let out = (step, key, pair, ts.max(o.ts), me.id);
                        want.inner.push(out);
                        want.left.push(out);
                        want.outer.push(out);
                    }
                    seen.push(me);
                }
            }
        }
        let mut kept: Vec<(bool, u64, u8, usize)> = seen
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.expired)
            .map(|(i, r)| (r.left, r.ts, r.key, i))
            .collect();
        kept.sort_by_key(|&(left, ts, _, i)| (!left, ts, i));
        want.kept
            .push(kept.into_iter().map(|(l, ts, k, _)| (l, ts, k)).collect());
    }
    advance(&mut st, FAR, events.len(), &mut seen, &mut want);
    want
}

#[derive(Default, Debug, PartialEq)]
struct Got {
    inner: Vec<Out>,
    left: Vec<Out>,
    outer: Vec<Out>,
    kept: Vec<Vec<(bool, u64, u8)>>,
}

fn collect(d: &mut TestDriver, step: usize, got: &mut Got) {
    for (name, into) in [
        ("inner", &mut got.inner),
        ("left", &mut got.left),
        ("outer", &mut got.outer),
    ] {
        for r in d.read_output::<u8, Pair>(name).unwrap() {
            into.push((step, r.key, r.value, r.timestamp_ms, hdr_id(&r.headers)));
        }
    }
}

fn apply(d: &mut TestDriver, e: Ev, id: &mut u8) {
    match e {
        Ev::Rec { left, key, ts } => {
            let input = if left { "left" } else { "right" };
            d.pipe_with_headers(input, key, *id, ts, hdr(*id)).unwrap();
            *id += 1;
        }
        Ev::Advance(to) => d.advance_time(to).unwrap(),
    }
}

/// Runs `events`, committing before event `commit_at`, then processing
/// `lost` more events and crashing, restoring and going on from
/// `commit_at`.
fn run(events: &[Ev], top: impl Fn() -> Topology, commit_at: usize, lost: usize) -> Got {
    let mut got = Got::default();
    let mut d = replay_with_crash(events, top, commit_at, lost, apply, |d, step| {
        collect(d, step, &mut got);
        got.kept.push(d.join_buffer::<u8, u8, u8>("inner").unwrap());
    });
    d.advance_time(FAR).unwrap();
    collect(&mut d, events.len(), &mut got);
    for store in ["inner", "left-join", "outer-join"] {
        assert!(d.join_buffer::<u8, u8, u8>(store).unwrap().is_empty());
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random windows and grace, keys, out-of-order and late records, and
    /// a crash mid-stream: each join gives exactly the model's outputs
    /// (pairs as the second record arrives, unmatched records when they
    /// expire, never early), at the same steps, with the same timestamps
    /// and headers, and keeps exactly the records the model keeps.
    #[test]
    fn joins_match_the_reference_model(
        events in proptest::collection::vec(ev(), 0..100),
        before in 0u64..30,
        after in 0u64..30,
        grace in 0u64..20,
        commit_at in 0usize..100,
        lost in 0usize..10,
    ) {
        let want = model(&events, before, after, grace);
        let got = run(&events, || joins(before, after, grace), commit_at, lost);
        prop_assert_eq!(&got.inner, &want.inner);
        prop_assert_eq!(&got.left, &want.left);
        prop_assert_eq!(&got.outer, &want.outer);
        prop_assert_eq!(&got.kept, &want.kept);
    }
}

// ---------------------------------------------------------------------------
// The runner on the in-memory log.

fn outer_only() -> Topology {
    let t = Topology::new();
    let l = t.stream::<u8, u8>("left");
    let r = t.stream::<u8, u8>("right");
    l.outer_join_stream(&r, JoinWindows::of(10, 5).grace(2), "outer-join", |a, b| {
        (a.copied(), b.copied())
    })
    .to("outer");
    t
}

#[tokio::test]
async fn runner_is_exactly_once_across_reopens() {
    // (left, key, ts): pairs, unmatched on both sides, one late record.
    let records: Vec<(bool, u8, u64)> = vec![
        (true, 1, 100),
        (false, 1, 95),
        (false, 2, 101),
        (true, 1, 104),
        (false, 1, 108),
        (true, 3, 110),
        (false, 1, 140),
        (true, 1, 120), // 120 + 5 + 2 < 140: late
        (false, 3, 150),
        (true, 2, 151),
    ];
    let log = Arc::new(InMemoryLog::new());
    let events: Vec<NewEvent> = records
        .iter()
        .enumerate()
        .map(|(i, &(left, k, ts))| {
            let (schema, payload) =
                envelope::encode_with_headers(&k.to_bytes(), &(i as u8).to_bytes(), &hdr(i as u8));
            NewEvent::new(if left { "left" } else { "right" }, schema, ts, payload)
        })
        .collect();
    append_then_close(&log, events).await;

    // What the TestDriver gives for the same input, uninterrupted.
    let mut d = TestDriver::new(outer_only()).unwrap();
    for (i, &(left, k, ts)) in records.iter().enumerate() {
        let input = if left { "left" } else { "right" };
        d.pipe_with_headers(input, k, i as u8, ts, hdr(i as u8))
            .unwrap();
    }
    d.advance_time(FAR).unwrap();
    assert_eq!(d.metrics().late_records, 1);
    let want: Vec<(u8, Pair, u8)> = d
        .read_output::<u8, Pair>("outer")
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value, hdr_id(&r.headers)))
        .collect();
    assert!(want.iter().any(|(_, p, _)| p.0.is_none()));
    assert!(want.iter().any(|(_, p, _)| p.1.is_none()));
    assert!(want.iter().any(|(_, p, _)| p.0.is_some() && p.1.is_some()));

    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            outer_only(),
            &store,
            &log,
            &fail,
            RunnerConfig::new("joins").with_batch(3),
        )
    };
    // Crashes at every step (the records and outputs of the log make about
    // 12 steps).
    let mut r = crash_and_reopen(open, &fail).await;
    assert_eq!(r.run_until_idle().await.unwrap().records, 0);
    assert!(r
        .task()
        .join_buffer::<u8, u8, u8>("outer-join")
        .unwrap()
        .is_empty());
    assert_eq!(r.task().metrics().late_records, 1);

    let all = log.read_all(0, 1_000).await.unwrap();
    let got: Vec<(u8, Pair, u8)> = all
        .iter()
        .filter(|e| e.kind == "outer")
        .map(|e| {
            let (k, v, h) = envelope::decode_event(e).unwrap();
            (
                u8::decode(&k).unwrap(),
                <Pair as StateCodec>::decode(&v).unwrap(),
                hdr_id(&h),
            )
        })
        .collect();
    assert_eq!(
        got, want,
        "every output exactly once, in order, with headers"
    );
}
