//! The campaign aggregate: lifecycle, budget, batches, reactions.
//!
//! A [`Campaign`] is a left fold of its [`CampaignEvent`]s; [`Campaign`]'s
//! [`Aggregate::decide`] turns a [`CampaignCommand`] into events or a
//! [`CampaignError`], purely (time comes from [`DecideCtx::now_ms`]).
//!
//! Invariants it keeps:
//!
//! - **budget**: the messages of all planned batches never exceed
//!   [`CampaignSpec::budget`], and no batch exceeds its planned size;
//! - **one message per user**: a user planned in any batch can never be
//!   planned again (the [`UserSet`] of messaged users);
//! - **batches once**: batches are planned in order, each at most once, each
//!   sent at most once, the next planned only after the previous was sent;
//! - **paused and cancelled send nothing**: planning and sending need the
//!   running state;
//! - **idempotency**: each event carries its command's id and fingerprint;
//!   a processed id with the same action decides to nothing, with another
//!   action it is refused.

mod error;
mod events;
pub mod planned;
mod types;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_engine::{Aggregate, DecideCtx};

pub use error::{CampaignError, SpecError};
pub use events::{CampaignEvent, PLANNED_PARTS_SCHEMA, PLANNED_SCHEMA, SCHEMA};
pub use planned::{Part, MAX_PART_DECISIONS};
pub use types::{
    Action, BatchSchedule, BatchSizing, CampaignCommand, CampaignSpec, CommandStamp, Status,
};

use crate::data::Decisions;
use crate::policy::PlanContext;
use crate::users::UserSet;

/// Longest policy name recorded with a batch, in bytes.
pub const MAX_POLICY_NAME_LEN: usize = 64;

/// One planned batch, as the campaign remembers it (the users themselves
/// are in the event and in the messaged set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The policy that planned it.
    pub policy: String,
    /// Users in it.
    pub users: u32,
    /// Users per creative.
    pub per_creative: Vec<u32>,
    /// Whether it was sent.
    pub sent: bool,
}

/// Messages and reactions of one creative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreativeStats {
    /// Messages planned with it (sent or not).
    pub planned: u64,
    /// Messages sent with it.
    pub sent: u64,
    /// Users who reacted to it.
    pub reactions: u64,
}

/// The campaign aggregate's state. See the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    status: Option<Status>,
    spec: Option<CampaignSpec>,
    cancel_reason: Option<String>,
    messaged: UserSet,
    batches: Vec<BatchRecord>,
    reserved: u64,
    sent: u64,
    creatives: Vec<CreativeStats>,
    commands: BTreeMap<String, u64>,
}

impl Campaign {
    /// The state, or `None` before the campaign is created.
    pub fn status(&self) -> Option<Status> {
        self.status
    }

    /// What the campaign was created with.
    pub fn spec(&self) -> Option<&CampaignSpec> {
        self.spec.as_ref()
    }

    /// Why it was cancelled, if it was.
    pub fn cancel_reason(&self) -> Option<&str> {
        self.cancel_reason.as_deref()
    }

    /// Users planned in any batch (messaged or about to be).
    pub fn messaged(&self) -> &UserSet {
        &self.messaged
    }

    /// Batches planned so far, by number.
    pub fn batches(&self) -> &[BatchRecord] {
        &self.batches
    }

    /// Messages reserved by planned batches (sent or not).
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Messages in sent batches.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Budget not yet reserved by a planned batch.
    pub fn remaining_budget(&self) -> u64 {
        self.spec
            .as_ref()
            .map_or(0, |s| s.budget.saturating_sub(self.reserved))
    }

    /// Per-creative messages and reactions, by creative index.
    pub fn creative_stats(&self) -> &[CreativeStats] {
        &self.creatives
    }

    /// Whether a command id has been processed.
    pub fn has_processed(&self, command_id: &str) -> bool {
        self.commands.contains_key(command_id)
    }

    /// The number of the next batch to plan, if the plan has one left.
    pub fn next_batch(&self) -> Option<u32> {
        let next = u32::try_from(self.batches.len()).ok()?;
        (next < self.spec.as_ref()?.batch_count()).then_some(next)
    }

    /// The planned batch that awaits sending, if any.
    pub fn pending_batch(&self) -> Option<u32> {
        let last = self.batches.last()?;
        (!last.sent).then(|| u32::try_from(self.batches.len() - 1).unwrap_or(u32::MAX))
    }

    /// The most users batch `batch` may hold now: its planned size, capped
    /// by the remaining budget.
    pub fn batch_allowance(&self, batch: u32) -> u64 {
        self.spec.as_ref().map_or(0, |s| {
            s.nominal_batch_size(batch).min(self.remaining_budget())
        })
    }

    /// What a policy needs to know to plan batch `batch`, or `None` before
    /// the campaign is created.
    pub fn plan_context(&self, batch: u32) -> Option<PlanContext> {
        let spec = self.spec.as_ref()?;
        Some(PlanContext {
            batch,
            batch_count: spec.batch_count(),
            creatives: spec.creatives.len(),
            remaining_budget: self.remaining_budget(),
            planned_per_creative: self.creatives.iter().map(|c| c.planned).collect(),
        })
    }

    fn transition(&self, action: &Action) -> CampaignError {
        match self.status {
            Some(status) => CampaignError::InvalidTransition {
                action: action.name(),
                status,
            },
            None => CampaignError::NotCreated,
        }
    }

    fn decide_plan(
        &self,
        spec: &CampaignSpec,
        ctx: &DecideCtx,
        batch: u32,
        policy: &str,
        decisions: &Decisions,
    ) -> Result<(), CampaignError> {
        let count = spec.batch_count();
        if batch >= count {
            return Err(CampaignError::BatchOutOfRange { batch, count });
        }
        let next = self.batches.len();
        if (batch as usize) < next {
            return Err(CampaignError::BatchAlreadyPlanned { batch });
        }
        if batch as usize > next {
            return Err(CampaignError::BatchOutOfOrder {
                batch,
                expected: next as u32,
            });
        }
        if let Some(pending) = self.pending_batch() {
            return Err(CampaignError::PreviousBatchNotSent { pending });
        }
        let due_ms = spec.due_ms(batch);
        if ctx.now_ms < due_ms {
            return Err(CampaignError::BatchNotDue {
                batch,
                due_ms,
                now_ms: ctx.now_ms,
            });
        }
        if policy.is_empty() || policy.len() > MAX_POLICY_NAME_LEN {
            return Err(CampaignError::BadPolicyName {
                len: policy.len(),
                max: MAX_POLICY_NAME_LEN,
            });
        }
        if decisions.check_shape().is_err() {
            return Err(CampaignError::DecisionShape {
                users: decisions.users.len(),
                creatives: decisions.creatives.len(),
                propensities: decisions.propensities.len(),
            });
        }
        let requested = decisions.len() as u64;
        let remaining = self.remaining_budget();
        if requested > remaining {
            return Err(CampaignError::BudgetExceeded {
                requested,
                remaining,
            });
        }
        let allowed = spec.nominal_batch_size(batch);
        if requested > allowed {
            return Err(CampaignError::BatchTooLarge {
                batch,
                users: requested,
                allowed,
            });
        }
        for (user, creative, propensity) in decisions.iter() {
            if usize::from(creative) >= spec.creatives.len() {
                return Err(CampaignError::UnknownCreative {
                    creative,
                    count: spec.creatives.len(),
                });
            }
            if !(propensity > 0.0 && propensity <= 1.0) {
                return Err(CampaignError::BadPropensity { user, propensity });
            }
        }
        let mut sorted = decisions.users.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(CampaignError::DuplicateUser { user: w[0] });
        }
        // Both sorted: one merge pass finds any user messaged before.
        let (mut i, old) = (0, self.messaged.as_slice());
        for &u in &sorted {
            while i < old.len() && old[i] < u {
                i += 1;
            }
            if i < old.len() && old[i] == u {
                return Err(CampaignError::UserAlreadyMessaged { user: u });
            }
        }
        Ok(())
    }

    fn decide_reactions(
        &self,
        spec: &CampaignSpec,
        reactions: &[u32],
    ) -> Result<(), CampaignError> {
        if reactions.len() != spec.creatives.len() {
            return Err(CampaignError::ReactionsShape {
                expected: spec.creatives.len(),
                got: reactions.len(),
            });
        }
        for (c, (&r, stats)) in reactions.iter().zip(&self.creatives).enumerate() {
            let total = stats.reactions + u64::from(r);
            if total > stats.sent {
                return Err(CampaignError::ReactionsExceedSends {
                    creative: c as u16,
                    reactions: total,
                    sent: stats.sent,
                });
            }
        }
        Ok(())
    }
}

impl Aggregate for Campaign {
    type Command = CampaignCommand;
    type Event = CampaignEvent;
    type Error = CampaignError;

    fn decide(
        &self,
        command: &CampaignCommand,
        ctx: &DecideCtx,
    ) -> Result<Vec<CampaignEvent>, CampaignError> {
        let id = &command.id;
        if id.is_empty() || id.len() > CampaignCommand::MAX_ID_LEN {
            return Err(CampaignError::BadCommandId {
                len: id.len(),
                max: CampaignCommand::MAX_ID_LEN,
            });
        }
        let action = &command.action;
        let fp = types::fingerprint(action);
        if let Some(&seen) = self.commands.get(id) {
            return if seen == fp {
                Ok(Vec::new())
            } else {
                Err(CampaignError::CommandIdReused { id: id.clone() })
            };
        }
        let stamp = CommandStamp {
            id: id.clone(),
            fingerprint: fp,
        };

        let (status, spec) = match (self.status, self.spec.as_ref(), action) {
            (None, _, Action::Create(spec)) => {
                spec.validate()?;
                return Ok(vec![CampaignEvent::Created {
                    command: stamp,
                    spec: spec.clone(),
                }]);
            }
            (Some(_), _, Action::Create(_)) => return Err(CampaignError::AlreadyCreated),
            (Some(status), Some(spec), _) => (status, spec),
            _ => return Err(CampaignError::NotCreated),
        };
        use Status::*;
        let start_ms = spec.schedule.start_ms;
        match (status, action) {
            (Draft, Action::Start) => {
                let mut events = vec![CampaignEvent::Scheduled {
                    command: stamp.clone(),
                }];
                if ctx.now_ms >= start_ms {
                    events.push(CampaignEvent::Started { command: stamp });
                }
                Ok(events)
            }
            (Scheduled, Action::Start) if ctx.now_ms >= start_ms => {
                Ok(vec![CampaignEvent::Started { command: stamp }])
            }
            (Scheduled, Action::Start) => Err(CampaignError::TooEarly {
                start_ms,
                now_ms: ctx.now_ms,
            }),
            (Running, Action::Pause) => Ok(vec![CampaignEvent::Paused { command: stamp }]),
            (Paused, Action::Resume) => Ok(vec![CampaignEvent::Resumed { command: stamp }]),
            (Draft | Scheduled | Running | Paused, Action::Cancel { reason }) => {
                if reason.len() > CampaignSpec::MAX_REF_LEN {
                    return Err(CampaignError::ReasonTooLong {
                        len: reason.len(),
                        max: CampaignSpec::MAX_REF_LEN,
                    });
                }
                Ok(vec![CampaignEvent::Cancelled {
                    command: stamp,
                    reason: reason.clone(),
                }])
            }
            (Running | Paused, Action::Complete) => match self.pending_batch() {
                Some(batch) => Err(CampaignError::BatchInFlight { batch }),
                None => Ok(vec![CampaignEvent::Completed { command: stamp }]),
            },
            (
                Running,
                Action::PlanBatch {
                    batch,
                    policy,
                    decisions,
                },
            ) => {
                self.decide_plan(spec, ctx, *batch, policy, decisions)?;
                let count = Part::count_for(decisions.len());
                if count == 1 {
                    return Ok(vec![CampaignEvent::BatchPlanned {
                        command: stamp,
                        batch: *batch,
                        part: Part::WHOLE,
                        policy: policy.clone(),
                        decisions: decisions.clone(),
                    }]);
                }
                // A large batch: its parts, in order, in one transaction.
                Ok((0..count)
                    .map(|index| {
                        let from = index as usize * MAX_PART_DECISIONS;
                        CampaignEvent::BatchPlanned {
                            command: stamp.clone(),
                            batch: *batch,
                            part: Part { index, count },
                            policy: policy.clone(),
                            decisions: decisions.rows(from..from + MAX_PART_DECISIONS),
                        }
                    })
                    .collect())
            }
            (Running, Action::RecordBatchSent { batch }) => {
                match self.batches.get(*batch as usize) {
                    None => Err(CampaignError::BatchNotPlanned { batch: *batch }),
                    Some(b) if b.sent => Err(CampaignError::BatchAlreadySent { batch: *batch }),
                    Some(_) => Ok(vec![CampaignEvent::BatchSent {
                        command: stamp,
                        batch: *batch,
                    }]),
                }
            }
            (
                Running | Paused | Completed | Cancelled,
                Action::RecordReactions {
                    window_start_ms,
                    reactions,
                },
            ) => {
                self.decide_reactions(spec, reactions)?;
                Ok(vec![CampaignEvent::ReactionsRecorded {
                    command: stamp,
                    window_start_ms: *window_start_ms,
                    reactions: reactions.clone(),
                }])
            }
            _ => Err(self.transition(action)),
        }
    }

    fn evolve(&mut self, event: &CampaignEvent) {
        let stamp = event.command();
        self.commands.insert(stamp.id.clone(), stamp.fingerprint);
        match event {
            CampaignEvent::Created { spec, .. } => {
                self.status = Some(Status::Draft);
                self.creatives = vec![CreativeStats::default(); spec.creatives.len()];
                self.spec = Some(spec.clone());
            }
            CampaignEvent::Scheduled { .. } => self.status = Some(Status::Scheduled),
            CampaignEvent::Started { .. } | CampaignEvent::Resumed { .. } => {
                self.status = Some(Status::Running)
            }
            CampaignEvent::Paused { .. } => self.status = Some(Status::Paused),
            CampaignEvent::Completed { .. } => self.status = Some(Status::Completed),
            CampaignEvent::Cancelled { reason, .. } => {
                self.status = Some(Status::Cancelled);
                self.cancel_reason = Some(reason.clone());
            }
            CampaignEvent::BatchPlanned {
                part,
                policy,
                decisions,
                ..
            } => {
                self.messaged.extend_from(&decisions.users);
                let per_creative = decisions.per_creative(self.creatives.len());
                for (stats, &n) in self.creatives.iter_mut().zip(&per_creative) {
                    stats.planned += u64::from(n);
                }
                self.reserved += decisions.len() as u64;
                match self.batches.last_mut() {
                    // A later part of a large batch joins the batch its
                    // first part started.
                    Some(last) if !part.is_first() => {
                        last.users += decisions.len() as u32;
                        for (total, n) in last.per_creative.iter_mut().zip(per_creative) {
                            *total += n;
                        }
                    }
                    _ => self.batches.push(BatchRecord {
                        policy: policy.clone(),
                        users: decisions.len() as u32,
                        per_creative,
                        sent: false,
                    }),
                }
            }
            CampaignEvent::BatchSent { batch, .. } => {
                if let Some(b) = self.batches.get_mut(*batch as usize) {
                    if !b.sent {
                        b.sent = true;
                        self.sent += u64::from(b.users);
                        for (stats, &n) in self.creatives.iter_mut().zip(&b.per_creative) {
                            stats.sent += u64::from(n);
                        }
                    }
                }
            }
            CampaignEvent::ReactionsRecorded { reactions, .. } => {
                for (stats, &r) in self.creatives.iter_mut().zip(reactions) {
                    stats.reactions += u64::from(r);
                }
            }
        }
    }

    const SNAPSHOT_SCHEMA: u16 = 1;

    fn encode_snapshot(&self) -> Option<Bytes> {
        serde_json::to_vec(self).ok().map(Bytes::from)
    }

    fn decode_snapshot(state: &[u8]) -> Option<Self> {
        serde_json::from_slice(state).ok()
    }
}
