//! What a simulation runs: the synthetic channel, its hidden true response
//! model, how users react, the campaign, the reaction pipeline's windows, the
//! policies' settings and the fault plan.
//!
//! Scenarios are plain data (serde), loaded from TOML or JSON files; every
//! field has a default (the built-in [`Scenario::classic`]), so a file names
//! only what it changes. [`Scenario::validate`] names the offending field
//! and says why.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;
pub use crate::families::Family;
use crate::faults::FaultPlan;

/// Virtual time at which the default campaign starts (2024-01-01T00:00:00Z).
pub const DEFAULT_START_MS: u64 = 1_704_067_200_000;

/// A whole simulation's input. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A short name (1 to 32 of `a-z 0-9 - _`); names the campaign stream.
    pub name: String,
    /// The seed every random stream of the run derives from.
    pub seed: u64,
    /// The channel's subscribers.
    pub population: PopulationSpec,
    /// The hidden true response model.
    pub truth: TruthSpec,
    /// Creatives, budget and batch plan.
    pub campaign: CampaignPlan,
    /// How and when users react.
    pub reactions: ReactionSpec,
    /// The reaction pipeline's windows.
    pub pipeline: PipelineSpec,
    /// Policy settings.
    pub policies: PolicySettings,
    /// Faults to inject.
    pub faults: FaultPlan,
    /// How the true response changes during the campaign (none by
    /// default).
    pub drift: Option<DriftSpec>,
}

/// A true response that changes during the campaign: by batch `b` of `T`
/// it has moved a share `amount · b / (T − 1)` of the way from the
/// starting truth to a second truth of the same family, drawn
/// independently from the seed (same users, same columns). Each user's
/// probability is the mix `(1 − t)·p_start + t·p_end`. A population file
/// holds only the starting probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftSpec {
    /// How far the truth has moved by the last batch, 0 to 1.
    pub amount: f64,
}

/// The synthetic channel's subscribers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PopulationSpec {
    /// Number of subscribers (user ids `0..subscribers`).
    pub subscribers: u32,
    /// Features per user (i.i.d. standard normal), 1 to 64.
    pub features: usize,
    /// Share of users who never react to anything (their true probability
    /// is 0 for every creative), in `[0, 1)`. Only the oracle knows who
    /// they are (through `non_reacting_shift` a model can at best suspect
    /// it), so they lower the share of the oracle's lift any learner can
    /// capture: 5% caps a perfect logistic model at about 91% on the
    /// classic case.
    pub non_reacting_share: f64,
    /// Added to the last feature of the users who never react (dormant
    /// users look less active); 0 makes them indistinguishable.
    pub non_reacting_shift: f64,
    /// The shape of the columns and of the true response
    /// ([`Family`]): `gaussian` (the classic), `crm` or `nonlinear`. The
    /// latter two fix the number of features (16 and 8) and take only
    /// `base_rate` and `creative_spread` from a generated `truth`.
    pub family: Family,
}

impl Default for PopulationSpec {
    fn default() -> Self {
        Self {
            subscribers: 300_000,
            features: 8,
            non_reacting_share: 0.0,
            non_reacting_shift: -1.0,
            family: Family::Gaussian,
        }
    }
}

/// The hidden true response model: `P(react | x, c) = σ(b_c + w_c·x)` for
/// users who react at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TruthSpec {
    /// Weights drawn from the scenario's seed: `w_c = shared + specific_c`,
    /// each weight `N(0, scale²)`; intercepts `logit(base_rate)` plus a
    /// per-creative offset `N(0, creative_spread²)`.
    Generated {
        /// The typical response rate.
        #[serde(default = "d_base_rate")]
        base_rate: f64,
        /// Standard deviation of the creatives' intercept offsets.
        #[serde(default = "d_spread")]
        creative_spread: f64,
        /// Standard deviation of the weights every creative shares
        /// (responsive users respond to everything more).
        #[serde(default = "d_shared")]
        shared_scale: f64,
        /// Standard deviation of each creative's own weights (who likes
        /// which creative).
        #[serde(default = "d_specific")]
        specific_scale: f64,
    },
    /// Given intercepts and weights.
    Explicit {
        /// `b_c`, one per creative.
        intercepts: Vec<f64>,
        /// `w_c`, one row of `features` values per creative.
        weights: Vec<Vec<f64>>,
    },
}

fn d_base_rate() -> f64 {
    0.03
}
fn d_spread() -> f64 {
    0.25
}
fn d_shared() -> f64 {
    0.3
}
fn d_specific() -> f64 {
    0.35
}

impl Default for TruthSpec {
    fn default() -> Self {
        TruthSpec::Generated {
            base_rate: d_base_rate(),
            creative_spread: d_spread(),
            shared_scale: d_shared(),
            specific_scale: d_specific(),
        }
    }
}

/// Creatives, budget and batch plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CampaignPlan {
    /// Number of creatives, 1 to 64.
    pub creatives: usize,
    /// Most messages in total (at most the number of subscribers).
    pub budget: u64,
    /// Number of batches (the budget split evenly).
    pub batches: u32,
    /// When batch 0 is due (virtual ms since the Unix epoch).
    pub start_ms: u64,
    /// Between batches (ms).
    pub batch_interval_ms: u64,
}

impl Default for CampaignPlan {
    fn default() -> Self {
        Self {
            creatives: 4,
            budget: 100_000,
            batches: 10,
            start_ms: DEFAULT_START_MS,
            batch_interval_ms: 24 * 3_600_000,
        }
    }
}

/// How long after a message its reaction happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DelaySpec {
    /// Log-normal with this median and log-scale standard deviation.
    LogNormal {
        /// Median delay (ms).
        median_ms: u64,
        /// Standard deviation of `ln(delay)`.
        sigma: f64,
    },
    /// Exponential with this mean.
    Exponential {
        /// Mean delay (ms).
        mean_ms: u64,
    },
    /// Always the same delay.
    Fixed {
        /// The delay (ms).
        ms: u64,
    },
}

impl Default for DelaySpec {
    fn default() -> Self {
        DelaySpec::LogNormal {
            median_ms: 20 * 60_000,
            sigma: 1.0,
        }
    }
}

/// How and when users react.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReactionSpec {
    /// The delay from message to reaction.
    pub delay: DelaySpec,
    /// Delays are capped here (ms).
    pub max_delay_ms: u64,
    /// A reaction reaches the pipeline up to this long after it happened
    /// (uniform; ms). At most the pipeline's grace period.
    pub max_jitter_ms: u64,
}

impl Default for ReactionSpec {
    fn default() -> Self {
        Self {
            delay: DelaySpec::default(),
            max_delay_ms: 2 * 24 * 3_600_000,
            max_jitter_ms: 2_000,
        }
    }
}

/// The reaction pipeline's windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineSpec {
    /// Tumbling window size (ms), by event time.
    pub window_ms: u64,
    /// How long after its end a window still accepts reactions (ms).
    pub grace_ms: u64,
    /// Which reaction path the simulation runs: `"dsl"`, the domain's
    /// stream-processing pipeline run by the campaign runtime (the only one
    /// since the runtime replaced the simulator's own loop).
    pub kind: PathKind,
}

/// Which reaction path a simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// The domain's reaction pipeline on the engine's stream DSL
    /// (`smartmsg_domain::reactions::reaction_topology`), on the campaign
    /// runtime's exactly-once runner.
    #[default]
    Dsl,
}

impl PathKind {
    /// Its name in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Dsl => "dsl",
        }
    }
}

impl Default for PipelineSpec {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            grace_ms: 120_000,
            kind: PathKind::default(),
        }
    }
}

/// The prior of the posterior-sampling policies' weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorSpec {
    /// The intercept's prior mean.
    pub intercept_mean: f64,
    /// The intercept's prior variance.
    pub intercept_variance: f64,
    /// Each weight's prior variance.
    pub weight_variance: f64,
}

impl Default for PriorSpec {
    fn default() -> Self {
        let p = smartmsg_domain::Prior::default();
        Self {
            intercept_mean: p.intercept_mean,
            intercept_variance: p.intercept_variance,
            weight_variance: p.weight_variance,
        }
    }
}

/// Policy settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct PolicySettings {
    /// Monte Carlo draws for propensities (Thompson, targeting, integrated).
    pub propensity_draws: u32,
    /// Explore-then-commit's test slice per creative; default the first
    /// batch split evenly.
    pub explore_test_per_creative: Option<u64>,
    /// The creative targeting-only sends; default the one with the best
    /// true average response (the strongest single-creative choice).
    pub targeting_creative: Option<u16>,
    /// The weights' prior.
    pub prior: PriorSpec,
    /// Targeting and integrated plan the first batch uniformly at random
    /// (exact propensities) instead of from one draw of the prior; see
    /// `smartmsg_domain::ModelConfig::random_first_batch`. Default true.
    pub random_first_batch: bool,
    /// How targeting and integrated score candidates
    /// (`smartmsg_domain::Scoring`): by default optimistic scoring with
    /// randomisation; `{ kind = "shared-draw" }` is the scoring before
    /// issue 14.
    pub scoring: smartmsg_domain::Scoring,
    /// The integrated model's extra columns
    /// (`smartmsg_domain::Expansion`): by default hinges at 2 knots per
    /// numeric column; `{ kind = "none" }` for the columns as given.
    pub expansion: smartmsg_domain::Expansion,
    /// Whether the integrated model's creatives share data
    /// (`smartmsg_domain::Pooling`).
    pub pooling: smartmsg_domain::Pooling,
    /// Transforms of skewed columns the integrated model tries
    /// (`smartmsg_domain::Transform`).
    pub transform: smartmsg_domain::Transform,
    /// Whether the integrated policy defers users whose best creative is
    /// still uncertain (`smartmsg_domain::Defer`).
    pub defer: smartmsg_domain::Defer,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            propensity_draws: 100,
            explore_test_per_creative: None,
            targeting_creative: None,
            prior: PriorSpec::default(),
            random_first_batch: true,
            scoring: smartmsg_domain::Scoring::default(),
            expansion: smartmsg_domain::Expansion::default(),
            pooling: smartmsg_domain::Pooling::default(),
            transform: smartmsg_domain::Transform::default(),
            defer: smartmsg_domain::Defer::default(),
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Self::classic()
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn finite(field: &str, v: f64) -> Result<(), ScenarioError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(invalid(field, format!("{v} is not a finite number")))
    }
}

impl Scenario {
    /// The classic case: 300,000 subscribers with 8 features (none
    /// dormant: dormant users would be an advantage only the oracle has, see
    /// [`PopulationSpec::non_reacting_share`]),
    /// 4 creatives, a budget of 100,000 in 10 daily batches, reactions
    /// log-normal around 20 minutes, one-minute windows with 2 minutes of
    /// grace, seed 42, no faults.
    pub fn classic() -> Self {
        Self {
            name: "classic".into(),
            seed: 42,
            population: PopulationSpec::default(),
            truth: TruthSpec::default(),
            campaign: CampaignPlan::default(),
            reactions: ReactionSpec::default(),
            pipeline: PipelineSpec::default(),
            policies: PolicySettings::default(),
            faults: FaultPlan::default(),
            drift: None,
        }
    }

    /// A small, quick scenario for fault runs: 3,000 subscribers with 4
    /// features, 3 creatives, a budget of 1,200 in 6 batches six hours
    /// apart, higher response rates so that every window sees traffic.
    pub fn small() -> Self {
        Self {
            name: "small".into(),
            seed: 1,
            population: PopulationSpec {
                subscribers: 3_000,
                features: 4,
                non_reacting_share: 0.1,
                non_reacting_shift: -1.0,
                family: Family::Gaussian,
            },
            truth: TruthSpec::Generated {
                base_rate: 0.15,
                creative_spread: 0.3,
                shared_scale: 0.4,
                specific_scale: 0.5,
            },
            campaign: CampaignPlan {
                creatives: 3,
                budget: 1_200,
                batches: 6,
                start_ms: DEFAULT_START_MS,
                batch_interval_ms: 6 * 3_600_000,
            },
            reactions: ReactionSpec {
                delay: DelaySpec::LogNormal {
                    median_ms: 10 * 60_000,
                    sigma: 1.0,
                },
                max_delay_ms: 12 * 3_600_000,
                max_jitter_ms: 2_000,
            },
            pipeline: PipelineSpec::default(),
            policies: PolicySettings {
                propensity_draws: 8,
                ..PolicySettings::default()
            },
            faults: FaultPlan::default(),
            drift: None,
        }
    }

    /// The CRM-like family: the classic campaign on
    /// [`Family::Crm`]'s 16 raw CRM columns (an intercept column, flags,
    /// a one-hot region, unscaled age, recency, purchases, tenure and
    /// basket, two useless columns), logistic truth in transformed columns.
    pub fn crm() -> Self {
        let mut s = Self::classic();
        s.name = "crm".into();
        s.population.family = Family::Crm;
        s.population.features = crate::families::CRM_COLUMNS;
        s
    }

    /// The non-linear family: the classic campaign on
    /// [`Family::Nonlinear`]'s 8 columns (interactions, thresholds, a
    /// periodic and a non-monotone effect).
    pub fn nonlinear() -> Self {
        let mut s = Self::classic();
        s.name = "nonlinear".into();
        s.population.family = Family::Nonlinear;
        s.population.features = crate::families::NONLINEAR_COLUMNS;
        s
    }

    /// The sparse family: the classic world with a base rate of 0.3 %
    /// (about 300 reactions to 100,000 random messages; about 30 in a
    /// random first batch of 10,000, 7 or 8 per creative).
    pub fn sparse() -> Self {
        let mut s = Self::classic();
        s.name = "sparse".into();
        s.truth = TruthSpec::Generated {
            base_rate: 0.003,
            creative_spread: d_spread(),
            shared_scale: d_shared(),
            specific_scale: d_specific(),
        };
        s
    }

    /// The delayed family: the classic world whose reactions come late,
    /// log-normal with a median of one batch interval (24 h) and a long
    /// tail (σ = 1.2: a quarter after 2.2 days, 5 % after a week; capped
    /// at 14 days). When a batch is planned, about half the reactions to
    /// the previous one have not happened yet; the model counts them as
    /// non-reactions. Windows are 10 minutes (fewer, fuller windows over
    /// the long tail).
    pub fn delayed() -> Self {
        let mut s = Self::classic();
        s.name = "delayed".into();
        s.reactions.delay = DelaySpec::LogNormal {
            median_ms: s.campaign.batch_interval_ms,
            sigma: 1.2,
        };
        s.reactions.max_delay_ms = 14 * 24 * 3_600_000;
        s.pipeline.window_ms = 600_000;
        s
    }

    /// The drifting family: the classic world whose truth moves, batch
    /// by batch, 60 % of the way to a second, independent classic truth
    /// by the last batch ([`DriftSpec`]): what worked in the first batches
    /// works less later, and old outcomes mislead a model that weighs
    /// them like new ones.
    pub fn drifting() -> Self {
        let mut s = Self::classic();
        s.name = "drifting".into();
        s.drift = Some(DriftSpec { amount: 0.6 });
        s
    }

    /// The built-in names, for help texts.
    pub const BUILTINS: [&'static str; 8] = [
        "classic",
        "linear",
        "crm",
        "nonlinear",
        "sparse",
        "delayed",
        "drifting",
        "small",
    ];

    /// A built-in scenario by name: `classic` (also `linear` and
    /// `default`), `crm`, `nonlinear`, `sparse`, `delayed`, `drifting` or
    /// `small`.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "classic" | "default" => Some(Self::classic()),
            "linear" => {
                let mut s = Self::classic();
                s.name = "linear".into();
                Some(s)
            }
            "crm" => Some(Self::crm()),
            "nonlinear" => Some(Self::nonlinear()),
            "sparse" => Some(Self::sparse()),
            "delayed" => Some(Self::delayed()),
            "drifting" => Some(Self::drifting()),
            "small" => Some(Self::small()),
            _ => None,
        }
    }

    /// Parses TOML text (`origin` names it in errors) and validates it.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Syntax {
            origin: origin.to_owned(),
            format: "TOML",
            message: e.to_string().trim_end().to_owned(),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Parses JSON text (`origin` names it in errors) and validates it.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = serde_json::from_str(text).map_err(|e| ScenarioError::Syntax {
            origin: origin.to_owned(),
            format: "JSON",
            message: e.to_string(),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Loads a `.toml` or `.json` file and validates it.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => Self::from_toml(&text, &origin),
            Some(e) if e.eq_ignore_ascii_case("json") => Self::from_json(&text, &origin),
            _ => Err(ScenarioError::Format { path: path.into() }),
        }
    }

    /// The scenario as TOML (a starting point for a file).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The largest batch of the plan.
    pub fn largest_batch(&self) -> u64 {
        let b = u64::from(self.campaign.batches.max(1));
        self.campaign.budget.div_ceil(b)
    }

    /// Checks every field; the error names the first bad one and says why.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 32
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(invalid(
                "name",
                format!("{n:?} must be 1 to 32 characters of a-z, 0-9, '-' and '_'"),
            ));
        }
        let p = &self.population;
        if p.subscribers == 0 || p.subscribers > 10_000_000 {
            return Err(invalid(
                "population.subscribers",
                format!("{} must be 1 to 10,000,000", p.subscribers),
            ));
        }
        if p.features == 0 || p.features > smartmsg_domain::Candidates::MAX_DIM {
            return Err(invalid(
                "population.features",
                format!(
                    "{} must be 1 to {}",
                    p.features,
                    smartmsg_domain::Candidates::MAX_DIM
                ),
            ));
        }
        if let Some(cols) = p.family.columns() {
            if p.features != cols {
                return Err(invalid(
                    "population.features",
                    format!(
                        "{} features; the {} family generates {cols}",
                        p.features,
                        p.family.as_str()
                    ),
                ));
            }
            if let TruthSpec::Explicit { .. } = self.truth {
                return Err(invalid(
                    "truth",
                    format!(
                        "the {} family generates its own truth: give a generated truth (base_rate, creative_spread)",
                        p.family.as_str()
                    ),
                ));
            }
        }
        finite("population.non_reacting_share", p.non_reacting_share)?;
        if !(0.0..1.0).contains(&p.non_reacting_share) {
            return Err(invalid(
                "population.non_reacting_share",
                format!("{} must be in [0, 1)", p.non_reacting_share),
            ));
        }
        finite("population.non_reacting_shift", p.non_reacting_shift)?;
        let c = &self.campaign;
        if c.creatives == 0 || c.creatives > smartmsg_domain::CampaignSpec::MAX_CREATIVES {
            return Err(invalid(
                "campaign.creatives",
                format!(
                    "{} must be 1 to {}",
                    c.creatives,
                    smartmsg_domain::CampaignSpec::MAX_CREATIVES
                ),
            ));
        }
        match &self.truth {
            TruthSpec::Generated {
                base_rate,
                creative_spread,
                shared_scale,
                specific_scale,
            } => {
                finite("truth.base_rate", *base_rate)?;
                if !(*base_rate > 0.0 && *base_rate < 1.0) {
                    return Err(invalid(
                        "truth.base_rate",
                        format!("{base_rate} must be strictly between 0 and 1"),
                    ));
                }
                for (f, v) in [
                    ("truth.creative_spread", creative_spread),
                    ("truth.shared_scale", shared_scale),
                    ("truth.specific_scale", specific_scale),
                ] {
                    finite(f, *v)?;
                    if *v < 0.0 || *v > 10.0 {
                        return Err(invalid(f, format!("{v} must be 0 to 10")));
                    }
                }
            }
            TruthSpec::Explicit {
                intercepts,
                weights,
            } => {
                if intercepts.len() != c.creatives {
                    return Err(invalid(
                        "truth.intercepts",
                        format!(
                            "{} values; campaign.creatives is {}",
                            intercepts.len(),
                            c.creatives
                        ),
                    ));
                }
                for (i, v) in intercepts.iter().enumerate() {
                    finite(&format!("truth.intercepts[{i}]"), *v)?;
                }
                if weights.len() != c.creatives {
                    return Err(invalid(
                        "truth.weights",
                        format!(
                            "{} rows; campaign.creatives is {}",
                            weights.len(),
                            c.creatives
                        ),
                    ));
                }
                for (i, row) in weights.iter().enumerate() {
                    if row.len() != p.features {
                        return Err(invalid(
                            &format!("truth.weights[{i}]"),
                            format!(
                                "{} values; population.features is {}",
                                row.len(),
                                p.features
                            ),
                        ));
                    }
                    for (j, v) in row.iter().enumerate() {
                        finite(&format!("truth.weights[{i}][{j}]"), *v)?;
                    }
                }
            }
        }
        if c.budget == 0 || c.budget > u64::from(p.subscribers) {
            return Err(invalid(
                "campaign.budget",
                format!(
                    "{} must be 1 to population.subscribers ({})",
                    c.budget, p.subscribers
                ),
            ));
        }
        if c.batches == 0 || u64::from(c.batches) > c.budget {
            return Err(invalid(
                "campaign.batches",
                format!("{} must be 1 to campaign.budget ({})", c.batches, c.budget),
            ));
        }
        let max_batch = smartmsg_domain::CampaignSpec::MAX_BATCH_USERS;
        if self.largest_batch() > max_batch {
            return Err(invalid(
                "campaign.batches",
                format!(
                    "{} batches make batches of {} messages; at most {max_batch} per batch (use at least {} batches)",
                    c.batches,
                    self.largest_batch(),
                    c.budget.div_ceil(max_batch)
                ),
            ));
        }
        if c.batches > 1 && c.batch_interval_ms == 0 {
            return Err(invalid(
                "campaign.batch_interval_ms",
                "must be above 0 when there are several batches",
            ));
        }
        if c.start_ms > (1u64 << 50) || c.batch_interval_ms > (1u64 << 40) {
            return Err(invalid(
                "campaign.start_ms",
                "start and interval must stay below 2^50 and 2^40 ms",
            ));
        }
        let r = &self.reactions;
        match r.delay {
            DelaySpec::LogNormal { median_ms, sigma } => {
                if median_ms == 0 {
                    return Err(invalid("reactions.delay.median_ms", "must be above 0"));
                }
                finite("reactions.delay.sigma", sigma)?;
                if !(0.0..=5.0).contains(&sigma) {
                    return Err(invalid(
                        "reactions.delay.sigma",
                        format!("{sigma} must be 0 to 5"),
                    ));
                }
            }
            DelaySpec::Exponential { mean_ms } => {
                if mean_ms == 0 {
                    return Err(invalid("reactions.delay.mean_ms", "must be above 0"));
                }
            }
            DelaySpec::Fixed { .. } => {}
        }
        if r.max_delay_ms == 0 || r.max_delay_ms > 365 * 24 * 3_600_000 {
            return Err(invalid(
                "reactions.max_delay_ms",
                "must be above 0 and at most a year",
            ));
        }
        let pl = &self.pipeline;
        if pl.window_ms == 0 || pl.window_ms > 24 * 3_600_000 {
            return Err(invalid(
                "pipeline.window_ms",
                format!("{} must be 1 ms to one day", pl.window_ms),
            ));
        }
        if pl.grace_ms > 24 * 3_600_000 {
            return Err(invalid("pipeline.grace_ms", "must be at most one day"));
        }
        if r.max_jitter_ms > pl.grace_ms {
            return Err(invalid(
                "reactions.max_jitter_ms",
                format!(
                    "{} is above pipeline.grace_ms ({}): ordinary reactions would arrive late",
                    r.max_jitter_ms, pl.grace_ms
                ),
            ));
        }
        let po = &self.policies;
        if po.propensity_draws == 0 || po.propensity_draws > 10_000 {
            return Err(invalid(
                "policies.propensity_draws",
                format!("{} must be 1 to 10,000", po.propensity_draws),
            ));
        }
        if let Some(t) = po.targeting_creative {
            if usize::from(t) >= c.creatives {
                return Err(invalid(
                    "policies.targeting_creative",
                    format!("{t} is not a creative index below {}", c.creatives),
                ));
            }
        }
        if let smartmsg_domain::Scoring::Optimistic { bonus, noise } = po.scoring {
            for (f, v) in [
                ("policies.scoring.bonus", bonus),
                ("policies.scoring.noise", noise),
            ] {
                finite(f, v)?;
                if !(0.0..=10.0).contains(&v) {
                    return Err(invalid(f, format!("{v} must be 0 to 10")));
                }
            }
        }
        if let smartmsg_domain::Defer::Ambiguous { weight } = po.defer {
            finite("policies.defer.weight", weight)?;
            if !(0.0..=100.0).contains(&weight) {
                return Err(invalid(
                    "policies.defer.weight",
                    format!("{weight} must be 0 to 100"),
                ));
            }
        }
        if let smartmsg_domain::Expansion::Hinges { knots } = po.expansion {
            if !(1..=8).contains(&knots) {
                return Err(invalid(
                    "policies.expansion.knots",
                    format!("{knots} must be 1 to 8"),
                ));
            }
        }
        let pr = &po.prior;
        finite("policies.prior.intercept_mean", pr.intercept_mean)?;
        for (f, v) in [
            ("policies.prior.intercept_variance", pr.intercept_variance),
            ("policies.prior.weight_variance", pr.weight_variance),
        ] {
            finite(f, v)?;
            if v <= 0.0 {
                return Err(invalid(f, format!("{v} must be above 0")));
            }
        }
        if let Some(d) = &self.drift {
            finite("drift.amount", d.amount)?;
            if !(0.0..=1.0).contains(&d.amount) {
                return Err(invalid(
                    "drift.amount",
                    format!("{} must be 0 to 1", d.amount),
                ));
            }
        }
        self.faults.validate(c.batches)?;
        Ok(())
    }

    /// The campaign spec the simulation creates.
    pub fn campaign_spec(&self) -> smartmsg_domain::CampaignSpec {
        smartmsg_domain::CampaignSpec {
            channel: "simulated-channel".into(),
            audience: format!("{}-subscribers", self.name),
            creatives: (0..self.campaign.creatives)
                .map(|c| format!("creative-{c}"))
                .collect(),
            budget: self.campaign.budget,
            schedule: smartmsg_domain::BatchSchedule {
                start_ms: self.campaign.start_ms,
                interval_ms: self.campaign.batch_interval_ms.max(1),
                sizing: smartmsg_domain::BatchSizing::Count(self.campaign.batches),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid_and_round_trip() {
        for s in Scenario::BUILTINS.map(|n| Scenario::builtin(n).unwrap()) {
            s.validate().unwrap();
            let t = s.to_toml();
            assert_eq!(Scenario::from_toml(&t, "x").unwrap(), s);
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(Scenario::from_json(&j, "x").unwrap(), s);
        }
    }
}
