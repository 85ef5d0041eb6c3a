//! Reactions in: sources, routing to campaigns, and the in-process inbox.
//!
//! Every reaction message enters the log before anything counts it: it is
//! appended to its campaign's pipeline stream (`pipeline-<campaign>`),
//! found by the message's `campaign` field. A message that names no
//! campaign of the runtime, is not JSON or is too large goes to the
//! `reactions-unrouted` stream with the reason ([`Unrouted`]); nothing is
//! dropped silently.
//!
//! - [`ReactionInbox`]: the in-process handle (the HTTP service uses it):
//!   a submission is acknowledged once it is durable in the log.
//! - [`ReactionSource`]: a pull source with a cursor (a Kafka topic, a
//!   JSON Lines file or directory: [`JsonLinesSource`], the simulator's
//!   world). The runtime polls it and appends what it got *and the new
//!   cursor* in one transaction ([`ingest_once`]), so a restart resumes
//!   exactly after the last message it took: each message enters the log
//!   once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smartmsg_domain::reactions::{DEAD_LETTER_EXCERPT, MAX_MESSAGE_BYTES};
use smartmsg_engine::{AppendTx, Clock, EventLog, ExpectedVersion, NewEvent, StreamId};

use crate::error::RuntimeError;
use crate::pipeline::reaction_event;
use crate::streams::UNROUTED;

/// Kind of an unrouted message's event.
pub const UNROUTED_KIND: &str = "ReactionUnrouted";
/// Kind of a source's cursor event.
pub const CURSOR_KIND: &str = "SourceCursor";
/// Most messages one poll of a source may return (so that one poll fits
/// one transaction of the log's default limits).
pub const MAX_POLL: usize = 400;

/// A message that could not be routed to a campaign, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unrouted {
    /// Why.
    pub reason: String,
    /// The start of the message (lossy UTF-8).
    pub excerpt: String,
    /// Where it came from, if known.
    pub origin: Option<String>,
    /// When it arrived.
    pub arrival_ms: u64,
}

/// The campaigns a runtime runs: campaign id → pipeline stream.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<RwLock<HashMap<String, StreamId>>>);

impl Routes {
    /// Adds a campaign.
    pub fn insert(&self, campaign: &str, pipeline: StreamId) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(campaign.to_owned(), pipeline);
    }

    /// Where a message goes: its campaign's pipeline stream, or why not.
    pub fn route(&self, payload: &[u8]) -> Result<(String, StreamId), String> {
        let c = campaign_of(payload)?;
        let g = self.0.read().unwrap_or_else(|e| e.into_inner());
        match g.get(&c) {
            Some(s) => Ok((c, s.clone())),
            None => Err(format!(
                "unknown campaign {:?}",
                c.chars().take(64).collect::<String>()
            )),
        }
    }
}

/// The campaign a reaction message names (its `"campaign"` field), or why
/// it names none: larger than [`MAX_MESSAGE_BYTES`], not a JSON object, no
/// such field.
pub fn campaign_of(payload: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        campaign: Option<Cow<'a, str>>,
    }
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message is {} bytes; the limit is {MAX_MESSAGE_BYTES}",
            payload.len()
        ));
    }
    let p: Probe<'_> =
        serde_json::from_slice(payload).map_err(|e| format!("not a JSON object: {e}"))?;
    Ok(p.campaign.ok_or("no \"campaign\" field")?.into_owned())
}

fn excerpt(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(DEAD_LETTER_EXCERPT)]).into_owned()
}

fn unrouted_event(payload: &[u8], reason: String, origin: Option<String>, now_ms: u64) -> NewEvent {
    let u = Unrouted {
        reason,
        excerpt: excerpt(payload),
        origin,
        arrival_ms: now_ms,
    };
    NewEvent::new(
        UNROUTED_KIND,
        1,
        now_ms,
        serde_json::to_vec(&u).unwrap_or_default(),
    )
}

/// Adds `payload` to `tx`: to its campaign's pipeline stream, or as an
/// unrouted dead letter. Returns the campaign, or the reason.
fn add(
    tx: &mut AppendTx,
    routes: &Routes,
    payload: Bytes,
    arrival_ms: u64,
    origin: Option<String>,
) -> Result<String, String> {
    let unrouted = StreamId::new(UNROUTED).unwrap_or_else(|_| unreachable!());
    let (stream, event, out) = match routes.route(&payload) {
        Ok((campaign, stream)) => (
            stream,
            reaction_event(payload, arrival_ms, origin),
            Ok(campaign),
        ),
        Err(reason) => (
            unrouted,
            unrouted_event(&payload, reason.clone(), origin, arrival_ms),
            Err(reason),
        ),
    };
    match tx.streams.iter_mut().find(|s| s.stream == stream) {
        Some(s) => s.events.push(event),
        None => *tx = std::mem::take(tx).with_stream(stream, ExpectedVersion::Any, vec![event]),
    }
    out
}

/// What became of a submitted reaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Durable in its campaign's pipeline stream; the pipeline validates it
    /// (and may still dead-letter it, with the reason, in the campaign's
    /// dead-letter stream).
    Accepted {
        /// The campaign.
        campaign: String,
    },
    /// Durable as an unrouted dead letter.
    Unrouted {
        /// Why.
        reason: String,
    },
}

/// The in-process way in for reactions (see the [module docs](self)).
/// Cheap to clone.
#[derive(Clone)]
pub struct ReactionInbox {
    log: Arc<dyn EventLog>,
    routes: Routes,
    clock: Arc<dyn Clock>,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for ReactionInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactionInbox").finish_non_exhaustive()
    }
}

impl ReactionInbox {
    pub(crate) fn new(
        log: Arc<dyn EventLog>,
        routes: Routes,
        clock: Arc<dyn Clock>,
        wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            log,
            routes,
            clock,
            wake,
        }
    }

    /// Submits one reaction message (JSON bytes); returns once it is
    /// durable.
    pub async fn submit(&self, payload: impl Into<Bytes>) -> Result<Submitted, RuntimeError> {
        Ok(self
            .submit_many(vec![payload.into()])
            .await?
            .pop()
            .unwrap_or(Submitted::Unrouted {
                reason: "nothing submitted".into(),
            }))
    }

    /// Submits many reaction messages; returns what became of each, in
    /// order, once all are durable. Each chunk of [`MAX_POLL`] messages is
    /// one atomic append; on an error, the chunks before it are durable and
    /// the rest are not (submitting them again is safe: the pipeline counts
    /// each user once).
    pub async fn submit_many(&self, payloads: Vec<Bytes>) -> Result<Vec<Submitted>, RuntimeError> {
        let mut out = Vec::with_capacity(payloads.len());
        let now = self.clock.now_ms();
        for chunk in payloads.chunks(MAX_POLL) {
            let mut tx = AppendTx::default();
            for p in chunk {
                out.push(match add(&mut tx, &self.routes, p.clone(), now, None) {
                    Ok(campaign) => Submitted::Accepted { campaign },
                    Err(reason) => Submitted::Unrouted { reason },
                });
            }
            if !tx.streams.is_empty() {
                self.log.append(tx).await?;
            }
        }
        self.wake.notify_one();
        Ok(out)
    }
}

/// One message a source returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The message.
    pub payload: Bytes,
    /// When it arrived, if the source knows (else the runtime's now).
    pub arrival_ms: Option<u64>,
    /// Where it is in the source (`<offset>`, for the origin
    /// `<source>@<offset>`).
    pub offset: Option<u64>,
}

/// What one poll returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Polled {
    /// The messages, in source order.
    pub messages: Vec<Incoming>,
    /// The cursor after them (passed to the next poll).
    pub cursor: Vec<u8>,
}

/// A source of reaction messages with a resumable cursor. See the [module
/// docs](self).
#[async_trait]
pub trait ReactionSource: Send {
    /// Its name (1 to 40 letters, digits, `-_.`): names its cursor stream,
    /// so keep it stable across restarts.
    fn name(&self) -> &str;

    /// At most `max` messages after `cursor` (`None`: from the start), and
    /// the cursor after them. An empty poll may return the same cursor.
    async fn poll(&mut self, cursor: Option<&[u8]>, max: usize) -> Result<Polled, String>;
}

/// Polls `source` once and appends what it returned, routed, together
/// with its new cursor, in one transaction. Returns how many messages were
/// taken.
pub async fn ingest_once(
    log: &Arc<dyn EventLog>,
    routes: &Routes,
    source: &mut dyn ReactionSource,
    now_ms: u64,
    max: usize,
) -> Result<usize, RuntimeError> {
    let name = source.name().to_owned();
    crate::streams::check_campaign_id(&name).map_err(|_| RuntimeError::Source {
        source_name: name.clone(),
        reason: "the name must be 1 to 40 letters, digits, '-', '_' or '.'".into(),
    })?;
    let cursor_stream = StreamId::new(format!("source-cursor-{name}"))?;
    let version = log.stream_version(&cursor_stream).await?;
    let cursor = if version == 0 {
        None
    } else {
        log.read_stream(&cursor_stream, version, 1)
            .await?
            .pop()
            .map(|e| e.payload.to_vec())
    };
    let polled = source
        .poll(cursor.as_deref(), max.clamp(1, MAX_POLL))
        .await
        .map_err(|reason| RuntimeError::Source {
            source_name: name.clone(),
            reason,
        })?;
    if polled.messages.is_empty() && cursor.as_deref() == Some(polled.cursor.as_slice()) {
        return Ok(0);
    }
    let n = polled.messages.len();
    if let Some(oldest) = polled.messages.iter().filter_map(|m| m.arrival_ms).min() {
        tracing::debug!(
            source = %name,
            messages = n,
            oldest_lag_ms = now_ms.saturating_sub(oldest),
            "source polled"
        );
    }
    let mut tx = AppendTx::single(
        cursor_stream,
        ExpectedVersion::Exact(version),
        vec![NewEvent::new(CURSOR_KIND, 1, now_ms, polled.cursor)],
    );
    for m in polled.messages {
        let origin = m.offset.map(|o| format!("{name}@{o}"));
        // A source's own time (a producer's clock) never runs ahead of
        // ours: it drives the pipeline's stream time.
        let arrival = m.arrival_ms.map_or(now_ms, |a| a.min(now_ms));
        let _ = add(&mut tx, routes, m.payload, arrival, origin);
    }
    log.append(tx).await?;
    Ok(n)
}

/// Reads reaction messages from a JSON Lines file, or from every `*.jsonl`
/// file of a directory in name order (a file is finished once a later one
/// exists). Only complete lines (ending in `\n`, or the last line of a
/// finished file) are taken; blank lines are skipped. A line too long for
/// any message comes out, once complete, as its first
/// `MAX_MESSAGE_BYTES + 2` bytes (dead-lettered as too large). The cursor is
/// the file and the byte offset after the last line taken.
#[derive(Debug, Clone)]
pub struct JsonLinesSource {
    name: String,
    path: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct FileCursor {
    file: String,
    offset: u64,
}

impl JsonLinesSource {
    /// A source named `name` reading `path` (a file or a directory).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
        }
    }

    fn files(&self) -> std::io::Result<Vec<PathBuf>> {
        if self.path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&self.path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "jsonl") && p.is_file())
                .collect();
            v.sort();
            Ok(v)
        } else if self.path.exists() {
            Ok(vec![self.path.clone()])
        } else {
            Ok(Vec::new())
        }
    }

    fn poll_blocking(&self, cursor: Option<&[u8]>, max: usize) -> Result<Polled, String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut cur: FileCursor = match cursor {
            None => FileCursor::default(),
            Some(c) => serde_json::from_slice(c).map_err(|e| format!("bad cursor: {e}"))?,
        };
        let files = self.files().map_err(|e| e.to_string())?;
        let mut messages = Vec::new();
        let name_of = |p: &PathBuf| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        for (i, f) in files.iter().enumerate() {
            let fname = name_of(f);
            if !cur.file.is_empty() && fname < cur.file {
                continue;
            }
            if fname != cur.file {
                cur = FileCursor {
                    file: fname.clone(),
                    offset: 0,
                };
            }
            let mut file = std::fs::File::open(f).map_err(|e| format!("{}: {e}", f.display()))?;
            // A file is finished once a later one exists: its length is final.
            let finished = i + 1 < files.len();
            let len = file.metadata().map_err(|e| e.to_string())?.len();
            file.seek(SeekFrom::Start(cur.offset))
                .map_err(|e| e.to_string())?;
            // Enough for `max` lines of the largest accepted size ("\r\n").
            let cap = (max as u64).saturating_mul(MAX_MESSAGE_BYTES as u64 + 2);
            let mut buf = Vec::new();
            file.by_ref()
                .take(cap)
                .read_to_end(&mut buf)
                .map_err(|e| e.to_string())?;
            let at_end = cur.offset + buf.len() as u64 >= len;
            let mut pos = 0usize;
            // Bytes of an oversized line beyond `buf`.
            let mut skipped = 0u64;
            while messages.len() < max && pos < buf.len() {
                let at = cur.offset + pos as u64;
                let rest = &buf[pos..];
                let line = match rest.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        pos += nl + 1;
                        &rest[..nl]
                    }
                    // The last line of a finished file needs no newline.
                    None if finished && at_end => {
                        pos = buf.len();
                        rest
                    }
                    // Too long to be accepted in any case: once the line is
                    // complete, its start goes out (more than
                    // MAX_MESSAGE_BYTES, dead-lettered as too large) and
                    // the rest of it is passed.
                    None if rest.len() > MAX_MESSAGE_BYTES + 1 => {
                        let Some(n) = skip_line(&mut file, finished)? else {
                            break;
                        };
                        skipped = n;
                        pos = buf.len();
                        messages.push(Incoming {
                            payload: Bytes::copy_from_slice(&rest[..MAX_MESSAGE_BYTES + 2]),
                            arrival_ms: None,
                            offset: Some(at),
                        });
                        continue;
                    }
                    None => break,
                };
                let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
                if trimmed.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                messages.push(Incoming {
                    payload: Bytes::copy_from_slice(trimmed),
                    arrival_ms: None,
                    offset: Some(at),
                });
            }
            cur.offset += pos as u64 + skipped;
            if messages.len() >= max || !(finished && cur.offset >= len) {
                break;
            }
        }
        Ok(Polled {
            messages,
            cursor: serde_json::to_vec(&cur).unwrap_or_default(),
        })
    }
}

/// Reads `file` up to and including the next newline; returns how many
/// bytes that was. At the end of the file: all of it if `finished`, else
/// `None` (the line is still being written).
fn skip_line(file: &mut std::fs::File, finished: bool) -> Result<Option<u64>, String> {
    use std::io::Read;
    let mut chunk = vec![0u8; 64 << 10];
    let mut n = 0u64;
    loop {
        let got = match file.read(&mut chunk) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        if got == 0 {
            return Ok(finished.then_some(n));
        }
        if let Some(nl) = chunk[..got].iter().position(|&b| b == b'\n') {
            return Ok(Some(n + nl as u64 + 1));
        }
        n += got as u64;
    }
}

#[async_trait]
impl ReactionSource for JsonLinesSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn poll(&mut self, cursor: Option<&[u8]>, max: usize) -> Result<Polled, String> {
        let me = self.clone();
        let cursor = cursor.map(<[u8]>::to_vec);
        tokio::task::spawn_blocking(move || me.poll_blocking(cursor.as_deref(), max))
            .await
            .map_err(|e| e.to_string())?
    }
}
