//! The `Sender` port: where planned messages go.
//!
//! A [`Sender`] delivers an [`OutgoingBatch`] at least once and returns only
//! once its destination acknowledged all of it. The runtime records the
//! batch as sent (a `BatchSent` event) only after that, and hands a batch
//! over again after a crash or a failure, with the same message ids and the
//! same content, so a receiver can drop repeats by id.
//!
//! Implementations: [`OutboxSender`] (one JSON Lines file per batch, written
//! atomically), [`WebhookSender`] (HTTP POST with retries and idempotency
//! keys), [`ChannelSender`] (an in-process channel the service reads), and
//! in `smartmsg-kafka` a Kafka topic. [`check_sender`] is the conformance
//! test every implementation can run against its own destination.

mod channel;
mod outbox;
mod webhook;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smartmsg_domain::OutgoingBatch;

pub use channel::{ChannelSender, SentBatch};
pub use outbox::OutboxSender;
pub use webhook::{WebhookConfig, WebhookRequest, WebhookSender};

/// Why a batch was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The destination refused the batch and will refuse it again (a 4xx
    /// answer, a batch it cannot take). The runtime keeps the batch unsent
    /// and reports it; retrying later is still allowed (an operator may fix
    /// the destination).
    #[error("the destination refused batch {batch}: {reason}")]
    Rejected {
        /// The batch's key.
        batch: String,
        /// Why.
        reason: String,
    },
    /// The destination could not be reached or failed (timeouts, 5xx, a
    /// full disk), after the sender's own retries. The runtime tries again
    /// later.
    #[error("the destination is unavailable for batch {batch}: {reason}")]
    Unavailable {
        /// The batch's key.
        batch: String,
        /// Why.
        reason: String,
    },
}

/// Where planned messages go. See the [module docs](self).
#[async_trait]
pub trait Sender: Send + Sync {
    /// A short name for logs and metrics.
    fn name(&self) -> &str;

    /// Delivers every message of `batch`, at least once; returns once the
    /// destination acknowledged all of them. Must be safe to call again with
    /// the same batch (the same ids and content).
    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError>;
}

/// One message as senders write it (a JSON object; a JSON Lines row in the
/// outbox, an element of `messages` in a webhook request, a Kafka value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Stable id: `<campaign>/<batch>/<user>`.
    pub id: String,
    /// The campaign.
    pub campaign: String,
    /// The channel the campaign sends through.
    pub channel: String,
    /// The batch.
    pub batch: u32,
    /// The user.
    pub user: u32,
    /// The creative's index in the campaign.
    pub creative: u16,
    /// The creative's reference.
    pub creative_ref: String,
}

impl MessageRecord {
    /// The reaction message reporting that this message's user reacted
    /// with `kind` at `time_ms` (what a channel sends back; see
    /// [`smartmsg_domain::reactions::ReactionMessage`]).
    pub fn reaction(
        &self,
        kind: smartmsg_domain::reactions::ReactionKind,
        time_ms: u64,
    ) -> bytes::Bytes {
        let m = smartmsg_domain::reactions::ReactionMessage {
            campaign: self.campaign.clone(),
            batch: self.batch,
            user: self.user,
            creative: self.creative,
            reaction: kind,
            time_ms,
        };
        bytes::Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
    }
}

/// The messages of `batch` as records, in decision order.
pub fn records(batch: &OutgoingBatch) -> impl Iterator<Item = MessageRecord> + '_ {
    batch
        .messages()
        .map(move |(user, creative, creative_ref)| MessageRecord {
            id: batch.message_id(user),
            campaign: batch.campaign.clone(),
            channel: batch.channel.clone(),
            batch: batch.batch,
            user,
            creative,
            creative_ref: creative_ref.to_owned(),
        })
}

/// Appends `batch`'s messages to `out` as JSON Lines.
pub fn write_json_lines(batch: &OutgoingBatch, out: &mut Vec<u8>) {
    out.reserve(batch.len() * 96);
    for r in records(batch) {
        // Plain data into a vector: cannot fail.
        let _ = serde_json::to_writer(&mut *out, &r);
        out.push(b'\n');
    }
}

/// What [`check_sender`] needs from a destination: everything it received,
/// as message records, in the order received (repeats included).
pub type Received = Vec<MessageRecord>;

/// The sender conformance test: sends two batches, one of them twice (as
/// after a crash), and checks what the destination received (`read`
/// returns every record received so far): every message at least once,
/// each id always with the same content, ids unique per (campaign, batch,
/// user), an empty batch acknowledged. Returns a description of the first
/// failure.
pub async fn check_sender<R, F>(sender: &dyn Sender, read: R) -> Result<(), String>
where
    R: Fn() -> F,
    F: std::future::Future<Output = Received>,
{
    use std::collections::HashMap;
    use std::sync::Arc;

    use smartmsg_domain::Decisions;

    let mut d0 = Decisions::default();
    for u in [5u32, 9, 13, 2] {
        d0.push(u, (u % 2) as u16, 0.5);
    }
    let mut d1 = Decisions::default();
    for u in [7u32, 1] {
        d1.push(u, 1, 0.25);
    }
    let creatives = Arc::new(vec!["red".to_owned(), "blue".to_owned()]);
    let batch = |b: u32, decisions: Decisions| OutgoingBatch {
        campaign: "conf-c1".into(),
        channel: "conformance".into(),
        batch: b,
        creatives: Arc::clone(&creatives),
        decisions,
    };
    let b0 = batch(0, d0);
    let b1 = batch(1, d1);
    let empty = batch(2, Decisions::default());
    for b in [&b0, &b1, &b0, &empty] {
        sender
            .send(b)
            .await
            .map_err(|e| format!("{}: send failed: {e}", sender.name()))?;
    }
    let got = read().await;
    let want: Vec<MessageRecord> = records(&b0).chain(records(&b1)).collect();
    let mut by_id: HashMap<&str, &MessageRecord> = HashMap::new();
    for r in &got {
        if let Some(prev) = by_id.insert(&r.id, r) {
            if prev != r {
                return Err(format!(
                    "id {} came with two contents: {prev:?} / {r:?}",
                    r.id
                ));
            }
        }
    }
    for w in &want {
        match by_id.get(w.id.as_str()) {
            None => return Err(format!("message {} never arrived", w.id)),
            Some(r) if *r != w => {
                return Err(format!("message {} arrived as {r:?}, sent {w:?}", w.id))
            }
            Some(_) => {}
        }
    }
    if by_id.len() != want.len() {
        return Err(format!(
            "{} distinct messages arrived; {} were sent",
            by_id.len(),
            want.len()
        ));
    }
    Ok(())
}
