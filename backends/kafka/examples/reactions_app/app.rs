//! The reactions application: a Kafka Streams application ported by hand
//! to smartmsg's stream engine (shared by the `reactions_app` example and
//! `tests/ported_app.rs`).
//!
//! # The Java original's shape (Kafka Streams 3.x)
//!
//! ```text
//! StreamsBuilder builder = new StreamsBuilder();
//! // user id -> {"segment": ..}, fully replicated to every instance
//! GlobalKTable<String, Profile> profiles =
//!     builder.globalTable("user-profiles", Consumed.with(Serdes.String(), profileSerde));
//! // user id -> raw JSON bytes {"campaign", "creative", "kind"}
//! KStream<String, byte[]> raw =
//!     builder.stream("ad-reactions", Consumed.with(Serdes.String(), Serdes.ByteArray()));
//! // validate; invalid records go to a dead-letter topic with a reason
//! Map<String, KStream<String, Validated>> split = raw
//!     .mapValues((user, bytes) -> Validated.of(user, bytes))
//!     .split(Named.as("v-"))
//!     .branch((k, v) -> v.isValid(), Branched.as("ok"))
//!     .defaultBranch(Branched.as("bad"));
//! split.get("v-bad").mapValues(Validated::deadLetter).to("reactions-dlq");
//! // enrich with the user's segment ("unknown" without a profile)
//! KStream<String, Enriched> enriched = split.get("v-ok").leftJoin(profiles,
//!     (user, r) -> user, (r, p) -> Enriched.of(r.reaction(), p));
//! // Processor API: per-campaign running total, flushed every 30 s of
//! // stream time by a punctuator, from a state store
//! builder.addStateStore(Stores.keyValueStoreBuilder(
//!     Stores.persistentKeyValueStore("campaign-totals"), Serdes.String(), Serdes.Long()));
//! enriched.process(CampaignTotals::new, "campaign-totals").to("campaign-totals");
//! // count per campaign x creative x segment in 1-minute tumbling windows
//! // with 10 s grace; final results only (suppress until the window closes)
//! enriched.selectKey((user, e) -> e.campaign() + "|" + e.creative() + "|" + e.segment())
//!     .groupByKey(Grouped.with(Serdes.String(), enrichedSerde))
//!     .windowedBy(TimeWindows.ofSizeAndGrace(Duration.ofMinutes(1), Duration.ofSeconds(10)))
//!     .count(Materialized.as("reaction-counts"))
//!     .suppress(Suppressed.untilWindowCloses(BufferConfig.unbounded()))
//!     .toStream()
//!     .to("reaction-counts", Produced.with(windowedSerde, Serdes.Long()));
//! // (Kafka Streams drops late records, counting them in the
//! // dropped-records metric; here they also go to an output.)
//! props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
//! new KafkaStreams(builder.build(), props).start();
//! ```
//!
//! # The port
//!
//! [`topology`] below, step for step. Topic names are the topology's input
//! and output names; `ProcessorConfig` maps them to Kafka topics.
#![allow(dead_code)]

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_engine::stream::{
    EmitStrategy, Json, LateRecord, Processor, ProcessorContext, Punctuation, PunctuationType,
    Record, StreamError, Topology, WindowError, Windowed, Windows,
};

/// Input: raw reactions, key = user id (UTF-8), value = JSON bytes.
pub const REACTIONS: &str = "ad-reactions";
/// Global table source: user id → `Json<Profile>`.
pub const PROFILES: &str = "user-profiles";
/// Output: invalid reactions, key = user id, value = `Json<DeadLetter>`.
pub const DEAD_LETTERS: &str = "reactions-dlq";
/// Output: final counts, key = `Windowed<CountKey>`, value = `u64`.
pub const COUNTS: &str = "reaction-counts";
/// Output: reactions too late for their window,
/// key = `CountKey`, value = `LateRecord<Json<Enriched>>`.
pub const LATE: &str = "late-reactions";
/// Output: the punctuator's running totals, key = campaign, value = `u64`.
pub const TOTALS: &str = "campaign-totals";
/// The processor's state store: campaign → running total.
pub const TOTALS_STORE: &str = "totals-store";
/// The window store of the counts.
pub const COUNTS_STORE: &str = "counts-store";

/// The reaction kinds accepted.
pub const KINDS: [&str; 3] = ["click", "like", "reply"];
/// The count windows' size (one minute).
pub const WINDOW_MS: u64 = 60_000;

/// A reaction's grouping key: campaign, creative, segment.
pub type CountKey = (String, String, String);

/// A raw reaction as it comes on the input (every field optional, so
/// that a missing one is a dead letter with a reason, not a decode error).
#[derive(Debug, Clone, Deserialize)]
struct RawReaction {
    campaign: Option<String>,
    creative: Option<String>,
    kind: Option<String>,
}

/// A valid reaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The campaign.
    pub campaign: String,
    /// The creative shown.
    pub creative: String,
    /// One of [`KINDS`].
    pub kind: String,
}

/// A user profile (the global table's value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// The user's segment.
    pub segment: String,
}

/// A reaction joined with its user's segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enriched {
    /// The user.
    pub user: String,
    /// The campaign.
    pub campaign: String,
    /// The creative.
    pub creative: String,
    /// The segment, `"unknown"` when the user has no profile.
    pub segment: String,
    /// The reaction kind.
    pub kind: String,
}

/// An invalid reaction and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// `empty-user`, `bad-json`, `missing-field`, `empty-campaign`,
    /// `unknown-kind`.
    pub reason: String,
    /// The raw value (lossy UTF-8).
    pub raw: String,
}

/// Validates one raw reaction.
pub fn validate(user: &str, raw: &[u8]) -> Result<Reaction, DeadLetter> {
    let dead = |reason: &str| DeadLetter {
        reason: reason.to_owned(),
        raw: String::from_utf8_lossy(raw).into_owned(),
    };
    if user.is_empty() {
        return Err(dead("empty-user"));
    }
    let r: RawReaction = serde_json::from_slice(raw).map_err(|_| dead("bad-json"))?;
    let (Some(campaign), Some(creative), Some(kind)) = (r.campaign, r.creative, r.kind) else {
        return Err(dead("missing-field"));
    };
    if campaign.is_empty() {
        return Err(dead("empty-campaign"));
    }
    if !KINDS.contains(&kind.as_str()) {
        return Err(dead("unknown-kind"));
    }
    Ok(Reaction {
        campaign,
        creative,
        kind,
    })
}

/// The Processor-API step: per-campaign running totals of valid
/// reactions in the store [`TOTALS_STORE`], all forwarded (by campaign) every
/// `flush_ms` of stream time, timestamped with the stream time that fired
/// the punctuator.
pub struct CampaignTotals {
    /// The punctuation interval.
    pub flush_ms: u64,
}

impl Processor<String, Json<Enriched>, String, u64> for CampaignTotals {
    fn init(&mut self, ctx: &mut ProcessorContext<'_, String, u64>) -> Result<(), StreamError> {
        ctx.schedule(self.flush_ms, PunctuationType::StreamTime)?;
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        r: Record<String, Json<Enriched>>,
    ) -> Result<(), StreamError> {
        let mut totals = ctx.store::<String, u64>(TOTALS_STORE)?;
        let campaign = r.value.0.campaign;
        let n = totals.get(&campaign).copied().unwrap_or(0) + 1;
        totals.put(campaign, n)
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, String, u64>,
        p: Punctuation,
    ) -> Result<(), StreamError> {
        let mut all: Vec<(String, u64)> = ctx
            .store::<String, u64>(TOTALS_STORE)?
            .entries()
            .into_iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        all.sort();
        for (campaign, n) in all {
            ctx.forward_to("totals", Record::new(campaign, n, p.timestamp_ms))?;
        }
        Ok(())
    }
}

/// The application's settings.
#[derive(Debug, Clone, Copy)]
pub struct AppConfig {
    /// The count windows' grace period.
    pub grace_ms: u64,
    /// The running totals' flush interval (stream time).
    pub flush_ms: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            grace_ms: 10_000,
            flush_ms: 30_000,
        }
    }
}

/// The topology (see the module doc for the Java it replaces).
pub fn topology(cfg: AppConfig) -> Result<Topology, WindowError> {
    let t = Topology::new();
    // builder.globalTable("user-profiles", ..)
    let profiles = t.global_table::<String, Json<Profile>>(PROFILES, "profiles");

    // builder.stream("ad-reactions", ..).mapValues(validate).split()
    let (valid, invalid) = t
        .stream::<String, Bytes>(REACTIONS)
        .map(|user, raw| {
            let v = validate(&user, &raw);
            (user, v)
        })
        .split_result();
    invalid.map_values(Json).to(DEAD_LETTERS);

    // .leftJoin(profiles, (user, r) -> user, joiner)
    let enriched = valid.left_join_global(
        &profiles,
        |user, _| user.clone(),
        |r, p| {
            Json(Enriched {
                user: String::new(),
                campaign: r.campaign,
                creative: r.creative,
                segment: p.map_or_else(|| "unknown".to_owned(), |p| p.0.segment.clone()),
                kind: r.kind,
            })
        },
    );
    // The joiner does not see the key: put the user in afterwards.
    let enriched = enriched.map(|user, Json(mut e)| {
        e.user = user.clone();
        (user, Json(e))
    });

    // builder.addStateStore(..); enriched.process(CampaignTotals::new, ..)
    t.add_state_store::<String, u64>(TOTALS_STORE);
    enriched
        .process(
            "campaign-totals",
            CampaignTotals {
                flush_ms: cfg.flush_ms,
            },
            &[TOTALS_STORE],
        )
        .child("totals")
        .to(TOTALS);

    // .selectKey(..).groupByKey().windowedBy(..).count().suppress(..)
    enriched
        .map(|_, Json(e)| {
            let key: CountKey = (e.campaign.clone(), e.creative.clone(), e.segment.clone());
            (key, Json(e))
        })
        .group_by_key()
        .windowed_by(Windows::tumbling(WINDOW_MS)?.grace(cfg.grace_ms))
        .emit(EmitStrategy::OnWindowClose)
        .late_records_to(LATE)
        .count(COUNTS_STORE)
        .to(COUNTS);
    Ok(t)
}

/// A decoded count output: ((campaign, creative, segment), window start) → count.
pub type CountOut = (Windowed<CountKey>, u64);
/// A decoded late output.
pub type LateOut = (CountKey, LateRecord<Json<Enriched>>);
