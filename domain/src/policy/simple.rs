//! Policies that choose users at random: [`Random`], [`ExploreThenCommit`]
//! and [`CreativeThompson`].

use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};

use super::{
    check_creatives, check_outcome_creatives, plan_uniform, sample_rows, PlanContext, Policy,
    PolicyError,
};
use crate::data::{Candidates, Decisions, Outcomes};
use crate::model::BetaArm;

fn check_count(creatives: usize) -> Result<(), PolicyError> {
    if creatives == 0 || creatives > usize::from(u16::MAX) {
        return Err(PolicyError::Config("creatives must be 1 to 65535"));
    }
    Ok(())
}

/// Uniformly random users, each with a uniformly random creative.
///
/// Propensity of each choice: `k / (n · C)` for `k` users chosen of `n`
/// among `C` creatives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Random {
    creatives: usize,
}

impl Random {
    /// A random policy over `creatives` creatives.
    pub fn new(creatives: usize) -> Result<Self, PolicyError> {
        check_count(creatives)?;
        Ok(Self { creatives })
    }
}

impl Policy for Random {
    fn name(&self) -> &str {
        "random"
    }

    fn creatives(&self) -> usize {
        self.creatives
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        check_outcome_creatives(outcomes, self.creatives)
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        check_creatives(self.creatives, ctx)?;
        let ids: Vec<u16> = (0..self.creatives as u16).collect();
        Ok(plan_uniform(
            &ids,
            candidates,
            budget.min(candidates.len()),
            rng,
        ))
    }
}

/// Explore then commit, as the service's first version did: send each
/// creative to an equal test slice of random users, then the creative with
/// the best observed rate (posterior mean under a uniform prior) to random
/// users for the rest of the campaign.
///
/// While test slices are unfilled (by the campaign's planned counts per
/// creative), a batch fills them in equal shares; any room left in that
/// batch goes to all creatives evenly (the winner is not known yet).
/// Propensity of each choice: `k_c / n` where `k_c` users of the batch get
/// creative `c`, of `n` candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExploreThenCommit {
    test_per_creative: u64,
    arms: Vec<BetaArm>,
}

impl ExploreThenCommit {
    /// Explore-then-commit over `creatives` creatives with test slices of
    /// `test_per_creative` messages each.
    pub fn new(creatives: usize, test_per_creative: u64) -> Result<Self, PolicyError> {
        check_count(creatives)?;
        Ok(Self {
            test_per_creative,
            arms: vec![BetaArm::default(); creatives],
        })
    }

    /// The arms' Beta counts, by creative.
    pub fn arms(&self) -> &[BetaArm] {
        &self.arms
    }

    /// The creative it commits to: the best posterior mean so far (the
    /// lowest index on a tie).
    pub fn leader(&self) -> u16 {
        let mut best = 0;
        for (c, arm) in self.arms.iter().enumerate() {
            if arm.mean() > self.arms[best].mean() {
                best = c;
            }
        }
        best as u16
    }
}

impl Policy for ExploreThenCommit {
    fn name(&self) -> &str {
        "explore-then-commit"
    }

    fn creatives(&self) -> usize {
        self.arms.len()
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        check_outcome_creatives(outcomes, self.arms.len())?;
        let totals = outcomes.totals(self.arms.len());
        for (arm, (t, s)) in self.arms.iter_mut().zip(totals) {
            arm.update(t, s);
        }
        Ok(())
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        let c_count = self.arms.len();
        check_creatives(c_count, ctx)?;
        if ctx.planned_per_creative.len() != c_count {
            return Err(PolicyError::Creatives {
                policy: c_count,
                campaign: ctx.planned_per_creative.len(),
            });
        }
        let n = candidates.len();
        let k = budget.min(n);
        let mut out = Decisions::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let rows = sample_rows(n, k, rng);
        let mut deficit: Vec<u64> = ctx
            .planned_per_creative
            .iter()
            .map(|&p| self.test_per_creative.saturating_sub(p))
            .collect();
        let mut assigned: Vec<u16> = Vec::with_capacity(k);
        if deficit.iter().all(|&d| d == 0) {
            assigned.resize(k, self.leader());
        } else {
            // Fill the test slices in equal shares, round-robin.
            while assigned.len() < k && deficit.iter().any(|&d| d > 0) {
                for (c, d) in deficit.iter_mut().enumerate() {
                    if *d > 0 && assigned.len() < k {
                        *d -= 1;
                        assigned.push(c as u16);
                    }
                }
            }
            // Room left: every creative evenly.
            let mut c = 0;
            while assigned.len() < k {
                assigned.push(c as u16);
                c = (c + 1) % c_count;
            }
            // Which user gets which creative: a uniform shuffle.
            for i in (1..k).rev() {
                let j = rng.random_range(0..=i);
                assigned.swap(i, j);
            }
        }
        let mut per = vec![0u64; c_count];
        for &c in &assigned {
            per[usize::from(c)] += 1;
        }
        for (r, c) in rows.into_iter().zip(assigned) {
            let p = (per[usize::from(c)] as f64 / n as f64) as f32;
            out.push(candidates.users()[r], c, p);
        }
        Ok(out)
    }
}

/// Batched Beta-Bernoulli Thompson sampling over creatives, users at
/// random.
///
/// Each creative has a `Beta(1 + reactions, 1 + non-reactions)` posterior,
/// updated only between batches (from aggregated outcomes). Each chosen
/// user gets the creative with the highest of one fresh posterior draw per
/// creative. Propensity: `k/n · P(argmax = c)`, the second factor estimated
/// from `propensity_draws` further draws plus the batch's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreativeThompson {
    arms: Vec<BetaArm>,
    propensity_draws: u32,
}

impl CreativeThompson {
    /// Thompson sampling over `creatives` creatives, estimating
    /// propensities with `propensity_draws` Monte Carlo draws.
    pub fn new(creatives: usize, propensity_draws: u32) -> Result<Self, PolicyError> {
        check_count(creatives)?;
        Ok(Self {
            arms: vec![BetaArm::default(); creatives],
            propensity_draws,
        })
    }

    /// The arms' Beta counts, by creative.
    pub fn arms(&self) -> &[BetaArm] {
        &self.arms
    }

    /// Changes the number of propensity draws. The creatives chosen do not
    /// depend on it (they are drawn first).
    pub fn set_propensity_draws(&mut self, draws: u32) {
        self.propensity_draws = draws;
    }

    fn argmax_draw(&self, rng: &mut dyn RngCore) -> usize {
        let mut best = (0, f64::NEG_INFINITY);
        for (c, arm) in self.arms.iter().enumerate() {
            let v = arm.sample(rng);
            if v > best.1 {
                best = (c, v);
            }
        }
        best.0
    }

    /// `P(argmax = c)` per creative, by Monte Carlo with `draws` draws.
    pub fn win_probabilities(&self, draws: u32, rng: &mut dyn RngCore) -> Vec<f64> {
        let mut wins = vec![0u64; self.arms.len()];
        for _ in 0..draws {
            wins[self.argmax_draw(rng)] += 1;
        }
        let d = f64::from(draws.max(1));
        wins.into_iter().map(|w| w as f64 / d).collect()
    }
}

impl Policy for CreativeThompson {
    fn name(&self) -> &str {
        "creative-thompson"
    }

    fn creatives(&self) -> usize {
        self.arms.len()
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        check_outcome_creatives(outcomes, self.arms.len())?;
        let totals = outcomes.totals(self.arms.len());
        for (arm, (t, s)) in self.arms.iter_mut().zip(totals) {
            arm.update(t, s);
        }
        Ok(())
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        check_creatives(self.arms.len(), ctx)?;
        let n = candidates.len();
        let k = budget.min(n);
        let mut out = Decisions::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let rows = sample_rows(n, k, rng);
        let mut wins = vec![0u64; self.arms.len()];
        let chosen: Vec<u16> = rows
            .iter()
            .map(|_| {
                let c = self.argmax_draw(rng);
                wins[c] += 1;
                c as u16
            })
            .collect();
        for _ in 0..self.propensity_draws {
            wins[self.argmax_draw(rng)] += 1;
        }
        let total = (k as u64 + u64::from(self.propensity_draws)) as f64;
        let pick = k as f64 / n as f64;
        for (r, c) in rows.into_iter().zip(chosen) {
            let p = (pick * wins[usize::from(c)] as f64 / total) as f32;
            out.push(candidates.users()[r], c, p);
        }
        Ok(out)
    }
}
