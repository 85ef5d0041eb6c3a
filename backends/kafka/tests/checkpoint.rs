//! Checkpoints of the writer's index on a real Kafka-protocol broker
//! (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset): a reopen reads only
//! the events after the newest checkpoint and ends with exactly the index a
//! full rebuild gives; damaged, partial, foreign and inconsistent
//! checkpoints are ignored.

mod common;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_engine::{
    AppendError, AppendResult, AppendTx, EventLog, ExpectedVersion, NewEvent, RecordedEvent,
    StreamId,
};
use smartmsg_kafka::checkpoint::{self, Checkpoint, Chunk};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog, KafkaLogStats};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Appends with their results, for the idempotency checks.
type Keyed = Vec<(AppendTx, AppendResult)>;

/// Appends at least `events` events over 7 streams: one to three events
/// per stream, every fifth append on two streams, most with an idempotency
/// key, some with an exact expected version; every tenth keyed append is
/// retried and must return its first result.
async fn write(log: &KafkaEventLog, tag: &str, events: u64, keyed: &mut Keyed) {
    let start = log.head().await.unwrap();
    let mut i = 0u64;
    while log.head().await.unwrap() - start < events {
        let n = 1 + (i % 3) as usize;
        let evs = |s: u64| -> Vec<NewEvent> {
            (0..n)
                .map(|j| NewEvent::new("E", 1, i, format!("{tag}-{i}-{s}-{j}").into_bytes()))
                .collect()
        };
        let s0 = StreamId::new(format!("s-{}", i % 7)).unwrap();
        let expected = if i % 4 == 1 {
            ExpectedVersion::Exact(log.stream_version(&s0).await.unwrap())
        } else {
            ExpectedVersion::Any
        };
        let mut tx = AppendTx::single(s0, expected, evs(0));
        if i.is_multiple_of(5) {
            let s1 = StreamId::new(format!("s-{}", (i + 3) % 7)).unwrap();
            tx = tx.with_stream(s1, ExpectedVersion::Any, evs(1));
        }
        if i % 3 != 2 {
            tx = tx.with_idempotency_key(format!("{tag}-k{i}"));
        }
        let result = log.append(tx.clone()).await.expect("append");
        if tx.idempotency_key.is_some() {
            if keyed.len() % 10 == 9 {
                assert_eq!(log.append(tx.clone()).await.expect("retry"), result);
            }
            keyed.push((tx, result));
        }
        i += 1;
    }
}

/// Waits until no checkpoint is being written.
async fn quiesce(log: &KafkaEventLog) -> KafkaLogStats {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = log.stats();
        if s.checkpoints_started == s.checkpoints_written + s.checkpoint_failures {
            return s;
        }
        assert!(Instant::now() < deadline, "checkpoints in flight: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a reader sees: the head, every event in position order, and every
/// stream's version and events.
type View = (
    u64,
    Vec<RecordedEvent>,
    Vec<(StreamId, u64, Vec<RecordedEvent>)>,
);

async fn observe(log: &KafkaEventLog) -> View {
    let head = log.head().await.unwrap();
    let mut all = Vec::new();
    while (all.len() as u64) < head {
        let page = log.read_all(all.len() as u64, 1_000).await.unwrap();
        assert!(!page.is_empty());
        all.extend(page);
    }
    let mut streams: Vec<StreamId> = all.iter().map(|e| e.stream.clone()).collect();
    streams.sort();
    streams.dedup();
    let mut per_stream = Vec::new();
    for s in streams {
        let version = log.stream_version(&s).await.unwrap();
        let events = log.read_stream(&s, 1, 10_000).await.unwrap();
        assert_eq!(events.len() as u64, version);
        // A read from the middle agrees too.
        let tail = log.read_stream(&s, version / 2 + 1, 3).await.unwrap();
        assert_eq!(tail[..], events[(version / 2) as usize..][..tail.len()]);
        per_stream.push((s, version, events));
    }
    (head, all, per_stream)
}

/// Retries of keyed appends return their first results; the same keys
/// with other content are refused.
async fn check_keys(log: &KafkaEventLog, keyed: &Keyed) {
    let head = log.head().await.unwrap();
    for (tx, result) in keyed.iter().step_by(5) {
        assert_eq!(&log.append(tx.clone()).await.expect("retry"), result);
        let mut other = tx.clone();
        other.streams[0].events[0].payload = bytes::Bytes::from_static(b"something else");
        match log.append(other).await {
            Err(AppendError::IdempotencyKeyReused { .. }) => {}
            r => panic!("a reused key gave {r:?}"),
        }
    }
    assert_eq!(log.head().await.unwrap(), head, "retries wrote nothing");
}

fn small(mut cfg: KafkaConfig, every: u64) -> KafkaConfig {
    cfg.checkpoint_every_events = every;
    cfg.checkpoint_chunk_bytes = 1024;
    cfg
}

#[test]
fn reopening_reads_only_the_tail_and_equals_a_full_rebuild() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        let every = 100;
        let cfg = small(common::config(&bootstrap, "ckpt", 3), every);
        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        let mut keyed = Keyed::new();
        write(&log, "a", 600, &mut keyed).await;
        let mut s = quiesce(&log).await;
        // A checkpoint is skipped while one is in flight (the first takes
        // about a second on tansu: creating its producer), so how many the
        // 600 appends started depends on timing: write on until 3 are done.
        let mut more = 0;
        while s.checkpoints_written < 3 && more < 20 {
            write(&log, &format!("a{more}"), 100, &mut keyed).await;
            s = quiesce(&log).await;
            more += 1;
        }
        assert!(s.checkpoints_written >= 3, "{s:?}");
        assert_eq!(s.checkpoint_failures, 0, "{s:?}");
        // Appends after the last checkpoint.
        write(&log, "b", 25, &mut keyed).await;
        let mut s = quiesce(&log).await;
        if s.checkpoint_events == log.head().await.unwrap() {
            write(&log, "c", 1, &mut keyed).await;
            s = quiesce(&log).await;
        }
        let covered = s.checkpoint_events;
        let head = log.head().await.unwrap();
        assert!(covered > 0 && covered < head, "{covered} of {head}");
        let before = log.index_state();
        let view = observe(&log).await;
        log.close().await;

        // From the checkpoint: only the tail is read from the topic.
        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        let r = log.stats().rebuild;
        eprintln!("reopen from a checkpoint: {r:?}; covered {covered} of {head}; {s:?}");
        assert_eq!(r.checkpoint_events, covered, "{r:?}");
        assert_eq!(r.events, head);
        assert_eq!(r.records, head - covered, "{r:?}");
        assert_eq!(r.checkpoints_rejected, 0);
        assert!(r.checkpoint_bytes > 1024, "a checkpoint of several chunks");
        let from_checkpoint = log.index_state();
        assert_eq!(from_checkpoint, before);
        assert_eq!(observe(&log).await, view);
        check_keys(&log, &keyed).await;
        log.close().await;

        // A full rebuild of the same topic.
        let log = KafkaEventLog::open(cfg.clone().with_checkpoint_every(0))
            .await
            .unwrap();
        let r = log.stats().rebuild;
        eprintln!("full rebuild: {r:?}");
        assert_eq!(r.checkpoint_events, 0);
        assert!(r.records >= head);
        let full = log.index_state();
        assert_eq!(full.index.head(), head);
        assert_eq!(from_checkpoint, full);
        assert_eq!(observe(&log).await, view);
        check_keys(&log, &keyed).await;
        assert!(matches!(
            log.checkpoint().await,
            Err(smartmsg_kafka::KafkaLogError::Config(_))
        ));
        log.close().await;

        // The log goes on from a checkpoint: more appends, another reopen.
        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        write(&log, "d", 30, &mut keyed).await;
        let covered = log.checkpoint().await.unwrap();
        assert_eq!(covered, log.head().await.unwrap());
        write(&log, "e", 5, &mut keyed).await;
        let before = log.index_state();
        let view = observe(&log).await;
        log.close().await;
        let log = KafkaEventLog::open(cfg).await.unwrap();
        let r = log.stats().rebuild;
        assert_eq!(r.checkpoint_events, covered, "{r:?}");
        assert_eq!(r.records, view.0 - covered, "{r:?}");
        assert_eq!(log.index_state(), before);
        assert_eq!(observe(&log).await, view);
        check_keys(&log, &keyed).await;
        log.close().await;
    });
}

/// The chunks on a log's checkpoints topic, oldest first.
fn read_chunks(bootstrap: &str, cfg: &KafkaConfig) -> Vec<Chunk> {
    let topic = cfg.checkpoint_topic();
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}.test"))
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "reading {topic}");
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(Chunk::decode(m.payload().unwrap()).expect("a chunk")),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return out,
            _ => {}
        }
    }
}

/// Produces records to a log's checkpoints topic, as a stray or buggy
/// writer would.
fn produce(bootstrap: &str, cfg: &KafkaConfig, records: &[(String, Vec<u8>)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.max.bytes", "1100000")
        .create()
        .unwrap();
    let topic = cfg.checkpoint_topic();
    for (k, v) in records {
        p.send(
            BaseRecord::to(&topic)
                .partition(0)
                .key(k.as_str())
                .payload(v.as_slice()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn records(chunks: &[Chunk]) -> Vec<(String, Vec<u8>)> {
    chunks.iter().map(|c| (c.key(), c.encode())).collect()
}

fn body(cp: &Checkpoint) -> Vec<u8> {
    cp.encode()
}

#[test]
fn damaged_partial_foreign_and_inconsistent_checkpoints_are_ignored() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        // A log with one good checkpoint (written on request), then more.
        let cfg = small(common::config(&bootstrap, "ckptbad", 2), 1_000_000);
        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        let mut keyed = Keyed::new();
        write(&log, "a", 300, &mut keyed).await;
        let covered = log.checkpoint().await.unwrap();
        assert_eq!(covered, log.head().await.unwrap());
        write(&log, "b", 40, &mut keyed).await;
        let head = log.head().await.unwrap();
        let before = log.index_state();
        log.close().await;

        let good = read_chunks(&bootstrap, &cfg);
        assert!(
            good.len() > 1,
            "the checkpoint spans several chunks: {good:?}"
        );
        let good_cp = checkpoint::decode(&checkpoint::assemble(&good).unwrap()).unwrap();
        assert_eq!(good_cp.events(), covered);
        let slot = good[0].slot ^ 1;
        let mut id = 1_000u64;
        let mut next_id = || {
            id += 1;
            id
        };
        // Newer than the good one, each wrong in its own way:
        let mut bad = Vec::new();
        // another log's;
        let mut foreign = good_cp.clone();
        foreign.header.log_name = "someone-else".into();
        bad.extend(records(&checkpoint::split(
            &body(&foreign),
            next_id(),
            slot,
            1024,
        )));
        // covering offsets past the end of the topic;
        let mut beyond = good_cp.clone();
        beyond.header.next_offsets[1] += 1_000;
        bad.extend(records(&checkpoint::split(
            &body(&beyond),
            next_id(),
            slot,
            1024,
        )));
        // naming another tip than the transaction its last event is in;
        let mut tip = good_cp.clone();
        tip.header.tip -= 1;
        bad.extend(records(&checkpoint::split(
            &body(&tip),
            next_id(),
            slot,
            1024,
        )));
        // a wrong CRC of the whole;
        let mut crc = checkpoint::split(&body(&good_cp), next_id(), slot, 1024);
        crc.last_mut().unwrap().body_crc ^= 1;
        bad.extend(records(&crc));
        // torn: the last chunk missing;
        let mut torn = checkpoint::split(&body(&good_cp), next_id(), slot, 1024);
        torn.pop();
        bad.extend(records(&torn));
        // and a record that is no chunk at all.
        bad.push(("0/0".into(), b"garbage".to_vec()));
        produce(&bootstrap, &cfg, &bad);

        let log = KafkaEventLog::open(cfg.clone()).await.unwrap();
        let r = log.stats().rebuild;
        eprintln!("reopen past bad checkpoints: {r:?}");
        assert_eq!(
            r.checkpoint_events, covered,
            "the good checkpoint is used: {r:?}"
        );
        assert_eq!(r.checkpoints_rejected, 4, "{r:?}");
        assert_eq!(r.records, head - covered);
        assert_eq!(log.index_state(), before);
        check_keys(&log, &keyed).await;
        log.close().await;

        // A second log whose checkpoints topic holds nothing valid falls
        // back to the full rebuild.
        let cfg2 = small(common::config(&bootstrap, "ckptnone", 2), 1_000_000);
        let log = KafkaEventLog::open(cfg2.clone()).await.unwrap();
        let mut keyed2 = Keyed::new();
        write(&log, "x", 50, &mut keyed2).await;
        let head2 = log.head().await.unwrap();
        let before2 = log.index_state();
        log.close().await;
        // The first log's checkpoint relabelled as the second's: complete
        // and well-formed, but its positions are not on this topic.
        let mut moved = good_cp.clone();
        moved.header.log_name = cfg2.log_name.clone();
        moved.header.topic = cfg2.topic();
        let mut bad = records(&checkpoint::split(&body(&moved), next_id(), 0, 1024));
        let mut torn = checkpoint::split(&body(&moved), next_id(), 1, 1024);
        torn.remove(0);
        bad.extend(records(&torn));
        bad.push(("1/0".into(), vec![0xff; 100]));
        produce(&bootstrap, &cfg2, &bad);
        let log = KafkaEventLog::open(cfg2.clone()).await.unwrap();
        let r = log.stats().rebuild;
        eprintln!("fallback to a full rebuild: {r:?}");
        assert_eq!(r.checkpoint_events, 0, "{r:?}");
        assert_eq!(r.checkpoints_rejected, 1, "{r:?}");
        assert_eq!(r.events, head2);
        assert!(r.records >= head2);
        assert_eq!(log.index_state(), before2);
        check_keys(&log, &keyed2).await;
        log.close().await;
    });
}
