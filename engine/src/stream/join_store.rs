//! The records a stream-stream join keeps: one buffer per side, in the
//! task, written behind to one
//! [`KeyValueStore`](super::store::KeyValueStore) keyspace at commit and
//! read back on restore.
//!
//! Stored layout, one entry per buffered record: key = the side (`0`
//! left, `1` right), the record's timestamp (8 bytes, big-endian), a
//! sequence number (8 bytes, big-endian: records of one side with the same
//! timestamp stay distinct and in arrival order), then the encoded join
//! key; value = a matched flag (1 byte), the encoded headers, then the
//! encoded value. A record leaves the buffer (and the store) when stream
//! time passes its timestamp plus the join's retention.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

use super::codec::{CodecError, Reader, StateCodec};
use super::headers::Headers;
use super::store::WriteBatch;
use super::task::{FxMap, StateSlot, StreamError};

/// A buffered record's place: timestamp, then sequence number.
pub(crate) type Pos = (u64, u64);

/// A record kept by one side of a join.
pub(crate) struct Buffered<K, V> {
    pub(crate) key: K,
    pub(crate) value: V,
    pub(crate) headers: Headers,
    /// Whether a record of the other side joined it (tracked for the
    /// sides whose unmatched records are emitted).
    pub(crate) matched: bool,
    dirty: bool,
    persisted: bool,
}

/// One side's buffer: by time (expiry) and by key (lookups).
pub(crate) struct SideBuf<K, V> {
    side: u8,
    by_time: BTreeMap<Pos, Buffered<K, V>>,
    by_key: FxMap<K, BTreeSet<Pos>>,
    dirty: Vec<Pos>,
}

fn store_key<K: StateCodec>(side: u8, (ts, seq): Pos, k: &K) -> Vec<u8> {
    let mut b = Vec::with_capacity(25);
    b.push(side);
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    k.encode(&mut b);
    b
}

impl<K, V> SideBuf<K, V>
where
    K: Clone + Eq + Hash + StateCodec,
    V: StateCodec,
{
    fn new(side: u8) -> Self {
        Self {
            side,
            by_time: BTreeMap::new(),
            by_key: FxMap::default(),
            dirty: Vec::new(),
        }
    }

    /// The places of the records of `k` with a timestamp in `[lo, hi]`, in
    /// order, into `out` (cleared first).
    pub(crate) fn find(&self, k: &K, lo: u64, hi: u64, out: &mut Vec<Pos>) {
        out.clear();
        if lo > hi {
            return;
        }
        if let Some(set) = self.by_key.get(k) {
            out.extend(set.range((lo, 0)..=(hi, u64::MAX)).copied());
        }
    }

    /// The record at `pos`.
    pub(crate) fn get(&self, pos: Pos) -> Option<&Buffered<K, V>> {
        self.by_time.get(&pos)
    }

    /// Marks the record at `pos` as joined.
    pub(crate) fn set_matched(&mut self, pos: Pos) {
        if let Some(b) = self.by_time.get_mut(&pos) {
            if !b.matched {
                b.matched = true;
                if !b.dirty {
                    b.dirty = true;
                    self.dirty.push(pos);
                }
            }
        }
    }

    fn insert(&mut self, pos: Pos, b: Buffered<K, V>) {
        if b.dirty {
            self.dirty.push(pos);
        }
        self.by_key.entry(b.key.clone()).or_default().insert(pos);
        self.by_time.insert(pos, b);
    }

    /// Removes the records with `ts + retention < stream_time` into
    /// `out`, in order; the stored ones are deleted at the next flush.
    fn expire(
        &mut self,
        stream_time: u64,
        retention: u64,
        deleted: &mut Vec<Vec<u8>>,
        out: &mut Vec<(Pos, Buffered<K, V>)>,
    ) {
        while let Some(e) = self.by_time.first_entry() {
            if e.key().0.saturating_add(retention) >= stream_time {
                break;
            }
            let (pos, b) = e.remove_entry();
            if let Some(set) = self.by_key.get_mut(&b.key) {
                set.remove(&pos);
                if set.is_empty() {
                    self.by_key.remove(&b.key);
                }
            }
            if b.persisted {
                deleted.push(store_key(self.side, pos, &b.key));
            }
            out.push((pos, b));
        }
    }

    fn flush(&mut self, name: &str, batch: &mut WriteBatch) {
        for pos in self.dirty.drain(..) {
            let Some(b) = self.by_time.get_mut(&pos) else {
                continue; // expired since: deleted if it was stored
            };
            if b.dirty {
                b.dirty = false;
                b.persisted = true;
                let mut v = Vec::with_capacity(16);
                v.push(u8::from(b.matched));
                b.headers.encode(&mut v);
                b.value.encode(&mut v);
                batch.put(name, store_key(self.side, pos, &b.key), v);
            }
        }
    }

    fn first_ts(&self) -> Option<u64> {
        self.by_time.keys().next().map(|p| p.0)
    }

    fn clear(&mut self) {
        self.by_time.clear();
        self.by_key.clear();
        self.dirty.clear();
    }
}

/// Both sides' buffers of one stream-stream join.
pub(crate) struct JoinState<K, VL, VR> {
    name: String,
    retention_ms: u64,
    pub(crate) left: SideBuf<K, VL>,
    pub(crate) right: SideBuf<K, VR>,
    deleted: Vec<Vec<u8>>,
    next_seq: u64,
    max_entries: usize,
}

/// What [`JoinState::expire`] gives back: each side's expired records.
pub(crate) type Expired<K, VL, VR> = (Vec<(Pos, Buffered<K, VL>)>, Vec<(Pos, Buffered<K, VR>)>);

impl<K, VL, VR> JoinState<K, VL, VR>
where
    K: Clone + Eq + Hash + StateCodec,
    VL: StateCodec,
    VR: StateCodec,
{
    pub(crate) fn new(name: &str, retention_ms: u64, max_entries: usize) -> Self {
        Self {
            name: name.to_owned(),
            retention_ms,
            left: SideBuf::new(0),
            right: SideBuf::new(1),
            deleted: Vec::new(),
            next_seq: 0,
            max_entries,
        }
    }

    fn next_pos(&mut self, ts: u64) -> Result<Pos, StreamError> {
        if self.left.by_time.len() + self.right.by_time.len() >= self.max_entries {
            return Err(StreamError::StateFull {
                store: self.name.clone(),
                max: self.max_entries,
            });
        }
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        Ok((ts, seq))
    }

    /// Keeps a record of side `S`.
    pub(crate) fn push<S: Side<K, VL, VR>>(
        &mut self,
        key: K,
        ts: u64,
        value: S::This,
        headers: Headers,
        matched: bool,
    ) -> Result<(), StreamError> {
        let pos = self.next_pos(ts)?;
        S::this(self).insert(pos, new_entry(key, value, headers, matched));
        Ok(())
    }

    /// Adds a stored entry of side `S` (during a restore).
    fn load<S: Side<K, VL, VR>>(&mut self, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
        let (_, pos, b) = decode_entry::<K, S::This>(k, v)?;
        self.next_seq = self.next_seq.max(pos.1.wrapping_add(1));
        S::this(self).insert(pos, b);
        Ok(())
    }

    /// Removes the records whose retention ended at `stream_time`.
    pub(crate) fn expire(&mut self, stream_time: u64, out: &mut Expired<K, VL, VR>) {
        let r = self.retention_ms;
        self.left
            .expire(stream_time, r, &mut self.deleted, &mut out.0);
        self.right
            .expire(stream_time, r, &mut self.deleted, &mut out.1);
    }

    /// When the record at `ts` leaves the buffer (stream time).
    pub(crate) fn expiry_ms(&self, ts: u64) -> u64 {
        ts.saturating_add(self.retention_ms).saturating_add(1)
    }

    /// Every buffered record as `(side, timestamp, key)`, by side then
    /// place.
    pub(crate) fn records(&self) -> Vec<(u8, u64, K)> {
        let l = self
            .left
            .by_time
            .iter()
            .map(|(p, b)| (0, p.0, b.key.clone()));
        let r = self
            .right
            .by_time
            .iter()
            .map(|(p, b)| (1, p.0, b.key.clone()));
        l.chain(r).collect()
    }
}

/// One side of a join, seen from a record arriving on it: its own
/// buffer, the other side's, and which way round a pair goes.
pub(crate) trait Side<K, VL, VR> {
    /// Whether this is the left side.
    const LEFT: bool;
    /// This side's values.
    type This: StateCodec;
    /// The other side's values.
    type Other: StateCodec;
    /// This side's buffer.
    fn this(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, Self::This>;
    /// The other side's buffer.
    fn other(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, Self::Other>;
    /// A value of this side and one of the other, as `(left, right)`.
    fn pair<'a>(
        this: Option<&'a Self::This>,
        other: Option<&'a Self::Other>,
    ) -> (Option<&'a VL>, Option<&'a VR>);
}

/// The left side of a join.
pub(crate) struct Left;

/// The right side of a join.
pub(crate) struct Right;

impl<K, VL: StateCodec, VR: StateCodec> Side<K, VL, VR> for Left {
    const LEFT: bool = true;
    type This = VL;
    type Other = VR;
    fn this(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, VL> {
        &mut state.left
    }
    fn other(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, VR> {
        &mut state.right
    }
    fn pair<'a>(this: Option<&'a VL>, other: Option<&'a VR>) -> (Option<&'a VL>, Option<&'a VR>) {
        (this, other)
    }
}

impl<K, VL: StateCodec, VR: StateCodec> Side<K, VL, VR> for Right {
    const LEFT: bool = false;
    type This = VR;
    type Other = VL;
    fn this(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, VR> {
        &mut state.right
    }
    fn other(state: &mut JoinState<K, VL, VR>) -> &mut SideBuf<K, VL> {
        &mut state.left
    }
    fn pair<'a>(this: Option<&'a VR>, other: Option<&'a VL>) -> (Option<&'a VL>, Option<&'a VR>) {
        (other, this)
    }
}

fn new_entry<K, V>(key: K, value: V, headers: Headers, matched: bool) -> Buffered<K, V> {
    Buffered {
        key,
        value,
        headers,
        matched,
        dirty: true,
        persisted: false,
    }
}

fn decode_entry<K: StateCodec, V: StateCodec>(
    k: &[u8],
    v: &[u8],
) -> Result<(u8, Pos, Buffered<K, V>), CodecError> {
    let mut r = Reader::new(k);
    let side = r.array::<1>("join side")?[0];
    let ts = u64::decode_from(&mut r)?;
    let seq = u64::decode_from(&mut r)?;
    let key = K::decode(r.rest())?;
    let mut r = Reader::new(v);
    let matched = r.array::<1>("join matched flag")?[0] != 0;
    let headers = Headers::decode_from(&mut r)?;
    let value = V::decode(r.rest())?;
    Ok((
        side,
        (ts, seq),
        Buffered {
            key,
            value,
            headers,
            matched,
            dirty: false,
            persisted: true,
        },
    ))
}

impl<K, VL, VR> StateSlot for JoinState<K, VL, VR>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    VL: StateCodec + Send + 'static,
    VR: StateCodec + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn flush(&mut self, batch: &mut WriteBatch) {
        for k in self.deleted.drain(..) {
            batch.delete(&self.name, k);
        }
        self.left.flush(&self.name, batch);
        self.right.flush(&self.name, batch);
    }
    fn reset(&mut self) {
        self.left.clear();
        self.right.clear();
        self.deleted.clear();
        self.next_seq = 0;
    }
    fn load_entry(&mut self, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
        // Only the first byte says which side: decode by it.
        match k.first() {
            Some(0) => self.load::<Left>(k, v),
            Some(1) => self.load::<Right>(k, v),
            _ => Err(CodecError::Invalid {
                what: "join side",
                reason: format!("entry key starts with {:?}", k.first()),
            }),
        }
    }
    fn next_deadline(&self) -> u64 {
        match (self.left.first_ts(), self.right.first_ts()) {
            (None, None) => u64::MAX,
            (a, b) => self.expiry_ms(a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX))),
        }
    }
    fn len(&self) -> usize {
        self.left.by_time.len() + self.right.by_time.len()
    }
}
