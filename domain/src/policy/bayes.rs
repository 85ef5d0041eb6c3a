//! Policies that score users with a posterior over response weights:
//! [`Targeting`] (one fixed creative) and [`Integrated`] (every creative).

use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::scoring::{plan_optimistic, Moments, Scorer};
use super::{check_creatives, check_outcome_creatives, PlanContext, Policy, PolicyError};
use crate::data::{Candidates, Decisions, OutcomeRow, Outcomes};
use crate::model::{GaussianWeights, Link, PooledWeights, Prior};

/// How the posterior-sampling policies model responses and estimate
/// propensities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
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
    /// How a plan turns the posterior into scores (see [`Scoring`]).
    /// Absent in a recorded spec: the default, [`Scoring::default`].
    #[serde(default)]
    pub scoring: Scoring,
    /// Extra columns the integrated model builds from the user's own
    /// (see [`Expansion`]). Absent in a recorded spec: the default.
    #[serde(default)]
    pub expansion: Expansion,
    /// Whether the integrated policy's creatives share what their
    /// responses have in common (see [`Pooling`]). Absent in a recorded
    /// spec: the default.
    #[serde(default)]
    pub pooling: Pooling,
    /// Transforms of skewed columns the integrated model may use (see
    /// [`Transform`]). Absent in a recorded spec: the default.
    #[serde(default)]
    pub transform: Transform,
    /// Defers users whose best creative the posterior cannot yet tell
    /// (see [`Defer`]). Absent in a recorded spec: the default.
    #[serde(default)]
    pub defer: Defer,
}

/// Whether the integrated policy defers, while later batches remain, the
/// users whose best creative its posterior cannot yet tell apart.
///
/// Every user with a high enough score is sent at some point of the
/// campaign; which creative they get improves as the model learns. So a
/// user whose creatives are close under the posterior is worth more later,
/// once the model can tell them apart, and a user with one clearly best
/// creative loses nothing by going now. Each user's score for the batch
/// is lowered by `weight` times their *ambiguity*: the expected gain of
/// knowing their creatives' linear scores exactly over choosing by the
/// posterior means, `Σ_c E[(z_c − z_b)⁺]` over the creatives `c` other
/// than `b`, the one with the best mean (each creative's marginal
/// posterior, taken independent, so `E[(z_c − z_b)⁺] = θ φ(Δ/θ) −
/// Δ Φ(−Δ/θ)` with `Δ` the means' gap and `θ² = s_c² + s_b²`), times the
/// share of the campaign's batches still to come after this one (none in
/// the last batch). Deterministic given the posterior, so propensities
/// (Monte Carlo over the [`Scoring`]'s noise) include it.
///
/// Only with [`Scoring::Optimistic`], and only while the plain or the
/// log model plans (their deviations' prior is fitted by empirical Bayes,
/// [`Pooling::Adaptive`]); not while the model with hinge columns plans
/// (its posterior misstates its creatives' differences where the truth is
/// not linear: deferring there cost up to 7 points on a nonlinear
/// population).
///
/// As TOML: `defer = { kind = "ambiguous", weight = 12.0 }` or
/// `defer = { kind = "none" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Defer {
    /// Every user scored as the [`Scoring`] says.
    None,
    /// Users with an ambiguous creative deferred, as above.
    Ambiguous {
        /// The penalty's weight per unit of ambiguity (linear score),
        /// 0 to 100.
        weight: f64,
    },
}

impl Default for Defer {
    /// [`Defer::Ambiguous`] with `weight = 12`: on the crm family +0.7
    /// point in the loop of `docs/decision-quality.md` (fourth round, 21
    /// runs), +1.3 on sparse (12 runs), level or better on the linear and
    /// drifting families; larger weights gained a little more on crm but
    /// collapsed on one sparse population (24: −10 points).
    fn default() -> Self {
        Defer::Ambiguous { weight: 12.0 }
    }
}

impl Defer {
    /// The penalty's factor in batch `batch` of `count`: the weight times
    /// the share of batches to come after this one.
    fn factor(&self, batch: u32, count: u32) -> f32 {
        match *self {
            Defer::Ambiguous { weight } if batch + 1 < count => {
                (weight * f64::from(count - 1 - batch) / f64::from(count - 1)) as f32
            }
            _ => 0.0,
        }
    }
}

/// Column transforms the integrated model tries, next to the columns as
/// given.
///
/// As TOML: `transform = { kind = "log-skewed" }` or
/// `transform = { kind = "none" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Transform {
    /// The columns as given (and the [`Expansion`]'s hinges on them).
    None,
    /// At the first outcomes the model learns from, every column whose
    /// values there are right-skewed (sample skewness at least
    /// [`Transform::SKEW`], more than 4 distinct values: days since the
    /// last visit, counts, amounts of money) is replaced by
    /// `ln(1 + x − lo)`, `lo` its smallest value there (values below `lo`
    /// count as `lo`). A model of the transformed columns is learned next
    /// to the plain one and plans only while its evidence is the highest;
    /// the [`Expansion`]'s hinges are then placed on the transformed
    /// columns too. Without skewed columns nothing changes.
    LogSkewed,
}

impl Transform {
    /// The sample skewness from which a column counts as skewed.
    pub const SKEW: f64 = 1.0;
}

impl Default for Transform {
    /// [`Transform::LogSkewed`]: +2.3 points on the crm family, nothing
    /// changed where no column is skewed (see `docs/decision-quality.md`).
    fn default() -> Self {
        Transform::LogSkewed
    }
}

/// How the integrated policy's per-creative models share data.
///
/// As TOML: `pooling = { kind = "adaptive", own = 0.1 }`,
/// `pooling = { kind = "shared", own = 0.25 }` or
/// `pooling = { kind = "none" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Pooling {
    /// Each creative's weights learned from its own outcomes only.
    None,
    /// Creative `c`'s weights are `s + δ_c`: a part shared by every
    /// creative, learned from every outcome, plus the creative's own
    /// deviation (see [`PooledWeights`]). Each creative's prior is still
    /// [`ModelConfig::prior`]; `own` is the share of its variance that is
    /// the creative's own, so `1 − own` is the prior correlation of two
    /// creatives' weights. Only the integrated policy pools; targeting
    /// models one creative.
    Shared {
        /// The creatives' own share of the prior variance, 0.01 to 0.99.
        own: f64,
    },
    /// [`Pooling::Shared`], with the prior variances of the creatives'
    /// deviations set by empirical Bayes after every update: the variances
    /// that maximise the marginal likelihood of every outcome learned so
    /// far, and the posterior under them (see
    /// [`PooledWeights::adapt_deviations`]; deterministic, kept in the
    /// model state). Deviations the data do not support are shrunk
    /// towards the shared weights (a creative that differs from the others
    /// on a few columns keeps those and loses the noise on the rest), and
    /// the scale of each column is learned with it (a raw age or amount
    /// needs a far smaller weight than a flag). `own` is the share before
    /// the first update. The model with hinge columns
    /// ([`Expansion::Hinges`]) keeps the fixed shares (adapting it cost
    /// 2.7 points on the nonlinear family); the plain and log models
    /// adapt. A model state recorded before adaptation existed keeps its
    /// fixed prior.
    Adaptive {
        /// The creatives' own share of the prior variance before the
        /// first update, 0.01 to 0.99.
        own: f64,
        /// One variance per creative and weight (else per weight, shared
        /// by the creatives).
        #[serde(default)]
        per_weight: bool,
    },
}

impl Default for Pooling {
    /// [`Pooling::Adaptive`] with `own = 0.1`, one variance per creative
    /// and weight: on the crm family +0.9 point over [`Pooling::Shared`]
    /// (the second round's default) on the runtime, within 0.5 elsewhere
    /// (see `docs/decision-quality.md`, third round).
    fn default() -> Self {
        Pooling::Adaptive {
            own: 0.1,
            per_weight: true,
        }
    }
}

/// Extra model columns built from the user's features: a richer function
/// class for responses that are not linear in the columns given.
///
/// As TOML: `expansion = { kind = "hinges", knots = 2 }` or
/// `expansion = { kind = "none" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Expansion {
    /// The columns as given.
    None,
    /// Piecewise-linear columns: for every column with more than
    /// `knots + 2` distinct values in the first outcomes the model learns
    /// from, `max(0, x − q)` at `knots` quantiles `q` of those outcomes'
    /// values (so a curved or thresholded effect of, say, days since the
    /// last visit becomes a few straight pieces). Flags and one-hot columns
    /// are left alone. The knots are fixed at that first update and kept
    /// with the model; the model then starts again from its prior in the
    /// larger dimension (the first outcomes are learned in it). At most
    /// [`Expansion::MAX_COLUMNS`] columns in all: with many numeric
    /// columns, each gets fewer knots (at least one while there is room).
    /// The expanded model is learned next to the plain one and plans only
    /// while its evidence (Laplace marginal likelihood of every outcome)
    /// is the higher, so on data the plain model explains as well it costs
    /// nothing but the update. Only the integrated policy expands;
    /// targeting ignores it.
    Hinges {
        /// Knots per column, 1 to 8.
        knots: u8,
    },
}

impl Expansion {
    /// Most model columns after expansion (planning time grows with their
    /// square).
    pub const MAX_COLUMNS: usize = 32;
}

impl Default for Expansion {
    /// [`Expansion::Hinges`] with 3 knots.
    fn default() -> Self {
        Expansion::Hinges { knots: 3 }
    }
}

/// How the posterior policies score candidates for a batch.
///
/// As TOML: `scoring = { kind = "optimistic", bonus = 1.0, noise = 0.5 }` or
/// `scoring = { kind = "shared-draw" }`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Scoring {
    /// One posterior draw shared by every user of the batch (Thompson
    /// sampling at the level of the batch): the scoring before issue 14.
    /// Every user's score moves with the same draw, so a draw that happens
    /// to overrate one direction of feature space fills the whole batch
    /// from it.
    SharedDraw,
    /// Each user and creative scored `mean + sd·(bonus + noise·ε)`, where
    /// `mean` and `sd` are the posterior mean and standard deviation of the
    /// linear score `w₀ + w·x` and `ε` an independent standard normal per
    /// user and creative. `bonus` is optimism in the face of uncertainty
    /// (UCB-like: users the model knows little about are tried); `noise`
    /// randomises the choice near the batch's cut-off and between close
    /// creatives, so propensities (Monte Carlo over fresh `ε`) stay
    /// strictly inside (0, 1) where the policy explores. `noise = 0` is
    /// deterministic (every propensity 1: no use for off-policy
    /// evaluation).
    Optimistic {
        /// Standard deviations of optimism, 0 to 10.
        bonus: f64,
        /// Standard deviations of independent noise, 0 to 10.
        noise: f64,
    },
}

impl Default for Scoring {
    /// [`Scoring::Optimistic`] with `bonus = 0.25`, `noise = 0.25`:
    /// within 0.1 point of posterior-mean scoring on the linear families
    /// and level with it elsewhere (see `docs/decision-quality.md`),
    /// while keeping propensities inside (0, 1) near the cut-off.
    fn default() -> Self {
        Scoring::Optimistic {
            bonus: 0.25,
            noise: 0.25,
        }
    }
}

impl Scoring {
    fn check(&self) -> Result<(), PolicyError> {
        if let Scoring::Optimistic { bonus, noise } = *self {
            if !(0.0..=10.0).contains(&bonus) || !(0.0..=10.0).contains(&noise) {
                return Err(PolicyError::Config(
                    "optimistic scoring needs bonus and noise from 0 to 10",
                ));
            }
        }
        Ok(())
    }
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
            scoring: Scoring::default(),
            expansion: Expansion::default(),
            pooling: Pooling::default(),
            transform: Transform::default(),
            defer: Defer::default(),
        }
    }
}

impl ModelConfig {
    fn check(&self) -> Result<(), PolicyError> {
        if self.propensity_draws == 0 {
            return Err(PolicyError::Config("propensity_draws must be at least 1"));
        }
        if let Expansion::Hinges { knots } = self.expansion {
            if !(1..=8).contains(&knots) {
                return Err(PolicyError::Config("hinge knots must be 1 to 8"));
            }
        }
        if let Pooling::Shared { own } | Pooling::Adaptive { own, .. } = self.pooling {
            if !(0.01..=0.99).contains(&own) {
                return Err(PolicyError::Config(
                    "pooling's own share must be 0.01 to 0.99",
                ));
            }
        }
        if let Defer::Ambiguous { weight } = self.defer {
            if !(0.0..=100.0).contains(&weight) {
                return Err(PolicyError::Config("defer's weight must be 0 to 100"));
            }
        }
        self.scoring.check()
    }
}

/// Top `k` by best modelled creative under the configured [`Scoring`]
/// (one posterior draw, or one optimistic perturbation), each optimistic
/// score lowered by `defer` times the user's ambiguity ([`Defer`]);
/// propensities by Monte Carlo over further draws or perturbations.
///
/// With `hinges`, the models are over the candidates' expanded columns:
/// the optimistic scoring expands each row as it computes the moments
/// (no expanded copy of the candidates; the same moments to the bit), the
/// shared draw scores an expanded copy.
fn plan_top_k(
    models: &[GaussianWeights],
    creative_ids: &[u16],
    (candidates, hinges): (&Candidates, Option<&Hinges>),
    k: usize,
    config: &ModelConfig,
    defer: f32,
    rng: &mut dyn RngCore,
) -> Decisions {
    let n = candidates.len();
    let draws = config.propensity_draws;
    let mut out = Decisions::with_capacity(k);
    if k == 0 {
        return out;
    }
    let (rows, chosen, hits) = match config.scoring {
        Scoring::Optimistic { bonus, noise } => plan_optimistic(
            &match hinges {
                None => Moments::new(models, candidates),
                Some(h) => Moments::mapped(
                    models,
                    candidates,
                    h.dim(),
                    Some(&|x, out| h.extend(x, out)),
                ),
            },
            bonus as f32,
            noise as f32,
            defer,
            k,
            draws,
            rng,
        ),
        Scoring::SharedDraw => {
            let expanded = match hinges {
                None => None,
                Some(h) => match h.candidates(candidates) {
                    Ok(c) => Some(c),
                    // The hinges' dimension is within the limit (checked
                    // when they were fitted): not reached.
                    Err(_) => return out,
                },
            };
            let candidates = expanded.as_ref().unwrap_or(candidates);
            let mut scorer = Scorer::new(models.len(), candidates.dim(), n);
            let fill = |scorer: &mut Scorer, rng: &mut dyn RngCore| {
                scorer.draw(models, rng);
                scorer.score(candidates);
            };
            fill(&mut scorer, rng);
            let rows = scorer.top_k(k);
            let chosen: Vec<u16> = rows.iter().map(|&r| scorer.arg[r]).collect();
            let mut hits = vec![1u32; k];
            for _ in 1..draws {
                fill(&mut scorer, rng);
                let t = scorer.threshold(k);
                for ((&r, &c), h) in rows.iter().zip(&chosen).zip(hits.iter_mut()) {
                    if scorer.best[r] >= t && scorer.arg[r] == c {
                        *h += 1;
                    }
                }
            }
            (rows, chosen, hits)
        }
    };
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
/// all `C × (dim+1)` weights. A plan scores every remaining user by their
/// best creative under [`ModelConfig::scoring`] (by default
/// `mean + sd·(bonus + noise·ε)` of `w_c·x̃` with independent noise per
/// user and creative; [`Scoring::SharedDraw`]: one posterior draw for the
/// whole batch), and sends the top `k` that creative. Propensities: the
/// fraction of [`ModelConfig::propensity_draws`] fresh noises (or
/// posterior draws), the decision's included, in which the user is in the
/// top `k` with the same creative. With [`ModelConfig::expansion`], a
/// second model over hinge columns learns next to this one and plans
/// while its evidence is higher ([`Integrated::uses_expansion`]). Updates
/// take aggregated outcomes of every creative.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Integrated {
    config: ModelConfig,
    /// One posterior per creative over the user's own columns.
    models: Vec<GaussianWeights>,
    ids: Vec<u16>,
    /// The expanded model, once the first outcomes fixed its columns.
    #[serde(default)]
    expanded: Option<Expanded>,
    /// Log evidence of the plain models (summed over creatives and
    /// updates since the expanded model exists).
    #[serde(default)]
    plain_evidence: f64,
    /// The joint posterior of the plain models when they are pooled
    /// ([`ModelConfig::pooling`]); `models` are then its marginals. `None`
    /// without pooling (and in states recorded before pooling existed,
    /// which keep learning per creative).
    #[serde(default)]
    pooled: Option<PooledWeights>,
    /// The model over log-transformed skewed columns
    /// ([`ModelConfig::transform`]), once the first outcomes fixed them
    /// (created with `expanded`, over the same outcomes).
    #[serde(default)]
    logged: Option<Expanded>,
}

/// The integrated model over expanded columns, kept next to the plain one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Expanded {
    hinges: Hinges,
    models: Vec<GaussianWeights>,
    /// Log evidence, over the same outcomes as `plain_evidence`.
    evidence: f64,
    /// The joint posterior when pooled (`models` its marginals).
    #[serde(default)]
    pooled: Option<PooledWeights>,
}

/// Hinge columns `max(0, x_j − q)` (see [`Expansion::Hinges`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Hinges {
    /// The user's own feature count.
    base: usize,
    /// `(column, knot)` per extra column (on the transformed column).
    knots: Vec<(u16, f32)>,
    /// `(column, lo)`: columns replaced by `ln(1 + max(0, x − lo))`.
    #[serde(default)]
    logs: Vec<(u16, f32)>,
}

impl Hinges {
    /// Knots at quantiles of each column's values in `outcomes` (at most
    /// the first 20,000 rows with trials); with `log_skewed`, skewed
    /// columns log-transformed first (see [`Transform::LogSkewed`]). No
    /// hinges with `knots = 0`.
    fn fit(outcomes: &Outcomes, knots: u8, log_skewed: bool) -> Self {
        let d = outcomes.dim();
        let rows: Vec<&[f32]> = outcomes
            .rows()
            .filter(|r| r.trials > 0)
            .take(20_000)
            .map(|r| r.x)
            .collect();
        let room = Expansion::MAX_COLUMNS
            .min(Candidates::MAX_DIM)
            .saturating_sub(d);
        let mut numeric = Vec::new();
        let mut logs = Vec::new();
        let mut values = Vec::with_capacity(rows.len());
        for j in 0..d {
            values.clear();
            values.extend(rows.iter().map(|x| x[j]).filter(|v| v.is_finite()));
            values.sort_unstable_by(f32::total_cmp);
            let mut distinct = values.clone();
            distinct.dedup();
            if log_skewed && distinct.len() > 4 && skewness(&values) >= Transform::SKEW {
                let lo = values[0];
                logs.push((j as u16, lo));
                for v in values.iter_mut() {
                    *v = log_shift(*v, lo);
                }
                for v in distinct.iter_mut() {
                    *v = log_shift(*v, lo);
                }
            }
            if knots > 0 && distinct.len() > usize::from(knots) + 2 {
                numeric.push((j, values.clone(), distinct[0], distinct[distinct.len() - 1]));
            }
        }
        // Fewer knots per column when there are many numeric columns.
        let per = usize::from(knots).min(room / numeric.len().max(1)).max(1);
        let mut out = Vec::new();
        for (j, values, lo, hi) in &numeric {
            let mut last = f32::NEG_INFINITY;
            for i in 1..=per {
                let q = values[i * values.len() / (per + 1)];
                if q > *lo && q < *hi && q > last && out.len() < room {
                    out.push((*j as u16, q));
                    last = q;
                }
            }
        }
        Self {
            base: d,
            knots: out,
            logs,
        }
    }

    /// Whether the columns are the user's own (nothing to learn apart).
    fn is_identity(&self) -> bool {
        self.knots.is_empty() && self.logs.is_empty()
    }

    /// The expanded dimension.
    fn dim(&self) -> usize {
        self.base + self.knots.len()
    }

    /// Appends `x` (its skewed columns transformed) and its hinge
    /// columns to `out`.
    fn extend(&self, x: &[f32], out: &mut Vec<f32>) {
        let start = out.len();
        out.extend_from_slice(x);
        for &(j, lo) in &self.logs {
            let v = &mut out[start + usize::from(j)];
            *v = log_shift(*v, lo);
        }
        for &(j, q) in &self.knots {
            let v = out[start + usize::from(j)];
            out.push((v - q).max(0.0));
        }
    }

    fn outcomes(&self, o: &Outcomes) -> Result<Outcomes, PolicyError> {
        let mut out = Outcomes::new(self.dim()).map_err(|_| PolicyError::Config("expansion"))?;
        let mut x = Vec::with_capacity(self.dim());
        for r in o.rows() {
            x.clear();
            self.extend(r.x, &mut x);
            out.push(r.creative, &x, r.trials, r.successes)
                .map_err(|_| PolicyError::Config("expanded outcome"))?;
        }
        Ok(out)
    }

    fn candidates(&self, c: &Candidates) -> Result<Candidates, PolicyError> {
        let mut features = Vec::with_capacity(c.len() * self.dim());
        for x in c.rows() {
            self.extend(x, &mut features);
        }
        Candidates::from_parts(self.dim(), c.users().to_vec(), features)
            .map_err(|_| PolicyError::Config("expanded candidates"))
    }
}

/// `ln(1 + max(0, x − lo))`.
fn log_shift(x: f32, lo: f32) -> f32 {
    (x - lo).max(0.0).ln_1p()
}

/// The sample skewness of `v` (0 when it is constant or empty).
fn skewness(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    if v.is_empty() {
        return 0.0;
    }
    let m = v.iter().map(|&a| f64::from(a)).sum::<f64>() / n;
    let (mut m2, mut m3) = (0.0, 0.0);
    for &a in v {
        let d = f64::from(a) - m;
        m2 += d * d;
        m3 += d * d * d;
    }
    let (m2, m3) = (m2 / n, m3 / n);
    if m2 <= 1e-12 {
        0.0
    } else {
        m3 / m2.powf(1.5)
    }
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
            expanded: None,
            plain_evidence: 0.0,
            pooled: pooled_prior(features, creatives, &config)?,
            logged: None,
        })
    }

    /// The posterior of each creative's weights over the user's own
    /// columns.
    pub fn models(&self) -> &[GaussianWeights] {
        &self.models
    }

    /// Whether plans use the expanded model ([`ModelConfig::expansion`]):
    /// once it exists and its evidence (the Laplace marginal likelihood of
    /// every outcome learned) beats the plain model's.
    pub fn uses_expansion(&self) -> bool {
        self.chosen_expansion().is_some()
    }

    /// Which model plans now: `"plain"` (the columns as given), `"log"`
    /// (skewed columns log-transformed, [`Transform::LogSkewed`]) or
    /// `"hinges"` ([`Expansion::Hinges`], on the log scale where columns
    /// are logged).
    pub fn planning_model(&self) -> &'static str {
        match self.chosen_expansion() {
            None => "plain",
            Some(e) if e.hinges.knots.is_empty() => "log",
            Some(_) => "hinges",
        }
    }

    /// The alternative model with the highest evidence, if above the
    /// plain model's.
    fn chosen_expansion(&self) -> Option<&Expanded> {
        [self.expanded.as_ref(), self.logged.as_ref()]
            .into_iter()
            .flatten()
            .filter(|e| !e.hinges.is_identity() && e.evidence > self.plain_evidence)
            .fold(None, |best: Option<&Expanded>, e| match best {
                Some(b) if b.evidence >= e.evidence => Some(b),
                _ => Some(e),
            })
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
        let (models, x) = match self.chosen_expansion() {
            Some(e) => {
                let mut v = Vec::new();
                e.hinges.extend(x, &mut v);
                (&e.models, v)
            }
            None => (&self.models, x.to_vec()),
        };
        models
            .iter()
            .map(|m| match self.config.link {
                Link::Logistic => crate::model::sigmoid(m.mean_score(&x)),
                Link::Linear { .. } => m.mean_score(&x),
            })
            .collect()
    }

    /// A model over `hinges`' columns, learned from its prior on
    /// `outcomes` (none when the columns are the user's own).
    fn alternative(&self, hinges: Hinges, outcomes: &Outcomes) -> Result<Expanded, PolicyError> {
        let mut models = Vec::new();
        let mut evidence = 0.0;
        let mut pooled = None;
        if !hinges.is_identity() {
            let prior = GaussianWeights::new(hinges.dim(), &self.config.prior)?;
            models = vec![prior; self.models.len()];
            if self.pooled.is_some() {
                pooled = pooled_prior(hinges.dim(), self.models.len(), &self.config)?;
            }
            let o = hinges.outcomes(outcomes)?;
            evidence = learn(
                &mut models,
                &mut pooled,
                &self.ids,
                self.config.link,
                &o,
                self.adapt(&hinges),
            )?;
        }
        Ok(Expanded {
            hinges,
            models,
            evidence,
            pooled,
        })
    }

    /// Whether (and how: per weight or not) an update of the model over
    /// `hinges`' columns adapts its deviations' prior
    /// ([`Pooling::Adaptive`]): not the model with hinge columns.
    fn adapt(&self, hinges: &Hinges) -> Option<bool> {
        match self.config.pooling {
            Pooling::Adaptive { per_weight, .. } if hinges.knots.is_empty() => Some(per_weight),
            _ => None,
        }
    }

    /// Plans greedily with the posterior means (no draw, propensity 1):
    /// the exploitation-only baseline.
    pub fn plan_greedy(
        &self,
        candidates: &Candidates,
        budget: usize,
    ) -> Result<Decisions, PolicyError> {
        check_dim(self.models[0].features(), candidates.dim())?;
        let expanded;
        let (models, candidates) = match self.chosen_expansion() {
            Some(e) => {
                expanded = e.hinges.candidates(candidates)?;
                (&e.models, &expanded)
            }
            None => (&self.models, candidates),
        };
        let k = budget.min(candidates.len());
        let mut out = Decisions::with_capacity(k);
        if k == 0 {
            return Ok(out);
        }
        let mut scorer = Scorer::new(models.len(), candidates.dim(), candidates.len());
        scorer.use_means(models);
        scorer.score(candidates);
        for r in scorer.top_k(k) {
            out.push(candidates.users()[r], scorer.arg[r], 1.0);
        }
        Ok(out)
    }
}

/// Updates each creative's model from its rows, all or none; returns the
/// summed log evidence of the rows.
fn update_models(
    models: &mut [GaussianWeights],
    ids: &[u16],
    link: Link,
    outcomes: &Outcomes,
) -> Result<f64, PolicyError> {
    if let Some(first) = models.first() {
        check_dim(first.features(), outcomes.dim())?;
    }
    let mut updated = models.to_vec();
    let mut rows: Vec<OutcomeRow<'_>> = Vec::new();
    let mut evidence = 0.0;
    for (model, &id) in updated.iter_mut().zip(ids) {
        rows.clear();
        rows.extend(outcomes.rows().filter(|r| r.creative == id));
        evidence += model.update(link, &rows)?.log_evidence;
    }
    models.clone_from_slice(&updated);
    Ok(evidence)
}

/// The pooled prior for the configured [`Pooling`] (`None` without).
fn pooled_prior(
    features: usize,
    creatives: usize,
    config: &ModelConfig,
) -> Result<Option<PooledWeights>, PolicyError> {
    Ok(match config.pooling {
        Pooling::Shared { own } | Pooling::Adaptive { own, .. } => {
            Some(PooledWeights::new(features, creatives, &config.prior, own)?)
        }
        Pooling::None => None,
    })
}

/// Updates per-creative models, or their pooled posterior and then the
/// models as its marginals, all or none; returns the log evidence.
fn learn(
    models: &mut [GaussianWeights],
    pooled: &mut Option<PooledWeights>,
    ids: &[u16],
    link: Link,
    outcomes: &Outcomes,
    adapt: Option<bool>,
) -> Result<f64, PolicyError> {
    match pooled {
        Some(p) => {
            check_dim(p.features(), outcomes.dim())?;
            let rows: Vec<OutcomeRow<'_>> = outcomes.rows().collect();
            let mut next = p.clone();
            let evidence = next.update(link, &rows)?.log_evidence;
            if let Some(per_weight) = adapt {
                next.adapt_deviations(per_weight)?;
            }
            let marginals = next.marginals()?;
            models.clone_from_slice(&marginals);
            *p = next;
            Ok(evidence)
        }
        None => update_models(models, ids, link, outcomes),
    }
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
        check_dim(self.models[0].features(), outcomes.dim())?;
        let link = self.config.link;
        let mut plain = self.models.clone();
        let mut pooled = self.pooled.clone();
        let adapt = match self.config.pooling {
            Pooling::Adaptive { per_weight, .. } => Some(per_weight),
            _ => None,
        };
        let plain_ev = learn(&mut plain, &mut pooled, &self.ids, link, outcomes, adapt)?;
        let knots = match self.config.expansion {
            Expansion::Hinges { knots } => knots,
            _ => 0,
        };
        let log_skewed = self.config.transform == Transform::LogSkewed;
        let mut expanded = self.expanded.clone();
        let mut logged = self.logged.clone();
        let first = expanded.is_none()
            && logged.is_none()
            && (knots > 0 || log_skewed)
            && outcomes.rows().any(|r| r.trials > 0);
        if first {
            // The first outcomes fix the alternative models' columns; they
            // learn from their priors, on the same outcomes as the plain
            // one from here on.
            if knots > 0 {
                expanded =
                    Some(self.alternative(Hinges::fit(outcomes, knots, log_skewed), outcomes)?);
            }
            if log_skewed {
                logged = Some(self.alternative(Hinges::fit(outcomes, 0, true), outcomes)?);
            }
            self.plain_evidence = 0.0;
        } else {
            for e in [&mut expanded, &mut logged].into_iter().flatten() {
                if !e.hinges.is_identity() {
                    let o = e.hinges.outcomes(outcomes)?;
                    let adapt = self.adapt(&e.hinges);
                    e.evidence += learn(&mut e.models, &mut e.pooled, &self.ids, link, &o, adapt)?;
                }
            }
        }
        self.models = plain;
        self.pooled = pooled;
        if expanded.is_some() || logged.is_some() {
            self.plain_evidence += plain_ev;
        }
        self.expanded = expanded;
        self.logged = logged;
        Ok(())
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
        // Deferral only while a model with adapted deviations plans.
        let adapted = matches!(self.config.pooling, Pooling::Adaptive { .. });
        let mut defer = if adapted {
            self.config.defer.factor(ctx.batch, ctx.batch_count)
        } else {
            0.0
        };
        if let Some(e) = self.chosen_expansion() {
            if !e.hinges.knots.is_empty() {
                defer = 0.0;
            }
            // Checks the expanded shape as the copy did.
            if e.hinges.dim() > Candidates::MAX_DIM {
                return Err(PolicyError::Config("expanded candidates"));
            }
            return Ok(plan_top_k(
                &e.models,
                &self.ids,
                (candidates, Some(&e.hinges)),
                k,
                &self.config,
                defer,
                rng,
            ));
        }
        Ok(plan_top_k(
            &self.models,
            &self.ids,
            (candidates, None),
            k,
            &self.config,
            defer,
            rng,
        ))
    }
}

/// User targeting for one fixed creative: a posterior over that creative's
/// response weights; each plan scores every remaining user under
/// [`ModelConfig::scoring`] and sends the top `k` the creative.
/// Propensities as for [`Integrated`]; no expansion. Outcomes of other
/// creatives are ignored.
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
        .map(|_| ())
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
            (candidates, None),
            k,
            &self.config,
            0.0,
            rng,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Users with a skewed column (exponential, mean 40: days since the
    /// last visit), a normal one and a flag; the truth is logistic in
    /// `ln(1 + days)` for creative 0 and flat for creative 1.
    fn outcomes(n: usize, seed: u64) -> Outcomes {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let mut o = Outcomes::new(3).unwrap();
        for i in 0..n {
            let days = (-40.0 * (1.0 - r.random::<f64>()).ln()).floor();
            let z: f64 = rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut r);
            let flag = f64::from(u8::from(r.random_bool(0.3)));
            let c = (i % 2) as u16;
            let logit = if c == 0 {
                2.0 - 1.5 * (1.0 + days).ln() + 0.3 * z
            } else {
                -3.0 + 0.3 * z
            };
            let y = r.random::<f64>() < crate::model::sigmoid(logit);
            o.push(c, &[days as f32, z as f32, flag as f32], 1, u32::from(y))
                .unwrap();
        }
        o
    }

    #[test]
    fn skewed_columns_are_logged_and_others_left_alone() {
        let o = outcomes(4_000, 1);
        let h = Hinges::fit(&o, 0, true);
        assert!(h.knots.is_empty());
        assert_eq!(h.logs.len(), 1, "{:?}", h.logs);
        assert_eq!(h.logs[0], (0, 0.0));
        let mut x = Vec::new();
        h.extend(&[9.0, -1.5, 1.0], &mut x);
        assert_eq!(x, vec![10f32.ln(), -1.5, 1.0]);
        // Hinges of the expanded model sit on the log scale.
        let e = Hinges::fit(&o, 2, true);
        assert_eq!(e.logs, h.logs);
        let knots0: Vec<f32> = e.knots.iter().filter(|k| k.0 == 0).map(|k| k.1).collect();
        assert!(!knots0.is_empty() && knots0.iter().all(|&q| q > 0.0 && q < 7.0));
        // Without the transform, or without skewed columns, nothing.
        assert!(Hinges::fit(&o, 0, false).is_identity());
        let mut flat = Outcomes::new(2).unwrap();
        for r in o.rows() {
            flat.push(r.creative, &r.x[1..], r.trials, r.successes)
                .unwrap();
        }
        assert!(Hinges::fit(&flat, 0, true).is_identity());
    }

    #[test]
    fn the_logged_model_plans_when_its_evidence_is_higher() {
        let cfg = ModelConfig {
            expansion: Expansion::None,
            ..ModelConfig::default()
        };
        let mut p = Integrated::new(2, 3, cfg).unwrap();
        for seed in 0..3 {
            p.update(&outcomes(5_000, 10 + seed)).unwrap();
        }
        let logged = p.logged.as_ref().unwrap();
        assert!(logged.evidence > p.plain_evidence + 10.0);
        assert!(p.uses_expansion());
        // Its expected response follows the truth's curve in days.
        let (a, b) = (
            p.expected_response(&[1.0, 0.0, 0.0])[0],
            p.expected_response(&[200.0, 0.0, 0.0])[0],
        );
        let truth = |d: f64| crate::model::sigmoid(2.0 - 1.5 * (1.0 + d).ln());
        assert!((a - truth(1.0)).abs() < 0.05, "{a} vs {}", truth(1.0));
        assert!((b - truth(200.0)).abs() < 0.01, "{b} vs {}", truth(200.0));
        // Same state, same plan; serde keeps the alternative models.
        let json = serde_json::to_string(&p).unwrap();
        let back: Integrated = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn recorded_configs_without_the_new_fields_get_the_defaults() {
        let mut v = serde_json::to_value(ModelConfig::default()).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("pooling");
        m.remove("transform");
        m.remove("defer");
        let c: ModelConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c, ModelConfig::default());
        assert_eq!(
            c.pooling,
            Pooling::Adaptive {
                own: 0.1,
                per_weight: true
            }
        );
        // TOML-style specs of either pooling parse.
        let shared: Pooling = serde_json::from_str(r#"{"kind":"shared","own":0.1}"#).unwrap();
        assert_eq!(shared, Pooling::Shared { own: 0.1 });
        let adaptive: Pooling = serde_json::from_str(r#"{"kind":"adaptive","own":0.2}"#).unwrap();
        assert_eq!(
            adaptive,
            Pooling::Adaptive {
                own: 0.2,
                per_weight: false
            }
        );
        assert_eq!(c.transform, Transform::LogSkewed);
        assert_eq!(c.defer, Defer::Ambiguous { weight: 12.0 });
        let none: Defer = serde_json::from_str(r#"{"kind":"none"}"#).unwrap();
        assert_eq!(none, Defer::None);
        let bad = ModelConfig {
            defer: Defer::Ambiguous { weight: -1.0 },
            ..ModelConfig::default()
        };
        assert!(Integrated::new(2, 3, bad).is_err());
        let bad = ModelConfig {
            pooling: Pooling::Shared { own: 1.0 },
            ..ModelConfig::default()
        };
        assert!(Integrated::new(2, 3, bad).is_err());
        let bad = ModelConfig {
            pooling: Pooling::Adaptive {
                own: 0.0,
                per_weight: true,
            },
            ..ModelConfig::default()
        };
        assert!(Integrated::new(2, 3, bad).is_err());
    }
}
