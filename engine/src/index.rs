//! The per-stream version index and idempotency table every log keeps, as
//! pure data: checking a transaction against it and applying a committed
//! one. Backends share it so that `ExpectedVersion` and idempotency behave
//! identically everywhere.
//!
//! [`LogIndex::encode`] and [`LogIndex::decode`] turn the index into bytes
//! and back (a versioned, length-prefixed binary format, documented on
//! `encode`), so that a backend can checkpoint it instead of rebuilding it
//! from the whole log on every open. Decoding validates everything and
//! returns an [`IndexDecodeError`] for bad input; it never panics.

use std::collections::{HashMap, VecDeque};

use crate::append::{AppendResult, AppendTx, IdempotencyKey};
use crate::bytes_in::{Input, InputError};
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
///
/// Idempotency keys are remembered for a window of positions
/// ([`Limits::idempotency_window`]): a transaction's key is forgotten once
/// `window` or more events were appended after it (`next_position + window
/// <= head`), so a retry must come within `window` events of its first
/// attempt, the key table is bounded (at most one key per position in the
/// window) and which keys count is a function of the log alone (a rebuild,
/// a checkpoint and the live index agree). A retry after its key was
/// forgotten is a new transaction. [`LogIndex::check`] applies the window
/// to the current head; keys are dropped from memory only by
/// [`LogIndex::forget_expired_keys`], which a backend calls once what it
/// applied is committed, so a [`LogIndex::truncate`] after a failed write
/// never loses a key the window still covers.
///
/// Two indexes are equal when they hold the same head, the same positions
/// for every stream and the same idempotency keys with the same
/// fingerprints and results.
#[derive(Debug, Clone)]
pub struct LogIndex {
    streams: HashMap<StreamId, Vec<u64>>,
    keys: HashMap<IdempotencyKey, (u64, AppendResult)>,
    /// Keys by the next position of their transaction, oldest first.
    key_order: VecDeque<(u64, IdempotencyKey)>,
    /// How many positions behind the head a key is kept.
    key_window: u64,
    /// Entries replaced by a later transaction with the same (by then
    /// forgotten) key, kept until that one is committed so a `truncate`
    /// can restore them.
    shadowed: Vec<(IdempotencyKey, u64, AppendResult)>,
    head: u64,
}

impl Default for LogIndex {
    fn default() -> Self {
        Self {
            streams: HashMap::new(),
            keys: HashMap::new(),
            key_order: VecDeque::new(),
            key_window: Limits::default().idempotency_window,
            shadowed: Vec::new(),
            head: 0,
        }
    }
}

impl PartialEq for LogIndex {
    fn eq(&self, other: &Self) -> bool {
        self.head == other.head && self.streams == other.streams && self.keys == other.keys
    }
}

impl Eq for LogIndex {}

impl LogIndex {
    /// An empty index, keeping keys for the default window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps idempotency keys for `window` positions behind the head from
    /// now on (see the type's docs), dropping older ones at once (call it
    /// on a committed index).
    pub fn set_key_window(&mut self, window: u64) {
        self.key_window = window;
        self.forget_expired_keys();
    }

    /// The window of positions for which keys are kept.
    pub fn key_window(&self) -> u64 {
        self.key_window
    }

    /// Whether the window still covers a transaction that ended at
    /// `next_position`.
    fn remembers(&self, next_position: u64) -> bool {
        next_position.saturating_add(self.key_window) > self.head
    }

    /// Drops from memory the keys the window no longer covers. Call it once
    /// every applied transaction is committed (durable): a later
    /// [`LogIndex::truncate`] cannot bring dropped keys back.
    pub fn forget_expired_keys(&mut self) {
        let head = self.head;
        let window = self.key_window;
        self.shadowed
            .retain(|(_, _, r)| r.next_position.saturating_add(window) > head);
        while let Some((next, _)) = self.key_order.front() {
            if self.remembers(*next) {
                break;
            }
            let Some((next, key)) = self.key_order.pop_front() else {
                break;
            };
            // A key re-applied later (a broker that showed an aborted
            // transaction) stays with its newer transaction.
            if self
                .keys
                .get(&key)
                .is_some_and(|(_, r)| r.next_position == next)
            {
                self.keys.remove(&key);
            }
        }
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
            let remembered = self
                .keys
                .get(key)
                .filter(|(_, r)| self.remembers(r.next_position));
            if let Some((fp, result)) = remembered {
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
            if let Some((fp, old)) = self.keys.insert(key.clone(), (fingerprint, result.clone())) {
                // Only a forgotten key is applied again (`check` returns the
                // remembered ones); keep its entry in case this is undone.
                self.shadowed.push((key.clone(), fp, old));
            }
            self.key_order
                .push_back((result.next_position, key.clone()));
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
        self.key_order.retain(|(next, _)| *next <= head);
        // Restore, newest first, what the truncated transactions replaced.
        while let Some((key, fp, old)) = self.shadowed.pop() {
            if old.next_position <= head && !self.keys.contains_key(&key) {
                let at = self
                    .key_order
                    .partition_point(|(n, _)| *n <= old.next_position);
                if !self
                    .key_order
                    .iter()
                    .any(|(n, k)| *n == old.next_position && *k == key)
                {
                    self.key_order.insert(at, (old.next_position, key.clone()));
                }
                self.keys.insert(key, (fp, old));
            }
        }
        self.head = head;
    }

    /// Number of idempotency keys held (including any the window no longer
    /// covers that [`LogIndex::forget_expired_keys`] has not dropped yet).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Appends the index's encoding to `out`.
    ///
    /// # Format, version 1
    ///
    /// Integers are unsigned LEB128 varints (at most 10 bytes) unless noted;
    /// strings are a varint byte length and UTF-8.
    ///
    /// | field | meaning |
    /// |---|---|
    /// | magic | 4 bytes `b"SXI"` then the version byte `1` |
    /// | head | one past the last position |
    /// | stream count | then per stream: its id, its event count `n`, the first position, and `n - 1` gaps (each the difference to the previous position minus 1) |
    /// | key count | then per key: the key, its fingerprint (8 bytes little-endian), first position, event count (`next - first`), the number of streams of the result, and per stream its id and version after the transaction |
    ///
    /// Streams and keys are in no particular order, so two encodings of one
    /// index may differ; [`LogIndex::decode`] of either gives an equal
    /// index.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&INDEX_MAGIC);
        out.push(INDEX_VERSION);
        put_varint(out, self.head);
        put_varint(out, self.streams.len() as u64);
        for (stream, positions) in &self.streams {
            put_bytes(out, stream.as_str().as_bytes());
            put_varint(out, positions.len() as u64);
            let mut prev: Option<u64> = None;
            for &p in positions {
                put_varint(out, prev.map_or(p, |q| p - q - 1));
                prev = Some(p);
            }
        }
        put_varint(out, self.keys.len() as u64);
        for (key, (fingerprint, result)) in &self.keys {
            put_bytes(out, key.as_str().as_bytes());
            out.extend_from_slice(&fingerprint.to_le_bytes());
            put_varint(out, result.first_position);
            put_varint(out, result.next_position - result.first_position);
            put_varint(out, result.versions.len() as u64);
            for (stream, version) in &result.versions {
                put_bytes(out, stream.as_str().as_bytes());
                put_varint(out, *version);
            }
        }
    }

    /// The index's encoding (see [`LogIndex::encode`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + 2 * self.head as usize);
        self.encode(&mut out);
        out
    }

    /// Decodes what [`LogIndex::encode`] wrote, checking that it describes
    /// a possible index: every position below the head belongs to exactly
    /// one stream, positions of a stream increase, stream ids are valid,
    /// no stream or key appears twice, every key's result lies below the
    /// head, and nothing follows the encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self, IndexDecodeError> {
        let mut r = Cursor(Input::new(bytes));
        let magic = r.take(INDEX_MAGIC.len() + 1)?;
        if magic[..INDEX_MAGIC.len()] != INDEX_MAGIC {
            return Err(IndexDecodeError::BadMagic);
        }
        if magic[INDEX_MAGIC.len()] != INDEX_VERSION {
            return Err(IndexDecodeError::UnsupportedVersion(
                magic[INDEX_MAGIC.len()],
            ));
        }
        let head = r.varint()?;
        let stream_count = r.count()?;
        let mut streams: HashMap<StreamId, Vec<u64>> =
            HashMap::with_capacity(stream_count.min(1 << 16));
        let mut total: u64 = 0;
        for _ in 0..stream_count {
            let stream = r.stream_id()?;
            let n = r.count()?;
            if n == 0 {
                return Err(IndexDecodeError::Inconsistent(format!(
                    "stream {stream} has no events"
                )));
            }
            let mut positions = Vec::with_capacity(n);
            let mut prev: Option<u64> = None;
            for _ in 0..n {
                let v = r.varint()?;
                let p = match prev {
                    None => Some(v),
                    Some(q) => q.checked_add(v).and_then(|x| x.checked_add(1)),
                };
                let Some(p) = p.filter(|&p| p < head) else {
                    return Err(IndexDecodeError::Inconsistent(format!(
                        "stream {stream} has a position at or past the head {head}"
                    )));
                };
                positions.push(p);
                prev = Some(p);
            }
            total += n as u64;
            if streams.insert(stream.clone(), positions).is_some() {
                return Err(IndexDecodeError::Inconsistent(format!(
                    "stream {stream} appears twice"
                )));
            }
        }
        if total != head {
            return Err(IndexDecodeError::Inconsistent(format!(
                "{total} positions for a head of {head}"
            )));
        }
        // Every position is below the head and there are exactly `head` of
        // them (so `head` is at most the input's length): they cover
        // 0..head once each unless two streams share one.
        let mut seen = vec![0u64; (head as usize).div_ceil(64)];
        for (stream, positions) in &streams {
            for &p in positions {
                let (word, bit) = ((p / 64) as usize, p % 64);
                if seen[word] & (1 << bit) != 0 {
                    return Err(IndexDecodeError::Inconsistent(format!(
                        "position {p} belongs to two streams (one is {stream})"
                    )));
                }
                seen[word] |= 1 << bit;
            }
        }
        let key_count = r.count()?;
        let mut keys = HashMap::with_capacity(key_count.min(1 << 16));
        for _ in 0..key_count {
            let key = IdempotencyKey::new(r.string()?);
            let fingerprint = r.u64_le()?;
            let first_position = r.varint()?;
            let next_position = first_position
                .checked_add(r.varint()?)
                .filter(|&n| n <= head)
                .ok_or_else(|| {
                    IndexDecodeError::Inconsistent(format!(
                        "key {key} names positions past the head {head}"
                    ))
                })?;
            let n = r.count()?;
            let mut versions = Vec::with_capacity(n);
            for _ in 0..n {
                let stream = r.stream_id()?;
                let version = r.varint()?;
                versions.push((stream, version));
            }
            let result = AppendResult {
                first_position,
                next_position,
                versions,
            };
            if keys.insert(key.clone(), (fingerprint, result)).is_some() {
                return Err(IndexDecodeError::Inconsistent(format!(
                    "key {key} appears twice"
                )));
            }
        }
        if !r.0.is_empty() {
            return Err(IndexDecodeError::TrailingBytes(r.0.remaining()));
        }
        let mut key_order: Vec<(u64, IdempotencyKey)> = keys
            .iter()
            .map(|(k, (_, r))| (r.next_position, k.clone()))
            .collect();
        key_order.sort();
        // The keys are kept as encoded (the encoder's window already chose
        // them); the caller sets its window with `set_key_window`.
        Ok(Self {
            streams,
            keys,
            key_order: key_order.into(),
            head,
            key_window: u64::MAX,
            shadowed: Vec::new(),
        })
    }
}

const INDEX_MAGIC: [u8; 3] = *b"SXI";
const INDEX_VERSION: u8 = 1;

/// Why bytes are not an encoded [`LogIndex`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexDecodeError {
    /// The bytes do not start with the index's magic.
    #[error("not an encoded log index (bad magic)")]
    BadMagic,
    /// An encoding version this build does not know.
    #[error("log index encoding version {0} is not supported")]
    UnsupportedVersion(u8),
    /// The bytes end inside a field.
    #[error("log index truncated at byte {0}")]
    Truncated(usize),
    /// A varint longer than 10 bytes or above `u64::MAX`.
    #[error("bad varint at byte {0}")]
    BadVarint(usize),
    /// A string that is not UTF-8, or a stream id that is not valid.
    #[error("bad string at byte {at}: {reason}")]
    BadString {
        /// Where it starts.
        at: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Well-formed fields that cannot describe an index.
    #[error("inconsistent log index: {0}")]
    Inconsistent(String),
    /// Bytes after the end of the encoding.
    #[error("{0} trailing bytes after the log index")]
    TrailingBytes(usize),
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The index's fields over the shared [`Input`], with its errors.
struct Cursor<'a>(Input<'a>);

fn index_err(e: InputError) -> IndexDecodeError {
    match e {
        // Where the input ends: the position plus what was left.
        InputError::Short { at, left, .. } => IndexDecodeError::Truncated(at + left),
        InputError::BadVarint { at, .. } => IndexDecodeError::BadVarint(at),
        InputError::TooMany { count, at, .. } => IndexDecodeError::Inconsistent(format!(
            "a count of {count} at byte {at} exceeds the bytes left"
        )),
    }
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexDecodeError> {
        self.0.take(n, "log index").map_err(index_err)
    }

    fn u64_le(&mut self) -> Result<u64, IndexDecodeError> {
        self.0.u64_le("fingerprint").map_err(index_err)
    }

    fn varint(&mut self) -> Result<u64, IndexDecodeError> {
        self.0.varint("varint").map_err(index_err)
    }

    /// A count of items that each take at least one byte: never more than
    /// the bytes left, so that nothing is allocated for garbage counts.
    fn count(&mut self) -> Result<usize, IndexDecodeError> {
        self.0.count("count").map_err(index_err)
    }

    fn string(&mut self) -> Result<&'a str, IndexDecodeError> {
        let at = self.0.position();
        let n = self.count()?;
        std::str::from_utf8(self.take(n)?).map_err(|e| IndexDecodeError::BadString {
            at,
            reason: e.to_string(),
        })
    }

    fn stream_id(&mut self) -> Result<StreamId, IndexDecodeError> {
        let at = self.0.position();
        StreamId::new(self.string()?).map_err(|e| IndexDecodeError::BadString {
            at,
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keyed(stream: &str, events: usize, key: &str) -> AppendTx {
        AppendTx::single(
            StreamId::new(stream).unwrap(),
            crate::ExpectedVersion::Any,
            (0..events)
                .map(|i| crate::NewEvent::new("E", 1, i as u64, "x"))
                .collect(),
        )
        .with_idempotency_key(key)
    }

    /// Checks and applies `tx`; whether it was written (not a duplicate).
    fn append(index: &mut LogIndex, tx: &AppendTx) -> bool {
        match index.check(tx, &Limits::default()).unwrap() {
            Verdict::Write(r) => {
                index.apply_tx(tx, &r);
                true
            }
            Verdict::Duplicate(_) => false,
        }
    }

    #[test]
    fn keys_are_forgotten_beyond_the_window() {
        let mut index = LogIndex::new();
        index.set_key_window(5);
        let a = keyed("s", 2, "a"); // positions 0..2
        let b = keyed("s", 3, "b"); // 2..5
        assert!(append(&mut index, &a));
        assert!(append(&mut index, &b));
        // Head 5: fewer than 5 events after either.
        assert!(!append(&mut index, &a) && !append(&mut index, &b));
        assert!(append(&mut index, &keyed("t", 2, "c"))); // 5..7
        assert!(!append(&mut index, &b), "2 events after b: kept");
        index.forget_expired_keys();
        assert_eq!(index.key_count(), 2, "5 events after a: dropped");
        assert!(append(&mut index, &a), "a retried after its window is new");
        // A window of 0 remembers nothing.
        index.set_key_window(0);
        assert_eq!(index.key_count(), 0);
        assert!(append(&mut index, &b));
    }

    #[test]
    fn a_truncated_write_never_loses_a_key_the_window_covers() {
        let mut index = LogIndex::new();
        index.set_key_window(5);
        let a = keyed("s", 2, "a"); // 0..2
        assert!(append(&mut index, &a));
        assert!(append(&mut index, &keyed("s", 2, "b"))); // 2..4
        index.forget_expired_keys();
        // A batch applied ahead of its commit pushes `a` out of the
        // window, then fails and is truncated: `a` is covered again.
        assert!(append(&mut index, &keyed("t", 5, "x"))); // 4..9
        assert!(append(&mut index, &a), "a is new while the head is 9");
        index.truncate(4);
        assert_eq!(index.head(), 4);
        assert!(!append(&mut index, &a), "a is remembered again at head 4");
    }

    #[test]
    fn the_key_table_is_bounded_and_a_function_of_the_log() {
        let mut live = LogIndex::new();
        live.set_key_window(100);
        let txs: Vec<AppendTx> = (0..1_000)
            .map(|i| keyed(&format!("s-{}", i % 7), 1 + i % 3, &format!("k{i}")))
            .collect();
        let mut results = Vec::new();
        for tx in &txs {
            let Verdict::Write(r) = live.check(tx, &Limits::default()).unwrap() else {
                panic!("fresh keys are new");
            };
            live.apply_tx(tx, &r);
            live.forget_expired_keys();
            results.push(r);
            assert!(live.key_count() <= 100);
        }
        // Rebuilt with the window set after everything was applied (a
        // recovery), or decoded from a checkpoint: the same keys.
        let mut rebuilt = LogIndex::new();
        for (tx, r) in txs.iter().zip(&results) {
            rebuilt.apply_tx(tx, r);
        }
        rebuilt.set_key_window(100);
        assert_eq!(rebuilt, live);
        let mut decoded = LogIndex::decode(&live.to_bytes()).unwrap();
        decoded.set_key_window(100);
        assert_eq!(decoded, live);
        // A window larger than the default survives a decode untouched.
        let mut wide = LogIndex::decode(&rebuilt.to_bytes()).unwrap();
        assert_eq!(wide.key_count(), rebuilt.key_count());
        wide.set_key_window(5_000_000);
        assert_eq!(wide, rebuilt);
        // And they keep expiring alike.
        let more = keyed("s-0", 60, "late");
        for index in [&mut live, &mut rebuilt, &mut decoded] {
            assert!(append(index, &more));
            index.forget_expired_keys();
        }
        assert_eq!(rebuilt, live);
        assert_eq!(decoded, live);
    }

    /// A transaction: (stream number, events) pairs, a key number and a
    /// fingerprint.
    type Tx = (Vec<(u8, u8)>, Option<u8>, u64);

    /// Builds an index from transactions.
    fn build(txs: &[Tx]) -> LogIndex {
        let mut index = LogIndex::new();
        for (streams, key, fingerprint) in txs {
            let mut seen = std::collections::HashSet::new();
            let streams: Vec<(StreamId, u64)> = streams
                .iter()
                .filter(|(s, _)| seen.insert(*s))
                .map(|&(s, n)| {
                    (
                        StreamId::new(format!("s-{s}")).unwrap(),
                        u64::from(n % 4) + 1,
                    )
                })
                .collect();
            if streams.is_empty() {
                continue;
            }
            let head = index.head();
            let n: u64 = streams.iter().map(|(_, n)| n).sum();
            let result = AppendResult {
                first_position: head,
                next_position: head + n,
                versions: streams
                    .iter()
                    .map(|(s, k)| (s.clone(), index.version(s) + k))
                    .collect(),
            };
            let key = key.map(|k| IdempotencyKey::new(format!("key-{k}-é")));
            let order: Vec<StreamId> = streams
                .iter()
                .flat_map(|(s, k)| std::iter::repeat_n(s.clone(), *k as usize))
                .collect();
            index.apply(&result, key.as_ref().map(|k| (k, *fingerprint)), &order);
        }
        index
    }

    fn txs() -> impl Strategy<Value = Vec<Tx>> {
        proptest::collection::vec(
            (
                proptest::collection::vec((0u8..12, any::<u8>()), 1..4),
                proptest::option::of(any::<u8>()),
                any::<u64>(),
            ),
            0..40,
        )
    }

    #[test]
    fn empty_index_round_trips() {
        let bytes = LogIndex::new().to_bytes();
        assert_eq!(LogIndex::decode(&bytes).unwrap(), LogIndex::new());
    }

    #[test]
    fn refuses_bad_input_with_typed_errors() {
        let index = build(&[(vec![(1, 2), (2, 0)], Some(1), 7), (vec![(1, 0)], None, 0)]);
        let bytes = index.to_bytes();
        assert_eq!(LogIndex::decode(&bytes).unwrap(), index);
        assert_eq!(
            LogIndex::decode(b"XXI\x01"),
            Err(IndexDecodeError::BadMagic)
        );
        assert_eq!(
            LogIndex::decode(b"SXI\x02"),
            Err(IndexDecodeError::UnsupportedVersion(2))
        );
        assert!(matches!(
            LogIndex::decode(&bytes[..bytes.len() - 1]),
            Err(IndexDecodeError::Truncated(_))
        ));
        let mut long = bytes;
        long.push(0);
        assert_eq!(
            LogIndex::decode(&long),
            Err(IndexDecodeError::TrailingBytes(1))
        );
        // A head that the positions do not cover.
        let mut bad = Vec::new();
        bad.extend_from_slice(b"SXI\x01");
        put_varint(&mut bad, 2);
        put_varint(&mut bad, 1);
        put_bytes(&mut bad, b"a");
        put_varint(&mut bad, 1);
        put_varint(&mut bad, 0);
        put_varint(&mut bad, 0);
        assert!(matches!(
            LogIndex::decode(&bad),
            Err(IndexDecodeError::Inconsistent(_))
        ));
        // Two streams sharing position 0.
        let mut bad = Vec::new();
        bad.extend_from_slice(b"SXI\x01");
        put_varint(&mut bad, 2);
        put_varint(&mut bad, 2);
        for s in [b"a", b"b"] {
            put_bytes(&mut bad, s);
            put_varint(&mut bad, 1);
            put_varint(&mut bad, 0);
        }
        put_varint(&mut bad, 0);
        assert!(matches!(
            LogIndex::decode(&bad),
            Err(IndexDecodeError::Inconsistent(_))
        ));
        // An invalid stream id.
        let mut bad = Vec::new();
        bad.extend_from_slice(b"SXI\x01");
        put_varint(&mut bad, 1);
        put_varint(&mut bad, 1);
        put_bytes(&mut bad, b"no spaces");
        put_varint(&mut bad, 1);
        put_varint(&mut bad, 0);
        put_varint(&mut bad, 0);
        assert!(matches!(
            LogIndex::decode(&bad),
            Err(IndexDecodeError::BadString { .. })
        ));
        // An overlong varint.
        let mut bad = b"SXI\x01".to_vec();
        bad.extend_from_slice(&[0xff; 11]);
        assert_eq!(LogIndex::decode(&bad), Err(IndexDecodeError::BadVarint(4)));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn round_trips(txs in txs()) {
            let index = build(&txs);
            let decoded = LogIndex::decode(&index.to_bytes()).unwrap();
            prop_assert_eq!(&decoded, &index);
            // The decoded index behaves the same.
            for (s, v) in index.streams() {
                prop_assert_eq!(decoded.version(s), v);
                prop_assert_eq!(
                    decoded.positions(s, 1, usize::MAX, u64::MAX),
                    index.positions(s, 1, usize::MAX, u64::MAX)
                );
            }
            prop_assert_eq!(decoded.key_count(), index.key_count());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = LogIndex::decode(&bytes);
            let mut prefixed = b"SXI\x01".to_vec();
            prefixed.extend_from_slice(&bytes);
            let _ = LogIndex::decode(&prefixed);
        }

        #[test]
        fn damaged_encodings_never_panic(
            txs in txs(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cut in any::<usize>(),
        ) {
            let mut bytes = build(&txs).to_bytes();
            for (at, x) in flips {
                let n = bytes.len();
                bytes[at % n] ^= x;
            }
            let _ = LogIndex::decode(&bytes);
            let n = bytes.len();
            let _ = LogIndex::decode(&bytes[..cut % (n + 1)]);
        }
    }
}
