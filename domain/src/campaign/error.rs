//! Why a campaign refuses a command.

use super::types::Status;

/// What is wrong with a [`super::CampaignSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A reference is empty or too long.
    #[error("{field} reference is {len} bytes; it must be 1 to {max}")]
    BadReference {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No creatives.
    #[error("a campaign needs at least one creative")]
    NoCreatives,
    /// Too many creatives.
    #[error("{count} creatives; at most {max}")]
    TooManyCreatives {
        /// Given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The same creative twice.
    #[error("creative {creative:?} is listed twice")]
    DuplicateCreative {
        /// The creative.
        creative: String,
    },
    /// A budget of 0.
    #[error("the budget is 0")]
    ZeroBudget,
    /// A batch count or size of 0.
    #[error("the batch count or size is 0")]
    ZeroBatches,
    /// More batches than allowed.
    #[error("{count} batches; at most {max}")]
    TooManyBatches {
        /// Batches the plan makes.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// Batches larger than allowed.
    #[error("batches of {size} messages; at most {max}")]
    BatchTooLarge {
        /// The largest batch the plan makes.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Several batches, no time between them.
    #[error("several batches need an interval above 0")]
    ZeroInterval,
    /// The last batch would be due after the end of time.
    #[error("the last batch's due time overflows")]
    ScheduleOverflow,
}

/// Why a campaign refuses a command. Nothing is recorded when it does.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CampaignError {
    /// The command id is empty or too long.
    #[error("command id is {len} bytes; it must be 1 to {max}")]
    BadCommandId {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command id was processed before with a different action.
    #[error("command id {id:?} was already used for a different command")]
    CommandIdReused {
        /// The id.
        id: String,
    },
    /// The campaign does not exist yet.
    #[error("the campaign does not exist")]
    NotCreated,
    /// The campaign exists already.
    #[error("the campaign already exists")]
    AlreadyCreated,
    /// The spec is invalid.
    #[error("invalid campaign: {0}")]
    InvalidSpec(#[from] SpecError),
    /// The action is not allowed in the current state (e.g. sending while
    /// paused or cancelled, resuming a running campaign).
    #[error("cannot {action} a campaign that is {status}")]
    InvalidTransition {
        /// The action.
        action: &'static str,
        /// The state it is in.
        status: Status,
    },
    /// Start from scheduled before the start time.
    #[error("the campaign starts at {start_ms}; it is {now_ms}")]
    TooEarly {
        /// The start time.
        start_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// A batch number past the plan.
    #[error("batch {batch} is out of range: the plan has {count} batches")]
    BatchOutOfRange {
        /// The batch.
        batch: u32,
        /// Batches in the plan.
        count: u32,
    },
    /// A batch planned twice.
    #[error("batch {batch} is already planned")]
    BatchAlreadyPlanned {
        /// The batch.
        batch: u32,
    },
    /// Batches must be planned in order.
    #[error("batch {batch} planned out of order; the next batch is {expected}")]
    BatchOutOfOrder {
        /// The batch asked for.
        batch: u32,
        /// The next batch.
        expected: u32,
    },
    /// The previous batch is planned but not sent yet.
    #[error("batch {pending} is planned but not sent yet")]
    PreviousBatchNotSent {
        /// The pending batch.
        pending: u32,
    },
    /// A batch planned before its due time.
    #[error("batch {batch} is due at {due_ms}; it is {now_ms}")]
    BatchNotDue {
        /// The batch.
        batch: u32,
        /// When it is due.
        due_ms: u64,
        /// Now.
        now_ms: u64,
    },
    /// The policy name is empty or too long.
    #[error("policy name is {len} bytes; it must be 1 to {max}")]
    BadPolicyName {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The decision columns differ in length.
    #[error("decision columns differ in length: {users} users, {creatives} creatives, {propensities} propensities")]
    DecisionShape {
        /// Users.
        users: usize,
        /// Creatives.
        creatives: usize,
        /// Propensities.
        propensities: usize,
    },
    /// The batch would exceed the total budget.
    #[error("budget exceeded: {requested} messages asked, {remaining} left")]
    BudgetExceeded {
        /// Messages in the batch.
        requested: u64,
        /// Budget not yet reserved.
        remaining: u64,
    },
    /// The batch is larger than the plan allows for it.
    #[error("batch {batch} has {users} users; the plan allows {allowed}")]
    BatchTooLarge {
        /// The batch.
        batch: u32,
        /// Users in it.
        users: u64,
        /// The plan's size for it.
        allowed: u64,
    },
    /// A creative index past the campaign's creatives.
    #[error("creative {creative} does not exist; the campaign has {count}")]
    UnknownCreative {
        /// The index.
        creative: u16,
        /// Creatives in the campaign.
        count: usize,
    },
    /// A propensity outside (0, 1].
    #[error("propensity {propensity} of user {user} is not in (0, 1]")]
    BadPropensity {
        /// The user.
        user: u32,
        /// The propensity.
        propensity: f32,
    },
    /// The same user twice in one batch.
    #[error("user {user} appears twice in the batch")]
    DuplicateUser {
        /// The user.
        user: u32,
    },
    /// A user this campaign has already messaged (or planned to).
    #[error("user {user} was already messaged by this campaign")]
    UserAlreadyMessaged {
        /// The user.
        user: u32,
    },
    /// A batch that was never planned.
    #[error("batch {batch} was not planned")]
    BatchNotPlanned {
        /// The batch.
        batch: u32,
    },
    /// A batch sent twice.
    #[error("batch {batch} was already sent")]
    BatchAlreadySent {
        /// The batch.
        batch: u32,
    },
    /// Complete while a planned batch awaits sending.
    #[error("batch {batch} is planned but not sent")]
    BatchInFlight {
        /// The batch.
        batch: u32,
    },
    /// A cancel reason that is too long.
    #[error("cancel reason is {len} bytes; at most {max}")]
    ReasonTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Reactions with another number of creatives than the campaign has.
    #[error("reactions for {got} creatives; the campaign has {expected}")]
    ReactionsShape {
        /// Creatives in the campaign.
        expected: usize,
        /// Entries given.
        got: usize,
    },
    /// More reacting users than messages sent with a creative.
    #[error("creative {creative}: {reactions} reactions in total but {sent} messages sent")]
    ReactionsExceedSends {
        /// The creative.
        creative: u16,
        /// Reactions including these.
        reactions: u64,
        /// Messages sent with it.
        sent: u64,
    },
}
