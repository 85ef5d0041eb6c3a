//! Quality experiments for the integrated policy, off the engine (a plain
//! loop: plan, react with the world's draws, learn), on the classic
//! scenario over several seeds. Prints the share of the oracle's lift over
//! random each variant captures.
//!
//! ```sh
//! cargo run --release -p smartmsg-simulator --example quality [-- SEEDS [NON_REACTING_SHARE]]
//! ```

use std::sync::Arc;

use rand::RngCore;
use smartmsg_domain::data::OutcomeRow;
use smartmsg_domain::{
    Candidates, Decisions, GaussianWeights, Integrated, Link, Outcomes, PlanContext, Policy,
    PolicyError, Prior, Random,
};
use smartmsg_simulator::policies::model_config;
use smartmsg_simulator::rng::{self, label, mix, unit};
use smartmsg_simulator::{Scenario, SimPopulation};

/// Integrated with optional variations.
struct Variant {
    inner: Integrated,
    random_first: bool,
    greedy_after: bool,
    random: Random,
}

impl Policy for Variant {
    fn name(&self) -> &str {
        "variant"
    }
    fn creatives(&self) -> usize {
        self.inner.creatives()
    }
    fn update(&mut self, o: &Outcomes) -> Result<(), PolicyError> {
        self.inner.update(o)
    }
    fn plan(
        &self,
        ctx: &PlanContext,
        c: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        if ctx.batch == 0 && self.random_first {
            return self.random.plan(ctx, c, budget, rng);
        }
        if ctx.batch > 0 && self.greedy_after {
            return self.inner.plan_greedy(c, budget);
        }
        self.inner.plan(ctx, c, budget, rng)
    }
}

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

/// Knows the true logistic weights but not who is dormant; batch 0 random.
/// The ceiling of any logistic model learned after a random first batch.
struct KnowsWeights {
    pop: Arc<SimPopulation>,
    random: Random,
}

impl Policy for KnowsWeights {
    fn name(&self) -> &str {
        "knows-weights"
    }
    fn creatives(&self) -> usize {
        self.pop.creatives()
    }
    fn update(&mut self, _o: &Outcomes) -> Result<(), PolicyError> {
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
        let t = self.pop.truth().unwrap();
        let (d, k) = (self.pop.dim(), self.pop.creatives());
        let best: Vec<(f64, u16)> = (0..c.len())
            .map(|i| {
                let x = c.row(i);
                let mut b = (f64::NEG_INFINITY, 0u16);
                for cc in 0..k {
                    let w = &t.weights[cc * d..(cc + 1) * d];
                    let z = t.intercepts[cc]
                        + w.iter().zip(x).map(|(a, &v)| a * f64::from(v)).sum::<f64>();
                    if z > b.0 {
                        b = (z, cc as u16);
                    }
                }
                b
            })
            .collect();
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

fn run(s: &Scenario, pop: &Arc<SimPopulation>, p: &mut dyn Policy) -> f64 {
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
        let mut r = rng::stream(s.seed, &[label("quality"), u64::from(b)]);
        let d = p.plan(&ctx, &remaining, size, &mut r).unwrap();
        let mut o = Outcomes::new(pop.dim()).unwrap();
        let mut chosen = std::collections::HashSet::new();
        for (u, c, _) in d.iter() {
            let prob = pop.probability(u, c);
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
    let seeds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let variants: Vec<(&str, bool, bool, f64, f64)> = vec![
        // name, random first batch, greedy after, weight variance, intercept variance
        ("integrated (as is)", false, false, 1.0, 4.0),
        ("random first batch", true, false, 1.0, 4.0),
        ("posterior mean after batch 0", false, true, 1.0, 4.0),
        ("random first + posterior mean", true, true, 1.0, 4.0),
        ("prior weight variance 0.25", false, false, 0.25, 4.0),
        ("prior weight variance 0.1", false, false, 0.1, 4.0),
        ("random first, weight var 0.25", true, false, 0.25, 4.0),
        ("prior intercept variance 1", false, false, 1.0, 1.0),
    ];
    let shared: Vec<(&str, f32, bool)> = vec![
        ("shared+own weights, draw", 1.0, false),
        ("shared+own weights, own scale 0.7", 0.7, false),
        ("shared+own weights, mean", 1.0, true),
    ];
    let mut sums = vec![0.0; variants.len() + shared.len()];
    let (mut ceiling, mut reference) = (0.0, 0.0);
    let share: f64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(Scenario::classic().population.non_reacting_share);
    for seed in 1..=seeds {
        let mut s = Scenario::classic();
        s.seed = seed;
        s.population.non_reacting_share = share;
        let pop = Arc::new(SimPopulation::generate(&s).unwrap());
        let (ra, oa) = (
            pop.random_expected(s.campaign.budget),
            pop.oracle_expected(s.campaign.budget),
        );
        let mut line = format!("seed {seed}:");
        for (i, (_, rf, ga, wv, iv)) in variants.iter().enumerate() {
            let mut cfg = model_config(&s);
            cfg.propensity_draws = 1;
            cfg.prior.weight_variance = *wv;
            cfg.prior.intercept_variance = *iv;
            let mut v = Variant {
                inner: Integrated::new(s.campaign.creatives, pop.dim(), cfg).unwrap(),
                random_first: *rf,
                greedy_after: *ga,
                random: Random::new(s.campaign.creatives).unwrap(),
            };
            let e = run(&s, &pop, &mut v);
            let lift = (e - ra) / (oa - ra);
            sums[i] += lift;
            line.push_str(&format!(" {:.1}%", 100.0 * lift));
        }
        for (i, (_, scale, greedy)) in shared.iter().enumerate() {
            let mut v = Shared::new(s.campaign.creatives, pop.dim(), *scale, *greedy);
            let e = run(&s, &pop, &mut v);
            let lift = (e - ra) / (oa - ra);
            sums[variants.len() + i] += lift;
            line.push_str(&format!(" {:.1}%", 100.0 * lift));
        }
        let mut kw = KnowsWeights {
            pop: Arc::clone(&pop),
            random: Random::new(s.campaign.creatives).unwrap(),
        };
        let e = run(&s, &pop, &mut kw);
        let lift = (e - ra) / (oa - ra);
        ceiling += lift;
        let m = pop.oracle_after_random_batch(
            s.campaign.budget,
            s.campaign_spec().nominal_batch_size(0),
            s.seed,
        );
        reference += (m - ra) / (oa - ra);
        line.push_str(&format!(" | knows weights {:.1}%", 100.0 * lift));
        println!("{line}");
    }
    println!(
        "{:<36} mean lift captured {:.1}%",
        "ceiling: knows weights, not dormancy",
        100.0 * ceiling / seeds as f64
    );
    println!(
        "{:<36} mean lift captured {:.1}%",
        "reference: oracle after random batch",
        100.0 * reference / seeds as f64
    );
    let names = variants
        .iter()
        .map(|v| v.0)
        .chain(shared.iter().map(|v| v.0));
    for (name, s) in names.zip(&sums) {
        println!(
            "{:<36} mean lift captured {:.1}%",
            name,
            100.0 * s / seeds as f64
        );
    }
}
