//! Bayesian models the policies share.
//!
//! - [`BetaArm`]: Beta-Bernoulli counts for one creative.
//! - [`GaussianWeights`]: a Gaussian posterior `N(mean, precision⁻¹)` over
//!   the weights of a response model `f(w₀ + w·x)` with an intercept `w₀`.
//!   With [`Link::Logistic`] an update is a Laplace approximation: the new
//!   posterior's mean is the mode of (old posterior × likelihood of the new
//!   outcomes), found by Newton's method, and its precision is the negative
//!   Hessian there. Updating window by window (each posterior the next
//!   prior) needs no past data, so it fits a windowed reaction pipeline.
//!   With [`Link::Linear`] the update is the exact conjugate one (Bayesian
//!   linear regression with known noise variance on 0/1 responses).
//!
//! Everything is `f64` and small (`(dim+1)²` with `dim ≤ 64`): Cholesky by
//! hand, no linear-algebra crate.

use rand::RngCore;
use rand_distr::{Beta, Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::data::OutcomeRow;

/// Why a model update failed. The model is unchanged when it does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A row's features have another dimension than the model.
    #[error("outcome row has {got} features; the model has {expected}")]
    Dimension {
        /// The model's feature dimension.
        expected: usize,
        /// The row's.
        got: usize,
    },
    /// The posterior precision lost positive definiteness (numerically).
    #[error("posterior precision is not positive definite")]
    NotPositiveDefinite,
    /// The update produced a non-finite mean.
    #[error("posterior mean is not finite")]
    NotFinite,
    /// A parameter is out of range.
    #[error("bad model parameter: {0}")]
    BadParameter(&'static str),
}

/// The response function of a [`GaussianWeights`] model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Link {
    /// `P(react) = σ(w₀ + w·x)`; Laplace-approximated updates.
    Logistic,
    /// `E[react] = w₀ + w·x` with Gaussian noise of this variance; exact
    /// conjugate updates.
    Linear {
        /// The noise variance (e.g. `p(1-p)` for a typical rate `p`).
        noise_variance: f64,
    },
}

/// A prior for [`GaussianWeights`]: independent Gaussians.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prior {
    /// The intercept's mean (e.g. `logit(0.05) ≈ -3` for a logistic
    /// model).
    pub intercept_mean: f64,
    /// The intercept's variance.
    pub intercept_variance: f64,
    /// Each feature weight's variance (mean 0).
    pub weight_variance: f64,
}

impl Default for Prior {
    /// A weakly informative prior for a logistic model with rates of a few
    /// percent and standardised features: intercept `N(-3, 4)`, weights
    /// `N(0, 1)`.
    fn default() -> Self {
        Self {
            intercept_mean: -3.0,
            intercept_variance: 4.0,
            weight_variance: 1.0,
        }
    }
}

impl Prior {
    fn check(&self) -> Result<(), ModelError> {
        let ok = self.intercept_mean.is_finite()
            && self.intercept_variance.is_finite()
            && self.intercept_variance > 0.0
            && self.weight_variance.is_finite()
            && self.weight_variance > 0.0;
        if ok {
            Ok(())
        } else {
            Err(ModelError::BadParameter(
                "prior variances must be finite and positive",
            ))
        }
    }
}

/// Beta-Bernoulli counts for one arm: `Beta(alpha, beta)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BetaArm {
    /// 1 + successes (with the uniform prior).
    pub alpha: f64,
    /// 1 + failures (with the uniform prior).
    pub beta: f64,
}

impl Default for BetaArm {
    /// The uniform prior `Beta(1, 1)`.
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: 1.0,
        }
    }
}

impl BetaArm {
    /// Adds `successes` out of `trials`.
    pub fn update(&mut self, trials: u64, successes: u64) {
        let successes = successes.min(trials);
        self.alpha += successes as f64;
        self.beta += (trials - successes) as f64;
    }

    /// The posterior mean.
    pub fn mean(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }

    /// One draw from the posterior.
    pub fn sample(&self, rng: &mut dyn RngCore) -> f64 {
        match Beta::new(self.alpha, self.beta) {
            Ok(d) => d.sample(rng),
            Err(_) => self.mean(),
        }
    }
}

/// A Gaussian posterior over `[w₀, w₁ … w_dim]` (intercept first). See the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WeightsRepr", into = "WeightsRepr")]
pub struct GaussianWeights {
    /// `dim + 1`.
    n: usize,
    mean: Vec<f64>,
    /// Row-major `n × n`, symmetric.
    precision: Vec<f64>,
    /// Lower Cholesky factor of `precision`.
    chol: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct WeightsRepr {
    mean: Vec<f64>,
    precision: Vec<f64>,
}

impl From<GaussianWeights> for WeightsRepr {
    fn from(w: GaussianWeights) -> Self {
        Self {
            mean: w.mean,
            precision: w.precision,
        }
    }
}

impl TryFrom<WeightsRepr> for GaussianWeights {
    type Error = ModelError;
    fn try_from(r: WeightsRepr) -> Result<Self, ModelError> {
        let n = r.mean.len();
        if n < 2 || r.precision.len() != n * n {
            return Err(ModelError::BadParameter("precision is not (dim+1)²"));
        }
        let mut chol = vec![0.0; n * n];
        cholesky(&r.precision, n, &mut chol)?;
        Ok(Self {
            n,
            mean: r.mean,
            precision: r.precision,
            chol,
        })
    }
}

/// `ln(1 + e^t)`, stable.
fn softplus(t: f64) -> f64 {
    t.max(0.0) + (-t.abs()).exp().ln_1p()
}

/// The logistic function.
pub fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

/// Lower Cholesky factor `l` of the `n × n` matrix `a` (`a = l lᵀ`).
fn cholesky(a: &[f64], n: usize, l: &mut [f64]) -> Result<(), ModelError> {
    l.fill(0.0);
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if !(s > 0.0 && s.is_finite()) {
                    return Err(ModelError::NotPositiveDefinite);
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Ok(())
}

/// Solves `l lᵀ x = b` in place (`b` becomes `x`).
fn chol_solve(l: &[f64], n: usize, b: &mut [f64]) {
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * n + k] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
    back_substitute(l, n, b);
}

/// The diagonal of `(l lᵀ)⁻¹` into `out`: entry `j` is the squared norm
/// of column `j` of `l⁻¹` (as `(l lᵀ)⁻¹ = l⁻ᵀ l⁻¹`).
fn inverse_diagonal(l: &[f64], n: usize, out: &mut [f64]) {
    let mut col = vec![0.0; n];
    for j in 0..n {
        // Column j of l⁻¹ (zero above j), by forward substitution.
        for i in j..n {
            let mut s = if i == j { 1.0 } else { 0.0 };
            for t in j..i {
                s -= l[i * n + t] * col[t];
            }
            col[i] = s / l[i * n + i];
        }
        out[j] = col[j..].iter().map(|v| v * v).sum();
    }
}

/// Solves `lᵀ x = b` in place.
fn back_substitute(l: &[f64], n: usize, b: &mut [f64]) {
    for i in (0..n).rev() {
        let mut s = b[i];
        for k in i + 1..n {
            s -= l[k * n + i] * b[k];
        }
        b[i] = s / l[i * n + i];
    }
}

/// `w₀ + w·x` in f64.
fn linear(w: &[f64], x: &[f32]) -> f64 {
    w[0] + w[1..]
        .iter()
        .zip(x)
        .map(|(&a, &b)| a * f64::from(b))
        .sum::<f64>()
}

/// Adds `h · x̃ x̃ᵀ` (x̃ = [1, x]) to the lower triangle of `m`.
fn add_outer_lower(m: &mut [f64], n: usize, x: &[f32], h: f64) {
    m[0] += h;
    for i in 1..n {
        let hi = h * f64::from(x[i - 1]);
        let row = &mut m[i * n..i * n + i + 1];
        row[0] += hi;
        for (j, slot) in row[1..].iter_mut().enumerate() {
            *slot += hi * f64::from(x[j]);
        }
    }
}

fn mirror_lower(m: &mut [f64], n: usize) {
    for i in 0..n {
        for j in 0..i {
            m[j * n + i] = m[i * n + j];
        }
    }
}

/// What a [`GaussianWeights::update`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateReport {
    /// Rows used.
    pub rows: usize,
    /// Newton iterations (0 for a linear update or no rows).
    pub iterations: u32,
    /// The log marginal likelihood of the rows given the model before the
    /// update (`ln p(new | old)`), by the Laplace approximation (exact for
    /// the linear link up to the constant of its Gaussian noise). Summed
    /// over updates it is the model's evidence, which compares models of
    /// the same data (0 without rows).
    pub log_evidence: f64,
}

impl GaussianWeights {
    /// Most Newton iterations of a logistic update.
    pub const MAX_NEWTON_ITERATIONS: u32 = 50;

    /// The prior for `features` features.
    pub fn new(features: usize, prior: &Prior) -> Result<Self, ModelError> {
        prior.check()?;
        if features == 0 {
            return Err(ModelError::BadParameter(
                "a model needs at least one feature",
            ));
        }
        let n = features + 1;
        let mut mean = vec![0.0; n];
        mean[0] = prior.intercept_mean;
        let mut precision = vec![0.0; n * n];
        precision[0] = 1.0 / prior.intercept_variance;
        for i in 1..n {
            precision[i * n + i] = 1.0 / prior.weight_variance;
        }
        let mut chol = vec![0.0; n * n];
        cholesky(&precision, n, &mut chol)?;
        Ok(Self {
            n,
            mean,
            precision,
            chol,
        })
    }

    /// The number of features (the intercept excluded).
    pub fn features(&self) -> usize {
        self.n - 1
    }

    /// The posterior mean, intercept first.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The posterior precision, row-major `(features+1)²`.
    pub fn precision(&self) -> &[f64] {
        &self.precision
    }

    /// The posterior covariance (the precision's inverse), row-major.
    pub fn covariance(&self) -> Vec<f64> {
        let n = self.n;
        let mut cov = vec![0.0; n * n];
        let mut col = vec![0.0; n];
        for j in 0..n {
            col.fill(0.0);
            col[j] = 1.0;
            chol_solve(&self.chol, n, &mut col);
            for i in 0..n {
                cov[i * n + j] = col[i];
            }
        }
        cov
    }

    /// The inverse `L⁻¹` of the precision's lower Cholesky factor
    /// (`precision = L Lᵀ`), row-major and lower triangular: the posterior
    /// variance of the linear score at `x̃ = [1, x]` is `‖L⁻¹ x̃‖²`.
    pub fn inverse_cholesky(&self) -> Vec<f64> {
        let n = self.n;
        let mut inv = vec![0.0; n * n];
        let mut col = vec![0.0; n];
        for j in 0..n {
            col.fill(0.0);
            col[j] = 1.0;
            for i in j..n {
                let s = col[i]
                    - self.chol[i * n + j..i * n + i]
                        .iter()
                        .zip(&col[j..i])
                        .map(|(l, c)| l * c)
                        .sum::<f64>();
                col[i] = s / self.chol[i * n + i];
            }
            for i in j..n {
                inv[i * n + j] = col[i];
            }
        }
        inv
    }

    /// The posterior standard deviation of the linear score `w₀ + w·x`.
    pub fn score_sd(&self, x: &[f32]) -> f64 {
        let n = self.n;
        let inv = self.inverse_cholesky();
        (0..n)
            .map(|i| {
                let row = &inv[i * n..i * n + i + 1];
                let v = row[0]
                    + row[1..]
                        .iter()
                        .zip(x)
                        .map(|(a, &b)| a * f64::from(b))
                        .sum::<f64>();
                v * v
            })
            .sum::<f64>()
            .sqrt()
    }

    /// The posterior mean's linear score `w₀ + w·x`.
    pub fn mean_score(&self, x: &[f32]) -> f64 {
        linear(&self.mean, x)
    }

    /// Writes one draw from the posterior into `out` (`features + 1`
    /// values, intercept first).
    ///
    /// # Panics
    /// If `out` has another length.
    pub fn sample_into(&self, rng: &mut dyn RngCore, out: &mut [f64]) {
        assert_eq!(out.len(), self.n, "sample buffer length");
        for z in out.iter_mut() {
            *z = StandardNormal.sample(rng);
        }
        back_substitute(&self.chol, self.n, out);
        for (o, m) in out.iter_mut().zip(&self.mean) {
            *o += m;
        }
    }

    /// Updates the posterior with `rows` (each `trials` observations at
    /// `x`, `successes` of them 1). Rows with 0 trials are skipped. On
    /// error the posterior is unchanged.
    pub fn update(
        &mut self,
        link: Link,
        rows: &[OutcomeRow<'_>],
    ) -> Result<UpdateReport, ModelError> {
        let features = self.features();
        if let Some(r) = rows.iter().find(|r| r.x.len() != features) {
            return Err(ModelError::Dimension {
                expected: features,
                got: r.x.len(),
            });
        }
        let rows_used = rows.iter().filter(|r| r.trials > 0).count();
        if rows_used == 0 {
            return Ok(UpdateReport {
                rows: 0,
                iterations: 0,
                log_evidence: 0.0,
            });
        }
        let (mean, precision, chol, iterations) = match link {
            Link::Linear { noise_variance } => {
                if !(noise_variance > 0.0 && noise_variance.is_finite()) {
                    return Err(ModelError::BadParameter("noise variance must be positive"));
                }
                let (m, p, l) = self.linear_update(noise_variance, rows)?;
                (m, p, l, 0)
            }
            Link::Logistic => self.laplace_update(rows)?,
        };
        if mean.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NotFinite);
        }
        let log_evidence = self.log_evidence(link, &mean, &chol, rows);
        self.mean = mean;
        self.precision = precision;
        self.chol = chol;
        Ok(UpdateReport {
            rows: rows_used,
            iterations,
            log_evidence,
        })
    }

    /// `ln p(rows | self)` by the Laplace approximation at the new mode
    /// `w` with the new precision's factor `chol`: the log likelihood at
    /// `w`, minus the prior's quadratic term, plus half the log
    /// determinant ratio of old to new precision.
    fn log_evidence(&self, link: Link, w: &[f64], chol: &[f64], rows: &[OutcomeRow<'_>]) -> f64 {
        let n = self.n;
        let mut scratch = vec![0.0; n];
        let fit = match link {
            Link::Logistic => self.log_posterior(w, rows, &mut scratch),
            Link::Linear { noise_variance } => {
                for (d, (a, m)) in scratch.iter_mut().zip(w.iter().zip(&self.mean)) {
                    *d = a - m;
                }
                let mut quad = 0.0;
                for i in 0..n {
                    let pi = &self.precision[i * n..(i + 1) * n];
                    quad += scratch[i] * pi.iter().zip(&scratch).map(|(a, b)| a * b).sum::<f64>();
                }
                let mut ll = 0.0;
                for r in rows.iter().filter(|r| r.trials > 0) {
                    let mu = linear(w, r.x);
                    let s = f64::from(r.successes);
                    let f = f64::from(r.trials) - s;
                    ll -= (s * (1.0 - mu).powi(2) + f * mu * mu) / (2.0 * noise_variance);
                }
                ll - 0.5 * quad
            }
        };
        let logdet = |l: &[f64]| (0..n).map(|i| l[i * n + i].ln()).sum::<f64>();
        fit + logdet(&self.chol) - logdet(chol)
    }

    #[allow(clippy::type_complexity)]
    fn linear_update(
        &self,
        noise_variance: f64,
        rows: &[OutcomeRow<'_>],
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>), ModelError> {
        let n = self.n;
        let inv = 1.0 / noise_variance;
        let mut p = self.precision.clone();
        // b = P₀ m₀ + Xᵀy / σ²
        let mut b: Vec<f64> = self
            .precision
            .chunks_exact(n)
            .map(|row| row.iter().zip(&self.mean).map(|(p, m)| p * m).sum())
            .collect();
        // Accumulate into the lower triangle, then mirror (P₀ is symmetric).
        for r in rows.iter().filter(|r| r.trials > 0) {
            add_outer_lower(&mut p, n, r.x, f64::from(r.trials) * inv);
            let s = f64::from(r.successes) * inv;
            b[0] += s;
            for (bi, &xi) in b[1..].iter_mut().zip(r.x) {
                *bi += s * f64::from(xi);
            }
        }
        mirror_lower(&mut p, n);
        let mut l = vec![0.0; n * n];
        cholesky(&p, n, &mut l)?;
        chol_solve(&l, n, &mut b);
        Ok((b, p, l))
    }

    /// The log posterior (up to a constant) at `w`.
    fn log_posterior(&self, w: &[f64], rows: &[OutcomeRow<'_>], scratch: &mut [f64]) -> f64 {
        let n = self.n;
        for (d, (a, m)) in scratch.iter_mut().zip(w.iter().zip(&self.mean)) {
            *d = a - m;
        }
        let mut quad = 0.0;
        for i in 0..n {
            let pi = &self.precision[i * n..(i + 1) * n];
            quad += scratch[i]
                * pi.iter()
                    .zip(scratch.iter())
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
        }
        let mut ll = 0.0;
        for r in rows.iter().filter(|r| r.trials > 0) {
            let z = linear(w, r.x);
            let s = f64::from(r.successes);
            let f = f64::from(r.trials) - s;
            ll -= s * softplus(-z) + f * softplus(z);
        }
        ll - 0.5 * quad
    }

    #[allow(clippy::type_complexity)]
    fn laplace_update(
        &self,
        rows: &[OutcomeRow<'_>],
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, u32), ModelError> {
        let n = self.n;
        let mut w = self.mean.clone();
        let mut grad = vec![0.0; n];
        let mut hess = vec![0.0; n * n];
        let mut l = vec![0.0; n * n];
        let mut scratch = vec![0.0; n];
        let mut trial = vec![0.0; n];
        let mut current = self.log_posterior(&w, rows, &mut scratch);
        let mut iterations = 0;
        loop {
            // Gradient and negative Hessian of the log posterior at w.
            for (i, g) in grad.iter_mut().enumerate() {
                *g = -(0..n)
                    .map(|j| self.precision[i * n + j] * (w[j] - self.mean[j]))
                    .sum::<f64>();
            }
            hess.copy_from_slice(&self.precision);
            for r in rows.iter().filter(|r| r.trials > 0) {
                let p = sigmoid(linear(&w, r.x));
                let t = f64::from(r.trials);
                let e = f64::from(r.successes) - t * p;
                grad[0] += e;
                for (g, &x) in grad[1..].iter_mut().zip(r.x) {
                    *g += e * f64::from(x);
                }
                add_outer_lower(&mut hess, n, r.x, t * p * (1.0 - p));
            }
            mirror_lower(&mut hess, n);
            cholesky(&hess, n, &mut l)?;
            if iterations >= Self::MAX_NEWTON_ITERATIONS {
                break;
            }
            // Newton step, halved until the log posterior does not drop.
            let mut step = grad.clone();
            chol_solve(&l, n, &mut step);
            let size = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            if size < 1e-10 {
                break;
            }
            iterations += 1;
            let mut scale = 1.0;
            let mut accepted = false;
            for _ in 0..40 {
                for ((t, a), s) in trial.iter_mut().zip(&w).zip(&step) {
                    *t = a + scale * s;
                }
                let value = self.log_posterior(&trial, rows, &mut scratch);
                if value >= current - 1e-12 * current.abs() {
                    w.copy_from_slice(&trial);
                    current = value;
                    accepted = true;
                    break;
                }
                scale *= 0.5;
            }
            if !accepted {
                // No step improves: w is the mode to numerical precision,
                // and the Hessian above was computed at it.
                break;
            }
        }
        Ok((w, hess, l, iterations))
    }
}

/// A Gaussian posterior over the weights of `C` creatives' response
/// models that share data: creative `c`'s weights are `w_c = s + δ_c`, a
/// part `s` shared by every creative plus the creative's own deviation
/// `δ_c` (intercepts first in both). The prior splits the
/// [`Prior`]'s variances: `s` gets `1 − own` of each, every `δ_c` gets
/// `own` of each (`s`'s mean is the prior's intercept mean), so each
/// creative's marginal prior is the [`Prior`] itself, and weights of
/// different creatives are correlated `1 − own` a priori. Every outcome
/// informs `s`, so what is common to all creatives is learned from all
/// their data, while the deviations are shrunk towards it until a
/// creative's own data pull them away.
///
/// One Gaussian over `(C + 1)(dim + 1)` weights, updated like
/// [`GaussianWeights`] (Laplace for the logistic link, Newton to the
/// mode; exact for the linear one); [`PooledWeights::marginal`] gives each
/// creative's marginal posterior as a [`GaussianWeights`] for scoring. A
/// row of creative `c` adds to the Hessian blocks `(s, s)`, `(s, δ_c)`
/// and `(δ_c, δ_c)` the same `x̃ x̃ᵀ` term, so an update accumulates one
/// `(dim + 1)²` matrix per creative, as separate models would, and only the
/// solve is of the joint size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PooledRepr", into = "PooledRepr")]
pub struct PooledWeights {
    /// Creatives.
    creatives: usize,
    /// `dim + 1`.
    n: usize,
    /// `[s, δ_0, …, δ_{C−1}]`, each `n` long.
    mean: Vec<f64>,
    /// Row-major `N × N`, `N = (C + 1) n`.
    precision: Vec<f64>,
    /// Lower Cholesky factor of `precision`.
    chol: Vec<f64>,
    /// The prior in force: its mean and diagonal precision, `N` long
    /// each (empty in states recorded before it was kept, which cannot
    /// [adapt](PooledWeights::adapt_deviations) it).
    prior_mean: Vec<f64>,
    prior_precision: Vec<f64>,
    /// Each creative's marginal prior variance per weight (the
    /// [`Prior`]'s), `n` long: the bounds of an adapted deviation
    /// variance.
    base_variance: Vec<f64>,
}

#[derive(Serialize, Deserialize)]
struct PooledRepr {
    creatives: usize,
    mean: Vec<f64>,
    precision: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    prior_mean: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    prior_precision: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    base_variance: Vec<f64>,
}

impl From<PooledWeights> for PooledRepr {
    fn from(w: PooledWeights) -> Self {
        Self {
            creatives: w.creatives,
            mean: w.mean,
            precision: w.precision,
            prior_mean: w.prior_mean,
            prior_precision: w.prior_precision,
            base_variance: w.base_variance,
        }
    }
}

impl TryFrom<PooledRepr> for PooledWeights {
    type Error = ModelError;
    fn try_from(r: PooledRepr) -> Result<Self, ModelError> {
        let big = r.mean.len();
        if r.creatives == 0
            || !big.is_multiple_of(r.creatives + 1)
            || big / (r.creatives + 1) < 2
            || r.precision.len() != big * big
        {
            return Err(ModelError::BadParameter(
                "pooled weights are not (creatives + 1)(dim + 1) long",
            ));
        }
        let n = big / (r.creatives + 1);
        let kept = !r.prior_mean.is_empty()
            || !r.prior_precision.is_empty()
            || !r.base_variance.is_empty();
        if kept
            && (r.prior_mean.len() != big
                || r.prior_precision.len() != big
                || r.base_variance.len() != n
                || r.prior_precision
                    .iter()
                    .any(|p| !(*p > 0.0 && p.is_finite()))
                || r.base_variance.iter().any(|v| !(*v > 0.0 && v.is_finite())))
        {
            return Err(ModelError::BadParameter(
                "a pooled model's prior is not (creatives + 1)(dim + 1) long and positive",
            ));
        }
        let mut chol = vec![0.0; big * big];
        cholesky(&r.precision, big, &mut chol)?;
        Ok(Self {
            creatives: r.creatives,
            n,
            mean: r.mean,
            precision: r.precision,
            chol,
            prior_mean: r.prior_mean,
            prior_precision: r.prior_precision,
            base_variance: r.base_variance,
        })
    }
}

impl PooledWeights {
    /// The prior for `creatives` creatives over `features` features, the
    /// share `own` (strictly between 0 and 1) of each prior variance the
    /// creatives' own.
    pub fn new(
        features: usize,
        creatives: usize,
        prior: &Prior,
        own: f64,
    ) -> Result<Self, ModelError> {
        prior.check()?;
        if features == 0 || creatives == 0 {
            return Err(ModelError::BadParameter(
                "a pooled model needs features and creatives",
            ));
        }
        if !(own > 0.0 && own < 1.0) {
            return Err(ModelError::BadParameter(
                "the creatives' own share of the prior variance must be in (0, 1)",
            ));
        }
        let n = features + 1;
        let big = (creatives + 1) * n;
        let mut mean = vec![0.0; big];
        mean[0] = prior.intercept_mean;
        let mut precision = vec![0.0; big * big];
        for b in 0..=creatives {
            let share = if b == 0 { 1.0 - own } else { own };
            for i in 0..n {
                let v = if i == 0 {
                    prior.intercept_variance
                } else {
                    prior.weight_variance
                };
                let k = b * n + i;
                precision[k * big + k] = 1.0 / (share * v);
            }
        }
        let mut chol = vec![0.0; big * big];
        cholesky(&precision, big, &mut chol)?;
        let base_variance = (0..n)
            .map(|i| {
                if i == 0 {
                    prior.intercept_variance
                } else {
                    prior.weight_variance
                }
            })
            .collect();
        Ok(Self {
            creatives,
            n,
            prior_mean: mean.clone(),
            prior_precision: (0..big).map(|k| precision[k * big + k]).collect(),
            base_variance,
            mean,
            precision,
            chol,
        })
    }

    /// Most fixed-point iterations of [`PooledWeights::adapt_deviations`].
    pub const MAX_ADAPT_ITERATIONS: u32 = 100;

    /// The smallest adapted deviation variance, as a share of the
    /// [`Prior`]'s variance of the weight.
    pub const MIN_DEVIATION_SHARE: f64 = 1e-6;

    /// The prior variance of creative `c`'s deviation from the shared
    /// weights, weight by weight (intercept first), `None` when `c` is
    /// not a creative of the model or the state does not keep its prior.
    pub fn deviation_variance(&self, c: usize) -> Option<Vec<f64>> {
        if c >= self.creatives || self.prior_precision.is_empty() {
            return None;
        }
        let n = self.n;
        Some(
            self.prior_precision[(c + 1) * n..(c + 2) * n]
                .iter()
                .map(|p| 1.0 / p)
                .collect(),
        )
    }

    /// Empirical Bayes for the creatives' deviations: sets the prior
    /// variance `τ²` of the deviations to the value that maximises the
    /// marginal likelihood of everything learned so far, and the posterior
    /// to the one under that prior. With `per_weight` false, one `τ²_j`
    /// per weight `j` shared by every creative's `δ_cj`; with it true, one
    /// per creative and weight. Each `τ²` stays between
    /// [`MIN_DEVIATION_SHARE`](Self::MIN_DEVIATION_SHARE) and 1 times the
    /// [`Prior`]'s variance of the weight; the shared part's prior is
    /// kept.
    ///
    /// The data enter through the likelihood's Gaussian approximation
    /// that the updates made (the posterior precision minus the prior's,
    /// and the matching information vector), so no past outcome is
    /// needed: swapping the prior's precision `A` for `A'` gives the
    /// precision `P − A + A'` and the mean solving
    /// `(P − A + A') m' = P m − A m₀ + A' m₀`. The variances are found by
    /// expectation-maximisation, `τ²_j ← mean over c of (m'_cj² + Σ'_cj,cj)`
    /// (the posterior's second moment), iterated to a fixed point (at most
    /// [`MAX_ADAPT_ITERATIONS`](Self::MAX_ADAPT_ITERATIONS)). Deterministic;
    /// returns whether the prior could be adapted (not in a state that does
    /// not keep its prior). On error the model is unchanged.
    pub fn adapt_deviations(&mut self, per_weight: bool) -> Result<bool, ModelError> {
        if self.prior_precision.is_empty() {
            return Ok(false);
        }
        let (n, big, k) = (self.n, self.big(), self.creatives);
        // The data's information vector: P m − A m₀.
        let mut info: Vec<f64> = self
            .precision
            .chunks_exact(big)
            .map(|row| row.iter().zip(&self.mean).map(|(p, m)| p * m).sum())
            .collect();
        for (i, v) in info.iter_mut().enumerate() {
            *v -= self.prior_precision[i] * self.prior_mean[i];
        }
        let mut alpha = self.prior_precision.clone();
        let mut p = self.precision.clone();
        let mut l = vec![0.0; big * big];
        let mut m = vec![0.0; big];
        let mut var = vec![0.0; big];
        let solve = |alpha: &[f64], p: &mut Vec<f64>, l: &mut Vec<f64>, m: &mut Vec<f64>| {
            p.copy_from_slice(&self.precision);
            for i in 0..big {
                p[i * big + i] += alpha[i] - self.prior_precision[i];
            }
            cholesky(p, big, l)?;
            for i in 0..big {
                m[i] = info[i] + alpha[i] * self.prior_mean[i];
            }
            chol_solve(l, big, m);
            Ok::<(), ModelError>(())
        };
        for _ in 0..Self::MAX_ADAPT_ITERATIONS {
            solve(&alpha, &mut p, &mut l, &mut m)?;
            inverse_diagonal(&l, big, &mut var);
            let mut change = 0.0f64;
            for j in 0..n {
                let (lo, hi) = (
                    Self::MIN_DEVIATION_SHARE * self.base_variance[j],
                    self.base_variance[j],
                );
                let second = |c: usize| {
                    let i = (c + 1) * n + j;
                    m[i] * m[i] + var[i]
                };
                let shared = (0..k).map(second).sum::<f64>() / k as f64;
                for c in 0..k {
                    let i = (c + 1) * n + j;
                    let t = if per_weight { second(c) } else { shared };
                    let a = 1.0 / t.clamp(lo, hi);
                    change = change.max((a / alpha[i]).ln().abs());
                    alpha[i] = a;
                }
            }
            if change < 1e-4 {
                break;
            }
        }
        solve(&alpha, &mut p, &mut l, &mut m)?;
        if m.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NotFinite);
        }
        self.mean = m;
        self.precision = p;
        self.chol = l;
        self.prior_precision = alpha;
        Ok(true)
    }

    /// The number of features (the intercept excluded).
    pub fn features(&self) -> usize {
        self.n - 1
    }

    /// The number of creatives.
    pub fn creatives(&self) -> usize {
        self.creatives
    }

    /// The joint posterior mean `[s, δ_0, …]`.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }

    /// The joint posterior precision, row-major.
    pub fn precision(&self) -> &[f64] {
        &self.precision
    }

    fn big(&self) -> usize {
        (self.creatives + 1) * self.n
    }

    /// Creative `c`'s weights `s + δ_c` at the joint `w`.
    fn weights_of(&self, w: &[f64], c: usize) -> Vec<f64> {
        let n = self.n;
        w[..n]
            .iter()
            .zip(&w[(c + 1) * n..(c + 2) * n])
            .map(|(a, b)| a + b)
            .collect()
    }

    /// Creative `c`'s marginal posterior: mean `s̄ + δ̄_c`, covariance
    /// `Σ_ss + Σ_sc + Σ_cs + Σ_cc` of the joint covariance `Σ`.
    ///
    /// # Panics
    /// If `c` is not a creative of the model.
    pub fn marginal(&self, c: usize) -> Result<GaussianWeights, ModelError> {
        assert!(c < self.creatives, "creative out of range");
        let (n, big) = (self.n, self.big());
        // Column i of Σ A_cᵀ: Σ (e_{s,i} + e_{c,i}); rows s and c summed.
        let mut cov = vec![0.0; n * n];
        let mut col = vec![0.0; big];
        for i in 0..n {
            col.fill(0.0);
            col[i] = 1.0;
            col[(c + 1) * n + i] = 1.0;
            chol_solve(&self.chol, big, &mut col);
            for j in 0..n {
                cov[j * n + i] = col[j] + col[(c + 1) * n + j];
            }
        }
        // Symmetrise (rounding), then invert for the precision.
        for i in 0..n {
            for j in 0..i {
                let a = 0.5 * (cov[i * n + j] + cov[j * n + i]);
                cov[i * n + j] = a;
                cov[j * n + i] = a;
            }
        }
        let mut l = vec![0.0; n * n];
        cholesky(&cov, n, &mut l)?;
        let mut precision = vec![0.0; n * n];
        let mut e = vec![0.0; n];
        for i in 0..n {
            e.fill(0.0);
            e[i] = 1.0;
            chol_solve(&l, n, &mut e);
            for j in 0..n {
                precision[j * n + i] = e[j];
            }
        }
        for i in 0..n {
            for j in 0..i {
                let a = 0.5 * (precision[i * n + j] + precision[j * n + i]);
                precision[i * n + j] = a;
                precision[j * n + i] = a;
            }
        }
        GaussianWeights::try_from(WeightsRepr {
            mean: self.weights_of(&self.mean, c),
            precision,
        })
    }

    /// Every creative's marginal posterior, in creative order.
    pub fn marginals(&self) -> Result<Vec<GaussianWeights>, ModelError> {
        (0..self.creatives).map(|c| self.marginal(c)).collect()
    }

    /// Updates the posterior with `rows` (creative `row.creative`, each
    /// `trials` observations at `x`, `successes` of them 1), like
    /// [`GaussianWeights::update`]. Rows with 0 trials are skipped. On
    /// error the posterior is unchanged.
    pub fn update(
        &mut self,
        link: Link,
        rows: &[OutcomeRow<'_>],
    ) -> Result<UpdateReport, ModelError> {
        let features = self.features();
        if let Some(r) = rows.iter().find(|r| r.x.len() != features) {
            return Err(ModelError::Dimension {
                expected: features,
                got: r.x.len(),
            });
        }
        if rows
            .iter()
            .any(|r| usize::from(r.creative) >= self.creatives)
        {
            return Err(ModelError::BadParameter("a row's creative is out of range"));
        }
        if let Link::Linear { noise_variance } = link {
            if !(noise_variance > 0.0 && noise_variance.is_finite()) {
                return Err(ModelError::BadParameter("noise variance must be positive"));
            }
        }
        let rows_used = rows.iter().filter(|r| r.trials > 0).count();
        if rows_used == 0 {
            return Ok(UpdateReport {
                rows: 0,
                iterations: 0,
                log_evidence: 0.0,
            });
        }
        let (mean, precision, chol, iterations) = self.newton(link, rows)?;
        if mean.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::NotFinite);
        }
        let big = self.big();
        let logdet = |l: &[f64]| (0..big).map(|i| l[i * big + i].ln()).sum::<f64>();
        let log_evidence =
            self.log_posterior(link, &mean, rows) + logdet(&self.chol) - logdet(&chol);
        self.mean = mean;
        self.precision = precision;
        self.chol = chol;
        Ok(UpdateReport {
            rows: rows_used,
            iterations,
            log_evidence,
        })
    }

    /// The log likelihood of `rows` at the joint `w` minus the prior's
    /// quadratic term (the log posterior up to a constant).
    fn log_posterior(&self, link: Link, w: &[f64], rows: &[OutcomeRow<'_>]) -> f64 {
        let big = self.big();
        let d: Vec<f64> = w.iter().zip(&self.mean).map(|(a, m)| a - m).collect();
        let mut quad = 0.0;
        for i in 0..big {
            let pi = &self.precision[i * big..(i + 1) * big];
            quad += d[i] * pi.iter().zip(&d).map(|(a, b)| a * b).sum::<f64>();
        }
        let wc: Vec<Vec<f64>> = (0..self.creatives).map(|c| self.weights_of(w, c)).collect();
        let mut ll = 0.0;
        for r in rows.iter().filter(|r| r.trials > 0) {
            let z = linear(&wc[usize::from(r.creative)], r.x);
            let s = f64::from(r.successes);
            let f = f64::from(r.trials) - s;
            ll -= match link {
                Link::Logistic => s * softplus(-z) + f * softplus(z),
                Link::Linear { noise_variance } => {
                    (s * (1.0 - z).powi(2) + f * z * z) / (2.0 * noise_variance)
                }
            };
        }
        ll - 0.5 * quad
    }

    /// Newton's method to the mode of the log posterior (one exact step
    /// for the linear link); returns the mode, the negative Hessian there,
    /// its factor and the iterations.
    #[allow(clippy::type_complexity)]
    fn newton(
        &self,
        link: Link,
        rows: &[OutcomeRow<'_>],
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>, u32), ModelError> {
        let (n, big, k) = (self.n, self.big(), self.creatives);
        let mut w = self.mean.clone();
        let mut grad = vec![0.0; big];
        let mut hess = vec![0.0; big * big];
        let mut l = vec![0.0; big * big];
        let mut trial = vec![0.0; big];
        let mut gram = vec![0.0; k * n * n];
        let mut g = vec![0.0; k * n];
        let mut current = self.log_posterior(link, &w, rows);
        let mut iterations = 0;
        loop {
            let wc: Vec<Vec<f64>> = (0..k).map(|c| self.weights_of(&w, c)).collect();
            gram.fill(0.0);
            g.fill(0.0);
            for r in rows.iter().filter(|r| r.trials > 0) {
                let c = usize::from(r.creative);
                let z = linear(&wc[c], r.x);
                let t = f64::from(r.trials);
                let s = f64::from(r.successes);
                let (e, h) = match link {
                    Link::Logistic => {
                        let p = sigmoid(z);
                        (s - t * p, t * p * (1.0 - p))
                    }
                    Link::Linear { noise_variance } => {
                        ((s - t * z) / noise_variance, t / noise_variance)
                    }
                };
                let gc = &mut g[c * n..(c + 1) * n];
                gc[0] += e;
                for (gi, &x) in gc[1..].iter_mut().zip(r.x) {
                    *gi += e * f64::from(x);
                }
                add_outer_lower(&mut gram[c * n * n..(c + 1) * n * n], n, r.x, h);
            }
            // Gradient and negative Hessian of the log posterior at w:
            // the prior's, plus each creative's data terms in the blocks
            // (s, s), (s, δ_c), (δ_c, s) and (δ_c, δ_c).
            for (i, gi) in grad.iter_mut().enumerate() {
                let pi = &self.precision[i * big..(i + 1) * big];
                *gi = -pi
                    .iter()
                    .zip(w.iter().zip(&self.mean))
                    .map(|(p, (a, m))| p * (a - m))
                    .sum::<f64>();
            }
            hess.copy_from_slice(&self.precision);
            for c in 0..k {
                let gm = &mut gram[c * n * n..(c + 1) * n * n];
                mirror_lower(gm, n);
                let o = (c + 1) * n;
                for i in 0..n {
                    grad[i] += g[c * n + i];
                    grad[o + i] += g[c * n + i];
                    for j in 0..n {
                        let v = gm[i * n + j];
                        hess[i * big + j] += v;
                        hess[i * big + o + j] += v;
                        hess[(o + i) * big + j] += v;
                        hess[(o + i) * big + o + j] += v;
                    }
                }
            }
            cholesky(&hess, big, &mut l)?;
            if iterations >= GaussianWeights::MAX_NEWTON_ITERATIONS {
                break;
            }
            let mut step = grad.clone();
            chol_solve(&l, big, &mut step);
            let size = step.iter().fold(0.0f64, |m, s| m.max(s.abs()));
            if size < 1e-10 {
                break;
            }
            iterations += 1;
            let mut scale = 1.0;
            let mut accepted = false;
            for _ in 0..40 {
                for ((t, a), s) in trial.iter_mut().zip(&w).zip(&step) {
                    *t = a + scale * s;
                }
                let value = self.log_posterior(link, &trial, rows);
                if value >= current - 1e-12 * current.abs() {
                    w.copy_from_slice(&trial);
                    current = value;
                    accepted = true;
                    break;
                }
                scale *= 0.5;
            }
            if !accepted {
                break;
            }
        }
        Ok((w, hess, l, iterations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Outcomes;
    use rand::SeedableRng;

    #[test]
    fn beta_counts() {
        let mut a = BetaArm::default();
        a.update(10, 3);
        a.update(5, 9); // clamped to 5
        assert_eq!((a.alpha, a.beta), (9.0, 8.0));
        assert!((a.mean() - 9.0 / 17.0).abs() < 1e-15);
    }

    #[test]
    fn prior_round_trips_and_samples_have_its_moments() {
        let w = GaussianWeights::new(2, &Prior::default()).unwrap();
        let json = serde_json::to_string(&w).unwrap();
        let back: GaussianWeights = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut out = [0.0; 3];
        let (mut s0, mut ss0, mut ss1) = (0.0, 0.0, 0.0);
        let k = 20_000;
        for _ in 0..k {
            w.sample_into(&mut rng, &mut out);
            s0 += out[0];
            ss0 += (out[0] + 3.0).powi(2);
            ss1 += out[1].powi(2);
        }
        let k = f64::from(k);
        assert!((s0 / k + 3.0).abs() < 0.05, "{}", s0 / k);
        assert!((ss0 / k - 4.0).abs() < 0.15, "{}", ss0 / k);
        assert!((ss1 / k - 1.0).abs() < 0.05, "{}", ss1 / k);
    }

    #[test]
    fn score_sd_matches_the_covariance() {
        let mut w = GaussianWeights::new(3, &Prior::default()).unwrap();
        let mut o = Outcomes::new(3).unwrap();
        o.push(0, &[1.0, -0.5, 2.0], 40, 5).unwrap();
        o.push(0, &[0.2, 1.5, -1.0], 30, 1).unwrap();
        o.push(0, &[-1.0, 0.3, 0.7], 50, 9).unwrap();
        let rows: Vec<_> = o.rows().collect();
        w.update(Link::Logistic, &rows).unwrap();
        let cov = w.covariance();
        let x = [0.4f32, -1.2, 0.9];
        let xt = [1.0, 0.4f32 as f64, -1.2f32 as f64, 0.9f32 as f64];
        let var: f64 = (0..4)
            .flat_map(|i| (0..4).map(move |j| (i, j)))
            .map(|(i, j)| xt[i] * cov[i * 4 + j] * xt[j])
            .sum();
        assert!(
            (w.score_sd(&x) - var.sqrt()).abs() < 1e-9,
            "{} vs {}",
            w.score_sd(&x),
            var.sqrt()
        );
    }

    /// Creative `c`'s features in the reference model of
    /// `pooled_matches_an_augmented_reference`: `[shared x, c's block]`,
    /// each block scaled by its prior standard deviation.
    fn augmented(x: &[f32], c: usize, creatives: usize, own: f64, p: &Prior) -> Vec<f32> {
        let d = x.len();
        let mut out = vec![0f32; d + creatives * (d + 1)];
        let (sw, ow) = (
            ((1.0 - own) * p.weight_variance).sqrt(),
            (own * p.weight_variance).sqrt(),
        );
        for j in 0..d {
            out[j] = (f64::from(x[j]) * sw) as f32;
        }
        let o = d + c * (d + 1);
        out[o] = (own * p.intercept_variance).sqrt() as f32;
        for j in 0..d {
            out[o + 1 + j] = (f64::from(x[j]) * ow) as f32;
        }
        out
    }

    #[test]
    fn pooled_matches_an_augmented_reference() {
        // The pooled model is one Gaussian over [s, δ_0, δ_1]; written with
        // each weight scaled to unit prior variance, it is a plain
        // `GaussianWeights` over augmented features (shared block plus the
        // row's creative's block). Both must give the same scores, score
        // standard deviations and evidence, for both links.
        let prior = Prior {
            intercept_mean: -2.0,
            intercept_variance: 3.0,
            weight_variance: 0.8,
        };
        let own = 0.3;
        let (d, k) = (3usize, 2usize);
        let reference_prior = Prior {
            intercept_variance: (1.0 - own) * prior.intercept_variance,
            weight_variance: 1.0,
            ..prior
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut o = Outcomes::new(d).unwrap();
        let mut aug = Outcomes::new(d + k * (d + 1)).unwrap();
        for i in 0..60 {
            let x: Vec<f32> = (0..d)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z as f32
                })
                .collect();
            let c = (i % k) as u16;
            let trials = 1 + (rng.next_u32() % 20);
            let successes = rng.next_u32() % (trials / 3 + 1);
            o.push(c, &x, trials, successes).unwrap();
            aug.push(
                0,
                &augmented(&x, usize::from(c), k, own, &prior),
                trials,
                successes,
            )
            .unwrap();
        }
        let rows: Vec<_> = o.rows().collect();
        let aug_rows: Vec<_> = aug.rows().collect();
        for link in [
            Link::Logistic,
            Link::Linear {
                noise_variance: 0.5,
            },
        ] {
            let mut pooled = PooledWeights::new(d, k, &prior, own).unwrap();
            let mut reference = GaussianWeights::new(d + k * (d + 1), &reference_prior).unwrap();
            // Two updates: the second starts from the first's posterior.
            for half in [&rows[..30], &rows[30..]] {
                let lo = if half.as_ptr() == rows.as_ptr() {
                    0
                } else {
                    30
                };
                let a = pooled.update(link, half).unwrap();
                let b = reference
                    .update(link, &aug_rows[lo..lo + half.len()])
                    .unwrap();
                assert!(
                    (a.log_evidence - b.log_evidence).abs() < 1e-6,
                    "{link:?}: evidence {} vs {}",
                    a.log_evidence,
                    b.log_evidence
                );
            }
            let marginals = pooled.marginals().unwrap();
            for x in [[0.3f32, -1.0, 2.0], [-0.7, 0.1, 0.4]] {
                for (c, m) in marginals.iter().enumerate() {
                    let xa = augmented(&x, c, k, own, &prior);
                    let (ma, mb) = (m.mean_score(&x), reference.mean_score(&xa));
                    let (sa, sb) = (m.score_sd(&x), reference.score_sd(&xa));
                    assert!((ma - mb).abs() < 1e-6, "{link:?}: mean {ma} vs {mb}");
                    assert!((sa - sb).abs() < 1e-6, "{link:?}: sd {sa} vs {sb}");
                }
            }
        }
    }

    /// Outcomes of `k` creatives over `d` normal features: a shared
    /// logit plus, for creative `c`, `own[c]` times feature 0 (the
    /// creatives differ on that column only, or not at all).
    fn pooled_outcomes(d: usize, k: usize, rows: usize, own: &[f64], seed: u64) -> Outcomes {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut o = Outcomes::new(d).unwrap();
        for i in 0..rows {
            let x: Vec<f32> = (0..d)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z as f32
                })
                .collect();
            let c = i % k;
            let z = -1.0 + 0.8 * f64::from(x[1]) + own[c] * f64::from(x[0]);
            let u = f64::from(rng.next_u32()) / f64::from(u32::MAX);
            o.push(c as u16, &x, 1, u32::from(u < sigmoid(z))).unwrap();
        }
        o
    }

    #[test]
    fn adapted_deviations_follow_the_data() {
        let (d, k) = (3usize, 3usize);
        let prior = Prior::default();
        // Creatives that do not differ: every deviation variance shrinks
        // far below the starting share.
        let same = pooled_outcomes(d, k, 6_000, &[0.0, 0.0, 0.0], 3);
        let rows: Vec<_> = same.rows().collect();
        let mut p = PooledWeights::new(d, k, &prior, 0.3).unwrap();
        p.update(Link::Logistic, &rows).unwrap();
        assert!(p.adapt_deviations(false).unwrap());
        let v = p.deviation_variance(0).unwrap();
        assert!(v.iter().all(|&t| t < 0.05), "{v:?}");
        // Creatives that differ on column 0 only (weight ±1.5): its
        // variance grows, the others shrink; the creatives' slopes on
        // column 0 are still told apart.
        let apart = pooled_outcomes(d, k, 6_000, &[1.5, -1.5, 0.0], 4);
        let rows: Vec<_> = apart.rows().collect();
        for per_weight in [false, true] {
            let mut p = PooledWeights::new(d, k, &prior, 0.3).unwrap();
            p.update(Link::Logistic, &rows).unwrap();
            p.adapt_deviations(per_weight).unwrap();
            let v = p.deviation_variance(0).unwrap();
            assert!(v[1] > 0.5, "{per_weight}: {v:?}");
            assert!(v[2] < 0.05 && v[3] < 0.05, "{per_weight}: {v:?}");
            let m = p.marginals().unwrap();
            assert!(
                m[0].mean()[1] > 1.0 && m[1].mean()[1] < -1.0,
                "{per_weight}"
            );
            assert!(m[2].mean()[1].abs() < 0.5, "{per_weight}");
            if per_weight {
                // Creative 2 does not differ on column 0: its own
                // variance there shrinks too.
                let v2 = p.deviation_variance(2).unwrap();
                assert!(v2[1] < 0.2, "{v2:?}");
            }
        }
    }

    #[test]
    fn an_adapted_prior_gives_the_posterior_learned_under_it() {
        // Linear link: the update is exact, so swapping the prior after
        // two updates must give what learning both from the adapted prior
        // gives.
        let (d, k) = (2usize, 2usize);
        let prior = Prior {
            intercept_mean: 0.2,
            intercept_variance: 2.0,
            weight_variance: 0.7,
        };
        let link = Link::Linear {
            noise_variance: 0.3,
        };
        let o = pooled_outcomes(d, k, 400, &[0.6, -0.6], 9);
        let rows: Vec<_> = o.rows().collect();
        let mut adapted = PooledWeights::new(d, k, &prior, 0.4).unwrap();
        adapted.update(link, &rows[..150]).unwrap();
        adapted.update(link, &rows[150..]).unwrap();
        assert!(adapted.adapt_deviations(true).unwrap());
        let alpha = adapted.prior_precision.clone();
        assert!(
            alpha
                != PooledWeights::new(d, k, &prior, 0.4)
                    .unwrap()
                    .prior_precision
        );
        let mut fresh = PooledWeights::new(d, k, &prior, 0.4).unwrap();
        let big = fresh.big();
        for (i, a) in alpha.iter().enumerate() {
            fresh.precision[i * big + i] = *a;
        }
        fresh.prior_precision = alpha;
        cholesky(&fresh.precision, big, &mut fresh.chol).unwrap();
        fresh.update(link, &rows).unwrap();
        for (a, b) in adapted.mean().iter().zip(fresh.mean()) {
            assert!((a - b).abs() < 1e-8, "{a} vs {b}");
        }
        for (a, b) in adapted.precision().iter().zip(fresh.precision()) {
            assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn the_prior_alone_is_not_adapted_and_old_states_keep_theirs() {
        let prior = Prior::default();
        let mut p = PooledWeights::new(2, 3, &prior, 0.2).unwrap();
        let before = p.clone();
        assert!(p.adapt_deviations(false).unwrap());
        for (a, b) in p.prior_precision.iter().zip(&before.prior_precision) {
            assert!((a / b).ln().abs() < 1e-6, "{a} vs {b}");
        }
        // The prior is kept in the state; a state recorded without it
        // parses and keeps its fixed prior.
        let json = serde_json::to_string(&before).unwrap();
        assert!(json.contains("prior_precision"));
        let back: PooledWeights = serde_json::from_str(&json).unwrap();
        assert_eq!(back, before);
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for f in ["prior_mean", "prior_precision", "base_variance"] {
            v.as_object_mut().unwrap().remove(f);
        }
        let mut old: PooledWeights = serde_json::from_value(v).unwrap();
        let kept = old.clone();
        assert!(!old.adapt_deviations(false).unwrap());
        assert_eq!(old, kept);
        assert!(old.deviation_variance(0).is_none());
    }

    #[test]
    fn pooled_prior_is_each_creatives_prior_and_round_trips() {
        let prior = Prior::default();
        let p = PooledWeights::new(2, 3, &prior, 0.25).unwrap();
        let plain = GaussianWeights::new(2, &prior).unwrap();
        for m in p.marginals().unwrap() {
            for (a, b) in m.mean().iter().zip(plain.mean()) {
                assert!((a - b).abs() < 1e-12);
            }
            for (a, b) in m.precision().iter().zip(plain.precision()) {
                assert!((a - b).abs() < 1e-9, "{a} vs {b}");
            }
        }
        let json = serde_json::to_string(&p).unwrap();
        let back: PooledWeights = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert!(PooledWeights::new(2, 3, &prior, 1.0).is_err());
        assert!(PooledWeights::new(2, 0, &prior, 0.5).is_err());
        let mut q = p.clone();
        let mut o = Outcomes::new(2).unwrap();
        o.push(3, &[1.0, 2.0], 1, 1).unwrap();
        let rows: Vec<_> = o.rows().collect();
        assert!(q.update(Link::Logistic, &rows).is_err());
        assert_eq!(q, p);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let p = Prior {
            weight_variance: 0.0,
            ..Prior::default()
        };
        assert!(GaussianWeights::new(2, &p).is_err());
        let mut w = GaussianWeights::new(2, &Prior::default()).unwrap();
        let mut o = Outcomes::new(3).unwrap();
        o.push(0, &[1.0, 2.0, 3.0], 1, 1).unwrap();
        let rows: Vec<_> = o.rows().collect();
        assert_eq!(
            w.update(Link::Logistic, &rows),
            Err(ModelError::Dimension {
                expected: 2,
                got: 3
            })
        );
        assert!(serde_json::from_str::<GaussianWeights>(
            r#"{"mean":[0,0],"precision":[1,0,0,-1]}"#
        )
        .is_err());
    }
}
