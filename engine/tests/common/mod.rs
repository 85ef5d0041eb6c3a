//! Helpers shared by the stream integration tests: a sink that fails on
//! demand, a runner on the in-memory log through it and the crashes it is
//! put through, and the TestDriver replay with a crash mid-stream that the
//! reference-model proptests run.

// Each test file uses some of these.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    EventLogSink, EventLogSource, KeyValueStore, OutputRecord, RunnerConfig, Sink, SinkError,
    StreamRunner, TestDriver, Topology, PUNCTUATE,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// A stream time past every record of the tests: closes everything.
pub const FAR: u64 = 1_000_000;

/// A sink that fails its first `fail` sends (a crash between a commit and
/// its delivery), then delivers to the log.
pub struct FlakySink {
    pub inner: EventLogSink,
    pub fail: Arc<AtomicUsize>,
}

#[async_trait]
impl Sink for FlakySink {
    async fn send(&mut self, runner: &str, records: &[OutputRecord]) -> Result<(), SinkError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::Invalid {
                output: "any".into(),
                reason: "simulated crash".into(),
            });
        }
        self.inner.send(runner, records).await
    }
}

/// Appends `events`, then a punctuation at [`FAR`] (closing everything),
/// to the stream "input" of `log`.
pub async fn append_then_close(log: &InMemoryLog, mut events: Vec<NewEvent>) {
    events.push(NewEvent::new(PUNCTUATE, 1, FAR, Bytes::new()));
    log.append(AppendTx::single(
        StreamId::new("input").unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

/// A runner reading the enveloped events of an in-memory log and
/// delivering back to it through a [`FlakySink`].
pub type LogRunner = StreamRunner<EventLogSource, FlakySink>;

/// Opens `topology` on `store`, reading `log`'s enveloped events and
/// delivering to `log` through a [`FlakySink`] that fails while `fail`
/// counts down.
pub fn open_on_log(
    topology: Topology,
    store: &Arc<dyn KeyValueStore>,
    log: &Arc<InMemoryLog>,
    fail: &Arc<AtomicUsize>,
    config: RunnerConfig,
) -> LogRunner {
    StreamRunner::open(
        topology,
        store.clone(),
        EventLogSource::with_envelopes(log.clone()),
        FlakySink {
            inner: EventLogSink::new(log.clone()),
            fail: fail.clone(),
        },
        config,
    )
    .unwrap()
}

/// Runs a runner through crashes, each time reopened with `open` (whose
/// sink fails while `fail` counts down): after a commit and its delivery,
/// after a commit before its delivery (the outbox holds it), then after
/// each of 20 steps (each step's task restored from the store). Returns
/// the runner opened last.
pub async fn crash_and_reopen(open: impl Fn() -> LogRunner, fail: &AtomicUsize) -> LogRunner {
    // Crash after a commit and its delivery.
    let mut r = open();
    r.step().await.unwrap();
    drop(r);
    // Crash after a commit, before its delivery: the outbox holds it.
    let mut r = open();
    fail.store(1, Ordering::SeqCst);
    assert!(r.step().await.is_err());
    drop(r);
    // Then a crash after every step: each step's task is restored from the
    // store.
    for _ in 0..20 {
        let mut r = open();
        r.step().await.unwrap();
    }
    open()
}

/// Runs `events` on a TestDriver of `top()` with `apply` (which numbers
/// records with its id counter), calling `observe` with the driver and the
/// step after each event; commits before event `commit_at`, then applies
/// `lost` more events and crashes (their effects and outputs are lost),
/// restores from the store and goes on from `commit_at`. Returns the
/// driver after the last event.
pub fn replay_with_crash<E: Copy>(
    events: &[E],
    top: impl Fn() -> Topology,
    commit_at: usize,
    lost: usize,
    apply: impl Fn(&mut TestDriver, E, &mut u8),
    mut observe: impl FnMut(&mut TestDriver, usize),
) -> TestDriver {
    let mut d = TestDriver::new(top()).unwrap();
    let (mut id, mut step, mut crashed) = (0u8, 0usize, false);
    while step < events.len() {
        if step == commit_at && !crashed {
            d.commit().unwrap();
            let mut lost_id = id;
            for &e in events.iter().skip(step).take(lost) {
                apply(&mut d, e, &mut lost_id);
            }
            d = d.restart(top()).unwrap();
            crashed = true;
            continue;
        }
        apply(&mut d, events[step], &mut id);
        observe(&mut d, step);
        step += 1;
    }
    d
}
