//! Events as written ([`NewEvent`]) and as read back ([`RecordedEvent`]).

use bytes::Bytes;

use crate::stream_id::StreamId;

/// Correlation and causation ids carried with every event.
///
/// `correlation_id` ties together everything caused by one outside request;
/// `causation_id` names the command or event that directly caused this one.
/// Each is at most [`crate::Limits::max_id_len`] bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    /// Id shared by everything one outside request caused.
    pub correlation_id: Option<String>,
    /// Id of the command or event that caused this one.
    pub causation_id: Option<String>,
}

impl Metadata {
    /// Metadata with the given correlation id and no causation id.
    pub fn correlated(id: impl Into<String>) -> Self {
        Self {
            correlation_id: Some(id.into()),
            causation_id: None,
        }
    }
}

/// An event to append: what happened, not yet where it lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type, e.g. `CampaignCreated` (1 to
    /// [`crate::Limits::max_kind_len`] bytes).
    pub kind: String,
    /// The payload's schema version for this kind; upcasters raise old
    /// schemas on read.
    pub schema: u16,
    /// When it happened, in milliseconds since the Unix epoch, as the
    /// caller's [`crate::Clock`] says.
    pub timestamp_ms: u64,
    /// Correlation and causation ids.
    pub metadata: Metadata,
    /// The encoded body (at most [`crate::Limits::max_event_bytes`]).
    pub payload: Bytes,
}

impl NewEvent {
    /// An event with empty metadata.
    pub fn new(
        kind: impl Into<String>,
        schema: u16,
        timestamp_ms: u64,
        payload: impl Into<Bytes>,
    ) -> Self {
        Self {
            kind: kind.into(),
            schema,
            timestamp_ms,
            metadata: Metadata::default(),
            payload: payload.into(),
        }
    }

    /// Sets the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// The bytes this event counts against [`crate::Limits::max_event_bytes`]:
    /// payload, kind and metadata ids.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.kind.len()
            + self.metadata.correlation_id.as_ref().map_or(0, String::len)
            + self.metadata.causation_id.as_ref().map_or(0, String::len)
    }
}

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Global position: 0-based and gap-free on the embedded log.
    pub position: u64,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// 1-based version within its stream, gap-free.
    pub version: u64,
    /// The event type.
    pub kind: String,
    /// The payload's schema version.
    pub schema: u16,
    /// When it happened (milliseconds since the Unix epoch).
    pub timestamp_ms: u64,
    /// Correlation and causation ids.
    pub metadata: Metadata,
    /// The encoded body.
    pub payload: Bytes,
}

impl RecordedEvent {
    /// The event as it was appended, without its position and version.
    pub fn to_new_event(&self) -> NewEvent {
        NewEvent {
            kind: self.kind.clone(),
            schema: self.schema,
            timestamp_ms: self.timestamp_ms,
            metadata: self.metadata.clone(),
            payload: self.payload.clone(),
        }
    }
}
