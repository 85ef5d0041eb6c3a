//! The [`KeyValueStore`] conformance suite.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::select;

use super::{finish, run_check, run_random_cases, runtime, SuiteConfig};
use crate::stream::{
    restore_from_changelog, ChangelogEntry, KeyValueStore, StoreError, WriteBatch,
};

/// Makes the key-value stores the suite checks.
///
/// An in-memory store implements [`KvHarness::create`] only; a durable one
/// also implements [`KvHarness::reopen`].
pub trait KvHarness: Send {
    /// The store under test.
    type Store: KeyValueStore + 'static;

    /// A fresh, empty store.
    fn create(&mut self) -> Self::Store;

    /// Closes `store` (drops it) and opens the same store again; a durable
    /// store must then hold every committed batch and its changelog. The
    /// default returns `store` unchanged (in-memory).
    fn reopen(&mut self, store: Self::Store) -> Self::Store {
        store
    }
}

/// Runs the [`KeyValueStore`] conformance suite against the stores
/// `harness` makes, and panics with a report if any check fails.
///
/// Checks:
///
/// - **random operation sequences** (`config.cases` of them, up to
///   `config.max_ops` long) of `put`, `delete`, multi-keyspace batches,
///   `get`, `range` (every kind of bound, with a `max`), changelog reads and
///   truncation, and reopening, over keyspaces whose names prefix each other
///   and keys that test bytewise order (empty, `00`, `ff`, prefixes),
///   compared with a reference model; at the end every keyspace and the
///   changelog must match, and a fresh store restored from the changelog
///   must hold the same contents;
/// - **limits**: an oversized key or value, a bad keyspace name, a too
///   large batch or read are refused with their typed error and a batch
///   holding one bad change writes nothing (not even to the changelog);
///   changelog reads below the first entry and truncation beyond the head
///   are refused;
/// - **a large batch** (20,000 changes over three keyspaces) is applied
///   whole, survives a reopen, and its changelog is gap-free;
/// - **concurrent writers** (`config.concurrency` threads, each committing
///   batches) lose nothing and the changelog numbers every change once.
///
/// # Panics
///
/// When a check fails, with a report naming the seed and the minimal failing
/// operation sequence. Also when called from inside a tokio runtime.
pub fn kv_store_conformance<H: KvHarness>(harness: H, config: SuiteConfig) {
    let rt = runtime("kv_store_conformance");
    let seed = config.resolve_seed();
    let mut harness = harness;
    let mut failures = Vec::new();
    failures.extend(
        run_check(
            &rt,
            "limits are checked before writing",
            config.timeout,
            async { check_limits(&mut harness) },
        )
        .err(),
    );
    failures.extend(
        run_check(
            &rt,
            "a large batch is atomic and durable",
            config.timeout,
            async { check_large_batch(&mut harness) },
        )
        .err(),
    );
    failures.extend(
        run_check(
            &rt,
            "concurrent writers lose nothing",
            config.timeout,
            async { check_concurrent(&mut harness, &config) },
        )
        .err(),
    );
    if let Err(e) = run_random_cases(&rt, harness, &config, seed, op(), |h, ops| {
        Box::pin(async move { run_case(h, ops) })
    }) {
        failures.push(e);
    }
    finish("KeyValueStore", seed, failures);
}

const SPACES: &[&str] = &["a", "ab", "a.b", "win:1"];
const KEYS: &[&[u8]] = &[
    b"",
    b"\x00",
    b"\x00\x00",
    b"\x01",
    b"a",
    b"ab",
    b"abc",
    b"b",
    b"\x7f",
    b"\xff",
    b"\xff\xff",
];

#[derive(Debug, Clone)]
enum Change {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<Change>),
    Get(&'static str, Vec<u8>),
    Range(&'static str, Bound<Vec<u8>>, Bound<Vec<u8>>, usize),
    Changelog(u64, usize),
    Truncate(u64),
    Reopen,
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => select(KEYS).prop_map(<[u8]>::to_vec),
        1 => proptest::collection::vec(any::<u8>(), 0..6),
    ]
}

fn bound() -> impl Strategy<Value = Bound<Vec<u8>>> {
    prop_oneof![
        1 => Just(Bound::Unbounded),
        2 => key().prop_map(Bound::Included),
        2 => key().prop_map(Bound::Excluded),
    ]
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (select(SPACES), key(), proptest::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(s, k, v)| Change::Put(s, k, v)),
        1 => (select(SPACES), key()).prop_map(|(s, k)| Change::Delete(s, k)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(change(), 1..6).prop_map(Op::Write),
        3 => (select(SPACES), key()).prop_map(|(s, k)| Op::Get(s, k)),
        3 => (select(SPACES), bound(), bound(), 0usize..8)
            .prop_map(|(s, a, b, m)| Op::Range(s, a, b, m)),
        1 => (0u64..40, 1usize..10).prop_map(|(f, m)| Op::Changelog(f, m)),
        1 => (0u64..40).prop_map(Op::Truncate),
        1 => Just(Op::Reopen),
    ]
}

/// The reference store.
#[derive(Debug, Default)]
struct Model {
    data: BTreeMap<(String, Vec<u8>), Vec<u8>>,
    log: Vec<ChangelogEntry>,
    first: u64,
}

impl Model {
    fn head(&self) -> u64 {
        self.first + self.log.len() as u64
    }

    fn apply(&mut self, changes: &[Change]) {
        for c in changes {
            let seq = self.head();
            let (space, key, value) = match c {
                Change::Put(s, k, v) => (*s, k, Some(v.clone())),
                Change::Delete(s, k) => (*s, k, None),
            };
            match &value {
                Some(v) => {
                    self.data.insert((space.to_owned(), key.clone()), v.clone());
                }
                None => {
                    self.data.remove(&(space.to_owned(), key.clone()));
                }
            }
            self.log.push(ChangelogEntry {
                seq,
                space: space.to_owned(),
                key: key.clone(),
                value,
            });
        }
    }

    fn range(
        &self,
        space: &str,
        start: &Bound<Vec<u8>>,
        end: &Bound<Vec<u8>>,
        max: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.data
            .iter()
            .filter(|((s, k), _)| {
                s == space
                    && match start {
                        Bound::Included(b) => k >= b,
                        Bound::Excluded(b) => k > b,
                        Bound::Unbounded => true,
                    }
                    && match end {
                        Bound::Included(b) => k <= b,
                        Bound::Excluded(b) => k < b,
                        Bound::Unbounded => true,
                    }
            })
            .take(max)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn batch_of(changes: &[Change]) -> WriteBatch {
    let mut b = WriteBatch::new();
    for c in changes {
        match c {
            Change::Put(s, k, v) => b.put(s, k.clone(), v.clone()),
            Change::Delete(s, k) => b.delete(s, k.clone()),
        }
    }
    b
}

fn as_ref(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(v) => Bound::Included(v),
        Bound::Excluded(v) => Bound::Excluded(v),
        Bound::Unbounded => Bound::Unbounded,
    }
}

fn run_case<H: KvHarness>(harness: &mut H, ops: &[Op]) -> Result<(), String> {
    let mut store = harness.create();
    let mut model = Model::default();
    for (i, op) in ops.iter().enumerate() {
        let at = |e: String| format!("at op #{i} {op:?}:\n  {e}");
        match op {
            Op::Write(changes) => {
                let r = if let [Change::Put(s, k, v)] = changes.as_slice() {
                    store.put(s, k, v)
                } else if let [Change::Delete(s, k)] = changes.as_slice() {
                    store.delete(s, k)
                } else {
                    store.write(&batch_of(changes))
                };
                r.map_err(|e| at(format!("write failed: {e:?}")))?;
                model.apply(changes);
            }
            Op::Get(space, key) => {
                let got = store
                    .get(space, key)
                    .map_err(|e| at(format!("get failed: {e:?}")))?;
                let want = model.data.get(&((*space).to_owned(), key.clone()));
                ensure!(
                    got.as_ref() == want,
                    "{}",
                    at(format!("get returned {got:?}; expected {want:?}"))
                );
            }
            Op::Range(space, start, end, max) => {
                let got = store
                    .range(space, as_ref(start), as_ref(end), *max)
                    .map_err(|e| at(format!("range failed: {e:?}")))?;
                let want = model.range(space, start, end, *max);
                ensure!(
                    got == want,
                    "{}",
                    at(format!("range returned {got:?}; expected {want:?}"))
                );
            }
            Op::Changelog(from, max) => {
                let got = store.changelog(*from, *max);
                if *from < model.first || *from > model.head() {
                    ensure!(
                        matches!(got, Err(StoreError::ChangelogRange { .. })),
                        "{}",
                        at(format!(
                            "changelog({from}) outside {}..={} returned {got:?}; expected ChangelogRange",
                            model.first,
                            model.head()
                        ))
                    );
                } else {
                    let got = got.map_err(|e| at(format!("changelog failed: {e:?}")))?;
                    let skip = (*from - model.first) as usize;
                    let want: Vec<_> = model.log.iter().skip(skip).take(*max).cloned().collect();
                    ensure!(
                        got == want,
                        "{}",
                        at(format!("changelog returned {got:?}; expected {want:?}"))
                    );
                }
            }
            Op::Truncate(before) => {
                let r = store.truncate_changelog(*before);
                if *before > model.head() {
                    ensure!(
                        matches!(r, Err(StoreError::ChangelogRange { .. })),
                        "{}",
                        at(format!("truncate beyond the head returned {r:?}"))
                    );
                } else {
                    r.map_err(|e| at(format!("truncate failed: {e:?}")))?;
                    if *before > model.first {
                        let drop = (*before - model.first) as usize;
                        model.log.drain(..drop);
                        model.first = *before;
                    }
                }
            }
            Op::Reopen => store = harness.reopen(store),
        }
    }
    verify_all(&store, &model).map_err(|e| format!("after the last op: {e}"))?;
    let store = harness.reopen(store);
    verify_all(&store, &model).map_err(|e| format!("after the final reopen: {e}"))?;
    if model.first == 0 {
        let fresh = harness.create();
        restore_from_changelog(&fresh, &store)
            .map_err(|e| format!("restore from the changelog failed: {e:?}"))?;
        let rebuilt = Model {
            data: model.data.clone(),
            log: Vec::new(),
            first: 0,
        };
        verify_data(&fresh, &rebuilt)
            .map_err(|e| format!("a store rebuilt from the changelog differs: {e}"))?;
    }
    Ok(())
}

fn verify_data(store: &dyn KeyValueStore, model: &Model) -> Result<(), String> {
    for space in SPACES {
        let got = store
            .range(space, Bound::Unbounded, Bound::Unbounded, 1_000)
            .map_err(|e| format!("range({space}) failed: {e:?}"))?;
        let want = model.range(space, &Bound::Unbounded, &Bound::Unbounded, 1_000);
        ensure!(
            got == want,
            "keyspace {space:?} holds {got:?}; expected {want:?}"
        );
    }
    Ok(())
}

fn verify_all(store: &dyn KeyValueStore, model: &Model) -> Result<(), String> {
    verify_data(store, model)?;
    let bounds = store
        .changelog_bounds()
        .map_err(|e| format!("changelog_bounds failed: {e:?}"))?;
    ensure!(
        bounds == (model.first, model.head()),
        "changelog bounds are {bounds:?}; expected {:?}",
        (model.first, model.head())
    );
    let got = store
        .changelog(model.first, 1_000)
        .map_err(|e| format!("changelog failed: {e:?}"))?;
    ensure!(
        got == model.log,
        "the changelog holds {got:?}; expected {:?}",
        model.log
    );
    Ok(())
}

fn check_limits<H: KvHarness>(harness: &mut H) -> Result<(), String> {
    let store = harness.create();
    let limits = store.limits();
    store
        .put("ok", b"k", b"v")
        .map_err(|e| format!("a plain put failed: {e:?}"))?;
    let head = store.changelog_bounds().map_err(|e| format!("{e:?}"))?.1;

    let big_key = vec![7u8; limits.max_key_bytes + 1];
    let mut b = WriteBatch::new();
    b.put("ok", b"k2".to_vec(), b"v2".to_vec());
    b.put("ok", big_key.clone(), b"v".to_vec());
    let r = store.write(&b);
    ensure!(
        matches!(r, Err(StoreError::KeyTooLarge { .. })),
        "a batch with an oversized key returned {r:?}; expected KeyTooLarge"
    );
    let r = store.get("ok", &big_key);
    ensure!(
        matches!(r, Err(StoreError::KeyTooLarge { .. })),
        "get with an oversized key returned {r:?}; expected KeyTooLarge"
    );

    let mut b = WriteBatch::new();
    b.put("ok", b"k3".to_vec(), b"v3".to_vec());
    b.put("ok", b"k4".to_vec(), vec![0u8; limits.max_value_bytes + 1]);
    let r = store.write(&b);
    ensure!(
        matches!(r, Err(StoreError::ValueTooLarge { .. })),
        "a batch with an oversized value returned {r:?}; expected ValueTooLarge"
    );

    for bad in ["", "has space", "x".repeat(200).as_str(), "é"] {
        let mut b = WriteBatch::new();
        b.put("ok", b"k5".to_vec(), b"v".to_vec());
        b.put(bad, b"k".to_vec(), b"v".to_vec());
        let r = store.write(&b);
        ensure!(
            matches!(r, Err(StoreError::BadKeyspace { .. })),
            "a batch with keyspace {bad:?} returned {r:?}; expected BadKeyspace"
        );
        let r = store.get(bad, b"k");
        ensure!(
            matches!(r, Err(StoreError::BadKeyspace { .. })),
            "get in keyspace {bad:?} returned {r:?}; expected BadKeyspace"
        );
    }
    if limits.max_batch_ops < 5_000_000 {
        let mut b = WriteBatch::new();
        for i in 0..=limits.max_batch_ops as u64 {
            b.put("ok", i.to_be_bytes().to_vec(), Vec::new());
        }
        let r = store.write(&b);
        ensure!(
            matches!(r, Err(StoreError::BatchTooLarge { .. })),
            "a batch over the limit returned {r:?}; expected BatchTooLarge"
        );
    }
    let r = store.range(
        "ok",
        Bound::Unbounded,
        Bound::Unbounded,
        limits.max_read + 1,
    );
    ensure!(
        matches!(r, Err(StoreError::ReadTooLarge { .. })),
        "a range over the read limit returned {r:?}; expected ReadTooLarge"
    );

    // Nothing of the refused batches was written, not even to the changelog.
    let all = store
        .range("ok", Bound::Unbounded, Bound::Unbounded, 100)
        .map_err(|e| format!("{e:?}"))?;
    ensure!(
        all == vec![(b"k".to_vec(), b"v".to_vec())],
        "refused batches left {all:?} behind"
    );
    let bounds = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
    ensure!(
        bounds.1 == head,
        "refused batches moved the changelog head from {head} to {}",
        bounds.1
    );
    let r = store.truncate_changelog(head + 1);
    ensure!(
        matches!(r, Err(StoreError::ChangelogRange { .. })),
        "truncating beyond the head returned {r:?}"
    );
    store
        .truncate_changelog(head)
        .map_err(|e| format!("truncate to the head failed: {e:?}"))?;
    let r = store.changelog(0, 10);
    ensure!(
        head == 0 || matches!(r, Err(StoreError::ChangelogRange { .. })),
        "reading a truncated changelog returned {r:?}"
    );
    let store = harness.reopen(store);
    let bounds = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
    ensure!(
        bounds == (head, head),
        "after truncation and reopen the changelog bounds are {bounds:?}; expected {:?}",
        (head, head)
    );
    // An empty batch is fine and changes nothing.
    store
        .write(&WriteBatch::new())
        .map_err(|e| format!("an empty batch failed: {e:?}"))?;
    Ok(())
}

/// Checks changelog retention on the stores `harness` makes, whose
/// [`StoreLimits::max_changelog_entries`](crate::stream::StoreLimits) must
/// be between 10 and 10,000: after writes of many batches (1 to 7 changes
/// each) the changelog keeps at least the newest that many entries and at
/// most one batch more, is gap-free from its first entry to its head, and
/// keeps both across a reopen; the data itself is whole. Panics with a
/// report if a check fails.
pub fn kv_changelog_retention<H: KvHarness>(mut harness: H) {
    if let Err(e) = check_retention(&mut harness) {
        panic!("KeyValueStore changelog retention: {e}");
    }
}

fn check_retention<H: KvHarness>(harness: &mut H) -> Result<(), String> {
    let store = harness.create();
    let keep = store.limits().max_changelog_entries;
    ensure!(
        (10..=10_000).contains(&keep),
        "the harness must set max_changelog_entries between 10 and 10,000 (it is {keep})"
    );
    let mut written = 0u64;
    let mut i = 0u64;
    while written < 3 * keep + 5 {
        let n = 1 + i % 7;
        let mut b = WriteBatch::new();
        for j in 0..n {
            b.put("r", (written + j).to_be_bytes().to_vec(), vec![i as u8]);
        }
        store
            .write(&b)
            .map_err(|e| format!("write failed: {e:?}"))?;
        written += n;
        i += 1;
        let (first, head) = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
        ensure!(head == written, "head {head} after {written} changes");
        ensure!(
            head - first >= keep.min(head) && head - first < keep + 7,
            "after {written} changes the changelog holds {first}..{head}; retention is {keep}"
        );
    }
    let store = harness.reopen(store);
    let (first, head) = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
    ensure!(
        head == written,
        "head {head} after reopen; {written} written"
    );
    ensure!(
        first > 0,
        "nothing was dropped: the changelog still starts at 0"
    );
    let page = store
        .changelog(first, (head - first) as usize)
        .map_err(|e| format!("changelog({first}) failed: {e:?}"))?;
    ensure!(
        page.len() as u64 == head - first,
        "{} entries read from {first}..{head}",
        page.len()
    );
    for (k, e) in page.iter().enumerate() {
        ensure!(
            e.seq == first + k as u64,
            "seq {} at position {k} from {first}",
            e.seq
        );
    }
    ensure!(
        matches!(
            store.changelog(first - 1, 1),
            Err(StoreError::ChangelogRange { .. })
        ),
        "a read below the first kept entry was not refused"
    );
    let all = crate::stream::scan_all(&store, "r").map_err(|e| format!("{e:?}"))?;
    ensure!(
        all.len() as u64 == written,
        "{} keys of {written}",
        all.len()
    );
    Ok(())
}

fn check_large_batch<H: KvHarness>(harness: &mut H) -> Result<(), String> {
    let store = harness.create();
    let n = 20_000u64.min(store.limits().max_batch_ops as u64);
    let mut b = WriteBatch::new();
    for i in 0..n {
        let space = ["big-0", "big-1", "big-2"][(i % 3) as usize];
        b.put(
            space,
            i.to_be_bytes().to_vec(),
            (i * 7).to_be_bytes().to_vec(),
        );
    }
    store
        .write(&b)
        .map_err(|e| format!("a batch of {n} failed: {e:?}"))?;
    let store = harness.reopen(store);
    let mut total = 0u64;
    for (s, space) in ["big-0", "big-1", "big-2"].iter().enumerate() {
        let all = crate::stream::scan_all(&store, space).map_err(|e| format!("{e:?}"))?;
        for (k, v) in &all {
            let i = u64::from_be_bytes(k.as_slice().try_into().map_err(|_| "bad key")?);
            ensure!(i % 3 == s as u64, "key {i} in keyspace {space}");
            ensure!(
                v.as_slice() == (i * 7).to_be_bytes(),
                "key {i} has a wrong value"
            );
        }
        total += all.len() as u64;
    }
    ensure!(total == n, "{total} of {n} entries after reopen");
    let (first, head) = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
    ensure!(
        (first, head) == (0, n),
        "changelog bounds {:?}; expected (0, {n})",
        (first, head)
    );
    let mut at = 0u64;
    while at < head {
        let page = store.changelog(at, 5_000).map_err(|e| format!("{e:?}"))?;
        ensure!(!page.is_empty(), "changelog page at {at} is empty");
        for e in &page {
            ensure!(e.seq == at, "changelog seq {} where {at} was due", e.seq);
            at += 1;
        }
    }
    Ok(())
}

fn check_concurrent<H: KvHarness>(harness: &mut H, config: &SuiteConfig) -> Result<(), String> {
    let store = Arc::new(harness.create());
    let threads = config.concurrency.max(2);
    let batches = config.concurrent_ops.max(1) * 4;
    let per_batch = 25u64;
    let handles: Vec<_> = (0..threads as u64)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<(), StoreError> {
                for b in 0..batches as u64 {
                    let mut batch = WriteBatch::new();
                    for i in 0..per_batch {
                        let key = [t.to_be_bytes(), (b * per_batch + i).to_be_bytes()].concat();
                        batch.put("conc", key, t.to_be_bytes().to_vec());
                    }
                    store.write(&batch)?;
                    // Readers run alongside.
                    store.get("conc", &t.to_be_bytes())?;
                }
                Ok(())
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("writer {i} failed: {e:?}")),
            Err(_) => return Err(format!("writer {i} panicked")),
        }
    }
    let want = threads as u64 * batches as u64 * per_batch;
    let all = crate::stream::scan_all(&*store, "conc").map_err(|e| format!("{e:?}"))?;
    ensure!(
        all.len() as u64 == want,
        "{} entries after concurrent writes; expected {want}",
        all.len()
    );
    let (_, head) = store.changelog_bounds().map_err(|e| format!("{e:?}"))?;
    ensure!(head == want, "changelog head {head}; expected {want}");
    // Each batch's changes are contiguous in the changelog (atomic).
    let log = store
        .changelog(0, want as usize)
        .map_err(|e| format!("{e:?}"))?;
    for chunk in log.chunks(per_batch as usize) {
        let writer = &chunk[0].key[..8];
        ensure!(
            chunk.iter().all(|e| &e.key[..8] == writer),
            "a batch's changes are interleaved with another's in the changelog"
        );
    }
    Ok(())
}
