//! Append latency of the Kafka event log: 300 sequential single-event
//! appends over N streams (a diagnostic probe; `cargo run -p smartmsg-kafka
//! --example lat -- N` with `SMARTMSG_KAFKA_BOOTSTRAP` set).
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};
use std::time::Instant;
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let bs = std::env::var("SMARTMSG_KAFKA_BOOTSTRAP").unwrap();
    let nstreams: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let log = KafkaEventLog::open(
        KafkaConfig::new(bs, format!("lat-{}-{nstreams}", std::process::id())).with_partitions(4),
    )
    .await
    .unwrap();
    let ss: Vec<StreamId> = (0..nstreams)
        .map(|i| StreamId::new(format!("s{i}")).unwrap())
        .collect();
    let parts: Vec<i32> = ss.iter().map(|s| log.partition_of(s)).collect();
    let mut lat = vec![];
    let t0 = Instant::now();
    for i in 0..300 {
        let t = Instant::now();
        log.append(AppendTx::single(
            ss[i % nstreams].clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new("k", 0, 0, vec![0u8; 100])],
        ))
        .await
        .unwrap();
        lat.push(t.elapsed().as_micros());
    }
    let total = t0.elapsed();
    lat.sort();
    println!(
        "streams {nstreams} parts {parts:?}: {:.0}/s p50 {}us p90 {}us max {}us",
        300.0 / total.as_secs_f64(),
        lat[lat.len() / 2],
        lat[lat.len() * 9 / 10],
        lat[lat.len() - 1]
    );
}
