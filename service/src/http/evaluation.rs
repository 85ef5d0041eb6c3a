//! Off-policy evaluation jobs: `POST /v1/evaluations` asks how other
//! policies would have done on a started campaign, estimated from the
//! campaign's own log; the answer (202) names a job whose result is
//! fetched later at `GET /v1/evaluations/{job}`.
//!
//! The estimators live outside this crate (the simulator's batch-level
//! off-policy evaluation, what `smartmsg evaluate --slate` runs): the
//! server is given an [`Evaluator`] (the `smartmsg` binary plugs one in);
//! without one, evaluation requests get a 501.
//!
//! Jobs run one at a time on a blocking thread, reading the log as it is
//! (nothing waits for them). Each request and each result is recorded in
//! the log (stream `http-evaluations`), so results outlive a restart, and
//! a job a restart interrupted runs again when the server opens.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_domain::{Audience, CampaignSpec, PolicySpec};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, RecordedEvent, StreamId};

use super::problem::Problem;
use super::AppState;
use crate::streams::CampaignStreams;

/// The stream of evaluation requests and results.
pub const EVALUATIONS: &str = "http-evaluations";
const REQUESTED: &str = crate::kinds::EVALUATION_REQUESTED;
const FINISHED: &str = crate::kinds::EVALUATION_FINISHED;

/// Most target policies in one request.
pub const MAX_POLICIES: usize = 8;
/// Most Monte Carlo plans per batch and target.
pub const MAX_DRAWS: usize = 2_000;
/// Most bootstrap resamples.
pub const MAX_BOOTSTRAP: usize = 5_000;

/// Estimates how target policies would have done on a campaign's log.
pub trait Evaluator: Send + Sync {
    /// Evaluates `input.request.policies` on the campaign; the result as
    /// JSON, or why the log cannot tell. Called on a blocking thread.
    fn evaluate(&self, input: EvaluationInput<'_>) -> Result<serde_json::Value, String>;
}

/// What an [`Evaluator`] is given.
#[derive(Debug, Clone, Copy)]
pub struct EvaluationInput<'a> {
    /// The campaign's id.
    pub campaign: &'a str,
    /// Its spec.
    pub spec: &'a CampaignSpec,
    /// The policy that logged it.
    pub logging_policy: &'a PolicySpec,
    /// Its audience.
    pub audience: &'a Audience,
    /// Its campaign stream's events, then its pipeline's per-user outcomes.
    pub events: &'a [RecordedEvent],
    /// The request.
    pub request: &'a EvaluationRequest,
}

fn default_draws() -> usize {
    200
}

fn default_bootstrap() -> usize {
    200
}

/// An evaluation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationRequest {
    /// The started campaign whose log is evaluated.
    pub campaign: String,
    /// The targets: a name for each, and its policy (as in a campaign
    /// definition, e.g. `{"kind": "creative-thompson", ...}`); 1 to 8.
    #[schema(value_type = Object)]
    pub policies: BTreeMap<String, PolicySpec>,
    /// Plans per batch for each target (Monte Carlo); 1 to 2,000. Default
    /// 200.
    #[serde(default = "default_draws")]
    pub draws: usize,
    /// Bootstrap resamples for the intervals; up to 5,000. Default 200.
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
    /// The generators' seed (the same request on the same log gives the
    /// same result). Default 0.
    #[serde(default)]
    pub seed: u64,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Waiting for its turn.
    Queued,
    /// Running.
    Running,
    /// Finished with a result.
    Done,
    /// Finished without one (`error` says why).
    Failed,
}

/// An evaluation job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvaluationJob {
    /// Its id (`ev-<n>`).
    pub id: String,
    /// Where it is.
    pub status: JobStatus,
    /// What was asked.
    pub request: EvaluationRequest,
    /// When it was asked (ms since the epoch).
    pub requested_ms: u64,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The result, once done: rows used, the logged policy's mean reward,
    /// and per target the estimators' values with their intervals (or why
    /// the log cannot support that target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Finished {
    id: String,
    finished_ms: u64,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

/// The server's jobs.
#[derive(Default)]
pub(crate) struct Jobs {
    jobs: Mutex<BTreeMap<u64, EvaluationJob>>,
    /// One job at a time.
    turn: tokio::sync::Mutex<()>,
}

impl Jobs {
    /// The jobs recorded in the log; those a restart interrupted are
    /// returned to be run again.
    pub(crate) async fn load(
        log: &dyn EventLog,
        shard: Option<u32>,
    ) -> Result<(Self, Vec<u64>), String> {
        let stream = StreamId::new(EVALUATIONS).map_err(|e| e.to_string())?;
        let mut jobs = BTreeMap::new();
        for e in crate::read_stream_all(log, &stream)
            .await
            .map_err(|e| e.to_string())?
        {
            match e.kind.as_str() {
                REQUESTED => {
                    let j: EvaluationJob =
                        serde_json::from_slice(&e.payload).map_err(|e| e.to_string())?;
                    if let Some(n) = number(shard, &j.id) {
                        jobs.insert(n, j);
                    }
                }
                FINISHED => {
                    let f: Finished =
                        serde_json::from_slice(&e.payload).map_err(|e| e.to_string())?;
                    if let Some(j) = number(shard, &f.id).and_then(|n| jobs.get_mut(&n)) {
                        j.status = if f.error.is_some() {
                            JobStatus::Failed
                        } else {
                            JobStatus::Done
                        };
                        j.finished_ms = Some(f.finished_ms);
                        j.result = f.result;
                        j.error = f.error;
                    }
                }
                _ => {}
            }
        }
        let unfinished = jobs
            .iter_mut()
            .filter(|(_, j)| j.finished_ms.is_none())
            .map(|(&n, j)| {
                j.status = JobStatus::Queued;
                n
            })
            .collect();
        Ok((
            Self {
                jobs: Mutex::new(jobs),
                turn: tokio::sync::Mutex::new(()),
            },
            unfinished,
        ))
    }

    fn get(&self, n: u64) -> Option<EvaluationJob> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&n)
            .cloned()
    }

    fn update(&self, n: u64, f: impl FnOnce(&mut EvaluationJob)) {
        if let Some(j) = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&n)
        {
            f(j);
        }
    }
}

/// The number of job `id` (`ev-<n>`; `ev-<shard>-<n>` in a cluster).
fn number(shard: Option<u32>, id: &str) -> Option<u64> {
    let rest = id.strip_prefix("ev-")?;
    let rest = match shard {
        Some(s) => rest.strip_prefix(&format!("{s}-"))?,
        None => rest,
    };
    rest.parse().ok()
}

/// The id of job `n` (see [`number`]).
fn job_id(shard: Option<u32>, n: u64) -> String {
    match shard {
        Some(s) => format!("ev-{s}-{n}"),
        None => format!("ev-{n}"),
    }
}

/// The shard a cluster's job id names (`ev-<shard>-<n>`).
pub(crate) fn job_shard(id: &str) -> Option<u32> {
    let rest = id.strip_prefix("ev-")?;
    let (s, n) = rest.split_once('-')?;
    n.parse::<u64>().ok()?;
    s.parse().ok()
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response {
    let mut r = (status, serde_json::to_vec(v).unwrap_or_default()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check(req: &EvaluationRequest) -> Result<(), Problem> {
    let bad = |field: &str, why: String| Problem::unprocessable("invalid-field", why).field(field);
    if req.policies.is_empty() || req.policies.len() > MAX_POLICIES {
        return Err(bad(
            "policies",
            format!("{} policies; give 1 to {MAX_POLICIES}", req.policies.len()),
        ));
    }
    if let Some(n) = req.policies.keys().find(|n| n.is_empty() || n.len() > 64) {
        return Err(bad("policies", format!("name {n:?}: 1 to 64 bytes")));
    }
    if req.draws == 0 || req.draws > MAX_DRAWS {
        return Err(bad("draws", format!("{}: 1 to {MAX_DRAWS}", req.draws)));
    }
    if req.bootstrap > MAX_BOOTSTRAP {
        return Err(bad(
            "bootstrap",
            format!("{}: at most {MAX_BOOTSTRAP}", req.bootstrap),
        ));
    }
    Ok(())
}

/// Asks for an evaluation: 202 with the job (and its `Location`).
#[utoipa::path(post, path = "/v1/evaluations", tag = "evaluations",
    request_body = EvaluationRequest,
    responses((status = 202, body = EvaluationJob), (status = 404, body = Problem), (status = 422, body = Problem), (status = 501, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn post(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    super::routes::idempotent(
        &state,
        &headers,
        "POST",
        "/v1/evaluations",
        &body,
        |_| async {
            post_inner(&state, &body)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        },
    )
    .await
}

async fn post_inner(state: &AppState, body: &[u8]) -> Result<Response, Problem> {
    let req: EvaluationRequest = super::routes::parse_json(body)?;
    check(&req)?;
    if state.evaluator.is_none() {
        return Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "no-evaluator",
            "this server has no evaluator (the smartmsg binary has one)",
        ));
    }
    if state.handle.published(&req.campaign).is_none() {
        return Err(
            Problem::not_found(format!("no started campaign {:?}", req.campaign)).field("campaign"),
        );
    }
    // One request at a time takes the next id (rare, cheap).
    let _guard = state.admin.lock().await;
    let n = {
        let jobs = state.jobs.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.keys().next_back().map_or(1, |n| n + 1)
    };
    let job = EvaluationJob {
        id: job_id(state.shard, n),
        status: JobStatus::Queued,
        request: req,
        requested_ms: now_ms(),
        finished_ms: None,
        result: None,
        error: None,
    };
    let stream = StreamId::new(EVALUATIONS).map_err(|e| Problem::bad_request(e.to_string()))?;
    let payload = serde_json::to_vec(&job).unwrap_or_default();
    state
        .log
        .append(AppendTx::single(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(REQUESTED, 1, job.requested_ms, payload)],
        ))
        .await
        .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
    state
        .jobs
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(n, job.clone());
    spawn(state.clone(), n);
    let mut r = json(StatusCode::ACCEPTED, &job);
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/evaluations/{}", job.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

/// One evaluation job.
#[utoipa::path(get, path = "/v1/evaluations/{job}", tag = "evaluations",
    params(("job" = String, Path, description = "The job (`ev-<n>`)")),
    responses((status = 200, body = EvaluationJob), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match number(state.shard, &id).and_then(|n| state.jobs.get(n)) {
        Some(j) => json(StatusCode::OK, &j),
        None => Problem::not_found(format!("no evaluation {id:?}")).into_response(),
    }
}

/// Every evaluation job, oldest first.
#[utoipa::path(get, path = "/v1/evaluations", tag = "evaluations",
    responses((status = 200, body = Vec<EvaluationJob>)),
    security(("bearer" = [])))]
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let all: Vec<EvaluationJob> = state
        .jobs
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    json(StatusCode::OK, &all)
}

/// Runs job `n` in the background.
pub(crate) fn spawn(state: AppState, n: u64) {
    tokio::spawn(async move {
        let _turn = state.jobs.turn.lock().await;
        state.jobs.update(n, |j| j.status = JobStatus::Running);
        let outcome = run(&state, n).await;
        let finished_ms = now_ms();
        let (result, error) = match outcome {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        let f = Finished {
            id: job_id(state.shard, n),
            finished_ms,
            result: result.clone(),
            error: error.clone(),
        };
        let recorded = match StreamId::new(EVALUATIONS) {
            Ok(stream) => state
                .log
                .append(AppendTx::single(
                    stream,
                    ExpectedVersion::Any,
                    vec![NewEvent::new(
                        FINISHED,
                        1,
                        finished_ms,
                        serde_json::to_vec(&f).unwrap_or_default(),
                    )],
                ))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &recorded {
            tracing::warn!(job = n, error = %e, "an evaluation's result could not be recorded");
        }
        state.jobs.update(n, |j| {
            j.status = if error.is_some() {
                JobStatus::Failed
            } else {
                JobStatus::Done
            };
            j.finished_ms = Some(finished_ms);
            j.result = result;
            j.error = error;
        });
    });
}

async fn run(state: &AppState, n: u64) -> Result<serde_json::Value, String> {
    let job = state.jobs.get(n).ok_or("the job is gone")?;
    let evaluator = state
        .evaluator
        .clone()
        .ok_or("this server has no evaluator")?;
    let id = job.request.campaign.clone();
    let log = &*state.log;
    let (reg, audience) = crate::read_registered(log, &id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("campaign {id:?} is not registered"))?;
    let streams = CampaignStreams::new(&id).map_err(|e| e.to_string())?;
    let mut events = crate::read_stream_all(log, &streams.campaign)
        .await
        .map_err(|e| e.to_string())?;
    events.extend(
        crate::read_stream_all(log, &streams.outcomes)
            .await
            .map_err(|e| e.to_string())?,
    );
    let request = job.request.clone();
    let handle = Arc::clone(&evaluator);
    tokio::task::spawn_blocking(move || {
        handle.evaluate(EvaluationInput {
            campaign: &id,
            spec: &reg.spec,
            logging_policy: &reg.policy,
            audience: &audience,
            events: &events,
            request: &request,
        })
    })
    .await
    .map_err(|e| format!("the evaluation panicked: {e}"))?
}
