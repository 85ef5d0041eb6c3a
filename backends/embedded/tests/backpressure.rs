//! Bounded writer channels: with room for only a few waiting calls, many
//! concurrent appends and schedules all wait their turn and all land; none
//! is refused or lost.

use std::sync::Arc;

use bytes::Bytes;
use smartmsg_embedded::{EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, EmbeddedQueueConfig};
use smartmsg_engine::{
    AppendTx, DelayQueue, EventLog, ExpectedVersion, Job, JobId, NewEvent, Scheduled, StreamId,
};

const CALLS: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_wait_for_room_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut built = EmbeddedConfig::default();
        built.queue_capacity = 2;
        built.max_batch_txs = 3;
        built
    };
    let log = Arc::new(EmbeddedLog::open_with(dir.path(), config).unwrap());
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.append(AppendTx::single(
                StreamId::new(format!("s-{}", i % 7)).unwrap(),
                ExpectedVersion::Any,
                vec![NewEvent::new("E", 1, 0, Bytes::from(i.to_string()))],
            ))
            .await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("an append waited for room instead of failing");
    }
    let total: u64 = log.streams().iter().map(|(_, v)| *v).sum();
    assert_eq!(total, CALLS as u64);
    assert!(
        log.stats().batches > 1,
        "a capacity of 2 cannot have taken everything in one group commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_wait_for_room_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let mut built = EmbeddedQueueConfig::default();
        built.queue_capacity = 2;
        built
    };
    let q = Arc::new(EmbeddedDelayQueue::open_with(dir.path(), config).unwrap());
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            q.schedule(Job {
                id: JobId::new(format!("j{i}")).unwrap(),
                due_ms: i as u64,
                payload: Bytes::from_static(b"x"),
            })
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), Scheduled::New);
    }
    assert_eq!(q.len().await.unwrap(), CALLS as u64);
}
