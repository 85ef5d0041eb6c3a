//! The boundary around redb, the storage library of the snapshots, the
//! delay queue and the stream state store.
//!
//! - [`open_db`] opens a file, tells the user (a `tracing` warning) when redb
//!   had to repair it after an unclean shutdown, and, when asked, verifies
//!   every page first so that damage made outside redb (a flipped byte, a
//!   truncated copy) is a typed error instead of a panic later.
//! - [`contained`] runs a closure that touches a redb file and turns a panic
//!   inside the library (redb may panic on a page it cannot make sense of)
//!   into [`EmbeddedError::StoragePanicked`] naming the file.
//! - [`off_thread`] does the same on tokio's blocking pool, so that a commit
//!   and its `fsync` never run on an async worker thread (a timer task on a
//!   current-thread runtime keeps running while they do). Outside a tokio
//!   runtime it runs the closure in place.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::EmbeddedError;

/// Opens (or creates) the redb file at `path` with `cache_bytes` of page
/// cache. `verify` checks every page's checksum during the open (redb's
/// integrity check): slower, proportional to the file's size, and the only
/// way to find damage in a file that was shut down cleanly. After an unclean
/// shutdown redb repairs (and so verifies) the file whatever `verify` says;
/// a warning names the file.
pub(crate) fn open_db(
    path: &Path,
    cache_bytes: usize,
    verify: bool,
) -> Result<redb::Database, EmbeddedError> {
    let repaired = Arc::new(AtomicBool::new(false));
    let seen = repaired.clone();
    let db = contained(path, || {
        let mut builder = redb::Database::builder();
        builder
            .set_cache_size(cache_bytes)
            .set_check_integrity_on_open(verify)
            .set_repair_callback(move |_| seen.store(true, Ordering::Relaxed));
        builder.create(path)
    })?
    .map_err(|e| redb_error(path, e))?;
    if repaired.load(Ordering::Relaxed) && !verify {
        tracing::warn!(
            path = %path.display(),
            "redb file was not shut down cleanly: repaired and verified"
        );
    }
    Ok(db)
}

/// The typed error for a redb failure on `path`.
pub(crate) fn redb_error(path: &Path, e: impl std::fmt::Display) -> EmbeddedError {
    EmbeddedError::Redb {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Runs `f`, turning a panic inside it into
/// [`EmbeddedError::StoragePanicked`] naming `path`.
pub(crate) fn contained<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T, EmbeddedError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| panicked(path, p.as_ref()))
}

/// Runs `f` on tokio's blocking pool (in place outside a runtime), with
/// panics contained as in [`contained`].
pub(crate) async fn off_thread<T, F>(path: PathBuf, f: F) -> Result<T, EmbeddedError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            let p = path.clone();
            match handle.spawn_blocking(move || contained(&p, f)).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(panicked(&path, e.into_panic().as_ref())),
                Err(_) => Err(EmbeddedError::StoragePanicked {
                    path,
                    message: "the blocking task was cancelled (runtime shutting down)".into(),
                }),
            }
        }
        Err(_) => contained(&path, f),
    }
}

fn panicked(path: &Path, payload: &(dyn Any + Send)) -> EmbeddedError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    tracing::error!(path = %path.display(), %message, "the storage library panicked");
    EmbeddedError::StoragePanicked {
        path: path.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_the_file() {
        let e = contained(Path::new("/x/queue.redb"), || -> u8 {
            panic!("entered unreachable code")
        })
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("/x/queue.redb"), "{text}");
        assert!(text.contains("entered unreachable code"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn off_thread_runs_elsewhere_and_contains_panics() {
        let here = std::thread::current().id();
        let there = off_thread(PathBuf::from("f"), move || std::thread::current().id())
            .await
            .unwrap();
        assert_ne!(here, there);
        let e = off_thread(PathBuf::from("f.redb"), || -> u8 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(matches!(e, EmbeddedError::StoragePanicked { .. }), "{e}");
    }
}
