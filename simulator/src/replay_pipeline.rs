//! Replay of a campaign's reaction pipeline: its input is in the log, so
//! replay runs it again and compares.
//!
//! The runtime feeds each campaign's pipeline from one stream
//! (`pipeline-<campaign>`: the campaign's info, batch announcements, raw
//! reactions, ticks) and appends what the pipeline emits to its output
//! streams. Replay expands the input exactly as the runtime's source does
//! ([`expand_event`]), with the audience and the plans from the log, runs
//! the domain's topology over it on a fresh task, and checks:
//!
//! - **same outputs**: every output stream (windows, first reactions, late
//!   reactions, dead letters) holds exactly what the topology emits, byte
//!   for byte, in order — whatever crashes and restarts the run had;
//! - **recorded once**: every reaction the campaign recorded comes from a
//!   closed window or a late reaction of the pipeline, and the campaign's
//!   reactions per creative equal theirs;
//! - **model feedback**: each `ModelFed` event's reacting users are exactly
//!   the users of that batch whose first reaction the pipeline had emitted
//!   before it, in a window closed by then.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use smartmsg_domain::reactions::{
    reaction_topology, DEAD_LETTERS, LATE_REACTIONS, REACTION_WINDOWS, USER_OUTCOMES,
};
use smartmsg_domain::{Audience, Campaign, Decisions, Part};
use smartmsg_engine::stream::{envelope, EncodedRecord, SourceRecord, PUNCTUATE};
use smartmsg_engine::RecordedEvent;
use smartmsg_service::audience;
use smartmsg_service::pipeline::{decode_late, decode_outcome, decode_window, expand_event};
use smartmsg_service::runtime::Registration;

use crate::events::ModelFed;

/// The outputs the runtime appends, by name.
pub(crate) const OUTPUTS: [&str; 4] = [
    DEAD_LETTERS,
    USER_OUTCOMES,
    REACTION_WINDOWS,
    LATE_REACTIONS,
];

/// Violations kept per campaign at most.
const MAX_VIOLATIONS: usize = 20;

/// What the log holds of one campaign's pipeline.
#[derive(Debug, Default)]
pub(crate) struct PipelineLog {
    pub(crate) registration: Option<Registration>,
    pub(crate) audience: Vec<RecordedEvent>,
    pub(crate) input: Vec<RecordedEvent>,
    pub(crate) outputs: BTreeMap<&'static str, Vec<RecordedEvent>>,
    pub(crate) feedback: Vec<(u64, u64, ModelFed)>,
    pub(crate) plans: Vec<Option<Decisions>>,
    /// Feedback recorded in parts, while its parts are read: the first
    /// part's position and time, and the parts so far.
    pending_feedback: Option<(u64, u64)>,
    pending_fed: Option<ModelFed>,
}

/// What a pipeline replay found.
#[derive(Debug, Default)]
pub(crate) struct PipelineReplay {
    /// Windows and late reactions checked.
    pub(crate) windows: u64,
    /// Input records run through the topology.
    pub(crate) records: u64,
    /// Model feedback events re-derived.
    pub(crate) feedback: u64,
    /// The command ids of every reaction recording the pipeline asks for.
    pub(crate) command_ids: std::collections::HashSet<String>,
    /// Broken checks.
    pub(crate) violations: Vec<String>,
}

impl PipelineReplay {
    fn violation(&mut self, v: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(v);
        }
    }
}

impl PipelineLog {
    /// A recorded `ModelFed` event: feedback in parts is joined, and kept
    /// at its first part's position and time once complete.
    pub(crate) fn fed(&mut self, position: u64, timestamp_ms: u64, m: ModelFed) {
        if m.part.is_first() {
            self.pending_feedback = Some((position, timestamp_ms));
        }
        if let Some(whole) = ModelFed::join(&mut self.pending_fed, m) {
            let (p, t) = self
                .pending_feedback
                .take()
                .unwrap_or((position, timestamp_ms));
            self.feedback.push((p, t, whole));
        }
    }

    /// A planned batch.
    pub(crate) fn planned(&mut self, batch: u32, part: Part, d: &Decisions) {
        let b = batch as usize;
        if b > smartmsg_domain::CampaignSpec::MAX_BATCHES as usize {
            return;
        }
        if self.plans.len() <= b {
            self.plans.resize(b + 1, None);
        }
        // A large batch comes in parts, in order: join them.
        match &mut self.plans[b] {
            Some(plan) if !part.is_first() => plan.append(d),
            slot => *slot = Some(d.clone()),
        }
    }

    /// Runs the checks (see the [module docs](self)) against `campaign`,
    /// the state the campaign's own events fold to; `audience` is the
    /// audience stream the registration names (its own or the campaign's
    /// whose audience it shares).
    pub(crate) fn check(
        &self,
        id: &str,
        campaign: &Campaign,
        audience: &[RecordedEvent],
    ) -> PipelineReplay {
        let mut r = PipelineReplay::default();
        let Some(reg) = &self.registration else {
            return r;
        };
        // The audience the runtime stored.
        let mut cands = None;
        let first = reg.audience_from.max(1);
        for e in audience
            .iter()
            .filter(|e| e.version >= first && e.version < first + reg.audience_chunks)
        {
            if let Err(why) = audience::decode_into(e, &mut cands) {
                r.violation(format!("audience chunk {}: {why}", e.version));
                return r;
            }
        }
        let aud = match cands.map(Audience::new) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                r.violation(format!("audience: {e}"));
                return r;
            }
            None => {
                r.violation("audience: not in the log".into());
                return r;
            }
        };
        let users: Vec<Option<Arc<Decisions>>> = self
            .plans
            .iter()
            .map(|p| p.as_ref().map(|d| Arc::new(d.clone())))
            .collect();
        let config = reg.pipeline.reaction_config(aud.dim());
        let mut task = match reaction_topology(config)
            .map_err(|e| e.to_string())
            .and_then(|t| t.build().map_err(|e| e.to_string()))
        {
            Ok(t) => t,
            Err(e) => {
                r.violation(format!("pipeline: cannot build the topology: {e}"));
                return r;
            }
        };
        // Run the input through the topology.
        let mut emitted: HashMap<String, Vec<EncodedRecord>> = HashMap::new();
        let mut records: Vec<SourceRecord> = Vec::new();
        let mut drained = Vec::new();
        for e in &self.input {
            records.clear();
            if let Err(why) = expand_event(e, id, &aud, &users, 0, usize::MAX, &mut records) {
                r.violation(format!("pipeline input version {}: {why}", e.version));
                return r;
            }
            for rec in &records {
                r.records += 1;
                let done = if rec.input == PUNCTUATE {
                    task.advance_time(rec.timestamp_ms)
                } else {
                    task.process_bytes(&rec.input, &rec.key, &rec.value, rec.timestamp_ms)
                        .map(|_| ())
                };
                if let Err(why) = done {
                    r.violation(format!("pipeline input version {}: {why}", e.version));
                    return r;
                }
            }
            task.drain_outputs(&mut drained);
            for o in drained.drain(..) {
                emitted.entry(o.output.clone()).or_default().push(o);
            }
        }
        // Same outputs, byte for byte.
        for name in OUTPUTS {
            let logged = self.outputs.get(name).map_or(&[][..], Vec::as_slice);
            let want = emitted.get(name).map_or(&[][..], Vec::as_slice);
            if logged.len() != want.len() {
                r.violation(format!(
                    "same outputs: {name} holds {} records; the pipeline emits {}",
                    logged.len(),
                    want.len()
                ));
            }
            for (i, (l, w)) in logged.iter().zip(want).enumerate() {
                let same = envelope::decode(&l.payload).is_some_and(|(k, v)| {
                    k.as_ref() == w.key.as_slice()
                        && v.as_ref() == w.value.as_slice()
                        && l.timestamp_ms == w.timestamp_ms
                        && l.kind == w.output
                });
                if !same {
                    r.violation(format!(
                        "same outputs: {name} record {} (version {}) differs from what the pipeline emits",
                        i + 1,
                        l.version
                    ));
                    break;
                }
            }
        }
        // Recorded once, from the pipeline.
        let k = reg.spec.creatives.len();
        let mut ids = std::collections::HashSet::new();
        let mut per = vec![0u64; k];
        for e in self
            .outputs
            .get(REACTION_WINDOWS)
            .map_or(&[][..], Vec::as_slice)
        {
            r.windows += 1;
            match decode_window(e) {
                Ok(w) => {
                    ids.insert(w.record_reactions(k).id);
                    for (t, n) in per.iter_mut().zip(w.reactions_per_creative(k)) {
                        *t += u64::from(n);
                    }
                }
                Err(why) => r.violation(format!("window version {}: {why}", e.version)),
            }
        }
        for e in self
            .outputs
            .get(LATE_REACTIONS)
            .map_or(&[][..], Vec::as_slice)
        {
            r.windows += 1;
            match decode_late(e) {
                Ok((_, u)) if u.reacted => {
                    ids.insert(format!("late-{}", e.version));
                    if let Some(n) = per.get_mut(usize::from(u.creative)) {
                        *n += 1;
                    }
                }
                Ok(_) => {}
                Err(why) => r.violation(format!("late reaction version {}: {why}", e.version)),
            }
        }
        r.command_ids = ids;
        let recorded: Vec<u64> = campaign
            .creative_stats()
            .iter()
            .map(|s| s.reactions)
            .collect();
        if recorded != per {
            r.violation(format!(
                "recorded once: the campaign records {recorded:?} reactions per creative, the pipeline's windows and late reactions {per:?}"
            ));
        }
        // Model feedback: outcomes emitted before each feedback event.
        let reach = config.window_ms.max(1) + config.grace_ms;
        let mut outcomes: Vec<(u64, u32, u32, u64)> = Vec::new();
        for e in self
            .outputs
            .get(USER_OUTCOMES)
            .map_or(&[][..], Vec::as_slice)
        {
            match decode_outcome(e) {
                Ok((user, u)) if u.reacted => outcomes.push((e.position, u.batch, user, u.time_ms)),
                Ok(_) => {}
                Err(why) => r.violation(format!("outcome version {}: {why}", e.version)),
            }
        }
        let mut next_fed = 0u32;
        for (position, at, f) in &self.feedback {
            r.feedback += 1;
            if f.batch != next_fed {
                r.violation(format!(
                    "model feedback for batch {} where {next_fed} was next",
                    f.batch
                ));
            }
            next_fed = f.batch.saturating_add(1);
            let plan = self.plans.get(f.batch as usize).and_then(Option::as_ref);
            let in_plan: std::collections::HashSet<u32> = plan
                .map(|d| d.users.iter().copied().collect())
                .unwrap_or_default();
            let mut want: Vec<u32> = outcomes
                .iter()
                .filter(|(p, b, u, t)| {
                    p < position
                        && *b == f.batch
                        && in_plan.contains(u)
                        && (t - t % config.window_ms.max(1)).saturating_add(reach) <= *at
                })
                .map(|&(_, _, u, _)| u)
                .collect();
            want.sort_unstable();
            want.dedup();
            if want != f.reacted {
                r.violation(format!(
                    "model feedback: batch {} was fed {} reacting users; the pipeline had counted {} by then",
                    f.batch,
                    f.reacted.len(),
                    want.len()
                ));
            }
        }
        r
    }
}
