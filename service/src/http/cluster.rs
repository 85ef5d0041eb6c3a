//! `smartmsg serve` as one instance of a cluster (`backend.kind =
//! "cluster"`): the same API, answered by whichever instance is asked.
//!
//! The instance runs a [`Node`]: a runtime per shard the cluster gives it.
//! For each running shard it keeps the single server's API state
//! ([`AppState`] over the shard's runtime and log, so definitions,
//! uploads, idempotency keys and evaluation jobs live in the shard's log
//! and move with it) and claims the shard in the [`ShardDirectory`] under
//! its advertised address. A request is then taken as follows:
//!
//! | request | where it goes |
//! |---|---|
//! | anything about campaign `id` (`/v1/campaigns/{id}/…`, `POST /v1/campaigns` by the body's `id`, `POST /v1/evaluations` by its `campaign`, `GET /v1/evaluations/ev-<shard>-<n>`) | the shard's API here, or forwarded to the instance that claimed the shard (header `x-smartmsg-shard`); 503 with `Retry-After` while the shard moves |
//! | `GET /v1/campaigns` | the read model ([`ShardDirectory::campaigns`], PostgreSQL): every campaign of the cluster |
//! | `POST /v1/reactions` | the [`ReactionSink`] (the reactions topic, one partition per shard): answered once durable there |
//! | `DELETE /v1/users/{user}`, `GET /v1/evaluations` | every shard, and the answers joined |
//! | `/health`, `/ready`, `/metrics`, the dashboard, `/openapi.json` | this instance |
//!
//! A forwarded request carries `x-smartmsg-shard`; an instance answers
//! such a request only for a shard it runs (else 503), so a stale claim
//! costs the client a retry, never a loop or a wrong answer.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use smartmsg_engine::EventLog;
use tower::ServiceExt;

use super::config::{HttpLimits, ServeConfig, TokenConfig};
use super::problem::Problem;
use super::routes::{json, reaction_lines, ReactionsAnswer};
use super::{auth, evaluation, AppState, ServeError};
use crate::cluster::{Node, NodeHandle, ReactionSink, RoutedReaction, ShardDirectory, ShardMap};

/// The header of a request forwarded to a shard's instance: the shard.
pub const SHARD_HEADER: &str = "x-smartmsg-shard";

/// What an instance shares with the others (built by the `smartmsg`
/// binary from the configuration: PostgreSQL and Kafka).
#[non_exhaustive]
pub struct ClusterParts {
    /// Where each shard runs; the campaigns' read model.
    pub directory: Arc<dyn ShardDirectory>,
    /// Where posted reactions go.
    pub sink: Arc<dyn ReactionSink>,
    /// The URL other instances reach this one at (`http://host:port`).
    pub advertise: String,
    /// This instance's name.
    pub member: String,
}

impl ClusterParts {
    /// The parts of an instance reachable at `advertise`.
    pub fn new(
        directory: Arc<dyn ShardDirectory>,
        sink: Arc<dyn ReactionSink>,
        advertise: impl Into<String>,
        member: impl Into<String>,
    ) -> Self {
        Self {
            directory,
            sink,
            advertise: advertise.into(),
            member: member.into(),
        }
    }
}

impl std::fmt::Debug for ClusterParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterParts")
            .field("advertise", &self.advertise)
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}

/// A running shard's API.
#[derive(Clone)]
struct ShardApp {
    log: Arc<dyn EventLog>,
    router: Router,
}

/// The instance's state: cloned into every request.
#[derive(Clone)]
struct Cluster(Arc<Inner>);

struct Inner {
    map: ShardMap,
    node: NodeHandle,
    apps: RwLock<BTreeMap<u32, ShardApp>>,
    parts: ClusterParts,
    tokens: Arc<Vec<TokenConfig>>,
    limits: HttpLimits,
    uploads: PathBuf,
    evaluator: Option<Arc<dyn evaluation::Evaluator>>,
    client: reqwest::Client,
}

impl std::ops::Deref for Cluster {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Runs `smartmsg serve` as an instance of a cluster until `shutdown`
/// resolves: the [`Node`] (its shards' runtimes), the shards' APIs, and
/// the HTTP server on `listener`. On shutdown the server stops taking
/// requests, then the node stops its shards (each finishes its step) and
/// leaves the cluster.
pub async fn serve_cluster(
    config: ServeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    node: Node,
    parts: ClusterParts,
    evaluator: Option<Arc<dyn evaluation::Evaluator>>,
) -> Result<(), ServeError> {
    if config.tokens.is_empty() {
        tracing::warn!("no tokens configured: every request is allowed");
    }
    // No total timeout (an upload may stream for minutes), but a stalled
    // peer is given up; no proxies, no redirects between instances.
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(60))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ServeError::Records(format!("the forwarding client: {e}")))?;
    let cluster = Cluster(Arc::new(Inner {
        map: node.handle().map(),
        node: node.handle(),
        apps: RwLock::default(),
        parts,
        tokens: Arc::new(config.tokens.clone()),
        limits: config.limits,
        uploads: config.data_dir.join("uploads"),
        evaluator,
        client,
    }));
    let (stop_node, node_stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(node.run(async move {
        let _ = node_stopped.await;
    }));
    let follower = tokio::spawn(follow(cluster.clone()));
    let app = Router::new().fallback(dispatch).with_state(cluster.clone());
    tracing::info!(addr = ?listener.local_addr().ok(), advertise = %cluster.parts.advertise, "serving as a cluster instance");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    follower.abort();
    cluster
        .apps
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    let _ = stop_node.send(());
    running
        .await
        .map_err(|e| ServeError::Records(e.to_string()))?;
    served.map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })
}

/// How often an instance claims its shards again (a claim another
/// instance overwrote late, after the shard had moved here, is mended
/// within this).
const RECLAIM: Duration = Duration::from_secs(5);

/// Keeps an API for every shard running here, and claims each in the
/// directory once its API is ready (and again every [`RECLAIM`]).
async fn follow(c: Cluster) {
    let mut changes = c.node.changes();
    loop {
        let running = changes.borrow_and_update().clone();
        {
            let mut apps = c.apps.write().unwrap_or_else(|e| e.into_inner());
            apps.retain(|s, app| {
                running.contains(s)
                    && c.node
                        .shard(*s)
                        .is_some_and(|h| Arc::ptr_eq(h.log(), &app.log))
            });
        }
        let mut retry = false;
        for &s in &running {
            let Some(handle) = c.node.shard(s) else {
                continue;
            };
            if c.app(s).is_none() {
                let log = Arc::clone(handle.log());
                let state = AppState::open(
                    handle,
                    c.tokens.to_vec(),
                    c.limits,
                    c.uploads.join(format!("shard-{s}")),
                    Some(super::prometheus()),
                    c.evaluator.clone(),
                    Some(s),
                )
                .await;
                let state = match state {
                    Ok(st) => st,
                    Err(e) => {
                        tracing::warn!(shard = s, error = %e, "the shard's API did not open; trying again");
                        retry = true;
                        continue;
                    }
                };
                // The shard may have moved on while its API opened.
                if !c.node.shard(s).is_some_and(|h| Arc::ptr_eq(h.log(), &log)) {
                    continue;
                }
                let router = super::router(state);
                c.apps
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(s, ShardApp { log, router });
                tracing::info!(shard = s, "serving the shard");
            }
            if c.app(s).is_some() {
                if let Err(e) = c
                    .parts
                    .directory
                    .claim(s, &c.parts.advertise, &c.parts.member)
                    .await
                {
                    tracing::warn!(shard = s, error = %e, "could not claim the shard in the directory; trying again");
                    retry = true;
                }
            }
        }
        let wait = if retry {
            Duration::from_secs(1)
        } else {
            RECLAIM
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() {
                return;
            },
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Every request: see the [module](self) docs.
async fn dispatch(State(c): State<Cluster>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if !auth::is_open(&path) {
        let h = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if let Err(p) = auth::check(&c.tokens, h, auth::needed(&method, &path)) {
            metrics::counter!("smartmsg_http_denied_total").increment(1);
            return p.into_response();
        }
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["v1", "campaigns", id, ..] = segments.as_slice() {
        if id.contains('%') {
            // Ids are letters, digits, `-`, `_` and `.`: an encoded one
            // would be hashed to another shard than the one it decodes to.
            return Problem::bad_request("a campaign id is letters, digits, -, _ and . only")
                .field("id")
                .into_response();
        }
    }
    if let Some(v) = req.headers().get(SHARD_HEADER) {
        let s = match v.to_str().ok().and_then(|v| v.parse::<u32>().ok()) {
            Some(s) if s < c.map.shards() => s,
            _ => {
                return Problem::bad_request(format!(
                    "{SHARD_HEADER} is not a shard of this cluster"
                ))
                .field(SHARD_HEADER)
                .into_response()
            }
        };
        return c.forwarded(s, &method, &segments, req).await;
    }
    match (&method, segments.as_slice()) {
        (&Method::POST, ["v1", "campaigns"]) => c.by_body_field(req, "id").await,
        (&Method::GET, ["v1", "campaigns"]) => c.list().await,
        (_, ["v1", "campaigns", id, ..]) => {
            let s = c.map.shard_of(id);
            c.to_shard(s, req).await
        }
        (&Method::POST, ["v1", "reactions"]) => c.reactions(req).await,
        (&Method::DELETE, ["v1", "users", _]) => c.remove_user(req).await,
        (&Method::POST, ["v1", "evaluations"]) => c.by_body_field(req, "campaign").await,
        (&Method::GET, ["v1", "evaluations"]) => c.evaluations(req).await,
        (_, ["v1", "evaluations", job]) => match evaluation::job_shard(job) {
            Some(s) if s < c.map.shards() => c.to_shard(s, req).await,
            _ => Problem::not_found(format!("no evaluation {job:?}")).into_response(),
        },
        (_, ["health"]) => "ok".into_response(),
        (_, ["ready"]) => c.ready(),
        (_, ["metrics"]) => c.metrics(req).await,
        _ => match c.any_app() {
            Some(app) => call(app.router, req).await,
            None => unavailable("no shard runs on this instance yet"),
        },
    }
}

/// The string `field` of a JSON object body, if any.
fn field_of(body: &[u8], field: &str) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get(field)?
        .as_str()
        .map(str::to_owned)
}

async fn call(router: Router, req: Request) -> Response {
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// 503: the shard is moving between instances.
fn moving(shard: u32) -> Response {
    unavailable(&format!(
        "shard {shard} is moving between instances; try again"
    ))
}

fn unavailable(detail: &str) -> Response {
    let mut r =
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail).into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Headers not passed on by a proxy (RFC 9110 §7.6.1), and the ones the
/// client sets itself.
fn hop_by_hop(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

impl Cluster {
    /// Shard `shard`'s API, if the shard's runtime runs here now (the
    /// node forgets a shard's runtime as soon as it starts stopping it).
    fn app(&self, shard: u32) -> Option<ShardApp> {
        let app = self
            .apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shard)
            .cloned()?;
        self.node
            .shard(shard)
            .is_some_and(|h| Arc::ptr_eq(h.log(), &app.log))
            .then_some(app)
    }

    /// A request another instance forwarded for shard `s`: answered here if
    /// `s` runs here and the request is about `s` (a client cannot put a
    /// campaign into another shard with the header), else 503 or 421.
    async fn forwarded(
        &self,
        s: u32,
        method: &Method,
        segments: &[&str],
        req: Request,
    ) -> Response {
        let misdirected = |what: &str| {
            Problem::new(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected",
                format!("{what} is not in shard {s}"),
            )
            .into_response()
        };
        let req = match (method, segments) {
            (_, ["v1", "campaigns", id, ..]) if self.map.shard_of(id) != s => {
                return misdirected(&format!("campaign {id:?}"))
            }
            (_, ["v1", "evaluations", job]) if evaluation::job_shard(job) != Some(s) => {
                return misdirected(&format!("evaluation {job:?}"))
            }
            (&Method::POST, ["v1", kind @ ("campaigns" | "evaluations")]) => {
                let field = if *kind == "campaigns" {
                    "id"
                } else {
                    "campaign"
                };
                let (parts, bytes) = match self.body(req, self.limits.max_json_bytes).await {
                    Ok(x) => x,
                    Err(r) => return r,
                };
                if let Some(id) = field_of(&bytes, field) {
                    if self.map.shard_of(&id) != s {
                        return misdirected(&format!("campaign {id:?}"));
                    }
                }
                Request::from_parts(parts, Body::from(bytes))
            }
            _ => req,
        };
        match self.app(s) {
            Some(app) => call(app.router, req).await,
            None => moving(s),
        }
    }

    /// `req`'s head and its body, at most `limit` bytes (else 413).
    async fn body(
        &self,
        req: Request,
        limit: usize,
    ) -> Result<(axum::http::request::Parts, Bytes), Response> {
        let (parts, body) = req.into_parts();
        match axum::body::to_bytes(body, limit).await {
            Ok(b) => Ok((parts, b)),
            Err(_) => Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("the body is over {limit} bytes (or was cut off)"),
            )
            .into_response()),
        }
    }

    fn any_app(&self) -> Option<ShardApp> {
        self.apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .next()
            .cloned()
    }

    /// Answers `req` with shard `s`'s API: here, or at the instance that
    /// claimed it.
    async fn to_shard(&self, s: u32, req: Request) -> Response {
        if let Some(app) = self.app(s) {
            return call(app.router, req).await;
        }
        match self.parts.directory.owner(s).await {
            Ok(Some(addr)) if addr != self.parts.advertise => self.forward(s, &addr, req).await,
            Ok(_) => moving(s),
            Err(e) => {
                tracing::warn!(shard = s, error = %e, "the shard directory failed");
                unavailable("the shard directory is unreachable; try again")
            }
        }
    }

    /// Forwards `req` to the instance at `addr`, streaming both bodies.
    async fn forward(&self, s: u32, addr: &str, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let target = format!(
            "{}{}",
            addr.trim_end_matches('/'),
            parts.uri.path_and_query().map_or("/", |p| p.as_str())
        );
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if !hop_by_hop(k) {
                headers.append(k.clone(), v.clone());
            }
        }
        headers.insert(SHARD_HEADER, HeaderValue::from(s));
        metrics::counter!("smartmsg_http_forwarded_total").increment(1);
        let sent = self
            .client
            .request(parts.method, &target)
            .headers(headers)
            .body(reqwest::Body::wrap_stream(body.into_data_stream()))
            .send()
            .await;
        match sent {
            Ok(r) => {
                let mut out = Response::builder().status(r.status());
                for (k, v) in r.headers() {
                    if !hop_by_hop(k) {
                        out = out.header(k, v);
                    }
                }
                out.body(Body::from_stream(r.bytes_stream()))
                    .unwrap_or_else(|e| {
                        Problem::new(StatusCode::BAD_GATEWAY, "bad-gateway", e.to_string())
                            .into_response()
                    })
            }
            Err(e) => {
                tracing::warn!(shard = s, owner = addr, error = %e, "forwarding failed");
                unavailable(&format!("shard {s}'s instance did not answer; try again"))
            }
        }
    }

    /// A command whose campaign is named in its JSON body (`field`).
    async fn by_body_field(&self, req: Request, field: &str) -> Response {
        let (parts, bytes) = match self.body(req, self.limits.max_json_bytes).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let id = field_of(&bytes, field);
        let req = Request::from_parts(parts, Body::from(bytes));
        match id {
            Some(id) => {
                let s = self.map.shard_of(&id);
                self.to_shard(s, req).await
            }
            // Malformed: any shard's API says why, as a single server does.
            None => match self.any_app() {
                Some(app) => call(app.router, req).await,
                None => Problem::bad_request(format!("the body needs a string {field:?}"))
                    .field(field)
                    .into_response(),
            },
        }
    }

    async fn list(&self) -> Response {
        match self.parts.directory.campaigns().await {
            Ok(rows) => json(StatusCode::OK, &rows),
            Err(e) => {
                tracing::warn!(error = %e, "the read model failed");
                unavailable("the campaigns' read model is unreachable; try again")
            }
        }
    }

    async fn reactions(&self, req: Request) -> Response {
        let (parts, body) = match self.body(req, self.limits.max_reactions_bytes).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        let (numbers, lines) =
            match reaction_lines(&parts.headers, body, self.limits.max_reactions_per_request) {
                Ok(v) => v,
                Err(p) => return p.into_response(),
            };
        let mut answer = ReactionsAnswer::default();
        let mut routed = Vec::with_capacity(lines.len());
        for (line, payload) in numbers.into_iter().zip(lines) {
            let campaign = match crate::ingest::campaign_of(&payload) {
                Ok(c) => {
                    answer.accepted += 1;
                    c
                }
                Err(reason) => {
                    // Still handed on: the shard's runtime records it as an
                    // unrouted dead letter with this reason.
                    answer.add_unrouted(line, reason);
                    String::new()
                }
            };
            routed.push(RoutedReaction {
                shard: self.map.shard_of(&campaign),
                campaign,
                payload,
            });
        }
        if let Err(e) = self.parts.sink.publish(routed).await {
            tracing::warn!(error = %e, "publishing reactions failed");
            return unavailable("the reactions could not be stored; send them again");
        }
        answer.into_response()
    }

    /// Sends a copy of a bodiless-or-small request to every shard; the
    /// answers by shard, or the first failure.
    async fn every_shard(
        &self,
        method: &Method,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<BTreeMap<u32, serde_json::Value>, Response> {
        let mut out = BTreeMap::new();
        for s in self.map.all() {
            let mut b = Request::builder().method(method.clone()).uri(uri.clone());
            for (k, v) in headers {
                if !hop_by_hop(k) {
                    b = b.header(k, v);
                }
            }
            let req = b
                .body(Body::from(body.clone()))
                .map_err(|e| Problem::bad_request(e.to_string()).into_response())?;
            let r = self.to_shard(s, req).await;
            if !r.status().is_success() {
                return Err(r);
            }
            let bytes = axum::body::to_bytes(r.into_body(), 64 << 20)
                .await
                .map_err(|e| unavailable(&format!("shard {s}'s answer: {e}")))?;
            let v = serde_json::from_slice(&bytes).map_err(|e| {
                Problem::new(StatusCode::BAD_GATEWAY, "bad-gateway", e.to_string()).into_response()
            })?;
            out.insert(s, v);
        }
        Ok(out)
    }

    async fn remove_user(&self, req: Request) -> Response {
        let (parts, body) = match self.body(req, self.limits.max_json_bytes).await {
            Ok(x) => x,
            Err(r) => return r,
        };
        match self
            .every_shard(&parts.method, &parts.uri, &parts.headers, &body)
            .await
        {
            Ok(by_shard) => json(
                StatusCode::OK,
                &serde_json::json!({ "shards": by_shard, "remains": super::routes::REMAINS }),
            ),
            Err(r) => r,
        }
    }

    async fn evaluations(&self, req: Request) -> Response {
        let (parts, _) = req.into_parts();
        match self
            .every_shard(&parts.method, &parts.uri, &parts.headers, &Bytes::new())
            .await
        {
            Ok(by_shard) => {
                let all: Vec<serde_json::Value> = by_shard
                    .into_values()
                    .flat_map(|v| match v {
                        serde_json::Value::Array(a) => a,
                        other => vec![other],
                    })
                    .collect();
                json(StatusCode::OK, &all)
            }
            Err(r) => r,
        }
    }

    fn ready(&self) -> Response {
        let shards: Vec<u32> = self
            .apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        json(
            StatusCode::OK,
            &serde_json::json!({ "member": self.parts.member, "shards": shards }),
        )
    }

    /// Every local shard refreshes its gauges; the process's registry is
    /// rendered once.
    async fn metrics(&self, req: Request) -> Response {
        let apps: Vec<ShardApp> = self
            .apps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut last = None;
        for app in apps {
            let mut b = Request::builder().uri("/metrics");
            if let Some(a) = req.headers().get(header::AUTHORIZATION) {
                b = b.header(header::AUTHORIZATION, a);
            }
            if let Ok(r) = b.body(Body::empty()) {
                last = Some(call(app.router, r).await);
            }
        }
        last.unwrap_or_else(|| {
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                super::prometheus().render(),
            )
                .into_response()
        })
    }
}
