//! The reactions application (a Kafka Streams application ported to
//! smartmsg; see `app.rs`) on Kafka through `KafkaStreamProcessor`:
//! creates its topics, produces a few profiles and reactions (valid,
//! invalid, late), runs the topology exactly-once until the input is
//! consumed and prints what each output topic holds (read_committed).
//!
//! `cargo run -p smartmsg-kafka --example reactions_app` with
//! `SMARTMSG_KAFKA_BOOTSTRAP` set (`scripts/services.sh start && source
//! .services/env`).

mod app;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_engine::stream::{Json, StateCodec};
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

use app::{CountOut, DeadLetter, LateOut, Profile};

const T0: u64 = 1_700_000_040_000; // a minute boundary

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let bootstrap = std::env::var("SMARTMSG_KAFKA_BOOTSTRAP")
        .map_err(|_| anyhow::anyhow!("set SMARTMSG_KAFKA_BOOTSTRAP"))?;
    let application = format!("reactions-app-{}", std::process::id());
    let topic = |name: &str| format!("{application}.{name}");
    let outputs = [app::DEAD_LETTERS, app::COUNTS, app::LATE, app::TOTALS];
    let mut all = vec![(topic(app::REACTIONS), 1), (topic(app::PROFILES), 1)];
    all.extend(outputs.iter().map(|o| (topic(o), 1)));
    let refs: Vec<(&str, i32)> = all.iter().map(|(t, p)| (t.as_str(), *p)).collect();
    ensure_topics(&bootstrap, &refs).await?;

    // Input: profiles (the engine's encoding of `Json<Profile>`: JSON),
    // then reactions as raw JSON with event-time Kafka timestamps.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    let (profiles_topic, reactions_topic) = (topic(app::PROFILES), topic(app::REACTIONS));
    for (user, segment) in [("u1", "students"), ("u2", "parents")] {
        let v = Json(Profile {
            segment: segment.into(),
        })
        .to_bytes();
        let rec = BaseRecord::to(&profiles_topic).key(user).payload(&v);
        producer.send(rec).map_err(|(e, _)| e)?;
    }
    let r = |c: &str, cr: &str, k: &str| {
        format!(r#"{{"campaign":"{c}","creative":"{cr}","kind":"{k}"}}"#)
    };
    let reactions = [
        ("u1", r("spring", "a", "click"), T0 + 1_000),
        ("u2", r("spring", "a", "like"), T0 + 5_000),
        ("u3", r("spring", "b", "click"), T0 + 20_000),
        ("u1", "not json".to_owned(), T0 + 21_000),
        ("u2", r("spring", "a", "shout"), T0 + 22_000),
        ("u1", r("spring", "a", "reply"), T0 + 65_000),
        ("u2", r("spring", "b", "click"), T0 + 55_000), // out of order, on time
        ("u1", r("spring", "a", "click"), T0 + 80_000),
        ("u2", r("spring", "a", "click"), T0 + 30_000), // late: [T0, T0+60s) closed at T0+70s
        ("u1", r("autumn", "c", "click"), T0 + 200_000), // closes the earlier windows
    ];
    for (user, value, ts) in &reactions {
        let rec = BaseRecord::to(&reactions_topic)
            .key(*user)
            .payload(value.as_bytes())
            .timestamp(*ts as i64);
        producer.send(rec).map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;

    let cfg = ProcessorConfig::new(&bootstrap, &application)
        .with_input(topic(app::REACTIONS), app::REACTIONS)
        .with_global_input(topic(app::PROFILES), app::PROFILES)
        .with_output_prefix(format!("{application}."));
    let topology = app::topology(app::AppConfig::default())?;
    let mut processor = KafkaStreamProcessor::open(topology, cfg).await?;
    let mut done = 0;
    let start = Instant::now();
    while done < reactions.len() && start.elapsed() < Duration::from_secs(60) {
        done += processor.step(Duration::from_secs(1))?.records;
    }
    drop(processor);
    println!("processed {done} reactions");

    for (key, value) in read(&bootstrap, &topic(app::DEAD_LETTERS))? {
        let d = Json::<DeadLetter>::decode(&value)?.0;
        println!(
            "dead letter  {}: {} ({})",
            String::from_utf8_lossy(&key),
            d.reason,
            d.raw
        );
    }
    for (key, value) in read(&bootstrap, &topic(app::COUNTS))? {
        let (w, n): CountOut = (StateCodec::decode(&key)?, StateCodec::decode(&value)?);
        let (c, cr, s) = &w.key;
        println!(
            "count        {c} × {cr} × {s} in [{}, {}): {n}",
            w.window.start_ms, w.window.end_ms
        );
    }
    for (key, value) in read(&bootstrap, &topic(app::LATE))? {
        let (k, late): LateOut = (StateCodec::decode(&key)?, StateCodec::decode(&value)?);
        println!(
            "late         {k:?} from {}: {}",
            late.value.0.user, late.reason
        );
    }
    for (key, value) in read(&bootstrap, &topic(app::TOTALS))? {
        let n = u64::decode(&value)?;
        println!("total        {}: {n}", String::from_utf8_lossy(&key));
    }
    Ok(())
}

/// Every committed record of partition 0 of `topic`, as (key, value),
/// read until 2 s pass without one.
fn read(bootstrap: &str, topic: &str) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}.reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(2) {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m?;
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().unwrap_or_default().to_vec(),
            ));
            last = Instant::now();
        }
    }
    Ok(out)
}
