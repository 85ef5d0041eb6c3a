//! The wire formats: job messages, dead-letter records and journal records.
//!
//! Every body starts with the magic `SMDQ`, a format version (1) and a kind
//! byte, followed by big-endian fields; a body must be consumed exactly
//! (trailing bytes are an error). Decoding never panics: anything that does
//! not parse is a [`DecodeError`] with a readable reason, which the queue
//! turns into a dead-letter record.
//!
//! ```text
//! job (kind 1):        magic "SMDQ" | version u8 = 1 | kind u8 = 1
//!                      | id_len u16 | id | due_ms u64 | at_ms u64 | seq u64
//!                      | attempts u32 | payload_len u32 | payload
//! dead letter (kind 2): magic | version | kind = 2
//!                      | has_id u8 | [id_len u16 | id] | attempts u32
//!                      | reason_len u16 | reason (UTF-8) | payload_len u32 | payload
//! journal (kind 3):     magic | version | kind = 3 | op u8 | fields of the op:
//!                      op 1 Pending:  id_len u16 | id | seq u64 | rev u64 | at_ms u64 | hash u64
//!                      op 2 Retired:  id_len u16 | id | before u64 | keep_until_ms u64
//!                      op 3 Barrier:  nonce u64
//! ```
//!
//! `seq` names one *incarnation* of a job (one successful `schedule` call):
//! every copy of the message that travels down the delay levels, and every
//! copy re-published after a nack or an expired lease, carries the same
//! `seq`. `attempts` counts the deliveries already handed to workers.
//! `due_ms` is the job's own due time (part of its content, returned in
//! leases); `at_ms` is when it is due *now*: `due_ms` at first, then the
//! deadline of a lease that expired or the retry time of a nack. A
//! journal `Pending` record's `rev` orders updates of one incarnation
//! (a newer `rev` wins).

use bytes::{BufMut, Bytes, BytesMut};
use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::JobId;

/// First four bytes of every body this crate writes.
pub const MAGIC: &[u8; 4] = b"SMDQ";
/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;

const KIND_JOB: u8 = 1;
const KIND_DEAD: u8 = 2;
const KIND_JOURNAL: u8 = 3;

const OP_PENDING: u8 = 1;
const OP_RETIRED: u8 = 2;
const OP_BARRIER: u8 = 3;

/// Longest reason kept in a dead-letter record, in bytes.
pub const MAX_REASON_LEN: usize = 4096;

/// Why a body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// One job message as it travels through the queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobMessage {
    /// The job's id.
    pub id: JobId,
    /// The job's own due time (ms since the epoch).
    pub due_ms: u64,
    /// When it is due now (see the module docs).
    pub at_ms: u64,
    /// The incarnation (see the module docs).
    pub seq: u64,
    /// Deliveries already made.
    pub attempts: u32,
    /// The job's payload.
    pub payload: Bytes,
}

/// A dead-letter record as stored on the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord {
    /// The job's id, when known.
    pub id: Option<JobId>,
    /// Deliveries made.
    pub attempts: u32,
    /// Why.
    pub reason: String,
    /// The job's payload, or the raw unreadable message.
    pub payload: Bytes,
}

/// One record of the journal stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalRecord {
    /// A job incarnation is pending (scheduled, or re-scheduled by a nack
    /// with a retry time).
    Pending {
        /// The job.
        id: JobId,
        /// Its incarnation.
        seq: u64,
        /// Revision of this incarnation's entry (newer wins).
        rev: u64,
        /// When it is due now.
        at_ms: u64,
        /// [`content_hash`] of what `schedule` was given.
        hash: u64,
    },
    /// Every incarnation of `id` with `seq < before` is finished (acked,
    /// cancelled or dead-lettered): copies of it are dropped on sight.
    Retired {
        /// The job.
        id: JobId,
        /// Incarnations below this are gone.
        before: u64,
        /// Until when (ms since the epoch) the tombstone must be kept.
        keep_until_ms: u64,
    },
    /// A marker a process writes to learn when it has read the journal up
    /// to that point.
    Barrier {
        /// Identifies the writer's barrier.
        nonce: u64,
    },
}

/// FNV-1a, 64 bits: a stable hash (the same in every process and Rust
/// version) of a job's content, for "same content" checks across processes.
pub fn content_hash(due_ms: u64, payload: &[u8]) -> u64 {
    smartmsg_engine::fnv::Fnv1a::new()
        .write(&due_ms.to_be_bytes())
        .write(&(payload.len() as u64).to_be_bytes())
        .write(payload)
        .finish()
}

fn header(buf: &mut BytesMut, kind: u8) {
    buf.put_slice(MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
}

fn put_id(buf: &mut BytesMut, id: &JobId) {
    let s = id.as_str().as_bytes();
    // Ids are validated to at most `max_id_len` bytes, which the config
    // caps below u16::MAX.
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// Encodes a job message.
pub fn encode_job(m: &JobMessage) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(44 + m.id.as_str().len() + m.payload.len());
    header(&mut buf, KIND_JOB);
    put_id(&mut buf, &m.id);
    buf.put_u64(m.due_ms);
    buf.put_u64(m.at_ms);
    buf.put_u64(m.seq);
    buf.put_u32(m.attempts);
    buf.put_u32(m.payload.len() as u32);
    buf.put_slice(&m.payload);
    buf.to_vec()
}

/// Truncates `s` to at most `max` bytes at a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Encodes a dead-letter record (the reason is cut to [`MAX_REASON_LEN`]).
pub fn encode_dead(d: &DeadRecord) -> Vec<u8> {
    let reason = truncate_utf8(&d.reason, MAX_REASON_LEN);
    let mut buf = BytesMut::with_capacity(
        24 + d.id.as_ref().map_or(0, |i| i.as_str().len()) + reason.len() + d.payload.len(),
    );
    header(&mut buf, KIND_DEAD);
    match &d.id {
        Some(id) => {
            buf.put_u8(1);
            put_id(&mut buf, id);
        }
        None => buf.put_u8(0),
    }
    buf.put_u32(d.attempts);
    buf.put_u16(reason.len() as u16);
    buf.put_slice(reason.as_bytes());
    buf.put_u32(d.payload.len() as u32);
    buf.put_slice(&d.payload);
    buf.to_vec()
}

/// Encodes a journal record.
pub fn encode_journal(r: &JournalRecord) -> Vec<u8> {
    let mut buf = BytesMut::with_capacity(64);
    header(&mut buf, KIND_JOURNAL);
    match r {
        JournalRecord::Pending {
            id,
            seq,
            rev,
            at_ms,
            hash,
        } => {
            buf.put_u8(OP_PENDING);
            put_id(&mut buf, id);
            buf.put_u64(*seq);
            buf.put_u64(*rev);
            buf.put_u64(*at_ms);
            buf.put_u64(*hash);
        }
        JournalRecord::Retired {
            id,
            before,
            keep_until_ms,
        } => {
            buf.put_u8(OP_RETIRED);
            put_id(&mut buf, id);
            buf.put_u64(*before);
            buf.put_u64(*keep_until_ms);
        }
        JournalRecord::Barrier { nonce } => {
            buf.put_u8(OP_BARRIER);
            buf.put_u64(*nonce);
        }
    }
    buf.to_vec()
}

/// A record's fields over the shared [`Input`] (big-endian).
struct Reader<'a>(Input<'a>);

fn short(e: InputError) -> DecodeError {
    match e {
        InputError::Short {
            what,
            at,
            needed,
            left,
        } => DecodeError(format!(
            "truncated: {what} needs {needed} bytes at offset {at}, the body has {}",
            at + left
        )),
        other => DecodeError(other.to_string()),
    }
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        self.0.take(n, what).map_err(short)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.0.u8(what).map_err(short)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.0.u16_be(what).map_err(short)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.0.u32_be(what).map_err(short)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.0.u64_be(what).map_err(short)
    }
    fn id(&mut self) -> Result<JobId, DecodeError> {
        let len = self.u16("id length")? as usize;
        let raw = self.take(len, "id")?;
        let s =
            std::str::from_utf8(raw).map_err(|_| DecodeError("the job id is not UTF-8".into()))?;
        JobId::new(s).map_err(|e| DecodeError(format!("invalid job id: {e}")))
    }
    fn header(&mut self, kind: u8, what: &str) -> Result<(), DecodeError> {
        let magic = self.take(4, "magic").map_err(|_| {
            DecodeError(format!(
                "not a smartmsg {what}: {} bytes, too short for the header",
                self.0.remaining()
            ))
        })?;
        if magic != MAGIC {
            return Err(DecodeError(format!(
                "not a smartmsg {what}: bad magic {magic:02x?} (expected \"SMDQ\")"
            )));
        }
        let version = self.u8("version")?;
        if version != VERSION {
            return Err(DecodeError(format!(
                "unsupported format version {version} (this build reads version {VERSION})"
            )));
        }
        let k = self.u8("kind")?;
        if k != kind {
            return Err(DecodeError(format!(
                "wrong record kind {k} where a {what} (kind {kind}) was expected"
            )));
        }
        Ok(())
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if !self.0.is_empty() {
            return Err(DecodeError(format!(
                "{} trailing bytes after the record",
                self.0.remaining()
            )));
        }
        Ok(())
    }
}

/// Decodes a job message.
pub fn decode_job(body: &[u8]) -> Result<JobMessage, DecodeError> {
    let mut r = Reader(Input::new(body));
    r.header(KIND_JOB, "job message")?;
    let id = r.id()?;
    let due_ms = r.u64("due_ms")?;
    let at_ms = r.u64("at_ms")?;
    let seq = r.u64("seq")?;
    let attempts = r.u32("attempts")?;
    let len = r.u32("payload length")? as usize;
    let payload = Bytes::copy_from_slice(r.take(len, "payload")?);
    r.finish()?;
    Ok(JobMessage {
        id,
        due_ms,
        at_ms,
        seq,
        attempts,
        payload,
    })
}

/// Decodes a dead-letter record.
pub fn decode_dead(body: &[u8]) -> Result<DeadRecord, DecodeError> {
    let mut r = Reader(Input::new(body));
    r.header(KIND_DEAD, "dead-letter record")?;
    let id = match r.u8("id flag")? {
        0 => None,
        1 => Some(r.id()?),
        f => return Err(DecodeError(format!("bad id flag {f}"))),
    };
    let attempts = r.u32("attempts")?;
    let rlen = r.u16("reason length")? as usize;
    let reason = String::from_utf8_lossy(r.take(rlen, "reason")?).into_owned();
    let len = r.u32("payload length")? as usize;
    let payload = Bytes::copy_from_slice(r.take(len, "payload")?);
    r.finish()?;
    Ok(DeadRecord {
        id,
        attempts,
        reason,
        payload,
    })
}

/// Decodes a journal record.
pub fn decode_journal(body: &[u8]) -> Result<JournalRecord, DecodeError> {
    let mut r = Reader(Input::new(body));
    r.header(KIND_JOURNAL, "journal record")?;
    let rec = match r.u8("op")? {
        OP_PENDING => JournalRecord::Pending {
            id: r.id()?,
            seq: r.u64("seq")?,
            rev: r.u64("rev")?,
            at_ms: r.u64("at_ms")?,
            hash: r.u64("hash")?,
        },
        OP_RETIRED => JournalRecord::Retired {
            id: r.id()?,
            before: r.u64("before")?,
            keep_until_ms: r.u64("keep_until_ms")?,
        },
        OP_BARRIER => JournalRecord::Barrier {
            nonce: r.u64("nonce")?,
        },
        op => return Err(DecodeError(format!("unknown journal op {op}"))),
    };
    r.finish()?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    #[test]
    fn job_round_trip() {
        let m = JobMessage {
            id: id("campaign-1/batch:7"),
            due_ms: 1_700_000_000_123,
            at_ms: 1_700_000_000_200,
            seq: 42,
            attempts: 3,
            payload: Bytes::from_static(b"hello"),
        };
        assert_eq!(decode_job(&encode_job(&m)).unwrap(), m);
    }

    #[test]
    fn dead_round_trip_and_reason_cut() {
        let d = DeadRecord {
            id: None,
            attempts: 0,
            reason: "é".repeat(3000),
            payload: Bytes::from_static(b"\xff\x00"),
        };
        let back = decode_dead(&encode_dead(&d)).unwrap();
        assert!(back.reason.len() <= MAX_REASON_LEN);
        assert!(back.reason.starts_with("éé"));
        assert_eq!(back.payload, d.payload);
        let d2 = DeadRecord {
            id: Some(id("x")),
            attempts: 16,
            reason: "lease expired".into(),
            payload: Bytes::new(),
        };
        assert_eq!(decode_dead(&encode_dead(&d2)).unwrap(), d2);
    }

    #[test]
    fn journal_round_trip() {
        for r in [
            JournalRecord::Pending {
                id: id("a"),
                seq: 1,
                rev: 4,
                at_ms: 2,
                hash: 3,
            },
            JournalRecord::Retired {
                id: id("b"),
                before: 9,
                keep_until_ms: 10,
            },
            JournalRecord::Barrier { nonce: 77 },
        ] {
            assert_eq!(decode_journal(&encode_journal(&r)).unwrap(), r);
        }
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let good = encode_job(&JobMessage {
            id: id("j"),
            due_ms: 5,
            at_ms: 5,
            seq: 6,
            attempts: 0,
            payload: Bytes::from_static(b"p"),
        });
        // Every truncation and every single-byte corruption either decodes
        // or is an error; none panics.
        for n in 0..good.len() {
            assert!(decode_job(&good[..n]).is_err(), "prefix {n} decoded");
        }
        for i in 0..good.len() {
            for v in [0u8, 0xff, 0x7f] {
                let mut b = good.clone();
                b[i] = v;
                let _ = decode_job(&b);
                let _ = decode_dead(&b);
                let _ = decode_journal(&b);
            }
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode_job(&long).unwrap_err().0.contains("trailing"));
        assert!(decode_job(b"{\"json\":1}").unwrap_err().0.contains("magic"));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(decode_job(&v2).unwrap_err().0.contains("version 2"));
        let mut bad_id = good;
        bad_id[8] = b' ';
        assert!(decode_job(&bad_id)
            .unwrap_err()
            .0
            .contains("invalid job id"));
    }

    #[test]
    fn hash_depends_on_due_and_payload() {
        assert_eq!(content_hash(1, b"a"), content_hash(1, b"a"));
        assert_ne!(content_hash(1, b"a"), content_hash(2, b"a"));
        assert_ne!(content_hash(1, b"a"), content_hash(1, b"b"));
        assert_ne!(content_hash(1, b""), content_hash(1, b"\0"));
    }
}
