//! The [`KeyValueStore`] port: named keyspaces of ordered byte keys, atomic
//! write batches, and a changelog of every committed change.
//!
//! One store instance is a small database: each operator of a topology
//! (a table, a window store) and the runner's bookkeeping (checkpoints, the
//! outbox) use their own *keyspace* in it, and one [`WriteBatch`] can change
//! several keyspaces atomically. That is what makes exactly-once possible:
//! a processing step's state changes, its outputs and its input position
//! are one batch (see [`super::StreamRunner`]).
//!
//! Every committed change is also appended to the store's changelog, with a
//! gap-free sequence number, in the same atomic write; a fresh store can be
//! rebuilt from it ([`restore_from_changelog`]), and whoever ships it
//! elsewhere (a standby, a broker topic) truncates what it has shipped.

use std::ops::Bound;

use crate::error::BackendError;

/// Why a store operation failed. Nothing was written in every case but
/// [`StoreError::Backend`], where a durable backend may or may not have
/// committed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A keyspace name is empty, too long or holds a character outside
    /// ASCII letters, digits and `-_.:/@`.
    #[error("bad keyspace name {name:?}: {reason}")]
    BadKeyspace {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A key is longer than [`StoreLimits::max_key_bytes`].
    #[error("key is {len} bytes; the limit is {max}")]
    KeyTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value is longer than [`StoreLimits::max_value_bytes`].
    #[error("value is {len} bytes; the limit is {max}")]
    ValueTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A batch holds more operations than [`StoreLimits::max_batch_ops`].
    #[error("batch holds {ops} operations; the limit is {max}")]
    BatchTooLarge {
        /// Operations in it.
        ops: usize,
        /// The limit.
        max: usize,
    },
    /// A range or changelog read asks for more than
    /// [`StoreLimits::max_read`] entries.
    #[error("read asks for {requested} entries; the limit is {max}")]
    ReadTooLarge {
        /// Entries asked for.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// The changelog no longer holds entries from the requested sequence
    /// number (it was truncated), or the truncation point is beyond the
    /// changelog's head.
    #[error("changelog holds sequence numbers {first}..{head}; {requested} was asked for")]
    ChangelogRange {
        /// The sequence number asked for.
        requested: u64,
        /// The first sequence number still held.
        first: u64,
        /// One past the last sequence number written.
        head: u64,
    },
    /// A batch's encoding is larger than the backend can commit at once
    /// (a [`super::LogStore`] batch must fit one log transaction).
    #[error("the batch encodes to {bytes} bytes; the limit is {max}")]
    EncodedTooLarge {
        /// Its encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Stored bytes are damaged (the backend's own framing failed).
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// The backend failed (I/O, database error).
    #[error("store backend failure: {0}")]
    Backend(#[from] BackendError),
}

/// The maxima a store enforces; checked before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreLimits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest value, in bytes.
    pub max_value_bytes: usize,
    /// Most operations in one batch.
    pub max_batch_ops: usize,
    /// Most entries one `range` or `changelog` call may ask for.
    pub max_read: usize,
    /// Changelog retention: a store keeps at least the newest this many
    /// changelog entries and drops older whole batches as it writes (as if
    /// [`KeyValueStore::truncate_changelog`] were called), so the changelog
    /// does not grow with the store's lifetime. Default 1,000,000.
    pub max_changelog_entries: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: 4 << 10,
            max_value_bytes: 4 << 20,
            max_batch_ops: 1_000_000,
            max_read: 100_000,
            max_changelog_entries: 1_000_000,
        }
    }
}

impl StoreLimits {
    /// Checks a batch against these limits and keyspace names.
    pub fn check_batch(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if batch.ops.len() > self.max_batch_ops {
            return Err(StoreError::BatchTooLarge {
                ops: batch.ops.len(),
                max: self.max_batch_ops,
            });
        }
        for s in &batch.spaces {
            check_keyspace(s)?;
        }
        for op in &batch.ops {
            self.check_key(&op.key)?;
            if let Some(v) = &op.value {
                if v.len() > self.max_value_bytes {
                    return Err(StoreError::ValueTooLarge {
                        len: v.len(),
                        max: self.max_value_bytes,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks one key's length.
    pub fn check_key(&self, key: &[u8]) -> Result<(), StoreError> {
        if key.len() > self.max_key_bytes {
            return Err(StoreError::KeyTooLarge {
                len: key.len(),
                max: self.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Checks the size of a read.
    pub fn check_read(&self, max: usize) -> Result<(), StoreError> {
        if max > self.max_read {
            return Err(StoreError::ReadTooLarge {
                requested: max,
                max: self.max_read,
            });
        }
        Ok(())
    }
}

/// The longest keyspace name, in bytes.
pub const MAX_KEYSPACE_LEN: usize = 96;

/// Checks a keyspace name: 1 to [`MAX_KEYSPACE_LEN`] bytes of ASCII
/// letters, digits and `-_.:/@`.
pub fn check_keyspace(name: &str) -> Result<(), StoreError> {
    let bad = |reason| StoreError::BadKeyspace {
        name: name.chars().take(200).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_KEYSPACE_LEN {
        return Err(bad("longer than 96 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
    {
        return Err(bad("allowed: ASCII letters, digits and -_.:/@"));
    }
    Ok(())
}

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOp {
    /// Index into [`WriteBatch::spaces`].
    pub space: u16,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` to delete.
    pub value: Option<Vec<u8>>,
}

/// Changes to apply atomically, in order (a later change to the same key
/// wins), across any keyspaces of one store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The keyspaces the batch touches.
    pub spaces: Vec<String>,
    /// The changes.
    pub ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    fn space(&mut self, space: &str) -> u16 {
        if let Some(i) = self.spaces.iter().rposition(|s| s == space) {
            return i as u16;
        }
        // More than 65,535 keyspaces in one batch is not a real use; the
        // excess ones share the last index and fail the keyspace check of
        // nothing, so cap instead of panicking.
        if self.spaces.len() >= usize::from(u16::MAX) {
            return u16::MAX - 1;
        }
        self.spaces.push(space.to_owned());
        (self.spaces.len() - 1) as u16
    }

    /// Sets `key` to `value` in `space`.
    pub fn put(&mut self, space: &str, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        let space = self.space(space);
        self.ops.push(BatchOp {
            space,
            key: key.into(),
            value: Some(value.into()),
        });
    }

    /// Removes `key` from `space` (nothing if absent).
    pub fn delete(&mut self, space: &str, key: impl Into<Vec<u8>>) {
        let space = self.space(space);
        self.ops.push(BatchOp {
            space,
            key: key.into(),
            value: None,
        });
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no changes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The changes with their keyspace names.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8], Option<&[u8]>)> + '_ {
        self.ops.iter().map(|op| {
            (
                self.spaces[usize::from(op.space)].as_str(),
                op.key.as_slice(),
                op.value.as_deref(),
            )
        })
    }
}

/// One committed change, as the changelog records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogEntry {
    /// Gap-free sequence number, from 0.
    pub seq: u64,
    /// The keyspace.
    pub space: String,
    /// The key.
    pub key: Vec<u8>,
    /// The new value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// Keys and values of a range read.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key-value store with keyspaces, atomic batches and a
/// changelog.
///
/// One store is a small database: each operator of a topology and the
/// runner's bookkeeping (checkpoint, outbox) use their own *keyspace*, and
/// one [`WriteBatch`] changes several keyspaces atomically — which is what
/// makes a [`super::StreamRunner`] commit exactly-once.
///
/// Guarantees every implementation gives (checked by
/// `testkit::kv_store_conformance`):
///
/// - `write` applies the whole batch or nothing, and, for a durable store,
///   returns only once it is durable;
/// - keys are ordered bytewise within a keyspace; keyspaces are
///   independent (a key in one is never seen in another);
/// - each change of a committed batch is appended to the changelog, in
///   batch order, with consecutive sequence numbers from 0, atomically with
///   the batch; [`restore_from_changelog`] into an empty store rebuilds the
///   same contents;
/// - limits ([`StoreLimits`]) and keyspace names are checked before anything
///   is written, with a typed error.
///
/// The trait is synchronous (embedded stores answer from memory or a local
/// file) and dyn-compatible.
pub trait KeyValueStore: Send + Sync {
    /// The value of `key` in `space`.
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// At most `max` entries of `space` with keys within `(start, end)`, in
    /// key order.
    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError>;

    /// Applies `batch` atomically (and durably, for a durable store), and
    /// appends its changes to the changelog.
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError>;

    /// Sets one key (a batch of one).
    fn put(&self, space: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut b = WriteBatch::new();
        b.put(space, key, value);
        self.write(&b)
    }

    /// Removes one key (a batch of one).
    fn delete(&self, space: &str, key: &[u8]) -> Result<(), StoreError> {
        let mut b = WriteBatch::new();
        b.delete(space, key);
        self.write(&b)
    }

    /// At most `max` changelog entries with sequence number ≥ `from`, in
    /// order. Asking below the first entry still held is
    /// [`StoreError::ChangelogRange`].
    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError>;

    /// `(first, head)`: the first sequence number still held and one past
    /// the last one written (equal when the changelog holds nothing).
    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError>;

    /// Drops changelog entries below `before` (at most the head); the store
    /// itself is unchanged.
    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError>;

    /// The limits this store enforces.
    fn limits(&self) -> StoreLimits {
        StoreLimits::default()
    }

    /// Whether [`write`](Self::write) blocks the calling thread on I/O (a
    /// file commit, an fsync). The stream runner then commits on tokio's
    /// blocking pool rather than on an async worker thread. Default `true`;
    /// a store in memory says `false`.
    fn writes_block(&self) -> bool {
        true
    }
}

impl<S: KeyValueStore + ?Sized> KeyValueStore for std::sync::Arc<S> {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(space, key)
    }
    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        (**self).range(space, start, end, max)
    }
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        (**self).write(batch)
    }
    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        (**self).changelog(from, max)
    }
    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        (**self).changelog_bounds()
    }
    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        (**self).truncate_changelog(before)
    }
    fn limits(&self) -> StoreLimits {
        (**self).limits()
    }
    fn writes_block(&self) -> bool {
        (**self).writes_block()
    }
}

/// Reads every entry of `space` (in pages of the store's read limit).
pub fn scan_all(store: &dyn KeyValueStore, space: &str) -> Result<Entries, StoreError> {
    let page = store.limits().max_read.clamp(1, 10_000);
    let mut out: Entries = Vec::new();
    loop {
        let got = match out.last() {
            None => store.range(space, Bound::Unbounded, Bound::Unbounded, page)?,
            Some((k, _)) => {
                let k = k.clone();
                store.range(space, Bound::Excluded(&k), Bound::Unbounded, page)?
            }
        };
        let done = got.len() < page;
        out.extend(got);
        if done {
            return Ok(out);
        }
    }
}

/// Rebuilds `target` from `source`'s changelog (from its first held entry):
/// applies the entries in order, in batches. Returns the number of entries
/// applied. `target` should be empty (or hold what the truncated part of the
/// changelog wrote).
pub fn restore_from_changelog(
    target: &dyn KeyValueStore,
    source: &dyn KeyValueStore,
) -> Result<u64, StoreError> {
    let (mut at, head) = source.changelog_bounds()?;
    let page = source
        .limits()
        .max_read
        .min(target.limits().max_batch_ops)
        .clamp(1, 10_000);
    let mut applied = 0u64;
    while at < head {
        let entries = source.changelog(at, page)?;
        let Some(last) = entries.last() else { break };
        at = last.seq + 1;
        let mut batch = WriteBatch::new();
        for e in entries {
            match e.value {
                Some(v) => batch.put(&e.space, e.key, v),
                None => batch.delete(&e.space, e.key),
            }
        }
        applied += batch.len() as u64;
        target.write(&batch)?;
    }
    Ok(applied)
}

/// Helpers for stores that keep every keyspace in one ordered table: a key
/// is stored as `[len(space)] space key`, so each keyspace is one
/// contiguous, bytewise-ordered range.
pub mod prefixed {
    use std::ops::Bound;

    /// The stored key of `key` in `space`.
    pub fn key(space: &str, key: &[u8]) -> Vec<u8> {
        let mut k = prefix(space);
        k.extend_from_slice(key);
        k
    }

    /// The prefix every key of `space` starts with.
    pub fn prefix(space: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(1 + space.len() + 16);
        // Keyspace names are at most 96 bytes (checked before use).
        k.push(space.len().min(255) as u8);
        k.extend_from_slice(space.as_bytes());
        k
    }

    /// The stored-key bounds of the range `(start, end)` of `space`.
    pub fn bounds(
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
        let p = prefix(space);
        let lo = match start {
            Bound::Included(s) => Bound::Included(join(&p, s)),
            Bound::Excluded(s) => Bound::Excluded(join(&p, s)),
            Bound::Unbounded => Bound::Included(p.clone()),
        };
        let hi = match end {
            Bound::Included(e) => Bound::Included(join(&p, e)),
            Bound::Excluded(e) => Bound::Excluded(join(&p, e)),
            Bound::Unbounded => match successor(&p) {
                Some(s) => Bound::Excluded(s),
                None => Bound::Unbounded,
            },
        };
        (lo, hi)
    }

    fn join(p: &[u8], k: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(p.len() + k.len());
        v.extend_from_slice(p);
        v.extend_from_slice(k);
        v
    }

    /// The smallest byte string greater than every string starting with
    /// `p`, if there is one.
    pub fn successor(p: &[u8]) -> Option<Vec<u8>> {
        let mut s = p.to_vec();
        while let Some(last) = s.pop() {
            if last < 0xFF {
                s.push(last + 1);
                return Some(s);
            }
        }
        None
    }

    /// Strips the keyspace prefix from a stored key.
    pub fn strip<'a>(space: &str, stored: &'a [u8]) -> &'a [u8] {
        stored.get(1 + space.len()..).unwrap_or(&[])
    }

    /// Whether a range's bounds are empty or inverted (nothing to read).
    pub fn is_empty_range(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
        match (start, end) {
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e))
            | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
            _ => false,
        }
    }
}

/// A compact encoding of one committed batch's changelog entries as a
/// single blob, for stores that keep the changelog as one row per batch
/// (keyed by the batch's first sequence number) rather than one row per
/// change: `count (u32 BE)`, then per change `space`, `key` (each with a
/// u32 BE length), a tag (0 delete, 1 put) and, for a put, the value with
/// its length.
pub mod changelog_blob {
    use super::{ChangelogEntry, StoreError, WriteBatch};
    use crate::stream::codec::Reader;

    /// Encodes `batch`'s changes.
    pub fn encode(batch: &WriteBatch) -> Vec<u8> {
        let mut size = 4;
        for (s, k, v) in batch.iter() {
            size += 13 + s.len() + k.len() + v.map_or(0, <[u8]>::len);
        }
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&(batch.len() as u32).to_be_bytes());
        for (s, k, v) in batch.iter() {
            put(&mut out, s.as_bytes());
            put(&mut out, k);
            match v {
                None => out.push(0),
                Some(v) => {
                    out.push(1);
                    put(&mut out, v);
                }
            }
        }
        out
    }

    fn put(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }

    /// The number of changes in a blob.
    pub fn count(blob: &[u8]) -> Result<u64, StoreError> {
        let mut r = Reader::new(blob);
        let n = r
            .array::<4>("changelog blob")
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(u64::from(u32::from_be_bytes(n)))
    }

    /// Decodes the entries of the blob whose first change is `first_seq`,
    /// keeping those with sequence numbers in `from..until`, at most `max`
    /// of them, appended to `out`.
    pub fn decode_into(
        first_seq: u64,
        blob: &[u8],
        from: u64,
        until: u64,
        max: usize,
        out: &mut Vec<ChangelogEntry>,
    ) -> Result<(), StoreError> {
        let bad = |e: crate::stream::codec::CodecError| {
            StoreError::Corrupt(format!("changelog blob at {first_seq}: {e}"))
        };
        let mut r = Reader::new(blob);
        let n = u32::from_be_bytes(r.array("changelog blob").map_err(bad)?);
        for i in 0..u64::from(n) {
            if out.len() >= max {
                return Ok(());
            }
            let seq = first_seq + i;
            let space = r.prefixed("space").map_err(bad)?;
            let key = r.prefixed("key").map_err(bad)?;
            let value = match r.array::<1>("tag").map_err(bad)?[0] {
                0 => None,
                1 => Some(r.prefixed("value").map_err(bad)?),
                t => {
                    return Err(StoreError::Corrupt(format!(
                        "changelog blob at {first_seq}: tag {t}"
                    )))
                }
            };
            if seq >= until {
                return Ok(());
            }
            if seq >= from {
                out.push(ChangelogEntry {
                    seq,
                    space: String::from_utf8_lossy(space).into_owned(),
                    key: key.to_vec(),
                    value: value.map(<[u8]>::to_vec),
                });
            }
        }
        Ok(())
    }
}
