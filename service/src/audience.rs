//! Audiences in the log: a campaign's candidates (user ids and features)
//! as chunk events, so a restarted runtime has them without their uploader.
//!
//! Chunk layout (little-endian): `b"AU1"`, dim (u16), rows (u32), the
//! user ids (u32 each), then the features (f32 each, row-major). One chunk
//! stays under the log's event limit.

use smartmsg_domain::Candidates;
use smartmsg_engine::bytes_in::{Input, InputError};
use smartmsg_engine::{NewEvent, RecordedEvent};

/// The event kind of an audience chunk.
pub const AUDIENCE_CHUNK: &str = "AudienceChunk";
const MAGIC: &[u8; 3] = b"AU1";
const HEADER: usize = 3 + 2 + 4;

/// Rows per chunk for `dim` features under `max_event_bytes`.
pub fn rows_per_chunk(dim: usize, max_event_bytes: usize) -> usize {
    let row = 4 + 4 * dim;
    (max_event_bytes.saturating_sub(HEADER + AUDIENCE_CHUNK.len() + 64) / row).max(1)
}

/// The audience as chunk events of at most `rows` rows each.
pub fn encode(c: &Candidates, rows: usize, now_ms: u64) -> Vec<NewEvent> {
    let dim = c.dim();
    let rows = rows.max(1);
    let mut out = Vec::with_capacity(c.len().div_ceil(rows));
    let mut start = 0;
    while start < c.len() || (start == 0 && out.is_empty()) {
        let end = (start + rows).min(c.len());
        let n = end - start;
        let mut b = Vec::with_capacity(HEADER + n * (4 + 4 * dim));
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(dim as u16).to_le_bytes());
        b.extend_from_slice(&(n as u32).to_le_bytes());
        for &u in &c.users()[start..end] {
            b.extend_from_slice(&u.to_le_bytes());
        }
        for &x in (start..end).flat_map(|i| c.row(i)) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        out.push(NewEvent::new(AUDIENCE_CHUNK, 1, now_ms, b));
        if end == c.len() {
            break;
        }
        start = end;
    }
    out
}

/// Appends a chunk's rows to `into` (created on the first chunk).
pub fn decode_into(e: &RecordedEvent, into: &mut Option<Candidates>) -> Result<(), String> {
    if e.kind != AUDIENCE_CHUNK {
        return Err(format!("unexpected event kind {}", e.kind));
    }
    let p = &e.payload;
    if p.len() < HEADER || &p[..3] != MAGIC {
        return Err("not an audience chunk".into());
    }
    let mut r = Input::new(&p[MAGIC.len()..]);
    let dim = usize::from(r.u16_le("dimension").map_err(err)?);
    let n = r.u32_le("row count").map_err(err)? as usize;
    let want = n
        .checked_mul(4 + 4 * dim)
        .and_then(|b| b.checked_add(HEADER))
        .ok_or("chunk size overflows")?;
    if p.len() != want {
        return Err(format!(
            "chunk of {} bytes; {n} rows of {dim} need {want}",
            p.len()
        ));
    }
    let c = match into {
        Some(c) => c,
        None => into.insert(Candidates::with_capacity(dim, n).map_err(|e| e.to_string())?),
    };
    if c.dim() != dim {
        return Err(format!(
            "chunk of dimension {dim} in an audience of {}",
            c.dim()
        ));
    }
    let mut users = Input::new(r.take(4 * n, "users").map_err(err)?);
    let mut feats = Input::new(r.rest());
    let mut row = Vec::with_capacity(dim);
    for _ in 0..n {
        let u = users.u32_le("user").map_err(err)?;
        row.clear();
        for _ in 0..dim {
            row.push(feats.f32_le("feature").map_err(err)?);
        }
        c.push(u, &row).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn err(e: InputError) -> String {
    format!("audience chunk: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use smartmsg_engine::{Metadata, StreamId};

    fn recorded(e: NewEvent) -> RecordedEvent {
        RecordedEvent {
            position: 0,
            stream: StreamId::new("audience-x").unwrap(),
            version: 1,
            kind: e.kind,
            schema: e.schema,
            timestamp_ms: e.timestamp_ms,
            metadata: Metadata::default(),
            payload: e.payload,
        }
    }

    #[test]
    fn chunks_round_trip_and_damage_is_an_error() {
        let mut c = Candidates::new(3).unwrap();
        for u in 0..10u32 {
            c.push(u * 7, &[u as f32, -1.5, 0.25]).unwrap();
        }
        let events = encode(&c, 4, 9);
        assert_eq!(events.len(), 3);
        let mut back = None;
        for e in &events {
            decode_into(&recorded(e.clone()), &mut back).unwrap();
        }
        assert_eq!(back.unwrap(), c);
        let mut bad = recorded(events[0].clone());
        bad.payload = Bytes::from(bad.payload[..20].to_vec());
        assert!(decode_into(&bad, &mut None).is_err());
        let empty = encode(&Candidates::new(2).unwrap(), 4, 0);
        assert_eq!(empty.len(), 1);
        let mut e = None;
        decode_into(&recorded(empty[0].clone()), &mut e).unwrap();
        assert!(e.unwrap().is_empty());
        assert!(rows_per_chunk(16, 1 << 20) > 15_000);
    }
}
