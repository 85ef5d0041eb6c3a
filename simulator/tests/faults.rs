//! Faults: crashes at every point, repeated jobs, repeated, reordered and
//! malformed reactions; the invariants hold after each run. And many seeds
//! with random faults.

use std::sync::Arc;

use smartmsg_simulator::runner::policy_for_seed;
use smartmsg_simulator::{
    run_policy, run_seeds, Crash, FaultPlan, PolicyName, QueueKind, RunOptions, Scenario,
    SeedsOptions, SimPopulation,
};

fn every_fault() -> FaultPlan {
    FaultPlan {
        crashes: vec![
            Crash::BeforePlan { batch: 1 },
            Crash::AfterPlanBeforeAck { batch: 2 },
            Crash::AfterPlanBeforeSend { batch: 3 },
            Crash::AfterDeliveryBeforeRecord { batch: 4 },
            Crash::AfterFeedbackBeforeUpdate { batch: 2 },
            Crash::AfterCommitBeforeRecord { commit: 3 },
            Crash::MidReactions { message: 50 },
            Crash::BeforePlan { batch: 0 },
            Crash::AfterPlanBeforeAck { batch: 0 },
        ],
        duplicate_jobs: vec![0, 3, 5],
        duplicate_reactions: 0.1,
        reorder_within_grace: 0.1,
        reorder_beyond_grace: 0.05,
        malformed_reactions: 30,
    }
}

fn run(policy: PolicyName, queue: QueueKind, faults: FaultPlan) -> smartmsg_simulator::PolicyRun {
    let s = Scenario::small();
    let pop = Arc::new(SimPopulation::generate(&s).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let run = run_policy(&s, &pop, &{
        let mut o = RunOptions::new(policy, dir.path().join("run"));
        o.queue = queue;
        o.faults = faults;
        o
    })
    .unwrap();
    // The log of a faulted run replays with every check holding, the
    // reaction path's windows re-derived from the reactions' timestamps
    // (duplicates, late and reordered reactions, crashes and restarts
    // included).
    let r = smartmsg_simulator::replay::replay(&dir.path().join("run")).unwrap();
    assert!(r.violations().is_empty(), "{}", r.render());
    assert!(r.campaigns[0].path_checked.is_some(), "{}", r.render());
    run
}

#[test]
fn every_fault_at_once_breaks_no_invariant() {
    for (policy, queue) in [
        (PolicyName::Integrated, QueueKind::Embedded),
        (PolicyName::ExploreThenCommit, QueueKind::InMemory),
    ] {
        let r = run(policy, queue, every_fault());
        assert!(
            r.violations.is_empty(),
            "{policy} {queue:?}: {:?}",
            r.violations
        );
        assert_eq!(r.faults.crashes_recovered, 9, "{policy}: every crash fired");
        // Repeated jobs and the lost ack come back; the in-memory queue
        // loses the repeats that a crash follows.
        let least = if queue == QueueKind::Embedded { 4 } else { 1 };
        assert!(
            r.faults.job_redeliveries_absorbed >= least,
            "{:?}",
            r.faults
        );
        assert!(r.pipeline.duplicates_dropped > 0, "{:?}", r.pipeline);
        assert!(r.pipeline.late_counted > 0, "{:?}", r.pipeline);
        assert!(r.pipeline.late_corrections > 0, "{:?}", r.pipeline);
        assert_eq!(r.pipeline.dead_letters, 30);
        assert_eq!(r.messages_sent, 1_200);
        assert!(
            r.faults.messages_processed > r.responses_realised + 30,
            "crashes re-read the topic: {:?}",
            r.faults
        );
    }
}

#[test]
fn a_crashed_run_decides_like_an_uncrashed_one() {
    let crashes_only = FaultPlan {
        crashes: every_fault().crashes,
        ..FaultPlan::default()
    };
    let a = run(PolicyName::Integrated, QueueKind::Embedded, crashes_only);
    let b = run(
        PolicyName::Integrated,
        QueueKind::Embedded,
        FaultPlan::default(),
    );
    assert!(a.violations.is_empty(), "{:?}", a.violations);
    assert_eq!(a.faults.crashes_recovered, 9);
    // Same decisions, same reactions: recovery rebuilt the same model.
    assert_eq!(a.batches, b.batches);
    assert_eq!(a.responses_realised, b.responses_realised);
}

#[test]
fn fifty_seeds_with_random_faults_break_no_invariant() {
    let outcomes = run_seeds(&Scenario::small(), &{
        let mut o = SeedsOptions::new(1, 50);
        o.queue = QueueKind::Embedded;
        o.threads = 2;
        o
    });
    assert_eq!(outcomes.len(), 50);
    let crashes: u64 = outcomes.iter().map(|o| o.crashes).sum();
    assert!(crashes > 20, "random plans crash: {crashes}");
    for o in &outcomes {
        assert_eq!(o.policy, policy_for_seed(o.seed));
        assert!(
            o.ok(),
            "seed {} ({}): {:?}\nfaults {:?}",
            o.seed,
            o.policy,
            o.result,
            o.faults
        );
    }
}
