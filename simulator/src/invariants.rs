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
//! 6. **invalid reactions dead-lettered**: every invalid message is
//!    dead-lettered exactly once with a reason, and nothing else is.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use smartmsg_domain::{CampaignEvent, Decisions};
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::EventLog;

use crate::error::SimError;
use crate::events::{self, PathCommitted, Streams};
use crate::population::SimPopulation;
use crate::reaction::{DeadLetterOut, PathStats};
use crate::scenario::Scenario;
use crate::sim::campaign_event;
use crate::world::{Label, World};

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
    let mut window_ids: HashMap<String, u32> = HashMap::new();
    let mut counted: HashMap<u64, u32> = HashMap::new();
    let mut dead: HashMap<u64, u32> = HashMap::new();
    let mut last_stats = PathStats::default();
    let head = log.head().await?;
    let mut pos = 0;
    while pos < head {
        let batch = log.read_all(pos, 10_000).await?;
        let Some(last) = batch.last() else { break };
        pos = last.position + 1;
        for e in &batch {
            if e.stream == streams.campaign {
                match campaign_event(e)? {
                    CampaignEvent::BatchPlanned {
                        batch, decisions, ..
                    } => {
                        *planned.entry(batch).or_default() += 1;
                        let b = batch as usize;
                        if out.decisions.len() <= b {
                            out.decisions.resize(b + 1, Decisions::default());
                        }
                        out.decisions[b] = decisions;
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
            } else if e.stream == streams.path {
                let c: PathCommitted = events::decode(e)?;
                out.commits += 1;
                for w in &c.windows {
                    *window_ids.entry(w.command_id()).or_default() += 1;
                    if w.late > 0 {
                        out.late_corrections += 1;
                    }
                    let mut per = vec![0u32; k];
                    for r in &w.reactions {
                        *counted.entry(r.id).or_default() += 1;
                        if let Some(n) = per.get_mut(usize::from(r.creative)) {
                            *n += 1;
                        }
                    }
                    if per != w.per_creative {
                        v(
                            &mut bad,
                            "reactions exactly once",
                            format!(
                                "window {} counts {:?} but holds {:?}",
                                w.command_id(),
                                w.per_creative,
                                per
                            ),
                        );
                    }
                }
                if let Some(s) = c.state.get("stats") {
                    if let Ok(s) = PathStats::deserialize(s) {
                        last_stats = s;
                    }
                }
            } else if e.stream == streams.dead_letters {
                let d: DeadLetterOut = events::decode(e)?;
                *dead.entry(d.offset).or_default() += 1;
                if d.reason.trim().is_empty() {
                    v(
                        &mut bad,
                        "invalid reactions dead-lettered",
                        format!("dead letter at offset {} has no reason", d.offset),
                    );
                }
            }
        }
    }
    out.windows = window_ids.len() as u64;
    out.duplicates_dropped = last_stats.duplicates;
    out.late_counted = last_stats.late;
    out.dead_letters = dead.values().map(|&n| u64::from(n)).sum();
    out.recorded_reactions = recorded.iter().sum();

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
    // 6. Invalid ones dead-lettered.
    for (offset, m) in world.topic().iter().enumerate() {
        let n = dead.get(&(offset as u64)).copied().unwrap_or(0);
        match m.label {
            Label::Invalid { kind } if n != 1 => v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("invalid message at offset {offset} ({kind}) dead-lettered {n} times"),
            ),
            Label::Valid { id } | Label::Repeat { id } if n > 0 => v(
                &mut bad,
                "invalid reactions dead-lettered",
                format!("valid reaction {id} at offset {offset} was dead-lettered"),
            ),
            _ => {}
        }
    }
    if let Some(o) = dead.keys().find(|&&o| o as usize >= world.topic().len()) {
        v(
            &mut bad,
            "invalid reactions dead-lettered",
            format!("dead letter for offset {o}, past the topic"),
        );
    }
    out.violations = bad;
    Ok(out)
}
