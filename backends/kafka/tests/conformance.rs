//! The engine's `EventLog` conformance suite against a real Kafka-protocol
//! broker (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).
//!
//! Every case gets a fresh log (its own topic and transactional id); a
//! reopen closes the writer and opens a new one, which fences the old
//! transactional id and rebuilds the index. Checkpoints are written every
//! few events, so most reopens load a checkpoint and read only the events
//! after it; the suite checks that the count of such reopens is not zero.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use smartmsg_engine::testkit::{event_log_conformance, LogHarness, SuiteConfig};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};

struct Harness {
    bootstrap: String,
    partitions: u32,
    seek_gap: i64,
    checkpoint_every: u64,
    /// Reopens, and those that loaded a checkpoint.
    reopens: Arc<(AtomicU64, AtomicU64)>,
}

impl Harness {
    fn new(bootstrap: String, partitions: u32, seek_gap: i64, checkpoint_every: u64) -> Self {
        Self {
            bootstrap,
            partitions,
            seek_gap,
            checkpoint_every,
            reopens: Arc::default(),
        }
    }
}

/// Runs the suite and checks that some reopens loaded a checkpoint.
fn run(harness: Harness, config: SuiteConfig) {
    let reopens = harness.reopens.clone();
    event_log_conformance(harness, config);
    let (all, from) = (
        reopens.0.load(Ordering::Relaxed),
        reopens.1.load(Ordering::Relaxed),
    );
    eprintln!("{from} of {all} reopens loaded a checkpoint");
    assert!(from > 0, "no reopen loaded a checkpoint ({all} reopens)");
}

#[async_trait]
impl LogHarness for Harness {
    type Log = KafkaEventLog;

    async fn create(&mut self) -> KafkaEventLog {
        let mut cfg: KafkaConfig = common::config(&self.bootstrap, "conf", self.partitions);
        cfg.seek_gap = self.seek_gap;
        cfg.checkpoint_every_events = self.checkpoint_every;
        cfg.checkpoint_chunk_bytes = 1024;
        KafkaEventLog::open(cfg).await.expect("open a fresh log")
    }

    async fn reopen(&mut self, log: KafkaEventLog) -> KafkaEventLog {
        let cfg = log.config().clone();
        log.close().await;
        let log = KafkaEventLog::open(cfg).await.expect("reopen");
        self.reopens.0.fetch_add(1, Ordering::Relaxed);
        if log.stats().rebuild.checkpoint_events > 0 {
            self.reopens.1.fetch_add(1, Ordering::Relaxed);
        }
        log
    }
}

fn suite() -> SuiteConfig {
    {
        let mut built = SuiteConfig::default();
        built.cases = 24;
        built.max_ops = 48;
        built.max_shrink_iters = 64;
        built
    }
}

#[test]
fn conformance_three_partitions() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    run(Harness::new(bootstrap, 3, 1_000, 3), suite());
}

/// One partition, and a seek gap of 1 so that reads of streams interleaved
/// with others fetch in many runs.
#[test]
fn conformance_one_partition_short_runs() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    run(Harness::new(bootstrap, 1, 1, 5), {
        let mut built = suite();
        built.cases = 8;
        built
    });
}
