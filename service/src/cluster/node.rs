//! [`Node`]: one instance of a cluster, running a [`Runtime`] per owned
//! shard.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use smartmsg_engine::{Projection, ProjectionRunner};
use tokio::sync::{mpsc, oneshot, watch};

use super::ownership::ShardOwnership;
use super::shard::ShardMap;
use crate::ingest::ReactionSource;
use crate::runtime::{CampaignSetup, CampaignView, Ports, Runtime, RuntimeOptions};
use crate::{RuntimeError, RuntimeHandle};

/// A boxed error from a [`ShardOpener`].
pub type OpenError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a shard's runtime runs on (built with [`ShardParts::new`]).
#[non_exhaustive]
pub struct ShardParts {
    /// The shard's ports: its own log, delay queue and state store (for a
    /// shard that can move between instances, all of them shared services:
    /// a Kafka log, a RabbitMQ queue, a [`smartmsg_engine::stream::LogStore`]
    /// in the shard's log).
    pub ports: Ports,
    /// Reaction sources polled by the shard's runtime (for example the
    /// shard's partition of a reactions topic).
    pub sources: Vec<Box<dyn ReactionSource>>,
    /// The runtime's options.
    pub options: RuntimeOptions,
    /// Read models fed from the shard's log while the shard runs here
    /// (each followed by a [`ProjectionRunner`] from its own checkpoint,
    /// stopped with the shard; one that fails is started again after
    /// [`NodeOptions::retry`]).
    pub projections: Vec<Box<dyn Projection>>,
}

impl ShardParts {
    /// A shard on `ports` with `options`, no sources and no read models.
    pub fn new(ports: Ports, options: RuntimeOptions) -> Self {
        Self {
            ports,
            sources: Vec::new(),
            options,
            projections: Vec::new(),
        }
    }

    /// Adds a reaction source.
    pub fn with_source(mut self, source: Box<dyn ReactionSource>) -> Self {
        self.sources.push(source);
        self
    }

    /// Adds a read model fed from the shard's log.
    pub fn with_projection(mut self, projection: Box<dyn Projection>) -> Self {
        self.projections.push(projection);
        self
    }
}

impl std::fmt::Debug for ShardParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardParts")
            .field("sources", &self.sources.len())
            .field("projections", &self.projections.len())
            .finish_non_exhaustive()
    }
}

/// Opens a shard's ports on the instance that has just been given it.
#[async_trait]
pub trait ShardOpener: Send + Sync {
    /// The ports and sources of `shard`. Opening must take the shard's
    /// backends over from any earlier owner (a Kafka log's writer fences
    /// the previous one) or fail until they are free (an embedded data
    /// directory's lock); the node tries again after
    /// [`NodeOptions::retry`].
    async fn open(&self, shard: u32) -> Result<ShardParts, OpenError>;
}

/// Why a cluster request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The campaign's shard is not running on this instance (another owns
    /// it, or it is being opened).
    #[error("campaign {campaign} is in shard {shard}, which is not running on this instance")]
    NotOwned {
        /// The campaign.
        campaign: String,
        /// Its shard.
        shard: u32,
    },
    /// The shard's runtime refused or failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// How a [`Node`] behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeOptions {
    /// Wait before opening a shard again after its opening failed or its
    /// runtime stopped by itself (default 1 s).
    pub retry: Duration,
    /// Longest wait for a lost shard's runtime to finish its step and
    /// close (default 30 s); after it the runtime is dropped where it is.
    pub stop_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            retry: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(30),
        }
    }
}

/// One instance of a cluster: runs a [`Runtime`] for each shard the
/// [`ShardOwnership`] gives it and stops it when the shard goes elsewhere.
///
/// Every campaign lives in one shard ([`ShardMap::shard_of`]), and each
/// shard is a complete runtime of its own (its log, queue, state and
/// reaction sources), so a shard moves between instances by being closed
/// on one and opened on the other: resume is the runtime's ordinary open
/// (§8.7 of the design).
pub struct Node {
    map: ShardMap,
    ownership: Arc<dyn ShardOwnership>,
    opener: Arc<dyn ShardOpener>,
    options: NodeOptions,
    handle: NodeHandle,
    running_tx: watch::Sender<BTreeSet<u32>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("map", &self.map)
            .field("ownership", &self.ownership)
            .field("running", &*self.running_tx.borrow())
            .finish_non_exhaustive()
    }
}

/// Requests to a running [`Node`]: cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    map: ShardMap,
    shards: Arc<RwLock<BTreeMap<u32, RuntimeHandle>>>,
    running: watch::Receiver<BTreeSet<u32>>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("map", &self.map)
            .field("running", &*self.running.borrow())
            .finish()
    }
}

impl NodeHandle {
    /// The cluster's shard map.
    pub fn map(&self) -> ShardMap {
        self.map
    }

    /// The shards whose runtimes run here now.
    pub fn running(&self) -> BTreeSet<u32> {
        self.running.borrow().clone()
    }

    /// Waits until the running shards satisfy `ready` (false after
    /// `timeout`).
    pub async fn wait_running(
        &self,
        timeout: Duration,
        ready: impl FnMut(&BTreeSet<u32>) -> bool,
    ) -> bool {
        let mut rx = self.running.clone();
        tokio::time::timeout(timeout, rx.wait_for(ready))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The running shards, as they change.
    pub fn changes(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.running.clone()
    }

    /// The runtime of `shard`, if it runs here.
    pub fn shard(&self, shard: u32) -> Option<RuntimeHandle> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&shard)
            .cloned()
    }

    /// The runtime holding campaign `id`, if its shard runs here.
    pub fn runtime_for(&self, id: &str) -> Result<RuntimeHandle, ClusterError> {
        let shard = self.map.shard_of(id);
        self.shard(shard).ok_or_else(|| ClusterError::NotOwned {
            campaign: id.to_owned(),
            shard,
        })
    }

    /// Creates a campaign in its shard's runtime.
    pub async fn create_campaign(&self, setup: CampaignSetup) -> Result<(), ClusterError> {
        let rt = self.runtime_for(&setup.id)?;
        Ok(rt.create_campaign(setup).await?)
    }

    /// Starts campaign `id`.
    pub async fn start(&self, id: &str) -> Result<(), ClusterError> {
        Ok(self.runtime_for(id)?.start(id).await?)
    }

    /// The latest published view of campaign `id`, if its shard runs here.
    pub fn published(&self, id: &str) -> Option<CampaignView> {
        self.runtime_for(id).ok()?.published(id)
    }

    /// Every published view of the shards running here.
    pub fn views(&self) -> BTreeMap<String, CampaignView> {
        let shards = self.shards.read().unwrap_or_else(|p| p.into_inner());
        shards.values().flat_map(RuntimeHandle::views).collect()
    }
}

struct Running {
    epoch: u64,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    /// Stops the shard's projection runners.
    stop_projections: watch::Sender<bool>,
    projections: Vec<tokio::task::JoinHandle<()>>,
}

/// A shard runtime's end: (shard, epoch, result).
type Exit = (u32, u64, Result<(), RuntimeError>);

impl Node {
    /// A node of the cluster `map`, following `ownership`, opening shards
    /// with `opener`.
    pub fn new(
        map: ShardMap,
        ownership: Arc<dyn ShardOwnership>,
        opener: Arc<dyn ShardOpener>,
        options: NodeOptions,
    ) -> Self {
        let (running_tx, running) = watch::channel(BTreeSet::new());
        Self {
            map,
            ownership,
            opener,
            options,
            handle: NodeHandle {
                map,
                shards: Arc::default(),
                running,
            },
            running_tx,
        }
    }

    /// A handle for requests; valid while [`Node::run`] runs.
    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Follows the ownership until `shutdown` resolves (or the ownership
    /// ends), then stops every shard's runtime (each finishes its step).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let mut own = self.ownership.watch();
        let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<Exit>();
        let mut running: BTreeMap<u32, Running> = BTreeMap::new();
        let mut epoch = 0u64;
        loop {
            let target = own.borrow_and_update().clone();
            let lost: Vec<u32> = running
                .keys()
                .filter(|s| !target.shards.contains(s))
                .copied()
                .collect();
            for s in lost {
                if let Some(r) = running.remove(&s) {
                    self.stop(s, r).await;
                }
            }
            self.running_tx
                .send_replace(running.keys().copied().collect());
            self.ownership.released(target.generation);
            let mut retry = false;
            for &s in &target.shards {
                if running.contains_key(&s) || s >= self.map.shards() {
                    continue;
                }
                epoch += 1;
                match self.start(s, epoch, exit_tx.clone()).await {
                    Ok(r) => {
                        running.insert(s, r);
                    }
                    Err(e) => {
                        tracing::warn!(shard = s, error = %e, "could not open the shard; trying again");
                        retry = true;
                    }
                }
            }
            self.running_tx
                .send_replace(running.keys().copied().collect());
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = own.changed() => if changed.is_err() {
                    break;
                },
                Some((s, ep, result)) = exit_rx.recv() => {
                    if running.get(&s).is_some_and(|r| r.epoch == ep) {
                        running.remove(&s);
                        self.forget(s);
                        match result {
                            Ok(()) => tracing::warn!(shard = s, "the shard's runtime stopped; opening it again"),
                            Err(e) => tracing::error!(shard = s, error = %e, "the shard's runtime failed; opening it again"),
                        }
                        tokio::time::sleep(self.options.retry).await;
                    }
                }
                () = tokio::time::sleep(self.options.retry), if retry => {}
            }
        }
        for (s, r) in std::mem::take(&mut running) {
            self.stop(s, r).await;
        }
        self.running_tx.send_replace(BTreeSet::new());
    }

    fn forget(&self, shard: u32) {
        self.handle
            .shards
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&shard);
    }

    async fn start(
        &self,
        shard: u32,
        epoch: u64,
        exit: mpsc::UnboundedSender<Exit>,
    ) -> Result<Running, OpenError> {
        let parts = self.opener.open(shard).await?;
        let log = Arc::clone(&parts.ports.log);
        let mut rt = Runtime::open(parts.ports, parts.options).await?;
        for s in parts.sources {
            rt.add_source(s);
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let (handle, run) = rt.spawn(async move {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            let result = run.await;
            let _ = exit.send((shard, epoch, result));
        });
        self.handle
            .shards
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, handle);
        let (stop_projections, stopping) = watch::channel(false);
        let retry = self.options.retry;
        let projections = parts
            .projections
            .into_iter()
            .map(|p| {
                let log = Arc::clone(&log);
                let stopping = stopping.clone();
                tokio::spawn(follow(shard, log, p, stopping, retry))
            })
            .collect();
        tracing::info!(shard, "shard opened");
        Ok(Running {
            epoch,
            stop,
            task,
            stop_projections,
            projections,
        })
    }

    async fn stop(&self, shard: u32, r: Running) {
        self.forget(shard);
        let _ = r.stop_projections.send(true);
        for p in r.projections {
            if tokio::time::timeout(self.options.stop_timeout, p)
                .await
                .is_err()
            {
                tracing::error!(shard, "a read model did not stop in time");
            }
        }
        let _ = r.stop.send(());
        let abort = r.task.abort_handle();
        if tokio::time::timeout(self.options.stop_timeout, r.task)
            .await
            .is_err()
        {
            tracing::error!(shard, "the shard's runtime did not stop in time; dropped");
            abort.abort();
        }
        tracing::info!(shard, "shard released");
    }
}

/// Follows `log` into `projection` until `stop`; a failure (a store away, a
/// checkpoint moved by another instance) starts it again from its stored
/// checkpoint after `retry`.
async fn follow(
    shard: u32,
    log: Arc<dyn smartmsg_engine::EventLog>,
    projection: Box<dyn Projection>,
    stop: watch::Receiver<bool>,
    retry: Duration,
) {
    let mut runner = ProjectionRunner::new(log, projection);
    loop {
        match runner.follow(stop.clone()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(shard, projection = runner.projection().name(), error = %e,
                    "read model failed; following again");
            }
        }
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(retry).await;
    }
}
