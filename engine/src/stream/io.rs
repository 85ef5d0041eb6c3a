//! The [`EventLog`] as a stream [`Source`] and [`Sink`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::headers::Headers;
use super::runner::{OutputRecord, Sink, SinkError, Source, SourceError, SourceRecord};
use crate::append::{AppendTx, ExpectedVersion};
use crate::event::{NewEvent, RecordedEvent};
use crate::log::EventLog;
use crate::stream_id::StreamId;

/// The payload format of stream outputs in the log.
///
/// - Schema [`SCHEMA`](envelope::SCHEMA) (1), a record without headers: the key's length
///   (4 bytes, big-endian), the key, then the value.
/// - Schema [`SCHEMA_WITH_HEADERS`](envelope::SCHEMA_WITH_HEADERS) (2), a record with headers: the key's
///   length and the key, the encoded [`Headers`]' length (4 bytes,
///   big-endian) and the headers, then the value.
///
/// The event's `schema` says which; a record without headers is written
/// exactly as before headers existed, and old events stay readable.
pub mod envelope {
    use bytes::Bytes;

    use crate::event::RecordedEvent;
    use crate::stream::{Headers, StateCodec};

    /// The event schema of an envelope without headers.
    pub const SCHEMA: u16 = 1;
    /// The event schema of an envelope with headers.
    pub const SCHEMA_WITH_HEADERS: u16 = 2;

    /// Encodes a key, headers and a value into one payload, and gives the
    /// event schema to write it with ([`SCHEMA`] when `headers` is empty).
    pub fn encode_with_headers(key: &[u8], value: &[u8], headers: &Headers) -> (u16, Vec<u8>) {
        if headers.is_empty() {
            return (SCHEMA, encode(key, value));
        }
        let h = headers.to_bytes();
        let mut p = Vec::with_capacity(8 + key.len() + h.len() + value.len());
        p.extend_from_slice(&(key.len() as u32).to_be_bytes());
        p.extend_from_slice(key);
        p.extend_from_slice(&(h.len() as u32).to_be_bytes());
        p.extend_from_slice(&h);
        p.extend_from_slice(value);
        (SCHEMA_WITH_HEADERS, p)
    }

    /// Splits an event's payload into key, value and headers according to
    /// its schema; `None` if it is not an envelope of that schema (or its
    /// headers do not decode or break the limits).
    pub fn decode_event(e: &RecordedEvent) -> Option<(Bytes, Bytes, Headers)> {
        match e.schema {
            SCHEMA_WITH_HEADERS => {
                let p = &e.payload;
                let mut r = crate::bytes_in::Input::new(p);
                r.prefixed_u32_be("envelope key").ok()?;
                let key_end = r.position();
                let h = r.prefixed_u32_be("envelope headers").ok()?;
                let headers = Headers::decode(h).ok()?;
                let end = r.position();
                Some((p.slice(4..key_end), p.slice(end..), headers))
            }
            _ => decode(&e.payload).map(|(k, v)| (k, v, Headers::new())),
        }
    }

    /// Encodes a key and a value into one payload.
    pub fn encode(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(4 + key.len() + value.len());
        p.extend_from_slice(&(key.len() as u32).to_be_bytes());
        p.extend_from_slice(key);
        p.extend_from_slice(value);
        p
    }

    /// Splits a payload into key and value; `None` if it is not an
    /// envelope.
    pub fn decode(payload: &Bytes) -> Option<(Bytes, Bytes)> {
        let mut r = crate::bytes_in::Input::new(payload);
        r.prefixed_u32_be("envelope key").ok()?;
        let end = r.position();
        Some((payload.slice(4..end), payload.slice(end..)))
    }
}

/// Maps a log event to a source record.
pub type EventMapper = Box<dyn Fn(&RecordedEvent) -> SourceRecord + Send + Sync>;

/// A [`Source`] over an [`EventLog`]'s `read_all`: the position is the
/// log position.
///
/// By default an event becomes a record of the input named by its `kind`,
/// keyed by its stream id, valued by its payload, timed by its timestamp.
/// [`EventLogSource::with_envelopes`] instead splits envelope payloads
/// (what [`EventLogSink`] writes) into key and value.
pub struct EventLogSource {
    log: Arc<dyn EventLog>,
    map: EventMapper,
}

impl std::fmt::Debug for EventLogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLogSource").finish_non_exhaustive()
    }
}

impl EventLogSource {
    /// A source with the default mapping (input = kind, key = stream id),
    /// except for the internal streams of repartitions (kind ending with
    /// [`REPARTITION_SUFFIX`](super::REPARTITION_SUFFIX)), which the
    /// runner's [`EventLogSink`] wrote as envelopes: their key, value and
    /// headers come from the envelope.
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self::with_mapper(
            log,
            Box::new(|e| {
                if e.kind.ends_with(super::REPARTITION_SUFFIX) {
                    if let Some((key, value, headers)) = envelope::decode_event(e) {
                        return SourceRecord {
                            position: e.position,
                            input: e.kind.clone(),
                            key,
                            value,
                            timestamp_ms: e.timestamp_ms,
                            headers,
                        };
                    }
                }
                SourceRecord {
                    position: e.position,
                    input: e.kind.clone(),
                    key: Bytes::copy_from_slice(e.stream.as_str().as_bytes()),
                    value: e.payload.clone(),
                    timestamp_ms: e.timestamp_ms,
                    headers: Headers::new(),
                }
            }),
        )
    }

    /// A source that reads envelope payloads (input = kind; key, value
    /// and headers from the envelope, by the event's schema; a payload
    /// that is not an envelope becomes an empty key with the whole payload
    /// as value and no headers).
    pub fn with_envelopes(log: Arc<dyn EventLog>) -> Self {
        Self::with_mapper(
            log,
            Box::new(|e| {
                let (key, value, headers) = envelope::decode_event(e)
                    .unwrap_or_else(|| (Bytes::new(), e.payload.clone(), Headers::new()));
                SourceRecord {
                    position: e.position,
                    input: e.kind.clone(),
                    key,
                    value,
                    timestamp_ms: e.timestamp_ms,
                    headers,
                }
            }),
        )
    }

    /// A source with a custom mapping (it must keep `position`).
    pub fn with_mapper(log: Arc<dyn EventLog>, map: EventMapper) -> Self {
        Self { log, map }
    }
}

#[async_trait]
impl Source for EventLogSource {
    async fn read(&mut self, from: u64, max: usize) -> Result<Vec<SourceRecord>, SourceError> {
        let max = max.min(self.log.limits().max_read_events);
        let events = self.log.read_all(from, max).await?;
        Ok(events
            .iter()
            .map(|e| {
                let mut r = (self.map)(e);
                r.position = e.position;
                r
            })
            .collect())
    }
}

/// A [`Sink`] that appends outputs to an [`EventLog`]: each output becomes
/// an event of kind = output name on the stream named after the output,
/// with an envelope payload (key, value, and headers if it has any: see
/// [`envelope`]) and the record's timestamp.
///
/// A commit's outputs go in as few transactions as the log's limits allow,
/// each with an idempotency key derived from the runner and its first
/// output id, so delivering a commit again after a crash writes nothing.
#[derive(Clone)]
pub struct EventLogSink {
    log: Arc<dyn EventLog>,
    streams: Arc<StreamNamer>,
    appended: u64,
}

/// Names the log stream an output goes to (see
/// [`EventLogSink::with_streams`]).
pub type StreamNamer = dyn Fn(&str) -> String + Send + Sync;

impl std::fmt::Debug for EventLogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLogSink")
            .field("appended", &self.appended)
            .finish_non_exhaustive()
    }
}

impl EventLogSink {
    /// A sink appending to `log`, each output to the stream named as the
    /// output.
    pub fn new(log: Arc<dyn EventLog>) -> Self {
        Self::with_streams(log, |output| output.to_owned())
    }

    /// A sink appending to `log`, each output to the stream `name(output)`
    /// (e.g. one stream per output and campaign). The event kind stays the
    /// output's name.
    pub fn with_streams(
        log: Arc<dyn EventLog>,
        name: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        Self {
            log,
            streams: Arc::new(name),
            appended: 0,
        }
    }

    /// Transactions appended (first deliveries and re-deliveries alike).
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// The idempotency key of the transaction whose first output is `id`.
    pub fn idempotency_key(runner: &str, first: super::runner::OutputId) -> String {
        // FNV-1a of the runner name keeps the key within the 64-byte id
        // limit whatever the name's length.
        let h = crate::fnv::fnv1a(runner.as_bytes());
        format!("so:{h:016x}:{}:{}", first.commit, first.index)
    }
}

#[async_trait]
impl Sink for EventLogSink {
    async fn send(&mut self, runner: &str, records: &[OutputRecord]) -> Result<(), SinkError> {
        let limits = self.log.limits();
        let mut i = 0;
        while i < records.len() {
            // Deterministic chunking: the same records always split the same
            // way, so a re-delivery reuses the same keys and contents.
            let mut tx = AppendTx::default();
            let mut bytes = 0usize;
            let mut events = 0usize;
            let first = records[i].id;
            while i < records.len() {
                let r = &records[i];
                let (schema, payload) = envelope::encode_with_headers(&r.key, &r.value, &r.headers);
                let ev = NewEvent::new(r.output.clone(), schema, r.timestamp_ms, payload);
                let size = ev.size();
                if size > limits.max_event_bytes {
                    return Err(SinkError::Invalid {
                        output: r.output.clone(),
                        reason: format!(
                            "event of {size} bytes; the log's limit is {}",
                            limits.max_event_bytes
                        ),
                    });
                }
                let stream_name = (self.streams)(&r.output);
                let stream_pos = tx
                    .streams
                    .iter()
                    .position(|s| s.stream.as_str() == stream_name);
                let new_stream = stream_pos.is_none();
                if events > 0
                    && (events + 1 > limits.max_tx_events
                        || bytes + size > limits.max_tx_bytes
                        || (new_stream && tx.streams.len() + 1 > limits.max_tx_streams))
                {
                    break;
                }
                match stream_pos {
                    Some(p) => tx.streams[p].events.push(ev),
                    None => {
                        let stream =
                            StreamId::new(&stream_name).map_err(|e| SinkError::Invalid {
                                output: r.output.clone(),
                                reason: e.to_string(),
                            })?;
                        tx = tx.with_stream(stream, ExpectedVersion::Any, vec![ev]);
                    }
                }
                bytes += size;
                events += 1;
                i += 1;
            }
            let tx = tx.with_idempotency_key(Self::idempotency_key(runner, first));
            self.log.append(tx).await?;
            self.appended += 1;
        }
        Ok(())
    }
}
