//! `smartmsg inspect`: what an embedded data directory holds — streams and
//! their versions, the log head, the campaign's state, pending batch jobs
//! and dead letters (of the delay queue and of the reaction path).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use smartmsg_domain::Campaign;
use smartmsg_embedded::{
    EmbeddedDelayQueue, EmbeddedLog, RedbSnapshots, RedbStore, RedbStoreConfig,
};
use smartmsg_engine::{Aggregate, DelayQueue, EventLog, StreamId};

use smartmsg_domain::reactions::DeadLetter;
use smartmsg_engine::stream::{envelope, Json, StateCodec};
use smartmsg_service::ingest::{Unrouted, UNROUTED_KIND};

use crate::error::SimError;

/// What one run's directory holds.
#[derive(Debug, Clone, Default)]
pub struct RunInspection {
    /// The directory.
    pub dir: PathBuf,
    /// One past the last log position.
    pub head: u64,
    /// Streams and versions.
    pub streams: Vec<(String, u64)>,
    /// The campaign's status, batches planned / sent, messages sent,
    /// reactions recorded.
    pub campaign: Option<String>,
    /// Jobs pending or leased in the on-disk queue (`None` without one).
    pub pending_jobs: Option<u64>,
    /// When the next job is due.
    pub next_due_ms: Option<u64>,
    /// The queue's dead letters (id and reason).
    pub queue_dead_letters: Vec<String>,
    /// Reaction dead letters: how many.
    pub reaction_dead_letters: u64,
    /// The first few (where and why).
    pub reaction_dead_letter_samples: Vec<String>,
    /// The redb files found and verified page by page (snapshots, state
    /// store; the queue's is verified when it is opened).
    pub verified_files: Vec<String>,
}

fn runs_in(dir: &Path) -> Result<Vec<PathBuf>, SimError> {
    if dir.join("log").is_dir() {
        return Ok(vec![dir.to_owned()]);
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| SimError::Io {
        op: "read",
        path: dir.to_owned(),
        source,
    })?;
    for e in entries.flatten() {
        let p = e.path();
        if p.join("log").is_dir() {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(SimError::DataDir {
            path: dir.to_owned(),
            reason: "holds no event log (expected DIR/log or DIR/<run>/log)".into(),
        });
    }
    Ok(out)
}

/// Inspects `dir`: a run's directory, or a simulation's root with one
/// directory per policy. Opens the stores, so no simulation may be using
/// them.
pub fn inspect(dir: &Path) -> Result<Vec<RunInspection>, SimError> {
    let rt = crate::sim::local_runtime(dir)?;
    runs_in(dir)?
        .into_iter()
        .map(|d| rt.block_on(inspect_run(&d)))
        .collect()
}

async fn inspect_run(dir: &Path) -> Result<RunInspection, SimError> {
    let log = EmbeddedLog::open(dir.join("log"))?;
    let mut r = RunInspection {
        dir: dir.to_owned(),
        head: log.head().await?,
        streams: log
            .streams()
            .into_iter()
            .map(|(s, v)| (s.as_str().to_owned(), v))
            .collect(),
        ..RunInspection::default()
    };
    for (name, _) in r.streams.clone() {
        let stream = StreamId::new(&name)?;
        if name.starts_with("campaign-") {
            let mut c = Campaign::default();
            let mut v = 1;
            loop {
                let batch = log.read_stream(&stream, v, 1_000).await?;
                let Some(last) = batch.last() else { break };
                v = last.version + 1;
                for e in &batch {
                    c.evolve(&crate::sim::campaign_event(e)?);
                }
            }
            let reactions: u64 = c.creative_stats().iter().map(|s| s.reactions).sum();
            r.campaign = Some(format!(
                "{name}: {}, {} batches planned ({} sent), {} messages sent, {} reactions recorded, budget left {}",
                c.status().map_or("not created".into(), |s| s.to_string()),
                c.batches().len(),
                c.batches().iter().filter(|b| b.sent).count(),
                c.sent(),
                reactions,
                c.remaining_budget()
            ));
        }
        if name.starts_with("reaction-dead-letters-") || name == smartmsg_service::streams::UNROUTED
        {
            let mut v = 1;
            loop {
                let batch = log.read_stream(&stream, v, 1_000).await?;
                let Some(last) = batch.last() else { break };
                v = last.version + 1;
                for e in &batch {
                    r.reaction_dead_letters += 1;
                    if r.reaction_dead_letter_samples.len() >= 10 {
                        continue;
                    }
                    let sample = if e.kind == UNROUTED_KIND {
                        serde_json::from_slice::<Unrouted>(&e.payload)
                            .ok()
                            .map(|u| {
                                format!(
                                    "unrouted ({}): {}",
                                    u.origin.as_deref().unwrap_or("inbox"),
                                    u.reason
                                )
                            })
                    } else {
                        envelope::decode(&e.payload)
                            .and_then(|(_, v)| Json::<DeadLetter>::decode(&v).ok())
                            .map(|Json(d)| format!("{name} version {}: {}", e.version, d.reason))
                    };
                    r.reaction_dead_letter_samples
                        .push(sample.unwrap_or_else(|| {
                            format!("{name} version {}: unreadable", e.version)
                        }));
                }
            }
        }
    }
    // Verify every page of the other redb files: damage is a typed error
    // naming the file (and a non-zero exit), never a panic.
    let snapshots = dir.join("snapshots.redb");
    if snapshots.is_file() {
        drop(RedbSnapshots::open(&snapshots)?);
        r.verified_files.push("snapshots.redb".into());
    }
    let state = dir.join("state.redb");
    if state.is_file() {
        let verified = {
            let mut built = RedbStoreConfig::default();
            built.verify_on_open = true;
            built
        };
        drop(RedbStore::open_with(&state, verified)?);
        r.verified_files.push("state.redb".into());
    }
    let qdir = dir.join("queue");
    if qdir.is_dir() {
        let q = EmbeddedDelayQueue::open(&qdir)?;
        r.pending_jobs = Some(q.len().await?);
        r.next_due_ms = q.next_due().await?;
        r.queue_dead_letters = q
            .dead_letters(20)
            .await?
            .into_iter()
            .map(|d| {
                format!(
                    "{} after {} attempts: {}",
                    d.id.map_or("(unreadable)".into(), |i| i.to_string()),
                    d.attempts,
                    d.reason
                )
            })
            .collect();
    }
    Ok(r)
}

/// The inspection as text.
pub fn render(runs: &[RunInspection]) -> String {
    let mut s = String::new();
    for r in runs {
        let _ = writeln!(s, "{}", r.dir.display());
        let _ = writeln!(s, "  log head: {} events", r.head);
        for (name, v) in &r.streams {
            let _ = writeln!(s, "  stream {name}: version {v}");
        }
        if let Some(c) = &r.campaign {
            let _ = writeln!(s, "  campaign {c}");
        }
        match r.pending_jobs {
            Some(n) => {
                let due = r
                    .next_due_ms
                    .map_or("none".into(), |t| format!("next due at {t} ms"));
                let _ = writeln!(s, "  delay queue: {n} pending jobs ({due})");
            }
            None => {
                let _ = writeln!(s, "  delay queue: none on disk (in-memory run)");
            }
        }
        let _ = writeln!(
            s,
            "  delay-queue dead letters: {}",
            r.queue_dead_letters.len()
        );
        for d in &r.queue_dead_letters {
            let _ = writeln!(s, "    {d}");
        }
        if !r.verified_files.is_empty() {
            let _ = writeln!(s, "  verified: {}", r.verified_files.join(", "));
        }
        let _ = writeln!(s, "  reaction dead letters: {}", r.reaction_dead_letters);
        for d in &r.reaction_dead_letter_samples {
            let _ = writeln!(s, "    {d}");
        }
    }
    s
}
