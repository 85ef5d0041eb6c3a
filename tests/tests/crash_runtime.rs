//! Crash test of the campaign runtime: a child process runs two campaigns
//! on the wall clock (a batch every 1.2 s), sending by webhook to a
//! receiver in this process and reading the reactions this process writes
//! to a JSON Lines directory; it is killed with SIGKILL at random moments,
//! again and again, and restarted on the same data. Then it runs until the
//! campaigns are done and stops on SIGTERM, and this process checks, from
//! the outside (what the receiver got, what the log holds):
//!
//! - no batch planned twice, none sent twice, every campaign completed;
//! - the budget never exceeded, no user messaged twice;
//! - every message delivered (at least once), always with the same id and
//!   the same content, and only planned messages;
//! - every reaction written to the source counted exactly once (the
//!   campaign's reactions = the users who reacted, whatever the repeats).
//!
//! `SMARTMSG_CRASH_KILLS` sets the number of kills (default 100).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::{extract::State, http::HeaderMap, http::StatusCode, routing::post, Json, Router};
use rand::Rng;
use smartmsg_domain::reactions::ReactionKind;
use smartmsg_domain::{CampaignEvent, Status};
use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{EventCodec, EventLog, StreamId};
use smartmsg_service::sender::{MessageRecord, WebhookRequest};
use smartmsg_service::CampaignView;
use smartmsg_tests::plan::CrashPlan;
use smartmsg_tests::runtime_crash::{reacts, BATCHES, BUDGET, CAMPAIGNS, STATUS};

#[derive(Default)]
struct Received {
    requests: u64,
    /// Message id → its content (the first seen), and how often it came.
    messages: HashMap<String, (MessageRecord, u32)>,
    /// Messages that came again with other content.
    conflicts: Vec<String>,
    /// Reacting users per campaign.
    reacted: BTreeMap<String, HashSet<u32>>,
    reaction_file: Option<std::fs::File>,
}

type Shared = Arc<Mutex<Received>>;

async fn deliver(
    State(rx): State<Shared>,
    headers: HeaderMap,
    Json(req): Json<WebhookRequest>,
) -> StatusCode {
    let mut r = rx.lock().unwrap();
    r.requests += 1;
    // Every seventh request fails: the sender retries.
    if r.requests % 7 == 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let prefix = format!("{}/batch-{}/part-{}/", req.campaign, req.batch, req.part);
    assert!(key.starts_with(&prefix), "{key}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut lines = Vec::new();
    for m in req.messages {
        if reacts(m.user) {
            lines.extend_from_slice(&m.reaction(ReactionKind::Clicked, now));
            lines.push(b'\n');
            r.reacted
                .entry(m.campaign.clone())
                .or_default()
                .insert(m.user);
        }
        match r.messages.get_mut(&m.id) {
            Some((first, n)) => {
                *n += 1;
                if *first != m {
                    let c = format!("{}: {first:?} then {m:?}", m.id);
                    r.conflicts.push(c);
                }
            }
            None => {
                r.messages.insert(m.id.clone(), (m, 1));
            }
        }
    }
    // Whole lines, one write: the source takes complete lines only.
    if let Some(f) = r.reaction_file.as_mut() {
        f.write_all(&lines).unwrap();
        f.flush().unwrap();
    }
    StatusCode::OK
}

fn read_status(dir: &std::path::Path) -> Vec<CampaignView> {
    std::fs::read(dir.join(STATUS))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

#[test]
fn a_runtime_killed_again_and_again_completes_every_campaign_exactly() {
    let mut plan = CrashPlan::from_env("campaign runtime", 0xc0ffee, 100);
    let kills = plan.kills;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("child");
    let reactions = tmp.path().join("reactions");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&reactions).unwrap();
    let received: Shared = Arc::new(Mutex::new(Received {
        reaction_file: Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(reactions.join("reactions.jsonl"))
                .unwrap(),
        ),
        ..Received::default()
    }));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let url = rt.block_on(async {
        let app = Router::new()
            .route("/deliver", post(deliver))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/deliver")
    });
    let start_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 500;
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_runtime_child"))
            .arg(&dir)
            .arg(&url)
            .arg(&reactions)
            .arg(start_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    };
    let rng = &mut plan.rng;
    let started = Instant::now();
    for round in 0..kills {
        let mut child = spawn();
        let after = Duration::from_millis(rng.random_range(30..300));
        std::thread::sleep(after);
        child.kill().unwrap(); // SIGKILL
        eprintln!("kill {} of {kills} after {after:?}", round + 1);
        child.wait().unwrap();
    }
    let killed_for = started.elapsed();
    // Now let it finish: every campaign completed, every reaction counted.
    let _ = std::fs::remove_file(dir.join(STATUS));
    let mut child = spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let views = read_status(&dir);
        let done = views.len() == CAMPAIGNS.len()
            && views.iter().all(|v| {
                let want = received
                    .lock()
                    .unwrap()
                    .reacted
                    .get(&v.id)
                    .map_or(0, HashSet::len) as u64;
                v.status == Some(Status::Completed) && v.reactions == want
            });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not done after {kills} kills and 120 s: {views:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clean stop (SIGTERM): the child finishes its step and exits 0.
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "SIGTERM: {exit:?}");
    eprintln!(
        "{kills} kills over {:.1} s, then completed in {:.1} s",
        killed_for.as_secs_f64(),
        started.elapsed().as_secs_f64() - killed_for.as_secs_f64()
    );

    // What the log holds (the directory lock is free again).
    let log = EmbeddedLog::open(dir.join("data/log")).unwrap();
    let r = received.lock().unwrap();
    assert!(
        r.conflicts.is_empty(),
        "{:?}",
        &r.conflicts[..r.conflicts.len().min(3)]
    );
    let mut planned_ids = HashSet::new();
    rt.block_on(async {
        for id in CAMPAIGNS {
            let stream = StreamId::new(format!("campaign-{id}")).unwrap();
            let mut planned: BTreeMap<u32, u32> = BTreeMap::new();
            let mut sent: BTreeMap<u32, u32> = BTreeMap::new();
            let mut users = HashSet::new();
            let mut messages = 0u64;
            let mut completed = false;
            let mut reactions = 0u64;
            let mut v = 1;
            loop {
                let page = log.read_stream(&stream, v, 1_000).await.unwrap();
                let Some(last) = page.last() else { break };
                v = last.version + 1;
                for e in &page {
                    match CampaignEvent::decode(&e.kind, e.schema, &e.payload).unwrap() {
                        CampaignEvent::BatchPlanned {
                            batch,
                            part,
                            decisions,
                            ..
                        } => {
                            if part.is_first() {
                                *planned.entry(batch).or_default() += 1;
                            }
                            for (u, c, _) in decisions.iter() {
                                assert!(users.insert(u), "{id}: user {u} messaged twice");
                                messages += 1;
                                let mid = format!("{id}/{batch}/{u}");
                                match r.messages.get(&mid) {
                                    None => panic!("{mid} planned, never delivered"),
                                    Some((m, _)) => assert_eq!(m.creative, c, "{mid}"),
                                }
                                planned_ids.insert(mid);
                            }
                        }
                        CampaignEvent::BatchSent { batch, .. } => {
                            *sent.entry(batch).or_default() += 1;
                        }
                        CampaignEvent::ReactionsRecorded { reactions: per, .. } => {
                            reactions += per.iter().map(|&n| u64::from(n)).sum::<u64>();
                        }
                        CampaignEvent::Completed { .. } => completed = true,
                        _ => {}
                    }
                }
            }
            assert!(completed, "{id} did not complete");
            assert_eq!(planned.len() as u32, BATCHES, "{id}: {planned:?}");
            assert!(
                planned.values().all(|&n| n == 1),
                "{id}: planned {planned:?}"
            );
            assert!(sent.values().all(|&n| n == 1), "{id}: sent {sent:?}");
            assert_eq!(sent.len() as u32, BATCHES, "{id}");
            assert!(messages <= BUDGET, "{id}: {messages} messages");
            let want = r.reacted.get(id).map_or(0, HashSet::len) as u64;
            assert_eq!(
                reactions, want,
                "{id}: reactions recorded vs users who reacted"
            );
        }
    });
    let delivered: HashSet<&String> = r.messages.keys().collect();
    assert_eq!(
        delivered.len(),
        planned_ids.len(),
        "only planned messages arrive"
    );
    let repeats: u32 = r.messages.values().map(|(_, n)| n - 1).sum();
    eprintln!(
        "{} messages delivered, {repeats} repeats dropped by id; {} requests",
        delivered.len(),
        r.requests
    );
}
