//! The engine's `EventLog` conformance suite against a real Kafka-protocol
//! broker (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).
//!
//! Every case gets a fresh log (its own topic and transactional id); a
//! reopen closes the writer and opens a new one, which fences the old
//! transactional id and rebuilds the index by reading the topic.

mod common;

use async_trait::async_trait;
use smartmsg_engine::testkit::{event_log_conformance, LogHarness, SuiteConfig};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};

struct Harness {
    bootstrap: String,
    partitions: u32,
    seek_gap: i64,
}

#[async_trait]
impl LogHarness for Harness {
    type Log = KafkaEventLog;

    async fn create(&mut self) -> KafkaEventLog {
        let mut cfg: KafkaConfig = common::config(&self.bootstrap, "conf", self.partitions);
        cfg.seek_gap = self.seek_gap;
        KafkaEventLog::open(cfg).await.expect("open a fresh log")
    }

    async fn reopen(&mut self, log: KafkaEventLog) -> KafkaEventLog {
        let cfg = log.config().clone();
        log.close().await;
        KafkaEventLog::open(cfg).await.expect("reopen")
    }
}

fn suite() -> SuiteConfig {
    SuiteConfig {
        cases: 24,
        max_ops: 48,
        max_shrink_iters: 64,
        ..SuiteConfig::default()
    }
}

#[test]
fn conformance_three_partitions() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    event_log_conformance(
        Harness {
            bootstrap,
            partitions: 3,
            seek_gap: 1_000,
        },
        suite(),
    );
}

/// One partition, and a seek gap of 1 so that reads of streams interleaved
/// with others fetch in many runs.
#[test]
fn conformance_one_partition_short_runs() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    event_log_conformance(
        Harness {
            bootstrap,
            partitions: 1,
            seek_gap: 1,
        },
        SuiteConfig {
            cases: 8,
            ..suite()
        },
    );
}
