//! [`ChannelSender`]: batches handed to the embedding service in process.

use async_trait::async_trait;
use smartmsg_domain::OutgoingBatch;
use tokio::sync::{mpsc, oneshot};

use super::{SendError, Sender};

/// A batch handed over by a [`ChannelSender`]: acknowledge it once it is
/// delivered (dropping it unacknowledged fails the send, and the runtime
/// hands the batch over again later).
#[derive(Debug)]
pub struct SentBatch {
    /// The batch.
    pub batch: OutgoingBatch,
    ack: oneshot::Sender<()>,
}

impl SentBatch {
    /// The batch is delivered.
    pub fn ack(self) {
        let _ = self.ack.send(());
    }
}

/// Hands each batch to a bounded channel the service reads, and waits for
/// its acknowledgement ([`SentBatch::ack`]). For services that deliver
/// messages themselves ("receive its batches").
#[derive(Debug, Clone)]
pub struct ChannelSender {
    tx: mpsc::Sender<SentBatch>,
    timeout: std::time::Duration,
}

impl ChannelSender {
    /// A sender and the receiving end; at most `capacity` batches wait. A
    /// batch not taken and acknowledged within a minute fails the send
    /// (the runtime tries again later), so a stuck consumer cannot stall
    /// the runtime.
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<SentBatch>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                timeout: std::time::Duration::from_secs(60),
            },
            rx,
        )
    }

    /// Sets how long a send waits for the batch to be taken and
    /// acknowledged.
    pub fn with_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait]
impl Sender for ChannelSender {
    fn name(&self) -> &str {
        "channel"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        let (ack, acked) = oneshot::channel();
        let gone = |what: &str| SendError::Unavailable {
            batch: batch.key(),
            reason: what.to_owned(),
        };
        let handed = async {
            self.tx
                .send(SentBatch {
                    batch: batch.clone(),
                    ack,
                })
                .await
                .map_err(|_| gone("the receiver is gone"))?;
            acked
                .await
                .map_err(|_| gone("the batch was dropped without an acknowledgement"))
        };
        tokio::time::timeout(self.timeout, handed)
            .await
            .map_err(|_| gone("not acknowledged in time"))?
    }
}
