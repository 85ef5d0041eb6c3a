//! One policy's campaign, run by the campaign runtime under a virtual
//! clock.
//!
//! The simulator is a client of [`smartmsg_service::Runtime`], the code
//! services run: the same driver, reaction pipeline, commit protocol and
//! recovery. It swaps only what is outside a process:
//!
//! - the clock: a [`ManualClock`] that jumps from one due job to the next;
//! - the sender: [`WorldSender`], the simulated channel, whose users react
//!   after their delays;
//! - the reaction source: [`WorldSource`], the simulated reactions topic
//!   (with the scenario's repeats, reordering and malformed messages),
//!   read with a cursor kept in the log like any source;
//! - crash points: [`SimHooks`] makes the runtime stop where the fault plan
//!   says; the simulator then drops the whole runtime (every handle, cache
//!   and model) and opens it again from the data directory.
//!
//! Each batch's plan draws from a generator seeded by (seed, policy,
//! batch), so a re-plan after a crash decides the same.
//!
//! # Resume
//!
//! The world is not in the log, but everything it depends on is: it is
//! rebuilt from the scenario (same seed, same faults) and the batches the
//! log says were sent. `RunOptions::resume` continues a killed simulation
//! from its data directory this way.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use smartmsg_domain::driver::{campaign_job, JobKind};
use smartmsg_domain::{
    Audience, CampaignEvent, CampaignSpec, OutgoingBatch, Policy, PolicyError, PolicySpec, Status,
};
use smartmsg_embedded::{
    EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, RedbSnapshots, RedbStore,
};
use smartmsg_engine::{
    Clock, DelayQueue, EventCodec, EventLog, InMemoryDelayQueue, ManualClock, RecordedEvent,
    StreamId,
};
use smartmsg_service::ingest::Incoming;
use smartmsg_service::{
    CampaignSetup, CrashPoint, Hooks, PipelineSettings, Polled, Ports, ReactionSource, Runtime,
    RuntimeOptions, SendError, Sender, StepReport,
};

use crate::error::SimError;
use crate::events::Streams;
use crate::faults::{Crash, FaultPlan};
use crate::invariants;
use crate::policies::{self, Oracle, PolicyName};
use crate::population::SimPopulation;
use crate::report::{BatchPoint, FaultCounts, PipelineCounts, PolicyRun};
use crate::rng::label;
use crate::scenario::Scenario;
use crate::world::World;

/// Which delay queue carries the batch jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// The on-disk timer wheel (`smartmsg-embedded`).
    #[default]
    Embedded,
    /// The engine's in-memory queue (lost on a crash; the runtime then
    /// schedules the jobs again from the campaign's state).
    InMemory,
}

/// Called after each batch is sent: (policy, batch).
pub type Progress = dyn Fn(PolicyName, u32) + Send + Sync;

/// How to run one policy's campaign: [`RunOptions::new`], then adjust the
/// fields.
#[derive(Clone)]
#[non_exhaustive]
pub struct RunOptions {
    /// The policy.
    pub policy: PolicyName,
    /// This run's data directory (created; must not hold another run
    /// unless `resume`).
    pub dir: PathBuf,
    /// The queue for batch jobs.
    pub queue: QueueKind,
    /// Faults to inject (the scenario's own plan, possibly with random
    /// faults added).
    pub faults: FaultPlan,
    /// Progress callback.
    pub progress: Option<Arc<Progress>>,
    /// Continue the run found in `dir` (killed before it finished)
    /// instead of starting one.
    pub resume: bool,
}

impl RunOptions {
    /// Runs `policy` in `dir`: the default queue, the scenario's own
    /// faults only, no progress callback, a fresh run.
    pub fn new(policy: PolicyName, dir: impl Into<PathBuf>) -> Self {
        Self {
            policy,
            dir: dir.into(),
            queue: QueueKind::default(),
            faults: FaultPlan::default(),
            progress: None,
            resume: false,
        }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("policy", &self.policy)
            .field("dir", &self.dir)
            .field("queue", &self.queue)
            .field("faults", &self.faults)
            .field("resume", &self.resume)
            .finish_non_exhaustive()
    }
}

/// The log's configuration: segments of 64 MiB (preallocated), or 4 MiB
/// for small campaigns, whose runs (thousands in `--seeds` mode) would
/// otherwise spend their time preallocating.
pub fn log_config(s: &Scenario) -> EmbeddedConfig {
    let mut c = EmbeddedConfig::default();
    if s.largest_batch() <= 2_000 {
        c.segment_bytes = 4 << 20;
    }
    c
}

/// Snapshot the campaign every this many events.
const SNAPSHOT_EVERY: u64 = 16;
/// The name of the simulated reaction source (its cursor stream).
pub const WORLD_SOURCE: &str = "world";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fault plan's crash points, each fired once.
pub struct SimHooks {
    plan: FaultPlan,
    fired: Mutex<Vec<bool>>,
}

impl SimHooks {
    /// Hooks for `plan`.
    pub fn new(plan: &FaultPlan) -> Self {
        Self {
            fired: Mutex::new(vec![false; plan.crashes.len()]),
            plan: plan.clone(),
        }
    }

    /// How many crashes fired.
    pub fn fired(&self) -> u64 {
        lock(&self.fired).iter().filter(|&&f| f).count() as u64
    }
}

impl Hooks for SimHooks {
    fn crash(&self, point: CrashPoint<'_>) -> bool {
        let hit = |c: &Crash| match (point, *c) {
            (CrashPoint::BeforePlan { batch, .. }, Crash::BeforePlan { batch: b })
            | (
                CrashPoint::AfterPlanBeforeAck { batch, .. },
                Crash::AfterPlanBeforeAck { batch: b },
            )
            | (
                CrashPoint::AfterPlanBeforeSend { batch, .. },
                Crash::AfterPlanBeforeSend { batch: b },
            )
            | (
                CrashPoint::AfterDeliveryBeforeRecord { batch, .. },
                Crash::AfterDeliveryBeforeRecord { batch: b },
            )
            | (
                CrashPoint::AfterFeedbackBeforeUpdate { batch, .. },
                Crash::AfterFeedbackBeforeUpdate { batch: b },
            ) => batch == b,
            (
                CrashPoint::AfterCommitBeforeRecord { commit, .. },
                Crash::AfterCommitBeforeRecord { commit: n },
            ) => commit == u64::from(n),
            (CrashPoint::PipelineCommit { through, .. }, Crash::MidReactions { message }) => {
                message >= 1 && message - 1 <= through
            }
            _ => false,
        };
        let mut fired = lock(&self.fired);
        for (i, c) in self.plan.crashes.iter().enumerate() {
            if !fired[i] && hit(c) {
                fired[i] = true;
                return true;
            }
        }
        false
    }
}

/// The simulated channel as a [`Sender`]: the users of a delivered batch
/// react after their delays (idempotent by batch).
pub struct WorldSender {
    world: Arc<Mutex<World>>,
    pop: Arc<SimPopulation>,
    clock: ManualClock,
    policy: PolicyName,
    progress: Option<Arc<Progress>>,
}

#[async_trait]
impl Sender for WorldSender {
    fn name(&self) -> &str {
        "world"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        let new = lock(&self.world).deliver(
            batch.batch,
            self.clock.now_ms(),
            &batch.decisions,
            &self.pop,
        );
        if new {
            if let Some(p) = &self.progress {
                p(self.policy, batch.batch);
            }
        }
        Ok(())
    }
}

/// The simulated reactions topic as a [`ReactionSource`]: the cursor is
/// the next topic offset (8 bytes, big-endian).
pub struct WorldSource {
    name: String,
    world: Arc<Mutex<World>>,
    taken: Arc<AtomicU64>,
}

impl WorldSource {
    /// The topic of `world`, read as the source `name` (its cursor
    /// stream's name); `taken` counts the messages polled.
    pub fn new(name: impl Into<String>, world: Arc<Mutex<World>>, taken: Arc<AtomicU64>) -> Self {
        Self {
            name: name.into(),
            world,
            taken,
        }
    }
}

#[async_trait]
impl ReactionSource for WorldSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&mut self, cursor: Option<&[u8]>, max: usize) -> Result<Polled, String> {
        let from = match cursor {
            None => 0,
            Some(c) => u64::from_be_bytes(
                c.try_into()
                    .map_err(|_| format!("bad world cursor of {} bytes", c.len()))?,
            ),
        };
        let w = lock(&self.world);
        let topic = w.topic();
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(topic.len());
        let end = start.saturating_add(max).min(topic.len());
        let messages: Vec<Incoming> = topic[start..end]
            .iter()
            .enumerate()
            .map(|(i, m)| Incoming {
                payload: Bytes::from(m.payload.clone()),
                arrival_ms: Some(m.arrival_ms),
                offset: Some((start + i) as u64),
            })
            .collect();
        self.taken
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        Ok(Polled {
            messages,
            cursor: (end as u64).to_be_bytes().to_vec(),
        })
    }
}

/// The campaign's runtime setup for a scenario and policy.
pub fn campaign_setup(
    scenario: &Scenario,
    pop: &SimPopulation,
    policy: PolicyName,
) -> CampaignSetup {
    let mut s = CampaignSetup::new(
        scenario.name.clone(),
        scenario.campaign_spec(),
        pop.candidates().clone(),
        policies::spec(policy, scenario, pop),
    );
    s.seed = scenario.seed;
    s.plan_stream = Some(label(policy.as_str()));
    s.pipeline = {
        let mut v = PipelineSettings::default();
        v.window_ms = scenario.pipeline.window_ms;
        v.grace_ms = scenario.pipeline.grace_ms;
        v.accept_after_last_ms = scenario
            .reactions
            .max_delay_ms
            .saturating_add(7 * 24 * 3_600_000);
        v
    };
    s.reaction_horizon_ms = scenario.reactions.max_delay_ms;
    s
}

/// What survives crashes: the world, the clock and the fault bookkeeping.
struct Harness {
    world: Arc<Mutex<World>>,
    clock: ManualClock,
    hooks: Arc<SimHooks>,
    taken: Arc<AtomicU64>,
    dup_jobs_done: BTreeSet<u32>,
    crashes: u64,
    jobs_absorbed: u64,
    pipeline_commits: u64,
}

/// Runs one policy's whole campaign and checks the invariants on what it
/// left on disk.
pub fn run_policy(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
) -> Result<PolicyRun, SimError> {
    let started = Instant::now();
    let rt = local_runtime(&opts.dir)?;
    let mut run = rt.block_on(run_async(scenario, pop, opts))?;
    run.wall_ms = started.elapsed().as_millis() as u64;
    Ok(run)
}

/// A single-threaded tokio runtime for the work on `dir`.
pub(crate) fn local_runtime(dir: &Path) -> Result<tokio::runtime::Runtime, SimError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|source| SimError::Io {
            op: "start runtime for",
            path: dir.to_owned(),
            source,
        })
}

fn ports(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
    h: &Harness,
) -> Result<Ports, SimError> {
    let dir = &opts.dir;
    let log = Arc::new(EmbeddedLog::open_with(
        dir.join("log"),
        log_config(scenario),
    )?);
    let snapshots = Arc::new(RedbSnapshots::open(dir.join("snapshots.redb"))?);
    let queue: Arc<dyn DelayQueue> = match opts.queue {
        QueueKind::Embedded => Arc::new(EmbeddedDelayQueue::open(dir.join("queue"))?),
        QueueKind::InMemory => Arc::new(InMemoryDelayQueue::new()),
    };
    let state = Arc::new(RedbStore::open(dir.join("state.redb"))?);
    Ok(Ports {
        log,
        snapshots: Some(snapshots),
        queue,
        state,
        clock: Arc::new(h.clock.clone()),
        sender: Arc::new(WorldSender {
            world: Arc::clone(&h.world),
            pop: Arc::clone(pop),
            clock: h.clock.clone(),
            policy: opts.policy,
            progress: opts.progress.clone(),
        }),
    })
}

fn options(scenario: &Scenario, pop: &Arc<SimPopulation>, h: &Harness) -> RuntimeOptions {
    let k = scenario.campaign.creatives;
    let dim = pop.dim();
    let largest = scenario.largest_batch();
    let oracle_pop = Arc::clone(pop);
    let factory = move |spec: &PolicySpec,
                        _c: &CampaignSpec,
                        _a: &Audience|
          -> Result<Box<dyn Policy>, PolicyError> {
        match spec {
            PolicySpec::Custom { name } if name == "oracle" => {
                Ok(Box::new(Oracle::new(Arc::clone(&oracle_pop))))
            }
            other => other.build(k, dim, largest),
        }
    };
    {
        let mut built = RuntimeOptions::default();
        built.snapshot_every = SNAPSHOT_EVERY;
        built.hooks = Arc::clone(&h.hooks) as Arc<dyn Hooks>;
        built.policies = Some(Arc::new(factory));
        built
    }
}

async fn open(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
    h: &Harness,
) -> Result<Runtime, SimError> {
    let mut rt = Runtime::open(ports(scenario, pop, opts, h)?, options(scenario, pop, h)).await?;
    rt.add_source(Box::new(WorldSource::new(
        WORLD_SOURCE,
        Arc::clone(&h.world),
        Arc::clone(&h.taken),
    )));
    rt.create_campaign(campaign_setup(scenario, pop, opts.policy))
        .await?;
    rt.start(&scenario.name).await?;
    Ok(rt)
}

async fn run_async(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
) -> Result<PolicyRun, SimError> {
    std::fs::create_dir_all(&opts.dir).map_err(|source| SimError::Io {
        op: "create",
        path: opts.dir.clone(),
        source,
    })?;
    let mut h = Harness {
        world: Arc::new(Mutex::new(World::new(scenario, &opts.faults))),
        clock: ManualClock::new(scenario.campaign.start_ms),
        hooks: Arc::new(SimHooks::new(&opts.faults)),
        taken: Arc::new(AtomicU64::new(0)),
        dup_jobs_done: BTreeSet::new(),
        crashes: 0,
        jobs_absorbed: 0,
        pipeline_commits: 0,
    };
    if opts.resume {
        rebuild_world(scenario, pop, opts, &mut h).await?;
    }
    loop {
        let mut rt = match open(scenario, pop, opts, &h).await {
            Ok(rt) => rt,
            Err(SimError::Runtime(e)) if e.is_crash() => {
                h.crashes += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        match drive(scenario, &mut rt, &mut h).await {
            Ok(()) => {
                h.pipeline_commits = rt.pipeline_commits(&scenario.name).unwrap_or(0);
                break;
            }
            Err(SimError::Runtime(e)) if e.is_crash() => {
                h.crashes += 1;
                drop(rt);
            }
            Err(e) => return Err(e),
        }
    }
    finish(scenario, pop, opts, &h).await
}

/// Rebuilds the world of a killed run from its log: the batches it sent,
/// at the times it sent them; the clock at the log's last time.
async fn rebuild_world(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
    h: &mut Harness,
) -> Result<(), SimError> {
    let log = EmbeddedLog::open_with(opts.dir.join("log"), log_config(scenario))?;
    let streams = Streams::new(&scenario.name)?;
    let mut plans: Vec<Option<smartmsg_domain::Decisions>> = Vec::new();
    let mut last = scenario.campaign.start_ms;
    let events = read_all(&log, &streams.campaign).await?;
    {
        let mut w = lock(&h.world);
        for e in &events {
            last = last.max(e.timestamp_ms);
            match campaign_event(e)? {
                CampaignEvent::BatchPlanned {
                    batch,
                    part,
                    decisions,
                    ..
                } => {
                    let b = batch as usize;
                    if plans.len() <= b {
                        plans.resize(b + 1, None);
                    }
                    // A large batch comes in parts, in order: join them.
                    match &mut plans[b] {
                        Some(d) if !part.is_first() => d.append(&decisions),
                        slot => *slot = Some(decisions),
                    }
                }
                CampaignEvent::BatchSent { batch, .. } => {
                    if let Some(Some(d)) = plans.get(batch as usize) {
                        w.deliver(batch, e.timestamp_ms, d, pop);
                    }
                }
                _ => {}
            }
        }
    }
    let head = log.head().await?;
    if head > 0 {
        if let Some(e) = log.read_all(head - 1, 1).await?.pop() {
            last = last.max(e.timestamp_ms);
        }
    }
    h.clock.set(last);
    Ok(())
}

async fn read_all(log: &dyn EventLog, stream: &StreamId) -> Result<Vec<RecordedEvent>, SimError> {
    let mut out = Vec::new();
    let mut v = 1;
    loop {
        let batch = log.read_stream(stream, v, 1_000).await?;
        let Some(last) = batch.last() else { break };
        v = last.version + 1;
        out.extend(batch);
    }
    Ok(out)
}

/// Steps the runtime from due job to due job, then lets every reaction
/// arrive and closes the last windows.
async fn drive(scenario: &Scenario, rt: &mut Runtime, h: &mut Harness) -> Result<(), SimError> {
    let name = scenario.name.clone();
    let spec = scenario.campaign_spec();
    let faults = &scenario_faults(h);
    let queue = Arc::clone(&rt.ports().queue);
    let mut idle = 0;
    loop {
        let now = h.clock.now_ms();
        lock(&h.world).arrive_until(now);
        let r = rt.step(now).await?;
        h.jobs_absorbed += r.jobs_absorbed as u64;
        refuse_retried(&r, now)?;
        let planned = rt.driver(&name).map_or(0, |d| d.plans().len() as u32);
        for &b in &faults.duplicate_jobs {
            if b < planned && h.dup_jobs_done.insert(b) {
                // The queue delivers the job of a planned batch again.
                queue
                    .schedule(campaign_job(&name, JobKind::Batch(b), spec.due_ms(b)))
                    .await?;
            }
        }
        if !advance(&*queue, &h.clock, &r, now, &mut idle).await? {
            break;
        }
    }
    // Every job is done: let the remaining reactions arrive, then close the
    // last windows.
    let now = h.clock.now_ms();
    let last = lock(&h.world).last_arrival().unwrap_or(now).max(now);
    let end = last + scenario.pipeline.window_ms + scenario.pipeline.grace_ms;
    h.clock.set(end);
    lock(&h.world).arrive_until(end);
    // Every reaction in, however many steps that takes (each ingests a
    // bounded number).
    while rt.step(end).await?.ingested > 0 {}
    rt.flush(end).await?;
    let status = rt.view(&name).and_then(|v| v.status);
    if status != Some(Status::Completed) {
        return Err(SimError::Stalled(format!(
            "no job is left but the campaign is {status:?}"
        )));
    }
    Ok(())
}

/// A batch job that failed and is retried: the world never fails a send,
/// so the run is stuck.
pub(crate) fn refuse_retried(r: &StepReport, now: u64) -> Result<(), SimError> {
    if r.jobs_retried > 0 {
        return Err(SimError::Stalled(format!(
            "a batch job failed and is retried at {now}: {r:?}"
        )));
    }
    Ok(())
}

/// What follows a step at `now` that reported `r`: `true` to step again
/// (the step ingested a bounded number of reactions, so the backlog comes
/// in before the clock moves on; or the clock was moved to the next due
/// job), `false` when no job is left. A job that is due but has not been
/// leased for more than three steps in a row is a stall.
pub(crate) async fn advance(
    queue: &dyn DelayQueue,
    clock: &ManualClock,
    r: &StepReport,
    now: u64,
    idle: &mut u32,
) -> Result<bool, SimError> {
    if r.ingested > 0 {
        *idle = 0;
        return Ok(true);
    }
    match queue.next_due().await? {
        Some(t) if t <= now => {
            if r.jobs == 0 {
                *idle += 1;
                if *idle > 3 {
                    return Err(SimError::Stalled(format!(
                        "a job is due at {t} but none can be leased at {now}"
                    )));
                }
            }
        }
        Some(t) => {
            *idle = 0;
            clock.set(t);
        }
        None => return Ok(false),
    }
    Ok(true)
}

fn scenario_faults(h: &Harness) -> FaultPlan {
    h.hooks.plan.clone()
}

/// Decodes a campaign event.
pub(crate) fn campaign_event(e: &RecordedEvent) -> Result<CampaignEvent, SimError> {
    CampaignEvent::decode(&e.kind, e.schema, &e.payload).map_err(|err| SimError::Decode {
        kind: e.kind.clone(),
        position: e.position,
        reason: err.to_string(),
    })
}

/// Reads what the run left on disk (a fresh open of the log), checks the
/// invariants and computes the run's figures.
async fn finish(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
    h: &Harness,
) -> Result<PolicyRun, SimError> {
    let log = EmbeddedLog::open_with(opts.dir.join("log"), log_config(scenario))?;
    // The world is only read from here on: a copy keeps the lock off the
    // awaits.
    let world = lock(&h.world).clone();
    let verified = invariants::verify(&log, scenario, pop, &world).await?;
    let head = log.head().await?;
    let mut batches = Vec::new();
    let (mut cum_e, mut cum_r) = (0.0, 0u64);
    let mut realised_by_batch = vec![0u64; verified.decisions.len()];
    for r in world.reactions() {
        if let Some(n) = realised_by_batch.get_mut(r.batch as usize) {
            *n += 1;
        }
    }
    let k = scenario.campaign.creatives;
    let mut per_creative_sent = vec![0u64; k];
    for (b, d) in verified.decisions.iter().enumerate() {
        let expected: f64 = d
            .iter()
            .map(|(u, c, _)| pop.probability_at(u, c, b as u32))
            .sum();
        for (n, &m) in per_creative_sent.iter_mut().zip(&d.per_creative(k)) {
            *n += u64::from(m);
        }
        cum_e += expected;
        cum_r += realised_by_batch[b];
        batches.push(BatchPoint {
            batch: b as u32,
            sent: d.len() as u64,
            expected,
            realised: realised_by_batch[b],
            cumulative_expected: cum_e,
            cumulative_realised: cum_r,
        });
    }
    let sent: u64 = batches.iter().map(|b| b.sent).sum();
    let realised = verified.recorded_reactions;
    let injected = world.injected();
    Ok(PolicyRun {
        policy: opts.policy.as_str().to_owned(),
        messages_sent: sent,
        responses_realised: realised,
        responses_expected: cum_e,
        response_rate: if sent == 0 {
            0.0
        } else {
            realised as f64 / sent as f64
        },
        expected_rate: if sent == 0 { 0.0 } else { cum_e / sent as f64 },
        lift_captured: None,
        per_creative_sent,
        batches,
        pipeline: PipelineCounts {
            path: "stream-runner".into(),
            commits: h.pipeline_commits,
            windows_recorded: verified.windows,
            late_corrections: verified.late_corrections,
            duplicates_dropped: verified.duplicates_dropped,
            late_counted: verified.late_counted,
            dead_letters: verified.dead_letters,
        },
        faults: FaultCounts {
            crashes_recovered: h.crashes,
            job_redeliveries_absorbed: h.jobs_absorbed,
            reactions_repeated: injected.repeated,
            reordered_within_grace: injected.reordered_within_grace,
            reordered_beyond_grace: injected.reordered_beyond_grace,
            malformed_injected: injected.malformed,
            messages_processed: h.taken.load(Ordering::Relaxed),
        },
        log_events: head,
        violations: verified.violations,
        wall_ms: 0,
    })
}

/// Prepares a run's root data directory: creates it, or reuses one a
/// previous simulation made (marked by `.smartmsg-sim`), removing the
/// given runs' subdirectories (unless `keep`: a resumed run continues in
/// them). Refuses a non-empty directory it did not make.
pub fn prepare_data_dir(root: &Path, runs: &[String], keep: bool) -> Result<(), SimError> {
    let marker = root.join(".smartmsg-sim");
    let err = |reason: String| SimError::DataDir {
        path: root.to_owned(),
        reason,
    };
    if root.exists() {
        let empty = std::fs::read_dir(root)
            .map_err(|e| err(e.to_string()))?
            .next()
            .is_none();
        if !empty && !marker.exists() {
            return Err(err(
                "exists, is not empty and was not made by `smartmsg simulate`; choose another directory"
                    .into(),
            ));
        }
    }
    std::fs::create_dir_all(root).map_err(|e| err(e.to_string()))?;
    std::fs::write(&marker, b"made by smartmsg simulate\n").map_err(|e| err(e.to_string()))?;
    if !keep {
        for r in runs {
            let d = root.join(r);
            if d.exists() {
                std::fs::remove_dir_all(&d)
                    .map_err(|e| err(format!("remove {}: {e}", d.display())))?;
            }
        }
    }
    Ok(())
}
