//! The exactly-once Kafka processing step (`KafkaStreamProcessor`) and the
//! topic source/sink against a broker (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped
//! when unset): a count-per-key topology over an input topic, restarted
//! between commits, must resume from the group's committed offsets with its
//! state restored from the changelog topic and no output twice.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::stream::{
    EmitStrategy, InMemoryStore, JoinWindows, KeyValueStore, LateReason, LateRecord, Processor,
    ProcessorContext, Punctuation, PunctuationType, QueryError, Record, RunnerConfig,
    SessionWindows, StateCodec, StreamError, StreamRunner, Topology, Window, Windowed, Windows,
};
use smartmsg_engine::ManualClock;
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, KafkaTopicSink, KafkaTopicSource, ProcessorConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A test's fresh topics: input `<app>.clicks` and output
/// `<app>.out.<output>` (one partition each), created.
struct Topics {
    app: String,
    input: String,
    prefix: String,
    output: String,
}

fn topics(rt: &tokio::runtime::Runtime, bootstrap: &str, name: &str, output: &str) -> Topics {
    let app = common::unique_log(name);
    let input = format!("{app}.clicks");
    let prefix = format!("{app}.out.");
    let output = format!("{prefix}{output}");
    rt.block_on(ensure_topics(bootstrap, &[(&input, 1), (&output, 1)]))
        .unwrap();
    Topics {
        app,
        input,
        prefix,
        output,
    }
}

fn topology() -> Topology {
    let t = Topology::new();
    t.stream::<Bytes, Bytes>("clicks")
        .group_by_key()
        .count("counts")
        .to("counts");
    t
}

/// One record's Kafka headers to produce (a `None` value is null).
type KafkaPairs<'a> = Vec<(&'a str, Option<&'a [u8]>)>;

fn produce(bootstrap: &str, topic: &str, keys: &[&str]) {
    let none: Vec<KafkaPairs<'_>> = vec![Vec::new(); keys.len()];
    produce_with_headers(bootstrap, topic, keys, &none);
}

/// Produces `keys[i]` (value "x") with `headers[i]` (a `None` value is a
/// null header).
fn produce_with_headers(bootstrap: &str, topic: &str, keys: &[&str], headers: &[KafkaPairs<'_>]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (i, (k, hs)) in keys.iter().zip(headers).enumerate() {
        let mut rec = BaseRecord::<str, str>::to(topic)
            .key(k)
            .payload("x")
            .partition(0)
            .timestamp(1_000 + i as i64);
        if !hs.is_empty() {
            let mut kafka = OwnedHeaders::new();
            for &(key, value) in hs {
                kafka = kafka.insert(Header { key, value });
            }
            rec = rec.headers(kafka);
        }
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Every record of partition 0 of `topic` (read_committed), as (key, value).
fn read_all(bootstrap: &str, topic: &str, want: usize) -> Vec<(String, Vec<u8>)> {
    read_with_headers(bootstrap, topic, want)
        .into_iter()
        .map(|(k, v, _)| (k, v))
        .collect()
}

/// Kafka headers read back (a null value as `None`).
type ReadPairs = Vec<(String, Option<Vec<u8>>)>;

/// A record read back: key, value and its Kafka headers.
type ReadBack = (String, Vec<u8>, ReadPairs);

/// Every record of partition 0 of `topic` (read_committed) with its
/// headers.
fn read_with_headers(bootstrap: &str, topic: &str, want: usize) -> Vec<ReadBack> {
    read_raw(bootstrap, topic, want)
        .into_iter()
        .map(|r| {
            (
                String::from_utf8_lossy(&r.key).into_owned(),
                r.value,
                r.headers,
            )
        })
        .collect()
}

/// A record read back with its raw key and timestamp.
use common::Committed as Raw;

/// Every record of partition 0 of `topic` (read_committed), waiting for
/// `want` of them and then 2 s more for any extra.
fn read_raw(bootstrap: &str, topic: &str, want: usize) -> Vec<Raw> {
    common::read_committed(bootstrap, topic, want, Duration::from_secs(30))
}

fn counts(records: &[(String, Vec<u8>)]) -> Vec<(String, u64)> {
    records
        .iter()
        .map(|(k, v)| (k.clone(), u64::decode(v).unwrap()))
        .collect()
}

/// Steps until `n` input records were committed (the group join can take a
/// few seconds on the first poll).
fn step_until(p: &mut KafkaStreamProcessor, n: usize) -> usize {
    let mut done = 0;
    let start = Instant::now();
    while done < n && start.elapsed() < Duration::from_secs(60) {
        done += p.step(Duration::from_secs(2)).unwrap().records;
    }
    done
}

#[test]
fn processor_restart_resumes_from_committed_offsets_with_restored_state() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "proc", "counts");
    produce(&bootstrap, &input, &["a", "b", "a"]);

    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix)
        .with_batch(3);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
        .unwrap();
    assert_eq!(p.restored().records, 0);
    assert_eq!(step_until(&mut p, 3), 3);
    drop(p); // stops after a commit

    produce(&bootstrap, &input, &["c", "a", "b"]);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg))
        .unwrap();
    // State restored from the changelog: a=2, b=1 (and the meta record).
    assert!(p.restored().records >= 3, "{:?}", p.restored());
    let task = p.task();
    assert_eq!(
        task.table_get::<Bytes, u64>("counts", &Bytes::from("a"))
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        task.table_get::<Bytes, u64>("counts", &Bytes::from("b"))
            .unwrap(),
        Some(1)
    );
    assert_eq!(task.metrics().processed, 3);
    // Resumes from the committed offsets: only the three new records.
    assert_eq!(step_until(&mut p, 3), 3);
    assert_eq!(p.run_until_idle(Duration::from_secs(3)).unwrap().records, 0);
    assert_eq!(
        p.task()
            .table_get::<Bytes, u64>("counts", &Bytes::from("a"))
            .unwrap(),
        Some(3)
    );
    drop(p);

    let want: Vec<(String, u64)> = [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2)]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    assert_eq!(counts(&read_all(&bootstrap, &output, 6)), want);
}

#[test]
fn processor_aborted_step_is_invisible() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let hides_aborted = common::broker_hides_aborted(&bootstrap);
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "procabort", "counts");
    produce(&bootstrap, &input, &["a", "a"]);
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix)
        .with_batch(2);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
        .unwrap();
    assert_eq!(step_until(&mut p, 2), 2);
    drop(p);

    // A zombie of the same application writes an output and a changelog
    // record in a transaction it aborts.
    let zombie: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", cfg.transactional_id())
        .create()
        .unwrap();
    zombie.init_transactions(Duration::from_secs(30)).unwrap();
    zombie.begin_transaction().unwrap();
    let mut bogus = Vec::new();
    99u64.encode(&mut bogus);
    zombie
        .send(
            BaseRecord::<str, [u8]>::to(&output)
                .key("a")
                .payload(bogus.as_slice())
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    let ck = smartmsg_kafka::stream::changelog_key("counts", b"a");
    zombie
        .send(
            BaseRecord::<[u8], [u8]>::to(&cfg.changelog_topic)
                .key(ck.as_slice())
                .payload(bogus.as_slice())
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    zombie.flush(Duration::from_secs(10)).unwrap();
    zombie.abort_transaction(Duration::from_secs(10)).unwrap();
    drop(zombie);

    let p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg))
        .unwrap();
    let restored = p
        .task()
        .table_get::<Bytes, u64>("counts", &Bytes::from("a"))
        .unwrap();
    drop(p);
    let seen = counts(&read_all(&bootstrap, &output, 2));
    let want = vec![("a".to_string(), 1), ("a".to_string(), 2)];
    if hides_aborted {
        assert_eq!(restored, Some(2), "aborted changelog record restored");
        assert_eq!(seen, want, "aborted output visible");
    } else {
        println!(
            "requires Apache Kafka, not checked here: an aborted step's changelog record must \
             not be restored and its output must be invisible to read_committed consumers; \
             this broker shows aborted records to read_committed consumers (tansu 0.6): \
             restored a = {restored:?}, outputs {seen:?}"
        );
    }
}

#[test]
fn topic_source_and_sink_drive_the_runner() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "runner", "counts");
    produce(&bootstrap, &input, &["a", "b", "a", "a"]);
    rt.block_on(async {
        let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
        let mut runner = StreamRunner::open(
            topology(),
            store.clone(),
            KafkaTopicSource::new(&bootstrap, &app, &input, 0, "clicks").unwrap(),
            KafkaTopicSink::new(&bootstrap, &prefix).unwrap(),
            RunnerConfig::new("clicks").with_batch(2),
        )
        .unwrap();
        let start = Instant::now();
        let mut done = 0;
        while done < 4 && start.elapsed() < Duration::from_secs(60) {
            done += runner.step().await.unwrap().records;
        }
        assert_eq!(done, 4);
    });
    let want: Vec<(String, u64)> = [("a", 1), ("b", 1), ("a", 2), ("a", 3)]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    assert_eq!(counts(&read_all(&bootstrap, &output, 4)), want);
}

/// Records of one runner commit: `keys` as outputs of `counts`.
fn commit_records(commit: u64, keys: &[&str]) -> Vec<smartmsg_engine::stream::OutputRecord> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| smartmsg_engine::stream::OutputRecord {
            id: smartmsg_engine::stream::OutputId {
                commit,
                index: i as u32,
            },
            output: "counts".into(),
            key: k.as_bytes().to_vec(),
            value: (commit * 100 + i as u64).to_be_bytes().to_vec(),
            timestamp_ms: 1_000 + commit,
            headers: Default::default(),
        })
        .collect()
}

#[test]
fn topic_sink_delivers_a_redelivered_commit_once_and_fences_a_zombie() {
    use smartmsg_engine::stream::Sink;
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log("sink");
    let prefix = format!("{app}.out.");
    let output = format!("{prefix}counts");
    rt.block_on(ensure_topics(&bootstrap, &[(&output, 1)]))
        .unwrap();
    rt.block_on(async {
        let mut a = KafkaTopicSink::new(&bootstrap, &prefix).unwrap();
        a.send("r", &commit_records(0, &["a", "b"])).await.unwrap();
        // The runner crashed before dropping its outbox: the same commit is
        // delivered again, to the same sink and to a new one after a
        // restart. Neither produces it twice.
        a.send("r", &commit_records(0, &["a", "b"])).await.unwrap();
        a.send("r", &commit_records(1, &["c"])).await.unwrap();
        drop(a);
        let mut b = KafkaTopicSink::new(&bootstrap, &prefix).unwrap();
        b.send("r", &commit_records(1, &["c"])).await.unwrap();
        assert_eq!(b.delivered("r"), Some(1));
        b.send("r", &commit_records(2, &["d", "e"])).await.unwrap();
        // A second sink for the runner fences the first.
        let mut c = KafkaTopicSink::new(&bootstrap, &prefix).unwrap();
        c.send("r", &commit_records(2, &["d", "e"])).await.unwrap();
        assert_eq!(c.delivered("r"), Some(2));
        assert!(b.send("r", &commit_records(3, &["zombie"])).await.is_err());
        // The fenced sink stays fenced (it does not fence the new one back).
        assert!(b.send("r", &commit_records(3, &["zombie"])).await.is_err());
        c.send("r", &commit_records(3, &["f"])).await.unwrap();
        // One sink serves one runner.
        assert!(c.send("other", &commit_records(0, &["x"])).await.is_err());
        let mut d = KafkaTopicSink::new(&bootstrap, &prefix).unwrap();
        assert!(d
            .send("not a topic name", &commit_records(0, &["x"]))
            .await
            .is_err());
    });
    let got: Vec<String> = read_all(&bootstrap, &output, 6)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(got, vec!["a", "b", "c", "d", "e", "f"]);
}

#[test]
fn processor_aborted_step_is_redone_once() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let hides_aborted = common::broker_hides_aborted(&bootstrap);
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "procredo", "counts");
    produce(&bootstrap, &input, &["a", "b", "a", "b"]);
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix)
        .with_batch(2);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
        .unwrap();
    assert_eq!(step_until(&mut p, 2), 2);
    // The second step produces its outputs, changelog records and offsets,
    // then its transaction aborts (a crash before the commit).
    let start = Instant::now();
    let mut aborted = 0;
    while aborted == 0 && start.elapsed() < Duration::from_secs(60) {
        aborted = p.step_and_abort(Duration::from_secs(2)).unwrap().records;
        if aborted == 0 {
            // Nothing polled: the processor stays usable only if nothing ran.
            p = rt
                .block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
                .unwrap();
        }
    }
    assert_eq!(aborted, 2);
    assert!(matches!(
        p.step(Duration::from_millis(100)),
        Err(smartmsg_kafka::KafkaStreamError::Poisoned)
    ));
    drop(p);

    // The aborted step's offsets were not committed: the reopened
    // processor does those two records again.
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg))
        .unwrap();
    if hides_aborted {
        assert_eq!(p.task().metrics().processed, 2, "aborted meta restored");
        assert_eq!(
            p.task()
                .table_get::<Bytes, u64>("counts", &Bytes::from("a"))
                .unwrap(),
            Some(1),
            "aborted changelog restored"
        );
    }
    assert_eq!(step_until(&mut p, 2), 2);
    assert_eq!(p.run_until_idle(Duration::from_secs(3)).unwrap().records, 0);
    drop(p);

    let seen = counts(&read_all(&bootstrap, &output, 4));
    let want: Vec<(String, u64)> = [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    if hides_aborted {
        assert_eq!(seen, want);
    } else {
        println!(
            "requires Apache Kafka, not checked here: the aborted step's outputs must be \
             invisible and its changelog records not restored; this broker shows aborted \
             records to read_committed consumers (tansu 0.6), outputs seen: {seen:?}"
        );
    }
}

/// A topology that keeps each record's headers: the clicks of key "a"
/// and "b", values upper-cased.
fn passing_topology() -> Topology {
    let t = Topology::new();
    t.stream::<Bytes, Bytes>("clicks")
        .filter(|k, _| k.as_ref() != b"drop")
        .map_values(|v| Bytes::from(v.to_ascii_uppercase()))
        .to("passed");
    t
}

/// What the header tests produce: per record its key and headers (one
/// repeated name, a binary value, a null value, none at all).
fn header_input() -> (Vec<&'static str>, Vec<KafkaPairs<'static>>) {
    let keys = vec!["a", "drop", "b", "a"];
    let headers = vec![
        vec![("trace", Some(&b"t0"[..])), ("trace", Some(&b"t0b"[..]))],
        vec![("trace", Some(&b"t1"[..]))],
        vec![("bin", Some(&[0u8, 255, 9][..])), ("nothing", None)],
        vec![],
    ];
    (keys, headers)
}

/// The headers the passed records must carry, before any the writer adds.
fn header_want() -> Vec<(String, ReadPairs)> {
    let h = |pairs: &[(&str, &[u8])]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.to_vec())))
            .collect::<Vec<_>>()
    };
    vec![
        ("a".into(), h(&[("trace", b"t0"), ("trace", b"t0b")])),
        // A null header value reads as empty.
        ("b".into(), h(&[("bin", &[0, 255, 9]), ("nothing", b"")])),
        ("a".into(), Vec::new()),
    ]
}

#[test]
fn headers_pass_through_the_runner_on_topics() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "hdrrun", "passed");
    let (keys, headers) = header_input();
    produce_with_headers(&bootstrap, &input, &keys, &headers);
    rt.block_on(async {
        let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
        let mut runner = StreamRunner::open(
            passing_topology(),
            store,
            KafkaTopicSource::new(&bootstrap, &app, &input, 0, "clicks").unwrap(),
            KafkaTopicSink::new(&bootstrap, &prefix).unwrap(),
            RunnerConfig::new("hdr"),
        )
        .unwrap();
        let start = Instant::now();
        let mut done = 0;
        while done < 4 && start.elapsed() < Duration::from_secs(60) {
            done += runner.step().await.unwrap().records;
        }
        assert_eq!(done, 4);
    });
    let got = read_with_headers(&bootstrap, &output, 3);
    assert_eq!(got.len(), 3, "{got:?}");
    for ((key, value, headers), (want_key, want)) in got.iter().zip(header_want()) {
        assert_eq!(key, &want_key);
        assert_eq!(value, b"X");
        // The record's own headers first, then the sink's two.
        assert_eq!(headers[..want.len()], want[..], "{key}");
        let own: Vec<&str> = headers[want.len()..]
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(own, ["smartmsg-runner", "smartmsg-output"]);
    }
}

#[test]
fn headers_pass_through_the_kafka_processor() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "hdrproc", "passed");
    let (keys, headers) = header_input();
    produce_with_headers(&bootstrap, &input, &keys, &headers);
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(passing_topology(), cfg))
        .unwrap();
    assert_eq!(step_until(&mut p, 4), 4);
    let got = read_with_headers(&bootstrap, &output, 3);
    let got: Vec<_> = got
        .into_iter()
        .map(|(k, v, h)| {
            assert_eq!(v, b"X");
            (k, h)
        })
        .collect();
    assert_eq!(got, header_want());
}

// ---------------------------------------------------------------------------
// Stream-stream joins and session windows on the broker, against reference
// models written here (brute force over every record seen, from the rules
// in the engine's docs; the engine's own models live in its tests).

/// Produces `(key, id, ts)` records to partition 0 of `topic`: key and
/// value (the record's id) encoded as the engine's `u8`, the timestamp
/// `ts`, and a header `i` holding the id.
fn produce_ids(bootstrap: &str, topic: &str, records: &[(u8, u8, u64)]) {
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
            .partition(0)
            .timestamp(ts as i64)
            .headers(OwnedHeaders::new().insert(Header {
                key: "i",
                value: Some(i.as_bytes()),
            }));
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// The id in the header `i` of a record read back.
fn header_id(headers: &ReadPairs) -> u8 {
    let (_, v) = headers
        .iter()
        .rev()
        .find(|(k, _)| k == "i")
        .expect("header i");
    std::str::from_utf8(v.as_deref().unwrap_or(&[]))
        .unwrap()
        .parse()
        .unwrap()
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

// --- The join ---------------------------------------------------------------

const JOIN_BEFORE: u64 = 10;
const JOIN_AFTER: u64 = 5;
const JOIN_GRACE: u64 = 3;

/// A left and a right stream (key and value `u8`, the value being the
/// record's id) joined within `JoinWindows::of(10, 5).grace(3)`, inner
/// (output "inner") and outer (output "outer"): two input topics, two join
/// stores.
fn join_topology() -> Topology {
    let t = Topology::new();
    let l = t.stream::<u8, u8>("left");
    let r = t.stream::<u8, u8>("right");
    let jw = JoinWindows::of(JOIN_BEFORE, JOIN_AFTER).grace(JOIN_GRACE);
    l.join_stream(&r, jw, "inner-join", |a, b| (Some(*a), Some(*b)))
        .to("inner");
    l.outer_join_stream(&r, jw, "outer-join", |a, b| (a.copied(), b.copied()))
        .to("outer");
    t
}

/// A join input: which side, key, timestamp (its id is its place in the
/// whole input).
#[derive(Debug, Clone, Copy)]
struct JoinIn {
    left: bool,
    key: u8,
    ts: u64,
}

/// The join's input in phases, each phase on one side only (left, right,
/// left, ...): keys 0–2, timestamps drifting up with jitter of up to 30 ms
/// back, so records arrive out of order and some late; a last left record
/// of key 9 far ahead closes every window.
///
/// One side per phase, each phase consumed before the next is produced,
/// because a consumer of two topics interleaves them in no fixed order
/// (the processor does not pick records by timestamp across topics as
/// Kafka Streams does), and the join's results depend on the order.
fn join_phases() -> Vec<Vec<JoinIn>> {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    let mut base = 1_000u64;
    let mut phases: Vec<Vec<JoinIn>> = (0..14)
        .map(|phase| {
            let n = rng.random_range(2..=6);
            (0..n)
                .map(|_| {
                    base += rng.random_range(0..6);
                    JoinIn {
                        left: phase % 2 == 0,
                        key: rng.random_range(0..3),
                        ts: base - rng.random_range(0..30),
                    }
                })
                .collect()
        })
        .collect();
    phases.push(vec![JoinIn {
        left: true,
        key: 9,
        ts: base + 1_000,
    }]);
    phases
}

/// A join output: key, (left id, right id), timestamp, header id.
type JoinOut = (u8, (Option<u8>, Option<u8>), u64, u8);

#[derive(Debug, Clone)]
struct Kept {
    left: bool,
    key: u8,
    id: u8,
    ts: u64,
    expired: bool,
}

/// The reference join: every on-time record kept in a list, scanned by
/// brute force. A left `l` and a right `r` of one key join when
/// `l.ts - before <= r.ts <= l.ts + after`; a record is late when stream
/// time is past its window's far end plus grace; a record expires when
/// stream time passes `ts + before + after + grace`, and the outer join
/// then sends it unmatched if nothing joined it (by timestamp, left first,
/// then arrival) before the record that moved stream time is joined.
#[derive(Default)]
struct JoinModel {
    st: u64,
    seen: Vec<Kept>,
    inner: Vec<JoinOut>,
    outer: Vec<JoinOut>,
    late: u64,
    /// Stream time, `late` and `seen` after each record.
    marks: Vec<(u64, u64, Vec<Kept>)>,
}

impl JoinModel {
    fn joins(l: &Kept, r: &Kept) -> bool {
        l.key == r.key && r.ts + JOIN_BEFORE >= l.ts && r.ts <= l.ts + JOIN_AFTER
    }

    fn pair(a: &Kept, b: &Kept) -> bool {
        a.left != b.left
            && if a.left {
                Self::joins(a, b)
            } else {
                Self::joins(b, a)
            }
    }

    fn record(&mut self, r: JoinIn, id: u8) {
        if r.ts > self.st {
            self.st = r.ts;
            let retention = JOIN_BEFORE + JOIN_AFTER + JOIN_GRACE;
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
        let reach = if r.left { JOIN_AFTER } else { JOIN_BEFORE };
        if r.ts + reach + JOIN_GRACE < self.st {
            self.late += 1;
        } else {
            let me = Kept {
                left: r.left,
                key: r.key,
                id,
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
        self.marks.push((self.st, self.late, self.seen.clone()));
    }

    /// What a join store keeps after the first `n` records, as
    /// `Task::join_buffer` lists it: `(left, ts, key)`, left side first,
    /// each side by timestamp then arrival.
    fn kept_after(&self, n: usize) -> Vec<(bool, u64, u8)> {
        let seen = if n == 0 {
            &[][..]
        } else {
            &self.marks[n - 1].2
        };
        let mut kept: Vec<(bool, u64, u8, usize)> = seen
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.expired)
            .map(|(i, k)| (k.left, k.ts, k.key, i))
            .collect();
        kept.sort_by_key(|&(left, ts, _, i)| (!left, ts, i));
        kept.into_iter().map(|(l, ts, k, _)| (l, ts, k)).collect()
    }
}

fn join_outputs(records: &[Raw]) -> Vec<JoinOut> {
    records
        .iter()
        .map(|r| {
            (
                u8::decode(&r.key).unwrap(),
                <(Option<u8>, Option<u8>)>::decode(&r.value).unwrap(),
                r.timestamp_ms as u64,
                header_id(&r.headers),
            )
        })
        .collect()
}

/// Opens the join processor and checks that the state restored from the
/// changelog is the model's after the records the task says it processed.
fn open_join(
    rt: &tokio::runtime::Runtime,
    cfg: &ProcessorConfig,
    model: &JoinModel,
) -> KafkaStreamProcessor {
    let p = rt
        .block_on(KafkaStreamProcessor::open(join_topology(), cfg.clone()))
        .unwrap();
    let n = p.task().metrics().processed as usize;
    let (st, late) = match n {
        0 => (0, 0),
        n => (model.marks[n - 1].0, model.marks[n - 1].1),
    };
    assert_eq!(p.task().meta().stream_time_ms, st, "after {n}");
    // Each late record is counted by both joins.
    assert_eq!(p.task().metrics().late_records, 2 * late, "after {n}");
    for store in ["inner-join", "outer-join"] {
        assert_eq!(
            p.task().join_buffer::<u8, u8, u8>(store).unwrap(),
            model.kept_after(n),
            "{store} restored after {n} records"
        );
    }
    p
}

#[test]
fn processor_runs_a_stream_stream_join_across_restarts() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log("procjoin");
    let (left, right) = (format!("{app}.left"), format!("{app}.right"));
    let prefix = format!("{app}.out.");
    let (inner, outer) = (format!("{prefix}inner"), format!("{prefix}outer"));
    rt.block_on(ensure_topics(
        &bootstrap,
        &[(&left, 1), (&right, 1), (&inner, 1), (&outer, 1)],
    ))
    .unwrap();

    let phases = join_phases();
    let mut model = JoinModel::default();
    let mut id = 0u8;
    let mut ids: Vec<Vec<(u8, u8, u64)>> = Vec::new();
    for phase in &phases {
        ids.push(
            phase
                .iter()
                .map(|r| {
                    model.record(*r, id);
                    id += 1;
                    (r.key, id - 1, r.ts)
                })
                .collect(),
        );
    }
    // The input covers what the test is about.
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
    assert!(model.late >= 3, "late records: {}", model.late);
    assert!(model.inner.len() >= 5, "pairs: {:?}", model.inner);
    assert!(
        unmatched(true) >= 2 && unmatched(false) >= 2,
        "{:?}",
        model.outer
    );
    let total: usize = phases.iter().map(Vec::len).sum();

    // At most 4 records per step (per transaction); a new processor every
    // third step, so restarts fall between phases and inside them.
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&left, "left")
        .with_input(&right, "right")
        .with_output_prefix(&prefix)
        .with_batch(4);
    let mut p = open_join(&rt, &cfg, &model);
    assert_eq!(p.restored().records, 0);
    let (mut steps, mut restarts, mut done) = (0, 0, 0);
    for (phase, records) in phases.iter().zip(&ids) {
        let topic = if phase[0].left { &left } else { &right };
        produce_ids(&bootstrap, topic, records);
        let end = done + records.len();
        while done < end {
            done += step_some(&mut p);
            steps += 1;
            if steps % 3 == 0 {
                drop(p);
                p = open_join(&rt, &cfg, &model);
                assert_eq!(p.task().metrics().processed as usize, done);
                restarts += 1;
            }
        }
        assert_eq!(done, end, "more records processed than produced");
    }
    assert_eq!(done, total);
    assert!(restarts >= 4, "{restarts} restarts");
    assert_eq!(p.run_until_idle(Duration::from_secs(3)).unwrap().records, 0);
    drop(p);
    // Everything restored once more: only the far record is still kept.
    let p = open_join(&rt, &cfg, &model);
    assert_eq!(p.task().metrics().processed as usize, total);
    drop(p);

    // Each output once, in the model's order, with the model's timestamps
    // and headers (a pair: the record that completed it; unmatched: its
    // own).
    let got_inner = join_outputs(&read_raw(&bootstrap, &inner, model.inner.len()));
    assert_eq!(got_inner, model.inner);
    let got_outer = join_outputs(&read_raw(&bootstrap, &outer, model.outer.len()));
    assert_eq!(got_outer, model.outer);
}

// --- Session windows --------------------------------------------------------

const GAP: u64 = 10;
const SESSION_GRACE: u64 = 5;

/// Sessions of the input "clicks" (key `u8`, value the record's id) with
/// an inactivity gap of 10 and grace 5, aggregated twice: the sorted ids
/// of each session with a merger, on every update (with retractions) to
/// "sessions", late records to "late"; and a count once each session
/// closes to "closed". Two session stores.
fn session_topology() -> Topology {
    let t = Topology::new();
    let grouped = t.stream::<u8, u8>("clicks").group_by_key();
    let windows = SessionWindows::with_inactivity_gap(GAP)
        .unwrap()
        .grace(SESSION_GRACE);
    grouped
        .windowed_by_session(windows)
        .late_records_to("late")
        .aggregate(
            "sessions",
            Vec::<u8>::new,
            |_, id, ids| {
                let at = ids.partition_point(|&x| x < id);
                ids.insert(at, id);
            },
            |_, into, other| {
                into.extend(other);
                into.sort_unstable();
            },
        )
        .to("sessions");
    grouped
        .windowed_by_session(windows)
        .emit(EmitStrategy::OnWindowClose)
        .count("closed")
        .to("closed");
    t
}

/// The session test's input in order, `(key, ts)`: keys 0–2, timestamps
/// drifting up with jitter of up to 50 ms back (out of order, some late,
/// some bridging two sessions), then a record of key 9 far ahead that
/// closes every session.
fn session_input() -> Vec<(u8, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut base = 1_000u64;
    let mut v: Vec<(u8, u64)> = (0..120)
        .map(|_| {
            base += rng.random_range(0..10);
            (rng.random_range(0..3), base - rng.random_range(0..50))
        })
        .collect();
    v.push((9, base + 1_000));
    v
}

/// A session output: key, window start, window end (exclusive), value,
/// timestamp.
type SessOut<A> = (u8, u64, u64, Option<A>, u64);

#[derive(Debug, Clone)]
struct Sess {
    key: u8,
    start: u64,
    end: u64,
    ids: Vec<u8>,
    closed: bool,
}

/// The reference sessions: every session ever formed, scanned by brute
/// force. A record at `ts` joins every open session of its key with
/// `start - gap <= ts <= end + gap` (merging them); a session closes when
/// stream time reaches `end + 1 + gap + grace`; a record joining none
/// whose own session would be closed already is late.
#[derive(Default)]
struct SessModel {
    st: u64,
    sessions: Vec<Sess>,
    updates: Vec<SessOut<Vec<u8>>>,
    closed: Vec<SessOut<u64>>,
    /// Late records: key, id, ts, stream time.
    late: Vec<(u8, u8, u64, u64)>,
    merges: usize,
    /// Stream time, the number of late records and the open sessions
    /// after each record.
    marks: Vec<(u64, usize, Vec<Sess>)>,
}

impl SessModel {
    fn closes(end: u64) -> u64 {
        end + 1 + GAP + SESSION_GRACE
    }

    fn record(&mut self, key: u8, id: u8, ts: u64) {
        if ts > self.st {
            self.st = ts;
            let mut newly: Vec<Sess> = Vec::new();
            for s in &mut self.sessions {
                if !s.closed && Self::closes(s.end) <= self.st {
                    s.closed = true;
                    newly.push(s.clone());
                }
            }
            newly.sort_by_key(|s| (s.end, s.start, s.key));
            for s in newly {
                let n = s.ids.len() as u64;
                self.closed
                    .push((s.key, s.start, s.end + 1, Some(n), s.end));
            }
        }
        let touching: Vec<usize> = (0..self.sessions.len())
            .filter(|&i| {
                let s = &self.sessions[i];
                !s.closed && s.key == key && s.start <= ts + GAP && ts <= s.end + GAP
            })
            .collect();
        if touching.is_empty() && Self::closes(ts) <= self.st {
            self.late.push((key, id, ts, self.st));
        } else {
            let mut merged = Sess {
                key,
                start: ts,
                end: ts,
                ids: vec![id],
                closed: false,
            };
            let mut replaced: Vec<Sess> = Vec::new();
            for &i in touching.iter().rev() {
                let s = self.sessions.remove(i);
                merged.start = merged.start.min(s.start);
                merged.end = merged.end.max(s.end);
                merged.ids.extend(&s.ids);
                replaced.push(s);
            }
            if replaced.len() > 1 {
                self.merges += 1;
            }
            merged.ids.sort_unstable();
            replaced.sort_by_key(|s| s.start);
            for s in replaced {
                if (s.start, s.end) != (merged.start, merged.end) {
                    self.updates.push((key, s.start, s.end + 1, None, s.end));
                }
            }
            self.updates.push((
                key,
                merged.start,
                merged.end + 1,
                Some(merged.ids.clone()),
                merged.end,
            ));
            self.sessions.push(merged);
        }
        let open = self.sessions.iter().filter(|s| !s.closed).cloned();
        self.marks.push((self.st, self.late.len(), open.collect()));
    }

    /// The open sessions after the first `n` records, sorted.
    fn open_after(&self, n: usize) -> Vec<(u8, u64, u64, Vec<u8>)> {
        let open = if n == 0 {
            &[][..]
        } else {
            &self.marks[n - 1].2
        };
        let mut v: Vec<_> = open
            .iter()
            .map(|s| (s.key, s.start, s.end + 1, s.ids.clone()))
            .collect();
        v.sort();
        v
    }
}

fn session_outputs<A: StateCodec>(records: &[Raw]) -> Vec<SessOut<A>> {
    records
        .iter()
        .map(|r| {
            let w = Windowed::<u8>::decode(&r.key).unwrap();
            (
                w.key,
                w.window.start_ms,
                w.window.end_ms,
                Option::<A>::decode(&r.value).unwrap(),
                r.timestamp_ms as u64,
            )
        })
        .collect()
}

/// Opens the session processor and checks that both session stores hold
/// the model's open sessions after the records the task processed.
fn open_sessions(
    rt: &tokio::runtime::Runtime,
    cfg: &ProcessorConfig,
    model: &SessModel,
) -> KafkaStreamProcessor {
    let p = rt
        .block_on(KafkaStreamProcessor::open(session_topology(), cfg.clone()))
        .unwrap();
    let n = p.task().metrics().processed as usize;
    let (st, late) = match n {
        0 => (0, 0),
        n => (model.marks[n - 1].0, model.marks[n - 1].1),
    };
    assert_eq!(p.task().meta().stream_time_ms, st, "after {n}");
    // Each late record is counted by both aggregations.
    assert_eq!(
        p.task().metrics().late_records,
        2 * late as u64,
        "after {n}"
    );
    let want = model.open_after(n);
    let mut ids: Vec<_> = p
        .task()
        .session_entries::<u8, Vec<u8>>("sessions")
        .unwrap()
        .into_iter()
        .map(|(w, ids)| (w.key, w.window.start_ms, w.window.end_ms, ids))
        .collect();
    ids.sort();
    assert_eq!(ids, want, "sessions restored after {n} records");
    let mut counts: Vec<_> = p
        .task()
        .session_entries::<u8, u64>("closed")
        .unwrap()
        .into_iter()
        .map(|(w, c)| (w.key, w.window.start_ms, w.window.end_ms, c))
        .collect();
    counts.sort();
    let want: Vec<_> = want
        .into_iter()
        .map(|(k, s, e, ids)| (k, s, e, ids.len() as u64))
        .collect();
    assert_eq!(counts, want, "counts restored after {n} records");
    p
}

#[test]
fn processor_runs_session_windows_across_restarts() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let Topics {
        app,
        input,
        prefix,
        output,
    } = topics(&rt, &bootstrap, "procsess", "sessions");
    let (closed, late) = (format!("{prefix}closed"), format!("{prefix}late"));
    rt.block_on(ensure_topics(&bootstrap, &[(&closed, 1), (&late, 1)]))
        .unwrap();

    let input_records = session_input();
    let mut model = SessModel::default();
    let records: Vec<(u8, u8, u64)> = input_records
        .iter()
        .enumerate()
        .map(|(i, &(key, ts))| {
            model.record(key, i as u8, ts);
            (key, i as u8, ts)
        })
        .collect();
    assert!(model.late.len() >= 3, "late: {:?}", model.late);
    assert!(model.merges >= 2, "merges: {}", model.merges);
    assert!(model.closed.len() >= 10, "closed: {:?}", model.closed);
    assert!(
        model.updates.iter().filter(|u| u.3.is_none()).count() >= 10,
        "retractions"
    );
    produce_ids(&bootstrap, &input, &records);

    // At most 7 records per step; a new processor after every second step.
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix)
        .with_batch(7);
    let mut p = open_sessions(&rt, &cfg, &model);
    let (mut steps, mut done) = (0, 0);
    while done < records.len() {
        done += step_some(&mut p);
        steps += 1;
        if steps % 2 == 0 {
            drop(p);
            p = open_sessions(&rt, &cfg, &model);
            assert_eq!(p.task().metrics().processed as usize, done);
        }
    }
    assert_eq!(done, records.len());
    assert_eq!(p.run_until_idle(Duration::from_secs(3)).unwrap().records, 0);
    // Each late record counted by both aggregations.
    assert_eq!(p.task().metrics().late_records, 2 * model.late.len() as u64);
    drop(p);

    let got = session_outputs::<Vec<u8>>(&read_raw(&bootstrap, &output, model.updates.len()));
    assert_eq!(got, model.updates);
    let got = session_outputs::<u64>(&read_raw(&bootstrap, &closed, model.closed.len()));
    assert_eq!(got, model.closed);
    let got: Vec<(u8, u8, u64, u64)> = read_raw(&bootstrap, &late, model.late.len())
        .iter()
        .map(|r| {
            let rec = LateRecord::<u8>::decode(&r.value).unwrap();
            let LateReason::WindowClosed {
                window,
                closed_at_ms,
                stream_time_ms,
            } = rec.reason
            else {
                panic!("{:?}", rec.reason)
            };
            let ts = r.timestamp_ms as u64;
            assert_eq!(
                window,
                Window {
                    start_ms: ts,
                    end_ms: ts + 1
                }
            );
            assert_eq!(closed_at_ms, SessModel::closes(ts));
            assert_eq!(
                header_id(&r.headers),
                rec.value,
                "late records keep headers"
            );
            (u8::decode(&r.key).unwrap(), rec.value, ts, stream_time_ms)
        })
        .collect();
    assert_eq!(got, model.late);
}

// --- Interactive queries and wall-clock punctuators -------------------------

/// Counts records per key in the store "seen"; every second of wall-clock
/// time forwards how many keys it has seen (key 0).
struct Beat;

impl Processor<u8, u8, u8, u64> for Beat {
    fn init(&mut self, ctx: &mut ProcessorContext<'_, u8, u64>) -> Result<(), StreamError> {
        ctx.schedule(1_000, PunctuationType::WallClockTime)?;
        Ok(())
    }
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, u8, u64>,
        r: Record<u8, u8>,
    ) -> Result<(), StreamError> {
        let mut s = ctx.store::<u8, u64>("seen")?;
        let n = s.get(&r.key).copied().unwrap_or(0) + 1;
        s.put(r.key, n)
    }
    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, u8, u64>,
        p: Punctuation,
    ) -> Result<(), StreamError> {
        let n = ctx.store::<u8, u64>("seen")?.len() as u64;
        ctx.forward(Record::new(0, n, p.timestamp_ms))
    }
}

/// A processor with a wall-clock punctuator ("beats"), a count per key
/// ("per-user") and a count per key and 10 s window ("per-window").
fn queried_topology() -> Topology {
    let t = Topology::new();
    t.add_state_store::<u8, u64>("seen");
    let clicks = t.stream::<u8, u8>("clicks");
    clicks
        .process("beat", Beat, &["seen"])
        .child("beats")
        .to("beats");
    clicks.group_by_key().count("per-user").to("counts");
    clicks
        .group_by_key()
        .windowed_by(Windows::tumbling(10_000).unwrap().grace(60_000))
        .count("per-window")
        .to("window-counts");
    t
}

#[test]
fn processor_answers_queries_from_committed_state_and_fires_wall_clock_punctuators() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let t = topics(&rt, &bootstrap, "queries", "beats");
    let others = [
        format!("{}counts", t.prefix),
        format!("{}window-counts", t.prefix),
    ];
    rt.block_on(ensure_topics(
        &bootstrap,
        &[(&others[0], 1), (&others[1], 1)],
    ))
    .unwrap();
    let config = || {
        ProcessorConfig::new(bootstrap.as_str(), t.app.as_str())
            .with_input(t.input.as_str(), "clicks")
            .with_output_prefix(t.prefix.as_str())
    };
    let clock = ManualClock::new(10_500);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(
            queried_topology(),
            config().with_interactive_queries(),
        ))
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
    let per_user = p.query_store::<u8, u64>("per-user").unwrap();
    let seen = p.query_store::<u8, u64>("seen").unwrap();
    let per_window = p.query_window_store::<u8, u64>("per-window").unwrap();
    assert!(per_user.all(100).unwrap().is_empty());
    assert!(matches!(
        p.query_store::<u8, u64>("per-window"),
        Err(QueryError::WrongType { .. })
    ));

    // (key, id, timestamp): keys 1 and 2 in the window [0, 10 s), key 1
    // again in [10 s, 20 s).
    produce_ids(
        &bootstrap,
        &t.input,
        &[(1, 0, 1_000), (2, 1, 2_000), (1, 2, 12_000)],
    );
    assert_eq!(step_until(&mut p, 3), 3);
    // Read from another thread, as a service's handler would.
    let (users, keys, windows) = std::thread::spawn(move || {
        (
            per_user.all(100).unwrap(),
            seen.all(100).unwrap(),
            per_window.fetch(&1, 0, 20_000).unwrap(),
        )
    })
    .join()
    .unwrap();
    assert_eq!(users, vec![(1, 2), (2, 1)]);
    assert_eq!(keys, vec![(1, 2), (2, 1)]);
    let w = |start_ms| Window {
        start_ms,
        end_ms: start_ms + 10_000,
    };
    assert_eq!(windows, vec![(w(0), 1), (w(10_000), 1)]);

    // No record, but the clock passed the punctuator's second: the step
    // commits the beat alone.
    let step = p.step(Duration::from_millis(200)).unwrap();
    assert_eq!(
        (step.records, step.outputs),
        (0, 0),
        "the clock has not moved"
    );
    clock.advance(1_000);
    let step = p.step(Duration::from_millis(200)).unwrap();
    assert_eq!((step.records, step.outputs), (0, 1));
    let beats = read_raw(&bootstrap, &t.output, 1);
    assert_eq!(beats.len(), 1);
    assert_eq!(u64::decode(&beats[0].value).unwrap(), 2);
    assert_eq!(beats[0].timestamp_ms, 11_500);

    // A step that aborts leaves the committed copy as it was.
    produce_ids(&bootstrap, &t.input, &[(2, 3, 3_000)]);
    let mut per_user = p.query_store::<u8, u64>("per-user").unwrap();
    let start = Instant::now();
    loop {
        let step = p.step_and_abort(Duration::from_secs(2));
        match step {
            Ok(s) if s.records > 0 => break,
            Ok(_) if start.elapsed() < Duration::from_secs(60) => {
                // Nothing came: the processor is poisoned; open it again.
                drop(p);
                p = rt
                    .block_on(KafkaStreamProcessor::open(
                        queried_topology(),
                        config().with_interactive_queries(),
                    ))
                    .unwrap();
                per_user = p.query_store::<u8, u64>("per-user").unwrap();
            }
            other => panic!("no input within 60 s: {other:?}"),
        }
    }
    assert_eq!(per_user.get(&2).unwrap(), Some(1));
    drop(p);

    // Reopened, the copy starts from the restored state; without the
    // option there is none.
    let p = rt
        .block_on(KafkaStreamProcessor::open(
            queried_topology(),
            config().with_interactive_queries(),
        ))
        .unwrap();
    let restored = p.query_store::<u8, u64>("per-user").unwrap();
    let got = restored.get(&1).unwrap();
    assert_eq!(got, Some(2));
    drop(p);
    let p = rt
        .block_on(KafkaStreamProcessor::open(queried_topology(), config()))
        .unwrap();
    assert!(matches!(
        p.query_store::<u8, u64>("per-user"),
        Err(QueryError::NotEnabled { .. })
    ));
}

/// The processor is assigned its partitions and does not join the group,
/// so the transactional id alone must fence an older instance: once a
/// second one opens, the first one's next step fails and every record is
/// counted once, by the second.
#[test]
fn a_second_processor_fences_the_first() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let t = topics(&rt, &bootstrap, "fence", "counts");
    let cfg = ProcessorConfig::new(&bootstrap, &t.app)
        .with_input(&t.input, "clicks")
        .with_output_prefix(&t.prefix);
    produce(&bootstrap, &t.input, &["a", "b"]);
    // A fenced producer may only learn it is fenced when a call times out.
    let mut short = cfg.clone();
    short.request_timeout = Duration::from_secs(5);
    let mut old = rt
        .block_on(KafkaStreamProcessor::open(topology(), short))
        .unwrap();
    assert_eq!(step_until(&mut old, 2), 2);

    let mut new = rt
        .block_on(KafkaStreamProcessor::open(topology(), cfg))
        .unwrap();
    produce(&bootstrap, &t.input, &["a", "c"]);
    // The old instance reads the new records but cannot commit them.
    let start = Instant::now();
    let err = loop {
        match old.step(Duration::from_secs(2)) {
            Err(e) => break e,
            Ok(s) => assert!(
                s.records == 0 && start.elapsed() < Duration::from_secs(60),
                "a fenced processor committed {s:?}"
            ),
        }
    };
    // "This instance has been fenced by a newer instance", or the broker's
    // "There is a newer producer with the same transactionalId which
    // fences the current one".
    assert!(err.to_string().contains("fence"), "{err}");
    assert!(
        old.step(Duration::ZERO).is_err(),
        "poisoned after the failure"
    );
    drop(old);
    assert_eq!(step_until(&mut new, 2), 2);
    assert_eq!(
        new.task()
            .table_get::<Bytes, u64>("counts", &Bytes::from("a"))
            .unwrap(),
        Some(2)
    );
    drop(new);
    let got = counts(&read_all(&bootstrap, &t.output, 4));
    let want: Vec<(String, u64)> = [("a", 1), ("b", 1), ("a", 2), ("c", 1)]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect();
    assert_eq!(got, want);
}
