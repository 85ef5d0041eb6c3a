//! [`WindowStore`]: reads a windowed aggregation's entries from a
//! [`KeyValueStore`].

use std::ops::Bound;

use super::codec::{Reader, StateCodec};
use super::store::{KeyValueStore, WriteBatch};
use super::task::StreamError;
use super::window::{Windowed, Windows};

/// A window store on top of a [`KeyValueStore`] keyspace.
///
/// Layout (what a windowed aggregation's commits write): key = window start
/// (8 bytes, big-endian) followed by the encoded grouping key; value = the
/// largest record timestamp in the window (8 bytes, big-endian) followed by
/// the encoded aggregate. Entries are ordered by window start, so the open
/// windows of a time range are one range read. A window's entries are
/// deleted when it closes.
#[derive(Clone, Copy)]
pub struct WindowStore<'a> {
    store: &'a dyn KeyValueStore,
    space: &'a str,
    windows: Windows,
}

impl std::fmt::Debug for WindowStore<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowStore")
            .field("space", &self.space)
            .field("windows", &self.windows)
            .finish()
    }
}

fn key_bytes<K: StateCodec>(start: u64, key: &K) -> Vec<u8> {
    let mut b = start.to_be_bytes().to_vec();
    key.encode(&mut b);
    b
}

impl<'a> WindowStore<'a> {
    /// The window store in keyspace `space` of `store`, for `windows`.
    pub fn new(store: &'a dyn KeyValueStore, space: &'a str, windows: Windows) -> Self {
        Self {
            store,
            space,
            windows,
        }
    }

    /// Adds the write of one entry to `batch`.
    pub fn put<K: StateCodec, A: StateCodec>(
        batch: &mut WriteBatch,
        space: &str,
        start_ms: u64,
        key: &K,
        max_ts: u64,
        agg: &A,
    ) {
        let mut v = max_ts.to_be_bytes().to_vec();
        agg.encode(&mut v);
        batch.put(space, key_bytes(start_ms, key), v);
    }

    /// The aggregate of `key` in the window starting at `start_ms`, with the
    /// largest record timestamp in it.
    pub fn fetch<K: StateCodec, A: StateCodec>(
        &self,
        key: &K,
        start_ms: u64,
    ) -> Result<Option<(A, u64)>, StreamError> {
        let Some(v) = self.store.get(self.space, &key_bytes(start_ms, key))? else {
            return Ok(None);
        };
        let (agg, ts) = self.decode_value::<A>(&v)?;
        Ok(Some((agg, ts)))
    }

    /// Entries of windows starting in `[from_ms, to_ms)`, at most `max`, by
    /// window start then key bytes.
    pub fn fetch_range<K: StateCodec, A: StateCodec>(
        &self,
        from_ms: u64,
        to_ms: u64,
        max: usize,
    ) -> Result<Vec<(Windowed<K>, A)>, StreamError> {
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let (lo, hi) = (from_ms.to_be_bytes(), to_ms.to_be_bytes());
        let entries =
            self.store
                .range(self.space, Bound::Included(&lo), Bound::Excluded(&hi), max)?;
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let mut r = Reader::new(&k);
            let start = u64::decode_from(&mut r).map_err(|e| self.dec(e))?;
            let key = K::decode(r.rest()).map_err(|e| self.dec(e))?;
            let (agg, _) = self.decode_value::<A>(&v)?;
            out.push((
                Windowed {
                    key,
                    window: self.windows.window_at(start),
                },
                agg,
            ));
        }
        Ok(out)
    }

    fn decode_value<A: StateCodec>(&self, v: &[u8]) -> Result<(A, u64), StreamError> {
        let mut r = Reader::new(v);
        let ts = u64::decode_from(&mut r).map_err(|e| self.dec(e))?;
        let agg = A::decode(r.rest()).map_err(|e| self.dec(e))?;
        Ok((agg, ts))
    }

    fn dec(&self, source: super::codec::CodecError) -> StreamError {
        StreamError::Decode {
            what: "store",
            name: self.space.to_owned(),
            source,
        }
    }
}
