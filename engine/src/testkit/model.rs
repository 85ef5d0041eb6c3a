//! A reference model of an [`EventLog`](crate::EventLog): a plain vector of
//! events and a few maps, written for obviousness rather than speed.
//!
//! The conformance suite runs every operation against a backend and against
//! this model and compares the results. The model shares no code with
//! [`crate::index::LogIndex`] or [`Limits::check_tx`]: it restates the
//! documented rules on its own, so a bug in the shared index shows up as a
//! disagreement instead of being copied into the reference.
//!
//! Where the documentation leaves a choice open (which of several broken
//! limits a backend reports, which of several mismatching streams a
//! version conflict names), the model returns every acceptable answer.

use std::collections::{BTreeMap, HashMap};

use crate::append::{AppendResult, AppendTx, ExpectedVersion, IdempotencyKey, StreamAppend};
use crate::error::{AppendError, LimitError};
use crate::event::RecordedEvent;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// Why the model says a transaction must be refused: one acceptable error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A limit is broken (or the transaction is malformed); the backend must
    /// return exactly this [`LimitError`].
    Limit(LimitError),
    /// A stream is not at the expected version.
    WrongExpectedVersion {
        /// The stream.
        stream: StreamId,
        /// What the transaction expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: u64,
    },
    /// The key was used before by a transaction with different content.
    IdempotencyKeyReused {
        /// The key.
        key: IdempotencyKey,
    },
}

impl Rejection {
    /// Whether the backend's `error` is this rejection.
    pub fn accepts(&self, error: &AppendError) -> bool {
        match (self, error) {
            (Rejection::Limit(want), AppendError::Limit(got)) => want == got,
            (
                Rejection::WrongExpectedVersion {
                    stream,
                    expected,
                    actual,
                },
                AppendError::WrongExpectedVersion {
                    stream: s,
                    expected: e,
                    actual: a,
                },
            ) => stream == s && expected == e && actual == a,
            (
                Rejection::IdempotencyKeyReused { key },
                AppendError::IdempotencyKeyReused { key: k },
            ) => key == k,
            _ => false,
        }
    }
}

/// A transaction committed under an idempotency key: its full content (not a
/// hash of it) and where it landed.
#[derive(Debug, Clone)]
struct KeyedTx {
    streams: Vec<StreamAppend>,
    result: AppendResult,
}

/// The reference event log.
#[derive(Debug, Clone, Default)]
pub struct LogModel {
    /// Every committed event; an event's position is its index.
    events: Vec<RecordedEvent>,
    /// Each stream's event positions, in version order.
    streams: BTreeMap<StreamId, Vec<u64>>,
    /// Committed keyed transactions.
    keys: HashMap<IdempotencyKey, KeyedTx>,
}

impl LogModel {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// One past the last position (0 when empty).
    pub fn head(&self) -> u64 {
        self.events.len() as u64
    }

    /// The current version of `stream` (0 if it does not exist).
    pub fn version(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |p| p.len() as u64)
    }

    /// Every stream that has events, in name order.
    pub fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.streams.keys()
    }

    /// Every committed event, in position order.
    pub fn events(&self) -> &[RecordedEvent] {
        &self.events
    }

    /// Every limit `tx` breaks under `limits` (empty when it is well formed).
    ///
    /// A backend may report any one of them.
    pub fn limit_violations(tx: &AppendTx, limits: &Limits) -> Vec<LimitError> {
        let mut out = Vec::new();
        if tx.streams.is_empty() {
            out.push(LimitError::EmptyTransaction);
        }
        if tx.streams.len() > limits.max_tx_streams {
            out.push(LimitError::TooManyStreams {
                count: tx.streams.len(),
                max: limits.max_tx_streams,
            });
        }
        let id_too_long = |id: &str, out: &mut Vec<LimitError>| {
            if id.len() > limits.max_id_len {
                out.push(LimitError::IdTooLong {
                    len: id.len(),
                    max: limits.max_id_len,
                });
            }
        };
        if let Some(key) = &tx.idempotency_key {
            id_too_long(key.as_str(), &mut out);
        }
        let mut total_events = 0usize;
        let mut total_bytes = 0usize;
        for (i, s) in tx.streams.iter().enumerate() {
            if s.events.is_empty() {
                out.push(LimitError::EmptyStreamAppend {
                    stream: s.stream.clone(),
                });
            }
            if tx.streams[..i]
                .iter()
                .any(|earlier| earlier.stream == s.stream)
            {
                out.push(LimitError::DuplicateStream {
                    stream: s.stream.clone(),
                });
            }
            for e in &s.events {
                if e.kind.is_empty() || e.kind.len() > limits.max_kind_len {
                    out.push(LimitError::BadKind {
                        len: e.kind.len(),
                        max: limits.max_kind_len,
                    });
                }
                let mut size = e.payload.len() + e.kind.len();
                for id in [&e.metadata.correlation_id, &e.metadata.causation_id]
                    .into_iter()
                    .flatten()
                {
                    id_too_long(id, &mut out);
                    size += id.len();
                }
                if size > limits.max_event_bytes {
                    out.push(LimitError::EventTooLarge {
                        size,
                        max: limits.max_event_bytes,
                    });
                }
                total_events += 1;
                total_bytes += size;
            }
        }
        if total_events > limits.max_tx_events {
            out.push(LimitError::TooManyEvents {
                count: total_events,
                max: limits.max_tx_events,
            });
        }
        if total_bytes > limits.max_tx_bytes {
            out.push(LimitError::TransactionTooLarge {
                size: total_bytes,
                max: limits.max_tx_bytes,
            });
        }
        out
    }

    /// The error a read asking for `max` events must fail with, if any.
    pub fn read_violation(max: usize, limits: &Limits) -> Option<LimitError> {
        (max > limits.max_read_events).then_some(LimitError::ReadTooLarge {
            requested: max,
            max: limits.max_read_events,
        })
    }

    /// Applies `tx`: the result a backend must return, or every error it may
    /// return instead (in which case the model is unchanged).
    ///
    /// The rules, in order: a malformed transaction or a broken limit is a
    /// [`Rejection::Limit`]; a key already committed (by a transaction
    /// after which fewer than `limits.idempotency_window` events were
    /// appended) with identical content
    /// returns the original result and writes nothing; a key committed with
    /// different content is [`Rejection::IdempotencyKeyReused`] (or, when a
    /// stream is also at the wrong version, that conflict: the documentation
    /// does not order the two); otherwise any stream not at its expected
    /// version is a [`Rejection::WrongExpectedVersion`]; otherwise every
    /// event is written at consecutive positions, streams in the order given.
    pub fn append(
        &mut self,
        tx: &AppendTx,
        limits: &Limits,
    ) -> Result<AppendResult, Vec<Rejection>> {
        let violations = Self::limit_violations(tx, limits);
        if !violations.is_empty() {
            return Err(violations.into_iter().map(Rejection::Limit).collect());
        }
        let conflicts: Vec<Rejection> = tx
            .streams
            .iter()
            .filter_map(|s| {
                let actual = self.version(&s.stream);
                let ok = match s.expected {
                    ExpectedVersion::Any => true,
                    ExpectedVersion::NoStream => actual == 0,
                    ExpectedVersion::Exact(v) => actual == v,
                };
                (!ok).then(|| Rejection::WrongExpectedVersion {
                    stream: s.stream.clone(),
                    expected: s.expected,
                    actual,
                })
            })
            .collect();
        if let Some(key) = &tx.idempotency_key {
            // Keys are remembered for `idempotency_window` positions behind
            // the head; an older one is forgotten and the retry is new.
            // (forgotten once `window` events were appended after it).
            let head = self.head();
            let remembered = self.keys.get(key).filter(|d| {
                d.result
                    .next_position
                    .saturating_add(limits.idempotency_window)
                    > head
            });
            if let Some(done) = remembered {
                if done.streams == tx.streams {
                    return Ok(done.result.clone());
                }
                let mut out = vec![Rejection::IdempotencyKeyReused { key: key.clone() }];
                out.extend(conflicts);
                return Err(out);
            }
        }
        if !conflicts.is_empty() {
            return Err(conflicts);
        }
        let first_position = self.head();
        let mut versions = Vec::with_capacity(tx.streams.len());
        for s in &tx.streams {
            let positions = self.streams.entry(s.stream.clone()).or_default();
            for e in &s.events {
                let position = self.events.len() as u64;
                positions.push(position);
                self.events.push(RecordedEvent {
                    position,
                    stream: s.stream.clone(),
                    version: positions.len() as u64,
                    kind: e.kind.clone(),
                    schema: e.schema,
                    timestamp_ms: e.timestamp_ms,
                    metadata: e.metadata.clone(),
                    payload: e.payload.clone(),
                });
            }
            versions.push((s.stream.clone(), positions.len() as u64));
        }
        let result = AppendResult {
            first_position,
            next_position: self.head(),
            versions,
        };
        if let Some(key) = &tx.idempotency_key {
            self.keys.insert(
                key.clone(),
                KeyedTx {
                    streams: tx.streams.clone(),
                    result: result.clone(),
                },
            );
        }
        Ok(result)
    }

    /// Events of `stream` with version ≥ `from_version`, at most `max`.
    pub fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Vec<RecordedEvent> {
        self.streams
            .get(stream)
            .into_iter()
            .flatten()
            .map(|&p| &self.events[p as usize])
            .filter(|e| e.version >= from_version)
            .take(max)
            .cloned()
            .collect()
    }

    /// Events with position ≥ `from_position`, at most `max`.
    pub fn read_all(&self, from_position: u64, max: usize) -> Vec<RecordedEvent> {
        self.events
            .iter()
            .filter(|e| e.position >= from_position)
            .take(max)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn sid(s: &str) -> StreamId {
        StreamId::new(s).unwrap()
    }

    fn ev(p: &'static [u8]) -> NewEvent {
        NewEvent::new("E", 1, 0, p)
    }

    #[test]
    fn appends_reads_and_idempotency() {
        let limits = Limits::default();
        let mut m = LogModel::new();
        let tx = AppendTx::single(
            sid("a"),
            ExpectedVersion::NoStream,
            vec![ev(b"1"), ev(b"2")],
        )
        .with_stream(sid("b"), ExpectedVersion::Any, vec![ev(b"3")])
        .with_idempotency_key("k");
        let r = m.append(&tx, &limits).unwrap();
        assert_eq!((r.first_position, r.next_position), (0, 3));
        assert_eq!(r.versions, vec![(sid("a"), 2), (sid("b"), 1)]);
        // A retry returns the same result and writes nothing.
        assert_eq!(m.append(&tx, &limits).unwrap(), r);
        assert_eq!(m.head(), 3);
        // Same key, other content.
        let other = AppendTx::single(sid("a"), ExpectedVersion::Any, vec![ev(b"x")])
            .with_idempotency_key("k");
        assert_eq!(
            m.append(&other, &limits).unwrap_err(),
            vec![Rejection::IdempotencyKeyReused {
                key: IdempotencyKey::new("k")
            }]
        );
        // A conflict names the actual version.
        let stale = AppendTx::single(sid("a"), ExpectedVersion::Exact(1), vec![ev(b"y")]);
        assert_eq!(
            m.append(&stale, &limits).unwrap_err(),
            vec![Rejection::WrongExpectedVersion {
                stream: sid("a"),
                expected: ExpectedVersion::Exact(1),
                actual: 2
            }]
        );
        assert_eq!(m.read_stream(&sid("a"), 2, 10).len(), 1);
        assert_eq!(m.read_stream(&sid("a"), 0, 10).len(), 2);
        assert_eq!(m.read_all(1, 1)[0].stream, sid("a"));
        assert_eq!(m.read_all(2, 5)[0].version, 1);
        assert!(m.read_all(3, 5).is_empty());
    }

    #[test]
    fn limits_are_all_listed() {
        let limits = Limits {
            max_kind_len: 3,
            ..Limits::default()
        };
        let tx = AppendTx::single(
            sid("a"),
            ExpectedVersion::Any,
            vec![NewEvent::new("long", 0, 0, "")],
        )
        .with_stream(sid("a"), ExpectedVersion::Any, vec![]);
        let v = LogModel::limit_violations(&tx, &limits);
        assert!(v.contains(&LimitError::BadKind { len: 4, max: 3 }));
        assert!(v.contains(&LimitError::EmptyStreamAppend { stream: sid("a") }));
        assert!(v.contains(&LimitError::DuplicateStream { stream: sid("a") }));
        assert!(LogModel::limit_violations(&AppendTx::default(), &limits)
            .contains(&LimitError::EmptyTransaction));
    }
}
