//! [`EmbeddedLog`]: the durable event log on segment files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use tokio::sync::mpsc::{self, Sender};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use smartmsg_engine::index::LogIndex;
use smartmsg_engine::{
    AppendError, AppendResult, AppendTx, BackendError, EventLog, HeadWatch, Limits, ReadError,
    RecordedEvent, StreamId,
};
use tokio::sync::oneshot;

use crate::error::{EmbeddedError, Result};
use crate::frame::{self, BodyReader, StreamCache};
use crate::lock::DirLock;
use crate::recovery::{self, max_body, FrameLoc};
use crate::segment::Segment;
use crate::writer::{Request, Writer};

/// How an [`EmbeddedLog`] is laid out and limited.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EmbeddedConfig {
    /// Size of each segment file (preallocated). Default 64 MiB. A
    /// transaction whose frame does not fit in one segment is refused with
    /// [`smartmsg_engine::LimitError::TransactionTooLarge`].
    pub segment_bytes: u64,
    /// Limits checked on every append and read.
    pub limits: Limits,
    /// Most transactions in one group commit. Default 4,096.
    pub max_batch_txs: usize,
    /// Stop gathering a group commit past this many event bytes. Default 16 MiB.
    pub max_batch_bytes: usize,
    /// Most appends waiting for the writer thread. Default 8,192 (two group
    /// commits). When it is full, `append` waits (asynchronously) for room:
    /// back-pressure instead of a queue that grows with load.
    pub queue_capacity: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            limits: Limits::default(),
            max_batch_txs: 4096,
            max_batch_bytes: 16 << 20,
            queue_capacity: 8_192,
        }
    }
}

impl EmbeddedConfig {
    fn validate(&self) -> Result<()> {
        if self.segment_bytes < 4096 || self.segment_bytes > (1 << 40) {
            return Err(EmbeddedError::Config(format!(
                "segment_bytes {} must be between 4 KiB and 1 TiB",
                self.segment_bytes
            )));
        }
        if self.max_batch_txs == 0 {
            return Err(EmbeddedError::Config(
                "max_batch_txs must be at least 1".into(),
            ));
        }
        if self.queue_capacity == 0 {
            return Err(EmbeddedError::Config(
                "queue_capacity must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Segments and frame locations, shared by the writer and readers.
pub(crate) struct Layout {
    pub(crate) segments: Vec<Arc<Segment>>,
    pub(crate) frames: Vec<FrameLoc>,
}

/// State shared by the writer thread and readers.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) limits: Limits,
    index: RwLock<LogIndex>,
    layout: RwLock<Layout>,
    /// One past the last durable position; readers never look beyond it.
    pub(crate) durable: AtomicU64,
    pub(crate) head_tx: tokio::sync::watch::Sender<u64>,
    pub(crate) poisoned: AtomicBool,
    pub(crate) stats: StatsCounters,
}

/// Counters the writer keeps; see [`LogStats`].
#[derive(Default)]
pub(crate) struct StatsCounters {
    pub(crate) batches: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// What the writer has done since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Group commits (one write call and one `fdatasync` each, plus one more
    /// per segment roll).
    pub batches: u64,
    /// Transactions written (duplicates and rejections excluded).
    pub transactions: u64,
    /// Events written.
    pub events: u64,
    /// Frame bytes written.
    pub bytes: u64,
}

impl LogStats {
    /// Mean transactions per group commit.
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.transactions as f64 / self.batches as f64
        }
    }
}

// Lock helpers: a panic while holding one of these locks cannot leave the
// data half-updated in a way readers could see (they stop at `durable`), so
// poisoning is ignored.
impl Shared {
    pub(crate) fn index_read(&self) -> RwLockReadGuard<'_, LogIndex> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn index_write(&self) -> RwLockWriteGuard<'_, LogIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn layout_read(&self) -> RwLockReadGuard<'_, Layout> {
        self.layout.read().unwrap_or_else(|p| p.into_inner())
    }
    pub(crate) fn layout_write(&self) -> RwLockWriteGuard<'_, Layout> {
        self.layout.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The embedded, durable [`EventLog`].
///
/// One directory of preallocated segment files; one writer thread that
/// group-commits concurrent appends with one `fdatasync` per batch; an
/// in-memory per-stream index rebuilt from the segments on open; recovery
/// that cuts a torn tail and refuses damage with
/// [`EmbeddedError::Corrupt`]. One process owns the directory at a time.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    sender: Mutex<Option<Sender<Request>>>,
    writer: Option<JoinHandle<()>>,
    torn_bytes: u64,
    clean_open: bool,
    _lock: DirLock,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog")
            .field("dir", &self.shared.dir)
            .field("durable", &self.shared.durable.load(Ordering::Relaxed))
            .finish()
    }
}

impl EmbeddedLog {
    /// Opens the log in `dir` with the default configuration, creating the
    /// directory if needed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, EmbeddedConfig::default())
    }

    /// Opens the log in `dir`, creating the directory if needed, recovering
    /// from a crash if one happened.
    pub fn open_with(dir: impl AsRef<Path>, config: EmbeddedConfig) -> Result<Self> {
        Self::open_inner(dir, config, |_| {})
    }

    /// Opens the log like [`EmbeddedLog::open_with`], its segment writes and
    /// syncs going through `faults` (see [`crate::faults`]). Only with the
    /// `fault-injection` feature, for tests.
    #[cfg(feature = "fault-injection")]
    pub fn open_with_faults(
        dir: impl AsRef<Path>,
        config: EmbeddedConfig,
        faults: Arc<crate::faults::FaultyDisk>,
    ) -> Result<Self> {
        Self::open_inner(dir, config, move |w| w.faults = Some(faults))
    }

    fn open_inner(
        dir: impl AsRef<Path>,
        config: EmbeddedConfig,
        adjust: impl FnOnce(&mut Writer),
    ) -> Result<Self> {
        config.validate()?;
        let dir = dir.as_ref().to_owned();
        std::fs::create_dir_all(&dir).map_err(|e| EmbeddedError::io("create", &dir, e))?;
        let lock = DirLock::acquire(&dir)?;
        let mut rec = recovery::recover(&dir, config.segment_bytes)?;
        rec.index.set_key_window(config.limits.idempotency_window);
        let head = rec.index.head();
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            limits: config.limits,
            index: RwLock::new(rec.index),
            layout: RwLock::new(Layout {
                segments: rec.segments.into_iter().map(Arc::new).collect(),
                frames: rec.frames,
            }),
            durable: AtomicU64::new(head),
            head_tx: tokio::sync::watch::channel(head).0,
            poisoned: AtomicBool::new(false),
            stats: StatsCounters::default(),
        });
        let mut writer = Writer::new(
            shared.clone(),
            rec.write_offset,
            rec.next_batch,
            config.segment_bytes,
        );
        writer.max_batch_txs = config.max_batch_txs;
        writer.max_batch_bytes = config.max_batch_bytes;
        adjust(&mut writer);
        let (tx, rx) = mpsc::channel(config.queue_capacity);
        let handle = std::thread::Builder::new()
            .name("smartmsg-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| EmbeddedError::io("spawn writer thread for", &dir, e))?;
        Ok(Self {
            shared,
            sender: Mutex::new(Some(tx)),
            writer: Some(handle),
            torn_bytes: rec.torn_bytes,
            clean_open: rec.clean,
            _lock: lock,
        })
    }

    /// Whether `name` is the name of one of the log's segment files (a
    /// directory holding such files holds a log).
    pub fn is_segment_file_name(name: &str) -> bool {
        crate::segment::parse_segment_name(name).is_some()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of torn tail cut when this log was opened (0 after a clean
    /// shutdown).
    pub fn torn_bytes_recovered(&self) -> u64 {
        self.torn_bytes
    }

    /// Whether the open trusted a clean-shutdown mark and so did not read
    /// the unused end of the last segment (see `clean.rs`).
    pub fn opened_clean(&self) -> bool {
        self.clean_open
    }

    /// What the writer has done since the log was opened.
    pub fn stats(&self) -> LogStats {
        let s = &self.shared.stats;
        LogStats {
            batches: s.batches.load(Ordering::Relaxed),
            transactions: s.transactions.load(Ordering::Relaxed),
            events: s.events.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.layout_read().segments.len()
    }

    /// Streams and their current versions (durable ones only).
    pub fn streams(&self) -> Vec<(StreamId, u64)> {
        let durable = self.shared.durable.load(Ordering::Acquire);
        let index = self.shared.index_read();
        let mut v: Vec<_> = index
            .streams()
            .map(|(s, _)| (s.clone(), index.version_below(s, durable)))
            .filter(|(_, v)| *v > 0)
            .collect();
        v.sort();
        v
    }

    fn durable(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Reads the frames in `locs` (sorted by position) and passes every
    /// event to `keep`, which returns whether to continue.
    fn read_frames(
        &self,
        locs: &[FrameLoc],
        cache: &mut StreamCache,
        mut keep: impl FnMut(RecordedEvent) -> bool,
    ) -> Result<(), ReadError> {
        const RUN_BYTES: u64 = 4 << 20;
        let segments: Vec<Arc<Segment>> = self.shared.layout_read().segments.clone();
        let mut i = 0;
        while i < locs.len() {
            // A run: frames adjacent in one segment, read with one call.
            let first = locs[i];
            let mut j = i + 1;
            let mut end = first.offset + u64::from(first.len);
            while j < locs.len()
                && locs[j].segment == first.segment
                && locs[j].offset == end
                && end - first.offset < RUN_BYTES
            {
                end += u64::from(locs[j].len);
                j += 1;
            }
            let seg = &segments[first.segment as usize];
            let mut buf = BytesMut::zeroed((end - first.offset) as usize);
            seg.read_at(&mut buf, first.offset).map_err(backend_read)?;
            let buf: Bytes = buf.freeze();
            for loc in &locs[i..j] {
                let at = (loc.offset - first.offset) as usize;
                let frame_bytes = &buf[at..at + loc.len as usize];
                let corrupt = |why: String| {
                    backend_read(EmbeddedError::Corrupt {
                        file: seg.path.clone(),
                        offset: loc.offset,
                        reason: why,
                    })
                };
                let range = frame::check_frame(frame_bytes, max_body(seg.capacity))
                    .map_err(|e| corrupt(e.to_string()))?;
                let body = buf.slice(at + range.start..at + range.end);
                let mut reader = BodyReader::new(body).map_err(|e| corrupt(e.to_string()))?;
                while let Some(e) = reader
                    .next_event(cache)
                    .map_err(|e| corrupt(e.to_string()))?
                {
                    if !keep(e) {
                        return Ok(());
                    }
                }
            }
            i = j;
        }
        Ok(())
    }

    fn sender(&self) -> Option<Sender<Request>> {
        self.sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        // Closing the channel stops the writer once it has answered every
        // request already sent.
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

fn backend_read(e: EmbeddedError) -> ReadError {
    ReadError::Backend(BackendError::new(e))
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, tx: AppendTx) -> Result<AppendResult, AppendError> {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return Err(AppendError::Backend(BackendError::new(
                EmbeddedError::Poisoned,
            )));
        }
        // Cheap checks before the writer sees it.
        self.shared.limits.check_tx(&tx)?;
        let sender = self.sender().ok_or(AppendError::Closed)?;
        let (reply, rx) = oneshot::channel();
        sender
            .send(Request { tx, reply })
            .await
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.shared.limits.check_read(max)?;
        let durable = self.durable();
        let positions: Vec<u64> = self
            .shared
            .index_read()
            .positions(stream, from_version, max, durable)
            .to_vec();
        if positions.is_empty() {
            return Ok(Vec::new());
        }
        let mut locs: Vec<FrameLoc> = Vec::new();
        {
            let layout = self.shared.layout_read();
            let frames = &layout.frames;
            let mut cur = 0usize;
            for &p in &positions {
                if locs.last().is_some_and(|l| p < l.end_position()) {
                    continue;
                }
                cur += frames[cur..].partition_point(|f| f.end_position() <= p);
                locs.push(frames[cur]);
            }
        }
        let mut out = Vec::with_capacity(positions.len());
        let mut want = positions.iter().peekable();
        let mut cache = StreamCache::with(stream.clone());
        self.read_frames(&locs, &mut cache, |e| {
            if want.peek() == Some(&&e.position) {
                want.next();
                out.push(e);
            }
            want.peek().is_some()
        })?;
        Ok(out)
    }

    async fn read_all(
        &self,
        from_position: u64,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.shared.limits.check_read(max)?;
        let durable = self.durable();
        let end = durable.min(from_position.saturating_add(max as u64));
        if from_position >= end {
            return Ok(Vec::new());
        }
        let locs: Vec<FrameLoc> = {
            let layout = self.shared.layout_read();
            let frames = &layout.frames;
            let a = frames.partition_point(|f| f.end_position() <= from_position);
            let b = frames.partition_point(|f| f.first_position < end);
            frames[a..b].to_vec()
        };
        let mut out = Vec::with_capacity((end - from_position) as usize);
        let mut cache = StreamCache::default();
        self.read_frames(&locs, &mut cache, |e| {
            if e.position >= end {
                return false;
            }
            if e.position >= from_position {
                out.push(e);
            }
            true
        })?;
        Ok(out)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        let durable = self.durable();
        Ok(self.shared.index_read().version_below(stream, durable))
    }

    async fn head(&self) -> Result<u64, ReadError> {
        Ok(self.durable())
    }

    fn watch_head(&self) -> HeadWatch {
        HeadWatch::new(self.shared.head_tx.subscribe())
    }

    fn limits(&self) -> Limits {
        self.shared.limits
    }

    fn counters(&self) -> Option<smartmsg_engine::LogCounters> {
        let s = self.stats();
        Some(smartmsg_engine::LogCounters {
            appends: s.transactions,
            events: s.events,
            bytes: s.bytes,
            syncs: s.batches,
        })
    }
}
