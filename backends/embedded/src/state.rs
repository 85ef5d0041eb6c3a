//! [`RedbStore`]: the stream-processing [`KeyValueStore`] in a redb file.
//!
//! Three tables: the data (every keyspace in one table, keys prefixed with
//! their keyspace so each is one contiguous range), the changelog
//! (one row per batch: its first sequence number → its changes) and the
//! changelog bounds. A
//! [`WriteBatch`] is one redb write transaction that updates all three, so
//! the data and its changelog never disagree, and a
//! [`smartmsg_engine::stream::StreamRunner`] commit (state, outbox and
//! checkpoint in one batch) is atomic and durable when `write` returns.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use smartmsg_engine::stream::{
    changelog_blob, check_keyspace, prefixed, ChangelogEntry, Entries, KeyValueStore, StoreError,
    StoreLimits, WriteBatch,
};
use smartmsg_engine::BackendError;

use crate::error::EmbeddedError;
use crate::storage::{contained, open_db, redb_error};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("stream_kv");
/// First sequence number of a batch → its changes ([`changelog_blob`]).
const CHANGELOG: TableDefinition<u64, &[u8]> = TableDefinition::new("stream_changelog");
/// "first" and "head" of the changelog.
const BOUNDS: TableDefinition<&str, u64> = TableDefinition::new("stream_changelog_bounds");

/// How a [`RedbStore`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbStoreConfig {
    /// Limits checked before every write and read.
    pub limits: StoreLimits,
    /// Make every batch durable before `write` returns (the default). Off,
    /// a crash may lose the latest batches (never part of one): for
    /// benchmarks and rebuildable state only.
    pub durable: bool,
    /// Verify every page when opening (redb's integrity check; slow on a
    /// large file). Off by default: after an unclean shutdown redb repairs
    /// and so verifies the file anyway; turn it on to find damage made while
    /// the file was closed (`smartmsg inspect` does).
    pub verify_on_open: bool,
    /// redb's page cache, in bytes. Default 64 MiB.
    pub cache_bytes: usize,
}

impl Default for RedbStoreConfig {
    fn default() -> Self {
        Self {
            limits: StoreLimits::default(),
            durable: true,
            verify_on_open: false,
            cache_bytes: 64 << 20,
        }
    }
}

/// A [`KeyValueStore`] in a redb file. See the [module docs](self).
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<redb::Database>,
    path: PathBuf,
    config: RedbStoreConfig,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v.as_slice()),
        Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, durable, default limits.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EmbeddedError> {
        Self::open_with(path, RedbStoreConfig::default())
    }

    /// Opens (or creates) the store at `path`.
    pub fn open_with(
        path: impl AsRef<Path>,
        config: RedbStoreConfig,
    ) -> Result<Self, EmbeddedError> {
        let path = path.as_ref().to_owned();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| EmbeddedError::io("create", parent, e))?;
            }
        }
        let redb = |e: &dyn std::fmt::Display| redb_error(&path, e);
        let db = open_db(&path, config.cache_bytes, config.verify_on_open)?;
        contained(&path, || -> Result<(), EmbeddedError> {
            let tx = db.begin_write().map_err(|e| redb(&e))?;
            {
                tx.open_table(DATA).map_err(|e| redb(&e))?;
                tx.open_table(CHANGELOG).map_err(|e| redb(&e))?;
                tx.open_table(BOUNDS).map_err(|e| redb(&e))?;
            }
            tx.commit().map_err(|e| redb(&e))
        })??;
        Ok(Self {
            db: Arc::new(db),
            path,
            config,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend(BackendError::new(EmbeddedError::Redb {
            path: self.path.clone(),
            reason: e.to_string(),
        }))
    }

    fn bounds_in(
        &self,
        t: &impl ReadableTable<&'static str, u64>,
    ) -> Result<(u64, u64), StoreError> {
        let first = t
            .get("first")
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        let head = t
            .get("head")
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        Ok((first, head))
    }
}

impl RedbStore {
    fn get_now(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_keyspace(space)?;
        self.config.limits.check_key(key)?;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(DATA).map_err(|e| self.err(e))?;
        let k = prefixed::key(space, key);
        Ok(t.get(k.as_slice())
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    fn range_now(
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
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(DATA).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for item in t
            .range::<&[u8]>((as_ref(&lo), as_ref(&hi)))
            .map_err(|e| self.err(e))?
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push((
                prefixed::strip(space, k.value()).to_vec(),
                v.value().to_vec(),
            ));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    fn write_now(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.config.limits.check_batch(batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        if !self.config.durable {
            tx.set_durability(Durability::None)
                .map_err(|e| self.err(e))?;
        }
        {
            let mut data = tx.open_table(DATA).map_err(|e| self.err(e))?;
            let mut log = tx.open_table(CHANGELOG).map_err(|e| self.err(e))?;
            let mut bounds = tx.open_table(BOUNDS).map_err(|e| self.err(e))?;
            let (first, mut head) = self.bounds_in(&bounds)?;
            let mut k = Vec::with_capacity(64);
            for (space, key, value) in batch.iter() {
                k.clear();
                k.push(space.len() as u8);
                k.extend_from_slice(space.as_bytes());
                k.extend_from_slice(key);
                match value {
                    Some(v) => {
                        data.insert(k.as_slice(), v).map_err(|e| self.err(e))?;
                    }
                    None => {
                        data.remove(k.as_slice()).map_err(|e| self.err(e))?;
                    }
                }
            }
            log.insert(head, changelog_blob::encode(batch).as_slice())
                .map_err(|e| self.err(e))?;
            head += batch.len() as u64;
            bounds.insert("head", head).map_err(|e| self.err(e))?;
            // Retention: keep the newest `max_changelog_entries`.
            let keep = self.config.limits.max_changelog_entries;
            if head.saturating_sub(first) > keep {
                self.drop_below(&mut log, &mut bounds, head - keep)?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn changelog_now(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.config.limits.check_read(max)?;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let bounds = tx.open_table(BOUNDS).map_err(|e| self.err(e))?;
        let (first, head) = self.bounds_in(&bounds)?;
        if from < first || from > head {
            return Err(StoreError::ChangelogRange {
                requested: from,
                first,
                head,
            });
        }
        let log = tx.open_table(CHANGELOG).map_err(|e| self.err(e))?;
        // The batch holding `from` starts at or before it.
        let start = match log.range(..=from).map_err(|e| self.err(e))?.next_back() {
            Some(item) => item.map_err(|e| self.err(e))?.0.value(),
            None => from,
        };
        let mut out = Vec::new();
        for item in log.range(start..head).map_err(|e| self.err(e))? {
            if out.len() >= max {
                break;
            }
            let (seq, v) = item.map_err(|e| self.err(e))?;
            changelog_blob::decode_into(seq.value(), v.value(), from, head, max, &mut out)?;
        }
        Ok(out)
    }

    fn changelog_bounds_now(&self) -> Result<(u64, u64), StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let bounds = tx.open_table(BOUNDS).map_err(|e| self.err(e))?;
        self.bounds_in(&bounds)
    }

    fn truncate_changelog_now(&self, before: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut bounds = tx.open_table(BOUNDS).map_err(|e| self.err(e))?;
            let (first, head) = self.bounds_in(&bounds)?;
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
            let mut log = tx.open_table(CHANGELOG).map_err(|e| self.err(e))?;
            self.drop_below(&mut log, &mut bounds, before)?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Drops the changelog batches wholly below `before` and moves `first`
    /// to it; a batch that straddles it stays (reads skip its entries below
    /// `first`).
    fn drop_below(
        &self,
        log: &mut redb::Table<'_, u64, &'static [u8]>,
        bounds: &mut redb::Table<'_, &'static str, u64>,
        before: u64,
    ) -> Result<(), StoreError> {
        let mut whole = Vec::new();
        for item in log.range(..before).map_err(|e| self.err(e))? {
            let (seq, v) = item.map_err(|e| self.err(e))?;
            if seq.value() + changelog_blob::count(v.value())? <= before {
                whole.push(seq.value());
            }
        }
        for seq in whole {
            log.remove(seq).map_err(|e| self.err(e))?;
        }
        bounds.insert("first", before).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Runs `f` with the storage library's panics contained.
    fn contained<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        contained(&self.path, f).unwrap_or_else(|e| Err(StoreError::Backend(BackendError::new(e))))
    }
}

/// Every call runs on the calling thread (the trait is synchronous: the
/// stream runner calls it from its own task) with the storage library's
/// panics contained and reported as [`EmbeddedError::StoragePanicked`].
impl KeyValueStore for RedbStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.contained(|| self.get_now(space, key))
    }

    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        self.contained(|| self.range_now(space, start, end, max))
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.contained(|| self.write_now(batch))
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.contained(|| self.changelog_now(from, max))
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.contained(|| self.changelog_bounds_now())
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        self.contained(|| self.truncate_changelog_now(before))
    }

    fn limits(&self) -> StoreLimits {
        self.config.limits
    }
}
