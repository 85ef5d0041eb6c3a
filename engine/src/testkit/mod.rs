//! Test helpers for backends and aggregates (feature `testkit`).
//!
//! - [`given`](mod@given): given/when/then tests for aggregates;
//! - [`event_log_conformance`] and [`snapshot_store_conformance`]: the
//!   conformance suites every backend runs, below.
//!
//! # Conformance suites
//!
//! Every backend of a port runs the same model-based suite (DESIGN.md,
//! principle 3): random sequences of operations, checked step by step
//! against a plain in-memory reference ([`model`]), plus targeted checks of
//! limits, idempotency, concurrency and head notifications.
//!
//! - [`event_log_conformance`] checks an [`EventLog`](crate::EventLog)
//!   through a [`LogHarness`];
//! - [`snapshot_store_conformance`] checks a
//!   [`SnapshotStore`](crate::SnapshotStore) through a [`SnapshotHarness`];
//! - [`delay_queue_conformance`] checks a [`DelayQueue`](crate::DelayQueue)
//!   through a [`QueueHarness`], with a virtual clock;
//! - [`kv_store_conformance`] checks a
//!   [`KeyValueStore`](crate::stream::KeyValueStore) through a
//!   [`KvHarness`].
//!
//! A backend's test implements the harness (how to create a fresh instance
//! and, for a durable one, how to close and reopen it) and calls the suite
//! from a plain `#[test]`:
//!
//! ```no_run
//! use smartmsg_engine::memory::InMemoryLog;
//! use smartmsg_engine::testkit::{event_log_conformance, LogHarness, SuiteConfig};
//!
//! struct Memory;
//!
//! #[async_trait::async_trait]
//! impl LogHarness for Memory {
//!     type Log = InMemoryLog;
//!     async fn create(&mut self) -> InMemoryLog {
//!         InMemoryLog::new()
//!     }
//! }
//!
//! let mut config = SuiteConfig::default();
//! config.cases = 4;
//! event_log_conformance(Memory, config);
//! ```
//!
//! The suites are synchronous: they build their own multi-thread tokio
//! runtime, so they **must not be called from inside a runtime** (use a
//! plain `#[test]`, not `#[tokio::test]`). On failure they panic with a
//! report naming the failed check, the seed, and for the random part the
//! smallest failing operation sequence proptest could shrink to; rerun with
//! that seed in [`SuiteConfig::seed`] to reproduce it.

use std::future::Future;
use std::time::Duration;

use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// Returns `Err(format!(..))` from the enclosing function unless `cond`.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

mod delay_suite;
pub mod given;
mod kv_suite;
mod log_suite;
pub mod model;
mod snapshot_suite;
pub mod stats;

pub use delay_suite::{delay_queue_conformance, QueueHarness};
pub use given::{given, Given, When};
pub use kv_suite::{kv_changelog_retention, kv_store_conformance, KvHarness};
pub use log_suite::{event_log_conformance, LogHarness};
pub use snapshot_suite::{snapshot_store_conformance, SnapshotHarness};

/// How much a conformance suite does.
///
/// The defaults run the event-log suite in well under a second on the
/// in-memory log and in about 16 s (debug build) on the embedded one, where
/// the ~130 ms reopen after each case dominates. Raise `cases` and
/// `max_ops` for a longer soak, and set `seed: None` to explore new cases on
/// every run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SuiteConfig {
    /// Random operation sequences to run (each on a fresh instance).
    pub cases: u32,
    /// Longest operation sequence of one case (sequences have 1 to
    /// `max_ops` operations).
    pub max_ops: usize,
    /// Seed of the random cases: the same seed gives the same cases.
    /// `None` draws a fresh seed for each run (printed in the failure report,
    /// to rerun it). The default is [`SuiteConfig::DEFAULT_SEED`].
    pub seed: Option<u64>,
    /// Tasks in each concurrency check.
    pub concurrency: usize,
    /// Successful appends (or saves) each task makes in a concurrency check.
    pub concurrent_ops: usize,
    /// Most re-runs spent shrinking a failing case to a minimal one (0 turns
    /// shrinking off).
    pub max_shrink_iters: u32,
    /// Longest any single check or case may take before it counts as hung.
    /// A wait for a head notification inside one may take a quarter of it
    /// (at most 10 s).
    pub timeout: Duration,
}

impl SuiteConfig {
    /// The seed [`SuiteConfig::default`] uses.
    pub const DEFAULT_SEED: u64 = 0x5EED_5A47_4D53_4701;

    /// How long to wait for a notification that should come (a quarter of
    /// the timeout, so that a missing one fails its check with a precise
    /// message before the whole check times out).
    fn wait_limit(&self) -> Duration {
        (self.timeout / 4).min(Duration::from_secs(10))
    }

    /// The seed this configuration runs with: [`SuiteConfig::seed`], or a
    /// fresh one drawn from the process's hash randomness.
    pub fn resolve_seed(&self) -> u64 {
        self.seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        })
    }
}

impl Default for SuiteConfig {
    fn default() -> Self {
        Self {
            cases: 64,
            max_ops: 64,
            seed: Some(Self::DEFAULT_SEED),
            concurrency: 8,
            concurrent_ops: 6,
            max_shrink_iters: 512,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The runtime a suite drives its backend on.
fn runtime(suite: &str) -> tokio::runtime::Runtime {
    assert!(
        tokio::runtime::Handle::try_current().is_err(),
        "{suite}: the conformance suite builds its own runtime and must not be called from \
         inside one (use #[test], not #[tokio::test])"
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("testkit")
        .enable_all()
        .build()
        .expect("build the conformance suite's tokio runtime")
}

/// A proptest runner whose cases depend only on `seed`.
fn test_runner(config: &SuiteConfig, seed: u64) -> TestRunner {
    // Expand the seed to ChaCha's 32 bytes with splitmix64.
    let mut state = seed;
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    let proptest_config = Config {
        cases: config.cases,
        max_shrink_iters: config.max_shrink_iters,
        failure_persistence: None,
        fork: false,
        timeout: 0,
        rng_algorithm: RngAlgorithm::ChaCha,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        proptest_config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// The future one random case of a suite runs: borrows the harness and the
/// case's operations.
type CaseFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + 'a>>;

/// The random part of every suite: `config.cases` sequences of 1 to
/// `config.max_ops` operations drawn from `op` with a runner seeded by
/// `seed`, each run by `case` on the shared harness within
/// `config.timeout`; a failure is shrunk and reported with the minimal
/// failing sequence, one operation a line.
fn run_random_cases<H, S>(
    rt: &tokio::runtime::Runtime,
    harness: H,
    config: &SuiteConfig,
    seed: u64,
    op: S,
    case: impl for<'a> Fn(&'a mut H, &'a [S::Value]) -> CaseFuture<'a>,
) -> Result<(), String>
where
    S: proptest::strategy::Strategy,
    S::Value: std::fmt::Debug,
{
    use proptest::test_runner::{TestCaseError, TestError};

    let mut runner = test_runner(config, seed);
    let harness = std::cell::RefCell::new(harness);
    let strategy = proptest::collection::vec(op, 1..=config.max_ops.max(1));
    let limit = config.timeout;
    let result = runner.run(&strategy, |ops| {
        let mut harness = harness.borrow_mut();
        match rt.block_on(within(limit, case(&mut *harness, &ops))) {
            Some(Ok(())) => Ok(()),
            Some(Err(msg)) => Err(TestCaseError::fail(msg)),
            None => Err(TestCaseError::fail(format!(
                "the case did not finish within {limit:?} (hung?)"
            ))),
        }
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, ops)) => {
            let mut listing = String::new();
            for (i, op) in ops.iter().enumerate() {
                listing.push_str(&format!("  #{i}: {op:?}\n"));
            }
            Err(format!(
                "random operation sequences ({} cases of up to {} ops): {reason}\n\
                 minimal failing sequence ({} ops):\n{listing}",
                config.cases,
                config.max_ops,
                ops.len()
            ))
        }
        Err(TestError::Abort(reason)) => {
            Err(format!("random operation sequences aborted: {reason}"))
        }
    }
}

/// Runs `fut`, or gives up after `limit` and returns `None`.
///
/// Built from a helper thread rather than tokio's timer, which the `testkit`
/// feature does not enable; the thread ends as soon as `fut` does.
async fn within<F: Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
    let (fire, fired) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
            let _ = fire.send(());
        }
    });
    let out = tokio::select! {
        biased;
        out = fut => Some(out),
        Ok(()) = fired => None,
    };
    drop(cancel);
    out
}

/// Runs one named check of a suite on `rt`, turning a panic or a timeout
/// into a failure message.
fn run_check<F>(
    rt: &tokio::runtime::Runtime,
    name: &str,
    limit: Duration,
    check: F,
) -> Result<(), String>
where
    F: Future<Output = Result<(), String>>,
{
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async { within(limit, check).await })
    }));
    match outcome {
        Ok(Some(Ok(()))) => Ok(()),
        Ok(Some(Err(msg))) => Err(format!("check `{name}` failed: {msg}")),
        Ok(None) => Err(format!(
            "check `{name}` did not finish within {limit:?} (hung?)"
        )),
        Err(panic) => Err(format!(
            "check `{name}` panicked: {}",
            panic_message(&*panic)
        )),
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".to_owned())
}

/// Panics with every failure of a suite, or returns when there is none.
fn finish(suite: &str, seed: u64, failures: Vec<String>) {
    if failures.is_empty() {
        return;
    }
    let mut report = format!(
        "{suite} conformance FAILED ({} failure(s); seed {seed:#x}, rerun with \
         SuiteConfig {{ seed: Some({seed:#x}), .. }})\n",
        failures.len()
    );
    for (i, f) in failures.iter().enumerate() {
        report.push_str(&format!("\n--- failure {} ---\n{f}\n", i + 1));
    }
    panic!("{report}");
}
