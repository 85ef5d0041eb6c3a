//! The single writer: group commit.
//!
//! Appends arrive on a channel. The writer thread takes every request that
//! is waiting (up to a batch limit), checks each against the index, encodes
//! the accepted ones into one buffer, writes it with one call, makes it
//! durable with one `fdatasync`, then publishes the new head and answers
//! every request of the batch. No append is answered before its batch is
//! durable — not even a rejection or an idempotent duplicate, since either
//! may depend on a transaction earlier in the same batch.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc::{error::TryRecvError, Receiver};

use smartmsg_engine::index::Verdict;
use smartmsg_engine::{AppendError, AppendResult, AppendTx, BackendError, LimitError};
use tokio::sync::oneshot;

use crate::clean::{self, CleanMark};
use crate::error::EmbeddedError;
use crate::frame;
use crate::log::Shared;
use crate::recovery::{max_body, FrameLoc};
use crate::segment::{self, SEGMENT_HEADER};

/// One append waiting for its batch.
pub struct Request {
    /// The transaction.
    pub tx: AppendTx,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<AppendResult, AppendError>>,
}

/// Writer-owned state.
pub struct Writer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) write_offset: u64,
    pub(crate) next_batch: u64,
    pub(crate) max_batch_txs: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) segment_bytes: u64,
    /// Whether a clean-shutdown mark may still be on disk (removed, durably,
    /// before the first write; see [`crate::clean`]).
    pub(crate) clean_mark: bool,
    buf: Vec<u8>,
    /// The fault-injecting layer under the segment files, in tests.
    #[cfg(feature = "fault-injection")]
    pub(crate) faults: Option<Arc<crate::faults::FaultyDisk>>,
}

type Reply = (
    oneshot::Sender<Result<AppendResult, AppendError>>,
    Result<AppendResult, AppendError>,
);

impl Writer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        write_offset: u64,
        next_batch: u64,
        segment_bytes: u64,
    ) -> Self {
        Self {
            shared,
            write_offset,
            next_batch,
            max_batch_txs: 4096,
            max_batch_bytes: 16 << 20,
            segment_bytes,
            clean_mark: true,
            buf: Vec::with_capacity(1 << 20),
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }

    /// Runs until every sender is gone.
    pub fn run(mut self, mut rx: Receiver<Request>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            let mut bytes = 0usize;
            while batch.len() < self.max_batch_txs && bytes < self.max_batch_bytes {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes +=
                            r.tx.streams
                                .iter()
                                .flat_map(|s| &s.events)
                                .map(|e| e.size())
                                .sum::<usize>();
                        batch.push(r);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            let replies = self.commit(&mut batch);
            for (tx, result) in replies {
                // The caller may have given up waiting; nothing to do then.
                let _ = tx.send(result);
            }
        }
        self.leave_clean_mark();
    }

    /// After the last batch: everything is durable and nothing more will be
    /// written, so the next open may skip the tail check.
    fn leave_clean_mark(&mut self) {
        if self.shared.poisoned.load(Ordering::Acquire) {
            return;
        }
        #[cfg(feature = "fault-injection")]
        if self.faults.as_ref().is_some_and(|f| f.is_off()) {
            return;
        }
        // Written even when nothing was (the open may have checked the whole
        // log because a stale mark did not match): the rename replaces it.
        let mark = CleanMark {
            segment_first: self
                .shared
                .layout_read()
                .segments
                .last()
                .map_or(0, |s| s.first_position),
            end: self.write_offset,
            head: self.shared.durable.load(Ordering::Acquire),
            next_batch: self.next_batch,
        };
        if let Err(e) = clean::write(&self.shared.dir, &mark) {
            tracing::warn!(error = %e, "could not leave a clean-shutdown mark; the next open checks the whole log");
        }
    }

    fn commit(&mut self, batch: &mut Vec<Request>) -> Vec<Reply> {
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        if self.shared.poisoned.load(Ordering::Acquire) {
            for r in batch.drain(..) {
                replies.push((r.reply, Err(poisoned())));
            }
            return replies;
        }
        if self.clean_mark {
            if let Err(e) = clean::remove(&self.shared.dir) {
                for r in batch.drain(..) {
                    replies.push((r.reply, Err(backend(&e))));
                }
                return replies;
            }
            self.clean_mark = false;
        }
        let limits = self.shared.limits;
        let batch_no = self.next_batch;
        let durable = self.shared.durable.load(Ordering::Acquire);
        self.buf.clear();
        let mut buf_offset = self.write_offset; // where buf[0] goes
        let mut wrote_any = false;
        let mut tx_written = 0u64;
        let mut failure: Option<EmbeddedError> = None;
        {
            let shared = self.shared.clone();
            let mut index = shared.index_write();
            for req in batch.drain(..) {
                let result = match index.check(&req.tx, &limits) {
                    Err(e) => {
                        replies.push((req.reply, Err(e)));
                        continue;
                    }
                    Ok(Verdict::Duplicate(r)) => {
                        replies.push((req.reply, Ok(r)));
                        continue;
                    }
                    Ok(Verdict::Write(r)) => r,
                };
                let start = self.buf.len();
                let len = frame::encode(&mut self.buf, batch_no, &req.tx, &result);
                if len - frame::HEADER_LEN > max_body(self.segment_bytes) {
                    self.buf.truncate(start);
                    let size = req
                        .tx
                        .streams
                        .iter()
                        .flat_map(|s| &s.events)
                        .map(|e| e.size())
                        .sum();
                    replies.push((
                        req.reply,
                        Err(LimitError::TransactionTooLarge {
                            size,
                            max: max_body(self.segment_bytes),
                        }
                        .into()),
                    ));
                    continue;
                }
                if buf_offset + self.buf.len() as u64 > self.segment_bytes {
                    // Roll: make what precedes this frame durable in the
                    // current segment, then start a new one.
                    if let Err(e) = self.roll(start, &mut buf_offset, result.first_position) {
                        self.buf.truncate(start);
                        replies.push((req.reply, Err(backend(&e))));
                        failure = Some(e);
                        break;
                    }
                }
                let frame_offset = buf_offset + (self.buf.len() - len) as u64;
                index.apply_tx(&req.tx, &result);
                let mut layout = self.shared.layout_write();
                let segment = (layout.segments.len() - 1) as u32;
                layout.frames.push(FrameLoc {
                    first_position: result.first_position,
                    segment,
                    offset: frame_offset,
                    len: len as u32,
                    count: req.tx.event_count() as u32,
                });
                drop(layout);
                wrote_any = true;
                tx_written += 1;
                replies.push((req.reply, Ok(result)));
            }
            if failure.is_some() {
                // Requests not reached in this batch.
                for r in batch.drain(..) {
                    replies.push((r.reply, Err(poisoned())));
                }
            }
        }
        if failure.is_none() && !self.buf.is_empty() {
            if let Err(e) = self.write_and_sync(buf_offset) {
                failure = Some(e);
            }
        }
        if let Some(e) = failure {
            tracing::error!(error = %e, "log write failed; the log is poisoned until reopened");
            self.shared.poisoned.store(true, Ordering::Release);
            self.shared.index_write().truncate(durable);
            self.shared
                .layout_write()
                .frames
                .retain(|f| f.first_position < durable);
            let err = backend(&e);
            for (_, r) in replies.iter_mut() {
                if r.is_ok() {
                    *r = Err(err.clone());
                }
            }
            return replies;
        }
        if wrote_any {
            let stats = &self.shared.stats;
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes
                .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            stats.transactions.fetch_add(tx_written, Ordering::Relaxed);
            let head = {
                // Durable: keys out of the window can go for good.
                let mut index = self.shared.index_write();
                index.forget_expired_keys();
                index.head()
            };
            stats.events.fetch_add(head - durable, Ordering::Relaxed);
            self.write_offset = buf_offset + self.buf.len() as u64;
            self.next_batch += 1;
            self.shared.durable.store(head, Ordering::Release);
            self.shared.head_tx.send_replace(head);
        }
        replies
    }

    fn write_and_sync(&self, offset: u64) -> Result<(), EmbeddedError> {
        let layout = self.shared.layout_read();
        let seg = layout.segments.last().expect("a log always has a segment");
        self.write_at(seg, offset)
            .map_err(|e| EmbeddedError::io("write", &seg.path, e))?;
        self.sync(seg)
            .map_err(|e| EmbeddedError::io("fdatasync", &seg.path, e))
    }

    fn write_at(&self, seg: &segment::Segment, offset: u64) -> std::io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &self.faults {
            return f.write_at(&seg.file, &seg.path, &self.buf, offset);
        }
        seg.file.write_all_at(&self.buf, offset)
    }

    fn sync(&self, seg: &segment::Segment) -> std::io::Result<()> {
        #[cfg(feature = "fault-injection")]
        if let Some(f) = &self.faults {
            return f.sync_data(&seg.file, &seg.path);
        }
        seg.file.sync_data()
    }

    /// Writes `buf[..split]` to the current segment and syncs it, creates the
    /// segment starting at `first_position`, and keeps `buf[split..]` as the
    /// start of what goes there.
    fn roll(
        &mut self,
        split: usize,
        buf_offset: &mut u64,
        first_position: u64,
    ) -> Result<(), EmbeddedError> {
        if split > 0 {
            let tail = self.buf.split_off(split);
            self.write_and_sync(*buf_offset)?;
            self.buf = tail;
        }
        let seg = segment::create(&self.shared.dir, first_position, self.segment_bytes)?;
        self.shared.layout_write().segments.push(Arc::new(seg));
        *buf_offset = SEGMENT_HEADER;
        Ok(())
    }
}

fn backend(e: &EmbeddedError) -> AppendError {
    // io::Error is not Clone: carry its text and kind into every reply.
    let copy = match e {
        EmbeddedError::Io { op, path, source } => EmbeddedError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => EmbeddedError::Config(other.to_string()),
    };
    AppendError::Backend(BackendError::new(copy))
}

fn poisoned() -> AppendError {
    AppendError::Backend(BackendError::new(EmbeddedError::Poisoned))
}
