//! # smartmsg-simulator
//!
//! Deterministic simulation of whole campaigns on the real smartmsg
//! engine, with faults injected, and the `smartmsg` command.
//!
//! - [`scenario`]: what a run simulates (TOML/JSON files, built-ins);
//! - [`population`]: subscribers with features and hidden true reaction
//!   probabilities (generated, or CSV import/export);
//! - [`world`]: the channel, the reacting users and the reactions topic;
//! - [`reaction`]: the [`ReactionPath`](reaction::ReactionPath) seam and
//!   the built-in path (validate, join, dedupe, one-minute windows);
//! - [`reaction_pipeline`]: the path on the real pipeline (the domain's
//!   reaction topology run by the engine's stream task);
//! - [`sim`]: one policy's campaign through the repository, the embedded
//!   log, the delay queue and the scheduler, under a virtual clock, with
//!   crashes and recovery;
//! - [`invariants`]: what every run must keep, checked from disk;
//! - [`report`]: the comparison (table, JSON, SVG);
//! - [`runner`]: policies in parallel, and many seeds with random faults;
//! - [`inspect`]: what a data directory holds;
//! - [`portable`]: export and import of logs as JSON Lines;
//! - [`replay`]: rebuild campaigns from a log and check them;
//! - [`ope`]: off-policy evaluation from logged bandit feedback.
//!
//! The same scenario and seed give a byte-identical event log and report.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod events;
pub mod faults;
pub mod inspect;
pub mod invariants;
pub mod ope;
pub mod policies;
pub mod population;
pub mod portable;
pub mod reaction;
pub mod reaction_pipeline;
pub mod replay;
pub mod replay_windows;
pub mod report;
pub mod rng;
pub mod runner;
pub mod scenario;
pub mod sim;
pub mod world;

pub use error::{PopulationError, ScenarioError, SimError};
pub use faults::{Crash, FaultPlan};
pub use policies::PolicyName;
pub use population::SimPopulation;
pub use reaction::{BuiltinPath, ReactionPath};
pub use reaction_pipeline::PipelinePath;
pub use report::{PolicyRun, Report};
pub use runner::{compare, run_seed, run_seeds, CompareOptions, SeedOutcome, SeedsOptions};
pub use scenario::Scenario;
pub use sim::{run_policy, QueueKind, RunOptions};
