//! Crash test of the embedded delay queue: a child process schedules jobs
//! and/or fires them (each firing appends one event to an embedded log with
//! the job's idempotency key, then acks) and is killed with SIGKILL at random
//! moments, many times, during scheduling, during firing, and during both.
//! After each kill the queue and the log reopen and:
//!
//! - every job whose schedule returned (printed by the child) is still in the
//!   queue or has had its effect: nothing acknowledged is lost;
//! - no job has had its effect twice;
//! - nothing was dead-lettered.
//!
//! At the end the parent fires everything left; then every acknowledged job
//! has had its effect exactly once. `SMARTMSG_CRASH_KILLS` sets the number of
//! kills (default 90).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use smartmsg_embedded::{EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, EmbeddedQueueConfig};
use smartmsg_engine::{
    Clock, DelayQueue, EventLog, JobId, ManualClock, QueueLimits, Repository, Scheduler,
    SystemClock,
};
use smartmsg_tests::effects::{effects, mapper, Effects};
use smartmsg_tests::plan::CrashPlan;

fn queue_config() -> EmbeddedQueueConfig {
    // Must match the child's.
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

fn open(dir: &Path) -> (Arc<EmbeddedDelayQueue>, Arc<dyn EventLog>) {
    let q = EmbeddedDelayQueue::open_with(dir.join("queue"), queue_config())
        .unwrap_or_else(|e| panic!("reopen queue: {e}"));
    let log = EmbeddedLog::open_with(dir.join("log"), {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 1 << 20; // as the child's
        built
    })
    .unwrap_or_else(|e| panic!("reopen log: {e}"));
    (Arc::new(q), Arc::new(log))
}

#[test]
fn sigkill_never_loses_a_scheduled_job_nor_doubles_an_effect() {
    let mut plan = CrashPlan::from_env("delay queue", 0xde1a7, 90);
    let kills = plan.kills;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rng = &mut plan.rng;
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut fired_during_runs = 0usize;
    for round in 0..kills {
        let mode = ["schedule", "fire", "both"][(round % 3) as usize];
        let mut child = Command::new(env!("CARGO_BIN_EXE_delay_child"))
            .arg(&dir)
            .arg(rng.random::<u32>().to_string())
            .arg(mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn delay_child");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut ids = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let id = line
                    .strip_prefix("sched ")
                    .unwrap_or_else(|| panic!("unexpected child output {line:?}"));
                ids.push(id.to_owned());
            }
            ids
        });
        let after = Duration::from_micros(rng.random_range(20_000..200_000));
        std::thread::sleep(after);
        child.kill().expect("SIGKILL");
        eprintln!("kill {} of {kills} ({mode}) after {after:?}", round + 1);
        let status = child.wait().unwrap();
        assert!(!status.success(), "child exited by itself: {status}");
        acked.extend(reader.join().unwrap());

        let (queue, log) = open(&dir);
        rt.block_on(async {
            let fx = effects(log.clone()).await;
            let twice: Vec<_> = fx.iter().filter(|(_, n)| **n > 1).collect();
            assert!(
                twice.is_empty(),
                "round {round} ({mode}): effects twice: {twice:?}"
            );
            fired_during_runs = fired_during_runs.max(fx.len());
            for id in &acked {
                let jid = JobId::new(id).unwrap();
                assert!(
                    fx.contains_key(id) || queue.contains(&jid).unwrap(),
                    "round {round} ({mode}): acknowledged job {id} was lost"
                );
            }
            let dead = queue.dead_letters(10).await.unwrap();
            assert!(dead.is_empty(), "round {round}: dead letters {dead:?}");
        });
    }

    // Fire everything left, on a clock past every due time.
    let (queue, log) = open(&dir);
    rt.block_on(async {
        let clock = ManualClock::new(SystemClock.now_ms() + 3_600_000);
        let repo = Repository::<Effects>::new(log.clone(), Arc::new(clock.clone()));
        let s = Scheduler::new(queue.clone(), repo, Arc::new(clock.clone()), mapper);
        while queue.len().await.unwrap() > 0 {
            clock.advance(1_000);
            s.run_once(clock.now_ms()).await.unwrap();
        }
        let fx = effects(log.clone()).await;
        for id in &acked {
            assert_eq!(fx.get(id), Some(&1), "job {id}: effect count after the final drain");
        }
        assert!(fx.values().all(|n| *n == 1), "an effect happened twice");
        eprintln!(
            "{kills} kills: {} jobs acknowledged, {fired_during_runs} fired by the children, {} in all",
            acked.len(),
            fx.len()
        );
        assert!(fired_during_runs > 0, "the children never fired a job");
    });
}
