//! Running a runtime on the clock: [`Runtime::run`], the
//! [`RuntimeHandle`] a service talks to it through, and shutdown.

use std::future::Future;

use smartmsg_domain::CampaignCommand;
use tokio::sync::{mpsc, oneshot};

use crate::error::RuntimeError;
use crate::ingest::ReactionInbox;
use crate::runtime::{CampaignSetup, CampaignView, Runtime};

/// Requests waiting for the runtime's loop at most.
pub const MAX_PENDING_REQUESTS: usize = 1_024;

type Reply<T> = oneshot::Sender<Result<T, RuntimeError>>;

enum Request {
    Create(Box<CampaignSetup>, Reply<()>),
    Command(String, CampaignCommand, Option<u64>, Reply<()>),
    View(String, Reply<Option<CampaignView>>),
    List(Reply<Vec<CampaignView>>),
    RemoveUser(u32, String, Reply<crate::runtime::RemovalReport>),
}

/// Talks to a running [`Runtime`] (see [`Runtime::spawn`]). Cheap to clone;
/// every call waits for the runtime's loop to answer.
#[derive(Clone)]
pub struct RuntimeHandle {
    tx: mpsc::Sender<Request>,
    inbox: ReactionInbox,
    views: crate::runtime::Views,
    log: std::sync::Arc<dyn smartmsg_engine::EventLog>,
    queue: std::sync::Arc<dyn smartmsg_engine::DelayQueue>,
    stats: std::sync::Arc<crate::runtime::RuntimeStats>,
    removed: crate::runtime::Removed,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle").finish_non_exhaustive()
    }
}

impl RuntimeHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| RuntimeError::Stopped)?;
        rx.await.map_err(|_| RuntimeError::Stopped)?
    }

    /// Creates a campaign (see [`Runtime::create_campaign`]).
    pub async fn create_campaign(&self, setup: CampaignSetup) -> Result<(), RuntimeError> {
        self.ask(|r| Request::Create(Box::new(setup), r)).await
    }

    /// Executes a lifecycle command (see [`Runtime::command`]).
    pub async fn command(&self, id: &str, cmd: CampaignCommand) -> Result<(), RuntimeError> {
        self.ask(|r| Request::Command(id.to_owned(), cmd, None, r))
            .await
    }

    /// Executes a lifecycle command if the campaign is at version
    /// `expected` (see [`Runtime::command_if`]).
    pub async fn command_if(
        &self,
        id: &str,
        cmd: CampaignCommand,
        expected: Option<u64>,
    ) -> Result<(), RuntimeError> {
        self.ask(|r| Request::Command(id.to_owned(), cmd, expected, r))
            .await
    }

    /// Starts a campaign (command id `start`).
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.command(
            id,
            CampaignCommand::new("start", smartmsg_domain::Action::Start),
        )
        .await
    }

    /// Removes a user's data (see [`Runtime::remove_user`]).
    pub async fn remove_user(
        &self,
        user: u32,
        reason: &str,
    ) -> Result<crate::runtime::RemovalReport, RuntimeError> {
        self.ask(|r| Request::RemoveUser(user, reason.to_owned(), r))
            .await
    }

    /// A campaign as it is now.
    pub async fn view(&self, id: &str) -> Result<Option<CampaignView>, RuntimeError> {
        self.ask(|r| Request::View(id.to_owned(), r)).await
    }

    /// Every campaign.
    pub async fn list(&self) -> Result<Vec<CampaignView>, RuntimeError> {
        self.ask(Request::List).await
    }

    /// The way in for reactions (usable without the loop).
    pub fn inbox(&self) -> &ReactionInbox {
        &self.inbox
    }

    /// The campaigns' views as of the runtime's last step or command,
    /// without waiting for it.
    pub fn views(&self) -> std::collections::BTreeMap<String, CampaignView> {
        self.views.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One campaign's view as of the runtime's last step or command.
    pub fn published(&self, id: &str) -> Option<CampaignView> {
        self.views
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// The event log (for reads that need not wait for the runtime).
    pub fn log(&self) -> &std::sync::Arc<dyn smartmsg_engine::EventLog> {
        &self.log
    }

    /// The delay queue (its depth, for metrics).
    pub fn queue(&self) -> &std::sync::Arc<dyn smartmsg_engine::DelayQueue> {
        &self.queue
    }

    /// The runtime's counters.
    pub fn stats(&self) -> &crate::runtime::RuntimeStats {
        &self.stats
    }

    /// Whether `user`'s data was removed (without waiting for the runtime).
    pub fn is_removed(&self, user: u32) -> bool {
        self.removed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&user)
    }
}

/// A future that resolves on SIGTERM or ctrl-c (SIGINT). The handlers are
/// installed when this is called (inside a tokio runtime), not when the
/// future is first polled, so a signal that comes while the runtime is
/// still opening is not lost (and does not kill the process).
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(term) => {},
                () = wait(int) => {},
            }
        }
    }
    #[cfg(not(unix))]
    {
        async move {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

impl Runtime {
    /// Runs the runtime on its clock until `shutdown` resolves, serving the
    /// returned handle's requests between steps. The current step always
    /// finishes (nothing is abandoned half-way); then the runtime is
    /// dropped, which closes the backends (the embedded log leaves its
    /// clean-shutdown mark and releases the directory lock).
    ///
    /// Returns the handle and the loop's future (spawn it, or await it).
    pub fn spawn(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (
        RuntimeHandle,
        impl Future<Output = Result<(), RuntimeError>> + Send,
    ) {
        let (tx, rx) = mpsc::channel(MAX_PENDING_REQUESTS);
        self.publish_views();
        let handle = RuntimeHandle {
            tx,
            inbox: self.inbox(),
            views: self.views(),
            log: std::sync::Arc::clone(&self.ports().log),
            queue: std::sync::Arc::clone(&self.ports().queue),
            stats: self.stats(),
            removed: self.removed_users(),
        };
        (handle, self.run(rx, shutdown))
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), RuntimeError> {
        tokio::pin!(shutdown);
        let mut failures = 0u32;
        // When the last step started (the wall clock: this is pacing, not
        // campaign time).
        let mut last_step = std::time::Instant::now();
        let mut woken = false;
        loop {
            if woken {
                // Woken by the inbox: let submissions gather for up to
                // `wake_coalesce_ms` after the previous step.
                let gap = std::time::Duration::from_millis(self.options().wake_coalesce_ms);
                let wait = gap.saturating_sub(last_step.elapsed());
                if !wait.is_zero() {
                    tokio::select! {
                        biased;
                        () = &mut shutdown => {
                            tracing::info!("shutting down");
                            return Ok(());
                        }
                        req = requests.recv() => if let Some(req) = req {
                            self.serve(req).await;
                        },
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                woken = false;
            }
            last_step = std::time::Instant::now();
            let now = self.ports().clock.now_ms();
            let next = match self.step(now).await {
                Ok(r) => {
                    failures = 0;
                    r.next_wake_ms
                }
                Err(e) if e.is_crash() => return Err(e),
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, failures, "runtime step failed; trying again");
                    let backoff = 100u64.saturating_mul(1 << failures.min(9));
                    Some(now.saturating_add(backoff))
                }
            };
            let poll = self.options().poll_interval_ms.max(1);
            // At least 1 ms: nothing can make the loop spin.
            let wait = next
                .map_or(poll, |t| {
                    t.saturating_sub(self.ports().clock.now_ms()).min(poll)
                })
                .max(1);
            let wake = self.wake_handle();
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    tracing::info!("shutting down");
                    return Ok(());
                }
                req = requests.recv() => match req {
                    Some(req) => self.serve(req).await,
                    None => {
                        // Every handle is gone: keep running until shutdown.
                        tokio::select! {
                            () = &mut shutdown => return Ok(()),
                            () = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
                        }
                    }
                },
                () = wake.notified() => woken = true,
                () = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
            }
        }
    }

    async fn serve(&mut self, req: Request) {
        match req {
            Request::Create(setup, r) => {
                let _ = r.send(self.create_campaign(*setup).await);
            }
            Request::Command(id, cmd, expected, r) => {
                let _ = r.send(self.command_if(&id, cmd, expected).await);
            }
            Request::View(id, r) => {
                let _ = r.send(Ok(self.view(&id)));
            }
            Request::List(r) => {
                let all = self
                    .campaign_ids()
                    .iter()
                    .filter_map(|id| self.view(id))
                    .collect();
                let _ = r.send(Ok(all));
            }
            Request::RemoveUser(user, reason, r) => {
                let _ = r.send(self.remove_user(user, &reason).await);
            }
        }
    }
}
