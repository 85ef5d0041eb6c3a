//! Who gets which creative in the next batch.
//!
//! Every policy implements [`Policy`]: it owns its model (updated from
//! aggregated [`Outcomes`] with [`Policy::update`]) and plans a batch from
//! the remaining [`Candidates`], the batch budget and a seeded generator
//! ([`Policy::plan`]), returning [`Decisions`] with the propensity of each
//! choice. The decisions go into [`crate::Action::PlanBatch`], so the
//! campaign's `BatchPlanned` event records them and replay never re-runs a
//! policy.
//!
//! | policy | users | creative | propensity |
//! |---|---|---|---|
//! | [`Random`] | uniform | uniform | exact: `k / (n·C)` |
//! | [`ExploreThenCommit`] | uniform | equal test slices, then the best mean | exact |
//! | [`CreativeThompson`] | uniform | per-user Beta-Bernoulli Thompson draw | `k/n` × Monte Carlo `P(argmax = c)` |
//! | [`Targeting`] | top-k by [`Scoring`] for a fixed creative | fixed | Monte Carlo over noise or draws |
//! | [`Integrated`] | top-k by best creative under [`Scoring`] (default: optimistic with noise), plain or [`Expansion`] model by evidence | that best creative | Monte Carlo over noise or draws |
//!
//! Policies are `Serialize`/`Deserialize`, so a service can checkpoint its
//! model next to the reaction pipeline's state.

mod bayes;
mod scoring;
mod simple;
mod spec;

use rand::RngCore;
use serde::{Deserialize, Serialize};

pub use bayes::{
    Defer, Expansion, Integrated, ModelConfig, Pooling, Scoring, Targeting, Transform,
};
pub use simple::{CreativeThompson, ExploreThenCommit, Random};
pub use spec::PolicySpec;

use crate::data::{Candidates, Decisions, Outcomes};
use crate::model::ModelError;

/// What a policy knows about the campaign when it plans a batch (see
/// [`crate::Campaign::plan_context`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanContext {
    /// The batch being planned, from 0.
    pub batch: u32,
    /// Batches in the campaign's plan.
    pub batch_count: u32,
    /// Creatives in the campaign.
    pub creatives: usize,
    /// Budget not yet reserved by planned batches.
    pub remaining_budget: u64,
    /// Messages planned so far with each creative.
    pub planned_per_creative: Vec<u64>,
}

impl PlanContext {
    /// A context for a campaign with `creatives` creatives and nothing
    /// planned yet.
    pub fn fresh(creatives: usize, batch_count: u32, budget: u64) -> Self {
        Self {
            batch: 0,
            batch_count,
            creatives,
            remaining_budget: budget,
            planned_per_creative: vec![0; creatives],
        }
    }
}

/// Why a policy cannot plan or update.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The candidates' or outcomes' features have another dimension than
    /// the model.
    #[error("features have dimension {got}; the model has {expected}")]
    Dimension {
        /// The model's.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The campaign has another number of creatives than the policy.
    #[error("the campaign has {campaign} creatives; the policy {policy}")]
    Creatives {
        /// The policy's.
        policy: usize,
        /// The campaign's.
        campaign: usize,
    },
    /// An outcome names a creative the policy does not know.
    #[error("outcome for creative {creative}; the policy has {count}")]
    UnknownCreative {
        /// The index.
        creative: u16,
        /// Creatives the policy knows.
        count: usize,
    },
    /// A configuration value is out of range.
    #[error("bad policy configuration: {0}")]
    Config(&'static str),
    /// A model update failed (the model is unchanged).
    #[error("model update failed: {0}")]
    Model(#[from] ModelError),
}

/// A batch-planning policy. See the [module docs](self).
pub trait Policy: Send {
    /// A short name recorded with each planned batch (at most 64 bytes).
    fn name(&self) -> &str;

    /// The number of creatives the policy chooses among.
    fn creatives(&self) -> usize;

    /// Learns from aggregated outcomes (per user, or per creative ×
    /// feature bucket). On error the model is unchanged.
    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError>;

    /// Plans one batch: at most `budget` users of `candidates` (pass
    /// [`crate::Campaign::batch_allowance`]), each with a creative and the
    /// propensity of that choice. Users are returned in candidate order.
    /// Deterministic given the generator's state.
    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError>;
}

/// A borrowed policy is a policy (so a driver can plan with a policy its
/// caller keeps).
impl<P: Policy + ?Sized> Policy for &mut P {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn creatives(&self) -> usize {
        (**self).creatives()
    }

    fn update(&mut self, outcomes: &Outcomes) -> Result<(), PolicyError> {
        (**self).update(outcomes)
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        (**self).plan(ctx, candidates, budget, rng)
    }
}

/// Checks that the campaign and the policy agree on the creatives.
fn check_creatives(policy: usize, ctx: &PlanContext) -> Result<(), PolicyError> {
    if ctx.creatives != policy {
        return Err(PolicyError::Creatives {
            policy,
            campaign: ctx.creatives,
        });
    }
    Ok(())
}

/// Checks that outcomes name only known creatives.
fn check_outcome_creatives(outcomes: &Outcomes, count: usize) -> Result<(), PolicyError> {
    match outcomes.max_creative() {
        Some(c) if usize::from(c) >= count => {
            Err(PolicyError::UnknownCreative { creative: c, count })
        }
        _ => Ok(()),
    }
}

/// `k` distinct row indices of `n`, uniformly, in ascending order.
pub(crate) fn sample_rows(n: usize, k: usize, rng: &mut dyn RngCore) -> Vec<usize> {
    let mut rows = rand::seq::index::sample(rng, n, k).into_vec();
    rows.sort_unstable();
    rows
}

/// Plans `k` of `candidates` uniformly at random, each with a creative drawn
/// uniformly from `creative_ids`; propensity `k / (n · C)` exactly.
pub(crate) fn plan_uniform(
    creative_ids: &[u16],
    candidates: &Candidates,
    k: usize,
    rng: &mut dyn RngCore,
) -> Decisions {
    use rand::Rng;
    let n = candidates.len();
    let mut out = Decisions::with_capacity(k);
    if k == 0 || creative_ids.is_empty() {
        return out;
    }
    let p = (k as f64 / (n as f64 * creative_ids.len() as f64)) as f32;
    for r in sample_rows(n, k, rng) {
        let c = creative_ids[rng.random_range(0..creative_ids.len())];
        out.push(candidates.users()[r], c, p);
    }
    out
}
