//! The reaction pipeline, as a stream [`Topology`].
//!
//! Channels report what happened to each message as *reaction messages*
//! (JSON, see [`ReactionMessage`]): delivered, opened, clicked, replied,
//! unsubscribed. The pipeline ([`reaction_topology`]):
//!
//! 1. **parses** each message ([`parse_reaction`]); anything invalid — not
//!    JSON, a missing or mistyped field, too large — goes to the
//!    dead-letter output [`DEAD_LETTERS`] with a typed [`DeadReason`];
//! 2. **validates** it against the campaign table (fed by [`INPUT_CAMPAIGNS`]
//!    with [`CampaignInfo`]): an unknown campaign, a creative the campaign
//!    does not have, or a time outside the campaign are dead letters too;
//! 3. **joins** it with the user table (fed by the user-profile stream
//!    [`INPUT_PROFILES`]) to get the user's features and feature bucket; a
//!    user without a profile is a dead letter;
//! 4. **deduplicates** per (campaign, user): a user counts once as
//!    delivered and once as reacted, however many messages repeat it; the
//!    first time is sent to [`USER_OUTCOMES`] (the per-user outcome view
//!    [`user_outcome_projection`] is built from it);
//! 5. **aggregates** per (campaign, creative, feature bucket) in one-minute
//!    tumbling windows with a grace period (one window entry per campaign
//!    holding its cells, so a closed window yields the campaign's complete
//!    result); late reactions go to [`LATE_REACTIONS`];
//! 6. each **closed window** goes to [`REACTION_WINDOWS`] as a
//!    [`ReactionWindow`], which gives the campaign's
//!    [`Action::RecordReactions`] command
//!    ([`ReactionWindow::record_reactions`]) and the model's [`Outcomes`]
//!    ([`ReactionWindow::outcomes`], for [`crate::Policy::update`]).
//!
//! Everything is pure: tests run it with the engine's `TestDriver`, and a
//! service runs it with a `StreamRunner` over the event log (exactly once).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_engine::stream::{
    envelope, EmitStrategy, Json, StateCodec, Topology, WindowError, Windowed, Windows,
};
use smartmsg_engine::{InMemoryProjection, InMemoryReadModel, ProjectionError, RecordedEvent};

use crate::campaign::{Action, CampaignCommand, CampaignSpec};
use crate::data::{Outcomes, ShapeError};

/// Input: raw reaction messages (value: the JSON bytes; key: ignored).
pub const INPUT_REACTIONS: &str = "Reaction";
/// Input: user profiles (value: [`UserProfile`] JSON bytes; key: ignored).
pub const INPUT_PROFILES: &str = "UserProfile";
/// Input: campaigns (key: campaign id; value: [`CampaignInfo`]).
pub const INPUT_CAMPAIGNS: &str = "CampaignInfo";
/// Output: dead letters (key: the campaign id when known, else empty;
/// value: [`DeadLetter`]).
pub const DEAD_LETTERS: &str = "reaction-dead-letters";
/// Output: first delivery / first reaction per (campaign, user) (key:
/// `(campaign, user)`; value: [`UserReaction`]).
pub const USER_OUTCOMES: &str = "reaction-user-outcomes";
/// Output: closed windows (key: `Windowed<campaign>`; value:
/// [`ReactionWindow`]).
pub const REACTION_WINDOWS: &str = "reaction-windows";
/// Output: reactions that arrived after their window closed.
pub const LATE_REACTIONS: &str = "reaction-late";
/// Store: the campaign table.
pub const STORE_CAMPAIGNS: &str = "reaction-campaigns";
/// Store: the user table.
pub const STORE_USERS: &str = "reaction-users";
/// Store: per (campaign, user) what was counted.
pub const STORE_SEEN: &str = "reaction-seen";
/// Store: the open windows.
pub const STORE_WINDOWS: &str = "reaction-window-cells";

/// Largest reaction or profile message accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 << 10;
/// Longest campaign id accepted, in bytes.
pub const MAX_CAMPAIGN_ID: usize = 256;
/// Bytes of an invalid message kept in its dead letter.
pub const DEAD_LETTER_EXCERPT: usize = 512;

/// What a channel reports about a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReactionKind {
    /// The message reached the user (a trial).
    Delivered,
    /// The user opened it.
    Opened,
    /// The user clicked (a success).
    Clicked,
    /// The user replied (a success).
    Replied,
    /// The user unsubscribed.
    Unsubscribed,
}

impl ReactionKind {
    /// Whether it counts as the user reacting (a success for the models).
    pub fn is_success(self) -> bool {
        matches!(self, ReactionKind::Clicked | ReactionKind::Replied)
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "delivered" => Self::Delivered,
            "opened" => Self::Opened,
            "clicked" => Self::Clicked,
            "replied" => Self::Replied,
            "unsubscribed" => Self::Unsubscribed,
            _ => return None,
        })
    }
}

/// A reaction message, as channels send it:
///
/// ```json
/// {"campaign": "c-1", "batch": 0, "user": 42, "creative": 1,
///  "reaction": "clicked", "time_ms": 1700000000000}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionMessage {
    /// The campaign id.
    pub campaign: String,
    /// The batch the message was sent in.
    pub batch: u32,
    /// The user.
    pub user: u32,
    /// The creative (index into the campaign's creatives).
    pub creative: u16,
    /// What happened.
    pub reaction: ReactionKind,
    /// When it happened (ms since the Unix epoch).
    pub time_ms: u64,
}

/// Why a message went to the dead-letter output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeadReason {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message is {len} bytes; the limit is {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON (or not UTF-8).
    #[error("not JSON: {detail}")]
    NotJson {
        /// The parser's message.
        detail: String,
    },
    /// Valid JSON but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A required field is absent (or null).
    #[error("missing field {field:?}")]
    MissingField {
        /// The field.
        field: String,
    },
    /// A field has the wrong type or an out-of-range value.
    #[error("field {field:?}: {detail}")]
    BadField {
        /// The field.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// No campaign of this id is known.
    #[error("unknown campaign {campaign:?}")]
    UnknownCampaign {
        /// The id.
        campaign: String,
    },
    /// The reaction's time is outside the campaign's time range.
    #[error("time {time_ms} is outside the campaign ({start_ms}..={end_ms})")]
    OutsideCampaign {
        /// The reaction's time.
        time_ms: u64,
        /// The campaign's start.
        start_ms: u64,
        /// The campaign's end (last batch plus the reaction horizon).
        end_ms: u64,
    },
    /// The creative index is beyond the campaign's creatives.
    #[error("creative {creative}; the campaign has {creatives}")]
    UnknownCreative {
        /// The index.
        creative: u16,
        /// Creatives in the campaign.
        creatives: u16,
    },
    /// The batch is beyond the campaign's batches.
    #[error("batch {batch}; the campaign has {batches}")]
    UnknownBatch {
        /// The batch.
        batch: u32,
        /// Batches in the campaign.
        batches: u32,
    },
    /// No profile is known for the user.
    #[error("no profile for user {user}")]
    UnknownUser {
        /// The user.
        user: u32,
    },
    /// The user's profile says which message they got, and the reaction
    /// names another batch or creative.
    #[error("user {user} got creative {planned_creative} in batch {planned_batch}, not creative {creative} in batch {batch}")]
    NotPlanned {
        /// The user.
        user: u32,
        /// The batch the reaction names.
        batch: u32,
        /// The creative the reaction names.
        creative: u16,
        /// The batch the user was messaged in.
        planned_batch: u32,
        /// The creative the user got.
        planned_creative: u16,
    },
    /// The user's features do not have the campaign's dimension.
    #[error("user {user} has {got} features; the pipeline expects {dim}")]
    FeatureDimension {
        /// The user.
        user: u32,
        /// Features given.
        got: usize,
        /// The configured dimension.
        dim: usize,
    },
}

/// A message that could not be processed, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Which input it came from.
    pub input: String,
    /// Why it was refused.
    pub reason: DeadReason,
    /// The start of the message (at most [`DEAD_LETTER_EXCERPT`] bytes,
    /// lossy UTF-8).
    pub excerpt: String,
}

impl DeadLetter {
    fn new(input: &str, reason: DeadReason, raw: &[u8]) -> Self {
        let end = raw.len().min(DEAD_LETTER_EXCERPT);
        Self {
            input: input.to_owned(),
            reason,
            excerpt: String::from_utf8_lossy(&raw[..end]).into_owned(),
        }
    }
}

fn object(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, DeadReason> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DeadReason::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| DeadReason::NotJson {
        detail: e.to_string(),
    })?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        _ => Err(DeadReason::NotAnObject),
    }
}

fn field<'a>(
    m: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<&'a serde_json::Value, DeadReason> {
    match m.get(name) {
        None | Some(serde_json::Value::Null) => Err(DeadReason::MissingField {
            field: name.to_owned(),
        }),
        Some(v) => Ok(v),
    }
}

fn bad(field: &str, detail: impl Into<String>) -> DeadReason {
    DeadReason::BadField {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

fn uint(
    m: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    max: u64,
) -> Result<u64, DeadReason> {
    let v = field(m, name)?;
    let n = v
        .as_u64()
        .ok_or_else(|| bad(name, format!("expected a non-negative integer, got {v}")))?;
    if n > max {
        return Err(bad(name, format!("{n} is above {max}")));
    }
    Ok(n)
}

/// Parses a reaction message. Never panics; every refusal is a typed
/// [`DeadReason`]. Fields other than the six above are skipped, not
/// validated.
pub fn parse_reaction(bytes: &[u8]) -> Result<ReactionMessage, DeadReason> {
    // The common case, a well-formed message, straight into a struct; any
    // doubt goes the careful way below, which names what is wrong.
    #[derive(Deserialize)]
    struct Fast<'a> {
        #[serde(borrow)]
        campaign: std::borrow::Cow<'a, str>,
        batch: u32,
        user: u32,
        creative: u16,
        #[serde(borrow)]
        reaction: std::borrow::Cow<'a, str>,
        time_ms: u64,
    }
    if bytes.len() <= MAX_MESSAGE_BYTES {
        if let Ok(f) = serde_json::from_slice::<Fast<'_>>(bytes) {
            if let Some(reaction) = ReactionKind::parse(&f.reaction) {
                if !f.campaign.is_empty() && f.campaign.len() <= MAX_CAMPAIGN_ID {
                    return Ok(ReactionMessage {
                        campaign: f.campaign.into_owned(),
                        batch: f.batch,
                        user: f.user,
                        creative: f.creative,
                        reaction,
                        time_ms: f.time_ms,
                    });
                }
            }
        }
    }
    parse_reaction_checked(bytes)
}

/// The careful parse: every field checked, every refusal named.
fn parse_reaction_checked(bytes: &[u8]) -> Result<ReactionMessage, DeadReason> {
    let m = object(bytes)?;
    let campaign = match field(&m, "campaign")? {
        serde_json::Value::String(s) if !s.is_empty() && s.len() <= MAX_CAMPAIGN_ID => s.clone(),
        serde_json::Value::String(s) => {
            return Err(bad(
                "campaign",
                format!("length {} is outside 1..={MAX_CAMPAIGN_ID}", s.len()),
            ))
        }
        v => return Err(bad("campaign", format!("expected a string, got {v}"))),
    };
    let batch = uint(&m, "batch", u64::from(u32::MAX))? as u32;
    let user = uint(&m, "user", u64::from(u32::MAX))? as u32;
    let creative = uint(&m, "creative", u64::from(u16::MAX))? as u16;
    let reaction = match field(&m, "reaction")? {
        serde_json::Value::String(s) => ReactionKind::parse(s)
            .ok_or_else(|| bad("reaction", format!("unknown reaction {s:?}")))?,
        v => return Err(bad("reaction", format!("expected a string, got {v}"))),
    };
    let time_ms = uint(&m, "time_ms", u64::MAX)?;
    Ok(ReactionMessage {
        campaign,
        batch,
        user,
        creative,
        reaction,
        time_ms,
    })
}

/// A user's profile, as the profile stream carries it:
/// `{"user": 42, "features": [0.5, -1.0, 2.0]}`, optionally with the
/// message the user got (`"batch": 3, "creative": 1`): then a reaction
/// naming another batch or creative is a dead letter
/// ([`DeadReason::NotPlanned`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    /// The user.
    pub user: u32,
    /// The user's features (the models' dimension).
    pub features: Vec<f32>,
    /// The batch the user was messaged in, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// The creative the user got, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creative: Option<u16>,
}

/// A message of the profile input: a profile to set, or a user whose
/// profile is removed (`{"user": 7, "removed": true}`: the user's data was
/// deleted; later reactions of theirs find no profile).
#[derive(Debug, Clone, PartialEq)]
pub enum ProfileChange {
    /// Set (or replace) the user's profile.
    Set(UserProfile),
    /// Remove the user's profile.
    Remove(u32),
}

/// The profile-input message removing `user`'s profile.
pub fn profile_removal(user: u32) -> Bytes {
    Bytes::from(format!("{{\"user\":{user},\"removed\":true}}"))
}

/// Parses a message of the profile input: a profile, or a removal (see
/// [`ProfileChange`]). Never panics.
pub fn parse_profile_change(bytes: &[u8]) -> Result<ProfileChange, DeadReason> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Removal {
        user: u32,
        removed: bool,
    }
    if bytes.len() <= MAX_MESSAGE_BYTES {
        if let Ok(r) = serde_json::from_slice::<Removal>(bytes) {
            if r.removed {
                return Ok(ProfileChange::Remove(r.user));
            }
            return Err(bad("removed", "false: a removal says true".to_owned()));
        }
    }
    parse_profile(bytes).map(ProfileChange::Set)
}

/// Parses a user profile message. Never panics.
pub fn parse_profile(bytes: &[u8]) -> Result<UserProfile, DeadReason> {
    // The common case straight into a struct (see `parse_reaction`).
    #[derive(Deserialize)]
    struct Fast {
        user: u32,
        features: Vec<f64>,
        batch: Option<u32>,
        creative: Option<u16>,
    }
    if bytes.len() <= MAX_MESSAGE_BYTES {
        if let Ok(f) = serde_json::from_slice::<Fast>(bytes) {
            if f.features.len() <= crate::data::Candidates::MAX_DIM {
                let features: Vec<f32> = f.features.iter().map(|&x| x as f32).collect();
                if features.iter().all(|x| x.is_finite()) {
                    return Ok(UserProfile {
                        user: f.user,
                        features,
                        batch: f.batch,
                        creative: f.creative,
                    });
                }
            }
        }
    }
    parse_profile_checked(bytes)
}

/// The careful parse of a profile.
fn parse_profile_checked(bytes: &[u8]) -> Result<UserProfile, DeadReason> {
    let m = object(bytes)?;
    let user = uint(&m, "user", u64::from(u32::MAX))? as u32;
    let features = match field(&m, "features")? {
        serde_json::Value::Array(a) => {
            if a.len() > crate::data::Candidates::MAX_DIM {
                return Err(bad(
                    "features",
                    format!(
                        "{} values; at most {}",
                        a.len(),
                        crate::data::Candidates::MAX_DIM
                    ),
                ));
            }
            let mut out = Vec::with_capacity(a.len());
            for v in a {
                let x = v
                    .as_f64()
                    .map(|x| x as f32)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| bad("features", format!("{v} is not a finite number")))?;
                out.push(x);
            }
            out
        }
        v => return Err(bad("features", format!("expected an array, got {v}"))),
    };
    let opt = |name: &str, max: u64| -> Result<Option<u64>, DeadReason> {
        match m.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(_) => uint(&m, name, max).map(Some),
        }
    };
    let batch = opt("batch", u64::from(u32::MAX))?.map(|b| b as u32);
    let creative = opt("creative", u64::from(u16::MAX))?.map(|c| c as u16);
    Ok(UserProfile {
        user,
        features,
        batch,
        creative,
    })
}

/// What the pipeline needs to know about a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignInfo {
    /// Reactions before this time are refused.
    pub start_ms: u64,
    /// Reactions after this time are refused.
    pub end_ms: u64,
    /// Creatives in the campaign.
    pub creatives: u16,
    /// Batches in the campaign.
    pub batches: u32,
}

impl CampaignInfo {
    /// The info of a campaign created with `spec`: from its start to its
    /// last batch's due time plus `reaction_horizon_ms`.
    pub fn from_spec(spec: &CampaignSpec, reaction_horizon_ms: u64) -> Self {
        let batches = spec.batch_count();
        Self {
            start_ms: spec.schedule.start_ms,
            end_ms: spec
                .due_ms(batches.saturating_sub(1))
                .saturating_add(reaction_horizon_ms),
            creatives: u16::try_from(spec.creatives.len()).unwrap_or(u16::MAX),
            batches,
        }
    }
}

/// How the pipeline is set up.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct ReactionConfig {
    /// The feature dimension of user profiles.
    pub dim: usize,
    /// The window size (one minute).
    pub window_ms: u64,
    /// How long after a window's end reactions are still counted in it.
    pub grace_ms: u64,
    /// How many leading features define the bucket (each split in three
    /// by ±`bucket_threshold`: 3^n buckets).
    pub bucket_features: usize,
    /// The threshold of the bucket split.
    pub bucket_threshold: f32,
}

impl ReactionConfig {
    /// One-minute windows, 10 s grace, buckets from the first 3 features
    /// split at ±0.5.
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            window_ms: 60_000,
            grace_ms: 10_000,
            bucket_features: 3,
            bucket_threshold: 0.5,
        }
    }

    /// The feature bucket of `x`.
    pub fn bucket(&self, x: &[f32]) -> u32 {
        x.iter()
            .take(self.bucket_features.min(12))
            .fold(0u32, |b, &v| {
                let q = if v < -self.bucket_threshold {
                    0
                } else if v > self.bucket_threshold {
                    2
                } else {
                    1
                };
                b * 3 + q
            })
    }
}

/// A reaction that passed validation, joined with its user.
#[derive(Debug, Clone, PartialEq)]
struct Enriched {
    msg: ReactionMessage,
    bucket: u32,
    features: Arc<Vec<f32>>,
}

/// What a (campaign, user) pair contributes for the first time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserReaction {
    /// The creative the user got.
    pub creative: u16,
    /// The batch.
    pub batch: u32,
    /// The first delivery is counted (a trial).
    pub delivered: bool,
    /// The first success is counted.
    pub reacted: bool,
    /// The kind that caused this contribution.
    pub kind: ReactionKind,
    /// The user's feature bucket.
    pub bucket: u32,
    /// The user's features.
    pub features: Vec<f32>,
    /// When (the reaction's time).
    pub time_ms: u64,
}

/// What was counted for a (campaign, user) so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Seen {
    delivered: bool,
    reacted: bool,
    /// What the latest update counted for the first time (emitted, then
    /// cleared by the next update).
    fresh: Option<UserReaction>,
}

/// Counts of one (creative, bucket) cell of a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// The creative.
    pub creative: u16,
    /// The feature bucket.
    pub bucket: u32,
    /// Users first delivered to in the window.
    pub delivered: u32,
    /// Users who first reacted in the window.
    pub reacted: u32,
    /// Sum of the counted users' features (for the centroid).
    pub feature_sum: Vec<f64>,
    /// Users in `feature_sum`.
    pub users: u32,
}

/// The closed window of one campaign: its cells per (creative, bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReactionWindow {
    /// The campaign.
    pub campaign: String,
    /// The window's start.
    pub start_ms: u64,
    /// The window's end.
    pub end_ms: u64,
    /// The cells, ordered by (creative, bucket).
    pub cells: Vec<Cell>,
}

impl ReactionWindow {
    /// Reacting users per creative (for `creatives` creatives; cells of
    /// other creatives are left out).
    pub fn reactions_per_creative(&self, creatives: usize) -> Vec<u32> {
        let mut v = vec![0u32; creatives];
        for c in &self.cells {
            if let Some(n) = v.get_mut(usize::from(c.creative)) {
                *n = n.saturating_add(c.reacted);
            }
        }
        v
    }

    /// The campaign command that records this window's reactions. Its id
    /// is derived from the campaign and the window, so delivering the
    /// window twice records it once (the campaign's command idempotency).
    pub fn record_reactions(&self, creatives: usize) -> CampaignCommand {
        let h = smartmsg_engine::fnv::fnv1a(self.campaign.as_bytes());
        CampaignCommand::new(
            format!("reactions:{h:016x}:{}", self.start_ms),
            Action::RecordReactions {
                window_start_ms: self.start_ms,
                reactions: self.reactions_per_creative(creatives),
            },
        )
    }

    /// The window as model outcomes: one row per cell, at the cell's
    /// feature centroid, with `trials` = users delivered to (at least the
    /// users who reacted: a delivery and its reaction may fall into
    /// different windows) and `successes` = users who reacted.
    pub fn outcomes(&self, dim: usize) -> Result<Outcomes, ShapeError> {
        let mut o = Outcomes::new(dim)?;
        for c in &self.cells {
            let trials = c.delivered.max(c.reacted);
            if trials == 0 {
                continue;
            }
            let x: Vec<f32> = if c.users == 0 {
                vec![0.0; dim]
            } else {
                c.feature_sum
                    .iter()
                    .map(|s| (s / f64::from(c.users)) as f32)
                    .collect()
            };
            o.push(c.creative, &x, trials, c.reacted)?;
        }
        Ok(o)
    }
}

/// The open window aggregate of one campaign: cells sorted by (creative,
/// bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Cells(Vec<Cell>);

impl Cells {
    fn add(&mut self, r: &UserReaction) {
        let at = match self
            .0
            .binary_search_by(|c| (c.creative, c.bucket).cmp(&(r.creative, r.bucket)))
        {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(
                    i,
                    Cell {
                        creative: r.creative,
                        bucket: r.bucket,
                        feature_sum: vec![0.0; r.features.len()],
                        ..Cell::default()
                    },
                );
                i
            }
        };
        let cell = &mut self.0[at];
        cell.delivered += u32::from(r.delivered);
        cell.reacted += u32::from(r.reacted);
        if cell.feature_sum.len() == r.features.len() {
            for (s, x) in cell.feature_sum.iter_mut().zip(&r.features) {
                *s += f64::from(*x);
            }
            cell.users += 1;
        }
    }
}

type Dead = (String, Json<DeadLetter>);

/// Builds the reaction pipeline. See the [module docs](self). Fails only
/// when the window configuration is invalid.
pub fn reaction_topology(config: ReactionConfig) -> Result<Topology, WindowError> {
    let windows = Windows::tumbling(config.window_ms)?.grace(config.grace_ms);
    let t = Topology::new();
    let campaigns = t
        .stream::<String, Json<CampaignInfo>>(INPUT_CAMPAIGNS)
        .to_table(STORE_CAMPAIGNS);

    // Profiles: parse, dead-letter the invalid, table the rest.
    let (profiles, bad_profiles) = t
        .stream::<Bytes, Bytes>(INPUT_PROFILES)
        .map(move |_, raw| {
            let r = parse_profile_change(&raw).and_then(|c| match c {
                ProfileChange::Set(p) if p.features.len() != config.dim => {
                    Err(DeadReason::FeatureDimension {
                        user: p.user,
                        got: p.features.len(),
                        dim: config.dim,
                    })
                }
                ProfileChange::Set(p) => Ok((p.user, Some(Json(p)))),
                ProfileChange::Remove(user) => Ok((user, None)),
            });
            match r {
                Ok(change) => (String::new(), Ok(change)),
                Err(reason) => (
                    String::new(),
                    Err(Json(DeadLetter::new(INPUT_PROFILES, reason, &raw))),
                ),
            }
        })
        .split_result();
    bad_profiles.to(DEAD_LETTERS);
    // A removal is a tombstone: the user's profile leaves the table.
    let users = profiles
        .map(|_, (user, p)| (user, p))
        .to_table_with_deletes(STORE_USERS);

    // Reactions: parse.
    let (parsed, unparsable) = t
        .stream::<Bytes, Bytes>(INPUT_REACTIONS)
        .map(|_, raw| match parse_reaction(&raw) {
            Ok(m) => (m.campaign.clone(), Ok((m, raw))),
            Err(reason) => (
                String::new(),
                Err(Json(DeadLetter::new(INPUT_REACTIONS, reason, &raw))),
            ),
        })
        .split_result();
    unparsable.to(DEAD_LETTERS);

    // Validate against the campaign.
    let (valid, invalid) = parsed
        .left_join(&campaigns, |(m, raw): (ReactionMessage, Bytes), info| {
            let reason = match info {
                None => Some(DeadReason::UnknownCampaign {
                    campaign: m.campaign.clone(),
                }),
                Some(Json(c)) if m.time_ms < c.start_ms || m.time_ms > c.end_ms => {
                    Some(DeadReason::OutsideCampaign {
                        time_ms: m.time_ms,
                        start_ms: c.start_ms,
                        end_ms: c.end_ms,
                    })
                }
                Some(Json(c)) if m.creative >= c.creatives => Some(DeadReason::UnknownCreative {
                    creative: m.creative,
                    creatives: c.creatives,
                }),
                Some(Json(c)) if m.batch >= c.batches => Some(DeadReason::UnknownBatch {
                    batch: m.batch,
                    batches: c.batches,
                }),
                Some(_) => None,
            };
            match reason {
                None => Ok((m, raw)),
                Some(r) => Err(Json(DeadLetter::new(INPUT_REACTIONS, r, &raw))),
            }
        })
        .split_result();
    invalid.to(DEAD_LETTERS);

    // Join with the user's profile.
    let (enriched, no_user) = valid
        .map(|_, (m, raw)| (m.user, (m, raw)))
        .left_join(
            &users,
            move |(m, raw), p: Option<&Json<UserProfile>>| match p {
                Some(Json(p))
                    if p.batch.is_some_and(|b| b != m.batch)
                        || p.creative.is_some_and(|c| c != m.creative) =>
                {
                    Err((
                        m.campaign.clone(),
                        Json(DeadLetter::new(
                            INPUT_REACTIONS,
                            DeadReason::NotPlanned {
                                user: m.user,
                                batch: m.batch,
                                creative: m.creative,
                                planned_batch: p.batch.unwrap_or(m.batch),
                                planned_creative: p.creative.unwrap_or(m.creative),
                            },
                            &raw,
                        )),
                    ))
                }
                Some(Json(p)) => Ok(Enriched {
                    bucket: config.bucket(&p.features),
                    features: Arc::new(p.features.clone()),
                    msg: m,
                }),
                None => Err((
                    m.campaign.clone(),
                    Json(DeadLetter::new(
                        INPUT_REACTIONS,
                        DeadReason::UnknownUser { user: m.user },
                        &raw,
                    )),
                )),
            },
        )
        .split_result();
    no_user.map(|_, d: Dead| d).to(DEAD_LETTERS);

    // Count each (campaign, user) once as delivered and once as reacted.
    let firsts = enriched
        .map(|_, e| ((e.msg.campaign.clone(), e.msg.user), e))
        .with_timestamp(|_, e, _| e.msg.time_ms)
        .group_by_key()
        .aggregate(
            STORE_SEEN,
            || Json(Seen::default()),
            |_, e: Enriched, Json(s)| {
                s.fresh = None;
                // Any reaction implies the message was delivered.
                let delivered = !s.delivered;
                let reacted = e.msg.reaction.is_success() && !s.reacted;
                s.delivered = true;
                s.reacted |= reacted;
                if delivered || reacted {
                    s.fresh = Some(UserReaction {
                        creative: e.msg.creative,
                        batch: e.msg.batch,
                        delivered,
                        reacted,
                        kind: e.msg.reaction,
                        bucket: e.bucket,
                        features: (*e.features).clone(),
                        time_ms: e.msg.time_ms,
                    });
                }
            },
        )
        .flat_map(|k, Json(s)| s.fresh.map(|r| (k, Json(r))));
    firsts.to(USER_OUTCOMES);

    // Aggregate per (campaign, creative, bucket) in tumbling windows.
    firsts
        .map(|(campaign, _), r| (campaign, r))
        .group_by_key()
        .windowed_by(windows)
        .emit(EmitStrategy::OnWindowClose)
        .late_records_to(LATE_REACTIONS)
        .aggregate(
            STORE_WINDOWS,
            || Json(Cells::default()),
            |_, Json(r): Json<UserReaction>, Json(c)| c.add(&r),
        )
        .map(|w: Windowed<String>, Json(cells)| {
            let window = ReactionWindow {
                campaign: w.key.clone(),
                start_ms: w.window.start_ms,
                end_ms: w.window.end_ms,
                cells: cells.0,
            };
            (w, Json(window))
        })
        .to(REACTION_WINDOWS);
    Ok(t)
}

/// What the per-user outcome view knows about one user of one campaign.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserOutcome {
    /// The creative the user got.
    pub creative: u16,
    /// The batch the user was in.
    pub batch: u32,
    /// The message was delivered.
    pub delivered: bool,
    /// The user reacted (clicked or replied).
    pub reacted: bool,
    /// When the user first reacted.
    pub reacted_at_ms: Option<u64>,
    /// The user's features (at the first count).
    pub features: Vec<f32>,
}

/// The per-user outcome view: who got what, and who reacted to what, per
/// campaign. The read model of [`user_outcome_projection`], fed from the
/// pipeline's [`USER_OUTCOMES`] output in the log; the targeting model
/// learns from [`UserOutcomes::outcomes`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserOutcomes {
    users: BTreeMap<(String, u32), UserOutcome>,
}

impl UserOutcomes {
    /// What is known of `user` in `campaign`.
    pub fn get(&self, campaign: &str, user: u32) -> Option<&UserOutcome> {
        self.users.get(&(campaign.to_owned(), user))
    }

    /// Every user of `campaign`, by user id.
    pub fn campaign<'a>(
        &'a self,
        campaign: &'a str,
    ) -> impl Iterator<Item = (u32, &'a UserOutcome)> + 'a {
        self.users
            .range((campaign.to_owned(), 0)..=(campaign.to_owned(), u32::MAX))
            .map(|((_, u), o)| (*u, o))
    }

    /// Users known across campaigns.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user is known.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Folds one pipeline output into the view.
    pub fn apply(&mut self, campaign: &str, user: u32, r: &UserReaction) {
        let o = self
            .users
            .entry((campaign.to_owned(), user))
            .or_insert_with(|| UserOutcome {
                creative: r.creative,
                batch: r.batch,
                delivered: false,
                reacted: false,
                reacted_at_ms: None,
                features: r.features.clone(),
            });
        o.delivered |= r.delivered;
        if r.reacted && !o.reacted {
            o.reacted = true;
            o.reacted_at_ms = Some(r.time_ms);
        }
    }

    /// The campaign's per-user outcomes for the models: one row per
    /// delivered user (`trials` 1, `successes` 1 if they reacted).
    pub fn outcomes(&self, campaign: &str, dim: usize) -> Result<Outcomes, ShapeError> {
        let mut o = Outcomes::new(dim)?;
        for (_, u) in self.campaign(campaign) {
            if u.delivered {
                o.push(u.creative, &u.features, 1, u32::from(u.reacted))?;
            }
        }
        Ok(o)
    }

    /// Applies a log event: a [`USER_OUTCOMES`] output of the pipeline
    /// (other kinds are ignored).
    pub fn apply_event(&mut self, e: &RecordedEvent) -> Result<(), ProjectionError> {
        if e.kind != USER_OUTCOMES {
            return Ok(());
        }
        let rejected = |reason: String| ProjectionError::Rejected {
            position: e.position,
            reason,
        };
        let (k, v) = envelope::decode(&e.payload)
            .ok_or_else(|| rejected("payload is not a stream-output envelope".into()))?;
        let (campaign, user) =
            <(String, u32)>::decode(&k).map_err(|err| rejected(format!("key: {err}")))?;
        let Json(r) =
            Json::<UserReaction>::decode(&v).map_err(|err| rejected(format!("value: {err}")))?;
        self.apply(&campaign, user, &r);
        Ok(())
    }
}

/// The per-user outcome view as a [`smartmsg_engine::Projection`] over an
/// in-memory read model, fed from the log by a
/// [`smartmsg_engine::ProjectionRunner`].
pub fn user_outcome_projection(
    name: impl Into<String>,
    model: InMemoryReadModel<UserOutcomes>,
) -> InMemoryProjection<UserOutcomes> {
    InMemoryProjection::new(name, model, |m: &mut UserOutcomes, e| m.apply_event(e))
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;
    use proptest::prelude::*;

    fn field_value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("0".to_owned()),
            Just("1".to_owned()),
            Just("-1".to_owned()),
            Just("1.0".to_owned()),
            Just("4294967295".to_owned()),
            Just("4294967296".to_owned()),
            Just("65535".to_owned()),
            Just("65536".to_owned()),
            Just("18446744073709551615".to_owned()),
            Just("1e400".to_owned()),
            Just("null".to_owned()),
            Just("\"c1\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"clicked\"".to_owned()),
            Just("\"replied\"".to_owned()),
            Just("\"teleport\"".to_owned()),
            Just("\"c\\u0031\"".to_owned()),
            Just("[1.5,-2,3e2]".to_owned()),
            Just("[1e39]".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("true".to_owned()),
        ]
    }

    /// A valid object of `base`'s fields, then up to three mutations: a
    /// field's value replaced, a field dropped, a field repeated. Only the
    /// parser's own fields (the fast path skips others unread: see the
    /// parsers).
    fn message(base: &'static [(&'static str, &'static str)]) -> impl Strategy<Value = Vec<u8>> {
        let mutation = (0..3u8, 0..8usize, field_value());
        proptest::collection::vec(mutation, 0..4).prop_map(move |muts| {
            let mut fields: Vec<(String, String)> = base
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            for (kind, i, v) in muts {
                if fields.is_empty() {
                    break;
                }
                let i = i % fields.len();
                match kind {
                    0 => fields[i].1 = v,
                    1 => {
                        fields.remove(i);
                    }
                    _ => {
                        let name = fields[i].0.clone();
                        fields.push((name, v));
                    }
                }
            }
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        })
    }

    const REACTION: &[(&str, &str)] = &[
        ("campaign", "\"c1\""),
        ("batch", "3"),
        ("user", "7"),
        ("creative", "1"),
        ("reaction", "\"clicked\""),
        ("time_ms", "1700000000000"),
    ];
    const PROFILE: &[(&str, &str)] = &[
        ("user", "7"),
        ("features", "[0.5,-1,2]"),
        ("batch", "2"),
        ("creative", "1"),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// The fast paths decide exactly like the careful ones.
        #[test]
        fn fast_paths_agree_with_the_careful_parse(r in message(REACTION), p in message(PROFILE)) {
            prop_assert_eq!(parse_reaction(&r), parse_reaction_checked(&r));
            prop_assert_eq!(parse_profile(&p), parse_profile_checked(&p));
        }
    }

    #[test]
    fn a_valid_message_takes_either_path_to_the_same_value() {
        let m = br#"{"campaign":"c1","batch":2,"user":7,"creative":1,"reaction":"clicked","time_ms":99,"id":5}"#;
        assert_eq!(parse_reaction(m), parse_reaction_checked(m));
        assert!(parse_reaction(m).is_ok());
        let p = br#"{"user":3,"features":[0.5,-1,2e3]}"#;
        assert_eq!(parse_profile(p), parse_profile_checked(p));
        assert!(parse_profile(p).is_ok());
        // A field the message does not need is skipped unread, even one the
        // careful parse could not hold.
        let m = br#"{"campaign":"c1","batch":2,"user":7,"creative":1,"reaction":"clicked","time_ms":99,"x":1e400}"#;
        assert!(parse_reaction(m).is_ok());
        assert!(parse_reaction_checked(m).is_err());
    }
}
