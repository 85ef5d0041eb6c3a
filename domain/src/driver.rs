//! The campaign driver: what a campaign needs done next, decided purely.
//!
//! A [`CampaignDriver`] is the I/O-free heart of a campaign runtime, in the
//! style of raft-rs's `RawNode`/`Ready`: the caller (a runtime, the
//! simulator, a test) feeds it what happened and asks it what to do, and
//! performs that against whatever event log, delay queue, sender and
//! reaction pipeline it has. The driver never reads a clock (time comes in
//! as `now_ms`), never draws from a global generator (each batch's plan
//! draws from a generator seeded by the campaign's seed and the batch
//! number, so a re-plan after a crash decides the same) and touches no file
//! or socket.
//!
//! # Inputs
//!
//! - [`apply`](CampaignDriver::apply): every event of the campaign's
//!   stream, in order (those the caller's commands produced, and at
//!   recovery the whole stream);
//! - [`apply_feedback`](CampaignDriver::apply_feedback): model feedback,
//!   once recorded (and at recovery every recorded one, in order);
//! - from the reaction pipeline: [`reaction`](CampaignDriver::reaction)
//!   (a user's first counted reaction), [`window_closed`](CampaignDriver::window_closed)
//!   and [`late_reaction`](CampaignDriver::late_reaction);
//! - [`announced`](CampaignDriver::announced): the pipeline knows a
//!   batch's users; [`sender_acked`](CampaignDriver::sender_acked): the
//!   sender acknowledged a batch;
//! - a fired delay-queue job: [`job_command`](CampaignDriver::job_command).
//!
//! # Outputs
//!
//! [`ready`](CampaignDriver::ready) returns a [`Ready`]: commands to
//! execute on the campaign (recording reaction windows, a batch sent, a
//! start that came due), model feedback to record *before* the next batch
//! is planned, a batch whose users the reaction pipeline must learn
//! *before* it is sent, a batch to hand to the sender, and jobs to
//! schedule. Performing them in that order and feeding the results back is
//! the whole protocol; every decision made with randomness is in the
//! `BatchPlanned` event (with its propensities), so a replay never
//! re-decides.
//!
//! # Why this order is crash-safe
//!
//! Everything the driver knows is derived from the log: the campaign
//! stream, the recorded feedback and the pipeline's outputs. A process that
//! dies anywhere restarts by building a new driver and applying the log
//! again; what was not recorded is simply asked for again by
//! [`ready`](CampaignDriver::ready), with the same ids, so its effect
//! happens once:
//!
//! - a batch is planned by the job's command (`plan-<b>`, executed with the
//!   job's idempotency key) only after its predecessor was sent and the
//!   feedback of every earlier batch was recorded;
//! - a planned batch is announced to the pipeline, then handed to the
//!   sender (again after a crash: same message ids, same content), and
//!   recorded as sent (`sent-<b>`) only once the sender acknowledged it;
//! - the model learns only from recorded feedback, so the policy rebuilt
//!   from its prior and the feedback events is the policy that planned.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use smartmsg_engine::{Aggregate, Job, JobId};

use crate::campaign::{Action, Campaign, CampaignCommand, CampaignEvent, Part, Status};
use crate::data::{Candidates, Decisions, Outcomes, ShapeError};
use crate::policy::{Policy, PolicyError};
use crate::reactions::ReactionWindow;
use crate::rng;
use crate::UserSet;

/// The event kind of recorded model feedback ([`Feedback`], JSON).
pub const FEEDBACK_KIND: &str = "ModelFed";
/// The schema of [`FEEDBACK_KIND`] events.
pub const FEEDBACK_SCHEMA: u16 = 1;

/// The feedback a policy learned from for one batch: every user of the
/// batch, `reacted` the ones whose reaction had been counted (in a closed
/// window) when the next batch was planned; the others count as not
/// reacting.
///
/// Recorded as JSON, one event per [`Feedback::MAX_PART_USERS`] reacting
/// users: feedback of more is split into [`Part`]s
/// ([`Feedback::into_parts`]), appended in one transaction, and joined
/// back by readers ([`Feedback::join`]) before they learn from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// The batch.
    pub batch: u32,
    /// Which part of the batch's feedback this is (absent for feedback in
    /// one event).
    #[serde(default, skip_serializing_if = "Part::is_whole")]
    pub part: Part,
    /// Users of the batch counted as reacting, ascending.
    pub reacted: Vec<u32>,
}

impl Feedback {
    /// Most reacting users in one event: 80,000 JSON numbers of up to 11
    /// bytes each stay under the engine's default 1 MiB event limit, and
    /// the feedback of a whole batch
    /// ([`CampaignSpec::MAX_BATCH_USERS`](crate::CampaignSpec::MAX_BATCH_USERS))
    /// under its 8 MiB transaction limit (a test checks the worst case).
    pub const MAX_PART_USERS: usize = 80_000;

    /// The feedback of one batch, whole.
    pub fn new(batch: u32, reacted: Vec<u32>) -> Self {
        Self {
            batch,
            part: Part::WHOLE,
            reacted,
        }
    }

    /// The events to record: this feedback whole, or its parts in order
    /// when it holds more than [`Feedback::MAX_PART_USERS`] users.
    pub fn into_parts(self) -> Vec<Feedback> {
        if self.reacted.len() <= Self::MAX_PART_USERS {
            return vec![Feedback {
                part: Part::WHOLE,
                ..self
            }];
        }
        let chunks = self.reacted.chunks(Self::MAX_PART_USERS);
        let count = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        chunks
            .enumerate()
            .map(|(i, users)| Feedback {
                batch: self.batch,
                part: Part {
                    index: i as u32,
                    count,
                },
                reacted: users.to_vec(),
            })
            .collect()
    }

    /// Joins a recorded event into the feedback being read: a first (or
    /// whole) part starts it, a later part of the same batch extends it.
    /// Returns the feedback once it is complete (its last part read).
    pub fn join(pending: &mut Option<Feedback>, next: Feedback) -> Option<Feedback> {
        let last = next.part.is_last();
        match pending {
            Some(f) if !next.part.is_first() && f.batch == next.batch => {
                f.reacted.extend_from_slice(&next.reacted);
                f.part = next.part;
            }
            _ => *pending = Some(next),
        }
        if last {
            pending.take().map(|mut f| {
                f.part = Part::WHOLE;
                f
            })
        } else {
            None
        }
    }
}

/// How a driver decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DriverConfig {
    /// Seeds the plans: batch `b` draws from a generator seeded by
    /// `(seed, stream, "plan", b)` ([`crate::rng::stream`]).
    pub seed: u64,
    /// A second seed part, e.g. [`crate::rng::label`] of the campaign or
    /// policy name, so campaigns with one seed still draw differently.
    pub stream: u64,
    /// The reaction pipeline's window length (ms): a reaction counts for
    /// the model once its window has closed.
    pub window_ms: u64,
    /// The pipeline's grace period (ms).
    pub grace_ms: u64,
    /// Complete the campaign this long after its last batch was sent, so
    /// the reactions to it are recorded first (reactions arriving later are
    /// still recorded on the completed campaign).
    pub reaction_horizon_ms: u64,
}

impl Default for DriverConfig {
    /// One-minute windows with 10 s of grace, completion a day after the
    /// last batch.
    fn default() -> Self {
        Self {
            seed: 0,
            stream: 0,
            window_ms: 60_000,
            grace_ms: 10_000,
            reaction_horizon_ms: 24 * 3_600_000,
        }
    }
}

/// The users a campaign may message, with their features, indexed by user
/// id. A clone shares the columns and the index (two reference counts):
/// campaigns that target one audience hold it once.
#[derive(Debug, Clone)]
pub struct Audience {
    candidates: Candidates,
    rows: Arc<HashMap<u32, u32>>,
}

/// Why an [`Audience`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AudienceError {
    /// A user appears twice.
    #[error("user {user} appears twice (rows {first} and {second})")]
    DuplicateUser {
        /// The user.
        user: u32,
        /// Its first row.
        first: usize,
        /// The repeat.
        second: usize,
    },
    /// More rows than user ids.
    #[error("{rows} rows; at most {max}")]
    TooLarge {
        /// Rows given.
        rows: usize,
        /// The most.
        max: usize,
    },
}

impl Audience {
    /// The audience of `candidates` (each user once).
    pub fn new(candidates: Candidates) -> Result<Self, AudienceError> {
        let max = u32::MAX as usize;
        if candidates.len() > max {
            return Err(AudienceError::TooLarge {
                rows: candidates.len(),
                max,
            });
        }
        let mut rows = HashMap::with_capacity(candidates.len());
        for (i, &u) in candidates.users().iter().enumerate() {
            if let Some(first) = rows.insert(u, i as u32) {
                return Err(AudienceError::DuplicateUser {
                    user: u,
                    first: first as usize,
                    second: i,
                });
            }
        }
        Ok(Self {
            candidates,
            rows: Arc::new(rows),
        })
    }

    /// Every user, in upload order.
    pub fn candidates(&self) -> &Candidates {
        &self.candidates
    }

    /// The features of `user`, if in the audience.
    pub fn features(&self, user: u32) -> Option<&[f32]> {
        let row = *self.rows.get(&user)?;
        Some(self.candidates.row(row as usize))
    }

    /// The row of `user` in [`Audience::candidates`], if in the audience.
    pub fn row_of(&self, user: u32) -> Option<usize> {
        self.rows.get(&user).map(|&r| r as usize)
    }

    /// Whether `user` is in the audience.
    pub fn contains(&self, user: u32) -> bool {
        self.rows.contains_key(&user)
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The feature dimension.
    pub fn dim(&self) -> usize {
        self.candidates.dim()
    }
}

/// What a delay-queue job of a campaign stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    /// Plan batch `n` (due at its scheduled time).
    Batch(u32),
    /// Complete the campaign (due the reaction horizon after its last batch
    /// was sent).
    Complete,
}

#[derive(Serialize, Deserialize)]
struct JobPayload {
    campaign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    complete: bool,
}

/// The delay-queue job of `kind` for `campaign`, due at `due_ms`. Its id
/// names the campaign and the kind, so scheduling it again is idempotent.
pub fn campaign_job(campaign: &str, kind: JobKind, due_ms: u64) -> Job {
    let (id, payload) = match kind {
        JobKind::Batch(b) => (
            format!("{campaign}/batch-{b}"),
            JobPayload {
                campaign: campaign.to_owned(),
                batch: Some(b),
                complete: false,
            },
        ),
        JobKind::Complete => (
            format!("{campaign}/complete"),
            JobPayload {
                campaign: campaign.to_owned(),
                batch: None,
                complete: true,
            },
        ),
    };
    Job {
        // Campaign ids are short ASCII (see the runtime's checks): the id
        // fits every queue's limit.
        id: JobId::new(&id).unwrap_or_else(|_| {
            JobId::new("invalid-campaign-job").unwrap_or_else(|_| unreachable!())
        }),
        due_ms,
        payload: Bytes::from(serde_json::to_vec(&payload).unwrap_or_default()),
    }
}

/// Reads a job made by [`campaign_job`]: its campaign and kind.
pub fn parse_job(job: &Job) -> Result<(String, JobKind), String> {
    let p: JobPayload = serde_json::from_slice(&job.payload)
        .map_err(|e| format!("job {}: unreadable payload: {e}", job.id))?;
    let kind = match (p.batch, p.complete) {
        (Some(b), false) => JobKind::Batch(b),
        (None, true) => JobKind::Complete,
        _ => return Err(format!("job {}: neither a batch nor completion", job.id)),
    };
    Ok((p.campaign, kind))
}

/// A batch to hand to a sender: who gets which creative. Message ids are
/// stable (campaign, batch and user), so a batch handed over again after a
/// crash carries the same ids and the same content.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingBatch {
    /// The campaign.
    pub campaign: String,
    /// The channel the campaign sends through.
    pub channel: String,
    /// The batch number.
    pub batch: u32,
    /// The creatives' references, by index.
    pub creatives: Arc<Vec<String>>,
    /// Who gets which creative (with the propensities the policy recorded).
    pub decisions: Decisions,
}

impl OutgoingBatch {
    /// The number of messages.
    pub fn len(&self) -> usize {
        self.decisions.len()
    }

    /// Whether it has no message.
    pub fn is_empty(&self) -> bool {
        self.decisions.is_empty()
    }

    /// A key naming this batch, e.g. for a receiver's idempotency:
    /// `<campaign>/batch-<n>`.
    pub fn key(&self) -> String {
        format!("{}/batch-{}", self.campaign, self.batch)
    }

    /// The id of the message to `user` in this batch:
    /// `<campaign>/<batch>/<user>`.
    pub fn message_id(&self, user: u32) -> String {
        format!("{}/{}/{}", self.campaign, self.batch, user)
    }

    /// The messages: `(user, creative index, creative reference)`.
    pub fn messages(&self) -> impl Iterator<Item = (u32, u16, &str)> + '_ {
        self.decisions.iter().map(|(u, c, _)| {
            let r = self
                .creatives
                .get(usize::from(c))
                .map_or("", String::as_str);
            (u, c, r)
        })
    }
}

/// What the driver wants done now (see the [module docs](self)), in the
/// order to do it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ready {
    /// Commands to execute on the campaign, in order (their events go back
    /// through [`CampaignDriver::apply`]).
    pub commands: Vec<CampaignCommand>,
    /// Model feedback to record, in order, each then given to
    /// [`CampaignDriver::apply_feedback`]. Recorded before the next batch
    /// is planned.
    pub feedback: Vec<Feedback>,
    /// A planned batch whose users the reaction pipeline must learn
    /// (their profiles) before it is sent; then
    /// [`CampaignDriver::announced`].
    pub announce: Option<u32>,
    /// A planned, announced batch to hand to the sender
    /// ([`CampaignDriver::outgoing`]); once it acknowledged,
    /// [`CampaignDriver::sender_acked`].
    pub send: Option<u32>,
    /// Jobs to schedule (idempotent by id).
    pub schedule: Vec<Job>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
            && self.feedback.is_empty()
            && self.announce.is_none()
            && self.send.is_none()
            && self.schedule.is_empty()
    }
}

/// Why the driver cannot give a fired job's command.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The job's effect is already there (a redelivery) or can never
    /// happen (the campaign is over): acknowledge the job.
    #[error("job refused: {0}")]
    Refused(String),
    /// Not yet: the previous batch is not sent, or feedback is not
    /// recorded, or the campaign is paused. Acknowledge the job: the driver
    /// schedules it again when it can be planned (once the pending batch
    /// is sent, or when the campaign resumes).
    #[error("job not ready: {0}")]
    NotReady(String),
    /// The policy failed to plan.
    #[error("planning failed: {0}")]
    Policy(#[from] PolicyError),
}

impl JobError {
    /// Whether the job should be delivered again later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, JobError::NotReady(_))
    }
}

/// Why feedback cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FeedbackError {
    /// Feedback for a batch that was not planned.
    #[error("feedback for batch {batch}, which is not planned")]
    NotPlanned {
        /// The batch.
        batch: u32,
    },
    /// Feedback out of order.
    #[error("feedback for batch {batch}; batch {expected} is next")]
    OutOfOrder {
        /// The batch.
        batch: u32,
        /// The next one expected.
        expected: u32,
    },
    /// The outcomes do not fit the model.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// The policy refused the update.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// One campaign's driver. See the [module docs](self). `'p` is the
/// policy's lifetime (`'static` in a runtime; a borrowed policy in
/// [`crate::synthetic::run_campaign`]).
pub struct CampaignDriver<'p> {
    id: String,
    config: DriverConfig,
    campaign: Campaign,
    creatives: Arc<Vec<String>>,
    plans: Vec<Decisions>,
    sent_ms: Vec<Option<u64>>,
    /// Per batch: reacting users → the start of their reaction's window.
    reacted: Vec<HashMap<u32, u64>>,
    /// Per batch: reacting users per creative (of the plan).
    reacted_per_creative: Vec<Vec<u32>>,
    /// Per batch: user → creative, built at the batch's first reaction.
    plan_index: Vec<HashMap<u32, u16>>,
    fed: u32,
    announced: u32,
    acked: BTreeSet<u32>,
    /// The queued commands in order, each with its number; an entry
    /// whose id `queued` no longer maps to its number was executed (such
    /// entries are dropped once they outnumber the live ones, so that a
    /// command leaves the queue in constant time: with tens of thousands
    /// of late reactions queued, removing each by a scan took most of a
    /// ten-million-subscriber run).
    commands: Vec<(u64, CampaignCommand)>,
    /// The queued commands' ids and their entries' numbers.
    queued: HashMap<String, u64>,
    /// The next queued command's number.
    next_command: u64,
    /// Entries of `commands` executed and not dropped yet.
    executed_entries: usize,
    /// Batch jobs must be (re)scheduled: at open, and when the campaign
    /// starts or resumes.
    jobs_due: bool,
    /// A batch job was refused because an earlier batch was not sent yet:
    /// schedule the remaining jobs again once it is.
    reschedule_on_send: bool,
    complete_scheduled: bool,
    policy: Box<dyn Policy + 'p>,
    audience: Arc<Audience>,
    remaining: Candidates,
    remaining_synced: usize,
    /// Users whose data was removed: never planned again, left out of
    /// what is handed to the sender.
    removed: UserSet,
}

impl std::fmt::Debug for CampaignDriver<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignDriver")
            .field("id", &self.id)
            .field("status", &self.campaign.status())
            .field("planned", &self.plans.len())
            .field("fed", &self.fed)
            .field("announced", &self.announced)
            .finish_non_exhaustive()
    }
}

impl<'p> CampaignDriver<'p> {
    /// A driver for campaign `id` (not yet applied: call
    /// [`apply`](Self::apply) with its events), planning with `policy` (in
    /// its prior state) over `audience`.
    pub fn new(
        id: impl Into<String>,
        config: DriverConfig,
        policy: Box<dyn Policy + 'p>,
        audience: Arc<Audience>,
    ) -> Self {
        Self {
            id: id.into(),
            config,
            campaign: Campaign::default(),
            creatives: Arc::new(Vec::new()),
            plans: Vec::new(),
            sent_ms: Vec::new(),
            reacted: Vec::new(),
            reacted_per_creative: Vec::new(),
            plan_index: Vec::new(),
            fed: 0,
            announced: 0,
            acked: BTreeSet::new(),
            commands: Vec::new(),
            queued: HashMap::new(),
            next_command: 0,
            executed_entries: 0,
            jobs_due: true,
            reschedule_on_send: false,
            complete_scheduled: false,
            remaining: audience.candidates().clone(),
            remaining_synced: 0,
            removed: UserSet::new(),
            policy,
            audience,
        }
    }

    /// The campaign's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configuration.
    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// The campaign's state, as applied.
    pub fn campaign(&self) -> &Campaign {
        &self.campaign
    }

    /// The decisions of every planned batch.
    pub fn plans(&self) -> &[Decisions] {
        &self.plans
    }

    /// When each batch was recorded as sent.
    pub fn sent_ms(&self) -> &[Option<u64>] {
        &self.sent_ms
    }

    /// Batches whose feedback the model has learned (`0..fed`).
    pub fn fed(&self) -> u32 {
        self.fed
    }

    /// Batches the reaction pipeline knows the users of (`0..announced`).
    pub fn announced_through(&self) -> u32 {
        self.announced
    }

    /// The policy (its current model).
    pub fn policy(&self) -> &dyn Policy {
        &*self.policy
    }

    /// The audience.
    pub fn audience(&self) -> &Arc<Audience> {
        &self.audience
    }

    /// The users the next plan may choose from: the audience less the
    /// users messaged (as of the last plan) and removed. A selection of
    /// the audience's rows, never a copy of its matrix.
    pub fn remaining(&self) -> &Candidates {
        &self.remaining
    }

    /// Users counted as reacting to batch `batch` so far.
    pub fn reacted(&self, batch: u32) -> usize {
        self.reacted.get(batch as usize).map_or(0, HashMap::len)
    }

    /// Whether the campaign is over (completed or cancelled) and nothing is
    /// left to record.
    pub fn is_finished(&self) -> bool {
        self.campaign.status().is_some_and(|s| !s.is_live()) && self.queued.is_empty()
    }

    /// Applies one event of the campaign's stream (`timestamp_ms`: when it
    /// was recorded).
    pub fn apply(&mut self, event: &CampaignEvent, timestamp_ms: u64) {
        self.campaign.evolve(event);
        let id = &event.command().id;
        self.dequeue(id);
        match event {
            CampaignEvent::Created { spec, .. } => {
                self.creatives = Arc::new(spec.creatives.clone());
            }
            CampaignEvent::Started { .. } | CampaignEvent::Resumed { .. } => self.jobs_due = true,
            CampaignEvent::BatchPlanned {
                batch,
                part,
                decisions,
                ..
            } => {
                let b = *batch as usize;
                if self.plans.len() <= b {
                    self.plans.resize(b + 1, Decisions::default());
                }
                // A large batch comes in parts, in order: join them.
                if part.is_first() {
                    self.plans[b] = decisions.clone();
                } else {
                    self.plans[b].append(decisions);
                }
            }
            CampaignEvent::BatchSent { batch, .. } => {
                let b = *batch as usize;
                if self.sent_ms.len() <= b {
                    self.sent_ms.resize(b + 1, None);
                }
                self.sent_ms[b].get_or_insert(timestamp_ms);
                self.acked.remove(batch);
                if std::mem::take(&mut self.reschedule_on_send) {
                    self.jobs_due = true;
                }
            }
            _ => {}
        }
    }

    /// A user's first counted reaction to batch `batch` (from the reaction
    /// pipeline's per-user outcomes), at `time_ms`. Idempotent.
    pub fn reaction(&mut self, batch: u32, user: u32, time_ms: u64) {
        let b = batch as usize;
        if b >= self.reacted.len() {
            // Batches are bounded by the spec (validated); guard anyway.
            if b > crate::campaign::CampaignSpec::MAX_BATCHES as usize {
                return;
            }
            self.reacted.resize_with(b + 1, HashMap::new);
        }
        let w = self.config.window_ms.max(1);
        let std::collections::hash_map::Entry::Vacant(slot) = self.reacted[b].entry(user) else {
            return;
        };
        slot.insert(time_ms - time_ms % w);
        if self.plan_index.len() <= b {
            self.plan_index.resize_with(b + 1, HashMap::new);
            self.reacted_per_creative.resize_with(b + 1, Vec::new);
        }
        if self.plan_index[b].is_empty() {
            if let Some(plan) = self.plans.get(b) {
                self.plan_index[b] = plan.iter().map(|(u, c, _)| (u, c)).collect();
            }
        }
        if let Some(&c) = self.plan_index[b].get(&user) {
            let per = &mut self.reacted_per_creative[b];
            if per.len() <= usize::from(c) {
                per.resize(usize::from(c) + 1, 0);
            }
            per[usize::from(c)] += 1;
        }
    }

    /// Users of batch `batch` counted as reacting so far, per creative they
    /// got.
    pub fn reacted_per_creative(&self, batch: u32) -> Vec<u32> {
        let mut v = self
            .reacted_per_creative
            .get(batch as usize)
            .cloned()
            .unwrap_or_default();
        v.resize(self.creatives.len(), 0);
        v
    }

    /// A closed window of the reaction pipeline: records its reactions on
    /// the campaign (once: the command id names the window).
    pub fn window_closed(&mut self, window: &ReactionWindow) {
        let cmd = window.record_reactions(self.creatives.len());
        self.enqueue(cmd);
    }

    /// A reaction counted after its window closed: recorded as a correction
    /// of that window, once, under `id` (stable across restarts, e.g.
    /// derived from the pipeline output that carried it).
    pub fn late_reaction(&mut self, id: String, window_start_ms: u64, creative: u16) {
        let mut reactions = vec![0u32; self.creatives.len()];
        if let Some(n) = reactions.get_mut(usize::from(creative)) {
            *n = 1;
        }
        self.enqueue(CampaignCommand::new(
            id,
            Action::RecordReactions {
                window_start_ms,
                reactions,
            },
        ));
    }

    /// Queues a command (once per id; nothing if the campaign already
    /// processed it).
    pub fn enqueue(&mut self, cmd: CampaignCommand) {
        if self.campaign.has_processed(&cmd.id) || self.queued.contains_key(&cmd.id) {
            return;
        }
        let n = self.next_command;
        self.next_command += 1;
        self.queued.insert(cmd.id.clone(), n);
        self.commands.push((n, cmd));
    }

    /// A command of [`Ready::commands`] was executed (whatever the outcome:
    /// events, none because it had already taken effect, or a refusal the
    /// caller reported): it leaves the queue.
    pub fn executed(&mut self, id: &str) {
        self.dequeue(id);
    }

    /// Takes command `id` out of the queue (if queued).
    fn dequeue(&mut self, id: &str) {
        if self.queued.remove(id).is_none() {
            return;
        }
        self.executed_entries += 1;
        if self.executed_entries * 2 > self.commands.len() {
            let queued = &self.queued;
            self.commands.retain(|(n, c)| queued.get(&c.id) == Some(n));
            self.executed_entries = 0;
        }
    }

    /// The queued commands, in order.
    fn queued_commands(&self) -> impl Iterator<Item = &CampaignCommand> + '_ {
        self.commands
            .iter()
            .filter(|(n, c)| self.queued.get(&c.id) == Some(n))
            .map(|(_, c)| c)
    }

    /// The reaction pipeline knows the users of batches `0..=batch`.
    pub fn announced(&mut self, batch: u32) {
        self.announced = self.announced.max(batch.saturating_add(1));
    }

    /// The sender acknowledged batch `batch`.
    pub fn sender_acked(&mut self, batch: u32) {
        if self
            .sent_ms
            .get(batch as usize)
            .copied()
            .flatten()
            .is_none()
        {
            self.acked.insert(batch);
        }
    }

    /// Learns recorded feedback (after recording it, and at recovery).
    /// Feedback for a batch already learned is ignored. If the policy
    /// refuses the update ([`FeedbackError::Policy`] or
    /// [`FeedbackError::Shape`]), the model stays as it was but the
    /// feedback counts as applied: it is recorded, and the campaign must
    /// go on (the error is for the caller to report).
    pub fn apply_feedback(&mut self, f: &Feedback) -> Result<(), FeedbackError> {
        if f.batch < self.fed {
            return Ok(());
        }
        if f.batch != self.fed {
            return Err(FeedbackError::OutOfOrder {
                batch: f.batch,
                expected: self.fed,
            });
        }
        let plan = self
            .plans
            .get(f.batch as usize)
            .ok_or(FeedbackError::NotPlanned { batch: f.batch })?;
        let learned = (|| {
            let mut o = Outcomes::new(self.audience.dim())?;
            for (user, creative, _) in plan.iter() {
                let y = u32::from(f.reacted.binary_search(&user).is_ok());
                if let Some(x) = self.audience.features(user) {
                    o.push(creative, x, 1, y)?;
                }
            }
            self.policy.update(&o)?;
            Ok(())
        })();
        self.fed = f.batch + 1;
        learned
    }

    /// The feedback of batch `batch` at `now_ms`: its users whose reaction
    /// was counted in a window closed by then.
    pub fn feedback(&self, batch: u32, now_ms: u64) -> Feedback {
        let reach = self.config.window_ms.max(1) + self.config.grace_ms;
        let mut reacted: Vec<u32> = match (
            self.plans.get(batch as usize),
            self.reacted.get(batch as usize),
        ) {
            (Some(plan), Some(r)) => plan
                .users
                .iter()
                .copied()
                .filter(|u| r.get(u).is_some_and(|&w| w.saturating_add(reach) <= now_ms))
                .collect(),
            _ => Vec::new(),
        };
        reacted.sort_unstable();
        reacted.dedup();
        Feedback::new(batch, reacted)
    }

    /// What to do now. Call after the reaction pipeline has processed
    /// everything up to `now_ms` (so the windows due by then are closed).
    pub fn ready(&mut self, now_ms: u64) -> Ready {
        let mut r = Ready::default();
        let Some(spec) = self.campaign.spec().cloned() else {
            r.commands = self.queued_commands().cloned().collect();
            return r;
        };
        let status = self.campaign.status();
        if status == Some(Status::Scheduled) && now_ms >= spec.schedule.start_ms {
            r.commands
                .push(CampaignCommand::new("start-due", Action::Start));
        }
        let running = status == Some(Status::Running);
        let pending = self.campaign.pending_batch();
        if running {
            for &b in &self.acked {
                if pending == Some(b) {
                    r.commands.push(CampaignCommand::new(
                        format!("sent-{b}"),
                        Action::RecordBatchSent { batch: b },
                    ));
                }
            }
        }
        // Reactions are recorded after the batch they answer is recorded
        // as sent: while a batch is planned but not recorded sent (being
        // handed to the sender, or failing to be), its reactions could
        // exceed the campaign's recorded sends, so they wait.
        if pending.is_none() {
            r.commands.extend(self.queued_commands().cloned());
        } else {
            r.commands.extend(
                self.queued_commands()
                    .filter(|c| !matches!(c.action, Action::RecordReactions { .. }))
                    .cloned(),
            );
        }
        // Feedback of every earlier batch before the next one is planned.
        if let Some(next) = self.campaign.next_batch() {
            if running && pending.is_none() && next > 0 && spec.due_ms(next) <= now_ms {
                for b in self.fed..next {
                    r.feedback.push(self.feedback(b, now_ms));
                }
            }
        }
        if let Some(b) = pending {
            if b >= self.announced {
                r.announce = Some(b);
            } else if running && !self.acked.contains(&b) {
                r.send = Some(b);
            }
        }
        let live = matches!(status, Some(Status::Scheduled | Status::Running));
        if live && self.jobs_due {
            let planned = self.plans.len() as u32;
            for b in planned..spec.batch_count() {
                r.schedule
                    .push(campaign_job(&self.id, JobKind::Batch(b), spec.due_ms(b)));
            }
        }
        let all_sent = self.campaign.next_batch().is_none() && pending.is_none();
        if running && all_sent && !self.complete_scheduled {
            let last = self
                .sent_ms
                .iter()
                .flatten()
                .copied()
                .max()
                .unwrap_or(now_ms);
            r.schedule.push(campaign_job(
                &self.id,
                JobKind::Complete,
                last.saturating_add(self.config.reaction_horizon_ms),
            ));
        }
        r
    }

    /// The jobs of `ready` were scheduled.
    pub fn scheduled(&mut self, jobs: &[Job]) {
        for j in jobs {
            match parse_job(j) {
                Ok((_, JobKind::Complete)) => self.complete_scheduled = true,
                Ok((_, JobKind::Batch(_))) => self.jobs_due = false,
                Err(_) => {}
            }
        }
    }

    /// The batch to hand to the sender: its plan, less the users removed
    /// since (see [`CampaignDriver::remove_users`]).
    pub fn outgoing(&self, batch: u32) -> Option<OutgoingBatch> {
        let spec = self.campaign.spec()?;
        let plan = self.plans.get(batch as usize)?;
        let decisions =
            if self.removed.is_empty() || !plan.iter().any(|(u, _, _)| self.removed.contains(u)) {
                plan.clone()
            } else {
                let mut kept = Decisions::with_capacity(plan.len());
                for (u, c, p) in plan.iter().filter(|(u, _, _)| !self.removed.contains(*u)) {
                    kept.push(u, c, p);
                }
                kept
            };
        Some(OutgoingBatch {
            campaign: self.id.clone(),
            channel: spec.channel.clone(),
            batch,
            creatives: Arc::clone(&self.creatives),
            decisions,
        })
    }

    /// Removes users' data from what the campaign does next: they are no
    /// longer candidates for any batch, and a batch already planned but
    /// not yet handed to the sender goes without them. What was decided
    /// and sent before stays in the campaign's history.
    pub fn remove_users(&mut self, users: &[u32]) {
        self.removed.extend_from(users);
        let removed = &self.removed;
        self.remaining.retain(|u| !removed.contains(u));
    }

    /// Users removed with [`CampaignDriver::remove_users`].
    pub fn removed(&self) -> &UserSet {
        &self.removed
    }

    /// The removed users planned in batch `batch`.
    pub fn removed_in_plan(&self, batch: u32) -> Vec<u32> {
        self.plans
            .get(batch as usize)
            .map(|p| {
                p.iter()
                    .map(|(u, _, _)| u)
                    .filter(|&u| self.removed.contains(u))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The command a fired job stands for, at `now_ms`: planning a batch
    /// with the policy, or completing the campaign. See [`JobError`] for
    /// when it refuses.
    pub fn job_command(&mut self, kind: JobKind, now_ms: u64) -> Result<CampaignCommand, JobError> {
        let status = self.campaign.status();
        let Some(spec) = self.campaign.spec().cloned() else {
            return Err(JobError::Refused("the campaign does not exist".into()));
        };
        if let Some(s) = status.filter(|s| !s.is_live()) {
            return Err(JobError::Refused(format!("the campaign is {s}")));
        }
        match kind {
            JobKind::Complete => {
                if self.campaign.next_batch().is_some() || self.campaign.pending_batch().is_some() {
                    return Err(JobError::NotReady("batches are left to send".into()));
                }
                Ok(CampaignCommand::new("complete", Action::Complete))
            }
            JobKind::Batch(batch) => {
                if (batch as usize) < self.plans.len() {
                    return Err(JobError::Refused(format!(
                        "batch {batch} is already planned (a repeated delivery)"
                    )));
                }
                if status != Some(Status::Running) {
                    return Err(JobError::NotReady(format!(
                        "the campaign is {}",
                        status.map_or("not created".to_owned(), |s| s.to_string())
                    )));
                }
                if let Some(p) = self.campaign.pending_batch() {
                    self.reschedule_on_send = true;
                    return Err(JobError::NotReady(format!("batch {p} is not sent yet")));
                }
                if self.campaign.next_batch() != Some(batch) {
                    // An earlier batch's job is still to come (or was
                    // refused while its predecessor was unsent): this one
                    // is scheduled again once that batch is sent.
                    self.reschedule_on_send = true;
                    return Err(JobError::NotReady(format!(
                        "batch {batch} is not the next batch ({:?})",
                        self.campaign.next_batch()
                    )));
                }
                if spec.due_ms(batch) > now_ms {
                    return Err(JobError::NotReady(format!(
                        "batch {batch} is due at {}",
                        spec.due_ms(batch)
                    )));
                }
                if self.fed < batch {
                    return Err(JobError::NotReady(format!(
                        "feedback of batch {} is not recorded",
                        self.fed
                    )));
                }
                self.sync_remaining();
                let ctx = self
                    .campaign
                    .plan_context(batch)
                    .ok_or_else(|| JobError::Refused("the campaign does not exist".into()))?;
                let allowance = self.campaign.batch_allowance(batch) as usize;
                let mut rng = self.plan_rng(batch);
                let decisions = self
                    .policy
                    .plan(&ctx, &self.remaining, allowance, &mut rng)?;
                Ok(CampaignCommand::new(
                    format!("plan-{batch}"),
                    Action::PlanBatch {
                        batch,
                        policy: self.policy.name().to_owned(),
                        decisions,
                    },
                ))
            }
        }
    }

    /// The generator batch `batch` is planned with.
    pub fn plan_rng(&self, batch: u32) -> ChaCha8Rng {
        let seed = rng::mix(&[
            self.config.seed,
            self.config.stream,
            rng::label("plan"),
            u64::from(batch),
        ]);
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Drops the users messaged since the last plan from the remaining
    /// candidates. They select rows of the audience's matrix (never a
    /// copy of it): the messaged users are marked in a bitmap over the
    /// audience's rows (one bit a subscriber) and the selection keeps the
    /// unmarked rows.
    fn sync_remaining(&mut self) {
        let messaged = self.campaign.messaged();
        if self.remaining_synced == messaged.len() {
            return;
        }
        let all = self.audience.candidates();
        // `remaining` starts as the audience and only ever drops rows, so
        // its matrix rows are the audience's.
        debug_assert!(self.remaining.shares_matrix_with(all));
        let mut marked = vec![0u64; all.len().div_ceil(64)];
        for u in messaged.iter() {
            if let Some(r) = self.audience.row_of(u) {
                marked[r / 64] |= 1 << (r % 64);
            }
        }
        self.remaining
            .retain_rows(|_, r| marked[r / 64] & (1 << (r % 64)) == 0);
        self.remaining_synced = messaged.len();
    }
}
