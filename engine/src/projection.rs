//! Projections: read models fed from `read_all`, with a checkpoint committed
//! together with their changes.
//!
//! A [`Projection`] keeps a read model (the query side of CQRS) and the
//! [`Checkpoint`] it has read the log up to, *in the same store and in the
//! same commit*: [`Projection::apply`] writes the changes a batch of events
//! makes and the new checkpoint atomically. After a crash the projection
//! resumes from its stored checkpoint, so every event affects the read model
//! exactly once even though delivery may repeat.
//!
//! A [`ProjectionRunner`] feeds a projection from an [`EventLog`]:
//! [`ProjectionRunner::catch_up`] reads [`EventLog::read_all`] from the
//! checkpoint in batches until the log has nothing more, and
//! [`ProjectionRunner::follow`] catches up and then waits on
//! [`EventLog::watch_head`] for new events until told to stop.
//!
//! [`InMemoryProjection`] is a ready-made projection over an in-memory read
//! model, for tests and simulations, and a reference for how `apply` must
//! behave.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use async_trait::async_trait;

use crate::aggregate::DecodeError;
use crate::error::{BackendError, ReadError};
use crate::event::RecordedEvent;
use crate::log::EventLog;
use crate::upcast::{UpcastError, Upcasters};

/// The next log position a projection has to read: every event before it is
/// reflected in the read model, none at or after it. 0 for a new projection.
pub type Checkpoint = u64;

/// Why a projection could not make progress.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// Reading or following the log failed.
    #[error("reading the log failed: {0}")]
    Read(#[source] ReadError),
    /// An event could not be upcast.
    #[error("event at position {position}: {source}")]
    Upcast {
        /// The event's position.
        position: u64,
        /// Why.
        source: UpcastError,
    },
    /// An event could not be decoded by the projection.
    #[error("event at position {position}: {source}")]
    Decode {
        /// The event's position.
        position: u64,
        /// Why.
        source: DecodeError,
    },
    /// The projection cannot apply an event (an invariant of the read model
    /// would break). Nothing of the batch was committed.
    #[error("event at position {position} rejected: {reason}")]
    Rejected {
        /// The event's position.
        position: u64,
        /// Why.
        reason: String,
    },
    /// The read model's store failed. Nothing of the batch was committed.
    #[error("read model store failed: {0}")]
    Store(#[source] BackendError),
    /// The stored checkpoint is beyond the log's head: the read model was
    /// built from another (or a longer) log.
    #[error("projection {projection:?}: checkpoint {checkpoint} is beyond the log head {head}")]
    CheckpointAhead {
        /// The projection's name.
        projection: String,
        /// Its stored checkpoint.
        checkpoint: Checkpoint,
        /// The log's head.
        head: u64,
    },
    /// The runner's batch size is 0 or above the log's read limit.
    #[error("batch is {batch} events; it must be 1 to {max}")]
    BatchSize {
        /// The requested batch.
        batch: usize,
        /// The log's [`crate::Limits::max_read_events`].
        max: usize,
    },
}

/// A read model fed from the log, with its checkpoint stored alongside.
///
/// Implementations must make [`Projection::apply`] atomic: the changes the
/// events make and the new checkpoint are committed together or not at all.
/// On the embedded backend that is one redb write transaction that updates
/// the read-model tables and the checkpoint table; on Kafka, the output
/// records and `send_offsets_to_transaction` in one transaction. A
/// projection that commits its changes and its checkpoint separately
/// applies events twice after a crash between the two.
#[async_trait]
pub trait Projection: Send + Sync {
    /// A stable name, unique among the projections of a store (it usually
    /// keys the stored checkpoint).
    fn name(&self) -> &str;

    /// Loads the stored checkpoint (0 if none was ever committed).
    async fn checkpoint(&self) -> Result<Checkpoint, ProjectionError>;

    /// Applies `events` (in position order, never empty when called by
    /// [`ProjectionRunner`]) and commits the resulting changes together
    /// with `next_checkpoint` (one past the last event's position),
    /// atomically. On error nothing may be committed.
    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        next_checkpoint: Checkpoint,
    ) -> Result<(), ProjectionError>;
}

#[async_trait]
impl<P: Projection + ?Sized> Projection for Box<P> {
    fn name(&self) -> &str {
        (**self).name()
    }

    async fn checkpoint(&self) -> Result<Checkpoint, ProjectionError> {
        (**self).checkpoint().await
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        next_checkpoint: Checkpoint,
    ) -> Result<(), ProjectionError> {
        (**self).apply(events, next_checkpoint).await
    }
}

/// What a [`ProjectionRunner::catch_up`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaughtUp {
    /// The checkpoint committed last (where the next read starts).
    pub checkpoint: Checkpoint,
    /// Events applied by this call.
    pub events: u64,
    /// `apply` calls made by this call.
    pub batches: u64,
}

/// Feeds a [`Projection`] from an [`EventLog`].
///
/// One runner per projection: two runners committing to the same read model
/// at once break the exactly-once guarantee unless the projection's `apply`
/// refuses a checkpoint that does not follow the stored one.
pub struct ProjectionRunner<P> {
    log: Arc<dyn EventLog>,
    projection: P,
    upcasters: Arc<Upcasters>,
    batch: usize,
    /// The checkpoint last loaded or committed; `None` until loaded, and
    /// after a failed apply (the stored one is the truth).
    checkpoint: Option<Checkpoint>,
}

impl<P: fmt::Debug> fmt::Debug for ProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("projection", &self.projection)
            .field("batch", &self.batch)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

/// What woke a following runner.
enum Wake {
    Stop,
    Head(Result<u64, ReadError>),
}

impl<P: Projection> ProjectionRunner<P> {
    /// The default batch: 1 000 events (or the log's read limit if lower).
    pub const DEFAULT_BATCH: usize = 1_000;

    /// A runner feeding `projection` from `log`, in batches of
    /// [`Self::DEFAULT_BATCH`] events, without upcasters.
    pub fn new(log: Arc<dyn EventLog>, projection: P) -> Self {
        let batch = Self::DEFAULT_BATCH.min(log.limits().max_read_events).max(1);
        Self {
            log,
            projection,
            upcasters: Arc::new(Upcasters::new()),
            batch,
            checkpoint: None,
        }
    }

    /// Reads (and applies) at most `batch` events at a time: 1 to the log's
    /// [`crate::Limits::max_read_events`].
    pub fn with_batch(mut self, batch: usize) -> Result<Self, ProjectionError> {
        let max = self.log.limits().max_read_events;
        if batch == 0 || batch > max {
            return Err(ProjectionError::BatchSize { batch, max });
        }
        self.batch = batch;
        Ok(self)
    }

    /// Raises old events with `upcasters` before the projection sees them.
    pub fn with_upcasters(mut self, upcasters: impl Into<Arc<Upcasters>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The projection, mutably. Changing its stored checkpoint behind the
    /// runner's back is not noticed until the next failed apply.
    pub fn projection_mut(&mut self) -> &mut P {
        &mut self.projection
    }

    /// Gives the projection back.
    pub fn into_inner(self) -> P {
        self.projection
    }

    /// Loads the stored checkpoint (once) and checks it against the head.
    async fn load_checkpoint(&mut self) -> Result<Checkpoint, ProjectionError> {
        if let Some(cp) = self.checkpoint {
            return Ok(cp);
        }
        let cp = self.projection.checkpoint().await?;
        let head = self.log.head().await.map_err(ProjectionError::Read)?;
        if cp > head {
            return Err(ProjectionError::CheckpointAhead {
                projection: self.projection.name().to_owned(),
                checkpoint: cp,
                head,
            });
        }
        self.checkpoint = Some(cp);
        Ok(cp)
    }

    /// Reads from the checkpoint in batches and applies them until the log
    /// returns nothing more (events appended meanwhile are included).
    pub async fn catch_up(&mut self) -> Result<CaughtUp, ProjectionError> {
        self.run(None).await
    }

    async fn run(
        &mut self,
        stop: Option<&tokio::sync::watch::Receiver<bool>>,
    ) -> Result<CaughtUp, ProjectionError> {
        let mut report = CaughtUp {
            checkpoint: self.load_checkpoint().await?,
            events: 0,
            batches: 0,
        };
        loop {
            if stop.is_some_and(stopped) {
                return Ok(report);
            }
            let events = self
                .log
                .read_all(report.checkpoint, self.batch)
                .await
                .map_err(ProjectionError::Read)?;
            let Some(last) = events.last() else {
                return Ok(report);
            };
            let next = last.position + 1;
            let events = if self.upcasters.is_empty() {
                events
            } else {
                events
                    .into_iter()
                    .map(|e| {
                        let position = e.position;
                        self.upcasters
                            .upcast(e)
                            .map_err(|source| ProjectionError::Upcast { position, source })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            if let Err(e) = self.projection.apply(&events, next).await {
                self.checkpoint = None;
                return Err(e);
            }
            self.checkpoint = Some(next);
            report.checkpoint = next;
            report.events += events.len() as u64;
            report.batches += 1;
        }
    }

    /// Catches up, then applies new events as they are committed, until
    /// `stop` holds `true` or its sender is dropped. Returns the checkpoint
    /// reached.
    ///
    /// Stopping is checked between batches and while waiting, never in the
    /// middle of an `apply`, so a stopped runner leaves a committed
    /// checkpoint behind.
    pub async fn follow(
        &mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Checkpoint, ProjectionError> {
        let mut watch = self.log.watch_head();
        // The head last seen while waiting; used to avoid spinning when the
        // head moves past positions that read as nothing (gaps, e.g. Kafka
        // transaction markers).
        let mut seen_head: Option<u64> = None;
        loop {
            let report = self.run(Some(&stop)).await?;
            if stopped(&stop) {
                return Ok(report.checkpoint);
            }
            let wait_from = match seen_head {
                Some(h) if report.events == 0 && h > report.checkpoint => h,
                _ => report.checkpoint,
            };
            match wait_or_stop(&mut watch, wait_from, &mut stop).await {
                Wake::Stop => return Ok(report.checkpoint),
                Wake::Head(Ok(head)) => seen_head = Some(head),
                Wake::Head(Err(e)) => return Err(ProjectionError::Read(e)),
            }
        }
    }
}

fn stopped(stop: &tokio::sync::watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Waits until the head is beyond `position` or `stop` turns true (or its
/// sender is dropped), whichever comes first.
async fn wait_or_stop(
    watch: &mut crate::log::HeadWatch,
    position: u64,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Wake {
    let mut head = pin!(watch.wait_beyond(position));
    let mut stop = pin!(stop.wait_for(|s| *s));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = stop.as_mut().poll(cx) {
            // Ok: stop is true; Err: the sender is gone. Both mean stop.
            drop(r);
            return Poll::Ready(Wake::Stop);
        }
        if let Poll::Ready(r) = head.as_mut().poll(cx) {
            return Poll::Ready(Wake::Head(r));
        }
        Poll::Pending
    })
    .await
}

/// The committed contents of an [`InMemoryProjection`]: the read model and
/// its checkpoint, changed together under one lock. Clones share the same
/// model, so a "restarted" projection can be built over it.
pub struct InMemoryReadModel<S> {
    inner: Arc<Mutex<Committed<S>>>,
}

struct Committed<S> {
    state: S,
    checkpoint: Checkpoint,
}

impl<S> Clone for InMemoryReadModel<S> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Default> Default for InMemoryReadModel<S> {
    fn default() -> Self {
        Self::new(S::default())
    }
}

impl<S: fmt::Debug> fmt::Debug for InMemoryReadModel<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.lock();
        f.debug_struct("InMemoryReadModel")
            .field("state", &c.state)
            .field("checkpoint", &c.checkpoint)
            .finish()
    }
}

impl<S> InMemoryReadModel<S> {
    /// A model holding `initial`, at checkpoint 0.
    pub fn new(initial: S) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Committed {
                state: initial,
                checkpoint: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Committed<S>> {
        // A commit replaces the state and checkpoint in one assignment after
        // every handler succeeded, so a poisoned lock never guards a
        // half-applied batch.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The committed checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        self.lock().checkpoint
    }

    /// Reads the committed state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.lock().state)
    }

    /// A copy of the committed state.
    pub fn state(&self) -> S
    where
        S: Clone,
    {
        self.lock().state.clone()
    }
}

/// Applies one event to an in-memory read model.
pub type Handler<S> =
    Box<dyn Fn(&mut S, &RecordedEvent) -> Result<(), ProjectionError> + Send + Sync>;

/// A [`Projection`] over an [`InMemoryReadModel`]: each batch is applied to
/// a copy of the state and committed, with its checkpoint, in one swap, so a
/// handler failure commits nothing. Events below the committed checkpoint
/// are skipped, so even a batch delivered twice is applied once.
pub struct InMemoryProjection<S> {
    name: String,
    model: InMemoryReadModel<S>,
    handler: Handler<S>,
}

impl<S: fmt::Debug> fmt::Debug for InMemoryProjection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryProjection")
            .field("name", &self.name)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + Send + 'static> InMemoryProjection<S> {
    /// A projection named `name` that folds events into `model` with
    /// `handler`.
    pub fn new(
        name: impl Into<String>,
        model: InMemoryReadModel<S>,
        handler: impl Fn(&mut S, &RecordedEvent) -> Result<(), ProjectionError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            model,
            handler: Box::new(handler),
        }
    }

    /// The read model (a shared handle).
    pub fn model(&self) -> &InMemoryReadModel<S> {
        &self.model
    }
}

#[async_trait]
impl<S: Clone + Send + 'static> Projection for InMemoryProjection<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&self) -> Result<Checkpoint, ProjectionError> {
        Ok(self.model.checkpoint())
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        next_checkpoint: Checkpoint,
    ) -> Result<(), ProjectionError> {
        let mut committed = self.model.lock();
        let mut state = committed.state.clone();
        for e in events.iter().filter(|e| e.position >= committed.checkpoint) {
            (self.handler)(&mut state, e)?;
        }
        // One assignment: the state and the checkpoint change together.
        *committed = Committed {
            state,
            checkpoint: committed.checkpoint.max(next_checkpoint),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::append::{AppendTx, ExpectedVersion};
    use crate::event::NewEvent;
    use crate::memory::InMemoryLog;
    use crate::stream_id::StreamId;

    /// The test read model: every position applied, in order, and a total.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    struct Seen {
        positions: Vec<u64>,
        total: u64,
    }

    fn handler(s: &mut Seen, e: &RecordedEvent) -> Result<(), ProjectionError> {
        if e.kind != "Added" {
            return Ok(());
        }
        let n: u64 = std::str::from_utf8(&e.payload)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ProjectionError::Rejected {
                position: e.position,
                reason: "not a number".into(),
            })?;
        s.positions.push(e.position);
        s.total += n;
        Ok(())
    }

    fn projection(model: &InMemoryReadModel<Seen>) -> InMemoryProjection<Seen> {
        InMemoryProjection::new("totals", model.clone(), handler)
    }

    async fn add(log: &InMemoryLog, stream: &str, values: &[u64]) {
        let events = values
            .iter()
            .map(|v| NewEvent::new("Added", 1, 0, v.to_string()))
            .collect();
        log.append(AppendTx::single(
            StreamId::new(stream).unwrap(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .unwrap();
    }

    fn assert_each_once(seen: &Seen, upto: u64) {
        assert_eq!(seen.positions, (0..upto).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn catch_up_reads_in_batches_up_to_the_head() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1, 2, 3, 4]).await;
        add(&log, "b", &[10, 20, 30, 40, 50, 60]).await;
        let model = InMemoryReadModel::default();
        let mut runner = ProjectionRunner::new(log.clone(), projection(&model))
            .with_batch(4)
            .unwrap();
        let r = runner.catch_up().await.unwrap();
        assert_eq!(
            r,
            CaughtUp {
                checkpoint: 10,
                events: 10,
                batches: 3
            }
        );
        assert_eq!(model.checkpoint(), 10);
        let seen = model.state();
        assert_each_once(&seen, 10);
        assert_eq!(seen.total, 220);
        // Nothing new: nothing applied.
        let r = runner.catch_up().await.unwrap();
        assert_eq!((r.checkpoint, r.events, r.batches), (10, 0, 0));
        assert_eq!(runner.projection().name(), "totals");
    }

    #[tokio::test]
    async fn restart_resumes_from_the_committed_checkpoint() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1, 1, 1, 1, 1]).await;
        let model = InMemoryReadModel::default();
        {
            let mut runner = ProjectionRunner::new(log.clone(), projection(&model))
                .with_batch(2)
                .unwrap();
            runner.catch_up().await.unwrap();
        } // "crash": the runner and projection are gone, the store stays.
        add(&log, "a", &[1, 1, 1]).await;
        let mut runner = ProjectionRunner::new(log.clone(), projection(&model))
            .with_batch(2)
            .unwrap();
        let r = runner.catch_up().await.unwrap();
        assert_eq!((r.checkpoint, r.events), (8, 3), "only the new events");
        let seen = model.state();
        assert_each_once(&seen, 8);
        assert_eq!(seen.total, 8);
    }

    #[tokio::test]
    async fn a_failed_batch_commits_nothing_and_is_retried_once() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1, 2, 3, 4, 5, 6]).await;
        let model = InMemoryReadModel::default();
        let fail = Arc::new(AtomicBool::new(true));
        let calls = Arc::new(AtomicU64::new(0));
        let make = |fail: Arc<AtomicBool>, calls: Arc<AtomicU64>| {
            InMemoryProjection::new("totals", model.clone(), move |s: &mut Seen, e| {
                calls.fetch_add(1, Ordering::SeqCst);
                if e.position == 4 && fail.load(Ordering::SeqCst) {
                    return Err(ProjectionError::Store(BackendError::new(
                        std::io::Error::other("disk full"),
                    )));
                }
                handler(s, e)
            })
        };
        let mut runner = ProjectionRunner::new(log.clone(), make(fail.clone(), calls.clone()))
            .with_batch(3)
            .unwrap();
        let err = runner.catch_up().await.unwrap_err();
        assert!(matches!(err, ProjectionError::Store(_)), "{err:?}");
        // The first batch (0..3) is committed; of the second, nothing: not
        // position 3, although the handler ran for it.
        assert_eq!(model.checkpoint(), 3);
        assert_each_once(&model.state(), 3);

        fail.store(false, Ordering::SeqCst);
        let r = runner.catch_up().await.unwrap();
        assert_eq!((r.checkpoint, r.events), (6, 3));
        let seen = model.state();
        assert_each_once(&seen, 6);
        assert_eq!(seen.total, 21);
        // 3 (first batch) + 2 (failed: positions 3, 4) + 3 (retry).
        assert_eq!(calls.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn a_batch_delivered_twice_is_applied_once() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[5, 6, 7]).await;
        let events = log.read_all(0, 10).await.unwrap();
        let model = InMemoryReadModel::default();
        let mut p = projection(&model);
        p.apply(&events[..2], 2).await.unwrap();
        // Redelivered with one more event: only the new one counts.
        p.apply(&events, 3).await.unwrap();
        let seen = model.state();
        assert_each_once(&seen, 3);
        assert_eq!(seen.total, 18);
        // A stale checkpoint never moves it back.
        p.apply(&events[..1], 1).await.unwrap();
        assert_eq!(model.checkpoint(), 3);
        assert_eq!(model.state(), seen);
    }

    #[tokio::test]
    async fn rejected_events_stop_the_runner_with_their_position() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1]).await;
        log.append(AppendTx::single(
            StreamId::new("a").unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::new("Added", 1, 0, "many")],
        ))
        .await
        .unwrap();
        let model = InMemoryReadModel::default();
        let mut runner = ProjectionRunner::new(log.clone(), projection(&model));
        let err = runner.catch_up().await.unwrap_err();
        assert!(
            matches!(err, ProjectionError::Rejected { position: 1, .. }),
            "{err:?}"
        );
        assert_eq!(model.checkpoint(), 0, "the batch held both events");
        assert!(err.to_string().contains("position 1"), "{err}");
    }

    #[tokio::test]
    async fn a_checkpoint_beyond_the_head_is_an_error() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1, 2, 3]).await;
        let model = InMemoryReadModel::default();
        ProjectionRunner::new(log.clone(), projection(&model))
            .catch_up()
            .await
            .unwrap();
        // The same read model against another, shorter log.
        let other = Arc::new(InMemoryLog::new());
        add(&other, "a", &[1]).await;
        let err = ProjectionRunner::new(other, projection(&model))
            .catch_up()
            .await
            .unwrap_err();
        match err {
            ProjectionError::CheckpointAhead {
                projection,
                checkpoint,
                head,
            } => {
                assert_eq!(projection, "totals");
                assert_eq!((checkpoint, head), (3, 1));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn batch_size_is_checked() {
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        let model = InMemoryReadModel::<Seen>::default();
        let max = log.limits().max_read_events;
        assert!(matches!(
            ProjectionRunner::new(log.clone(), projection(&model)).with_batch(0),
            Err(ProjectionError::BatchSize { batch: 0, .. })
        ));
        assert!(matches!(
            ProjectionRunner::new(log.clone(), projection(&model)).with_batch(max + 1),
            Err(ProjectionError::BatchSize { .. })
        ));
        assert!(ProjectionRunner::new(log, projection(&model))
            .with_batch(max)
            .is_ok());
    }

    #[tokio::test]
    async fn upcasters_run_before_the_projection() {
        let log = Arc::new(InMemoryLog::new());
        log.append(AppendTx::single(
            StreamId::new("a").unwrap(),
            ExpectedVersion::Any,
            vec![
                NewEvent::new("Plus", 0, 0, "4"),
                NewEvent::new("Added", 1, 0, "5"),
            ],
        ))
        .await
        .unwrap();
        let ups = Upcasters::new().with("Plus", 0, |mut e: RecordedEvent| {
            e.kind = "Added".into();
            e.schema = 1;
            Ok(e)
        });
        let model = InMemoryReadModel::default();
        let mut runner = ProjectionRunner::new(log.clone(), projection(&model)).with_upcasters(ups);
        runner.catch_up().await.unwrap();
        assert_eq!(model.state().total, 9);
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..5_000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follow_applies_new_events_until_stopped() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1, 2]).await;
        let model = InMemoryReadModel::default();
        let runner = ProjectionRunner::new(log.clone(), projection(&model))
            .with_batch(2)
            .unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut runner = runner;
            runner.follow(stop_rx).await
        });
        eventually("the catch-up", || model.checkpoint() == 2).await;
        for i in 0..5u64 {
            add(&log, "b", &[i, i]).await;
        }
        eventually("the new events", || model.checkpoint() == 12).await;
        stop_tx.send_replace(true);
        let cp = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("follow stops")
            .unwrap()
            .unwrap();
        assert_eq!(cp, 12);
        let seen = model.state();
        assert_each_once(&seen, 12);
        assert_eq!(seen.total, 3 + 2 * (1 + 2 + 3 + 4));
    }

    #[tokio::test]
    async fn follow_stops_when_the_stop_sender_is_dropped() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[1]).await;
        let model = InMemoryReadModel::default();
        let mut runner = ProjectionRunner::new(log.clone(), projection(&model));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let follow = runner.follow(stop_rx);
        let dropper = async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(stop_tx);
        };
        let (cp, ()) = tokio::join!(follow, dropper);
        assert_eq!(cp.unwrap(), 1);
        // Already stopped: returns at once, reading nothing.
        let (_tx, rx) = tokio::sync::watch::channel(true);
        add(&log, "a", &[1]).await;
        assert_eq!(runner.follow(rx).await.unwrap(), 1, "stop is checked first");
    }

    #[tokio::test]
    async fn boxed_projections_work() {
        let log = Arc::new(InMemoryLog::new());
        add(&log, "a", &[7]).await;
        let model = InMemoryReadModel::default();
        let boxed: Box<dyn Projection> = Box::new(projection(&model));
        let mut runner = ProjectionRunner::new(log, boxed);
        runner.catch_up().await.unwrap();
        assert_eq!(model.state().total, 7);
        assert_eq!(runner.into_inner().name(), "totals");
    }
}
