//! What a campaign records, and how it is written to the log.
//!
//! Each event kind's payload is its own JSON object (the kind names it, so
//! the payload carries no tag), at [`SCHEMA`] 1, except `BatchPlanned`,
//! written at [`PLANNED_SCHEMA`] 2 (a batch in one part) or
//! [`PLANNED_PARTS_SCHEMA`] 3 (one part of a larger batch) in the binary
//! layout of [`super::planned`] (most of a log's bytes are planned
//! decisions). Its schema 1 (JSON) payloads, in logs written before, still
//! decode: the decoder reads all three, so no upcaster is needed.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use smartmsg_engine::{DecodeError, EventCodec};

use super::planned::Part;
use super::types::{CampaignSpec, CommandStamp};
use crate::data::Decisions;

/// The schema campaign event kinds are written at (JSON), all but
/// `BatchPlanned`.
pub const SCHEMA: u16 = 1;

/// The schema `BatchPlanned` is written at for a batch in one part: the
/// binary layout of [`super::planned`]. Schema 1 (JSON) still decodes.
pub const PLANNED_SCHEMA: u16 = 2;

/// The schema of one part of a batch recorded in several
/// ([`super::planned::Part`]): [`PLANNED_SCHEMA`]'s layout with the part's
/// index and count.
pub const PLANNED_PARTS_SCHEMA: u16 = 3;

/// An event of the campaign's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum CampaignEvent {
    /// `CampaignCreated`: the campaign exists, in draft.
    Created {
        /// The command.
        command: CommandStamp,
        /// What it was created with.
        spec: CampaignSpec,
    },
    /// `CampaignScheduled`: draft → scheduled.
    Scheduled {
        /// The command.
        command: CommandStamp,
    },
    /// `CampaignStarted`: scheduled → running.
    Started {
        /// The command.
        command: CommandStamp,
    },
    /// `CampaignPaused`: running → paused.
    Paused {
        /// The command.
        command: CommandStamp,
    },
    /// `CampaignResumed`: paused → running.
    Resumed {
        /// The command.
        command: CommandStamp,
    },
    /// `CampaignCancelled`: → cancelled.
    Cancelled {
        /// The command.
        command: CommandStamp,
        /// Why.
        reason: String,
    },
    /// `CampaignCompleted`: → completed.
    Completed {
        /// The command.
        command: CommandStamp,
    },
    /// `BatchPlanned`: the recorded decisions of one batch, or of one part
    /// of it: a batch above [`super::planned::MAX_PART_DECISIONS`] is
    /// recorded as several events, its parts in order, appended in one
    /// transaction; a reader joins their decisions. Replay applies them; it
    /// never re-runs the policy.
    BatchPlanned {
        /// The command.
        command: CommandStamp,
        /// The batch number.
        batch: u32,
        /// Which part of the batch this is ([`Part::WHOLE`] for a batch in
        /// one event).
        part: Part,
        /// The policy that decided.
        policy: String,
        /// Users, creatives and propensities.
        decisions: Decisions,
    },
    /// `BatchSent`: the batch is committed for delivery.
    BatchSent {
        /// The command.
        command: CommandStamp,
        /// The batch number.
        batch: u32,
    },
    /// `ReactionsRecorded`: reactions of one aggregation window.
    ReactionsRecorded {
        /// The command.
        command: CommandStamp,
        /// The window's start (ms).
        window_start_ms: u64,
        /// Reacting users per creative.
        reactions: Vec<u32>,
    },
}

impl CampaignEvent {
    /// The command this event came from.
    pub fn command(&self) -> &CommandStamp {
        match self {
            CampaignEvent::Created { command, .. }
            | CampaignEvent::Scheduled { command }
            | CampaignEvent::Started { command }
            | CampaignEvent::Paused { command }
            | CampaignEvent::Resumed { command }
            | CampaignEvent::Cancelled { command, .. }
            | CampaignEvent::Completed { command }
            | CampaignEvent::BatchPlanned { command, .. }
            | CampaignEvent::BatchSent { command, .. }
            | CampaignEvent::ReactionsRecorded { command, .. } => command,
        }
    }
}

// Payload shapes, one per kind (borrowed for encoding, owned for decoding).

#[derive(Serialize, Deserialize)]
struct CreatedV1<S> {
    command: CommandStamp,
    spec: S,
}

#[derive(Serialize, Deserialize)]
struct StampOnlyV1 {
    command: CommandStamp,
}

#[derive(Serialize, Deserialize)]
struct CancelledV1<S> {
    command: CommandStamp,
    reason: S,
}

#[derive(Serialize, Deserialize)]
struct BatchPlannedV1<S, D> {
    command: CommandStamp,
    batch: u32,
    policy: S,
    decisions: D,
}

#[derive(Serialize, Deserialize)]
struct BatchSentV1 {
    command: CommandStamp,
    batch: u32,
}

#[derive(Serialize, Deserialize)]
struct ReactionsV1<R> {
    command: CommandStamp,
    window_start_ms: u64,
    reactions: R,
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    // Plain data (strings, integers, finite-or-null floats) always
    // serialises; an empty payload would be refused on decode, not here.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

fn parse<T: DeserializeOwned>(kind: &str, schema: u16, payload: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError::BadPayload {
        kind: kind.to_owned(),
        schema,
        reason: e.to_string(),
    })
}

impl EventCodec for CampaignEvent {
    fn kind(&self) -> &'static str {
        match self {
            CampaignEvent::Created { .. } => "CampaignCreated",
            CampaignEvent::Scheduled { .. } => "CampaignScheduled",
            CampaignEvent::Started { .. } => "CampaignStarted",
            CampaignEvent::Paused { .. } => "CampaignPaused",
            CampaignEvent::Resumed { .. } => "CampaignResumed",
            CampaignEvent::Cancelled { .. } => "CampaignCancelled",
            CampaignEvent::Completed { .. } => "CampaignCompleted",
            CampaignEvent::BatchPlanned { .. } => "BatchPlanned",
            CampaignEvent::BatchSent { .. } => "BatchSent",
            CampaignEvent::ReactionsRecorded { .. } => "ReactionsRecorded",
        }
    }

    fn schema(&self) -> u16 {
        match self {
            CampaignEvent::BatchPlanned { part, .. } => part.schema(),
            _ => SCHEMA,
        }
    }

    fn encode(&self) -> Bytes {
        match self {
            CampaignEvent::Created { command, spec } => to_bytes(&CreatedV1 {
                command: command.clone(),
                spec,
            }),
            CampaignEvent::Scheduled { command }
            | CampaignEvent::Started { command }
            | CampaignEvent::Paused { command }
            | CampaignEvent::Resumed { command }
            | CampaignEvent::Completed { command } => to_bytes(&StampOnlyV1 {
                command: command.clone(),
            }),
            CampaignEvent::Cancelled { command, reason } => to_bytes(&CancelledV1 {
                command: command.clone(),
                reason,
            }),
            CampaignEvent::BatchPlanned {
                command,
                batch,
                part,
                policy,
                decisions,
            } => Bytes::from(super::planned::encode(
                command, *batch, *part, policy, decisions,
            )),
            CampaignEvent::BatchSent { command, batch } => to_bytes(&BatchSentV1 {
                command: command.clone(),
                batch: *batch,
            }),
            CampaignEvent::ReactionsRecorded {
                command,
                window_start_ms,
                reactions,
            } => to_bytes(&ReactionsV1 {
                command: command.clone(),
                window_start_ms: *window_start_ms,
                reactions,
            }),
        }
    }

    fn decode(kind: &str, schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        let known = matches!(
            kind,
            "CampaignCreated"
                | "CampaignScheduled"
                | "CampaignStarted"
                | "CampaignPaused"
                | "CampaignResumed"
                | "CampaignCancelled"
                | "CampaignCompleted"
                | "BatchPlanned"
                | "BatchSent"
                | "ReactionsRecorded"
        );
        if !known {
            return Err(DecodeError::UnknownKind { kind: kind.into() });
        }
        if kind == "BatchPlanned" && (schema == PLANNED_SCHEMA || schema == PLANNED_PARTS_SCHEMA) {
            let p = super::planned::decode(schema, payload).map_err(|reason| {
                DecodeError::BadPayload {
                    kind: kind.to_owned(),
                    schema,
                    reason,
                }
            })?;
            return Ok(CampaignEvent::BatchPlanned {
                command: p.command,
                batch: p.batch,
                part: p.part,
                policy: p.policy,
                decisions: p.decisions,
            });
        }
        if schema != SCHEMA {
            return Err(DecodeError::UnknownSchema {
                kind: kind.into(),
                schema,
            });
        }
        let stamp = |p: StampOnlyV1| p.command;
        Ok(match kind {
            "CampaignCreated" => {
                let p: CreatedV1<CampaignSpec> = parse(kind, schema, payload)?;
                CampaignEvent::Created {
                    command: p.command,
                    spec: p.spec,
                }
            }
            "CampaignScheduled" => CampaignEvent::Scheduled {
                command: stamp(parse(kind, schema, payload)?),
            },
            "CampaignStarted" => CampaignEvent::Started {
                command: stamp(parse(kind, schema, payload)?),
            },
            "CampaignPaused" => CampaignEvent::Paused {
                command: stamp(parse(kind, schema, payload)?),
            },
            "CampaignResumed" => CampaignEvent::Resumed {
                command: stamp(parse(kind, schema, payload)?),
            },
            "CampaignCompleted" => CampaignEvent::Completed {
                command: stamp(parse(kind, schema, payload)?),
            },
            "CampaignCancelled" => {
                let p: CancelledV1<String> = parse(kind, schema, payload)?;
                CampaignEvent::Cancelled {
                    command: p.command,
                    reason: p.reason,
                }
            }
            "BatchPlanned" => {
                let p: BatchPlannedV1<String, Decisions> = parse(kind, schema, payload)?;
                CampaignEvent::BatchPlanned {
                    command: p.command,
                    batch: p.batch,
                    part: Part::WHOLE,
                    policy: p.policy,
                    decisions: p.decisions,
                }
            }
            "BatchSent" => {
                let p: BatchSentV1 = parse(kind, schema, payload)?;
                CampaignEvent::BatchSent {
                    command: p.command,
                    batch: p.batch,
                }
            }
            "ReactionsRecorded" => {
                let p: ReactionsV1<Vec<u32>> = parse(kind, schema, payload)?;
                CampaignEvent::ReactionsRecorded {
                    command: p.command,
                    window_start_ms: p.window_start_ms,
                    reactions: p.reactions,
                }
            }
            _ => return Err(DecodeError::UnknownKind { kind: kind.into() }),
        })
    }
}
