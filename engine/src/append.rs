//! Append transactions: what a writer asks for and what it gets back.

use std::fmt;
use std::sync::Arc;

use crate::event::NewEvent;
use crate::stream_id::StreamId;

/// What the writer believes a stream's current version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream's current version must be exactly this (0 = no stream).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// A caller-chosen key that makes a transaction idempotent: a retried
/// transaction with the same key returns the original result and writes
/// nothing. At most [`crate::Limits::max_id_len`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Wraps a key.
    pub fn new(key: impl AsRef<str>) -> Self {
        Self(Arc::from(key.as_ref()))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Events for one stream inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAppend {
    /// The stream.
    pub stream: StreamId,
    /// The version the writer expects it to be at.
    pub expected: ExpectedVersion,
    /// The events, in order (at least one).
    pub events: Vec<NewEvent>,
}

/// An atomic append across one or more streams: either every event is
/// written, at consecutive positions, or none is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendTx {
    /// Per-stream appends; a stream may appear once.
    pub streams: Vec<StreamAppend>,
    /// Makes the transaction idempotent.
    pub idempotency_key: Option<IdempotencyKey>,
}

impl AppendTx {
    /// A transaction with one stream.
    pub fn single(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            streams: vec![StreamAppend {
                stream,
                expected,
                events,
            }],
            idempotency_key: None,
        }
    }

    /// Adds a stream.
    pub fn with_stream(
        mut self,
        stream: StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        self.streams.push(StreamAppend {
            stream,
            expected,
            events,
        });
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl AsRef<str>) -> Self {
        self.idempotency_key = Some(IdempotencyKey::new(key));
        self
    }

    /// Number of events in the transaction.
    pub fn event_count(&self) -> usize {
        self.streams.iter().map(|s| s.events.len()).sum()
    }

    /// A 64-bit fingerprint of the transaction's content (streams, expected
    /// versions, events), used to tell a genuine retry from a different
    /// transaction that reuses a key. Stable across runs and platforms.
    pub fn fingerprint(&self) -> u64 {
        // FNV-1a over a self-delimiting encoding: every variable field is
        // length-prefixed and every option tagged, so two different
        // transactions never feed the hash the same bytes.
        let mut h = crate::fnv::Fnv1a::new();
        let mut eat = |bytes: &[u8]| {
            h.write(bytes);
        };
        fn field(eat: &mut impl FnMut(&[u8]), bytes: &[u8]) {
            eat(&(bytes.len() as u64).to_le_bytes());
            eat(bytes);
        }
        fn opt(eat: &mut impl FnMut(&[u8]), s: Option<&str>) {
            match s {
                None => eat(&[0]),
                Some(s) => {
                    eat(&[1]);
                    field(eat, s.as_bytes());
                }
            }
        }
        eat(&(self.streams.len() as u64).to_le_bytes());
        for s in &self.streams {
            field(&mut eat, s.stream.as_str().as_bytes());
            match s.expected {
                ExpectedVersion::Any => eat(&[0]),
                ExpectedVersion::NoStream => eat(&[1]),
                ExpectedVersion::Exact(v) => {
                    eat(&[2]);
                    eat(&v.to_le_bytes());
                }
            }
            eat(&(s.events.len() as u64).to_le_bytes());
            for e in &s.events {
                field(&mut eat, e.kind.as_bytes());
                eat(&e.schema.to_le_bytes());
                eat(&e.timestamp_ms.to_le_bytes());
                opt(&mut eat, e.metadata.correlation_id.as_deref());
                opt(&mut eat, e.metadata.causation_id.as_deref());
                field(&mut eat, &e.payload);
            }
        }
        h.finish()
    }
}

/// Where a committed transaction landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendResult {
    /// Position of its first event.
    pub first_position: u64,
    /// The log's head after it: one past its last event.
    pub next_position: u64,
    /// Each stream's version after the transaction, in the order given.
    pub versions: Vec<(StreamId, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metadata;

    fn tx(events: Vec<NewEvent>) -> AppendTx {
        AppendTx::single(StreamId::new("s").unwrap(), ExpectedVersion::Any, events)
    }

    #[test]
    fn fingerprint_tells_apart_what_differs_only_in_framing() {
        let a = tx(vec![
            NewEvent::new("k", 1, 0, &b"ab"[..]),
            NewEvent::new("k", 1, 0, &b"c"[..]),
        ]);
        let b = tx(vec![
            NewEvent::new("k", 1, 0, &b"a"[..]),
            NewEvent::new("k", 1, 0, &b"bc"[..]),
        ]);
        assert_ne!(a.fingerprint(), b.fingerprint());
        let none = tx(vec![NewEvent::new("k", 1, 0, &b""[..])]);
        let nul = tx(vec![
            NewEvent::new("k", 1, 0, &b""[..]).with_metadata(Metadata::correlated("\u{0}"))
        ]);
        assert_ne!(none.fingerprint(), nul.fingerprint());
        assert_eq!(a.fingerprint(), a.fingerprint());
    }
}
