//! [`RedbSnapshots`]: the latest snapshot per stream, in a redb database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use smartmsg_engine::{BackendError, Snapshot, SnapshotError, SnapshotStore, StreamId};

use crate::error::EmbeddedError;
use crate::storage::{contained, off_thread, open_db, redb_error};

/// stream id → (version, schema, state).
const SNAPSHOTS: TableDefinition<&str, (u64, u16, &[u8])> = TableDefinition::new("snapshots");

/// A [`SnapshotStore`] in a redb file. Every save is one durable redb write
/// transaction.
#[derive(Clone)]
pub struct RedbSnapshots {
    db: Arc<redb::Database>,
    path: PathBuf,
    max_bytes: usize,
}

impl std::fmt::Debug for RedbSnapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbSnapshots")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbSnapshots {
    /// Largest snapshot accepted by default: 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

    /// Opens (or creates) the database file at `path`, verifying every page
    /// (the file is small: the latest snapshot of each stream).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, EmbeddedError> {
        let path = path.as_ref().to_owned();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| EmbeddedError::io("create", parent, e))?;
            }
        }
        let db = open_db(&path, 16 << 20, true)?;
        // Create the table so reads of an empty store need no special case.
        contained(&path, || -> Result<(), EmbeddedError> {
            let tx = db.begin_write().map_err(|e| redb_error(&path, e))?;
            tx.open_table(SNAPSHOTS).map_err(|e| redb_error(&path, e))?;
            tx.commit().map_err(|e| redb_error(&path, e))
        })??;
        Ok(Self {
            db: Arc::new(db),
            path,
            max_bytes: Self::DEFAULT_MAX_BYTES,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> SnapshotError {
        SnapshotError::Backend(BackendError::new(redb_error(&self.path, e)))
    }
}

impl RedbSnapshots {
    fn save_now(&self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            let newer_kept = table
                .get(snapshot.stream.as_str())
                .map_err(|e| self.err(e))?
                .is_some_and(|old| old.value().0 > snapshot.version);
            if !newer_kept {
                table
                    .insert(
                        snapshot.stream.as_str(),
                        (snapshot.version, snapshot.schema, &snapshot.state[..]),
                    )
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn load_now(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        let found = table.get(stream.as_str()).map_err(|e| self.err(e))?;
        Ok(found.map(|v| {
            let (version, schema, state) = v.value();
            Snapshot {
                stream: stream.clone(),
                version,
                schema,
                state: Bytes::copy_from_slice(state),
            }
        }))
    }

    fn delete_now(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
            table.remove(stream.as_str()).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Runs `f` on a clone of this handle off the async threads, with the
    /// storage library's panics contained.
    async fn off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Self) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let me = self.clone();
        off_thread(self.path.clone(), move || f(&me))
            .await
            .map_err(|e| SnapshotError::Backend(BackendError::new(e)))?
    }
}

#[async_trait]
impl SnapshotStore for RedbSnapshots {
    async fn save(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        if snapshot.state.len() > self.max_bytes {
            return Err(SnapshotError::TooLarge {
                size: snapshot.state.len(),
                max: self.max_bytes,
            });
        }
        self.off_thread(move |me| me.save_now(&snapshot)).await
    }

    async fn load(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let stream = stream.clone();
        self.off_thread(move |me| me.load_now(&stream)).await
    }

    async fn delete(&self, stream: &StreamId) -> Result<(), SnapshotError> {
        let stream = stream.clone();
        self.off_thread(move |me| me.delete_now(&stream)).await
    }
}
