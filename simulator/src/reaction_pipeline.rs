//! The reaction path on the real pipeline: the domain's
//! [`reaction_topology`] (parse and validate, join with the campaign and
//! user tables, count each user once, one-minute windows with grace) run
//! by the engine's stream [`Task`].
//!
//! [`PipelinePath`] feeds the topology's inputs and turns its outputs into
//! what the simulator commits:
//!
//! - the campaign table ([`INPUT_CAMPAIGNS`]) gets the campaign's
//!   [`CampaignInfo`] once; the user table ([`INPUT_PROFILES`]) gets the
//!   profile (features) of every user of a sent batch;
//! - each topic message goes to [`INPUT_REACTIONS`] with its arrival time
//!   as the record timestamp (the topic's append time; the pipeline windows
//!   by the reaction's own time);
//! - [`DEAD_LETTERS`] become dead letters with the pipeline's reason;
//! - [`USER_OUTCOMES`] (a user's first reaction, joined with the features)
//!   are the per-reaction records the model learns from: each is held with
//!   its window until [`REACTION_WINDOWS`] emits that window closed, whose
//!   counts per creative ([`ReactionWindow::reactions_per_creative`]) are
//!   the window result's (the invariant checks compare them with the held
//!   records);
//! - a first reaction whose window had already closed goes to
//!   [`LATE_REACTIONS`]; unlike Kafka Streams we count it exactly once too,
//!   as a correction of its window (`late ≥ 1`), like the built-in path.
//!
//! A repeat (a user already counted) yields no output: the pipeline's
//! dedupe store drops it, and the path counts it as a duplicate.
//!
//! # State
//!
//! The committed state is small and complete: the task's stream time and
//! counters, the records held in the open windows, the late-correction
//! numbers and the counters. [`ReactionPath::restore`] rebuilds the
//! task's stores through the topology itself: the campaign and user
//! tables from their inputs (the caller hands every sent batch again),
//! the dedupe store by piping every counted reaction back in at a stream
//! time that closes every window (so it lands in the dedupe store and
//! nothing else), and the open windows by piping their held records back
//! in, in order, before stream time is set back to the committed one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_domain::reactions::{
    reaction_topology, CampaignInfo, DeadLetter, ReactionConfig, ReactionKind, ReactionMessage,
    ReactionWindow, UserProfile, UserReaction, DEAD_LETTERS, INPUT_CAMPAIGNS, INPUT_PROFILES,
    INPUT_REACTIONS, LATE_REACTIONS, REACTION_WINDOWS, USER_OUTCOMES,
};
use smartmsg_domain::Decisions;
use smartmsg_engine::stream::{
    Input, Json, LateRecord, Record, StreamError, Task, TaskMeta, TaskMetrics, Topology, Windowed,
};

use crate::population::SimPopulation;
use crate::reaction::{
    Counted, DeadLetterOut, PathError, PathOutput, PathStats, ReactionPath, WindowResult,
};
use crate::world::reaction_id;

/// A built task with its reactions and profiles inputs.
type Built = (Task, Input<Bytes, Bytes>, Input<Bytes, Bytes>);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct State {
    /// The task's stream time.
    stream_time_ms: u64,
    /// The task's counters.
    processed: u64,
    late_records: u64,
    /// Records held per open window (start), in the order counted.
    open: BTreeMap<u64, Vec<Counted>>,
    /// Corrections emitted per window.
    late_seq: BTreeMap<u64, u32>,
    stats: PathStats,
}

/// The reaction path on the domain's pipeline (see the [module
/// docs](self)).
pub struct PipelinePath {
    campaign: String,
    info: CampaignInfo,
    config: ReactionConfig,
    pop: Arc<SimPopulation>,
    task: Task,
    reactions_in: Input<Bytes, Bytes>,
    profiles_in: Input<Bytes, Bytes>,
    /// Per user of a sent batch: (batch, creative).
    sent: HashMap<u32, (u32, u16)>,
    /// Users of each sent batch, in decision order (to refeed profiles).
    batch_users: BTreeMap<u32, Vec<u32>>,
    st: State,
}

impl std::fmt::Debug for PipelinePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelinePath")
            .field("campaign", &self.campaign)
            .field("stream_time_ms", &self.task.stream_time())
            .field("open_windows", &self.st.open.len())
            .finish_non_exhaustive()
    }
}

fn err(e: impl std::fmt::Display) -> PathError {
    PathError(e.to_string())
}

impl PipelinePath {
    /// A path for campaign `campaign` (described to the pipeline by
    /// `info`) over `pop`, with tumbling windows of `window_ms` and
    /// `grace_ms` of grace.
    pub fn new(
        campaign: &str,
        info: CampaignInfo,
        pop: Arc<SimPopulation>,
        window_ms: u64,
        grace_ms: u64,
    ) -> Result<Self, PathError> {
        let mut config = ReactionConfig::new(pop.dim());
        config.window_ms = window_ms.max(1);
        config.grace_ms = grace_ms;
        let (task, reactions_in, profiles_in) = Self::build(config, campaign, &info)?;
        Ok(Self {
            campaign: campaign.to_owned(),
            info,
            config,
            pop,
            task,
            reactions_in,
            profiles_in,
            sent: HashMap::new(),
            batch_users: BTreeMap::new(),
            st: State::default(),
        })
    }

    /// The topology this path runs.
    pub fn topology(config: ReactionConfig) -> Result<Topology, PathError> {
        reaction_topology(config).map_err(err)
    }

    /// Builds the task and feeds it the campaign table.
    fn build(
        config: ReactionConfig,
        campaign: &str,
        info: &CampaignInfo,
    ) -> Result<Built, PathError> {
        let mut task = Self::topology(config)?.build().map_err(err)?;
        let campaigns = task
            .input::<String, Json<CampaignInfo>>(INPUT_CAMPAIGNS)
            .map_err(err)?;
        task.process(
            campaigns,
            Record::new(campaign.to_owned(), Json(info.clone()), 0),
        )
        .map_err(err)?;
        let reactions = task.input::<Bytes, Bytes>(INPUT_REACTIONS).map_err(err)?;
        let profiles = task.input::<Bytes, Bytes>(INPUT_PROFILES).map_err(err)?;
        Ok((task, reactions, profiles))
    }

    fn feed_profiles(&mut self, users: &[u32]) -> Result<(), StreamError> {
        for &user in users {
            let Some(x) = self.pop.features(user) else {
                continue;
            };
            let profile = UserProfile {
                user,
                features: x.to_vec(),
            };
            let bytes = serde_json::to_vec(&profile).unwrap_or_default();
            self.task.process(
                self.profiles_in,
                Record::new(Bytes::new(), Bytes::from(bytes), 0),
            )?;
        }
        Ok(())
    }

    fn counted(&self, user: u32, r: &UserReaction) -> Counted {
        Counted {
            id: reaction_id(r.batch, user),
            user,
            creative: r.creative,
            batch: r.batch,
            time_ms: r.time_ms,
            x: self
                .pop
                .features(user)
                .map(<[f32]>::to_vec)
                .unwrap_or_default(),
        }
    }

    fn window_start(&self, time_ms: u64) -> u64 {
        time_ms - time_ms % self.config.window_ms
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

    /// Takes what the task emitted: closed windows first (with their held
    /// records), then first reactions (held, or late corrections), then
    /// dead letters. Returns whether a valid reaction was counted and
    /// whether the input was dead-lettered.
    fn collect(
        &mut self,
        offset: u64,
        arrival_ms: u64,
        out: &mut PathOutput,
    ) -> Result<(bool, bool), StreamError> {
        let windows = self
            .task
            .take_output::<Windowed<String>, Json<ReactionWindow>>(REACTION_WINDOWS)?;
        for r in windows {
            let Json(w) = r.value;
            let start = w.start_ms;
            let held = self.st.open.remove(&start).unwrap_or_default();
            let mut result = self.result(start, 0, held);
            // The pipeline's own counts: the invariant checks compare them
            // with the records.
            result.per_creative = w.reactions_per_creative(self.pop.creatives());
            out.windows.push(result);
        }
        let late: Vec<Record<String, LateRecord<Json<UserReaction>>>> =
            self.task.take_output(LATE_REACTIONS)?;
        let mut late_users: Vec<(u32, u64)> = late
            .iter()
            .map(|r| {
                let u = &r.value.value.0;
                (u.batch, u.time_ms)
            })
            .collect();
        let firsts = self
            .task
            .take_output::<(String, u32), Json<UserReaction>>(USER_OUTCOMES)?;
        let mut counted_any = false;
        let mut late_now: BTreeMap<u64, Vec<Counted>> = BTreeMap::new();
        for r in firsts {
            let (_, user) = r.key;
            let Json(u) = r.value;
            // Something new about the user, whether or not it is a
            // response: not a repeat.
            counted_any = true;
            if !u.reacted {
                continue;
            }
            let c = self.counted(user, &u);
            let start = self.window_start(c.time_ms);
            if let Some(i) = late_users
                .iter()
                .position(|&(b, t)| b == u.batch && t == u.time_ms)
            {
                late_users.swap_remove(i);
                self.st.stats.late += 1;
                late_now.entry(start).or_default().push(c);
            } else {
                self.st.open.entry(start).or_default().push(c);
            }
        }
        for (start, reactions) in late_now {
            let seq = self.st.late_seq.entry(start).or_insert(0);
            *seq += 1;
            let seq = *seq;
            out.windows.push(self.result(start, seq, reactions));
        }
        let dead = self
            .task
            .take_output::<String, Json<DeadLetter>>(DEAD_LETTERS)?;
        let dead_lettered = !dead.is_empty();
        for r in dead {
            let Json(d) = r.value;
            out.dead_letters.push(DeadLetterOut {
                offset,
                arrival_ms,
                reason: format!("{} ({})", d.reason, d.input),
                payload: d.excerpt,
            });
        }
        Ok((counted_any, dead_lettered))
    }

    fn drain(&mut self) {
        let mut sink = Vec::new();
        self.task.drain_outputs(&mut sink);
    }

    fn message(&self, c: &Counted) -> Vec<u8> {
        // The kinds the world sends (both count as a response).
        let kind = match c.user % 2 {
            0 => ReactionKind::Clicked,
            _ => ReactionKind::Replied,
        };
        serde_json::to_vec(&ReactionMessage {
            campaign: self.campaign.clone(),
            batch: c.batch,
            user: c.user,
            creative: c.creative,
            reaction: kind,
            time_ms: c.time_ms,
        })
        .unwrap_or_default()
    }

    fn pipe(&mut self, payload: Vec<u8>, ts: u64) -> Result<(), StreamError> {
        self.task.process(
            self.reactions_in,
            Record::new(Bytes::new(), Bytes::from(payload), ts),
        )
    }

    fn try_restore(
        &mut self,
        st: State,
        counted: &mut dyn Iterator<Item = u64>,
    ) -> Result<(), PathError> {
        let (task, reactions_in, profiles_in) =
            Self::build(self.config, &self.campaign, &self.info)?;
        self.task = task;
        self.reactions_in = reactions_in;
        self.profiles_in = profiles_in;
        let users: Vec<u32> = self.batch_users.values().flatten().copied().collect();
        self.feed_profiles(&users).map_err(err)?;
        // The dedupe store: every counted reaction, after every window
        // closed (each is late, lands in the dedupe store only).
        self.task.advance_time(u64::MAX).map_err(err)?;
        let start = self.info.start_ms;
        for id in counted {
            let user = id as u32;
            let batch = (id >> 32) as u32;
            let creative = match self.sent.get(&user) {
                Some(&(b, c)) if b == batch => c,
                _ => {
                    return Err(PathError(format!(
                        "counted reaction {id}: user {user} got no message in batch {batch}"
                    )))
                }
            };
            let c = Counted {
                id,
                user,
                creative,
                batch,
                time_ms: start,
                x: Vec::new(),
            };
            let payload = self.message(&c);
            self.pipe(payload, 0).map_err(err)?;
        }
        self.drain();
        // The open windows: their records again, in order, at stream time 0.
        self.task.set_meta(TaskMeta::default());
        let mut open = st.open.clone();
        for reactions in open.values_mut() {
            for r in reactions.iter_mut() {
                let payload = self.message(r);
                self.pipe(payload, 0).map_err(err)?;
                r.x = self
                    .pop
                    .features(r.user)
                    .map(<[f32]>::to_vec)
                    .unwrap_or_default();
            }
        }
        let n: usize = open.values().map(Vec::len).sum();
        let firsts = self
            .task
            .take_output::<(String, u32), Json<UserReaction>>(USER_OUTCOMES)
            .map_err(err)?;
        if firsts.len() != n {
            return Err(PathError(format!(
                "{n} reactions in open windows, {} counted again",
                firsts.len()
            )));
        }
        self.drain();
        self.task.set_meta(TaskMeta {
            stream_time_ms: st.stream_time_ms,
            metrics: TaskMetrics {
                processed: st.processed,
                late_records: st.late_records,
            },
        });
        self.st = State { open, ..st };
        Ok(())
    }
}

impl ReactionPath for PipelinePath {
    fn name(&self) -> &'static str {
        "dsl"
    }

    fn batch_sent(&mut self, batch: u32, _sent_ms: u64, decisions: &Decisions) {
        let mut users = Vec::with_capacity(decisions.len());
        for (user, creative, _) in decisions.iter() {
            self.sent.insert(user, (batch, creative));
            users.push(user);
        }
        // A user's profile is in the table before any reaction to the
        // batch can arrive; a repeat is an idempotent upsert.
        if let Err(e) = self.feed_profiles(&users) {
            // Only a full store can refuse a profile; its users' reactions
            // are then dead-lettered as unknown users.
            eprintln!("reaction pipeline: profiles of batch {batch}: {e}");
        }
        self.drain();
        self.batch_users.insert(batch, users);
    }

    fn process(&mut self, offset: u64, arrival_ms: u64, payload: &[u8], out: &mut PathOutput) {
        let r = self
            .pipe(payload.to_vec(), arrival_ms)
            .and_then(|()| self.collect(offset, arrival_ms, out));
        match r {
            Ok((counted, dead)) => {
                if !counted && !dead {
                    self.st.stats.duplicates += 1;
                }
            }
            Err(e) => {
                let cut = payload.len().min(512);
                out.dead_letters.push(DeadLetterOut {
                    offset,
                    arrival_ms,
                    reason: format!("reaction pipeline failed: {e}"),
                    payload: String::from_utf8_lossy(&payload[..cut]).into_owned(),
                });
            }
        }
    }

    fn advance(&mut self, now_ms: u64, out: &mut PathOutput) {
        // Windows only: no input, so no dead letter can come of it.
        if let Err(e) = self
            .task
            .advance_time(now_ms)
            .and_then(|()| self.collect(u64::MAX, now_ms, out).map(|_| ()))
        {
            eprintln!("reaction pipeline: advance to {now_ms}: {e}");
        }
    }

    fn state(&self) -> serde_json::Value {
        let meta = self.task.meta();
        let st = State {
            stream_time_ms: meta.stream_time_ms,
            processed: meta.metrics.processed,
            late_records: meta.metrics.late_records,
            ..self.st.clone()
        };
        serde_json::to_value(&st).unwrap_or(serde_json::Value::Null)
    }

    fn restore(
        &mut self,
        state: Option<&serde_json::Value>,
        counted: &mut dyn Iterator<Item = u64>,
    ) -> Result<(), PathError> {
        let st = match state {
            None => State::default(),
            Some(v) => State::deserialize(v).map_err(err)?,
        };
        self.try_restore(st, counted)
    }

    fn stats(&self) -> PathStats {
        self.st.stats
    }
}
