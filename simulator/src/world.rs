//! The simulated outside world: the channel that delivers batches, the
//! users who react after their delays, and the reactions topic the
//! pipeline consumes, with the scenario's reaction faults (repeats,
//! reordering, malformed messages).
//!
//! The world is not process state: a simulated crash leaves it as it is
//! (like a Kafka topic and the users out there), and the consumer re-reads
//! the topic from its last committed offset.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use serde::{Deserialize, Serialize};
use smartmsg_domain::Decisions;

use crate::faults::FaultPlan;
use crate::population::SimPopulation;
use crate::rng::{self, label, mix, unit};
use crate::scenario::{DelaySpec, Scenario};

/// A reaction message as users' apps send it (JSON on the topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionMessage {
    /// Unique per reaction (repeats of one delivery share it).
    pub id: u64,
    /// The campaign's name.
    pub campaign: String,
    /// The batch the message came in.
    pub batch: u32,
    /// The reacting user.
    pub user: u32,
    /// The creative they saw.
    pub creative: u16,
    /// What they did (`clicked` or `replied`: the reaction kinds that
    /// count as a response).
    #[serde(rename = "reaction")]
    pub kind: String,
    /// When they did it (event time, ms).
    pub time_ms: u64,
}

/// What a topic message really is (known to the world, for the invariant
/// checks; the pipeline sees only the bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// The first delivery of a valid reaction.
    Valid {
        /// Its id.
        id: u64,
    },
    /// A repeat of a valid reaction.
    Repeat {
        /// Its id.
        id: u64,
    },
    /// A message that must be dead-lettered.
    Invalid {
        /// What is wrong with it, as injected.
        kind: &'static str,
    },
}

/// One message on the reactions topic.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    /// When it reached the topic (processing time, ms).
    pub arrival_ms: u64,
    /// The bytes.
    pub payload: Vec<u8>,
    /// What it really is.
    pub label: Label,
}

/// A valid reaction the world produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrueReaction {
    /// Its id.
    pub id: u64,
    /// The user.
    pub user: u32,
    /// The creative.
    pub creative: u16,
    /// The batch.
    pub batch: u32,
    /// When it happened.
    pub time_ms: u64,
}

#[derive(Clone)]
struct Pending {
    arrival_ms: u64,
    payload: Vec<u8>,
    label: Label,
}

/// Counts of the faults the world injected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorldFaults {
    /// Reactions delivered twice.
    pub repeated: u64,
    /// Reactions delayed within the grace period.
    pub reordered_within_grace: u64,
    /// Reactions delayed beyond it.
    pub reordered_beyond_grace: u64,
    /// Malformed or invalid messages.
    pub malformed: u64,
}

/// See the [module docs](self).
#[derive(Clone)]
pub struct World {
    seed: u64,
    campaign: String,
    delay: DelaySpec,
    max_delay_ms: u64,
    max_jitter_ms: u64,
    window_ms: u64,
    grace_ms: u64,
    faults: FaultPlan,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    pending: Vec<Option<Pending>>,
    topic: Vec<TopicMessage>,
    delivered: BTreeSet<u32>,
    reactions: Vec<TrueReaction>,
    injected: WorldFaults,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("campaign", &self.campaign)
            .field("topic", &self.topic.len())
            .field("pending", &self.heap.len())
            .finish_non_exhaustive()
    }
}

/// The reaction types users send (the domain's success kinds).
pub const REACTION_TYPES: [&str; 2] = ["clicked", "replied"];

/// The id of the reaction of `user` to their message of batch `batch`.
pub fn reaction_id(batch: u32, user: u32) -> u64 {
    (u64::from(batch) << 32) | u64::from(user)
}

impl World {
    /// The world of `scenario` with `faults` (the scenario's own plan plus
    /// any random one), before any batch is sent. Malformed messages are
    /// scattered over the campaign's time span.
    pub fn new(scenario: &Scenario, faults: &FaultPlan) -> Self {
        let mut w = Self {
            seed: scenario.seed,
            campaign: scenario.name.clone(),
            delay: scenario.reactions.delay.clone(),
            max_delay_ms: scenario.reactions.max_delay_ms,
            max_jitter_ms: scenario.reactions.max_jitter_ms,
            window_ms: scenario.pipeline.window_ms,
            grace_ms: scenario.pipeline.grace_ms,
            faults: faults.clone(),
            heap: BinaryHeap::new(),
            pending: Vec::new(),
            topic: Vec::new(),
            delivered: BTreeSet::new(),
            reactions: Vec::new(),
            injected: WorldFaults::default(),
        };
        let start = scenario.campaign.start_ms;
        let span = scenario
            .campaign
            .batch_interval_ms
            .saturating_mul(u64::from(scenario.campaign.batches))
            .max(1);
        for i in 0..u64::from(faults.malformed_reactions) {
            let h = mix(&[w.seed, label("malformed"), i]);
            let at = start + (unit(h) * span as f64) as u64;
            let (payload, kind) = w.malformed(i, at);
            w.push(at, payload, Label::Invalid { kind });
            w.injected.malformed += 1;
        }
        w
    }

    fn push(&mut self, arrival_ms: u64, payload: Vec<u8>, label: Label) {
        let seq = self.pending.len() as u64;
        self.pending.push(Some(Pending {
            arrival_ms,
            payload,
            label,
        }));
        self.heap.push(Reverse((arrival_ms, seq)));
    }

    fn malformed(&self, i: u64, at: u64) -> (Vec<u8>, &'static str) {
        let ok =
            |user: u32, creative: u16, batch: u32, kind: &str, time_ms: u64, campaign: &str| {
                serde_json::to_vec(&ReactionMessage {
                    id: (1 << 63) | i,
                    campaign: campaign.to_owned(),
                    batch,
                    user,
                    creative,
                    kind: kind.to_owned(),
                    time_ms,
                })
                .unwrap_or_default()
            };
        let c = self.campaign.as_str();
        match i % 10 {
            0 => (vec![0xff, 0xfe, 0x00, 0x13, b'{'], "not utf-8"),
            1 => {
                let mut v = ok(1, 0, 0, "clicked", at, c);
                v.truncate(v.len() / 2);
                (v, "truncated json")
            }
            2 => (
                format!(r#"{{"id":{},"campaign":"{c}","batch":0,"creative":0,"reaction":"clicked","time_ms":{at}}}"#, (1u64 << 63) | i)
                    .into_bytes(),
                "missing user",
            ),
            3 => (
                format!(r#"{{"id":{},"campaign":"{c}","batch":0,"user":1,"creative":"two","reaction":"clicked","time_ms":{at}}}"#, (1u64 << 63) | i)
                    .into_bytes(),
                "creative not a number",
            ),
            4 => (ok(1, 0, 0, "clicked", at, "another-campaign"), "unknown campaign"),
            5 => (ok(u32::MAX - i as u32 % 1000, 0, 0, "clicked", at, c), "unknown user"),
            6 => (ok(1, 999, 0, "clicked", at, c), "unknown creative"),
            7 => (ok(1, 0, 999_999, "clicked", at, c), "batch not sent"),
            8 => (ok(1, 0, 0, "teleport", at, c), "unknown reaction type"),
            _ => (ok(1, 0, 0, "clicked", 0, c), "time before the campaign"),
        }
    }

    fn delay_ms(&self, user: u32, batch: u32) -> u64 {
        let h1 = mix(&[self.seed, label("delay"), u64::from(user)]);
        let h2 = mix(&[
            self.seed,
            label("delay2"),
            u64::from(user),
            u64::from(batch),
        ]);
        let d = match self.delay {
            DelaySpec::LogNormal { median_ms, sigma } => {
                median_ms as f64 * (sigma * rng::normal(h1, h2)).exp()
            }
            DelaySpec::Exponential { mean_ms } => -(mean_ms as f64) * (1.0 - unit(h1)).ln(),
            DelaySpec::Fixed { ms } => ms as f64,
        };
        (d.max(0.0) as u64).clamp(1, self.max_delay_ms.max(1))
    }

    /// The channel delivers batch `batch`, sent at `sent_ms`: each user
    /// reacts with their true probability (a user's draw is the same
    /// whatever the policy, so policies are compared on the same luck),
    /// after their delay. Delivering a batch again does nothing (the
    /// channel is idempotent by batch). Returns whether it was new.
    pub fn deliver(
        &mut self,
        batch: u32,
        sent_ms: u64,
        decisions: &Decisions,
        pop: &SimPopulation,
    ) -> bool {
        self.deliver_with(batch, sent_ms, decisions, |user, creative| {
            pop.probability_at(user, creative, batch)
        })
    }

    /// [`World::deliver`] with the true probability that `user` reacts to
    /// `creative` given by `probability` (a truth computed on demand
    /// rather than a population's table).
    pub fn deliver_with(
        &mut self,
        batch: u32,
        sent_ms: u64,
        decisions: &Decisions,
        mut probability: impl FnMut(u32, u16) -> f64,
    ) -> bool {
        if !self.delivered.insert(batch) {
            return false;
        }
        for (user, creative, _) in decisions.iter() {
            let p = probability(user, creative);
            if p <= 0.0 || unit(mix(&[self.seed, label("react"), u64::from(user)])) >= p {
                continue;
            }
            let time_ms = sent_ms + self.delay_ms(user, batch);
            let id = reaction_id(batch, user);
            let msg = ReactionMessage {
                id,
                campaign: self.campaign.clone(),
                batch,
                user,
                creative,
                kind: REACTION_TYPES[(user % 2) as usize].to_owned(),
                time_ms,
            };
            let payload = serde_json::to_vec(&msg).unwrap_or_default();
            let f = |tag: &str| unit(mix(&[self.seed, label(tag), id]));
            let mut arrival = time_ms + (f("jitter") * (self.max_jitter_ms + 1) as f64) as u64;
            let fr = f("reorder");
            if fr < self.faults.reorder_within_grace {
                // Late, but its window still accepts it.
                let room = self.grace_ms.saturating_sub(self.max_jitter_ms) / 2;
                arrival += 1 + (f("reorder-by") * room as f64) as u64;
                self.injected.reordered_within_grace += 1;
            } else if fr < self.faults.reorder_within_grace + self.faults.reorder_beyond_grace {
                // After its window closed.
                arrival +=
                    self.window_ms + self.grace_ms + 1_000 + (f("reorder-by") * 600_000.0) as u64;
                self.injected.reordered_beyond_grace += 1;
            }
            self.reactions.push(TrueReaction {
                id,
                user,
                creative,
                batch,
                time_ms,
            });
            let repeat = f("repeat") < self.faults.duplicate_reactions;
            let again = arrival + (f("repeat-by") * (self.grace_ms * 2 + 1) as f64) as u64;
            if repeat {
                self.push(arrival, payload.clone(), Label::Valid { id });
                self.push(again, payload, Label::Repeat { id });
                self.injected.repeated += 1;
            } else {
                self.push(arrival, payload, Label::Valid { id });
            }
        }
        true
    }

    /// Moves every message that has arrived by `now_ms` onto the topic (in
    /// arrival order; ties in the order they were produced).
    pub fn arrive_until(&mut self, now_ms: u64) {
        while let Some(&Reverse((at, seq))) = self.heap.peek() {
            if at > now_ms {
                break;
            }
            self.heap.pop();
            if let Some(p) = self.pending[seq as usize].take() {
                self.topic.push(TopicMessage {
                    arrival_ms: p.arrival_ms,
                    payload: p.payload,
                    label: p.label,
                });
            }
        }
    }

    /// When the next message arrives, if any is on its way.
    pub fn next_arrival(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// When the last message on its way arrives, if any is.
    pub fn last_arrival(&self) -> Option<u64> {
        self.heap.iter().map(|Reverse((at, _))| *at).max()
    }

    /// The topic so far (offset = index).
    pub fn topic(&self) -> &[TopicMessage] {
        &self.topic
    }

    /// Every valid reaction produced so far (distinct ids).
    pub fn reactions(&self) -> &[TrueReaction] {
        &self.reactions
    }

    /// Batches the channel has delivered.
    pub fn delivered(&self) -> &BTreeSet<u32> {
        &self.delivered
    }

    /// The faults injected so far.
    pub fn injected(&self) -> WorldFaults {
        self.injected
    }
}
