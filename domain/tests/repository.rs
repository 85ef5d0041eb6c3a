//! The campaign aggregate driven by the engine's `Repository` over the
//! in-memory log: commands become events in the log, retries by command id
//! append nothing, snapshots load to the same state as a full replay.

use std::sync::Arc;

use smartmsg_domain::synthetic::{Population, ResponseTruth};
use smartmsg_domain::{
    Action, BatchSchedule, BatchSizing, Campaign, CampaignCommand, CampaignError, CampaignSpec,
    Integrated, ModelConfig, Policy, Status,
};
use smartmsg_engine::memory::{InMemoryLog, InMemorySnapshots};
use smartmsg_engine::{
    CommandOptions, EventLog, ManualClock, Repository, RepositoryConfig, RepositoryError, StreamId,
};

#[tokio::test]
async fn a_campaign_runs_through_the_repository_and_replays() {
    use rand::SeedableRng;
    let log = Arc::new(InMemoryLog::new());
    let snapshots = Arc::new(InMemorySnapshots::new());
    let clock = ManualClock::new(0);
    let repo = Repository::<Campaign>::new(log.clone(), Arc::new(clock.clone()))
        .with_snapshots(snapshots)
        .with_config({
            let mut built = RepositoryConfig::default();
            built.snapshot_every = 3;
            built
        })
        .unwrap();
    let stream = StreamId::new("campaign-7").unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let pop =
        Population::generate(2_000, ResponseTruth::segmented(2, 3, 0.05, 1.0), &mut rng).unwrap();
    let spec = CampaignSpec {
        channel: "ch".into(),
        audience: "aud".into(),
        creatives: vec!["a".into(), "b".into()],
        budget: 300,
        schedule: BatchSchedule {
            start_ms: 0,
            interval_ms: 1_000,
            sizing: BatchSizing::Size(100),
        },
    };
    let run = |id: &str, action: Action| CampaignCommand::new(id, action);
    let opts = CommandOptions::default;
    repo.execute(&stream, &run("create", Action::Create(spec)), opts())
        .await
        .unwrap();
    repo.execute(&stream, &run("start", Action::Start), opts())
        .await
        .unwrap();
    let policy = Integrated::new(2, 3, ModelConfig::default()).unwrap();
    for batch in 0..3u32 {
        let state = repo.load(&stream).await.unwrap().state;
        let mut remaining = pop.candidates.clone();
        remaining.retain_unmessaged(state.messaged());
        let decisions = policy
            .plan(
                &state.plan_context(batch).unwrap(),
                &remaining,
                state.batch_allowance(batch) as usize,
                &mut rng,
            )
            .unwrap();
        let plan = run(
            &format!("plan-{batch}"),
            Action::PlanBatch {
                batch,
                policy: policy.name().into(),
                decisions,
            },
        );
        let first = repo.execute(&stream, &plan, opts()).await.unwrap();
        assert_eq!(first.events.len(), 1);
        // A redelivered command appends nothing.
        let again = repo.execute(&stream, &plan, opts()).await.unwrap();
        assert!(again.events.is_empty() && again.append.is_none());
        assert_eq!(again.version, first.version);
        repo.execute(
            &stream,
            &run(&format!("sent-{batch}"), Action::RecordBatchSent { batch }),
            opts(),
        )
        .await
        .unwrap();
        clock.advance(1_000);
    }
    // The plan is done: another batch is refused by the domain.
    let extra = run(
        "plan-3",
        Action::PlanBatch {
            batch: 3,
            policy: "integrated".into(),
            decisions: smartmsg_domain::Decisions::default(),
        },
    );
    let err = repo.execute(&stream, &extra, opts()).await.unwrap_err();
    assert!(matches!(
        err,
        RepositoryError::Domain(CampaignError::BatchOutOfRange { batch: 3, count: 3 })
    ));
    repo.execute(&stream, &run("pause", Action::Pause), opts())
        .await
        .unwrap();
    let err = repo
        .execute(&stream, &run("pause", Action::Resume), opts())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        RepositoryError::Domain(CampaignError::CommandIdReused { .. })
    ));
    let loaded = repo.load(&stream).await.unwrap();
    assert_eq!(loaded.state.status(), Some(Status::Paused));
    assert_eq!(loaded.state.sent(), 300);
    assert_eq!(loaded.version, 1 + 2 + 3 * 2 + 1);
    // Without snapshots: the same state from the events alone.
    let plain = Repository::<Campaign>::new(log.clone(), Arc::new(clock.clone()));
    assert_eq!(plain.load(&stream).await.unwrap().state, loaded.state);
    assert_eq!(log.head().await.unwrap(), loaded.version);
}
