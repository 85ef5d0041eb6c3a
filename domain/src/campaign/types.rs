//! What a campaign is made of, and what callers ask of it.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::SpecError;
use crate::data::Decisions;

/// The lifecycle states of a campaign.
///
/// ```text
/// draft ─start→ scheduled ─start (due)→ running ⇄ paused ─→ completed
///   └───────────────┴───────── cancel ─────┴────────┴───→ cancelled
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    /// Created, not yet started.
    Draft,
    /// Started before its start time: waits for it.
    Scheduled,
    /// Sending batches.
    Running,
    /// Sends nothing until resumed.
    Paused,
    /// Finished normally. Terminal.
    Completed,
    /// Stopped for good. Terminal.
    Cancelled,
}

impl Status {
    /// Whether the campaign can still change state (not completed or
    /// cancelled).
    pub fn is_live(self) -> bool {
        !matches!(self, Status::Completed | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Draft => "draft",
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
        })
    }
}

/// How the budget is cut into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BatchSizing {
    /// This many batches, the budget split evenly (the first
    /// `budget % count` batches get one message more).
    Count(u32),
    /// Batches of at most this many messages; as many as the budget needs.
    Size(u32),
}

/// When batches go out and how large they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BatchSchedule {
    /// When batch 0 is due (ms since the Unix epoch); the campaign cannot
    /// start running earlier.
    pub start_ms: u64,
    /// Time between consecutive batches' due times (ms).
    pub interval_ms: u64,
    /// The number or the size of batches.
    pub sizing: BatchSizing,
}

/// Everything a campaign is created with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CampaignSpec {
    /// The channel that sends the messages.
    pub channel: String,
    /// A reference to the audience (the candidate users) in the user store.
    pub audience: String,
    /// The creatives' references; a creative is addressed by its index here
    /// everywhere else (`u16`).
    pub creatives: Vec<String>,
    /// The most messages the campaign may send in total.
    pub budget: u64,
    /// The batch plan.
    pub schedule: BatchSchedule,
}

impl CampaignSpec {
    /// Most creatives in one campaign.
    pub const MAX_CREATIVES: usize = 64;
    /// Most batches in one campaign.
    pub const MAX_BATCHES: u64 = 100_000;
    /// Most users in one batch: a planned batch is recorded in parts of at
    /// most [`MAX_PART_DECISIONS`](super::MAX_PART_DECISIONS) decisions (10
    /// bytes each), all in one transaction, and so is its model feedback
    /// (up to 11 bytes of JSON per reacting user); both must stay under the
    /// engine's default 8 MiB transaction limit however many users react
    /// (tests check the worst cases): 5 parts of decisions, at most 5.5 MB
    /// of feedback.
    pub const MAX_BATCH_USERS: u64 = 500_000;
    /// Longest channel, audience or creative reference, in bytes.
    pub const MAX_REF_LEN: usize = 256;

    /// Checks the spec's limits and consistency.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [("channel", &self.channel), ("audience", &self.audience)] {
            check_ref(field, value)?;
        }
        if self.creatives.is_empty() {
            return Err(SpecError::NoCreatives);
        }
        if self.creatives.len() > Self::MAX_CREATIVES {
            return Err(SpecError::TooManyCreatives {
                count: self.creatives.len(),
                max: Self::MAX_CREATIVES,
            });
        }
        for (i, c) in self.creatives.iter().enumerate() {
            check_ref("creative", c)?;
            if self.creatives[..i].contains(c) {
                return Err(SpecError::DuplicateCreative {
                    creative: c.clone(),
                });
            }
        }
        if self.budget == 0 {
            return Err(SpecError::ZeroBudget);
        }
        let count = match self.schedule.sizing {
            BatchSizing::Count(0) | BatchSizing::Size(0) => return Err(SpecError::ZeroBatches),
            BatchSizing::Count(n) => u64::from(n),
            BatchSizing::Size(s) => self.budget.div_ceil(u64::from(s)),
        };
        if count > Self::MAX_BATCHES {
            return Err(SpecError::TooManyBatches {
                count,
                max: Self::MAX_BATCHES,
            });
        }
        let largest = self.nominal_batch_size(0);
        if largest > Self::MAX_BATCH_USERS {
            return Err(SpecError::BatchTooLarge {
                size: largest,
                max: Self::MAX_BATCH_USERS,
            });
        }
        if count > 1 && self.schedule.interval_ms == 0 {
            return Err(SpecError::ZeroInterval);
        }
        let last_due = u128::from(self.schedule.start_ms)
            + u128::from(self.schedule.interval_ms) * u128::from(count - 1);
        if last_due > u128::from(u64::MAX) {
            return Err(SpecError::ScheduleOverflow);
        }
        Ok(())
    }

    /// The number of batches (for a valid spec).
    pub fn batch_count(&self) -> u32 {
        match self.schedule.sizing {
            BatchSizing::Count(n) => n,
            BatchSizing::Size(0) => 0,
            BatchSizing::Size(s) => {
                u32::try_from(self.budget.div_ceil(u64::from(s))).unwrap_or(u32::MAX)
            }
        }
    }

    /// The most messages batch `batch` may carry by the plan (before the
    /// remaining budget is considered); 0 beyond the last batch.
    pub fn nominal_batch_size(&self, batch: u32) -> u64 {
        let count = self.batch_count();
        if batch >= count {
            return 0;
        }
        match self.schedule.sizing {
            BatchSizing::Count(n) => {
                let n = u64::from(n);
                self.budget / n + u64::from(u64::from(batch) < self.budget % n)
            }
            BatchSizing::Size(s) => {
                let s = u64::from(s);
                (self.budget - u64::from(batch) * s).min(s)
            }
        }
    }

    /// When batch `batch` is due (ms), saturating.
    pub fn due_ms(&self, batch: u32) -> u64 {
        self.schedule
            .start_ms
            .saturating_add(self.schedule.interval_ms.saturating_mul(u64::from(batch)))
    }
}

fn check_ref(field: &'static str, value: &str) -> Result<(), SpecError> {
    if value.is_empty() || value.len() > CampaignSpec::MAX_REF_LEN {
        return Err(SpecError::BadReference {
            field,
            len: value.len(),
            max: CampaignSpec::MAX_REF_LEN,
        });
    }
    Ok(())
}

/// A command to a campaign: an id that makes retries harmless, and what to
/// do.
///
/// The campaign remembers every id it has processed with a fingerprint of
/// its action: a retry with the same id and action produces no events; the
/// same id with another action is refused
/// ([`super::CampaignError::CommandIdReused`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignCommand {
    /// The command id (1 to [`CampaignCommand::MAX_ID_LEN`] bytes), e.g. the
    /// delay-queue job id or the API request id.
    pub id: String,
    /// What to do.
    pub action: Action,
}

impl CampaignCommand {
    /// Longest command id, in bytes (the engine's id limit).
    pub const MAX_ID_LEN: usize = 64;

    /// A command with this id and action.
    pub fn new(id: impl Into<String>, action: Action) -> Self {
        Self {
            id: id.into(),
            action,
        }
    }

    /// The stamp the command's events carry: its id and the fingerprint
    /// of its action.
    pub fn stamp(&self) -> CommandStamp {
        CommandStamp {
            id: self.id.clone(),
            fingerprint: fingerprint(&self.action),
        }
    }
}

/// What a [`CampaignCommand`] asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Action {
    /// Creates the campaign in draft.
    Create(CampaignSpec),
    /// Draft → scheduled, and → running once the start time has come
    /// (scheduled → running at or after it).
    Start,
    /// Running → paused: nothing is planned or sent until resumed.
    Pause,
    /// Paused → running.
    Resume,
    /// Any live state → cancelled, for good.
    Cancel {
        /// Why (at most [`CampaignSpec::MAX_REF_LEN`] bytes; may be empty).
        reason: String,
    },
    /// Running or paused → completed, once no planned batch awaits sending.
    Complete,
    /// Records the decisions for batch `batch` (the next one, due, with the
    /// previous one sent), reserving budget and users.
    PlanBatch {
        /// The batch number, from 0.
        batch: u32,
        /// The name of the policy that decided (1 to 64 bytes).
        policy: String,
        /// Who gets which creative, with propensities.
        decisions: Decisions,
    },
    /// Marks a planned batch as sent (the commit point before the channel
    /// delivers it); only while running.
    RecordBatchSent {
        /// The batch number.
        batch: u32,
    },
    /// Adds reactions observed in one aggregation window: for each creative
    /// (by index), how many messaged users reacted.
    RecordReactions {
        /// The window's start (ms), for reference.
        window_start_ms: u64,
        /// Reacting users per creative; one entry per creative.
        reactions: Vec<u32>,
    },
}

impl Action {
    /// The action's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Create(_) => "create",
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Cancel { .. } => "cancel",
            Action::Complete => "complete",
            Action::PlanBatch { .. } => "plan batch",
            Action::RecordBatchSent { .. } => "record batch sent",
            Action::RecordReactions { .. } => "record reactions",
        }
    }
}

/// The id and content fingerprint of the command an event came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CommandStamp {
    /// The command id.
    pub id: String,
    /// FNV-1a 64 of the action's canonical JSON: a stable fingerprint of
    /// what the command asked.
    pub fingerprint: u64,
}

/// FNV-1a 64 of `action`'s JSON, computed while serialising (no buffer).
pub(crate) fn fingerprint(action: &Action) -> u64 {
    let mut h = smartmsg_engine::fnv::Fnv1a::new();
    // Serialising plain data into a writer that cannot fail cannot fail; a
    // failure would only weaken the fingerprint, never panic.
    let _ = serde_json::to_writer(&mut h, action);
    h.finish()
}
