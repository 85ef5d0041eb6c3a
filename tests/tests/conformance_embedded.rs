//! The engine's conformance suites on the embedded backend: the segment-file
//! log (default and tiny segments, so rolls happen inside the suite) and the
//! redb snapshot store, each reopened from disk at random points.

use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, RedbSnapshots};
use smartmsg_engine::testkit::{
    event_log_conformance, snapshot_store_conformance, LogHarness, SnapshotHarness, SuiteConfig,
};
use smartmsg_engine::Limits;
use tempfile::TempDir;

struct Embedded {
    config: EmbeddedConfig,
    dirs: Vec<TempDir>,
}

impl Embedded {
    fn new(config: EmbeddedConfig) -> Self {
        Self {
            config,
            dirs: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl LogHarness for Embedded {
    type Log = EmbeddedLog;

    async fn create(&mut self) -> EmbeddedLog {
        // Keep only the latest few directories alive; each case gets a fresh one.
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let log = EmbeddedLog::open_with(dir.path(), self.config.clone()).expect("open");
        self.dirs.push(dir);
        log
    }

    async fn reopen(&mut self, log: EmbeddedLog) -> EmbeddedLog {
        let dir = log.dir().to_owned();
        drop(log);
        EmbeddedLog::open_with(&dir, self.config.clone()).expect("reopen")
    }
}

#[test]
fn embedded_log_conforms() {
    event_log_conformance(
        Embedded::new(EmbeddedConfig::default()),
        SuiteConfig::default(),
    );
}

#[test]
fn embedded_log_with_tiny_segments_and_limits_conforms() {
    let config = {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 4096;
        built.limits = {
            let mut limits = Limits::default();
            limits.max_event_bytes = 512;
            limits.max_tx_events = 8;
            limits.max_tx_bytes = 2048;
            limits.max_tx_streams = 3;
            limits.max_read_events = 16;
            limits.max_kind_len = 16;
            limits.max_id_len = 16;
            // Small enough that the suite's retries cross it.
            limits.idempotency_window = 12;
            limits
        };
        built
    };
    event_log_conformance(Embedded::new(config), SuiteConfig::default());
}

struct Snapshots {
    dirs: Vec<TempDir>,
}

#[async_trait::async_trait]
impl SnapshotHarness for Snapshots {
    type Store = RedbSnapshots;

    async fn create(&mut self) -> RedbSnapshots {
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbSnapshots::open(dir.path().join("snapshots.redb")).expect("open");
        self.dirs.push(dir);
        store
    }

    async fn reopen(&mut self, store: RedbSnapshots) -> RedbSnapshots {
        let path = self
            .dirs
            .last()
            .expect("created")
            .path()
            .join("snapshots.redb");
        drop(store);
        RedbSnapshots::open(path).expect("reopen")
    }
}

#[test]
fn redb_snapshots_conform() {
    snapshot_store_conformance(Snapshots { dirs: Vec::new() }, SuiteConfig::default());
}
