//! Scenario families: generators of populations whose columns and true
//! response are *not* the i.i.d.-normal, logistic-linear world the
//! integrated policy assumes (issue 14).
//!
//! Each generator is deterministic in its seed and returns the users'
//! features (`n × columns`, row-major, `f32`) and their true reaction
//! probabilities (`n × creatives`). The true response of user `u` to
//! creative `c` is `σ(b + s(x_u) + d_c(x_u))`: a part `s` shared by every
//! creative (responsive users respond to everything more), a part `d_c`
//! of creative `c` (who prefers which creative), and an intercept `b`
//! solved so that the mean probability is the scenario's base rate. Both
//! parts are rescaled to fixed standard deviations over the population
//! ([`SHARED_SD`], [`SPECIFIC_SD`]), the same as the classic world's
//! (`0.85` and about `0.45`), so the families differ in *shape*, not in
//! how much there is to learn.
//!
//! - [`Family::Gaussian`]: the classic generator (in `population.rs`):
//!   i.i.d. standard normal columns, logistic-linear truth.
//! - [`Family::Crm`]: what a CRM export looks like (see [`crm`]).
//! - [`Family::Nonlinear`]: interactions, thresholds, a periodic and a
//!   non-monotone effect (see [`nonlinear`]).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::rng;

/// Standard deviation of the shared part of the true logit.
pub const SHARED_SD: f64 = 0.85;
/// Standard deviation of each creative's own part of the true logit.
pub const SPECIFIC_SD: f64 = 0.45;

/// The shape of a generated population (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// I.i.d. standard normal columns, logistic-linear truth from
    /// `truth` (the classic scenario).
    #[default]
    Gaussian,
    /// [`crm`]: 16 columns.
    Crm,
    /// [`nonlinear`]: 8 columns.
    Nonlinear,
}

impl Family {
    /// The number of columns the family generates (`None`: any).
    pub fn columns(self) -> Option<usize> {
        match self {
            Family::Gaussian => None,
            Family::Crm => Some(CRM_COLUMNS),
            Family::Nonlinear => Some(NONLINEAR_COLUMNS),
        }
    }

    /// Its name in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Gaussian => "gaussian",
            Family::Crm => "crm",
            Family::Nonlinear => "nonlinear",
        }
    }
}

/// Columns of [`crm`].
pub const CRM_COLUMNS: usize = 16;
/// Columns of [`nonlinear`].
pub const NONLINEAR_COLUMNS: usize = 8;

/// A generated population: features and true probabilities.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `n × columns`, row-major.
    pub features: Vec<f32>,
    /// `n × creatives`, row-major.
    pub probs: Vec<f64>,
}

fn z(r: &mut ChaCha8Rng) -> f64 {
    StandardNormal.sample(r)
}

/// Centres `v` and scales it to standard deviation `sd` (left at zero if
/// it is constant).
fn rescale(v: &mut [f64], sd: f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let s = (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / n).sqrt();
    for a in v.iter_mut() {
        *a = if s > 1e-12 { (*a - m) * sd / s } else { 0.0 };
    }
}

fn sigmoid(t: f64) -> f64 {
    if t >= 0.0 {
        1.0 / (1.0 + (-t).exp())
    } else {
        let e = t.exp();
        e / (1.0 + e)
    }
}

/// Probabilities `σ(b + logit)` with `b` solved (bisection) so that their
/// mean is `base_rate`, rounded to 9 decimals.
fn calibrate(logits: &[f64], base_rate: f64) -> Vec<f64> {
    let mean_at = |b: f64| {
        // Every 7th value is plenty for the mean and keeps this quick.
        let (s, c) = logits
            .iter()
            .step_by(7)
            .fold((0.0, 0usize), |(s, c), &l| (s + sigmoid(b + l), c + 1));
        s / c.max(1) as f64
    };
    let (mut lo, mut hi) = (-30.0, 30.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if mean_at(mid) < base_rate {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let b = 0.5 * (lo + hi);
    logits
        .iter()
        .map(|&l| (sigmoid(b + l) * 1e9).round() / 1e9)
        .collect()
}

/// Combines the shared part (`n`) and each creative's own part
/// (`creatives × n`) and intercept offsets into probabilities.
fn combine(
    mut shared: Vec<f64>,
    mut own: Vec<Vec<f64>>,
    offsets: &[f64],
    base_rate: f64,
) -> Vec<f64> {
    let n = shared.len();
    let k = own.len();
    rescale(&mut shared, SHARED_SD);
    for o in &mut own {
        rescale(o, SPECIFIC_SD);
    }
    let mut logits = vec![0.0; n * k];
    for u in 0..n {
        for c in 0..k {
            logits[u * k + c] = shared[u] + own[c][u] + offsets[c];
        }
    }
    calibrate(&logits, base_rate)
}

/// A CRM-like population of `n` users and `creatives` creatives (columns
/// drawn from `seed`, the truth from `truth_seed`), with
/// [`CRM_COLUMNS`] columns as a CRM export gives them (nothing
/// standardised):
///
/// | column | what | values |
/// |---|---|---|
/// | 0 | intercept | always 1 |
/// | 1 | app user | 0/1, 35 % |
/// | 2 | newsletter subscriber | 0/1, 20 % |
/// | 3 | premium | 0/1, 8 % |
/// | 4–8 | region, one-hot | 5 levels, 35/25/20/12/8 % |
/// | 9 | age | years, 18–85, around 42 |
/// | 10 | days since last visit | 0–730, exponential, mean 40 |
/// | 11 | purchases last year | 0, 1, 2 … (mean about 3) |
/// | 12 | tenure | months, 0–120 |
/// | 13 | average basket | currency, log-normal, median 40 |
/// | 14 | a score nobody uses | around 50, sd 10 (pure noise) |
/// | 15 | a flag nobody uses | 0/1, 50 % (pure noise) |
///
/// The truth is logistic in *transformed* columns (standardised age and
/// tenure, `ln(1 + days)`, `ln(1 + purchases)`, `ln(basket)`, the flags and
/// the region), so a model of the raw columns is close to, not exactly,
/// right: recency matters on a log scale. Shared weights are drawn from
/// the seed (recency negative, the rest either sign); each creative adds
/// its own weights on 3 of the 12 informative transforms and an intercept
/// offset `N(0, creative_spread²)`.
pub fn crm(
    n: usize,
    creatives: usize,
    seed: u64,
    truth_seed: u64,
    base_rate: f64,
    creative_spread: f64,
) -> Generated {
    let mut r = rng::stream(seed, &[rng::label("crm-features")]);
    let d = CRM_COLUMNS;
    let mut features = vec![0f32; n * d];
    // Informative transforms per user, standardised below.
    const T: usize = 12;
    let mut t = vec![0f64; n * T];
    let region_p = [0.35, 0.25, 0.20, 0.12, 0.08];
    for u in 0..n {
        let x = &mut features[u * d..(u + 1) * d];
        x[0] = 1.0;
        let app = r.random_bool(0.35);
        let news = r.random_bool(0.20);
        let prem = r.random_bool(0.08);
        x[1] = f32::from(u8::from(app));
        x[2] = f32::from(u8::from(news));
        x[3] = f32::from(u8::from(prem));
        let mut q: f64 = r.random();
        let mut region = 4;
        for (i, p) in region_p.iter().enumerate() {
            if q < *p {
                region = i;
                break;
            }
            q -= p;
        }
        x[4 + region] = 1.0;
        let age = (42.0 + 13.0 * z(&mut r)).round().clamp(18.0, 85.0);
        let days = (-40.0 * (1.0 - r.random::<f64>()).ln()).floor().min(730.0);
        let purchases = (-3.0 * (1.0 - r.random::<f64>()).ln()).floor();
        let tenure = r.random_range(0..=120) as f64;
        let basket = ((40.0 * (0.8 * z(&mut r)).exp()) * 100.0).round() / 100.0;
        x[9] = age as f32;
        x[10] = days as f32;
        x[11] = purchases as f32;
        x[12] = tenure as f32;
        x[13] = basket as f32;
        x[14] = (50.0 + 10.0 * z(&mut r)).round() as f32;
        x[15] = f32::from(u8::from(r.random_bool(0.5)));
        let tu = &mut t[u * T..(u + 1) * T];
        tu[0] = f64::from(x[1]);
        tu[1] = f64::from(x[2]);
        tu[2] = f64::from(x[3]);
        for i in 0..4 {
            tu[3 + i] = f64::from(x[5 + i]);
        }
        tu[7] = (age - 42.0) / 13.0;
        tu[8] = (1.0 + days).ln();
        tu[9] = (1.0 + purchases).ln();
        tu[10] = tenure / 35.0;
        tu[11] = basket.ln();
    }
    let mut w = rng::stream(truth_seed, &[rng::label("crm-truth")]);
    let mut shared_w: Vec<f64> = (0..T).map(|_| z(&mut w)).collect();
    // Recency: the longer since the last visit, the less responsive.
    shared_w[8] = -(1.0 + 0.3 * shared_w[8].abs());
    let offsets: Vec<f64> = (0..creatives)
        .map(|_| creative_spread * z(&mut w))
        .collect();
    let own_w: Vec<Vec<(usize, f64)>> = (0..creatives)
        .map(|_| {
            rand::seq::index::sample(&mut w, T, 3)
                .into_iter()
                .map(|i| (i, z(&mut w)))
                .collect()
        })
        .collect();
    let shared: Vec<f64> = t
        .chunks_exact(T)
        .map(|tu| tu.iter().zip(&shared_w).map(|(a, b)| a * b).sum())
        .collect();
    let own: Vec<Vec<f64>> = own_w
        .iter()
        .map(|ws| {
            t.chunks_exact(T)
                .map(|tu| ws.iter().map(|&(i, b)| tu[i] * b).sum())
                .collect()
        })
        .collect();
    Generated {
        features,
        probs: combine(shared, own, &offsets, base_rate),
    }
}

/// A population with a non-linear truth (columns drawn from `seed`, the
/// truth from `truth_seed`), [`NONLINEAR_COLUMNS`] columns:
/// `x0 … x3` and `x6` standard normal, `x4` uniform in `[0, 1)` (a time of
/// day), `x5` an ordinal code `0 … 6`, `x7` a 0/1 flag (40 %).
///
/// Shared part: `x0`, an interaction `x1·x2`, a threshold `1[x3 > 0.7]`,
/// a periodic effect `sin(2π·x4)`, a non-monotone effect of the code
/// (`−|x5 − 3|`, best in the middle), an interaction with the flag
/// `x0·x7` and a saturating `tanh(2·x6)`, each weighted by a draw from the
/// seed. Creative `c`'s own part: a threshold on one random normal column
/// at a random cut, an interaction of two random columns, and a bonus for
/// one code value (`x5 = c mod 7`), again with random weights. A linear
/// model of the columns captures the linear shadow of this and no more.
pub fn nonlinear(
    n: usize,
    creatives: usize,
    seed: u64,
    truth_seed: u64,
    base_rate: f64,
    creative_spread: f64,
) -> Generated {
    let mut r = rng::stream(seed, &[rng::label("nonlinear-features")]);
    let d = NONLINEAR_COLUMNS;
    let mut features = vec![0f32; n * d];
    for x in features.chunks_exact_mut(d) {
        for v in x.iter_mut().take(4) {
            *v = z(&mut r) as f32;
        }
        x[4] = r.random::<f32>();
        x[5] = r.random_range(0..7u8) as f32;
        x[6] = z(&mut r) as f32;
        x[7] = f32::from(u8::from(r.random_bool(0.4)));
    }
    let mut w = rng::stream(truth_seed, &[rng::label("nonlinear-truth")]);
    let a: Vec<f64> = (0..7).map(|_| 0.5 + z(&mut w).abs()).collect();
    let signs: Vec<f64> = (0..7)
        .map(|_| if w.random_bool(0.5) { 1.0 } else { -1.0 })
        .collect();
    let normal_cols = [0usize, 1, 2, 3, 6];
    struct Own {
        cut_col: usize,
        cut: f64,
        cut_w: f64,
        pair: (usize, usize),
        pair_w: f64,
        code: f32,
        code_w: f64,
    }
    let owns: Vec<Own> = (0..creatives)
        .map(|c| {
            let i = normal_cols[w.random_range(0..normal_cols.len())];
            let j = normal_cols[w.random_range(0..normal_cols.len())];
            let mut k = normal_cols[w.random_range(0..normal_cols.len())];
            if k == j {
                k = normal_cols[(normal_cols.iter().position(|&v| v == j).unwrap_or(0) + 1)
                    % normal_cols.len()];
            }
            Own {
                cut_col: i,
                cut: z(&mut w),
                cut_w: z(&mut w),
                pair: (j, k),
                pair_w: z(&mut w),
                code: (c % 7) as f32,
                code_w: z(&mut w).abs(),
            }
        })
        .collect();
    let offsets: Vec<f64> = (0..creatives)
        .map(|_| creative_spread * z(&mut w))
        .collect();
    let f = |x: &[f32], i: usize| f64::from(x[i]);
    let shared: Vec<f64> = features
        .chunks_exact(d)
        .map(|x| {
            let terms = [
                f(x, 0),
                f(x, 1) * f(x, 2),
                if f(x, 3) > 0.7 { 1.0 } else { 0.0 },
                (std::f64::consts::TAU * f(x, 4)).sin(),
                -(f(x, 5) - 3.0).abs() / 1.7,
                f(x, 0) * f(x, 7),
                (2.0 * f(x, 6)).tanh(),
            ];
            terms
                .iter()
                .zip(&a)
                .zip(&signs)
                .map(|((t, a), s)| t * a * s)
                .sum()
        })
        .collect();
    let own: Vec<Vec<f64>> = owns
        .iter()
        .map(|o| {
            features
                .chunks_exact(d)
                .map(|x| {
                    let cut = if f(x, o.cut_col) > o.cut {
                        o.cut_w
                    } else {
                        0.0
                    };
                    let pair = o.pair_w * f(x, o.pair.0) * f(x, o.pair.1);
                    let code = if x[5] == o.code { o.code_w } else { 0.0 };
                    cut + pair + code
                })
                .collect()
        })
        .collect();
    Generated {
        features,
        probs: combine(shared, own, &offsets, base_rate),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_deterministic_and_calibrated() {
        for fam in [Family::Crm, Family::Nonlinear] {
            let g = |seed| match fam {
                Family::Crm => crm(20_000, 4, seed, seed, 0.03, 0.25),
                _ => nonlinear(20_000, 4, seed, seed, 0.03, 0.25),
            };
            let (a, b, c) = (g(1), g(1), g(2));
            assert_eq!(a.features, b.features);
            assert_eq!(a.probs, b.probs);
            assert_ne!(a.probs, c.probs);
            let mean = a.probs.iter().sum::<f64>() / a.probs.len() as f64;
            assert!((mean - 0.03).abs() < 0.002, "{fam:?}: mean {mean}");
            assert_eq!(a.features.len(), 20_000 * fam.columns().unwrap());
        }
    }
}
