//! The record format: the stream id as the record key, and a versioned
//! binary envelope as the record value.
//!
//! # Envelope, version 1 (all integers little-endian)
//!
//! | field          | size | meaning                                                     |
//! |----------------|------|-------------------------------------------------------------|
//! | magic          | 2    | `b"SK"`                                                     |
//! | version        | 1    | `1`                                                         |
//! | flags          | 1    | bit 0 correlation id, bit 1 causation id, bit 2 idempotency |
//! | batch_seq      | 8    | the Kafka transaction's sequence number (1, 2, …)           |
//! | prev_seq       | 8    | `batch_seq` of the last transaction that committed before it (0: none) |
//! | batch_index    | 4    | this event's index in the Kafka transaction                 |
//! | batch_count    | 4    | events in the Kafka transaction                             |
//! | tx_index       | 4    | this event's index in its `AppendTx`                        |
//! | tx_count       | 4    | events in its `AppendTx`                                    |
//! | position       | 8    | global position (the writer's sequence of events)           |
//! | version        | 8    | version in its stream                                       |
//! | schema         | 2    | payload schema                                              |
//! | timestamp_ms   | 8    |                                                             |
//! | kind           | 2+n  | length-prefixed UTF-8                                       |
//! | correlation id | 2+n  | if flag bit 0                                               |
//! | causation id   | 2+n  | if flag bit 1                                               |
//! | idempotency    | 2+n+8| key and the `AppendTx` fingerprint, if flag bit 2 (only on `tx_index` 0) |
//! | payload        | rest |                                                             |
//!
//! A group of records with one `batch_seq` is one Kafka transaction (one
//! or more `AppendTx`, group-committed); `batch_index`/`batch_count` let a
//! reader tell a whole one from a part, `prev_seq` chains committed
//! transactions (see [`crate::chain`]), and `tx_index`/`tx_count` plus the
//! idempotency fields rebuild each `AppendTx`'s result and key.

use bytes::Bytes;
use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::{IdempotencyKey, Metadata, RecordedEvent, StreamId};

/// Magic bytes at the start of every value.
pub const MAGIC: [u8; 2] = *b"SK";
/// The envelope version this crate writes.
pub const VERSION: u8 = 1;

const F_CORRELATION: u8 = 1;
const F_CAUSATION: u8 = 2;
const F_IDEMPOTENCY: u8 = 4;

/// Where an event sits in its Kafka transaction and its `AppendTx`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Sequence number of the Kafka transaction.
    pub batch_seq: u64,
    /// `batch_seq` of the last committed transaction before it (0: none).
    pub prev_seq: u64,
    /// Index of the event in the Kafka transaction.
    pub batch_index: u32,
    /// Events in the Kafka transaction.
    pub batch_count: u32,
    /// Index of the event in its `AppendTx`.
    pub tx_index: u32,
    /// Events in its `AppendTx`.
    pub tx_count: u32,
    /// Global position.
    pub position: u64,
    /// Version in its stream.
    pub version: u64,
}

/// The fields of an event, borrowed, for encoding.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    /// Kind.
    pub kind: &'a str,
    /// Schema.
    pub schema: u16,
    /// Timestamp.
    pub timestamp_ms: u64,
    /// Correlation and causation ids.
    pub metadata: &'a Metadata,
    /// Payload.
    pub payload: &'a [u8],
}

/// Encodes an envelope. `idempotency` goes only on an `AppendTx`'s first
/// event. Lengths must fit the checked limits (at most 65,535 bytes).
pub fn encode(
    framing: &Framing,
    event: &EventFields<'_>,
    idempotency: Option<(&IdempotencyKey, u64)>,
) -> Vec<u8> {
    let ids = [
        event.metadata.correlation_id.as_deref(),
        event.metadata.causation_id.as_deref(),
    ];
    let mut flags = 0u8;
    if ids[0].is_some() {
        flags |= F_CORRELATION;
    }
    if ids[1].is_some() {
        flags |= F_CAUSATION;
    }
    if idempotency.is_some() {
        flags |= F_IDEMPOTENCY;
    }
    let mut out = Vec::with_capacity(80 + event.kind.len() + event.payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(flags);
    out.extend_from_slice(&framing.batch_seq.to_le_bytes());
    out.extend_from_slice(&framing.prev_seq.to_le_bytes());
    out.extend_from_slice(&framing.batch_index.to_le_bytes());
    out.extend_from_slice(&framing.batch_count.to_le_bytes());
    out.extend_from_slice(&framing.tx_index.to_le_bytes());
    out.extend_from_slice(&framing.tx_count.to_le_bytes());
    out.extend_from_slice(&framing.position.to_le_bytes());
    out.extend_from_slice(&framing.version.to_le_bytes());
    out.extend_from_slice(&event.schema.to_le_bytes());
    out.extend_from_slice(&event.timestamp_ms.to_le_bytes());
    put_str(&mut out, event.kind);
    for id in ids.into_iter().flatten() {
        put_str(&mut out, id);
    }
    if let Some((key, fingerprint)) = idempotency {
        put_str(&mut out, key.as_str());
        out.extend_from_slice(&fingerprint.to_le_bytes());
    }
    out.extend_from_slice(event.payload);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= usize::from(u16::MAX));
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Framing.
    pub framing: Framing,
    /// Stream (from the record key).
    pub stream: StreamId,
    /// Idempotency key and fingerprint, on an `AppendTx`'s first event.
    pub idempotency: Option<(IdempotencyKey, u64)>,
    /// Kind.
    pub kind: String,
    /// Schema.
    pub schema: u16,
    /// Timestamp.
    pub timestamp_ms: u64,
    /// Ids.
    pub metadata: Metadata,
    /// Payload.
    pub payload: Bytes,
}

impl Decoded {
    /// The event as the engine sees it.
    pub fn into_recorded(self) -> RecordedEvent {
        RecordedEvent {
            position: self.framing.position,
            stream: self.stream,
            version: self.framing.version,
            kind: self.kind,
            schema: self.schema,
            timestamp_ms: self.timestamp_ms,
            metadata: self.metadata,
            payload: self.payload,
        }
    }
}

/// The envelope's fields over the shared [`Input`] (little-endian).
struct Cursor<'a>(Input<'a>);

fn err(e: InputError) -> String {
    format!("value ends inside {e}")
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], String> {
        self.0.take(n, what).map_err(err)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, String> {
        self.0.u8(what).map_err(err)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, String> {
        self.0.u16_le(what).map_err(err)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, String> {
        self.0.u32_le(what).map_err(err)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, String> {
        self.0.u64_le(what).map_err(err)
    }
    fn string(&mut self, what: &'static str) -> Result<String, String> {
        let bytes = self.0.prefixed_u16_le(what).map_err(err)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// An `AppendTx`'s idempotency key and fingerprint, as carried by its first
/// event.
pub type Idempotency = Option<(IdempotencyKey, u64)>;

/// Decodes only the framing (and stream and idempotency fields): what the
/// index rebuild needs, without copying payloads.
pub fn decode_framing(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<(Framing, StreamId, Idempotency), String> {
    let (framing, stream, idempotency, _, _) = decode_inner(key, value)?;
    Ok((framing, stream, idempotency))
}

type Inner<'a> = (
    Framing,
    StreamId,
    Idempotency,
    (String, u16, u64, Metadata),
    &'a [u8],
);

fn decode_inner<'a>(key: Option<&[u8]>, value: Option<&'a [u8]>) -> Result<Inner<'a>, String> {
    let key = key.ok_or("record has no key")?;
    let key = std::str::from_utf8(key).map_err(|_| "record key is not UTF-8".to_owned())?;
    let stream = StreamId::new(key).map_err(|e| format!("record key is not a stream id: {e}"))?;
    let value = value.ok_or("record has no value")?;
    let mut c = Cursor(Input::new(value));
    if c.take(2, "magic")? != MAGIC {
        return Err("value does not start with the envelope magic".into());
    }
    let version = c.u8("version")?;
    if version != VERSION {
        return Err(format!("envelope version {version} is not supported"));
    }
    let flags = c.u8("flags")?;
    if flags & !(F_CORRELATION | F_CAUSATION | F_IDEMPOTENCY) != 0 {
        return Err(format!("unknown envelope flags {flags:#x}"));
    }
    let framing = Framing {
        batch_seq: c.u64("batch_seq")?,
        prev_seq: c.u64("prev_seq")?,
        batch_index: c.u32("batch_index")?,
        batch_count: c.u32("batch_count")?,
        tx_index: c.u32("tx_index")?,
        tx_count: c.u32("tx_count")?,
        position: c.u64("position")?,
        version: c.u64("version")?,
    };
    let schema = c.u16("schema")?;
    let timestamp_ms = c.u64("timestamp")?;
    let kind = c.string("kind")?;
    let mut metadata = Metadata::default();
    if flags & F_CORRELATION != 0 {
        metadata.correlation_id = Some(c.string("correlation id")?);
    }
    if flags & F_CAUSATION != 0 {
        metadata.causation_id = Some(c.string("causation id")?);
    }
    let idempotency = if flags & F_IDEMPOTENCY != 0 {
        let k = c.string("idempotency key")?;
        let fp = c.u64("fingerprint")?;
        Some((IdempotencyKey::new(k), fp))
    } else {
        None
    };
    let f = &framing;
    if f.batch_count == 0
        || f.batch_index >= f.batch_count
        || f.tx_count == 0
        || f.tx_index >= f.tx_count
        || f.tx_count > f.batch_count
        || f.batch_seq == 0
        || f.prev_seq >= f.batch_seq
        || f.version == 0
    {
        return Err(format!("inconsistent framing {f:?}"));
    }
    if idempotency.is_some() && f.tx_index != 0 {
        return Err("idempotency fields on an event other than its transaction's first".into());
    }
    Ok((
        framing,
        stream,
        idempotency,
        (kind, schema, timestamp_ms, metadata),
        c.0.rest(),
    ))
}

/// Decodes a whole record.
pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Decoded, String> {
    let (framing, stream, idempotency, (kind, schema, timestamp_ms, metadata), payload) =
        decode_inner(key, value)?;
    Ok(Decoded {
        framing,
        stream,
        idempotency,
        kind,
        schema,
        timestamp_ms,
        metadata,
        payload: Bytes::copy_from_slice(payload),
    })
}

/// The partition of `stream` among `partitions`: FNV-1a (64-bit) of the
/// stream id's UTF-8 bytes, modulo the partition count. Stable across runs,
/// platforms and versions of this crate; it is part of the on-topic format
/// (other writers or tools that produce to the topic must use the same).
pub fn partition_for(stream: &StreamId, partitions: u32) -> i32 {
    let h = smartmsg_engine::fnv::fnv1a(stream.as_str().as_bytes());
    (h % u64::from(partitions.max(1))) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing() -> Framing {
        Framing {
            batch_seq: 7,
            prev_seq: 5,
            batch_index: 2,
            batch_count: 4,
            tx_index: 0,
            tx_count: 2,
            position: 1234,
            version: 3,
        }
    }

    #[test]
    fn round_trips_every_field() {
        let meta = Metadata {
            correlation_id: Some("corr".into()),
            causation_id: Some("".into()),
        };
        let ev = EventFields {
            kind: "Créé",
            schema: 9,
            timestamp_ms: u64::MAX - 1,
            metadata: &meta,
            payload: b"\x00payload\xff",
        };
        let key = IdempotencyKey::new("idem");
        let v = encode(&framing(), &ev, Some((&key, 42)));
        let d = decode(Some(b"s-1"), Some(&v)).unwrap();
        assert_eq!(d.framing, framing());
        assert_eq!(d.stream.as_str(), "s-1");
        assert_eq!(d.idempotency, Some((key, 42)));
        assert_eq!(d.kind, "Créé");
        assert_eq!(d.schema, 9);
        assert_eq!(d.timestamp_ms, u64::MAX - 1);
        assert_eq!(d.metadata, meta);
        assert_eq!(&d.payload[..], b"\x00payload\xff");

        let plain = Metadata::default();
        let ev = EventFields {
            metadata: &plain,
            payload: b"",
            ..ev
        };
        let v = encode(&framing(), &ev, None);
        let d = decode(Some(b"s-1"), Some(&v)).unwrap();
        assert_eq!(d.metadata, plain);
        assert_eq!(d.idempotency, None);
        assert!(d.payload.is_empty());
    }

    #[test]
    fn refuses_what_is_not_an_envelope() {
        let meta = Metadata::default();
        let ev = EventFields {
            kind: "k",
            schema: 0,
            timestamp_ms: 0,
            metadata: &meta,
            payload: b"p",
        };
        let v = encode(&framing(), &ev, None);
        assert!(decode(None, Some(&v)).is_err());
        assert!(decode(Some(b"bad key"), Some(&v)).is_err());
        assert!(decode(Some(b"s"), None).is_err());
        for cut in 0..v.len() - 1 {
            if cut < 62 {
                assert!(decode(Some(b"s"), Some(&v[..cut])).is_err(), "cut at {cut}");
            }
        }
        let mut other = v;
        other[2] = 2;
        assert!(decode(Some(b"s"), Some(&other)).is_err());
        let mut bad = framing();
        bad.batch_index = 4;
        assert!(decode(Some(b"s"), Some(&encode(&bad, &ev, None))).is_err());
        let mut bad = framing();
        bad.prev_seq = 7;
        assert!(decode(Some(b"s"), Some(&encode(&bad, &ev, None))).is_err());
    }

    #[test]
    fn partitioning_is_stable() {
        // Pinned: FNV-1a 64 of "campaign-42" is 0xc1212e2154b3c1c8. A change
        // here would move existing streams to other partitions.
        let s = StreamId::new("campaign-42").unwrap();
        assert_eq!(partition_for(&s, 7), (0xc121_2e21_54b3_c1c8u64 % 7) as i32);
        assert_eq!(
            partition_for(&s, 1000),
            (0xc121_2e21_54b3_c1c8u64 % 1000) as i32
        );
        assert_eq!(
            partition_for(&StreamId::new("a").unwrap(), 1000),
            (0xaf63_dc4c_8601_ec8c_u64 % 1000) as i32
        );
        assert_eq!(partition_for(&s, 1), 0);
        let spread: std::collections::BTreeSet<i32> = (0..200)
            .map(|i| partition_for(&StreamId::new(format!("s-{i}")).unwrap(), 8))
            .collect();
        assert_eq!(spread.len(), 8);
    }
}
