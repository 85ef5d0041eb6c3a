//! The simulator's own records in the event log, next to the campaign's:
//! the reaction path's commits, its dead letters and the model feedback.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use smartmsg_engine::{NewEvent, RecordedEvent, StreamId};

use crate::error::SimError;
use crate::reaction::WindowResult;

/// Kind of [`PathCommitted`] events.
pub const PATH_COMMITTED: &str = "ReactionPathCommitted";
/// Kind of dead-letter events ([`crate::reaction::DeadLetterOut`]).
pub const DEAD_LETTERED: &str = "ReactionDeadLettered";
/// Kind of [`ModelFed`] events.
pub const MODEL_FED: &str = "ModelFed";
/// Schema of every simulator event kind.
pub const SCHEMA: u16 = 1;

/// One commit of the reaction path: the topic offset it has consumed up
/// to, its state, and the window results it emitted since the previous
/// commit (recorded on the campaign right after, idempotently by command
/// id). Its dead letters are appended in the same transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathCommitted {
    /// 1-based commit number.
    pub commit: u32,
    /// The next topic offset to read.
    pub next_offset: u64,
    /// The path's state.
    pub state: serde_json::Value,
    /// Window results emitted.
    pub windows: Vec<WindowResult>,
    /// Dead letters in the same transaction.
    pub dead_letters: u32,
}

/// The feedback a policy learned from for one batch: every user of the
/// batch, `reacted` the ones whose reaction had been counted when the next
/// batch was planned (the others count as not reacting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFed {
    /// The batch.
    pub batch: u32,
    /// Users of the batch counted as reacting, ascending.
    pub reacted: Vec<u32>,
}

/// The streams of one simulated campaign.
#[derive(Debug, Clone)]
pub struct Streams {
    /// The campaign aggregate.
    pub campaign: StreamId,
    /// Reaction-path commits.
    pub path: StreamId,
    /// Reaction dead letters.
    pub dead_letters: StreamId,
    /// Model feedback.
    pub feedback: StreamId,
}

impl Streams {
    /// The streams of campaign `name`.
    pub fn new(name: &str) -> Result<Self, SimError> {
        Ok(Self {
            campaign: StreamId::new(format!("campaign-{name}"))?,
            path: StreamId::new(format!("reaction-path-{name}"))?,
            dead_letters: StreamId::new(format!("reaction-dead-letters-{name}"))?,
            feedback: StreamId::new(format!("model-feedback-{name}"))?,
        })
    }
}

/// An event of `kind` with `value` as its JSON payload.
pub fn event<T: Serialize>(kind: &str, now_ms: u64, value: &T) -> NewEvent {
    let payload = serde_json::to_vec(value).unwrap_or_default();
    NewEvent::new(kind, SCHEMA, now_ms, Bytes::from(payload))
}

/// Decodes a simulator event's payload.
pub fn decode<T: DeserializeOwned>(e: &RecordedEvent) -> Result<T, SimError> {
    if e.schema != SCHEMA {
        return Err(SimError::Decode {
            kind: e.kind.clone(),
            position: e.position,
            reason: format!("unknown schema {}", e.schema),
        });
    }
    serde_json::from_slice(&e.payload).map_err(|err| SimError::Decode {
        kind: e.kind.clone(),
        position: e.position,
        reason: err.to_string(),
    })
}
