//! Child process of the delay-queue crash test. Opens the embedded delay
//! queue in `DIR/queue` and the embedded log in `DIR/log`, then, until
//! killed:
//!
//! - `schedule`: schedules jobs (one per call, or batches through
//!   `schedule_many`) due within the next 50 ms, printing `sched <id>` for
//!   each once its schedule returned (durable);
//! - `fire`: runs a scheduler on the system clock that turns each due job
//!   into one `Fired` event (idempotency key from the job) and acks it;
//! - `both`: both at once.
//!
//! Usage: `delay_child DIR SEED MODE` (with `DELAY_CHILD_DEBUG` set, each
//! non-empty scheduler report goes to stderr).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, EmbeddedQueueConfig};

/// Log segment size of the child and the parent (small: quick to open).
pub const SEGMENT_BYTES: u64 = 1 << 20;
use smartmsg_engine::{
    Clock, DelayQueue, EventLog, Job, JobId, QueueLimits, Repository, Scheduler, SchedulerConfig,
    SystemClock,
};
use smartmsg_tests::effects::{mapper, Effects};

/// The queue configuration of the child and the parent.
pub fn queue_config() -> EmbeddedQueueConfig {
    {
        let mut built = EmbeddedQueueConfig::default();
        built.limits = {
            let mut built = QueueLimits::default();
            built.lease_ms = 200;
            built.max_attempts = 1_000_000;
            built
        };
        built
    }
}

fn main() -> anyhow::Result<()> {
    smartmsg_tests::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: delay_child DIR SEED MODE");
    let dir = std::path::PathBuf::from(&args[1]);
    let seed: u64 = args[2].parse()?;
    let mode = args[3].clone();
    let queue = Arc::new(EmbeddedDelayQueue::open_with(
        dir.join("queue"),
        queue_config(),
    )?);
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open_with(dir.join("log"), {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = SEGMENT_BYTES;
        built
    })?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    rt.block_on(async move {
        let mut tasks = Vec::new();
        if mode == "schedule" || mode == "both" {
            let (queue, stdout) = (queue.clone(), stdout.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                let mut n = 0u64;
                loop {
                    let batch = if rng.random_bool(0.3) {
                        rng.random_range(2..20)
                    } else {
                        1
                    };
                    let jobs: Vec<Job> = (0..batch)
                        .map(|_| {
                            n += 1;
                            Job {
                                id: JobId::new(format!("r{seed}-{n}")).expect("valid id"),
                                due_ms: SystemClock.now_ms() + rng.random_range(0..50),
                                payload: Bytes::from(format!("job {n}")),
                            }
                        })
                        .collect();
                    let ids: Vec<JobId> = jobs.iter().map(|j| j.id.clone()).collect();
                    if batch == 1 {
                        queue
                            .schedule(jobs.into_iter().next().expect("one"))
                            .await
                            .expect("schedule");
                    } else {
                        for r in queue.schedule_many(jobs).await.expect("schedule_many") {
                            r.expect("scheduled");
                        }
                    }
                    {
                        let mut out = stdout.lock().unwrap();
                        for id in ids {
                            writeln!(out, "sched {id}").unwrap();
                        }
                        out.flush().unwrap();
                    }
                    // A few hundred jobs per second: enough to be killed
                    // mid-commit, few enough for the final drain.
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }));
        }
        if mode == "fire" || mode == "both" {
            let repo = Repository::<Effects>::new(log.clone(), Arc::new(SystemClock));
            let s = Scheduler::new(queue.clone(), repo, Arc::new(SystemClock), mapper)
                .with_config({
                    let mut built = SchedulerConfig::default();
                    built.batch = 16;
                    built
                })
                .expect("config");
            tasks.push(tokio::spawn(async move {
                loop {
                    let r = s.run_once(SystemClock.now_ms()).await.expect("poll");
                    if r.leased > 0 && std::env::var_os("DELAY_CHILD_DEBUG").is_some() {
                        eprintln!("{r:?}");
                    }
                    if r.leased == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
    Ok(())
}
