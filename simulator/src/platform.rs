//! The `platform` scenario: a platform's many campaigns over one audience,
//! on one runtime and one embedded data directory (issue 16).
//!
//! `users` subscribers with `features` standard normal columns are the
//! audience of every campaign; it is stored once in the log and held once
//! in memory (the runtime recognises the very same columns), and each
//! campaign's remaining candidates are a selection of its rows, not a
//! copy. Each campaign has its own creatives and its own hidden truth
//! (the classic family's, drawn from the campaign's seed), its own world
//! (users react after the classic delays) and its own reaction source.
//! The runtime drives them all under one virtual clock, from due job to
//! due job, like [`crate::sim`] drives one campaign.
//!
//! The report gives the wall time of each phase and the process's peak
//! resident memory, and per campaign the responses captured against
//! random and the oracle (computed from the truths after the run, not
//! counted in the run's time).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smartmsg_domain::{Audience, CampaignSpec, OutgoingBatch, Policy, PolicyError, PolicySpec};
use smartmsg_domain::{Candidates, Status};
use smartmsg_embedded::{
    EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, RedbSnapshots, RedbStore,
};
use smartmsg_engine::{Clock, EventLog, ManualClock};
use smartmsg_service::{
    CampaignSetup, PipelineSettings, Ports, Runtime, RuntimeOptions, SendError, Sender,
};

use crate::error::SimError;
use crate::faults::FaultPlan;
use crate::policies::{self, PolicyName};
use crate::population::{gaussian_features, Truth};
use crate::rng::{label, mix};
use crate::scenario::Scenario;
use crate::sim::{advance, local_runtime, refuse_retried, WorldSource};
use crate::world::World;

/// The platform: its audience and its campaigns. [`PlatformSpec::new`],
/// then adjust the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PlatformSpec {
    /// Seeds the audience's features and every campaign.
    pub seed: u64,
    /// Subscribers in the shared audience (1 to 10,000,000).
    pub users: u32,
    /// Feature columns (standard normal).
    pub features: usize,
    /// Campaigns over the audience (1 to 64).
    pub campaigns: u32,
    /// Creatives per campaign.
    pub creatives: usize,
    /// Messages per campaign.
    pub budget: u64,
    /// Batches per campaign.
    pub batches: u32,
    /// Time between a campaign's batches (ms).
    pub batch_interval_ms: u64,
    /// The policy every campaign plans with.
    pub policy: PolicyName,
    /// Draws per plan that estimate each decision's propensity.
    pub propensity_draws: u32,
}

impl PlatformSpec {
    /// The platform: 10,000,000 subscribers.
    pub const DEFAULT_USERS: u32 = 10_000_000;
    /// The platform: 10 campaigns.
    pub const DEFAULT_CAMPAIGNS: u32 = 10;
    /// The most campaigns.
    pub const MAX_CAMPAIGNS: u32 = 64;

    /// `users` subscribers × 16 features and `campaigns` campaigns of 4
    /// creatives, each with a budget of a tenth of the audience in 10
    /// batches 16 hours apart (the last on the seventh day), planned by
    /// the integrated policy.
    pub fn new(users: u32, campaigns: u32) -> Self {
        Self {
            seed: 42,
            users,
            features: 16,
            campaigns,
            creatives: 4,
            budget: u64::from(users / 10).max(1),
            batches: 10,
            batch_interval_ms: 16 * 3_600_000,
            policy: PolicyName::Integrated,
            propensity_draws: crate::scenario::PolicySettings::default().propensity_draws,
        }
    }

    /// Campaign `i`'s name.
    pub fn campaign_name(i: u32) -> String {
        format!("platform-{i:02}")
    }

    /// Campaign `i` as a scenario of its own (its truth, delays, policy
    /// settings and budget; the population is the platform's).
    pub fn scenario(&self, i: u32) -> Scenario {
        let mut s = Scenario::classic();
        s.name = Self::campaign_name(i);
        s.seed = mix(&[self.seed, label("platform-campaign"), u64::from(i)]);
        s.population.subscribers = self.users;
        s.population.features = self.features;
        s.campaign.creatives = self.creatives;
        s.campaign.budget = self.budget;
        s.campaign.batches = self.batches;
        s.campaign.batch_interval_ms = self.batch_interval_ms;
        s.policies.propensity_draws = self.propensity_draws;
        // The classic truth's weight scales are for its 8 columns: scaled
        // so that the score's spread over users is the classic one
        // whatever the column count.
        if let crate::scenario::TruthSpec::Generated {
            shared_scale,
            specific_scale,
            ..
        } = &mut s.truth
        {
            let f = (8.0 / self.features.max(1) as f64).sqrt();
            *shared_scale *= f;
            *specific_scale *= f;
        }
        s
    }

    /// Checks the platform and every campaign's scenario.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.campaigns == 0 || self.campaigns > Self::MAX_CAMPAIGNS {
            return Err(SimError::Stalled(format!(
                "{} campaigns: the platform runs 1 to {}",
                self.campaigns,
                Self::MAX_CAMPAIGNS
            )));
        }
        for i in 0..self.campaigns {
            self.scenario(i).validate()?;
        }
        Ok(())
    }
}

/// One campaign's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformCampaign {
    /// Its name.
    pub name: String,
    /// Messages sent.
    pub sent: u64,
    /// Reactions the world produced.
    pub reactions: u64,
    /// Expected responses of what was sent (the sum of the true
    /// probabilities).
    pub expected: f64,
    /// Expected responses of a random campaign of the same budget.
    pub random_expected: f64,
    /// Expected responses of the oracle (the budget's best users, each
    /// with their best creative).
    pub oracle_expected: f64,
    /// The share of the oracle's lift over random captured.
    pub lift: f64,
}

/// What a platform run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformReport {
    /// The platform.
    pub spec: PlatformSpec,
    /// Generating the audience and the truths (ms).
    pub generate_ms: u64,
    /// Creating the campaigns: storing the audience once, registering
    /// each (ms).
    pub create_ms: u64,
    /// The simulated campaigns, from the first plan to the last reaction
    /// counted (ms).
    pub run_ms: u64,
    /// Computing the random and oracle references (ms).
    pub reference_ms: u64,
    /// The process's peak resident memory (bytes; Linux `VmHWM`), read at
    /// the end of the run.
    pub peak_rss_bytes: Option<u64>,
    /// Events in the log.
    pub log_events: u64,
    /// Bytes of the data directory.
    pub data_bytes: u64,
    /// Per campaign.
    pub campaigns: Vec<PlatformCampaign>,
}

impl PlatformReport {
    /// The mean lift over the campaigns.
    pub fn mean_lift(&self) -> f64 {
        let n = self.campaigns.len().max(1) as f64;
        self.campaigns.iter().map(|c| c.lift).sum::<f64>() / n
    }
}

/// The process's peak resident set size, from `/proc/self/status` (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process's resident set size now, from `/proc/self/status` (Linux).
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One campaign's hidden side: its truth, its world, what it was sent.
struct Side {
    truth: Truth,
    world: Arc<Mutex<World>>,
    /// Messages delivered and their expected responses.
    sent: Mutex<(u64, f64)>,
}

/// Every campaign's world, by campaign name, as the runtime's sender.
struct PlatformSender {
    sides: Arc<HashMap<String, Arc<Side>>>,
    audience: Candidates,
    clock: ManualClock,
}

#[async_trait]
impl Sender for PlatformSender {
    fn name(&self) -> &str {
        "platform"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        let side = self
            .sides
            .get(&batch.campaign)
            .ok_or_else(|| SendError::Rejected {
                batch: format!("{}/{}", batch.campaign, batch.batch),
                reason: "no such campaign on the platform".into(),
            })?;
        let n = self.audience.len();
        let mut sum = 0.0;
        let new = lock(&side.world).deliver_with(
            batch.batch,
            self.clock.now_ms(),
            &batch.decisions,
            |u, c| {
                // Users are 0..n, in row order.
                let p = if (u as usize) < n {
                    side.truth
                        .probability(usize::from(c), self.audience.row(u as usize))
                } else {
                    0.0
                };
                sum += p;
                p
            },
        );
        if new {
            let mut sent = lock(&side.sent);
            sent.0 += batch.decisions.len() as u64;
            sent.1 += sum;
        }
        Ok(())
    }
}

/// Runs the platform in `dir` (created; it must not hold a run) and
/// measures it. `progress` is told each
/// campaign's batches as they are sent (campaign index, batches sent).
pub fn run_platform(
    spec: &PlatformSpec,
    dir: &Path,
    progress: Option<&(dyn Fn(u32, u32) + Sync)>,
) -> Result<PlatformReport, SimError> {
    spec.validate()?;
    local_runtime(dir)?.block_on(run_async(spec, dir, progress))
}

async fn run_async(
    spec: &PlatformSpec,
    dir: &Path,
    progress: Option<&(dyn Fn(u32, u32) + Sync)>,
) -> Result<PlatformReport, SimError> {
    if dir.join("log").exists() {
        return Err(SimError::DataDir {
            path: dir.to_owned(),
            reason: "holds a run already; the platform starts from an empty directory".into(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| SimError::Io {
        op: "create",
        path: dir.to_owned(),
        source,
    })?;

    let t = Instant::now();
    let (n, d) = (spec.users as usize, spec.features);
    let features = gaussian_features(n, d, spec.seed);
    let audience = Candidates::from_parts(d, (0..spec.users).collect(), features)?;
    let scenarios: Vec<Scenario> = (0..spec.campaigns).map(|i| spec.scenario(i)).collect();
    let mut sides = HashMap::new();
    for s in &scenarios {
        let truth = Truth::generate(&s.truth, d, spec.creatives, s.seed, "truth");
        let side = Side {
            truth,
            world: Arc::new(Mutex::new(World::new(s, &FaultPlan::default()))),
            sent: Mutex::new((0, 0.0)),
        };
        sides.insert(s.name.clone(), Arc::new(side));
    }
    let sides = Arc::new(sides);
    let generate_ms = t.elapsed().as_millis() as u64;

    let t = Instant::now();
    let clock = ManualClock::new(scenarios[0].campaign.start_ms);
    let log = Arc::new(EmbeddedLog::open_with(
        dir.join("log"),
        EmbeddedConfig::default(),
    )?);
    let ports = Ports {
        log: Arc::clone(&log) as Arc<dyn EventLog>,
        snapshots: Some(Arc::new(RedbSnapshots::open(dir.join("snapshots.redb"))?)),
        queue: Arc::new(EmbeddedDelayQueue::open(dir.join("queue"))?),
        state: Arc::new(RedbStore::open(dir.join("state.redb"))?),
        clock: Arc::new(clock.clone()),
        sender: Arc::new(PlatformSender {
            sides: Arc::clone(&sides),
            audience: audience.clone(),
            clock: clock.clone(),
        }),
    };
    let (k, largest) = (spec.creatives, scenarios[0].largest_batch());
    let factory = move |p: &PolicySpec,
                        _c: &CampaignSpec,
                        _a: &Audience|
          -> Result<Box<dyn Policy>, PolicyError> { p.build(k, d, largest) };
    let mut options = RuntimeOptions::default();
    options.policies = Some(Arc::new(factory));
    let mut rt = Runtime::open(ports, options).await?;
    for s in &scenarios {
        rt.add_source(Box::new(WorldSource::new(
            format!("world-{}", s.name),
            Arc::clone(&sides[&s.name].world),
            Arc::default(),
        )));
        let mut setup = CampaignSetup::new(
            s.name.clone(),
            s.campaign_spec(),
            audience.clone(),
            policy_spec(spec.policy, s)?,
        );
        setup.seed = s.seed;
        setup.pipeline = {
            let mut v = PipelineSettings::default();
            v.window_ms = s.pipeline.window_ms;
            v.grace_ms = s.pipeline.grace_ms;
            v.accept_after_last_ms = s.reactions.max_delay_ms.saturating_add(7 * 24 * 3_600_000);
            v
        };
        setup.reaction_horizon_ms = s.reactions.max_delay_ms;
        rt.create_campaign(setup).await?;
        rt.start(&s.name).await?;
    }
    let create_ms = t.elapsed().as_millis() as u64;

    let t = Instant::now();
    drive(&mut rt, &clock, &sides, &scenarios, progress).await?;
    let run_ms = t.elapsed().as_millis() as u64;
    let peak_rss_bytes = peak_rss_bytes();
    let log_events = rt.ports().log.head().await?;
    drop(rt);

    let t = Instant::now();
    let mut campaigns = Vec::with_capacity(scenarios.len());
    for s in &scenarios {
        let side = &sides[&s.name];
        let (random_expected, oracle_expected) = references(&audience, &side.truth, spec.budget);
        let (sent, expected) = *lock(&side.sent);
        let w = lock(&side.world);
        let span = oracle_expected - random_expected;
        campaigns.push(PlatformCampaign {
            name: s.name.clone(),
            sent,
            reactions: w.reactions().len() as u64,
            expected,
            random_expected,
            oracle_expected,
            lift: if span > 0.0 {
                (expected - random_expected) / span
            } else {
                0.0
            },
        });
    }
    let reference_ms = t.elapsed().as_millis() as u64;
    Ok(PlatformReport {
        spec: spec.clone(),
        generate_ms,
        create_ms,
        run_ms,
        reference_ms,
        peak_rss_bytes,
        log_events,
        data_bytes: dir_bytes(dir),
        campaigns,
    })
}

fn policy_spec(name: PolicyName, s: &Scenario) -> Result<PolicySpec, SimError> {
    match name {
        PolicyName::Random => Ok(PolicySpec::Random {}),
        PolicyName::Integrated => Ok(PolicySpec::Integrated {
            model: policies::model_config(s),
        }),
        PolicyName::Targeting => Ok(PolicySpec::Targeting {
            creative: 0,
            model: policies::model_config(s),
        }),
        other => Err(SimError::Stalled(format!(
            "the platform runs random, targeting or integrated, not {}",
            other.as_str()
        ))),
    }
}

/// Steps the runtime from due job to due job (letting each campaign's
/// reactions arrive as the clock moves), then lets every reaction arrive
/// and closes the last windows.
async fn drive(
    rt: &mut Runtime,
    clock: &ManualClock,
    sides: &HashMap<String, Arc<Side>>,
    scenarios: &[Scenario],
    progress: Option<&(dyn Fn(u32, u32) + Sync)>,
) -> Result<(), SimError> {
    let arrive = |now: u64| {
        for side in sides.values() {
            lock(&side.world).arrive_until(now);
        }
    };
    let queue = Arc::clone(&rt.ports().queue);
    let mut reported = vec![0u32; scenarios.len()];
    let mut idle = 0;
    loop {
        let now = clock.now_ms();
        arrive(now);
        let r = rt.step(now).await?;
        if let Some(p) = progress {
            for (i, s) in scenarios.iter().enumerate() {
                let sent = lock(&sides[&s.name].world).delivered().len() as u32;
                if sent != reported[i] {
                    reported[i] = sent;
                    p(i as u32, sent);
                }
            }
        }
        refuse_retried(&r, now)?;
        if !advance(&*queue, clock, &r, now, &mut idle).await? {
            break;
        }
    }
    let now = clock.now_ms();
    let last = sides
        .values()
        .filter_map(|s| lock(&s.world).last_arrival())
        .max()
        .unwrap_or(now)
        .max(now);
    let p = &scenarios[0].pipeline;
    let end = last + p.window_ms + p.grace_ms;
    clock.set(end);
    arrive(end);
    while rt.step(end).await?.ingested > 0 {}
    rt.flush(end).await?;
    for s in scenarios {
        let status = rt.view(&s.name).and_then(|v| v.status);
        if status != Some(Status::Completed) {
            return Err(SimError::Stalled(format!(
                "no job is left but campaign {} is {status:?}",
                s.name
            )));
        }
    }
    Ok(())
}

/// Random's and the oracle's expected responses for `budget` messages:
/// `budget · mean p` and the sum of the `budget` best users' best
/// probabilities. The users are split over the machine's cores.
fn references(audience: &Candidates, truth: &Truth, budget: u64) -> (f64, f64) {
    let n = audience.len();
    let k = truth.creatives();
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let mut best = vec![0f64; n];
    let sums: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = best
            .chunks_mut(chunk)
            .enumerate()
            .map(|(t, out)| {
                scope.spawn(move || {
                    let mut sum = 0.0;
                    for (j, b) in out.iter_mut().enumerate() {
                        let x = audience.row(t * chunk + j);
                        let mut m = 0f64;
                        for c in 0..k {
                            let p = truth.probability(c, x);
                            sum += p;
                            m = m.max(p);
                        }
                        *b = m;
                    }
                    sum
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let mean = sums.iter().sum::<f64>() / (n * k).max(1) as f64;
    let b = (budget as usize).min(n);
    if b == 0 {
        return (0.0, 0.0);
    }
    best.select_nth_unstable_by(b - 1, |x, y| y.total_cmp(x));
    let oracle = best[..b].iter().sum();
    (budget as f64 * mean, oracle)
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
