//! Aggregates: pure `decide` / `evolve` over a stream's events.

use bytes::Bytes;

use crate::stream_id::StreamId;

/// Why an event payload could not be decoded (or upcast).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No decoder knows this kind.
    #[error("unknown event kind {kind:?}")]
    UnknownKind {
        /// The kind.
        kind: String,
    },
    /// The kind is known but not at this schema (and no upcaster raised it).
    #[error("event kind {kind:?} has unknown schema {schema}")]
    UnknownSchema {
        /// The kind.
        kind: String,
        /// The schema found.
        schema: u16,
    },
    /// The payload is malformed.
    #[error("event kind {kind:?} schema {schema}: bad payload: {reason}")]
    BadPayload {
        /// The kind.
        kind: String,
        /// The schema.
        schema: u16,
        /// What is wrong.
        reason: String,
    },
}

/// How an aggregate's events are written to and read from the log.
pub trait EventCodec: Sized {
    /// The event's kind, e.g. `CampaignCreated`.
    fn kind(&self) -> &'static str;
    /// The schema version this code writes for the event's kind.
    fn schema(&self) -> u16;
    /// The payload bytes.
    fn encode(&self) -> Bytes;
    /// Decodes a payload of the given kind at the current schema (upcasters
    /// have already raised older schemas).
    fn decode(kind: &str, schema: u16, payload: &[u8]) -> Result<Self, DecodeError>;
}

/// What `decide` may know besides the state and the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideCtx {
    /// The stream the aggregate lives in.
    pub stream: StreamId,
    /// The stream version the state reflects (0 for a new aggregate).
    pub version: u64,
    /// Now, from the repository's clock (ms since the Unix epoch).
    pub now_ms: u64,
}

/// A consistency boundary whose state is a left fold of its events.
///
/// Both functions are pure: no I/O, no clock, no global randomness. Whatever
/// a command decides with randomness must be passed in the command (a seed or
/// the draw itself) and written into the events, so replay never re-decides.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// What callers ask of it.
    type Command: Send + Sync;
    /// What it records.
    type Event: EventCodec + Send + Sync;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides what happens: the events a command produces, or why not.
    fn decide(
        &self,
        command: &Self::Command,
        ctx: &DecideCtx,
    ) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event to the state.
    fn evolve(&mut self, event: &Self::Event);

    /// The schema of [`Aggregate::encode_snapshot`]'s output.
    const SNAPSHOT_SCHEMA: u16 = 1;

    /// Encodes the state for a snapshot; `None` (the default) means this
    /// aggregate is never snapshotted.
    fn encode_snapshot(&self) -> Option<Bytes> {
        None
    }

    /// Decodes a snapshot written with [`Aggregate::SNAPSHOT_SCHEMA`];
    /// `None` makes the repository ignore it and replay the stream.
    fn decode_snapshot(_state: &[u8]) -> Option<Self> {
        None
    }
}
