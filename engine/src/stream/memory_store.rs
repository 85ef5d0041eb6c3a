//! [`InMemoryStore`]: the [`KeyValueStore`] in process memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::RwLock;

use super::store::{
    check_keyspace, prefixed, ChangelogEntry, Entries, KeyValueStore, StoreError, StoreLimits,
    WriteBatch,
};

#[derive(Default)]
struct Inner {
    spaces: HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    changelog: VecDeque<ChangelogEntry>,
    /// Sequence number of `changelog[0]` (or the head when it is empty).
    first: u64,
}

impl Inner {
    fn head(&self) -> u64 {
        self.first + self.changelog.len() as u64
    }

    /// Drops the changelog entries below `before` (at most the head).
    fn drop_below(&mut self, before: u64) {
        while self.first < before && self.changelog.pop_front().is_some() {
            self.first += 1;
        }
    }
}

/// A [`KeyValueStore`] in memory: a `BTreeMap` per keyspace and the
/// changelog in a deque. For tests, the [`super::TestDriver`] and the fastest
/// non-durable pipelines; nothing survives the process.
pub struct InMemoryStore {
    inner: RwLock<Inner>,
    limits: StoreLimits,
    keep_changelog: bool,
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.read();
        f.debug_struct("InMemoryStore")
            .field("keyspaces", &inner.spaces.len())
            .field("changelog", &(inner.first, inner.head()))
            .finish()
    }
}

impl InMemoryStore {
    /// An empty store with default limits.
    pub fn new() -> Self {
        Self::with_limits(StoreLimits::default())
    }

    /// An empty store with the given limits.
    pub fn with_limits(limits: StoreLimits) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            limits,
            keep_changelog: true,
        }
    }

    /// A store whose changelog keeps sequence numbers but drops entries as
    /// soon as they are written (as if truncated after every write): for
    /// benchmarks and pipelines whose state needs no rebuilding.
    pub fn without_changelog_retention() -> Self {
        Self {
            keep_changelog: false,
            ..Self::new()
        }
    }

    // A panic while holding the lock cannot leave a batch half-applied:
    // batches are checked first and applied with infallible map operations.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of keys in `space`.
    pub fn len(&self, space: &str) -> usize {
        self.read().spaces.get(space).map_or(0, BTreeMap::len)
    }

    /// Whether every keyspace is empty.
    pub fn is_empty(&self) -> bool {
        self.read().spaces.values().all(BTreeMap::is_empty)
    }
}

impl KeyValueStore for InMemoryStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        check_keyspace(space)?;
        self.limits.check_key(key)?;
        Ok(self
            .read()
            .spaces
            .get(space)
            .and_then(|m| m.get(key))
            .cloned())
    }

    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        check_keyspace(space)?;
        self.limits.check_read(max)?;
        if max == 0 || prefixed::is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let inner = self.read();
        let Some(m) = inner.spaces.get(space) else {
            return Ok(Vec::new());
        };
        Ok(m.range::<[u8], _>((start, end))
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        self.limits.check_batch(batch)?;
        let mut inner = self.write_lock();
        let inner = &mut *inner;
        for (space, key, value) in batch.iter() {
            let m = match inner.spaces.get_mut(space) {
                Some(m) => m,
                None => inner.spaces.entry(space.to_owned()).or_default(),
            };
            match value {
                Some(v) => {
                    m.insert(key.to_vec(), v.to_vec());
                }
                None => {
                    m.remove(key);
                }
            }
            let seq = inner.first + inner.changelog.len() as u64;
            if self.keep_changelog {
                inner.changelog.push_back(ChangelogEntry {
                    seq,
                    space: space.to_owned(),
                    key: key.to_vec(),
                    value: value.map(<[u8]>::to_vec),
                });
            } else {
                inner.first = seq + 1;
            }
        }
        // Retention (see `StoreLimits::max_changelog_entries`).
        let keep_from = inner
            .head()
            .saturating_sub(self.limits.max_changelog_entries);
        inner.drop_below(keep_from);
        Ok(())
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.limits.check_read(max)?;
        let inner = self.read();
        let head = inner.head();
        if from < inner.first || from > head {
            return Err(StoreError::ChangelogRange {
                requested: from,
                first: inner.first,
                head,
            });
        }
        let skip = (from - inner.first) as usize;
        Ok(inner
            .changelog
            .iter()
            .skip(skip)
            .take(max)
            .cloned()
            .collect())
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        let inner = self.read();
        Ok((inner.first, inner.head()))
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        let mut inner = self.write_lock();
        let head = inner.head();
        if before > head {
            return Err(StoreError::ChangelogRange {
                requested: before,
                first: inner.first,
                head,
            });
        }
        inner.drop_below(before);
        Ok(())
    }

    fn limits(&self) -> StoreLimits {
        self.limits
    }

    fn writes_block(&self) -> bool {
        false
    }
}
