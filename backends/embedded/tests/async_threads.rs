//! The redb commits behind the async traits (delay queue, snapshots) run off
//! the async threads: on a current-thread runtime, another task keeps
//! running while each commit and its fsync are under way.
//!
//! The check: a task that counts its own turns runs beside the calls; the
//! counter must move during every call. Were a commit done in place, the
//! only thread of the runtime would be busy with it and the counter could
//! not move between the call's start and its end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use smartmsg_embedded::{EmbeddedDelayQueue, EmbeddedQueueConfig, RedbSnapshots};
use smartmsg_engine::{DelayQueue, Job, JobId, Snapshot, SnapshotStore, StreamId};

/// Runs `call` and reports whether it let the thread go while it ran: it
/// returned `Pending` at least once, or the counter moved meanwhile. A call
/// that commits in place does neither. (The counter alone is not enough:
/// when the work off the thread finishes before the scheduler's next turn,
/// the call's task is run again before the counter's.)
async fn moved_during<T>(turns: &AtomicU64, call: impl std::future::Future<Output = T>) -> bool {
    use std::task::Poll;
    let before = turns.load(Ordering::SeqCst);
    let mut call = std::pin::pin!(call);
    let mut pending = false;
    std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
        Poll::Ready(_) => Poll::Ready(()),
        Poll::Pending => {
            pending = true;
            Poll::Pending
        }
    })
    .await;
    pending || turns.load(Ordering::SeqCst) > before
}

#[tokio::test(flavor = "current_thread")]
async fn another_task_runs_while_commits_are_under_way() {
    let dir = tempfile::tempdir().unwrap();
    // Durable acks too, so that every call below commits with an fsync (a
    // call that finishes in microseconds may be done before its first poll,
    // and then nothing else needs to run meanwhile).
    let mut config = EmbeddedQueueConfig::default();
    config.durable_settles = true;
    let q = EmbeddedDelayQueue::open_with(dir.path().join("queue"), config).unwrap();
    let snaps = RedbSnapshots::open(dir.path().join("snapshots.redb")).unwrap();

    let turns = Arc::new(AtomicU64::new(0));
    let counter = {
        let turns = turns.clone();
        tokio::spawn(async move {
            loop {
                turns.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::task::yield_now().await;

    let mut calls = 0;
    let mut stalled = Vec::new();
    for i in 0..20u64 {
        let jobs = vec![Job {
            id: JobId::new(format!("j{i}")).unwrap(),
            due_ms: i,
            payload: Bytes::from_static(b"p"),
        }];
        let mut check = |name: &str, moved: bool| {
            calls += 1;
            if !moved {
                stalled.push(format!("{name} #{i}"));
            }
        };
        check(
            "schedule_many",
            moved_during(&turns, async { q.schedule_many(jobs).await.unwrap() }).await,
        );
        let mut leases = Vec::new();
        check(
            "poll_due",
            moved_during(&turns, async { leases = q.poll_due(i, 10).await.unwrap() }).await,
        );
        assert_eq!(leases.len(), 1, "job j{i} was not leased");
        check(
            "ack",
            moved_during(&turns, async { q.ack(&leases[0].token).await.unwrap() }).await,
        );
        let snapshot = Snapshot {
            stream: StreamId::new(format!("s-{i}")).unwrap(),
            version: i,
            schema: 1,
            state: Bytes::from(vec![i as u8; 1024]),
        };
        check(
            "snapshot save",
            moved_during(&turns, async { snaps.save(snapshot).await.unwrap() }).await,
        );
    }
    counter.abort();
    assert_eq!(calls, 80);
    // A call done off the thread can still look stalled now and then: its
    // blocking work may finish before the call's first poll (seen in CI on
    // a loaded machine). A call done in place stalls every time, so each
    // kind must let the thread go in most of its 20 calls.
    for kind in ["schedule_many", "poll_due", "ack", "snapshot save"] {
        let n = stalled
            .iter()
            .filter(|s| s.starts_with(&format!("{kind} #")))
            .count();
        assert!(
            n < 10,
            "{kind} held the runtime's only thread in {n} of 20 calls: {stalled:?}"
        );
    }
    assert_eq!(q.len().await.unwrap(), 0);
}

/// A source of `n` records, each a key and a value of the `In` input.
struct Counted {
    n: u64,
}

#[async_trait::async_trait]
impl smartmsg_engine::stream::Source for Counted {
    async fn read(
        &mut self,
        from: u64,
        max: usize,
    ) -> Result<Vec<smartmsg_engine::stream::SourceRecord>, smartmsg_engine::stream::SourceError>
    {
        use smartmsg_engine::stream::StateCodec;
        Ok((from..self.n.min(from + max as u64))
            .map(|i| smartmsg_engine::stream::SourceRecord {
                position: i,
                input: "In".into(),
                key: Bytes::from(((i % 64) as u32).to_bytes()),
                value: Bytes::from(i.to_bytes()),
                timestamp_ms: i,
                headers: Default::default(),
            })
            .collect())
    }
}

/// A sink that keeps nothing.
struct Discard;

#[async_trait::async_trait]
impl smartmsg_engine::stream::Sink for Discard {
    async fn send(
        &mut self,
        _runner: &str,
        _records: &[smartmsg_engine::stream::OutputRecord],
    ) -> Result<(), smartmsg_engine::stream::SinkError> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn another_task_runs_while_a_stream_runner_commits_to_redb() {
    use smartmsg_engine::stream::{RunnerConfig, StreamRunner, Topology};
    let dir = tempfile::tempdir().unwrap();
    let store = smartmsg_embedded::RedbStore::open(dir.path().join("state.redb")).unwrap();
    let t = Topology::new();
    t.stream::<u32, u64>("In").to_table("last");
    let mut runner = StreamRunner::open(
        t,
        Arc::new(store),
        Counted { n: 2_000 },
        Discard,
        RunnerConfig::new("r").with_batch(100),
    )
    .unwrap();
    let turns = Arc::new(AtomicU64::new(0));
    let counter = {
        let turns = turns.clone();
        tokio::spawn(async move {
            loop {
                turns.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::task::yield_now().await;
    let mut stalled = Vec::new();
    for i in 0..20 {
        let mut records = 0;
        let moved = moved_during(&turns, async {
            records = runner.step().await.unwrap().records;
        })
        .await;
        assert_eq!(records, 100, "step {i}");
        if !moved {
            stalled.push(i);
        }
    }
    counter.abort();
    assert_eq!(runner.position(), 2_000);
    // As above: a step done off the thread may look stalled now and then;
    // a step that commits in place stalls every time.
    assert!(
        stalled.len() < 10,
        "these steps' commits held the runtime's only thread: {stalled:?}"
    );
}
