//! Child process of the stream crash test: runs the crash topology with a
//! `StreamRunner` over the embedded log (`DIR/log`) and a redb store
//! (`DIR/state.redb`), committing every `BATCH` records, until killed — or,
//! with `idle`, until it has processed everything (exit 0).
//!
//! Usage: `stream_child DIR BATCH [idle]`

use std::sync::Arc;
use std::time::Duration;

use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{EventLogSink, EventLogSource, RunnerConfig, StreamRunner};
use smartmsg_engine::EventLog;
use smartmsg_tests::stream_crash::{topology, RUNNER};

/// Log segment size of the child and the parent.
const SEGMENT_BYTES: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    smartmsg_tests::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3 || args.len() == 4,
        "usage: stream_child DIR BATCH [idle]"
    );
    let dir = std::path::PathBuf::from(&args[1]);
    let batch: usize = args[2].parse()?;
    let until_idle = args.get(3).is_some_and(|a| a == "idle");
    let log: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open_with(dir.join("log"), {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = SEGMENT_BYTES;
        built
    })?);
    let store = Arc::new(RedbStore::open(dir.join("state.redb"))?);
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    rt.block_on(async move {
        let mut runner = StreamRunner::open(
            topology(),
            store,
            EventLogSource::new(log.clone()),
            EventLogSink::new(log.clone()),
            RunnerConfig::new(RUNNER).with_batch(batch),
        )?;
        loop {
            let r = runner.step().await?;
            if r.records == 0 {
                if until_idle {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
}
