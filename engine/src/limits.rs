//! Stated maxima, checked on every append and read.

use crate::append::AppendTx;
use crate::error::LimitError;
use crate::stream_id::StreamId;

/// The limits a log enforces. Every backend checks them with
/// [`Limits::check_tx`] before writing and returns [`LimitError`] when one is
/// exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest event (payload + kind + metadata ids), in bytes.
    pub max_event_bytes: usize,
    /// Most events in one transaction.
    pub max_tx_events: usize,
    /// Largest transaction (sum of event sizes), in bytes.
    pub max_tx_bytes: usize,
    /// Most streams in one transaction.
    pub max_tx_streams: usize,
    /// Most events one `read_stream` or `read_all` call may ask for.
    pub max_read_events: usize,
    /// Longest event kind, in bytes.
    pub max_kind_len: usize,
    /// Longest correlation, causation or idempotency id, in bytes.
    pub max_id_len: usize,
    /// How long an idempotency key is remembered, in events: a
    /// transaction's key is forgotten once this many events were appended
    /// after it, so a retry must come before that; the key table holds at
    /// most this many keys. 0 remembers no key.
    pub idempotency_window: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1 << 20,
            max_tx_events: 10_000,
            max_tx_bytes: 8 << 20,
            max_tx_streams: 1_000,
            max_read_events: 100_000,
            max_kind_len: 64,
            max_id_len: 64,
            idempotency_window: 1_000_000,
        }
    }
}

impl Limits {
    /// Checks a transaction's shape and sizes against these limits.
    ///
    /// Also rejects the shapes no backend accepts: no streams, a stream with
    /// no events, the same stream twice.
    pub fn check_tx(&self, tx: &AppendTx) -> Result<(), LimitError> {
        if tx.streams.is_empty() {
            return Err(LimitError::EmptyTransaction);
        }
        if tx.streams.len() > self.max_tx_streams {
            return Err(LimitError::TooManyStreams {
                count: tx.streams.len(),
                max: self.max_tx_streams,
            });
        }
        if let Some(key) = &tx.idempotency_key {
            self.check_id(key.as_str())?;
        }
        let mut events = 0usize;
        let mut bytes = 0usize;
        let mut seen: Vec<&StreamId> = Vec::with_capacity(tx.streams.len());
        for s in &tx.streams {
            if s.events.is_empty() {
                return Err(LimitError::EmptyStreamAppend {
                    stream: s.stream.clone(),
                });
            }
            if seen.contains(&&s.stream) {
                return Err(LimitError::DuplicateStream {
                    stream: s.stream.clone(),
                });
            }
            seen.push(&s.stream);
            for e in &s.events {
                if e.kind.is_empty() || e.kind.len() > self.max_kind_len {
                    return Err(LimitError::BadKind {
                        len: e.kind.len(),
                        max: self.max_kind_len,
                    });
                }
                for id in [&e.metadata.correlation_id, &e.metadata.causation_id]
                    .into_iter()
                    .flatten()
                {
                    self.check_id(id)?;
                }
                let size = e.size();
                if size > self.max_event_bytes {
                    return Err(LimitError::EventTooLarge {
                        size,
                        max: self.max_event_bytes,
                    });
                }
                events += 1;
                bytes += size;
            }
        }
        if events > self.max_tx_events {
            return Err(LimitError::TooManyEvents {
                count: events,
                max: self.max_tx_events,
            });
        }
        if bytes > self.max_tx_bytes {
            return Err(LimitError::TransactionTooLarge {
                size: bytes,
                max: self.max_tx_bytes,
            });
        }
        Ok(())
    }

    fn check_id(&self, id: &str) -> Result<(), LimitError> {
        if id.len() > self.max_id_len {
            return Err(LimitError::IdTooLong {
                len: id.len(),
                max: self.max_id_len,
            });
        }
        Ok(())
    }

    /// Checks the size of a read request.
    pub fn check_read(&self, max: usize) -> Result<(), LimitError> {
        if max > self.max_read_events {
            return Err(LimitError::ReadTooLarge {
                requested: max,
                max: self.max_read_events,
            });
        }
        Ok(())
    }
}
