//! Statistical quality checks (seeded, fixed tolerances) on synthetic
//! populations with a known logistic response model, and replay of a
//! campaign from its events alone.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use smartmsg_domain::synthetic::{run_campaign, DriveConfig, Population, ResponseTruth};
use smartmsg_domain::{
    Campaign, CampaignEvent, CreativeThompson, ExploreThenCommit, Integrated, ModelConfig, Policy,
    Random, Targeting,
};
use smartmsg_engine::Aggregate;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

const DRIVE: DriveConfig = DriveConfig::new(3_000, 10, 1_000, 3_600_000);

fn model_config() -> ModelConfig {
    let mut m = ModelConfig::default();
    // Propensities do not change the decisions; few draws keep the test
    // quick in debug builds.
    m.propensity_draws = 4;
    m
}

/// Three creatives, each best for its own segment of users.
fn population(seed: u64) -> Population {
    let truth = ResponseTruth::segmented(3, 6, 0.04, 1.2);
    Population::generate(12_000, truth, &mut rng(seed)).unwrap()
}

fn expected(policy: &mut dyn Policy, pop: &Population, seed: u64) -> f64 {
    run_campaign(policy, pop, &DRIVE, &mut rng(seed))
        .unwrap()
        .expected_responses
}

#[test]
fn integrated_beats_every_other_policy() {
    let seeds = [1u64, 2, 3];
    let mut totals = [0.0f64; 5];
    let names = [
        "integrated",
        "random",
        "explore-then-commit",
        "creative-thompson",
        "targeting",
    ];
    let mut oracle = 0.0;
    for &seed in &seeds {
        let pop = population(seed);
        oracle += pop.oracle_expected(DRIVE.budget as usize);
        // Targeting gets the creative with the best average response: the
        // strongest single-creative choice.
        let best = (0..3u16)
            .max_by(|&a, &b| {
                pop.random_expected(1, a)
                    .total_cmp(&pop.random_expected(1, b))
            })
            .unwrap();
        let mut policies: Vec<Box<dyn Policy>> = vec![
            Box::new(Integrated::new(3, 6, model_config()).unwrap()),
            Box::new(Random::new(3).unwrap()),
            Box::new(ExploreThenCommit::new(3, 100).unwrap()),
            Box::new(CreativeThompson::new(3, 100).unwrap()),
            Box::new(Targeting::new(3, best, 6, model_config()).unwrap()),
        ];
        for (total, p) in totals.iter_mut().zip(policies.iter_mut()) {
            *total += expected(p.as_mut(), &pop, seed * 100);
        }
    }
    let report: Vec<String> = names
        .iter()
        .zip(&totals)
        .map(|(n, t)| format!("{n}: {:.1}", t / seeds.len() as f64))
        .collect();
    eprintln!(
        "expected responses per campaign (oracle {:.1}): {}",
        oracle / seeds.len() as f64,
        report.join(", ")
    );
    for (name, &other) in names.iter().zip(&totals).skip(1) {
        assert!(
            totals[0] > 1.10 * other,
            "integrated {:.1} does not beat {name} {:.1} by 10%",
            totals[0],
            other
        );
    }
}

#[test]
fn thompson_concentrates_on_the_best_creative() {
    // No user effects: creative rates 2%, 4%, 8%.
    let truth = ResponseTruth {
        intercepts: [0.02f64, 0.04, 0.08]
            .iter()
            .map(|p| (p / (1.0 - p)).ln())
            .collect(),
        weights: vec![0.0; 3],
        dim: 1,
    };
    let pop = Population::generate(30_000, truth, &mut rng(5)).unwrap();
    let mut drive = DRIVE;
    drive.budget = 15_000;
    drive.batches = 15;
    let mut t = CreativeThompson::new(3, 1000).unwrap();
    let run = run_campaign(&mut t, &pop, &drive, &mut rng(6)).unwrap();
    let last: Vec<u32> = run.per_batch_creatives[10..]
        .iter()
        .fold(vec![0; 3], |acc, b| {
            acc.iter().zip(b).map(|(a, b)| a + b).collect()
        });
    let share = f64::from(last[2]) / f64::from(last.iter().sum::<u32>());
    eprintln!("last five batches per creative: {last:?} (best share {share:.3})");
    assert!(share > 0.9, "best creative's share {share}");
    assert!(t.arms()[2].mean() > t.arms()[1].mean() && t.arms()[1].mean() > t.arms()[0].mean());
    let mut r = Random::new(3).unwrap();
    let random = run_campaign(&mut r, &pop, &drive, &mut rng(6)).unwrap();
    assert!(run.expected_responses > 1.4 * random.expected_responses);
}

#[test]
fn replay_reproduces_the_campaign_without_the_policy() {
    let pop = population(9);
    let mut p = Integrated::new(3, 6, model_config()).unwrap();
    let run = run_campaign(&mut p, &pop, &DRIVE, &mut rng(10)).unwrap();
    // Fold the recorded events: same state, no policy, no randomness.
    let mut replayed = Campaign::default();
    for e in &run.events {
        replayed.evolve(e);
    }
    assert_eq!(replayed, run.campaign);
    assert_eq!(run.campaign.sent(), DRIVE.budget);
    assert_eq!(run.campaign.messaged().len() as u64, DRIVE.budget);
    // The recorded decisions carry everything off-policy evaluation needs.
    let mut expected = 0.0;
    let mut batches = 0;
    for e in &run.events {
        if let CampaignEvent::BatchPlanned {
            decisions, policy, ..
        } = e
        {
            assert_eq!(policy, "integrated");
            batches += 1;
            for (u, c, prop) in decisions.iter() {
                assert!(prop > 0.0 && prop <= 1.0);
                expected += pop.probability(u, c);
            }
        }
    }
    assert_eq!(batches, DRIVE.batches);
    assert!((expected - run.expected_responses).abs() < 1e-6);
}
