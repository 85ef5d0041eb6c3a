//! The reaction path: raw reaction messages in; closed one-minute windows
//! of counted reactions and dead letters out.
//!
//! [`ReactionPath`] is the seam between the simulator and whatever turns
//! the reactions topic into model updates. [`make_path`] picks the
//! implementation from the scenario's `pipeline.kind`: the real pipeline
//! ([`PipelinePath`](crate::reaction_pipeline::PipelinePath): the domain's
//! reaction topology on the engine's stream DSL, the default) or
//! [`BuiltinPath`], the simple path below — the simulator calls nothing
//! else.
//!
//! The built-in path:
//!
//! 1. **validates** each message: UTF-8 JSON with every field of a
//!    [`ReactionMessage`](crate::world::ReactionMessage), this campaign, a
//!    known reaction type, a sent batch, a subscriber, a message that user
//!    really got in that batch with that creative, a time after the message
//!    and not after its arrival; anything else is a dead letter with the
//!    reason;
//! 2. **joins** the reaction with the user table (the subscriber's
//!    features) and the message table (who got which creative in which
//!    batch);
//! 3. **deduplicates** by reaction id: a repeat is dropped, whatever its
//!    timing;
//! 4. **windows** by event time: one-minute tumbling windows, stream time
//!    = the largest event time seen (or a punctuation), a window closes when
//!    stream time reaches its end plus the grace period and is then emitted
//!    once with its counts per creative;
//! 5. counts a **late** reaction (its window already closed) exactly once
//!    too, unlike Kafka Streams which drops it: it is emitted at once as a
//!    correction of its window (`late` ≥ 1).
//!
//! Durability is the caller's: it commits [`ReactionPath::state`] together
//! with the outputs and the input offset, and restores with
//! [`ReactionPath::restore`] after a crash.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smartmsg_domain::Decisions;

use smartmsg_domain::reactions::CampaignInfo;

use crate::population::SimPopulation;
use crate::reaction_pipeline::PipelinePath;
use crate::scenario::{PathKind, Scenario};
use crate::world::REACTION_TYPES;

/// A valid reaction, joined with the message it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counted {
    /// The reaction id.
    pub id: u64,
    /// The user.
    pub user: u32,
    /// The creative they got.
    pub creative: u16,
    /// The batch it came in.
    pub batch: u32,
    /// When they reacted.
    pub time_ms: u64,
    /// The user's features (from the join; not persisted).
    #[serde(skip)]
    pub x: Vec<f32>,
}

/// One emitted window: the reactions counted in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowResult {
    /// The window's start (event time, ms).
    pub window_start_ms: u64,
    /// 0 for the window's own result; `n ≥ 1` for the `n`-th correction
    /// carrying reactions that arrived after it closed.
    pub late: u32,
    /// Reactions per creative.
    pub per_creative: Vec<u32>,
    /// The reactions.
    pub reactions: Vec<Counted>,
}

impl WindowResult {
    /// The id of the `RecordReactions` command that records this result
    /// (unique per window and correction, so a repeat is a no-op).
    pub fn command_id(&self) -> String {
        if self.late == 0 {
            format!("rx-{}", self.window_start_ms)
        } else {
            format!("rx-{}-late-{}", self.window_start_ms, self.late)
        }
    }
}

/// A message the path refused, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterOut {
    /// Its topic offset.
    pub offset: u64,
    /// When it arrived.
    pub arrival_ms: u64,
    /// Why it was refused.
    pub reason: String,
    /// The message (lossy UTF-8, at most 512 bytes).
    pub payload: String,
}

/// What processing produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PathOutput {
    /// Windows closed (and late corrections), in order.
    pub windows: Vec<WindowResult>,
    /// Messages refused.
    pub dead_letters: Vec<DeadLetterOut>,
}

impl PathOutput {
    /// Whether nothing was produced.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty() && self.dead_letters.is_empty()
    }
}

/// Counters of a path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStats {
    /// Repeats dropped by reaction id.
    pub duplicates: u64,
    /// Reactions counted after their window closed.
    pub late: u64,
}

/// Why a path cannot restore its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot restore reaction path state: {0}")]
pub struct PathError(pub String);

/// The seam between the simulator and the reaction pipeline (see the
/// [module docs](self)).
pub trait ReactionPath: Send {
    /// A short name for reports.
    fn name(&self) -> &'static str;
    /// A batch was sent: who got which creative (feeds the message table
    /// the join reads).
    fn batch_sent(&mut self, batch: u32, sent_ms: u64, decisions: &Decisions);
    /// One message from the reactions topic.
    fn process(&mut self, offset: u64, arrival_ms: u64, payload: &[u8], out: &mut PathOutput);
    /// Punctuation: stream time advances to at least `now_ms`, closing
    /// windows (and flushing late corrections).
    fn advance(&mut self, now_ms: u64, out: &mut PathOutput);
    /// The state to commit with the outputs emitted so far (the counted
    /// reactions of emitted windows need not be in it: they are in the
    /// outputs).
    fn state(&self) -> serde_json::Value;
    /// Restores the last committed state; `counted` yields the id of every
    /// reaction in every committed output.
    fn restore(
        &mut self,
        state: Option<&serde_json::Value>,
        counted: &mut dyn Iterator<Item = u64>,
    ) -> Result<(), PathError>;
    /// Its counters.
    fn stats(&self) -> PathStats;
}

/// The path a scenario runs (`pipeline.kind`): the domain's stream
/// pipeline ([`PipelinePath`](crate::reaction_pipeline::PipelinePath)) or
/// the built-in one.
pub fn make_path(
    scenario: &Scenario,
    population: Arc<SimPopulation>,
) -> Result<Box<dyn ReactionPath>, PathError> {
    let pl = &scenario.pipeline;
    Ok(match pl.kind {
        PathKind::Builtin => Box::new(BuiltinPath::new(
            &scenario.name,
            population,
            pl.window_ms,
            pl.grace_ms,
        )),
        PathKind::Dsl => Box::new(PipelinePath::new(
            &scenario.name,
            campaign_info(scenario),
            population,
            pl.window_ms,
            pl.grace_ms,
        )?),
    })
}

/// What the pipeline's campaign table says about the scenario's campaign:
/// its batches and creatives, reactions from its start to a week after the
/// last batch is due (a batch is sent late only after a crash, and a
/// reaction comes at most `reactions.max_delay_ms` after its message).
pub fn campaign_info(scenario: &Scenario) -> CampaignInfo {
    let horizon = scenario
        .reactions
        .max_delay_ms
        .saturating_add(7 * 24 * 3_600_000);
    CampaignInfo::from_spec(&scenario.campaign_spec(), horizon)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    stream_time_ms: u64,
    open: BTreeMap<u64, Vec<Counted>>,
    late: Vec<Counted>,
    late_seq: BTreeMap<u64, u32>,
    stats: PathStats,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    id: u64,
    #[serde(borrow)]
    campaign: Cow<'a, str>,
    batch: u32,
    user: u32,
    creative: u16,
    #[serde(rename = "reaction", borrow)]
    kind: Cow<'a, str>,
    time_ms: u64,
}

/// The built-in path (see the [module docs](self)).
pub struct BuiltinPath {
    campaign: String,
    pop: Arc<SimPopulation>,
    window_ms: u64,
    grace_ms: u64,
    /// Per population row: 0 = no message, else `(batch + 1) * 65536 + creative`.
    sent: Vec<u64>,
    batch_sent_ms: Vec<Option<u64>>,
    seen: HashSet<u64>,
    st: State,
}

impl std::fmt::Debug for BuiltinPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltinPath")
            .field("campaign", &self.campaign)
            .field("stream_time_ms", &self.st.stream_time_ms)
            .field("open_windows", &self.st.open.len())
            .finish_non_exhaustive()
    }
}

impl BuiltinPath {
    /// A path for campaign `campaign` over `population`, with tumbling
    /// windows of `window_ms` and `grace_ms` of grace.
    pub fn new(campaign: &str, pop: Arc<SimPopulation>, window_ms: u64, grace_ms: u64) -> Self {
        Self {
            campaign: campaign.to_owned(),
            sent: vec![0; pop.len()],
            pop,
            window_ms: window_ms.max(1),
            grace_ms,
            batch_sent_ms: Vec::new(),
            seen: HashSet::new(),
            st: State::default(),
        }
    }

    fn validate(&self, arrival_ms: u64, payload: &[u8]) -> Result<Counted, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8 text".to_owned())?;
        let m: Incoming<'_> =
            serde_json::from_str(text).map_err(|e| format!("not a valid reaction: {e}"))?;
        if m.campaign != self.campaign {
            return Err(format!(
                "campaign {:?} is not this campaign ({:?})",
                m.campaign, self.campaign
            ));
        }
        if !REACTION_TYPES.contains(&&*m.kind) {
            return Err(format!("unknown reaction type {:?}", m.kind));
        }
        let sent_ms = self
            .batch_sent_ms
            .get(m.batch as usize)
            .copied()
            .flatten()
            .ok_or_else(|| format!("batch {} was not sent", m.batch))?;
        let row = self
            .pop
            .row_of(m.user)
            .ok_or_else(|| format!("user {} is not a subscriber", m.user))?;
        let code = self.sent[row];
        let want = (u64::from(m.batch) + 1) * 65_536 + u64::from(m.creative);
        if code != want {
            if code == 0 || code / 65_536 != u64::from(m.batch) + 1 {
                return Err(format!(
                    "user {} got no message in batch {}",
                    m.user, m.batch
                ));
            }
            return Err(format!(
                "user {} got creative {} in batch {}, not creative {}",
                m.user,
                code % 65_536,
                m.batch,
                m.creative
            ));
        }
        if m.time_ms < sent_ms {
            return Err(format!(
                "reaction at {} precedes its message (sent at {sent_ms})",
                m.time_ms
            ));
        }
        if m.time_ms > arrival_ms {
            return Err(format!(
                "reaction time {} is after its arrival ({arrival_ms})",
                m.time_ms
            ));
        }
        Ok(Counted {
            id: m.id,
            user: m.user,
            creative: m.creative,
            batch: m.batch,
            time_ms: m.time_ms,
            x: self.pop.candidates().row(row).to_vec(),
        })
    }

    fn result(&self, start: u64, late: u32, reactions: Vec<Counted>) -> WindowResult {
        let mut per_creative = vec![0u32; self.pop.creatives()];
        for r in &reactions {
            if let Some(n) = per_creative.get_mut(usize::from(r.creative)) {
                *n += 1;
            }
        }
        WindowResult {
            window_start_ms: start,
            late,
            per_creative,
            reactions,
        }
    }

    /// Emits every window closed at the current stream time, then the late
    /// corrections.
    fn emit(&mut self, out: &mut PathOutput) {
        let reach = self.window_ms + self.grace_ms;
        while let Some((&start, _)) = self.st.open.first_key_value() {
            if start + reach > self.st.stream_time_ms {
                break;
            }
            let reactions = self.st.open.remove(&start).unwrap_or_default();
            out.windows.push(self.result(start, 0, reactions));
        }
        if !self.st.late.is_empty() {
            let mut by_window: BTreeMap<u64, Vec<Counted>> = BTreeMap::new();
            for r in std::mem::take(&mut self.st.late) {
                by_window
                    .entry(r.time_ms - r.time_ms % self.window_ms)
                    .or_default()
                    .push(r);
            }
            for (start, reactions) in by_window {
                let seq = self.st.late_seq.entry(start).or_insert(0);
                *seq += 1;
                let seq = *seq;
                out.windows.push(self.result(start, seq, reactions));
            }
        }
    }
}

impl ReactionPath for BuiltinPath {
    fn name(&self) -> &'static str {
        "built-in"
    }

    fn batch_sent(&mut self, batch: u32, sent_ms: u64, decisions: &Decisions) {
        let b = batch as usize;
        if self.batch_sent_ms.len() <= b {
            self.batch_sent_ms.resize(b + 1, None);
        }
        self.batch_sent_ms[b] = Some(sent_ms);
        for (user, creative, _) in decisions.iter() {
            if let Some(row) = self.pop.row_of(user) {
                self.sent[row] = (u64::from(batch) + 1) * 65_536 + u64::from(creative);
            }
        }
    }

    fn process(&mut self, offset: u64, arrival_ms: u64, payload: &[u8], out: &mut PathOutput) {
        let r = match self.validate(arrival_ms, payload) {
            Ok(r) => r,
            Err(reason) => {
                let cut = payload.len().min(512);
                out.dead_letters.push(DeadLetterOut {
                    offset,
                    arrival_ms,
                    reason,
                    payload: String::from_utf8_lossy(&payload[..cut]).into_owned(),
                });
                return;
            }
        };
        if !self.seen.insert(r.id) {
            self.st.stats.duplicates += 1;
            return;
        }
        self.st.stream_time_ms = self.st.stream_time_ms.max(r.time_ms);
        let start = r.time_ms - r.time_ms % self.window_ms;
        if start + self.window_ms + self.grace_ms <= self.st.stream_time_ms {
            self.st.stats.late += 1;
            self.st.late.push(r);
        } else {
            self.st.open.entry(start).or_default().push(r);
        }
        self.emit(out);
    }

    fn advance(&mut self, now_ms: u64, out: &mut PathOutput) {
        self.st.stream_time_ms = self.st.stream_time_ms.max(now_ms);
        self.emit(out);
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.st).unwrap_or(serde_json::Value::Null)
    }

    fn restore(
        &mut self,
        state: Option<&serde_json::Value>,
        counted: &mut dyn Iterator<Item = u64>,
    ) -> Result<(), PathError> {
        self.st = match state {
            None => State::default(),
            Some(v) => State::deserialize(v).map_err(|e| PathError(e.to_string()))?,
        };
        self.seen.clear();
        self.seen.extend(counted);
        let pop = Arc::clone(&self.pop);
        let open = self.st.open.values_mut().flatten();
        for r in open.chain(self.st.late.iter_mut()) {
            self.seen.insert(r.id);
            r.x = pop
                .features(r.user)
                .map(<[f32]>::to_vec)
                .unwrap_or_default();
        }
        Ok(())
    }

    fn stats(&self) -> PathStats {
        self.st.stats
    }
}
