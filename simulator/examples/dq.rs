//! Decision-quality experiments (issue 14): runs variants of the integrated
//! policy off the engine (a plain loop: plan, react with the world's draws,
//! learn, reactions seen before the next batch) on population CSV files
//! (from `smartmsg simulate --export-population` or the peers' harness) or
//! built-in scenarios, and prints each variant's share of the oracle's lift
//! over random.
//!
//! ```sh
//! cargo run --release -p smartmsg-simulator --example dq -- [--seed S] SOURCE...
//! ```
//!
//! A SOURCE is a CSV file or a built-in scenario name (`name@seed` for
//! another seed).

use std::sync::Arc;

use smartmsg_domain::{Expansion, Integrated, ModelConfig, Outcomes, PlanContext, Policy, Scoring};
use smartmsg_simulator::policies::model_config;
use smartmsg_simulator::rng::{self, label, mix, unit};
use smartmsg_simulator::{Scenario, SimPopulation};

fn run(s: &Scenario, pop: &SimPopulation, p: &mut dyn Policy) -> f64 {
    let spec = s.campaign_spec();
    let k = s.campaign.creatives;
    let mut remaining = pop.candidates().clone();
    let mut planned = vec![0u64; k];
    let mut left = spec.budget;
    let mut expected = 0.0;
    for b in 0..spec.batch_count() {
        let ctx = PlanContext {
            batch: b,
            batch_count: spec.batch_count(),
            creatives: k,
            remaining_budget: left,
            planned_per_creative: planned.clone(),
        };
        let size = spec.nominal_batch_size(b).min(left) as usize;
        let mut r = rng::stream(s.seed, &[label("dq"), u64::from(b)]);
        let d = p.plan(&ctx, &remaining, size, &mut r).unwrap();
        let mut o = Outcomes::new(pop.dim()).unwrap();
        let mut chosen = std::collections::HashSet::new();
        for (u, c, _) in d.iter() {
            let prob = pop.probability_at(u, c, b);
            expected += prob;
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
    expected
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut seed = 0u64;
    if let Some(i) = args.iter().position(|a| a == "--seed") {
        seed = args[i + 1].parse().unwrap();
        args.drain(i..i + 2);
    }
    let none = Expansion::None;
    let h2 = Expansion::Hinges { knots: 2 };
    let h3 = Expansion::Hinges { knots: 3 };
    let opt = Scoring::Optimistic {
        bonus: 0.25,
        noise: 0.25,
    };
    let variants: Vec<(&str, Scoring, Expansion)> = vec![
        ("old: shared-draw", Scoring::SharedDraw, none),
        ("b.25 n.25", opt, none),
        ("b.25 n.25 h3 (default)", opt, h3),
        ("b.25 n.25 h2", opt, h2),
    ];

    let mut sums = vec![0.0; variants.len() + 1];
    for src in &args {
        let (pop, s) = if src.ends_with(".csv") {
            let pop = SimPopulation::from_csv(std::path::Path::new(src)).unwrap();
            let mut s = Scenario::classic();
            s.seed = seed;
            s.population.subscribers = pop.len() as u32;
            s.population.features = pop.dim();
            s.campaign.creatives = pop.creatives();
            s.campaign.budget = (pop.len() / 3) as u64;
            (pop, s)
        } else {
            let (name, sd) = match src.split_once('@') {
                Some((n, x)) => (n, Some(x.parse::<u64>().unwrap())),
                None => (src.as_str(), None),
            };
            let mut s = Scenario::builtin(name).expect("unknown scenario");
            if let Some(x) = sd {
                s.seed = x;
            }
            (SimPopulation::generate(&s).unwrap(), s)
        };
        let pop = Arc::new(pop);
        let budget = s.campaign.budget;
        let (ra, oa) = (pop.random_expected(budget), pop.oracle_expected(budget));
        let mut line = format!("{src}:");
        for (i, (_, sc, ex)) in variants.iter().enumerate() {
            let cfg = ModelConfig {
                propensity_draws: 1,
                scoring: *sc,
                expansion: *ex,
                ..model_config(&s)
            };
            let mut p = Integrated::new(s.campaign.creatives, pop.dim(), cfg).unwrap();
            let e = run(&s, &pop, &mut p);
            let lift = (e - ra) / (oa - ra);
            sums[i] += lift;
            line.push_str(&format!(" {:.1}", 100.0 * lift));
        }
        let m =
            pop.oracle_after_random_batch(budget, s.campaign_spec().nominal_batch_size(0), s.seed);
        let l = (m - ra) / (oa - ra);
        sums[variants.len()] += l;
        line.push_str(&format!(" | oracle+random first {:.1}", 100.0 * l));
        println!("{line}");
    }
    let n = args.len() as f64;
    for ((name, _, _), s) in variants.iter().zip(&sums) {
        println!("{name:<16} mean lift {:.1}%", 100.0 * s / n);
    }
    println!(
        "{:<16} mean lift {:.1}%",
        "oracle+random1",
        100.0 * sums[variants.len()] / n
    );
}
