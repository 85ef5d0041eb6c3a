//! Policies that score users with a posterior over response weights:
//! [`Targeting`] (one fixed creative) and [`Integrated`] (every creative).

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::scoring::Scorer;
use super::{check_creatives, check_outcome_creatives, PlanContext, Policy, PolicyError};
use crate::data::{Candidates, Decisions, OutcomeRow, Outcomes};
use crate::model::{GaussianWeights, Link, Prior};

/// How the posterior-sampling policies model responses and estimate
/// propensities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The response link (logistic with Laplace updates, or linear).
    pub link: Link,
    /// The prior of each creative's weights.
    pub prior: Prior,
    /// Posterior draws per plan, the decision's own draw included: the
    /// propensity of a choice is the fraction of them in which that user is
    /// in the top `k` with that creative (so at least `1 / draws`). 1 skips
    /// the estimate (every propensity is then 1).
    pub propensity_draws: u32,
    /// Plan the campaign's first batch (batch 0, when the posterior is still
    /// the prior) uniformly at random, with the exact propensities of
    /// [`super::Random`], instead of from one draw of the prior. A single
    /// prior draw picks a skewed slice of users to learn from; a uniform
    /// first batch teaches every weight. Measured by the simulator on the
    /// classic scenario: the integrated policy's share of the oracle's lift
    /// rose from about 85 % to about 94 % (mean of 5 seeds).
    #[serde(default)]
    pub random_first_batch: bool,
}

impl Default for ModelConfig {
    /// Logistic link, the default [`Prior`], 100 draws, first batch from
    /// the prior.
    fn default() -> Self {
        Self {
            link: Link::Logistic,
            prior: Prior::default(),
            propensity_draws: 100,
            random_first_batch: false,
        }
    }
}

impl ModelConfig {
    fn check(&self) -> Result<(), PolicyError> {
        if self.propensity_draws == 0 {
            return Err(PolicyError::Config("propensity_draws must be at least 1"));
        }
        Ok(())
    }
}

/// One posterior draw, top `k` by best modelled creative; propensities by
/// Monte Carlo over further draws.
fn plan_top_k(
    models: &[GaussianWeights],
    creative_ids: &[u16],
    candidates: &Candidates,
    k: usize,
    draws: u32,
    rng: &mut dyn RngCore,
) -> Decisions {
    let n = candidates.len();
    let mut out = Decisions::with_capacity(k);
    if k == 0 {
        return out;
    }
    let mut scorer = Scorer::new(models.len(), candidates.dim(), n);
    scorer.draw(models, rng);
    scorer.score(candidates);
    let rows = scorer.top_k(k);
    let chosen: Vec<u16> = rows.iter().map(|&r| scorer.arg[r]).collect();
    let mut hits = vec![1u32; k];
    for _ in 1..draws {
        scorer.draw(models, rng);
        scorer.score(candidates);
        let t = scorer.threshold(k);
        for ((&r, &c), h) in rows.iter().zip(&chosen).zip(hits.iter_mut()) {
            if scorer.best[r] >= t && scorer.arg[r] == c {
                *h += 1;
            }
        }
    }
    let d = f64::from(draws);
    for ((r, c), h) in rows.into_iter().zip(chosen).zip(hits) {
        out.push(
            candidates.users()[r],
            creative_ids[usize::from(c)],
            (f64::from(h) / d) as f32,
        );
    }
    out
}

fn check_dim(expected: usize, got: usize) -> Result<(), PolicyError> {
    if expected != got {
        return Err(PolicyError::Dimension { expected, got });
    }
    Ok(())
}

/// The integrated model: one posterior over user features × creative.
///
/// Each creative `c` has response weights `w_c` (intercept first) with a
/// Gaussian posterior; together they are one block-diagonal posterior over
/// all `C × (dim+1)` weights. A plan draws once from it, scores every
/// remaining user by their best creative (`max_c w_c·x̃`), and sends the top
/// `k` that creative. Propensities: the fraction of
/// [`ModelConfig::propensity_draws`] posterior draws (the decision's
/// included) in which the user is in the top `k` with the same creative.
/// Updates take aggregated outcomes of every creative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Integrated {
    config: ModelConfig,
    models: Vec<GaussianWeights>,
    ids: Vec<u16>,
}

impl Integrated {
    /// The prior model for `creatives` creatives and `features` features.
    pub fn new(
        creatives: usize,
        features: usize,
        config: ModelConfig,
    ) -> Result<Self, PolicyError> {
        config.check()?;
        if creatives == 0 || creatives > usize::from(u16::MAX) {
            return Err(PolicyError::Config("creatives must be 1 to 65535"));
        }
        let model = GaussianWeights::new(features, &config.prior)?;
        Ok(Self {
            config,
            models: vec![model; creatives],
            ids: (0..creatives as u16).collect(),
        })
    }

    /// The posterior of each creative's weights.
    pub fn models(&self) -> &[GaussianWeights] {
        &self.models
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Changes the number of propensity draws (at least 1). The decisions
    /// themselves do not depend on it: the first draw decides.
    pub fn set_propensity_draws(&mut self, draws: u32) -> Result<(), PolicyError> {
        ModelConfig {
            propensity_draws: draws,
            ..self.config
        }
        .check()?;
        self.config.propensity_draws = draws;
        Ok(())
    }

    /// The posterior-mean response of each creative for features `x` (a
    /// probability for the logistic link).
    pub fn expected_response(&self, x: &[f32]) -> Vec<f64> {
        self.models
            .iter()
            .map(|m| match self.config.link {
                Link::Logistic => crate::model::sigmoid(m.mean_score(x)),
                Link::Linear { .. } => m.mean_score(x),
            })
            .collect()
    }

    /// Plans greedily with the posterior means (no draw, propensity 1):
    /// the exploitation-only baseline.
    pub fn plan_greedy(
        &self,
        candidates: &Candidates,
        budget: usize,
    ) -> Result<Decisions, PolicyError> {
        check_dim(self.models[0].features(), candidates.dim())?;
        let k = budget.min(candidates.len());
        let mut out = Decisions::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let mut scorer = Scorer::new(self.models.len(), candidates.dim(), candidates.len());
        scorer.use_means(&self.models);
        scorer.score(candidates);
        for r in scorer.top_k(k) {
            out.push(candidates.users()[r], scorer.arg[r], 1.0);
        }
        Ok(out)
    }
}

/// Updates each creative's model from its rows, all or none.
fn update_models(
    models: &mut [GaussianWeights],
    ids: &[u16],
    link: Link,
    outcomes: &Outcomes,
) -> Result<(), PolicyError> {
    if let Some(first) = models.first() {
        check_dim(first.features(), outcomes.dim())?;
    }
    let mut updated = models.to_vec();
    let mut rows: Vec<OutcomeRow<'_>> = Vec::new();
    for (model, &id) in updated.iter_mut().zip(ids) {
        rows.clear();
        rows.extend(outcomes.rows().filter(|r| r.creative == id));
        model.update(link, &rows)?;
    }
    models.clone_from_slice(&updated);
    Ok(())
}

impl Policy for Integrated {
    fn name(&self) -> &str {
        "integrated"
    }

    fn creatives(&self) -> usize {
        self.models.len()
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        check_outcome_creatives(outcomes, self.models.len())?;
        update_models(&mut self.models, &self.ids, self.config.link, outcomes)
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        check_creatives(self.models.len(), ctx)?;
        check_dim(self.models[0].features(), candidates.dim())?;
        let k = budget.min(candidates.len());
        if ctx.batch == 0 && self.config.random_first_batch {
            return Ok(super::plan_uniform(&self.ids, candidates, k, rng));
        }
        Ok(plan_top_k(
            &self.models,
            &self.ids,
            candidates,
            k,
            self.config.propensity_draws,
            rng,
        ))
    }
}

/// User targeting for one fixed creative: a posterior over that creative's
/// response weights; each plan draws once, scores every remaining user and
/// sends the top `k` the creative. Propensities as for [`Integrated`].
/// Outcomes of other creatives are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Targeting {
    config: ModelConfig,
    creatives: usize,
    creative: u16,
    model: [GaussianWeights; 1],
}

impl Targeting {
    /// Targeting with creative `creative` of `creatives`, over `features`
    /// features.
    pub fn new(
        creatives: usize,
        creative: u16,
        features: usize,
        config: ModelConfig,
    ) -> Result<Self, PolicyError> {
        config.check()?;
        if usize::from(creative) >= creatives {
            return Err(PolicyError::Config("the targeted creative is out of range"));
        }
        Ok(Self {
            config,
            creatives,
            creative,
            model: [GaussianWeights::new(features, &config.prior)?],
        })
    }

    /// Changes the number of propensity draws (at least 1). The decisions
    /// themselves do not depend on it: the first draw decides.
    pub fn set_propensity_draws(&mut self, draws: u32) -> Result<(), PolicyError> {
        ModelConfig {
            propensity_draws: draws,
            ..self.config
        }
        .check()?;
        self.config.propensity_draws = draws;
        Ok(())
    }

    /// The creative it sends.
    pub fn creative(&self) -> u16 {
        self.creative
    }

    /// The posterior of the creative's weights.
    pub fn model(&self) -> &GaussianWeights {
        &self.model[0]
    }
}

impl Policy for Targeting {
    fn name(&self) -> &str {
        "targeting"
    }

    fn creatives(&self) -> usize {
        self.creatives
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        check_outcome_creatives(outcomes, self.creatives)?;
        update_models(
            &mut self.model,
            &[self.creative],
            self.config.link,
            outcomes,
        )
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        check_creatives(self.creatives, ctx)?;
        check_dim(self.model[0].features(), candidates.dim())?;
        let k = budget.min(candidates.len());
        if ctx.batch == 0 && self.config.random_first_batch {
            return Ok(super::plan_uniform(&[self.creative], candidates, k, rng));
        }
        Ok(plan_top_k(
            &self.model,
            &[self.creative],
            candidates,
            k,
            self.config.propensity_draws,
            rng,
        ))
    }
}
