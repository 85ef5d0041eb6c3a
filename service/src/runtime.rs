//! [`Runtime`]: campaigns run on the ports.
//!
//! A runtime holds any number of campaigns. For each it keeps a
//! [`CampaignDriver`] (the pure decisions), a reaction pipeline (the
//! domain's topology on a [`StreamRunner`], see [`crate::pipeline`]) and
//! the positions it has read in the campaign's streams. [`Runtime::step`]
//! does everything due at a given time:
//!
//! 1. polls the reaction sources into the log ([`crate::ingest`]);
//! 2. for each campaign: runs the pipeline over its new input (with a tick
//!    when windows may have closed), reads the pipeline's new outputs into
//!    the driver, and performs what the driver asks (record windows,
//!    record feedback, announce a batch to the pipeline, hand a batch to
//!    the sender, record it as sent, schedule jobs); the commands it asks
//!    for at once (closed windows, late reactions' corrections) are
//!    decided in order and appended in one transaction
//!    ([`Repository::execute_all_from`]), not one each;
//! 3. takes the due jobs from the delay queue: for each, brings its
//!    campaign up to date (ticking the pipeline at `now` so that the
//!    windows due are closed and the feedback is recorded), asks the driver
//!    for the job's command (a plan, drawn from a generator seeded by the
//!    batch) and executes it through the engine's [`Scheduler`] (with the
//!    job's idempotency key, acknowledging the job only once the command's
//!    events are durable), then lets the new batch go out.
//!
//! [`Runtime::spawn`] runs a loop of `step` on the clock until shutdown,
//! taking requests from [`RuntimeHandle`](crate::RuntimeHandle)s in between. The simulator calls `step`
//! itself at virtual times; it is the same code.
//!
//! # Resume
//!
//! Everything is in the log, the queue and the state store. Opening a
//! runtime reads the registered campaigns and, for each, its audience, its
//! campaign stream (with the snapshot), its recorded feedback and its
//! pipeline's outputs; the runner restores its state and position from the
//! store. What was in flight is asked for again with the same ids: a batch
//! planned but not sent is announced (idempotently) and handed to the
//! sender again, with the same message ids and content; a job executed but
//! not acknowledged is delivered again and finds its idempotency key; a
//! pipeline commit's outputs are delivered again idempotently.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::Instrument;

use serde::{Deserialize, Serialize};
use smartmsg_domain::driver::{parse_job, FEEDBACK_KIND, FEEDBACK_SCHEMA};
use smartmsg_domain::reactions::{reaction_topology, CampaignInfo};
use smartmsg_domain::rng;
use smartmsg_domain::{
    Action, Audience, Campaign, CampaignCommand, CampaignDriver, CampaignEvent, CampaignSpec,
    Candidates, CreativeStats, DriverConfig, Feedback, JobKind, Policy, PolicyError, PolicySpec,
    Status,
};
use smartmsg_engine::stream::{
    EventLogSink, KeyValueStore, RunnerConfig, RunnerError, ScopedStore, StoreError, StreamRunner,
};
use smartmsg_engine::{
    job_idempotency_key, AppendTx, Clock, CommandOptions, DelayQueue, EventCodec, EventLog,
    ExpectedVersion, Known, NewEvent, RecordedEvent, Repository, RepositoryConfig, RepositoryError,
    Scheduler, SnapshotStore, StreamId,
};
use tokio::sync::Notify;

use crate::audience;
use crate::error::RuntimeError;
use crate::hooks::{CrashPoint, Hooks, NoHooks};
use crate::ingest::{ingest_once, ReactionInbox, ReactionSource, Routes, MAX_POLL};
use crate::packed::PackedStore;
use crate::pipeline::{
    announce_event, decode_late, decode_outcome, decode_window, info_event, removal_event,
    set_batch_plan, tick_event, BatchPlans, HookedStore, PipelineSettings, PipelineSource,
    SimulatedCrash, NO_OFFSET,
};
use crate::sender::Sender;
use crate::streams::{check_campaign_id, CampaignStreams, REGISTRY};

/// Builds a campaign's policy from its recorded [`PolicySpec`] (for
/// policies the domain does not know, `PolicySpec::Custom`).
pub type PolicyFactory = dyn Fn(&PolicySpec, &CampaignSpec, &Audience) -> Result<Box<dyn Policy>, PolicyError>
    + Send
    + Sync;

/// The stream of removed users: one [`USER_REMOVED_KIND`] event (JSON
/// `{"user": 7, "reason": "…"}`) per user whose data was removed, the
/// tombstone the log keeps. Read when a runtime opens.
pub const REMOVALS: &str = "removed-users";
/// Kind of a removal tombstone in [`REMOVALS`].
pub const USER_REMOVED_KIND: &str = "UserRemoved";

#[derive(Serialize, Deserialize)]
struct Removal {
    user: u32,
    #[serde(default)]
    reason: String,
}

/// What [`Runtime::remove_user`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovalReport {
    /// The user.
    pub user: u32,
    /// When the removal was recorded (the runtime's clock); the first
    /// time's, when the user had been removed before.
    pub removed_ms: u64,
    /// `false` when the user had been removed before (nothing was done).
    pub recorded: bool,
    /// The started campaigns whose audience held the user: they will not
    /// plan nor send to the user again, and their pipelines dropped the
    /// user's profile.
    pub campaigns: Vec<String>,
}

/// The systems a runtime runs on.
#[derive(Clone)]
pub struct Ports {
    /// The event log.
    pub log: Arc<dyn EventLog>,
    /// Snapshots of campaign aggregates (optional).
    pub snapshots: Option<Arc<dyn SnapshotStore>>,
    /// The delay queue of batch jobs.
    pub queue: Arc<dyn DelayQueue>,
    /// The reaction pipelines' state.
    pub state: Arc<dyn KeyValueStore>,
    /// The clock ([`smartmsg_engine::SystemClock`] in production).
    pub clock: Arc<dyn Clock>,
    /// Where batches go.
    pub sender: Arc<dyn Sender>,
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ports")
            .field("sender", &self.sender.name())
            .finish_non_exhaustive()
    }
}

/// How a runtime works.
#[derive(Clone)]
#[non_exhaustive]
pub struct RuntimeOptions {
    /// Snapshot a campaign every this many events. Default 16.
    pub snapshot_every: u64,
    /// Most pipeline input records per commit. Default 5,000.
    pub runner_batch: usize,
    /// Most jobs taken from the queue per step. Default 64.
    pub lease_batch: usize,
    /// Most messages taken from each reaction source per step (at most
    /// [`MAX_POLL`]). Default [`MAX_POLL`].
    pub ingest_batch: usize,
    /// First delay before a failed send is tried again (doubling, up to
    /// `send_retry_max_ms`). Default 1 s.
    pub send_retry_ms: u64,
    /// Longest delay between send attempts. Default 5 minutes.
    pub send_retry_max_ms: u64,
    /// Longest sleep of the spawned loop ([`Runtime::spawn`]) between
    /// steps. Default 200 ms.
    pub poll_interval_ms: u64,
    /// Shortest time between two steps of the spawned loop that reactions
    /// submitted through the inbox wake: under a stream of submissions,
    /// the pipeline then runs on batches of at least this many
    /// milliseconds' worth instead of one step per request (measured by
    /// `smartmsg loadtest`: single-reaction ingest about 1.5 times
    /// faster). Commands and due jobs do not wait for it. Default 50 ms.
    pub wake_coalesce_ms: u64,
    /// Crash hooks ([`NoHooks`] in production).
    pub hooks: Arc<dyn Hooks>,
    /// Builds policies from their specs; `None`: [`PolicySpec::build`].
    pub policies: Option<Arc<PolicyFactory>>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            snapshot_every: 16,
            runner_batch: 5_000,
            lease_batch: 64,
            ingest_batch: MAX_POLL,
            send_retry_ms: 1_000,
            send_retry_max_ms: 300_000,
            poll_interval_ms: 200,
            wake_coalesce_ms: 50,
            hooks: Arc::new(NoHooks),
            policies: None,
        }
    }
}

impl std::fmt::Debug for RuntimeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeOptions")
            .field("snapshot_every", &self.snapshot_every)
            .field("runner_batch", &self.runner_batch)
            .field("lease_batch", &self.lease_batch)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("wake_coalesce_ms", &self.wake_coalesce_ms)
            .finish_non_exhaustive()
    }
}

/// Everything a campaign is created with.
#[derive(Debug, Clone)]
pub struct CampaignSetup {
    /// Its id (see [`check_campaign_id`]).
    pub id: String,
    /// Creatives, budget, schedule.
    pub spec: CampaignSpec,
    /// The users it may message, with their features.
    pub audience: Candidates,
    /// The policy that plans its batches.
    pub policy: PolicySpec,
    /// Seeds the plans (the same seed plans the same batches).
    pub seed: u64,
    /// A second seed part; default: the campaign id's hash.
    pub plan_stream: Option<u64>,
    /// The reaction pipeline's settings.
    pub pipeline: PipelineSettings,
    /// Complete the campaign this long after its last batch was sent.
    pub reaction_horizon_ms: u64,
}

impl CampaignSetup {
    /// A setup with default pipeline settings, seed 0, and completion a
    /// day after the last batch.
    pub fn new(
        id: impl Into<String>,
        spec: CampaignSpec,
        audience: Candidates,
        policy: PolicySpec,
    ) -> Self {
        Self {
            id: id.into(),
            spec,
            audience,
            policy,
            seed: 0,
            plan_stream: None,
            pipeline: PipelineSettings::default(),
            reaction_horizon_ms: DriverConfig::default().reaction_horizon_ms,
        }
    }
}

/// A campaign's registration in the runtime's registry stream
/// ([`REGISTRY`], events of kind [`REGISTERED`], JSON): everything needed
/// to run it again after a restart, and to replay its pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// The campaign id.
    pub id: String,
    /// Its spec.
    pub spec: CampaignSpec,
    /// Its policy.
    pub policy: PolicySpec,
    /// The plans' seed.
    pub seed: u64,
    /// The plans' second seed part.
    pub plan_stream: u64,
    /// The reaction pipeline's settings.
    pub pipeline: PipelineSettings,
    /// Completion this long after the last batch was sent.
    pub reaction_horizon_ms: u64,
    /// The audience: events `audience_from..audience_from + chunks` of the
    /// audience stream (1-based versions).
    pub audience_from: u64,
    /// Chunk events of the audience.
    pub audience_chunks: u64,
    /// Users in the audience.
    pub audience_rows: u64,
    /// The campaign whose audience stream holds the chunks: another
    /// campaign's when both were created with the same audience (stored
    /// once, loaded once); `None` (and every registration written before
    /// shared audiences): its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience_of: Option<String>,
    /// A digest of the audience's columns ([`audience_digest`]): how a new
    /// campaign finds an identical audience already stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience_digest: Option<u64>,
}

impl Registration {
    /// The campaign whose audience stream holds this campaign's audience.
    pub fn audience_owner(&self) -> &str {
        self.audience_of.as_deref().unwrap_or(&self.id)
    }

    /// Where the audience is stored (the runtime's cache key).
    fn audience_loc(&self) -> AudienceLoc {
        (
            self.audience_owner().to_owned(),
            self.audience_from,
            self.audience_chunks,
        )
    }
}

/// FNV-1a of an audience's columns (feature dimension, user ids, feature
/// bits): equal audiences have equal digests, so a campaign created with
/// the audience of another reuses its stored chunks.
pub fn audience_digest(c: &Candidates) -> u64 {
    let mut h = smartmsg_engine::fnv::Fnv1a::new();
    h.write(&(c.dim() as u64).to_le_bytes());
    h.write(&(c.len() as u64).to_le_bytes());
    for u in c.users() {
        h.write(&u.to_le_bytes());
    }
    for x in c.rows().flatten() {
        h.write(&x.to_bits().to_le_bytes());
    }
    h.finish()
}

/// Where an audience is stored: the owner campaign, the first chunk's
/// version, the number of chunks.
type AudienceLoc = (String, u64, u64);

/// The kind of a [`Registration`] event.
pub const REGISTERED: &str = "CampaignRegistered";

/// One batch of a campaign, as [`CampaignView`] shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchView {
    /// The batch.
    pub batch: u32,
    /// The policy that planned it.
    pub policy: String,
    /// Messages in it.
    pub messages: u32,
    /// Messages per creative.
    pub per_creative: Vec<u32>,
    /// When it was recorded as sent.
    pub sent_ms: Option<u64>,
    /// Users counted as reacting so far.
    pub reacted: u64,
    /// Of which, per creative they got.
    pub reacted_per_creative: Vec<u32>,
}

/// What a campaign looks like now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignView {
    /// Its id.
    pub id: String,
    /// The version of its campaign stream (changes with every event: an
    /// ETag for optimistic concurrency).
    pub version: u64,
    /// Its state.
    pub status: Option<Status>,
    /// Its budget.
    pub budget: u64,
    /// Budget not yet reserved by a planned batch.
    pub budget_left: u64,
    /// Messages in sent batches.
    pub sent: u64,
    /// Reactions recorded.
    pub reactions: u64,
    /// Per creative.
    pub creatives: Vec<CreativeStats>,
    /// Its batches so far.
    pub batches: Vec<BatchView>,
    /// Batches the model has learned from.
    pub fed: u32,
    /// The last failure to hand a batch to the sender, if it is still
    /// failing.
    pub send_error: Option<String>,
    /// Events of the campaign's pipeline stream (`pipeline-<id>`) its
    /// reaction pipeline has committed through; the stream's version minus
    /// this is the pipeline's lag.
    #[serde(default)]
    pub pipeline_processed: u64,
}

/// What one [`Runtime::step`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Reaction messages taken from sources.
    pub ingested: usize,
    /// Jobs taken from the queue.
    pub jobs: usize,
    /// Of which refused or found already done (acknowledged with no new
    /// effect: redeliveries, jobs of a campaign that is over).
    pub jobs_absorbed: usize,
    /// Of which failed and given back to the queue for a retry.
    pub jobs_retried: usize,
    /// Reaction sources that failed this step (tried again next step).
    pub source_failures: usize,
    /// Campaigns whose work failed this step (reported; the others went
    /// on).
    pub campaign_failures: usize,
    /// Batches handed to the sender and acknowledged.
    pub batches_sent: usize,
    /// Sends that failed (tried again later).
    pub send_failures: usize,
    /// The earliest time something is due (a job, a send retry, a tick), if
    /// known.
    pub next_wake_ms: Option<u64>,
}

/// Most polls of one reaction source per step.
const MAX_INGEST_POLLS: usize = 25;

/// Most rounds of driver work per campaign and step: each round settles
/// at least one thing (a command, a feedback, an announcement, a send), so
/// a campaign needs a handful; more means a bug, reported rather than
/// looped on.
const MAX_ROUNDS: usize = 1_000;

impl StepReport {
    fn absorb(&mut self, r: &smartmsg_engine::RunReport) {
        self.jobs_absorbed += r.refused + r.already_done;
        self.jobs_retried += r.retried;
    }
}

/// The runtime state of one campaign.
struct Live {
    id: String,
    streams: CampaignStreams,
    driver: CampaignDriver<'static>,
    runner: Option<StreamRunner<PipelineSource, EventLogSink>>,
    users: BatchPlans,
    through: Arc<AtomicU64>,
    audience: Arc<Audience>,
    /// Where its audience is stored, and the stored audience's digest.
    audience_loc: AudienceLoc,
    audience_digest: Option<u64>,
    pipeline: PipelineSettings,
    campaign_v: u64,
    feedback_v: u64,
    windows_v: u64,
    outcomes_v: u64,
    late_v: u64,
    /// Time of the last tick this process appended, and the pipeline
    /// stream's version right after it.
    tick_ms: u64,
    tick_v: u64,
    /// The pipeline stream has input after the last tick, or open windows:
    /// a tick is wanted.
    untickled: bool,
    /// The pipeline has windows not yet closed.
    open_windows: bool,
    /// Events of the pipeline stream the pipeline has committed through.
    pipeline_processed: u64,
    send_retry_at: u64,
    send_failures: u32,
    send_error: Option<String>,
}

/// Campaigns run on the ports. See the [module docs](self).
pub struct Runtime {
    ports: Ports,
    options: RuntimeOptions,
    repo: Repository<Campaign>,
    scheduler: Scheduler<Campaign>,
    routes: Routes,
    wake: Arc<Notify>,
    sources: Vec<Box<dyn ReactionSource>>,
    campaigns: BTreeMap<String, Live>,
    /// Audiences loaded, by where they are stored: campaigns sharing one
    /// hold it once.
    audiences: HashMap<AudienceLoc, Arc<Audience>>,
    registry_v: u64,
    views: Views,
    stats: Arc<RuntimeStats>,
    /// Removed users and when they were removed.
    removed: BTreeMap<u32, u64>,
    /// The removed users, shared with readers (the HTTP service filters
    /// them out of what it shows).
    removed_shared: Removed,
    /// Where the current step's time went (logged at debug level).
    timing: StepTiming,
}

/// Where one step's time went, logged at debug level when the step did
/// something.
#[derive(Debug, Default)]
struct StepTiming {
    ingest: std::time::Duration,
    ticks: u32,
    tick_time: std::time::Duration,
    runs: u32,
    commits: u64,
    run_time: std::time::Duration,
    read_time: std::time::Duration,
    commands: u32,
    late_commands: u32,
    batches: u32,
    command_time: std::time::Duration,
    feedback: u32,
    feedback_time: std::time::Duration,
    late_read: u32,
    windows_read: u32,
}

/// The removed users, readable without waiting for the runtime.
pub type Removed = Arc<std::sync::RwLock<std::collections::BTreeSet<u32>>>;

/// Counters of a runtime, shared with readers (`/metrics`) without
/// waiting for it. Updated as it steps.
#[derive(Debug, Default)]
pub struct RuntimeStats {
    /// Steps done.
    pub steps: AtomicU64,
    /// Delay-queue jobs fired (leases taken, redeliveries included).
    pub jobs_fired: AtomicU64,
    /// How late the last fired job was: the runtime's now minus its due
    /// time, in milliseconds.
    pub firing_lag_ms_last: AtomicU64,
    /// The largest such lag since the runtime was opened.
    pub firing_lag_ms_max: AtomicU64,
}

/// The campaigns' views as of the end of the runtime's last step or
/// command: readers (an HTTP service) read them without waiting for the
/// runtime.
pub type Views = Arc<std::sync::RwLock<BTreeMap<String, CampaignView>>>;

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("campaigns", &self.campaigns.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn decode_err(e: &RecordedEvent, reason: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Decode {
        stream: e.stream.to_string(),
        position: e.position,
        reason: reason.to_string(),
    }
}

/// Reads `stream` from version `from` to its end.
/// The audience a registration names, read from the log.
async fn read_audience(log: &dyn EventLog, reg: &Registration) -> Result<Audience, RuntimeError> {
    let streams = CampaignStreams::new(reg.audience_owner())?;
    let mut cands = None;
    let mut events = read_from(log, &streams.audience, reg.audience_from.max(1)).await?;
    events.truncate(usize::try_from(reg.audience_chunks).unwrap_or(usize::MAX));
    if (events.len() as u64) < reg.audience_chunks {
        return Err(RuntimeError::Audience(format!(
            "campaign {}: {} of {} audience chunks found",
            reg.id,
            events.len(),
            reg.audience_chunks
        )));
    }
    for e in &events {
        audience::decode_into(e, &mut cands).map_err(|r| decode_err(e, r))?;
    }
    let cands = cands.ok_or_else(|| RuntimeError::Audience("no audience".into()))?;
    Ok(Audience::new(cands)?)
}

/// A registered campaign as the log holds it: its registration, its
/// audience, and every event of `streams` (of [`CampaignStreams`]) the
/// caller asks for, in order. `None` if no campaign `id` was registered.
/// For readers beside a running runtime (an evaluation job): nothing is
/// locked, the log is read as it is.
pub async fn read_registered(
    log: &dyn EventLog,
    id: &str,
) -> Result<Option<(Registration, Audience)>, RuntimeError> {
    let registry = StreamId::new(REGISTRY)?;
    for e in read_from(log, &registry, 1).await? {
        let reg: Registration =
            serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
        // The first registration of an id is the one the runtime loads.
        if reg.id == id {
            let aud = read_audience(log, &reg).await?;
            return Ok(Some((reg, aud)));
        }
    }
    Ok(None)
}

/// Every event of `stream`, in order.
pub async fn read_stream_all(
    log: &dyn EventLog,
    stream: &StreamId,
) -> Result<Vec<RecordedEvent>, RuntimeError> {
    read_from(log, stream, 1).await
}

async fn read_from(
    log: &dyn EventLog,
    stream: &StreamId,
    from: u64,
) -> Result<Vec<RecordedEvent>, RuntimeError> {
    let mut out = Vec::new();
    let mut v = from.max(1);
    let page = log.limits().max_read_events.clamp(1, 10_000);
    loop {
        let batch = log.read_stream(stream, v, page).await?;
        let Some(last) = batch.last() else { break };
        v = last.version + 1;
        let n = batch.len();
        out.extend(batch);
        if n < page {
            break;
        }
    }
    Ok(out)
}

impl Runtime {
    /// Opens a runtime on `ports`: every campaign registered in the log is
    /// loaded and resumes where it was.
    pub async fn open(ports: Ports, options: RuntimeOptions) -> Result<Self, RuntimeError> {
        let mut repo =
            Repository::<Campaign>::new(Arc::clone(&ports.log), Arc::clone(&ports.clock));
        if let Some(s) = &ports.snapshots {
            repo = repo.with_snapshots(Arc::clone(s));
        }
        let repo = repo
            .with_config({
                let mut built = RepositoryConfig::default();
                built.snapshot_every = options.snapshot_every;
                built
            })
            .map_err(|e| RuntimeError::Open {
                what: "repository",
                reason: e.to_string(),
            })?;
        let scheduler = Scheduler::new(
            Arc::clone(&ports.queue),
            repo.clone(),
            Arc::clone(&ports.clock),
            |job| Err(format!("job {} is mapped by the runtime", job.id)),
        );
        let mut rt = Self {
            ports,
            options,
            repo,
            scheduler,
            routes: Routes::default(),
            wake: Arc::new(Notify::new()),
            sources: Vec::new(),
            campaigns: BTreeMap::new(),
            audiences: HashMap::new(),
            registry_v: 0,
            views: Views::default(),
            stats: Arc::default(),
            removed: BTreeMap::new(),
            removed_shared: Removed::default(),
            timing: StepTiming::default(),
        };
        for e in read_from(&*rt.ports.log, &StreamId::new(REMOVALS)?, 1).await? {
            if e.kind == USER_REMOVED_KIND {
                let r: Removal =
                    serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
                rt.removed.entry(r.user).or_insert(e.timestamp_ms);
            }
        }
        rt.removed_shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(rt.removed.keys().copied());
        let registry = StreamId::new(REGISTRY)?;
        for e in read_from(&*rt.ports.log, &registry, 1).await? {
            rt.registry_v = e.version;
            let reg: Registration =
                serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
            if rt.campaigns.contains_key(&reg.id) {
                tracing::warn!(campaign = %reg.id, version = e.version, "a later registration of a loaded campaign is ignored");
                continue;
            }
            rt.load(reg).await?;
        }
        Ok(rt)
    }

    /// The published views (see [`Views`]).
    pub fn views(&self) -> Views {
        Arc::clone(&self.views)
    }

    /// Publishes every campaign's view.
    pub fn publish_views(&self) {
        let all: BTreeMap<String, CampaignView> = self
            .campaigns
            .keys()
            .filter_map(|id| self.view(id).map(|v| (id.clone(), v)))
            .collect();
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = all;
    }

    /// The ports.
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    /// The options.
    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }

    /// The runtime's counters (shared: they keep moving as it steps).
    pub fn stats(&self) -> Arc<RuntimeStats> {
        Arc::clone(&self.stats)
    }

    pub(crate) fn wake_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// The in-process way in for reactions.
    pub fn inbox(&self) -> ReactionInbox {
        ReactionInbox::new(
            Arc::clone(&self.ports.log),
            self.routes.clone(),
            Arc::clone(&self.ports.clock),
            Arc::clone(&self.wake),
        )
    }

    /// Adds a reaction source, polled at every step.
    pub fn add_source(&mut self, source: Box<dyn ReactionSource>) {
        self.sources.push(source);
    }

    /// The ids of the campaigns.
    pub fn campaign_ids(&self) -> Vec<String> {
        self.campaigns.keys().cloned().collect()
    }

    /// Whether every campaign is completed or cancelled with nothing left
    /// to record.
    pub fn all_finished(&self) -> bool {
        self.campaigns.values().all(|c| c.driver.is_finished())
    }

    /// Commits the reaction pipeline of campaign `id` has made (in its
    /// whole life, restarts included).
    pub fn pipeline_commits(&self, id: &str) -> Option<u64> {
        self.campaigns
            .get(id)?
            .runner
            .as_ref()
            .map(|r| r.next_commit())
    }

    /// The driver of a campaign (its decisions, plans and model).
    pub fn driver(&self, id: &str) -> Option<&CampaignDriver<'static>> {
        self.campaigns.get(id).map(|c| &c.driver)
    }

    fn live(&mut self, id: &str) -> Result<&mut Live, RuntimeError> {
        self.campaigns
            .get_mut(id)
            .ok_or_else(|| RuntimeError::UnknownCampaign(id.to_owned()))
    }

    fn build_policy(
        &self,
        reg: &Registration,
        aud: &Audience,
    ) -> Result<Box<dyn Policy>, RuntimeError> {
        let p = match &self.options.policies {
            Some(f) => f(&reg.policy, &reg.spec, aud)?,
            None => reg.policy.build(
                reg.spec.creatives.len(),
                aud.dim(),
                reg.spec.nominal_batch_size(0),
            )?,
        };
        Ok(p)
    }

    /// Creates a campaign (in draft): stores its audience and registration,
    /// then executes its `Create` command. Creating it again with the same
    /// setup does nothing; with another setup it is refused.
    pub async fn create_campaign(&mut self, setup: CampaignSetup) -> Result<(), RuntimeError> {
        check_campaign_id(&setup.id)?;
        setup.spec.validate()?;
        // The very columns of a loaded campaign's audience (a platform's
        // campaigns on one audience): its index, digest and stored chunks
        // serve again, with nothing hashed, indexed or copied.
        let same_columns = self
            .campaigns
            .values()
            .find(|c| c.audience.candidates().shares_columns_with(&setup.audience))
            .map(|c| {
                (
                    Arc::clone(&c.audience),
                    c.audience_digest,
                    c.audience_loc.clone(),
                )
            });
        let aud = match &same_columns {
            Some((a, ..)) => Arc::clone(a),
            None => Arc::new(Audience::new(setup.audience.clone())?),
        };
        if aud.is_empty() {
            return Err(RuntimeError::Audience("the audience is empty".into()));
        }
        let streams = CampaignStreams::new(&setup.id)?;
        let plan_stream = setup.plan_stream.unwrap_or_else(|| rng::label(&setup.id));
        // Registered before, but not loaded (its load failed): load that
        // registration rather than registering again.
        if !self.campaigns.contains_key(&setup.id) {
            let registry = StreamId::new(REGISTRY)?;
            let mut found = None;
            for e in read_from(&*self.ports.log, &registry, 1).await? {
                self.registry_v = self.registry_v.max(e.version);
                let reg: Registration =
                    serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
                if reg.id == setup.id && found.is_none() {
                    found = Some(reg);
                }
            }
            if let Some(reg) = found {
                self.load(reg).await?;
            }
        }
        if let Some(c) = self.campaigns.get(&setup.id) {
            let same = c.driver.campaign().spec() == Some(&setup.spec)
                && c.driver.config().seed == setup.seed
                && c.driver.config().stream == plan_stream
                && c.pipeline == setup.pipeline
                && c.audience.candidates() == &setup.audience;
            return if same {
                Ok(())
            } else {
                Err(RuntimeError::CampaignExists(setup.id))
            };
        }
        let mut reg = Registration {
            id: setup.id.clone(),
            spec: setup.spec.clone(),
            policy: setup.policy.clone(),
            seed: setup.seed,
            plan_stream,
            pipeline: setup.pipeline,
            reaction_horizon_ms: setup.reaction_horizon_ms,
            audience_from: 0,
            audience_chunks: 0,
            audience_rows: aud.len() as u64,
            audience_of: None,
            audience_digest: match &same_columns {
                Some((_, digest, _)) => *digest,
                None => Some(audience_digest(&setup.audience)),
            },
        };
        // An identical audience already stored (another campaign created
        // with the same users and features): point to it.
        let stored = match same_columns {
            Some((.., loc)) => Some(loc),
            None => self
                .campaigns
                .values()
                .find(|c| {
                    c.audience_digest == reg.audience_digest
                        && c.audience.candidates() == &setup.audience
                })
                .map(|c| c.audience_loc.clone()),
        };
        // The policy must build before anything is stored.
        self.build_policy(&reg, &aud)?;
        let now = self.ports.clock.now_ms();
        let limits = self.ports.log.limits();
        let rows =
            audience::rows_per_chunk(aud.dim(), limits.max_event_bytes.min(limits.max_tx_bytes));
        let chunks = match stored {
            Some((owner, from, chunks)) => {
                reg.audience_of = Some(owner);
                reg.audience_from = from;
                reg.audience_chunks = chunks;
                Vec::new()
            }
            None => audience::encode(aud.candidates(), rows, now),
        };
        if reg.audience_of.is_none() {
            reg.audience_chunks = chunks.len() as u64;
        }
        for chunk in chunks {
            let r = self
                .ports
                .log
                .append(AppendTx::single(
                    streams.audience.clone(),
                    ExpectedVersion::Any,
                    vec![chunk],
                ))
                .await?;
            if reg.audience_from == 0 {
                reg.audience_from = r.versions.first().map_or(1, |(_, v)| *v);
            }
        }
        let registry = StreamId::new(REGISTRY)?;
        let body = serde_json::to_vec(&reg).map_err(|e| RuntimeError::Open {
            what: "registration",
            reason: e.to_string(),
        })?;
        self.ports
            .log
            .append(AppendTx::single(
                registry,
                ExpectedVersion::Exact(self.registry_v),
                vec![NewEvent::new(REGISTERED, 1, now, body)],
            ))
            .await?;
        self.registry_v += 1;
        // The audience just stored is the one in hand: the load takes it
        // from the cache instead of reading its chunks back.
        self.audiences.entry(reg.audience_loc()).or_insert(aud);
        self.load(reg).await?;
        self.publish_views();
        Ok(())
    }

    /// Loads a registered campaign and brings it up to date from the log.
    async fn load(&mut self, reg: Registration) -> Result<(), RuntimeError> {
        let streams = CampaignStreams::new(&reg.id)?;
        let log = Arc::clone(&self.ports.log);
        let loc = reg.audience_loc();
        let aud = match self.audiences.get(&loc) {
            Some(a) => Arc::clone(a),
            None => {
                let a = Arc::new(read_audience(&*log, &reg).await?);
                self.audiences.insert(loc.clone(), Arc::clone(&a));
                a
            }
        };
        let policy = self.build_policy(&reg, &aud)?;
        let mut config = DriverConfig::default();
        config.seed = reg.seed;
        config.stream = reg.plan_stream;
        config.window_ms = reg.pipeline.window_ms.max(1);
        config.grace_ms = reg.pipeline.grace_ms;
        config.reaction_horizon_ms = reg.reaction_horizon_ms;
        let mut driver = CampaignDriver::new(reg.id.clone(), config, policy, Arc::clone(&aud));
        if !self.removed.is_empty() {
            let removed: Vec<u32> = self.removed.keys().copied().collect();
            driver.remove_users(&removed);
        }
        let users: BatchPlans = Arc::default();
        let through = Arc::new(AtomicU64::new(NO_OFFSET));
        let mut live = Live {
            id: reg.id.clone(),
            streams: streams.clone(),
            driver,
            runner: None,
            users,
            through,
            audience: aud,
            audience_loc: loc,
            audience_digest: reg.audience_digest,
            pipeline: reg.pipeline,
            campaign_v: 0,
            feedback_v: 0,
            windows_v: 0,
            outcomes_v: 0,
            late_v: 0,
            tick_ms: 0,
            tick_v: 0,
            untickled: false,
            open_windows: false,
            pipeline_processed: 0,
            send_retry_at: 0,
            send_failures: 0,
            send_error: None,
        };
        // The campaign exists (a crash may have come between registration
        // and creation) and the pipeline knows it.
        self.execute_on(
            &mut live,
            CampaignCommand::new("create", Action::Create(reg.spec.clone())),
        )
        .await?;
        if log.stream_version(&streams.pipeline).await? == 0 {
            let info = CampaignInfo::from_spec(&reg.spec, reg.pipeline.accept_after_last_ms);
            let tx = AppendTx::single(
                streams.pipeline.clone(),
                ExpectedVersion::NoStream,
                vec![info_event(&info, self.ports.clock.now_ms())],
            );
            match log.append(tx).await {
                Ok(_) | Err(smartmsg_engine::AppendError::WrongExpectedVersion { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        catch_up(&*log, &mut live).await?;
        let mut pending = None;
        for e in read_from(&*log, &streams.feedback, 1).await? {
            if e.kind != FEEDBACK_KIND {
                continue;
            }
            let f: Feedback =
                serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
            live.feedback_v = e.version;
            if let Some(f) = Feedback::join(&mut pending, f) {
                learn(&mut live, &f)?;
            }
        }
        // Every planned batch but the last was announced before it was sent;
        // the last one too if it was sent.
        let planned = live.driver.plans().len() as u32;
        if planned > 0 {
            let last_sent = live.driver.campaign().pending_batch().is_none();
            let through = if last_sent { planned } else { planned - 1 };
            if through > 0 {
                live.driver.announced(through - 1);
            }
        }
        self.open_runner(&mut live)?;
        read_outputs(&*log, &mut live).await?;
        self.routes.insert(&live.id, streams.pipeline.clone());
        tracing::info!(campaign = %live.id, status = ?live.driver.campaign().status(), planned, "campaign loaded");
        self.campaigns.insert(reg.id, live);
        Ok(())
    }

    fn open_runner(&self, live: &mut Live) -> Result<(), RuntimeError> {
        let scoped = ScopedStore::new(Arc::clone(&self.ports.state), format!("{}/", live.id))?;
        // The user and first-reaction tables get a row per user: packed,
        // a commit writes them as one value (see `crate::packed`).
        let packed = PackedStore::new(
            Arc::new(scoped),
            &[
                smartmsg_domain::reactions::STORE_USERS,
                smartmsg_domain::reactions::STORE_SEEN,
            ],
        );
        let store = HookedStore::new(
            Arc::new(packed),
            Arc::clone(&self.options.hooks),
            &live.id,
            Arc::clone(&live.through),
        );
        let source = PipelineSource::new(
            Arc::clone(&self.ports.log),
            live.streams.pipeline.clone(),
            &live.id,
            Arc::clone(&live.audience),
            Arc::clone(&live.users),
            Arc::clone(&live.through),
        );
        let id = live.id.clone();
        let sink = EventLogSink::with_streams(Arc::clone(&self.ports.log), move |output| {
            CampaignStreams::output_stream(&id, output)
        });
        let topology = reaction_topology(live.pipeline.reaction_config(live.audience.dim()))
            .map_err(|e| RuntimeError::Open {
                what: "reaction pipeline",
                reason: e.to_string(),
            })?;
        let runner = StreamRunner::open(
            topology,
            Arc::new(store),
            source,
            sink,
            RunnerConfig::new(format!("rx-{}", live.id))
                .with_batch(self.options.runner_batch.max(1)),
        )?;
        live.runner = Some(runner);
        Ok(())
    }

    async fn execute_on(
        &mut self,
        live: &mut Live,
        cmd: CampaignCommand,
    ) -> Result<(), RuntimeError> {
        // The driver holds the campaign folded from every event: decide on
        // it, borrowed, rather than loading or copying the aggregate (a
        // stale state only costs a retry from a fresh load).
        let known = Known {
            state: live.driver.campaign(),
            version: live.campaign_v,
        };
        let r = self
            .repo
            .execute_from(
                &live.streams.campaign,
                known,
                &cmd,
                CommandOptions::default(),
            )
            .await;
        live.driver.executed(&cmd.id);
        match r {
            Ok(_) => {}
            Err(RepositoryError::Domain(source)) => {
                return Err(RuntimeError::Refused {
                    campaign: live.id.clone(),
                    command: cmd.id,
                    source,
                })
            }
            Err(e) => {
                return Err(RuntimeError::Command {
                    campaign: live.id.clone(),
                    command: cmd.id,
                    source: Box::new(e),
                })
            }
        }
        catch_up(&*self.ports.log, live).await
    }

    /// Executes `cmds` in order in as few appends as the log's limits
    /// allow (usually one): the windows and late reactions a step reads
    /// cost one transaction, not one each. A command refused on the
    /// driver's state is executed again alone, which decides it on a fresh
    /// load and reports a refusal; so is every command when the campaign
    /// stream moved on. Commands keep their ids, so each still takes effect
    /// once, whichever way it went.
    async fn execute_all_on(
        &mut self,
        live: &mut Live,
        cmds: Vec<CampaignCommand>,
    ) -> Result<(), RuntimeError> {
        let mut rest = &cmds[..];
        while rest.len() > 1 {
            let known = Known {
                state: live.driver.campaign(),
                version: live.campaign_v,
            };
            let r = self
                .repo
                .execute_all_from(
                    &live.streams.campaign,
                    known,
                    rest,
                    CommandOptions::default(),
                )
                .await
                .map_err(|e| RuntimeError::Command {
                    campaign: live.id.clone(),
                    command: rest[0].id.clone(),
                    source: Box::new(e),
                })?;
            let Some(done) = r.filter(|d| d.taken > 0) else {
                // Another writer moved the stream: one by one, from fresh
                // loads.
                break;
            };
            self.timing.batches += 1;
            let (taken, after) = rest.split_at(done.taken.min(rest.len()));
            for cmd in taken {
                live.driver.executed(&cmd.id);
            }
            catch_up(&*self.ports.log, live).await?;
            for (cmd, outcome) in taken.iter().zip(done.outcomes) {
                if outcome.is_err() {
                    self.execute_reporting(live, cmd.clone()).await?;
                }
            }
            rest = after;
        }
        for cmd in rest {
            self.execute_reporting(live, cmd.clone()).await?;
        }
        Ok(())
    }

    /// [`execute_on`](Self::execute_on), with a refusal reported and the
    /// command dropped.
    async fn execute_reporting(
        &mut self,
        live: &mut Live,
        cmd: CampaignCommand,
    ) -> Result<(), RuntimeError> {
        match self.execute_on(live, cmd).await {
            Err(RuntimeError::Refused {
                campaign,
                command,
                source,
            }) => {
                tracing::warn!(%campaign, %command, reason = %source, "the campaign refused a command; dropped");
                Ok(())
            }
            other => other,
        }
    }

    /// Executes a lifecycle command on campaign `id` (`Start`, `Pause`,
    /// `Resume`, `Cancel`; the command id makes retries harmless). Command
    /// ids of the forms the runtime uses itself (`create`, `start-due`,
    /// `complete`, `plan-…`, `sent-…`, `reactions:…`, `late-…`) are
    /// refused, so that a caller cannot take one over.
    pub async fn command(&mut self, id: &str, cmd: CampaignCommand) -> Result<(), RuntimeError> {
        self.command_if(id, cmd, None).await
    }

    /// [`command`](Self::command), only if the campaign's stream is at
    /// `expected` version (optimistic concurrency: an HTTP `If-Match`);
    /// otherwise [`RuntimeError::VersionMismatch`] and nothing happens.
    pub async fn command_if(
        &mut self,
        id: &str,
        cmd: CampaignCommand,
        expected: Option<u64>,
    ) -> Result<(), RuntimeError> {
        if let (Some(want), Some(live)) = (expected, self.campaigns.get(id)) {
            if live.campaign_v != want {
                return Err(RuntimeError::VersionMismatch {
                    campaign: id.to_owned(),
                    expected: want,
                    actual: live.campaign_v,
                });
            }
        }
        let reserved = ["create", "start-due", "complete"].contains(&cmd.id.as_str())
            || ["plan-", "sent-", "reactions:", "late-"]
                .iter()
                .any(|p| cmd.id.starts_with(p));
        if reserved {
            return Err(RuntimeError::ReservedCommandId(cmd.id));
        }
        let mut live = self
            .campaigns
            .remove(id)
            .ok_or_else(|| RuntimeError::UnknownCampaign(id.to_owned()))?;
        let r = self.execute_on(&mut live, cmd).await;
        self.campaigns.insert(id.to_owned(), live);
        self.publish_views();
        self.wake.notify_one();
        r
    }

    /// Starts campaign `id` (command id `start`).
    pub async fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        self.command(id, CampaignCommand::new("start", Action::Start))
            .await
    }

    /// Removes `user`'s data from what every campaign does next (see
    /// [`CampaignDriver::remove_users`]) and from their reaction pipelines'
    /// user tables, recording a tombstone in [`REMOVALS`] (in one atomic
    /// append with the pipelines' removal events). Campaigns registered
    /// later never plan the user. Removing a user again does nothing.
    /// What stays in the log is listed in `docs/serve.md`.
    pub async fn remove_user(
        &mut self,
        user: u32,
        reason: &str,
    ) -> Result<RemovalReport, RuntimeError> {
        let holding: Vec<String> = self
            .campaigns
            .iter()
            .filter(|(_, l)| l.audience.contains(user))
            .map(|(id, _)| id.clone())
            .collect();
        if let Some(&at) = self.removed.get(&user) {
            return Ok(RemovalReport {
                user,
                removed_ms: at,
                recorded: false,
                campaigns: holding,
            });
        }
        let now = self.ports.clock.now_ms();
        let body = serde_json::to_vec(&Removal {
            user,
            reason: reason.chars().take(500).collect(),
        })
        .unwrap_or_default();
        let mut tx = AppendTx::single(
            StreamId::new(REMOVALS)?,
            ExpectedVersion::Any,
            vec![NewEvent::new(USER_REMOVED_KIND, 1, now, body)],
        );
        for id in &holding {
            if let Some(l) = self.campaigns.get(id) {
                tx.streams.push(smartmsg_engine::StreamAppend {
                    stream: l.streams.pipeline.clone(),
                    expected: ExpectedVersion::Any,
                    events: vec![removal_event(user, now)],
                });
            }
        }
        self.ports.log.append(tx).await?;
        self.removed.insert(user, now);
        self.removed_shared
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user);
        for id in &holding {
            if let Some(l) = self.campaigns.get_mut(id) {
                l.driver.remove_users(&[user]);
            }
        }
        self.publish_views();
        self.wake.notify_one();
        Ok(RemovalReport {
            user,
            removed_ms: now,
            recorded: true,
            campaigns: holding,
        })
    }

    /// Whether `user`'s data was removed.
    pub fn is_removed(&self, user: u32) -> bool {
        self.removed.contains_key(&user)
    }

    /// The removed users, shared (they change as users are removed).
    pub fn removed_users(&self) -> Removed {
        Arc::clone(&self.removed_shared)
    }

    /// What campaign `id` looks like now.
    pub fn view(&self, id: &str) -> Option<CampaignView> {
        let live = self.campaigns.get(id)?;
        let d = &live.driver;
        let c = d.campaign();
        let batches = c
            .batches()
            .iter()
            .enumerate()
            .map(|(b, r)| BatchView {
                batch: b as u32,
                policy: r.policy.clone(),
                messages: r.users,
                per_creative: r.per_creative.clone(),
                sent_ms: d.sent_ms().get(b).copied().flatten(),
                reacted: d.reacted(b as u32) as u64,
                reacted_per_creative: d.reacted_per_creative(b as u32),
            })
            .collect();
        Some(CampaignView {
            id: id.to_owned(),
            version: live.campaign_v,
            status: c.status(),
            budget: c.spec().map_or(0, |s| s.budget),
            budget_left: c.remaining_budget(),
            sent: c.sent(),
            reactions: c.creative_stats().iter().map(|s| s.reactions).sum(),
            creatives: c.creative_stats().to_vec(),
            batches,
            fed: d.fed(),
            send_error: live.send_error.clone(),
            pipeline_processed: live.pipeline_processed,
        })
    }

    /// Does everything due at `now_ms` (see the [module docs](self)).
    pub async fn step(&mut self, now_ms: u64) -> Result<StepReport, RuntimeError> {
        let mut report = StepReport::default();
        let log = Arc::clone(&self.ports.log);
        let step_started = std::time::Instant::now();
        self.timing = StepTiming::default();
        for s in &mut self.sources {
            // At most MAX_INGEST_POLLS polls per source and step, so that a
            // backlog does not keep the campaigns waiting.
            for _ in 0..MAX_INGEST_POLLS {
                let n = match ingest_once(
                    &log,
                    &self.routes,
                    &mut **s,
                    now_ms,
                    self.options.ingest_batch,
                )
                .await
                {
                    Ok(n) => n,
                    // A source that fails (a broker down) stops only itself.
                    Err(e @ RuntimeError::Source { .. }) => {
                        tracing::warn!(error = %e, "reaction source failed; trying again next step");
                        report.source_failures += 1;
                        break;
                    }
                    Err(e) => return Err(e),
                };
                report.ingested += n;
                if n < self.options.ingest_batch.clamp(1, MAX_POLL) {
                    break;
                }
            }
        }
        self.timing.ingest = step_started.elapsed();
        let ids: Vec<String> = self.campaigns.keys().cloned().collect();
        for id in &ids {
            self.drive_isolated(id, now_ms, false, &mut report).await?;
        }
        let drive_time = step_started.elapsed();
        let leases = self
            .ports
            .queue
            .poll_due(now_ms, self.options.lease_batch.max(1))
            .await?;
        report.jobs = leases.len();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        for lease in &leases {
            let lag = now_ms.saturating_sub(lease.job.due_ms);
            self.stats.jobs_fired.fetch_add(1, Ordering::Relaxed);
            self.stats.firing_lag_ms_last.store(lag, Ordering::Relaxed);
            self.stats
                .firing_lag_ms_max
                .fetch_max(lag, Ordering::Relaxed);
        }
        for lease in leases {
            let (id, kind) = match parse_job(&lease.job) {
                Ok(x) => x,
                Err(reason) => {
                    let r = self
                        .scheduler
                        .process_mapped(lease, Err(reason), now_ms)
                        .await;
                    report.absorb(&r);
                    continue;
                }
            };
            if !self.campaigns.contains_key(&id) {
                let reason = format!("unknown campaign {id:?}");
                let r = self
                    .scheduler
                    .process_mapped(lease, Err(reason), now_ms)
                    .await;
                report.absorb(&r);
                continue;
            }
            self.drive(&id, now_ms, true, &mut report).await?;
            let hooks = Arc::clone(&self.options.hooks);
            if let JobKind::Batch(batch) = kind {
                if hooks.crash(CrashPoint::BeforePlan {
                    campaign: &id,
                    batch,
                }) {
                    return Err(RuntimeError::Crashed(format!(
                        "{id}: before planning batch {batch}"
                    )));
                }
            }
            let live = self.live(&id)?;
            let stream = live.streams.campaign.clone();
            let mapped = live.driver.job_command(kind, now_ms);
            match mapped {
                Ok(cmd) => {
                    if let JobKind::Batch(batch) = kind {
                        if hooks.crash(CrashPoint::AfterPlanBeforeAck {
                            campaign: &id,
                            batch,
                        }) {
                            // Execute as the scheduler would, and stop before
                            // the ack: the queue delivers the job again.
                            let key =
                                job_idempotency_key(&lease.job, self.ports.log.limits().max_id_len);
                            let opts = CommandOptions::default().with_idempotency_key(key);
                            self.repo
                                .execute(&stream, &cmd, opts)
                                .await
                                .map_err(|source| RuntimeError::Command {
                                    campaign: id.clone(),
                                    command: cmd.id.clone(),
                                    source: Box::new(source),
                                })?;
                            return Err(RuntimeError::Crashed(format!(
                                "{id}: after planning batch {batch}, before the ack"
                            )));
                        }
                    }
                    // Decide on the campaign the driver holds, borrowed
                    // (a copy per command grows with the audience).
                    let live = self
                        .campaigns
                        .get(&id)
                        .ok_or_else(|| RuntimeError::UnknownCampaign(id.clone()))?;
                    let known = Known {
                        state: live.driver.campaign(),
                        version: live.campaign_v,
                    };
                    let r = self
                        .scheduler
                        .process_known(lease, Ok((stream, cmd)), Some(known), now_ms)
                        .await;
                    if r.retried > 0 {
                        tracing::warn!(campaign = %id, ?kind, "a job's command failed; the queue retries it");
                    }
                    report.absorb(&r);
                }
                Err(e) => {
                    let r = self
                        .scheduler
                        .process_mapped(lease, Err(e.to_string()), now_ms)
                        .await;
                    report.absorb(&r);
                }
            }
            let live = self.live(&id)?;
            catch_up(&*log, live).await?;
            self.drive(&id, now_ms, false, &mut report).await?;
        }
        report.next_wake_ms = self.next_wake(now_ms).await?;
        self.publish_views();
        let t = &self.timing;
        if report.ingested > 0 || t.commits > 0 || t.commands > 0 || report.jobs > 0 {
            tracing::debug!(
                ingested = report.ingested,
                ingest_ms = t.ingest.as_millis() as u64,
                drive_ms = drive_time.saturating_sub(t.ingest).as_millis() as u64,
                step_ms = step_started.elapsed().as_millis() as u64,
                ticks = t.ticks,
                tick_ms = t.tick_time.as_millis() as u64,
                runs = t.runs,
                commits = t.commits,
                run_ms = t.run_time.as_millis() as u64,
                read_ms = t.read_time.as_millis() as u64,
                windows_read = t.windows_read,
                late_read = t.late_read,
                commands = t.commands,
                late_commands = t.late_commands,
                batches = t.batches,
                command_ms = t.command_time.as_millis() as u64,
                feedback = t.feedback,
                feedback_ms = t.feedback_time.as_millis() as u64,
                jobs = report.jobs,
                lag_ms = self.ports.clock.now_ms().saturating_sub(now_ms),
                "step timing"
            );
        }
        Ok(report)
    }

    /// Closes every window the pipelines can close by `now_ms` (a tick for
    /// every campaign) and records what that yields. The simulator calls
    /// this at the end of a run.
    pub async fn flush(&mut self, now_ms: u64) -> Result<StepReport, RuntimeError> {
        let mut report = StepReport::default();
        let ids: Vec<String> = self.campaigns.keys().cloned().collect();
        for id in &ids {
            self.drive_isolated(id, now_ms, true, &mut report).await?;
        }
        Ok(report)
    }

    async fn next_wake(&mut self, now_ms: u64) -> Result<Option<u64>, RuntimeError> {
        let mut next = self.ports.queue.next_due().await?;
        let mut earlier = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        for live in self.campaigns.values() {
            // A send to retry, if one can go (a running campaign with a
            // batch awaiting it).
            let sendable = live.driver.campaign().status() == Some(Status::Running)
                && live.driver.campaign().pending_batch().is_some();
            if live.send_error.is_some() && sendable {
                earlier(live.send_retry_at.max(now_ms));
            }
            // A tick, if the pipeline has input no tick has covered yet.
            if live.untickled {
                earlier(live.tick_ms.saturating_add(live.pipeline.window_ms.max(1)));
            }
        }
        Ok(next)
    }

    /// [`drive`](Self::drive), with a campaign's own trouble (a refused or
    /// undecodable record, a model that cannot learn, work that does not
    /// settle) kept to that campaign: it is reported and the other
    /// campaigns go on. Failures of the shared backends (the log, the
    /// queue, the store) and crashes stop the step.
    async fn drive_isolated(
        &mut self,
        id: &str,
        now_ms: u64,
        force_tick: bool,
        report: &mut StepReport,
    ) -> Result<(), RuntimeError> {
        match self.drive(id, now_ms, force_tick, report).await {
            Err(
                e @ (RuntimeError::Decode { .. }
                | RuntimeError::Feedback(_)
                | RuntimeError::Stuck(_)
                | RuntimeError::Refused { .. }
                | RuntimeError::Policy(_)),
            ) => {
                tracing::error!(campaign = %id, error = %e, "campaign step failed; the other campaigns go on");
                report.campaign_failures += 1;
                Ok(())
            }
            other => other,
        }
    }

    /// Runs campaign `id`'s pipeline and performs what its driver asks,
    /// until nothing is left to do at `now_ms`.
    #[tracing::instrument(level = "debug", name = "campaign", skip(self, report))]
    async fn drive(
        &mut self,
        id: &str,
        now_ms: u64,
        force_tick: bool,
        report: &mut StepReport,
    ) -> Result<(), RuntimeError> {
        let mut live = self
            .campaigns
            .remove(id)
            .ok_or_else(|| RuntimeError::UnknownCampaign(id.to_owned()))?;
        let r = self.drive_live(&mut live, now_ms, force_tick, report).await;
        self.campaigns.insert(id.to_owned(), live);
        r
    }

    async fn drive_live(
        &mut self,
        live: &mut Live,
        now_ms: u64,
        force_tick: bool,
        report: &mut StepReport,
    ) -> Result<(), RuntimeError> {
        let log = Arc::clone(&self.ports.log);
        let hooks = Arc::clone(&self.options.hooks);
        let mut force = force_tick;
        let mut skip_pump = false;
        for _ in 0..MAX_ROUNDS {
            if !std::mem::take(&mut skip_pump) {
                self.pump(live, now_ms, force).await?;
                force = false;
            }
            let mut ready = live.driver.ready(now_ms);
            if ready.send.is_some() && now_ms < live.send_retry_at {
                ready.send = None;
            }
            if ready.is_empty() {
                return Ok(());
            }
            for job in &ready.schedule {
                self.ports.queue.schedule(job.clone()).await?;
            }
            live.driver.scheduled(&ready.schedule);
            let started = std::time::Instant::now();
            self.timing.commands += ready.commands.len() as u32;
            self.timing.late_commands += ready
                .commands
                .iter()
                .filter(|c| c.id.starts_with("late-"))
                .count() as u32;
            let r = self.execute_all_on(live, ready.commands).await;
            self.timing.command_time += started.elapsed();
            r?;
            for f in ready.feedback {
                // Large feedback is split into parts, all in one
                // transaction.
                let events: Vec<NewEvent> = f
                    .clone()
                    .into_parts()
                    .iter()
                    .map(|p| {
                        let body = serde_json::to_vec(p).unwrap_or_default();
                        NewEvent::new(FEEDBACK_KIND, FEEDBACK_SCHEMA, now_ms, body)
                    })
                    .collect();
                let n = events.len() as u64;
                let started = std::time::Instant::now();
                self.timing.feedback += 1;
                let appended = log
                    .append(AppendTx::single(
                        live.streams.feedback.clone(),
                        ExpectedVersion::Exact(live.feedback_v),
                        events,
                    ))
                    .await;
                self.timing.feedback_time += started.elapsed();
                match appended {
                    Ok(_) => live.feedback_v += n,
                    // The stream moved on (an append whose answer was lost
                    // took effect): learn what is there, ask again.
                    Err(smartmsg_engine::AppendError::WrongExpectedVersion { .. }) => {
                        catch_up_feedback(&*log, live).await?;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
                if hooks.crash(CrashPoint::AfterFeedbackBeforeUpdate {
                    campaign: &live.id,
                    batch: f.batch,
                }) {
                    return Err(RuntimeError::Crashed(format!(
                        "{}: after the feedback of batch {}, before the update",
                        live.id, f.batch
                    )));
                }
                learn(live, &f)?;
            }
            if let Some(b) = ready.announce {
                let key = format!("announce:{}:{b}", live.id);
                // Users of the batch removed since it was planned: their
                // profiles leave the pipeline right after it learns them.
                let mut events = vec![announce_event(b, now_ms)];
                events.extend(
                    live.driver
                        .removed_in_plan(b)
                        .into_iter()
                        .map(|u| removal_event(u, now_ms)),
                );
                let tx =
                    AppendTx::single(live.streams.pipeline.clone(), ExpectedVersion::Any, events)
                        .with_idempotency_key(key);
                match log.append(tx).await {
                    // Announced before a restart (at another time, so
                    // with other content): the key says it is done.
                    Ok(_) | Err(smartmsg_engine::AppendError::IdempotencyKeyReused { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                live.driver.announced(b);
                // The announcement is in the pipeline's input before the
                // batch goes out, so the pipeline reads it before any
                // reaction to the batch: the batch can go now, and the
                // pipeline catches up in the next round.
                skip_pump = true;
                continue;
            }
            if let Some(b) = ready.send {
                if hooks.crash(CrashPoint::AfterPlanBeforeSend {
                    campaign: &live.id,
                    batch: b,
                }) {
                    return Err(RuntimeError::Crashed(format!(
                        "{}: batch {b} planned, before it is sent",
                        live.id
                    )));
                }
                let Some(out) = live.driver.outgoing(b) else {
                    continue;
                };
                let span = tracing::info_span!("send_batch", campaign = %live.id, batch = b);
                match self.ports.sender.send(&out).instrument(span).await {
                    Ok(()) => {
                        report.batches_sent += 1;
                        live.send_failures = 0;
                        live.send_error = None;
                        live.send_retry_at = 0;
                        if hooks.crash(CrashPoint::AfterDeliveryBeforeRecord {
                            campaign: &live.id,
                            batch: b,
                        }) {
                            return Err(RuntimeError::Crashed(format!(
                                "{}: batch {b} delivered, before it is recorded",
                                live.id
                            )));
                        }
                        live.driver.sender_acked(b);
                    }
                    Err(e) => {
                        report.send_failures += 1;
                        live.send_failures += 1;
                        let shift = live.send_failures.saturating_sub(1).min(20);
                        let delay = self
                            .options
                            .send_retry_ms
                            .saturating_mul(1 << shift)
                            .min(self.options.send_retry_max_ms);
                        live.send_retry_at = now_ms.saturating_add(delay.max(1));
                        tracing::warn!(campaign = %live.id, batch = b, sender = self.ports.sender.name(), error = %e, retry_in_ms = delay, "sending failed");
                        live.send_error = Some(e.to_string());
                    }
                }
            }
        }
        Err(RuntimeError::Stuck(format!(
            "campaign {}: the driver still had work after {MAX_ROUNDS} rounds at {now_ms}",
            live.id
        )))
    }

    /// Ticks the pipeline if windows may have closed (or `force`), runs it
    /// over its new input, and reads its new outputs into the driver.
    async fn pump(
        &mut self,
        live: &mut Live,
        now_ms: u64,
        force: bool,
    ) -> Result<(), RuntimeError> {
        let log = &*self.ports.log;
        let v = log.stream_version(&live.streams.pipeline).await?;
        // A tick is wanted when there is input no tick has covered, or
        // windows are still open (they close only as stream time moves).
        let dirty = v > live.tick_v || live.open_windows;
        let due = now_ms >= live.tick_ms.saturating_add(live.pipeline.window_ms.max(1));
        if (force && now_ms > live.tick_ms) || (dirty && due) {
            let started = std::time::Instant::now();
            let r = log
                .append(AppendTx::single(
                    live.streams.pipeline.clone(),
                    ExpectedVersion::Any,
                    vec![tick_event(now_ms)],
                ))
                .await?;
            self.timing.ticks += 1;
            self.timing.tick_time += started.elapsed();
            live.tick_ms = now_ms;
            live.tick_v = r.versions.first().map_or(v + 1, |(_, v)| *v);
            live.untickled = false;
        } else {
            live.untickled = dirty;
        }
        if live.runner.is_none() {
            self.open_runner(live)?;
        }
        let Some(runner) = live.runner.as_mut() else {
            return Ok(());
        };
        let before = runner.next_commit();
        let started = std::time::Instant::now();
        let r = runner.run_until_idle().await;
        let after = runner.next_commit();
        self.timing.runs += 1;
        self.timing.commits += after.saturating_sub(before);
        self.timing.run_time += started.elapsed();
        live.pipeline_processed = runner.position() >> crate::pipeline::SUB_BITS;
        live.open_windows = runner
            .task()
            .store_len(smartmsg_domain::reactions::STORE_WINDOWS)
            .unwrap_or(0)
            > 0;
        if live.open_windows {
            live.untickled = true;
        }
        if let Err(e) = r {
            live.runner = None;
            if let RunnerError::Store(StoreError::Backend(b)) = &e {
                if b.downcast_ref::<SimulatedCrash>().is_some() {
                    return Err(RuntimeError::Crashed(format!(
                        "{}: before a pipeline commit",
                        live.id
                    )));
                }
            }
            return Err(e.into());
        }
        for commit in before..after {
            if self
                .options
                .hooks
                .crash(CrashPoint::AfterCommitBeforeRecord {
                    campaign: &live.id,
                    commit: commit + 1,
                })
            {
                return Err(RuntimeError::Crashed(format!(
                    "{}: after pipeline commit {}, before recording it",
                    live.id,
                    commit + 1
                )));
            }
        }
        let started = std::time::Instant::now();
        let (w, l) = (live.windows_v, live.late_v);
        let r = read_outputs(log, live).await;
        self.timing.read_time += started.elapsed();
        self.timing.windows_read += (live.windows_v - w) as u32;
        self.timing.late_read += (live.late_v - l) as u32;
        r
    }
}

/// Applies recorded feedback; a policy that refuses the update is reported
/// and the campaign goes on with its model as it was.
fn learn(live: &mut Live, f: &Feedback) -> Result<(), RuntimeError> {
    use smartmsg_domain::driver::FeedbackError;
    match live.driver.apply_feedback(f) {
        Ok(()) => Ok(()),
        Err(e @ (FeedbackError::Policy(_) | FeedbackError::Shape(_))) => {
            tracing::error!(campaign = %live.id, batch = f.batch, error = %e, "the model could not learn a batch's feedback; it goes on without it");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies the recorded feedback not applied yet.
async fn catch_up_feedback(log: &dyn EventLog, live: &mut Live) -> Result<(), RuntimeError> {
    // A batch's parts are one transaction: a read from a transaction's
    // start sees all of them.
    let mut pending = None;
    for e in read_from(log, &live.streams.feedback, live.feedback_v + 1).await? {
        live.feedback_v = e.version;
        if e.kind != FEEDBACK_KIND {
            continue;
        }
        let f: Feedback = serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
        if let Some(f) = Feedback::join(&mut pending, f) {
            learn(live, &f)?;
        }
    }
    Ok(())
}

/// Applies the campaign events not applied yet.
async fn catch_up(log: &dyn EventLog, live: &mut Live) -> Result<(), RuntimeError> {
    for e in read_from(log, &live.streams.campaign, live.campaign_v + 1).await? {
        let ev = CampaignEvent::decode(&e.kind, e.schema, &e.payload)
            .map_err(|err| decode_err(&e, err))?;
        if let CampaignEvent::BatchPlanned {
            batch,
            part,
            decisions,
            ..
        } = &ev
        {
            set_batch_plan(&live.users, *batch, *part, decisions);
        }
        live.driver.apply(&ev, e.timestamp_ms);
        live.campaign_v = e.version;
    }
    Ok(())
}

/// Reads the pipeline outputs not read yet into the driver.
async fn read_outputs(log: &dyn EventLog, live: &mut Live) -> Result<(), RuntimeError> {
    for e in read_from(log, &live.streams.outcomes, live.outcomes_v + 1).await? {
        let (user, r) = decode_outcome(&e).map_err(|err| decode_err(&e, err))?;
        if r.reacted {
            live.driver.reaction(r.batch, user, r.time_ms);
        }
        live.outcomes_v = e.version;
    }
    for e in read_from(log, &live.streams.windows, live.windows_v + 1).await? {
        let w = decode_window(&e).map_err(|err| decode_err(&e, err))?;
        live.driver.window_closed(&w);
        live.windows_v = e.version;
    }
    for e in read_from(log, &live.streams.late, live.late_v + 1).await? {
        let (start, r) = decode_late(&e).map_err(|err| decode_err(&e, err))?;
        if r.reacted {
            live.driver
                .late_reaction(format!("late-{}", e.version), start, r.creative);
        }
        live.late_v = e.version;
    }
    Ok(())
}
