//! Replay of the reaction path's read models in virtual time.
//!
//! Every reaction the path counted is in its `ReactionPathCommitted` events
//! with its original timestamp. Replay puts each one back into its
//! one-minute window by that timestamp and checks what the path recorded
//! against what the log implies, commit by commit in log order:
//!
//! - **windows**: each reaction lies in the window of its result
//!   (`start ≤ time < start + window`), windows start on a window boundary,
//!   and a result's counts per creative are its reactions' counts;
//! - **closed before emitted**: a result is committed no earlier (virtual
//!   time, the commit's timestamp) than its window's end; a window's own
//!   result comes at most once and before its corrections, which are
//!   numbered on from 1 (a window empty when it closed has none);
//! - **exactly once**: no reaction id is counted twice;
//! - **joined with the plan**: each reaction's user was planned in the
//!   reaction's batch with the reaction's creative (the `BatchPlanned`
//!   decisions before it);
//! - **model feedback**: each `ModelFed` event's reacting users are exactly
//!   the users of that batch counted by the commits before it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use smartmsg_domain::Decisions;

use crate::events::ModelFed;

/// The part of a reaction-path commit replay reads (serde skips the rest,
/// the path's state, without building it).
#[derive(Debug, Deserialize)]
pub(crate) struct CommitView {
    pub(crate) windows: Vec<WindowView>,
}

/// One window result of a commit.
#[derive(Debug, Deserialize)]
pub(crate) struct WindowView {
    pub(crate) window_start_ms: u64,
    pub(crate) late: u32,
    pub(crate) per_creative: Vec<u32>,
    pub(crate) reactions: Vec<CountedView>,
}

/// One counted reaction.
#[derive(Debug, Deserialize)]
pub(crate) struct CountedView {
    id: u64,
    user: u32,
    creative: u16,
    batch: u32,
    time_ms: u64,
}

impl WindowView {
    /// The same id as `WindowResult::command_id`.
    pub(crate) fn command_id(&self) -> String {
        if self.late == 0 {
            format!("rx-{}", self.window_start_ms)
        } else {
            format!("rx-{}-late-{}", self.window_start_ms, self.late)
        }
    }
}

/// Violations kept per campaign at most.
const MAX_VIOLATIONS: usize = 20;

/// What the path of one campaign committed, re-derived.
#[derive(Debug, Default)]
pub(crate) struct PathReplay {
    /// For each planned user: the batch it was planned in, and the creative
    /// (a map: ids come from the log, which may be damaged).
    plan: HashMap<u32, (u32, u16)>,
    ids: HashSet<u64>,
    /// Per window start: the last result number (0 = on time, n = n-th
    /// correction) committed.
    last_late: HashMap<u64, u32>,
    /// Users counted as reacting, per batch, so far.
    reacted: BTreeMap<u32, Vec<u32>>,
    /// Reactions per creative of every committed result.
    pub(crate) per_creative: Vec<u64>,
    /// Command ids of every committed result.
    pub(crate) command_ids: HashSet<String>,
    /// Window results checked.
    pub(crate) windows: u64,
    /// Reactions re-windowed.
    pub(crate) reactions: u64,
    /// Model feedback events re-derived.
    pub(crate) feedback: u64,
    /// The next model feedback batch expected.
    next_fed: u32,
    /// Broken checks.
    pub(crate) violations: Vec<String>,
}

impl PathReplay {
    fn violation(&mut self, v: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(v);
        }
    }

    /// A batch was planned.
    pub(crate) fn planned(&mut self, batch: u32, d: &Decisions) {
        for (u, c, _) in d.iter() {
            self.plan.insert(u, (batch, c));
        }
    }

    /// A commit of the path at virtual time `at_ms`.
    pub(crate) fn committed(&mut self, at_ms: u64, window_ms: u64, c: &CommitView) {
        for w in &c.windows {
            self.windows += 1;
            let start = w.window_start_ms;
            let end = start.saturating_add(window_ms);
            if start % window_ms != 0 {
                self.violation(format!(
                    "windows: a result starts at {start} ms, not on a {window_ms} ms boundary"
                ));
            }
            // A window's own result (0) comes at most once and first; its
            // corrections are numbered on from 1. A window empty when it
            // closed emits nothing, so its first correction is 1.
            let last = self.last_late.get(&start).copied();
            let in_order = match last {
                None => w.late <= 1,
                Some(l) => w.late == l + 1,
            };
            if !in_order {
                self.violation(format!(
                    "windows: result {} of the window at {start} ms after {}",
                    w.late,
                    last.map_or("none".to_owned(), |l| format!("result {l}"))
                ));
            }
            self.last_late.insert(start, w.late);
            if at_ms < end {
                self.violation(format!(
                    "closed before emitted: the window [{start}, {end}) ms was committed at {at_ms} ms"
                ));
            }
            let mut counts = vec![0u32; w.per_creative.len()];
            for r in &w.reactions {
                self.reactions += 1;
                if r.time_ms < start || r.time_ms >= end {
                    self.violation(format!(
                        "windows: reaction {} at {} ms is outside its window [{start}, {end}) ms",
                        r.id, r.time_ms
                    ));
                }
                if !self.ids.insert(r.id) {
                    self.violation(format!("exactly once: reaction {} counted again", r.id));
                }
                let planned = self.plan.get(&r.user).copied();
                if planned != Some((r.batch, r.creative)) {
                    self.violation(format!(
                        "joined with the plan: user {} reacted to creative {} of batch {}, but was {}",
                        r.user,
                        r.creative,
                        r.batch,
                        match planned {
                            None => "never planned".to_owned(),
                            Some((b, c)) => format!("planned creative {c} in batch {b}"),
                        }
                    ));
                }
                match counts.get_mut(r.creative as usize) {
                    Some(n) => *n += 1,
                    None => self.violation(format!(
                        "windows: reaction {} has creative {} beyond the result's {} creatives",
                        r.id,
                        r.creative,
                        w.per_creative.len()
                    )),
                }
                self.reacted.entry(r.batch).or_default().push(r.user);
            }
            if counts != w.per_creative {
                self.violation(format!(
                    "windows: the result at {start} ms (correction {}) says {:?} per creative, its reactions give {counts:?}",
                    w.late, w.per_creative
                ));
            }
            if self.per_creative.len() < w.per_creative.len() {
                self.per_creative.resize(w.per_creative.len(), 0);
            }
            for (t, &n) in self.per_creative.iter_mut().zip(&w.per_creative) {
                *t += u64::from(n);
            }
            self.command_ids.insert(w.command_id());
        }
    }

    /// The model was fed a batch's outcomes.
    pub(crate) fn fed(&mut self, m: &ModelFed) {
        self.feedback += 1;
        if m.batch != self.next_fed {
            self.violation(format!(
                "model feedback for batch {} where {} was next",
                m.batch, self.next_fed
            ));
        }
        self.next_fed = m.batch.saturating_add(1);
        let mut expected = self.reacted.get(&m.batch).cloned().unwrap_or_default();
        expected.sort_unstable();
        expected.dedup();
        if expected != m.reacted {
            self.violation(format!(
                "model feedback: batch {} was fed {} reacting users, the commits before it counted {}",
                m.batch,
                m.reacted.len(),
                expected.len()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_a_damaged_log_are_checked_not_allocated() {
        let mut p = PathReplay::default();
        let mut d = Decisions::with_capacity(1);
        d.push(u32::MAX, 0, 0.5);
        p.planned(u32::MAX, &d);
        let c: CommitView = serde_json::from_str(&format!(
            r#"{{"windows":[{{"window_start_ms":60000,"late":0,"per_creative":[1],
                "reactions":[{{"id":1,"user":{u},"creative":0,"batch":{u},"time_ms":60001}},
                             {{"id":2,"user":7,"creative":0,"batch":4000000000,"time_ms":60002}}]}}]}}"#,
            u = u32::MAX
        ))
        .unwrap();
        p.committed(120_000, 60_000, &c);
        p.fed(&ModelFed {
            batch: u32::MAX,
            reacted: vec![u32::MAX],
        });
        let v = p.violations.join("\n");
        assert!(
            v.contains("user 7 reacted to creative 0 of batch 4000000000, but was never planned"),
            "{v}"
        );
        assert!(v.contains("its reactions give [2]"), "{v}");
        assert!(
            v.contains("model feedback for batch 4294967295 where 0 was next"),
            "{v}"
        );
        assert_eq!(p.reactions, 2);
    }
}
