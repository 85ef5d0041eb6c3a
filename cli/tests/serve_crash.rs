//! `smartmsg serve` killed under load, from outside: a running campaign
//! gets reactions from 16 concurrent clients (single JSON and JSON Lines
//! requests; acknowledged ones sent again whenever there is nothing new) while the server is SIGKILLed at
//! random moments and restarted, then stopped with SIGTERM and restarted.
//! Afterwards:
//!
//! - every reaction answered 2xx is counted exactly once (the campaign's
//!   reaction count equals the number of distinct users acknowledged; none
//!   is dead-lettered);
//! - no batch was planned twice and every batch that reached the outbox is
//!   the batch the log planned (`smartmsg replay` checks the log; the
//!   outbox files are compared with the API's planned messages);
//! - SIGTERM stops the server cleanly (exit status 0) and loses nothing.
//!
//! `SMARTMSG_SERVE_KILLS` sets the number of SIGKILLs (default 6).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const CAMPAIGN: &str = "spring";
const BATCHES: u32 = 4;
const PER_BATCH: usize = 1_500;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server(dir: &Path, port: u16) -> Child {
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
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_ready(client: &reqwest::Client, url: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{url}/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server did not get ready: {}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let r = client.get(url).send().await.unwrap();
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Reactions waiting to be posted: (user, the outbox line it answers).
#[derive(Default)]
struct Load {
    pending: VecDeque<Vec<(u32, String)>>,
    acked: BTreeSet<u32>,
    /// Acknowledged requests, sent again while there is nothing new.
    done: Vec<Vec<(u32, String)>>,
    feeding: bool,
    requests_ok: u64,
    requests_failed: u64,
    repeats: u64,
}

fn body(chunk: &[(u32, String)], single: bool) -> (&'static str, Vec<u8>) {
    let t = now_ms();
    let line = |l: &String| {
        format!(
            "{},\"reaction\":\"clicked\",\"time_ms\":{t}}}",
            l.trim_end().trim_end_matches('}')
        )
    };
    if single {
        ("application/json", line(&chunk[0].1).into_bytes())
    } else {
        let mut s = String::new();
        for (_, l) in chunk {
            s.push_str(&line(l));
            s.push('\n');
        }
        ("application/x-ndjson", s.into_bytes())
    }
}

async fn worker(client: reqwest::Client, url: String, load: Arc<Mutex<Load>>, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    loop {
        let next = {
            let mut l = load.lock().unwrap();
            match l.pending.pop_front() {
                Some(c) => Some(c),
                None if !l.feeding => return,
                // Nothing new yet: send an acknowledged request again (a
                // client that did not see the answer does that); it must
                // not count twice.
                None if !l.done.is_empty() => {
                    l.repeats += 1;
                    let i = rng.random_range(0..l.done.len());
                    Some(l.done[i].clone())
                }
                None => None,
            }
        };
        let Some(chunk) = next else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let (ct, b) = body(&chunk, chunk.len() == 1);
        let answer = client
            .post(format!("{url}/v1/reactions"))
            .header("content-type", ct)
            .body(b)
            .send()
            .await;
        let ok = match answer {
            Ok(r) if r.status().is_success() => {
                let v: Value = serde_json::from_slice(&r.bytes().await.unwrap_or_default())
                    .unwrap_or(Value::Null);
                assert_eq!(
                    v["accepted"].as_u64(),
                    Some(chunk.len() as u64),
                    "a 2xx that did not accept every reaction: {v}"
                );
                true
            }
            Ok(r) => {
                // 503 while starting or stopping: try again.
                assert!(
                    r.status().is_server_error(),
                    "reactions refused: {}",
                    r.status()
                );
                false
            }
            Err(_) => false,
        };
        {
            let mut l = load.lock().unwrap();
            if ok {
                l.requests_ok += 1;
                l.acked.extend(chunk.iter().map(|(u, _)| *u));
                l.done.push(chunk);
            } else {
                l.requests_failed += 1;
                l.pending.push_back(chunk);
            }
        }
        if !ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Watches the outbox: every third user of each batch file that appears
/// reacts, in chunks of 1 (a single JSON request) to 200 (JSON Lines).
async fn feeder(outbox: PathBuf, load: Arc<Mutex<Load>>, seed: u64) -> BTreeMap<u32, String> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while (seen.len() as u32) < BATCHES {
        assert!(
            Instant::now() < deadline,
            "only {} batches reached the outbox",
            seen.len()
        );
        for b in 0..BATCHES {
            if seen.contains_key(&b) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(outbox.join(format!("batch-{b}.jsonl"))) else {
                continue;
            };
            let mut reacting: Vec<(u32, String)> = text
                .lines()
                .step_by(3)
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    (v["user"].as_u64().unwrap() as u32, l.to_owned())
                })
                .collect();
            // Released a chunk at a time, as a channel reports them.
            while !reacting.is_empty() {
                let n = if rng.random_bool(0.3) {
                    1
                } else {
                    rng.random_range(2..100)
                }
                .min(reacting.len());
                load.lock()
                    .unwrap()
                    .pending
                    .push_back(reacting.drain(..n).collect());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen.insert(b, text);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    load.lock().unwrap().feeding = false;
    seen
}

fn signal(child: &Child, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_loses_and_doubles_nothing() {
    let kills: u32 = std::env::var("SMARTMSG_SERVE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let mut server = start_server(&dir, port);
    wait_ready(&client, &url, &dir).await;

    // A campaign of 4 batches of 1,500, one every 2 s.
    let def = json!({
        "id": CAMPAIGN, "channel": "test", "creatives": ["red", "green", "blue"],
        "budget": BATCHES as usize * PER_BATCH, "batches": BATCHES, "interval_ms": 2_000,
        "features": ["a", "b"], "reaction_horizon_ms": 600_000,
        "pipeline": {"window_ms": 500, "grace_ms": 2_000}
    });
    let r = client
        .post(format!("{url}/v1/campaigns"))
        .header("content-type", "application/json")
        .body(def.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut csv = String::from("user,a,b\n");
    for u in 0..(3 * BATCHES as usize * PER_BATCH) {
        csv.push_str(&format!(
            "{u},{},{}\n",
            (u % 7) as f32 / 7.0,
            (u % 5) as f32 / 5.0
        ));
    }
    let r = client
        .put(format!("{url}/v1/campaigns/{CAMPAIGN}/audience"))
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = client
        .post(format!("{url}/v1/campaigns/{CAMPAIGN}/start"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    // The load: 16 clients, fed from the outbox.
    let load = Arc::new(Mutex::new(Load {
        feeding: true,
        ..Load::default()
    }));
    let feed = tokio::spawn(feeder(dir.join("outbox").join(CAMPAIGN), load.clone(), 1));
    let workers: Vec<_> = (0..16)
        .map(|i| tokio::spawn(worker(client.clone(), url.clone(), load.clone(), 100 + i)))
        .collect();

    // Kill it, again and again, and once stop it with SIGTERM.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for k in 0..=kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        if k < kills {
            server.kill().unwrap();
            server.wait().unwrap();
        } else {
            signal(&server, "-TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                if let Some(s) = server.try_wait().unwrap() {
                    break s;
                }
                assert!(Instant::now() < deadline, "SIGTERM did not stop the server");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(
                status.success(),
                "SIGTERM: {status}: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
        }
        server = start_server(&dir, port);
        wait_ready(&client, &url, &dir).await;
    }
    let outbox = feed.await.unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let (acked, ok, failed, repeats) = {
        let l = load.lock().unwrap();
        (l.acked.clone(), l.requests_ok, l.requests_failed, l.repeats)
    };
    eprintln!(
        "{kills} SIGKILLs and a SIGTERM: {} reactions acknowledged in {ok} requests, \
         {failed} failed requests retried, {repeats} acknowledged requests repeated",
        acked.len()
    );
    assert_eq!(acked.len(), BATCHES as usize * PER_BATCH.div_ceil(3));
    assert!(
        failed > 0,
        "no request was interrupted: the kills came too late"
    );

    // Every acknowledged reaction counted once: wait for the windows to
    // close, then check the count stays put.
    let view_url = format!("{url}/v1/campaigns/{CAMPAIGN}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = get_json(&client, &view_url).await;
        let counted = v["live"]["reactions"].as_u64().unwrap();
        assert!(
            counted <= acked.len() as u64,
            "counted twice: {counted} > {}",
            acked.len()
        );
        if counted == acked.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{counted} of {} counted: {v}",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let v = get_json(&client, &view_url).await;
    assert_eq!(
        v["live"]["reactions"].as_u64(),
        Some(acked.len() as u64),
        "{v}"
    );
    let per_batch: u64 = v["live"]["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["reacted"].as_u64().unwrap())
        .sum();
    assert_eq!(per_batch, acked.len() as u64, "{v}");
    let dead = get_json(&client, &format!("{view_url}/dead-letters")).await;
    assert_eq!(dead["total"].as_u64(), Some(0), "dead letters: {dead}");

    // Every batch in the outbox is the batch the log planned.
    for (b, text) in &outbox {
        let mut planned = BTreeMap::new();
        let mut offset = 0;
        loop {
            let page = get_json(
                &client,
                &format!("{view_url}/batches/{b}/messages?offset={offset}&limit=1000"),
            )
            .await;
            let msgs = page["messages"].as_array().unwrap();
            for m in msgs {
                planned.insert(m["user"].as_u64().unwrap(), m["creative"].as_u64().unwrap());
            }
            offset += msgs.len();
            if msgs.is_empty() || offset as u64 >= page["total"].as_u64().unwrap() {
                break;
            }
        }
        let sent: BTreeMap<u64, u64> = text
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (v["user"].as_u64().unwrap(), v["creative"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(sent.len(), PER_BATCH);
        assert_eq!(planned, sent, "batch {b}: the outbox differs from the plan");
    }

    // A clean stop, then the log checked from outside.
    signal(&server, "-TERM");
    assert!(server.wait().unwrap().success());
    let o = Command::new(env!("CARGO_BIN_EXE_smartmsg"))
        .args(["replay"])
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "replay: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{out}");
}
