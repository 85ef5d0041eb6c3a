//! The plan's scoring as it was before the deferral's penalty was made
//! lazy and the decision's noise buffered (December 7): the reference the
//! tests compare the current code with, bit for bit.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::{workers, Moments, Scorer, NOISE_BOUND};

/// The optimistic scoring with a penalty given for every candidate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Optimism<'a> {
    /// The bonus, in standard deviations.
    pub bonus: f32,
    /// The noise's scale, in standard deviations.
    pub noise: f32,
    /// Per candidate, subtracted from its best score (empty: none).
    pub penalty: &'a [f32],
}

/// `Scorer::perturb` as it was: every normal drawn through `dyn RngCore`.
pub(crate) fn perturb(
    scorer: &mut Scorer,
    mo: &Moments,
    bonus: f32,
    noise: f32,
    rng: &mut dyn RngCore,
) {
    let this = scorer;

    let m = mo.models;
    for (((mean, sd), best), arg) in mo
        .mean
        .chunks_exact(m)
        .zip(mo.sd.chunks_exact(m))
        .zip(this.best.iter_mut())
        .zip(this.arg.iter_mut())
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

/// `optimistic_hits` as it was: the penalty of every candidate given.
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
    let pen = |u: usize| penalty.get(u).copied().unwrap_or(0.0);
    // Each candidate's best score's bounds, less its penalty.
    let mut lo = vec![f32::NEG_INFINITY; n];
    let mut hi = vec![f32::NEG_INFINITY; n];
    for u in 0..n {
        for c in 0..m {
            let (l, h) = bounds(u, c);
            lo[u] = lo[u].max(l);
            hi[u] = hi[u].max(h);
        }
        lo[u] -= pen(u);
        hi[u] -= pen(u);
    }
    let kth = |v: &[f32]| {
        let mut scratch = v.to_vec();
        let (_, t, _) = scratch.select_nth_unstable_by(k.min(n) - 1, |a, b| b.total_cmp(a));
        *t
    };
    let (tau_lo, tau_hi) = (kth(&lo), kth(&hi));
    // The creatives that can decide a draw for user `u`: those whose
    // highest score reaches both the user's lowest best score (below it a
    // creative never wins) and `floor` (below it, winning or not, the user
    // is not chosen).
    let relevant = |u: usize, floor: f32| -> u64 {
        // On the creatives' own scale (before the penalty).
        let floor = floor.max(lo[u]) + pen(u);
        (0..m)
            .filter(|&c| bounds(u, c).1 >= floor)
            .fold(0u64, |mask, c| mask | 1 << c)
    };
    let mut sure = 0usize;
    let mut contested: Vec<(u32, u64)> = Vec::new();
    for u in 0..n {
        if lo[u] > tau_hi {
            sure += 1;
        } else if hi[u] >= tau_lo {
            contested.push((u as u32, relevant(u, tau_lo)));
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
            if let Ok(i) = contested.binary_search_by_key(&(r as u32), |&(u, _)| u) {
                return Row::Contested(i);
            }
            if lo[r] <= tau_hi {
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
        .map(|(i, _)| (i, relevant(rows[i], f32::NEG_INFINITY)))
        .collect();
    drop((lo, hi));
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
        let mut score = |u: usize, mut mask: u64| {
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
            (b - pen(u), a)
        };
        best.clear();
        arg.clear();
        for &(u, mask) in &contested {
            let (b, a) = score(u as usize, mask);
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
            if score(rows[i], mask).1 == chosen[i] {
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

/// The optimistic plan as `plan_top_k` made it: the decision's rows,
/// their creatives and their propensity counts.
pub(crate) fn plan(
    mo: &Moments,
    bonus: f32,
    noise: f32,
    defer: f32,
    k: usize,
    draws: u32,
    rng: &mut dyn RngCore,
) -> (Vec<usize>, Vec<u16>, Vec<u32>) {
    let n = mo.mean.len() / mo.models.max(1);
    let mut scorer = Scorer::new(mo.models, 1, n);
    let penalty: Vec<f32> = if defer > 0.0 {
        mo.ambiguity().into_iter().map(|a| defer * a).collect()
    } else {
        Vec::new()
    };
    perturb(&mut scorer, mo, bonus, noise, rng);
    for (b, p) in scorer.best.iter_mut().zip(&penalty) {
        *b -= p;
    }
    let rows = scorer.top_k(k);
    let chosen: Vec<u16> = rows.iter().map(|&r| scorer.arg[r]).collect();
    let o = Optimism {
        bonus,
        noise,
        penalty: &penalty,
    };
    let hits = optimistic_hits(mo, o, k, &rows, &chosen, draws, rng);
    (rows, chosen, hits)
}
