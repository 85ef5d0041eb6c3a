//! `smartmsg serve` on Kafka and RabbitMQ by configuration (feature
//! `distributed`): the event log on Kafka, the delay queue on RabbitMQ,
//! batches sent to a Kafka topic, a Kafka reaction source configured; a
//! campaign defined, filled and started over HTTP, its first batch read
//! back from the topic, reactions posted and counted, the server stopped
//! with SIGTERM and started again, and the second batch sent on time from
//! the queue with nobody messaged twice.
//!
//! Needs `SMARTMSG_KAFKA_BOOTSTRAP` and `SMARTMSG_RABBITMQ_URL`
//! (`scripts/test` starts both); skips with a printed reason otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use smartmsg_engine::stream::Source;
use smartmsg_kafka::KafkaTopicSource;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn start(dir: &Path, config: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .current_dir(dir)
        .args(["serve", "--config"])
        .arg(config)
        .env_remove("SMARTMSG_KAFKA_BOOTSTRAP")
        .env_remove("SMARTMSG_RABBITMQ_URL")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn ready(client: &reqwest::Client, url: &str, dir: &Path, server: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = client.get(format!("{url}/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        let log = || std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited: {}",
            log()
        );
        assert!(Instant::now() < deadline, "not ready: {}", log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

async fn post(client: &reqwest::Client, url: &str, ct: &str, body: String) -> Value {
    let r = client
        .post(url)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null);
    assert!(status.is_success(), "POST {url}: {status}: {v}");
    v
}

fn stop(server: &mut Child) {
    let s = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(status.success(), "SIGTERM: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop the server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the sent topic from `next` until `want` more messages came.
async fn read_sent(src: &mut KafkaTopicSource, next: &mut u64, want: usize) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        assert!(
            Instant::now() < deadline,
            "{} of {want} messages on the topic",
            got.len()
        );
        for r in src.read(*next, 500).await.unwrap() {
            *next = r.position + 1;
            got.push(serde_json::from_slice(&r.value).unwrap());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_campaign_on_kafka_and_rabbitmq() {
    let (Ok(bootstrap), Ok(amqp)) = (
        std::env::var("SMARTMSG_KAFKA_BOOTSTRAP"),
        std::env::var("SMARTMSG_RABBITMQ_URL"),
    ) else {
        eprintln!("skipping: SMARTMSG_KAFKA_BOOTSTRAP / SMARTMSG_RABBITMQ_URL not set (scripts/test sets them)");
        return;
    };
    let uniq = now_ms();
    let sent = format!("smtest.serve.sent.{uniq}");
    let rx = format!("smtest.serve.reactions.{uniq}");
    smartmsg_kafka::stream::ensure_topics(&bootstrap, &[(&sent, 1), (&rx, 1)])
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:{port}"
data_dir = "data"
poll_interval_ms = 50

[backend]
kind = "distributed"
kafka_bootstrap = "{bootstrap}"
log_name = "smtest-serve-{uniq}"
rabbitmq_url = "{amqp}"
queue_prefix = "smtest.serve.{uniq}"

[sender]
kind = "kafka"
bootstrap = "{bootstrap}"
topic = "{sent}"

[[sources]]
kind = "kafka"
name = "reactions"
bootstrap = "{bootstrap}"
topic = "{rx}"
"#
        ),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut server = start(dir, &config);
    ready(&client, &url, dir, &mut server).await;

    // Two batches of 100, 4 s apart.
    let def = json!({
        "id": "dist", "channel": "test", "creatives": ["a", "b"],
        "budget": 200, "batches": 2, "interval_ms": 4_000,
        "features": ["x"], "reaction_horizon_ms": 600_000,
        "pipeline": {"window_ms": 500, "grace_ms": 500}
    });
    post(
        &client,
        &format!("{url}/v1/campaigns"),
        "application/json",
        def.to_string(),
    )
    .await;
    let mut csv = String::from("user,x\n");
    for u in 0..600 {
        csv.push_str(&format!("{u},{}\n", (u % 10) as f32 / 10.0));
    }
    let r = client
        .put(format!("{url}/v1/campaigns/dist/audience"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    post(
        &client,
        &format!("{url}/v1/campaigns/dist/start"),
        "application/json",
        String::new(),
    )
    .await;

    // The first batch, on the topic, as planned.
    let mut src = KafkaTopicSource::new(
        &bootstrap,
        &format!("smtest-serve-{uniq}"),
        &sent,
        0,
        "sent",
    )
    .unwrap();
    let mut next = 0;
    let first = read_sent(&mut src, &mut next, 100).await;
    // The views are published after the runtime's step: the batch can be
    // on the topic a moment before the API shows it.
    let page_url = format!("{url}/v1/campaigns/dist/batches/0/messages?limit=1000");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !client
        .get(&page_url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "batch 0 never shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let page = get(&client, &page_url).await;
    let planned: BTreeMap<String, u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["creative"].as_u64().unwrap(),
            )
        })
        .collect();
    let on_topic: BTreeMap<String, u64> = first
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["creative"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(on_topic, planned, "the topic holds the planned batch");

    // Every fourth user reacts, through the API.
    let t = now_ms();
    let body: String = first
        .iter()
        .step_by(4)
        .map(|m| {
            format!(
                "{{\"campaign\":\"dist\",\"batch\":0,\"user\":{},\"creative\":{},\"reaction\":\"clicked\",\"time_ms\":{t}}}\n",
                m["user"], m["creative"]
            )
        })
        .collect();
    let a = post(
        &client,
        &format!("{url}/v1/reactions"),
        "application/x-ndjson",
        body,
    )
    .await;
    assert_eq!(a["accepted"], 25, "{a}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(&client, &format!("{url}/v1/campaigns/dist")).await;
        if v["live"]["reactions"] == 25 {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A clean stop and a start: the campaign comes back from Kafka, the
    // second batch fires from RabbitMQ.
    stop(&mut server);
    let mut server = start(dir, &config);
    ready(&client, &url, dir, &mut server).await;
    let v = get(&client, &format!("{url}/v1/campaigns/dist")).await;
    assert_eq!(v["live"]["reactions"], 25, "after the restart: {v}");
    let second = read_sent(&mut src, &mut next, 100).await;
    let users = |ms: &[Value]| -> BTreeSet<u64> {
        ms.iter().map(|m| m["user"].as_u64().unwrap()).collect()
    };
    assert_eq!(users(&second).len(), 100);
    assert!(
        users(&first).is_disjoint(&users(&second)),
        "a user messaged twice"
    );
    assert!(second.iter().all(|m| m["batch"] == 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = get(&client, &format!("{url}/v1/campaigns/dist")).await;
        if v["live"]["sent"] == 200 {
            assert_eq!(v["live"]["budget_left"], 0, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&mut server);
}
