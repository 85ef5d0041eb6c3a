//! Dense scoring and top-k selection for the posterior-sampling policies.
//!
//! One posterior draw gives a weight row per modelled creative (`f32`,
//! intercept first). Each candidate's score is the best creative's linear
//! score `w₀ + w·x` (a monotone link keeps the ranking); the batch is the
//! `k` best scores, found with `select_nth_unstable_by` on a copy. Buffers
//! are allocated once per plan, never per user.
//!
//! [`Moments`] holds, for the optimistic scoring, each candidate's
//! posterior mean and standard deviation of every model's linear score;
//! [`Scorer::perturb`] then scores `mean + sd·(bonus + noise·ε)` with a
//! fresh standard normal `ε` per candidate and model, without another dot
//! product.

use rand::RngCore;
use rand_distr::{Distribution, StandardNormal};

use crate::data::Candidates;
use crate::model::GaussianWeights;

/// `a · b`, with eight independent accumulators so the loop vectorises
/// (and sums in a fixed order, so results are deterministic).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The posterior mean and standard deviation of the linear score
/// `w₀ + w·x` of every candidate under every model, `n × m` row-major by
/// candidate. The standard deviation is `‖L⁻¹ x̃‖` with `L` the precision's
/// Cholesky factor (a triangular product per candidate and model).
pub(crate) struct Moments {
    /// Posterior mean score.
    pub mean: Vec<f32>,
    /// Posterior standard deviation of the score.
    pub sd: Vec<f32>,
    /// Models per candidate.
    pub models: usize,
}

/// Candidates per block of [`Moments::new`]: the block's features,
/// transposed, stay in the L1 cache while every model's triangular product
/// runs over them.
const BLOCK: usize = 64;

impl Moments {
    /// The moments of every candidate's scores.
    ///
    /// Computed a block of candidates at a time with the features
    /// transposed (one column of the block contiguous), so that every inner
    /// loop runs along candidates and vectorises: the triangular product
    /// `L⁻¹ x̃` costs `(d + 1)(d + 2) / 2` multiply-adds per candidate and
    /// model either way, but done candidate by candidate its rows are too
    /// short (1 to `d + 1`) for vector units. Sums run in a fixed order, so
    /// results are deterministic.
    pub fn new(models: &[GaussianWeights], candidates: &Candidates) -> Self {
        let m = models.len();
        let dim = candidates.dim();
        let n1 = dim + 1;
        let means: Vec<Vec<f32>> = models
            .iter()
            .map(|g| g.mean().iter().map(|&v| v as f32).collect())
            .collect();
        let invs: Vec<Vec<f32>> = models
            .iter()
            .map(|g| g.inverse_cholesky().iter().map(|&v| v as f32).collect())
            .collect();
        let n = candidates.len();
        let mut mean = vec![0f32; n * m];
        let mut sd = vec![0f32; n * m];
        // cols[j * BLOCK + u]: feature j of the block's candidate u.
        let mut cols = vec![0f32; dim * BLOCK];
        let mut t = [0f32; BLOCK];
        let mut v = [0f32; BLOCK];
        let mut mu_acc = [0f32; BLOCK];
        for (b, block) in candidates.features().chunks(dim * BLOCK).enumerate() {
            let len = block.len() / dim.max(1);
            for (u, x) in block.chunks_exact(dim).enumerate() {
                for (j, &xj) in x.iter().enumerate() {
                    cols[j * BLOCK + u] = xj;
                }
            }
            let first = b * BLOCK;
            for (k, (mu, inv)) in means.iter().zip(&invs).enumerate() {
                // The mean: mu₀ + Σ_j mu_{j+1} x_j.
                mu_acc[..len].fill(mu[0]);
                for j in 0..dim {
                    let w = mu[j + 1];
                    let col = &cols[j * BLOCK..j * BLOCK + len];
                    for (a, &x) in mu_acc[..len].iter_mut().zip(col) {
                        *a += w * x;
                    }
                }
                // The variance: Σ_i (row_i · x̃)², row_i of L⁻¹ (lower
                // triangular, x̃ = (1, x)).
                v[..len].fill(0.0);
                for i in 0..n1 {
                    let row = &inv[i * n1..i * n1 + i + 1];
                    t[..len].fill(row[0]);
                    for (j, &w) in row[1..].iter().enumerate() {
                        let col = &cols[j * BLOCK..j * BLOCK + len];
                        for (a, &x) in t[..len].iter_mut().zip(col) {
                            *a += w * x;
                        }
                    }
                    for (a, &x) in v[..len].iter_mut().zip(&t[..len]) {
                        *a += x * x;
                    }
                }
                for u in 0..len {
                    mean[(first + u) * m + k] = mu_acc[u];
                    sd[(first + u) * m + k] = v[u].sqrt();
                }
            }
        }
        Self {
            mean,
            sd,
            models: m,
        }
    }
}

impl Moments {
    /// Each candidate's expected gain of knowing its models' scores
    /// exactly over choosing by the means: `Σ_c E[(z_c − z_b)⁺]` over the
    /// models `c` other than the best mean's `b`, the scores independent
    /// normals (`E[(d)⁺] = θ φ(u) − Δ Q(u)`, `u = Δ/θ`, with `Δ ≥ 0` the
    /// means' gap, `θ² = s_c² + s_b²` and `Q` the normal upper tail).
    /// In `f32`, `φ(u) − u Q(u)` interpolated in a table (see
    /// [`gain_table`]): no exponential per pair.
    pub fn ambiguity(&self) -> Vec<f32> {
        let m = self.models;
        let table = gain_table();
        self.mean
            .chunks_exact(m)
            .zip(self.sd.chunks_exact(m))
            .map(|(mean, sd)| {
                let mut b = 0;
                for c in 1..m {
                    if mean[c] > mean[b] {
                        b = c;
                    }
                }
                let (mb, sb2) = (mean[b], sd[b] * sd[b]);
                let mut sum = 0f32;
                for c in 0..m {
                    let theta = (sb2 + sd[c] * sd[c]).sqrt();
                    if c != b && theta > 0.0 {
                        sum += theta * gain(table, (mb - mean[c]) / theta);
                    }
                }
                sum.max(0.0)
            })
            .collect()
    }
}

/// Steps per unit of `u` in [`gain_table`].
const GAIN_STEPS: f32 = 256.0;

/// `g(u) = φ(u) − u Q(u)` (the expected positive part of `N(−u, 1)`) at
/// `u = i / 256` for `u` from 0 to 8, computed once (deterministic).
fn gain_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=(8.0 * GAIN_STEPS) as usize)
            .map(|i| {
                let u = i as f32 / GAIN_STEPS;
                let e = (-0.5 * u * u).exp();
                (e * FRAC_1_SQRT_2PI - u * upper_tail(u, e)).max(0.0)
            })
            .collect()
    })
}

/// `g(u)` for `u ≥ 0` by linear interpolation in `table` (0 beyond 8,
/// where it is below 1e-16).
#[inline(always)]
fn gain(table: &[f32], u: f32) -> f32 {
    let x = u.max(0.0) * GAIN_STEPS;
    let i = x as usize;
    if i + 1 >= table.len() {
        return 0.0;
    }
    let f = x - i as f32;
    table[i] + f * (table[i + 1] - table[i])
}

/// `1 / √(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// The standard normal upper tail `Q(u) = P(Z > u)` for `u ≥ 0`, given
/// `e = exp(−u²/2)` (Abramowitz and Stegun 7.1.26 for `erfc(u/√2)`;
/// absolute error below 1.5e-7, plus `f32` rounding).
fn upper_tail(u: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * u * std::f32::consts::FRAC_1_SQRT_2);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_7 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    0.5 * poly * e
}

/// Reusable buffers for scoring `n` candidates with `m` weight rows.
pub(crate) struct Scorer {
    /// `m × (dim + 1)` weights of the current draw, intercept first.
    weights: Vec<f32>,
    draw: Vec<f64>,
    /// Best score per candidate.
    pub best: Vec<f32>,
    /// Index of the best weight row per candidate.
    pub arg: Vec<u16>,
    scratch: Vec<f32>,
}

impl Scorer {
    pub fn new(models: usize, dim: usize, n: usize) -> Self {
        Self {
            weights: vec![0.0; models * (dim + 1)],
            draw: vec![0.0; dim + 1],
            best: vec![0.0; n],
            arg: vec![0; n],
            scratch: Vec::with_capacity(n),
        }
    }

    /// Draws one weight row from each model.
    pub fn draw(&mut self, models: &[GaussianWeights], rng: &mut dyn RngCore) {
        let stride = self.draw.len();
        for (m, row) in models.iter().zip(self.weights.chunks_exact_mut(stride)) {
            m.sample_into(rng, &mut self.draw);
            for (w, &d) in row.iter_mut().zip(&self.draw) {
                *w = d as f32;
            }
        }
    }

    /// Uses each model's posterior mean instead of a draw.
    pub fn use_means(&mut self, models: &[GaussianWeights]) {
        let stride = self.draw.len();
        for (m, row) in models.iter().zip(self.weights.chunks_exact_mut(stride)) {
            for (w, &d) in row.iter_mut().zip(m.mean()) {
                *w = d as f32;
            }
        }
    }

    /// Scores every candidate with the current weights.
    pub fn score(&mut self, candidates: &Candidates) {
        let dim = candidates.dim();
        let stride = dim + 1;
        let weights = &self.weights;
        for ((x, best), arg) in candidates
            .features()
            .chunks_exact(dim)
            .zip(self.best.iter_mut())
            .zip(self.arg.iter_mut())
        {
            let mut b = f32::NEG_INFINITY;
            let mut a = 0u16;
            for (c, w) in weights.chunks_exact(stride).enumerate() {
                let s = w[0] + dot(x, &w[1..]);
                if s > b {
                    b = s;
                    a = c as u16;
                }
            }
            *best = b;
            *arg = a;
        }
    }

    /// Scores every candidate `max_c mean + sd·(bonus + noise·ε)` with a
    /// fresh standard normal `ε` per candidate and model (none drawn when
    /// `noise` is 0).
    pub fn perturb(&mut self, mo: &Moments, bonus: f32, noise: f32, rng: &mut dyn RngCore) {
        let m = mo.models;
        for (((mean, sd), best), arg) in mo
            .mean
            .chunks_exact(m)
            .zip(mo.sd.chunks_exact(m))
            .zip(self.best.iter_mut())
            .zip(self.arg.iter_mut())
        {
            let mut b = f32::NEG_INFINITY;
            let mut a = 0u16;
            for (c, (&mu, &s)) in mean.iter().zip(sd).enumerate() {
                let z = if noise > 0.0 {
                    let e: f32 = StandardNormal.sample(rng);
                    bonus + noise * e
                } else {
                    bonus
                };
                let v = mu + s * z;
                if v > b {
                    b = v;
                    a = c as u16;
                }
            }
            *best = b;
            *arg = a;
        }
    }

    /// The `k`-th largest best score (`1 ≤ k ≤ n`).
    pub fn threshold(&mut self, k: usize) -> f32 {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.best);
        let (_, t, _) = self
            .scratch
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        *t
    }

    /// The rows of the `k` best scores, ascending; ties at the threshold go
    /// to the lower rows.
    pub fn top_k(&mut self, k: usize) -> Vec<usize> {
        let t = self.threshold(k);
        let above = self.best.iter().filter(|&&s| s > t).count();
        let mut ties = k - above;
        let mut rows = Vec::with_capacity(k);
        for (r, &s) in self.best.iter().enumerate() {
            if s > t {
                rows.push(r);
            } else if s == t && ties > 0 {
                rows.push(r);
                ties -= 1;
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        for len in 0..40 {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "len {len}");
        }
    }

    #[test]
    fn blocked_moments_match_each_models_own_computation() {
        use crate::data::OutcomeRow;
        use crate::model::{Link, Prior};
        let dim = 5;
        // 150 candidates: two whole blocks and part of a third.
        let n = 150;
        let features: Vec<f32> = (0..n * dim)
            .map(|i| ((i as f32) * 0.731).sin() * 2.0)
            .collect();
        let c = Candidates::from_parts(dim, (0..n as u32).collect(), features.clone()).unwrap();
        let mut models = Vec::new();
        for k in 0..3u32 {
            let mut g = GaussianWeights::new(dim, &Prior::default()).unwrap();
            let rows: Vec<OutcomeRow<'_>> = features
                .chunks_exact(dim)
                .take(60)
                .enumerate()
                .map(|(i, x)| OutcomeRow {
                    creative: 0,
                    x,
                    trials: 3,
                    successes: ((i as u32 + k) % 4).min(3),
                })
                .collect();
            g.update(Link::Logistic, &rows).unwrap();
            models.push(g);
        }
        let mo = Moments::new(&models, &c);
        for (u, x) in features.chunks_exact(dim).enumerate() {
            for (k, g) in models.iter().enumerate() {
                let (mean, sd) = (mo.mean[u * 3 + k], mo.sd[u * 3 + k]);
                let (want_mean, want_sd) = (g.mean_score(x), g.score_sd(x));
                assert!(
                    (f64::from(mean) - want_mean).abs() < 1e-3 * (1.0 + want_mean.abs()),
                    "candidate {u} model {k}: mean {mean} vs {want_mean}"
                );
                assert!(
                    (f64::from(sd) - want_sd).abs() < 1e-3 * (1.0 + want_sd),
                    "candidate {u} model {k}: sd {sd} vs {want_sd}"
                );
            }
        }
    }

    #[test]
    fn ambiguity_is_the_expected_gain_of_knowing_the_scores() {
        // Candidate 0: two creatives level, sd 1 each: E[(z1 − z0)⁺] with
        // z1 − z0 ~ N(0, 2) is √2 φ(0). Candidate 1: one creative 10 sd
        // ahead: nothing to gain. Candidate 2: gap 1, θ = 1, against a
        // Monte Carlo estimate.
        let mo = Moments {
            mean: vec![0.0, 0.0, 5.0, -5.0, 1.0, 0.0],
            sd: vec![1.0, 1.0, 0.5, 0.5, 0.6, 0.8],
            models: 2,
        };
        let a = mo.ambiguity();
        let want0 = 2f64.sqrt() / (2.0 * std::f64::consts::PI).sqrt();
        assert!(
            (f64::from(a[0]) - want0).abs() < 1e-5,
            "{} vs {want0}",
            a[0]
        );
        assert!(a[1] < 1e-6);
        use rand::SeedableRng;
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 400_000;
        let mc: f64 = (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut r);
                (e - 1.0).max(0.0)
            })
            .sum::<f64>()
            / f64::from(n);
        assert!((f64::from(a[2]) - mc).abs() < 5e-3, "{} vs {mc}", a[2]);
    }

    #[test]
    fn top_k_breaks_ties_by_row() {
        let c =
            Candidates::from_parts(1, vec![0, 1, 2, 3, 4], vec![1.0, 3.0, 2.0, 3.0, 2.0]).unwrap();
        let mut s = Scorer::new(1, 1, 5);
        s.weights.copy_from_slice(&[0.0, 1.0]);
        s.score(&c);
        assert_eq!(s.top_k(2), vec![1, 3]);
        assert_eq!(s.top_k(3), vec![1, 2, 3]);
        assert_eq!(s.top_k(5), vec![0, 1, 2, 3, 4]);
    }
}
