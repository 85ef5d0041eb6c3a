//! A repartition on Kafka (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset):
//! `group_by` a new key then count, through `KafkaStreamProcessor`, whose
//! internal topic `<app>-per-page-repartition` is written in each step's
//! transaction and read back by the same processor, restarted every few
//! steps (between commits): every click is written once to the internal
//! topic, with its timestamp and headers, and counted once.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::stream::{StateCodec, Topology};
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Clicks (user → page): clicks per page, through the repartition
/// `per-page-repartition`.
fn topology() -> Topology {
    let t = Topology::new();
    t.stream::<Bytes, Bytes>("clicks")
        .group_by(|_, page| page.clone())
        .count("per-page")
        .to("counts");
    t
}

/// A click: user, page, timestamp (its index is its `id` header).
type Click = (&'static str, &'static str, u64);

fn produce(bootstrap: &str, topic: &str, clicks: &[(usize, Click)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for &(id, (user, page, ts)) in clicks {
        let id = id.to_string();
        let rec = BaseRecord::<str, str>::to(topic)
            .key(user)
            .payload(page)
            .partition(0)
            .timestamp(ts as i64)
            .headers(OwnedHeaders::new().insert(Header {
                key: "id",
                value: Some(id.as_bytes()),
            }));
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// A record read back: key, value, timestamp and its `id` header.
type ReadBack = (Vec<u8>, Vec<u8>, u64, Option<String>);

/// Every record of `topic` (every partition, read_committed), at least
/// `want` of them, then whatever more comes within 2 s.
fn read_all(bootstrap: &str, topic: &str, partitions: i32, want: usize) -> Vec<ReadBack> {
    let all: Vec<i32> = (0..partitions).collect();
    read_all_from(bootstrap, topic, &all, want)
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

/// Every record of `partitions` of `topic` (read_committed) with its
/// partition, at least `want`, then whatever more comes within 2 s.
fn read_all_from(
    bootstrap: &str,
    topic: &str,
    partitions: &[i32],
    want: usize,
) -> Vec<(i32, ReadBack)> {
    common::read_committed_from(bootstrap, topic, partitions, want, Duration::from_secs(30))
        .into_iter()
        .map(|r| {
            let id = r
                .headers
                .iter()
                .find(|(k, _)| k == "id")
                .and_then(|(_, v)| v.as_ref())
                .map(|v| String::from_utf8_lossy(v).into_owned());
            (r.partition, (r.key, r.value, r.timestamp_ms as u64, id))
        })
        .collect()
}

fn open(rt: &tokio::runtime::Runtime, cfg: &ProcessorConfig) -> KafkaStreamProcessor {
    rt.block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
        .unwrap()
}

#[test]
fn group_by_repartitions_through_an_internal_topic_exactly_once_across_restarts() {
    run(1);
}

/// The same with a repartition topic of 3 partitions: each page's clicks
/// all in one partition (partitioned by the new key), each click once, and
/// each page's counts in order (pages interleave as the partitions are
/// read).
#[test]
fn group_by_partitions_the_internal_topic_by_the_new_key() {
    run(3);
}

fn run(partitions: i32) {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log("repart");
    let input = format!("{app}.clicks");
    let prefix = format!("{app}.out.");
    let output = format!("{prefix}counts");
    rt.block_on(ensure_topics(&bootstrap, &[(&input, 1), (&output, 1)]))
        .unwrap();
    let pages = ["home", "cart", "help"];
    let users = ["ann", "bob", "cid", "dan"];
    // Timestamps out of order.
    let clicks: Vec<Click> = (0..24u64)
        .map(|i| {
            (
                users[(i % 4) as usize],
                pages[(i * 5 % 3) as usize],
                10_000 + (i * 37 % 23) * 100,
            )
        })
        .collect();
    let numbered: Vec<(usize, Click)> = clicks.iter().copied().enumerate().collect();

    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&input, "clicks")
        .with_output_prefix(&prefix)
        .with_batch(5)
        .with_repartition_partitions(partitions);
    let internal = cfg.repartition_topic("per-page-repartition");
    assert_eq!(internal, format!("{app}-per-page-repartition"));
    let mut p = open(&rt, &cfg);
    assert_eq!(p.task().repartitions(), ["per-page-repartition"]);
    // Clicks in two batches; a restart every third step, so restarts fall
    // between the upstream's commit and the downstream's read.
    let (mut steps, mut restarts) = (0, 0);
    let start = Instant::now();
    for half in numbered.chunks(12) {
        produce(&bootstrap, &input, half);
        let mut idle = 0;
        while idle < 2 && start.elapsed() < Duration::from_secs(120) {
            let s = p.step(Duration::from_secs(2)).unwrap();
            if s.records == 0 {
                idle += 1;
            } else {
                idle = 0;
            }
            steps += 1;
            if steps % 3 == 0 {
                drop(p);
                p = open(&rt, &cfg);
                restarts += 1;
            }
        }
    }
    assert!(restarts >= 3, "{restarts} restarts");
    // Each click read twice: once from the input, once from the internal
    // topic.
    assert_eq!(p.task().metrics().processed, 2 * clicks.len() as u64);
    drop(p);

    // Every click once in the internal topic, keyed by its page, with its
    // timestamp and headers, in order (per page: per partition).
    let all: Vec<i32> = (0..partitions).collect();
    let read = read_all_from(&bootstrap, &internal, &all, clicks.len());
    let by_partition: Vec<Vec<ReadBack>> = all
        .iter()
        .map(|&p| {
            read.iter()
                .filter(|r| r.0 == p)
                .map(|r| r.1.clone())
                .collect()
        })
        .collect();
    for records in &by_partition {
        let mut pages: Vec<&Vec<u8>> = records.iter().map(|r| &r.0).collect();
        pages.dedup();
        pages.sort();
        pages.dedup();
        for page in pages {
            assert_eq!(
                by_partition
                    .iter()
                    .filter(|rs| rs.iter().any(|r| &r.0 == page))
                    .count(),
                1,
                "a page in one partition"
            );
        }
    }
    let mut got: Vec<ReadBack> = by_partition.concat();
    if partitions > 1 {
        assert!(
            by_partition.iter().filter(|p| !p.is_empty()).count() > 1,
            "pages spread over partitions"
        );
        got.sort_by_key(|r| r.3.as_ref().map(|id| id.parse::<usize>().unwrap()));
    }
    let want: Vec<ReadBack> = numbered
        .iter()
        .map(|&(id, (_, page, ts))| {
            (
                Bytes::from(page).to_bytes(),
                Bytes::from(page).to_bytes(),
                ts,
                Some(id.to_string()),
            )
        })
        .collect();
    assert_eq!(got, want);

    // Every click counted once: the counts are the model's, in order.
    let mut seen = std::collections::HashMap::<&str, u64>::new();
    let model: Vec<(Vec<u8>, u64, u64)> = clicks
        .iter()
        .map(|&(_, page, ts)| {
            let c = seen.entry(page).or_default();
            *c += 1;
            (Bytes::from(page).to_bytes(), *c, ts)
        })
        .collect();
    let mut counts: Vec<(Vec<u8>, u64, u64)> = read_all(&bootstrap, &output, 1, clicks.len())
        .into_iter()
        .map(|(k, v, ts, _)| (k, u64::decode(&v).unwrap(), ts))
        .collect();
    let mut model = model;
    if partitions > 1 {
        // Each page's counts in order; pages interleave by partition.
        counts.sort_by(|a, b| a.0.cmp(&b.0));
        model.sort_by(|a, b| a.0.cmp(&b.0));
    }
    assert_eq!(counts, model);
}
