//! Batch-level off-policy evaluation of a served campaign from its own log
//! (what `smartmsg serve` runs as an evaluation job, and `smartmsg
//! evaluate --slate` does for a simulated run): the campaign's planned
//! batches and counted reactions become logged rows, and each target
//! policy is evaluated as a whole (whom it would message, with which
//! creative, batch by batch) with [`super::slate`]. A real campaign's true
//! reaction probabilities are unknown, so there is no true value, only the
//! estimates with their intervals.

use serde::Serialize;
use smartmsg_domain::{Audience, CampaignSpec, PolicySpec};
use smartmsg_engine::RecordedEvent;

use super::estimate::{Estimate, Options, RewardModel};
use super::load::from_events;
use super::slate::{estimate, slate_target_in, SlateWorld};
use super::OpeError;

/// A served campaign's log and what it was run with.
#[derive(Debug, Clone, Copy)]
pub struct ServedCampaign<'a> {
    /// Its spec (batch count, budget, creatives).
    pub spec: &'a CampaignSpec,
    /// Its audience.
    pub audience: &'a Audience,
    /// Its events: the campaign stream (`BatchPlanned`) and the pipeline's
    /// per-user outcomes, of this campaign only.
    pub events: &'a [RecordedEvent],
}

/// One target's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetResult {
    /// The target's name.
    pub policy: String,
    /// The estimates (DM, IPW, SNIPW, DR, SNDR, switch-DR), if the log
    /// supports them.
    pub estimates: Vec<Estimate>,
    /// Why not, if it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An evaluation's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Logged rows (planned messages) it used.
    pub rows: usize,
    /// The logging policy's mean reward (reacted users per message).
    pub logged_mean_reward: f64,
    /// Monte Carlo draws per batch for each target.
    pub draws: usize,
    /// Each target's estimates of its reward per message.
    pub targets: Vec<TargetResult>,
}

/// The spec with its own propensity estimate switched off (only the
/// target's choices are counted).
fn quiet(spec: &PolicySpec) -> PolicySpec {
    let mut s = spec.clone();
    match &mut s {
        PolicySpec::CreativeThompson { propensity_draws } => *propensity_draws = 1,
        PolicySpec::Targeting { model, .. } | PolicySpec::Integrated { model } => {
            model.propensity_draws = 1;
        }
        _ => {}
    }
    s
}

/// Evaluates `targets` (name, spec) on `campaign`'s log with `draws`
/// plans per batch each. Fails when the log cannot be read as logged
/// feedback at all (nothing planned, or planned by a policy that does not
/// pick users uniformly: see [`super::load::UNIFORM_SELECTION`]); a
/// target the log cannot support gets its reason in [`TargetResult::error`].
pub fn evaluate_served(
    campaign: ServedCampaign<'_>,
    targets: &[(String, PolicySpec)],
    draws: usize,
    seed: u64,
    opts: &Options,
) -> Result<Evaluation, OpeError> {
    let k = campaign.spec.creatives.len();
    let aud = campaign.audience;
    let (data, rows) = from_events(campaign.events, aud.len(), k, aud.dim(), |u| {
        aud.features(u)
            .map(|x| x.iter().map(|&v| f64::from(v)).collect())
    })?;
    if data.is_empty() {
        return Err(OpeError::Unsupported(
            "the campaign has no planned batch yet".into(),
        ));
    }
    let model = RewardModel::fit(&data, opts.ridge);
    let features = |u: u32| aud.features(u);
    let world = SlateWorld {
        candidates: aud.candidates(),
        features: &features,
        batches: campaign.spec.batch_count(),
        budget: campaign.spec.budget,
        truth: None,
    };
    let nominal = campaign.spec.nominal_batch_size(0);
    let mut out = Vec::with_capacity(targets.len());
    for (name, spec) in targets {
        let r = quiet(spec)
            .build(k, aud.dim(), nominal)
            .map_err(|e| OpeError::Target(format!("{name}: {e}")))
            .and_then(|p| slate_target_in(name, p, &world, &data, &rows, &model, draws, seed))
            .and_then(|t| estimate(&t, opts));
        out.push(match r {
            Ok(estimates) => TargetResult {
                policy: name.clone(),
                estimates,
                error: None,
            },
            Err(e) => TargetResult {
                policy: name.clone(),
                estimates: Vec::new(),
                error: Some(e.to_string()),
            },
        });
    }
    Ok(Evaluation {
        rows: data.len(),
        logged_mean_reward: data.reward.iter().sum::<f64>() / data.len() as f64,
        draws,
        targets: out,
    })
}
