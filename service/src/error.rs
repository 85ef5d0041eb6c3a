//! The runtime's errors.

use smartmsg_domain::driver::{AudienceError, FeedbackError};
use smartmsg_domain::{CampaignError, PolicyError, SpecError};
use smartmsg_engine::stream::{RunnerError, StoreError};
use smartmsg_engine::{AppendError, QueueError, ReadError, RepositoryError, StreamIdError};

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The campaign id is not usable.
    #[error("campaign id {id:?}: {reason}")]
    BadCampaignId {
        /// The id.
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// No campaign with this id runs here.
    #[error("unknown campaign {0:?}")]
    UnknownCampaign(String),
    /// A campaign with this id exists with another setup.
    #[error("campaign {0:?} exists with another setup")]
    CampaignExists(String),
    /// The campaign's spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The audience is invalid.
    #[error("audience: {0}")]
    Audience(String),
    /// The policy cannot be built or failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Recorded feedback does not fit the campaign.
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    /// The campaign refused a command.
    #[error("campaign {campaign}: command {command} refused: {source}")]
    Refused {
        /// The campaign.
        campaign: String,
        /// The command id.
        command: String,
        /// Why.
        #[source]
        source: CampaignError,
    },
    /// A command could not be executed (log failure, conflicts).
    #[error("campaign {campaign}: command {command} failed: {source}")]
    Command {
        /// The campaign.
        campaign: String,
        /// The command id.
        command: String,
        /// Why.
        #[source]
        source: Box<RepositoryError<CampaignError>>,
    },
    /// An append failed.
    #[error(transparent)]
    Append(#[from] AppendError),
    /// A read failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The delay queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The reaction pipeline's runner failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stream name is invalid.
    #[error(transparent)]
    StreamId(#[from] StreamIdError),
    /// A recorded event does not decode.
    #[error("{stream} at position {position}: {reason}")]
    Decode {
        /// The stream.
        stream: String,
        /// The event's position.
        position: u64,
        /// Why.
        reason: String,
    },
    /// A reaction source failed.
    #[error("reaction source {source_name}: {reason}")]
    Source {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// Opening a backend failed.
    #[error("open {what}: {reason}")]
    Open {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The campaign is not at the version the caller expected.
    #[error("campaign {campaign} is at version {actual}, not {expected}")]
    VersionMismatch {
        /// The campaign.
        campaign: String,
        /// The version expected.
        expected: u64,
        /// The version it is at.
        actual: u64,
    },
    /// A command id of a form the runtime uses itself.
    #[error("command id {0:?} is reserved for the runtime's own commands")]
    ReservedCommandId(String),
    /// A campaign's work did not settle (a bug; the step is abandoned).
    #[error("stuck: {0}")]
    Stuck(String),
    /// A crash hook fired: drop the runtime and open it again.
    #[error("simulated crash at {0}")]
    Crashed(String),
    /// The runtime is not running any more (its handle outlived it).
    #[error("the runtime has stopped")]
    Stopped,
}

impl From<AudienceError> for RuntimeError {
    fn from(e: AudienceError) -> Self {
        RuntimeError::Audience(e.to_string())
    }
}

impl RuntimeError {
    /// Whether this is a simulated crash (a [`crate::Hooks`] fired).
    pub fn is_crash(&self) -> bool {
        matches!(self, RuntimeError::Crashed(_))
    }
}
