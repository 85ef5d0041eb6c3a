//! The on-disk record: one frame per committed transaction.
//!
//! ```text
//! header (12 bytes, little-endian)
//!   magic  u32   FRAME_MAGIC
//!   len    u32   body length
//!   crc    u32   CRC32C over (len bytes ‖ body)
//! body
//!   batch          u64   group-commit batch sequence (monotonic)
//!   first_position u64
//!   key_len        u16   idempotency key length, 0xFFFF = none
//!   key            [u8]
//!   fingerprint    u64   transaction fingerprint (present iff a key is)
//!   count          u32   number of events
//!   events × count:
//!     stream_len u8,  stream  [u8]
//!     version    u64
//!     kind_len   u16, kind    [u8]
//!     schema     u16
//!     timestamp  u64
//!     corr_len   u16 (0xFFFF = none), corr [u8]
//!     caus_len   u16 (0xFFFF = none), caus [u8]
//!     payload_len u32, payload [u8]
//! ```
//!
//! A transaction is one frame, so a torn write can never expose part of a
//! transaction: the frame's CRC fails and recovery drops it whole.

use bytes::Bytes;
use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::{AppendResult, AppendTx, IdempotencyKey, Metadata, RecordedEvent, StreamId};

/// Marks the start of every frame ("SMF1").
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"SMF1");
/// Bytes before a frame's body.
pub const HEADER_LEN: usize = 12;
const NONE16: u16 = u16::MAX;

/// A frame's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Body length.
    pub len: u32,
    /// CRC32C over the length bytes and the body.
    pub crc: u32,
}

/// Why a frame failed to parse.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The bytes end before the frame does.
    Truncated,
    /// All-zero header: the end of the written data.
    End,
    /// Something fails a check.
    Bad(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => f.write_str("frame truncated"),
            FrameError::End => f.write_str("end marker where a frame should be"),
            FrameError::Bad(why) => f.write_str(why),
        }
    }
}

/// Parses a header. `End` on an all-zero header.
pub fn parse_header(buf: &[u8]) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated);
    }
    let mut i = Input::new(buf);
    let (magic, len, crc) = (
        i.u32_le("frame magic").map_err(bad)?,
        i.u32_le("frame length").map_err(bad)?,
        i.u32_le("frame CRC").map_err(bad)?,
    );
    if magic == 0 && len == 0 && crc == 0 {
        return Err(FrameError::End);
    }
    if magic != FRAME_MAGIC {
        return Err(FrameError::Bad(format!("bad magic {magic:#010x}")));
    }
    Ok(Header { len, crc })
}

/// CRC32C of a frame's length field and body.
pub fn frame_crc(len: u32, body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), body)
}

/// Checks the header of the frame at the start of `buf` and returns the
/// body's byte range within `buf`.
pub fn check_frame(buf: &[u8], max_body: usize) -> Result<std::ops::Range<usize>, FrameError> {
    let h = parse_header(buf)?;
    if h.len as usize > max_body {
        return Err(FrameError::Bad(format!(
            "frame length {} exceeds {max_body}",
            h.len
        )));
    }
    let end = HEADER_LEN + h.len as usize;
    if buf.len() < end {
        return Err(FrameError::Truncated);
    }
    let body = &buf[HEADER_LEN..end];
    let crc = frame_crc(h.len, body);
    if crc != h.crc {
        return Err(FrameError::Bad(format!(
            "CRC mismatch: stored {:#010x}, computed {crc:#010x}",
            h.crc
        )));
    }
    Ok(HEADER_LEN..end)
}

/// Appends the frame for `tx`, landing at `result`, to `out`. Returns the
/// frame's length.
pub fn encode(out: &mut Vec<u8>, batch: u64, tx: &AppendTx, result: &AppendResult) -> usize {
    let start = out.len();
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // len and crc, filled in below
    out.extend_from_slice(&batch.to_le_bytes());
    out.extend_from_slice(&result.first_position.to_le_bytes());
    match &tx.idempotency_key {
        Some(k) => {
            put_str16(out, Some(k.as_str()));
            out.extend_from_slice(&tx.fingerprint().to_le_bytes());
        }
        None => out.extend_from_slice(&NONE16.to_le_bytes()),
    }
    out.extend_from_slice(&(tx.event_count() as u32).to_le_bytes());
    for (s, (_, new_version)) in tx.streams.iter().zip(&result.versions) {
        let first_version = new_version - s.events.len() as u64 + 1;
        for (i, e) in s.events.iter().enumerate() {
            let name = s.stream.as_str().as_bytes();
            out.push(name.len() as u8);
            out.extend_from_slice(name);
            out.extend_from_slice(&(first_version + i as u64).to_le_bytes());
            put_str16(out, Some(&e.kind));
            out.extend_from_slice(&e.schema.to_le_bytes());
            out.extend_from_slice(&e.timestamp_ms.to_le_bytes());
            put_str16(out, e.metadata.correlation_id.as_deref());
            put_str16(out, e.metadata.causation_id.as_deref());
            out.extend_from_slice(&(e.payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.payload);
        }
    }
    let body_len = (out.len() - start - HEADER_LEN) as u32;
    let crc = frame_crc(body_len, &out[start + HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

fn put_str16(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.extend_from_slice(&NONE16.to_le_bytes()),
        Some(s) => {
            debug_assert!(s.len() < NONE16 as usize, "limits keep ids and kinds short");
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
    }
}

/// A decoded frame body's fixed part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    /// Group-commit batch sequence.
    pub batch: u64,
    /// Position of the first event.
    pub first_position: u64,
    /// Idempotency key and transaction fingerprint.
    pub key: Option<(IdempotencyKey, u64)>,
    /// Number of events.
    pub count: u32,
}

/// Reads a frame body. `body` must be a slice of a shared buffer so that
/// payloads are zero-copy slices of it.
pub struct BodyReader {
    buf: Bytes,
    at: usize,
    /// The fixed part.
    pub info: FrameInfo,
    remaining: u32,
}

impl BodyReader {
    /// Parses the fixed part of `body`.
    pub fn new(body: Bytes) -> Result<Self, FrameError> {
        let mut r = Cursor(Input::new(&body));
        let batch = r.u64("batch")?;
        let first_position = r.u64("first position")?;
        let key = match r.str16("idempotency key")? {
            None => None,
            Some(k) => {
                let k = IdempotencyKey::new(k);
                Some((k, r.u64("fingerprint")?))
            }
        };
        let count = r.u32("event count")?;
        if count == 0 {
            return Err(FrameError::Bad("frame with no events".into()));
        }
        let at = r.0.position();
        Ok(Self {
            buf: body,
            at,
            info: FrameInfo {
                batch,
                first_position,
                key,
                count,
            },
            remaining: count,
        })
    }

    /// The next event, `None` after the last. `cache` lets repeated stream
    /// names share one [`StreamId`] allocation.
    pub fn next_event(
        &mut self,
        cache: &mut StreamCache,
    ) -> Result<Option<RecordedEvent>, FrameError> {
        if self.remaining == 0 {
            if self.at != self.buf.len() {
                return Err(FrameError::Bad(format!(
                    "{} trailing bytes in frame",
                    self.buf.len() - self.at
                )));
            }
            return Ok(None);
        }
        let index = self.info.count - self.remaining;
        let mut r = Cursor(Input::at_offset(&self.buf[self.at..], self.at));
        let name = r.prefixed_u8("stream name")?;
        let stream = cache.get(name)?;
        let version = r.u64("version")?;
        let kind = r
            .str16("kind")?
            .ok_or_else(|| FrameError::Bad("event without kind".into()))?
            .to_owned();
        let schema = r.u16("schema")?;
        let timestamp_ms = r.u64("timestamp")?;
        let correlation_id = r.str16("correlation id")?.map(str::to_owned);
        let causation_id = r.str16("causation id")?.map(str::to_owned);
        let payload_len = r.u32("payload length")? as usize;
        let start = r.0.position();
        r.bytes(payload_len, "payload")?;
        let end = r.0.position();
        self.at = end;
        self.remaining -= 1;
        if version == 0 {
            return Err(FrameError::Bad("event version 0".into()));
        }
        let position = self
            .info
            .first_position
            .checked_add(u64::from(index))
            .ok_or_else(|| FrameError::Bad("event position overflows".into()))?;
        Ok(Some(RecordedEvent {
            position,
            stream,
            version,
            kind,
            schema,
            timestamp_ms,
            metadata: Metadata {
                correlation_id,
                causation_id,
            },
            payload: self.buf.slice(start..end),
        }))
    }
}

/// Remembers recently decoded stream names so that a read of many events of
/// few streams allocates each [`StreamId`] once.
#[derive(Default)]
pub struct StreamCache {
    recent: Vec<StreamId>,
}

impl StreamCache {
    /// A cache that starts with `known` (e.g. the stream being read).
    pub fn with(known: StreamId) -> Self {
        Self {
            recent: vec![known],
        }
    }

    fn get(&mut self, name: &[u8]) -> Result<StreamId, FrameError> {
        if let Some(s) = self.recent.iter().find(|s| s.as_str().as_bytes() == name) {
            return Ok(s.clone());
        }
        let text = std::str::from_utf8(name)
            .map_err(|_| FrameError::Bad("stream id is not UTF-8".into()))?;
        let id = StreamId::new(text).map_err(|e| FrameError::Bad(format!("bad stream id: {e}")))?;
        if self.recent.len() >= 16 {
            self.recent.remove(0);
        }
        self.recent.push(id.clone());
        Ok(id)
    }
}

/// A field past the end of the bytes: the body says more than it holds.
fn bad(e: InputError) -> FrameError {
    FrameError::Bad(format!("field runs past the frame: {e}"))
}

/// The frame's fields over the shared [`Input`].
struct Cursor<'a>(Input<'a>);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        self.0.take(n, what).map_err(bad)
    }
    fn prefixed_u8(&mut self, what: &'static str) -> Result<&'a [u8], FrameError> {
        let n = self.0.u8(what).map_err(bad)?;
        self.bytes(usize::from(n), what)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.0.u16_le(what).map_err(bad)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.0.u32_le(what).map_err(bad)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.0.u64_le(what).map_err(bad)
    }
    fn str16(&mut self, what: &'static str) -> Result<Option<&'a str>, FrameError> {
        let n = self.u16(what)?;
        if n == NONE16 {
            return Ok(None);
        }
        let b = self.bytes(usize::from(n), what)?;
        std::str::from_utf8(b)
            .map(Some)
            .map_err(|_| FrameError::Bad(format!("{what} is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use smartmsg_engine::{ExpectedVersion, NewEvent};

    fn sample_tx() -> (AppendTx, AppendResult) {
        let a = StreamId::new("a").unwrap();
        let b = StreamId::new("b-2").unwrap();
        let tx = AppendTx::single(
            a.clone(),
            ExpectedVersion::Any,
            vec![
                NewEvent::new("K", 1, 5, &b"hello"[..]),
                NewEvent::new("L", 2, 6, &b""[..]),
            ],
        )
        .with_stream(
            b.clone(),
            ExpectedVersion::Exact(3),
            vec![NewEvent::new("M", 3, 7, &b"x"[..]).with_metadata(Metadata::correlated("c1"))],
        )
        .with_idempotency_key("key-1");
        let result = AppendResult {
            first_position: 10,
            next_position: 13,
            versions: vec![(a, 2), (b, 4)],
        };
        (tx, result)
    }

    fn decode_all(frame: &[u8]) -> Result<(FrameInfo, Vec<RecordedEvent>), FrameError> {
        let range = check_frame(frame, 1 << 30)?;
        let body = Bytes::copy_from_slice(&frame[range]);
        let mut r = BodyReader::new(body)?;
        let mut cache = StreamCache::default();
        let mut out = Vec::new();
        while let Some(e) = r.next_event(&mut cache)? {
            out.push(e);
        }
        Ok((r.info, out))
    }

    #[test]
    fn round_trip() {
        let (tx, result) = sample_tx();
        let mut buf = Vec::new();
        let n = encode(&mut buf, 7, &tx, &result);
        assert_eq!(n, buf.len());
        let (info, events) = decode_all(&buf).unwrap();
        assert_eq!(info.batch, 7);
        assert_eq!(info.first_position, 10);
        assert_eq!(
            info.key,
            Some((IdempotencyKey::new("key-1"), tx.fingerprint()))
        );
        let got: Vec<_> = events
            .iter()
            .map(|e| (e.position, e.stream.as_str(), e.version, e.kind.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![(10, "a", 1, "K"), (11, "a", 2, "L"), (12, "b-2", 4, "M")]
        );
        assert_eq!(&events[0].payload[..], b"hello");
        assert_eq!(events[2].metadata, Metadata::correlated("c1"));
        assert_eq!(events[1].schema, 2);
        assert_eq!(events[1].timestamp_ms, 6);
    }

    #[test]
    fn zero_header_is_end_and_flips_are_caught() {
        assert_eq!(parse_header(&[0; 12]), Err(FrameError::End));
        let (tx, result) = sample_tx();
        let mut buf = Vec::new();
        encode(&mut buf, 1, &tx, &result);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(decode_all(&bad).is_err(), "flip at {i} not caught");
        }
        assert_eq!(
            decode_all(&buf[..buf.len() - 1]).unwrap_err(),
            FrameError::Truncated
        );
    }

    proptest! {
        /// Decoding arbitrary bytes never panics.
        #[test]
        fn decode_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes);
            // Also with a valid header wrapped around garbage, so the body
            // parser itself is exercised.
            let mut framed = Vec::new();
            framed.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
            framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            framed.extend_from_slice(&frame_crc(bytes.len() as u32, &bytes).to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode_all(&framed);
        }
    }
}
