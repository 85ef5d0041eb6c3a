//! The conformance suites on the in-memory backends, and self-tests showing
//! that the suites catch broken backends.
//!
//! `SMARTMSG_TESTKIT_SEED` (a number, or `random`) and
//! `SMARTMSG_TESTKIT_CASES` override the configuration of the two main
//! tests, to explore beyond the default seed.
#![cfg(feature = "testkit")]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use async_trait::async_trait;
use smartmsg_engine::memory::{InMemoryLog, InMemorySnapshots};
use smartmsg_engine::testkit::{
    event_log_conformance, snapshot_store_conformance, LogHarness, SnapshotHarness, SuiteConfig,
};
use smartmsg_engine::{
    AppendError, AppendResult, AppendTx, EventLog, ExpectedVersion, HeadWatch, Limits, ReadError,
    RecordedEvent, Snapshot, SnapshotError, SnapshotStore, StreamId,
};

fn config_from_env() -> SuiteConfig {
    let mut config = SuiteConfig::default();
    if let Ok(seed) = std::env::var("SMARTMSG_TESTKIT_SEED") {
        config.seed = match seed.as_str() {
            "random" => None,
            s => Some(parse_u64(s).expect("SMARTMSG_TESTKIT_SEED: a number or `random`")),
        };
    }
    if let Ok(cases) = std::env::var("SMARTMSG_TESTKIT_CASES") {
        config.cases = cases.parse().expect("SMARTMSG_TESTKIT_CASES: a number");
    }
    config
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

struct MemoryLogs;

#[async_trait]
impl LogHarness for MemoryLogs {
    type Log = InMemoryLog;
    async fn create(&mut self) -> InMemoryLog {
        InMemoryLog::new()
    }
}

struct MemorySnapshots;

#[async_trait]
impl SnapshotHarness for MemorySnapshots {
    type Store = InMemorySnapshots;
    async fn create(&mut self) -> InMemorySnapshots {
        InMemorySnapshots::new()
    }
}

#[test]
fn in_memory_log_conforms() {
    let started = Instant::now();
    event_log_conformance(MemoryLogs, config_from_env());
    eprintln!("EventLog suite on InMemoryLog: {:?}", started.elapsed());
}

#[test]
fn in_memory_log_with_small_limits_conforms() {
    // Small limits make the random sequences hit them all the time.
    struct Small;
    #[async_trait]
    impl LogHarness for Small {
        type Log = InMemoryLog;
        async fn create(&mut self) -> InMemoryLog {
            let mut limits = Limits::default();
            limits.max_event_bytes = 40;
            limits.max_tx_events = 6;
            limits.max_tx_bytes = 120;
            limits.max_tx_streams = 2;
            limits.max_read_events = 16;
            limits.max_kind_len = 8;
            limits.max_id_len = 6;
            // The suite's keyed retries cross it.
            limits.idempotency_window = 10;
            InMemoryLog::with_limits(limits)
        }
    }
    event_log_conformance(Small, {
        let mut built = config_from_env();
        built.cases = 32;
        built
    });
}

#[test]
fn in_memory_snapshots_conform() {
    let started = Instant::now();
    snapshot_store_conformance(MemorySnapshots, config_from_env());
    eprintln!(
        "SnapshotStore suite on InMemorySnapshots: {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Self-tests: deliberately broken backends must fail the suites.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Appends as if every stream expected `Any`.
    IgnoreExpectedVersion,
    /// Drops the idempotency key, so a retry writes again.
    IgnoreIdempotencyKey,
    /// `read_stream` skips the first event it would return when it returns
    /// more than one.
    SkipInStreamRead,
    /// `watch_head` never moves.
    FrozenWatch,
}

struct Broken {
    inner: InMemoryLog,
    fault: Fault,
    frozen: tokio::sync::watch::Sender<u64>,
}

#[async_trait]
impl EventLog for Broken {
    async fn append(&self, mut tx: AppendTx) -> Result<AppendResult, AppendError> {
        match self.fault {
            Fault::IgnoreExpectedVersion => {
                for s in &mut tx.streams {
                    s.expected = ExpectedVersion::Any;
                }
            }
            Fault::IgnoreIdempotencyKey => tx.idempotency_key = None,
            Fault::SkipInStreamRead | Fault::FrozenWatch => {}
        }
        self.inner.append(tx).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let mut events = self.inner.read_stream(stream, from_version, max).await?;
        if matches!(self.fault, Fault::SkipInStreamRead) && events.len() > 1 {
            events.remove(0);
        }
        Ok(events)
    }

    async fn read_all(
        &self,
        from_position: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.inner.read_all(from_position, max).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        self.inner.stream_version(stream).await
    }

    async fn head(&self) -> Result<u64, ReadError> {
        self.inner.head().await
    }

    fn watch_head(&self) -> HeadWatch {
        match self.fault {
            Fault::FrozenWatch => HeadWatch::new(self.frozen.subscribe()),
            _ => self.inner.watch_head(),
        }
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }
}

struct BrokenLogs(Fault);

#[async_trait]
impl LogHarness for BrokenLogs {
    type Log = Broken;
    async fn create(&mut self) -> Broken {
        Broken {
            inner: InMemoryLog::new(),
            fault: self.0,
            frozen: tokio::sync::watch::channel(0).0,
        }
    }
}

/// A quick configuration for the self-tests.
fn quick() -> SuiteConfig {
    {
        let mut built = SuiteConfig::default();
        built.cases = 32;
        built.max_shrink_iters = 128;
        built
    }
}

/// Runs `suite` and returns its panic message; fails if it does not panic.
fn failure_of(suite: impl FnOnce()) -> String {
    let payload =
        catch_unwind(AssertUnwindSafe(suite)).expect_err("the suite must reject a broken backend");
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .expect("a readable report")
}

#[test]
fn suite_rejects_a_log_that_ignores_expected_versions() {
    let report =
        failure_of(|| event_log_conformance(BrokenLogs(Fault::IgnoreExpectedVersion), quick()));
    assert!(
        report.contains("concurrent writers on one stream"),
        "{report}"
    );
    assert!(report.contains("minimal failing sequence"), "{report}");
    assert!(report.contains("WrongExpectedVersion"), "{report}");
}

#[test]
fn suite_rejects_a_log_without_idempotency() {
    let report =
        failure_of(|| event_log_conformance(BrokenLogs(Fault::IgnoreIdempotencyKey), quick()));
    assert!(
        report.contains("concurrent retries of one keyed transaction"),
        "{report}"
    );
    assert!(report.contains("idempotency content"), "{report}");
    assert!(report.contains("minimal failing sequence"), "{report}");
}

#[test]
fn suite_rejects_a_log_whose_stream_reads_skip_an_event() {
    let report = failure_of(|| event_log_conformance(BrokenLogs(Fault::SkipInStreamRead), quick()));
    assert!(report.contains("minimal failing sequence"), "{report}");
    assert!(report.contains("read_stream"), "{report}");
}

#[test]
fn suite_rejects_a_log_whose_head_watch_never_moves() {
    let config = {
        let mut built = quick();
        built.timeout = std::time::Duration::from_millis(300);
        built.max_shrink_iters = 16;
        built
    };
    let report = failure_of(|| event_log_conformance(BrokenLogs(Fault::FrozenWatch), config));
    assert!(report.contains("check `head watch` failed"), "{report}");
    assert!(report.contains("did not wake"), "{report}");
}

#[test]
fn suite_rejects_a_log_that_forgets_on_reopen() {
    struct Forgetful;
    #[async_trait]
    impl LogHarness for Forgetful {
        type Log = InMemoryLog;
        async fn create(&mut self) -> InMemoryLog {
            InMemoryLog::new()
        }
        async fn reopen(&mut self, _log: InMemoryLog) -> InMemoryLog {
            InMemoryLog::new()
        }
    }
    let report = failure_of(|| event_log_conformance(Forgetful, quick()));
    assert!(
        report.contains("after the final reopen: head() = 0"),
        "{report}"
    );
    assert!(report.contains("#0: Append"), "{report}");
}

#[test]
fn suite_reports_the_seed_it_ran_with() {
    let config = {
        let mut built = quick();
        built.seed = Some(42);
        built
    };
    let report =
        failure_of(|| event_log_conformance(BrokenLogs(Fault::IgnoreExpectedVersion), config));
    assert!(report.contains("seed 0x2a"), "{report}");
}

#[test]
fn same_seed_gives_the_same_minimal_case() {
    let run = || {
        let report = failure_of(|| {
            event_log_conformance(BrokenLogs(Fault::SkipInStreamRead), {
                let mut built = quick();
                built.seed = Some(7);
                built
            })
        });
        let at = report
            .find("minimal failing sequence")
            .expect("a minimal sequence");
        report[at..].to_owned()
    };
    assert_eq!(run(), run());
}

#[test]
#[should_panic(expected = "must not be called from inside")]
fn suite_refuses_to_run_inside_a_runtime() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async { event_log_conformance(MemoryLogs, quick()) });
}

/// A snapshot store that lets an older save overwrite a newer one.
#[derive(Default)]
struct LastWriteWins(std::sync::Mutex<std::collections::HashMap<StreamId, Snapshot>>);

#[async_trait]
impl SnapshotStore for LastWriteWins {
    async fn save(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        self.0
            .lock()
            .unwrap()
            .insert(snapshot.stream.clone(), snapshot);
        Ok(())
    }
    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        Ok(self.0.lock().unwrap().get(stream).cloned())
    }
    async fn delete(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        self.0.lock().unwrap().remove(stream);
        Ok(())
    }
}

#[test]
fn suite_rejects_a_snapshot_store_where_older_saves_win() {
    struct H;
    #[async_trait]
    impl SnapshotHarness for H {
        type Store = LastWriteWins;
        async fn create(&mut self) -> LastWriteWins {
            LastWriteWins::default()
        }
    }
    let report = failure_of(|| snapshot_store_conformance(H, quick()));
    assert!(report.contains("minimal failing sequence"), "{report}");
}
