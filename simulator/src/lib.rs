//! # smartmsg-simulator
//!
//! Deterministic simulation of whole campaigns on the real smartmsg
//! engine, with faults injected, and the `smartmsg` command.
//!
//! - [`scenario`]: what a run simulates (TOML/JSON files, built-ins);
//! - [`population`]: subscribers with features and hidden true reaction
//!   probabilities (generated, or CSV import/export);
//! - [`world`]: the channel, the reacting users and the reactions topic;
//! - [`sim`]: one policy's campaign run by the campaign runtime
//!   (`smartmsg-service`, the code services run) under a virtual clock,
//!   with the world as its sender and reaction source, crashes and
//!   recovery;
//! - [`invariants`]: what every run must keep, checked from disk;
//! - [`report`]: the comparison (table, JSON, SVG);
//! - [`runner`]: policies in parallel, and many seeds with random faults;
//! - [`inspect`]: what a data directory holds;
//! - [`portable`]: export and import of logs as JSON Lines;
//! - [`replay`]: rebuild campaigns from a log and check them, running each
//!   reaction pipeline again ([`replay_pipeline`]);
//! - [`ope`]: off-policy evaluation from logged bandit feedback.
//!
//! The same scenario and seed give a byte-identical event log and report.
#![forbid(unsafe_code)]

pub mod error;
pub mod events;
pub mod families;
pub mod faults;
pub mod inspect;
pub mod invariants;
pub mod ope;
pub mod platform;
pub mod policies;
pub mod population;
pub mod portable;
pub mod replay;
pub mod replay_pipeline;
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
pub use report::{PolicyRun, Report};
pub use runner::{compare, run_seed, run_seeds, CompareOptions, SeedOutcome, SeedsOptions};
pub use scenario::Scenario;
pub use sim::{run_policy, QueueKind, RunOptions};
