//! A [`KeyValueStore`] that keeps chosen keyspaces *packed*: each write's
//! changes to such a keyspace go into the store as one value (a blob of
//! the changes, in order) under the next number of a companion keyspace,
//! instead of one key per change.
//!
//! The reaction pipeline's user table gets a row for every user of every
//! batch, and its first-reaction table one for every user who reacts:
//! millions of keys over a campaign of millions of users, written a few
//! thousand at a time in user order and never read until a restart. In a
//! B-tree (redb) every such key lands on its own leaf, and each commit
//! rewrote a page per key: ~6 GB written for the 1 M-subscriber platform
//! and ~80 GB for 3 M, growing with the square of the audience as the
//! tree outgrew the commits. Packed, a commit writes its changes once, one
//! after the other.
//!
//! Reads of a packed keyspace (a restore scans it once) rebuild it: the
//! keys written plainly (by a store written before this wrapper) first,
//! then every blob in order, a later change to a key winning. The rebuilt
//! table is kept until the scan reaches its end or the next write.
//!
//! The changelog is the inner store's (blobs under the companion keyspace):
//! [`restore_from_changelog`](smartmsg_engine::stream::restore_from_changelog)
//! into an empty store and wrapping it in a `PackedStore` gives the same
//! tables back.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::stream::{
    prefixed, ChangelogEntry, Entries, KeyValueStore, StoreError, StoreLimits, WriteBatch,
};
use smartmsg_engine::BackendError;

/// The companion keyspace holding `space`'s blobs (keys: the blob's
/// number, big-endian `u64`, from 1).
pub fn blob_space(space: &str) -> String {
    format!("{space}.packed")
}

/// The keyspace holding the number of `space`'s next blob.
fn head_space(space: &str) -> String {
    format!("{space}.packed-head")
}

const HEAD_KEY: &[u8] = b"next";

/// The blob format's version (its first byte).
const VERSION: u8 = 1;
/// Most bytes of one blob (a write's changes to a keyspace go into as many
/// blobs as they need), unless the store's value limit is lower.
const BLOB_BYTES: usize = 1 << 20;
/// Blobs read at a time when rebuilding a keyspace.
const BLOBS_PER_READ: usize = 16;

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

struct Packed {
    name: String,
    blobs: String,
    head: String,
    /// The next blob's number, once read.
    next: Option<u64>,
    /// The rebuilt table, while a scan goes on.
    view: Option<Arc<Table>>,
}

/// See the [module docs](self).
pub struct PackedStore {
    inner: Arc<dyn KeyValueStore>,
    spaces: Vec<Mutex<Packed>>,
}

impl std::fmt::Debug for PackedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.spaces.iter().map(|p| lock(p).name.clone()).collect();
        f.debug_struct("PackedStore")
            .field("packed", &names)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(space: &str, reason: &str) -> StoreError {
    StoreError::Backend(BackendError::new(std::io::Error::other(format!(
        "packed keyspace {space}: {reason}"
    ))))
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

/// Appends one change to a blob.
fn encode(out: &mut Vec<u8>, key: &[u8], value: Option<&[u8]>) {
    put_u32(out, key.len());
    out.extend_from_slice(key);
    match value {
        Some(v) => {
            out.push(1);
            put_u32(out, v.len());
            out.extend_from_slice(v);
        }
        None => out.push(0),
    }
}

/// Bytes [`encode`] takes for a change.
fn encoded_len(key: &[u8], value: Option<&[u8]>) -> usize {
    4 + key.len() + 1 + value.map_or(0, |v| 4 + v.len())
}

/// Applies a blob's changes to `table`, in order. A blob that is cut
/// short or holds an unknown tag is a typed error, never a panic.
fn apply(space: &str, blob: &[u8], table: &mut Table) -> Result<(), StoreError> {
    let short = |e: InputError| corrupt(space, &format!("a blob is cut short: {e}"));
    let mut c = Input::new(blob);
    if c.u8("version").map_err(short)? != VERSION {
        return Err(corrupt(space, "a blob of an unknown version"));
    }
    while !c.is_empty() {
        let key = c.prefixed_u32_le("key").map_err(short)?.to_vec();
        match c.u8("change").map_err(short)? {
            0 => {
                table.remove(&key);
            }
            1 => {
                let value = c.prefixed_u32_le("value").map_err(short)?;
                table.insert(key, value.to_vec());
            }
            _ => {
                return Err(corrupt(
                    space,
                    "a change that is neither a put nor a delete",
                ))
            }
        }
    }
    Ok(())
}

impl PackedStore {
    /// `inner`, with `spaces` packed. Keyspace names must be valid and,
    /// with the suffix `.packed-head`, at most 96 bytes.
    pub fn new(inner: Arc<dyn KeyValueStore>, spaces: &[&str]) -> Self {
        Self {
            inner,
            spaces: spaces
                .iter()
                .map(|s| {
                    Mutex::new(Packed {
                        name: (*s).to_owned(),
                        blobs: blob_space(s),
                        head: head_space(s),
                        next: None,
                        view: None,
                    })
                })
                .collect(),
        }
    }

    fn packed(&self, space: &str) -> Option<&Mutex<Packed>> {
        self.spaces.iter().find(|p| lock(p).name == space)
    }

    /// The most bytes of one blob.
    fn blob_limit(&self) -> usize {
        BLOB_BYTES.min(self.inner.limits().max_value_bytes)
    }

    fn next_blob(&self, p: &mut Packed) -> Result<u64, StoreError> {
        if let Some(n) = p.next {
            return Ok(n);
        }
        let n = match self.inner.get(&p.head, HEAD_KEY)? {
            None => 1,
            Some(v) => {
                let b: [u8; 8] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt(&p.name, "the head is not 8 bytes"))?;
                u64::from_be_bytes(b)
            }
        };
        p.next = Some(n);
        Ok(n)
    }

    /// The keyspace's table, rebuilt (or the one a scan under way uses).
    fn view(&self, p: &mut Packed) -> Result<Arc<Table>, StoreError> {
        if let Some(v) = &p.view {
            return Ok(Arc::clone(v));
        }
        let mut table = Table::new();
        for (k, v) in smartmsg_engine::stream::scan_all(&*self.inner, &p.name)? {
            table.insert(k, v);
        }
        let page = BLOBS_PER_READ.min(self.inner.limits().max_read.max(1));
        let mut after: Option<Vec<u8>> = None;
        loop {
            let start = match &after {
                None => Bound::Unbounded,
                Some(k) => Bound::Excluded(k.as_slice()),
            };
            let blobs = self.inner.range(&p.blobs, start, Bound::Unbounded, page)?;
            for (_, blob) in &blobs {
                apply(&p.name, blob, &mut table)?;
            }
            if blobs.len() < page {
                break;
            }
            after = blobs.last().map(|(k, _)| k.clone());
        }
        let table = Arc::new(table);
        p.view = Some(Arc::clone(&table));
        Ok(table)
    }
}

impl KeyValueStore for PackedStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.packed(space) {
            None => self.inner.get(space, key),
            Some(p) => {
                self.inner.limits().check_key(key)?;
                Ok(self.view(&mut lock(p))?.get(key).cloned())
            }
        }
    }

    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        let Some(p) = self.packed(space) else {
            return self.inner.range(space, start, end, max);
        };
        let limits = self.inner.limits();
        limits.check_read(max)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        // An empty range (BTreeMap::range panics on one).
        if prefixed::is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        let mut p = lock(p);
        let table = self.view(&mut p)?;
        let out: Entries = table
            .range::<[u8], _>((start, end))
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if out.len() < max {
            // The scan reached the end: forget the rebuilt table.
            p.view = None;
        }
        Ok(out)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if self.spaces.is_empty() || !batch.spaces.iter().any(|s| self.packed(s).is_some()) {
            return self.inner.write(batch);
        }
        let limits = self.inner.limits();
        let max_blob = self.blob_limit();
        let mut guards: Vec<MutexGuard<'_, Packed>> = self.spaces.iter().map(|p| lock(p)).collect();
        // Per packed keyspace: its blobs so far (the last one open).
        let mut blobs: Vec<Vec<Vec<u8>>> = vec![Vec::new(); guards.len()];
        let mut out = WriteBatch::new();
        for (space, key, value) in batch.iter() {
            let Some(i) = guards.iter().position(|p| p.name == space) else {
                match value {
                    Some(v) => out.put(space, key, v),
                    None => out.delete(space, key),
                }
                continue;
            };
            limits.check_key(key)?;
            let need = encoded_len(key, value);
            if 1 + need > max_blob {
                return Err(StoreError::ValueTooLarge {
                    len: value.map_or(0, <[u8]>::len),
                    max: max_blob.saturating_sub(1 + encoded_len(key, Some(&[]))),
                });
            }
            let list = &mut blobs[i];
            if list.last().is_none_or(|b| b.len() + need > max_blob) {
                let mut b = Vec::with_capacity(max_blob.min(64 << 10));
                b.push(VERSION);
                list.push(b);
            }
            if let Some(b) = list.last_mut() {
                encode(b, key, value);
            }
        }
        let mut next = Vec::with_capacity(guards.len());
        for (p, list) in guards.iter_mut().zip(&blobs) {
            let mut n = self.next_blob(p)?;
            for b in list {
                out.put(&p.blobs, n.to_be_bytes(), b.as_slice());
                n += 1;
            }
            if !list.is_empty() {
                out.put(&p.head, HEAD_KEY, n.to_be_bytes());
            }
            next.push(n);
        }
        self.inner.write(&out)?;
        for (p, n) in guards.iter_mut().zip(next) {
            p.next = Some(n);
            p.view = None;
        }
        Ok(())
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
    use smartmsg_engine::stream::{restore_from_changelog, scan_all, InMemoryStore};

    /// A change: keyspace, key, value (`None`: delete).
    type Op<'a> = (&'a str, &'a [u8], Option<&'a [u8]>);

    fn batch(ops: &[Op<'_>]) -> WriteBatch {
        let mut b = WriteBatch::new();
        for &(s, k, v) in ops {
            match v {
                Some(v) => b.put(s, k, v),
                None => b.delete(s, k),
            }
        }
        b
    }

    /// A packed keyspace reads back like a plain one (scan, get, ranges),
    /// while the inner store holds one blob per write instead of a key
    /// per change.
    #[test]
    fn a_packed_keyspace_reads_back_like_a_plain_one() {
        let inner = Arc::new(InMemoryStore::new());
        let plain = InMemoryStore::new();
        let packed = PackedStore::new(inner.clone(), &["users"]);
        let writes = [
            batch(&[
                ("users", b"b", Some(b"1")),
                ("users", b"a", Some(b"2")),
                ("other", b"x", Some(b"3")),
                ("users", b"c", Some(b"4")),
            ]),
            batch(&[
                ("users", b"a", None),
                ("users", b"b", Some(b"5")),
                ("users", b"d", Some(b"6")),
                ("users", b"b", Some(b"7")),
            ]),
            batch(&[("other", b"y", Some(b"8"))]),
        ];
        for w in &writes {
            packed.write(w).unwrap();
            plain.write(w).unwrap();
        }
        for space in ["users", "other"] {
            assert_eq!(
                scan_all(&packed, space).unwrap(),
                scan_all(&plain, space).unwrap(),
                "{space}"
            );
        }
        assert_eq!(packed.get("users", b"b").unwrap(), Some(b"7".to_vec()));
        assert_eq!(packed.get("users", b"a").unwrap(), None);
        let r = |s: &dyn KeyValueStore| {
            s.range("users", Bound::Excluded(b"b"), Bound::Included(b"d"), 10)
                .unwrap()
        };
        assert_eq!(r(&packed), r(&plain));
        assert_eq!(
            packed
                .range("users", Bound::Included(b"c"), Bound::Excluded(b"c"), 10)
                .unwrap(),
            Vec::new()
        );
        // Two writes touched the packed keyspace: two blobs, no user key.
        assert_eq!(scan_all(&*inner, "users").unwrap(), Vec::new());
        assert_eq!(scan_all(&*inner, &blob_space("users")).unwrap().len(), 2);
    }

    /// A new wrapper over the same store (a restart) goes on numbering
    /// the blobs and sees what was written before it, keys written plainly
    /// (before the keyspace was packed) included; a store rebuilt from the
    /// changelog gives the same table.
    #[test]
    fn a_restart_and_a_changelog_restore_keep_the_table() {
        let inner = Arc::new(InMemoryStore::new());
        inner
            .write(&batch(&[
                ("users", b"old", Some(b"0")),
                ("users", b"a", Some(b"0")),
            ]))
            .unwrap();
        let one = PackedStore::new(inner.clone(), &["users"]);
        one.write(&batch(&[("users", b"a", Some(b"1"))])).unwrap();
        drop(one);
        let two = PackedStore::new(inner.clone(), &["users"]);
        two.write(&batch(&[
            ("users", b"b", Some(b"2")),
            ("users", b"old", None),
        ]))
        .unwrap();
        let want = vec![
            (b"a".to_vec(), b"1".to_vec()),
            (b"b".to_vec(), b"2".to_vec()),
        ];
        assert_eq!(scan_all(&two, "users").unwrap(), want);
        let blobs = scan_all(&*inner, &blob_space("users")).unwrap();
        let numbers: Vec<Vec<u8>> = blobs.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            numbers,
            vec![1u64.to_be_bytes().to_vec(), 2u64.to_be_bytes().to_vec()]
        );

        let copy = Arc::new(InMemoryStore::new());
        restore_from_changelog(&*copy, &*inner).unwrap();
        assert_eq!(
            scan_all(&PackedStore::new(copy, &["users"]), "users").unwrap(),
            want
        );
    }

    /// A write larger than a blob goes into several, in order; a scan in
    /// pages sees every key once.
    #[test]
    fn large_writes_span_blobs_and_scans_page_through_them() {
        let inner = Arc::new(InMemoryStore::new());
        let packed = PackedStore::new(inner.clone(), &["users"]);
        let value = vec![7u8; 1000];
        let mut b = WriteBatch::new();
        for u in 0..3_000u32 {
            b.put("users", u.to_be_bytes(), value.clone());
        }
        packed.write(&b).unwrap();
        assert!(scan_all(&*inner, &blob_space("users")).unwrap().len() >= 3);
        let mut seen = 0u32;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let start = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let page = packed.range("users", start, Bound::Unbounded, 700).unwrap();
            for (k, v) in &page {
                assert_eq!(k.as_slice(), seen.to_be_bytes());
                assert_eq!(v, &value);
                seen += 1;
            }
            if page.len() < 700 {
                break;
            }
            after = page.last().map(|(k, _)| k.clone());
        }
        assert_eq!(seen, 3_000);
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random writes (puts, deletes, keys written again, other
        /// keyspaces between) read back as the same table a plain store
        /// holds, before and after reopening over the same inner store.
        #[test]
        fn packed_writes_read_back_like_a_model(
            writes in proptest::collection::vec(
                proptest::collection::vec(
                    (0u8..3, 0u8..24, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))),
                    0..30,
                ),
                1..12,
            )
        ) {
            let inner: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
            let packed = PackedStore::new(Arc::clone(&inner), &["users"]);
            let mut model: BTreeMap<(u8, Vec<u8>), Vec<u8>> = BTreeMap::new();
            for w in &writes {
                let mut b = WriteBatch::new();
                for (space, key, value) in w {
                    let name = ["users", "plain", "users"][*space as usize];
                    let k = vec![*key, key.wrapping_mul(7)];
                    let m = (u8::from(name == "plain"), k.clone());
                    match value {
                        Some(v) => {
                            b.put(name, k, v.clone());
                            model.insert(m, v.clone());
                        }
                        None => {
                            b.delete(name, k);
                            model.remove(&m);
                        }
                    }
                }
                packed.write(&b).unwrap();
            }
            let want = |plain: u8| -> Vec<(Vec<u8>, Vec<u8>)> {
                model
                    .iter()
                    .filter(|((p, _), _)| *p == plain)
                    .map(|((_, k), v)| (k.clone(), v.clone()))
                    .collect()
            };
            prop_assert_eq!(scan_all(&packed, "users").unwrap(), want(0));
            prop_assert_eq!(scan_all(&packed, "plain").unwrap(), want(1));
            let reopened = PackedStore::new(inner, &["users"]);
            prop_assert_eq!(scan_all(&reopened, "users").unwrap(), want(0));
        }

        /// Any bytes given as a blob: applied or refused with a typed
        /// error, never a panic; a valid blob cut short is refused.
        #[test]
        fn any_blob_is_applied_or_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            changes in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..9), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..9))),
                1..8,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut table = Table::new();
            let _ = apply("users", &bytes, &mut table);
            let mut blob = vec![VERSION];
            // Where a change ends: a blob cut there is a shorter valid one.
            let mut ends = vec![1];
            for (k, v) in &changes {
                encode(&mut blob, k, v.as_deref());
                ends.push(blob.len());
            }
            prop_assert!(apply("users", &blob, &mut Table::new()).is_ok());
            let at = 1 + cut.index(blob.len() - 1);
            let cut_short = apply("users", &blob[..at], &mut Table::new());
            prop_assert_eq!(cut_short.is_ok(), ends.contains(&at));
        }
    }
}
