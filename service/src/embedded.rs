//! The runtime on the embedded backend: one data directory, no server.

use std::path::Path;
use std::sync::Arc;

use smartmsg_embedded::{
    EmbeddedConfig, EmbeddedDelayQueue, EmbeddedLog, RedbSnapshots, RedbStore,
};
use smartmsg_engine::{Clock, SystemClock};

use crate::error::RuntimeError;
use crate::runtime::{Ports, Runtime, RuntimeOptions};
use crate::sender::Sender;

fn open_err(what: &'static str) -> impl Fn(smartmsg_embedded::EmbeddedError) -> RuntimeError {
    move |e| RuntimeError::Open {
        what,
        reason: e.to_string(),
    }
}

/// The embedded ports in `dir`: the event log (`log/`), snapshots
/// (`snapshots.redb`), the delay queue (`queue/`) and the pipelines' state
/// (`state.redb`), on `clock`, sending through `sender`.
pub fn embedded_ports(
    dir: &Path,
    log_config: EmbeddedConfig,
    clock: Arc<dyn Clock>,
    sender: Arc<dyn Sender>,
) -> Result<Ports, RuntimeError> {
    std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Open {
        what: "data directory",
        reason: format!("{}: {e}", dir.display()),
    })?;
    let log = Arc::new(
        EmbeddedLog::open_with(dir.join("log"), log_config).map_err(open_err("event log"))?,
    );
    let snapshots =
        Arc::new(RedbSnapshots::open(dir.join("snapshots.redb")).map_err(open_err("snapshots"))?);
    let queue =
        Arc::new(EmbeddedDelayQueue::open(dir.join("queue")).map_err(open_err("delay queue"))?);
    let state = Arc::new(RedbStore::open(dir.join("state.redb")).map_err(open_err("state store"))?);
    Ok(Ports {
        log,
        snapshots: Some(snapshots),
        queue,
        state,
        clock,
        sender,
    })
}

impl Runtime {
    /// Opens (or creates) a runtime on the embedded backend in `dir`, on
    /// the wall clock, sending through `sender`. Campaigns registered there
    /// resume.
    pub async fn open_embedded(
        dir: impl AsRef<Path>,
        sender: Arc<dyn Sender>,
        options: RuntimeOptions,
    ) -> Result<Self, RuntimeError> {
        let ports = embedded_ports(
            dir.as_ref(),
            EmbeddedConfig::default(),
            Arc::new(SystemClock),
            sender,
        )?;
        Runtime::open(ports, options).await
    }
}
