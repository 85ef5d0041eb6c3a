//! The engine's stream runner with `KafkaEventLog`s as its source and
//! sink (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset): outputs reach the
//! output log exactly once across a runner restart and a restart of the
//! output log's writer (the sink's idempotency keys are rebuilt from the
//! topic).
//!
//! This is stream processing on Kafka through the `EventLog` port (the
//! runner commits state, outputs and input position atomically in its own
//! store, then delivers outputs under idempotency keys). The Kafka-Streams
//! style step on raw topics (consumer groups, `send_offsets_to_transaction`)
//! is tested in `processor.rs`.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use smartmsg_engine::stream::{
    envelope, EventLogSink, EventLogSource, InMemoryStore, KeyValueStore, OutputId, OutputRecord,
    RunnerConfig, Sink, StateCodec, StreamRunner, Topology,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::KafkaEventLog;

fn topology() -> Topology {
    let t = Topology::new();
    t.stream::<Bytes, Bytes>("Click")
        .map(|k, v| (k, v.len() as u64))
        .group_by_key()
        .aggregate("sizes", || 0u64, |_, n, s| *s += n)
        .to("sizes");
    t
}

async fn clicks(log: &KafkaEventLog, stream: &str, payloads: &[&str]) {
    let events = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| NewEvent::new("Click", 1, i as u64, p.to_string()))
        .collect();
    log.append(AppendTx::single(
        StreamId::new(stream).unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

async fn outputs(log: &KafkaEventLog) -> Vec<(Bytes, u64)> {
    log.read_all(0, 1000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "sizes")
        .map(|e| {
            let (k, v) = envelope::decode(&e.payload).unwrap();
            (k, u64::decode(&v).unwrap())
        })
        .collect()
}

#[test]
fn runner_over_kafka_logs_delivers_each_output_once() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let input = Arc::new(
            KafkaEventLog::open(common::config(&bootstrap, "stream-in", 3))
                .await
                .unwrap(),
        );
        let out_cfg = common::config(&bootstrap, "stream-out", 3);
        let out = Arc::new(KafkaEventLog::open(out_cfg.clone()).await.unwrap());
        clicks(&input, "u1", &["ab", "c"]).await;
        clicks(&input, "u2", &["xyz"]).await;
        clicks(&input, "u3", &["1234"]).await;

        let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
        let open = |out: Arc<KafkaEventLog>| {
            StreamRunner::open(
                topology(),
                store.clone(),
                EventLogSource::new(input.clone()),
                EventLogSink::new(out),
                RunnerConfig::new("clicks").with_batch(2),
            )
            .unwrap()
        };
        let mut runner = open(out.clone());
        let first = runner.step().await.unwrap();
        assert_eq!((first.records, first.position), (2, 2));
        drop(runner); // the runner stops after a commit

        // The output log's writer restarts too: a new writer rebuilds the
        // sink's idempotency keys from the topic.
        let out = Arc::try_unwrap(out).unwrap();
        out.close().await;
        let out = Arc::new(KafkaEventLog::open(out_cfg).await.unwrap());

        let mut runner = open(out.clone());
        let rest = runner.run_until_idle().await.unwrap();
        assert_eq!(rest.records, 2);
        let want = vec![
            (Bytes::from("u1"), 2),
            (Bytes::from("u1"), 3),
            (Bytes::from("u2"), 3),
            (Bytes::from("u3"), 4),
        ];
        assert_eq!(outputs(&out).await, want);

        // Delivering the first commit's outputs again (a crash between a
        // commit and its delivery) writes nothing.
        let head = out.head().await.unwrap();
        let rec = OutputRecord {
            id: OutputId {
                commit: 0,
                index: 0,
            },
            output: "sizes".into(),
            key: b"u1".to_vec(),
            value: 2u64.to_bytes(),
            timestamp_ms: 0,
            headers: Default::default(),
        };
        let again = vec![
            rec.clone(),
            OutputRecord {
                id: OutputId {
                    commit: 0,
                    index: 1,
                },
                value: 3u64.to_bytes(),
                timestamp_ms: 1,
                ..rec
            },
        ];
        EventLogSink::new(out.clone())
            .send("clicks", &again)
            .await
            .unwrap();
        assert_eq!(out.head().await.unwrap(), head, "re-delivery wrote nothing");
        assert_eq!(outputs(&out).await, want);
    });
}
