//! Crash hooks: points where a test or the simulator can make the runtime
//! stop as if the process died. No-ops in production ([`NoHooks`]).

/// A point in the runtime's work where a crash is interesting: something
/// durable has happened and what follows has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrashPoint<'a> {
    /// A batch's job is due, before it is polled.
    BeforePlan {
        /// The campaign.
        campaign: &'a str,
        /// The batch.
        batch: u32,
    },
    /// A batch's plan is committed, before its job is acknowledged (the
    /// queue delivers the job again).
    AfterPlanBeforeAck {
        /// The campaign.
        campaign: &'a str,
        /// The batch.
        batch: u32,
    },
    /// A batch is planned and announced, before it is handed to the sender.
    AfterPlanBeforeSend {
        /// The campaign.
        campaign: &'a str,
        /// The batch.
        batch: u32,
    },
    /// The sender acknowledged a batch, before it is recorded as sent.
    AfterDeliveryBeforeRecord {
        /// The campaign.
        campaign: &'a str,
        /// The batch.
        batch: u32,
    },
    /// A batch's model feedback is recorded, before the model learns it.
    AfterFeedbackBeforeUpdate {
        /// The campaign.
        campaign: &'a str,
        /// The batch fed.
        batch: u32,
    },
    /// The reaction pipeline's commit `commit` (1-based) and its outputs
    /// are durable, before its windows are recorded on the campaign.
    AfterCommitBeforeRecord {
        /// The campaign.
        campaign: &'a str,
        /// The commit.
        commit: u64,
    },
    /// The reaction pipeline processed input up to a reaction from source
    /// offset `through` (the source's own numbering, as ingested), before
    /// committing it.
    PipelineCommit {
        /// The campaign.
        campaign: &'a str,
        /// The highest source offset among the reactions processed.
        through: u64,
    },
}

/// Decides where the runtime "crashes". See the [module docs](self).
pub trait Hooks: Send + Sync {
    /// Whether to stop at `point` (the runtime then returns
    /// [`crate::RuntimeError::Crashed`] and must be dropped and reopened).
    fn crash(&self, point: CrashPoint<'_>) -> bool;
}

/// No crashes: production.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn crash(&self, _point: CrashPoint<'_>) -> bool {
        false
    }
}
