//! The simulator's typed errors.

use std::path::PathBuf;

use smartmsg_domain::{CampaignError, PolicyError, ShapeError};
use smartmsg_embedded::EmbeddedError;
use smartmsg_engine::{AppendError, QueueError, ReadError, RepositoryError, StreamIdError};

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's extension is neither `.toml` nor `.json`.
    #[error("scenario {path}: unknown format; name it *.toml or *.json")]
    Format {
        /// The file.
        path: PathBuf,
    },
    /// The text does not parse, or a field has the wrong type or name.
    #[error("scenario {origin}: {format} error: {message}")]
    Syntax {
        /// Where the text came from.
        origin: String,
        /// TOML or JSON.
        format: &'static str,
        /// The parser's message (with line and column, and the key).
        message: String,
    },
    /// A field's value is out of range or inconsistent.
    #[error("scenario field `{field}`: {reason}")]
    Invalid {
        /// The field, as a dotted path.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Why a population cannot be built, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PopulationError {
    /// A file cannot be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CSV header is wrong.
    #[error("{path}: header: {reason}")]
    Header {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A CSV record is wrong.
    #[error("{path}: line {line}, column {column} ({name}): {reason}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// 1-based column.
        column: usize,
        /// The column's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A CSV record is unreadable as a whole (quoting, field count).
    #[error("{path}: line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// Why.
        reason: String,
    },
    /// The population does not fit the scenario or the domain's limits.
    #[error("population: {0}")]
    Shape(String),
}

/// Why a simulation run failed (an invariant violation is not an error: it
/// is reported in the run's result).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario is invalid.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The population is invalid.
    #[error(transparent)]
    Population(#[from] PopulationError),
    /// An embedded store failed to open.
    #[error("store: {0}")]
    Store(#[from] EmbeddedError),
    /// An append to the event log failed.
    #[error("event log append: {0}")]
    Append(#[from] AppendError),
    /// A read of the event log failed.
    #[error("event log read: {0}")]
    Read(#[from] ReadError),
    /// The delay queue failed.
    #[error("delay queue: {0}")]
    Queue(#[from] QueueError),
    /// A campaign command failed.
    #[error("campaign command {command}: {source}")]
    Command {
        /// The command id.
        command: String,
        /// Why.
        #[source]
        source: Box<RepositoryError<CampaignError>>,
    },
    /// Loading the campaign failed.
    #[error("campaign load: {0}")]
    Load(#[source] Box<RepositoryError<CampaignError>>),
    /// A policy failed.
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// Outcomes or candidates had the wrong shape.
    #[error("shape: {0}")]
    Shape(#[from] ShapeError),
    /// A stream id was refused.
    #[error("stream id: {0}")]
    StreamId(#[from] StreamIdError),
    /// A record the simulator wrote cannot be read back.
    #[error("event {kind} at position {position}: {reason}")]
    Decode {
        /// The event kind.
        kind: String,
        /// Its position.
        position: u64,
        /// Why.
        reason: String,
    },
    /// The campaign runtime failed.
    #[error(transparent)]
    Runtime(#[from] smartmsg_service::RuntimeError),
    /// The data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing a report failed.
    #[error("report {path}: {reason}")]
    Report {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The simulation made no progress (a bug): it names where it stopped.
    #[error("simulation stalled: {0}")]
    Stalled(String),
    /// A worker thread panicked.
    #[error("a simulation thread panicked: {0}")]
    Panicked(String),
    /// An I/O call failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
