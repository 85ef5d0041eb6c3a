//! The invariants every run must keep, checked on what it left in the
//! event log (read back from disk after the run) against what the world
//! knows really happened.
//!
//! 1. **budget**: the planned messages never exceed the budget, nor any
//!    batch its planned size;
//! 2. **one message per user**: no user is in two batches (or twice in
//!    one);
//! 3. **batches once**: no batch is planned or sent twice;
//! 4. **campaign completed**: every batch was planned and sent, and the
//!    campaign completed;
//! 5. **reactions exactly once**: every valid reaction is counted in
//!    exactly one window result, each window result is recorded on the
//!    campaign exactly once, and the campaign's reaction totals per
//!    creative equal the true ones;
//! 6. **invalid reactions dead-lettered**: every topic message enters the
//!    log exactly once; every invalid message is dead-lettered exactly once
//!    with a reason (by the router when it names no campaign, else by the
//!    pipeline), and nothing else is.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use smartmsg_domain::reactions::DeadLetter;
use smartmsg_domain::{CampaignEvent, Decisions};
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::stream::{envelope, Json, StateCodec};
use smartmsg_engine::{EventLog, RecordedEvent, StreamId};
use smartmsg_service::ingest::{Unrouted, UNROUTED_KIND};
use smartmsg_service::pipeline::{
    decode_late, decode_outcome, decode_window, origin_offset, REACTION,
};
use smartmsg_service::streams::UNROUTED;

use crate::error::SimError;
use crate::events::Streams;
use crate::population::SimPopulation;
use crate::scenario::Scenario;
use crate::sim::{campaign_event, WORLD_SOURCE};
use crate::world::{reaction_id, Label, World};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: String,
    /// What was found.
    pub detail: String,
}

/// What [`verify`] read and found.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// The decisions of each planned batch.
    pub decisions: Vec<Decisions>,
    /// Reactions recorded on the campaign.
    pub recorded_reactions: u64,
    /// Reaction-path commits.
    pub commits: u64,
    /// Window results recorded (corrections included).
    pub windows: u64,
    /// Late corrections among them.
    pub late_corrections: u64,
    /// Repeats dropped by the path.
    pub duplicates_dropped: u64,
    /// Reactions counted after their window closed.
    pub late_counted: u64,
    /// Dead letters.
    pub dead_letters: u64,
    /// Broken invariants (empty when all hold).
    pub violations: Vec<Violation>,
}

fn v(out: &mut Vec<Violation>, invariant: &str, detail: String) {
    if out.iter().filter(|x| x.invariant == invariant).count() < 5 {
        out.push(Violation {
            invariant: invariant.to_owned(),
            detail,
        });
    }
}

fn decode_err(e: &RecordedEvent, reason: impl std::fmt::Display) -> SimError {
    SimError::Decode {
        kind: e.kind.clone(),
        position: e.position,
        reason: reason.to_string(),
    }
}

async fn read_stream(log: &EmbeddedLog, stream: &StreamId) -> Result<Vec<RecordedEvent>, SimError> {
    let mut out = Vec::new();
    let mut v = 1;
    loop {
        let batch = log.read_stream(stream, v, 10_000).await?;
        let Some(last) = batch.last() else { break };
        v = last.version + 1;
        out.extend(batch);
    }
    Ok(out)
}

/// The world offset of an ingested message's origin (`world@<offset>`).
fn world_offset(origin: Option<&str>) -> Option<u64> {
    let o = origin?;
    if o.strip_prefix(WORLD_SOURCE)?.starts_with('@') {
        origin_offset(o)
    } else {
        None
    }
}

/// Reads `log` from the start and checks the invariants (see the [module
/// docs](self)).
pub async fn verify(
    log: &EmbeddedLog,
    scenario: &Scenario,
    _pop: &SimPopulation,
    world: &World,
) -> Result<Verified, SimError> {
    let streams = Streams::new(&scenario.name)?;
    let spec = scenario.campaign_spec();
    let k = scenario.campaign.creatives;
    let mut out = Verified::default();
    let mut bad = Vec::new();
    let mut planned: BTreeMap<u32, u32> = BTreeMap::new();
    let mut sent: BTreeMap<u32, u32> = BTreeMap::new();
    let mut recorded_ids: HashMap<String, u32> = HashMap::new();
    let mut recorded = vec![0u64; k];
    let mut completed = false;
    for e in &read_stream(log, &streams.campaign).await? {
        match campaign_event(e)? {
            CampaignEvent::BatchPlanned {
                batch,
                part,
                decisions,
                ..
            } => {
                let b = batch as usize;
                if out.decisions.len() <= b {
                    out.decisions.resize(b + 1, Decisions::default());
                }
                // A large batch comes in parts: count the batch once, join
                // its decisions.
                if part.is_first() {
                    *planned.entry(batch).or_default() += 1;
                    out.decisions[b] = decisions;
                } else {
                    out.decisions[b].append(&decisions);
                }
            }
            CampaignEvent::BatchSent { batch, .. } => {
                *sent.entry(batch).or_default() += 1;
            }
            CampaignEvent::ReactionsRecorded {
                command, reactions, ..
            } => {
                *recorded_ids.entry(command.id.clone()).or_default() += 1;
                for (t, r) in recorded.iter_mut().zip(&reactions) {
                    *t += u64::from(*r);
                }
                if reactions.len() != k {
                    v(
                        &mut bad,
                        "reactions exactly once",
                        format!("{} has {} creatives", command.id, reactions.len()),
                    );
                }
            }
            CampaignEvent::Completed { .. } => completed = true,
            _ => {}
        }
    }
    // What entered the log from the topic: into the pipeline, or unrouted.
    let mut ingested: HashMap<u64, u32> = HashMap::new();
    let mut ingested_reactions = 0u64;
    for e in read_stream(log, &streams.pipeline).await? {
        if e.kind != REACTION {
            continue;
        }
        ingested_reactions += 1;
        match world_offset(e.metadata.causation_id.as_deref()) {
            Some(o) => *ingested.entry(o).or_default() += 1,
            None => v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("reaction at position {} has no topic offset", e.position),
            ),
        }
    }
    let mut unrouted: HashMap<u64, u32> = HashMap::new();
    for e in read_stream(log, &StreamId::new(UNROUTED)?).await? {
        if e.kind != UNROUTED_KIND {
            continue;
        }
        let u: Unrouted = serde_json::from_slice(&e.payload).map_err(|err| decode_err(&e, err))?;
        if u.reason.trim().is_empty() {
            v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("unrouted message at position {} has no reason", e.position),
            );
        }
        if let Some(o) = world_offset(u.origin.as_deref()) {
            *unrouted.entry(o).or_default() += 1;
        }
    }
    // The pipeline's outputs.
    let mut counted: HashMap<u64, u32> = HashMap::new();
    let mut counted_per = vec![0u64; k];
    let outcomes = read_stream(log, &streams.outcomes).await?;
    for e in &outcomes {
        let (user, r) = decode_outcome(e).map_err(|err| decode_err(e, err))?;
        if r.reacted {
            *counted.entry(reaction_id(r.batch, user)).or_default() += 1;
            if let Some(n) = counted_per.get_mut(usize::from(r.creative)) {
                *n += 1;
            }
        }
    }
    let mut window_ids: HashMap<String, u32> = HashMap::new();
    let mut windowed_per = vec![0u64; k];
    for e in &read_stream(log, &streams.windows).await? {
        let w = decode_window(e).map_err(|err| decode_err(e, err))?;
        *window_ids.entry(w.record_reactions(k).id).or_default() += 1;
        for (t, n) in windowed_per.iter_mut().zip(w.reactions_per_creative(k)) {
            *t += u64::from(n);
        }
    }
    for e in &read_stream(log, &streams.late).await? {
        let (_, r) = decode_late(e).map_err(|err| decode_err(e, err))?;
        out.late_corrections += 1;
        if r.reacted {
            out.late_counted += 1;
            *window_ids.entry(format!("late-{}", e.version)).or_default() += 1;
            if let Some(n) = windowed_per.get_mut(usize::from(r.creative)) {
                *n += 1;
            }
        }
    }
    let mut dead_excerpts: HashMap<String, u32> = HashMap::new();
    let dead_letters = read_stream(log, &streams.dead_letters).await?;
    for e in &dead_letters {
        let (_, v_) =
            envelope::decode(&e.payload).ok_or_else(|| decode_err(e, "not an envelope"))?;
        let Json(d) = Json::<DeadLetter>::decode(&v_).map_err(|err| decode_err(e, err))?;
        *dead_excerpts.entry(d.excerpt).or_default() += 1;
    }
    out.windows = window_ids.len() as u64;
    out.dead_letters =
        dead_letters.len() as u64 + unrouted.values().map(|&n| u64::from(n)).sum::<u64>();
    out.duplicates_dropped = ingested_reactions
        .saturating_sub(outcomes.len() as u64)
        .saturating_sub(dead_letters.len() as u64);
    out.recorded_reactions = recorded.iter().sum();
    out.commits = 0;

    // 1. Budget.
    let total: u64 = out.decisions.iter().map(|d| d.len() as u64).sum();
    if total > spec.budget {
        v(
            &mut bad,
            "budget",
            format!("{total} messages planned; the budget is {}", spec.budget),
        );
    }
    for (b, d) in out.decisions.iter().enumerate() {
        let allowed = spec.nominal_batch_size(b as u32);
        if d.len() as u64 > allowed {
            v(
                &mut bad,
                "budget",
                format!("batch {b} has {} messages; its size is {allowed}", d.len()),
            );
        }
    }
    // 2. One message per user.
    let mut users: Vec<u32> = out.decisions.iter().flat_map(|d| d.users.clone()).collect();
    users.sort_unstable();
    for w in users.windows(2) {
        if w[0] == w[1] {
            v(
                &mut bad,
                "one message per user",
                format!("user {} is messaged twice", w[0]),
            );
        }
    }
    // 3. Batches once.
    for (b, n) in &planned {
        if *n > 1 {
            v(
                &mut bad,
                "batches once",
                format!("batch {b} planned {n} times"),
            );
        }
    }
    for (b, n) in &sent {
        if *n > 1 {
            v(
                &mut bad,
                "batches once",
                format!("batch {b} sent {n} times"),
            );
        }
        if !planned.contains_key(b) {
            v(
                &mut bad,
                "batches once",
                format!("batch {b} sent, never planned"),
            );
        }
    }
    // 4. Completed.
    for b in 0..spec.batch_count() {
        if !sent.contains_key(&b) {
            v(
                &mut bad,
                "campaign completed",
                format!("batch {b} was never sent"),
            );
        }
    }
    if !completed {
        v(
            &mut bad,
            "campaign completed",
            "the campaign did not complete".into(),
        );
    }
    // 5. Reactions exactly once.
    let truth: HashSet<u64> = world.reactions().iter().map(|r| r.id).collect();
    let mut true_per = vec![0u64; k];
    for r in world.reactions() {
        if let Some(n) = true_per.get_mut(usize::from(r.creative)) {
            *n += 1;
        }
    }
    for (id, n) in &counted {
        if *n > 1 {
            v(
                &mut bad,
                "reactions exactly once",
                format!("reaction {id} counted {n} times"),
            );
        }
        if !truth.contains(id) {
            v(
                &mut bad,
                "reactions exactly once",
                format!("reaction {id} counted but never happened"),
            );
        }
    }
    let mut missing: Vec<u64> = truth
        .iter()
        .filter(|id| !counted.contains_key(id))
        .copied()
        .collect();
    missing.sort_unstable();
    if !missing.is_empty() {
        v(
            &mut bad,
            "reactions exactly once",
            format!(
                "{} valid reactions never counted (first ids {:?})",
                missing.len(),
                &missing[..missing.len().min(5)]
            ),
        );
    }
    if windowed_per != counted_per {
        v(
            &mut bad,
            "reactions exactly once",
            format!(
                "windows and corrections count {windowed_per:?} per creative; the pipeline counted {counted_per:?} reactions"
            ),
        );
    }
    for (id, n) in &window_ids {
        if *n > 1 {
            v(
                &mut bad,
                "reactions exactly once",
                format!("window result {id} emitted {n} times"),
            );
        }
        match recorded_ids.get(id) {
            Some(1) => {}
            Some(m) => v(
                &mut bad,
                "reactions exactly once",
                format!("window result {id} recorded {m} times"),
            ),
            None => v(
                &mut bad,
                "reactions exactly once",
                format!("window result {id} never recorded on the campaign"),
            ),
        }
    }
    for id in recorded_ids.keys() {
        if !window_ids.contains_key(id) {
            v(
                &mut bad,
                "reactions exactly once",
                format!("{id} recorded without a window result"),
            );
        }
    }
    if recorded != true_per {
        v(
            &mut bad,
            "reactions exactly once",
            format!("campaign counts {recorded:?} reactions per creative; {true_per:?} happened"),
        );
    }
    // 6. Every message in once; invalid ones dead-lettered.
    let mut invalid_in_pipeline: HashMap<String, u32> = HashMap::new();
    for (offset, m) in world.topic().iter().enumerate() {
        let o = offset as u64;
        let (i, u) = (
            ingested.get(&o).copied().unwrap_or(0),
            unrouted.get(&o).copied().unwrap_or(0),
        );
        if i + u != 1 {
            v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("topic message {offset} entered the log {} times", i + u),
            );
        }
        match m.label {
            Label::Invalid { .. } if i > 0 => {
                let cut = m
                    .payload
                    .len()
                    .min(smartmsg_domain::reactions::DEAD_LETTER_EXCERPT);
                let ex = String::from_utf8_lossy(&m.payload[..cut]).into_owned();
                *invalid_in_pipeline.entry(ex).or_default() += 1;
            }
            Label::Valid { id } | Label::Repeat { id } if u > 0 => v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("valid reaction {id} at offset {offset} was not routed to the campaign"),
            ),
            _ => {}
        }
    }
    if invalid_in_pipeline != dead_excerpts {
        let want: u32 = invalid_in_pipeline.values().sum();
        let got: u32 = dead_excerpts.values().sum();
        v(
            &mut bad,
            "invalid reactions dead-lettered",
            format!(
                "{want} invalid messages reached the pipeline; it dead-lettered {got} (or other ones)"
            ),
        );
    }
    if let Some(o) = ingested
        .keys()
        .chain(unrouted.keys())
        .find(|&&o| o as usize >= world.topic().len())
    {
        v(
            &mut bad,
            "invalid reactions dead-lettered",
            format!("a message from offset {o}, past the topic"),
        );
    }
    out.violations = bad;
    Ok(out)
}
