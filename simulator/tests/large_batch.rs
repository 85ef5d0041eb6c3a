//! A batch of 400,000 messages end to end on the embedded backend: planned
//! in parts (one transaction), sent, reacted to through the pipeline,
//! replayed with every check, exported and imported byte for byte, and
//! read back for off-policy evaluation with one row per message.

use std::sync::Arc;

use smartmsg_domain::{CampaignEvent, Part, MAX_PART_DECISIONS, PLANNED_PARTS_SCHEMA};
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{EventCodec, RecordedEvent};
use smartmsg_simulator::ope::load;
use smartmsg_simulator::portable;
use smartmsg_simulator::replay::{replay, replay_events};
use smartmsg_simulator::{run_policy, PolicyName, RunOptions, Scenario, SimPopulation};

const BATCH: u64 = 400_000;

fn events_of(dir: &std::path::Path) -> Vec<RecordedEvent> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let log = EmbeddedLog::open(dir.join("log")).unwrap();
            portable::read_all(&log).await.unwrap()
        })
}

#[test]
fn a_400k_batch_runs_end_to_end() {
    let mut scenario = Scenario {
        name: "large-batch".into(),
        ..Scenario::default()
    };
    scenario.population.subscribers = 450_000;
    scenario.campaign.budget = BATCH;
    scenario.campaign.batches = 1;
    scenario.validate().unwrap();
    let pop = Arc::new(SimPopulation::generate(&scenario).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let run = run_policy(
        &scenario,
        &pop,
        // Uniform selection, so that the log can be evaluated off-policy.
        &RunOptions::new(PolicyName::Random, run_dir.clone()),
    )
    .unwrap();
    assert!(run.violations.is_empty(), "{:?}", run.violations);
    assert_eq!(run.messages_sent, BATCH);
    assert!(run.responses_realised > 1_000, "{}", run.responses_realised);

    // The batch is recorded as its parts, in order, at schema 3, in one
    // transaction (consecutive positions and versions).
    let events = events_of(&run_dir);
    let parts: Vec<(&RecordedEvent, Part, usize)> = events
        .iter()
        .filter(|e| e.kind == "BatchPlanned")
        .map(|e| {
            assert_eq!(e.schema, PLANNED_PARTS_SCHEMA);
            match CampaignEvent::decode(&e.kind, e.schema, &e.payload).unwrap() {
                CampaignEvent::BatchPlanned {
                    batch,
                    part,
                    decisions,
                    ..
                } => {
                    assert_eq!(batch, 0);
                    assert!(decisions.len() <= MAX_PART_DECISIONS);
                    (e, part, decisions.len())
                }
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let count = BATCH.div_ceil(MAX_PART_DECISIONS as u64) as u32;
    assert_eq!(parts.len() as u32, count);
    for (i, (e, part, _)) in parts.iter().enumerate() {
        assert_eq!(
            *part,
            Part {
                index: i as u32,
                count
            }
        );
        assert_eq!(e.position, parts[0].0.position + i as u64);
        assert_eq!(e.version, parts[0].0.version + i as u64);
    }
    assert_eq!(parts.iter().map(|p| p.2 as u64).sum::<u64>(), BATCH);

    // Replay: every check holds, the parts fold into one batch.
    let r = replay(&run_dir).unwrap();
    assert!(r.violations().is_empty(), "{}", r.render());
    let c = &r.campaigns[0];
    assert_eq!((c.batches_planned, c.batches_sent), (1, 1));
    assert_eq!(c.messages_planned, BATCH);
    assert_eq!(c.reactions, run.responses_realised);
    assert!(c.path_checked.is_some(), "{}", r.render());

    // Export and import give the same bytes back; the parts are shown as
    // JSON with their place in the batch.
    let file = dir.path().join("log.jsonl");
    portable::export(&run_dir, &file).unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""part":{"index":3,"count":4}"#));
    let back = dir.path().join("back");
    portable::import(&file, &back).unwrap();
    assert_eq!(events_of(&back), events);

    // Off-policy evaluation reads one row per message, its reward from the
    // pipeline's per-user outcomes.
    let (data, _) = load::from_events(&events, pop.len(), pop.creatives(), pop.dim(), |u| {
        pop.features(u)
            .map(|x| x.iter().map(|&v| f64::from(v)).collect())
    })
    .unwrap();
    assert_eq!(data.action.len() as u64, BATCH);
    assert_eq!(
        data.reward.iter().sum::<f64>() as u64,
        run.responses_realised
    );

    // A log that lost its last part (cut mid-transaction, which a log
    // never does) is caught.
    let last = parts.last().unwrap().0.position;
    let cut: Vec<RecordedEvent> = events
        .iter()
        .filter(|e| e.position != last)
        .cloned()
        .collect();
    let v = replay_events(&cut).unwrap().violations().join("\n");
    assert!(v.contains("parts: batch 0 ends after part 3 of 4"), "{v}");
}
