//! Interactive queries: readers of a task's committed state, on the
//! TestDriver and on a runner (between commits, from another thread,
//! across a commit that lands between a query's reads), key lookups,
//! ranges in encoded-key order, window fetches against a reference model
//! under proptest, and typed errors.

mod common;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::open_on_log;
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, ChangelogEntry, InMemoryStore, KeyValueStore, QueryError, RunnerConfig, StateCodec,
    StoreError, StoreLimits, TestDriver, Topology, Window, Windows, WriteBatch, MAX_WINDOW_FETCH,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Clicks per user ("per-user"), per user and window ("per-window",
/// `windows`), and a global table (not queryable).
fn counts(windows: Windows) -> Topology {
    let t = Topology::new();
    let clicks = t.stream::<u32, u32>("clicks");
    clicks.group_by_key().count("per-user").to("counts");
    clicks
        .group_by_key()
        .windowed_by(windows)
        .count("per-window")
        .to("window-counts");
    t.global_table::<u32, u32>("g", "global");
    t
}

fn tumbling() -> Windows {
    Windows::tumbling(10).unwrap().grace(1_000)
}

#[test]
fn a_reader_sees_committed_state_only_in_encoded_key_order() {
    let mut d = TestDriver::new(counts(tumbling())).unwrap();
    let users = d.query_store::<u32, u64>("per-user").unwrap();
    for (u, ts) in [(300u32, 0u64), (2, 1), (70_000, 2), (1, 3), (2, 4)] {
        d.pipe("clicks", u, 0u32, ts).unwrap();
    }
    // Processed, not committed: the reader sees nothing yet.
    assert_eq!(d.table_get::<u32, u64>("per-user", &2).unwrap(), Some(2));
    assert_eq!(users.get(&2).unwrap(), None);
    assert!(users.all(100).unwrap().is_empty());
    d.commit().unwrap();
    assert_eq!(users.get(&2).unwrap(), Some(2));
    assert_eq!(users.get(&3).unwrap(), None);
    // u32 keys encode big-endian: numeric order.
    assert_eq!(
        users.all(100).unwrap(),
        vec![(1, 1), (2, 2), (300, 1), (70_000, 1)]
    );
    assert_eq!(
        users
            .range(Bound::Included(&2), Bound::Excluded(&70_000), 100)
            .unwrap(),
        vec![(2, 2), (300, 1)]
    );
    assert_eq!(
        users
            .range(Bound::Excluded(&2), Bound::Unbounded, 1)
            .unwrap(),
        vec![(300, 1)]
    );
    // More processing: still the last commit.
    d.pipe("clicks", 2u32, 0u32, 5).unwrap();
    assert_eq!(users.get(&2).unwrap(), Some(2));
    d.commit().unwrap();
    assert_eq!(users.get(&2).unwrap(), Some(3));
    // A read larger than the store allows is a typed error.
    assert!(matches!(
        users.all(usize::MAX),
        Err(QueryError::Store(StoreError::ReadTooLarge { .. }))
    ));
}

#[test]
fn wrong_names_and_types_are_typed_errors() {
    let d = TestDriver::new(counts(tumbling())).unwrap();
    assert!(matches!(
        d.query_store::<u32, u64>("nope"),
        Err(QueryError::UnknownStore { name }) if name == "nope"
    ));
    assert!(matches!(
        d.query_store::<u32, String>("per-user"),
        Err(QueryError::WrongType { .. })
    ));
    // A window store is not a key-value store, nor the other way round.
    assert!(matches!(
        d.query_store::<u32, u64>("per-window"),
        Err(QueryError::WrongType { .. })
    ));
    assert!(matches!(
        d.query_window_store::<u32, u64>("per-user"),
        Err(QueryError::WrongType { .. })
    ));
    assert!(matches!(
        d.query_window_store::<u64, u64>("per-window"),
        Err(QueryError::WrongType { .. })
    ));
    assert!(matches!(
        d.query_window_store::<u32, u64>("nope"),
        Err(QueryError::UnknownStore { .. })
    ));
    // A global table has no committed state.
    assert!(matches!(
        d.query_store::<u32, u32>("global"),
        Err(QueryError::GlobalStore { .. })
    ));
}

#[test]
fn window_fetch_gives_a_keys_open_windows_in_a_time_range() {
    let mut d = TestDriver::new(counts(Windows::tumbling(10).unwrap().grace(20))).unwrap();
    let w = d.query_window_store::<u32, u64>("per-window").unwrap();
    for (u, ts) in [(1u32, 1u64), (1, 2), (2, 3), (1, 15), (1, 31), (2, 33)] {
        d.pipe("clicks", u, 0u32, ts).unwrap();
    }
    d.commit().unwrap();
    let win = |s: u64| Window {
        start_ms: s,
        end_ms: s + 10,
    };
    // Windows whose start is in [from, to], both inclusive.
    assert_eq!(
        w.fetch(&1, 0, 30).unwrap(),
        vec![(win(10), 1), (win(30), 1)]
    );
    assert_eq!(w.fetch(&1, 11, 40).unwrap(), vec![(win(30), 1)]);
    assert_eq!(w.fetch(&2, 0, 100).unwrap(), vec![(win(30), 1)]);
    assert!(w.fetch(&3, 0, 100).unwrap().is_empty());
    assert!(w.fetch(&1, 40, 30).unwrap().is_empty());
    // Window [0, 10) closed at stream time 30 (its end plus grace 20): its
    // entries left the store with the commit.
    assert!(w.fetch(&1, 0, 0).unwrap().is_empty());
    let all: Vec<(u32, u64, u64)> = w
        .fetch_all(0, 100, 100)
        .unwrap()
        .into_iter()
        .map(|(k, n)| (k.key, k.window.start_ms, n))
        .collect();
    assert_eq!(all, vec![(1, 10, 1), (1, 30, 1), (2, 30, 1)]);
    assert!(matches!(
        w.fetch(&1, 0, u64::MAX),
        Err(QueryError::TooWide { max, .. }) if max == MAX_WINDOW_FETCH
    ));
    // Uncommitted records are not seen.
    d.pipe("clicks", 1u32, 0u32, 32).unwrap();
    assert_eq!(w.fetch(&1, 30, 30).unwrap(), vec![(win(30), 1)]);
    d.commit().unwrap();
    assert_eq!(w.fetch(&1, 30, 30).unwrap(), vec![(win(30), 2)]);
}

/// The model: counts per key and window start of the committed records
/// (nothing closes: the grace is larger than every timestamp).
fn window_model(records: &[(u32, u64)], size: u64, advance: u64) -> BTreeMap<(u32, u64), u64> {
    let mut m = BTreeMap::new();
    for &(k, ts) in records {
        let mut start = ts - ts % advance;
        loop {
            if start + size > ts {
                *m.entry((k, start)).or_default() += 1;
            }
            if start < advance {
                break;
            }
            start -= advance;
            if start + size <= ts {
                break;
            }
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Random hopping windows and records, committed up to a point, more
    /// processed after: every fetch of every key over random ranges gives
    /// the model's windows of the committed records only.
    #[test]
    fn window_fetch_matches_the_model_of_committed_records(
        records in proptest::collection::vec((0u32..3, 0u64..200), 0..60),
        size in 1u64..40,
        advance_pct in 1u64..=100,
        commit_at in 0usize..60,
        ranges in proptest::collection::vec((0u64..250, 0u64..250), 1..8),
    ) {
        let advance = (size * advance_pct / 100).max(1);
        let windows = Windows::hopping(size, advance).unwrap().grace(1_000);
        let mut d = TestDriver::new(counts(windows)).unwrap();
        let w = d.query_window_store::<u32, u64>("per-window").unwrap();
        let commit_at = commit_at.min(records.len());
        for (i, &(k, ts)) in records.iter().enumerate() {
            if i == commit_at {
                d.commit().unwrap();
            }
            d.pipe("clicks", k, 0u32, ts).unwrap();
        }
        if commit_at == records.len() {
            d.commit().unwrap();
        }
        let model = window_model(&records[..commit_at], size, advance);
        for &(from, to) in &ranges {
            for k in 0u32..3 {
                let want: Vec<(Window, u64)> = model
                    .range((k, from)..=(k, to.max(from)))
                    .filter(|((_, s), _)| *s <= to)
                    .map(|(&(_, s), &n)| (Window { start_ms: s, end_ms: s + size }, n))
                    .collect();
                prop_assert_eq!(w.fetch(&k, from, to).unwrap(), want);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// On a runner.

/// A store that refuses writes while `fail` is set (a commit that does not
/// happen), and can apply a batch of its own just before its `n`-th read
/// (a commit landing between a query's reads).
#[derive(Default)]
struct TestStore {
    inner: InMemoryStore,
    fail: AtomicBool,
    reads: AtomicUsize,
    inject: Mutex<Option<(usize, WriteBatch)>>,
}

impl KeyValueStore for TestStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let mut inject = self.inject.lock().unwrap();
        if inject.as_ref().is_some_and(|(at, _)| *at == n) {
            let (_, batch) = inject.take().unwrap();
            self.inner.write(&batch)?;
        }
        drop(inject);
        self.inner.get(space, key)
    }
    fn range(
        &self,
        space: &str,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        max: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.range(space, start, end, max)
    }
    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt("simulated failed commit".into()));
        }
        self.inner.write(batch)
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
}

async fn clicks(log: &InMemoryLog, records: &[(u32, u64)]) {
    let events = records
        .iter()
        .map(|&(u, ts)| {
            NewEvent::new(
                "clicks",
                1,
                ts,
                envelope::encode(&u.to_bytes(), &0u32.to_bytes()),
            )
        })
        .collect();
    log.append(AppendTx::single(
        StreamId::new("clicks").unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn a_runner_reader_sees_the_last_commit_not_the_tasks_cache() {
    let log = Arc::new(InMemoryLog::new());
    let test_store = Arc::new(TestStore::default());
    let store: Arc<dyn KeyValueStore> = test_store.clone();
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            counts(tumbling()),
            &store,
            &log,
            &fail,
            RunnerConfig::new("q"),
        )
    };
    let mut r = open();
    let users = r.query_store::<u32, u64>("per-user").unwrap();
    let windows = r.query_window_store::<u32, u64>("per-window").unwrap();
    clicks(&log, &[(1, 1), (1, 2), (2, 12)]).await;
    r.step().await.unwrap();
    assert_eq!(users.get(&1).unwrap(), Some(2));
    // The next commit fails: the task processed the records, the store
    // does not have them.
    clicks(&log, &[(1, 3), (2, 13)]).await;
    test_store.fail.store(true, Ordering::SeqCst);
    assert!(r.step().await.is_err());
    assert_eq!(
        r.task().table_get::<u32, u64>("per-user", &1).unwrap(),
        Some(3)
    );
    assert_eq!(users.get(&1).unwrap(), Some(2));
    assert_eq!(
        r.task()
            .window_get::<u32, u64>("per-window", &2, 10)
            .unwrap(),
        Some(2)
    );
    assert_eq!(
        windows.fetch(&2, 0, 10).unwrap(),
        vec![(
            Window {
                start_ms: 10,
                end_ms: 20
            },
            1
        )]
    );
    // From another thread too.
    let (u, w) = (users.clone(), windows.clone());
    let seen = std::thread::spawn(move || (u.all(10).unwrap(), w.fetch(&1, 0, 0).unwrap()))
        .join()
        .unwrap();
    assert_eq!(seen.0, vec![(1, 2), (2, 1)]);
    assert_eq!(
        seen.1,
        vec![(
            Window {
                start_ms: 0,
                end_ms: 10
            },
            2
        )]
    );
    // Reopened, the runner processes them again and commits: the readers
    // (bound to the store, not to the runner) see it.
    test_store.fail.store(false, Ordering::SeqCst);
    drop(r);
    let mut r = open();
    r.run_until_idle().await.unwrap();
    assert_eq!(users.get(&1).unwrap(), Some(3));
    assert_eq!(
        windows.fetch(&2, 10, 10).unwrap(),
        vec![(
            Window {
                start_ms: 10,
                end_ms: 20
            },
            2
        )]
    );
}

#[tokio::test]
async fn a_window_fetch_reads_again_when_a_commit_lands_between_its_reads() {
    let log = Arc::new(InMemoryLog::new());
    let test_store = Arc::new(TestStore::default());
    let store: Arc<dyn KeyValueStore> = test_store.clone();
    let fail = Arc::new(AtomicUsize::new(0));
    let mut r = open_on_log(
        counts(tumbling()),
        &store,
        &log,
        &fail,
        RunnerConfig::new("q"),
    );
    clicks(&log, &[(1, 1), (1, 11), (1, 21)]).await;
    r.run_until_idle().await.unwrap();
    let windows = r.query_window_store::<u32, u64>("per-window").unwrap();
    // The next commit, as the runner would write it: one more click in
    // windows 0 and 20 (key: start and user; value: largest timestamp and
    // count), and another checkpoint.
    let mut batch = WriteBatch::new();
    for (start, ts) in [(0u64, 2u64), (20, 22)] {
        let mut k = start.to_be_bytes().to_vec();
        k.extend_from_slice(&1u32.to_bytes());
        let mut v = ts.to_be_bytes().to_vec();
        v.extend_from_slice(&2u64.to_bytes());
        batch.put("per-window", k, v);
    }
    batch.put("__runner", b"q".to_vec(), b"the next checkpoint".to_vec());
    // fetch(1, 0, 20) reads the mark, windows 0, 10, 20, the mark: the
    // commit lands before window 10's read (read 3 from now).
    let now = test_store.reads.load(Ordering::SeqCst);
    *test_store.inject.lock().unwrap() = Some((now + 3, batch));
    let w = |s: u64| Window {
        start_ms: s,
        end_ms: s + 10,
    };
    assert_eq!(
        windows.fetch(&1, 0, 20).unwrap(),
        vec![(w(0), 2), (w(10), 1), (w(20), 2)],
        "all of the newer commit, not window 0 of the older one"
    );
    assert!(test_store.inject.lock().unwrap().is_none());
}
