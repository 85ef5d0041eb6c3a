//! The evaluator `smartmsg serve` gives its evaluation jobs: the
//! simulator's batch-level off-policy estimators
//! (`smartmsg_simulator::ope::served`, what `smartmsg evaluate --slate`
//! runs), on the campaign's own log.

use smartmsg_service::http::evaluation::{EvaluationInput, Evaluator};
use smartmsg_simulator::ope::estimate::Options;
use smartmsg_simulator::ope::served::{evaluate_served, ServedCampaign};

/// See the [module docs](self).
#[derive(Debug, Default, Clone, Copy)]
pub struct SlateEvaluator;

impl Evaluator for SlateEvaluator {
    fn evaluate(&self, input: EvaluationInput<'_>) -> Result<serde_json::Value, String> {
        let r = input.request;
        let opts = {
            let mut v = Options::default();
            v.bootstrap = r.bootstrap;
            v.seed = r.seed;
            v
        };
        let targets: Vec<_> = r
            .policies
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect();
        let e = evaluate_served(
            ServedCampaign {
                spec: input.spec,
                audience: input.audience,
                events: input.events,
            },
            &targets,
            r.draws,
            r.seed,
            &opts,
        )
        .map_err(|e| e.to_string())?;
        serde_json::to_value(&e).map_err(|e| e.to_string())
    }
}
