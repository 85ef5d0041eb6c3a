//! Running several policies side by side (threads), and many seeds with
//! random faults.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::SimError;
use crate::faults::FaultPlan;
use crate::invariants::Violation;
use crate::policies::PolicyName;
use crate::population::SimPopulation;
use crate::report::{PolicyRun, Report};
use crate::scenario::Scenario;
use crate::sim::{prepare_data_dir, run_policy, Progress, QueueKind, RunOptions};

/// How to run a comparison: [`CompareOptions::new`], then adjust the
/// fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct CompareOptions {
    /// The policies, in report order.
    pub policies: Vec<PolicyName>,
    /// The root data directory (one subdirectory per policy).
    pub data_dir: PathBuf,
    /// The queue for batch jobs.
    pub queue: QueueKind,
    /// Worker threads (policies run in parallel).
    pub threads: usize,
    /// Progress callback.
    pub progress: Option<Arc<Progress>>,
    /// Continue the runs found in `data_dir` (a killed simulation) instead
    /// of starting over.
    pub resume: bool,
}

/// Worker threads by default: the machine's cores.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl CompareOptions {
    /// Runs `policies` under `data_dir`: the default queue, one thread a
    /// core, no progress callback, fresh runs.
    pub fn new(policies: Vec<PolicyName>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            policies,
            data_dir: data_dir.into(),
            queue: QueueKind::default(),
            threads: default_threads(),
            progress: None,
            resume: false,
        }
    }
}

impl std::fmt::Debug for CompareOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompareOptions")
            .field("policies", &self.policies)
            .field("data_dir", &self.data_dir)
            .field("queue", &self.queue)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

/// Rough relative cost, to start the slow runs first.
fn cost(p: PolicyName) -> u32 {
    match p {
        PolicyName::Integrated => 0,
        PolicyName::Targeting => 1,
        PolicyName::CreativeThompson => 2,
        PolicyName::Oracle => 3,
        PolicyName::ExploreThenCommit => 4,
        PolicyName::Random => 5,
    }
}

/// Runs `items` on up to `threads` threads, slowest first; results in
/// input order.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    order: impl Fn(&T) -> u32,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<Result<R, String>> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by_key(|&i| (order(&items[i]), i));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R, String>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.clamp(1, items.len().max(1)))
            .map(|_| {
                s.spawn(|| loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&i) = idx.get(n) else { break };
                    let r =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&items[i])))
                            .map_err(|p| {
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                    .unwrap_or_else(|| "panic".into())
                            });
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not run".into())))
        .collect()
}

/// Runs every policy of `opts` on `scenario` (the scenario's fault plan
/// applies to each) and builds the report.
pub fn compare(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &CompareOptions,
) -> Result<Report, SimError> {
    let names: Vec<String> = opts
        .policies
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    prepare_data_dir(&opts.data_dir, &names, opts.resume)?;
    let results = parallel(
        &opts.policies,
        opts.threads,
        |p| cost(*p),
        |&policy| {
            run_policy(
                scenario,
                pop,
                &RunOptions {
                    policy,
                    dir: opts.data_dir.join(policy.as_str()),
                    queue: opts.queue,
                    faults: scenario.faults.clone(),
                    progress: opts.progress.clone(),
                    resume: opts.resume,
                },
            )
        },
    );
    let mut runs: Vec<PolicyRun> = Vec::new();
    for r in results {
        match r {
            Ok(Ok(run)) => runs.push(run),
            Ok(Err(e)) => return Err(e),
            Err(p) => return Err(SimError::Panicked(p)),
        }
    }
    Ok(Report::new(scenario, pop, runs))
}

/// What one seed of a `--seeds` run found.
#[derive(Debug, Clone)]
pub struct SeedOutcome {
    /// The seed.
    pub seed: u64,
    /// The policy it ran.
    pub policy: PolicyName,
    /// The faults it injected (scenario plan plus random ones).
    pub faults: FaultPlan,
    /// The broken invariants, or the error that stopped the run.
    pub result: Result<Vec<Violation>, String>,
    /// Crashes it recovered from.
    pub crashes: u64,
    /// Wall time (ms).
    pub wall_ms: u64,
}

impl SeedOutcome {
    /// Whether the seed broke nothing.
    pub fn ok(&self) -> bool {
        matches!(&self.result, Ok(v) if v.is_empty())
    }
}

/// Called after each seed of a `--seeds` run.
pub type SeedProgress = dyn Fn(&SeedOutcome) + Send + Sync;

/// How to run many seeds: [`SeedsOptions::new`], then adjust the fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct SeedsOptions {
    /// First seed.
    pub first: u64,
    /// Number of seeds.
    pub count: u64,
    /// The policy, or `None` to rotate through all six by seed.
    pub policy: Option<PolicyName>,
    /// The queue.
    pub queue: QueueKind,
    /// Worker threads.
    pub threads: usize,
    /// Called after each seed.
    pub progress: Option<Arc<SeedProgress>>,
}

impl SeedsOptions {
    /// Seeds `first..first + count`, the policy rotating by seed, the
    /// default queue, one thread a core, no progress callback.
    pub fn new(first: u64, count: u64) -> Self {
        Self {
            first,
            count,
            policy: None,
            queue: QueueKind::default(),
            threads: default_threads(),
            progress: None,
        }
    }
}

impl std::fmt::Debug for SeedsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedsOptions")
            .field("first", &self.first)
            .field("count", &self.count)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// The policy seed `seed` runs when none is given.
pub fn policy_for_seed(seed: u64) -> PolicyName {
    PolicyName::ALL[(seed % PolicyName::ALL.len() as u64) as usize]
}

/// Runs one seed: the scenario with that seed, its fault plan plus a
/// random one drawn from the seed, in a temporary data directory.
pub fn run_seed(base: &Scenario, seed: u64, policy: PolicyName, queue: QueueKind) -> SeedOutcome {
    let started = Instant::now();
    let mut scenario = base.clone();
    scenario.seed = seed;
    let outcome =
        |faults: FaultPlan, result: Result<Vec<Violation>, String>, crashes| SeedOutcome {
            seed,
            policy,
            faults,
            result,
            crashes,
            wall_ms: started.elapsed().as_millis() as u64,
        };
    let pop = match SimPopulation::generate(&scenario) {
        Ok(p) => Arc::new(p),
        Err(e) => return outcome(base.faults.clone(), Err(e.to_string()), 0),
    };
    let messages = (pop.random_expected(scenario.campaign.budget) * 2.0) as u64 + 10;
    let faults = base.faults.merged(&FaultPlan::random(
        seed,
        scenario.campaign.batches,
        messages,
    ));
    let dir = match tempfile::Builder::new().prefix("smartmsg-seed-").tempdir() {
        Ok(d) => d,
        Err(e) => return outcome(faults, Err(e.to_string()), 0),
    };
    let r = run_policy(
        &scenario,
        &pop,
        &RunOptions {
            policy,
            dir: dir.path().join(policy.as_str()),
            queue,
            faults: faults.clone(),
            progress: None,
            resume: false,
        },
    );
    match r {
        Ok(run) => outcome(faults, Ok(run.violations), run.faults.crashes_recovered),
        Err(e) => outcome(faults, Err(e.to_string()), 0),
    }
}

/// Runs many seeds with random faults (see [`run_seed`]).
pub fn run_seeds(base: &Scenario, opts: &SeedsOptions) -> Vec<SeedOutcome> {
    let seeds: Vec<u64> = (0..opts.count).map(|i| opts.first + i).collect();
    parallel(
        &seeds,
        opts.threads,
        |_| 0,
        |&seed| {
            let policy = opts.policy.unwrap_or_else(|| policy_for_seed(seed));
            let o = run_seed(base, seed, policy, opts.queue);
            if let Some(p) = &opts.progress {
                p(&o);
            }
            o
        },
    )
    .into_iter()
    .zip(&seeds)
    .map(|(r, &seed)| {
        r.unwrap_or_else(|panic| SeedOutcome {
            seed,
            policy: opts.policy.unwrap_or_else(|| policy_for_seed(seed)),
            faults: FaultPlan::default(),
            result: Err(format!("panicked: {panic}")),
            crashes: 0,
            wall_ms: 0,
        })
    })
    .collect()
}
