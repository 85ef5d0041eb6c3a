//! Child process of the runtime crash test: runs the test's campaigns on
//! the embedded backend on the wall clock, sending by webhook and reading
//! reactions from a JSON Lines directory, writing the campaigns' views to
//! `DIR/status.json`, until killed (SIGKILL) or stopped (SIGTERM).
//!
//! Usage: `runtime_child DIR WEBHOOK_URL REACTIONS_DIR START_MS`

use std::sync::Arc;
use std::time::Duration;

use smartmsg_service::{
    shutdown_signal, JsonLinesSource, Runtime, RuntimeOptions, WebhookConfig, WebhookSender,
};
use smartmsg_tests::runtime_crash::{setup, CAMPAIGNS, STATUS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    smartmsg_tests::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: runtime_child DIR WEBHOOK_URL REACTIONS_DIR START_MS"
    );
    // Handlers first: a SIGTERM while the runtime opens still stops it
    // cleanly.
    let shutdown = shutdown_signal();
    let dir = std::path::PathBuf::from(&args[1]);
    let start_ms: u64 = args[4].parse()?;
    let sender = WebhookSender::new({
        let mut built = WebhookConfig::default();
        built.url = args[2].clone();
        built.max_attempts = 2;
        built.retry_base_ms = 10;
        built.timeout_ms = 2_000;
        built
    })?;
    let options = {
        let mut built = RuntimeOptions::default();
        built.poll_interval_ms = 20;
        built.send_retry_ms = 20;
        built.send_retry_max_ms = 200;
        built
    };
    let mut rt = Runtime::open_embedded(dir.join("data"), Arc::new(sender), options).await?;
    rt.add_source(Box::new(JsonLinesSource::new("reactions", &args[3])));
    for (i, id) in CAMPAIGNS.iter().enumerate() {
        rt.create_campaign(setup(i, start_ms)).await?;
        rt.start(id).await?;
    }
    let (handle, run) = rt.spawn(shutdown);
    let running = tokio::spawn(run);
    let status = dir.join(STATUS);
    let tmp = dir.join("status.json.tmp");
    loop {
        tokio::select! {
            r = handle.list() => {
                let Ok(views) = r else { break };
                std::fs::write(&tmp, serde_json::to_vec(&views)?)?;
                std::fs::rename(&tmp, &status)?;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        if running.is_finished() {
            break;
        }
    }
    running.await??;
    Ok(())
}
