//! `smartmsg replay`: rebuild every campaign aggregate and the simulator's
//! read models from a log, in the log's own (virtual) time, and check that
//! the replay reproduces what was recorded.
//!
//! Replay only applies recorded events (the domain's
//! [`Aggregate::evolve`]); nothing is re-decided: the users, creatives and
//! propensities of every batch come from its `BatchPlanned` event.
//!
//! Checks, per campaign stream:
//!
//! - **budget**: planned messages never exceed the budget, nor a batch its
//!   allowance at the time it was planned;
//! - **users once**: no user is planned twice (across and within batches);
//! - **batches once**: batches are planned in order, each once, sent once,
//!   and only after being planned; nothing is planned or sent once the
//!   campaign is cancelled or completed;
//! - **time**: timestamps never go backwards within a stream (they drive
//!   windows and timers);
//! - **deterministic**: folding the events twice gives equal states;
//! - **snapshot**: where a snapshot store is present (`snapshots.redb`
//!   beside the log), the latest snapshot equals the replayed state at its
//!   version;
//! - **reaction pipeline**: the pipeline's input is in the log; replay runs
//!   the topology over it again and checks that every output stream holds
//!   exactly what it emits, that the campaign recorded exactly the
//!   pipeline's windows and late reactions, and that each model feedback
//!   event is what the pipeline had counted by then (see
//!   [`crate::replay_pipeline`]).
//!
//! Measured with `smartmsg replay DIR --repeat 9` (median of in-process
//! runs): the default simulation's logs (1,200–1,900 events, 1.8–3.6 MB,
//! 100,000 decisions and 5,600–23,500 reactions each) replay in 9–16 ms,
//! 118–147 k events/s; opening and reading the log is 1–4 ms of it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use smartmsg_domain::{Campaign, CampaignEvent, Decisions, Part, Status};
use smartmsg_embedded::{EmbeddedLog, RedbSnapshots};
use smartmsg_engine::{Aggregate, EventCodec, RecordedEvent, SnapshotStore, StreamId};

use crate::events::{ModelFed, MODEL_FED};
use crate::portable::{self, PortableError};
use crate::replay_pipeline::{PipelineLog, OUTPUTS};

/// Why a replay could not run (a failed check is not an error: see
/// [`CampaignReplay::violations`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Reading the log or file failed.
    #[error(transparent)]
    Source(#[from] PortableError),
    /// An event does not decode.
    #[error("event at position {position} ({kind}): {reason}")]
    Decode {
        /// Its position.
        position: u64,
        /// Its kind.
        kind: String,
        /// Why.
        reason: String,
    },
    /// The options are invalid.
    #[error("replay options: {0}")]
    Options(String),
    /// The snapshot store cannot be read.
    #[error("snapshots {path}: {reason}")]
    Snapshots {
        /// The store.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// One campaign rebuilt from its stream.
#[derive(Debug, Clone)]
pub struct CampaignReplay {
    /// The stream.
    pub stream: String,
    /// The state after every event.
    pub state: Campaign,
    /// Events folded.
    pub events: u64,
    /// Batches planned, and sent.
    pub batches_planned: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Messages planned.
    pub messages_planned: u64,
    /// Reactions recorded (all creatives).
    pub reactions: u64,
    /// First and last timestamp (virtual time).
    pub time_span_ms: (u64, u64),
    /// Whether a snapshot was compared (and at which version).
    pub snapshot_checked: Option<u64>,
    /// The reaction pipeline run again: windows and late reactions
    /// checked, input records run, model feedback events re-derived (see
    /// [`crate::replay_pipeline`]).
    pub path_checked: Option<(u64, u64, u64)>,
    /// Broken checks.
    pub violations: Vec<String>,
}

/// What a replay found.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    /// Events in the log.
    pub events: u64,
    /// Payload bytes in the log.
    pub payload_bytes: u64,
    /// Campaigns rebuilt.
    pub campaigns: Vec<CampaignReplay>,
    /// Seconds spent reading (and parsing) the source.
    pub read_s: f64,
    /// Seconds spent folding and checking.
    pub fold_s: f64,
}

impl ReplayReport {
    /// Events per second, end to end (read + fold + checks).
    pub fn rate(&self) -> f64 {
        self.events as f64 / (self.read_s + self.fold_s).max(1e-9)
    }

    /// Every broken check.
    pub fn violations(&self) -> Vec<String> {
        self.campaigns
            .iter()
            .flat_map(|c| c.violations.iter().map(|v| format!("{}: {v}", c.stream)))
            .collect()
    }

    /// The summary as text.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for c in &self.campaigns {
            let _ = writeln!(
                s,
                "{}: {}, {} batches planned ({} sent), {} messages, {} reactions, budget left {}, {} events over {:.1} h of virtual time{}",
                c.stream,
                c.state.status().map_or("not created".into(), |s| s.to_string()),
                c.batches_planned,
                c.batches_sent,
                c.messages_planned,
                c.reactions,
                c.state.remaining_budget(),
                c.events,
                (c.time_span_ms.1.saturating_sub(c.time_span_ms.0)) as f64 / 3.6e6,
                c.snapshot_checked
                    .map_or(String::new(), |v| format!(", snapshot at version {v} matches"))
            );
            if let Some((w, r, m)) = c.path_checked {
                let _ = writeln!(
                    s,
                    "  reaction pipeline: run again over its {r} input records, every output the same; {w} windows and late reactions recorded once; model feedback of {m} batches re-derived"
                );
            }
            if c.violations.is_empty() {
                let _ = writeln!(s, "  checks: all hold");
            }
            for v in &c.violations {
                let _ = writeln!(s, "  VIOLATION {v}");
            }
        }
        let _ = writeln!(
            s,
            "{} events ({:.1} MB of payload) replayed in {:.3} s (read {:.3} s, fold and check {:.3} s): {:.0} events/s, {:.0} MB/s end to end",
            self.events,
            self.payload_bytes as f64 / 1e6,
            self.read_s + self.fold_s,
            self.read_s,
            self.fold_s,
            self.rate(),
            self.payload_bytes as f64 / 1e6 / (self.read_s + self.fold_s).max(1e-9)
        );
        s
    }
}

/// Replays `source`: a JSON Lines file (from `smartmsg export`) or a
/// directory holding one embedded log (see [`portable::find_log`]).
pub fn replay(source: &Path) -> Result<ReplayReport, ReplayError> {
    replay_with_options(source, &ReplayOptions::default())
}

/// [`replay`] with options.
pub fn replay_with_options(
    source: &Path,
    options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    if options.window_ms == 0 {
        return Err(ReplayError::Options("window_ms must be at least 1".into()));
    }
    let started = Instant::now();
    let (events, snapshots) = if source.is_file() {
        let events = portable::read_file(source, &smartmsg_engine::Limits::default())?;
        (events, None)
    } else {
        let log_dir = portable::find_log(source)?;
        let rt = portable::runtime(&log_dir)?;
        let events = rt.block_on(async {
            let log = EmbeddedLog::open(&log_dir).map_err(PortableError::from)?;
            portable::read_all(&log).await.map_err(PortableError::from)
        })?;
        let snap = log_dir
            .parent()
            .map(|p| p.join("snapshots.redb"))
            .filter(|p| p.is_file());
        (events, snap)
    };
    let read_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let snaps = match snapshots {
        Some(path) => load_snapshots(&path, &events)?,
        None => HashMap::new(),
    };
    let mut report = replay_with(&events, &snaps, options)?;
    report.read_s = read_s;
    report.fold_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn decode(e: &RecordedEvent) -> Result<CampaignEvent, ReplayError> {
    CampaignEvent::decode(&e.kind, e.schema, &e.payload).map_err(|err| ReplayError::Decode {
        position: e.position,
        kind: e.kind.clone(),
        reason: err.to_string(),
    })
}

/// A set of user ids: a bitmap for ids below 2^26 (dense indices into a
/// population; at most 8 MiB), a hash set above (a damaged log's ids must
/// not size the bitmap).
#[derive(Default)]
struct Seen(Vec<u64>, HashSet<u32>);

impl Seen {
    const BITMAP_IDS: u32 = 1 << 26;

    /// Adds `u`; false if it was there already.
    fn insert(&mut self, u: u32) -> bool {
        if u >= Self::BITMAP_IDS {
            return self.1.insert(u);
        }
        let (word, bit) = ((u / 64) as usize, 1u64 << (u % 64));
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }
}

/// Per-campaign fold with the independent checks.
struct Fold {
    state: Campaign,
    events: u64,
    users: Seen,
    planned: u64,
    sent: HashSet<u32>,
    first_ms: Option<u64>,
    last_ms: u64,
    recorded_windows: Vec<String>,
    violations: Vec<String>,
    /// A batch recorded in parts whose last part has not been seen yet.
    open: Option<OpenBatch>,
}

/// A batch recorded in several parts, while its parts are read.
struct OpenBatch {
    batch: u32,
    /// The part expected next.
    next: Part,
    /// Its allowance when its first part was planned.
    allowance: u64,
    /// Messages in its parts so far.
    messages: u64,
}

impl Fold {
    fn new() -> Self {
        Self {
            state: Campaign::default(),
            events: 0,
            users: Seen::default(),
            planned: 0,
            sent: HashSet::new(),
            first_ms: None,
            last_ms: 0,
            recorded_windows: Vec::new(),
            violations: Vec::new(),
            open: None,
        }
    }

    /// A violation if a batch's parts stopped before its last (they are
    /// one transaction, so a reader sees all of them or none).
    fn close_parts(&mut self) {
        if let Some(o) = self.open.take() {
            self.violation(format!(
                "parts: batch {} ends after part {} of {}",
                o.batch, o.next.index, o.next.count
            ));
        }
    }

    fn violation(&mut self, v: String) {
        if self.violations.len() < 20 {
            self.violations.push(v);
        }
    }

    /// The budget and users-once checks of planned decisions (a batch or
    /// one of its parts).
    fn planned_users(&mut self, batch: u32, decisions: &Decisions) {
        self.planned += decisions.len() as u64;
        if let Some(spec) = self.state.spec() {
            if self.planned > spec.budget {
                self.violation(format!(
                    "budget: {} messages planned, budget {}",
                    self.planned, spec.budget
                ));
            }
        }
        for &u in &decisions.users {
            if !self.users.insert(u) {
                self.violation(format!(
                    "users once: user {u} planned again in batch {batch}"
                ));
            }
        }
    }

    fn apply(&mut self, e: &RecordedEvent, ev: &CampaignEvent) {
        if e.timestamp_ms < self.last_ms {
            self.violation(format!(
                "time: version {} at {} ms is before the previous event ({} ms)",
                e.version, e.timestamp_ms, self.last_ms
            ));
        }
        self.first_ms.get_or_insert(e.timestamp_ms);
        self.last_ms = self.last_ms.max(e.timestamp_ms);
        let closed = matches!(
            self.state.status(),
            Some(Status::Cancelled | Status::Completed)
        );
        let later_part = matches!(ev, CampaignEvent::BatchPlanned { part, .. } if !part.is_first());
        if !later_part {
            self.close_parts();
        }
        match ev {
            CampaignEvent::BatchPlanned {
                batch,
                part,
                decisions,
                ..
            } if !part.is_first() => {
                // A later part of a large batch: it must follow the part
                // before it; the batch's checks run on its parts joined.
                let n = decisions.len() as u64;
                match self.open.take() {
                    Some(mut o) if o.batch == *batch && o.next == *part => {
                        o.messages += n;
                        if o.messages > o.allowance {
                            self.violation(format!(
                                "budget: batch {batch} plans {} messages, allowance {}",
                                o.messages, o.allowance
                            ));
                        }
                        if !part.is_last() {
                            o.next.index += 1;
                            self.open = Some(o);
                        }
                    }
                    _ => self.violation(format!(
                        "parts: batch {batch} part {} of {} does not follow the part before it",
                        part.index, part.count
                    )),
                }
                self.planned_users(*batch, decisions);
            }
            CampaignEvent::BatchPlanned {
                batch,
                part,
                decisions,
                ..
            } => {
                if closed {
                    self.violation(format!(
                        "batches once: batch {batch} planned after the campaign closed"
                    ));
                }
                if *batch as usize != self.state.batches().len() {
                    self.violation(format!(
                        "batches once: batch {batch} planned when {} batches exist",
                        self.state.batches().len()
                    ));
                }
                let allowance = self.state.batch_allowance(*batch);
                if decisions.len() as u64 > allowance {
                    self.violation(format!(
                        "budget: batch {batch} plans {} messages, allowance {allowance}",
                        decisions.len()
                    ));
                }
                if !part.is_last() {
                    self.open = Some(OpenBatch {
                        batch: *batch,
                        next: Part {
                            index: 1,
                            count: part.count,
                        },
                        allowance,
                        messages: decisions.len() as u64,
                    });
                }
                self.planned_users(*batch, decisions);
            }
            CampaignEvent::BatchSent { batch, .. } => {
                if closed {
                    self.violation(format!(
                        "batches once: batch {batch} sent after the campaign closed"
                    ));
                }
                if *batch as usize >= self.state.batches().len() {
                    self.violation(format!(
                        "batches once: batch {batch} sent before it was planned"
                    ));
                }
                if !self.sent.insert(*batch) {
                    self.violation(format!("batches once: batch {batch} sent twice"));
                }
            }
            CampaignEvent::ReactionsRecorded { command, .. } => {
                self.recorded_windows.push(command.id.clone());
            }
            _ => {}
        }
        self.state.evolve(ev);
        self.events += 1;
    }
}

/// How to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayOptions {
    /// Unused: the pipeline's window length is in the log (each campaign's
    /// registration). Kept so that callers of earlier versions compile.
    pub window_ms: u64,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self { window_ms: 60_000 }
    }
}

/// Replays events already in memory (position order).
pub fn replay_events(events: &[RecordedEvent]) -> Result<ReplayReport, ReplayError> {
    replay_with(events, &HashMap::new(), &ReplayOptions::default())
}

/// Campaign events decoded once: (stream, version, event).
type Decoded<'a> = Vec<(&'a str, u64, CampaignEvent)>;

/// The latest snapshot of a campaign stream: its version and state (`None`
/// if it does not decode).
type Snapshots = HashMap<String, (u64, Option<Campaign>)>;

fn replay_with(
    events: &[RecordedEvent],
    snaps: &Snapshots,
    _options: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let mut decoded: Decoded<'_> = Vec::new();
    let mut folds: BTreeMap<&str, Fold> = BTreeMap::new();
    // Each campaign's pipeline: its registration, audience, input, outputs
    // and feedback, by campaign id.
    let mut pipelines: HashMap<String, PipelineLog> = HashMap::new();
    let bad = |e: &RecordedEvent, err: String| ReplayError::Decode {
        position: e.position,
        kind: e.kind.clone(),
        reason: err,
    };
    for e in events {
        let stream = e.stream.as_str();
        if let Some(name) = stream.strip_prefix("campaign-") {
            let ev = decode(e)?;
            if let CampaignEvent::BatchPlanned {
                batch,
                part,
                decisions,
                ..
            } = &ev
            {
                pipelines
                    .entry(name.to_owned())
                    .or_default()
                    .planned(*batch, *part, decisions);
            }
            folds.entry(stream).or_insert_with(Fold::new).apply(e, &ev);
            decoded.push((stream, e.version, ev));
        } else if stream == smartmsg_service::streams::REGISTRY {
            if e.kind == smartmsg_service::runtime::REGISTERED {
                let reg: smartmsg_service::runtime::Registration =
                    serde_json::from_slice(&e.payload).map_err(|err| bad(e, err.to_string()))?;
                let id = reg.id.clone();
                pipelines.entry(id).or_default().registration = Some(reg);
            }
        } else if let Some(name) = stream.strip_prefix("audience-") {
            pipelines
                .entry(name.to_owned())
                .or_default()
                .audience
                .push(e.clone());
        } else if let Some(name) = stream.strip_prefix("pipeline-") {
            pipelines
                .entry(name.to_owned())
                .or_default()
                .input
                .push(e.clone());
        } else if let Some(name) = stream.strip_prefix("model-feedback-") {
            if e.kind == MODEL_FED {
                let m: ModelFed =
                    serde_json::from_slice(&e.payload).map_err(|err| bad(e, err.to_string()))?;
                pipelines
                    .entry(name.to_owned())
                    .or_default()
                    .fed(e.position, e.timestamp_ms, m);
            }
        } else if let Some((output, name)) = OUTPUTS.iter().find_map(|o| {
            stream
                .strip_prefix(*o)
                .and_then(|rest| rest.strip_prefix('-'))
                .map(|n| (*o, n))
        }) {
            pipelines
                .entry(name.to_owned())
                .or_default()
                .outputs
                .entry(output)
                .or_default()
                .push(e.clone());
        }
    }
    // Deterministic: a second fold of the same events gives the same state.
    // It also keeps the state at each snapshot's version for the snapshot
    // check (one fold fewer).
    let mut second: BTreeMap<&str, Campaign> = BTreeMap::new();
    let mut at_snapshot: HashMap<&str, Campaign> = HashMap::new();
    for (stream, version, ev) in &decoded {
        let state = second.entry(stream).or_default();
        state.evolve(ev);
        if snaps.get(*stream).map(|s| s.0) == Some(*version) {
            at_snapshot.insert(stream, state.clone());
        }
    }
    let mut campaigns = Vec::new();
    for (stream, mut f) in folds {
        f.close_parts();
        if second.get(stream) != Some(&f.state) {
            f.violation("deterministic: a second fold gives a different state".into());
        }
        let name = stream.trim_start_matches("campaign-");
        let mut path_checked = None;
        if let Some(p) = pipelines.get(name).filter(|p| p.registration.is_some()) {
            // A campaign created with another's audience reads that
            // campaign's audience stream.
            let owner = p
                .registration
                .as_ref()
                .map_or(name, |reg| reg.audience_owner());
            let audience = pipelines.get(owner).map_or(&[][..], |o| &o.audience[..]);
            let r = p.check(name, &f.state, audience);
            path_checked = Some((r.windows, r.records, r.feedback));
            for v in &r.violations {
                f.violation(v.clone());
            }
            let unknown = f
                .recorded_windows
                .iter()
                .filter(|id| !r.command_ids.contains(*id))
                .count();
            if unknown > 0 {
                f.violation(format!(
                    "recorded once: {unknown} recorded reaction window(s) do not come from the pipeline"
                ));
            }
        }
        let mut snapshot_checked = None;
        if let Some((version, saved)) = snaps.get(stream) {
            match (saved, at_snapshot.get(stream)) {
                (None, _) => f.violation(format!("snapshot: version {version} does not decode")),
                (Some(saved), Some(state)) if saved == state => snapshot_checked = Some(*version),
                (Some(_), Some(_)) => f.violation(format!(
                    "snapshot: the replayed state at version {version} differs from the stored snapshot"
                )),
                (Some(_), None) => f.violation(format!(
                    "snapshot: version {version} is beyond the stream's events"
                )),
            }
        }
        let c = &f.state;
        campaigns.push(CampaignReplay {
            stream: stream.to_owned(),
            events: f.events,
            batches_planned: c.batches().len() as u64,
            batches_sent: c.batches().iter().filter(|b| b.sent).count() as u64,
            messages_planned: c.reserved(),
            reactions: c.creative_stats().iter().map(|s| s.reactions).sum(),
            time_span_ms: (f.first_ms.unwrap_or(0), f.last_ms),
            snapshot_checked,
            path_checked,
            violations: f.violations,
            state: f.state,
        });
    }
    Ok(ReplayReport {
        events: events.len() as u64,
        payload_bytes: events.iter().map(|e| e.payload.len() as u64).sum(),
        campaigns,
        read_s: 0.0,
        fold_s: 0.0,
    })
}

/// The latest snapshot of every campaign stream of `events` (those with a
/// snapshot at the campaign's current schema).
fn load_snapshots(path: &Path, events: &[RecordedEvent]) -> Result<Snapshots, ReplayError> {
    let err = |reason: String| ReplayError::Snapshots {
        path: path.to_owned(),
        reason,
    };
    let store = RedbSnapshots::open(path).map_err(|e| err(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| err(e.to_string()))?;
    let streams: BTreeSet<&StreamId> = events
        .iter()
        .map(|e| &e.stream)
        .filter(|s| s.as_str().starts_with("campaign-"))
        .collect();
    let mut out = Snapshots::new();
    for stream in streams {
        let Some(snap) = rt
            .block_on(store.load(stream))
            .map_err(|e| err(e.to_string()))?
        else {
            continue;
        };
        if snap.schema != Campaign::SNAPSHOT_SCHEMA {
            continue;
        }
        out.insert(
            stream.as_str().to_owned(),
            (snap.version, Campaign::decode_snapshot(&snap.state)),
        );
    }
    Ok(out)
}
