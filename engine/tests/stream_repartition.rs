//! Repartitions: `group_by` a new key (and the explicit `repartition`) go
//! through an internal stream. On the TestDriver records pass through it at
//! once, against a reference model with a crash and restore; on a runner
//! over the in-memory log the internal stream is an event stream of the
//! log, and every record is counted exactly once across crashes and
//! reopens.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use common::{append_then_close, crash_and_reopen, open_on_log, replay_with_crash};
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, BuildError, Headers, InMemoryStore, KeyValueStore, Record, RunnerConfig, StateCodec,
    TestDriver, Topology, Windowed, Windows,
};
use smartmsg_engine::{EventLog, NewEvent};

fn hdr(id: u8) -> Headers {
    Headers::new().with("id", vec![id]).unwrap()
}

fn hdr_id(h: &Headers) -> u8 {
    h.last("id").map(|v| v[0]).unwrap_or(u8::MAX)
}

/// Orders (order id → product id, a `u8` each): orders per product
/// (`group_by` the product, then count), the sum of the values (product
/// ids) per product (`group_by` then aggregate, its own repartition), and
/// the orders passed through an explicit repartition keyed by product.
fn orders() -> Topology {
    let t = Topology::new();
    let s = t.stream::<u8, u8>("orders");
    let by_product = s.group_by(|_, p| *p);
    by_product.count("per-product").to("counts");
    by_product
        .aggregate("ids-per-product", || 0u64, |_, p, sum| *sum += u64::from(p))
        .to("sums");
    s.map(|id, p| (p, id))
        .repartition("by-product")
        .to("passed");
    t
}

#[test]
fn group_by_counts_by_the_new_key_through_the_internal_stream() {
    let mut d = TestDriver::new(orders()).unwrap();
    let mut names = d.task().repartitions().to_vec();
    names.sort();
    assert_eq!(
        names,
        [
            "by-product-repartition",
            "ids-per-product-repartition",
            "per-product-repartition"
        ]
    );
    assert!(d.task().is_repartition("per-product-repartition"));
    assert!(!d.task().is_repartition("counts"));
    d.pipe_with_headers("orders", 1u8, 7u8, 100, hdr(1))
        .unwrap();
    d.pipe_with_headers("orders", 2u8, 7u8, 50, hdr(2)).unwrap();
    d.pipe_with_headers("orders", 3u8, 9u8, 120, hdr(3))
        .unwrap();
    let counts: Vec<(u8, u64, u64)> = d
        .read_output::<u8, u64>("counts")
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value, r.timestamp_ms))
        .collect();
    assert_eq!(counts, [(7, 1, 100), (7, 2, 50), (9, 1, 120)]);
    assert_eq!(d.table_get::<u8, u64>("per-product", &7).unwrap(), Some(2));
    assert_eq!(
        d.table_get::<u8, u64>("ids-per-product", &7).unwrap(),
        Some(14)
    );
    // The explicit repartition keeps timestamps and headers.
    let passed: Vec<(u8, u8, u64, u8)> = d
        .read_output::<u8, u8>("passed")
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value, r.timestamp_ms, hdr_id(&r.headers)))
        .collect();
    assert_eq!(passed, [(7, 1, 100, 1), (7, 2, 50, 2), (9, 3, 120, 3)]);
    let sums: Vec<(u8, u64)> = d.read_key_values("sums").unwrap();
    assert_eq!(sums, [(7, 7), (7, 14), (9, 9)]);
    // Nothing waits in an internal stream.
    assert_eq!(d.task().pending_outputs(), 0);
    // Stream time is the largest timestamp: an internal record never
    // moves it back.
    assert_eq!(d.stream_time(), 120);
    // Input records and the records read back from internal streams.
    assert_eq!(d.metrics().processed, 3 + 3 * 3);
}

#[test]
fn windowed_and_chained_repartitions() {
    let t = Topology::new();
    t.stream::<u8, u8>("in")
        .group_by(|_, v| v % 2)
        .windowed_by(Windows::tumbling(100).unwrap().grace(10))
        .count("parity-windows")
        .to("windowed");
    // A repartition downstream of another one.
    t.stream::<u8, u8>("in2")
        .repartition("first")
        .map(|k, v| (v, k))
        .repartition("second")
        .to("twice");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("in", 0u8, 3u8, 10).unwrap();
    d.pipe("in", 0u8, 5u8, 20).unwrap();
    d.pipe("in", 0u8, 4u8, 150).unwrap();
    d.pipe("in", 0u8, 1u8, 30).unwrap(); // window [0, 100) closed at 110: late
    let w: Vec<(Windowed<u8>, u64)> = d.read_key_values("windowed").unwrap();
    assert_eq!(w.len(), 3);
    assert_eq!((w[1].0.key, w[1].0.window.start_ms, w[1].1), (1, 0, 2));
    assert_eq!(d.metrics().late_records, 1);
    d.pipe_with_headers("in2", 1u8, 2u8, 5, hdr(4)).unwrap();
    let out = d.read_output::<u8, u8>("twice").unwrap();
    assert_eq!(
        out,
        [Record::new(2u8, 1u8, 5).with_headers(hdr(4))],
        "through both internal streams"
    );
}

#[test]
fn repartition_names_are_reserved_and_unique() {
    let t = Topology::new();
    t.stream::<u8, u8>("in").to("x-repartition");
    assert!(matches!(t.build(), Err(BuildError::ReservedName(n)) if n == "x-repartition"));
    let t = Topology::new();
    t.stream::<u8, u8>("y-repartition");
    assert!(matches!(t.build(), Err(BuildError::ReservedName(_))));
    let t = Topology::new();
    let s = t.stream::<u8, u8>("in");
    s.repartition("a").to("o1");
    s.repartition("a").to("o2");
    assert!(matches!(t.build(), Err(BuildError::DuplicateInput(n)) if n == "a-repartition"));
}

// ---------------------------------------------------------------------------
// The reference model

/// An order: (order id is its index) product, timestamp.
type Ev = (u8, u64);

/// What the topology must emit for `events` in order: per event, the
/// count and the sum of values of its product so far, and the record passed
/// through the explicit repartition, each with the order's timestamp.
#[derive(Debug, Default, PartialEq, Eq)]
struct Got {
    counts: Vec<(u8, u64, u64)>,
    sums: Vec<(u8, u64, u64)>,
    passed: Vec<(u8, u8, u64, u8)>,
}

fn model(events: &[Ev]) -> Got {
    let mut counts = std::collections::HashMap::<u8, u64>::new();
    let mut sums = std::collections::HashMap::<u8, u64>::new();
    let mut want = Got::default();
    for (id, &(p, ts)) in events.iter().enumerate() {
        let id = id as u8;
        let c = counts.entry(p).or_default();
        *c += 1;
        want.counts.push((p, *c, ts));
        let s = sums.entry(p).or_default();
        *s += u64::from(p);
        want.sums.push((p, *s, ts));
        want.passed.push((p, id, ts, id));
    }
    want
}

fn apply(d: &mut TestDriver, (p, ts): Ev, id: &mut u8) {
    d.pipe_with_headers("orders", *id, p, ts, hdr(*id)).unwrap();
    *id += 1;
}

fn collect(d: &mut TestDriver, got: &mut Got) {
    let pick = |rs: Vec<Record<u8, u64>>| {
        rs.into_iter()
            .map(|r| (r.key, r.value, r.timestamp_ms))
            .collect::<Vec<_>>()
    };
    got.counts.extend(pick(d.read_output("counts").unwrap()));
    got.sums.extend(pick(d.read_output("sums").unwrap()));
    got.passed.extend(
        d.read_output::<u8, u8>("passed")
            .unwrap()
            .into_iter()
            .map(|r| (r.key, r.value, r.timestamp_ms, hdr_id(&r.headers))),
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random orders, timestamps out of order, a commit then a crash that
    /// loses the next `lost` orders' effects: the outputs seen (those of
    /// the lost orders are dropped with the crash and produced again after
    /// the restore) and the stores are the model's.
    #[test]
    fn group_by_matches_the_reference_model(
        events in prop::collection::vec((0u8..5, 0u64..1_000), 1..40),
        commit_at in 0usize..40,
        lost in 0usize..6,
    ) {
        let commit_at = commit_at % events.len();
        let mut got = Got::default();
        let d = replay_with_crash(&events, orders, commit_at, lost, apply, |d, _| {
            collect(d, &mut got)
        });
        let want = model(&events);
        prop_assert_eq!(&got, &want);
        let mut table = d.table_entries::<u8, u64>("per-product").unwrap();
        table.sort();
        let mut last = std::collections::BTreeMap::new();
        for &(p, c, _) in &want.counts {
            last.insert(p, c);
        }
        prop_assert_eq!(table, last.into_iter().collect::<Vec<_>>());
        prop_assert_eq!(
            d.stream_time(),
            events.iter().map(|e| e.1).max().unwrap_or(0)
        );
    }
}

// ---------------------------------------------------------------------------
// On a runner over the in-memory log

#[tokio::test]
async fn runner_counts_every_record_once_through_the_internal_stream_across_reopens() {
    let orders_in: Vec<Ev> = (0..14u8)
        .map(|i| (i % 3, 1_000 - u64::from(i) * 7))
        .collect();
    let log = Arc::new(InMemoryLog::new());
    let events: Vec<NewEvent> = orders_in
        .iter()
        .enumerate()
        .map(|(i, &(p, ts))| {
            let (schema, payload) =
                envelope::encode_with_headers(&(i as u8).to_bytes(), &p.to_bytes(), &hdr(i as u8));
            NewEvent::new("orders", schema, ts, payload)
        })
        .collect();
    append_then_close(&log, events).await;

    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            orders(),
            &store,
            &log,
            &fail,
            RunnerConfig::new("orders").with_batch(3),
        )
    };
    // A crash after a commit, one between a commit and its delivery (the
    // outbox holds repartition records too), then one after every step,
    // to the end.
    let mut r = crash_and_reopen(open, &fail).await;
    while r.step().await.unwrap().records > 0 {
        r = open();
    }
    let want = model(&orders_in);
    let mut table = r.task().table_entries::<u8, u64>("per-product").unwrap();
    table.sort();
    assert_eq!(table, [(0, 5), (1, 5), (2, 4)]);

    let all = log.read_all(0, 10_000).await.unwrap();
    let of = |kind: &str| -> Vec<(u8, u64, u64, u8)> {
        all.iter()
            .filter(|e| e.kind == kind)
            .map(|e| {
                let (k, v, h) = envelope::decode_event(e).unwrap();
                let v = if v.len() == 1 {
                    u64::from(u8::decode(&v).unwrap())
                } else {
                    u64::decode(&v).unwrap()
                };
                (u8::decode(&k).unwrap(), v, e.timestamp_ms, hdr_id(&h))
            })
            .collect()
    };
    // Each order written once to each internal stream, in order, with its
    // timestamp and headers (a redelivered outbox appends nothing).
    let internal = of("per-product-repartition");
    assert_eq!(internal.len(), orders_in.len());
    for (i, (&(p, ts), got)) in orders_in.iter().zip(&internal).enumerate() {
        assert_eq!(*got, (p, u64::from(p), ts, i as u8));
    }
    assert_eq!(of("ids-per-product-repartition").len(), orders_in.len());
    // Each read back once: the counts are the model's, in order.
    let counts: Vec<(u8, u64, u64)> = of("counts")
        .into_iter()
        .map(|(k, c, ts, _)| (k, c, ts))
        .collect();
    assert_eq!(counts, want.counts);
    let sums: Vec<(u8, u64, u64)> = of("sums")
        .into_iter()
        .map(|(k, c, ts, _)| (k, c, ts))
        .collect();
    assert_eq!(sums, want.sums);
    let passed: Vec<(u8, u8, u64, u8)> = of("passed")
        .into_iter()
        .map(|(k, v, ts, h)| (k, v as u8, ts, h))
        .collect();
    assert_eq!(passed, want.passed);
    // Inputs plus the records read back from the three internal streams.
    assert_eq!(r.task().metrics().processed, orders_in.len() as u64 * 4);
}

/// `EventLogSource::new` (key = stream id, value = payload) reads the
/// internal streams as the envelopes the sink wrote.
#[tokio::test]
async fn default_event_log_source_reads_internal_streams_as_envelopes() {
    use bytes::Bytes;
    use smartmsg_engine::stream::{EventLogSink, EventLogSource, StreamRunner};
    use smartmsg_engine::{AppendTx, ExpectedVersion, StreamId};

    let top = || {
        let t = Topology::new();
        t.stream::<Bytes, Bytes>("visit")
            .group_by(|_, page| page.clone())
            .count("per-page")
            .to("counts");
        t
    };
    let log = Arc::new(InMemoryLog::new());
    for (user, page) in [("ann", "home"), ("bob", "home"), ("ann", "cart")] {
        log.append(AppendTx::single(
            StreamId::new(user).unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::new("visit", 1, 5, page.as_bytes().to_vec())],
        ))
        .await
        .unwrap();
    }
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let log_dyn: Arc<dyn EventLog> = log.clone();
    let mut r = StreamRunner::open(
        top(),
        store,
        EventLogSource::new(log_dyn.clone()),
        EventLogSink::new(log_dyn),
        RunnerConfig::new("visits"),
    )
    .unwrap();
    r.run_until_idle().await.unwrap();
    let mut table = r.task().table_entries::<Bytes, u64>("per-page").unwrap();
    table.sort();
    assert_eq!(table, [(Bytes::from("cart"), 1), (Bytes::from("home"), 2)]);
}
