//! The domain policies, one batch at a time: `plan` a batch over
//! candidates (each decision with its propensity), `update` from
//! outcomes.

use std::sync::Mutex;

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use smartmsg_domain::{Candidates, Outcomes, PlanContext, PolicySpec};
use smartmsg_simulator::{policies, PolicyName};

use crate::errors::{chain, raise, Kind};

/// A domain policy (`random`, `explore-then-commit`, `creative-thompson`,
/// `targeting`, `integrated`, configured as the scenario configures it
/// for `simulate`, or any `PolicySpec` given as JSON) with its own seeded
/// generator: the same seed and the same calls give the same plans.
#[pyclass(module = "smartmsg._native")]
pub(crate) struct Policy {
    inner: Mutex<(Box<dyn smartmsg_domain::Policy>, ChaCha8Rng)>,
    creatives: usize,
    dim: usize,
    spec: String,
}

fn perr(e: &(dyn std::error::Error + 'static)) -> PyErr {
    raise(Kind::Policy, chain(e))
}

#[pymethods]
impl Policy {
    /// Builds the policy: `spec` is a policy name (configured from the
    /// scenario's policy settings: default the classic scenario's) or a
    /// `PolicySpec` as JSON text (`{"kind": "integrated", ...}`).
    #[new]
    #[pyo3(signature = (spec, creatives, dim, *, largest_batch=1000, seed=0, creative=0, scenario=None, scenario_json=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: String,
        creatives: usize,
        dim: usize,
        largest_batch: u64,
        seed: u64,
        creative: u16,
        scenario: Option<String>,
        scenario_json: Option<String>,
    ) -> PyResult<Self> {
        let parsed: PolicySpec = if spec.trim_start().starts_with('{') {
            serde_json::from_str(&spec)
                .map_err(|e| raise(Kind::Policy, format!("policy spec: {e}")))?
        } else {
            let name: PolicyName = spec.trim().parse().map_err(|e| perr(&e))?;
            let s = crate::simulate::load_scenario(scenario.as_deref(), scenario_json)?;
            match name {
                PolicyName::Oracle => {
                    return Err(raise(
                        Kind::Policy,
                        "the oracle knows the simulated users' true probabilities: it runs in simulate only",
                    ))
                }
                PolicyName::Targeting => PolicySpec::Targeting {
                    creative,
                    model: policies::model_config(&s),
                },
                PolicyName::Integrated => PolicySpec::Integrated {
                    model: policies::model_config(&s),
                },
                PolicyName::CreativeThompson => PolicySpec::CreativeThompson {
                    propensity_draws: s.policies.propensity_draws,
                },
                PolicyName::ExploreThenCommit => PolicySpec::ExploreThenCommit {
                    test_per_creative: s.policies.explore_test_per_creative,
                },
                PolicyName::Random => PolicySpec::Random {},
            }
        };
        let built = parsed
            .build(creatives, dim, largest_batch)
            .map_err(|e| perr(&e))?;
        let spec = serde_json::to_string(&parsed).map_err(|e| perr(&e))?;
        Ok(Self {
            inner: Mutex::new((built, ChaCha8Rng::seed_from_u64(seed))),
            creatives,
            dim,
            spec,
        })
    }

    /// The policy's spec as JSON text.
    #[getter]
    fn spec(&self) -> String {
        self.spec.clone()
    }

    /// The number of creatives.
    #[getter]
    fn creatives(&self) -> usize {
        self.creatives
    }

    /// The number of features.
    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    /// Plans one batch of at most `budget` of the candidates (`users`,
    /// `features`: rows × dim). Returns (users, creatives, propensities)
    /// in candidate order.
    #[pyo3(signature = (users, features, budget, *, batch=0, batch_count=1, remaining_budget=None, planned_per_creative=None))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        users: PyReadonlyArray1<'py, u32>,
        features: PyReadonlyArray2<'py, f32>,
        budget: usize,
        batch: u32,
        batch_count: u32,
        remaining_budget: Option<u64>,
        planned_per_creative: Option<Vec<u64>>,
    ) -> PyResult<(
        Bound<'py, PyArray1<u32>>,
        Bound<'py, PyArray1<u16>>,
        Bound<'py, PyArray1<f32>>,
    )> {
        let shape = features.shape();
        if shape[1] != self.dim && shape[0] > 0 {
            return Err(raise(
                Kind::Policy,
                format!(
                    "candidates have {} features; the policy has {}",
                    shape[1], self.dim
                ),
            ));
        }
        let cands = Candidates::from_parts(
            self.dim,
            users.as_slice().map_err(PyErr::from)?.to_vec(),
            features.as_slice().map_err(PyErr::from)?.to_vec(),
        )
        .map_err(|e| perr(&e))?;
        let planned = planned_per_creative.unwrap_or_else(|| vec![0; self.creatives]);
        if planned.len() != self.creatives {
            return Err(raise(
                Kind::Policy,
                format!(
                    "planned_per_creative has {} entries for {} creatives",
                    planned.len(),
                    self.creatives
                ),
            ));
        }
        let ctx = PlanContext {
            batch,
            batch_count,
            creatives: self.creatives,
            remaining_budget: remaining_budget.unwrap_or(budget as u64),
            planned_per_creative: planned,
        };
        let d = py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (p, rng) = &mut *guard;
            p.plan(&ctx, &cands, budget, rng)
        });
        let d = d.map_err(|e| perr(&e))?;
        Ok((
            d.users.into_pyarray(py),
            d.creatives.into_pyarray(py),
            d.propensities.into_pyarray(py),
        ))
    }

    /// Learns from outcomes: per row, `sent` messages of `creative` to
    /// users with `features` (or a bucket represented by them), `reacted`
    /// of which reacted. On error the model is unchanged.
    fn update(
        &self,
        py: Python<'_>,
        creative: PyReadonlyArray1<'_, u16>,
        features: PyReadonlyArray2<'_, f32>,
        sent: PyReadonlyArray1<'_, u32>,
        reacted: PyReadonlyArray1<'_, u32>,
    ) -> PyResult<()> {
        let c = creative.as_slice().map_err(PyErr::from)?;
        let x = features.as_slice().map_err(PyErr::from)?;
        let n = sent.as_slice().map_err(PyErr::from)?;
        let r = reacted.as_slice().map_err(PyErr::from)?;
        let rows = c.len();
        if n.len() != rows || r.len() != rows || features.shape()[0] != rows {
            return Err(raise(
                Kind::Policy,
                format!(
                    "outcomes: {rows} creatives, {} feature rows, {} sent, {} reacted",
                    features.shape()[0],
                    n.len(),
                    r.len()
                ),
            ));
        }
        if rows > 0 && features.shape()[1] != self.dim {
            return Err(raise(
                Kind::Policy,
                format!(
                    "outcomes have {} features; the policy has {}",
                    features.shape()[1],
                    self.dim
                ),
            ));
        }
        let mut o = Outcomes::new(self.dim).map_err(|e| perr(&e))?;
        for i in 0..rows {
            o.push(c[i], &x[i * self.dim..(i + 1) * self.dim], n[i], r[i])
                .map_err(|e| raise(Kind::Policy, format!("outcome row {i}: {e}")))?;
        }
        py.detach(|| {
            let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            guard.0.update(&o)
        })
        .map_err(|e| perr(&e))
    }
}
