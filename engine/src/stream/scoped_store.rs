//! [`ScopedStore`]: one [`KeyValueStore`] shared by several runners, each
//! seeing only its own keyspaces.

use std::ops::Bound;
use std::sync::Arc;

use super::store::{
    check_keyspace, ChangelogEntry, Entries, KeyValueStore, StoreError, StoreLimits, WriteBatch,
};

/// A view of a store in which every keyspace name gets a fixed prefix.
///
/// Topologies name their stores with constants (the reaction pipeline's
/// `reaction-seen`, say); two runners of the same topology on one store
/// would share those keyspaces. Giving each runner a `ScopedStore` with its
/// own prefix (`"c-17/"`) keeps them apart while their commits stay
/// atomic batches of the one underlying store.
///
/// The changelog is the underlying store's: entries name the prefixed
/// keyspaces, and truncating it truncates it for every scope.
#[derive(Clone)]
pub struct ScopedStore {
    inner: Arc<dyn KeyValueStore>,
    prefix: String,
}

impl std::fmt::Debug for ScopedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl ScopedStore {
    /// A view of `inner` whose keyspaces are `prefix` + the name asked
    /// for. The prefix must itself be a valid keyspace name.
    pub fn new(
        inner: Arc<dyn KeyValueStore>,
        prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let prefix = prefix.into();
        check_keyspace(&prefix)?;
        Ok(Self { inner, prefix })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn space(&self, space: &str) -> Result<String, StoreError> {
        let name = format!("{}{space}", self.prefix);
        check_keyspace(&name)?;
        Ok(name)
    }
}

impl KeyValueStore for ScopedStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(&self.space(space)?, key)
    }

    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        self.inner.range(&self.space(space)?, start, end, max)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut scoped = WriteBatch::new();
        for (space, key, value) in batch.iter() {
            let space = self.space(space)?;
            match value {
                Some(v) => scoped.put(&space, key, v),
                None => scoped.delete(&space, key),
            }
        }
        self.inner.write(&scoped)
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.inner.changelog(from, max)
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.inner.changelog_bounds()
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        self.inner.truncate_changelog(before)
    }

    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    fn writes_block(&self) -> bool {
        self.inner.writes_block()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::InMemoryStore;

    #[test]
    fn scopes_do_not_see_each_other() {
        let inner: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
        let a = ScopedStore::new(Arc::clone(&inner), "a/").unwrap();
        let b = ScopedStore::new(Arc::clone(&inner), "b/").unwrap();
        a.put("seen", b"k", b"1").unwrap();
        b.put("seen", b"k", b"2").unwrap();
        assert_eq!(a.get("seen", b"k").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(b.get("seen", b"k").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(
            inner.get("a/seen", b"k").unwrap().as_deref(),
            Some(&b"1"[..])
        );
        let all = a
            .range("seen", Bound::Unbounded, Bound::Unbounded, 10)
            .unwrap();
        assert_eq!(all, vec![(b"k".to_vec(), b"1".to_vec())]);
        b.delete("seen", b"k").unwrap();
        assert!(b.get("seen", b"k").unwrap().is_none());
        assert!(a.get("seen", b"k").unwrap().is_some());
        assert!(ScopedStore::new(inner, "bad prefix").is_err());
    }
}
