//! # smartmsg-sled
//!
//! An alternative embedded state store: [`SledStore`], the engine's
//! [`KeyValueStore`] on [sled](https://docs.rs/sled/0.34). It passes the
//! same conformance suite as the in-memory and redb stores
//! (`smartmsg_engine::testkit::kv_store_conformance`), so a stream
//! processor can swap one for the other.
//!
//! Layout: one sled tree holds the data (keys `0x01 [len] keyspace key`),
//! the changelog (`0x02 seq`, one row per batch) and its bounds (`0x03 first|head`); a
//! [`WriteBatch`] becomes one atomic `apply_batch` (writers are serialised
//! so changelog sequence numbers stay gap-free), followed by a `flush`
//! (fsync) when the store is durable.
#![forbid(unsafe_code)]

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use smartmsg_engine::stream::{
    changelog_blob, check_keyspace, prefixed, ChangelogEntry, Entries, KeyValueStore, StoreError,
    StoreLimits, WriteBatch,
};
use smartmsg_engine::BackendError;

/// What went wrong in the sled store. Reaches callers inside
/// [`StoreError::Backend`]; downcast to match on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SledError {
    /// sled failed.
    #[error("sled {path}: {reason}")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// sled's error, as text.
        reason: String,
    },
}

/// How a [`SledStore`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SledStoreConfig {
    /// Limits checked before every write and read.
    pub limits: StoreLimits,
    /// Flush (fsync) every batch before `write` returns (the default).
    pub durable: bool,
}

impl Default for SledStoreConfig {
    fn default() -> Self {
        Self {
            limits: StoreLimits::default(),
            durable: true,
        }
    }
}

/// A [`KeyValueStore`] on sled. See the [crate docs](crate).
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    config: SledStoreConfig,
    writer: Mutex<()>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

const DATA: u8 = 1;
const LOG: u8 = 2;
const BOUNDS: u8 = 3;
const FIRST: &[u8] = &[BOUNDS, b'f'];
const HEAD: &[u8] = &[BOUNDS, b'h'];

fn data_key(space: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + space.len() + key.len());
    k.push(DATA);
    k.extend_from_slice(&prefixed::key(space, key));
    k
}

fn log_key(seq: u64) -> [u8; 9] {
    let mut k = [LOG; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> Result<u64, StoreError> {
    let seq: [u8; 8] = k
        .get(1..9)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("changelog key".into()))?;
    Ok(u64::from_be_bytes(seq))
}

fn with_tag(b: Bound<Vec<u8>>) -> Bound<Vec<u8>> {
    let tag = |mut v: Vec<u8>| {
        v.insert(0, DATA);
        v
    };
    match b {
        Bound::Included(v) => Bound::Included(tag(v)),
        Bound::Excluded(v) => Bound::Excluded(tag(v)),
        // The prefix successor is unbounded only for a keyspace of 0xFF
        // bytes, which names never are; stay within the data tag anyway.
        Bound::Unbounded => Bound::Excluded(vec![DATA + 1]),
    }
}

impl SledStore {
    /// Opens (or creates) the store in directory `path`, durable.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SledError> {
        Self::open_with(path, SledStoreConfig::default())
    }

    /// Opens (or creates) the store in directory `path` (waiting up to 2 s
    /// for a handle closed in this process to release sled's lock).
    pub fn open_with(path: impl AsRef<Path>, config: SledStoreConfig) -> Result<Self, SledError> {
        let path = path.as_ref().to_owned();
        // sled releases its file lock from a background thread shortly after
        // the last handle of a closed database is dropped: retry a reopen in
        // the same process for a little while.
        let mut tries = 0;
        let db = loop {
            // No background flusher: durable writes flush themselves, and
            // without the thread a dropped database releases its lock at
            // once.
            match sled::Config::new().path(&path).flush_every_ms(None).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && tries < 200 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(SledError::Sled {
                        path,
                        reason: e.to_string(),
                    })
                }
            }
        };
        Ok(Self {
            db,
            path,
            config,
            writer: Mutex::new(()),
        })
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(BackendError::new(SledError::Sled {
            path: self.path.clone(),
            reason: e.to_string(),
        }))
    }

    fn read_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        match self.db.get(key).map_err(|e| self.err(e))? {
            None => Ok(0),
            Some(v) => {
                let a: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    StoreError::Corrupt(format!("changelog bound of {} bytes", v.len()))
                })?;
                Ok(u64::from_be_bytes(a))
            }
        }
    }

    fn bounds(&self) -> Result<(u64, u64), StoreError> {
        Ok((self.read_u64(FIRST)?, self.read_u64(HEAD)?))
    }

    /// Adds to `b` the removal of the changelog batches wholly below
    /// `before` and moves `first` to it; a batch that straddles it stays
    /// (reads skip its entries below `first`).
    fn drop_below(&self, b: &mut sled::Batch, before: u64) -> Result<(), StoreError> {
        for item in self.db.range(log_key(0)..log_key(before)) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if seq_of(&k)? + changelog_blob::count(&v)? <= before {
                b.remove(k);
            }
        }
        b.insert(FIRST, &before.to_be_bytes()[..]);
        Ok(())
    }

    fn finish(&self) -> Result<(), StoreError> {
        if self.config.durable {
            self.db.flush().map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        // Best effort: a non-durable store keeps what it can on a clean
        // close. Errors cannot be reported from drop.
        let _ = self.db.flush();
    }
}

impl KeyValueStore for SledStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_keyspace(space)?;
        self.config.limits.check_key(key)?;
        Ok(self
            .db
            .get(data_key(space, key))
            .map_err(|e| self.err(e))?
            .map(|v| v.to_vec()))
    }

    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        check_keyspace(space)?;
        self.config.limits.check_read(max)?;
        if max == 0 || prefixed::is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let (lo, hi) = prefixed::bounds(space, start, end);
        let mut out = Vec::new();
        for item in self.db.range::<Vec<u8>, _>((with_tag(lo), with_tag(hi))) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let k = k.get(1..).unwrap_or(&[]);
            out.push((prefixed::strip(space, k).to_vec(), v.to_vec()));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.config.limits.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        // Serialise writers: sequence numbers come from the head read here.
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (first, mut head) = self.bounds()?;
        let mut b = sled::Batch::default();
        for (space, key, value) in batch.iter() {
            let k = data_key(space, key);
            match value {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b.insert(&log_key(head)[..], changelog_blob::encode(batch));
        head += batch.len() as u64;
        b.insert(HEAD, &head.to_be_bytes()[..]);
        // Retention: keep the newest `max_changelog_entries`, dropping whole
        // older batches in the same atomic batch.
        let keep = self.config.limits.max_changelog_entries;
        if head.saturating_sub(first) > keep {
            self.drop_below(&mut b, head - keep)?;
        }
        self.db.apply_batch(b).map_err(|e| self.err(e))?;
        self.finish()
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.config.limits.check_read(max)?;
        let (first, head) = self.bounds()?;
        if from < first || from > head {
            return Err(StoreError::ChangelogRange {
                requested: from,
                first,
                head,
            });
        }
        // The batch holding `from` starts at or before it.
        let start = match self.db.range(log_key(0)..=log_key(from)).next_back() {
            Some(item) => seq_of(&item.map_err(|e| self.err(e))?.0)?,
            None => from,
        };
        let mut out = Vec::new();
        for item in self.db.range(log_key(start)..log_key(head)) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item.map_err(|e| self.err(e))?;
            changelog_blob::decode_into(seq_of(&k)?, &v, from, head, max, &mut out)?;
        }
        Ok(out)
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.bounds()
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        let _guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let (first, head) = self.bounds()?;
        if before > head {
            return Err(StoreError::ChangelogRange {
                requested: before,
                first,
                head,
            });
        }
        if before <= first {
            return Ok(());
        }
        let mut b = sled::Batch::default();
        self.drop_below(&mut b, before)?;
        self.db.apply_batch(b).map_err(|e| self.err(e))?;
        self.finish()
    }

    fn limits(&self) -> StoreLimits {
        self.config.limits
    }
}
