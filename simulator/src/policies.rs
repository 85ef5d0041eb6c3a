//! The policies a simulation compares, and the oracle that knows the truth.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use smartmsg_domain::{
    Candidates, Decisions, Link, ModelConfig, Outcomes, PlanContext, Policy, PolicyError,
    PolicySpec, Prior,
};

use crate::population::SimPopulation;
use crate::scenario::Scenario;

/// A policy of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Random users, random creatives.
    Random,
    /// Equal test slices per creative, then the best one to random users.
    ExploreThenCommit,
    /// Thompson sampling over creatives, random users.
    CreativeThompson,
    /// A response model over users for one creative.
    Targeting,
    /// One posterior over user features × creative.
    Integrated,
    /// Knows the true probabilities: the best possible sender.
    Oracle,
}

impl PolicyName {
    /// Every policy, in report order.
    pub const ALL: [PolicyName; 6] = [
        PolicyName::Random,
        PolicyName::ExploreThenCommit,
        PolicyName::CreativeThompson,
        PolicyName::Targeting,
        PolicyName::Integrated,
        PolicyName::Oracle,
    ];

    /// Its name (as recorded with each batch).
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Random => "random",
            PolicyName::ExploreThenCommit => "explore-then-commit",
            PolicyName::CreativeThompson => "creative-thompson",
            PolicyName::Targeting => "targeting",
            PolicyName::Integrated => "integrated",
            PolicyName::Oracle => "oracle",
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}; expected one of random, explore-then-commit, creative-thompson, targeting, integrated, oracle")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyName {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        PolicyName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// The model configuration of the posterior-sampling policies.
pub fn model_config(scenario: &Scenario) -> ModelConfig {
    let p = &scenario.policies.prior;
    {
        let mut v = ModelConfig::default();
        v.link = Link::Logistic;
        v.prior = Prior {
            intercept_mean: p.intercept_mean,
            intercept_variance: p.intercept_variance,
            weight_variance: p.weight_variance,
        };
        v.propensity_draws = scenario.policies.propensity_draws;
        v.random_first_batch = scenario.policies.random_first_batch;
        v.scoring = scenario.policies.scoring;
        v.expansion = scenario.policies.expansion;
        v.pooling = scenario.policies.pooling;
        v.transform = scenario.policies.transform;
        v.defer = scenario.policies.defer;
        v
    }
}

/// The creative targeting-only sends: the scenario's choice, or the one
/// with the best true average response.
pub fn targeting_creative(scenario: &Scenario, pop: &SimPopulation) -> u16 {
    scenario
        .policies
        .targeting_creative
        .unwrap_or_else(|| pop.best_average_creative())
}

/// The policy as the runtime records it: its spec (the oracle is a custom
/// policy the simulator builds itself).
pub fn spec(name: PolicyName, scenario: &Scenario, pop: &SimPopulation) -> PolicySpec {
    let k = scenario.campaign.creatives;
    match name {
        PolicyName::Random => PolicySpec::Random {},
        PolicyName::ExploreThenCommit => PolicySpec::ExploreThenCommit {
            test_per_creative: Some(
                scenario
                    .policies
                    .explore_test_per_creative
                    .unwrap_or_else(|| scenario.largest_batch() / k as u64),
            ),
        },
        PolicyName::CreativeThompson => PolicySpec::CreativeThompson {
            propensity_draws: scenario.policies.propensity_draws,
        },
        PolicyName::Targeting => PolicySpec::Targeting {
            creative: targeting_creative(scenario, pop),
            model: model_config(scenario),
        },
        PolicyName::Integrated => PolicySpec::Integrated {
            model: model_config(scenario),
        },
        PolicyName::Oracle => PolicySpec::Custom {
            name: "oracle".into(),
        },
    }
}

/// A fresh policy (its prior model) for a run.
pub fn build(
    name: PolicyName,
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
) -> Result<Box<dyn Policy>, PolicyError> {
    match name {
        PolicyName::Oracle => Ok(Box::new(Oracle::new(Arc::clone(pop)))),
        other => spec(other, scenario, pop).build(
            scenario.campaign.creatives,
            pop.dim(),
            scenario.largest_batch(),
        ),
    }
}

/// Knows every user's true probability per creative: sends each batch to
/// the remaining users with the largest best-creative probability (in
/// that batch, when the truth drifts), with that creative (propensity 1). Batch after batch this is the top of the
/// whole budget: the most any policy can expect.
///
/// Lives here, not in the domain, because it needs the hidden truth.
#[derive(Debug, Clone)]
pub struct Oracle {
    pop: Arc<SimPopulation>,
}

impl Oracle {
    /// The oracle of `pop`.
    pub fn new(pop: Arc<SimPopulation>) -> Self {
        Self { pop }
    }
}

impl Policy for Oracle {
    fn name(&self) -> &str {
        "oracle"
    }

    fn creatives(&self) -> usize {
        self.pop.creatives()
    }

    fn update(&mut self, _outcomes: &Outcomes) -> Result<(), PolicyError> {
        Ok(())
    }

    fn plan(
        &self,
        ctx: &PlanContext,
        candidates: &Candidates,
        budget: usize,
        _rng: &mut dyn RngCore,
    ) -> Result<Decisions, PolicyError> {
        if ctx.creatives != self.pop.creatives() {
            return Err(PolicyError::Creatives {
                policy: self.pop.creatives(),
                campaign: ctx.creatives,
            });
        }
        let k = budget.min(candidates.len());
        let mut out = Decisions::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let best: Vec<(f64, u16)> = candidates
            .users()
            .iter()
            .map(|&u| {
                let mut b = (f64::NEG_INFINITY, 0u16);
                if let Some(r) = self.pop.row_of(u) {
                    for c in 0..self.pop.creatives() {
                        let p = self.pop.prob_at(r, c, ctx.batch);
                        if p > b.0 {
                            b = (p, c as u16);
                        }
                    }
                }
                b
            })
            .collect();
        let mut order: Vec<u32> = (0..best.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| {
            best[*b as usize]
                .0
                .total_cmp(&best[*a as usize].0)
                .then(a.cmp(b))
        };
        order.select_nth_unstable_by(k - 1, cmp);
        let mut rows: Vec<u32> = order[..k].to_vec();
        rows.sort_unstable();
        for r in rows {
            out.push(candidates.users()[r as usize], best[r as usize].1, 1.0);
        }
        Ok(out)
    }
}
