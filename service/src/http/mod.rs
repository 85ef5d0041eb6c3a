//! The HTTP service (`smartmsg serve`; feature `http`): the campaign
//! runtime behind a JSON API under `/v1/`, with an OpenAPI document at
//! `/openapi.json`, Prometheus metrics at `/metrics`, bearer tokens with
//! scopes, `Idempotency-Key` and `If-Match` on commands, and errors as
//! `application/problem+json`.
//!
//! Commands go to the runtime's loop through its [`RuntimeHandle`]; reads
//! are answered from the views the runtime publishes after each step and
//! from the log, so reads never wait for writes (CQRS).
//!
//! A campaign is created in two steps: `POST /v1/campaigns` defines it
//! (creatives, budget, batches, schedule, policy, the audience's feature
//! names); `PUT /v1/campaigns/{id}/audience` uploads its users (CSV or JSON
//! Lines, streamed to disk, checked row by row, all or nothing); `POST
//! /v1/campaigns/{id}/start` registers it with the runtime (its first batch
//! due then, unless the definition gave a start time) and starts it.

// A `Problem` is an answer to a request, built once per failed request:
// its size (a few strings) does not matter, so handlers return it unboxed.
#![allow(clippy::result_large_err)]

pub mod audience;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod evaluation;
pub mod idempotency;
pub mod problem;
mod routes;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use serde::{Deserialize, Serialize};
use smartmsg_domain::PolicySpec;
use smartmsg_engine::{EventLog, StreamId, SystemClock};

use crate::error::RuntimeError;
use crate::pipeline::PipelineSettings;
use crate::runtime::{Runtime, RuntimeOptions};
use crate::sender::{OutboxSender, Sender, WebhookSender};
use crate::{Ports, ReactionSource, RuntimeHandle};

pub use cluster::{serve_cluster, ClusterParts};
pub use config::{
    BackendConfig, ClusterConfig, DistributedConfig, HttpLimits, Scope, SenderConfig, ServeConfig,
    SourceConfig, TokenConfig,
};
pub use problem::Problem;

/// A campaign's definition, as `POST /v1/campaigns` takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CampaignDefinition {
    /// Its id: 1 to 40 ASCII letters, digits, `-`, `_`, `.`.
    pub id: String,
    /// The channel that sends its messages.
    pub channel: String,
    /// The creatives' references (a creative is addressed by its index).
    pub creatives: Vec<String>,
    /// The most messages it may send.
    pub budget: u64,
    /// The number of batches (the budget split evenly).
    pub batches: u32,
    /// When batch 0 is due (ms since the Unix epoch); absent: when the
    /// campaign is started.
    #[serde(default)]
    pub start_ms: Option<u64>,
    /// Between batches (ms).
    pub interval_ms: u64,
    /// The audience's feature columns, in the order the model uses them.
    pub features: Vec<String>,
    /// The policy and its settings (default: the integrated model).
    #[serde(default = "default_policy")]
    #[schema(value_type = Object)]
    pub policy: PolicySpec,
    /// Seeds the plans (the same seed plans the same batches).
    #[serde(default)]
    pub seed: u64,
    /// The reaction pipeline's settings (windows, grace).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub pipeline: PipelineSettings,
    /// Complete the campaign this long after its last batch was sent (ms;
    /// default one day).
    #[serde(default = "default_horizon")]
    pub reaction_horizon_ms: u64,
}

fn default_policy() -> PolicySpec {
    PolicySpec::Integrated {
        model: {
            let mut m = smartmsg_domain::ModelConfig::default();
            m.random_first_batch = true;
            m
        },
    }
}

fn default_horizon() -> u64 {
    24 * 3_600_000
}

/// Definitions not yet registered with the runtime, and their audiences'
/// uploads.
#[derive(Debug, Clone, Default)]
pub(crate) struct Drafts {
    pub(crate) defs: BTreeMap<String, CampaignDefinition>,
    /// The chunk range of each uploaded audience in its stream:
    /// (first version, chunks, users).
    pub(crate) audiences: BTreeMap<String, (u64, u64, u64)>,
}

/// The server's shared state: one allocation, cloned (an `Arc`) into
/// every request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
    pub(crate) handle: RuntimeHandle,
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) drafts: Arc<RwLock<Drafts>>,
    pub(crate) tokens: Arc<Vec<TokenConfig>>,
    pub(crate) limits: HttpLimits,
    pub(crate) idem: idempotency::Store,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub(crate) uploads: PathBuf,
    /// Serialises definitions, uploads and registrations (cheap, rare).
    pub(crate) admin: Arc<tokio::sync::Mutex<()>>,
    /// Estimates policies off-policy for evaluation jobs, if given.
    pub(crate) evaluator: Option<Arc<dyn evaluation::Evaluator>>,
    /// Evaluation jobs.
    pub(crate) jobs: evaluation::Jobs,
    /// The cluster shard this state serves (its evaluation jobs are named
    /// `ev-<shard>-<n>`), or `None` for a single server.
    pub(crate) shard: Option<u32>,
}

/// The stream of campaign definitions and uploaded audiences.
pub(crate) const DRAFTS: &str = "http-campaigns";
/// Kind of a definition event.
pub(crate) const DEFINED: &str = crate::kinds::CAMPAIGN_DEFINED;
/// Kind of an uploaded-audience event.
pub(crate) const UPLOADED: &str = crate::kinds::AUDIENCE_UPLOADED;

#[derive(Serialize, Deserialize)]
pub(crate) struct UploadedEvent {
    pub(crate) id: String,
    pub(crate) from: u64,
    pub(crate) chunks: u64,
    pub(crate) users: u64,
}

/// The stream an uploaded audience's chunks go to.
pub(crate) fn upload_stream(id: &str) -> Result<StreamId, smartmsg_engine::StreamIdError> {
    StreamId::new(format!("http-audience-{id}"))
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The runtime failed to open or stopped with an error.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The listener failed.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading the server's own records failed.
    #[error("server records: {0}")]
    Records(String),
}

impl AppState {
    /// The state for a running runtime: reads the definitions and
    /// remembered answers from the log.
    pub async fn new(
        handle: RuntimeHandle,
        tokens: Vec<TokenConfig>,
        limits: HttpLimits,
        uploads: PathBuf,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        evaluator: Option<Arc<dyn evaluation::Evaluator>>,
    ) -> Result<Self, ServeError> {
        Self::open(handle, tokens, limits, uploads, metrics, evaluator, None).await
    }

    /// [`AppState::new`] for one shard of a cluster.
    pub(crate) async fn open(
        handle: RuntimeHandle,
        tokens: Vec<TokenConfig>,
        limits: HttpLimits,
        uploads: PathBuf,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        evaluator: Option<Arc<dyn evaluation::Evaluator>>,
        shard: Option<u32>,
    ) -> Result<Self, ServeError> {
        let log = Arc::clone(handle.log());
        let idem = idempotency::Store::load(&*log)
            .await
            .map_err(|e| ServeError::Records(e.to_string()))?;
        let drafts = routes::load_drafts(&*log)
            .await
            .map_err(ServeError::Records)?;
        std::fs::create_dir_all(&uploads).map_err(|e| ServeError::Records(e.to_string()))?;
        let (jobs, unfinished) = evaluation::Jobs::load(&*log, shard)
            .await
            .map_err(ServeError::Records)?;
        let state = Self(Arc::new(Shared {
            handle,
            log,
            drafts: Arc::new(RwLock::new(drafts)),
            tokens: Arc::new(tokens),
            limits,
            idem,
            metrics,
            uploads,
            admin: Arc::default(),
            evaluator,
            jobs,
            shard,
        }));
        // Jobs a restart interrupted run again.
        for n in unfinished {
            evaluation::spawn(state.clone(), n);
        }
        Ok(state)
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    let limits = state.limits;
    let api = Router::new()
        .route("/v1/campaigns", post(routes::define).get(routes::list))
        .route("/v1/campaigns/{id}", get(routes::get_campaign))
        .route(
            "/v1/campaigns/{id}/audience",
            put(routes::upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/campaigns/{id}/{command}", post(routes::command))
        .route(
            "/v1/campaigns/{id}/batches/{batch}/messages",
            get(routes::messages),
        )
        .route("/v1/campaigns/{id}/dead-letters", get(routes::dead_letters))
        .route(
            "/v1/reactions",
            post(routes::reactions).layer(DefaultBodyLimit::max(limits.max_reactions_bytes)),
        )
        .route(
            "/v1/users/{user}",
            axum::routing::delete(routes::remove_user),
        )
        .route(
            "/v1/evaluations",
            post(evaluation::post).get(evaluation::list),
        )
        .route("/v1/evaluations/{job}", get(evaluation::get))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/openapi.json", get(routes::openapi))
        .route("/", get(routes::dashboard))
        .route("/dashboard", get(routes::dashboard))
        .route("/assets/uPlot.iife.min.js", get(routes::uplot_js))
        .route("/assets/uPlot.min.css", get(routes::uplot_css))
        .layer(DefaultBodyLimit::max(limits.max_json_bytes))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .layer(axum::middleware::from_fn(routes::count_requests));
    api.with_state(state)
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    routes::ApiDoc::openapi()
}

/// The process's Prometheus recorder (installed once).
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (a test process):
            // then this one only renders what it was given.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Runs `smartmsg serve` with `config` until `shutdown` resolves: opens the
/// embedded backend in the data directory, the configured sender, the
/// runtime on the wall clock, and the API on `config.listen`. On shutdown
/// the server stops taking requests, the runtime finishes its step, and
/// the backends close.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    serve_on(config, listener, shutdown).await
}

/// [`serve`] on a listener already bound (tests bind port 0), on the
/// embedded backend (see [`embedded_backend`]).
pub async fn serve_on(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (ports, sources) = embedded_backend(&config)?;
    serve_with(config, listener, shutdown, ports, sources, None).await
}

/// The sender of `config` when it needs no broker (outbox, webhook).
pub fn plain_sender(config: &SenderConfig) -> Result<Arc<dyn Sender>, ServeError> {
    Ok(match config {
        SenderConfig::Outbox { dir } => Arc::new(OutboxSender::new(dir.clone())),
        SenderConfig::Webhook(w) => Arc::new(
            WebhookSender::new(w.clone())
                .map_err(|e| config::ConfigError(format!("sender: {e}")))?,
        ),
        SenderConfig::Kafka { .. } => return Err(needs_distributed("sender.kind = \"kafka\"")),
    })
}

/// The source of `config` when it needs no broker (JSON Lines).
pub fn plain_source(config: &SourceConfig) -> Result<Box<dyn ReactionSource>, ServeError> {
    match config {
        SourceConfig::JsonLines { name, dir } => Ok(Box::new(crate::JsonLinesSource::new(
            name.clone(),
            dir.clone(),
        ))),
        SourceConfig::Kafka { .. } => Err(needs_distributed("sources.kind = \"kafka\"")),
    }
}

fn needs_distributed(what: &str) -> ServeError {
    ServeError::Config(config::ConfigError(format!(
        "{what} needs a smartmsg built with Kafka and RabbitMQ: cargo build --release -p smartmsg-cli --features distributed"
    )))
}

/// The ports and sources of an embedded configuration: the log, snapshots,
/// delay queue and state store in `config.data_dir`, the configured
/// sender and sources. A configuration naming Kafka or RabbitMQ is
/// refused here (the `distributed` build of `smartmsg` opens those).
pub fn embedded_backend(
    config: &ServeConfig,
) -> Result<(Ports, Vec<Box<dyn ReactionSource>>), ServeError> {
    match config.backend {
        BackendConfig::Distributed(_) => {
            return Err(needs_distributed("backend.kind = \"distributed\""))
        }
        BackendConfig::Cluster(_) => return Err(needs_distributed("backend.kind = \"cluster\"")),
        BackendConfig::Embedded => {}
    }
    let sender = plain_sender(&config.sender)?;
    let sources = config
        .sources
        .iter()
        .map(plain_source)
        .collect::<Result<Vec<_>, _>>()?;
    let ports = crate::embedded_ports(
        &config.data_dir,
        smartmsg_embedded::EmbeddedConfig::default(),
        Arc::new(SystemClock),
        sender,
    )?;
    Ok((ports, sources))
}

/// [`serve_on`] with ports and sources opened by the caller (the
/// `distributed` build of `smartmsg` passes Kafka and RabbitMQ ones) and
/// an [`evaluation::Evaluator`] for evaluation jobs (without one they get
/// a 501).
pub async fn serve_with(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ports: Ports,
    sources: Vec<Box<dyn ReactionSource>>,
    evaluator: Option<Arc<dyn evaluation::Evaluator>>,
) -> Result<(), ServeError> {
    if config.tokens.is_empty() {
        tracing::warn!("no tokens configured: every request is allowed");
    }
    let options = RuntimeOptions {
        poll_interval_ms: config.poll_interval_ms.max(1),
        ..RuntimeOptions::default()
    };
    let mut runtime = Runtime::open(ports, options).await?;
    for s in sources {
        runtime.add_source(s);
    }
    let (stop_runtime, runtime_stopped) = tokio::sync::oneshot::channel::<()>();
    let (handle, run) = runtime.spawn(async move {
        let _ = runtime_stopped.await;
    });
    let running = tokio::spawn(run);
    let metrics = Some(prometheus());
    let state = AppState::new(
        handle,
        config.tokens.clone(),
        config.limits,
        config.data_dir.join("uploads"),
        metrics,
        evaluator,
    )
    .await?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "serving");
    let app = router(state);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_runtime.send(());
    let ran = running
        .await
        .map_err(|e| ServeError::Records(e.to_string()))?;
    served.map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    ran?;
    Ok(())
}
