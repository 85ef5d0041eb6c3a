//! The sender edge ports against real destinations: the outbox on a
//! temporary directory, the channel with a receiving task, and the webhook
//! against a local axum server that records every request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use smartmsg_domain::{Decisions, OutgoingBatch};
use smartmsg_service::sender::{
    check_sender, records, write_json_lines, MessageRecord, WebhookRequest,
};
use smartmsg_service::{
    ChannelSender, OutboxSender, SendError, Sender, WebhookConfig, WebhookSender,
};

/// A batch of `campaign` numbered `n` to `users` (creative `user % 3`).
fn batch(campaign: &str, n: u32, users: &[u32]) -> OutgoingBatch {
    let mut d = Decisions::default();
    for &u in users {
        d.push(u, (u % 3) as u16, 0.5);
    }
    OutgoingBatch {
        campaign: campaign.into(),
        channel: "email".into(),
        batch: n,
        creatives: Arc::new(vec!["c-a".into(), "c-b".into(), "c-c".into()]),
        decisions: d,
    }
}

// ---------------------------------------------------------------- outbox

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Every record of every `*.jsonl` file under `dir`.
fn read_outbox(dir: &Path) -> Vec<MessageRecord> {
    let mut out = Vec::new();
    for f in files_under(dir) {
        if f.extension().is_some_and(|x| x == "jsonl") {
            let text = std::fs::read_to_string(&f).unwrap();
            for line in text.lines() {
                out.push(
                    serde_json::from_str(line)
                        .unwrap_or_else(|e| panic!("{}: bad line {line:?}: {e}", f.display())),
                );
            }
        }
    }
    out
}

#[tokio::test]
async fn outbox_passes_the_conformance_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let sender = OutboxSender::new(&dir);
    check_sender(&sender, || {
        let dir = dir.clone();
        async move { read_outbox(&dir) }
    })
    .await
    .unwrap();
    // Every batch of the check has its file, the empty one included (an
    // empty file), and nothing else is there.
    let names: Vec<String> = files_under(&dir)
        .iter()
        .map(|p| {
            p.strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .collect();
    assert_eq!(
        names,
        [
            "conf-c1/batch-0.jsonl",
            "conf-c1/batch-1.jsonl",
            "conf-c1/batch-2.jsonl"
        ]
    );
    assert_eq!(
        std::fs::metadata(dir.join("conf-c1/batch-2.jsonl"))
            .unwrap()
            .len(),
        0
    );
}

#[tokio::test]
async fn outbox_writes_one_file_per_batch_atomically_and_identically_again() {
    let tmp = tempfile::tempdir().unwrap();
    // The directory does not exist yet (nested): it is created.
    let dir = tmp.path().join("a").join("outbox");
    let sender = OutboxSender::new(&dir);
    assert_eq!(sender.dir(), dir.as_path());
    let b = batch("spring", 3, &[11, 4, 29, 8]);
    let path = sender.path_of("spring", 3);
    assert_eq!(path, dir.join("spring").join("batch-3.jsonl"));

    // A temporary file left behind by a crash in the middle of a write.
    std::fs::create_dir_all(dir.join("spring")).unwrap();
    std::fs::write(dir.join("spring/batch-3.jsonl.tmp"), b"{\"half").unwrap();

    sender.send(&b).await.unwrap();
    let first = std::fs::read(&path).unwrap();
    let mut want = Vec::new();
    write_json_lines(&b, &mut want);
    assert_eq!(first, want);
    let got: Vec<MessageRecord> = std::str::from_utf8(&first)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, records(&b).collect::<Vec<_>>());
    assert_eq!(got[2].id, "spring/3/29");
    assert_eq!(got[2].creative_ref, "c-c");
    assert!(first.ends_with(b"\n"));

    // Sent again (after a crash): the same bytes, still one file.
    sender.send(&b).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), first);
    assert_eq!(files_under(&dir), vec![path.clone()], "no .tmp left behind");

    // Another batch and another campaign: their own files.
    sender.send(&batch("spring", 4, &[1])).await.unwrap();
    sender.send(&batch("autumn", 0, &[2, 3])).await.unwrap();
    assert_eq!(
        files_under(&dir),
        vec![
            dir.join("autumn/batch-0.jsonl"),
            path.clone(),
            dir.join("spring/batch-4.jsonl"),
        ]
    );
    assert_eq!(std::fs::read(&path).unwrap(), first, "batch 3 untouched");
}

#[tokio::test]
async fn outbox_that_cannot_write_is_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    // The outbox "directory" is a regular file: nothing can be created in it.
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let sender = OutboxSender::new(&file);
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    match err {
        SendError::Unavailable { batch, .. } => assert_eq!(batch, "c/batch-0"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[tokio::test]
async fn outbox_refuses_campaign_names_that_leave_its_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    std::fs::create_dir_all(&dir).unwrap();
    let sender = OutboxSender::new(&dir);
    for campaign in ["..", ".", "", "a/b", "../x"] {
        let err = sender.send(&batch(campaign, 0, &[1])).await.unwrap_err();
        assert!(
            matches!(err, SendError::Rejected { .. }),
            "campaign {campaign:?}: {err:?}"
        );
    }
    // Nothing was written anywhere.
    assert!(
        files_under(tmp.path()).is_empty(),
        "{:?}",
        files_under(tmp.path())
    );
    // Dots inside a name are fine.
    sender.send(&batch("v1.2..x", 0, &[1])).await.unwrap();
    assert_eq!(files_under(&dir), vec![dir.join("v1.2..x/batch-0.jsonl")]);
}

// ---------------------------------------------------------------- channel

#[tokio::test]
async fn channel_passes_the_conformance_check() {
    let (sender, mut rx) = ChannelSender::new(2);
    let got: Arc<Mutex<Vec<MessageRecord>>> = Arc::default();
    let batches = Arc::new(Mutex::new(0usize));
    let task = {
        let got = Arc::clone(&got);
        let batches = Arc::clone(&batches);
        tokio::spawn(async move {
            while let Some(sent) = rx.recv().await {
                got.lock().unwrap().extend(records(&sent.batch));
                *batches.lock().unwrap() += 1;
                sent.ack();
            }
        })
    };
    check_sender(&sender, || {
        let got = Arc::clone(&got);
        async move { got.lock().unwrap().clone() }
    })
    .await
    .unwrap();
    // The check sends four batches (one twice, one empty): each was handed
    // over.
    assert_eq!(*batches.lock().unwrap(), 4);
    drop(sender);
    task.await.unwrap();
}

#[tokio::test]
async fn channel_send_returns_only_once_acknowledged() {
    let (sender, mut rx) = ChannelSender::new(1);
    let b = batch("c", 7, &[1, 2]);
    let sending = tokio::spawn({
        let sender = sender.clone();
        let b = b.clone();
        async move { sender.send(&b).await }
    });
    let sent = rx.recv().await.unwrap();
    assert_eq!(sent.batch, b);
    // Not acknowledged yet: the send waits.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!sending.is_finished());
    sent.ack();
    tokio::time::timeout(Duration::from_secs(2), sending)
        .await
        .expect("send returns after the ack")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn channel_batch_dropped_without_ack_fails_the_send() {
    let (sender, mut rx) = ChannelSender::new(1);
    let b = batch("c", 1, &[5]);
    let recv = tokio::spawn(async move {
        let sent = rx.recv().await.unwrap();
        drop(sent);
        rx // keep the receiver alive: only the batch is dropped
    });
    let err = sender.send(&b).await.unwrap_err();
    match &err {
        SendError::Unavailable { batch, reason } => {
            assert_eq!(batch, "c/batch-1");
            assert!(reason.contains("acknowledgement"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let _rx = recv.await.unwrap();
}

#[tokio::test]
async fn channel_without_receiver_fails_the_send() {
    // Dropped before anything was sent.
    let (sender, rx) = ChannelSender::new(1);
    drop(rx);
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    assert!(
        matches!(&err, SendError::Unavailable { batch, .. } if batch == "c/batch-0"),
        "{err:?}"
    );

    // Dropped while a batch waits in the channel, never received.
    let (sender, rx) = ChannelSender::new(1);
    let sending = tokio::spawn({
        let sender = sender.clone();
        async move { sender.send(&batch("c", 1, &[1])).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!sending.is_finished(), "waits for its acknowledgement");
    drop(rx);
    let err = tokio::time::timeout(Duration::from_secs(2), sending)
        .await
        .expect("the send ends once the receiver is gone")
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, SendError::Unavailable { .. }), "{err:?}");
}

// ---------------------------------------------------------------- webhook

/// How the test receiver answers a request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// With this status.
    Status(u16),
    /// Not before this long (then 200).
    Stall(Duration),
    /// With this redirect status to `/landing` (which answers any method
    /// with 200 and records nothing).
    Redirect(u16),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    key: Option<String>,
    auth: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

impl Seen {
    fn request(&self) -> WebhookRequest {
        serde_json::from_slice(&self.body).expect("the body is a WebhookRequest")
    }
}

type Script = dyn Fn(usize, &WebhookRequest) -> Answer + Send + Sync;

/// A local HTTP receiver: records every request, answers by `script`
/// (given the number of requests before this one and the body).
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Script>,
}

async fn handle(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<not ascii>").to_owned())
    };
    let req: Option<WebhookRequest> = serde_json::from_slice(&body).ok();
    let n = {
        let mut seen = s.seen.lock().unwrap();
        seen.push(Seen {
            key: h("idempotency-key"),
            auth: h("authorization"),
            content_type: h("content-type"),
            body,
        });
        seen.len() - 1
    };
    let Some(req) = req else {
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    };
    match (s.script)(n, &req) {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Answer::Stall(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Answer::Redirect(code) => (
            StatusCode::from_u16(code).unwrap(),
            [(header::LOCATION, "/landing")],
        )
            .into_response(),
    }
}

impl Receiver {
    async fn start(
        script: impl Fn(usize, &WebhookRequest) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let shared = Shared {
            seen: Arc::clone(&seen),
            script: Arc::new(script),
        };
        let app = Router::new()
            .route("/hook", post(handle))
            .route("/landing", any(|| async { StatusCode::OK }))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, seen }
    }

    /// Answers every request with `answers` in turn, then 200.
    async fn answering(answers: &[Answer]) -> Self {
        let q = Mutex::new(answers.iter().copied().collect::<VecDeque<_>>());
        Self::start(move |_, _| q.lock().unwrap().pop_front().unwrap_or(Answer::Status(200))).await
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn config(&self) -> WebhookConfig {
        {
            let mut built = WebhookConfig::default();
            built.url = self.url();
            built.timeout_ms = 1_000;
            built.max_attempts = 3;
            built.retry_base_ms = 5;
            built.retry_max_ms = 20;
            built
        }
    }
}

fn webhook(config: WebhookConfig) -> WebhookSender {
    WebhookSender::new(config).unwrap()
}

fn keys(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| s.key.clone().expect("an Idempotency-Key header"))
        .collect()
}

#[tokio::test]
async fn webhook_passes_the_conformance_check() {
    let rx = Receiver::answering(&[]).await;
    let sender = webhook(rx.config());
    assert_eq!(sender.name(), "webhook");
    let seen = Arc::clone(&rx.seen);
    check_sender(&sender, || {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock()
                .unwrap()
                .iter()
                .flat_map(|s| s.request().messages)
                .collect()
        }
    })
    .await
    .unwrap();
    // One request per batch (all fit in one part); the repeat carries the
    // same key and the same body; the empty batch is one empty part.
    let seen = rx.seen();
    assert_eq!(
        keys(&seen),
        [
            "conf-c1/batch-0/part-0/0-4",
            "conf-c1/batch-1/part-0/0-2",
            "conf-c1/batch-0/part-0/0-4",
            "conf-c1/batch-2/part-0/0-0"
        ]
    );
    assert_eq!(seen[0].body, seen[2].body);
    let empty = seen[3].request();
    assert_eq!((empty.batch, empty.part, empty.parts), (2, 0, 1));
    assert!(empty.messages.is_empty());
    for s in &seen {
        assert_eq!(s.content_type.as_deref(), Some("application/json"));
        assert_eq!(s.auth, None, "no token configured: no Authorization");
    }
}

#[tokio::test]
async fn webhook_splits_a_large_batch_into_keyed_parts() {
    let rx = Receiver::answering(&[]).await;
    let sender = webhook({
        let mut built = rx.config();
        built.max_messages_per_request = 3;
        built
    });
    let b = batch("big", 5, &[10, 11, 12, 13, 14, 15, 16]);
    sender.send(&b).await.unwrap();
    let seen = rx.seen();
    assert_eq!(
        keys(&seen),
        [
            "big/batch-5/part-0/0-3",
            "big/batch-5/part-1/3-6",
            "big/batch-5/part-2/6-7"
        ]
    );
    let reqs: Vec<WebhookRequest> = seen.iter().map(Seen::request).collect();
    for (i, r) in reqs.iter().enumerate() {
        assert_eq!(r.campaign, "big");
        assert_eq!(r.channel, "email");
        assert_eq!(r.batch, 5);
        assert_eq!(r.part, i as u32);
        assert_eq!(r.parts, 3);
    }
    assert_eq!(
        reqs.iter().map(|r| r.messages.len()).collect::<Vec<_>>(),
        [3, 3, 1]
    );
    let all: Vec<MessageRecord> = reqs.into_iter().flat_map(|r| r.messages).collect();
    assert_eq!(all, records(&b).collect::<Vec<_>>());

    // Exactly a multiple of the part size: no empty trailing part.
    let b = batch("big", 6, &[1, 2, 3, 4, 5, 6]);
    sender.send(&b).await.unwrap();
    let seen = rx.seen();
    assert_eq!(
        keys(&seen[3..]),
        ["big/batch-6/part-0/0-3", "big/batch-6/part-1/3-6"]
    );
    assert!(seen[3..].iter().all(|s| s.request().parts == 2));
}

#[tokio::test]
async fn webhook_resend_after_a_failed_part_uses_the_same_keys_and_bodies() {
    // Part 1 fails (500) until the receiver is "fixed".
    let fixed = Arc::new(Mutex::new(false));
    let rx = Receiver::start({
        let fixed = Arc::clone(&fixed);
        move |_, req| {
            if req.part == 1 && !*fixed.lock().unwrap() {
                Answer::Status(500)
            } else {
                Answer::Status(200)
            }
        }
    })
    .await;
    let sender = webhook({
        let mut built = rx.config();
        built.max_messages_per_request = 2;
        built.max_attempts = 2;
        built
    });
    let b = batch("c", 0, &[1, 2, 3, 4, 5]);
    let err = sender.send(&b).await.unwrap_err();
    assert!(matches!(err, SendError::Unavailable { .. }), "{err:?}");
    let first = rx.seen();
    // Part 0 once, part 1 twice, part 2 never.
    assert_eq!(
        keys(&first),
        [
            "c/batch-0/part-0/0-2",
            "c/batch-0/part-1/2-4",
            "c/batch-0/part-1/2-4"
        ]
    );

    *fixed.lock().unwrap() = true;
    sender.send(&b).await.unwrap();
    let second = &rx.seen()[first.len()..];
    assert_eq!(
        keys(second),
        [
            "c/batch-0/part-0/0-2",
            "c/batch-0/part-1/2-4",
            "c/batch-0/part-2/4-5"
        ]
    );
    assert_eq!(second[0].body, first[0].body);
    assert_eq!(second[1].body, first[1].body);
}

#[tokio::test]
async fn webhook_retries_server_errors_with_the_same_key() {
    let rx = Receiver::answering(&[Answer::Status(500), Answer::Status(503)]).await;
    let sender = webhook({
        let mut built = rx.config();
        built.max_attempts = 5;
        built
    });
    let b = batch("c", 2, &[3, 4]);
    sender.send(&b).await.unwrap();
    let seen = rx.seen();
    assert_eq!(seen.len(), 3, "two failures, then the success");
    assert_eq!(keys(&seen), ["c/batch-2/part-0/0-2"; 3]);
    assert!(seen.iter().all(|s| s.body == seen[0].body));
    assert_eq!(seen[0].request().messages, records(&b).collect::<Vec<_>>());
}

#[tokio::test]
async fn webhook_retries_408_and_429() {
    for code in [408, 429] {
        let rx = Receiver::answering(&[Answer::Status(code)]).await;
        let sender = webhook(rx.config());
        sender.send(&batch("c", 0, &[1])).await.unwrap();
        assert_eq!(rx.seen().len(), 2, "HTTP {code} is retried");
    }
}

#[tokio::test]
async fn webhook_failing_forever_is_unavailable_after_max_attempts() {
    let rx = Receiver::start(|_, _| Answer::Status(500)).await;
    let sender = webhook({
        let mut built = rx.config();
        built.max_attempts = 4;
        built
    });
    let err = sender.send(&batch("c", 9, &[1])).await.unwrap_err();
    match &err {
        SendError::Unavailable { batch, reason } => {
            assert_eq!(batch, "c/batch-9");
            assert!(reason.contains("500"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(rx.seen().len(), 4);
    assert_eq!(keys(&rx.seen()), ["c/batch-9/part-0/0-1"; 4]);
}

#[tokio::test]
async fn webhook_client_errors_are_rejected_without_retry() {
    for code in [400, 401, 404, 422] {
        let rx = Receiver::start(move |_, _| Answer::Status(code)).await;
        let sender = webhook({
            let mut built = rx.config();
            built.max_attempts = 5;
            built
        });
        let err = sender.send(&batch("c", 1, &[1])).await.unwrap_err();
        match &err {
            SendError::Rejected { batch, reason } => {
                assert_eq!(batch, "c/batch-1");
                assert!(reason.contains(&code.to_string()), "{reason}");
            }
            other => panic!("HTTP {code}: expected Rejected, got {other:?}"),
        }
        assert_eq!(rx.seen().len(), 1, "HTTP {code} is not retried");
    }
}

#[tokio::test]
async fn webhook_receiver_that_never_answers_times_out() {
    let rx = Receiver::start(|_, _| Answer::Stall(Duration::from_secs(30))).await;
    let sender = webhook({
        let mut built = rx.config();
        built.timeout_ms = 50;
        built.max_attempts = 2;
        built
    });
    let t = Instant::now();
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, SendError::Unavailable { .. }), "{err:?}");
    assert_eq!(rx.seen().len(), 2, "each attempt reached the receiver");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1_500),
        "two 50 ms timeouts took {took:?}"
    );
}

#[tokio::test]
async fn webhook_with_nothing_listening_is_unavailable() {
    // A port that was just free: nothing listens there.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sender = webhook({
        let mut built = WebhookConfig::default();
        built.url = format!("http://{addr}/hook");
        built.timeout_ms = 500;
        built.max_attempts = 3;
        built.retry_base_ms = 5;
        built.retry_max_ms = 20;
        built
    });
    let t = Instant::now();
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    match &err {
        SendError::Unavailable { batch, reason } => {
            assert_eq!(batch, "c/batch-0");
            assert!(reason.contains("3 attempts"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(1_500));
}

#[tokio::test]
async fn webhook_with_a_bad_url_is_rejected() {
    let sender = webhook({
        let mut built = WebhookConfig::default();
        built.url = "not a url".into();
        built.max_attempts = 3;
        built.retry_base_ms = 5;
        built
    });
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    assert!(matches!(err, SendError::Rejected { .. }), "{err:?}");
}

#[tokio::test]
async fn webhook_sends_the_bearer_token() {
    let rx = Receiver::answering(&[Answer::Status(503)]).await;
    let sender = webhook({
        let mut built = rx.config();
        built.bearer_token = Some("s3cret-t0ken".into());
        built
    });
    sender.send(&batch("c", 0, &[1])).await.unwrap();
    let seen = rx.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.auth.as_deref(),
            Some("Bearer s3cret-t0ken"),
            "on retries too"
        );
    }
}

#[test]
fn webhook_config_defaults_and_strict_parsing() {
    let c: WebhookConfig = serde_json::from_str(r#"{"url":"http://x/y"}"#).unwrap();
    assert_eq!(c, {
        let mut built = WebhookConfig::default();
        built.url = "http://x/y".into();
        built
    });
    assert_eq!(c.max_messages_per_request, 1_000);
    assert_eq!(c.timeout_ms, 10_000);
    assert_eq!(c.max_attempts, 5);
    assert!(serde_json::from_str::<WebhookConfig>(r#"{"url":"x","retries":3}"#).is_err());
}

/// Without TLS support an `https://` endpoint can never work: a
/// configuration error, not an outage.
#[cfg(not(feature = "rustls"))]
#[tokio::test]
async fn webhook_https_without_tls_support_is_rejected() {
    let rx = Receiver::answering(&[]).await;
    let sender = webhook({
        let mut built = rx.config();
        built.url = format!("https://{}/hook", rx.addr);
        built
    });
    let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
    match &err {
        SendError::Rejected { reason, .. } => assert!(reason.contains("https"), "{reason}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(rx.seen().is_empty());
}

/// A redirect is not an acknowledgement: followed, a POST answered with
/// 301/302/303 turns into a GET without the messages, whose 200 would
/// count the batch as delivered.
#[tokio::test]
async fn webhook_redirects_are_not_acknowledgements() {
    for code in [301, 302, 303, 307, 308] {
        let rx = Receiver::start(move |_, _| Answer::Redirect(code)).await;
        let sender = webhook(rx.config());
        let err = sender.send(&batch("c", 0, &[1])).await.unwrap_err();
        match &err {
            SendError::Rejected { reason, .. } => {
                assert!(reason.contains(&code.to_string()), "{reason}")
            }
            other => panic!("HTTP {code}: expected Rejected, got {other:?}"),
        }
        assert_eq!(rx.seen().len(), 1, "HTTP {code}");
    }
}
