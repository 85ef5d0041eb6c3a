//! Simulations (`simulate`) and scenarios.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use smartmsg_simulator::runner::CompareOptions;
use smartmsg_simulator::scenario::TruthSpec;
use smartmsg_simulator::{compare, PolicyName, QueueKind, Scenario, SimPopulation};

use crate::errors::{chain, raise, Kind};

/// The scenario: `json` (a whole or partial scenario as JSON, the rest
/// defaulted), else `arg` (a built-in name or a `.toml`/`.json` file, as
/// the command's `--scenario`), else the classic one.
pub(crate) fn load_scenario(arg: Option<&str>, json: Option<String>) -> PyResult<Scenario> {
    if let Some(text) = json {
        return Scenario::from_json(&text, "the scenario dict")
            .map_err(|e| raise(Kind::Scenario, chain(&e)));
    }
    let Some(name) = arg else {
        return Ok(Scenario::classic());
    };
    let path = std::path::Path::new(name);
    if !path.exists() {
        return Scenario::builtin(name).ok_or_else(|| {
            raise(
                Kind::Scenario,
                format!(
                    "scenario {name}: no such file (built-ins are {})",
                    Scenario::BUILTINS.join(", ")
                ),
            )
        });
    }
    Scenario::load(path).map_err(|e| raise(Kind::Scenario, chain(&e)))
}

/// A scenario (built-in name, file, or JSON text) as JSON text, validated.
#[pyfunction]
#[pyo3(signature = (scenario=None, json=None))]
pub(crate) fn scenario_json(scenario: Option<String>, json: Option<String>) -> PyResult<String> {
    let s = load_scenario(scenario.as_deref(), json)?;
    serde_json::to_string(&s).map_err(|e| raise(Kind::Scenario, e.to_string()))
}

/// The population: a CSV file (`path`), CSV text (`text`, from a
/// DataFrame; `origin` names it in errors), or generated from the
/// scenario. A given population replaces the scenario's population and
/// truth, as `smartmsg simulate --population` does.
fn population(
    scenario: &mut Scenario,
    path: Option<PathBuf>,
    text: Option<String>,
) -> PyResult<SimPopulation> {
    let scenario_err = |e: &(dyn std::error::Error + 'static)| raise(Kind::Scenario, chain(e));
    let (pop, origin) = match (path, text) {
        (Some(p), _) => (
            SimPopulation::from_csv(&p).map_err(|e| scenario_err(&e))?,
            p.display().to_string(),
        ),
        (None, Some(t)) => {
            let origin = PathBuf::from("the population DataFrame");
            (
                SimPopulation::read_csv(t.as_bytes(), &origin).map_err(|e| scenario_err(&e))?,
                origin.display().to_string(),
            )
        }
        (None, None) => {
            return SimPopulation::generate(scenario).map_err(|e| scenario_err(&e));
        }
    };
    scenario.population.subscribers = pop.len() as u32;
    scenario.population.features = pop.dim();
    scenario.campaign.creatives = pop.creatives();
    if let TruthSpec::Explicit { .. } = scenario.truth {
        scenario.truth = Default::default();
    }
    scenario.validate().map_err(|e| {
        raise(
            Kind::Scenario,
            format!(
                "the scenario does not fit the population of {origin} ({} users, {} features, {} creatives): {}",
                pop.len(),
                pop.dim(),
                pop.creatives(),
                chain(&e)
            ),
        )
    })?;
    Ok(pop)
}

/// Runs a comparison of `policies` (default: all) on a scenario, as
/// `smartmsg simulate` does: the same scenario, population and seed give
/// the same report. `progress(done, total)` is called from the calling
/// thread about ten times a second with the batches run so far. Returns
/// the report as JSON text (`report.json`'s content) and the wall time in
/// seconds.
#[pyfunction]
#[pyo3(signature = (*, scenario=None, scenario_json=None, population_path=None, population_csv=None, policies=None, seed=None, data_dir=None, threads=None, in_memory_queue=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn simulate(
    py: Python<'_>,
    scenario: Option<String>,
    scenario_json: Option<String>,
    population_path: Option<PathBuf>,
    population_csv: Option<String>,
    policies: Option<Vec<String>>,
    seed: Option<u64>,
    data_dir: Option<PathBuf>,
    threads: Option<usize>,
    in_memory_queue: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<(String, f64)> {
    let mut scenario = load_scenario(scenario.as_deref(), scenario_json)?;
    if let Some(s) = seed {
        scenario.seed = s;
    }
    if scenario.name == "platform" {
        return Err(raise(
            Kind::Scenario,
            "the platform scenario runs from the command (smartmsg simulate --scenario platform)",
        ));
    }
    let policies: Vec<PolicyName> = match policies {
        None => PolicyName::ALL.to_vec(),
        Some(names) if names.len() == 1 && names[0] == "all" => PolicyName::ALL.to_vec(),
        Some(names) => names
            .iter()
            .map(|n| {
                n.trim()
                    .parse::<PolicyName>()
                    .map_err(|e| raise(Kind::Scenario, format!("{e}, or all")))
            })
            .collect::<PyResult<_>>()?,
    };
    let threads = match threads {
        Some(0) => return Err(raise(Kind::Simulation, "threads must be at least 1")),
        Some(t) => t.min(64),
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let started = Instant::now();
    let pop = Arc::new(py.detach(|| population(&mut scenario, population_path, population_csv))?);
    // A temporary directory lives (and is removed) with `_temp`.
    let (dir, _temp) = match data_dir {
        Some(d) => (d, None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("smartmsg-sim-")
                .tempdir()
                .map_err(|e| {
                    raise(
                        Kind::Simulation,
                        format!("creating a temporary data directory: {e}"),
                    )
                })?;
            (t.path().to_owned(), Some(t))
        }
    };
    let total = policies.len() as u64 * u64::from(scenario.campaign.batches);
    let done = Arc::new(AtomicU64::new(0));
    let mut opts = CompareOptions::new(policies, dir);
    opts.queue = if in_memory_queue {
        QueueKind::InMemory
    } else {
        QueueKind::Embedded
    };
    opts.threads = threads;
    if progress.is_some() {
        let d = Arc::clone(&done);
        opts.progress = Some(Arc::new(move |_p: PolicyName, _b: u32| {
            d.fetch_add(1, Ordering::Relaxed);
        }));
    }
    let report = py.detach(|| {
        std::thread::scope(|s| {
            let run = s.spawn(|| compare(&scenario, &pop, &opts));
            let mut last = u64::MAX;
            while !run.is_finished() {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(cb) = &progress {
                    let now = done.load(Ordering::Relaxed);
                    if now != last {
                        last = now;
                        // A failing callback only loses the progress display.
                        Python::attach(|py| {
                            if let Err(e) = cb.call1(py, (now, total)) {
                                e.print(py);
                            }
                        });
                    }
                }
            }
            run.join()
        })
    });
    let report = match report {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(raise(Kind::Simulation, chain(&e))),
        Err(_) => return Err(raise(Kind::Simulation, "the simulation panicked")),
    };
    if let Some(cb) = &progress {
        cb.call1(py, (total, total))?;
    }
    let json =
        String::from_utf8(report.to_json()).map_err(|e| raise(Kind::Simulation, e.to_string()))?;
    Ok((json, started.elapsed().as_secs_f64()))
}
