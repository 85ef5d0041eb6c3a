//! # smartmsg-domain
//!
//! The domain of smartmsg, pure (no I/O, no wall clock, no global random
//! generator):
//!
//! - [`campaign`]: the campaign lifecycle aggregate (draft → scheduled →
//!   running ⇄ paused → completed, cancelled from any live state), its
//!   commands, events (with a versioned JSON codec) and typed refusals. It
//!   enforces the budget, at most one message per user, each batch planned
//!   and sent at most once, nothing sent while paused or cancelled, and
//!   idempotency by command id.
//! - [`policy`]: who gets which creative in the next batch, behind one
//!   [`Policy`] trait: [`Random`], [`ExploreThenCommit`],
//!   [`CreativeThompson`], [`Targeting`] and the [`Integrated`] model. Every
//!   decision carries its propensity, and the planned batch's event records
//!   them, so replay never re-runs a policy.
//! - [`model`]: the Bayesian pieces the policies share (a Gaussian posterior
//!   over response weights, updated by a Laplace approximation for a
//!   logistic link or exactly for a linear one; Beta counts).
//! - [`data`]: the candidate matrix a policy scores, and aggregated
//!   outcomes (per user, or per creative × feature bucket) that update the
//!   models.
//! - [`driver`]: the campaign driver: what a campaign needs done next
//!   (plan, announce, send, record, learn, complete), decided purely; the
//!   runtime and the simulator both run campaigns through it.
//! - [`users`]: a compact set of user ids.
//! - [`synthetic`]: a synthetic population with a known response model and
//!   an in-memory campaign driver, for tests, benchmarks and simulation.
//!
//! Everything random takes a seeded generator (`&mut dyn RngCore`; use
//! [`rand_chacha::ChaCha8Rng`]), so the same seed gives the same campaign.
#![forbid(unsafe_code)]

pub mod campaign;
pub mod data;
pub mod driver;
pub mod model;
pub mod policy;
pub mod reactions;
pub mod rng;
pub mod synthetic;
pub mod users;

pub use campaign::{
    Action, BatchRecord, BatchSchedule, BatchSizing, Campaign, CampaignCommand, CampaignError,
    CampaignEvent, CampaignSpec, CommandStamp, CreativeStats, Part, SpecError, Status,
    MAX_PART_DECISIONS, PLANNED_PARTS_SCHEMA, PLANNED_SCHEMA, SCHEMA,
};
pub use data::{Candidates, Decisions, Outcomes, Rows, ShapeError};
pub use driver::{
    Audience, CampaignDriver, DriverConfig, Feedback, JobError, JobKind, OutgoingBatch, Ready,
};
pub use model::{BetaArm, GaussianWeights, Link, ModelError, PooledWeights, Prior};
pub use policy::{
    CreativeThompson, Defer, Expansion, ExploreThenCommit, Integrated, ModelConfig, PlanContext,
    Policy, PolicyError, PolicySpec, Pooling, Random, Scoring, Targeting, Transform,
};
pub use users::UserSet;
