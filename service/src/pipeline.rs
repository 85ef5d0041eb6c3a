//! A campaign's reaction pipeline: the domain's reaction topology on the
//! engine's exactly-once [`StreamRunner`](smartmsg_engine::stream::StreamRunner), fed from one log stream.
//!
//! # Input
//!
//! Everything that decides the pipeline's outputs is in the campaign's
//! pipeline stream (`pipeline-<campaign>`), in the order it happened:
//!
//! | event kind | becomes |
//! |---|---|
//! | `CampaignInfo` | the campaign table's row |
//! | `BatchAnnounced` `{"batch": n}` | one profile record per user of batch `n` (from the plan and the audience), so the user table knows who was messaged before any reaction to them |
//! | `Reaction` | a raw reaction message, timestamped with its arrival |
//! | `Tick` | a punctuation: stream time moves to the tick's time, closing due windows |
//!
//! The source gives each record a position `(version << 24) | i`, `i`
//! counting the records one event expands into, so the runner's checkpoint
//! can fall inside an announced batch.
//!
//! # Output
//!
//! The runner commits its state, its input position and its outputs in one
//! batch of the state store, then appends the outputs to the campaign's
//! output streams through an
//! [`EventLogSink`](smartmsg_engine::stream::EventLogSink) (idempotent by
//! output id).
//! The runtime reads those streams: windows and late reactions become
//! `RecordReactions` commands, first reactions become the model's
//! feedback. Replaying the pipeline stream through the topology gives the
//! same outputs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_domain::reactions::{
    CampaignInfo, ReactionConfig, ReactionWindow, UserProfile, UserReaction, INPUT_CAMPAIGNS,
    INPUT_PROFILES, INPUT_REACTIONS,
};
use smartmsg_domain::{Audience, Decisions, Part};
use smartmsg_engine::stream::{
    envelope, ChangelogEntry, Entries, Json, KeyValueStore, LateReason, LateRecord, Source,
    SourceError, SourceRecord, StateCodec, StoreError, StoreLimits, WriteBatch, PUNCTUATE,
};
use smartmsg_engine::{BackendError, EventLog, NewEvent, RecordedEvent, StreamId};

use crate::hooks::{CrashPoint, Hooks};

/// Kind of the campaign-info event.
pub const CAMPAIGN_INFO: &str = "CampaignInfo";
/// Kind of a batch announcement.
pub const BATCH_ANNOUNCED: &str = "BatchAnnounced";
/// Kind of a raw reaction message.
pub const REACTION: &str = "Reaction";
/// Kind of a tick (punctuation).
pub const TICK: &str = "Tick";
/// Kind of a removal: the user's profile leaves the pipeline's user table
/// (payload `{"user": 7}`).
pub const USER_REMOVED: &str = "UserRemoved";

/// Bits of a record position that count records within one event.
pub(crate) const SUB_BITS: u32 = 24;

/// The pipeline's settings for one campaign.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct PipelineSettings {
    /// Window length (ms). Default one minute.
    pub window_ms: u64,
    /// Grace after a window's end (ms). Default 10 s.
    pub grace_ms: u64,
    /// Leading features that define a window cell's bucket. Default 3.
    pub bucket_features: usize,
    /// The bucket split. Default 0.5.
    pub bucket_threshold: f32,
    /// Reactions are accepted until this long after the last batch is due.
    /// Default 7 days.
    pub accept_after_last_ms: u64,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        let c = ReactionConfig::new(1);
        Self {
            window_ms: c.window_ms,
            grace_ms: c.grace_ms,
            bucket_features: c.bucket_features,
            bucket_threshold: c.bucket_threshold,
            accept_after_last_ms: 7 * 24 * 3_600_000,
        }
    }
}

impl PipelineSettings {
    /// The topology configuration for users with `dim` features.
    pub fn reaction_config(&self, dim: usize) -> ReactionConfig {
        let mut c = ReactionConfig::new(dim);
        c.window_ms = self.window_ms.max(1);
        c.grace_ms = self.grace_ms;
        c.bucket_features = self.bucket_features;
        c.bucket_threshold = self.bucket_threshold;
        c
    }
}

#[derive(Serialize, Deserialize)]
struct Announced {
    batch: u32,
}

/// The campaign-info event.
pub fn info_event(info: &CampaignInfo, now_ms: u64) -> NewEvent {
    NewEvent::new(
        CAMPAIGN_INFO,
        1,
        now_ms,
        serde_json::to_vec(info).unwrap_or_default(),
    )
}

/// The announcement of batch `batch`.
pub fn announce_event(batch: u32, now_ms: u64) -> NewEvent {
    NewEvent::new(
        BATCH_ANNOUNCED,
        1,
        now_ms,
        serde_json::to_vec(&Announced { batch }).unwrap_or_default(),
    )
}

#[derive(Serialize, Deserialize)]
struct Removed {
    user: u32,
}

/// The removal of `user`'s profile from the pipeline.
pub fn removal_event(user: u32, now_ms: u64) -> NewEvent {
    NewEvent::new(
        USER_REMOVED,
        1,
        now_ms,
        serde_json::to_vec(&Removed { user }).unwrap_or_default(),
    )
}

/// A tick at `now_ms`.
pub fn tick_event(now_ms: u64) -> NewEvent {
    NewEvent::new(TICK, 1, now_ms, Bytes::new())
}

/// A raw reaction that arrived at `arrival_ms`; `origin` says where it
/// came from (`<source>@<offset>`, kept as the event's causation id).
pub fn reaction_event(payload: Bytes, arrival_ms: u64, origin: Option<String>) -> NewEvent {
    NewEvent::new(REACTION, 1, arrival_ms, payload).with_metadata(smartmsg_engine::Metadata {
        correlation_id: None,
        causation_id: origin,
    })
}

/// The source offset in an origin `<source>@<offset>`.
pub fn origin_offset(origin: &str) -> Option<u64> {
    origin.rsplit_once('@')?.1.parse().ok()
}

/// Each planned batch's decisions (who got which creative), as the source
/// expands announcements.
pub type BatchPlans = Arc<RwLock<Vec<Option<Arc<Decisions>>>>>;

/// Records a planned batch for the source.
pub fn set_batch_plan(plans: &BatchPlans, batch: u32, part: Part, decisions: &Decisions) {
    let mut g = plans.write().unwrap_or_else(|e| e.into_inner());
    let b = batch as usize;
    if g.len() <= b {
        g.resize(b + 1, None);
    }
    // A large batch comes in parts, in order: a later part joins the
    // batch its first part started.
    match &mut g[b] {
        Some(plan) if !part.is_first() => Arc::make_mut(plan).append(decisions),
        slot => *slot = Some(Arc::new(decisions.clone())),
    }
}

/// "No reaction in the last read".
pub const NO_OFFSET: u64 = u64::MAX;

/// The runner's [`Source`]: the campaign's pipeline stream, expanded (see
/// the [module docs](self)).
pub struct PipelineSource {
    log: Arc<dyn EventLog>,
    stream: StreamId,
    campaign: String,
    audience: Arc<Audience>,
    users: BatchPlans,
    /// The highest source offset of the reactions in the last read.
    through: Arc<AtomicU64>,
}

impl std::fmt::Debug for PipelineSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineSource")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl PipelineSource {
    /// The source of campaign `campaign`'s pipeline stream.
    pub fn new(
        log: Arc<dyn EventLog>,
        stream: StreamId,
        campaign: &str,
        audience: Arc<Audience>,
        users: BatchPlans,
        through: Arc<AtomicU64>,
    ) -> Self {
        Self {
            log,
            stream,
            campaign: campaign.to_owned(),
            audience,
            users,
            through,
        }
    }

    fn expand(
        &self,
        e: &RecordedEvent,
        from_sub: u64,
        room: usize,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        if e.kind == REACTION && from_sub == 0 {
            if let Some(o) = e.metadata.causation_id.as_deref().and_then(origin_offset) {
                let t = self.through.load(Ordering::Relaxed);
                if t == NO_OFFSET || o > t {
                    self.through.store(o, Ordering::Relaxed);
                }
            }
        }
        let users = self.users.read().unwrap_or_else(|e| e.into_inner());
        expand_event(
            e,
            &self.campaign,
            &self.audience,
            &users,
            from_sub,
            room,
            out,
        )
        .map_err(|reason| {
            SourceError::Backend(BackendError::new(std::io::Error::other(format!(
                "{} version {}: {reason}",
                self.stream, e.version
            ))))
        })
    }
}

/// The records one event of a pipeline stream stands for (see the
/// [module docs](self)), from its `from_sub`-th on, at most `room`, each
/// with its position `(version << 24) | i`. `plans[b]` is batch `b`'s
/// decisions (users in plan order, with their creatives); `audience` gives
/// the users' features. The runtime's
/// source and `smartmsg replay` both expand through this function, so a
/// replay feeds the topology exactly what the runner was fed.
pub fn expand_event(
    e: &RecordedEvent,
    campaign: &str,
    audience: &Audience,
    plans: &[Option<Arc<Decisions>>],
    from_sub: u64,
    room: usize,
    out: &mut Vec<SourceRecord>,
) -> Result<(), String> {
    let base = e.version << SUB_BITS;
    if from_sub > 0 && e.kind != BATCH_ANNOUNCED {
        // A one-record event already processed.
        return Ok(());
    }
    let one = |input: &str, key: Bytes, value: Bytes, ts: u64| SourceRecord {
        position: base,
        input: input.to_owned(),
        key,
        value,
        timestamp_ms: ts,
        headers: Default::default(),
    };
    match e.kind.as_str() {
        REACTION => out.push(one(
            INPUT_REACTIONS,
            Bytes::new(),
            e.payload.clone(),
            e.timestamp_ms,
        )),
        TICK => out.push(one(PUNCTUATE, Bytes::new(), Bytes::new(), e.timestamp_ms)),
        CAMPAIGN_INFO => out.push(one(
            INPUT_CAMPAIGNS,
            Bytes::from(campaign.to_owned().to_bytes()),
            e.payload.clone(),
            0,
        )),
        BATCH_ANNOUNCED => {
            let a: Announced = serde_json::from_slice(&e.payload)
                .map_err(|err| format!("unreadable announcement: {err}"))?;
            let plan = plans
                .get(a.batch as usize)
                .cloned()
                .flatten()
                .ok_or_else(|| format!("batch {} is not planned", a.batch))?;
            let list = &plan.users;
            if list.len() as u64 >= 1 << SUB_BITS {
                return Err(format!("batch of {} users is too large", list.len()));
            }
            let creatives = &plan.creatives;
            for (i, &user) in list.iter().enumerate().skip(from_sub as usize).take(room) {
                let Some(x) = audience.features(user) else {
                    continue;
                };
                let profile = UserProfile {
                    user,
                    features: x.to_vec(),
                    batch: Some(a.batch),
                    creative: creatives.get(i).copied(),
                };
                out.push(SourceRecord {
                    position: base | i as u64,
                    input: INPUT_PROFILES.to_owned(),
                    key: Bytes::new(),
                    value: Bytes::from(serde_json::to_vec(&profile).unwrap_or_default()),
                    timestamp_ms: 0,
                    headers: Default::default(),
                });
            }
        }
        USER_REMOVED => {
            let r: Removed = serde_json::from_slice(&e.payload)
                .map_err(|err| format!("unreadable removal: {err}"))?;
            out.push(one(
                INPUT_PROFILES,
                Bytes::new(),
                smartmsg_domain::reactions::profile_removal(r.user),
                0,
            ));
        }
        // Unknown kinds: a record of no input (skipped, position kept).
        other => out.push(one(other, Bytes::new(), Bytes::new(), 0)),
    }
    Ok(())
}

#[async_trait]
impl Source for PipelineSource {
    async fn read(&mut self, from: u64, max: usize) -> Result<Vec<SourceRecord>, SourceError> {
        self.through.store(NO_OFFSET, Ordering::Relaxed);
        let mut version = (from >> SUB_BITS).max(1);
        let mut sub = if from >> SUB_BITS == 0 {
            0
        } else {
            from & ((1 << SUB_BITS) - 1)
        };
        let max = max.max(1);
        let mut out = Vec::new();
        let per_read = self.log.limits().max_read_events.clamp(1, 1_000);
        while out.len() < max {
            let events = self
                .log
                .read_stream(&self.stream, version, per_read)
                .await?;
            if events.is_empty() {
                break;
            }
            for e in &events {
                if out.len() >= max {
                    break;
                }
                let room = max - out.len();
                self.expand(e, sub, room, &mut out)?;
                sub = 0;
                version = e.version + 1;
            }
            if events.len() < per_read {
                break;
            }
        }
        Ok(out)
    }
}

/// A [`KeyValueStore`] that asks the hooks before each commit of the
/// pipeline (see [`CrashPoint::PipelineCommit`]).
pub struct HookedStore {
    inner: Arc<dyn KeyValueStore>,
    hooks: Arc<dyn Hooks>,
    campaign: String,
    through: Arc<AtomicU64>,
}

impl HookedStore {
    /// `inner`, asking `hooks` before each write.
    pub fn new(
        inner: Arc<dyn KeyValueStore>,
        hooks: Arc<dyn Hooks>,
        campaign: &str,
        through: Arc<AtomicU64>,
    ) -> Self {
        Self {
            inner,
            hooks,
            campaign: campaign.to_owned(),
            through,
        }
    }
}

/// The error a [`HookedStore`] fails a commit with when a hook fires.
#[derive(Debug, thiserror::Error)]
#[error("simulated crash before the reaction pipeline's commit")]
pub struct SimulatedCrash;

impl KeyValueStore for HookedStore {
    fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(space, key)
    }

    fn range(
        &self,
        space: &str,
        start: std::ops::Bound<&[u8]>,
        end: std::ops::Bound<&[u8]>,
        max: usize,
    ) -> Result<Entries, StoreError> {
        self.inner.range(space, start, end, max)
    }

    fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let through = self.through.load(Ordering::Relaxed);
        if through != NO_OFFSET
            && self.hooks.crash(CrashPoint::PipelineCommit {
                campaign: &self.campaign,
                through,
            })
        {
            return Err(StoreError::Backend(BackendError::new(SimulatedCrash)));
        }
        self.inner.write(batch)
    }

    fn changelog(&self, from: u64, max: usize) -> Result<Vec<ChangelogEntry>, StoreError> {
        self.inner.changelog(from, max)
    }

    fn changelog_bounds(&self) -> Result<(u64, u64), StoreError> {
        self.inner.changelog_bounds()
    }

    fn truncate_changelog(&self, before: u64) -> Result<(), StoreError> {
        self.inner.truncate_changelog(before)
    }

    fn limits(&self) -> StoreLimits {
        self.inner.limits()
    }

    fn writes_block(&self) -> bool {
        self.inner.writes_block()
    }
}

/// A pipeline output read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A closed window.
    Window(ReactionWindow),
    /// A user's first counted reaction (or first delivery).
    Outcome {
        /// The user.
        user: u32,
        /// What was counted.
        reaction: UserReaction,
    },
    /// A reaction counted after its window closed.
    Late {
        /// The window it belongs to.
        window_start_ms: u64,
        /// What was counted.
        reaction: UserReaction,
    },
}

fn split(e: &RecordedEvent) -> Result<(Bytes, Bytes), String> {
    envelope::decode(&e.payload).ok_or_else(|| "not a stream-output envelope".to_owned())
}

/// Decodes a window event.
pub fn decode_window(e: &RecordedEvent) -> Result<ReactionWindow, String> {
    let (_, v) = split(e)?;
    let Json(w) = Json::<ReactionWindow>::decode(&v).map_err(|e| e.to_string())?;
    Ok(w)
}

/// Decodes a first-reaction event: the user and what was counted.
pub fn decode_outcome(e: &RecordedEvent) -> Result<(u32, UserReaction), String> {
    let (k, v) = split(e)?;
    let (_, user) = <(String, u32)>::decode(&k).map_err(|e| e.to_string())?;
    let Json(r) = Json::<UserReaction>::decode(&v).map_err(|e| e.to_string())?;
    Ok((user, r))
}

/// Decodes a late-reaction event: its window's start and what was
/// counted.
pub fn decode_late(e: &RecordedEvent) -> Result<(u64, UserReaction), String> {
    let (_, v) = split(e)?;
    let late = LateRecord::<Json<UserReaction>>::decode(&v).map_err(|e| e.to_string())?;
    match late.reason {
        LateReason::WindowClosed { window, .. } => Ok((window.start_ms, late.value.0)),
        other => Err(format!("unknown late reason: {other}")),
    }
}
