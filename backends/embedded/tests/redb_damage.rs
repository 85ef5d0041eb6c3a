//! Damaged redb files never panic: the delay queue's, the snapshots' and
//! the state store's files are written through the API, closed, and then
//! copies with bytes flipped at many places are opened and used. Every open
//! and every call must return (a value or a typed error naming the file);
//! a panic inside redb must not reach the caller. Some damage must be found
//! (a test that could never see an error proves nothing).

use std::ops::Bound;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smartmsg_embedded::{EmbeddedDelayQueue, RedbSnapshots, RedbStore, RedbStoreConfig};
use smartmsg_engine::stream::{KeyValueStore, WriteBatch};
use smartmsg_engine::{DelayQueue, Job, JobId, Snapshot, SnapshotStore, StreamId};

/// Damaged copies tried per file.
const TRIES: usize = 48;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// What happened to one damaged copy.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every call answered without an error (the flip hit unused space).
    Clean,
    /// A call returned a typed error (its text).
    Error(String),
}

/// Flips bytes in copies of `file` (in `dir`) and runs `use_it` on each;
/// returns the outcomes. Panics (fails the test) if `use_it` panics.
fn damage_and_use(
    dir: &Path,
    file: &str,
    seed: u64,
    use_it: impl Fn(&Path) -> Outcome,
) -> Vec<Outcome> {
    let original = std::fs::read(dir.join(file)).unwrap();
    assert!(
        original.len() > 4096,
        "{file} is only {} bytes",
        original.len()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..TRIES {
        let copy = tempfile::tempdir().unwrap();
        let mut bytes = original.clone();
        // Half the tries hit the header and the first pages, where redb keeps
        // its roots; the rest anywhere.
        let span = if i % 2 == 0 { 16 << 10 } else { bytes.len() };
        let at = rng.random_range(0..span.min(bytes.len()));
        let run = rng.random_range(1..=16usize);
        for b in bytes.iter_mut().skip(at).take(run) {
            *b ^= rng.random_range(1..=255u8);
        }
        let path = copy.path().join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, &bytes).unwrap();
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| use_it(copy.path())));
        match r {
            Ok(o) => out.push(o),
            Err(_) => panic!(
                "{file} with {run} bytes flipped at {at} (seed {seed}, try {i}) panicked \
                 instead of returning a typed error"
            ),
        }
    }
    out
}

fn check(file: &str, outcomes: &[Outcome]) {
    let errors: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Error(e) => Some(e),
            Outcome::Clean => None,
        })
        .collect();
    assert!(
        !errors.is_empty(),
        "no damage to {file} was ever reported in {TRIES} tries"
    );
    for e in &errors {
        assert!(e.contains(file), "the error does not name {file}: {e}");
    }
    eprintln!(
        "{file}: {} of {TRIES} damaged copies refused with a typed error",
        errors.len()
    );
}

fn outcome<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, Outcome> {
    r.map_err(|e| Outcome::Error(format!("{e:#}")))
}

/// Display with the source chain (a `BackendError` wraps the file's error).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn outcome_chain<T, E: std::error::Error>(r: Result<T, E>) -> Result<T, Outcome> {
    r.map_err(|e| Outcome::Error(chain(&e)))
}

#[test]
fn a_damaged_delay_queue_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let qdir = dir.path().join("queue");
    rt().block_on(async {
        let q = EmbeddedDelayQueue::open(&qdir).unwrap();
        let jobs = (0..2_000u64)
            .map(|i| Job {
                id: JobId::new(format!("job-{i:05}")).unwrap(),
                due_ms: 1_000 + i * 37,
                payload: Bytes::from(vec![i as u8; 64]),
            })
            .collect();
        q.schedule_many(jobs).await.unwrap();
        let leased = q.poll_due(20_000, 100).await.unwrap();
        for l in leased.iter().take(50) {
            q.ack(&l.token).await.unwrap();
        }
    });
    let outcomes = damage_and_use(dir.path(), "queue/queue.redb", 11, |copy| {
        let run = || -> Result<(), Outcome> {
            let q = outcome(EmbeddedDelayQueue::open(copy.join("queue")))?;
            rt().block_on(async {
                outcome_chain(q.len().await)?;
                outcome_chain(q.next_due().await)?;
                outcome_chain(q.poll_due(200_000, 1_000).await)?;
                outcome_chain(q.dead_letters(100).await)?;
                Ok(())
            })
        };
        run().err().unwrap_or(Outcome::Clean)
    });
    check("queue.redb", &outcomes);
}

#[test]
fn a_damaged_snapshot_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshots.redb");
    let streams: Vec<StreamId> = (0..200)
        .map(|i| StreamId::new(format!("campaign-{i}")).unwrap())
        .collect();
    rt().block_on(async {
        let s = RedbSnapshots::open(&path).unwrap();
        for (i, stream) in streams.iter().enumerate() {
            s.save(Snapshot {
                stream: stream.clone(),
                version: i as u64,
                schema: 1,
                state: Bytes::from(vec![i as u8; 300]),
            })
            .await
            .unwrap();
        }
    });
    let outcomes = damage_and_use(dir.path(), "snapshots.redb", 12, |copy| {
        let run = || -> Result<(), Outcome> {
            let s = outcome(RedbSnapshots::open(copy.join("snapshots.redb")))?;
            rt().block_on(async {
                for stream in &streams {
                    outcome_chain(s.load(stream).await)?;
                }
                Ok(())
            })
        };
        run().err().unwrap_or(Outcome::Clean)
    });
    check("snapshots.redb", &outcomes);
}

#[test]
fn a_damaged_state_store_is_an_error_not_a_panic_when_verified() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("state.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        for chunk in 0..20u32 {
            let mut b = WriteBatch::new();
            for i in 0..200u32 {
                let k = chunk * 200 + i;
                b.put("users", k.to_be_bytes().to_vec(), vec![k as u8; 40]);
            }
            store.write(&b).unwrap();
        }
    }
    let verified = {
        let mut built = RedbStoreConfig::default();
        built.verify_on_open = true;
        built
    };
    let outcomes = damage_and_use(dir.path(), "state.redb", 13, |copy| {
        let run = || -> Result<(), Outcome> {
            let store = outcome(RedbStore::open_with(copy.join("state.redb"), verified))?;
            outcome_chain(store.range("users", Bound::Unbounded, Bound::Unbounded, 10_000))?;
            outcome_chain(store.changelog_bounds())?;
            outcome_chain(store.get("users", &7u32.to_be_bytes()))?;
            Ok(())
        };
        run().err().unwrap_or(Outcome::Clean)
    });
    check("state.redb", &outcomes);
}
