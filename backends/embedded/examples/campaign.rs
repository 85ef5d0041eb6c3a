//! The main job, for now: a small campaign appended to the embedded log
//! through a `Repository`, then replayed from disk in a fresh process state.
//!
//! ```sh
//! cargo run --release -p smartmsg-embedded --example campaign [-- DATA_DIR]
//! ```
//!
//! DATA_DIR defaults to `target/example-campaign`; it is wiped first so every
//! run starts from an empty log.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_embedded::{EmbeddedLog, RedbSnapshots};
use smartmsg_engine::{
    Aggregate, CommandOptions, DecideCtx, DecodeError, EventCodec, EventLog, ManualClock,
    Repository, RepositoryConfig, StreamId,
};

/// A campaign in its simplest form: a budget spent batch by batch.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Campaign {
    name: String,
    budget: u64,
    sent: u64,
    batches: Vec<u32>,
    completed: bool,
}

enum Command {
    Create { name: String, budget: u64 },
    SendBatch { batch: u32, messages: u64 },
    Complete,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Event {
    Created { name: String, budget: u64 },
    BatchSent { batch: u32, messages: u64 },
    Completed,
}

#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("campaign already exists")]
    Exists,
    #[error("no such campaign")]
    Missing,
    #[error("batch {0} was already sent")]
    BatchTwice(u32),
    #[error("budget exceeded: {sent} sent + {asked} asked > {budget}")]
    OverBudget { sent: u64, asked: u64, budget: u64 },
    #[error("campaign is completed")]
    Completed,
}

impl EventCodec for Event {
    fn kind(&self) -> &'static str {
        match self {
            Event::Created { .. } => "CampaignCreated",
            Event::BatchSent { .. } => "BatchSent",
            Event::Completed => "CampaignCompleted",
        }
    }
    fn schema(&self) -> u16 {
        1
    }
    fn encode(&self) -> Bytes {
        serde_json::to_vec(self).expect("events serialise").into()
    }
    fn decode(kind: &str, schema: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        serde_json::from_slice(payload).map_err(|e| DecodeError::BadPayload {
            kind: kind.into(),
            schema,
            reason: e.to_string(),
        })
    }
}

impl Aggregate for Campaign {
    type Command = Command;
    type Event = Event;
    type Error = Refusal;

    fn decide(&self, command: &Command, ctx: &DecideCtx) -> Result<Vec<Event>, Refusal> {
        let exists = ctx.version > 0;
        match command {
            Command::Create { name, budget } if !exists => Ok(vec![Event::Created {
                name: name.clone(),
                budget: *budget,
            }]),
            Command::Create { .. } => Err(Refusal::Exists),
            _ if !exists => Err(Refusal::Missing),
            _ if self.completed => Err(Refusal::Completed),
            Command::SendBatch { batch, .. } if self.batches.contains(batch) => {
                Err(Refusal::BatchTwice(*batch))
            }
            Command::SendBatch { messages, .. } if self.sent + messages > self.budget => {
                Err(Refusal::OverBudget {
                    sent: self.sent,
                    asked: *messages,
                    budget: self.budget,
                })
            }
            Command::SendBatch { batch, messages } => Ok(vec![Event::BatchSent {
                batch: *batch,
                messages: *messages,
            }]),
            Command::Complete => Ok(vec![Event::Completed]),
        }
    }

    fn evolve(&mut self, event: &Event) {
        match event {
            Event::Created { name, budget } => {
                self.name = name.clone();
                self.budget = *budget;
            }
            Event::BatchSent { batch, messages } => {
                self.batches.push(*batch);
                self.sent += messages;
            }
            Event::Completed => self.completed = true,
        }
    }

    fn encode_snapshot(&self) -> Option<Bytes> {
        serde_json::to_vec(self).ok().map(Bytes::from)
    }

    fn decode_snapshot(state: &[u8]) -> Option<Self> {
        serde_json::from_slice(state).ok()
    }
}

fn repository(
    dir: &std::path::Path,
    clock: &ManualClock,
) -> anyhow::Result<(Arc<EmbeddedLog>, Repository<Campaign>)> {
    let log = Arc::new(EmbeddedLog::open(dir.join("log"))?);
    let snapshots = Arc::new(RedbSnapshots::open(dir.join("snapshots.redb"))?);
    let repo = Repository::<Campaign>::new(log.clone(), Arc::new(clock.clone()))
        .with_snapshots(snapshots)
        .with_config({
            let mut built = RepositoryConfig::default();
            built.snapshot_every = 4;
            built
        })?;
    Ok((log, repo))
}

fn main() -> anyhow::Result<()> {
    // The libraries' warnings (a torn tail cut at recovery, a refused
    // job, a failing sender) on stderr; `RUST_LOG` selects more.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/example-campaign"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    // Virtual time: one batch an hour from 2026-01-01.
    let clock = ManualClock::new(1_767_225_600_000);
    let campaign = StreamId::new("campaign-1")?;
    let started = Instant::now();

    rt.block_on(async {
        let (_log, repo) = repository(&dir, &clock)?;
        let create = Command::Create {
            name: "winter sale".into(),
            budget: 100_000,
        };
        repo.execute(&campaign, &create, CommandOptions::default())
            .await?;
        for batch in 0..10u32 {
            clock.advance(3_600_000);
            let cmd = Command::SendBatch {
                batch,
                messages: 10_000,
            };
            let done = repo
                .execute(
                    &campaign,
                    &cmd,
                    CommandOptions::default().with_idempotency_key(format!("send-{batch}")),
                )
                .await?;
            println!("batch {batch}: sent, stream at version {}", done.version);
        }
        // The budget is spent: an eleventh batch is refused, nothing written.
        let over = Command::SendBatch {
            batch: 10,
            messages: 1,
        };
        match repo
            .execute(&campaign, &over, CommandOptions::default())
            .await
        {
            Err(e) => println!("batch 10 refused: {e}"),
            Ok(_) => anyhow::bail!("an over-budget batch was accepted"),
        }
        repo.execute(&campaign, &Command::Complete, CommandOptions::default())
            .await?;
        anyhow::Ok(())
    })?;

    // Everything above is dropped: the log and snapshots are closed. Replay
    // from disk as a fresh process would.
    rt.block_on(async {
        let (log, repo) = repository(&dir, &clock)?;
        let loaded = repo.load(&campaign).await?;
        let events = log.read_stream(&campaign, 1, 1_000).await?;
        println!("\nreplayed {} events from {}:", events.len(), dir.display());
        for e in &events {
            println!(
                "  #{:<2} v{:<2} {:<18} {}",
                e.position,
                e.version,
                e.kind,
                String::from_utf8_lossy(&e.payload)
            );
        }
        let c = loaded.state;
        println!(
            "\ncampaign {:?}: version {}, {} batches, {}/{} messages, completed: {}",
            c.name,
            loaded.version,
            c.batches.len(),
            c.sent,
            c.budget,
            c.completed
        );
        anyhow::ensure!(
            c.sent == 100_000 && c.completed && loaded.version == 12,
            "replay disagrees"
        );
        anyhow::Ok(())
    })?;
    println!("done in {:.1?}", started.elapsed());
    Ok(())
}
