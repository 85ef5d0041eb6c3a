//! A Rust service linking smartmsg: one campaign of three creatives over
//! 10,000 users, a batch every 2 seconds, delivered by webhook to a local
//! receiver whose users react; the reactions are fed back and the model
//! learns which creative suits whom.
//!
//! ```sh
//! cargo run --release -p smartmsg-service --example webhook_campaign
//! ```

use std::sync::Arc;
use std::time::Duration;

use axum::{http::StatusCode, routing::post, Json, Router};
use rand::{Rng, SeedableRng};
use smartmsg_domain::reactions::ReactionKind;
use smartmsg_domain::{BatchSchedule, BatchSizing, CampaignSpec, Candidates};
use smartmsg_domain::{ModelConfig, PolicySpec, Status};
use smartmsg_engine::{Clock, SystemClock};
use smartmsg_service::sender::WebhookRequest;
use smartmsg_service::{CampaignSetup, Runtime, RuntimeOptions, WebhookSender};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The libraries' warnings (a torn tail cut at recovery, a refused
    // job, a failing sender) on stderr; `RUST_LOG` selects more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The channel: a local HTTP receiver standing in for the messenger.
    let (to_users, mut delivered) = tokio::sync::mpsc::channel::<WebhookRequest>(64);
    let deliver = move |Json(req): Json<WebhookRequest>| async move {
        let sent = to_users.send(req).await;
        sent.map_err(|_| StatusCode::SERVICE_UNAVAILABLE)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/deliver", listener.local_addr()?);
    let app = Router::new().route("/deliver", post(deliver));
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The runtime: embedded backend in a fresh directory, webhook sender.
    let dir = tempfile::tempdir()?;
    let sender = Arc::new(WebhookSender::to(url)?);
    let runtime = Runtime::open_embedded(dir.path(), sender, RuntimeOptions::default()).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (handle, run) = runtime.spawn(async move { stopped.await.unwrap_or(()) });
    let running = tokio::spawn(run);

    // 10,000 users with 4 features; 3,000 messages in 5 batches, 2 s apart.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut audience = Candidates::new(4)?;
    for user in 0..10_000 {
        audience.push(user, &[(); 4].map(|()| rng.random_range(-1.0..1.0)))?;
    }
    let (start_ms, interval_ms, sizing) = (SystemClock.now_ms(), 2_000, BatchSizing::Count(5));
    let spec = CampaignSpec {
        channel: "demo".into(),
        audience: "demo".into(),
        creatives: vec!["red".into(), "green".into(), "blue".into()],
        budget: 3_000,
        schedule: BatchSchedule {
            start_ms,
            interval_ms,
            sizing,
        },
    };
    let model = {
        let mut v = ModelConfig::default();
        v.random_first_batch = true;
        v
    };
    let policy = PolicySpec::Integrated { model };
    let mut setup = CampaignSetup::new("spring", spec, audience.clone(), policy);
    setup.pipeline.window_ms = 500; // short reaction windows: the demo is fast
    setup.pipeline.grace_ms = 200;
    setup.reaction_horizon_ms = 2_000;
    handle.create_campaign(setup).await?;
    handle.start("spring").await?;

    loop {
        tokio::select! {
            Some(req) = delivered.recv() => {
                // Users react: creative c appeals to users with a high feature c.
                let mut reactions = Vec::new();
                for m in &req.messages {
                    let x = audience.row(m.user as usize)[usize::from(m.creative)].max(0.0);
                    if rng.random_bool(0.05 + 0.4 * f64::from(x)) {
                        reactions.push(m.reaction(ReactionKind::Clicked, SystemClock.now_ms()));
                    }
                }
                handle.inbox().submit_many(reactions).await?;
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let Some(v) = handle.view("spring").await? else { continue };
                if v.status == Some(Status::Completed) {
                    for b in &v.batches {
                        println!("batch {}: {:?} per creative, {} reacted", b.batch, b.per_creative, b.reacted);
                    }
                    println!("completed: {} sent, {} reactions recorded", v.sent, v.reactions);
                    break;
                }
            }
        }
    }
    let _ = stop.send(());
    running.await??;
    Ok(())
}
