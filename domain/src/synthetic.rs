//! A synthetic population with a known response model, and an in-memory
//! driver that runs a whole campaign through the [`Campaign`] aggregate
//! with a [`Policy`]: for tests, benchmarks and simulation. Pure: every
//! random thing comes from the generator passed in.

use std::sync::Arc;

use rand::{Rng, RngCore};
use rand_distr::{Distribution, StandardNormal};
use smartmsg_engine::{Aggregate, DecideCtx, StreamId};

use crate::campaign::{
    Action, BatchSchedule, BatchSizing, Campaign, CampaignCommand, CampaignError, CampaignEvent,
    CampaignSpec,
};
use crate::data::{Candidates, ShapeError};
use crate::driver::{
    Audience, AudienceError, CampaignDriver, DriverConfig, FeedbackError, JobError, JobKind,
};
use crate::model::sigmoid;
use crate::policy::Policy;

/// The true response model: `P(react | x, c) = σ(b_c + w_c·x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseTruth {
    /// `b_c` per creative.
    pub intercepts: Vec<f64>,
    /// `w_c` per creative, row-major `creatives × dim`.
    pub weights: Vec<f64>,
    /// The feature dimension.
    pub dim: usize,
}

impl ResponseTruth {
    /// Creatives that each appeal to their own segment: creative `c` has
    /// intercept `logit(base_rate)` and weight `strength` on feature
    /// `c mod dim` (and a small weight on the next one), so every creative
    /// is the best one for some users, and a model of user × creative can
    /// beat any single creative.
    pub fn segmented(creatives: usize, dim: usize, base_rate: f64, strength: f64) -> Self {
        let b = (base_rate / (1.0 - base_rate)).ln();
        let mut weights = vec![0.0; creatives * dim];
        for c in 0..creatives {
            weights[c * dim + c % dim] = strength;
            weights[c * dim + (c + 1) % dim] += 0.25 * strength;
        }
        Self {
            intercepts: vec![b; creatives],
            weights,
            dim,
        }
    }

    /// The number of creatives.
    pub fn creatives(&self) -> usize {
        self.intercepts.len()
    }

    /// `P(react)` for features `x` and creative `c`.
    pub fn probability(&self, x: &[f32], c: usize) -> f64 {
        let w = &self.weights[c * self.dim..(c + 1) * self.dim];
        let z = self.intercepts[c] + w.iter().zip(x).map(|(a, &b)| a * f64::from(b)).sum::<f64>();
        sigmoid(z)
    }
}

/// Users `0..n` with standard normal features and a known response model.
#[derive(Debug, Clone, PartialEq)]
pub struct Population {
    /// Every user (user id = row).
    pub candidates: Candidates,
    /// How they respond.
    pub truth: ResponseTruth,
}

impl Population {
    /// `n` users with `truth.dim` i.i.d. standard normal features.
    pub fn generate(
        n: u32,
        truth: ResponseTruth,
        rng: &mut dyn RngCore,
    ) -> Result<Self, ShapeError> {
        let dim = truth.dim;
        let features: Vec<f32> = (0..n as usize * dim)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                z as f32
            })
            .collect();
        let candidates = Candidates::from_parts(dim, (0..n).collect(), features)?;
        Ok(Self { candidates, truth })
    }

    /// `P(react)` of user `user` (a row) to creative `c`.
    pub fn probability(&self, user: u32, c: u16) -> f64 {
        self.truth
            .probability(self.candidates.row(user as usize), usize::from(c))
    }

    /// The expected responses of an oracle that knows the truth and sends
    /// `budget` messages: the `budget` largest `max_c P(react)`.
    pub fn oracle_expected(&self, budget: usize) -> f64 {
        let mut best: Vec<f64> = (0..self.candidates.len() as u32)
            .map(|u| {
                (0..self.truth.creatives())
                    .map(|c| self.probability(u, c as u16))
                    .fold(0.0, f64::max)
            })
            .collect();
        let k = budget.min(best.len());
        if k == 0 {
            return 0.0;
        }
        best.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        best[..k].iter().sum()
    }

    /// The expected responses of sending every user creative `c` at
    /// random: `budget × mean P(react | c)`.
    pub fn random_expected(&self, budget: usize, c: u16) -> f64 {
        let n = self.candidates.len();
        let mean = (0..n as u32).map(|u| self.probability(u, c)).sum::<f64>() / n as f64;
        mean * budget as f64
    }
}

/// The campaign a [`run_campaign`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriveConfig {
    /// Total messages.
    pub budget: u64,
    /// Batches (the budget split evenly).
    pub batches: u32,
    /// When batch 0 is due (ms).
    pub start_ms: u64,
    /// Between batches (ms).
    pub interval_ms: u64,
}

impl DriveConfig {
    /// `budget` messages in `batches` batches, the first due at
    /// `start_ms`, then one every `interval_ms`.
    pub const fn new(budget: u64, batches: u32, start_ms: u64, interval_ms: u64) -> Self {
        Self {
            budget,
            batches,
            start_ms,
            interval_ms,
        }
    }
}

/// Why [`run_campaign`] stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// The campaign refused a command (a policy or driver bug).
    #[error("campaign refused a command: {0}")]
    Campaign(#[from] CampaignError),
    /// A batch could not be planned.
    #[error(transparent)]
    Job(#[from] JobError),
    /// Feedback could not be learned.
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    /// The population is not a valid audience.
    #[error(transparent)]
    Audience(#[from] AudienceError),
    /// Outcomes could not be built.
    #[error("outcomes: {0}")]
    Shape(#[from] ShapeError),
}

/// What [`run_campaign`] produced.
#[derive(Debug, Clone)]
pub struct CampaignRun {
    /// The campaign's final state.
    pub campaign: Campaign,
    /// Every event, in order (replaying them gives `campaign`).
    pub events: Vec<CampaignEvent>,
    /// `Σ P(react)` over the messages sent: the expected responses.
    pub expected_responses: f64,
    /// Expected responses per batch.
    pub per_batch_expected: Vec<f64>,
    /// Simulated reactions.
    pub reactions: u64,
    /// Messages per creative, per batch.
    pub per_batch_creatives: Vec<Vec<u32>>,
}

/// Applies commands to an in-memory campaign, keeping its events.
#[derive(Debug, Default)]
pub struct InMemoryCampaign {
    /// The state.
    pub state: Campaign,
    /// The events so far.
    pub events: Vec<CampaignEvent>,
}

impl InMemoryCampaign {
    /// Decides `action` (command id `id`) at `now_ms` and applies the
    /// events; returns how many there were.
    pub fn execute(
        &mut self,
        id: &str,
        action: Action,
        now_ms: u64,
    ) -> Result<usize, CampaignError> {
        Ok(self.run(&CampaignCommand::new(id, action), now_ms)?.len())
    }

    /// Decides `cmd` at `now_ms`, applies the events and returns them.
    pub fn run(
        &mut self,
        cmd: &CampaignCommand,
        now_ms: u64,
    ) -> Result<Vec<CampaignEvent>, CampaignError> {
        let ctx = DecideCtx {
            stream: StreamId::new("campaign-sim").unwrap_or_else(|_| unreachable!()),
            version: self.events.len() as u64,
            now_ms,
        };
        let events = self.state.decide(cmd, &ctx)?;
        for e in &events {
            self.state.evolve(e);
        }
        self.events.extend(events.iter().cloned());
        Ok(events)
    }
}

/// Runs a whole campaign over `population` with `policy`, in memory,
/// through the [`CampaignDriver`] (the same driver a runtime uses): create,
/// start, then at each batch's due time record the feedback of the earlier
/// batches, plan (the policy, on the users not yet messaged, with a
/// generator seeded from `rng`), send, simulate each user's reaction from
/// the true model (drawn from `rng`) and record it; finally complete.
pub fn run_campaign(
    policy: &mut dyn Policy,
    population: &Population,
    config: &DriveConfig,
    rng: &mut dyn RngCore,
) -> Result<CampaignRun, DriveError> {
    let creatives = population.truth.creatives();
    let spec = CampaignSpec {
        channel: "synthetic".into(),
        audience: "synthetic-population".into(),
        creatives: (0..creatives).map(|c| format!("creative-{c}")).collect(),
        budget: config.budget,
        schedule: BatchSchedule {
            start_ms: config.start_ms,
            interval_ms: config.interval_ms,
            sizing: BatchSizing::Count(config.batches),
        },
    };
    let audience = Arc::new(Audience::new(population.candidates.clone())?);
    let driver_config = DriverConfig {
        seed: rng.next_u64(),
        stream: 0,
        // Every reaction counts for the next batch.
        window_ms: 1,
        grace_ms: 0,
        reaction_horizon_ms: 0,
    };
    let mut driver = CampaignDriver::new("synthetic", driver_config, Box::new(policy), audience);
    let mut c = InMemoryCampaign::default();
    let mut run = CampaignRun {
        campaign: Campaign::default(),
        events: Vec::new(),
        expected_responses: 0.0,
        per_batch_expected: Vec::new(),
        reactions: 0,
        per_batch_creatives: Vec::new(),
    };
    let exec = |driver: &mut CampaignDriver<'_>,
                c: &mut InMemoryCampaign,
                cmd: &CampaignCommand,
                now: u64|
     -> Result<(), DriveError> {
        let events = c.run(cmd, now)?;
        for e in &events {
            driver.apply(e, now);
        }
        driver.executed(&cmd.id);
        Ok(())
    };
    let create = CampaignCommand::new("create", Action::Create(spec.clone()));
    exec(&mut driver, &mut c, &create, config.start_ms)?;
    exec(
        &mut driver,
        &mut c,
        &CampaignCommand::new("start", Action::Start),
        config.start_ms,
    )?;
    let drive = |driver: &mut CampaignDriver<'_>,
                 c: &mut InMemoryCampaign,
                 run: &mut CampaignRun,
                 rng: &mut dyn RngCore,
                 now: u64|
     -> Result<(), DriveError> {
        loop {
            let ready = driver.ready(now);
            // Jobs are not run here: the loop below fires them itself.
            driver.scheduled(&ready.schedule);
            if ready.commands.is_empty()
                && ready.feedback.is_empty()
                && ready.announce.is_none()
                && ready.send.is_none()
            {
                return Ok(());
            }
            for cmd in &ready.commands {
                exec(driver, c, cmd, now)?;
            }
            for f in &ready.feedback {
                driver.apply_feedback(f)?;
            }
            if let Some(b) = ready.announce {
                driver.announced(b);
            }
            if let Some(b) = ready.send {
                let Some(out) = driver.outgoing(b) else {
                    continue;
                };
                // The channel delivers; users react.
                let mut reactions = vec![0u32; creatives];
                let mut expected = 0.0;
                for (user, creative, _) in out.decisions.iter() {
                    let p = population.probability(user, creative);
                    expected += p;
                    if rng.random_bool(p.clamp(0.0, 1.0)) {
                        reactions[usize::from(creative)] += 1;
                        driver.reaction(b, user, now);
                    }
                }
                run.per_batch_creatives
                    .push(out.decisions.per_creative(creatives));
                run.reactions += reactions.iter().map(|&r| u64::from(r)).sum::<u64>();
                run.expected_responses += expected;
                run.per_batch_expected.push(expected);
                driver.sender_acked(b);
                // Recorded after the batch is recorded as sent.
                driver.enqueue(CampaignCommand::new(
                    format!("reactions-{b}"),
                    Action::RecordReactions {
                        window_start_ms: now,
                        reactions,
                    },
                ));
            }
        }
    };
    for batch in 0..spec.batch_count() {
        let now = spec.due_ms(batch);
        drive(&mut driver, &mut c, &mut run, rng, now)?;
        let cmd = driver.job_command(JobKind::Batch(batch), now)?;
        exec(&mut driver, &mut c, &cmd, now)?;
        drive(&mut driver, &mut c, &mut run, rng, now)?;
    }
    let end = spec.due_ms(spec.batch_count());
    drive(&mut driver, &mut c, &mut run, rng, end)?;
    let cmd = driver.job_command(JobKind::Complete, end)?;
    exec(&mut driver, &mut c, &cmd, end)?;
    run.campaign = c.state;
    run.events = c.events;
    Ok(run)
}
