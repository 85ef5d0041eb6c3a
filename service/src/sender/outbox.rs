//! [`OutboxSender`]: one JSON Lines file per batch in a directory.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use smartmsg_domain::OutgoingBatch;

use super::{write_json_lines, SendError, Sender};

/// Writes each batch to `<dir>/<campaign>/batch-<n>.jsonl`, one
/// [`super::MessageRecord`] per line, atomically: the file is written under
/// a temporary name, made durable (`fsync`), renamed into place and the
/// directory synced. A reader never sees a partial batch; a batch written
/// again (after a crash) replaces the file with the same bytes.
///
/// The acknowledgement is the durable rename: whoever consumes the outbox
/// (a mailer, a bot) picks files up and deletes or moves them.
#[derive(Debug, Clone)]
pub struct OutboxSender {
    dir: PathBuf,
}

impl OutboxSender {
    /// An outbox in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file batch `batch` of `campaign` is written to.
    pub fn path_of(&self, campaign: &str, batch: u32) -> PathBuf {
        self.dir.join(campaign).join(format!("batch-{batch}.jsonl"))
    }

    fn write(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            // The new campaign directory's entry must be durable too.
            if let Some(parent) = dir.parent() {
                std::fs::File::open(parent)?.sync_all()?;
            }
        }
        let tmp = path.with_extension("jsonl.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    }
}

#[async_trait]
impl Sender for OutboxSender {
    fn name(&self) -> &str {
        "outbox"
    }

    async fn send(&self, batch: &OutgoingBatch) -> Result<(), SendError> {
        // The campaign names a directory inside the outbox: one plain path
        // component ("..", "a/b" or "" would write elsewhere).
        let plain = matches!(
            Path::new(&batch.campaign).components().collect::<Vec<_>>()[..],
            [Component::Normal(c)] if c.to_str() == Some(batch.campaign.as_str())
        );
        if !plain {
            return Err(SendError::Rejected {
                batch: batch.key(),
                reason: format!("campaign {:?} is not a plain file name", batch.campaign),
            });
        }
        let mut bytes = Vec::new();
        write_json_lines(batch, &mut bytes);
        let dir = self.dir.join(&batch.campaign);
        let path = self.path_of(&batch.campaign, batch.batch);
        let key = batch.key();
        // File writes and fsync block: off the async threads.
        tokio::task::spawn_blocking(move || Self::write(&dir, &path, &bytes))
            .await
            .map_err(|e| SendError::Unavailable {
                batch: key.clone(),
                reason: format!("writer task failed: {e}"),
            })?
            .map_err(|e| SendError::Unavailable {
                batch: key,
                reason: e.to_string(),
            })
    }
}
