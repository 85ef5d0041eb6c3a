//! A global table on Kafka (`KafkaStreamProcessor` with a global topic)
//! against a broker (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset): the
//! processor reads the global topic from its beginning to its end when it
//! opens, before any input record; later updates reach the table at the
//! next step; a reopen rebuilds the table from the topic (it is not in the
//! changelog).

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::stream::Topology;
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Orders (order id → product id) priced by the global table of products
/// (product id → price), all raw bytes.
fn shop() -> Topology {
    let t = Topology::new();
    let products = t.global_table::<Bytes, Bytes>("products", "products");
    t.stream::<Bytes, Bytes>("orders")
        .join_global(&products, |_, p| p.clone(), |_, price| price.clone())
        .to("priced");
    t
}

/// Produces `(key, value)` pairs to partition `partition` of `topic`
/// (an empty value as a tombstone: no value).
fn produce(bootstrap: &str, topic: &str, partition: i32, records: &[(&str, &str)]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    for (k, v) in records {
        let mut rec = BaseRecord::<str, str>::to(topic)
            .key(k)
            .partition(partition)
            .timestamp(1_000);
        if !v.is_empty() {
            rec = rec.payload(v);
        }
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Every record of partition 0 of `topic` (read_committed) as (key,
/// value), once `want` came and nothing more for 2 s.
fn read_all(bootstrap: &str, topic: &str, want: usize) -> Vec<(String, String)> {
    common::read_committed(bootstrap, topic, want, Duration::from_secs(30))
        .into_iter()
        .map(|r| {
            (
                String::from_utf8_lossy(&r.key).into_owned(),
                String::from_utf8_lossy(&r.value).into_owned(),
            )
        })
        .collect()
}

fn step_until(p: &mut KafkaStreamProcessor, n: usize) -> usize {
    let mut done = 0;
    let start = Instant::now();
    while done < n && start.elapsed() < Duration::from_secs(60) {
        done += p.step(Duration::from_secs(2)).unwrap().records;
    }
    done
}

fn products(p: &KafkaStreamProcessor) -> Vec<(String, String)> {
    p.task()
        .table_entries::<Bytes, Bytes>("products")
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn the_kafka_processor_bootstraps_and_rebuilds_a_global_table_from_its_topic() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let app = common::unique_log("global");
    let (orders, global, prefix) = (
        format!("{app}.orders"),
        format!("{app}.products"),
        format!("{app}.out."),
    );
    let priced = format!("{prefix}priced");
    rt.block_on(ensure_topics(
        &bootstrap,
        &[(&orders, 1), (&global, 2), (&priced, 1)],
    ))
    .unwrap();
    // Orders first, then their products on both partitions of the
    // global topic: the bootstrap reads every product before any order.
    produce(&bootstrap, &orders, 0, &[("o1", "p1"), ("o2", "p2")]);
    produce(&bootstrap, &global, 0, &[("p1", "10")]);
    produce(&bootstrap, &global, 1, &[("p2", "20")]);
    let cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_input(&orders, "orders")
        .with_global_input(&global, "products")
        .with_output_prefix(&prefix)
        .with_batch(10);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(shop(), cfg.clone()))
        .unwrap();
    assert_eq!(products(&p), pairs(&[("p1", "10"), ("p2", "20")]));
    assert_eq!(step_until(&mut p, 2), 2);
    // An update reaches the table at the next step, before its records.
    produce(&bootstrap, &global, 1, &[("p2", "25")]);
    produce(&bootstrap, &orders, 0, &[("o3", "p2")]);
    assert_eq!(step_until(&mut p, 1), 1);
    drop(p);
    assert_eq!(
        read_all(&bootstrap, &priced, 3),
        pairs(&[("o1", "10"), ("o2", "20"), ("o3", "25")])
    );

    // A reopen rebuilds the table from the topic: nothing of it is in the
    // changelog (the topology has no other store: only meta records). A
    // tombstone (no value) removes its key.
    produce(&bootstrap, &global, 0, &[("p1", "11"), ("p3", "30")]);
    produce(&bootstrap, &global, 0, &[("p3", "")]);
    let mut p = rt
        .block_on(KafkaStreamProcessor::open(shop(), cfg))
        .unwrap();
    assert_eq!(products(&p), pairs(&[("p1", "11"), ("p2", "25")]));
    produce(&bootstrap, &orders, 0, &[("o4", "p1")]);
    assert_eq!(step_until(&mut p, 1), 1);
    drop(p);
    assert_eq!(
        read_all(&bootstrap, &priced, 4),
        pairs(&[("o1", "10"), ("o2", "20"), ("o3", "25"), ("o4", "11")])
    );
}
