//! The log streams of a campaign, and the rules for campaign ids.

use smartmsg_engine::{StreamId, StreamIdError};

use crate::error::RuntimeError;

/// Longest campaign id, in bytes (it goes into stream names, job ids,
/// command ids and idempotency keys, within their 64-byte limits).
pub const MAX_CAMPAIGN_ID: usize = 40;

/// Checks a campaign id: 1 to [`MAX_CAMPAIGN_ID`] bytes of ASCII letters,
/// digits, `-`, `_` and `.`.
pub fn check_campaign_id(id: &str) -> Result<(), RuntimeError> {
    let bad = |reason: &str| RuntimeError::BadCampaignId {
        id: id.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    if id.is_empty() {
        return Err(bad("empty"));
    }
    if id.len() > MAX_CAMPAIGN_ID {
        return Err(bad("longer than 40 bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(bad("allowed: ASCII letters, digits, '-', '_' and '.'"));
    }
    if id.bytes().all(|b| b == b'.') {
        return Err(bad("'.' and '..' name directories"));
    }
    Ok(())
}

/// Registrations of the runtime's campaigns.
pub const REGISTRY: &str = "runtime-campaigns";
/// Reaction messages no campaign of the runtime could take.
pub const UNROUTED: &str = "reactions-unrouted";

/// The streams one campaign uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignStreams {
    /// The campaign aggregate.
    pub campaign: StreamId,
    /// Its audience (chunks).
    pub audience: StreamId,
    /// The reaction pipeline's input: campaign info, announced batches,
    /// raw reactions, ticks.
    pub pipeline: StreamId,
    /// Recorded model feedback.
    pub feedback: StreamId,
    /// Pipeline output: closed windows.
    pub windows: StreamId,
    /// Pipeline output: first reactions per user.
    pub outcomes: StreamId,
    /// Pipeline output: reactions after their window closed.
    pub late: StreamId,
    /// Pipeline output: dead letters with their reason.
    pub dead_letters: StreamId,
}

impl CampaignStreams {
    /// The prefix of a campaign aggregate's stream (`campaign-<id>`).
    pub const CAMPAIGN_PREFIX: &'static str = "campaign-";

    /// The streams of campaign `id`.
    pub fn new(id: &str) -> Result<Self, StreamIdError> {
        let s = |p: &str| StreamId::new(format!("{p}-{id}"));
        Ok(Self {
            campaign: StreamId::new(format!("{}{id}", Self::CAMPAIGN_PREFIX))?,
            audience: s("audience")?,
            pipeline: s("pipeline")?,
            feedback: s("model-feedback")?,
            windows: s(smartmsg_domain::reactions::REACTION_WINDOWS)?,
            outcomes: s(smartmsg_domain::reactions::USER_OUTCOMES)?,
            late: s(smartmsg_domain::reactions::LATE_REACTIONS)?,
            dead_letters: s(smartmsg_domain::reactions::DEAD_LETTERS)?,
        })
    }

    /// The campaign whose aggregate `stream` holds, if it is one
    /// (`campaign-<id>`).
    pub fn campaign_of(stream: &str) -> Option<&str> {
        stream.strip_prefix(Self::CAMPAIGN_PREFIX)
    }

    /// The stream a pipeline output named `output` goes to.
    pub fn output_stream(id: &str, output: &str) -> String {
        format!("{output}-{id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_and_streams_fit() {
        assert!(check_campaign_id("spring-sale_2026.v2").is_ok());
        for bad in ["", "a b", "ü", &"x".repeat(41), "a/b", ".", ".."] {
            assert!(check_campaign_id(bad).is_err(), "{bad:?}");
        }
        let s = CampaignStreams::new(&"x".repeat(MAX_CAMPAIGN_ID)).unwrap();
        assert!(s.outcomes.as_str().starts_with("reaction-user-outcomes-"));
    }
}
