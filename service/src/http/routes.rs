//! The handlers.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use smartmsg_domain::reactions::DeadLetter;
use smartmsg_domain::{
    Action, BatchSchedule, BatchSizing, CampaignCommand, CampaignEvent, CampaignSpec,
};
use smartmsg_engine::stream::{envelope, Json, StateCodec};
use smartmsg_engine::{AppendTx, EventCodec, EventLog, ExpectedVersion, NewEvent, StreamId};
use tokio::io::AsyncWriteExt;

use super::audience::{self, Format};
use super::idempotency::{self, Answer};
use super::problem::{Problem, RowError};
use super::{
    upload_stream, AppState, CampaignDefinition, Drafts, UploadedEvent, DEFINED, DRAFTS, UPLOADED,
};
use crate::ingest::Submitted;
use crate::runtime::{CampaignSetup, CampaignView};
use crate::streams::{check_campaign_id, CampaignStreams};

/// The OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "smartmsg", description = "Budgeted smart-message campaigns that learn from reactions, batch by batch."),
    paths(define, list, get_campaign, upload, command, messages, dead_letters, reactions, remove_user, super::evaluation::post, super::evaluation::get, super::evaluation::list, health, ready, metrics),
    components(schemas(CampaignDefinition, CampaignResource, Problem, RowError, MessagePage, PlannedMessage, DeadLetterPage, ReactionsAnswer, ReactionResult, UploadAnswer, RemovalRequest, RemovalAnswer, PipelineStatus, super::evaluation::EvaluationRequest, super::evaluation::EvaluationJob, super::evaluation::JobStatus)),
    modifiers(&Bearer),
    tags((name = "campaigns"), (name = "reactions"), (name = "users"), (name = "evaluations"), (name = "operations"))
)]
pub(crate) struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Counts requests by status (Prometheus `smartmsg_http_requests_total`).
pub(crate) async fn count_requests(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    metrics::counter!("smartmsg_http_requests_total", "status" => r.status().as_u16().to_string())
        .increment(1);
    r
}

/// A campaign: its definition, its audience, and (once registered with the
/// runtime) its live state.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CampaignResource {
    /// The id.
    pub id: String,
    /// `awaiting_audience`, `ready` (audience uploaded, not started), or
    /// the campaign's status (`running`, `paused`, `completed`, …).
    pub state: String,
    /// Users in the uploaded audience.
    pub audience_users: Option<u64>,
    /// The definition.
    pub definition: Option<CampaignDefinition>,
    /// The live state (budget left, batches with their messages and
    /// reactions per creative, the model's progress).
    #[schema(value_type = Option<Object>)]
    pub live: Option<CampaignView>,
    /// The reaction pipeline's progress (once started).
    pub pipeline: Option<PipelineStatus>,
}

/// Where a campaign's reaction pipeline is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PipelineStatus {
    /// Events in its input stream (reactions, ticks, batch announcements).
    pub input: u64,
    /// Events it has processed and committed.
    pub processed: u64,
    /// `input - processed`.
    pub lag: u64,
    /// Reactions it refused (dead letters, with reasons at
    /// `/v1/campaigns/{id}/dead-letters`).
    pub dead_letters: u64,
}

/// The pipeline status of a started campaign (two index look-ups).
pub(crate) async fn pipeline_status(state: &AppState, v: &CampaignView) -> Option<PipelineStatus> {
    let streams = CampaignStreams::new(&v.id).ok()?;
    let input = state.log.stream_version(&streams.pipeline).await.ok()?;
    let dead_letters = state.log.stream_version(&streams.dead_letters).await.ok()?;
    Some(PipelineStatus {
        input,
        processed: v.pipeline_processed.min(input),
        lag: input.saturating_sub(v.pipeline_processed),
        dead_letters,
    })
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

pub(crate) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Reads the definitions and uploads from the log.
pub(crate) async fn load_drafts(log: &dyn EventLog) -> Result<Drafts, String> {
    let mut d = Drafts::default();
    let stream = StreamId::new(DRAFTS).map_err(|e| e.to_string())?;
    let mut v = 1;
    loop {
        let page = log
            .read_stream(&stream, v, 1_000)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else { break };
        v = last.version + 1;
        for e in &page {
            match e.kind.as_str() {
                DEFINED => {
                    let def: CampaignDefinition =
                        serde_json::from_slice(&e.payload).map_err(|e| e.to_string())?;
                    d.defs.insert(def.id.clone(), def);
                }
                UPLOADED => {
                    let u: UploadedEvent =
                        serde_json::from_slice(&e.payload).map_err(|e| e.to_string())?;
                    d.audiences.insert(u.id, (u.from, u.chunks, u.users));
                }
                _ => {}
            }
        }
    }
    Ok(d)
}

async fn resource(state: &AppState, id: &str) -> Option<CampaignResource> {
    let live = state.handle.published(id);
    let pipeline = match &live {
        Some(v) => pipeline_status(state, v).await,
        None => None,
    };
    let drafts = state.drafts.read().unwrap_or_else(|e| e.into_inner());
    let def = drafts.defs.get(id).cloned();
    if live.is_none() && def.is_none() {
        return None;
    }
    let users = drafts.audiences.get(id).map(|a| a.2);
    let st = match &live {
        Some(v) => v.status.map_or("created".to_owned(), |s| s.to_string()),
        None if users.is_some() => "ready".to_owned(),
        None => "awaiting_audience".to_owned(),
    };
    Some(CampaignResource {
        id: id.to_owned(),
        state: st,
        audience_users: users.or(live.as_ref().map(|_| 0)).filter(|&n| n > 0),
        definition: def,
        live,
        pipeline,
    })
}

/// Runs `f` once per `Idempotency-Key`: a repeat with the same request gets
/// the first answer; with another request, a 422.
pub(crate) async fn idempotent<F, Fut>(
    state: &AppState,
    headers: &HeaderMap,
    method: &str,
    path: &str,
    body: &[u8],
    f: F,
) -> Response
where
    F: FnOnce(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => match idempotency::check_key(k) {
            Ok(()) => Some(k.to_owned()),
            Err(why) => {
                return Problem::bad_request(format!("Idempotency-Key {why}"))
                    .field("Idempotency-Key")
                    .into_response()
            }
        },
        Some(Err(_)) => {
            return Problem::bad_request("Idempotency-Key is not text")
                .field("Idempotency-Key")
                .into_response()
        }
    };
    let Some(key) = key else {
        return f(None).await;
    };
    let fp = idempotency::fingerprint(method, path, body);
    if let Some(a) = state.idem.get(&key) {
        if a.fingerprint != fp {
            return Problem::unprocessable(
                "idempotency-key-reused",
                "this Idempotency-Key was used with another request",
            )
            .field("Idempotency-Key")
            .into_response();
        }
        let mut r = (
            StatusCode::from_u16(a.status).unwrap_or(StatusCode::OK),
            a.body,
        )
            .into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        return r;
    }
    let r = f(Some(idempotency::command_id(&key))).await;
    let status = r.status();
    if status.is_server_error() {
        return r;
    }
    let (parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let answer = Answer {
        key,
        fingerprint: fp,
        status: status.as_u16(),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    if let Err(e) = state.idem.put(&*state.log, answer).await {
        tracing::warn!(error = %e, "could not remember an idempotent answer");
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// Defines a campaign.
#[utoipa::path(post, path = "/v1/campaigns", tag = "campaigns",
    request_body = CampaignDefinition,
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat returns the first answer")),
    responses(
        (status = 201, description = "Defined; upload its audience next", body = CampaignResource),
        (status = 400, description = "Bad JSON, unknown field, wrong type", body = Problem),
        (status = 409, description = "Another definition has this id", body = Problem),
        (status = 422, description = "An invalid campaign or policy", body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn define(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    idempotent(
        &state,
        &headers,
        "POST",
        "/v1/campaigns",
        &body,
        |_| async {
            define_inner(&state, &body)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        },
    )
    .await
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error_like(de)
}

fn serde_path_to_error_like<T: serde::de::DeserializeOwned>(
    de: &mut serde_json::Deserializer<serde_json::de::SliceRead<'_>>,
) -> Result<T, Problem> {
    match T::deserialize(&mut *de) {
        Ok(v) => {
            if let Err(e) = de.end() {
                return Err(Problem::bad_request(format!("trailing data: {e}")));
            }
            Ok(v)
        }
        Err(e) => {
            let msg = e.to_string();
            // serde names the offending field in its message: pass it on.
            let field = msg
                .split('`')
                .nth(1)
                .filter(|_| msg.contains("field"))
                .map(str::to_owned);
            let mut p = Problem::bad_request(format!("invalid JSON body: {msg}"));
            p.field = field;
            Err(p)
        }
    }
}

fn spec_of(def: &CampaignDefinition, start_ms: u64) -> CampaignSpec {
    CampaignSpec {
        channel: def.channel.clone(),
        audience: format!("http-audience-{}", def.id),
        creatives: def.creatives.clone(),
        budget: def.budget,
        schedule: BatchSchedule {
            start_ms,
            interval_ms: def.interval_ms,
            sizing: BatchSizing::Count(def.batches),
        },
    }
}

async fn define_inner(state: &AppState, body: &[u8]) -> Result<Response, Problem> {
    let def: CampaignDefinition = parse_json(body)?;
    check_campaign_id(&def.id).map_err(Problem::from)?;
    spec_of(&def, 0)
        .validate()
        .map_err(|e| Problem::unprocessable("invalid-campaign", e.to_string()))?;
    if def.features.is_empty() || def.features.len() > smartmsg_domain::Candidates::MAX_DIM {
        return Err(Problem::unprocessable(
            "invalid-campaign",
            format!(
                "{} features; 1 to {} are allowed",
                def.features.len(),
                smartmsg_domain::Candidates::MAX_DIM
            ),
        )
        .field("features"));
    }
    let mut names = def.features.clone();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Problem::unprocessable(
            "invalid-campaign",
            format!("feature {:?} appears twice", w[0]),
        )
        .field("features"));
    }
    def.policy
        .build(
            def.creatives.len(),
            def.features.len(),
            spec_of(&def, 0).nominal_batch_size(0),
        )
        .map_err(|e| Problem::unprocessable("invalid-policy", e.to_string()).field("policy"))?;
    let _guard = state.admin.lock().await;
    let existing = state
        .drafts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .defs
        .get(&def.id)
        .map(|existing| existing == &def);
    match existing {
        Some(true) => return Ok(json(StatusCode::OK, &resource(state, &def.id).await)),
        Some(false) => {
            return Err(Problem::conflict(format!(
                "campaign {:?} is already defined otherwise",
                def.id
            ))
            .field("id"))
        }
        None => {}
    }
    if state.handle.published(&def.id).is_some() {
        return Err(Problem::conflict(format!("campaign {:?} exists", def.id)).field("id"));
    }
    let stream = StreamId::new(DRAFTS).map_err(|e| Problem::bad_request(e.to_string()))?;
    let payload = serde_json::to_vec(&def).unwrap_or_default();
    state
        .log
        .append(AppendTx::single(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::new(DEFINED, 1, 0, payload)],
        ))
        .await
        .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
    state
        .drafts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .defs
        .insert(def.id.clone(), def.clone());
    metrics::counter!("smartmsg_campaigns_defined_total").increment(1);
    let mut r = json(StatusCode::CREATED, &resource(state, &def.id).await);
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/campaigns/{}", def.id)) {
        r.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(r)
}

/// Lists the campaigns.
#[utoipa::path(get, path = "/v1/campaigns", tag = "campaigns",
    responses((status = 200, body = Vec<CampaignResource>)), security(("bearer" = [])))]
pub(crate) async fn list(State(state): State<AppState>) -> Response {
    let mut ids: std::collections::BTreeSet<String> = state.handle.views().into_keys().collect();
    ids.extend(
        state
            .drafts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .defs
            .keys()
            .cloned(),
    );
    let mut all: Vec<CampaignResource> = Vec::with_capacity(ids.len());
    for id in &ids {
        all.extend(resource(&state, id).await);
    }
    json(StatusCode::OK, &all)
}

/// One campaign, with its version as the `ETag`.
#[utoipa::path(get, path = "/v1/campaigns/{id}", tag = "campaigns",
    params(("id" = String, Path, description = "The campaign")),
    responses((status = 200, body = CampaignResource), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn get_campaign(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match resource(&state, &id).await {
        None => Problem::not_found(format!("no campaign {id:?}")).into_response(),
        Some(r) => {
            let v = r.live.as_ref().map_or(0, |l| l.version);
            let mut resp = json(StatusCode::OK, &r);
            resp.headers_mut().insert(header::ETAG, etag(v));
            resp
        }
    }
}

/// What an accepted upload holds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadAnswer {
    /// The campaign.
    pub id: String,
    /// Users uploaded.
    pub users: u64,
    /// The feature columns read, in order.
    pub features: Vec<String>,
}

/// Uploads a campaign's audience (CSV with a header, or JSON Lines), all
/// or nothing.
#[utoipa::path(put, path = "/v1/campaigns/{id}/audience", tag = "campaigns",
    params(("id" = String, Path, description = "The campaign")),
    request_body(content = String, content_type = "text/csv", description = "CSV with `user` and the feature columns, or JSON Lines (`application/x-ndjson`)"),
    responses((status = 200, body = UploadAnswer), (status = 404, body = Problem), (status = 409, body = Problem),
        (status = 413, body = Problem), (status = 415, body = Problem), (status = 422, description = "Bad rows, each with its line and reason", body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    upload_inner(&state, &id, &headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn upload_inner(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = if ctype.starts_with("text/csv") {
        Format::Csv
    } else if ctype.starts_with("application/x-ndjson") || ctype.starts_with("application/jsonl") {
        Format::JsonLines
    } else {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send text/csv or application/x-ndjson",
        )
        .field("Content-Type"));
    };
    let def = state
        .drafts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .defs
        .get(id)
        .cloned()
        .ok_or_else(|| Problem::not_found(format!("no campaign {id:?} is defined")))?;
    if state.handle.published(id).is_some() {
        return Err(Problem::conflict(
            "the campaign has started: its audience is fixed",
        ));
    }
    // Stream the body to a file: never held whole in memory.
    let tmp =
        tempfile::NamedTempFile::new_in(&state.uploads).map_err(|e| Problem::from(io_err(e)))?;
    let (std_file, path) = tmp.into_parts();
    let mut file = tokio::fs::File::from_std(std_file);
    let mut stream = body.into_data_stream();
    let mut size = 0u64;
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Problem::bad_request(format!("reading the body: {e}")))?;
        size += chunk.len() as u64;
        if size > state.limits.max_audience_bytes {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!(
                    "the audience is over {} bytes",
                    state.limits.max_audience_bytes
                ),
            ));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| Problem::from(io_err(e)))?;
    }
    file.flush().await.map_err(|e| Problem::from(io_err(e)))?;
    drop(file);
    let features = def.features.clone();
    let max_rows = state.limits.max_audience_rows;
    let p = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || audience::read(&p, format, &features, max_rows))
        .await
        .map_err(|e| Problem::from(io_err(std::io::Error::other(e.to_string()))))?;
    drop(path);
    let cands = match read {
        Ok(c) => c,
        Err(bad) => {
            let mut p = Problem::unprocessable(
                "invalid-audience",
                bad.file
                    .clone()
                    .unwrap_or_else(|| format!("{} bad rows; nothing was stored", bad.count)),
            );
            p.errors = bad.rows;
            p.error_count = Some(bad.count);
            return Err(p);
        }
    };
    let _guard = state.admin.lock().await;
    let users = cands.len() as u64;
    let stream = upload_stream(id).map_err(|e| Problem::bad_request(e.to_string()))?;
    let limits = state.log.limits();
    let rows = crate::audience::rows_per_chunk(
        cands.dim(),
        limits.max_event_bytes.min(limits.max_tx_bytes),
    );
    let mut from = 0;
    let chunks = crate::audience::encode(&cands, rows, 0);
    let n = chunks.len() as u64;
    for c in chunks {
        let r = state
            .log
            .append(AppendTx::single(
                stream.clone(),
                ExpectedVersion::Any,
                vec![c],
            ))
            .await
            .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
        if from == 0 {
            from = r.versions.first().map_or(1, |(_, v)| *v);
        }
    }
    let ev = UploadedEvent {
        id: id.to_owned(),
        from,
        chunks: n,
        users,
    };
    state
        .log
        .append(AppendTx::single(
            StreamId::new(DRAFTS).map_err(|e| Problem::bad_request(e.to_string()))?,
            ExpectedVersion::Any,
            vec![NewEvent::new(
                UPLOADED,
                1,
                0,
                serde_json::to_vec(&ev).unwrap_or_default(),
            )],
        ))
        .await
        .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
    state
        .drafts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .audiences
        .insert(id.to_owned(), (from, n, users));
    Ok(json(
        StatusCode::OK,
        &UploadAnswer {
            id: id.to_owned(),
            users,
            features: def.features,
        },
    ))
}

fn io_err(e: std::io::Error) -> crate::RuntimeError {
    crate::RuntimeError::Open {
        what: "upload",
        reason: e.to_string(),
    }
}

/// Starts, pauses, resumes or cancels a campaign.
#[utoipa::path(post, path = "/v1/campaigns/{id}/{command}", tag = "campaigns",
    params(("id" = String, Path, description = "The campaign"),
        ("command" = String, Path, description = "start, pause, resume or cancel"),
        ("Idempotency-Key" = Option<String>, Header, description = "A repeat returns the first answer and changes nothing"),
        ("If-Match" = Option<String>, Header, description = "The campaign's ETag: refused with 412 if it changed")),
    request_body(content = Object, description = "For cancel: {\"reason\": \"...\"}; otherwise empty"),
    responses((status = 200, body = CampaignResource), (status = 404, body = Problem), (status = 409, description = "Not allowed in the campaign's state", body = Problem),
        (status = 412, description = "Stale If-Match", body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn command(
    State(state): State<AppState>,
    Path((id, command)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/v1/campaigns/{id}/{command}");
    idempotent(&state, &headers, "POST", &path, &body, |cmd_id| async {
        command_inner(&state, &id, &command, &headers, &body, cmd_id)
            .await
            .unwrap_or_else(IntoResponse::into_response)
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: String,
}

async fn command_inner(
    state: &AppState,
    id: &str,
    command: &str,
    headers: &HeaderMap,
    body: &[u8],
    cmd_id: Option<String>,
) -> Result<Response, Problem> {
    let action = match command {
        "start" => Action::Start,
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "cancel" => {
            let b: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
                CancelBody {
                    reason: String::new(),
                }
            } else {
                parse_json(body)?
            };
            Action::Cancel { reason: b.reason }
        }
        other => {
            return Err(Problem::not_found(format!(
                "no command {other:?}: start, pause, resume or cancel"
            )))
        }
    };
    let expected = match headers.get(header::IF_MATCH).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .parse::<u64>()
                .map_err(|_| {
                    Problem::bad_request("If-Match must be an ETag this server gave")
                        .field("If-Match")
                })?,
        ),
        Some(Err(_)) => return Err(Problem::bad_request("If-Match is not text").field("If-Match")),
    };
    // A defined campaign is registered with the runtime when it starts.
    if matches!(action, Action::Start) && state.handle.published(id).is_none() {
        register(state, id).await?;
    }
    if state.handle.published(id).is_none() {
        return Err(match resource(state, id).await {
            None => Problem::not_found(format!("no campaign {id:?}")),
            Some(_) => Problem::conflict("the campaign has not started: start it first"),
        });
    }
    let cmd_id = cmd_id.unwrap_or_else(|| {
        if matches!(action, Action::Start) {
            "start".to_owned()
        } else {
            format!("http:{command}:{}", unique())
        }
    });
    state
        .handle
        .command_if(id, CampaignCommand::new(cmd_id, action), expected)
        .await
        .map_err(Problem::from)?;
    let r = resource(state, id).await;
    let v = r
        .as_ref()
        .and_then(|r| r.live.as_ref())
        .map_or(0, |l| l.version);
    let mut resp = json(StatusCode::OK, &r);
    resp.headers_mut().insert(header::ETAG, etag(v));
    Ok(resp)
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{t:x}.{}", N.fetch_add(1, Ordering::Relaxed))
}

async fn register(state: &AppState, id: &str) -> Result<(), Problem> {
    let _guard = state.admin.lock().await;
    if state.handle.published(id).is_some() {
        return Ok(());
    }
    let (def, upload) = {
        let d = state.drafts.read().unwrap_or_else(|e| e.into_inner());
        (d.defs.get(id).cloned(), d.audiences.get(id).copied())
    };
    let def = def.ok_or_else(|| Problem::not_found(format!("no campaign {id:?}")))?;
    let (from, chunks, _) =
        upload.ok_or_else(|| Problem::conflict("upload the campaign's audience first"))?;
    let stream = upload_stream(id).map_err(|e| Problem::bad_request(e.to_string()))?;
    let mut cands = None;
    let mut v = from.max(1);
    let end = from + chunks;
    while v < end {
        let page = state
            .log
            .read_stream(&stream, v, (end - v).min(1_000) as usize)
            .await
            .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
        let Some(last) = page.last() else { break };
        v = last.version + 1;
        for e in &page {
            crate::audience::decode_into(e, &mut cands)
                .map_err(|why| Problem::from(crate::RuntimeError::Audience(why)))?;
        }
    }
    let cands = cands.ok_or_else(|| Problem::conflict("the uploaded audience is missing"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut setup = CampaignSetup::new(
        id,
        spec_of(&def, def.start_ms.unwrap_or(now)),
        cands,
        def.policy.clone(),
    );
    setup.seed = def.seed;
    setup.pipeline = def.pipeline;
    setup.reaction_horizon_ms = def.reaction_horizon_ms;
    state
        .handle
        .create_campaign(setup)
        .await
        .map_err(Problem::from)?;
    metrics::counter!("smartmsg_campaigns_started_total").increment(1);
    Ok(())
}

/// Paging.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct Page {
    /// The first item (from 0).
    #[serde(default)]
    offset: u64,
    /// Items at most (default 100; at most the server's `max_page`).
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    100
}

/// A planned message.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlannedMessage {
    /// Its stable id: `<campaign>/<batch>/<user>`.
    pub id: String,
    /// The user.
    pub user: u32,
    /// The creative's index.
    pub creative: u16,
    /// The creative's reference.
    pub creative_ref: String,
    /// The probability with which the policy made this choice.
    pub propensity: f32,
}

/// A page of a batch's planned messages.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessagePage {
    /// The batch.
    pub batch: u32,
    /// Messages in the batch.
    pub total: u64,
    /// When the batch was recorded as sent (its sender acknowledged it).
    pub sent_ms: Option<u64>,
    /// The sender's last failure, while the batch is not sent.
    pub send_error: Option<String>,
    /// The messages of this page.
    pub messages: Vec<PlannedMessage>,
}

/// A page of a batch's planned messages, and its delivery status.
#[utoipa::path(get, path = "/v1/campaigns/{id}/batches/{batch}/messages", tag = "campaigns",
    params(("id" = String, Path, description = "The campaign"), ("batch" = u32, Path, description = "The batch, from 0"), Page),
    responses((status = 200, body = MessagePage), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn messages(
    State(state): State<AppState>,
    Path((id, batch)): Path<(String, u32)>,
    Query(page): Query<Page>,
) -> Response {
    messages_inner(&state, &id, batch, page)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn messages_inner(
    state: &AppState,
    id: &str,
    batch: u32,
    page: Page,
) -> Result<Response, Problem> {
    let view = state
        .handle
        .published(id)
        .ok_or_else(|| Problem::not_found(format!("no started campaign {id:?}")))?;
    let b = view
        .batches
        .get(batch as usize)
        .ok_or_else(|| Problem::not_found(format!("batch {batch} is not planned")))?;
    let streams = CampaignStreams::new(id).map_err(|e| Problem::bad_request(e.to_string()))?;
    let mut v = 1;
    let mut found: Option<smartmsg_domain::Decisions> = None;
    'read: loop {
        let events = state
            .log
            .read_stream(&streams.campaign, v, 100)
            .await
            .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
        let Some(last) = events.last() else { break };
        v = last.version + 1;
        for e in &events {
            if e.kind != "BatchPlanned" {
                continue;
            }
            if let Ok(CampaignEvent::BatchPlanned {
                batch: pb,
                part,
                decisions,
                ..
            }) = CampaignEvent::decode(&e.kind, e.schema, &e.payload)
            {
                if pb == batch {
                    // A large batch comes in parts, in order: join them.
                    match &mut found {
                        Some(d) if !part.is_first() => d.append(&decisions),
                        _ => found = Some(decisions),
                    }
                    if part.is_last() {
                        break 'read;
                    }
                }
            }
        }
    }
    let d = found.ok_or_else(|| Problem::not_found(format!("batch {batch} is not in the log")))?;
    let creatives: Vec<String> = state
        .drafts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .defs
        .get(id)
        .map(|def| def.creatives.clone())
        .unwrap_or_default();
    let limit = page.limit.min(state.limits.max_page as u64) as usize;
    // Removed users are not shown (the log still holds the plan).
    let shown: Vec<(u32, u16, f32)> = d
        .iter()
        .filter(|(u, _, _)| !state.handle.is_removed(*u))
        .collect();
    let total = shown.len() as u64;
    let messages = shown
        .into_iter()
        .skip(page.offset as usize)
        .take(limit)
        .map(|(u, c, p)| PlannedMessage {
            id: format!("{id}/{batch}/{u}"),
            user: u,
            creative: c,
            creative_ref: creatives.get(usize::from(c)).cloned().unwrap_or_default(),
            propensity: p,
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &MessagePage {
            batch,
            total,
            sent_ms: b.sent_ms,
            send_error: if b.sent_ms.is_none() {
                view.send_error.clone()
            } else {
                None
            },
            messages,
        },
    ))
}

/// A page of dead letters.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetterPage {
    /// Dead letters of the campaign in all.
    pub total: u64,
    /// This page's: why each message was refused, and its start.
    #[schema(value_type = Vec<Object>)]
    pub dead_letters: Vec<DeadLetter>,
}

/// The campaign's reactions the pipeline refused, with the reasons.
#[utoipa::path(get, path = "/v1/campaigns/{id}/dead-letters", tag = "reactions",
    params(("id" = String, Path, description = "The campaign"), Page),
    responses((status = 200, body = DeadLetterPage), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    dead_inner(&state, &id, page)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn dead_inner(state: &AppState, id: &str, page: Page) -> Result<Response, Problem> {
    if state.handle.published(id).is_none() {
        return Err(Problem::not_found(format!("no started campaign {id:?}")));
    }
    let streams = CampaignStreams::new(id).map_err(|e| Problem::bad_request(e.to_string()))?;
    let total = state
        .log
        .stream_version(&streams.dead_letters)
        .await
        .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?;
    let limit = page.limit.min(state.limits.max_page as u64) as usize;
    let events = if page.offset >= total {
        Vec::new()
    } else {
        state
            .log
            .read_stream(&streams.dead_letters, page.offset + 1, limit.max(1))
            .await
            .map_err(|e| Problem::from(crate::RuntimeError::from(e)))?
    };
    let dead_letters = events
        .iter()
        .take(limit)
        .filter_map(|e| {
            let (_, v) = envelope::decode(&e.payload)?;
            Json::<DeadLetter>::decode(&v).ok().map(|Json(d)| d)
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &DeadLetterPage {
            total,
            dead_letters,
        },
    ))
}

/// What became of one submitted reaction.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReactionResult {
    /// Its line in the request (1 for a single reaction).
    pub line: u64,
    /// `accepted` (durable, handed to its campaign's pipeline, which may
    /// still dead-letter it with a reason) or `unrouted` (durable as a dead
    /// letter: no campaign of this server takes it).
    pub status: String,
    /// Why, when unrouted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to a reactions request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReactionsAnswer {
    /// Reactions accepted.
    pub accepted: u64,
    /// Reactions no campaign takes (dead letters).
    pub unrouted: u64,
    /// The unrouted ones (at most 100), with their lines and reasons.
    pub results: Vec<ReactionResult>,
}

impl ReactionsAnswer {
    /// Counts an unrouted reaction; the first 100 are listed with their
    /// lines and reasons.
    pub(crate) fn add_unrouted(&mut self, line: u64, reason: String) {
        self.unrouted += 1;
        if self.results.len() < 100 {
            self.results.push(ReactionResult {
                line,
                status: "unrouted".into(),
                reason: Some(reason),
            });
        }
    }

    /// The answer (200), counted in the metrics.
    pub(crate) fn into_response(self) -> Response {
        metrics::counter!("smartmsg_reactions_accepted_total").increment(self.accepted);
        metrics::counter!("smartmsg_reactions_unrouted_total").increment(self.unrouted);
        json(StatusCode::OK, &self)
    }
}

/// Posts reactions: one JSON object (`application/json`), or many, one
/// per line (`application/x-ndjson`). Answered once they are durable.
#[utoipa::path(post, path = "/v1/reactions", tag = "reactions",
    request_body(content = String, description = "{\"campaign\": \"c\", \"batch\": 0, \"user\": 7, \"creative\": 1, \"reaction\": \"clicked\", \"time_ms\": 1700000000000}, or such objects one per line"),
    responses((status = 200, body = ReactionsAnswer), (status = 413, body = Problem), (status = 415, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn reactions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (numbers, lines) =
        match reaction_lines(&headers, body, state.limits.max_reactions_per_request) {
            Ok(v) => v,
            Err(p) => return p.into_response(),
        };
    match state.handle.inbox().submit_many(lines).await {
        Err(e) => Problem::from(e).into_response(),
        Ok(results) => {
            let mut a = ReactionsAnswer::default();
            for (line, r) in numbers.iter().zip(results) {
                match r {
                    Submitted::Accepted { .. } => a.accepted += 1,
                    Submitted::Unrouted { reason } => a.add_unrouted(*line, reason),
                }
            }
            a.into_response()
        }
    }
}

/// The reactions of a request body (`application/json`: one;
/// `application/x-ndjson`: one per line, blank lines skipped), each with
/// its line number; at most `max`.
pub(crate) fn reaction_lines(
    headers: &HeaderMap,
    body: Bytes,
    max: usize,
) -> Result<(Vec<u64>, Vec<Bytes>), Problem> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    let lines: Vec<Bytes> =
        if ctype.starts_with("application/x-ndjson") || ctype.starts_with("application/jsonl") {
            let mut v = Vec::new();
            let mut start = 0;
            for (i, &b) in body.iter().enumerate() {
                if b == b'\n' {
                    v.push(body.slice(start..i));
                    start = i + 1;
                }
            }
            if start < body.len() {
                v.push(body.slice(start..));
            }
            v
        } else if ctype.starts_with("application/json") {
            vec![body]
        } else {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send application/json or application/x-ndjson",
            )
            .field("Content-Type"));
        };
    let (numbers, lines): (Vec<u64>, Vec<Bytes>) = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let t = if l.ends_with(b"\r") {
                l.slice(..l.len() - 1)
            } else {
                l
            };
            (i as u64 + 1, t)
        })
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .unzip();
    if lines.len() > max {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("{} reactions; at most {} per request", lines.len(), max),
        ));
    }
    Ok((numbers, lines))
}

/// Why a user's data is removed (optional body of `DELETE /v1/users/{user}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovalRequest {
    /// Why (kept in the tombstone; at most 500 characters).
    #[serde(default)]
    pub reason: String,
}

/// The answer to a removal.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RemovalAnswer {
    /// What the runtime did.
    #[schema(value_type = Object)]
    #[serde(flatten)]
    pub report: crate::RemovalReport,
    /// What still holds the user's id or data, and why.
    pub remains: Vec<String>,
}

/// What a removal leaves behind (docs/serve.md says the same).
pub(crate) const REMAINS: [&str; 4] = [
    "the event log (append-only): the tombstone in `removed-users`, and the history before it: planned batches with the user's id, creative and propensity, the raw reactions, the uploaded audience's chunks with the user's features, the pipeline's per-user outcomes",
    "messages sent before the removal, at the channel",
    "the campaign's counts (messages and reactions per creative and batch), which name nobody",
    "the pipeline's per-(campaign, user) deduplication entry in the state store (the user's id and whether they reacted)",
];

/// Removes a user's data from every campaign's future batches, from what
/// is not yet sent, from the pipelines' user tables and from the API's
/// views; the log keeps a tombstone. Repeating it changes nothing.
#[utoipa::path(delete, path = "/v1/users/{user}", tag = "users",
    params(("user" = u32, Path, description = "The user")),
    request_body(content = Option<RemovalRequest>, content_type = "application/json"),
    responses((status = 200, body = RemovalAnswer), (status = 400, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = [])))]
pub(crate) async fn remove_user(
    State(state): State<AppState>,
    Path(user): Path<String>,
    body: Bytes,
) -> Response {
    let user: u32 = match user.parse() {
        Ok(u) => u,
        Err(_) => {
            return Problem::bad_request(format!(
                "user {user:?} is not a number from 0 to {}",
                u32::MAX
            ))
            .field("user")
            .into_response()
        }
    };
    let req: RemovalRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RemovalRequest::default()
    } else {
        match parse_json(&body) {
            Ok(r) => r,
            Err(p) => return p.into_response(),
        }
    };
    match state.handle.remove_user(user, &req.reason).await {
        Err(e) => Problem::from(e).into_response(),
        Ok(report) => {
            if report.recorded {
                metrics::counter!("smartmsg_users_removed_total").increment(1);
                tracing::info!(
                    user,
                    campaigns = report.campaigns.len(),
                    "user data removed"
                );
            }
            json(
                StatusCode::OK,
                &RemovalAnswer {
                    report,
                    remains: REMAINS.iter().map(|s| (*s).to_owned()).collect(),
                },
            )
        }
    }
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, description = "ok")))]
pub(crate) async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: the runtime answers within two seconds.
#[utoipa::path(get, path = "/ready", tag = "operations", responses((status = 200, description = "ready"), (status = 503, body = Problem)))]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    match tokio::time::timeout(Duration::from_secs(2), state.handle.list()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        _ => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "the runtime does not answer",
        )
        .into_response(),
    }
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")), security(("bearer" = [])))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    // Gauges from the published views and the log.
    let views = state.handle.views();
    for (id, v) in &views {
        let labels = [("campaign", id.clone())];
        metrics::gauge!("smartmsg_campaign_sent", &labels).set(v.sent as f64);
        metrics::gauge!("smartmsg_campaign_reactions", &labels).set(v.reactions as f64);
        metrics::gauge!("smartmsg_campaign_budget_left", &labels).set(v.budget_left as f64);
        metrics::gauge!("smartmsg_campaign_send_failing", &labels)
            .set(f64::from(u8::from(v.send_error.is_some())));
    }
    for v in views.values() {
        if let Some(p) = pipeline_status(&state, v).await {
            let labels = [("campaign", v.id.clone())];
            metrics::gauge!("smartmsg_pipeline_lag_events", &labels).set(p.lag as f64);
            metrics::counter!("smartmsg_reactions_dead_lettered_total", &labels)
                .absolute(p.dead_letters);
        }
    }
    if let Ok(h) = state.log.head().await {
        metrics::gauge!("smartmsg_log_head").set(h as f64);
    }
    if let Some(c) = state.log.counters() {
        metrics::counter!("smartmsg_log_appends_total").absolute(c.appends);
        metrics::counter!("smartmsg_log_events_total").absolute(c.events);
        metrics::counter!("smartmsg_log_bytes_total").absolute(c.bytes);
        metrics::counter!("smartmsg_log_fsyncs_total").absolute(c.syncs);
    }
    if let Ok(n) = state.handle.queue().len().await {
        metrics::gauge!("smartmsg_queue_depth").set(n as f64);
    }
    let st = state.handle.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("smartmsg_runtime_steps_total").absolute(load(&st.steps));
    metrics::counter!("smartmsg_jobs_fired_total").absolute(load(&st.jobs_fired));
    metrics::gauge!("smartmsg_firing_lag_ms").set(load(&st.firing_lag_ms_last) as f64);
    metrics::gauge!("smartmsg_firing_lag_ms_max").set(load(&st.firing_lag_ms_max) as f64);
    let text = state
        .metrics
        .as_ref()
        .map(|m| m.render())
        .unwrap_or_default();
    let mut r = (StatusCode::OK, text).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// The OpenAPI document.
pub(crate) async fn openapi() -> Response {
    use utoipa::OpenApi;
    let doc = ApiDoc::openapi();
    json(StatusCode::OK, &doc)
}

/// The dashboard page.
pub(crate) async fn dashboard() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("assets/dashboard.html"),
    )
}

/// The vendored charting library (uPlot, MIT).
pub(crate) async fn uplot_js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/uPlot.iife.min.js"),
    )
}

/// Its stylesheet.
pub(crate) async fn uplot_css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/uPlot.min.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
