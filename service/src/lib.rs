//! # smartmsg-service
//!
//! The campaign runtime: campaigns run end to end on the engine's ports,
//! as a library.
//!
//! ```no_run
//! # async fn demo(audience: smartmsg_domain::Candidates, spec: smartmsg_domain::CampaignSpec) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use smartmsg_domain::PolicySpec;
//! use smartmsg_service::{shutdown_signal, CampaignSetup, OutboxSender, Runtime, RuntimeOptions};
//!
//! let sender = Arc::new(OutboxSender::new("outbox"));
//! let runtime = Runtime::open_embedded("data", sender, RuntimeOptions::default()).await?;
//! let (handle, run) = runtime.spawn(shutdown_signal());
//! let looping = tokio::spawn(run);
//! let policy = PolicySpec::Integrated { model: Default::default() };
//! handle.create_campaign(CampaignSetup::new("spring", spec, audience, policy)).await?;
//! handle.start("spring").await?;
//! handle.inbox().submit(r#"{"campaign":"spring","batch":0,"user":7,"creative":1,"reaction":"clicked","time_ms":1}"#).await?;
//! looping.await??;
//! # Ok(()) }
//! ```
//!
//! - [`Runtime`]: many campaigns over any [`Ports`] (event log, snapshots,
//!   delay queue, state store, clock, sender); [`Runtime::step`] at a given
//!   time (the simulator drives it on a virtual clock) or
//!   [`Runtime::spawn`] on the real one; resumes after a crash from the
//!   log, the queue and the store.
//! - [`sender`]: where batches go ([`OutboxSender`], [`WebhookSender`],
//!   [`ChannelSender`]; a Kafka topic in `smartmsg-kafka`).
//! - [`ingest`]: where reactions come from ([`ReactionInbox`],
//!   [`JsonLinesSource`], any [`ReactionSource`]).
//! - [`pipeline`]: the reaction pipeline each campaign runs (the domain's
//!   topology on the engine's exactly-once runner).
//! - [`hooks`]: crash points for tests and the simulator.
#![forbid(unsafe_code)]

pub mod audience;
pub mod cluster;
mod embedded;
pub mod error;
mod handle;
pub mod hooks;
#[cfg(feature = "http")]
pub mod http;
pub mod ingest;
pub mod kinds;
pub mod packed;
pub mod pipeline;
pub mod runtime;
pub mod sender;
pub mod streams;

pub use embedded::embedded_ports;
pub use error::RuntimeError;
pub use handle::{shutdown_signal, RuntimeHandle, MAX_PENDING_REQUESTS};
pub use hooks::{CrashPoint, Hooks, NoHooks};
pub use ingest::{JsonLinesSource, Polled, ReactionInbox, ReactionSource, Submitted, Unrouted};
pub use pipeline::PipelineSettings;
pub use runtime::{
    read_registered, read_stream_all, BatchView, CampaignSetup, CampaignView, PolicyFactory, Ports,
    Registration, RemovalReport, Runtime, RuntimeOptions, RuntimeStats, StepReport, REMOVALS,
    USER_REMOVED_KIND,
};
pub use sender::{
    ChannelSender, OutboxSender, SendError, Sender, SentBatch, WebhookConfig, WebhookSender,
};
