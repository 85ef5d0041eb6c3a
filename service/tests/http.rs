//! The HTTP service end to end on a real socket: every endpoint, its
//! errors as problem+json, tokens and scopes, `Idempotency-Key` and
//! `If-Match`.

use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use smartmsg_service::http::{serve_on, Scope, SenderConfig, ServeConfig, TokenConfig};

struct Server {
    url: String,
    client: Client,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

const READ: &str = "read-token-1";
const WRITE: &str = "write-token-2";
const ADMIN: &str = "admin-token-3";

impl Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = {
            let mut built = ServeConfig::default();
            built.data_dir = dir.path().join("data");
            built.sender = SenderConfig::Outbox {
                dir: dir.path().join("outbox"),
            };
            built.poll_interval_ms = 20;
            built
        };
        config.limits.max_json_bytes = 64 << 10;
        config.tokens = vec![
            TokenConfig::new(READ, Scope::Read),
            TokenConfig::new(WRITE, Scope::Write),
            TokenConfig::new(ADMIN, Scope::Admin),
        ];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            serve_on(config, listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            url,
            client: Client::new(),
            dir,
            stop: Some(stop),
            done: Some(done),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Vec<u8>)>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut r = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some((ct, b)) = body {
            r = r.header("content-type", ct).body(b);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status();
        let h = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, h, v)
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .call(
                Method::POST,
                path,
                Some(WRITE),
                Some(("application/json", body.to_string().into_bytes())),
                &[],
            )
            .await;
        (s, v)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(Method::GET, path, Some(READ), None, &[]).await;
        (s, v)
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }
}

fn definition(id: &str) -> Value {
    json!({
        "id": id, "channel": "test", "creatives": ["red", "blue"],
        "budget": 200, "batches": 2, "interval_ms": 600_000,
        "features": ["age", "visits"],
        "policy": {"kind": "creative-thompson", "propensity_draws": 50},
        "pipeline": {"window_ms": 200, "grace_ms": 100}
    })
}

fn audience_csv(n: u32) -> Vec<u8> {
    let mut s = String::from("user,visits,age,note\n");
    for u in 0..n {
        s.push_str(&format!("{u},{},{},x\n", u % 7, (u % 5) as f32 / 5.0));
    }
    s.into_bytes()
}

fn problem(v: &Value, status: u16) {
    assert_eq!(v["status"], status, "{v}");
    assert!(v["type"].as_str().unwrap().contains("problems/"), "{v}");
    assert!(!v["detail"].as_str().unwrap().is_empty(), "{v}");
}

async fn wait_for<F: Fn(&Value) -> bool>(s: &Server, id: &str, what: F) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = s.get(&format!("/v1/campaigns/{id}")).await;
        if what(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "waited 20 s: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_through_the_api() {
    let s = Server::start().await;
    let (st, v) = s.post_json("/v1/campaigns", &definition("spring")).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["state"], "awaiting_audience");
    // Starting before the audience is there is a conflict.
    let (st, v) = s.post_json("/v1/campaigns/spring/start", &json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    problem(&v, 409);
    let (st, _, v) = s
        .call(
            Method::PUT,
            "/v1/campaigns/spring/audience",
            Some(WRITE),
            Some(("text/csv", audience_csv(1_000))),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["users"], 1_000);
    let (st, v) = s.post_json("/v1/campaigns/spring/start", &json!({})).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let v = wait_for(&s, "spring", |v| v["live"]["sent"] == 100).await;
    assert_eq!(v["state"], "running");
    // The batch is in the outbox, and pageable through the API.
    let outbox = s.dir.path().join("outbox/spring/batch-0.jsonl");
    let lines = std::fs::read_to_string(&outbox).unwrap();
    assert_eq!(lines.lines().count(), 100);
    let (st, page) = s
        .get("/v1/campaigns/spring/batches/0/messages?offset=10&limit=5")
        .await;
    assert_eq!(st, StatusCode::OK, "{page}");
    assert_eq!(page["total"], 100);
    assert_eq!(page["messages"].as_array().unwrap().len(), 5);
    assert!(page["sent_ms"].is_u64());
    let first: Value = serde_json::from_str(lines.lines().nth(10).unwrap()).unwrap();
    assert_eq!(page["messages"][0]["id"], first["id"]);
    // Reactions: many in one request; one unroutable; one the pipeline
    // refuses (another creative than the user got).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut body = String::new();
    let msgs: Vec<Value> = lines
        .lines()
        .take(30)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for m in &msgs {
        body.push_str(&format!(
            "{{\"campaign\":\"spring\",\"batch\":0,\"user\":{},\"creative\":{},\"reaction\":\"clicked\",\"time_ms\":{now}}}\n",
            m["user"], m["creative"]
        ));
    }
    body.push_str("{\"campaign\":\"nope\",\"batch\":0}\n");
    let m = &msgs[0];
    body.push_str(&format!(
        "{{\"campaign\":\"spring\",\"batch\":0,\"user\":{},\"creative\":{},\"reaction\":\"clicked\",\"time_ms\":{now}}}\n",
        m["user"], 1 - m["creative"].as_u64().unwrap()
    ));
    let (st, _, v) = s
        .call(
            Method::POST,
            "/v1/reactions",
            Some(WRITE),
            Some(("application/x-ndjson", body.into_bytes())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], 31);
    assert_eq!(v["unrouted"], 1);
    assert_eq!(v["results"][0]["line"], 31);
    let v = wait_for(&s, "spring", |v| v["live"]["reactions"] == 30).await;
    assert_eq!(v["live"]["batches"][0]["reacted"], 30);
    let (_, dl) = s.get("/v1/campaigns/spring/dead-letters").await;
    assert_eq!(dl["total"], 1, "{dl}");
    assert_eq!(
        dl["dead_letters"][0]["reason"]["reason"], "not_planned",
        "{dl}"
    );
    // The pipeline's progress: everything processed, the dead letter counted.
    let v = wait_for(&s, "spring", |v| v["pipeline"]["lag"] == 0).await;
    assert_eq!(v["pipeline"]["dead_letters"], 1, "{v}");
    assert!(v["pipeline"]["input"].as_u64().unwrap() >= 31, "{v}");
    assert_eq!(v["pipeline"]["processed"], v["pipeline"]["input"], "{v}");
    // Removing a user's data: admin only; gone from the batch's page.
    let (_, page) = s
        .get("/v1/campaigns/spring/batches/0/messages?limit=1000")
        .await;
    let user = page["messages"][0]["user"].as_u64().unwrap();
    let path = format!("/v1/users/{user}");
    let reason = || Some(("application/json", br#"{"reason":"asked"}"#.to_vec()));
    let (st, _, v) = s
        .call(Method::DELETE, &path, Some(WRITE), reason(), &[])
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    let (st, _, v) = s
        .call(Method::DELETE, &path, Some(ADMIN), reason(), &[])
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["recorded"], true, "{v}");
    assert_eq!(v["campaigns"], serde_json::json!(["spring"]), "{v}");
    assert!(v["remains"].as_array().unwrap().len() >= 3, "{v}");
    let (st, _, v) = s.call(Method::DELETE, &path, Some(ADMIN), None, &[]).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["recorded"], false, "a repeat changes nothing: {v}");
    let (_, page) = s
        .get("/v1/campaigns/spring/batches/0/messages?limit=1000")
        .await;
    assert_eq!(page["total"], 99, "{page}");
    assert!(page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["user"].as_u64() != Some(user)));
    let (st, _, v) = s
        .call(
            Method::DELETE,
            "/v1/users/not-a-user",
            Some(ADMIN),
            None,
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "user");
    let (st, _, v) = s
        .call(
            Method::DELETE,
            "/v1/users/1",
            Some(ADMIN),
            Some(("application/json", br#"{"why":"x"}"#.to_vec())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "unknown field: {v}");
    // Evaluation jobs need an evaluator; this server has none.
    let ev = serde_json::json!({"campaign": "spring", "policies": {"r": {"kind": "random"}}});
    let (st, _, v) = s
        .call(
            Method::POST,
            "/v1/evaluations",
            Some(READ),
            Some(("application/json", ev.to_string().into_bytes())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::NOT_IMPLEMENTED, "{v}");
    // Pause with a stale If-Match: 412; with the current ETag: paused.
    let (_, h, _) = s
        .call(Method::GET, "/v1/campaigns/spring", Some(READ), None, &[])
        .await;
    let etag = h.get("etag").unwrap().to_str().unwrap().to_owned();
    let (st, _, v) = s
        .call(
            Method::POST,
            "/v1/campaigns/spring/pause",
            Some(WRITE),
            None,
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED, "{v}");
    problem(&v, 412);
    let (st, _, v) = s
        .call(
            Method::POST,
            "/v1/campaigns/spring/pause",
            Some(WRITE),
            None,
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "paused");
    // An illegal transition.
    let (st, v) = s.post_json("/v1/campaigns/spring/pause", &json!({})).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // Idempotency-Key: a repeat answers the same and changes nothing; the
    // key with another request is refused.
    let key = [("idempotency-key", "resume-1")];
    let (st1, _, v1) = s
        .call(
            Method::POST,
            "/v1/campaigns/spring/resume",
            Some(WRITE),
            None,
            &key,
        )
        .await;
    let (st2, h2, v2) = s
        .call(
            Method::POST,
            "/v1/campaigns/spring/resume",
            Some(WRITE),
            None,
            &key,
        )
        .await;
    assert_eq!((st1, st2), (StatusCode::OK, StatusCode::OK), "{v1} {v2}");
    assert_eq!(v1, v2);
    assert_eq!(h2.get("idempotent-replayed").unwrap(), "true");
    let (st, _, v) = s
        .call(
            Method::POST,
            "/v1/campaigns/spring/cancel",
            Some(WRITE),
            Some(("application/json", b"{}".to_vec())),
            &key,
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "Idempotency-Key");
    // Operations.
    let (st, _, v) = s.call(Method::GET, "/metrics", Some(READ), None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let text = v.as_str().unwrap();
    assert!(text.contains("smartmsg_reactions_accepted_total"), "{text}");
    assert!(
        text.contains("smartmsg_campaign_sent{campaign=\"spring\"}"),
        "{text}"
    );
    let metric = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert!(metric("smartmsg_log_appends_total") >= 1.0);
    assert!(metric("smartmsg_log_fsyncs_total") >= 1.0);
    assert!(metric("smartmsg_log_fsyncs_total") <= metric("smartmsg_log_appends_total") + 64.0);
    assert!(metric("smartmsg_jobs_fired_total") >= 1.0, "batch 0 fired");
    assert!(
        metric("smartmsg_queue_depth") >= 1.0,
        "batch 1 still pending"
    );
    assert!(metric("smartmsg_firing_lag_ms") >= 0.0);
    assert!(metric("smartmsg_pipeline_lag_events") >= 0.0);
    assert!(metric("smartmsg_reactions_dead_lettered_total") >= 0.0);
    let (st, _, v) = s.call(Method::GET, "/openapi.json", None, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    for p in [
        "/v1/campaigns",
        "/v1/campaigns/{id}/audience",
        "/v1/reactions",
        "/metrics",
    ] {
        assert!(
            v["paths"][p].is_object(),
            "{p} missing from the OpenAPI document"
        );
    }
    let (st, _, _) = s.call(Method::GET, "/ready", None, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    let (_, all) = s.get("/v1/campaigns").await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_problems_naming_the_field() {
    let s = Server::start().await;
    let bad = |body: &str| (String::from("application/json"), body.as_bytes().to_vec());
    for (body, field, status) in [
        (bad("{not json"), None, 400u16),
        (bad(&definition("a").to_string().replace("\"budget\"", "\"budgett\"")), Some("budgett"), 400),
        (bad(&definition("a").to_string().replace("200", "\"lots\"")), None, 400),
        (bad(&json!({"id": "bad id", "channel": "c", "creatives": ["a"], "budget": 1, "batches": 1, "interval_ms": 1, "features": ["x"]}).to_string()), Some("id"), 400),
        (bad(&json!({"id": "z", "channel": "c", "creatives": ["a"], "budget": 0, "batches": 1, "interval_ms": 1, "features": ["x"]}).to_string()), None, 422),
        (bad(&json!({"id": "z", "channel": "c", "creatives": ["a"], "budget": 5, "batches": 1, "interval_ms": 1, "features": []}).to_string()), Some("features"), 422),
        (bad(&json!({"id": "z", "channel": "c", "creatives": ["a"], "budget": 5, "batches": 1, "interval_ms": 1, "features": ["x"], "policy": {"kind": "targeting", "creative": 9}}).to_string()), Some("policy"), 422),
    ] {
        let (st, h, v) = s.call(Method::POST, "/v1/campaigns", Some(WRITE), Some((&body.0, body.1.clone())), &[]).await;
        assert_eq!(st.as_u16(), status, "{v}");
        assert_eq!(h.get("content-type").unwrap(), "application/problem+json");
        problem(&v, status);
        if let Some(f) = field {
            assert_eq!(v["field"], f, "{v}");
        }
    }
    // Too large a body.
    let big = vec![b' '; 100 << 10];
    let (st, _, _) = s
        .call(
            Method::POST,
            "/v1/campaigns",
            Some(WRITE),
            Some(("application/json", big)),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    // Unknown campaign, unknown command.
    let (st, v) = s.get("/v1/campaigns/nope").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    problem(&v, 404);
    let (st, _) = s.post_json("/v1/campaigns/nope/start", &json!({})).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The same definition again is fine; another with the same id is not.
    let (st, _) = s.post_json("/v1/campaigns", &definition("a")).await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _) = s.post_json("/v1/campaigns", &definition("a")).await;
    assert_eq!(st, StatusCode::OK);
    let mut other = definition("a");
    other["budget"] = json!(100);
    let (st, v) = s.post_json("/v1/campaigns", &other).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    // Audience: every bad row with its line; nothing kept.
    let csv = b"user,age,visits\n1,1,1\nx,1,1\n1,2,2\n2,NaN,1\n".to_vec();
    let (st, _, v) = s
        .call(
            Method::PUT,
            "/v1/campaigns/a/audience",
            Some(WRITE),
            Some(("text/csv", csv)),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error_count"], 3);
    let lines: Vec<u64> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![3, 4, 5]);
    let (_, v) = s.get("/v1/campaigns/a").await;
    assert_eq!(v["state"], "awaiting_audience", "nothing kept");
    let (st, _, _) = s
        .call(
            Method::PUT,
            "/v1/campaigns/a/audience",
            Some(WRITE),
            Some(("text/plain", b"x".to_vec())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (st, _, v) = s
        .call(
            Method::PUT,
            "/v1/campaigns/a/audience",
            Some(WRITE),
            Some((
                "application/x-ndjson",
                b"{\"user\":1,\"features\":[1,2]}\n".to_vec(),
            )),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    // Reactions of a type the server does not take.
    let (st, _, _) = s
        .call(
            Method::POST,
            "/v1/reactions",
            Some(WRITE),
            Some(("text/plain", b"x".to_vec())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_are_enforced() {
    let s = Server::start().await;
    let def = definition("t").to_string().into_bytes();
    for (token, status) in [(None, 401u16), (Some("wrong"), 401), (Some(READ), 403)] {
        let (st, _, v) = s
            .call(
                Method::POST,
                "/v1/campaigns",
                token,
                Some(("application/json", def.clone())),
                &[],
            )
            .await;
        assert_eq!(st.as_u16(), status, "{token:?}: {v}");
        problem(&v, status);
    }
    let (_, all) = s.get("/v1/campaigns").await;
    assert!(all.as_array().unwrap().is_empty(), "nothing changed");
    let (st, _, _) = s.call(Method::GET, "/v1/campaigns", None, None, &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = s.call(Method::GET, "/metrics", None, None, &[]).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, _) = s
        .call(
            Method::POST,
            "/v1/campaigns",
            Some(ADMIN),
            Some(("application/json", def.clone())),
            &[],
        )
        .await;
    assert_eq!(st, StatusCode::CREATED);
    let (st, _, _) = s.call(Method::GET, "/health", None, None, &[]).await;
    assert_eq!(st, StatusCode::OK);
    s.stop().await;
}
