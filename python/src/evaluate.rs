//! Off-policy evaluation: logged feedback as arrays (an obp-style
//! `bandit_feedback` or a DataFrame's columns), as a CSV file (read as
//! `smartmsg evaluate --logged FILE.csv` reads it), or as a campaign log
//! with domain policies as targets (as `smartmsg evaluate --policy`).

use std::path::PathBuf;
use std::sync::Arc;

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use smartmsg_simulator::ope::estimate::{self, Estimate, Options};
use smartmsg_simulator::ope::{load, policy_target, slate, LoggedData, OpeError, TargetProbs};
use smartmsg_simulator::{PolicyName, SimPopulation};

use crate::errors::{self, raise, Kind};

/// One estimator's row: name, value, interval, effective sample size.
type Row = (String, f64, f64, f64, f64);

fn rows(est: Vec<Estimate>) -> Vec<Row> {
    est.into_iter()
        .map(|e| (e.estimator, e.value, e.ci_low, e.ci_high, e.ess))
        .collect()
}

/// The estimation options, as `smartmsg evaluate`'s flags set them.
fn options(
    bootstrap: usize,
    seed: u64,
    confidence: f64,
    switch_tau: f64,
    ridge: f64,
    min_rows: usize,
    threads: usize,
) -> PyResult<Options> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(raise(
            Kind::Refused,
            format!("confidence {confidence} is not in (0, 1)"),
        ));
    }
    let mut o = Options::default();
    o.bootstrap = bootstrap;
    o.seed = seed;
    o.confidence = confidence;
    o.switch_tau = switch_tau;
    o.ridge = ridge;
    o.min_rows = min_rows;
    o.threads = threads;
    Ok(o)
}

/// Bad rows reported at most (as the CSV reader).
const MAX_BAD: usize = 50;

/// Estimates from arrays: `action` (indices into `action_names`),
/// `reward`, `pscore` (the logging propensity of the logged action),
/// optional `context` (rows × features) and `target` (rows × actions).
/// Returns every estimator's row (DM, IPW, SNIPW, DR, SNDR, switch-DR).
#[pyfunction]
#[pyo3(signature = (action, reward, pscore, target, action_names, context=None, feature_names=None, *, bootstrap=500, seed=0, confidence=0.95, switch_tau=10.0, ridge=1.0, min_rows=20, threads=0, origin="bandit_feedback".to_owned()))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_arrays(
    py: Python<'_>,
    action: PyReadonlyArray1<'_, i64>,
    reward: PyReadonlyArray1<'_, f64>,
    pscore: PyReadonlyArray1<'_, f64>,
    target: PyReadonlyArray2<'_, f64>,
    action_names: Vec<String>,
    context: Option<PyReadonlyArray2<'_, f64>>,
    feature_names: Option<Vec<String>>,
    bootstrap: usize,
    seed: u64,
    confidence: f64,
    switch_tau: f64,
    ridge: f64,
    min_rows: usize,
    threads: usize,
    origin: String,
) -> PyResult<Vec<Row>> {
    let opts = options(
        bootstrap, seed, confidence, switch_tau, ridge, min_rows, threads,
    )?;
    let data = logged_from_arrays(
        &action,
        &reward,
        &pscore,
        context.as_ref(),
        feature_names,
        action_names,
        &origin,
    )?;
    let shape = target.shape();
    let (t_rows, t_actions) = (shape[0], shape[1]);
    let probs = target.as_slice().map_err(PyErr::from)?.to_vec();
    py.detach(move || {
        let t = TargetProbs::new(t_rows, t_actions, probs)?;
        estimate::estimate(&data, &t, &opts)
    })
    .map(rows)
    .map_err(errors::ope)
}

/// Checks and copies the arrays into [`LoggedData`]; bad rows are listed
/// (0-based row numbers) with the CSV reader's reasons.
fn logged_from_arrays(
    action: &PyReadonlyArray1<'_, i64>,
    reward: &PyReadonlyArray1<'_, f64>,
    pscore: &PyReadonlyArray1<'_, f64>,
    context: Option<&PyReadonlyArray2<'_, f64>>,
    feature_names: Option<Vec<String>>,
    action_names: Vec<String>,
    origin: &str,
) -> PyResult<LoggedData> {
    let action = action.as_slice().map_err(PyErr::from)?;
    let reward = reward.as_slice().map_err(PyErr::from)?;
    let pscore = pscore.as_slice().map_err(PyErr::from)?;
    let n = action.len();
    for (name, len) in [("reward", reward.len()), ("pscore", pscore.len())] {
        if len != n {
            return Err(raise(
                Kind::Data,
                format!("{origin}: `{name}` has {len} rows, `action` has {n}"),
            ));
        }
    }
    let k = action_names.len();
    let (features, dim) = match context {
        Some(c) => {
            let shape = c.shape();
            if shape[0] != n {
                return Err(raise(
                    Kind::Data,
                    format!(
                        "{origin}: `context` has {} rows, `action` has {n}",
                        shape[0]
                    ),
                ));
            }
            (c.as_slice().map_err(PyErr::from)?.to_vec(), shape[1])
        }
        None => (Vec::new(), 0),
    };
    let feature_names = match feature_names {
        Some(f) if f.len() == dim => f,
        Some(f) => {
            return Err(raise(
                Kind::Data,
                format!(
                    "{origin}: {} feature names for {dim} context columns",
                    f.len()
                ),
            ))
        }
        None => (0..dim).map(|j| format!("x_{j}")).collect(),
    };
    let mut bad: Vec<(usize, String)> = Vec::new();
    let mut count = 0usize;
    let mut acts = Vec::with_capacity(n);
    for i in 0..n {
        let mut why = Vec::new();
        let a = action[i];
        if a < 0 || a as u64 >= k as u64 {
            why.push(format!("unknown action `{a}` ({k} actions)"));
        }
        let r = reward[i];
        if !r.is_finite() {
            why.push(format!("non-numeric reward `{r}`"));
        }
        let p = pscore[i];
        if !(p > 0.0 && p <= 1.0) {
            why.push(if p.is_finite() && p <= 0.0 {
                format!("non-positive propensity {p}")
            } else {
                format!("propensity {p} outside (0, 1]")
            });
        }
        if dim > 0 {
            if let Some(j) = features[i * dim..(i + 1) * dim]
                .iter()
                .position(|v| !v.is_finite())
            {
                why.push(format!("non-numeric feature `{}`", feature_names[j]));
            }
        }
        if why.is_empty() {
            acts.push(a as usize);
        } else {
            count += 1;
            if bad.len() < MAX_BAD {
                bad.push((i, why.join("; ")));
            }
        }
    }
    if count > 0 {
        let listed: Vec<String> = bad.iter().map(|(i, r)| format!("  row {i}: {r}")).collect();
        return Err(raise(
            Kind::Data,
            format!("{origin}: {count} bad row(s):\n{}", listed.join("\n")),
        ));
    }
    Ok(LoggedData {
        feature_names,
        features,
        actions: action_names,
        action: acts,
        slot: None,
        timestamp: None,
        reward: reward.to_vec(),
        propensity: pscore.to_vec(),
    })
}

/// Estimates from a CSV file read as `smartmsg evaluate --logged FILE.csv`
/// reads it (same column options), with the target as a probabilities
/// CSV (`target_probs`, as `--target-probs`) or an array (rows × actions,
/// columns in the data's action order). Returns the estimator rows, the
/// row count and the action names.
#[pyfunction]
#[pyo3(signature = (path, *, target_probs=None, target=None, action_col="action".to_owned(), reward_col="reward".to_owned(), propensity_col="propensity".to_owned(), slot_col=None, timestamp_col=None, feature_cols=Vec::new(), actions=None, bootstrap=500, seed=0, confidence=0.95, switch_tau=10.0, ridge=1.0, min_rows=20, threads=0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_csv(
    py: Python<'_>,
    path: PathBuf,
    target_probs: Option<PathBuf>,
    target: Option<PyReadonlyArray2<'_, f64>>,
    action_col: String,
    reward_col: String,
    propensity_col: String,
    slot_col: Option<String>,
    timestamp_col: Option<String>,
    feature_cols: Vec<String>,
    actions: Option<Vec<String>>,
    bootstrap: usize,
    seed: u64,
    confidence: f64,
    switch_tau: f64,
    ridge: f64,
    min_rows: usize,
    threads: usize,
) -> PyResult<(Vec<Row>, usize, Vec<String>)> {
    let opts = options(
        bootstrap, seed, confidence, switch_tau, ridge, min_rows, threads,
    )?;
    let target = match (target_probs, target) {
        (Some(p), None) => Target::File(p),
        (None, Some(t)) => {
            let shape = t.shape();
            Target::Array(
                shape[0],
                shape[1],
                t.as_slice().map_err(PyErr::from)?.to_vec(),
            )
        }
        _ => {
            return Err(raise(
                Kind::Refused,
                "give exactly one of target_probs and target",
            ))
        }
    };
    let cols = load::Columns {
        timestamp: timestamp_col,
        features: feature_cols,
        action: action_col,
        slot: slot_col,
        reward: reward_col,
        propensity: propensity_col,
        actions,
    };
    py.detach(move || {
        let data = load::read_csv(&path, &cols)?;
        let t = match target {
            Target::File(p) => {
                let f = std::fs::File::open(&p).map_err(|e| OpeError::Read {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                load::read_target_probs(std::io::BufReader::new(f), &p, &data)?
            }
            Target::Array(r, c, probs) => TargetProbs::new(r, c, probs)?,
        };
        let est = estimate::estimate(&data, &t, &opts)?;
        Ok((rows(est), data.len(), data.actions))
    })
    .map_err(errors::ope)
}

enum Target {
    File(PathBuf),
    Array(usize, usize, Vec<f64>),
}

/// Evaluates domain policies on a campaign log (a data directory or an
/// exported JSON Lines file), as `smartmsg evaluate --logged LOG --policy
/// NAMES [--slate]` does. Returns a dict: `rows`, `actions`,
/// `logged_mean_reward`, `logged_true_value`, and `targets`, a list of
/// dicts (`target`, `level`, `true_value`, then `estimates` or `refused`).
#[pyfunction]
#[pyo3(signature = (path, policies, *, slate=false, scenario=None, scenario_json=None, scenario_seed=None, population=None, draws=20, bootstrap=500, seed=0, confidence=0.95, switch_tau=10.0, ridge=1.0, min_rows=20, threads=0))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn evaluate_log<'py>(
    py: Python<'py>,
    path: PathBuf,
    policies: Vec<String>,
    slate: bool,
    scenario: Option<String>,
    scenario_json: Option<String>,
    scenario_seed: Option<u64>,
    population: Option<PathBuf>,
    draws: usize,
    bootstrap: usize,
    seed: u64,
    confidence: f64,
    switch_tau: f64,
    ridge: f64,
    min_rows: usize,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(
        bootstrap, seed, confidence, switch_tau, ridge, min_rows, threads,
    )?;
    let names: Vec<PolicyName> = policies
        .iter()
        .map(|n| {
            n.trim()
                .parse::<PolicyName>()
                .map_err(|e| raise(Kind::Refused, e.to_string()))
        })
        .collect::<PyResult<_>>()?;
    let mut scenario = crate::simulate::load_scenario(scenario.as_deref(), scenario_json)?;
    if let Some(s) = scenario_seed {
        scenario.seed = s;
    }
    let events = crate::log::read_events(&path)?;
    let out = py.detach(move || -> Result<LogEvaluation, PyErr> {
        let pop = match &population {
            Some(p) => SimPopulation::from_csv(p),
            None => SimPopulation::generate(&scenario),
        }
        .map_err(|e| raise(Kind::Scenario, errors::chain(&e)))?;
        let pop = Arc::new(pop);
        let (data, rows_) =
            load::from_events(&events, pop.len(), pop.creatives(), pop.dim(), |u| {
                pop.features(u)
                    .map(|x| x.iter().map(|&v| f64::from(v)).collect())
            })
            .map_err(errors::ope)?;
        if data.is_empty() {
            return Err(raise(
                Kind::Refused,
                "refusing to estimate: the log holds no planned batch",
            ));
        }
        let logged_true = rows_
            .iter()
            .zip(&data.action)
            .map(|(r, &c)| pop.probability(r.user, c as u16))
            .sum::<f64>()
            / rows_.len() as f64;
        let mean = data.reward.iter().sum::<f64>() / data.len() as f64;
        let mut targets = Vec::new();
        for name in names {
            let (result, truth) = if slate {
                let model = estimate::RewardModel::fit(&data, opts.ridge);
                match slate::slate_target(name, &scenario, &pop, &data, &rows_, &model, draws, seed)
                {
                    Ok(t) => (slate::estimate(&t, &opts), t.true_value),
                    Err(e) => (Err(e), f64::NAN),
                }
            } else {
                let t =
                    policy_target::policy_probs(name, &scenario, &pop, &data, &rows_, draws, seed)
                        .map_err(errors::ope)?;
                let truth = policy_target::true_value(&pop, &rows_, &t);
                (estimate::estimate(&data, &t, &opts), truth)
            };
            targets.push((
                name.to_string(),
                result.map(rows).map_err(|e| e.to_string()),
                truth,
            ));
        }
        Ok(LogEvaluation {
            rows: data.len(),
            actions: data.actions,
            logged_mean_reward: mean,
            logged_true_value: logged_true,
            targets,
        })
    })?;
    let d = PyDict::new(py);
    d.set_item("rows", out.rows)?;
    d.set_item("actions", out.actions)?;
    d.set_item("logged_mean_reward", out.logged_mean_reward)?;
    d.set_item("logged_true_value", out.logged_true_value)?;
    d.set_item("level", if slate { "batch" } else { "row" })?;
    let mut list = Vec::new();
    for (name, result, truth) in out.targets {
        let t = PyDict::new(py);
        t.set_item("target", name)?;
        t.set_item("true_value", truth.is_finite().then_some(truth))?;
        match result {
            Ok(r) => t.set_item("estimates", r)?,
            Err(e) => t.set_item("refused", e)?,
        }
        list.push(t);
    }
    d.set_item("targets", list)?;
    Ok(d)
}

struct LogEvaluation {
    rows: usize,
    actions: Vec<String>,
    logged_mean_reward: f64,
    logged_true_value: f64,
    targets: Vec<(String, Result<Vec<Row>, String>, f64)>,
}
