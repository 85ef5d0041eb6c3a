//! Batch-level off-policy evaluation: *whom* a policy messages and with
//! which creative, not only its creative choice on the logged users.
//!
//! A campaign's batch `b` is a slate: the logging policy sent `B_b`
//! messages, and recorded for each the joint propensity
//! `μ_b(u, a) = P(user u in the batch with creative a)`. A target policy,
//! planning the same `B_b` messages from the same candidates (every user not
//! messaged in the logged batches before `b`), has its own joint
//! probabilities `π_b(u, a)`. Its value per message is
//!
//! ```text
//! V = Σ_b Σ_{u,a} π_b(u, a) · E[r | u, a]  /  Σ_b B_b
//! ```
//!
//! and, because `Σ_{u,a} μ_b(u, a) = B_b`, the importance weight of a
//! logged row is `w = π_b(u, a) / μ_b(u, a)` with the per-row estimators
//! unchanged (IPW `mean(w r)`, SNIPW, DR, SNDR, switch-DR). The direct
//! method needs the target's whole slate: `DM = Σ_b Σ_{u,a} π_b(u, a) q̂(u, a)
//! / Σ_b B_b`, which each row of batch `b` carries as `1 / B_b` of its
//! batch's term.
//!
//! `π_b` is estimated by Monte Carlo: the target plans the batch `draws`
//! times (each with its own seeded generator; the policy's own propensity
//! estimate is switched off, since only its choices are counted), and
//! `π_b(u, a)` is the share of draws sending `u` creative `a` (an unbiased
//! estimate, so IPW stays unbiased). Between batches the target learns from
//! the logged outcomes of the batch, as [`super::policy_target`] does.
//!
//! Support: the logged propensities must cover every decision the target
//! makes. For the uniform-selection logging policies (whose creative choice
//! does not depend on the user) this holds when, in each batch, every
//! creative the target uses was logged in that batch; otherwise the target's
//! mass on unlogged creatives is reported and nothing is estimated.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use smartmsg_domain::{Candidates, PlanContext, UserSet};

use super::estimate::{RewardModel, Row};
use super::load::CampaignRow;
use super::policy_target::learn_from_batch;
use super::{LoggedData, OpeError};
use crate::policies::{self, PolicyName};
use crate::population::SimPopulation;
use crate::scenario::Scenario;

/// The rows for [`super::estimate::estimate_rows`] and the target's true
/// value (known to the simulator).
#[derive(Debug, Clone)]
pub struct SlateTarget {
    /// One per logged row, in the data's order.
    pub rows: Vec<Row>,
    /// The target's true value per message on these batches (NaN when
    /// the world's truth is unknown).
    pub true_value: f64,
}

/// Runs every estimator on the batch-level rows, refusing when the data
/// cannot support it.
pub fn estimate(
    target: &SlateTarget,
    opts: &super::estimate::Options,
) -> Result<Vec<super::estimate::Estimate>, OpeError> {
    if target.rows.len() < opts.min_rows {
        return Err(OpeError::Unsupported(format!(
            "{} rows; at least {} are needed",
            target.rows.len(),
            opts.min_rows
        )));
    }
    if target.rows.iter().all(|r| r.w == 0.0) {
        return Err(OpeError::Unsupported(
            "the target never made a logged decision in any of its draws (every importance weight is 0): raise --draws, or the target is too far from the logging policy".into(),
        ));
    }
    Ok(super::estimate::estimate_rows(&target.rows, opts))
}

/// What the batch-level evaluation needs of a campaign's world: its
/// audience (every candidate with features), its batch count and budget,
/// and the users' true reaction probabilities when they are known (the
/// simulator's; a real campaign's are not).
pub struct SlateWorld<'a> {
    /// The campaign's audience.
    pub candidates: &'a Candidates,
    /// A user's features.
    pub features: &'a (dyn Fn(u32) -> Option<&'a [f32]> + Sync),
    /// The campaign's number of batches.
    pub batches: u32,
    /// The campaign's budget.
    pub budget: u64,
    /// `P(user reacts to creative)`, when known.
    pub truth: Option<&'a (dyn Fn(u32, u16) -> f64 + Sync)>,
}

/// Prepares the batch-level evaluation of `policy` on a campaign log (see
/// the module docs). `data` and `rows` come from [`super::load::from_events`];
/// `model` is the reward model fitted on `data`.
#[allow(clippy::too_many_arguments)]
pub fn slate_target(
    policy: PolicyName,
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    data: &LoggedData,
    rows: &[CampaignRow],
    model: &RewardModel,
    draws: usize,
    seed: u64,
) -> Result<SlateTarget, OpeError> {
    let err = |e: String| OpeError::Target(format!("{policy}: {e}"));
    if data.actions.len() != pop.creatives() {
        return Err(err(format!(
            "the log has {} creatives, the population {}",
            data.actions.len(),
            pop.creatives()
        )));
    }
    // The target's own propensity estimate is not needed: only its choices
    // are counted.
    let mut quiet = scenario.clone();
    quiet.policies.propensity_draws = 1;
    let p = policies::build(policy, &quiet, pop).map_err(|e| err(e.to_string()))?;
    let features = |u: u32| pop.features(u);
    let truth = |u: u32, c: u16| pop.probability(u, c);
    let world = SlateWorld {
        candidates: pop.candidates(),
        features: &features,
        batches: scenario.campaign.batches,
        budget: scenario.campaign.budget,
        truth: Some(&truth),
    };
    slate_target_in(
        &policy.to_string(),
        p,
        &world,
        data,
        rows,
        model,
        draws,
        seed,
    )
}

/// [`slate_target`] for any campaign: the target `p` (a fresh policy; its
/// own propensity estimate is not used), named `label` in errors, planning
/// in `world`. The true value is NaN when `world.truth` is `None`.
#[allow(clippy::too_many_arguments)]
pub fn slate_target_in(
    label: &str,
    mut p: Box<dyn smartmsg_domain::Policy>,
    world: &SlateWorld<'_>,
    data: &LoggedData,
    rows: &[CampaignRow],
    model: &RewardModel,
    draws: usize,
    seed: u64,
) -> Result<SlateTarget, OpeError> {
    let policy = label;
    let k = data.actions.len();
    let err = |e: String| OpeError::Target(format!("{policy}: {e}"));
    if rows.len() != data.len() {
        return Err(err(format!(
            "the log has {} rows, the campaign rows {}",
            data.len(),
            rows.len()
        )));
    }
    let mut by_batch: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_batch.entry(r.batch).or_default().push(i);
    }
    let draws = draws.max(1);
    let mut out = vec![
        Row {
            w: 0.0,
            r: 0.0,
            q: 0.0,
            dm: 0.0
        };
        rows.len()
    ];
    let mut messaged = UserSet::new();
    let mut planned_per_creative = vec![0u64; k];
    let mut reserved = 0u64;
    let mut true_total = 0.0;
    let mut x64 = vec![0.0f64; world.candidates.dim()];
    for (&batch, idx) in &by_batch {
        let mut cands = world.candidates.clone();
        cands.retain_unmessaged(&messaged);
        let ctx = PlanContext {
            batch,
            batch_count: world.batches,
            creatives: k,
            remaining_budget: world.budget.saturating_sub(reserved),
            planned_per_creative: planned_per_creative.clone(),
        };
        // Logged (user, creative) → row; counts of the target choosing it.
        let logged: HashMap<(u32, u16), usize> = idx
            .iter()
            .map(|&i| ((rows[i].user, data.action[i] as u16), i))
            .collect();
        let mut logged_creatives = vec![false; k];
        for &i in idx {
            logged_creatives[data.action[i]] = true;
        }
        let mut hits = vec![0u32; idx.len()];
        let pos: HashMap<usize, usize> = idx.iter().enumerate().map(|(j, &i)| (i, j)).collect();
        let (mut dm_sum, mut true_sum) = (0.0, 0.0);
        let mut unlogged = vec![0u64; k];
        for m in 0..draws {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (u64::from(batch) << 32) ^ (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let d = p
                .plan(&ctx, &cands, idx.len(), &mut rng)
                .map_err(|e| err(e.to_string()))?;
            for (u, c, _) in d.iter() {
                let a = usize::from(c);
                if a >= k {
                    return Err(err(format!("planned creative {c}; the log has {k}")));
                }
                if !logged_creatives[a] {
                    unlogged[a] += 1;
                }
                let x = (world.features)(u)
                    .ok_or_else(|| err(format!("planned user {u}, not in the audience")))?;
                for (t, &v) in x64.iter_mut().zip(x) {
                    *t = f64::from(v);
                }
                dm_sum += model.predict(&x64, a);
                if let Some(t) = world.truth {
                    true_sum += t(u, c);
                }
                if let Some(&i) = logged.get(&(u, c)) {
                    hits[pos[&i]] += 1;
                }
            }
        }
        if let Some(a) = (0..k).find(|&a| unlogged[a] > 0) {
            return Err(OpeError::Unsupported(format!(
                "{policy}: in batch {batch} the target sends creative {} in {:.1} % of its messages, but the logged batch never sent it (no propensity covers those decisions)",
                data.actions[a],
                100.0 * unlogged[a] as f64 / (draws * idx.len()).max(1) as f64
            )));
        }
        let b = idx.len() as f64;
        let dm_row = dm_sum / draws as f64 / b;
        true_total += true_sum / draws as f64;
        for (j, &i) in idx.iter().enumerate() {
            let a = data.action[i];
            let pi = f64::from(hits[j]) / draws as f64;
            let mu = rows[i].joint;
            if !(mu > 0.0 && mu <= 1.0) {
                return Err(OpeError::Unsupported(format!(
                    "batch {batch}, user {}: recorded propensity {mu} is outside (0, 1]",
                    rows[i].user
                )));
            }
            out[i] = Row {
                w: pi / mu,
                r: data.reward[i],
                q: model.predict(data.x(i), a),
                dm: dm_row,
            };
        }
        // Learn from the batch's logged outcomes; the logged users are gone
        // from the next batch's candidates.
        learn_from_batch(
            &mut *p,
            world.features,
            world.candidates.dim(),
            data,
            rows,
            idx,
            &mut planned_per_creative,
        )
        .map_err(err)?;
        messaged.extend_from(&idx.iter().map(|&i| rows[i].user).collect::<Vec<_>>());
        reserved += idx.len() as u64;
    }
    Ok(SlateTarget {
        rows: out,
        true_value: if world.truth.is_none() {
            f64::NAN
        } else if rows.is_empty() {
            0.0
        } else {
            true_total / rows.len() as f64
        },
    })
}
