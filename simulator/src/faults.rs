//! The fault plan: crashes at chosen points, repeated deliveries, reordered
//! and malformed reactions; and random plans for `--seeds` runs.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::ScenarioError;
use crate::rng;

/// Where a crash drops the process state (everything in memory: the
/// policy's model, the reaction path's windows, the stores' handles); the
/// simulation then reopens the stores from disk and carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "at", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Crash {
    /// When batch `batch` is due, before its job is polled.
    BeforePlan {
        /// The batch.
        batch: u32,
    },
    /// After batch `batch`'s plan is committed, before its job is acked
    /// (the queue delivers the job again).
    AfterPlanBeforeAck {
        /// The batch.
        batch: u32,
    },
    /// After batch `batch` is planned, before it is recorded as sent.
    AfterPlanBeforeSend {
        /// The batch.
        batch: u32,
    },
    /// After the channel acknowledged batch `batch`, before it is recorded
    /// as sent (the runtime hands it over again: the channel drops the
    /// repeat). Also accepted as `after-send-before-delivery`, its name
    /// when sending was recorded before delivery.
    #[serde(alias = "after-send-before-delivery")]
    AfterDeliveryBeforeRecord {
        /// The batch.
        batch: u32,
    },
    /// After the model feedback of batch `batch` is committed, before the
    /// model is updated with it.
    AfterFeedbackBeforeUpdate {
        /// The batch fed.
        batch: u32,
    },
    /// After the `commit`-th reaction-path commit (1-based), before its
    /// window results are recorded on the campaign.
    AfterCommitBeforeRecord {
        /// The commit.
        commit: u32,
    },
    /// After the `message`-th reaction message is processed (1-based),
    /// before the path commits it.
    MidReactions {
        /// The message.
        message: u64,
    },
}

/// Faults to inject into one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultPlan {
    /// Crashes, each fired once.
    pub crashes: Vec<Crash>,
    /// Batches whose delay-queue job is delivered a second time after it
    /// was processed and acked.
    pub duplicate_jobs: Vec<u32>,
    /// Share of reactions the channel delivers twice.
    pub duplicate_reactions: f64,
    /// Share of reactions that arrive late but within the grace period
    /// (after later reactions: reordered).
    pub reorder_within_grace: f64,
    /// Share of reactions that arrive after their window closed.
    pub reorder_beyond_grace: f64,
    /// Malformed or invalid reaction messages injected.
    pub malformed_reactions: u32,
}

impl Default for FaultPlan {
    fn default() -> Self {
        Self {
            crashes: Vec::new(),
            duplicate_jobs: Vec::new(),
            duplicate_reactions: 0.0,
            reorder_within_grace: 0.0,
            reorder_beyond_grace: 0.0,
            malformed_reactions: 0,
        }
    }
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> ScenarioError {
    ScenarioError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl FaultPlan {
    /// Whether the plan injects nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the plan against a campaign of `batches` batches.
    pub fn validate(&self, batches: u32) -> Result<(), ScenarioError> {
        for (i, c) in self.crashes.iter().enumerate() {
            let field = format!("faults.crashes[{i}]");
            match *c {
                Crash::BeforePlan { batch }
                | Crash::AfterPlanBeforeAck { batch }
                | Crash::AfterPlanBeforeSend { batch }
                | Crash::AfterDeliveryBeforeRecord { batch }
                | Crash::AfterFeedbackBeforeUpdate { batch } => {
                    if batch >= batches {
                        return Err(bad(
                            format!("{field}.batch"),
                            format!("{batch} is not a batch below campaign.batches ({batches})"),
                        ));
                    }
                }
                Crash::AfterCommitBeforeRecord { commit } => {
                    if commit == 0 {
                        return Err(bad(format!("{field}.commit"), "commits count from 1"));
                    }
                }
                Crash::MidReactions { message } => {
                    if message == 0 {
                        return Err(bad(format!("{field}.message"), "messages count from 1"));
                    }
                }
            }
        }
        if self.crashes.len() > 100 {
            return Err(bad("faults.crashes", "at most 100 crashes"));
        }
        for (i, &b) in self.duplicate_jobs.iter().enumerate() {
            if b >= batches {
                return Err(bad(
                    format!("faults.duplicate_jobs[{i}]"),
                    format!("{b} is not a batch below campaign.batches ({batches})"),
                ));
            }
        }
        for (f, v) in [
            ("faults.duplicate_reactions", self.duplicate_reactions),
            ("faults.reorder_within_grace", self.reorder_within_grace),
            ("faults.reorder_beyond_grace", self.reorder_beyond_grace),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                return Err(bad(f, format!("{v} must be a share in [0, 1]")));
            }
        }
        if self.reorder_within_grace + self.reorder_beyond_grace > 1.0 {
            return Err(bad(
                "faults.reorder_beyond_grace",
                "the two reorder shares add up to more than 1",
            ));
        }
        if self.malformed_reactions > 1_000_000 {
            return Err(bad("faults.malformed_reactions", "at most 1,000,000"));
        }
        Ok(())
    }

    /// A random plan for `seed`: up to three crashes at random points,
    /// random repeated jobs, and random shares of duplicated, reordered and
    /// malformed reactions. `messages` is roughly how many reaction messages
    /// the run sees (crash points are drawn below it).
    pub fn random(seed: u64, batches: u32, messages: u64) -> Self {
        let mut r = rng::stream(seed, &[rng::label("random-faults")]);
        let mut crashes = Vec::new();
        let b = batches.max(1);
        let m = messages.max(2);
        for _ in 0..r.random_range(0..=3u32) {
            let batch = r.random_range(0..b);
            crashes.push(match r.random_range(0..7u32) {
                0 => Crash::BeforePlan { batch },
                1 => Crash::AfterPlanBeforeAck { batch },
                2 => Crash::AfterPlanBeforeSend { batch },
                3 => Crash::AfterDeliveryBeforeRecord { batch },
                4 => Crash::AfterFeedbackBeforeUpdate { batch },
                5 => Crash::AfterCommitBeforeRecord {
                    commit: r.random_range(1..=(m as u32).min(400)),
                },
                _ => Crash::MidReactions {
                    message: r.random_range(1..m),
                },
            });
        }
        let duplicate_jobs = (0..batches).filter(|_| r.random_bool(0.25)).collect();
        Self {
            crashes,
            duplicate_jobs,
            duplicate_reactions: r.random_range(0.0..0.1),
            reorder_within_grace: r.random_range(0.0..0.1),
            reorder_beyond_grace: r.random_range(0.0..0.05),
            malformed_reactions: r.random_range(0..40),
        }
    }

    /// This plan with `other`'s faults added.
    pub fn merged(&self, other: &FaultPlan) -> Self {
        let mut m = self.clone();
        m.crashes.extend(other.crashes.iter().copied());
        m.duplicate_jobs
            .extend(other.duplicate_jobs.iter().copied());
        m.duplicate_reactions = (m.duplicate_reactions + other.duplicate_reactions).min(1.0);
        m.reorder_within_grace = (m.reorder_within_grace + other.reorder_within_grace).min(0.5);
        m.reorder_beyond_grace = (m.reorder_beyond_grace + other.reorder_beyond_grace).min(0.5);
        m.malformed_reactions = m
            .malformed_reactions
            .saturating_add(other.malformed_reactions);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_plans_are_valid_and_seeded() {
        for seed in 0..200 {
            let p = FaultPlan::random(seed, 6, 300);
            p.validate(6).unwrap();
            assert_eq!(p, FaultPlan::random(seed, 6, 300));
        }
    }
}
