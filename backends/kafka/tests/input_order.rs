//! `KafkaStreamProcessor` picks records across its input partitions by
//! timestamp, as Kafka Streams' task does (`PartitionGroup`,
//! `max.task.idle.ms`), against a broker (`SMARTMSG_KAFKA_BOOTSTRAP`;
//! skipped when unset).
//!
//! Two input topics (three partitions in all) are written completely
//! before the processor starts, with interleaved, jittered and tied
//! timestamps; a merge of both, an inner and an outer windowed join must
//! give exactly what a reference gives that processes the records in the
//! processor's order: repeatedly the head with the lowest timestamp among
//! the partitions, ties to the first input topic, then the lower
//! partition. Run with small steps and a new processor every few steps
//! (buffered records are dropped and read again), with large buffers and
//! with buffers of 2 records (partitions paused and resumed). A third test
//! moves the idle time on a `ManualClock`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::stream::{JoinWindows, StateCodec, Topology};
use smartmsg_engine::ManualClock;
use smartmsg_kafka::stream::{ensure_topics, InputIdle};
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Produces `(key, id, ts)` records to `partition` of `topic`: key and
/// value (the record's id) encoded as the engine's `u8`, the timestamp
/// `ts`, and a header `i` holding the id.
fn produce_ids(bootstrap: &str, topic: &str, partition: i32, records: &[(u8, u8, u64)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for &(key, id, ts) in records {
        let (k, v, i) = (key.to_bytes(), id.to_bytes(), id.to_string());
        let rec = BaseRecord::<[u8], [u8]>::to(topic)
            .key(k.as_slice())
            .payload(v.as_slice())
            .partition(partition)
            .timestamp(ts as i64)
            .headers(OwnedHeaders::new().insert(Header {
                key: "i",
                value: Some(i.as_bytes()),
            }));
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// A record read back: key, value, timestamp, header `i`.
type Out = (u8, Vec<u8>, u64, u8);

/// Every record of partition 0 of `topic` (read_committed), waiting for
/// `want` of them and then 2 s more for any extra.
fn read_back(bootstrap: &str, topic: &str, want: usize) -> Vec<Out> {
    common::read_committed(bootstrap, topic, want, Duration::from_secs(30))
        .into_iter()
        .map(|r| {
            let id = r
                .headers
                .iter()
                .find(|(k, _)| k == "i")
                .and_then(|(_, v)| v.as_deref())
                .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
                .expect("header i");
            (
                u8::decode(&r.key).unwrap(),
                r.value,
                r.timestamp_ms as u64,
                id,
            )
        })
        .collect()
}

/// One step that processed records, within 60 s (the group join can take
/// a few seconds on the first poll).
fn step_some(p: &mut KafkaStreamProcessor) -> usize {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let n = p.step(Duration::from_secs(2)).unwrap().records;
        if n > 0 {
            return n;
        }
    }
    panic!("no input within 60 s");
}

// --- The topology and its reference ------------------------------------------

const BEFORE: u64 = 10;
const AFTER: u64 = 5;
const GRACE: u64 = 3;

/// Left and right streams (key and value `u8`, the value being the
/// record's id): merged to "merged" (which shows the processing order),
/// and joined within `JoinWindows::of(10, 5).grace(3)`, inner ("inner")
/// and outer ("outer").
fn topology() -> Topology {
    let t = Topology::new();
    let l = t.stream::<u8, u8>("left");
    let r = t.stream::<u8, u8>("right");
    l.merge(&r).to("merged");
    let jw = JoinWindows::of(BEFORE, AFTER).grace(GRACE);
    l.join_stream(&r, jw, "inner-join", |a, b| (Some(*a), Some(*b)))
        .to("inner");
    l.outer_join_stream(&r, jw, "outer-join", |a, b| (a.copied(), b.copied()))
        .to("outer");
    t
}

/// An input record: side, key, timestamp, id.
#[derive(Debug, Clone, Copy)]
struct In {
    left: bool,
    key: u8,
    ts: u64,
    id: u8,
}

/// The input partitions in the processor's tie-break order: left 0,
/// left 1, right 0. Timestamps drift up by 0–2 per record (so ties
/// across partitions are common) with up to 25 ms of jitter back (some
/// records out of order within their partition, some late); the last
/// record, of key 9 on left 0, is far ahead and closes every window.
fn input() -> Vec<(bool, i32, Vec<In>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut parts: Vec<(bool, i32, Vec<In>)> = vec![
        (true, 0, Vec::new()),
        (true, 1, Vec::new()),
        (false, 0, Vec::new()),
    ];
    let mut base = 1_000u64;
    for id in 0..90u8 {
        base += rng.random_range(0..3);
        let jitter = if rng.random_range(0..4) == 0 {
            rng.random_range(0..25)
        } else {
            0
        };
        // Half the records on each side.
        let p = if rng.random_bool(0.5) {
            2
        } else {
            rng.random_range(0..2)
        };
        parts[p].2.push(In {
            left: p < 2,
            key: rng.random_range(0..3),
            ts: base - jitter,
            id,
        });
    }
    parts[0].2.push(In {
        left: true,
        key: 9,
        ts: base + 1_000,
        id: 90,
    });
    parts
}

/// The processor's order over complete partitions: repeatedly the head
/// with the lowest timestamp, ties to the earlier partition in `parts`.
fn timestamp_order(parts: &[(bool, i32, Vec<In>)]) -> Vec<In> {
    let mut at = vec![0usize; parts.len()];
    let mut out = Vec::new();
    while let Some((_, i)) = parts
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.2.get(at[i]).map(|r| (r.ts, i)))
        .min()
    {
        out.push(parts[i].2[at[i]]);
        at[i] += 1;
    }
    out
}

/// A join output: key, (left id, right id), timestamp, header id.
type JoinOut = (u8, (Option<u8>, Option<u8>), u64, u8);

/// A join store entry as `Task::join_buffer` lists it: left side or not,
/// timestamp, key.
type JoinKept = (bool, u64, u8);

#[derive(Debug, Clone)]
struct Kept {
    left: bool,
    key: u8,
    id: u8,
    ts: u64,
    expired: bool,
}

/// The reference join (as in `processor.rs`): every on-time record kept
/// in a list, scanned by brute force. A left `l` and a right `r` of one
/// key join when `l.ts - before <= r.ts <= l.ts + after`; a record is late
/// when stream time is past its window's far end plus grace; a record
/// expires when stream time passes `ts + before + after + grace`, and the
/// outer join then sends it unmatched if nothing joined it (by timestamp,
/// left first, then arrival) before the record that moved stream time is
/// joined.
#[derive(Default)]
struct JoinModel {
    st: u64,
    seen: Vec<Kept>,
    inner: Vec<JoinOut>,
    outer: Vec<JoinOut>,
    late: u64,
    /// Stream time, `late` and what the join stores keep after each
    /// record.
    marks: Vec<(u64, u64, Vec<JoinKept>)>,
}

impl JoinModel {
    fn joins(l: &Kept, r: &Kept) -> bool {
        l.key == r.key && r.ts + BEFORE >= l.ts && r.ts <= l.ts + AFTER
    }

    fn pair(a: &Kept, b: &Kept) -> bool {
        a.left != b.left
            && if a.left {
                Self::joins(a, b)
            } else {
                Self::joins(b, a)
            }
    }

    fn record(&mut self, r: In) {
        if r.ts > self.st {
            self.st = r.ts;
            let retention = BEFORE + AFTER + GRACE;
            let mut gone: Vec<usize> = (0..self.seen.len())
                .filter(|&i| !self.seen[i].expired && self.seen[i].ts + retention < self.st)
                .collect();
            gone.sort_by_key(|&i| (self.seen[i].ts, !self.seen[i].left, i));
            for i in gone {
                self.seen[i].expired = true;
                let me = &self.seen[i];
                if !self.seen.iter().any(|o| Self::pair(me, o)) {
                    let pair = if me.left {
                        (Some(me.id), None)
                    } else {
                        (None, Some(me.id))
                    };
                    self.outer.push((me.key, pair, me.ts, me.id));
                }
            }
        }
        let reach = if r.left { AFTER } else { BEFORE };
        if r.ts + reach + GRACE < self.st {
            self.late += 1;
        } else {
            let me = Kept {
                left: r.left,
                key: r.key,
                id: r.id,
                ts: r.ts,
                expired: false,
            };
            let mut partners: Vec<&Kept> = self
                .seen
                .iter()
                .filter(|o| !o.expired && Self::pair(&me, o))
                .collect();
            partners.sort_by_key(|o| o.ts); // stable: then arrival
            for o in partners {
                let pair = if me.left {
                    (Some(me.id), Some(o.id))
                } else {
                    (Some(o.id), Some(me.id))
                };
                let out = (me.key, pair, me.ts.max(o.ts), me.id);
                self.inner.push(out);
                self.outer.push(out);
            }
            self.seen.push(me);
        }
        // What a join store keeps, as `Task::join_buffer` lists it:
        // `(left, ts, key)`, left side first, each side by timestamp then
        // arrival.
        let mut kept: Vec<(bool, u64, u8, usize)> = self
            .seen
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.expired)
            .map(|(i, k)| (k.left, k.ts, k.key, i))
            .collect();
        kept.sort_by_key(|&(left, ts, _, i)| (!left, ts, i));
        let kept = kept.into_iter().map(|(l, ts, k, _)| (l, ts, k)).collect();
        self.marks.push((self.st, self.late, kept));
    }
}

/// Opens the processor and checks that the state restored from the
/// changelog is the reference's after the records the task says it
/// processed: the processed records are a prefix of the timestamp order.
fn open_checked(
    rt: &tokio::runtime::Runtime,
    cfg: &ProcessorConfig,
    model: &JoinModel,
) -> KafkaStreamProcessor {
    let p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
        .unwrap();
    let n = p.task().metrics().processed as usize;
    let (st, late, kept) = match n {
        0 => (0, 0, Vec::new()),
        n => model.marks[n - 1].clone(),
    };
    assert_eq!(p.task().meta().stream_time_ms, st, "after {n}");
    // Each late record is counted by both joins.
    assert_eq!(p.task().metrics().late_records, 2 * late, "after {n}");
    for store in ["inner-join", "outer-join"] {
        assert_eq!(
            p.task().join_buffer::<u8, u8, u8>(store).unwrap(),
            kept,
            "{store} restored after {n} records"
        );
    }
    p
}

/// Writes the whole input, then runs the processor with at most `batch`
/// records per step and a new processor every `restart_every` steps;
/// every output must be the reference's.
fn run_written_inputs(name: &str, configure: fn(ProcessorConfig) -> ProcessorConfig) {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log(name);
    let (left, right) = (format!("{app}.left"), format!("{app}.right"));
    let prefix = format!("{app}.out.");
    let (merged, inner, outer) = (
        format!("{prefix}merged"),
        format!("{prefix}inner"),
        format!("{prefix}outer"),
    );
    rt.block_on(ensure_topics(
        &bootstrap,
        &[
            (&left, 2),
            (&right, 1),
            (&merged, 1),
            (&inner, 1),
            (&outer, 1),
        ],
    ))
    .unwrap();

    let parts = input();
    let order = timestamp_order(&parts);
    let total = order.len();
    let mut model = JoinModel::default();
    for r in &order {
        model.record(*r);
    }
    // The input covers what the test is about: the timestamp order is not
    // any topic-at-a-time order, ties across partitions, late records,
    // pairs and unmatched records on both sides.
    let ties = order.windows(2).filter(|w| w[0].ts == w[1].ts).count();
    assert!(ties >= 5, "{ties} ties");
    assert!(model.late >= 2, "late records: {}", model.late);
    assert!(model.inner.len() >= 10, "pairs: {:?}", model.inner);
    let unmatched = |left: bool| {
        model
            .outer
            .iter()
            .filter(|o| {
                if left {
                    o.1 .1.is_none()
                } else {
                    o.1 .0.is_none()
                }
            })
            .count()
    };
    assert!(
        unmatched(true) >= 2 && unmatched(false) >= 2,
        "{:?}",
        model.outer
    );

    // Both topics written completely before the processor runs.
    for (is_left, partition, records) in &parts {
        let topic = if *is_left { &left } else { &right };
        let ids: Vec<(u8, u8, u64)> = records.iter().map(|r| (r.key, r.id, r.ts)).collect();
        produce_ids(&bootstrap, topic, *partition, &ids);
    }

    let cfg = configure(
        ProcessorConfig::new(&bootstrap, &app)
            .with_input(&left, "left")
            .with_input(&right, "right")
            .with_output_prefix(&prefix)
            .with_batch(7)
            .with_input_idle(InputIdle::Wait(Duration::ZERO)),
    );
    let mut p = open_checked(&rt, &cfg, &model);
    let (mut steps, mut restarts, mut done) = (0, 0, 0);
    while done < total {
        done += step_some(&mut p);
        steps += 1;
        if steps % 3 == 0 && done < total {
            drop(p);
            p = open_checked(&rt, &cfg, &model);
            assert_eq!(p.task().metrics().processed as usize, done);
            restarts += 1;
        }
    }
    assert_eq!(done, total, "more records processed than produced");
    assert!(restarts >= 3, "{restarts} restarts");
    assert_eq!(p.run_until_idle(Duration::from_secs(3)).unwrap().records, 0);
    drop(p);
    let p = open_checked(&rt, &cfg, &model);
    assert_eq!(p.task().metrics().processed as usize, total);
    drop(p);

    // The merge shows the processing order: every record once, in the
    // timestamp order.
    let want: Vec<Out> = order
        .iter()
        .map(|r| (r.key, r.id.to_bytes(), r.ts, r.id))
        .collect();
    assert_eq!(read_back(&bootstrap, &merged, total), want);
    let joined = |outs: Vec<Out>| -> Vec<JoinOut> {
        outs.into_iter()
            .map(|(k, v, ts, id)| (k, <(Option<u8>, Option<u8>)>::decode(&v).unwrap(), ts, id))
            .collect()
    };
    assert_eq!(
        joined(read_back(&bootstrap, &inner, model.inner.len())),
        model.inner
    );
    assert_eq!(
        joined(read_back(&bootstrap, &outer, model.outer.len())),
        model.outer
    );
}

#[test]
fn written_inputs_are_processed_in_timestamp_order_across_restarts() {
    run_written_inputs("order", |c| c);
}

#[test]
fn tiny_input_buffers_pause_partitions_and_keep_the_order() {
    run_written_inputs("ordersmall", |c| c.with_input_buffer(2));
}

#[test]
fn an_idle_time_on_the_clock_holds_records_back_for_an_empty_input() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log("orderidle");
    let (left, right) = (format!("{app}.left"), format!("{app}.right"));
    let prefix = format!("{app}.out.");
    let merged = format!("{prefix}merged");
    rt.block_on(ensure_topics(
        &bootstrap,
        &[(&left, 1), (&right, 1), (&merged, 1)],
    ))
    .unwrap();
    produce_ids(&bootstrap, &left, 0, &[(0, 0, 100), (1, 1, 101)]);

    let clock = ManualClock::new(1_000_000);
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&left, "left")
        .with_input(&right, "right")
        .with_output_prefix(&prefix)
        .with_input_idle(InputIdle::Wait(Duration::from_secs(5)));
    let t = Topology::new();
    t.stream::<u8, u8>("left")
        .merge(&t.stream::<u8, u8>("right"))
        .to("merged");
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(t, cfg))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    // The right topic is empty and caught up: the left records wait for
    // it for 5 s of the clock, however long the steps wait.
    let start = Instant::now();
    while p.buffered() < 2 && start.elapsed() < Duration::from_secs(60) {
        assert_eq!(p.step(Duration::from_millis(500)).unwrap().records, 0);
    }
    assert_eq!(p.buffered(), 2, "the left records were never fetched");
    for _ in 0..3 {
        assert_eq!(p.step(Duration::from_millis(300)).unwrap().records, 0);
    }
    clock.advance(4_999);
    assert_eq!(p.step(Duration::from_millis(300)).unwrap().records, 0);
    // An older right record written meanwhile goes first; then the right
    // topic is empty again and holds the left records back anew.
    produce_ids(&bootstrap, &right, 0, &[(2, 2, 50)]);
    let mut done = 0;
    let start = Instant::now();
    while done < 1 && start.elapsed() < Duration::from_secs(30) {
        done += p.step(Duration::from_millis(500)).unwrap().records;
    }
    assert_eq!(done, 1);
    clock.advance(4_999);
    for _ in 0..2 {
        assert_eq!(p.step(Duration::from_millis(300)).unwrap().records, 0);
    }
    clock.advance(1);
    assert_eq!(p.step(Duration::from_millis(500)).unwrap().records, 2);
    done += 2;
    // The right topic has been empty for the idle time already: a new
    // left record is not held back.
    produce_ids(&bootstrap, &left, 0, &[(3, 3, 102)]);
    let start = Instant::now();
    while done < 4 && start.elapsed() < Duration::from_secs(30) {
        done += p.step(Duration::from_millis(500)).unwrap().records;
    }
    assert_eq!(done, 4);
    drop(p);
    let ids: Vec<u8> = read_back(&bootstrap, &merged, 4)
        .into_iter()
        .map(|o| o.3)
        .collect();
    assert_eq!(ids, vec![2, 0, 1, 3]);
}
