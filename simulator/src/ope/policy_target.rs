//! A domain [`Policy`](smartmsg_domain::Policy) as a target: its action
//! (creative) probabilities on the rows logged by a campaign.
//!
//! Approximation (documented, Monte Carlo): batch by batch, in the logged
//! order, the target policy plans `draws` times over *the users the logged
//! policy chose for that batch* with a budget of all of them (so every user
//! gets a creative), each draw from its own seeded generator; `π(a | row)`
//! is the share of draws giving the row's user creative `a`. The policy
//! then learns from the batch's logged outcomes (as the real policy would
//! from the feedback of the batches it planned), and the next batch
//! follows. What is evaluated is therefore the policy's *creative choice
//! on the logged users*: which users a policy would pick lies outside
//! what the logged rows can tell.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use smartmsg_domain::{Candidates, Outcomes, PlanContext};

use super::load::CampaignRow;
use super::{LoggedData, OpeError, TargetProbs};
use crate::policies::{self, PolicyName};
use crate::population::SimPopulation;
use crate::scenario::Scenario;

/// `π(a | row)` of `policy` on the rows of a campaign log (see the module
/// docs).
pub fn policy_probs(
    policy: PolicyName,
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    data: &LoggedData,
    rows: &[CampaignRow],
    draws: usize,
    seed: u64,
) -> Result<TargetProbs, OpeError> {
    let k = data.actions.len();
    let err = |e: String| OpeError::Target(format!("{policy}: {e}"));
    if k != pop.creatives() {
        return Err(err(format!(
            "the log has {k} creatives, the population {}",
            pop.creatives()
        )));
    }
    let mut p = policies::build(policy, scenario, pop).map_err(|e| err(e.to_string()))?;
    let mut by_batch: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_batch.entry(r.batch).or_default().push(i);
    }
    let mut probs = vec![0.0; rows.len() * k];
    let mut planned_per_creative = vec![0u64; k];
    let mut reserved = 0u64;
    for (&batch, idx) in &by_batch {
        let mut cands = Candidates::new(pop.dim()).map_err(|e| err(e.to_string()))?;
        let mut row_of: HashMap<u32, usize> = HashMap::new();
        for &i in idx {
            let u = rows[i].user;
            let x = pop
                .features(u)
                .ok_or_else(|| err(format!("user {u} is not in the population")))?;
            cands.push(u, x).map_err(|e| err(e.to_string()))?;
            row_of.insert(u, i);
        }
        let ctx = PlanContext {
            batch,
            batch_count: scenario.campaign.batches,
            creatives: k,
            remaining_budget: scenario.campaign.budget.saturating_sub(reserved),
            planned_per_creative: planned_per_creative.clone(),
        };
        let mut counts = vec![0u32; idx.len() * k];
        let mut chosen = vec![0u32; idx.len()];
        let pos: HashMap<usize, usize> = idx.iter().enumerate().map(|(j, &i)| (i, j)).collect();
        for m in 0..draws.max(1) {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (u64::from(batch) << 32) ^ (m as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let d = p
                .plan(&ctx, &cands, idx.len(), &mut rng)
                .map_err(|e| err(e.to_string()))?;
            for (u, c, _) in d.iter() {
                if let Some(&j) = row_of.get(&u).and_then(|i| pos.get(i)) {
                    if usize::from(c) < k {
                        counts[j * k + usize::from(c)] += 1;
                        chosen[j] += 1;
                    }
                }
            }
        }
        for (j, &i) in idx.iter().enumerate() {
            for a in 0..k {
                probs[i * k + a] = if chosen[j] == 0 {
                    1.0 / k as f64
                } else {
                    f64::from(counts[j * k + a]) / f64::from(chosen[j])
                };
            }
        }
        let features = |u: u32| pop.features(u);
        learn_from_batch(
            &mut *p,
            &features,
            pop.dim(),
            data,
            rows,
            idx,
            &mut planned_per_creative,
        )
        .map_err(err)?;
        reserved += idx.len() as u64;
    }
    TargetProbs::new(rows.len(), k, probs)
}

/// Feeds the logged outcomes of one batch (rows `idx`) to the target, as
/// the real policy learns from the feedback of the batches it planned, and
/// counts them in `planned_per_creative`.
pub(crate) fn learn_from_batch<'a>(
    p: &mut dyn smartmsg_domain::Policy,
    features: &(dyn Fn(u32) -> Option<&'a [f32]> + Sync),
    dim: usize,
    data: &LoggedData,
    rows: &[CampaignRow],
    idx: &[usize],
    planned_per_creative: &mut [u64],
) -> Result<(), String> {
    let mut o = Outcomes::new(dim).map_err(|e| e.to_string())?;
    for &i in idx {
        if let Some(x) = features(rows[i].user) {
            let a = data.action[i];
            o.push(a as u16, x, 1, u32::from(data.reward[i] > 0.0))
                .map_err(|e| e.to_string())?;
            planned_per_creative[a] += 1;
        }
    }
    p.update(&o).map_err(|e| e.to_string())
}

/// The target's true value on the logged users: `mean Σ_a π(a|u) p(u, a)`
/// with the population's true reaction probabilities.
pub fn true_value(pop: &SimPopulation, rows: &[CampaignRow], target: &TargetProbs) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            (0..target.actions)
                .map(|a| target.p(i, a) * pop.probability(r.user, a as u16))
                .sum::<f64>()
        })
        .sum::<f64>()
        / rows.len() as f64
}
