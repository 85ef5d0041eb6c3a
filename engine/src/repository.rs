//! The repository: load (snapshot + tail), decide, append with
//! `Exact(version)`, retry on conflict.
//!
//! A [`Repository`] drives one [`Aggregate`] type over an [`EventLog`]:
//!
//! - [`Repository::load`] starts from the stream's snapshot when there is a
//!   usable one (same [`Aggregate::SNAPSHOT_SCHEMA`], and
//!   [`Aggregate::decode_snapshot`] accepts it), then reads the rest of the
//!   stream in batches of [`RepositoryConfig::read_batch`] events; each event
//!   goes through the [`Upcasters`], is decoded with
//!   [`EventCodec::decode`] and applied with [`Aggregate::evolve`].
//! - [`Repository::execute`] loads, calls [`Aggregate::decide`], and appends
//!   the events it returns in one transaction expecting the version it
//!   loaded (`ExpectedVersion::Exact`). When another writer got there first
//!   it loads again and decides again, at most
//!   [`RepositoryConfig::max_conflict_retries`] times, then gives up with
//!   [`RepositoryError::Conflict`]. After a successful append that crosses a
//!   multiple of [`RepositoryConfig::snapshot_every`] it saves a snapshot.
//! - [`Repository::execute_from`] decides on a state the caller already
//!   holds; [`Repository::execute_all_from`] decides several commands in
//!   order that way and appends all their events in one transaction.
//!
//! # Idempotency
//!
//! [`CommandOptions::idempotency_key`] is passed to the log: a retry of the
//! very same transaction (same expected version, same events, same
//! timestamps) returns the original result and writes nothing. A command
//! executed again *after* its first execution committed is a different
//! transaction (it is decided against a newer version), so the log refuses
//! it with [`RepositoryError::IdempotencyKeyReused`]: read that as "this key
//! was already committed". Aggregates whose commands may be delivered more
//! than once (at-least-once queues, client retries after a timeout) must
//! therefore be idempotent themselves: carry a command id in the command,
//! record it in the event, and have `decide` return no events for an id the
//! state has already seen. The repository then appends nothing and returns
//! an [`Executed`] with no events.
//!
//! # Snapshots
//!
//! Snapshots are an optimisation. A snapshot that cannot be loaded, has
//! another schema or does not decode only makes [`Repository::load`] replay
//! the stream from the start, and a snapshot that cannot be saved after a
//! command is logged with `tracing::warn!` and does not fail the command.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use crate::aggregate::{Aggregate, DecideCtx, DecodeError, EventCodec};
use crate::append::{AppendResult, AppendTx, ExpectedVersion, IdempotencyKey};
use crate::clock::Clock;
use crate::error::{AppendError, ReadError, SnapshotError};
use crate::event::{Metadata, NewEvent, RecordedEvent};
use crate::limits::Limits;
use crate::log::EventLog;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::stream_id::StreamId;
use crate::upcast::{UpcastError, Upcasters};

/// How a [`Repository`] reads, retries and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepositoryConfig {
    /// Save a snapshot each time a stream's version crosses a multiple of
    /// this many events; 0 = never. A stream whose last snapshot was
    /// larger than [`CHEAP_SNAPSHOT_BYTES`] is snapshotted again only once
    /// the events appended since weigh as much as it did.
    pub snapshot_every: u64,
    /// How many times [`Repository::execute`] loads and decides again after
    /// a concurrency conflict before giving up with
    /// [`RepositoryError::Conflict`]; 0 = never retry.
    pub max_conflict_retries: u32,
    /// Events per `read_stream` call when loading (1 to the log's
    /// [`Limits::max_read_events`]).
    pub read_batch: usize,
}

impl Default for RepositoryConfig {
    /// No snapshots, 3 retries, reads of 1 000 events.
    fn default() -> Self {
        Self {
            snapshot_every: 0,
            max_conflict_retries: 3,
            read_batch: 1_000,
        }
    }
}

impl RepositoryConfig {
    /// Checks the configuration against a log's limits.
    pub fn validate(&self, limits: &Limits) -> Result<(), ConfigError> {
        if self.read_batch == 0 || self.read_batch > limits.max_read_events {
            return Err(ConfigError::ReadBatch {
                read_batch: self.read_batch,
                max: limits.max_read_events,
            });
        }
        Ok(())
    }
}

/// Snapshots up to this size are saved at every
/// [`RepositoryConfig::snapshot_every`]; a larger one waits until the
/// events appended after it weigh as much (so saving snapshots costs at
/// most as many bytes as the events do, and a load replays at most a
/// snapshot's weight of events). A campaign that has messaged a million
/// users snapshots about 7 MB: every 16 events it would rewrite (and
/// first reload) them thousands of times a run.
pub const CHEAP_SNAPSHOT_BYTES: u64 = 64 * 1024;

/// The streams whose snapshot pace is remembered, at most (forgetting one
/// only makes its next snapshot due at the next multiple).
const MAX_PACED_STREAMS: usize = 65_536;

/// Per stream: the last snapshot's size and the event bytes appended
/// since, as this process saw them.
#[derive(Debug, Default, Clone, Copy)]
struct Pace {
    last_bytes: u64,
    since_bytes: u64,
}

/// A [`RepositoryConfig`] the log cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `read_batch` is 0 or above the log's read limit.
    #[error("read_batch is {read_batch}; it must be 1 to {max}")]
    ReadBatch {
        /// The configured value.
        read_batch: usize,
        /// The log's [`Limits::max_read_events`].
        max: usize,
    },
}

/// Per-command options for [`Repository::execute`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOptions {
    /// Passed to the log as the transaction's idempotency key (see the
    /// module docs for what it does and does not protect against).
    pub idempotency_key: Option<String>,
    /// Correlation and causation ids written on every event.
    pub metadata: Metadata,
}

impl CommandOptions {
    /// Options with this idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Options with this metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// An aggregate as loaded: its state and the stream version it reflects.
pub struct Loaded<A> {
    /// The state after every event up to `version`.
    pub state: A,
    /// The stream version (0 = the stream does not exist).
    pub version: u64,
}

impl<A: fmt::Debug> fmt::Debug for Loaded<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("state", &self.state)
            .field("version", &self.version)
            .finish()
    }
}

/// An aggregate's state the caller already holds, borrowed, and the
/// stream version it reflects: what [`Repository::execute_from`] decides
/// on without loading or copying it.
pub struct Known<'a, A> {
    /// The state after every event up to `version`.
    pub state: &'a A,
    /// The stream version (0 = the stream does not exist).
    pub version: u64,
}

/// What [`Repository::execute_from`] did: [`Executed`] without the state
/// (the caller holds it and applies `events` itself).
#[derive(Debug)]
pub struct Appended<E> {
    /// The stream version after the command (unchanged if it produced no
    /// events).
    pub version: u64,
    /// Where the transaction landed; `None` when the command produced no
    /// events and nothing was appended.
    pub append: Option<AppendResult>,
    /// The events the command produced, as appended.
    pub events: Vec<E>,
    /// How many times the command was decided.
    pub attempts: u32,
}

impl<A: Aggregate> From<Executed<A>> for Appended<A::Event> {
    fn from(e: Executed<A>) -> Self {
        Self {
            version: e.version,
            append: e.append,
            events: e.events,
            attempts: e.attempts,
        }
    }
}

/// What [`Repository::execute_all_from`] did.
#[derive(Debug)]
pub struct AppendedAll<E, R> {
    /// How many commands, from the front, were decided: the ones after did
    /// not fit the same transaction (the log's limits) and were not
    /// looked at.
    pub taken: usize,
    /// The stream version after them (unchanged if they produced no
    /// events).
    pub version: u64,
    /// Where the transaction landed; `None` when no command produced
    /// events and nothing was appended.
    pub append: Option<AppendResult>,
    /// Every taken command's events, in order, as appended.
    pub events: Vec<E>,
    /// For each taken command: how many of `events` it produced, or why
    /// it was refused (decided on the known state and the commands before
    /// it; a refused command appends nothing).
    pub outcomes: Vec<Result<usize, R>>,
}

/// What [`Repository::execute`] did.
pub struct Executed<A: Aggregate> {
    /// The stream version after the command (unchanged if it produced no
    /// events).
    pub version: u64,
    /// Where the transaction landed; `None` when the command produced no
    /// events and nothing was appended.
    pub append: Option<AppendResult>,
    /// The events the command produced, as appended.
    pub events: Vec<A::Event>,
    /// The state after them.
    pub state: A,
    /// How many times the command was decided (1 + conflicts retried, + 1 if
    /// a snapshot turned out to be ahead of the log).
    pub attempts: u32,
}

impl<A> fmt::Debug for Executed<A>
where
    A: Aggregate + fmt::Debug,
    A::Event: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executed")
            .field("version", &self.version)
            .field("append", &self.append)
            .field("events", &self.events)
            .field("state", &self.state)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// Why a repository operation failed. `E` is the aggregate's own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError<E> {
    /// The aggregate refused the command. Nothing was appended.
    #[error(transparent)]
    Domain(E),
    /// Other writers kept changing the stream: every attempt met a newer
    /// version. Nothing was appended.
    #[error(
        "stream {stream}: concurrency conflict after {attempts} attempts (actual version {actual})"
    )]
    Conflict {
        /// The stream.
        stream: StreamId,
        /// Times the command was decided and appended.
        attempts: u32,
        /// The stream's version at the last attempt.
        actual: u64,
    },
    /// The idempotency key was already committed by a different transaction:
    /// most likely this very command, executed before (see the module docs).
    /// Nothing was appended.
    #[error(
        "stream {stream}: idempotency key {key} was already committed (command executed before?)"
    )]
    IdempotencyKeyReused {
        /// The stream.
        stream: StreamId,
        /// The key.
        key: IdempotencyKey,
    },
    /// The append failed for another reason (limits, closed log, backend).
    #[error("append failed: {0}")]
    Append(#[source] AppendError),
    /// Reading the stream failed.
    #[error("read failed: {0}")]
    Read(#[source] ReadError),
    /// An event could not be upcast.
    #[error("event at position {position}: {source}")]
    Upcast {
        /// The event's position in the log.
        position: u64,
        /// Why.
        source: UpcastError,
    },
    /// An event could not be decoded.
    #[error("event at position {position}: {source}")]
    Decode {
        /// The event's position in the log.
        position: u64,
        /// Why.
        source: DecodeError,
    },
    /// The log returned an event out of version order (a backend bug or a
    /// damaged index).
    #[error("stream {stream}: expected version {expected}, read version {found}")]
    VersionGap {
        /// The stream.
        stream: StreamId,
        /// The version expected next.
        expected: u64,
        /// The version read.
        found: u64,
    },
    /// An explicit snapshot operation ([`Repository::save_snapshot`])
    /// failed.
    #[error("snapshot failed: {0}")]
    Snapshot(#[source] SnapshotError),
}

/// Loads, decides and appends for aggregate `A`. Cheap to clone (shared
/// pointers); safe to use from many tasks at once.
pub struct Repository<A> {
    log: Arc<dyn EventLog>,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    clock: Arc<dyn Clock>,
    upcasters: Arc<Upcasters>,
    config: RepositoryConfig,
    /// Shared by clones: the snapshot pace of each stream.
    pace: Arc<Mutex<HashMap<StreamId, Pace>>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            log: Arc::clone(&self.log),
            snapshots: self.snapshots.clone(),
            clock: Arc::clone(&self.clock),
            upcasters: Arc::clone(&self.upcasters),
            config: self.config,
            pace: Arc::clone(&self.pace),
            _aggregate: PhantomData,
        }
    }
}

impl<A> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &std::any::type_name::<A>())
            .field("snapshots", &self.snapshots.is_some())
            .field("upcasters", &self.upcasters)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The outcome of one decide-and-append attempt.
enum Attempt<A: Aggregate> {
    Done(Executed<A>),
    Conflict { actual: u64, loaded: u64 },
}

/// `events` as the log stores them, at `now_ms`, with `options`' metadata.
fn encode<E: EventCodec>(events: &[E], options: &CommandOptions, now_ms: u64) -> Vec<NewEvent> {
    events
        .iter()
        .map(|e| {
            NewEvent::new(e.kind(), e.schema(), now_ms, e.encode())
                .with_metadata(options.metadata.clone())
        })
        .collect()
}

/// The stream's version after an append of `count` events at `version`.
fn new_version_of(result: &AppendResult, stream: &StreamId, version: u64, count: usize) -> u64 {
    result
        .versions
        .iter()
        .find(|(s, _)| s == stream)
        .map_or(version + count as u64, |(_, v)| *v)
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `log` with the default [`RepositoryConfig`], no
    /// snapshots and no upcasters.
    pub fn new(log: Arc<dyn EventLog>, clock: Arc<dyn Clock>) -> Self {
        Self {
            log,
            snapshots: None,
            clock,
            upcasters: Arc::new(Upcasters::new()),
            config: RepositoryConfig::default(),
            pace: Arc::default(),
            _aggregate: PhantomData,
        }
    }

    /// Uses `store` for snapshots.
    pub fn with_snapshots(mut self, store: Arc<dyn SnapshotStore>) -> Self {
        self.snapshots = Some(store);
        self
    }

    /// Raises old events with `upcasters` on read.
    pub fn with_upcasters(mut self, upcasters: impl Into<Arc<Upcasters>>) -> Self {
        self.upcasters = upcasters.into();
        self
    }

    /// Uses `config`, after checking it against the log's limits.
    pub fn with_config(mut self, config: RepositoryConfig) -> Result<Self, ConfigError> {
        config.validate(&self.log.limits())?;
        self.config = config;
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &RepositoryConfig {
        &self.config
    }

    /// The event log.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The snapshot store, if any.
    pub fn snapshots(&self) -> Option<&Arc<dyn SnapshotStore>> {
        self.snapshots.as_ref()
    }

    /// The upcasters.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Loads the aggregate of `stream`: its snapshot (if usable) plus every
    /// later event. A stream that does not exist loads as the default state
    /// at version 0.
    pub async fn load(&self, stream: &StreamId) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        self.load_inner(stream, true).await
    }

    async fn load_inner(
        &self,
        stream: &StreamId,
        use_snapshot: bool,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let snapshot = if use_snapshot {
            self.load_snapshot(stream).await
        } else {
            None
        };
        let mut loaded = snapshot.unwrap_or_else(|| Loaded {
            state: A::default(),
            version: 0,
        });
        let batch = self.config.read_batch;
        loop {
            let events = self
                .log
                .read_stream(stream, loaded.version + 1, batch)
                .await
                .map_err(RepositoryError::Read)?;
            if events.is_empty() {
                break;
            }
            for recorded in events {
                let expected = loaded.version + 1;
                if recorded.version != expected {
                    return Err(RepositoryError::VersionGap {
                        stream: stream.clone(),
                        expected,
                        found: recorded.version,
                    });
                }
                let event = self.decode(recorded)?;
                loaded.state.evolve(&event);
                loaded.version = expected;
            }
        }
        Ok(loaded)
    }

    /// Upcasts and decodes one recorded event.
    fn decode(&self, recorded: RecordedEvent) -> Result<A::Event, RepositoryError<A::Error>> {
        let position = recorded.position;
        let recorded = self
            .upcasters
            .upcast(recorded)
            .map_err(|source| RepositoryError::Upcast { position, source })?;
        A::Event::decode(&recorded.kind, recorded.schema, &recorded.payload)
            .map_err(|source| RepositoryError::Decode { position, source })
    }

    /// The stream's snapshot, if there is a usable one. Failures only cost a
    /// full replay.
    async fn load_snapshot(&self, stream: &StreamId) -> Option<Loaded<A>> {
        let store = self.snapshots.as_ref()?;
        let snapshot = match store.load(stream).await {
            Ok(s) => s?,
            Err(e) => {
                tracing::warn!(%stream, error = %e, "snapshot load failed; replaying the stream");
                return None;
            }
        };
        if snapshot.schema != A::SNAPSHOT_SCHEMA {
            tracing::debug!(
                %stream,
                schema = snapshot.schema,
                current = A::SNAPSHOT_SCHEMA,
                "snapshot has another schema; replaying the stream"
            );
            return None;
        }
        match A::decode_snapshot(&snapshot.state) {
            Some(state) => Some(Loaded {
                state,
                version: snapshot.version,
            }),
            None => {
                tracing::debug!(%stream, "snapshot does not decode; replaying the stream");
                None
            }
        }
    }

    /// Executes `command` against the aggregate of `stream`: loads it,
    /// decides, and appends the events with `Exact(version)`, loading and
    /// deciding again on a concurrency conflict up to
    /// [`RepositoryConfig::max_conflict_retries`] times.
    ///
    /// A command that produces no events appends nothing. See the module
    /// docs for idempotency and snapshots.
    #[tracing::instrument(level = "debug", name = "command", skip_all, fields(stream = %stream))]
    pub async fn execute(
        &self,
        stream: &StreamId,
        command: &A::Command,
        options: CommandOptions,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        let mut use_snapshot = true;
        let mut attempts = 0u32;
        let mut retries = 0u32;
        loop {
            attempts += 1;
            match self
                .attempt(stream, command, &options, use_snapshot, attempts)
                .await?
            {
                Attempt::Done(executed) => return Ok(executed),
                Attempt::Conflict { actual, loaded } => {
                    if actual < loaded && use_snapshot {
                        // Versions only grow, so the state we loaded is ahead
                        // of the log: the snapshot is newer than the stream
                        // (a log restored from an older backup). Ignore it
                        // and try again; this is not a conflict with another
                        // writer, so it does not count as a retry.
                        tracing::warn!(
                            %stream,
                            snapshot_version = loaded,
                            log_version = actual,
                            "snapshot is ahead of the log; ignoring snapshots for this command"
                        );
                        use_snapshot = false;
                        continue;
                    }
                    if retries >= self.config.max_conflict_retries {
                        return Err(RepositoryError::Conflict {
                            stream: stream.clone(),
                            attempts,
                            actual,
                        });
                    }
                    retries += 1;
                    tracing::debug!(%stream, attempts, actual, "concurrency conflict; retrying");
                }
            }
        }
    }

    /// Like [`execute`](Self::execute), deciding first against `known`:
    /// the aggregate's state at its current version, which the caller
    /// already holds (a runtime that folds every event of the stream keeps
    /// it in memory), borrowed: nothing is loaded or copied, which matters
    /// when the state is large and commands are many. If the stream has
    /// moved on (another writer), the append's expected version conflicts
    /// and the command is executed again as `execute` does, from a fresh
    /// load; a refusal is also decided again on a fresh load before it is
    /// returned. So a stale `known` costs a retry, never a wrong decision.
    /// The caller applies the returned events to its own state.
    pub async fn execute_from(
        &self,
        stream: &StreamId,
        known: Known<'_, A>,
        command: &A::Command,
        options: CommandOptions,
    ) -> Result<Appended<A::Event>, RepositoryError<A::Error>> {
        match self.attempt_known(stream, known, command, &options).await {
            Ok(Some(appended)) => Ok(appended),
            // Moved on, or refused on what may be an old state: decide
            // again on a fresh load.
            Ok(None) | Err(RepositoryError::Domain(_)) => {
                self.execute(stream, command, options).await.map(Into::into)
            }
            Err(e) => Err(e),
        }
    }

    /// Several commands in one transaction: decides `commands` in order,
    /// each on the state `known` reflects plus the events of the commands
    /// before it (on a copy), and appends all their events at once,
    /// expecting `known.version`. So they take effect together or not at
    /// all, as executing them one after another with
    /// [`execute_from`](Self::execute_from) would have decided them, at
    /// the cost of one append instead of one per command.
    ///
    /// A refused command is left out (its outcome says why) and the others
    /// go on. Commands are taken from the front while their events fit
    /// one transaction of the log's [`Limits`] (the first is always
    /// taken); [`AppendedAll::taken`] says how many. `Ok(None)`: the stream
    /// is no longer at `known.version` (another writer), nothing was
    /// appended; reload, or execute the commands one by one. The caller
    /// applies the returned events to its own state.
    pub async fn execute_all_from(
        &self,
        stream: &StreamId,
        known: Known<'_, A>,
        commands: &[A::Command],
        options: CommandOptions,
    ) -> Result<Option<AppendedAll<A::Event, A::Error>>, RepositoryError<A::Error>>
    where
        A: Clone,
    {
        let limits = self.log.limits();
        let version = known.version;
        let now_ms = self.clock.now_ms();
        let mut state: Option<A> = None;
        let mut events: Vec<A::Event> = Vec::new();
        let mut encoded: Vec<NewEvent> = Vec::new();
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut bytes = 0usize;
        for command in commands {
            let ctx = DecideCtx {
                stream: stream.clone(),
                version: version + events.len() as u64,
                now_ms,
            };
            let current = state.as_ref().unwrap_or(known.state);
            let decided = match current.decide(command, &ctx) {
                Ok(decided) => decided,
                Err(e) => {
                    outcomes.push(Err(e));
                    continue;
                }
            };
            let new = encode(&decided, &options, now_ms);
            let size: usize = new.iter().map(NewEvent::size).sum();
            if !outcomes.is_empty()
                && (events.len() + decided.len() > limits.max_tx_events
                    || bytes + size > limits.max_tx_bytes)
            {
                break;
            }
            bytes += size;
            encoded.extend(new);
            if !decided.is_empty() {
                // The commands after see this one's effect.
                let state = state.get_or_insert_with(|| known.state.clone());
                for e in &decided {
                    state.evolve(e);
                }
            }
            outcomes.push(Ok(decided.len()));
            events.extend(decided);
        }
        let taken = outcomes.len();
        if events.is_empty() {
            return Ok(Some(AppendedAll {
                taken,
                version,
                append: None,
                events,
                outcomes,
            }));
        }
        let (result, bytes) = match self
            .append_encoded(stream, version, encoded, &options)
            .await?
        {
            Ok(r) => r,
            Err(_conflict) => return Ok(None),
        };
        let new_version = new_version_of(&result, stream, version, events.len());
        if self.snapshot_due(stream, version, new_version, bytes) {
            if let Some(state) = &state {
                self.snapshot_after_command(stream, state, new_version)
                    .await;
            }
        }
        Ok(Some(AppendedAll {
            taken,
            version: new_version,
            append: Some(result),
            events,
            outcomes,
        }))
    }

    /// One attempt on a borrowed state; `None` on a concurrency conflict.
    async fn attempt_known(
        &self,
        stream: &StreamId,
        known: Known<'_, A>,
        command: &A::Command,
        options: &CommandOptions,
    ) -> Result<Option<Appended<A::Event>>, RepositoryError<A::Error>> {
        let version = known.version;
        let now_ms = self.clock.now_ms();
        let ctx = DecideCtx {
            stream: stream.clone(),
            version,
            now_ms,
        };
        let events = known
            .state
            .decide(command, &ctx)
            .map_err(RepositoryError::Domain)?;
        if events.is_empty() {
            return Ok(Some(Appended {
                version,
                append: None,
                events,
                attempts: 1,
            }));
        }
        let (result, bytes) = match self
            .append_events(stream, version, &events, options, now_ms)
            .await?
        {
            Ok(r) => r,
            Err(_conflict) => return Ok(None),
        };
        let new_version = new_version_of(&result, stream, version, events.len());
        if self.snapshot_due(stream, version, new_version, bytes) {
            // Rare (once every `snapshot_every` events): the borrowed state
            // is not this command's result, so load it (from the last
            // snapshot) and save it. As after `execute`, a failed snapshot
            // does not fail the command.
            if let Err(e) = self.save_snapshot(stream).await {
                tracing::warn!(%stream, error = %e, "snapshot save failed; the command succeeded");
            }
        }
        Ok(Some(Appended {
            version: new_version,
            append: Some(result),
            events,
            attempts: 1,
        }))
    }

    /// Appends `events` at `Exact(version)`; `Err(actual)` inside when the
    /// stream is at another version.
    async fn append_events(
        &self,
        stream: &StreamId,
        version: u64,
        events: &[A::Event],
        options: &CommandOptions,
        now_ms: u64,
    ) -> Result<Result<(AppendResult, u64), u64>, RepositoryError<A::Error>> {
        self.append_encoded(stream, version, encode(events, options, now_ms), options)
            .await
    }

    /// [`append_events`](Self::append_events) of events already encoded.
    async fn append_encoded(
        &self,
        stream: &StreamId,
        version: u64,
        new_events: Vec<NewEvent>,
        options: &CommandOptions,
    ) -> Result<Result<(AppendResult, u64), u64>, RepositoryError<A::Error>> {
        let bytes = new_events.iter().map(|e| e.payload.len() as u64).sum();
        let mut tx = AppendTx::single(stream.clone(), ExpectedVersion::Exact(version), new_events);
        if let Some(key) = &options.idempotency_key {
            tx = tx.with_idempotency_key(key);
        }
        match self.log.append(tx).await {
            Ok(r) => Ok(Ok((r, bytes))),
            Err(AppendError::WrongExpectedVersion {
                stream: s, actual, ..
            }) if &s == stream => Ok(Err(actual)),
            Err(AppendError::IdempotencyKeyReused { key }) => {
                Err(RepositoryError::IdempotencyKeyReused {
                    stream: stream.clone(),
                    key,
                })
            }
            Err(e) => Err(RepositoryError::Append(e)),
        }
    }

    /// Counts `bytes` appended to `stream` and says whether a snapshot is
    /// due (see [`CHEAP_SNAPSHOT_BYTES`]).
    fn snapshot_due(&self, stream: &StreamId, version: u64, new_version: u64, bytes: u64) -> bool {
        let every = self.config.snapshot_every;
        if every == 0 || self.snapshots.is_none() {
            return false;
        }
        self.with_pace(stream, |p| {
            p.since_bytes = p.since_bytes.saturating_add(bytes);
            version / every != new_version / every
                && (p.last_bytes <= CHEAP_SNAPSHOT_BYTES || p.since_bytes >= p.last_bytes)
        })
    }

    /// Remembers that a snapshot of `bytes` was just saved for `stream`.
    fn snapshot_saved(&self, stream: &StreamId, bytes: u64) {
        self.with_pace(stream, |p| {
            *p = Pace {
                last_bytes: bytes,
                since_bytes: 0,
            }
        });
    }

    /// Runs `f` on `stream`'s pace (a new one if unknown; all are
    /// forgotten when [`MAX_PACED_STREAMS`] are known and this is another).
    fn with_pace<R>(&self, stream: &StreamId, f: impl FnOnce(&mut Pace) -> R) -> R {
        let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        if pace.len() >= MAX_PACED_STREAMS && !pace.contains_key(stream) {
            pace.clear();
        }
        f(pace.entry(stream.clone()).or_default())
    }

    async fn attempt(
        &self,
        stream: &StreamId,
        command: &A::Command,
        options: &CommandOptions,
        use_snapshot: bool,
        attempts: u32,
    ) -> Result<Attempt<A>, RepositoryError<A::Error>> {
        self.attempt_with(stream, command, options, use_snapshot, attempts)
            .await
    }

    async fn attempt_with(
        &self,
        stream: &StreamId,
        command: &A::Command,
        options: &CommandOptions,
        use_snapshot: bool,
        attempts: u32,
    ) -> Result<Attempt<A>, RepositoryError<A::Error>> {
        let Loaded { mut state, version } = self.load_inner(stream, use_snapshot).await?;
        let now_ms = self.clock.now_ms();
        let ctx = DecideCtx {
            stream: stream.clone(),
            version,
            now_ms,
        };
        let events = state
            .decide(command, &ctx)
            .map_err(RepositoryError::Domain)?;
        if events.is_empty() {
            return Ok(Attempt::Done(Executed {
                version,
                append: None,
                events,
                state,
                attempts,
            }));
        }
        let (result, bytes) = match self
            .append_events(stream, version, &events, options, now_ms)
            .await?
        {
            Ok(r) => r,
            Err(actual) => {
                return Ok(Attempt::Conflict {
                    actual,
                    loaded: version,
                })
            }
        };
        for e in &events {
            state.evolve(e);
        }
        let new_version = new_version_of(&result, stream, version, events.len());
        if self.snapshot_due(stream, version, new_version, bytes) {
            self.snapshot_after_command(stream, &state, new_version)
                .await;
        }
        Ok(Attempt::Done(Executed {
            version: new_version,
            append: Some(result),
            events,
            state,
            attempts,
        }))
    }

    async fn snapshot_after_command(&self, stream: &StreamId, state: &A, version: u64) {
        let Some(store) = &self.snapshots else {
            return;
        };
        let Some(bytes) = state.encode_snapshot() else {
            return;
        };
        let size = bytes.len() as u64;
        let snapshot = Snapshot {
            stream: stream.clone(),
            version,
            schema: A::SNAPSHOT_SCHEMA,
            state: bytes,
        };
        match store.save(snapshot).await {
            Ok(()) => self.snapshot_saved(stream, size),
            Err(e) => {
                tracing::warn!(%stream, version, error = %e, "snapshot save failed; the command succeeded")
            }
        }
    }

    /// Loads the aggregate of `stream` and saves a snapshot of it now,
    /// whatever [`RepositoryConfig::snapshot_every`] says. Returns the
    /// version snapshotted, or `None` when there is no snapshot store, the
    /// stream is empty or the aggregate does not snapshot.
    pub async fn save_snapshot(
        &self,
        stream: &StreamId,
    ) -> Result<Option<u64>, RepositoryError<A::Error>> {
        let Some(store) = &self.snapshots else {
            return Ok(None);
        };
        let loaded = self.load(stream).await?;
        if loaded.version == 0 {
            return Ok(None);
        }
        let Some(bytes) = loaded.state.encode_snapshot() else {
            return Ok(None);
        };
        let size = bytes.len() as u64;
        store
            .save(Snapshot {
                stream: stream.clone(),
                version: loaded.version,
                schema: A::SNAPSHOT_SCHEMA,
                state: bytes,
            })
            .await
            .map_err(RepositoryError::Snapshot)?;
        self.snapshot_saved(stream, size);
        Ok(Some(loaded.version))
    }
}

/// A small aggregate for the engine's own tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::collections::BTreeSet;

    use bytes::Bytes;
    use serde::{Deserialize, Serialize};

    use crate::aggregate::{Aggregate, DecideCtx, DecodeError, EventCodec};

    /// A bank account.
    #[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Account {
        pub owner: Option<String>,
        pub balance: u64,
        /// Deposit ids seen (deposits are idempotent by id).
        pub deposits: BTreeSet<String>,
        pub opened_at: u64,
    }

    #[derive(Debug, Clone)]
    pub enum AccountCommand {
        Open {
            owner: String,
        },
        Deposit {
            id: String,
            amount: u64,
        },
        Withdraw {
            amount: u64,
        },
        /// Deposits every amount, one event each.
        DepositMany {
            ids_and_amounts: Vec<(String, u64)>,
        },
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum AccountEvent {
        Opened { owner: String, at: u64 },
        Deposited { id: String, amount: u64 },
        Withdrawn { amount: u64 },
    }

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum AccountError {
        #[error("account already open")]
        AlreadyOpen,
        #[error("account not open")]
        NotOpen,
        #[error("amount must be positive")]
        ZeroAmount,
        #[error("insufficient funds: balance {balance}, requested {requested}")]
        Insufficient { balance: u64, requested: u64 },
    }

    impl EventCodec for AccountEvent {
        fn kind(&self) -> &'static str {
            match self {
                AccountEvent::Opened { .. } => "Opened",
                AccountEvent::Deposited { .. } => "Deposited",
                AccountEvent::Withdrawn { .. } => "Withdrawn",
            }
        }

        fn schema(&self) -> u16 {
            match self {
                // Deposited went through two format changes (see the
                // upcaster tests).
                AccountEvent::Deposited { .. } => 3,
                _ => 1,
            }
        }

        fn encode(&self) -> Bytes {
            let v = match self {
                AccountEvent::Opened { owner, at } => serde_json::json!({"owner": owner, "at": at}),
                AccountEvent::Deposited { id, amount } => {
                    serde_json::json!({"id": id, "amount": amount})
                }
                AccountEvent::Withdrawn { amount } => serde_json::json!({"amount": amount}),
            };
            Bytes::from(v.to_string())
        }

        fn decode(kind: &str, schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
            #[derive(Deserialize)]
            struct Opened {
                owner: String,
                at: u64,
            }
            #[derive(Deserialize)]
            struct Deposited {
                id: String,
                amount: u64,
            }
            #[derive(Deserialize)]
            struct Withdrawn {
                amount: u64,
            }
            let want = match kind {
                "Opened" | "Withdrawn" => 1,
                "Deposited" => 3,
                _ => {
                    return Err(DecodeError::UnknownKind {
                        kind: kind.to_owned(),
                    })
                }
            };
            if schema != want {
                return Err(DecodeError::UnknownSchema {
                    kind: kind.to_owned(),
                    schema,
                });
            }
            let bad = |e: serde_json::Error| DecodeError::BadPayload {
                kind: kind.to_owned(),
                schema,
                reason: e.to_string(),
            };
            Ok(match kind {
                "Opened" => {
                    let o: Opened = serde_json::from_slice(payload).map_err(bad)?;
                    AccountEvent::Opened {
                        owner: o.owner,
                        at: o.at,
                    }
                }
                "Deposited" => {
                    let d: Deposited = serde_json::from_slice(payload).map_err(bad)?;
                    AccountEvent::Deposited {
                        id: d.id,
                        amount: d.amount,
                    }
                }
                _ => {
                    let w: Withdrawn = serde_json::from_slice(payload).map_err(bad)?;
                    AccountEvent::Withdrawn { amount: w.amount }
                }
            })
        }
    }

    impl Aggregate for Account {
        type Command = AccountCommand;
        type Event = AccountEvent;
        type Error = AccountError;

        fn decide(
            &self,
            command: &AccountCommand,
            ctx: &DecideCtx,
        ) -> Result<Vec<AccountEvent>, AccountError> {
            let open = self.owner.is_some();
            match command {
                AccountCommand::Open { owner } => {
                    if open {
                        return Err(AccountError::AlreadyOpen);
                    }
                    Ok(vec![AccountEvent::Opened {
                        owner: owner.clone(),
                        at: ctx.now_ms,
                    }])
                }
                AccountCommand::Deposit { id, amount } => {
                    if !open {
                        return Err(AccountError::NotOpen);
                    }
                    if *amount == 0 {
                        return Err(AccountError::ZeroAmount);
                    }
                    if self.deposits.contains(id) {
                        return Ok(vec![]);
                    }
                    Ok(vec![AccountEvent::Deposited {
                        id: id.clone(),
                        amount: *amount,
                    }])
                }
                AccountCommand::Withdraw { amount } => {
                    if !open {
                        return Err(AccountError::NotOpen);
                    }
                    if *amount == 0 {
                        return Err(AccountError::ZeroAmount);
                    }
                    if *amount > self.balance {
                        return Err(AccountError::Insufficient {
                            balance: self.balance,
                            requested: *amount,
                        });
                    }
                    Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
                }
                AccountCommand::DepositMany { ids_and_amounts } => {
                    if !open {
                        return Err(AccountError::NotOpen);
                    }
                    Ok(ids_and_amounts
                        .iter()
                        .filter(|(id, _)| !self.deposits.contains(id))
                        .map(|(id, amount)| AccountEvent::Deposited {
                            id: id.clone(),
                            amount: *amount,
                        })
                        .collect())
                }
            }
        }

        fn evolve(&mut self, event: &AccountEvent) {
            match event {
                AccountEvent::Opened { owner, at } => {
                    self.owner = Some(owner.clone());
                    self.opened_at = *at;
                }
                AccountEvent::Deposited { id, amount } => {
                    self.deposits.insert(id.clone());
                    self.balance += amount;
                }
                AccountEvent::Withdrawn { amount } => self.balance -= amount,
            }
        }

        const SNAPSHOT_SCHEMA: u16 = 1;

        fn encode_snapshot(&self) -> Option<Bytes> {
            serde_json::to_vec(self).ok().map(Bytes::from)
        }

        fn decode_snapshot(state: &[u8]) -> Option<Self> {
            serde_json::from_slice(state).ok()
        }
    }

    pub fn deposit(id: &str, amount: u64) -> AccountCommand {
        AccountCommand::Deposit {
            id: id.to_owned(),
            amount,
        }
    }

    pub fn open(owner: &str) -> AccountCommand {
        AccountCommand::Open {
            owner: owner.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::fixtures::*;
    use super::*;
    use crate::clock::ManualClock;
    use crate::error::BackendError;
    use crate::log::HeadWatch;
    use crate::memory::{InMemoryLog, InMemorySnapshots};

    fn sid(s: &str) -> StreamId {
        StreamId::new(s).unwrap()
    }

    /// Wraps a log: counts `read_stream` calls and events returned, and can
    /// hold the first `gate` appends at a barrier so that concurrent
    /// commands all load before any of them appends.
    struct SpyLog {
        inner: InMemoryLog,
        read_calls: AtomicUsize,
        events_read: AtomicUsize,
        appends: AtomicUsize,
        gate: Option<(usize, tokio::sync::Barrier)>,
    }

    impl SpyLog {
        fn new() -> Self {
            Self {
                inner: InMemoryLog::new(),
                read_calls: AtomicUsize::new(0),
                events_read: AtomicUsize::new(0),
                appends: AtomicUsize::new(0),
                gate: None,
            }
        }

        fn gated(n: usize) -> Self {
            Self {
                gate: Some((n, tokio::sync::Barrier::new(n))),
                ..Self::new()
            }
        }

        fn reset(&self) {
            self.read_calls.store(0, Ordering::SeqCst);
            self.events_read.store(0, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl EventLog for SpyLog {
        async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError> {
            let n = self.appends.fetch_add(1, Ordering::SeqCst);
            if let Some((count, barrier)) = &self.gate {
                if n < *count {
                    barrier.wait().await;
                }
            }
            self.inner.append(tx).await
        }

        async fn read_stream(
            &self,
            stream: &StreamId,
            from_version: u64,
            max: usize,
        ) -> Result<Vec<RecordedEvent>, ReadError> {
            self.read_calls.fetch_add(1, Ordering::SeqCst);
            let events = self.inner.read_stream(stream, from_version, max).await?;
            self.events_read.fetch_add(events.len(), Ordering::SeqCst);
            Ok(events)
        }

        async fn read_all(
            &self,
            from_position: u64,
            max: usize,
        ) -> Result<Vec<RecordedEvent>, ReadError> {
            self.inner.read_all(from_position, max).await
        }

        async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
            self.inner.stream_version(stream).await
        }

        async fn head(&self) -> Result<u64, ReadError> {
            self.inner.head().await
        }

        fn watch_head(&self) -> HeadWatch {
            self.inner.watch_head()
        }

        fn limits(&self) -> Limits {
            self.inner.limits()
        }
    }

    /// A snapshot store whose every operation fails.
    struct BrokenSnapshots;

    #[derive(Debug, thiserror::Error)]
    #[error("disk on fire")]
    struct Fire;

    #[async_trait]
    impl SnapshotStore for BrokenSnapshots {
        async fn save(&self, _: Snapshot) -> Result<(), SnapshotError> {
            Err(SnapshotError::Backend(BackendError::new(Fire)))
        }
        async fn load(&self, _: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
            Err(SnapshotError::Backend(BackendError::new(Fire)))
        }
        async fn delete(&self, _: &StreamId) -> Result<(), SnapshotError> {
            Err(SnapshotError::Backend(BackendError::new(Fire)))
        }
    }

    fn repo(log: Arc<dyn EventLog>) -> Repository<Account> {
        Repository::new(log, Arc::new(ManualClock::new(1_000)))
    }

    fn cfg(snapshot_every: u64, max_conflict_retries: u32, read_batch: usize) -> RepositoryConfig {
        RepositoryConfig {
            snapshot_every,
            max_conflict_retries,
            read_batch,
        }
    }

    #[tokio::test]
    async fn load_of_a_new_stream_is_default_at_version_zero() {
        let r = repo(Arc::new(InMemoryLog::new()));
        let l = r.load(&sid("acc-1")).await.unwrap();
        assert_eq!(l.version, 0);
        assert_eq!(l.state, Account::default());
    }

    #[tokio::test]
    async fn execute_appends_and_load_replays() {
        let log = Arc::new(InMemoryLog::new());
        let clock = ManualClock::new(5_000);
        let r: Repository<Account> = Repository::new(log.clone(), Arc::new(clock.clone()));
        let s = sid("acc-1");
        let opts = CommandOptions::default().with_metadata(Metadata::correlated("req-1"));
        let ex = r.execute(&s, &open("ann"), opts).await.unwrap();
        assert_eq!(ex.version, 1);
        assert_eq!(ex.attempts, 1);
        assert_eq!(
            ex.events,
            vec![AccountEvent::Opened {
                owner: "ann".into(),
                at: 5_000
            }]
        );
        assert_eq!(ex.append.as_ref().unwrap().first_position, 0);
        clock.advance(10);
        let ex = r
            .execute(&s, &deposit("d1", 30), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(ex.version, 2);
        assert_eq!(ex.state.balance, 30);

        let recorded = log.read_stream(&s, 1, 10).await.unwrap();
        assert_eq!(recorded.len(), 2);
        assert_eq!(recorded[0].timestamp_ms, 5_000);
        assert_eq!(recorded[0].metadata, Metadata::correlated("req-1"));
        assert_eq!(recorded[1].timestamp_ms, 5_010);
        assert_eq!(
            (recorded[1].kind.as_str(), recorded[1].schema),
            ("Deposited", 3)
        );

        let l = r.load(&s).await.unwrap();
        assert_eq!(l.version, 2);
        assert_eq!(l.state, ex.state);
        assert_eq!(l.state.opened_at, 5_000);
    }

    #[tokio::test]
    async fn execute_all_from_decides_in_order_and_appends_once() {
        let log = Arc::new(SpyLog::new());
        let r = repo(log.clone());
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        let loaded = r.load(&s).await.unwrap();
        let appends = log.appends.load(Ordering::SeqCst);
        let commands = [
            deposit("d1", 30),
            // Refused: only the deposit before it makes the balance.
            AccountCommand::Withdraw { amount: 50 },
            AccountCommand::Withdraw { amount: 20 },
            // Already counted by the first: no events.
            deposit("d1", 30),
            deposit("d2", 5),
        ];
        let known = Known {
            state: &loaded.state,
            version: loaded.version,
        };
        let done = r
            .execute_all_from(&s, known, &commands, CommandOptions::default())
            .await
            .unwrap()
            .expect("no other writer");
        assert_eq!(log.appends.load(Ordering::SeqCst), appends + 1);
        assert_eq!(done.taken, 5);
        assert_eq!(done.version, 4);
        assert_eq!(done.events.len(), 3);
        let counts: Vec<Option<usize>> = done
            .outcomes
            .iter()
            .map(|o| o.as_ref().ok().copied())
            .collect();
        assert_eq!(counts, [Some(1), None, Some(1), Some(0), Some(1)]);
        assert!(matches!(
            done.outcomes[1],
            Err(AccountError::Insufficient {
                balance: 30,
                requested: 50
            })
        ));
        // The caller's state was not touched; the log has the result.
        assert_eq!(loaded.state.balance, 0);
        let after = r.load(&s).await.unwrap();
        assert_eq!((after.version, after.state.balance), (4, 15));
    }

    #[tokio::test]
    async fn execute_all_from_on_a_stale_state_appends_nothing() {
        let log = Arc::new(InMemoryLog::new());
        let r = repo(log.clone());
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        let stale = r.load(&s).await.unwrap();
        r.execute(&s, &deposit("d1", 1), CommandOptions::default())
            .await
            .unwrap();
        let known = Known {
            state: &stale.state,
            version: stale.version,
        };
        let done = r
            .execute_all_from(
                &s,
                known,
                &[deposit("d2", 1), deposit("d3", 1)],
                CommandOptions::default(),
            )
            .await
            .unwrap();
        assert!(done.is_none());
        assert_eq!(log.stream_version(&s).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn execute_all_from_takes_what_fits_one_transaction() {
        let limits = Limits {
            max_tx_events: 2,
            ..Limits::default()
        };
        let log = Arc::new(InMemoryLog::with_limits(limits));
        let r = repo(log.clone());
        let s = sid("acc-1");
        let commands = [open("ann"), deposit("d1", 1), deposit("d2", 1)];
        let empty = Account::default();
        let done = r
            .execute_all_from(
                &s,
                Known {
                    state: &empty,
                    version: 0,
                },
                &commands,
                CommandOptions::default(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!((done.taken, done.version, done.events.len()), (2, 2, 2));
        // Nothing taken produces nothing appended.
        let loaded = r.load(&s).await.unwrap();
        let done = r
            .execute_all_from(
                &s,
                Known {
                    state: &loaded.state,
                    version: loaded.version,
                },
                &[deposit("d1", 1)],
                CommandOptions::default(),
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!((done.taken, done.version), (1, 2));
        assert!(done.append.is_none());
    }

    #[tokio::test]
    async fn domain_errors_append_nothing() {
        let log = Arc::new(InMemoryLog::new());
        let r = repo(log.clone());
        let s = sid("acc-1");
        let err = r
            .execute(&s, &deposit("d1", 5), CommandOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            RepositoryError::Domain(AccountError::NotOpen)
        ));
        assert_eq!(err.to_string(), "account not open");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        let err = r
            .execute(
                &s,
                &AccountCommand::Withdraw { amount: 1 },
                CommandOptions::default(),
            )
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            RepositoryError::Domain(AccountError::Insufficient {
                balance: 0,
                requested: 1
            })
        ));
        assert_eq!(log.head().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn no_events_means_no_append() {
        let log = Arc::new(InMemoryLog::new());
        let r = repo(log.clone());
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        r.execute(&s, &deposit("d1", 5), CommandOptions::default())
            .await
            .unwrap();
        // The same deposit id again: the aggregate is idempotent by id.
        let ex = r
            .execute(&s, &deposit("d1", 5), CommandOptions::default())
            .await
            .unwrap();
        assert!(ex.events.is_empty());
        assert!(ex.append.is_none());
        assert_eq!(ex.version, 2);
        assert_eq!(ex.state.balance, 5);
        assert_eq!(log.head().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn idempotency_key_reuse_is_a_clear_error() {
        let log = Arc::new(InMemoryLog::new());
        let r = repo(log.clone());
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        r.execute(
            &s,
            &deposit("d1", 50),
            CommandOptions::default().with_idempotency_key("k-1"),
        )
        .await
        .unwrap();
        // A non-idempotent command executed twice with the same key: the
        // second is a different transaction (newer version), refused.
        let withdraw = AccountCommand::Withdraw { amount: 10 };
        let key = CommandOptions::default().with_idempotency_key("k-2");
        r.execute(&s, &withdraw, key.clone()).await.unwrap();
        let err = r.execute(&s, &withdraw, key).await.unwrap_err();
        match &err {
            RepositoryError::IdempotencyKeyReused { stream, key } => {
                assert_eq!(stream, &s);
                assert_eq!(key.as_str(), "k-2");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("already committed"), "{err}");
        // An idempotent command (deposit by id) executed again with its key
        // decides nothing, so nothing is appended and it succeeds.
        let ex = r
            .execute(
                &s,
                &deposit("d1", 50),
                CommandOptions::default().with_idempotency_key("k-1"),
            )
            .await
            .unwrap();
        assert!(ex.events.is_empty());
        assert_eq!(ex.state.balance, 40);
        assert_eq!(log.head().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn load_reads_in_batches_of_read_batch() {
        let log = Arc::new(SpyLog::new());
        let r = repo(log.clone()).with_config(cfg(0, 0, 2)).unwrap();
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        for i in 0..4 {
            r.execute(&s, &deposit(&format!("d{i}"), 1), CommandOptions::default())
                .await
                .unwrap();
        }
        log.reset();
        let l = r.load(&s).await.unwrap();
        assert_eq!((l.version, l.state.balance), (5, 4));
        // 2 + 2 + 1, then an empty read that ends the stream.
        assert_eq!(log.read_calls.load(Ordering::SeqCst), 4);
        assert_eq!(log.events_read.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn config_is_checked_against_the_log_limits() {
        let r = repo(Arc::new(InMemoryLog::new()));
        let max = Limits::default().max_read_events;
        assert_eq!(
            r.clone().with_config(cfg(0, 0, 0)).unwrap_err(),
            ConfigError::ReadBatch { read_batch: 0, max }
        );
        assert!(r.clone().with_config(cfg(0, 0, max + 1)).is_err());
        assert_eq!(
            r.with_config(cfg(7, 1, max))
                .unwrap()
                .config()
                .snapshot_every,
            7
        );
    }

    #[tokio::test]
    async fn large_snapshots_wait_for_their_weight_in_events() {
        let log = Arc::new(SpyLog::new());
        let snaps = Arc::new(InMemorySnapshots::new());
        let r = repo(log.clone())
            .with_snapshots(snaps.clone())
            .with_config(cfg(2, 0, 100))
            .unwrap();
        let s = sid("acc-big");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        let long = |tag: &str, n: usize| AccountCommand::DepositMany {
            ids_and_amounts: (0..n).map(|i| (format!("{tag}-{i:0>100}"), 1)).collect(),
        };
        let ex = r
            .execute(&s, &long("a", 1_000), CommandOptions::default())
            .await
            .unwrap();
        let snap = snaps.load(&s).await.unwrap().unwrap();
        assert_eq!(snap.version, ex.version);
        let big = snap.state.len() as u64;
        assert!(big > CHEAP_SNAPSHOT_BYTES, "a large snapshot: {big} bytes");
        // Small commands cross multiples of 2 but weigh far less than it.
        for i in 0..10 {
            r.execute(&s, &deposit(&format!("s{i}"), 1), CommandOptions::default())
                .await
                .unwrap();
        }
        assert_eq!(snaps.load(&s).await.unwrap().unwrap().version, ex.version);
        // Events as heavy as the snapshot: the next crossing saves one.
        let ex = r
            .execute(&s, &long("b", 1_100), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(snaps.load(&s).await.unwrap().unwrap().version, ex.version);
        let l = r.load(&s).await.unwrap();
        assert_eq!(l.state, ex.state);
    }

    #[tokio::test]
    async fn snapshots_every_n_and_load_uses_them() {
        let log = Arc::new(SpyLog::new());
        let snaps = Arc::new(InMemorySnapshots::new());
        let r = repo(log.clone())
            .with_snapshots(snaps.clone())
            .with_config(cfg(3, 0, 100))
            .unwrap();
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        r.execute(&s, &deposit("d1", 1), CommandOptions::default())
            .await
            .unwrap();
        assert!(snaps.load(&s).await.unwrap().is_none(), "version 2 < 3");
        r.execute(&s, &deposit("d2", 1), CommandOptions::default())
            .await
            .unwrap();
        let snap = snaps.load(&s).await.unwrap().unwrap();
        assert_eq!((snap.version, snap.schema), (3, Account::SNAPSHOT_SCHEMA));
        // A command of two events from version 5 to 7 crosses 6.
        r.execute(&s, &deposit("d3", 1), CommandOptions::default())
            .await
            .unwrap();
        r.execute(&s, &deposit("d4", 1), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(snaps.load(&s).await.unwrap().unwrap().version, 3);
        let many = AccountCommand::DepositMany {
            ids_and_amounts: vec![("d5".into(), 1), ("d6".into(), 1)],
        };
        let ex = r
            .execute(&s, &many, CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(ex.version, 7);
        let snap = snaps.load(&s).await.unwrap().unwrap();
        assert_eq!(snap.version, 7);
        assert_eq!(
            Account::decode_snapshot(&snap.state).unwrap(),
            ex.state,
            "the snapshot holds the state after the command"
        );

        r.execute(&s, &deposit("d7", 1), CommandOptions::default())
            .await
            .unwrap();
        log.reset();
        let l = r.load(&s).await.unwrap();
        assert_eq!((l.version, l.state.balance), (8, 7));
        assert_eq!(log.events_read.load(Ordering::SeqCst), 1, "only the tail");

        // Without the snapshot store, the same state from a full replay.
        log.reset();
        let full = repo(log.clone()).load(&s).await.unwrap();
        assert_eq!(full.state, l.state);
        assert_eq!(log.events_read.load(Ordering::SeqCst), 8);
    }

    #[tokio::test]
    async fn unusable_snapshots_are_ignored() {
        let log = Arc::new(SpyLog::new());
        let snaps = Arc::new(InMemorySnapshots::new());
        let r = repo(log.clone()).with_snapshots(snaps.clone());
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        r.execute(&s, &deposit("d1", 9), CommandOptions::default())
            .await
            .unwrap();
        let bogus = Account {
            balance: 1_000_000,
            ..Account::default()
        };
        // Another schema: ignored.
        snaps
            .save(Snapshot {
                stream: s.clone(),
                version: 1,
                schema: Account::SNAPSHOT_SCHEMA + 1,
                state: Bytes::from(serde_json::to_vec(&bogus).unwrap()),
            })
            .await
            .unwrap();
        assert_eq!(r.load(&s).await.unwrap().state.balance, 9);
        // Does not decode: ignored.
        snaps
            .save(Snapshot {
                stream: s.clone(),
                version: 1,
                schema: Account::SNAPSHOT_SCHEMA,
                state: Bytes::from_static(b"not json"),
            })
            .await
            .unwrap();
        assert_eq!(r.load(&s).await.unwrap().state.balance, 9);
        // The snapshot store is down: replay, and commands still succeed.
        let broken = repo(log.clone())
            .with_snapshots(Arc::new(BrokenSnapshots))
            .with_config(cfg(1, 0, 100))
            .unwrap();
        assert_eq!(broken.load(&s).await.unwrap().state.balance, 9);
        let ex = broken
            .execute(&s, &deposit("d2", 1), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!((ex.version, ex.state.balance), (3, 10));
        assert!(matches!(
            broken.save_snapshot(&s).await,
            Err(RepositoryError::Snapshot(SnapshotError::Backend(_)))
        ));
    }

    #[tokio::test]
    async fn save_snapshot_on_demand() {
        let log = Arc::new(SpyLog::new());
        let snaps = Arc::new(InMemorySnapshots::new());
        let r = repo(log.clone()).with_snapshots(snaps.clone());
        let s = sid("acc-1");
        assert_eq!(r.save_snapshot(&s).await.unwrap(), None);
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        r.execute(&s, &deposit("d1", 4), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(r.save_snapshot(&s).await.unwrap(), Some(2));
        log.reset();
        assert_eq!(r.load(&s).await.unwrap().state.balance, 4);
        assert_eq!(log.events_read.load(Ordering::SeqCst), 0);
        assert_eq!(repo(log.clone()).save_snapshot(&s).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_snapshot_ahead_of_the_log_is_ignored_on_conflict() {
        let log = Arc::new(InMemoryLog::new());
        let snaps = Arc::new(InMemorySnapshots::new());
        let r = repo(log.clone())
            .with_snapshots(snaps.clone())
            .with_config(cfg(0, 0, 100))
            .unwrap();
        let s = sid("acc-1");
        r.execute(&s, &open("ann"), CommandOptions::default())
            .await
            .unwrap();
        // A snapshot from a future the log does not have.
        let ahead = Account {
            owner: Some("ann".into()),
            balance: 500,
            ..Account::default()
        };
        snaps
            .save(Snapshot {
                stream: s.clone(),
                version: 10,
                schema: Account::SNAPSHOT_SCHEMA,
                state: ahead.encode_snapshot().unwrap(),
            })
            .await
            .unwrap();
        let ex = r
            .execute(&s, &deposit("d1", 5), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!(ex.attempts, 2);
        assert_eq!((ex.version, ex.state.balance), (2, 5));
    }

    #[tokio::test]
    async fn upcaster_chain_v1_to_v3_is_applied_on_load() {
        let log = Arc::new(InMemoryLog::new());
        let s = sid("acc-1");
        // History written by older code: `Credited {cents}` (v1) later became
        // `Deposited {amount}` (v2), then got an id (v3).
        let old = vec![
            NewEvent::new("Opened", 1, 1, r#"{"owner":"ann","at":1}"#),
            NewEvent::new("Credited", 1, 2, r#"{"cents":70}"#),
            NewEvent::new("Deposited", 2, 3, r#"{"amount":5}"#),
        ];
        log.append(AppendTx::single(s.clone(), ExpectedVersion::NoStream, old))
            .await
            .unwrap();

        // Without upcasters the old schemas do not decode.
        let err = repo(log.clone()).load(&s).await.unwrap_err();
        assert!(
            matches!(
                &err,
                RepositoryError::Decode {
                    position: 1,
                    source: DecodeError::UnknownKind { .. }
                }
            ),
            "{err:?}"
        );

        let json = |e: &RecordedEvent| -> Result<serde_json::Value, DecodeError> {
            serde_json::from_slice(&e.payload).map_err(|err| DecodeError::BadPayload {
                kind: e.kind.clone(),
                schema: e.schema,
                reason: err.to_string(),
            })
        };
        let ups = Upcasters::new()
            .with("Credited", 1, move |mut e: RecordedEvent| {
                let v = json(&e)?;
                e.kind = "Deposited".into();
                e.schema = 2;
                e.payload = Bytes::from(serde_json::json!({"amount": v["cents"]}).to_string());
                Ok(e)
            })
            .with("Deposited", 2, move |mut e: RecordedEvent| {
                let v = json(&e)?;
                // v2 had no id: name legacy deposits after their position.
                let id = format!("legacy-{}", e.position);
                e.schema = 3;
                e.payload =
                    Bytes::from(serde_json::json!({"id": id, "amount": v["amount"]}).to_string());
                Ok(e)
            });
        let r = repo(log.clone()).with_upcasters(ups);
        let l = r.load(&s).await.unwrap();
        assert_eq!(l.version, 3);
        assert_eq!(l.state.balance, 75);
        assert_eq!(
            l.state.deposits.iter().collect::<Vec<_>>(),
            vec!["legacy-1", "legacy-2"]
        );
        // New events are written at the current schema next to the old ones.
        let ex = r
            .execute(&s, &deposit("d9", 1), CommandOptions::default())
            .await
            .unwrap();
        assert_eq!((ex.version, ex.state.balance), (4, 76));
    }

    #[tokio::test]
    async fn upcast_failures_name_the_position() {
        let log = Arc::new(InMemoryLog::new());
        let s = sid("acc-1");
        log.append(AppendTx::single(
            s.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new("Old", 1, 1, "x")],
        ))
        .await
        .unwrap();
        let ups = Upcasters::new().with("Old", 1, |e: RecordedEvent| {
            Err(DecodeError::BadPayload {
                kind: e.kind,
                schema: e.schema,
                reason: "garbage".into(),
            })
        });
        let err = repo(log).with_upcasters(ups).load(&s).await.unwrap_err();
        assert!(
            matches!(
                err,
                RepositoryError::Upcast {
                    position: 0,
                    source: UpcastError::Failed { .. }
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn append_errors_are_passed_through() {
        let log = Arc::new(InMemoryLog::new());
        let r = repo(log);
        let s = sid("acc-1");
        let long_key = "k".repeat(Limits::default().max_id_len + 1);
        let err = r
            .execute(
                &s,
                &open("ann"),
                CommandOptions::default().with_idempotency_key(long_key),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, RepositoryError::Append(AppendError::Limit(_))),
            "{err:?}"
        );
    }

    /// Runs two deposits on the same account at once, both loading version 1
    /// before either appends.
    async fn race(
        retries: u32,
    ) -> (
        Arc<SpyLog>,
        Vec<Result<Executed<Account>, RepositoryError<AccountError>>>,
    ) {
        let log = Arc::new(SpyLog::gated(2));
        let s = sid("acc-1");
        // Open outside the gate.
        log.inner
            .append(AppendTx::single(
                s.clone(),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Opened", 1, 0, r#"{"owner":"ann","at":0}"#)],
            ))
            .await
            .unwrap();
        let r = repo(log.clone()).with_config(cfg(0, retries, 100)).unwrap();
        let tasks: Vec<_> = [("a", 10), ("b", 20)]
            .into_iter()
            .map(|(id, amount)| {
                let r = r.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    r.execute(&s, &deposit(id, amount), CommandOptions::default())
                        .await
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        (log, results)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_executes_retry_and_both_apply() {
        let (log, results) = race(3).await;
        let mut attempts: Vec<u32> = results
            .iter()
            .map(|r| r.as_ref().unwrap().attempts)
            .collect();
        attempts.sort_unstable();
        assert_eq!(attempts, vec![1, 2], "exactly one won the first round");
        let l = repo(log.clone()).load(&sid("acc-1")).await.unwrap();
        assert_eq!((l.version, l.state.balance), (3, 30));
        let versions: Vec<u64> = results
            .iter()
            .map(|r| r.as_ref().unwrap().version)
            .collect();
        assert!(
            versions.contains(&2) && versions.contains(&3),
            "{versions:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_executes_without_retries_conflict() {
        let (log, results) = race(0).await;
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "exactly one wins");
        assert_eq!(ok[0].version, 2);
        let err = results.into_iter().find_map(Result::err).unwrap();
        match &err {
            RepositoryError::Conflict {
                stream,
                attempts,
                actual,
            } => {
                assert_eq!(stream.as_str(), "acc-1");
                assert_eq!(*attempts, 1);
                assert_eq!(*actual, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("conflict"), "{err}");
        assert_eq!(
            log.inner.head().await.unwrap(),
            2,
            "the loser wrote nothing"
        );
    }

    #[tokio::test]
    async fn repository_is_usable_through_dyn_traits_and_is_send() {
        fn assert_send<T: Send>(_: T) {}
        let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
        let r = repo(log);
        let s = sid("acc-1");
        assert_send(r.execute(&s, &open("x"), CommandOptions::default()));
        assert_send(r.load(&s));
        let dbg = format!("{r:?}");
        assert!(dbg.contains("Account"), "{dbg}");
    }
}
