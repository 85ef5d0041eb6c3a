//! The per-stream version index and idempotency table every log keeps, as
//! pure data: checking a transaction against it and applying a committed
//! one. Backends share it so that `ExpectedVersion` and idempotency behave
//! identically everywhere.

use std::collections::HashMap;

use crate::append::{AppendResult, AppendTx, IdempotencyKey};
use crate::error::AppendError;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// What a transaction checked against the index turns out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// New: write it; it will land where the result says.
    Write(AppendResult),
    /// A retry of a committed transaction: write nothing, return this.
    Duplicate(AppendResult),
}

/// Stream versions, positions and idempotency keys of a log.
#[derive(Debug, Default, Clone)]
pub struct LogIndex {
    streams: HashMap<StreamId, Vec<u64>>,
    keys: HashMap<IdempotencyKey, (u64, AppendResult)>,
    head: u64,
}

impl LogIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// One past the last position indexed.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Number of streams.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Iterates over streams and their current versions.
    pub fn streams(&self) -> impl Iterator<Item = (&StreamId, u64)> {
        self.streams.iter().map(|(s, p)| (s, p.len() as u64))
    }

    /// Current version of `stream` counting only positions below `head`.
    pub fn version_below(&self, stream: &StreamId, head: u64) -> u64 {
        match self.streams.get(stream) {
            None => 0,
            Some(p) => p.partition_point(|&pos| pos < head) as u64,
        }
    }

    /// Current version of `stream`.
    pub fn version(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |p| p.len() as u64)
    }

    /// Positions of `stream`'s events from `from_version` (1-based), at most
    /// `max`, below `head`.
    pub fn positions(&self, stream: &StreamId, from_version: u64, max: usize, head: u64) -> &[u64] {
        let Some(p) = self.streams.get(stream) else {
            return &[];
        };
        let start = (from_version.max(1) - 1).min(p.len() as u64) as usize;
        let end = p.partition_point(|&pos| pos < head);
        if start >= end {
            return &[];
        }
        &p[start..end.min(start.saturating_add(max))]
    }

    /// Checks `tx` against limits, expected versions and idempotency keys.
    pub fn check(&self, tx: &AppendTx, limits: &Limits) -> Result<Verdict, AppendError> {
        limits.check_tx(tx)?;
        if let Some(key) = &tx.idempotency_key {
            if let Some((fp, result)) = self.keys.get(key) {
                if *fp != tx.fingerprint() {
                    return Err(AppendError::IdempotencyKeyReused { key: key.clone() });
                }
                return Ok(Verdict::Duplicate(result.clone()));
            }
        }
        let mut versions = Vec::with_capacity(tx.streams.len());
        for s in &tx.streams {
            let actual = self.version(&s.stream);
            if !s.expected.matches(actual) {
                return Err(AppendError::WrongExpectedVersion {
                    stream: s.stream.clone(),
                    expected: s.expected,
                    actual,
                });
            }
            versions.push((s.stream.clone(), actual + s.events.len() as u64));
        }
        let n = tx.event_count() as u64;
        Ok(Verdict::Write(AppendResult {
            first_position: self.head,
            next_position: self.head + n,
            versions,
        }))
    }

    /// Records a transaction that was written at `result.first_position`.
    /// `stream_order` lists each event's stream in position order.
    ///
    /// # Panics
    /// If `result.first_position` is not the index's head (a backend bug).
    pub fn apply<'a>(
        &mut self,
        result: &AppendResult,
        key: Option<(&IdempotencyKey, u64)>,
        stream_order: impl IntoIterator<Item = &'a StreamId>,
    ) {
        assert_eq!(
            result.first_position, self.head,
            "index applied out of order"
        );
        let mut pos = result.first_position;
        for stream in stream_order {
            match self.streams.get_mut(stream) {
                Some(v) => v.push(pos),
                None => {
                    self.streams.insert(stream.clone(), vec![pos]);
                }
            }
            pos += 1;
        }
        assert_eq!(
            pos, result.next_position,
            "index applied with wrong event count"
        );
        self.head = pos;
        if let Some((key, fingerprint)) = key {
            self.keys.insert(key.clone(), (fingerprint, result.clone()));
        }
    }

    /// Records a transaction in one call from the transaction itself.
    pub fn apply_tx(&mut self, tx: &AppendTx, result: &AppendResult) {
        let key = tx.idempotency_key.as_ref().map(|k| (k, tx.fingerprint()));
        let order = tx
            .streams
            .iter()
            .flat_map(|s| std::iter::repeat_n(&s.stream, s.events.len()));
        self.apply(result, key, order);
    }

    /// Forgets every position at or beyond `head` (after a failed write).
    pub fn truncate(&mut self, head: u64) {
        if head >= self.head {
            return;
        }
        self.streams.retain(|_, p| {
            let keep = p.partition_point(|&pos| pos < head);
            p.truncate(keep);
            !p.is_empty()
        });
        self.keys.retain(|_, (_, r)| r.next_position <= head);
        self.head = head;
    }
}
