//! The engine's `DelayQueue` conformance suite against a real RabbitMQ,
//! in virtual-time mode.
//!
//! The suite drives a virtual clock: due times up to 10^12 ms (31 years)
//! ahead, and `u64::MAX`, must be returned as soon as the caller's `now_ms`
//! reaches them. RabbitMQ's TTLs run on real time and cannot follow that,
//! so the suite runs with `virtual_time` on: every job goes straight to the
//! due queue and `poll_due` releases it by the caller's clock. Everything
//! else is the production path on the real broker: publisher confirms,
//! the journal stream and its registry (idempotency, cancel tombstones,
//! `len`, `next_due`), leases, attempt counting in the message, dead
//! letters, and reopening (a graceful close and a fresh open that replays
//! the journal). The TTL levels and the hop consumer are covered by the
//! real-time tests in `realtime.rs` and `restart.rs`.

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use smartmsg_engine::testkit::{delay_queue_conformance, QueueHarness, SuiteConfig};
use smartmsg_engine::QueueLimits;
use smartmsg_rabbitmq::{delete_queues, QueueNames, RabbitConfig, RabbitDelayQueue};

struct Harness {
    url: String,
    /// Prefixes created, to delete afterwards.
    prefixes: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl QueueHarness for Harness {
    type Queue = RabbitDelayQueue;

    async fn create(&mut self, limits: QueueLimits) -> RabbitDelayQueue {
        let prefix = common::unique_prefix("conf");
        self.prefixes.lock().unwrap().push(prefix.clone());
        let mut cfg = RabbitConfig::new(&self.url, prefix);
        cfg.limits = limits;
        cfg.virtual_time = true;
        cfg.background_lease_expiry = false;
        cfg.levels = 1;
        RabbitDelayQueue::open(cfg)
            .await
            .expect("open a fresh queue")
    }

    async fn reopen(&mut self, queue: RabbitDelayQueue) -> RabbitDelayQueue {
        let cfg = queue.config().clone();
        queue.close().await.expect("close gracefully");
        RabbitDelayQueue::open(cfg).await.expect("reopen")
    }

    fn leases_survive_reopen(&self) -> bool {
        false
    }
}

#[test]
fn conformance_suite_in_virtual_time() {
    let Some(url) = common::url() else { return };
    let prefixes = Arc::new(Mutex::new(Vec::new()));
    let harness = Harness {
        url: url.clone(),
        prefixes: Arc::clone(&prefixes),
    };
    // SMARTMSG_RABBITMQ_SUITE_CASES raises the number of random cases.
    let cases = std::env::var("SMARTMSG_RABBITMQ_SUITE_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(16);
    // SMARTMSG_RABBITMQ_SUITE_SEED: a number, or "random".
    let seed = match std::env::var("SMARTMSG_RABBITMQ_SUITE_SEED")
        .ok()
        .as_deref()
    {
        None => Some(SuiteConfig::DEFAULT_SEED),
        Some("random") => None,
        Some(s) => Some(
            s.trim_start_matches("0x")
                .parse::<u64>()
                .or_else(|_| u64::from_str_radix(s.trim_start_matches("0x"), 16))
                .expect("SMARTMSG_RABBITMQ_SUITE_SEED"),
        ),
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        delay_queue_conformance(harness, {
            let mut built = SuiteConfig::default();
            built.cases = cases;
            built.max_ops = 48;
            built.max_shrink_iters = 64;
            built.seed = seed;
            built
        })
    }));
    // Delete every queue the suite made, pass or fail.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let list = prefixes.lock().unwrap().clone();
    rt.block_on(async {
        for p in &list {
            if let Err(e) = delete_queues(&url, &QueueNames::new(p, 1)).await {
                eprintln!("could not delete the queues of {p}: {e}");
            }
        }
    });
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
