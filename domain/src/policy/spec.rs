//! [`PolicySpec`]: a policy and its settings as data, so that a campaign
//! runtime can record which policy a campaign runs and build it again
//! after a restart.

use serde::{Deserialize, Serialize};

use super::{CreativeThompson, ExploreThenCommit, Integrated, ModelConfig, Policy, PolicyError};
use super::{Random, Targeting};

/// A policy and its settings (see [`crate::policy`] for what each does).
///
/// As TOML or JSON, tagged by `kind`:
///
/// ```toml
/// kind = "integrated"
/// [model]
/// link = "Logistic"
/// propensity_draws = 100
/// random_first_batch = true
/// [model.prior]
/// intercept_mean = -2.0
/// intercept_variance = 4.0
/// weight_variance = 1.0
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum PolicySpec {
    /// Uniform users, uniform creatives ([`Random`]).
    Random {},
    /// Equal test slices per creative, then the best mean
    /// ([`ExploreThenCommit`]).
    ExploreThenCommit {
        /// Test messages per creative; default: the first batch split
        /// evenly over the creatives.
        #[serde(default)]
        test_per_creative: Option<u64>,
    },
    /// Beta-Bernoulli Thompson sampling over creatives, uniform users
    /// ([`CreativeThompson`]).
    CreativeThompson {
        /// Monte Carlo draws for the propensities.
        #[serde(default = "default_draws")]
        propensity_draws: u32,
    },
    /// A response model over users for one creative ([`Targeting`]).
    Targeting {
        /// The creative it sends.
        creative: u16,
        /// The model.
        #[serde(default)]
        model: ModelConfig,
    },
    /// One posterior over user features × creative ([`Integrated`]).
    Integrated {
        /// The model.
        #[serde(default)]
        model: ModelConfig,
    },
    /// A policy the caller builds itself (by name), through a factory of its
    /// own; [`PolicySpec::build`] refuses it.
    Custom {
        /// The name the caller's factory knows.
        name: String,
    },
}

fn default_draws() -> u32 {
    1_000
}

impl PolicySpec {
    /// The policy's name, as recorded with each planned batch.
    pub fn name(&self) -> &str {
        match self {
            PolicySpec::Random {} => "random",
            PolicySpec::ExploreThenCommit { .. } => "explore-then-commit",
            PolicySpec::CreativeThompson { .. } => "creative-thompson",
            PolicySpec::Targeting { .. } => "targeting",
            PolicySpec::Integrated { .. } => "integrated",
            PolicySpec::Custom { name } => name,
        }
    }

    /// A fresh policy (its prior) for a campaign with `creatives` creatives,
    /// users with `dim` features, whose largest batch is `largest_batch`.
    pub fn build(
        &self,
        creatives: usize,
        dim: usize,
        largest_batch: u64,
    ) -> Result<Box<dyn Policy>, PolicyError> {
        Ok(match self {
            PolicySpec::Random {} => Box::new(Random::new(creatives)?),
            PolicySpec::ExploreThenCommit { test_per_creative } => {
                let test =
                    test_per_creative.unwrap_or_else(|| largest_batch / creatives.max(1) as u64);
                Box::new(ExploreThenCommit::new(creatives, test)?)
            }
            PolicySpec::CreativeThompson { propensity_draws } => {
                Box::new(CreativeThompson::new(creatives, *propensity_draws)?)
            }
            PolicySpec::Targeting { creative, model } => {
                Box::new(Targeting::new(creatives, *creative, dim, *model)?)
            }
            PolicySpec::Integrated { model } => Box::new(Integrated::new(creatives, dim, *model)?),
            PolicySpec::Custom { .. } => {
                return Err(PolicyError::Config(
                    "a custom policy is built by the caller's factory",
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_build() {
        let specs = [
            PolicySpec::Random {},
            PolicySpec::ExploreThenCommit {
                test_per_creative: Some(10),
            },
            PolicySpec::CreativeThompson {
                propensity_draws: 50,
            },
            PolicySpec::Targeting {
                creative: 1,
                model: ModelConfig::default(),
            },
            PolicySpec::Integrated {
                model: ModelConfig::default(),
            },
        ];
        for s in specs {
            let json = serde_json::to_string(&s).unwrap();
            let back: PolicySpec = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s);
            let p = s.build(3, 4, 100).unwrap();
            assert_eq!(p.name(), s.name());
            assert_eq!(p.creatives(), 3);
        }
        let custom = PolicySpec::Custom {
            name: "oracle".into(),
        };
        assert_eq!(custom.name(), "oracle");
        assert!(custom.build(3, 4, 100).is_err());
        let e = serde_json::from_str::<PolicySpec>(r#"{"kind":"random","extra":1}"#);
        assert!(e.is_err(), "unknown keys are refused");
        let d: PolicySpec = serde_json::from_str(r#"{"kind":"integrated"}"#).unwrap();
        assert_eq!(
            d,
            PolicySpec::Integrated {
                model: ModelConfig::default()
            }
        );
    }
}
