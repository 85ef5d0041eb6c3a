//! The Processor API and record headers: processors against a reference
//! model (proptest), punctuators on stream time and on a ManualClock, DSL
//! and processors mixed in one topology, headers through every DSL
//! operator, and the exactly-once runner with a processor and a store
//! across crashes.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::open_on_log;
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, BuildError, EmitStrategy, EventLogSink, EventLogSource, Headers, InMemoryStore,
    KeyValueStore, Processor, ProcessorContext, Punctuation, PunctuationType, PunctuatorId, Record,
    RunnerConfig, RunnerError, StateCodec, StreamError, StreamRunner, TestDriver, Topology,
    Windowed, Windows,
};
use smartmsg_engine::stream::{ChangelogEntry, Entries, StoreError, WriteBatch};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, ManualClock, NewEvent, StreamId};
use std::ops::Bound;

fn hdr(name: &str, value: &str) -> Headers {
    Headers::new()
        .with(name, value.as_bytes().to_vec())
        .unwrap()
}

// ---------------------------------------------------------------------------
// A processor against a reference model.

/// Running sums per key in the store "sums": each record forwards the new
/// sum to "updates" (with the record's timestamp and headers); every 100 ms
/// of stream time, every sum goes to "snap".
struct RunningSum;

impl Processor<u32, u64, u32, u64> for RunningSum {
    fn init(&mut self, ctx: &mut ProcessorContext<'_, u32, u64>) -> Result<(), StreamError> {
        ctx.schedule(100, PunctuationType::StreamTime)?;
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, u32, u64>,
        r: Record<u32, u64>,
    ) -> Result<(), StreamError> {
        let sum = {
            let mut s = ctx.store::<u32, u64>("sums")?;
            let sum = s.get(&r.key).copied().unwrap_or(0) + r.value;
            s.put(r.key, sum)?;
            sum
        };
        ctx.forward_to("updates", r.with_value(sum))
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, u32, u64>,
        p: Punctuation,
    ) -> Result<(), StreamError> {
        let all: Vec<(u32, u64)> = ctx
            .store::<u32, u64>("sums")?
            .entries()
            .into_iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        for (k, v) in all {
            ctx.forward_to("snap", Record::new(k, v, p.timestamp_ms))?;
        }
        Ok(())
    }
}

/// DSL filter → processor → (updates: DSL map_values → output "updates",
/// snap → output "snap").
fn sum_topology() -> Topology {
    let t = Topology::new();
    t.add_state_store::<u32, u64>("sums");
    let p = t
        .stream::<u32, u64>("in")
        .filter(|_, v| v % 7 != 0)
        .process("sum", RunningSum, &["sums"]);
    p.child("updates").map_values(|s| s * 2).to("updates");
    p.child("snap").to("snap");
    t
}

type Out = Vec<(u32, u64, u64, Headers)>;

/// The reference: what `sum_topology` must output, computed directly.
fn model(records: &[(u32, u64, u64)]) -> (Out, Out) {
    let (mut updates, mut snaps) = (Vec::new(), Vec::new());
    let mut sums = BTreeMap::<u32, u64>::new();
    let mut stream_time = 0u64;
    for (i, &(k, v, ts)) in records.iter().enumerate() {
        if ts > stream_time {
            // A multiple of 100 crossed: the punctuation fires first.
            if ts / 100 > stream_time / 100 {
                for (&k, &s) in &sums {
                    snaps.push((k, s, ts, Headers::new()));
                }
            }
            stream_time = ts;
        }
        if v % 7 != 0 {
            let s = sums.entry(k).or_insert(0);
            *s += v;
            updates.push((k, *s * 2, ts, hdr("i", &i.to_string())));
        }
    }
    (updates, snaps)
}

fn flatten(rs: Vec<Record<u32, u64>>) -> Out {
    rs.into_iter()
        .map(|r| (r.key, r.value, r.timestamp_ms, r.headers))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random records with out-of-order timestamps, a commit and restart at
    /// a random point: the processor topology gives the model's outputs.
    #[test]
    fn processor_topology_matches_the_model(
        records in proptest::collection::vec((0u32..5, 0u64..50, 0u64..2_000), 0..80),
        restart_at in 0usize..80,
    ) {
        let (want_updates, want_snaps) = model(&records);
        let mut d = TestDriver::new(sum_topology()).unwrap();
        let (mut updates, mut snaps) = (Vec::new(), Vec::new());
        for (i, &(k, v, ts)) in records.iter().enumerate() {
            if i == restart_at {
                d.commit().unwrap();
                updates.extend(flatten(d.read_output("updates").unwrap()));
                snaps.extend(flatten(d.read_output("snap").unwrap()));
                d = d.restart(sum_topology()).unwrap();
            }
            d.pipe_with_headers("in", k, v, ts, hdr("i", &i.to_string())).unwrap();
        }
        updates.extend(flatten(d.read_output("updates").unwrap()));
        snaps.extend(flatten(d.read_output("snap").unwrap()));
        prop_assert_eq!(updates, want_updates);
        prop_assert_eq!(snaps, want_snaps);
    }
}

// ---------------------------------------------------------------------------
// Punctuators.

/// Records every punctuation it gets; schedules what it is told to.
struct Ticker {
    schedule: Vec<(u64, PunctuationType)>,
    ids: Vec<PunctuatorId>,
    cancel_after: Option<usize>,
    fired: usize,
}

impl Ticker {
    fn new(schedule: Vec<(u64, PunctuationType)>) -> Self {
        Self {
            schedule,
            ids: Vec::new(),
            cancel_after: None,
            fired: 0,
        }
    }
}

impl Processor<u32, u32, String, u64> for Ticker {
    fn init(&mut self, ctx: &mut ProcessorContext<'_, String, u64>) -> Result<(), StreamError> {
        for &(interval, kind) in &self.schedule {
            self.ids.push(ctx.schedule(interval, kind)?);
        }
        Ok(())
    }

    fn process(
        &mut self,
        _: &mut ProcessorContext<'_, String, u64>,
        _: Record<u32, u32>,
    ) -> Result<(), StreamError> {
        Ok(())
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        p: Punctuation,
    ) -> Result<(), StreamError> {
        let kind = match p.kind {
            PunctuationType::StreamTime => "stream",
            PunctuationType::WallClockTime => "wall",
        };
        self.fired += 1;
        if self.cancel_after == Some(self.fired) {
            assert!(ctx.cancel(p.id));
            assert!(!ctx.cancel(p.id));
        }
        ctx.forward(Record::new(
            kind.to_string(),
            p.timestamp_ms,
            p.timestamp_ms,
        ))
    }
}

fn ticker_topology(t: Ticker) -> Topology {
    let top = Topology::new();
    top.stream::<u32, u32>("in")
        .process("ticker", t, &[])
        .child("ticks")
        .to("ticks");
    top
}

fn ticks(d: &mut TestDriver) -> Vec<(String, u64)> {
    d.read_key_values::<String, u64>("ticks").unwrap()
}

#[test]
fn wall_clock_punctuators_follow_the_manual_clock() {
    let clock = ManualClock::new(1_000_250);
    let mut d = TestDriver::with_clock(
        ticker_topology(Ticker::new(vec![(1_000, PunctuationType::WallClockTime)])),
        clock.clone(),
    )
    .unwrap();
    // Scheduled at 1_000_250: first due at 1_001_000.
    d.advance_wall_clock(749).unwrap();
    assert!(ticks(&mut d).is_empty());
    d.advance_wall_clock(1).unwrap();
    assert_eq!(ticks(&mut d), vec![("wall".into(), 1_001_000)]);
    // Several intervals at once: one punctuation, at the tick's time.
    d.advance_wall_clock(2_500).unwrap();
    assert_eq!(ticks(&mut d), vec![("wall".into(), 1_003_500)]);
    // Records and stream time do not move wall-clock punctuators.
    d.pipe("in", 1u32, 1u32, 5_000_000).unwrap();
    d.advance_time(9_000_000).unwrap();
    assert!(ticks(&mut d).is_empty());
    // Someone else moves the clock; the driver reads it on a tick.
    clock.advance(500);
    d.tick_wall_clock().unwrap();
    assert_eq!(ticks(&mut d), vec![("wall".into(), 1_004_000)]);
    assert_eq!(d.task().wall_clock_ms(), Some(1_004_000));
}

#[test]
fn stream_time_punctuators_follow_stream_time_only() {
    let mut d = TestDriver::new(ticker_topology(Ticker::new(vec![
        (10, PunctuationType::StreamTime),
        (25, PunctuationType::StreamTime),
    ])))
    .unwrap();
    d.pipe("in", 1u32, 0u32, 9).unwrap();
    assert!(ticks(&mut d).is_empty());
    d.pipe("in", 1u32, 0u32, 10).unwrap();
    assert_eq!(ticks(&mut d), vec![("stream".into(), 10)]);
    // Out of order: stream time does not go back, nothing fires.
    d.pipe("in", 1u32, 0u32, 3).unwrap();
    d.pipe("in", 1u32, 0u32, 19).unwrap();
    assert!(ticks(&mut d).is_empty());
    d.advance_wall_clock(1_000_000).unwrap();
    assert!(ticks(&mut d).is_empty());
    // 19 → 30 crosses 20 (the first) and 25 (the second), once each.
    d.advance_time(30).unwrap();
    assert_eq!(
        ticks(&mut d),
        vec![("stream".into(), 30), ("stream".into(), 30)]
    );
    d.advance_time(49).unwrap();
    assert_eq!(ticks(&mut d), vec![("stream".into(), 49)]);
    d.advance_time(50).unwrap();
    assert_eq!(
        ticks(&mut d),
        vec![("stream".into(), 50), ("stream".into(), 50)]
    );
}

#[test]
fn punctuators_can_be_cancelled_and_are_bounded() {
    let mut t = Ticker::new(vec![(10, PunctuationType::StreamTime)]);
    t.cancel_after = Some(2);
    let mut d = TestDriver::new(ticker_topology(t)).unwrap();
    for ts in [10, 20, 30, 40] {
        d.advance_time(ts).unwrap();
    }
    assert_eq!(ticks(&mut d).len(), 2);

    // The driver initialises processors when it starts: a bad interval is
    // reported there.
    for kind in [PunctuationType::StreamTime, PunctuationType::WallClockTime] {
        assert!(matches!(
            TestDriver::new(ticker_topology(Ticker::new(vec![(0, kind)]))),
            Err(smartmsg_engine::stream::DriverError::Stream(
                StreamError::BadPunctuator { .. }
            ))
        ));
    }
    let many = (0..2_000)
        .map(|_| (5, PunctuationType::StreamTime))
        .collect::<Vec<_>>();
    assert!(matches!(
        TestDriver::new(ticker_topology(Ticker::new(many))),
        Err(smartmsg_engine::stream::DriverError::Stream(
            StreamError::BadPunctuator { .. }
        ))
    ));
}

/// Stream-time punctuators resume from the restored stream time after a
/// restart, exactly as if there had been none.
#[test]
fn stream_time_punctuators_resume_after_restart() {
    let top = || ticker_topology(Ticker::new(vec![(10, PunctuationType::StreamTime)]));
    let mut d = TestDriver::new(top()).unwrap();
    d.advance_time(15).unwrap();
    assert_eq!(ticks(&mut d), vec![("stream".into(), 15)]);
    d.commit().unwrap();
    let mut d = d.restart(top()).unwrap();
    assert_eq!(d.stream_time(), 15);
    d.advance_time(19).unwrap();
    assert!(ticks(&mut d).is_empty());
    d.advance_time(20).unwrap();
    assert_eq!(ticks(&mut d), vec![("stream".into(), 20)]);
}

// ---------------------------------------------------------------------------
// DSL and processors mixed.

/// Enriches clicks with the user's country from a DSL table store, sends
/// known users to "known" and unknown ones to "unknown"; closes counted.
struct Enrich {
    closed: Arc<AtomicUsize>,
}

impl Processor<u32, u64, String, u64> for Enrich {
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        r: Record<u32, u64>,
    ) -> Result<(), StreamError> {
        let country = ctx.store::<u32, String>("users")?.get(&r.key).cloned();
        match country {
            Some(c) => {
                let mut h = r.headers.clone();
                h.add("country", c.as_bytes().to_vec())?;
                let out = r.with_key_value(c, 1).with_headers(h);
                ctx.forward_to("known", out)
            }
            None => ctx.forward_to("unknown", r.with_key_value(String::from("?"), 1)),
        }
    }

    fn close(&mut self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn dsl_and_processors_mix_in_one_topology() {
    let closed = Arc::new(AtomicUsize::new(0));
    let t = Topology::new();
    let users = t.stream::<u32, String>("users").to_table("users");
    assert_eq!(users.store_name(), "users");
    let p = t
        .stream::<u32, u64>("clicks")
        .filter(|_, v| *v > 0)
        .process(
            "enrich",
            Enrich {
                closed: closed.clone(),
            },
            &["users"],
        );
    // A processor child feeds DSL operators...
    p.child("known")
        .group_by_key()
        .windowed_by(Windows::tumbling(100).unwrap())
        .emit(EmitStrategy::OnWindowClose)
        .count("per-country")
        .to("counts");
    // ...and a sink; the same child asked again is the same child.
    p.child("unknown").to("unknown");
    p.child("known").to("known");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("users", 1u32, "fr".to_string(), 0).unwrap();
    d.pipe("clicks", 1u32, 5u64, 10).unwrap();
    d.pipe("clicks", 2u32, 5u64, 20).unwrap();
    d.pipe("clicks", 1u32, 0u64, 30).unwrap(); // filtered out
    d.pipe("clicks", 1u32, 7u64, 40).unwrap();
    let known = d.read_output::<String, u64>("known").unwrap();
    assert_eq!(known.len(), 2);
    assert_eq!(known[0].headers.last("country"), Some(&b"fr"[..]));
    assert_eq!(
        d.read_key_values::<String, u64>("unknown").unwrap(),
        vec![("?".to_string(), 1)]
    );
    d.advance_time(100).unwrap();
    let counts = d
        .read_key_values::<Windowed<String>, u64>("counts")
        .unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!((counts[0].0.key.as_str(), counts[0].1), ("fr", 2));
    d.close().unwrap();
    d.close().unwrap();
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert!(matches!(
        d.pipe("clicks", 1u32, 1u64, 200),
        Err(StreamError::Closed)
    ));
}

/// Forwards to a child it does not have, or reads a store it was not
/// given.
struct Misbehaving(u8);

impl Processor<u32, u32, u32, u32> for Misbehaving {
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, u32, u32>,
        r: Record<u32, u32>,
    ) -> Result<(), StreamError> {
        match self.0 {
            0 => ctx.forward_to("nope", r),
            1 => ctx.store::<u32, u32>("other").map(|_| ()),
            2 => ctx.store::<String, u32>("mine").map(|_| ()),
            _ => Err(StreamError::processor("bad", "refused")),
        }
    }
}

#[test]
fn processor_mistakes_are_typed_errors() {
    for (mode, check) in [
        (0u8, "child"),
        (1, "not attached"),
        (2, "type"),
        (3, "refused"),
    ] {
        let t = Topology::new();
        t.add_state_store::<u32, u32>("mine");
        t.add_state_store::<u32, u32>("other");
        t.stream::<u32, u32>("in")
            .process("p", Misbehaving(mode), &["mine"])
            .child("out")
            .to("out");
        let mut d = TestDriver::new(t).unwrap();
        let e = d.pipe("in", 1u32, 1u32, 0).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(check), "{mode}: {text}");
    }
    let t = Topology::new();
    t.stream::<u32, u32>("in")
        .process("p", Misbehaving(0), &["missing"]);
    assert!(matches!(t.build(), Err(BuildError::UnknownStore { .. })));
    let t = Topology::new();
    let s = t.stream::<u32, u32>("in");
    s.process("p", Misbehaving(0), &[]);
    s.process("p", Misbehaving(0), &[]);
    assert!(matches!(t.build(), Err(BuildError::DuplicateProcessor(_))));
}

// ---------------------------------------------------------------------------
// Headers through the DSL.

#[test]
fn every_stateless_operator_and_join_keeps_headers() {
    let t = Topology::new();
    let table = t.stream::<u32, String>("table").to_table("t");
    let s = t.stream::<u32, u64>("in");
    s.filter(|_, _| true).to("filter");
    s.map(|k, v| (v, k)).to("map");
    s.map_values(|v| v + 1).to("map_values");
    s.flat_map(|k, v| vec![(k, v), (k, v + 1)]).to("flat_map");
    s.with_timestamp(|_, _, ts| ts + 1).to("with_timestamp");
    let b = s.branch(vec![Box::new(|_, v| *v > 100), Box::new(|_, _| true)]);
    b[1].to("branch");
    let (ok, err) = s
        .map_values(|v| if v % 2 == 0 { Ok(v) } else { Err(v) })
        .split_result();
    ok.to("ok");
    err.to("err");
    s.join(&table, |v, t| format!("{v}{t}")).to("join");
    s.left_join(&table, |v, t| format!("{v}{t:?}"))
        .to("left_join");
    s.group_by_key().count("counts").to("count");
    s.group_by_key()
        .windowed_by(Windows::tumbling(10).unwrap())
        .late_records_to("late")
        .count("w")
        .to("windowed");

    let mut d = TestDriver::new(t).unwrap();
    d.pipe("table", 1u32, "x".to_string(), 0).unwrap();
    let h = hdr("trace", "t-1").with("trace", b"t-2".to_vec()).unwrap();
    d.pipe_with_headers("in", 1u32, 2u64, 50, h.clone())
        .unwrap();
    d.pipe_with_headers("in", 1u32, 3u64, 51, h.clone())
        .unwrap();
    d.pipe_with_headers("in", 1u32, 4u64, 1, h.clone()).unwrap(); // late

    fn headers_of<K: 'static, V: 'static>(d: &mut TestDriver, out: &str) -> Vec<Headers> {
        d.read_output::<K, V>(out)
            .unwrap()
            .into_iter()
            .map(|r| r.headers)
            .collect()
    }
    assert_eq!(headers_of::<u32, u64>(&mut d, "filter"), vec![h.clone(); 3]);
    assert_eq!(headers_of::<u64, u32>(&mut d, "map"), vec![h.clone(); 3]);
    assert_eq!(
        headers_of::<u32, u64>(&mut d, "map_values"),
        vec![h.clone(); 3]
    );
    assert_eq!(
        headers_of::<u32, u64>(&mut d, "flat_map"),
        vec![h.clone(); 6]
    );
    assert_eq!(
        headers_of::<u32, u64>(&mut d, "with_timestamp"),
        vec![h.clone(); 3]
    );
    assert_eq!(headers_of::<u32, u64>(&mut d, "branch"), vec![h.clone(); 3]);
    assert_eq!(headers_of::<u32, u64>(&mut d, "ok"), vec![h.clone(); 2]);
    assert_eq!(headers_of::<u32, u64>(&mut d, "err"), vec![h.clone(); 1]);
    assert_eq!(
        headers_of::<u32, String>(&mut d, "join"),
        vec![h.clone(); 3]
    );
    assert_eq!(
        headers_of::<u32, String>(&mut d, "left_join"),
        vec![h.clone(); 3]
    );
    // Late records keep theirs; aggregates are new records without any.
    let late = d
        .read_output::<u32, smartmsg_engine::stream::LateRecord<u64>>("late")
        .unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].headers, h);
    assert_eq!(
        headers_of::<u32, u64>(&mut d, "count"),
        vec![Headers::new(); 3]
    );
    assert_eq!(
        headers_of::<Windowed<u32>, u64>(&mut d, "windowed"),
        vec![Headers::new(); 2]
    );
}

// ---------------------------------------------------------------------------
// On the log, through the exactly-once runner.

/// A store whose next `fail` writes fail (a crash after processing,
/// before the commit).
struct CrashingStore {
    inner: InMemoryStore,
    fail: Arc<AtomicUsize>,
}

impl KeyValueStore for CrashingStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(space, key)
    }
    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        self.inner.range(space, start, end, max)
    }
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::KeyTooLarge { len: 0, max: 0 });
        }
        self.inner.write(batch)
    }
    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.inner.changelog(from, max)
    }
    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.inner.changelog_bounds()
    }
    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        self.inner.truncate_changelog(before)
    }
}

/// Sums per key (string keys, from the log) in the store "sums", forwards
/// each sum with the input's headers plus its own.
struct LogSum;

impl Processor<String, u64, String, u64> for LogSum {
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        r: Record<String, u64>,
    ) -> Result<(), StreamError> {
        let sum = {
            let mut s = ctx.store::<String, u64>("sums")?;
            let sum = s.get(&r.key).copied().unwrap_or(0) + r.value;
            s.put(r.key.clone(), sum)?;
            sum
        };
        let mut h = r.headers.clone();
        h.add("sum", sum.to_string().into_bytes())?;
        ctx.forward(r.with_value(sum).with_headers(h))
    }
}

fn log_topology() -> Topology {
    let t = Topology::new();
    t.add_state_store::<String, u64>("sums");
    t.stream::<String, u64>("adds")
        .process("sum", LogSum, &["sums"])
        .child("out")
        .to("sums");
    t
}

async fn append_adds(log: &InMemoryLog, adds: &[(&str, u64)], first_ts: u64) {
    let events = adds
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let h = hdr("n", &(first_ts + i as u64).to_string());
            let (schema, payload) =
                envelope::encode_with_headers(&k.to_string().to_bytes(), &v.to_bytes(), &h);
            NewEvent::new("adds", schema, first_ts + i as u64, payload)
        })
        .collect();
    log.append(AppendTx::single(
        StreamId::new("in").unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

/// A sum output: key, sum, headers.
type Sum = (String, u64, Vec<(String, String)>);

#[tokio::test]
async fn runner_with_a_processor_and_store_is_exactly_once_across_crashes() {
    let log = Arc::new(InMemoryLog::new());
    let fail_writes = Arc::new(AtomicUsize::new(0));
    let store: Arc<dyn KeyValueStore> = Arc::new(CrashingStore {
        inner: InMemoryStore::new(),
        fail: fail_writes.clone(),
    });
    let fail = Arc::new(AtomicUsize::new(0));
    append_adds(&log, &[("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5)], 0).await;
    let open = || {
        open_on_log(
            log_topology(),
            &store,
            &log,
            &fail,
            RunnerConfig::new("sums").with_batch(2),
        )
    };
    // Crash 1: after a commit and its delivery.
    let mut r = open();
    r.step().await.unwrap();
    drop(r);
    // Crash 2: after a commit, before its delivery (outputs in the outbox).
    let mut r = open();
    fail.store(1, Ordering::SeqCst);
    assert!(matches!(r.step().await, Err(RunnerError::Sink(_))));
    drop(r);
    // Crash 3: records processed (the outbox re-delivered), then the
    // commit fails: the processing never happened.
    let mut r = open();
    let processed = r.task().metrics().processed;
    fail_writes.store(1, Ordering::SeqCst);
    assert!(matches!(r.step().await, Err(RunnerError::Store(_))));
    assert!(r.task().metrics().processed > processed);
    assert!(matches!(r.step().await, Err(RunnerError::Poisoned)));
    drop(r);
    let mut r = open();
    assert_eq!(r.task().metrics().processed, processed);
    r.run_until_idle().await.unwrap();
    assert_eq!(
        r.task()
            .table_get::<String, u64>("sums", &"a".to_string())
            .unwrap(),
        Some(9)
    );
    assert_eq!(
        r.task()
            .table_get::<String, u64>("sums", &"b".to_string())
            .unwrap(),
        Some(6)
    );
    // Each output exactly once, in order, with the input's headers and the
    // processor's, read back through the source.
    let all = log.read_all(0, 100).await.unwrap();
    let outs: Vec<Sum> = all
        .iter()
        .filter(|e| e.kind == "sums")
        .map(|e| {
            assert_eq!(e.schema, envelope::SCHEMA_WITH_HEADERS);
            let (k, v, h) = envelope::decode_event(e).unwrap();
            let h = h
                .iter()
                .map(|(n, v)| (n.to_string(), String::from_utf8(v.to_vec()).unwrap()))
                .collect();
            (String::decode(&k).unwrap(), u64::decode(&v).unwrap(), h)
        })
        .collect();
    let want: Vec<Sum> = [("a", 1), ("b", 2), ("a", 4), ("b", 6), ("a", 9)]
        .iter()
        .enumerate()
        .map(|(i, (k, s))| {
            (
                k.to_string(),
                *s,
                vec![("n".into(), i.to_string()), ("sum".into(), s.to_string())],
            )
        })
        .collect();
    assert_eq!(outs, want);
}

/// Wall-clock punctuations in the runner: read from the clock at each step
/// and committed with it, even when the source had nothing.
struct Heartbeat;

impl Processor<String, u64, String, u64> for Heartbeat {
    fn init(&mut self, ctx: &mut ProcessorContext<'_, String, u64>) -> Result<(), StreamError> {
        ctx.schedule(1_000, PunctuationType::WallClockTime)?;
        Ok(())
    }
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        r: Record<String, u64>,
    ) -> Result<(), StreamError> {
        let mut s = ctx.store::<String, u64>("seen")?;
        let n = s.get(&r.key).copied().unwrap_or(0) + 1;
        s.put(r.key, n)
    }
    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        p: Punctuation,
    ) -> Result<(), StreamError> {
        let n = ctx.store::<String, u64>("seen")?.len() as u64;
        ctx.forward(Record::new("beat".to_string(), n, p.timestamp_ms))
    }
}

#[tokio::test]
async fn runner_fires_wall_clock_punctuators_from_its_clock() {
    let log = Arc::new(InMemoryLog::new());
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let clock = ManualClock::new(10_500);
    let t = Topology::new();
    t.add_state_store::<String, u64>("seen");
    t.stream::<String, u64>("adds")
        .process("hb", Heartbeat, &["seen"])
        .child("beats")
        .to("beats");
    let mut r = StreamRunner::open(
        t,
        store.clone(),
        EventLogSource::with_envelopes(log.clone()),
        EventLogSink::new(log.clone()),
        RunnerConfig::new("hb"),
    )
    .unwrap()
    .with_clock(Arc::new(clock.clone()));
    append_adds(&log, &[("a", 1), ("b", 1)], 0).await;
    r.run_until_idle().await.unwrap();
    assert_eq!(
        log.stream_version(&StreamId::new("beats").unwrap())
            .await
            .unwrap(),
        0
    );
    clock.advance(500);
    let rep = r.step().await.unwrap();
    assert_eq!((rep.records, rep.outputs), (0, 1));
    let beats: Vec<(u64, u64)> = log
        .read_all(0, 100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "beats")
        .map(|e| {
            let (_, v) = envelope::decode(&e.payload).unwrap();
            (u64::decode(&v).unwrap(), e.timestamp_ms)
        })
        .collect();
    assert_eq!(beats, vec![(2, 11_000)]);
    // Nothing due: an idle step commits nothing (after the runner skipped
    // its own output, which is in the log it reads).
    r.run_until_idle().await.unwrap();
    let before = r.next_commit();
    r.step().await.unwrap();
    assert_eq!(r.next_commit(), before);
}

/// Events written before headers existed (schema 1 envelopes) still read,
/// with no headers; header limits hold on what the log gives.
#[tokio::test]
async fn old_envelopes_still_read_and_bad_headers_do_not_panic() {
    let log = Arc::new(InMemoryLog::new());
    let stream = StreamId::new("in").unwrap();
    let old = NewEvent::new(
        "adds",
        1,
        5,
        envelope::encode(&"a".to_string().to_bytes(), &7u64.to_bytes()),
    );
    // Schema 2 whose header block is garbage: not an envelope, so the whole
    // payload is the value (and the topology's decode fails, typed).
    let mut bad = Vec::new();
    bad.extend_from_slice(&1u32.to_be_bytes());
    bad.push(b'k');
    bad.extend_from_slice(&4u32.to_be_bytes());
    bad.extend_from_slice(&[0xff; 4]);
    let bad = NewEvent::new("other", envelope::SCHEMA_WITH_HEADERS, 6, bad);
    log.append(AppendTx::single(
        stream,
        ExpectedVersion::Any,
        vec![old, bad],
    ))
    .await
    .unwrap();
    let events = log.read_all(0, 10).await.unwrap();
    let (k, v, h) = envelope::decode_event(&events[0]).unwrap();
    assert_eq!(
        (String::decode(&k).unwrap(), u64::decode(&v).unwrap()),
        ("a".to_string(), 7)
    );
    assert!(h.is_empty());
    assert!(envelope::decode_event(&events[1]).is_none());
    let mut src = EventLogSource::with_envelopes(log.clone());
    use smartmsg_engine::stream::Source;
    let recs = src.read(0, 10).await.unwrap();
    assert_eq!(recs.len(), 2);
    assert!(recs[0].headers.is_empty());
    assert_eq!(recs[1].key, Bytes::new());
}
