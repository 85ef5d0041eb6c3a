//! # Kafka event log append benchmark
//!
//! In one run, against the broker at `SMARTMSG_KAFKA_BOOTSTRAP` (skipped
//! with a message when unset):
//!
//! - **(a) raw rdkafka**: a transactional `BaseProducer` with the backend's
//!   own settings (`acks=all`, idempotence, `linger.ms=0`, the same
//!   `message.max.bytes`), one transaction after another, each of `k`
//!   100-byte keyed records over 4 partitions: begin, produce, wait for the
//!   delivery reports (polling in 1 ms steps), commit; `k` = the mean
//!   group-commit size (b) reaches at each writer count (measured in a
//!   calibration pass). Records/s. (Calling `commit_transaction` with
//!   records still in flight instead costs at least 100 ms per transaction
//!   in rust-rdkafka 0.39: its `flush` polls in 100 ms steps.)
//! - **(b) `KafkaEventLog`**: one 100-byte event per `AppendTx`
//!   (`ExpectedVersion::Any`, one stream per writer, 4 partitions) from 1,
//!   8 and 64 concurrent writers (tokio tasks on a 2-worker runtime), each
//!   awaiting its append (acknowledged after the Kafka commit) before the
//!   next. Appends/s and the mean number of appends per Kafka transaction.
//! - **(c) embedded**: the same workload on `smartmsg-embedded`'s
//!   `EmbeddedLog` (group commit, `fdatasync`), in cargo's target tmp dir.
//!
//! - **(d) rebuild**: a log of `N` 100-byte events (200,000; 20,000 with
//!   `--quick`) over 64 streams, written 1,000 per transaction, with one
//!   checkpoint (written on request) after 99 % of them, then reopened
//!   repeatedly, alternating: with checkpoints disabled (a full rebuild:
//!   reading the whole topic, resolving the committed chain, rebuilding the
//!   index) and with checkpoints enabled (loading the checkpoint, then
//!   reading the last 1 % of the topic). The time `open` takes, fencing
//!   included, and events indexed per second. Also the time the checkpoint
//!   took (encoding it on the writer thread, writing its chunks) and its
//!   size.
//!
//! Each figure is the median of 3 repeats (each after a warm-up), run in
//! interleaved rounds so that drift hits every item alike; nothing is
//! asserted. Numbers drift between runs; compare within one run.
//!
//! ```text
//! cargo bench -p smartmsg-kafka --bench append             # about 1 min
//! cargo bench -p smartmsg-kafka --bench append -- --quick  # a few seconds
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};

const RECORD: usize = 100;
const PARTITIONS: u32 = 4;
const WRITERS: [usize; 3] = [1, 8, 64];

struct Mode {
    window: Duration,
    warmup: Duration,
    reps: usize,
}

fn median(v: Vec<f64>) -> (f64, f64, f64) {
    smartmsg_engine::testkit::stats::median_min_max(&v)
}

fn fmt_rate(r: (f64, f64, f64)) -> String {
    format!("{:.0} ({:.0}–{:.0})", r.0, r.1, r.2)
}

// ---------------------------------------------------------------- (a) raw

#[derive(Clone, Default)]
struct Count(Arc<Mutex<(u64, u64)>>);
impl ClientContext for Count {}
impl ProducerContext for Count {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        let mut c = self.0.lock().unwrap();
        if r.is_ok() {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
}

async fn raw_topic(bootstrap: &str, name: &str) -> String {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    admin
        .create_topics(
            [&NewTopic::new(
                name,
                PARTITIONS as i32,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    name.to_owned()
}

/// A transactional producer with the backend's settings, writing
/// back-to-back transactions.
struct Raw {
    producer: BaseProducer<Count>,
    count: Count,
    topic: String,
    payload: Vec<u8>,
    keys: Vec<String>,
    sent: u64,
}

impl Raw {
    fn new(bootstrap: &str, topic: &str) -> Self {
        let count = Count::default();
        let cfg = KafkaConfig::new(bootstrap, "bench");
        let producer: BaseProducer<Count> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("transactional.id", format!("{topic}.raw"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.max.bytes", cfg.max_record_bytes().to_string())
            .create_with_context(count.clone())
            .unwrap();
        producer.init_transactions(Duration::from_secs(30)).unwrap();
        Self {
            producer,
            count,
            topic: topic.to_owned(),
            payload: vec![b'x'; RECORD],
            keys: (0..64).map(|i| format!("w-{i}")).collect(),
            sent: 0,
        }
    }

    /// One transaction of `k` records: begin, produce, wait for the
    /// delivery reports, commit.
    fn one(&mut self, k: usize) {
        let p = &self.producer;
        p.begin_transaction().unwrap();
        for j in 0..k {
            let n = self.sent as usize + j;
            p.send(
                BaseRecord::to(&self.topic)
                    .key(self.keys[n % 64].as_str())
                    .payload(self.payload.as_slice())
                    .partition((n % PARTITIONS as usize) as i32),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        }
        self.sent += k as u64;
        while self.count.0.lock().unwrap().0 < self.sent {
            p.poll(Duration::from_millis(1));
        }
        p.commit_transaction(Duration::from_secs(30)).unwrap();
        assert_eq!(self.count.0.lock().unwrap().1, 0, "raw deliveries failed");
    }

    /// Records/s of back-to-back transactions of `k` records.
    fn window(&mut self, k: usize, mode: &Mode) -> f64 {
        let start = Instant::now();
        while start.elapsed() < mode.warmup {
            self.one(k);
        }
        let (start, before) = (Instant::now(), self.sent);
        while start.elapsed() < mode.window {
            self.one(k);
        }
        (self.sent - before) as f64 / start.elapsed().as_secs_f64()
    }
}

// ---------------------------------------------------------------- (b), (c)

/// One measurement window: appends/s from `writers` concurrent tasks, and
/// the mean appends per commit (from `batches()`: (commits, appends)).
async fn log_window<L: EventLog + 'static>(
    log: Arc<L>,
    writers: usize,
    mode: &Mode,
    batches: impl Fn(&L) -> (u64, u64),
) -> (f64, f64) {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..writers {
        let (log, done, stop) = (log.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let s = StreamId::new(format!("w-{t}")).unwrap();
            let payload = bytes::Bytes::from(vec![b'x'; RECORD]);
            while !stop.load(Ordering::Relaxed) {
                let tx = AppendTx::single(
                    s.clone(),
                    ExpectedVersion::Any,
                    vec![NewEvent::new("Bench", 1, 0, payload.clone())],
                );
                log.append(tx).await.expect("append");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(mode.warmup).await;
    let b0 = batches(&log);
    let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(mode.window).await;
    let rate = (done.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
    let b1 = batches(&log);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mean = (b1.1 - b0.1) as f64 / (b1.0 - b0.0).max(1) as f64;
    (rate, mean)
}

/// The (d) figures: medians of the full rebuilds and of those from the
/// checkpoint (in that order).
struct Rebuild {
    events: u64,
    /// Seconds of the whole `open`.
    open: [f64; 2],
    /// Seconds after fencing.
    rebuild: [f64; 2],
    covered: u64,
    cold: Duration,
    warm: Duration,
    encode: Duration,
    stats: smartmsg_kafka::RebuildStats,
}

fn kafka_batches(l: &KafkaEventLog) -> (u64, u64) {
    let s = l.stats();
    (s.kafka_transactions, s.appends_written)
}

fn embedded_batches(l: &EmbeddedLog) -> (u64, u64) {
    let s = l.stats();
    (s.batches, s.transactions)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("SMARTMSG_BENCH_QUICK").is_some();
    let Some(bootstrap) = std::env::var("SMARTMSG_KAFKA_BOOTSTRAP")
        .ok()
        .filter(|b| !b.is_empty())
    else {
        println!("skipping the Kafka append benchmark: SMARTMSG_KAFKA_BOOTSTRAP not set");
        return;
    };
    let mode = if quick {
        Mode {
            window: Duration::from_millis(700),
            warmup: Duration::from_millis(200),
            reps: 1,
        }
    } else {
        Mode {
            window: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            reps: 3,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run = format!(
        "bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );

    // Everything stays open through the run; the measurements run in
    // rounds, each measuring every item once, so that drift (the broker's,
    // and other load on the machine) hits all of them alike.
    let (kafka_logs, embedded_logs, mut raw, _tmp) = rt.block_on(async {
        let mut kafka_logs = Vec::new();
        for &w in &WRITERS {
            let cfg =
                KafkaConfig::new(&bootstrap, format!("{run}-k{w}")).with_partitions(PARTITIONS);
            kafka_logs.push(Arc::new(
                KafkaEventLog::open(cfg).await.expect("open kafka log"),
            ));
        }
        let tmp = tempfile::Builder::new()
            .prefix("kafka-bench-embedded")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let embedded_logs: Vec<Arc<EmbeddedLog>> = WRITERS
            .iter()
            .map(|w| Arc::new(EmbeddedLog::open(tmp.path().join(format!("w{w}"))).unwrap()))
            .collect();
        let topic = raw_topic(&bootstrap, &format!("smartmsg.{run}.raw")).await;
        let raw = tokio::task::spawn_blocking({
            let bootstrap = bootstrap.clone();
            move || Raw::new(&bootstrap, &topic)
        })
        .await
        .unwrap();
        (kafka_logs, embedded_logs, raw, tmp)
    });
    // Calibration: the group-commit size each writer count reaches, which
    // the raw producer then uses as its records per transaction.
    let ks: Vec<usize> = kafka_logs
        .iter()
        .zip(WRITERS)
        .map(|(log, w)| {
            let (_, mean) = rt.block_on(log_window(log.clone(), w, &mode, kafka_batches));
            mean.round().max(1.0) as usize
        })
        .collect();
    let mut kafka: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); WRITERS.len()];
    let mut embedded = kafka.clone();
    let mut raws: Vec<Vec<f64>> = vec![Vec::new(); WRITERS.len()];
    for _ in 0..mode.reps {
        for (i, &w) in WRITERS.iter().enumerate() {
            let (r, m) = rt.block_on(log_window(kafka_logs[i].clone(), w, &mode, kafka_batches));
            kafka[i].0.push(r);
            kafka[i].1.push(m);
            raws[i].push(raw.window(ks[i], &mode));
            let (r, m) = rt.block_on(log_window(
                embedded_logs[i].clone(),
                w,
                &mode,
                embedded_batches,
            ));
            embedded[i].0.push(r);
            embedded[i].1.push(m);
        }
    }
    let kafka: Vec<(usize, (f64, f64, f64), f64)> = WRITERS
        .iter()
        .zip(kafka)
        .map(|(&w, (r, m))| (w, median(r), median(m).0))
        .collect();
    let embedded: Vec<(usize, (f64, f64, f64), f64)> = WRITERS
        .iter()
        .zip(embedded)
        .map(|(&w, (r, m))| (w, median(r), median(m).0))
        .collect();
    let raw: Vec<(usize, (f64, f64, f64))> =
        ks.iter().zip(raws).map(|(&k, r)| (k, median(r))).collect();
    rt.block_on(async {
        for log in kafka_logs {
            Arc::try_unwrap(log).expect("sole owner").close().await;
        }
    });

    // (d) rebuild
    let n_rebuild: u64 = if quick { 20_000 } else { 200_000 };
    let rebuild = rt.block_on(async {
        // Checkpoints only on request during the fill.
        let cfg = KafkaConfig::new(&bootstrap, format!("{run}-rebuild"))
            .with_partitions(PARTITIONS)
            .with_checkpoint_every(u64::MAX);
        let log = KafkaEventLog::open(cfg.clone()).await.expect("open");
        let payload = bytes::Bytes::from(vec![b'x'; RECORD]);
        let mut written = 0u64;
        let mut checkpoint = None;
        while written < n_rebuild {
            // After 99 % (before the last transaction at least).
            if checkpoint.is_none()
                && (written >= n_rebuild * 99 / 100 || written + 1_000 >= n_rebuild)
            {
                // The first creates the checkpoint producer; the second is
                // a checkpoint in the steady state.
                let start = Instant::now();
                log.checkpoint().await.expect("checkpoint");
                let cold = start.elapsed();
                let start = Instant::now();
                let covered = log.checkpoint().await.expect("checkpoint");
                let warm = start.elapsed();
                let encode = log.stats().checkpoint_encode_time;
                checkpoint = Some((covered, cold, warm, encode));
            }
            let mut tx = AppendTx::default();
            for s in 0..64u64 {
                let events = (0..1000 / 64 + u64::from(s < 1000 % 64))
                    .map(|_| NewEvent::new("Bench", 1, 0, payload.clone()))
                    .collect();
                tx = tx.with_stream(
                    StreamId::new(format!("r-{s}")).unwrap(),
                    ExpectedVersion::Any,
                    events,
                );
            }
            written = log.append(tx).await.expect("append").next_position;
        }
        log.close().await;
        let (covered, cold, warm, encode) = checkpoint.expect("a checkpoint was written");
        let (mut full, mut from_checkpoint) = (Vec::new(), Vec::new());
        let (mut full_rebuild, mut from_checkpoint_rebuild) = (Vec::new(), Vec::new());
        let mut sample = None;
        for _ in 0..mode.reps {
            for with_checkpoint in [false, true] {
                let cfg =
                    cfg.clone()
                        .with_checkpoint_every(if with_checkpoint { u64::MAX } else { 0 });
                let start = Instant::now();
                let log = KafkaEventLog::open(cfg).await.expect("reopen");
                let took = start.elapsed().as_secs_f64();
                assert_eq!(log.head().await.unwrap(), written);
                let r = log.stats().rebuild;
                let rebuilt = r.rebuild_duration.as_secs_f64();
                if with_checkpoint {
                    assert_eq!(r.checkpoint_events, covered, "{r:?}");
                    from_checkpoint.push(took);
                    from_checkpoint_rebuild.push(rebuilt);
                    sample = Some(r);
                } else {
                    assert_eq!(r.checkpoint_events, 0);
                    full.push(took);
                    full_rebuild.push(rebuilt);
                }
                log.close().await;
            }
        }
        let r = sample.expect("a reopen from the checkpoint");
        Rebuild {
            events: written,
            open: [median(full).0, median(from_checkpoint).0],
            rebuild: [median(full_rebuild).0, median(from_checkpoint_rebuild).0],
            covered,
            cold,
            warm,
            encode,
            stats: r,
        }
    });

    println!();
    println!(
        "Kafka event log appends (100-byte events, {PARTITIONS} partitions, acks=all, \
         transactional; median (min–max) of {} × {:?})",
        mode.reps, mode.window
    );
    println!();
    println!("| measurement | writers | per Kafka txn / batch | appends or records/s |");
    println!("|---|---:|---:|---:|");
    for (k, r) in &raw {
        println!(
            "| (a) raw rdkafka, transactional | 1 | {k} records | {} |",
            fmt_rate(*r)
        );
    }
    for (w, r, mean) in &kafka {
        println!(
            "| (b) KafkaEventLog | {w} | {mean:.1} appends | {} |",
            fmt_rate(*r)
        );
    }
    for (w, r, mean) in &embedded {
        println!(
            "| (c) embedded log (fdatasync) | {w} | {mean:.1} appends | {} |",
            fmt_rate(*r)
        );
    }
    let Rebuild {
        events,
        open,
        rebuild,
        covered,
        cold,
        warm,
        encode,
        stats,
    } = rebuild;
    for (i, what) in [
        "full (checkpoints off)".to_owned(),
        format!("checkpoint of {covered} + {} read", events - covered),
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| (d) rebuild at open, {what} | – | {events} events | {:.0} events/s ({:.3} s; \
             {:.3} s of it after fencing) |",
            events as f64 / rebuild[i],
            open[i],
            rebuild[i],
        );
    }
    println!();
    println!(
        "(d) events/s are over the rebuild after fencing (`RebuildStats::rebuild_duration`); \
         the whole `open` (with `init_transactions`) in parentheses."
    );
    println!(
        "Checkpoint of {covered} events: {} bytes; encoding it held the writer {encode:?}; \
         `checkpoint()` took {warm:?} ({cold:?} the first time, creating its producer); at \
         open, finding, reading, decoding and checking it took {:?}.",
        stats.checkpoint_bytes, stats.checkpoint_duration
    );
    println!();
    println!("Ratios (b) / (a) at the same records per Kafka transaction:");
    for ((w, r, mean), (k, a)) in kafka.iter().zip(&raw) {
        println!(
            "  {w:>2} writers ({mean:.1} appends/txn) vs raw at {k} records/txn: {:.2}x",
            r.0 / a.0
        );
    }
    println!("Ratios (b) / (c) at the same writers:");
    for ((w, k, _), (_, e, _)) in kafka.iter().zip(&embedded) {
        println!("  {w:>2} writers: {:.3}x", k.0 / e.0);
    }
}
