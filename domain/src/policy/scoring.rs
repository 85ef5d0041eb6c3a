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

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use wide::f32x8;

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

/// Buffers of large plans, kept from one plan to the next.
///
/// A plan over ten million candidates needs some 600 MB of buffers
/// (every candidate's score moments, best scores, order keys, bounds).
/// Allocated afresh, each plan had the kernel map and zero those pages
/// again (7 % of a platform run's time); taken from here, a plan reuses
/// the pages of the one before. Only buffers of [`POOLED_BYTES`] or more
/// are kept, at most [`POOLED`] of each element type: plans run one after
/// another, so what is kept is about one plan's worth. Reuse never
/// changes a result: every buffer is cleared (or filled) before use.
pub(crate) mod pool {
    use std::sync::{Mutex, MutexGuard};

    /// Smallest buffer kept (bytes of capacity).
    pub const POOLED_BYTES: usize = 1 << 20;
    /// Most buffers kept per element type.
    pub const POOLED: usize = 8;

    /// Buffers of one element type.
    pub struct Shelf<T>(Mutex<Vec<Vec<T>>>);

    impl<T> Shelf<T> {
        pub(crate) const fn new() -> Self {
            Self(Mutex::new(Vec::new()))
        }

        fn lock(&self) -> MutexGuard<'_, Vec<Vec<T>>> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// An empty buffer with room for `cap` elements: the smallest kept
        /// one that has it, else the largest kept one grown, else a new one.
        pub fn take(&self, cap: usize) -> Vec<T> {
            if cap * size_of::<T>() < POOLED_BYTES {
                return Vec::with_capacity(cap);
            }
            let mut shelf = self.lock();
            let fit = shelf
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= cap)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            let largest = || {
                shelf
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, v)| v.capacity())
                    .map(|(i, _)| i)
            };
            match fit.or_else(largest) {
                Some(i) => {
                    let mut v = shelf.swap_remove(i);
                    drop(shelf);
                    v.clear();
                    v.reserve(cap);
                    v
                }
                None => Vec::with_capacity(cap),
            }
        }

        /// `take(len)` filled with `len` copies of `x`.
        pub fn filled(&self, len: usize, x: T) -> Vec<T>
        where
            T: Clone,
        {
            let mut v = self.take(len);
            v.resize(len, x);
            v
        }

        /// Keeps `v` for a later plan (if large enough; the smallest kept
        /// one makes room when the shelf is full).
        pub fn give(&self, v: Vec<T>) {
            if v.capacity() * size_of::<T>() < POOLED_BYTES {
                return;
            }
            let mut shelf = self.lock();
            if shelf.len() >= POOLED {
                let smallest = shelf
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, v)| v.capacity())
                    .map(|(i, v)| (i, v.capacity()));
                match smallest {
                    Some((i, c)) if c < v.capacity() => {
                        shelf.swap_remove(i);
                    }
                    _ => return,
                }
            }
            shelf.push(v);
        }

        /// Buffers kept (for tests).
        #[cfg(test)]
        pub fn kept(&self) -> usize {
            self.lock().len()
        }
    }

    /// `f32` buffers.
    pub static F32: Shelf<f32> = Shelf::new();
    /// `u64` buffers.
    pub static U64: Shelf<u64> = Shelf::new();
    /// `u16` buffers.
    pub static U16: Shelf<u16> = Shelf::new();
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

impl Drop for Moments {
    fn drop(&mut self) {
        pool::F32.give(std::mem::take(&mut self.mean));
        pool::F32.give(std::mem::take(&mut self.sd));
    }
}

/// Maps a candidate's row to a model's columns (appending them).
pub(crate) type RowMap<'a> = dyn Fn(&[f32], &mut Vec<f32>) + Sync + 'a;

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
    ///
    /// Above [`PARALLEL_ROWS`] candidates the rows are split over the
    /// machine's cores (each row's moments are computed alike wherever
    /// they run, so the result does not depend on the split).
    pub fn new(models: &[GaussianWeights], candidates: &Candidates) -> Self {
        Self::mapped(models, candidates, candidates.dim(), None)
    }

    /// [`Moments::new`] over the candidates' rows mapped by `map` (which
    /// appends a row's `dim` columns to its buffer): the moments of the
    /// candidates a mapped copy would give, to the bit, without the copy
    /// (an expanded model's rows, made a block at a time).
    pub fn mapped(
        models: &[GaussianWeights],
        candidates: &Candidates,
        dim: usize,
        map: Option<&RowMap<'_>>,
    ) -> Self {
        let m = models.len();
        let means: Vec<Vec<f32>> = models
            .iter()
            .map(|g| g.mean().iter().map(|&v| v as f32).collect())
            .collect();
        let invs: Vec<Vec<f32>> = models
            .iter()
            .map(|g| g.inverse_cholesky().iter().map(|&v| v as f32).collect())
            .collect();
        let n = candidates.len();
        let mut mean = pool::F32.filled(n * m, 0.0);
        let mut sd = pool::F32.filled(n * m, 0.0);
        let threads = workers(n);
        // Whole blocks per thread.
        let rows = n.div_ceil(threads).div_ceil(BLOCK) * BLOCK;
        if threads <= 1 || m == 0 {
            fill_moments(&means, &invs, (candidates, dim, map), 0, &mut mean, &mut sd);
        } else {
            std::thread::scope(|scope| {
                for (t, (mean, sd)) in mean
                    .chunks_mut(rows * m)
                    .zip(sd.chunks_mut(rows * m))
                    .enumerate()
                {
                    let (means, invs) = (&means, &invs);
                    scope.spawn(move || {
                        fill_moments(means, invs, (candidates, dim, map), t * rows, mean, sd)
                    });
                }
            });
        }
        Self {
            mean,
            sd,
            models: m,
        }
    }
}

/// Candidates above which scoring work is split over threads.
pub(crate) const PARALLEL_ROWS: usize = 200_000;

/// The threads to split `n` candidates' scoring over: 1 up to
/// [`PARALLEL_ROWS`], else the machine's cores (at most 8).
pub(crate) fn workers(n: usize) -> usize {
    if n < PARALLEL_ROWS {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |c| c.get().min(8))
}

/// Candidates per register tile of [`fill_moments`]: one [`f32x8`] (two
/// SSE registers, one AVX register). Its lanes are independent: a
/// product and a sum per lane, never fused, so the results do not depend
/// on the vector width the machine has.
const LANES: usize = 8;

/// Rows of `L⁻¹` per register tile of [`fill_moments`]: `ROWS × LANES`
/// partial sums stay in registers while the block's feature columns
/// stream past once for the rows together.
const ROWS: usize = 4;

/// The moments of candidates `first..first + mean.len() / m` into `mean`
/// and `sd` (see [`Moments::new`]).
///
/// Per block of [`BLOCK`] candidates (features transposed) and model, the
/// products run in register tiles of [`ROWS`] rows of `L⁻¹` by [`LANES`]
/// candidates: each feature column is loaded once per tile, not once per
/// row, and no partial sum goes back to memory until its row ends. Every
/// candidate's sums run in the same order as a plain row-by-row loop
/// (each row from its intercept up, the squares from the first row down),
/// so the results are the same to the bit (tested against it).
fn fill_moments(
    means: &[Vec<f32>],
    invs: &[Vec<f32>],
    (candidates, dim, map): (&Candidates, usize, Option<&RowMap<'_>>),
    first: usize,
    mean: &mut [f32],
    sd: &mut [f32],
) {
    let m = means.len();
    let mut mapped = Vec::with_capacity(dim);
    let n1 = dim + 1;
    let n = mean.len() / m.max(1);
    // cols[j * BLOCK + u]: feature j of the block's candidate u (lanes past
    // the last candidate keep stale values; their results are not read).
    let mut cols = vec![0f32; dim * BLOCK];
    // The block's means and standard deviations under one model.
    let (mut mu_acc, mut v) = ([0f32; BLOCK], [0f32; BLOCK]);
    // Every weight is splatted over the lanes once, not once per use.
    let means: Vec<Vec<f32x8>> = means
        .iter()
        .map(|mu| mu.iter().map(|&w| f32x8::splat(w)).collect())
        .collect();
    // Each model's whole tiles of rows, laid out once.
    let tiles: Vec<Vec<Tile>> = invs
        .iter()
        .map(|inv| {
            (0..n1 / ROWS)
                .map(|q| Tile::new(inv, n1, q * ROWS))
                .collect()
        })
        .collect();
    // And the rows after the last whole tile.
    let rests: Vec<Vec<Vec<f32x8>>> = invs
        .iter()
        .map(|inv| {
            (n1 / ROWS * ROWS..n1)
                .map(|i| {
                    inv[i * n1..=i * n1 + i]
                        .iter()
                        .map(|&w| f32x8::splat(w))
                        .collect()
                })
                .collect()
        })
        .collect();
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        for u in 0..len {
            let x = candidates.row(first + start + u);
            let x = match map {
                None => x,
                Some(f) => {
                    mapped.clear();
                    f(x, &mut mapped);
                    &mapped[..]
                }
            };
            for (j, &xj) in x.iter().enumerate().take(dim) {
                cols[j * BLOCK + u] = xj;
            }
        }
        for (k, ((mu, tiles), rest)) in means.iter().zip(&tiles).zip(&rests).enumerate() {
            // The last row of `L⁻¹`, when not in a tile, has every feature
            // like the mean: the two sums run side by side (two chains of
            // additions, each in its own order).
            let (rest, last) = match rest.split_last() {
                Some((last, rest)) if last.len() == n1 => (rest, Some(last)),
                _ => (&rest[..], None),
            };
            for g in (0..BLOCK).step_by(LANES) {
                // The variance: Σ_i (row_i · x̃)², row_i of L⁻¹ (lower
                // triangular, x̃ = (1, x)), rows in tiles of ROWS.
                let mut var = f32x8::ZERO;
                for (q, tile) in tiles.iter().enumerate() {
                    let i0 = q * ROWS;
                    let mut t: [f32x8; ROWS] = tile.head;
                    // The columns every row of the tile has.
                    for (w, col) in tile.body.chunks_exact(ROWS).zip(cols.chunks_exact(BLOCK)) {
                        let x = lane(col, g);
                        for (tr, &wr) in t.iter_mut().zip(w) {
                            *tr += wr * x;
                        }
                    }
                    // Row i0 + r has r more, features i0..i0 + r in turn.
                    for j in 0..ROWS - 1 {
                        let x = lane(&cols[(i0 + j) * BLOCK..], g);
                        for (r, tr) in t.iter_mut().enumerate().skip(j + 1) {
                            *tr += tile.tail[r * (r - 1) / 2 + j] * x;
                        }
                    }
                    for tr in t {
                        var += tr * tr;
                    }
                }
                for row in rest {
                    let mut t = row[0];
                    for (&w, col) in row[1..].iter().zip(cols.chunks_exact(BLOCK)) {
                        t += w * lane(col, g);
                    }
                    var += t * t;
                }
                v[g..g + LANES].copy_from_slice(&var.to_array());
            }
            // The mean, mu₀ + Σ_j mu_{j+1} x_j, and the last row, for two
            // lane groups at a time (four chains of additions).
            for g in (0..BLOCK).step_by(2 * LANES) {
                let h = g + LANES;
                let (mut acc, mut acc2) = (mu[0], mu[0]);
                let (mut var, mut var2) = (lane(&v, g), lane(&v, h));
                if let Some(row) = last {
                    let (mut t, mut t2) = (row[0], row[0]);
                    for ((&w, &wm), col) in
                        row[1..].iter().zip(&mu[1..]).zip(cols.chunks_exact(BLOCK))
                    {
                        let (x, x2) = (lane(col, g), lane(col, h));
                        acc += wm * x;
                        t += w * x;
                        acc2 += wm * x2;
                        t2 += w * x2;
                    }
                    var += t * t;
                    var2 += t2 * t2;
                } else {
                    for (&w, col) in mu[1..].iter().zip(cols.chunks_exact(BLOCK)) {
                        acc += w * lane(col, g);
                        acc2 += w * lane(col, h);
                    }
                }
                mu_acc[g..h].copy_from_slice(&acc.to_array());
                mu_acc[h..h + LANES].copy_from_slice(&acc2.to_array());
                // Square roots are rounded exactly, in vectors as one by
                // one.
                v[g..h].copy_from_slice(&var.sqrt().to_array());
                v[h..h + LANES].copy_from_slice(&var2.sqrt().to_array());
            }
            for u in 0..len {
                mean[(start + u) * m + k] = mu_acc[u];
                sd[(start + u) * m + k] = v[u];
            }
        }
    }
}

/// The candidates `g..g + LANES` of one feature column of a block.
#[inline(always)]
fn lane(col: &[f32], g: usize) -> f32x8 {
    let mut x = [0f32; LANES];
    x.copy_from_slice(&col[g..g + LANES]);
    f32x8::from(x)
}

/// The weights of rows `i0..i0 + ROWS` of `L⁻¹`, laid out for
/// [`fill_moments`]' register tiles.
struct Tile {
    /// Each row's intercept weight.
    head: [f32x8; ROWS],
    /// `body[j * ROWS + r]`: row `i0 + r`'s weight of feature `j < i0`.
    body: Vec<f32x8>,
    /// Row `i0 + r`'s weights of features `i0..i0 + r`, rows in order
    /// (row `r`'s `j`-th at `r (r − 1) / 2 + j`).
    tail: [f32x8; ROWS * (ROWS - 1) / 2],
}

impl Tile {
    /// Rows `i0..i0 + ROWS` of the `n1 × n1` row-major `inv`.
    fn new(inv: &[f32], n1: usize, i0: usize) -> Self {
        let at = |r: usize, j: usize| f32x8::splat(inv[(i0 + r) * n1 + j]);
        Self {
            head: std::array::from_fn(|r| at(r, 0)),
            body: (0..i0)
                .flat_map(|j| (0..ROWS).map(move |r| (r, j)))
                .map(|(r, j)| at(r, j + 1))
                .collect(),
            tail: std::array::from_fn(|e| {
                // e = r (r − 1) / 2 + j with j < r.
                let r = (1..ROWS)
                    .take_while(|&r| r * (r - 1) / 2 <= e)
                    .last()
                    .unwrap_or(1);
                at(r, i0 + e - r * (r - 1) / 2 + 1)
            }),
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
    /// [`gain_table`]): no exponential per pair. (Plans compute it only
    /// where it can matter: [`Penalty::Deferral`].)
    #[cfg(test)]
    pub fn ambiguity(&self) -> Vec<f32> {
        let m = self.models.max(1);
        let table = gain_table();
        self.mean
            .chunks_exact(m)
            .zip(self.sd.chunks_exact(m))
            .map(|(mean, sd)| ambiguity_of(mean, sd, table))
            .collect()
    }
}

/// One candidate's ambiguity (see [`Moments::ambiguity`]) from its
/// models' means and standard deviations.
fn ambiguity_of(mean: &[f32], sd: &[f32], table: &[f32]) -> f32 {
    let m = mean.len();
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
    /// Order keys for [`walk_down`].
    keys: Vec<u64>,
}

impl Scorer {
    pub fn new(models: usize, dim: usize, n: usize) -> Self {
        Self {
            weights: vec![0.0; models * (dim + 1)],
            draw: vec![0.0; dim + 1],
            best: pool::F32.filled(n, 0.0),
            arg: pool::U16.filled(n, 0),
            scratch: pool::F32.take(n),
            keys: Vec::new(),
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
            .rows()
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
    ///
    /// The normals are drawn from `rng`'s words fetched in bulk
    /// ([`Words`]): for a generator whose `fill_bytes` gives the bytes of
    /// the words `next_u64` would (`rand`'s do, ChaCha's included), the
    /// same words in the same order as drawing each through `rng`, and no
    /// word more, so `rng` is left where it would be.
    pub fn perturb(&mut self, mo: &Moments, bonus: f32, noise: f32, rng: &mut dyn RngCore) {
        let m = mo.models;
        if m == 0 {
            return;
        }
        let draws = if noise > 0.0 { mo.mean.len() } else { 0 };
        let mut words = Words::new(rng, 0);
        // A group of candidates' normals are drawn first, in their order,
        // then the group is scored (no call in the scoring loop).
        let group = (NORMALS / m).max(1);
        let mut normals = vec![0f32; group * m];
        let mut drawn = 0;
        for (((mean, sd), best), arg) in mo
            .mean
            .chunks(group * m)
            .zip(mo.sd.chunks(group * m))
            .zip(self.best.chunks_mut(group))
            .zip(self.arg.chunks_mut(group))
        {
            let normals = &mut normals[..mean.len()];
            if noise > 0.0 {
                drawn += normals.len();
                // Every draw of the group and after it reads a word at
                // least.
                words.left = draws - drawn + 1;
                for e in normals.iter_mut() {
                    *e = StandardNormal.sample(&mut words);
                }
            }
            for ((((mean, sd), e), best), arg) in mean
                .chunks_exact(m)
                .zip(sd.chunks_exact(m))
                .zip(normals.chunks_exact(m))
                .zip(best.iter_mut())
                .zip(arg.iter_mut())
            {
                let mut b = f32::NEG_INFINITY;
                let mut a = 0u16;
                for (c, ((&mu, &s), &e)) in mean.iter().zip(sd).zip(e).enumerate() {
                    let z = if noise > 0.0 {
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
    }

    /// The rows of the `k` best scores less each row's `penalty`
    /// (`1 ≤ k ≤ n`), ascending; ties at the threshold go to the lower
    /// rows: [`Scorer::top_k`] of the penalised scores, with the penalty
    /// computed only where it can matter.
    ///
    /// A penalty is never negative, so a row's penalised score is at most
    /// its score: rows are taken in descending score ([`walk_down`]) until
    /// the next one's score is below the `k`-th largest penalised score of
    /// those taken, and no row left can reach that threshold or tie it.
    /// `best` keeps the scores without penalty. Exact for scores that are
    /// not NaN.
    pub fn top_k_penalised(&mut self, k: usize, penalty: &Penalty<'_>) -> Vec<usize> {
        let mut seen = Vec::new();
        let t = walk_down(
            &self.best,
            k,
            |u| self.best[u] - penalty.of(u),
            &mut self.keys,
            &mut seen,
            &mut self.scratch,
        );
        seen.sort_unstable_by_key(|&(r, _)| r);
        let above = seen.iter().filter(|&&(_, s)| s > t).count();
        let mut ties = k - above;
        let mut rows = Vec::with_capacity(k);
        for &(r, s) in &seen {
            if s > t {
                rows.push(r as usize);
            } else if s == t && ties > 0 {
                rows.push(r as usize);
                ties -= 1;
            }
        }
        rows
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

impl Drop for Scorer {
    fn drop(&mut self) {
        pool::F32.give(std::mem::take(&mut self.best));
        pool::F32.give(std::mem::take(&mut self.scratch));
        pool::U16.give(std::mem::take(&mut self.arg));
        pool::U64.give(std::mem::take(&mut self.keys));
    }
}

/// Normals [`Scorer::perturb`] draws at a time.
const NORMALS: usize = 256;

/// Bytes [`Words`] fetches at once.
const WORDS_BYTES: usize = 8 * 128;

/// A generator's words fetched in bulk, for draws that read whole
/// `u64`s (`StandardNormal`'s ziggurat does): one `fill_bytes` call per
/// 128 words instead of a call through `dyn RngCore` per word. The bytes
/// are those of the words `next_u64` would have given in turn (so for
/// every block generator of `rand`, ChaCha's included), and it never
/// fetches more words than the draws left take: each of the `left` draws
/// reads one word at least.
struct Words<'a> {
    rng: &'a mut dyn RngCore,
    buf: [u8; WORDS_BYTES],
    /// The next unread byte of `buf`.
    at: usize,
    /// The bytes fetched into `buf`.
    len: usize,
    /// A lower bound of the draws still to make, the one under way
    /// included (set by the caller).
    left: usize,
}

impl<'a> Words<'a> {
    /// Words for draws from `rng`, `draws` of them at least.
    fn new(rng: &'a mut dyn RngCore, draws: usize) -> Self {
        Self {
            rng,
            buf: [0; WORDS_BYTES],
            at: 0,
            len: 0,
            left: draws,
        }
    }

    /// The next bytes of the stream into `dest`.
    #[cold]
    fn take(&mut self, dest: &mut [u8]) {
        let mut done = 0;
        while done < dest.len() {
            if self.at == self.len {
                // No more words than the draws left read (one at least,
                // the draw under way's).
                self.len = (8 * self.left.max(1)).min(WORDS_BYTES);
                self.rng.fill_bytes(&mut self.buf[..self.len]);
                self.at = 0;
            }
            let n = (self.len - self.at).min(dest.len() - done);
            dest[done..done + n].copy_from_slice(&self.buf[self.at..self.at + n]);
            self.at += n;
            done += n;
        }
    }
}

impl RngCore for Words<'_> {
    #[inline(always)]
    fn next_u64(&mut self) -> u64 {
        let mut w = [0u8; 8];
        if self.at + 8 <= self.len {
            w.copy_from_slice(&self.buf[self.at..self.at + 8]);
            self.at += 8;
        } else {
            self.take(&mut w);
        }
        u64::from_le_bytes(w)
    }

    fn next_u32(&mut self) -> u32 {
        let mut w = [0u8; 4];
        self.take(&mut w);
        u32::from_le_bytes(w)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.take(dest);
    }
}

/// What lowers each candidate's best score (never negative).
#[derive(Clone, Copy)]
pub(crate) enum Penalty<'a> {
    /// Nothing.
    None,
    /// Given per candidate (none past the end).
    #[cfg(test)]
    Given(&'a [f32]),
    /// The deferral: `defer` times the candidate's ambiguity (the
    /// expected gain of knowing its models' scores, [`ambiguity_of`]),
    /// computed when asked for.
    Deferral {
        /// The candidates' moments.
        mo: &'a Moments,
        /// The deferral's factor (positive).
        defer: f32,
        /// [`gain_table`].
        table: &'static [f32],
    },
}

impl<'a> Penalty<'a> {
    /// `defer` times each candidate's ambiguity; none unless `defer > 0`.
    pub fn deferral(mo: &'a Moments, defer: f32) -> Self {
        if defer > 0.0 {
            Self::Deferral {
                mo,
                defer,
                table: gain_table(),
            }
        } else {
            Self::None
        }
    }

    /// Whether nothing is subtracted.
    pub fn is_none(&self) -> bool {
        match self {
            Self::None => true,
            #[cfg(test)]
            Self::Given(p) => p.is_empty(),
            Self::Deferral { .. } => false,
        }
    }

    /// Candidate `u`'s penalty: the same value, to the bit, as
    /// `defer * mo.ambiguity()[u]` for the deferral.
    #[inline]
    pub fn of(&self, u: usize) -> f32 {
        match *self {
            Self::None => 0.0,
            #[cfg(test)]
            Self::Given(p) => p.get(u).copied().unwrap_or(0.0),
            Self::Deferral { mo, defer, table } => {
                let m = mo.models.max(1);
                let at = u * m..u * m + m;
                defer * ambiguity_of(&mo.mean[at.clone()], &mo.sd[at], table)
            }
        }
    }
}

/// A key whose unsigned order is `f32::total_cmp`'s order of `x`.
#[inline(always)]
fn order_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 1 << 31
    }
}

/// The `k`-th largest (`f32::total_cmp`) of `f(u)` over every row `u`
/// (`1 ≤ k ≤ n`), where `f(u) ≤ x0[u]`, evaluating `f` only where it can
/// matter: rows are taken in descending `x0` (partial selections of
/// growing chunks, no full sort) until the largest `x0` left is below the
/// `k`-th largest `f` of the rows taken; then no row left has an `f`
/// reaching it (or equal to it), so it is the `k`-th largest of all.
/// The rows taken and their `f` are left in `seen`, in no order; `keys`
/// and `scratch` are reused buffers. Exact for values that are not NaN
/// (a NaN `x0` is never below anything: rows are taken on).
fn walk_down(
    x0: &[f32],
    k: usize,
    mut f: impl FnMut(usize) -> f32,
    keys: &mut Vec<u64>,
    seen: &mut Vec<(u32, f32)>,
    scratch: &mut Vec<f32>,
) -> f32 {
    let n = x0.len();
    debug_assert!((1..=n).contains(&k));
    if keys.capacity() < n {
        pool::U64.give(std::mem::take(keys));
        *keys = pool::U64.take(n);
    }
    keys.clear();
    keys.extend(
        x0.iter()
            .enumerate()
            .map(|(u, &x)| u64::from(order_bits(x)) << 32 | u as u64),
    );
    seen.clear();
    let mut done = 0;
    let mut chunk = k + k / 4 + 64;
    loop {
        let end = (done + chunk).min(n);
        if end < n {
            // keys[done..end]: the largest of the rows left; keys[end]
            // the largest after them.
            keys[done..].select_nth_unstable_by(end - done, |a, b| b.cmp(a));
        }
        for &key in &keys[done..end] {
            let u = key as u32 as usize;
            seen.push((u as u32, f(u)));
        }
        done = end;
        if seen.len() >= k {
            scratch.clear();
            scratch.extend(seen.iter().map(|&(_, v)| v));
            let (_, t, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let t = *t;
            if done == n || x0[keys[done] as u32 as usize] < t {
                return t;
            }
        }
        chunk = (seen.len() / 2).max(64);
    }
}

/// The bound on the noise `|ε|` in propensity draws: `P(|ε| > 5)` is
/// 6·10⁻⁷, far below the Monte Carlo error of any number of draws a plan
/// makes, and with it each candidate's score has known bounds.
pub(crate) const NOISE_BOUND: f32 = 5.0;

/// The optimistic scoring of a plan: `mean + sd·(bonus + noise·ε)` per
/// model, the best of them less the candidate's `penalty` (none when
/// empty; see `Defer`).
#[derive(Clone, Copy)]
pub(crate) struct Optimism<'a> {
    /// The bonus, in standard deviations.
    pub bonus: f32,
    /// The noise's scale, in standard deviations.
    pub noise: f32,
    /// Subtracted from each candidate's best score.
    pub penalty: Penalty<'a>,
}

/// How often, in `draws − 1` fresh optimistic perturbations
/// (`mean + sd·(bonus + noise·ε)`, `ε` clamped to ±[`NOISE_BOUND`]), each
/// chosen row `rows[i]` is among the top `k` with creative `chosen[i]`;
/// plus one for the decision's own draw. The same count as scoring every
/// candidate in every draw, without doing so:
///
/// - each candidate's best score lies in `[lo, hi]` whatever the noise,
///   so the `k`-th largest score of any draw lies in `[τ_lo, τ_hi]`, the
///   `k`-th largest `lo` and `hi`;
/// - a candidate with `hi < τ_lo` is never chosen and one with
///   `lo > τ_hi` always is (fewer than `k` are): only the *contested*
///   rest is scored in each draw, and the draw's threshold is the
///   `(k − sure)`-th largest contested score;
/// - a surely chosen row needs noise only to pick its creative, and none
///   when one creative's lowest score beats every other's highest.
///
/// At ten million candidates a few percent are contested once the model
/// has learned from a batch, so a draw costs that share of a full one.
pub(crate) fn optimistic_hits(
    mo: &Moments,
    Optimism {
        bonus,
        noise,
        penalty,
    }: Optimism<'_>,
    k: usize,
    rows: &[usize],
    chosen: &[u16],
    draws: u32,
    rng: &mut dyn RngCore,
) -> Vec<u32> {
    debug_assert_eq!(rows.len(), chosen.len());
    let m = mo.models;
    let n = mo.mean.len() / m.max(1);
    let mut hits = vec![1u32; rows.len()];
    if draws <= 1 || k == 0 || n == 0 {
        return hits;
    }
    if noise <= 0.0 {
        // Every draw is the decision's.
        hits.fill(draws);
        return hits;
    }
    let spread = noise * NOISE_BOUND;
    // Per candidate and model: the score's bounds.
    let bounds = |u: usize, c: usize| {
        let (mu, s) = (mo.mean[u * m + c], mo.sd[u * m + c]);
        (mu + s * (bonus - spread), mu + s * (bonus + spread))
    };
    let pen = |u: usize| penalty.of(u);
    // Each candidate's best score's bounds, before its penalty.
    let mut lo0 = pool::F32.take(n);
    let mut hi0 = pool::F32.take(n);
    for u in 0..n {
        let (mut l, mut h) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for c in 0..m {
            let (bl, bh) = bounds(u, c);
            l = l.max(bl);
            h = h.max(bh);
        }
        lo0.push(l);
        hi0.push(h);
    }
    // The k-th largest bounds less the penalty, the penalty computed only
    // where it can matter (see `walk_down`).
    let (tau_lo, tau_hi) = {
        let (mut keys, mut seen, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let mut kth = |x0: &[f32]| {
            walk_down(
                x0,
                k.min(n),
                |u| x0[u] - pen(u),
                &mut keys,
                &mut seen,
                &mut scratch,
            )
        };
        let t = (kth(&lo0), kth(&hi0));
        pool::U64.give(keys);
        t
    };
    // The creatives that can decide a draw for user `u` (its lowest best
    // score `lo`, its penalty `p`): those whose highest score reaches both
    // the user's lowest best score (below it a creative never wins) and
    // `floor` (below it, winning or not, the user is not chosen).
    let relevant = |u: usize, lo: f32, p: f32, floor: f32| -> u64 {
        // On the creatives' own scale (before the penalty).
        let floor = floor.max(lo) + p;
        (0..m)
            .filter(|&c| bounds(u, c).1 >= floor)
            .fold(0u64, |mask, c| mask | 1 << c)
    };
    let mut sure = 0usize;
    // Contested rows: (row, relevant creatives, penalty).
    let mut contested: Vec<(u32, u64, f32)> = Vec::new();
    for u in 0..n {
        // The penalty only lowers `hi` (and `lo ≤ hi`, `τ_lo ≤ τ_hi`): a
        // row whose `hi` before it is below `τ_lo` is neither sure nor
        // contested, and needs no penalty.
        if hi0[u] < tau_lo {
            continue;
        }
        let p = pen(u);
        let (lo, hi) = (lo0[u] - p, hi0[u] - p);
        if lo > tau_hi {
            sure += 1;
        } else if hi >= tau_lo {
            contested.push((u as u32, relevant(u, lo, p, tau_lo), p));
        }
    }
    debug_assert!(sure < k.min(n) || k >= n);
    // Rows whose every draw is ruled: `Some(count per draw)`.
    enum Row {
        /// Its contested index: scored each draw.
        Contested(usize),
        /// Surely chosen; its creative needs noise.
        Creative,
        /// Decided in every draw (0 or 1 hit each).
        Fixed(u32),
    }
    let plan: Vec<Row> = rows
        .iter()
        .zip(chosen)
        .map(|(&r, &c)| {
            if let Ok(i) = contested.binary_search_by_key(&(r as u32), |&(u, _, _)| u) {
                return Row::Contested(i);
            }
            if lo0[r] - pen(r) <= tau_hi {
                // Never chosen under bounded noise: only a noise beyond
                // the bound chose it.
                return Row::Fixed(0);
            }
            let own = bounds(r, usize::from(c)).0;
            let rival = (0..m)
                .filter(|&j| j != usize::from(c))
                .map(|j| bounds(r, j).1)
                .fold(f32::NEG_INFINITY, f32::max);
            if own > rival {
                Row::Fixed(1)
            } else {
                Row::Creative
            }
        })
        .collect();
    let creative_rows: Vec<(usize, u64)> = plan
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Row::Creative))
        .map(|(i, _)| {
            let (r, p) = (rows[i], pen(rows[i]));
            (i, relevant(r, lo0[r] - p, p, f32::NEG_INFINITY))
        })
        .collect();
    pool::F32.give(lo0);
    pool::F32.give(hi0);
    let need = k.min(n) - sure;
    // Each draw has a generator of its own, seeded from `rng` and its
    // number, so that the draws can be split over threads and the counts
    // do not depend on the split.
    let base = rng.next_u64();
    let draw = |d: u32,
                best: &mut Vec<f32>,
                arg: &mut Vec<u16>,
                scratch: &mut Vec<f32>,
                extra: &mut [u32]| {
        let mut g =
            ChaCha8Rng::seed_from_u64(base ^ u64::from(d).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut score = |u: usize, mut mask: u64, p: f32| {
            let mut b = f32::NEG_INFINITY;
            let mut a = 0u16;
            while mask != 0 {
                let c = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                let e: f32 = StandardNormal.sample(&mut g);
                let e = e.clamp(-NOISE_BOUND, NOISE_BOUND);
                let v = mo.mean[u * m + c] + mo.sd[u * m + c] * (bonus + noise * e);
                if v > b {
                    b = v;
                    a = c as u16;
                }
            }
            (b - p, a)
        };
        best.clear();
        arg.clear();
        for &(u, mask, p) in &contested {
            let (b, a) = score(u as usize, mask, p);
            best.push(b);
            arg.push(a);
        }
        let t = if need == 0 || contested.is_empty() {
            f32::NEG_INFINITY
        } else {
            scratch.clear();
            scratch.extend_from_slice(best);
            let at = need.min(contested.len()) - 1;
            let (_, t, _) = scratch.select_nth_unstable_by(at, |a, b| b.total_cmp(a));
            *t
        };
        for &(i, mask) in &creative_rows {
            // Surely chosen: only the creative counts, the penalty does not.
            if score(rows[i], mask, 0.0).1 == chosen[i] {
                extra[i] += 1;
            }
        }
        for (i, p) in plan.iter().enumerate() {
            match *p {
                Row::Contested(j) => {
                    if best[j] >= t && arg[j] == chosen[i] {
                        extra[i] += 1;
                    }
                }
                Row::Fixed(h) => extra[i] += h,
                Row::Creative => {}
            }
        }
    };
    let run = |draws: std::ops::Range<u32>| {
        let mut extra = vec![0u32; rows.len()];
        let (mut best, mut arg) = (Vec::with_capacity(contested.len()), Vec::new());
        let mut scratch = Vec::with_capacity(contested.len());
        for d in draws {
            draw(d, &mut best, &mut arg, &mut scratch, &mut extra);
        }
        extra
    };
    let threads = workers(n).min(draws as usize - 1).max(1) as u32;
    let per = (draws - 1).div_ceil(threads);
    let parts: Vec<Vec<u32>> = if threads <= 1 {
        vec![run(1..draws)]
    } else {
        std::thread::scope(|scope| {
            let run = &run;
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let from = 1 + t * per;
                    let to = (from + per).min(draws);
                    scope.spawn(move || run(from..to))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    for part in parts {
        for (h, e) in hits.iter_mut().zip(part) {
            *h += e;
        }
    }
    hits
}

/// The optimistic plan of `k` of the candidates of `mo` (`1 ≤ k ≤ n`):
/// one perturbation decides, each best score lowered by `defer` times
/// the candidate's ambiguity (when `defer > 0`); the propensity counts
/// come from [`optimistic_hits`]. Returns the chosen rows (ascending),
/// their creatives and their counts out of `draws`.
pub(crate) fn plan_optimistic(
    mo: &Moments,
    bonus: f32,
    noise: f32,
    defer: f32,
    k: usize,
    draws: u32,
    rng: &mut dyn RngCore,
) -> (Vec<usize>, Vec<u16>, Vec<u32>) {
    let n = mo.mean.len() / mo.models.max(1);
    let penalty = Penalty::deferral(mo, defer);
    let mut scorer = Scorer::new(mo.models, 0, n);
    scorer.perturb(mo, bonus, noise, rng);
    let rows = if penalty.is_none() {
        scorer.top_k(k)
    } else {
        scorer.top_k_penalised(k, &penalty)
    };
    let chosen: Vec<u16> = rows.iter().map(|&r| scorer.arg[r]).collect();
    drop(scorer);
    let o = Optimism {
        bonus,
        noise,
        penalty,
    };
    let hits = optimistic_hits(mo, o, k, &rows, &chosen, draws, rng);
    (rows, chosen, hits)
}

#[cfg(test)]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;

    /// The pruned count agrees with scoring every candidate in every draw
    /// (within the Monte Carlo error of both), on moments shaped like a
    /// learned model's: spread means, small and varied deviations, some
    /// candidates with two close creatives.
    #[test]
    fn pruned_propensities_match_full_draws() {
        use rand::SeedableRng;
        use rand_chacha::ChaCha8Rng;
        let (n, m, k) = (3_000usize, 3usize, 300usize);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut mean = Vec::with_capacity(n * m);
        let mut sd = Vec::with_capacity(n * m);
        for u in 0..n {
            let base: f32 = StandardNormal.sample(&mut rng);
            for c in 0..m {
                let gap = if u % 3 == 0 { 0.01 } else { 0.3 };
                mean.push(base + gap * c as f32);
                sd.push(0.05 + 0.2 * ((u * 7 + c) % 11) as f32 / 11.0);
            }
        }
        let mo = Moments {
            mean,
            sd,
            models: m,
        };
        let (bonus, noise) = (0.25f32, 0.5f32);
        // A deferral penalty on some candidates.
        let penalty: Vec<f32> = (0..n).map(|u| (u % 5) as f32 * 0.05).collect();
        let mut scorer = Scorer::new(m, 1, n);
        let perturb = |scorer: &mut Scorer, rng: &mut ChaCha8Rng| {
            scorer.perturb(&mo, bonus, noise, rng);
            for (b, p) in scorer.best.iter_mut().zip(&penalty) {
                *b -= p;
            }
        };
        perturb(&mut scorer, &mut rng);
        let rows = scorer.top_k(k);
        let chosen: Vec<u16> = rows.iter().map(|&r| scorer.arg[r]).collect();
        let draws = 2_000u32;
        let mut full = vec![1u32; k];
        for _ in 1..draws {
            perturb(&mut scorer, &mut rng);
            let t = scorer.threshold(k);
            for ((&r, &c), h) in rows.iter().zip(&chosen).zip(full.iter_mut()) {
                if scorer.best[r] >= t && scorer.arg[r] == c {
                    *h += 1;
                }
            }
        }
        let o = Optimism {
            bonus,
            noise,
            penalty: Penalty::Given(&penalty),
        };
        let pruned = optimistic_hits(&mo, o, k, &rows, &chosen, draws, &mut rng);
        let d = f64::from(draws);
        let mut worst = 0f64;
        let mut explored = 0;
        for (a, b) in full.iter().zip(&pruned) {
            let (pa, pb) = (f64::from(*a) / d, f64::from(*b) / d);
            assert!((1.0 / d..=1.0).contains(&pb), "a propensity of {pb}");
            if pa < 0.99 {
                explored += 1;
            }
            // Two independent estimates: 5 standard errors of their
            // difference.
            let se = (2.0 * pa.max(pb).max(0.01) * (1.0 - pa.min(pb)).max(0.01) / d).sqrt();
            worst = worst.max((pa - pb).abs() / se);
        }
        assert!(explored > k / 10, "the test explores: {explored} of {k}");
        assert!(
            worst < 5.0,
            "pruned and full counts differ by {worst:.1} standard errors"
        );
        // Without noise every draw is the decision's.
        let o = Optimism { noise: 0.0, ..o };
        let fixed = optimistic_hits(&mo, o, k, &rows, &chosen, draws, &mut rng);
        assert!(fixed.iter().all(|&h| h == draws));
    }

    #[test]
    fn dot_matches_naive() {
        for len in 0..40 {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - naive).abs() < 1e-4, "len {len}");
        }
    }

    /// The row-by-row moments (the tiles' reference): per candidate and
    /// model, each row of `L⁻¹` from its intercept up, the squares from
    /// the first row down.
    fn rowwise_moments(
        means: &[Vec<f32>],
        invs: &[Vec<f32>],
        c: &Candidates,
    ) -> (Vec<f32>, Vec<f32>) {
        let (m, n1) = (means.len(), c.dim() + 1);
        let (mut mean, mut sd) = (Vec::new(), Vec::new());
        for x in c.rows() {
            for (mu, inv) in means.iter().zip(invs) {
                let mut a = mu[0];
                for (j, &xj) in x.iter().enumerate() {
                    a += mu[j + 1] * xj;
                }
                let mut v = 0f32;
                for i in 0..n1 {
                    let mut t = inv[i * n1];
                    for (j, &xj) in x.iter().enumerate().take(i) {
                        t += inv[i * n1 + j + 1] * xj;
                    }
                    v += t * t;
                }
                mean.push(a);
                sd.push(v.sqrt());
            }
        }
        assert_eq!(mean.len(), c.len() * m);
        (mean, sd)
    }

    #[test]
    fn tiled_moments_equal_the_rowwise_sums_to_the_bit() {
        use rand::{Rng, SeedableRng};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for dim in 1..=21 {
            let n = rng.random_range(1..3 * BLOCK + 5);
            let features: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-3.0..3.0)).collect();
            let c = Candidates::from_parts(dim, (0..n as u32).collect(), features).unwrap();
            let n1 = dim + 1;
            let m = 3;
            let means: Vec<Vec<f32>> = (0..m)
                .map(|_| (0..n1).map(|_| rng.random_range(-1.0..1.0)).collect())
                .collect();
            let invs: Vec<Vec<f32>> = (0..m)
                .map(|_| {
                    (0..n1 * n1)
                        .map(|e| {
                            if e % n1 <= e / n1 {
                                rng.random_range(-2.0..2.0)
                            } else {
                                0.0
                            }
                        })
                        .collect()
                })
                .collect();
            let (mut mean, mut sd) = (vec![0f32; n * m], vec![0f32; n * m]);
            fill_moments(&means, &invs, (&c, c.dim(), None), 0, &mut mean, &mut sd);
            let (want_mean, want_sd) = rowwise_moments(&means, &invs, &c);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&mean), bits(&want_mean), "means, dim {dim}, n {n}");
            assert_eq!(bits(&sd), bits(&want_sd), "sds, dim {dim}, n {n}");
        }
    }

    /// Three models of `dim` columns, each fitted to the first 60 rows of
    /// `features` with its own outcomes.
    fn three_fitted_models(dim: usize, features: &[f32]) -> Vec<GaussianWeights> {
        use crate::data::OutcomeRow;
        use crate::model::{Link, Prior};
        (0..3u32)
            .map(|k| {
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
                g
            })
            .collect()
    }

    #[test]
    fn blocked_moments_match_each_models_own_computation() {
        let dim = 5;
        // 150 candidates: two whole blocks and part of a third.
        let n = 150;
        let features: Vec<f32> = (0..n * dim)
            .map(|i| ((i as f32) * 0.731).sin() * 2.0)
            .collect();
        let c = Candidates::from_parts(dim, (0..n as u32).collect(), features.clone()).unwrap();
        let models = three_fitted_models(dim, &features);
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

    /// Moments over rows mapped as they are read equal the moments of a
    /// mapped copy of the candidates to the bit, on one thread and split
    /// over several, and over a selection of the rows.
    #[test]
    fn mapped_moments_equal_the_moments_of_a_mapped_copy() {
        let (dim, wide) = (3, 5);
        let map = |x: &[f32], out: &mut Vec<f32>| {
            out.extend_from_slice(x);
            out.push((x[0] - 0.2).max(0.0));
            out.push((x[1] + 0.1).max(0.0));
        };
        for n in [150, PARALLEL_ROWS + 77] {
            let features: Vec<f32> = (0..n * dim)
                .map(|i| ((i as f32) * 0.731).sin() * 2.0)
                .collect();
            let mut c =
                Candidates::from_parts(dim, (0..n as u32).collect(), features.clone()).unwrap();
            if n > 1_000 {
                c.retain_rows(|_, r| r % 7 != 3);
            }
            let mut copied = Vec::new();
            for x in c.rows() {
                map(x, &mut copied);
            }
            let copy = Candidates::from_parts(wide, c.users().to_vec(), copied.clone()).unwrap();
            let models = three_fitted_models(wide, &copied);
            let want = Moments::new(&models, &copy);
            let got = Moments::mapped(&models, &c, wide, Some(&map));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.mean), bits(&want.mean), "n {n}");
            assert_eq!(bits(&got.sd), bits(&want.sd), "n {n}");
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
        let mut r = ChaCha8Rng::seed_from_u64(1);
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

    /// The plan with the lazy penalty and the buffered noise decides the
    /// same rows and creatives, counts the same propensities and leaves
    /// the generator where the plan before did, to the bit: populations
    /// with exact ties (rows of equal rounded means and no deviation, so
    /// no noise and no penalty), large and small deferrals, `k` from 1 to
    /// `n`, with and without propensity draws.
    /// A shelf hands back the buffer it was given (the smallest that
    /// fits), keeps only large ones, and at most [`pool::POOLED`].
    #[test]
    fn the_pool_reuses_large_buffers_only() {
        let shelf = pool::Shelf::<f32>::new();
        let big = pool::POOLED_BYTES / 4;
        shelf.give(vec![0.0; 10]);
        assert_eq!(shelf.kept(), 0);
        let mut v = Vec::with_capacity(big * 2);
        v.push(1.0);
        let at = v.as_ptr();
        shelf.give(v);
        shelf.give(Vec::with_capacity(big * 4));
        assert_eq!(shelf.kept(), 2);
        let again = shelf.take(big + 1);
        assert_eq!(again.as_ptr(), at, "the smallest that fits");
        assert!(again.is_empty());
        assert_eq!(shelf.filled(big, 2.5), vec![2.5; big]);
        for _ in 0..pool::POOLED + 3 {
            shelf.give(Vec::with_capacity(big * 3));
        }
        assert_eq!(shelf.kept(), pool::POOLED);
    }

    /// Plans large enough to take their buffers from the pool, one after
    /// another (the second gets the first one's, as they were left), equal
    /// the full plan to the bit.
    #[test]
    fn plans_on_reused_buffers_equal_the_full_plan() {
        use rand::{Rng, SeedableRng};
        let mut gen = ChaCha8Rng::seed_from_u64(16);
        let (n, m) = (pool::POOLED_BYTES / 4 + 5_000, 2);
        let mut mo = Moments {
            mean: Vec::with_capacity(n * m),
            sd: Vec::with_capacity(n * m),
            models: m,
        };
        for _ in 0..n * m {
            mo.mean.push(StandardNormal.sample(&mut gen));
            mo.sd.push(gen.random_range(0.0..0.3));
        }
        for (k, seed) in [(n / 50, 1u64), (n / 20, 2), (n / 50, 1)] {
            let (mut a, mut b) = (
                ChaCha8Rng::seed_from_u64(seed),
                ChaCha8Rng::seed_from_u64(seed),
            );
            let new = plan_optimistic(&mo, 0.25, 0.5, 1.0, k, 4, &mut a);
            let old = reference::plan(&mo, 0.25, 0.5, 1.0, k, 4, &mut b);
            assert_eq!(new, old, "k {k} seed {seed}");
        }
        assert!(pool::F32.kept() > 0);
    }

    #[test]
    fn lazy_plan_equals_the_full_plan_to_the_bit() {
        use rand::{Rng, SeedableRng};
        let mut gen = ChaCha8Rng::seed_from_u64(14);
        let mut cases = 0;
        for seed in 0..12u64 {
            let n = gen.random_range(1..2_500usize);
            let m = gen.random_range(1..=5usize);
            let mut mean = Vec::with_capacity(n * m);
            let mut sd = Vec::with_capacity(n * m);
            for u in 0..n {
                let base: f32 = StandardNormal.sample(&mut gen);
                let kind = u % 4;
                for _ in 0..m {
                    let gap: f32 = gen.random_range(-0.5..0.5);
                    match kind {
                        // Exact ties: rounded means, no deviation.
                        0 => {
                            mean.push((base * 2.0).round() / 2.0);
                            sd.push(0.0);
                        }
                        // Close creatives.
                        1 => {
                            mean.push(base + 0.01 * gap);
                            sd.push(gen.random_range(0.0..0.4));
                        }
                        _ => {
                            mean.push(base + gap);
                            sd.push(gen.random_range(0.0..0.4));
                        }
                    }
                }
            }
            let mo = Moments {
                mean,
                sd,
                models: m,
            };
            for &(bonus, noise, defer) in &[
                (0.25f32, 0.5f32, 1.0f32),
                (0.0, 1.0, 20.0),
                (0.5, 0.0, 2.0),
                (0.25, 0.5, 0.0),
            ] {
                for k in [1, n.div_ceil(10), n.saturating_sub(1).max(1), n] {
                    for draws in [1u32, 30] {
                        let s = seed * 1_000 + k as u64 + u64::from(draws);
                        let (mut a, mut b) =
                            (ChaCha8Rng::seed_from_u64(s), ChaCha8Rng::seed_from_u64(s));
                        let new = plan_optimistic(&mo, bonus, noise, defer, k, draws, &mut a);
                        let old = reference::plan(&mo, bonus, noise, defer, k, draws, &mut b);
                        let what = format!(
                            "seed {seed} n {n} m {m} k {k} draws {draws} \
                             bonus {bonus} noise {noise} defer {defer}"
                        );
                        assert_eq!(new.0, old.0, "rows, {what}");
                        assert_eq!(new.1, old.1, "creatives, {what}");
                        assert_eq!(new.2, old.2, "counts, {what}");
                        assert_eq!(a.next_u64(), b.next_u64(), "generator, {what}");
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 12 * 4 * 4 * 2);
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
