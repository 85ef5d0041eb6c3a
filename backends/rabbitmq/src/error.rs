//! This backend's own errors (reached through
//! [`QueueError::Backend`] and
//! [`BackendError::downcast_ref`](smartmsg_engine::BackendError::downcast_ref)).

use std::time::Duration;

use smartmsg_engine::{BackendError, QueueError};

/// A failure talking to RabbitMQ, or a bad configuration.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RabbitError {
    /// The AMQP client or the broker reported an error.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The connection is down; the queue is reconnecting in the background.
    #[error("not connected to RabbitMQ (reconnecting in the background)")]
    Disconnected,
    /// The broker refused (nacked) a publish.
    #[error("RabbitMQ nacked a publish to queue {queue}")]
    PublishNacked {
        /// The target queue.
        queue: String,
    },
    /// The broker could not route a publish (the queue does not exist).
    #[error("RabbitMQ could not route a publish to queue {queue} (was it deleted?)")]
    Unroutable {
        /// The target queue.
        queue: String,
    },
    /// The configuration is invalid.
    #[error("invalid RabbitMQ delay queue configuration: {0}")]
    Config(String),
    /// A step did not finish in time.
    #[error("{what} did not finish within {limit:?}")]
    Timeout {
        /// What timed out.
        what: &'static str,
        /// The limit.
        limit: Duration,
    },
    /// An existing queue was declared with other arguments (for instance
    /// another `base_ms` or `levels` under the same prefix).
    #[error("queue {queue} exists with different arguments: {detail}")]
    TopologyMismatch {
        /// The queue.
        queue: String,
        /// What the broker said.
        detail: String,
    },
}

impl From<RabbitError> for QueueError {
    fn from(e: RabbitError) -> Self {
        QueueError::Backend(BackendError::new(e))
    }
}
