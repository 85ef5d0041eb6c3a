//! Portable event logs: `smartmsg export` and `smartmsg import`.
//!
//! A log is written as JSON Lines, one envelope per event in position
//! order:
//!
//! ```json
//! {"position":0,"stream":"campaign-x","version":1,"kind":"CampaignCreated","schema":1,
//!  "timestamp_ms":1700000000000,"metadata":{"correlation_id":null,"causation_id":null},
//!  "payload_json":{"command":"create", ...}}
//! ```
//!
//! The payload is `payload_json` when the kind is one this code knows to
//! be JSON (the campaign's and the simulator's events) *and* the payload's
//! bytes are themselves one compact line of JSON: the value is then copied
//! into the envelope verbatim (a raw JSON value, never re-serialised), so
//! the exact bytes come back on import. `BatchPlanned` at schemas 2 and 3
//! (3: one part of a batch recorded in several) is stored in a binary
//! layout (`smartmsg_domain::campaign::planned`); it is shown as its JSON
//! form (the schema 1 shape, plus `part` at schema 3) and encoded back on import,
//! which gives the same bytes because that layout is canonical (export
//! checks the round trip and falls back to base64 if it would not hold).
//! Anything else (an unknown kind, JSON with newlines, bytes that are not
//! JSON) is `payload_b64` (standard base64, padded).
//!
//! Import checks every line (syntax, fields, positions gap-free from 0,
//! per-stream versions consecutive from 1, stream ids, limits) before it
//! writes anything, writes into a temporary directory next to the target
//! and renames it into place, so a failed import leaves nothing behind.
//! Events are appended in position order, grouped into transactions of
//! consecutive events (a stream's events contiguous in each), so
//! positions, versions and every field read back identically. Transaction
//! boundaries and idempotency keys of the original log are not exported.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use smartmsg_embedded::{EmbeddedError, EmbeddedLog};
use smartmsg_engine::{
    AppendError, AppendTx, EventLog, ExpectedVersion, Limits, Metadata, ReadError, RecordedEvent,
    StreamId,
};

use smartmsg_domain::campaign::planned;

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortableError {
    /// A file or directory operation failed.
    #[error("cannot {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The directory holds no event log, or more than one.
    #[error("{path}: {reason}")]
    NoLog {
        /// The directory.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// The import target exists and is not empty.
    #[error("{path} exists and is not empty; import only into a new or empty directory")]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// Lines of the file are bad (all of them are listed, up to a limit).
    #[error("{file}: {} bad line(s):\n{}", .lines.len(), render_bad(.lines, *.more))]
    BadLines {
        /// The file.
        file: PathBuf,
        /// Line number (1-based) and reason.
        lines: Vec<(u64, String)>,
        /// Bad lines not listed.
        more: u64,
    },
    /// The embedded log failed.
    #[error(transparent)]
    Embedded(#[from] EmbeddedError),
    /// A read failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// An append failed.
    #[error(transparent)]
    Append(#[from] AppendError),
}

fn render_bad(lines: &[(u64, String)], more: u64) -> String {
    let mut s: Vec<String> = lines
        .iter()
        .map(|(n, r)| format!("  line {n}: {r}"))
        .collect();
    if more > 0 {
        s.push(format!("  ... and {more} more"));
    }
    s.join("\n")
}

/// Bad lines listed in an error at most.
const MAX_REPORTED: usize = 50;

/// One line of a portable log (as written).
#[derive(Serialize)]
struct EnvelopeOut<'a> {
    position: u64,
    stream: &'a str,
    version: u64,
    kind: &'a str,
    schema: u16,
    timestamp_ms: u64,
    metadata: &'a Metadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_json: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_b64: Option<String>,
}

/// One line of a portable log (as read).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvelopeIn {
    position: u64,
    stream: String,
    version: u64,
    kind: String,
    schema: u16,
    timestamp_ms: u64,
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    payload_json: Option<Box<RawValue>>,
    #[serde(default)]
    payload_b64: Option<String>,
}

/// Whether events of `kind` carry JSON payloads (from the one list of
/// kinds, [`smartmsg_service::kinds::EVENT_KINDS`]).
pub fn is_json_kind(kind: &str) -> bool {
    smartmsg_service::kinds::payload_of(kind) == Some(smartmsg_service::kinds::Payload::Json)
}

/// The payload as a raw JSON value if it can be embedded verbatim: valid
/// UTF-8 JSON, exactly these bytes, on one line, not `null` (which would
/// read back as "no payload_json").
fn as_raw_json<'a>(kind: &str, payload: &'a [u8]) -> Option<&'a RawValue> {
    if !is_json_kind(kind) || payload.contains(&b'\n') || payload.contains(&b'\r') {
        return None;
    }
    let s = std::str::from_utf8(payload).ok()?;
    let raw: &RawValue = serde_json::from_str(s).ok()?;
    (raw.get() == s && s != "null").then_some(raw)
}

/// Whether `(kind, schema)` is stored binary and shown as JSON.
fn is_binary_planned(kind: &str, schema: u16) -> bool {
    kind == "BatchPlanned"
        && (schema == smartmsg_domain::PLANNED_SCHEMA
            || schema == smartmsg_domain::PLANNED_PARTS_SCHEMA)
}

/// The JSON form of a binary `BatchPlanned` payload, if it decodes and
/// encodes back to exactly these bytes.
fn planned_as_json(schema: u16, payload: &[u8]) -> Option<Box<RawValue>> {
    let p = planned::decode(schema, payload).ok()?;
    if planned::encode(&p.command, p.batch, p.part, &p.policy, &p.decisions) != payload {
        return None;
    }
    // Non-finite propensities have no JSON form (they would read back as
    // null and fail): keep such payloads in base64.
    if p.decisions.propensities.iter().any(|x| !x.is_finite()) {
        return None;
    }
    serde_json::value::to_raw_value(&p).ok()
}

/// Writes one event as a line (with its newline).
pub fn write_line(out: &mut impl Write, e: &RecordedEvent) -> std::io::Result<()> {
    let transcoded = if is_binary_planned(&e.kind, e.schema) {
        planned_as_json(e.schema, &e.payload)
    } else {
        None
    };
    let raw = transcoded
        .as_deref()
        .or_else(|| as_raw_json(&e.kind, &e.payload));
    let env = EnvelopeOut {
        position: e.position,
        stream: e.stream.as_str(),
        version: e.version,
        kind: &e.kind,
        schema: e.schema,
        timestamp_ms: e.timestamp_ms,
        metadata: &e.metadata,
        payload_json: raw,
        payload_b64: if raw.is_none() {
            Some(b64_encode(&e.payload))
        } else {
            None
        },
    };
    serde_json::to_writer(&mut *out, &env).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// Parses one line into an event, checking its own fields (not its
/// place in the log). Never panics.
pub fn parse_line(line: &str, limits: &Limits) -> Result<RecordedEvent, String> {
    let env: EnvelopeIn =
        serde_json::from_str(line).map_err(|e| format!("not an envelope: {e}"))?;
    let payload = match (&env.payload_json, &env.payload_b64) {
        (Some(raw), None) if is_binary_planned(&env.kind, env.schema) => {
            let p: planned::Planned = serde_json::from_str(raw.get())
                .map_err(|e| format!("payload_json of a BatchPlanned: {e}"))?;
            p.decisions
                .check_shape()
                .map_err(|e| format!("payload_json of a BatchPlanned: {e}"))?;
            if p.part.schema() != env.schema {
                return Err(format!(
                    "payload_json of a BatchPlanned: part {} of {} is written at schema {}, not {}",
                    p.part.index,
                    p.part.count,
                    p.part.schema(),
                    env.schema
                ));
            }
            Bytes::from(planned::encode(
                &p.command,
                p.batch,
                p.part,
                &p.policy,
                &p.decisions,
            ))
        }
        (Some(raw), None) => Bytes::copy_from_slice(raw.get().as_bytes()),
        (None, Some(b)) => Bytes::from(b64_decode(b).map_err(|e| format!("payload_b64: {e}"))?),
        (Some(_), Some(_)) => return Err("both payload_json and payload_b64".into()),
        (None, None) => return Err("no payload (payload_json or payload_b64)".into()),
    };
    let stream = StreamId::new(&env.stream).map_err(|e| format!("stream: {e}"))?;
    if env.version == 0 {
        return Err("version 0 (versions are 1-based)".into());
    }
    if env.kind.is_empty() || env.kind.len() > limits.max_kind_len {
        return Err(format!(
            "kind of {} bytes (1 to {} allowed)",
            env.kind.len(),
            limits.max_kind_len
        ));
    }
    for (name, id) in [
        ("correlation_id", &env.metadata.correlation_id),
        ("causation_id", &env.metadata.causation_id),
    ] {
        if let Some(id) = id {
            if id.len() > limits.max_id_len {
                return Err(format!(
                    "{name} of {} bytes (at most {})",
                    id.len(),
                    limits.max_id_len
                ));
            }
        }
    }
    let e = RecordedEvent {
        position: env.position,
        stream,
        version: env.version,
        kind: env.kind,
        schema: env.schema,
        timestamp_ms: env.timestamp_ms,
        metadata: env.metadata,
        payload,
    };
    let size = e.to_new_event().size();
    if size > limits.max_event_bytes {
        return Err(format!(
            "event of {size} bytes (at most {})",
            limits.max_event_bytes
        ));
    }
    Ok(e)
}

/// Bad lines (1-based number and reason) and how many more were not listed.
pub type BadLines = (Vec<(u64, String)>, u64);

/// Checks the lines of a whole file and returns its events in order, or
/// every bad line (line number and reason). Positions must run 0, 1, 2, …
/// and each stream's versions 1, 2, 3, …
pub fn parse_all(input: impl BufRead, limits: &Limits) -> Result<Vec<RecordedEvent>, BadLines> {
    let mut events = Vec::new();
    check_lines(input, limits, |e| events.push(e))?;
    Ok(events)
}

/// Checks the lines of a whole file, handing each event to `sink` in order
/// while no line has been bad (so a sink sees a prefix of the file's
/// events, all of them if it returns `Ok`). Returns the number of events,
/// or every bad line. Memory: one line and one version per stream.
pub fn check_lines(
    input: impl BufRead,
    limits: &Limits,
    mut sink: impl FnMut(RecordedEvent),
) -> Result<u64, BadLines> {
    let mut count = 0u64;
    let mut bad = Vec::new();
    let mut more = 0u64;
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut next_position = 0u64;
    let mut note = |n: u64, r: String, bad: &mut Vec<(u64, String)>| {
        if bad.len() < MAX_REPORTED {
            bad.push((n, r));
        } else {
            more += 1;
        }
    };
    for (i, line) in input.split(b'\n').enumerate() {
        let n = i as u64 + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                note(n, format!("cannot read: {e}"), &mut bad);
                break;
            }
        };
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if line.iter().all(u8::is_ascii_whitespace) {
            note(n, "empty line".into(), &mut bad);
            continue;
        }
        let Ok(text) = std::str::from_utf8(line) else {
            next_position += 1;
            note(n, "not UTF-8".into(), &mut bad);
            continue;
        };
        match parse_line(text, limits) {
            Err(r) => {
                // The line still takes a position, so the next lines are
                // not all reported as gaps.
                next_position += 1;
                note(n, r, &mut bad);
            }
            Ok(e) => {
                if e.position != next_position {
                    note(
                        n,
                        format!(
                            "position {} where {next_position} was expected (positions are gap-free from 0)",
                            e.position
                        ),
                        &mut bad,
                    );
                }
                next_position = e.position.max(next_position) + 1;
                let v = versions.entry(e.stream.as_str().to_owned()).or_insert(0);
                if e.version != *v + 1 {
                    note(
                        n,
                        format!(
                            "stream {} version {} where {} was expected (versions are consecutive from 1)",
                            e.stream,
                            e.version,
                            *v + 1
                        ),
                        &mut bad,
                    );
                }
                *v = e.version;
                if bad.is_empty() {
                    count += 1;
                    sink(e);
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(count)
    } else {
        Err((bad, more))
    }
}

/// Finds the event logs under `dir`: the log directory itself, a run's
/// directory (`DIR/log`), or every run of a simulation's root
/// (`DIR/<policy>/log`), sorted.
pub fn find_logs(dir: &Path) -> Result<Vec<PathBuf>, PortableError> {
    let io = |source| PortableError::Io {
        op: "read",
        path: dir.to_owned(),
        source,
    };
    if !dir.is_dir() {
        return Err(PortableError::NoLog {
            path: dir.to_owned(),
            reason: "is not a directory".into(),
        });
    }
    if dir.join("log").is_dir() {
        return Ok(vec![dir.join("log")]);
    }
    let mut runs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if EmbeddedLog::is_segment_file_name(name) {
            return Ok(vec![dir.to_owned()]);
        }
        if p.join("log").is_dir() {
            runs.push(p.join("log"));
        }
    }
    runs.sort();
    if runs.is_empty() {
        return Err(PortableError::NoLog {
            path: dir.to_owned(),
            reason: "holds no event log (expected a log directory, DIR/log or DIR/<run>/log)"
                .into(),
        });
    }
    Ok(runs)
}

/// Finds the one event log of `dir` (see [`find_logs`]); a simulation's
/// root with several runs is an error naming them.
pub fn find_log(dir: &Path) -> Result<PathBuf, PortableError> {
    let mut runs = find_logs(dir)?;
    if runs.len() == 1 {
        return Ok(runs.remove(0));
    }
    Err(PortableError::NoLog {
        path: dir.to_owned(),
        reason: format!(
            "holds {} runs; name one: {}",
            runs.len(),
            runs.iter()
                .filter_map(|p| p.parent())
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// A single-threaded tokio runtime for the work on `path`.
pub(crate) fn runtime(path: &Path) -> Result<tokio::runtime::Runtime, PortableError> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|source| PortableError::Io {
            op: "start runtime for",
            path: path.to_owned(),
            source,
        })
}

/// Events read per `read_all` call.
const READ_CHUNK: usize = 50_000;

/// Exports the log of `dir` (see [`find_log`]) to `out` as JSON Lines;
/// returns the number of events.
pub fn export(dir: &Path, out: &Path) -> Result<u64, PortableError> {
    let log_dir = find_log(dir)?;
    let rt = runtime(dir)?;
    rt.block_on(async {
        let log = EmbeddedLog::open(&log_dir)?;
        let file = std::fs::File::create(out).map_err(|source| PortableError::Io {
            op: "create",
            path: out.to_owned(),
            source,
        })?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let wio = |source| PortableError::Io {
            op: "write",
            path: out.to_owned(),
            source,
        };
        let mut pos = 0u64;
        loop {
            let batch = log.read_all(pos, READ_CHUNK).await?;
            let Some(last) = batch.last() else { break };
            pos = last.position + 1;
            for e in &batch {
                write_line(&mut w, e).map_err(wio)?;
            }
        }
        w.flush().map_err(wio)?;
        w.into_inner()
            .map_err(|e| wio(e.into_error()))?
            .sync_all()
            .map_err(wio)?;
        Ok(pos)
    })
}

/// Reads every event of an embedded log directory, in position order.
pub async fn read_all(log: &dyn EventLog) -> Result<Vec<RecordedEvent>, ReadError> {
    let mut out = Vec::new();
    loop {
        let batch = log.read_all(out.len() as u64, READ_CHUNK).await?;
        if batch.is_empty() {
            return Ok(out);
        }
        out.extend(batch);
    }
}

/// Reads and checks a portable log file.
pub fn read_file(file: &Path, limits: &Limits) -> Result<Vec<RecordedEvent>, PortableError> {
    let f = std::fs::File::open(file).map_err(|source| PortableError::Io {
        op: "open",
        path: file.to_owned(),
        source,
    })?;
    parse_all(std::io::BufReader::with_capacity(1 << 20, f), limits).map_err(|(lines, more)| {
        PortableError::BadLines {
            file: file.to_owned(),
            lines,
            more,
        }
    })
}

/// Most events per imported transaction.
const TX_EVENTS: usize = 2_000;
/// Most event bytes per imported transaction.
const TX_BYTES: usize = 4 << 20;

/// Groups events (in position order) into transactions that append them at
/// the same positions and versions.
pub fn transactions(events: &[RecordedEvent], limits: &Limits) -> Vec<AppendTx> {
    let max_events = TX_EVENTS.min(limits.max_tx_events).max(1);
    let max_bytes = TX_BYTES.min(limits.max_tx_bytes);
    let max_streams = limits.max_tx_streams.max(1);
    let mut txs = Vec::new();
    let mut tx = AppendTx::default();
    let (mut n, mut bytes) = (0usize, 0usize);
    for e in events {
        let size = e.to_new_event().size();
        let same_as_last = tx.streams.last().is_some_and(|s| s.stream == e.stream);
        let seen = !same_as_last && tx.streams.iter().any(|s| s.stream == e.stream);
        let full = n + 1 > max_events
            || (n > 0 && bytes + size > max_bytes)
            || (!same_as_last && tx.streams.len() + 1 > max_streams);
        if n > 0 && (seen || full) {
            txs.push(std::mem::take(&mut tx));
            n = 0;
            bytes = 0;
        }
        match tx.streams.last_mut() {
            Some(s) if s.stream == e.stream => s.events.push(e.to_new_event()),
            _ => {
                tx = tx.with_stream(
                    e.stream.clone(),
                    ExpectedVersion::Exact(e.version - 1),
                    vec![e.to_new_event()],
                )
            }
        }
        n += 1;
        bytes += size;
    }
    if n > 0 {
        txs.push(tx);
    }
    txs
}

/// Appends `events` (checked by [`parse_all`]) to an empty log.
pub async fn write_events(
    log: &EmbeddedLog,
    events: &[RecordedEvent],
) -> Result<(), PortableError> {
    for tx in transactions(events, &log.limits()) {
        log.append(tx).await?;
    }
    Ok(())
}

fn dir_is_empty(dir: &Path) -> Result<bool, PortableError> {
    Ok(std::fs::read_dir(dir)
        .map_err(|source| PortableError::Io {
            op: "read",
            path: dir.to_owned(),
            source,
        })?
        .next()
        .is_none())
}

/// Events held in memory at once while importing.
const IMPORT_CHUNK: usize = 20_000;

/// Reads `file` line by line through [`check_lines`].
fn check_file(
    file: &Path,
    limits: &Limits,
    sink: impl FnMut(RecordedEvent),
) -> Result<u64, PortableError> {
    let f = std::fs::File::open(file).map_err(|source| PortableError::Io {
        op: "open",
        path: file.to_owned(),
        source,
    })?;
    check_lines(std::io::BufReader::with_capacity(1 << 20, f), limits, sink).map_err(
        |(lines, more)| PortableError::BadLines {
            file: file.to_owned(),
            lines,
            more,
        },
    )
}

/// Imports the portable log `file` into a new data directory `dir` (the
/// log lands in `dir/log`, as a simulator run's does). Refuses a non-empty
/// `dir`; checks the whole file first (a first pass that keeps nothing),
/// then writes it (a second pass, 20,000 events at a time, so
/// memory does not grow with the file) into a temporary directory beside
/// `dir` and renames it into place. Returns the number of events.
pub fn import(file: &Path, dir: &Path) -> Result<u64, PortableError> {
    if dir.exists() && (!dir.is_dir() || !dir_is_empty(dir)?) {
        return Err(PortableError::TargetNotEmpty {
            path: dir.to_owned(),
        });
    }
    let limits = Limits::default();
    let total = check_file(file, &limits, |_| {})?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| PortableError::Io { op, path, source }
    };
    std::fs::create_dir_all(&parent).map_err(io("create", &parent))?;
    let temp = tempfile::Builder::new()
        .prefix(".smartmsg-import-")
        .tempdir_in(&parent)
        .map_err(io("create a temporary directory in", &parent))?;
    let rt = runtime(dir)?;
    {
        let log = EmbeddedLog::open(temp.path().join("log"))?;
        let mut chunk: Vec<RecordedEvent> = Vec::with_capacity(IMPORT_CHUNK);
        let mut failed: Option<PortableError> = None;
        let flush = |chunk: &mut Vec<RecordedEvent>, failed: &mut Option<PortableError>| {
            if failed.is_none() && !chunk.is_empty() {
                if let Err(e) = rt.block_on(write_events(&log, chunk)) {
                    *failed = Some(e);
                }
            }
            chunk.clear();
        };
        // The file may have changed since the first pass: check it again
        // while writing, and fail (leaving nothing) if it has.
        let seen = check_file(file, &limits, |e| {
            chunk.push(e);
            if chunk.len() >= IMPORT_CHUNK {
                flush(&mut chunk, &mut failed);
            }
        })?;
        flush(&mut chunk, &mut failed);
        if let Some(e) = failed {
            return Err(e);
        }
        let head = rt.block_on(log.head())?;
        if head != total || seen != total {
            return Err(PortableError::NoLog {
                path: temp.path().to_owned(),
                reason: format!(
                    "imported {head} events of {total} (the file changed during the import?)"
                ),
            });
        }
    }
    // The log is closed (dropped) here; move it into place.
    if dir.exists() {
        // Empty (checked above): rename(2) replaces an empty directory.
        if !dir_is_empty(dir)? {
            return Err(PortableError::TargetNotEmpty {
                path: dir.to_owned(),
            });
        }
    }
    let kept = temp.keep();
    if let Err(source) = std::fs::rename(&kept, dir) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(PortableError::Io {
            op: "move the imported log into",
            path: dir.to_owned(),
            source,
        });
    }
    Ok(total)
}

/// Standard base64 with padding (the `base64` crate's `STANDARD`).
pub fn b64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes standard padded base64, canonical form only (padding required,
/// no trailing bits).
pub fn b64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(b64_decode(&b64_encode(&data)).unwrap(), data);
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert!(b64_decode("Zm9=").is_err());
        assert!(b64_decode("Zm8").is_err());
        assert!(b64_decode("Zm=8").is_err());
    }

    #[test]
    fn json_payload_is_verbatim_only_when_exact() {
        assert!(as_raw_json("BatchSent", br#"{"command":"x","batch":1}"#).is_some());
        assert!(as_raw_json("BatchSent", b" {\"a\":1}").is_none());
        assert!(as_raw_json("BatchSent", b"{\"a\":\n1}").is_none());
        assert!(as_raw_json("BatchSent", b"null").is_none());
        assert!(as_raw_json("Unknown", b"{}").is_none());
        assert!(as_raw_json("BatchSent", b"{} {}").is_none());
    }
}
