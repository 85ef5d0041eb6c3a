//! One policy's campaign, run on the real engine under a virtual clock.
//!
//! Everything goes through the real components: campaign commands through
//! a [`Repository`] into an [`EmbeddedLog`] (snapshots in redb); one job per
//! batch in the [`EmbeddedDelayQueue`] (or the in-memory queue), fired by
//! the engine's [`Scheduler::run_once`] at the virtual now, its mapper
//! planning the batch with the policy (the decisions go into the
//! `BatchPlanned` event); the batch recorded as sent and handed to the
//! simulated channel; the users' reactions through the [`ReactionPath`]
//! into `RecordReactions` commands (one per window) and, before the next
//! batch is planned, into the policy's model (`Policy::update`).
//!
//! Virtual time jumps from event to event: to the earlier of the queue's
//! next due time and the next reaction's arrival.
//!
//! # Crashes
//!
//! A crash drops the whole [`Process`] (policy, reaction path, store
//! handles, caches) and opens a new one from the data directory:
//!
//! - the campaign is loaded from the log (snapshot + tail);
//! - the reaction path restores its last commit and the consumer re-reads
//!   the topic from the committed offset; window results of commits are
//!   recorded again where the campaign has not processed their command id
//!   (exactly once, by command id);
//! - the policy is rebuilt from its prior and the recorded feedback
//!   (`ModelFed` events), which gives the same model;
//! - jobs of batches not yet planned are scheduled again (idempotent by
//!   job id), a planned but unsent batch is sent, and every sent batch is
//!   handed to the channel again (idempotent by batch).
//!
//! Each batch's plan draws from a generator seeded by (seed, policy,
//! batch), so a re-plan after a crash decides the same.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use smartmsg_domain::{
    Action, Campaign, CampaignCommand, CampaignEvent, CampaignSpec, Candidates, Decisions,
    Outcomes, Policy,
};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, RedbSnapshots};
use smartmsg_engine::{
    job_idempotency_key, AppendTx, CommandOptions, DelayQueue, EventCodec, EventLog,
    ExpectedVersion, InMemoryDelayQueue, Job, JobId, ManualClock, RecordedEvent, Repository,
    RepositoryConfig, Scheduler, StreamId,
};

use crate::error::SimError;
use crate::events::{self, ModelFed, PathCommitted, Streams};
use crate::faults::{Crash, FaultPlan};
use crate::invariants;
use crate::policies::{self, PolicyName};
use crate::population::SimPopulation;
use crate::reaction::{make_path, DeadLetterOut, PathOutput, ReactionPath, WindowResult};
use crate::report::{BatchPoint, FaultCounts, PipelineCounts, PolicyRun};
use crate::rng::{self, label};
use crate::scenario::Scenario;
use crate::world::World;

/// Which delay queue carries the batch jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueKind {
    /// The on-disk timer wheel (`smartmsg-embedded`).
    #[default]
    Embedded,
    /// The engine's in-memory queue (lost on a crash; the jobs are then
    /// scheduled again from the campaign's state).
    InMemory,
}

/// Called after each batch is sent: (policy, batch).
pub type Progress = dyn Fn(PolicyName, u32) + Send + Sync;

/// How to run one policy's campaign.
#[derive(Clone)]
pub struct RunOptions {
    /// The policy.
    pub policy: PolicyName,
    /// This run's data directory (created; must not hold another run).
    pub dir: PathBuf,
    /// The queue for batch jobs.
    pub queue: QueueKind,
    /// Faults to inject (the scenario's own plan, possibly with random
    /// faults added).
    pub faults: FaultPlan,
    /// Progress callback.
    pub progress: Option<Arc<Progress>>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("policy", &self.policy)
            .field("dir", &self.dir)
            .field("queue", &self.queue)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// The log's configuration: segments of 64 MiB (preallocated), or 4 MiB
/// for small campaigns, whose runs (thousands in `--seeds` mode) would
/// otherwise spend their time preallocating.
fn log_config(s: &Scenario) -> EmbeddedConfig {
    let mut c = EmbeddedConfig::default();
    if s.largest_batch() <= 2_000 {
        c.segment_bytes = 4 << 20;
    }
    c
}

/// Snapshot the campaign every this many events.
const SNAPSHOT_EVERY: u64 = 16;
/// Window results gathered before the reaction path commits (a cut and
/// the end of the run commit whatever is pending).
const COMMIT_WINDOWS: usize = 16;
/// Dead letters held before a commit is forced.
const MAX_PENDING_DEAD: usize = 1_000;

/// Runs one policy's whole campaign and checks the invariants on what it
/// left on disk.
pub fn run_policy(
    scenario: &Scenario,
    pop: &Arc<SimPopulation>,
    opts: &RunOptions,
) -> Result<PolicyRun, SimError> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|source| SimError::Io {
            op: "start runtime for",
            path: opts.dir.clone(),
            source,
        })?;
    let mut run = rt.block_on(run_async(scenario, pop, opts))?;
    run.wall_ms = started.elapsed().as_millis() as u64;
    Ok(run)
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
    let ctx = Ctx {
        scenario,
        pop,
        spec: scenario.campaign_spec(),
        streams: Streams::new(&scenario.name)?,
        opts,
        policy_label: label(opts.policy.as_str()),
    };
    let mut h = Harness {
        world: World::new(scenario, &opts.faults),
        clock: ManualClock::new(scenario.campaign.start_ms),
        fired: vec![false; opts.faults.crashes.len()],
        dup_jobs_done: BTreeSet::new(),
        crashes: 0,
        jobs_absorbed: 0,
        processed_high: 0,
        messages_processed: 0,
    };
    loop {
        let mut p = Process::open(&ctx, &mut h).await?;
        match p.run(&ctx, &mut h).await {
            Ok(()) => break,
            Err(Stop::Crash) => {
                h.crashes += 1;
                drop(p);
            }
            Err(Stop::Fail(e)) => return Err(e),
        }
    }
    finish(&ctx, &h).await
}

/// What every process of a run shares and never loses.
struct Ctx<'a> {
    scenario: &'a Scenario,
    pop: &'a Arc<SimPopulation>,
    spec: CampaignSpec,
    streams: Streams,
    opts: &'a RunOptions,
    policy_label: u64,
}

/// The world outside the process, and the fault bookkeeping: survives
/// crashes.
struct Harness {
    world: World,
    clock: ManualClock,
    fired: Vec<bool>,
    dup_jobs_done: BTreeSet<u32>,
    crashes: u64,
    jobs_absorbed: u64,
    /// One past the highest topic offset ever processed.
    processed_high: u64,
    messages_processed: u64,
}

impl Harness {
    fn now(&self) -> u64 {
        use smartmsg_engine::Clock;
        self.clock.now_ms()
    }

    /// Whether a planned crash matching `f` is due (marks it fired).
    fn crash(&mut self, plan: &FaultPlan, f: impl Fn(&Crash) -> bool) -> bool {
        for (i, c) in plan.crashes.iter().enumerate() {
            if !self.fired[i] && f(c) {
                self.fired[i] = true;
                return true;
            }
        }
        false
    }
}

enum Stop {
    Crash,
    Fail(SimError),
}

impl<E: Into<SimError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Fail(e.into())
    }
}

type Res<T> = Result<T, Stop>;

/// What the mapper of the scheduler needs to plan a batch.
struct Planner {
    policy: Box<dyn Policy>,
    remaining: Candidates,
    messaged: usize,
    campaign: Campaign,
    seed: u64,
    policy_label: u64,
    stream: StreamId,
}

fn lock(p: &Mutex<Planner>) -> MutexGuard<'_, Planner> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// The job of batch `batch`.
fn batch_job(batch: u32, due_ms: u64) -> Job {
    Job {
        id: JobId::new(format!("batch-{batch}")).unwrap_or_else(|_| unreachable!()),
        due_ms,
        payload: Bytes::from(format!("{{\"batch\":{batch}}}")),
    }
}

/// The scheduler's mapper: plans the job's batch with the policy.
fn map_job(planner: &Mutex<Planner>, job: &Job) -> Result<(StreamId, CampaignCommand), String> {
    #[derive(serde::Deserialize)]
    struct Payload {
        batch: u32,
    }
    let batch = serde_json::from_slice::<Payload>(&job.payload)
        .map_err(|e| format!("unreadable batch job: {e}"))?
        .batch;
    let p = lock(planner);
    if (batch as usize) < p.campaign.batches().len() {
        return Err(format!(
            "batch {batch} is already planned (a repeated delivery)"
        ));
    }
    if p.campaign.next_batch() != Some(batch) {
        return Err(format!(
            "batch {batch} is not the next batch ({:?})",
            p.campaign.next_batch()
        ));
    }
    let ctx = p
        .campaign
        .plan_context(batch)
        .ok_or("the campaign does not exist")?;
    let allowance = p.campaign.batch_allowance(batch) as usize;
    let mut r = rng::stream(p.seed, &[p.policy_label, label("plan"), u64::from(batch)]);
    let decisions = p
        .policy
        .plan(&ctx, &p.remaining, allowance, &mut r)
        .map_err(|e| e.to_string())?;
    Ok((
        p.stream.clone(),
        CampaignCommand::new(
            format!("plan-{batch}"),
            Action::PlanBatch {
                batch,
                policy: p.policy.name().to_owned(),
                decisions,
            },
        ),
    ))
}

/// Reads a whole stream from `from` (1-based version).
async fn read_stream(
    log: &dyn EventLog,
    stream: &StreamId,
    from: u64,
) -> Result<Vec<RecordedEvent>, SimError> {
    let mut out = Vec::new();
    let mut v = from.max(1);
    loop {
        let batch = log.read_stream(stream, v, 1_000).await?;
        let Some(last) = batch.last() else { break };
        v = last.version + 1;
        out.extend(batch);
    }
    Ok(out)
}

/// Decodes a campaign event.
pub(crate) fn campaign_event(e: &RecordedEvent) -> Result<CampaignEvent, SimError> {
    CampaignEvent::decode(&e.kind, e.schema, &e.payload).map_err(|err| SimError::Decode {
        kind: e.kind.clone(),
        position: e.position,
        reason: err.to_string(),
    })
}

/// The process state a crash drops.
struct Process {
    log: Arc<EmbeddedLog>,
    queue: Arc<dyn DelayQueue>,
    repo: Repository<Campaign>,
    scheduler: Scheduler<Campaign>,
    planner: Arc<Mutex<Planner>>,
    path: Box<dyn ReactionPath>,
    campaign: Campaign,
    /// Campaign stream events read so far.
    campaign_read: u64,
    /// Decisions of each planned batch.
    batches: Vec<Decisions>,
    /// When each sent batch was sent.
    sent_ms: Vec<Option<u64>>,
    /// Users counted as reacting, per batch (from committed windows).
    reacted: Vec<Vec<u32>>,
    fed: u32,
    path_version: u64,
    dead_version: u64,
    feed_version: u64,
    commits: u32,
    next_offset: u64,
    pending: PathOutput,
    queue_next_due: Option<u64>,
}

impl Process {
    async fn open(ctx: &Ctx<'_>, h: &mut Harness) -> Result<Process, SimError> {
        let dir = &ctx.opts.dir;
        let log = Arc::new(EmbeddedLog::open_with(
            dir.join("log"),
            log_config(ctx.scenario),
        )?);
        let snapshots = Arc::new(RedbSnapshots::open(dir.join("snapshots.redb"))?);
        let queue: Arc<dyn DelayQueue> = match ctx.opts.queue {
            QueueKind::Embedded => Arc::new(EmbeddedDelayQueue::open(dir.join("queue"))?),
            QueueKind::InMemory => Arc::new(InMemoryDelayQueue::new()),
        };
        let clock = Arc::new(h.clock.clone());
        let repo = Repository::<Campaign>::new(log.clone(), clock.clone())
            .with_snapshots(snapshots)
            .with_config(RepositoryConfig {
                snapshot_every: SNAPSHOT_EVERY,
                ..RepositoryConfig::default()
            })
            .map_err(|e| SimError::Stalled(format!("repository configuration: {e}")))?;
        let policy = policies::build(ctx.opts.policy, ctx.scenario, ctx.pop)?;
        let planner = Arc::new(Mutex::new(Planner {
            policy,
            remaining: ctx.pop.candidates().clone(),
            messaged: 0,
            campaign: Campaign::default(),
            seed: ctx.scenario.seed,
            policy_label: ctx.policy_label,
            stream: ctx.streams.campaign.clone(),
        }));
        let mapper_planner = Arc::clone(&planner);
        let scheduler = Scheduler::new(Arc::clone(&queue), repo.clone(), clock, move |job| {
            map_job(&mapper_planner, job)
        });
        let path = make_path(ctx.scenario, Arc::clone(ctx.pop))
            .map_err(|e| SimError::Path(e.to_string()))?;
        let mut p = Process {
            log,
            queue,
            repo,
            scheduler,
            planner,
            path,
            campaign: Campaign::default(),
            campaign_read: 0,
            batches: Vec::new(),
            sent_ms: Vec::new(),
            reacted: Vec::new(),
            fed: 0,
            path_version: 0,
            dead_version: 0,
            feed_version: 0,
            commits: 0,
            next_offset: 0,
            pending: PathOutput::default(),
            queue_next_due: None,
        };
        p.recover(ctx, h).await?;
        Ok(p)
    }

    async fn execute(&mut self, ctx: &Ctx<'_>, id: String, action: Action) -> Result<(), SimError> {
        let cmd = CampaignCommand::new(id, action);
        let done = self
            .repo
            .execute(&ctx.streams.campaign, &cmd, CommandOptions::default())
            .await
            .map_err(|source| SimError::Command {
                command: cmd.id.clone(),
                source: Box::new(source),
            })?;
        self.campaign = done.state;
        Ok(())
    }

    async fn reload(&mut self, ctx: &Ctx<'_>) -> Result<(), SimError> {
        self.campaign = self
            .repo
            .load(&ctx.streams.campaign)
            .await
            .map_err(|e| SimError::Load(Box::new(e)))?
            .state;
        Ok(())
    }

    /// Reads campaign events not read yet: planned decisions and send
    /// times.
    async fn catch_up(&mut self, ctx: &Ctx<'_>) -> Result<(), SimError> {
        let events = read_stream(
            self.log.as_ref(),
            &ctx.streams.campaign,
            self.campaign_read + 1,
        )
        .await?;
        for e in &events {
            self.campaign_read = e.version;
            match campaign_event(e)? {
                CampaignEvent::BatchPlanned {
                    batch, decisions, ..
                } => {
                    let b = batch as usize;
                    if self.batches.len() <= b {
                        self.batches.resize(b + 1, Decisions::default());
                    }
                    self.batches[b] = decisions;
                }
                CampaignEvent::BatchSent { batch, .. } => {
                    let b = batch as usize;
                    if self.sent_ms.len() <= b {
                        self.sent_ms.resize(b + 1, None);
                    }
                    self.sent_ms[b] = Some(e.timestamp_ms);
                }
                _ => {}
            }
        }
        Ok(())
    }

    async fn refresh_queue(&mut self) -> Result<(), SimError> {
        self.queue_next_due = self.queue.next_due().await?;
        Ok(())
    }

    /// Brings the planner's view in step with the campaign.
    fn sync_planner(&self) {
        let mut pl = lock(&self.planner);
        if pl.messaged != self.campaign.messaged().len() {
            pl.remaining.retain_unmessaged(self.campaign.messaged());
            pl.messaged = self.campaign.messaged().len();
        }
        pl.campaign = self.campaign.clone();
    }

    fn reacted_push(&mut self, w: &WindowResult) {
        for r in &w.reactions {
            let b = r.batch as usize;
            if self.reacted.len() <= b {
                self.reacted.resize(b + 1, Vec::new());
            }
            self.reacted[b].push(r.user);
        }
    }

    async fn recover(&mut self, ctx: &Ctx<'_>, h: &mut Harness) -> Result<(), SimError> {
        self.reload(ctx).await?;
        if self.campaign.status().is_none() {
            self.execute(ctx, "create".into(), Action::Create(ctx.spec.clone()))
                .await?;
        }
        if self.campaign.status() == Some(smartmsg_domain::Status::Draft) {
            self.execute(ctx, "start".into(), Action::Start).await?;
        }
        self.catch_up(ctx).await?;
        // The reaction path: message table, last commit, counted reactions.
        for (b, sent) in self.sent_ms.iter().enumerate() {
            if let (Some(ms), Some(d)) = (sent, self.batches.get(b)) {
                self.path.batch_sent(b as u32, *ms, d);
            }
        }
        let commits = read_stream(self.log.as_ref(), &ctx.streams.path, 1).await?;
        let mut decoded = Vec::with_capacity(commits.len());
        for e in &commits {
            let c: PathCommitted = events::decode(e)?;
            self.path_version = e.version;
            decoded.push(c);
        }
        let mut ids = decoded
            .iter()
            .flat_map(|c| c.windows.iter())
            .flat_map(|w| w.reactions.iter().map(|r| r.id));
        self.path
            .restore(decoded.last().map(|c| &c.state), &mut ids)
            .map_err(|e| SimError::Path(e.to_string()))?;
        self.commits = decoded.last().map_or(0, |c| c.commit);
        self.next_offset = decoded.last().map_or(0, |c| c.next_offset);
        for c in &decoded {
            for w in &c.windows {
                self.reacted_push(w);
            }
        }
        // Outputs committed but not recorded (a crash in between).
        for c in &decoded {
            for w in &c.windows {
                if !self.campaign.has_processed(&w.command_id()) {
                    self.record(ctx, w).await?;
                }
            }
        }
        self.dead_version = self.log.stream_version(&ctx.streams.dead_letters).await?;
        // The policy: prior + recorded feedback.
        let feed = read_stream(self.log.as_ref(), &ctx.streams.feedback, 1).await?;
        for e in &feed {
            let f: ModelFed = events::decode(e)?;
            self.feed_version = e.version;
            let outcomes = self.outcomes(ctx, f.batch, &f.reacted)?;
            lock(&self.planner).policy.update(&outcomes)?;
            self.fed = self.fed.max(f.batch + 1);
        }
        self.sync_planner();
        // Jobs of batches not planned yet (idempotent by id).
        let planned = self.campaign.batches().len() as u32;
        for b in planned..ctx.spec.batch_count() {
            self.queue
                .schedule(batch_job(b, ctx.spec.due_ms(b)))
                .await?;
        }
        self.refresh_queue().await?;
        // The channel gets every sent batch (idempotent by batch).
        for b in 0..self.sent_ms.len() {
            if let (Some(ms), Some(d)) = (self.sent_ms[b], self.batches.get(b)) {
                h.world.deliver(b as u32, ms, d, ctx.pop);
            }
        }
        Ok(())
    }

    /// Outcomes of batch `batch`: every user, reacting iff in `reacted`.
    fn outcomes(&self, ctx: &Ctx<'_>, batch: u32, reacted: &[u32]) -> Result<Outcomes, SimError> {
        let mut o = Outcomes::new(ctx.pop.dim())?;
        let Some(d) = self.batches.get(batch as usize) else {
            return Ok(o);
        };
        for (user, creative, _) in d.iter() {
            let y = u32::from(reacted.binary_search(&user).is_ok());
            if let Some(x) = ctx.pop.features(user) {
                o.push(creative, x, 1, y)?;
            }
        }
        Ok(o)
    }

    async fn record(&mut self, ctx: &Ctx<'_>, w: &WindowResult) -> Result<(), SimError> {
        self.execute(
            ctx,
            w.command_id(),
            Action::RecordReactions {
                window_start_ms: w.window_start_ms,
                reactions: w.per_creative.clone(),
            },
        )
        .await
    }

    /// Commits the path's state, offset and pending outputs (dead letters
    /// in the same transaction), then records the windows on the campaign.
    async fn commit(&mut self, ctx: &Ctx<'_>, h: &mut Harness) -> Res<()> {
        let out = std::mem::take(&mut self.pending);
        let commit = self.commits + 1;
        let body = PathCommitted {
            commit,
            next_offset: self.next_offset,
            state: self.path.state(),
            windows: out.windows,
            dead_letters: out.dead_letters.len() as u32,
        };
        let now = h.now();
        let mut tx = AppendTx::single(
            ctx.streams.path.clone(),
            ExpectedVersion::Exact(self.path_version),
            vec![events::event(events::PATH_COMMITTED, now, &body)],
        );
        if !out.dead_letters.is_empty() {
            tx = tx.with_stream(
                ctx.streams.dead_letters.clone(),
                ExpectedVersion::Exact(self.dead_version),
                out.dead_letters
                    .iter()
                    .map(|d: &DeadLetterOut| events::event(events::DEAD_LETTERED, now, d))
                    .collect(),
            );
        }
        self.log.append(tx).await?;
        self.path_version += 1;
        self.dead_version += out.dead_letters.len() as u64;
        self.commits = commit;
        for w in &body.windows {
            self.reacted_push(w);
        }
        if h.crash(
            &ctx.opts.faults,
            |c| matches!(c, Crash::AfterCommitBeforeRecord { commit: n } if *n == commit),
        ) {
            return Err(Stop::Crash);
        }
        for w in &body.windows {
            self.record(ctx, w).await?;
        }
        Ok(())
    }

    /// Processes every topic message that has arrived.
    async fn consume(&mut self, ctx: &Ctx<'_>, h: &mut Harness) -> Res<()> {
        while (self.next_offset as usize) < h.world.topic().len() {
            let offset = self.next_offset;
            let m = &h.world.topic()[offset as usize];
            let mut out = PathOutput::default();
            self.path
                .process(offset, m.arrival_ms, &m.payload, &mut out);
            self.next_offset += 1;
            h.messages_processed += 1;
            let first_time = offset >= h.processed_high;
            h.processed_high = h.processed_high.max(offset + 1);
            let emitted = !out.windows.is_empty();
            self.pending.windows.extend(out.windows);
            self.pending.dead_letters.extend(out.dead_letters);
            if first_time
                && h.crash(
                    &ctx.opts.faults,
                    |c| matches!(c, Crash::MidReactions { message } if *message == offset + 1),
                )
            {
                return Err(Stop::Crash);
            }
            if emitted && self.pending.windows.len() >= COMMIT_WINDOWS
                || self.pending.dead_letters.len() >= MAX_PENDING_DEAD
            {
                self.commit(ctx, h).await?;
            }
        }
        Ok(())
    }

    /// Feeds batch `batch`'s outcomes to the model (recorded first).
    async fn feed(&mut self, ctx: &Ctx<'_>, h: &mut Harness, batch: u32) -> Res<()> {
        let mut reacted = self
            .reacted
            .get(batch as usize)
            .cloned()
            .unwrap_or_default();
        reacted.sort_unstable();
        reacted.dedup();
        let body = ModelFed { batch, reacted };
        self.log
            .append(AppendTx::single(
                ctx.streams.feedback.clone(),
                ExpectedVersion::Exact(self.feed_version),
                vec![events::event(events::MODEL_FED, h.now(), &body)],
            ))
            .await?;
        self.feed_version += 1;
        if h.crash(
            &ctx.opts.faults,
            |c| matches!(c, Crash::AfterFeedbackBeforeUpdate { batch: b } if *b == batch),
        ) {
            return Err(Stop::Crash);
        }
        let outcomes = self.outcomes(ctx, batch, &body.reacted)?;
        lock(&self.planner).policy.update(&outcomes)?;
        self.fed = batch + 1;
        Ok(())
    }

    /// Records a planned batch as sent and hands it to the channel.
    async fn send(&mut self, ctx: &Ctx<'_>, h: &mut Harness, batch: u32) -> Res<()> {
        if h.crash(
            &ctx.opts.faults,
            |c| matches!(c, Crash::AfterPlanBeforeSend { batch: b } if *b == batch),
        ) {
            return Err(Stop::Crash);
        }
        self.execute(
            ctx,
            format!("sent-{batch}"),
            Action::RecordBatchSent { batch },
        )
        .await?;
        self.catch_up(ctx).await?;
        if h.crash(
            &ctx.opts.faults,
            |c| matches!(c, Crash::AfterSendBeforeDelivery { batch: b } if *b == batch),
        ) {
            return Err(Stop::Crash);
        }
        let b = batch as usize;
        let sent_ms = self.sent_ms.get(b).copied().flatten().unwrap_or(h.now());
        let decisions = self.batches.get(b).cloned().unwrap_or_default();
        self.path.batch_sent(batch, sent_ms, &decisions);
        h.world.deliver(batch, sent_ms, &decisions, ctx.pop);
        if let Some(progress) = &ctx.opts.progress {
            progress(ctx.opts.policy, batch);
        }
        Ok(())
    }

    /// A due job: close what can be closed, feed the model, plan.
    async fn cut(&mut self, ctx: &Ctx<'_>, h: &mut Harness) -> Res<bool> {
        let now = h.now();
        let mut out = PathOutput::default();
        self.path.advance(now, &mut out);
        let emitted = !out.windows.is_empty();
        self.pending.windows.extend(out.windows);
        self.pending.dead_letters.extend(out.dead_letters);
        if emitted || !self.pending.is_empty() {
            self.commit(ctx, h).await?;
        }
        if let Some(next) = self.campaign.next_batch() {
            if next > 0 && ctx.spec.due_ms(next) <= now {
                while self.fed < next {
                    let b = self.fed;
                    self.feed(ctx, h, b).await?;
                }
            }
            if ctx.spec.due_ms(next) <= now
                && h.crash(
                    &ctx.opts.faults,
                    |c| matches!(c, Crash::BeforePlan { batch } if *batch == next),
                )
            {
                return Err(Stop::Crash);
            }
        }
        self.sync_planner();
        let next = self.campaign.next_batch();
        let lost_ack = match next {
            Some(b) if ctx.spec.due_ms(b) <= now => h.crash(
                &ctx.opts.faults,
                |c| matches!(c, Crash::AfterPlanBeforeAck { batch } if *batch == b),
            ),
            _ => false,
        };
        let leased;
        if lost_ack {
            // Execute the job's command as the scheduler would, and crash
            // before the ack: the queue must deliver the job again.
            let leases = self.queue.poll_due(now, 16).await?;
            for lease in leases {
                if let Ok((stream, cmd)) = map_job(&self.planner, &lease.job) {
                    let key = job_idempotency_key(&lease.job, self.log.limits().max_id_len);
                    let opts = CommandOptions::default().with_idempotency_key(key);
                    self.repo
                        .execute(&stream, &cmd, opts)
                        .await
                        .map_err(|source| SimError::Command {
                            command: cmd.id.clone(),
                            source: Box::new(source),
                        })?;
                }
            }
            return Err(Stop::Crash);
        } else {
            let report = self.scheduler.run_once(now).await?;
            leased = report.leased;
            h.jobs_absorbed += (report.refused + report.already_done) as u64;
            if report.retried > 0 {
                return Err(Stop::Fail(SimError::Stalled(format!(
                    "a batch job failed and is retried: {report:?}"
                ))));
            }
        }
        self.reload(ctx).await?;
        self.catch_up(ctx).await?;
        self.sync_planner();
        let planned = self.campaign.batches().len() as u32;
        for &b in &ctx.opts.faults.duplicate_jobs {
            if b < planned && h.dup_jobs_done.insert(b) {
                // The queue delivers the job of a planned batch again.
                self.queue
                    .schedule(batch_job(b, ctx.spec.due_ms(b)))
                    .await?;
            }
        }
        self.refresh_queue().await?;
        Ok(leased > 0)
    }

    async fn run(&mut self, ctx: &Ctx<'_>, h: &mut Harness) -> Res<()> {
        let mut idle = 0;
        loop {
            if let Some(b) = self.campaign.pending_batch() {
                self.send(ctx, h, b).await?;
            }
            let now = h.now();
            h.world.arrive_until(now);
            self.consume(ctx, h).await?;
            if self.queue_next_due.is_some_and(|t| t <= now) {
                if self.cut(ctx, h).await? {
                    idle = 0;
                } else {
                    idle += 1;
                    if idle > 3 {
                        return Err(Stop::Fail(SimError::Stalled(format!(
                            "a job is due at {:?} but none can be leased at {now}",
                            self.queue_next_due
                        ))));
                    }
                }
                continue;
            }
            let next = match (self.queue_next_due, h.world.next_arrival()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match next {
                Some(t) => h.clock.set(t.max(now)),
                None => break,
            }
        }
        // Every reaction has arrived: close the last windows, complete.
        let end = h.now() + ctx.scenario.pipeline.window_ms + ctx.scenario.pipeline.grace_ms;
        h.clock.set(end);
        let mut out = PathOutput::default();
        self.path.advance(end, &mut out);
        self.pending.windows.extend(out.windows);
        self.pending.dead_letters.extend(out.dead_letters);
        if !self.pending.is_empty() {
            self.commit(ctx, h).await?;
        }
        if self.campaign.pending_batch().is_none()
            && matches!(
                self.campaign.status(),
                Some(smartmsg_domain::Status::Running | smartmsg_domain::Status::Paused)
            )
        {
            self.execute(ctx, "complete".into(), Action::Complete)
                .await?;
        }
        Ok(())
    }
}

/// Reads what the run left on disk (a fresh open of the log), checks the
/// invariants and computes the run's figures.
async fn finish(ctx: &Ctx<'_>, h: &Harness) -> Result<PolicyRun, SimError> {
    let log = EmbeddedLog::open_with(ctx.opts.dir.join("log"), log_config(ctx.scenario))?;
    let verified = invariants::verify(&log, ctx.scenario, ctx.pop, &h.world).await?;
    let head = log.head().await?;
    let pop = ctx.pop;
    let mut batches = Vec::new();
    let (mut cum_e, mut cum_r) = (0.0, 0u64);
    let mut realised_by_batch = vec![0u64; verified.decisions.len()];
    for r in h.world.reactions() {
        if let Some(n) = realised_by_batch.get_mut(r.batch as usize) {
            *n += 1;
        }
    }
    let k = ctx.scenario.campaign.creatives;
    let mut per_creative_sent = vec![0u64; k];
    for (b, d) in verified.decisions.iter().enumerate() {
        let expected: f64 = d.iter().map(|(u, c, _)| pop.probability(u, c)).sum();
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
    let injected = h.world.injected();
    Ok(PolicyRun {
        policy: ctx.opts.policy.as_str().to_owned(),
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
            path: match ctx.scenario.pipeline.kind {
                crate::scenario::PathKind::Dsl => "dsl".into(),
                crate::scenario::PathKind::Builtin => "built-in".into(),
            },
            commits: verified.commits,
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
            messages_processed: h.messages_processed,
        },
        log_events: head,
        violations: verified.violations,
        wall_ms: 0,
    })
}

/// Prepares a run's root data directory: creates it, or reuses one a
/// previous simulation made (marked by `.smartmsg-sim`), removing the
/// given runs' subdirectories. Refuses a non-empty directory it did not
/// make.
pub fn prepare_data_dir(root: &Path, runs: &[String]) -> Result<(), SimError> {
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
    for r in runs {
        let d = root.join(r);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(|e| err(format!("remove {}: {e}", d.display())))?;
        }
    }
    Ok(())
}
