//! Evaluation jobs of `smartmsg serve`: a campaign logged by the uniform
//! random policy runs its three batches with reactions posted back; an
//! off-policy evaluation of two other policies is asked for (202, a job),
//! fetched when done, checked against the log (the random policy evaluated
//! on its own log estimates the logged mean), and still there after a
//! restart. Bad requests get their problems.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

fn start(dir: &Path, port: u16) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .current_dir(dir)
        .args(["serve", "--data-dir", "data", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("SMARTMSG_POLL_INTERVAL_MS", "20")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn ready(c: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while c
        .get(format!("{url}/ready"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .ok()
        != Some(true)
    {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = c.request(method, url);
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = r.send().await.unwrap();
    let st = r.status().as_u16();
    (
        st,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

fn stop(server: &mut Child) {
    Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(server.wait().unwrap().success());
}

/// Whether `user` reacts to `creative`: a fixed draw, creative 1 best.
fn reacts(user: u64, creative: u64) -> bool {
    let p = [0.10, 0.35, 0.20][creative as usize];
    let h = user.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ creative.wrapping_mul(0xD1B5_4A32_D192_ED03);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_job_estimates_other_policies_from_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::new();
    let mut server = start(dir, port);
    ready(&c, &url).await;
    let def = json!({
        "id": "ab", "channel": "test", "creatives": ["a", "b", "c"],
        "budget": 1_500, "batches": 3, "interval_ms": 1_500,
        "features": ["x"], "policy": {"kind": "random"},
        "reaction_horizon_ms": 600_000,
        "pipeline": {"window_ms": 300, "grace_ms": 200}
    });
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        &format!("{url}/v1/campaigns"),
        Some(def),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let mut csv = String::from("user,x\n");
    for u in 0..5_000 {
        csv.push_str(&format!("{u},{}\n", (u % 10) as f32 / 10.0));
    }
    let r = c
        .put(format!("{url}/v1/campaigns/ab/audience"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        &format!("{url}/v1/campaigns/ab/start"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");

    // Every batch, as it goes out, gets its reactions.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reacted = 0;
    for b in 0..3 {
        let file = dir.join(format!("outbox/ab/batch-{b}.jsonl"));
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&file) {
                break t;
            }
            assert!(Instant::now() < deadline, "batch {b} never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let mut body = String::new();
        for l in text.lines() {
            let m: Value = serde_json::from_str(l).unwrap();
            let (u, cr) = (m["user"].as_u64().unwrap(), m["creative"].as_u64().unwrap());
            if reacts(u, cr) {
                reacted += 1;
                body.push_str(&format!(
                    "{{\"campaign\":\"ab\",\"batch\":{b},\"user\":{u},\"creative\":{cr},\"reaction\":\"clicked\",\"time_ms\":{now}}}\n"
                ));
            }
        }
        let r = c
            .post(format!("{url}/v1/reactions"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    loop {
        let (_, v) = call(
            &c,
            reqwest::Method::GET,
            &format!("{url}/v1/campaigns/ab"),
            None,
        )
        .await;
        if v["live"]["reactions"] == reacted && v["pipeline"]["lag"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Bad requests.
    let ev = format!("{url}/v1/evaluations");
    let ask = |campaign: &str, draws: u64| {
        json!({
            "campaign": campaign,
            "policies": {"random": {"kind": "random"}, "thompson": {"kind": "creative-thompson"}},
            "draws": draws, "bootstrap": 100, "seed": 5
        })
    };
    let (st, v) = call(&c, reqwest::Method::POST, &ev, Some(ask("nope", 20))).await;
    assert_eq!((st, v["field"].as_str()), (404, Some("campaign")), "{v}");
    let (st, v) = call(&c, reqwest::Method::POST, &ev, Some(ask("ab", 0))).await;
    assert_eq!((st, v["field"].as_str()), (422, Some("draws")), "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::POST,
        &ev,
        Some(json!({"campaign": "ab", "policies": {}})),
    )
    .await;
    assert_eq!((st, v["field"].as_str()), (422, Some("policies")), "{v}");
    let (st, _) = call(&c, reqwest::Method::GET, &format!("{ev}/ev-99"), None).await;
    assert_eq!(st, 404);

    // The job.
    let (st, job) = call(&c, reqwest::Method::POST, &ev, Some(ask("ab", 40))).await;
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let job = loop {
        let (_, j) = call(&c, reqwest::Method::GET, &format!("{ev}/{id}"), None).await;
        if j["status"] == "done" || j["status"] == "failed" {
            break j;
        }
        assert!(Instant::now() < deadline, "{j}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "done", "{job}");
    let result = &job["result"];
    assert_eq!(result["rows"], 1_500, "{result}");
    let logged = result["logged_mean_reward"].as_f64().unwrap();
    assert!(
        (logged - f64::from(reacted) / 1_500.0).abs() < 1e-9,
        "{result}"
    );
    let targets = result["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 2);
    for t in targets {
        assert!(t["error"].is_null(), "{t}");
        assert_eq!(t["estimates"].as_array().unwrap().len(), 6, "{t}");
    }
    // The logging policy on its own log: IPW is the logged mean, up to
    // the Monte Carlo estimate of its choices.
    let random = targets.iter().find(|t| t["policy"] == "random").unwrap();
    let ipw = random["estimates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["estimator"] == "SNIPW")
        .unwrap();
    let (lo, hi) = (
        ipw["ci_low"].as_f64().unwrap(),
        ipw["ci_high"].as_f64().unwrap(),
    );
    assert!(
        lo - 0.02 <= logged && logged <= hi + 0.02,
        "{ipw} vs {logged}"
    );

    // After a restart, the result is still there.
    stop(&mut server);
    let mut server = start(dir, port);
    ready(&c, &url).await;
    let (st, again) = call(&c, reqwest::Method::GET, &format!("{ev}/{id}"), None).await;
    assert_eq!(st, 200);
    assert_eq!(again["result"], job["result"]);
    let (_, all) = call(&c, reqwest::Method::GET, &ev, None).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    stop(&mut server);
}
