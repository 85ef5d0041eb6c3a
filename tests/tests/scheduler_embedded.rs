//! The scheduler on the embedded backend: jobs in an [`EmbeddedDelayQueue`],
//! effects in an [`EmbeddedLog`].
//!
//! - two schedulers serving one queue at once, with leases so short that
//!   jobs are redelivered to the other one mid-execution, never apply a
//!   job's effect twice;
//! - a crash between execute and ack (the queue closed with the lease
//!   outstanding) redelivers the job on reopen, and the idempotency key
//!   stops a second effect.

use std::sync::Arc;

use bytes::Bytes;
use smartmsg_embedded::{EmbeddedDelayQueue, EmbeddedLog, EmbeddedQueueConfig};
use smartmsg_engine::scheduler::RunReport;
use smartmsg_engine::{
    job_idempotency_key, Clock, CommandOptions, DelayQueue, EventLog, Job, JobId, ManualClock,
    QueueLimits, Repository, Scheduler,
};
use smartmsg_tests::effects::{effects, mapper, stream_of, Effects};

fn job(id: &str, due: u64) -> Job {
    Job {
        id: JobId::new(id).unwrap(),
        due_ms: due,
        payload: Bytes::from_static(b"x"),
    }
}

fn config(lease_ms: u64) -> EmbeddedQueueConfig {
    {
        let mut built = EmbeddedQueueConfig::default();
        built.limits = {
            let mut built = QueueLimits::default();
            built.lease_ms = lease_ms;
            built.max_attempts = 10_000;
            built
        };
        built
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_embedded_queue_apply_each_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(dir.path().join("log")).unwrap());
    let queue =
        Arc::new(EmbeddedDelayQueue::open_with(dir.path().join("queue"), config(3)).unwrap());
    let clock = ManualClock::new(1_000);
    let jobs = 300u64;
    let batch: Vec<Job> = (0..jobs)
        .map(|i| job(&format!("j{i}"), 1_000 + i % 40))
        .collect();
    for r in queue.schedule_many(batch).await.unwrap() {
        r.unwrap();
    }
    let repo = Repository::<Effects>::new(log.clone(), Arc::new(clock.clone()));
    let s1 = Scheduler::new(queue.clone(), repo, Arc::new(clock.clone()), mapper);
    let s2 = s1.clone();
    let mut tasks = Vec::new();
    for s in [s1, s2] {
        let (q, clock) = (queue.clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let mut total = RunReport::default();
            while q.len().await.unwrap() > 0 {
                clock.advance(1);
                let r = s.run_once(clock.now_ms()).await.unwrap();
                total.executed += r.executed;
                total.already_done += r.already_done;
                total.stale += r.stale;
                total.leased += r.leased;
            }
            total
        }));
    }
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }
    let fx = effects(log.clone()).await;
    assert_eq!(fx.len() as u64, jobs, "every job had its effect");
    let twice: Vec<_> = fx.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "effects applied twice: {twice:?}");
    assert!(
        reports.iter().all(|r| r.leased > 0),
        "both schedulers worked: {reports:?}"
    );
    eprintln!("reports: {reports:?}");
}

#[tokio::test]
async fn a_crash_between_execute_and_ack_redelivers_without_a_second_effect() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    let queue_dir = dir.path().join("queue");
    let clock = ManualClock::new(1_000);
    {
        let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&log_dir).unwrap());
        let queue = EmbeddedDelayQueue::open_with(&queue_dir, config(30_000)).unwrap();
        queue.schedule(job("a", 1_000)).await.unwrap();
        let lease = queue.poll_due(1_000, 1).await.unwrap().pop().unwrap();
        let repo = Repository::<Effects>::new(log.clone(), Arc::new(clock.clone()));
        let key = job_idempotency_key(&lease.job, log.limits().max_id_len);
        repo.execute(
            &stream_of("a"),
            &"a".to_string(),
            CommandOptions::default().with_idempotency_key(key),
        )
        .await
        .unwrap();
        // Crash: neither the lease nor the process survives.
    }
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(&log_dir).unwrap());
    let queue = Arc::new(EmbeddedDelayQueue::open_with(&queue_dir, config(30_000)).unwrap());
    assert_eq!(
        queue.next_due().await.unwrap(),
        Some(1_000),
        "due again at once"
    );
    let repo = Repository::<Effects>::new(log.clone(), Arc::new(clock.clone()));
    let s = Scheduler::new(queue.clone(), repo, Arc::new(clock.clone()), mapper);
    let r = s.run_once(1_001).await.unwrap();
    assert_eq!((r.leased, r.already_done, r.executed), (1, 1, 0), "{r:?}");
    assert_eq!(queue.len().await.unwrap(), 0);
    assert_eq!(effects(log).await["a"], 1);
}
