//! Shared helpers of the RabbitMQ tests.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use smartmsg_engine::{DelayQueue, Job, JobId, Lease};
use smartmsg_rabbitmq::{RabbitConfig, RabbitDelayQueue};

/// The broker's URL, or `None` after printing why the test is skipped.
pub fn url() -> Option<String> {
    match std::env::var("SMARTMSG_RABBITMQ_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!("skipping: SMARTMSG_RABBITMQ_URL not set");
            None
        }
    }
}

/// A queue-name prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("smtest.{test}.{}.{n}", std::process::id())
}

/// Wall-clock ms since the epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A real-time configuration for a fresh prefix.
pub fn config(url: &str, test: &str) -> RabbitConfig {
    RabbitConfig::new(url, unique_prefix(test))
}

pub fn job(id: &str, due_ms: u64, payload: &str) -> Job {
    Job {
        id: JobId::new(id).unwrap(),
        due_ms,
        payload: bytes::Bytes::from(payload.to_owned()),
    }
}

/// One fired job: its lease and the wall-clock ms when `poll_due` returned
/// it.
pub struct Fired {
    pub lease: Lease,
    pub at_ms: u64,
}

/// Polls with the wall clock every `every` until `want` leases came or
/// `limit` passed; acks each lease at once. Errors (a broker restart) are
/// retried.
pub async fn collect(
    q: &RabbitDelayQueue,
    want: usize,
    every: Duration,
    limit: Duration,
) -> Vec<Fired> {
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    while out.len() < want && start.elapsed() < limit {
        match q.poll_due(wall_ms(), q.limits().max_poll.min(1000)).await {
            Ok(leases) => {
                let at_ms = wall_ms();
                for lease in leases {
                    let mut tries = 0;
                    while let Err(e) = q.ack(&lease.token).await {
                        tries += 1;
                        assert!(tries < 200, "ack kept failing: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    out.push(Fired { lease, at_ms });
                }
            }
            Err(e) => {
                eprintln!("poll_due failed (retrying): {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep(every).await;
    }
    out
}

/// The p-th percentile (0..=100) of `v` (sorted in place).
pub fn percentile(v: &mut [i64], p: f64) -> i64 {
    smartmsg_engine::testkit::stats::percentile(v, p / 100.0).unwrap_or(0)
}

/// A tiny deterministic generator (splitmix64) for shuffles and delays.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Deletes a test's queues if the test panics (a passing test deletes them
/// itself with `destroy`).
pub struct Cleanup {
    url: String,
    names: smartmsg_rabbitmq::QueueNames,
}

impl Cleanup {
    pub fn new(url: &str, q: &RabbitDelayQueue) -> Self {
        Self {
            url: url.to_owned(),
            names: q.names().clone(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let (url, names) = (self.url.clone(), self.names.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = rt.block_on(smartmsg_rabbitmq::delete_queues(&url, &names));
        })
        .join();
    }
}
