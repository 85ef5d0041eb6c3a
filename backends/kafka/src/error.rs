//! The Kafka backend's typed errors.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What went wrong in the Kafka backend. Reaches callers of the engine's
/// traits inside [`smartmsg_engine::BackendError`]; downcast to match on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaLogError {
    /// A configuration value is out of range.
    #[error("bad configuration: {0}")]
    Config(String),
    /// A call into librdkafka failed.
    #[error("kafka {op}: {source}")]
    Kafka {
        /// What was being done (`create producer`, `init_transactions`, …).
        op: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The events topic exists with another partition count than the log was
    /// configured for. Streams are hashed over the partition count, so it
    /// must never change under a log.
    #[error("topic {topic} has {actual} partitions; the log is configured for {expected}")]
    PartitionCount {
        /// The topic.
        topic: String,
        /// Partitions configured.
        expected: u32,
        /// Partitions the broker reports.
        actual: u32,
    },
    /// A partition no longer starts at offset 0: retention or compaction
    /// deleted events, which an event log can never allow.
    #[error(
        "topic {topic} partition {partition} starts at offset {low}: records were deleted \
         (the events topic needs infinite retention and no compaction)"
    )]
    DataDeleted {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// Its first remaining offset.
        low: i64,
    },
    /// A record that cannot be this log's, or a set of records that
    /// contradict each other. Never skipped silently.
    #[error("corrupt log: topic {topic} partition {partition} offset {offset}: {reason}")]
    Corrupt {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
        /// What check failed.
        reason: String,
    },
    /// A broker operation did not finish in time.
    #[error("timed out after {after_ms} ms: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long, in milliseconds.
        after_ms: u64,
    },
    /// Another writer initialised the same transactional id: this handle
    /// may no longer append (reads of what it had still work).
    #[error("fenced: another writer owns this log")]
    Fenced,
    /// The writer aborted the Kafka transaction (nothing of it is
    /// committed) for the reason given.
    #[error("kafka transaction aborted: {0}")]
    Aborted(String),
    /// An earlier Kafka transaction ended in a state whose outcome is
    /// unknown or the producer failed fatally; the log refuses appends until
    /// it is reopened (the rebuild then decides what committed).
    #[error("log is poisoned by an earlier failure ({0}); reopen it")]
    Poisoned(String),
}

impl KafkaLogError {
    pub(crate) fn kafka(op: &'static str, source: KafkaError) -> Self {
        KafkaLogError::Kafka { op, source }
    }
}

/// Whether `e` says a newer producer with the same transactional id fenced
/// this one. Apache Kafka reports fencing as a fatal error; tansu reports
/// `ProducerFenced` as an abortable one; both count.
pub(crate) fn is_fenced(e: &KafkaError) -> bool {
    let code = match e {
        KafkaError::Transaction(t) => Some(t.code()),
        other => other.rdkafka_error_code(),
    };
    matches!(
        code,
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::TransactionCoordinatorFenced
        )
    )
}
