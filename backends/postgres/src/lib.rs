//! # smartmsg-postgres
//!
//! Read models in PostgreSQL, so that any instance of a cluster answers
//! any query about any campaign, whichever instance runs its shard.
//!
//! - [`PgCampaigns`]: a [`Projection`] that folds the campaign streams of
//!   one log (a cluster shard's) through the domain's campaign aggregate
//!   and keeps one row per campaign ([`CampaignRow`]) in
//!   `<schema>.campaigns`, with the projection's checkpoint in
//!   `<schema>.checkpoints` **in the same transaction**. The checkpoint is
//!   compared and set: an instance whose shard moved away (a zombie) finds
//!   the checkpoint moved by the new owner and commits nothing.
//! - [`PgReadModels`]: wraps a [`ShardOpener`] so that each shard it opens
//!   also feeds its [`PgCampaigns`] (the node follows it while the shard
//!   runs there).
//! - [`PgCampaignReader`]: reads the rows, from any instance.
//! - [`PgShardDirectory`]: where each shard runs (`<schema>.shard_owners`)
//!   and the rows, for `smartmsg serve` in cluster mode.
//!
//! The tables are created on first connect (under a transaction-scoped
//! advisory lock, so instances starting together do not race).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use smartmsg_domain::{BatchRecord, Campaign, CampaignEvent, CreativeStats, Status};
use smartmsg_engine::{
    Aggregate, BackendError, Checkpoint, EventCodec, EventLog, Projection, ProjectionError,
    RecordedEvent,
};
use smartmsg_service::cluster::{OpenError, ShardDirectory, ShardOpener, ShardParts};
use smartmsg_service::streams::CampaignStreams;
use tokio_postgres::{Client, NoTls};

/// Longest schema name.
pub const MAX_SCHEMA_LEN: usize = 48;

/// Why the read models failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The schema name is not 1–48 lowercase ASCII letters, digits and `_`,
    /// starting with a letter.
    #[error("bad schema name {0:?}: 1-48 of a-z, 0-9 and _, starting with a letter")]
    Schema(String),
    /// The database failed.
    #[error("postgresql: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// A call took longer than allowed.
    #[error("postgresql did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A stored row could not be read back.
    #[error("a stored row of campaign {campaign} is not readable: {reason}")]
    Row {
        /// The campaign.
        campaign: String,
        /// Why.
        reason: String,
    },
}

/// One campaign as the read model holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignRow {
    /// The campaign's id.
    pub id: String,
    /// The projection (and so the log, e.g. the shard) it comes from.
    pub source: String,
    /// The version of its campaign stream folded so far.
    pub version: u64,
    /// Its state.
    pub status: Option<Status>,
    /// Its budget.
    pub budget: u64,
    /// Budget not yet reserved by a planned batch.
    pub budget_left: u64,
    /// Messages in sent batches.
    pub sent: u64,
    /// Reactions recorded.
    pub reactions: u64,
    /// Per creative.
    pub creatives: Vec<CreativeStats>,
    /// Its batches.
    pub batches: Vec<BatchRecord>,
}

impl CampaignRow {
    fn of(id: &str, source: &str, version: u64, c: &Campaign) -> Self {
        Self {
            id: id.to_owned(),
            source: source.to_owned(),
            version,
            status: c.status(),
            budget: c.spec().map_or(0, |s| s.budget),
            budget_left: c.remaining_budget(),
            sent: c.sent(),
            reactions: c.creative_stats().iter().map(|s| s.reactions).sum(),
            creatives: c.creative_stats().to_vec(),
            batches: c.batches().to_vec(),
        }
    }
}

fn check_schema(schema: &str) -> Result<(), PgError> {
    let ok = !schema.is_empty()
        && schema.len() <= MAX_SCHEMA_LEN
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(PgError::Schema(schema.to_owned()))
    }
}

/// Connects, and drives the connection on a task of its own.
async fn connect(url: &str) -> Result<Client, PgError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgresql connection ended");
        }
    });
    Ok(client)
}

/// Creates the schema and tables if needed.
async fn create_tables(client: &mut Client, schema: &str) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    // One creator at a time (CREATE ... IF NOT EXISTS races otherwise).
    tx.execute("SELECT pg_advisory_xact_lock(7230442160110421)", &[])
        .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.campaigns (
             id text PRIMARY KEY,
             source text NOT NULL,
             version bigint NOT NULL,
             status text,
             budget bigint NOT NULL,
             budget_left bigint NOT NULL,
             sent bigint NOT NULL,
             reactions bigint NOT NULL,
             row jsonb NOT NULL);
         CREATE TABLE IF NOT EXISTS {schema}.checkpoints (
             name text PRIMARY KEY,
             position bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS {schema}.shard_owners (
             shard integer PRIMARY KEY,
             address text NOT NULL,
             member text NOT NULL,
             claimed_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> ProjectionError {
    ProjectionError::Store(BackendError::new(e))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The campaign read model of one log (see the [crate docs](crate)).
pub struct PgCampaigns {
    client: Client,
    schema: String,
    name: String,
    log: Arc<dyn EventLog>,
    /// Campaigns folded so far in this process: (state, stream version).
    states: HashMap<String, (Campaign, u64)>,
    /// The checkpoint this projection believes is stored.
    at: Option<Checkpoint>,
}

impl std::fmt::Debug for PgCampaigns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCampaigns")
            .field("schema", &self.schema)
            .field("name", &self.name)
            .field("campaigns", &self.states.len())
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

impl PgCampaigns {
    /// The read model named `name` (unique per log, e.g. the shard's log
    /// name) of the campaigns in `log`, in `schema` of the database at
    /// `url`. Creates the tables if needed.
    pub async fn connect(
        url: &str,
        schema: &str,
        name: impl Into<String>,
        log: Arc<dyn EventLog>,
    ) -> Result<Self, PgError> {
        check_schema(schema)?;
        let mut client = connect(url).await?;
        create_tables(&mut client, schema).await?;
        Ok(Self {
            client,
            schema: schema.to_owned(),
            name: name.into(),
            log,
            states: HashMap::new(),
            at: None,
        })
    }

    /// The state of campaign `id` just before `event`, folded from the log
    /// the first time this process sees the campaign.
    async fn state_before(
        &mut self,
        id: &str,
        event: &RecordedEvent,
    ) -> Result<&mut (Campaign, u64), ProjectionError> {
        if !self.states.contains_key(id) {
            let mut state = Campaign::default();
            let mut version = 0u64;
            let page = self.log.limits().max_read_events.clamp(1, 10_000);
            while version + 1 < event.version {
                let want = usize::try_from(event.version - 1 - version).unwrap_or(page);
                let events = self
                    .log
                    .read_stream(&event.stream, version + 1, want.min(page))
                    .await
                    .map_err(ProjectionError::Read)?;
                if events.is_empty() {
                    break;
                }
                for e in events {
                    apply(&mut state, &e)?;
                    version = e.version;
                }
            }
            self.states.insert(id.to_owned(), (state, version));
        }
        Ok(self.states.get_mut(id).expect("inserted above"))
    }
}

fn apply(state: &mut Campaign, e: &RecordedEvent) -> Result<(), ProjectionError> {
    let ev = CampaignEvent::decode(&e.kind, e.schema, &e.payload).map_err(|source| {
        ProjectionError::Decode {
            position: e.position,
            source,
        }
    })?;
    state.evolve(&ev);
    Ok(())
}

#[async_trait]
impl Projection for PgCampaigns {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&self) -> Result<Checkpoint, ProjectionError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT position FROM {}.checkpoints WHERE name = $1",
                    self.schema
                ),
                &[&self.name],
            )
            .await
            .map_err(store_err)?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        next_checkpoint: Checkpoint,
    ) -> Result<(), ProjectionError> {
        let started = std::time::Instant::now();
        let expected = match self.at {
            Some(at) => at,
            None => self.checkpoint().await?,
        };
        let mut touched: BTreeMap<String, CampaignRow> = BTreeMap::new();
        for e in events {
            let Some(id) = CampaignStreams::campaign_of(e.stream.as_str()) else {
                continue;
            };
            let id = id.to_owned();
            let name = self.name.clone();
            let (state, version) = self.state_before(&id, e).await?;
            if e.version <= *version {
                continue;
            }
            apply(state, e)?;
            *version = e.version;
            touched.insert(id.clone(), CampaignRow::of(&id, &name, *version, state));
        }
        let schema = self.schema.clone();
        let tx = self.client.transaction().await.map_err(store_err)?;
        let stored = tx
            .query_opt(
                &format!("SELECT position FROM {schema}.checkpoints WHERE name = $1 FOR UPDATE"),
                &[&self.name],
            )
            .await
            .map_err(store_err)?
            .map_or(0, |r| r.get::<_, i64>(0).max(0) as u64);
        if stored != expected {
            // Another instance projects this log now (the shard moved).
            self.at = None;
            self.states.clear();
            return Err(ProjectionError::Rejected {
                position: events.first().map_or(0, |e| e.position),
                reason: format!(
                    "the checkpoint of {} is {stored}, not {expected}: another instance projects this log",
                    self.name
                ),
            });
        }
        for row in touched.values() {
            let json = serde_json::to_value(row).map_err(store_err)?;
            let status = row.status.map(|s| format!("{s:?}").to_lowercase());
            tx.execute(
                &format!(
                    "INSERT INTO {schema}.campaigns
                         (id, source, version, status, budget, budget_left, sent, reactions, row)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (id) DO UPDATE SET
                         source = EXCLUDED.source, version = EXCLUDED.version,
                         status = EXCLUDED.status, budget = EXCLUDED.budget,
                         budget_left = EXCLUDED.budget_left, sent = EXCLUDED.sent,
                         reactions = EXCLUDED.reactions, row = EXCLUDED.row"
                ),
                &[
                    &row.id,
                    &row.source,
                    &to_i64(row.version),
                    &status,
                    &to_i64(row.budget),
                    &to_i64(row.budget_left),
                    &to_i64(row.sent),
                    &to_i64(row.reactions),
                    &json,
                ],
            )
            .await
            .map_err(store_err)?;
        }
        tx.execute(
            &format!(
                "INSERT INTO {schema}.checkpoints (name, position) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
            ),
            &[&self.name, &to_i64(next_checkpoint)],
        )
        .await
        .map_err(store_err)?;
        tx.commit().await.map_err(store_err)?;
        self.at = Some(next_checkpoint);
        if !touched.is_empty() {
            let newest = events.iter().map(|e| e.timestamp_ms).max().unwrap_or(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            tracing::debug!(
                projection = %self.name,
                events = events.len(),
                rows = touched.len(),
                apply_ms = started.elapsed().as_millis() as u64,
                lag_ms = now.saturating_sub(newest),
                "projected"
            );
        }
        Ok(())
    }
}

/// Reads the campaign rows, from any instance.
pub struct PgCampaignReader {
    client: Client,
    schema: String,
}

impl std::fmt::Debug for PgCampaignReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCampaignReader")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PgCampaignReader {
    /// A reader of the rows in `schema` of the database at `url` (creates
    /// the tables if needed).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, PgError> {
        check_schema(schema)?;
        let mut client = connect(url).await?;
        create_tables(&mut client, schema).await?;
        Ok(Self {
            client,
            schema: schema.to_owned(),
        })
    }

    /// Campaign `id`'s row, if any.
    pub async fn get(&self, id: &str) -> Result<Option<CampaignRow>, PgError> {
        let row = self
            .client
            .query_opt(
                &format!("SELECT row FROM {}.campaigns WHERE id = $1", self.schema),
                &[&id],
            )
            .await?;
        row.map(|r| decode_row(id, r.get(0))).transpose()
    }

    /// Every row, by id.
    pub async fn list(&self) -> Result<Vec<CampaignRow>, PgError> {
        let rows = self
            .client
            .query(
                &format!("SELECT id, row FROM {}.campaigns ORDER BY id", self.schema),
                &[],
            )
            .await?;
        rows.into_iter()
            .map(|r| decode_row(r.get(0), r.get(1)))
            .collect()
    }
}

fn decode_row(id: &str, json: serde_json::Value) -> Result<CampaignRow, PgError> {
    serde_json::from_value(json).map_err(|e| PgError::Row {
        campaign: id.to_owned(),
        reason: e.to_string(),
    })
}

/// Wraps a [`ShardOpener`]: every shard it opens also feeds a
/// [`PgCampaigns`] named `<prefix>shard-<s>`.
pub struct PgReadModels<O> {
    inner: O,
    url: String,
    schema: String,
    prefix: String,
}

impl<O> std::fmt::Debug for PgReadModels<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReadModels")
            .field("schema", &self.schema)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl<O: ShardOpener> PgReadModels<O> {
    /// `inner`'s shards with their campaign rows in `schema` of the
    /// database at `url`; projections are named `<prefix>shard-<s>` (use the
    /// cluster's name, so clusters can share a schema).
    pub fn new(inner: O, url: &str, schema: &str, prefix: &str) -> Result<Self, PgError> {
        check_schema(schema)?;
        Ok(Self {
            inner,
            url: url.to_owned(),
            schema: schema.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

#[async_trait]
impl<O: ShardOpener> ShardOpener for PgReadModels<O> {
    async fn open(&self, shard: u32) -> Result<ShardParts, OpenError> {
        let parts = self.inner.open(shard).await?;
        let log = Arc::clone(&parts.ports.log);
        let name = format!("{}shard-{shard}", self.prefix);
        let model = PgCampaigns::connect(&self.url, &self.schema, name, log).await?;
        Ok(parts.with_projection(Box::new(model)))
    }
}

/// Longest a directory call may take (connecting included).
pub const DIRECTORY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// [`ShardDirectory`] in PostgreSQL: `<schema>.shard_owners` (shard →
/// address, member, when) and the campaign rows. Connects again after the
/// database went away (the call that found it away fails).
pub struct PgShardDirectory {
    url: String,
    schema: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for PgShardDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgShardDirectory")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PgShardDirectory {
    /// The directory in `schema` of the database at `url` (creates the
    /// tables if needed).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, PgError> {
        check_schema(schema)?;
        let mut client = connect(url).await?;
        create_tables(&mut client, schema).await?;
        Ok(Self {
            url: url.to_owned(),
            schema: schema.to_owned(),
            client: tokio::sync::Mutex::new(Some(client)),
        })
    }

    /// Runs `f` on the connection (opened again if it was lost); a failed
    /// call drops the connection so that the next one reconnects.
    async fn with<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 'c>,
        >,
    ) -> Result<T, PgError> {
        let mut guard = self.client.lock().await;
        let timed_out = || PgError::Timeout(DIRECTORY_TIMEOUT);
        if guard.as_ref().is_none_or(Client::is_closed) {
            let c = tokio::time::timeout(DIRECTORY_TIMEOUT, connect(&self.url))
                .await
                .map_err(|_| timed_out())??;
            *guard = Some(c);
        }
        let client = guard.as_ref().expect("connected above");
        match tokio::time::timeout(DIRECTORY_TIMEOUT, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if client.is_closed() {
                    *guard = None;
                }
                Err(e.into())
            }
            Err(_) => {
                // A half-open connection: drop it, connect again next time.
                *guard = None;
                Err(timed_out())
            }
        }
    }
}

#[async_trait]
impl ShardDirectory for PgShardDirectory {
    async fn claim(&self, shard: u32, address: &str, member: &str) -> Result<(), OpenError> {
        let sql = format!(
            "INSERT INTO {}.shard_owners (shard, address, member, claimed_at)
             VALUES ($1, $2, $3, now())
             ON CONFLICT (shard) DO UPDATE
             SET address = EXCLUDED.address, member = EXCLUDED.member, claimed_at = now()",
            self.schema
        );
        let shard = i32::try_from(shard).map_err(|e| Box::new(e) as OpenError)?;
        let (address, member) = (address.to_owned(), member.to_owned());
        self.with(|c| {
            Box::pin(async move {
                c.execute(&sql, &[&shard, &address, &member]).await?;
                Ok(())
            })
        })
        .await
        .map_err(|e| Box::new(e) as OpenError)
    }

    async fn owner(&self, shard: u32) -> Result<Option<String>, OpenError> {
        let sql = format!(
            "SELECT address FROM {}.shard_owners WHERE shard = $1",
            self.schema
        );
        let shard = i32::try_from(shard).map_err(|e| Box::new(e) as OpenError)?;
        let row = self
            .with(|c| Box::pin(async move { c.query_opt(&sql, &[&shard]).await }))
            .await
            .map_err(|e| Box::new(e) as OpenError)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn campaigns(&self) -> Result<Vec<serde_json::Value>, OpenError> {
        let sql = format!("SELECT row FROM {}.campaigns ORDER BY id", self.schema);
        let rows = self
            .with(|c| Box::pin(async move { c.query(&sql, &[]).await }))
            .await
            .map_err(|e| Box::new(e) as OpenError)?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }
}
