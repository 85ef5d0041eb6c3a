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

use rand::RngCore;
use smartmsg_domain::data::OutcomeRow;
use smartmsg_domain::{
    Candidates, Decisions, Expansion, GaussianWeights, Integrated, Link, ModelConfig, Outcomes,
    PlanContext, Policy, PolicyError, Prior, Random, Scoring,
};
use smartmsg_simulator::policies::model_config;
use smartmsg_simulator::rng::{self, label, mix, unit};
use smartmsg_simulator::{Scenario, SimPopulation};

/// One logistic model over `[x, e_c ⊗ (scale·x), e_c]`: weights shared by
/// every creative plus each creative's own deviation (and intercept), so
/// every response teaches the shared part. Batch 0 random, then one
/// posterior draw per batch (or the mean).
struct Shared {
    model: GaussianWeights,
    k: usize,
    d: usize,
    scale: f32,
    greedy: bool,
    random: Random,
}

impl Shared {
    fn new(k: usize, d: usize, scale: f32, greedy: bool) -> Self {
        let prior = Prior {
            intercept_mean: -3.0,
            intercept_variance: 4.0,
            weight_variance: 1.0,
        };
        Self {
            model: GaussianWeights::new(d + k * d + k, &prior).unwrap(),
            k,
            d,
            scale,
            greedy,
            random: Random::new(k).unwrap(),
        }
    }
    fn z(&self, x: &[f32], c: usize, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(x);
        for j in 0..self.k {
            for &v in x {
                out.push(if j == c { self.scale * v } else { 0.0 });
            }
        }
        for j in 0..self.k {
            out.push(if j == c { 1.0 } else { 0.0 });
        }
    }
}

impl Policy for Shared {
    fn name(&self) -> &str {
        "shared"
    }
    fn creatives(&self) -> usize {
        self.k
    }
    fn update(&mut self, o: &Outcomes) -> Result<(), PolicyError> {
        let mut zs: Vec<Vec<f32>> = Vec::with_capacity(o.len());
        for r in o.rows() {
            let mut z = Vec::new();
            self.z(r.x, usize::from(r.creative), &mut z);
            zs.push(z);
        }
        let rows: Vec<OutcomeRow<'_>> = o
            .rows()
            .zip(&zs)
            .map(|(r, z)| OutcomeRow {
                creative: 0,
                x: z,
                trials: r.trials,
                successes: r.successes,
            })
            .collect();
        self.model.update(Link::Logistic, &rows)?;
        Ok(())
    }
    fn plan(
        &self,
        ctx: &PlanContext,
        c: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        if ctx.batch == 0 {
            return self.random.plan(ctx, c, budget, rng);
        }
        let n = self.d + self.k * self.d + self.k + 1;
        let mut w = vec![0.0; n];
        if self.greedy {
            w.copy_from_slice(self.model.mean());
        } else {
            self.model.sample_into(rng, &mut w);
        }
        let (d, k) = (self.d, self.k);
        let mut best: Vec<(f64, u16)> = Vec::with_capacity(c.len());
        for i in 0..c.len() {
            let x = c.row(i);
            let shared: f64 = w[0] + (0..d).map(|j| w[1 + j] * f64::from(x[j])).sum::<f64>();
            let mut b = (f64::NEG_INFINITY, 0u16);
            for cc in 0..k {
                let off = 1 + d + cc * d;
                let own: f64 = (0..d)
                    .map(|j| w[off + j] * f64::from(self.scale * x[j]))
                    .sum::<f64>()
                    + w[1 + d + k * d + cc];
                if shared + own > b.0 {
                    b = (shared + own, cc as u16);
                }
            }
            best.push(b);
        }
        let kk = budget.min(c.len());
        let mut order: Vec<usize> = (0..c.len()).collect();
        order.select_nth_unstable_by(kk - 1, |a, b| best[*b].0.total_cmp(&best[*a].0));
        let mut rows = order[..kk].to_vec();
        rows.sort_unstable();
        let mut out = Decisions::with_capacity(kk);
        for r in rows {
            out.push(c.users()[r], best[r].1, 1.0);
        }
        Ok(out)
    }
}

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
        ("shared-draw", Scoring::SharedDraw, none),
        (
            "mean",
            Scoring::Optimistic {
                bonus: 0.0,
                noise: 0.0,
            },
            none,
        ),
        ("b.25 n.25", opt, none),
        ("b.25 n.25 h2sel", opt, h2),
        ("b.25 n.25 h3sel", opt, h3),
    ];

    let shared: Vec<(&str, f32)> = vec![];
    let mut sums = vec![0.0; variants.len() + 1 + shared.len()];
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
        for (i, (_, sc)) in shared.iter().enumerate() {
            let mut p = Shared::new(s.campaign.creatives, pop.dim(), *sc, true);
            let e = run(&s, &pop, &mut p);
            let lift = (e - ra) / (oa - ra);
            sums[variants.len() + 1 + i] += lift;
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
    for (i, (name, _)) in shared.iter().enumerate() {
        println!(
            "{name:<16} mean lift {:.1}%",
            100.0 * sums[variants.len() + 1 + i] / n
        );
    }
}
