//! Every event kind the engine's users in this workspace write, with how
//! its payload is encoded: the one list the exporter reads (so a portable
//! log shows each JSON payload as JSON), and the one a test holds every
//! simulated run's log against (so a new kind that is not listed fails a
//! test instead of silently exporting as opaque bytes).

use smartmsg_domain::reactions;

/// How an event kind's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// UTF-8 JSON.
    Json,
    /// Bytes of the kind's own format (its module documents it).
    Binary,
    /// Nothing.
    Empty,
}

/// The HTTP service's campaign definition (stream `http-campaigns`).
pub const CAMPAIGN_DEFINED: &str = "CampaignDefined";
/// An audience uploaded through the HTTP service (stream `http-campaigns`).
pub const AUDIENCE_UPLOADED: &str = "AudienceUploaded";
/// A remembered answer to an `Idempotency-Key` (stream `http-idempotency`).
pub const IDEMPOTENT_ANSWER: &str = "IdempotentAnswer";
/// An off-policy evaluation job asked for (stream `http-evaluations`).
pub const EVALUATION_REQUESTED: &str = "EvaluationRequested";
/// An off-policy evaluation job's result (stream `http-evaluations`).
pub const EVALUATION_FINISHED: &str = "EvaluationFinished";

/// Every kind, with its payload encoding. `BatchPlanned` is JSON at schema
/// 1 and binary at [`smartmsg_domain::PLANNED_SCHEMA`] and
/// [`smartmsg_domain::PLANNED_PARTS_SCHEMA`] (the exporter transcodes the
/// binary forms to JSON); it is listed as JSON.
pub const EVENT_KINDS: &[(&str, Payload)] = &[
    // The campaign aggregate (domain).
    ("CampaignCreated", Payload::Json),
    ("CampaignScheduled", Payload::Json),
    ("CampaignStarted", Payload::Json),
    ("CampaignPaused", Payload::Json),
    ("CampaignResumed", Payload::Json),
    ("CampaignCancelled", Payload::Json),
    ("CampaignCompleted", Payload::Json),
    ("BatchPlanned", Payload::Json),
    ("BatchSent", Payload::Json),
    ("ReactionsRecorded", Payload::Json),
    (smartmsg_domain::driver::FEEDBACK_KIND, Payload::Json),
    // The runtime.
    (crate::runtime::REGISTERED, Payload::Json),
    (crate::runtime::USER_REMOVED_KIND, Payload::Json),
    (crate::audience::AUDIENCE_CHUNK, Payload::Binary),
    (crate::ingest::UNROUTED_KIND, Payload::Json),
    (crate::ingest::CURSOR_KIND, Payload::Binary),
    // A campaign's pipeline input (`pipeline-<c>`).
    (crate::pipeline::CAMPAIGN_INFO, Payload::Json),
    (crate::pipeline::BATCH_ANNOUNCED, Payload::Json),
    (crate::pipeline::REACTION, Payload::Json),
    (crate::pipeline::TICK, Payload::Empty),
    // Its outputs: the stream envelope (key and value) of each record.
    (reactions::DEAD_LETTERS, Payload::Binary),
    (reactions::USER_OUTCOMES, Payload::Binary),
    (reactions::REACTION_WINDOWS, Payload::Binary),
    (reactions::LATE_REACTIONS, Payload::Binary),
    // The HTTP service.
    (CAMPAIGN_DEFINED, Payload::Json),
    (AUDIENCE_UPLOADED, Payload::Json),
    (IDEMPOTENT_ANSWER, Payload::Json),
    (EVALUATION_REQUESTED, Payload::Json),
    (EVALUATION_FINISHED, Payload::Json),
];

/// How `kind`'s payload is encoded, `None` for a kind not in
/// [`EVENT_KINDS`].
pub fn payload_of(kind: &str) -> Option<Payload> {
    EVENT_KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, p)| *p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_once() {
        let mut names: Vec<_> = EVENT_KINDS.iter().map(|(k, _)| *k).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a kind is listed twice");
        assert_eq!(payload_of("Tick"), Some(Payload::Empty));
        assert_eq!(payload_of("NoSuchKind"), None);
    }
}
