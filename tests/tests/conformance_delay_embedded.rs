//! The delay-queue conformance suite on the embedded, redb-backed queue:
//! with the default configuration, and with a tiny load batch and lookahead
//! so that the near-future window moves (and jobs cross from disk to memory)
//! inside every case. Each queue is reopened from disk at random points;
//! leases end on reopen.

use smartmsg_embedded::{EmbeddedDelayQueue, EmbeddedQueueConfig};
use smartmsg_engine::testkit::{delay_queue_conformance, QueueHarness, SuiteConfig};
use smartmsg_engine::QueueLimits;
use tempfile::TempDir;

struct Embedded {
    config: EmbeddedQueueConfig,
    dirs: Vec<TempDir>,
}

impl Embedded {
    fn new(config: EmbeddedQueueConfig) -> Self {
        Self {
            config,
            dirs: Vec::new(),
        }
    }
}

#[async_trait::async_trait]
impl QueueHarness for Embedded {
    type Queue = EmbeddedDelayQueue;

    async fn create(&mut self, limits: QueueLimits) -> EmbeddedDelayQueue {
        if self.dirs.len() > 4 {
            self.dirs.remove(0);
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let config = {
            let mut built = self.config.clone();
            built.limits = limits;
            built
        };
        let q = EmbeddedDelayQueue::open_with(dir.path(), config).expect("open");
        self.dirs.push(dir);
        q
    }

    async fn reopen(&mut self, queue: EmbeddedDelayQueue) -> EmbeddedDelayQueue {
        let dir = queue.dir().to_owned();
        let config = {
            let mut built = self.config.clone();
            built.limits = smartmsg_engine::DelayQueue::limits(&queue);
            built
        };
        drop(queue);
        EmbeddedDelayQueue::open_with(&dir, config).expect("reopen")
    }

    fn leases_survive_reopen(&self) -> bool {
        false
    }
}

fn cases(default: u32) -> SuiteConfig {
    {
        let mut built = SuiteConfig::default();
        built.cases = std::env::var("SMARTMSG_TESTKIT_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(default);
        built
    }
}

#[test]
fn embedded_delay_queue_conforms() {
    delay_queue_conformance(Embedded::new(EmbeddedQueueConfig::default()), cases(64));
}

#[test]
fn embedded_delay_queue_with_a_tiny_window_conforms() {
    let config = {
        let mut built = EmbeddedQueueConfig::default();
        built.lookahead_ms = 1;
        built.load_batch = 1;
        built.durable_polls = false;
        built.durable_settles = true;
        built
    };
    delay_queue_conformance(Embedded::new(config), cases(64));
}
