//! The open sessions of a session-windowed aggregation: their working set
//! in the task, written behind to a
//! [`KeyValueStore`](super::store::KeyValueStore) keyspace at commit
//! and read back on restore.
//!
//! Stored layout, one entry per open session: key = the session's last
//! record timestamp (8 bytes, big-endian), its first record timestamp (8
//! bytes, big-endian), then the encoded grouping key; value = the encoded
//! aggregate. Entries are ordered by session end, so the sessions that
//! close first come first. When a session grows or merges, its old entry
//! is deleted and the new one written; a closed session's entry is
//! deleted.

use std::collections::BTreeMap;
use std::hash::Hash;

use super::codec::{CodecError, Reader, StateCodec};
use super::session::SessionWindows;
use super::store::WriteBatch;
use super::task::{FxMap, StateSlot, StreamError};
use super::window::Windowed;

/// One open session of one key.
pub(crate) struct Session<A> {
    /// The last record's timestamp (the first is the map key).
    pub(crate) end: u64,
    pub(crate) agg: A,
    dirty: bool,
    /// The `(start, end)` it is stored under, if it was flushed.
    stored: Option<(u64, u64)>,
}

/// A session taken out of the state (merged away or closed).
pub(crate) struct Taken<A> {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) agg: A,
}

/// The open sessions: key → first timestamp → session, and an index by
/// session end for closing.
pub(crate) struct SessionState<K, A> {
    name: String,
    windows: SessionWindows,
    keys: FxMap<K, BTreeMap<u64, Session<A>>>,
    /// end → key → start (one key has at most one open session per end:
    /// its sessions are disjoint).
    by_end: BTreeMap<u64, FxMap<K, u64>>,
    dirty: Vec<(K, u64)>,
    deleted: Vec<Vec<u8>>,
    entries: usize,
    max_entries: usize,
}

fn store_key<K: StateCodec>(start: u64, end: u64, k: &K) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&end.to_be_bytes());
    b.extend_from_slice(&start.to_be_bytes());
    k.encode(&mut b);
    b
}

impl<K, A> SessionState<K, A>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    A: StateCodec + Send + 'static,
{
    pub(crate) fn new(name: &str, windows: SessionWindows, max_entries: usize) -> Self {
        Self {
            name: name.to_owned(),
            windows,
            keys: FxMap::default(),
            by_end: BTreeMap::new(),
            dirty: Vec::new(),
            deleted: Vec::new(),
            entries: 0,
            max_entries,
        }
    }

    /// The starts of the open sessions of `k` that a record at `ts` joins
    /// (those with `start - gap <= ts <= end + gap`), ascending, into
    /// `out` (cleared first).
    pub(crate) fn touching(&self, k: &K, ts: u64, out: &mut Vec<u64>) {
        out.clear();
        let Some(sessions) = self.keys.get(k) else {
            return;
        };
        let gap = self.windows.gap_ms();
        // Sessions of a key are disjoint: sorted by start, their ends are
        // sorted too, so the touching ones are the last few starting at or
        // before `ts + gap`.
        out.extend(
            sessions
                .range(..=ts.saturating_add(gap))
                .rev()
                .take_while(|(_, s)| s.end.saturating_add(gap) >= ts)
                .map(|(&start, _)| start),
        );
        out.reverse();
    }

    /// The last timestamp of the session of `k` starting at `start`.
    pub(crate) fn end_of(&self, k: &K, start: u64) -> Option<u64> {
        self.keys.get(k)?.get(&start).map(|s| s.end)
    }

    /// The session of `k` starting at `start`, to update in place (its
    /// bounds unchanged); marks it changed.
    pub(crate) fn get_mut(&mut self, k: &K, start: u64) -> Result<&mut Session<A>, StreamError> {
        let s = self
            .keys
            .get_mut(k)
            .and_then(|m| m.get_mut(&start))
            .ok_or(StreamError::Internal("session vanished"))?;
        if !s.dirty {
            s.dirty = true;
            self.dirty.push((k.clone(), start));
        }
        Ok(s)
    }

    /// Removes the session of `k` starting at `start` (its stored entry is
    /// deleted at the next flush).
    pub(crate) fn take(&mut self, k: &K, start: u64) -> Result<Taken<A>, StreamError> {
        let sessions = self
            .keys
            .get_mut(k)
            .ok_or(StreamError::Internal("session key vanished"))?;
        let s = sessions
            .remove(&start)
            .ok_or(StreamError::Internal("session vanished"))?;
        if sessions.is_empty() {
            self.keys.remove(k);
        }
        if let Some(bucket) = self.by_end.get_mut(&s.end) {
            bucket.remove(k);
            if bucket.is_empty() {
                self.by_end.remove(&s.end);
            }
        }
        if let Some((st, en)) = s.stored {
            self.deleted.push(store_key(st, en, k));
        }
        self.entries -= 1;
        Ok(Taken {
            start,
            end: s.end,
            agg: s.agg,
        })
    }

    /// Adds a new open session `[start, end]` of `k` (none of its open
    /// sessions may overlap it).
    pub(crate) fn insert(&mut self, k: K, start: u64, end: u64, agg: A) -> Result<(), StreamError> {
        if self.entries >= self.max_entries {
            return Err(StreamError::StateFull {
                store: self.name.clone(),
                max: self.max_entries,
            });
        }
        self.put(k, start, end, agg, None, true);
        Ok(())
    }

    fn put(&mut self, k: K, start: u64, end: u64, agg: A, stored: Option<(u64, u64)>, dirty: bool) {
        self.by_end.entry(end).or_default().insert(k.clone(), start);
        if dirty {
            self.dirty.push((k.clone(), start));
        }
        self.entries += 1;
        self.keys.entry(k).or_default().insert(
            start,
            Session {
                end,
                agg,
                dirty,
                stored,
            },
        );
    }

    /// Removes the sessions closed at `stream_time` (end + gap + grace
    /// reached) and returns them by end, then encoded key.
    pub(crate) fn close(
        &mut self,
        stream_time: u64,
        out: &mut Vec<(Windowed<K>, A, u64)>,
    ) -> Result<(), StreamError> {
        while let Some(entry) = self.by_end.first_entry() {
            if self.windows.close_ms(*entry.key()) > stream_time {
                break;
            }
            let bucket = entry.remove();
            let mut closing: Vec<(Vec<u8>, K, u64)> = bucket
                .into_iter()
                .map(|(k, start)| (k.to_bytes(), k, start))
                .collect();
            closing.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (_, key, start) in closing {
                // `take` finds the bucket gone: the index entry is already
                // removed with it.
                let t = self.take(&key, start)?;
                out.push((
                    Windowed {
                        key,
                        window: self.windows.window(t.start, t.end),
                    },
                    t.agg,
                    t.end,
                ));
            }
        }
        Ok(())
    }

    /// Every open session, by end, then encoded key.
    pub(crate) fn entries(&self) -> Vec<(Windowed<K>, &A)> {
        let mut v = Vec::with_capacity(self.entries);
        for (k, sessions) in &self.keys {
            for (&start, s) in sessions {
                v.push((k.to_bytes(), start, s.end, k, &s.agg));
            }
        }
        v.sort_unstable_by(|a, b| (a.2, &a.0, a.1).cmp(&(b.2, &b.0, b.1)));
        v.into_iter()
            .map(|(_, start, end, k, a)| {
                (
                    Windowed {
                        key: k.clone(),
                        window: self.windows.window(start, end),
                    },
                    a,
                )
            })
            .collect()
    }
}

impl<K, A> StateSlot for SessionState<K, A>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    A: StateCodec + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn flush(&mut self, batch: &mut WriteBatch) {
        for k in self.deleted.drain(..) {
            batch.delete(&self.name, k);
        }
        for (k, start) in self.dirty.drain(..) {
            let Some(s) = self.keys.get_mut(&k).and_then(|m| m.get_mut(&start)) else {
                continue; // merged away or closed since: deleted above if stored
            };
            if s.dirty {
                s.dirty = false;
                s.stored = Some((start, s.end));
                batch.put(&self.name, store_key(start, s.end, &k), s.agg.to_bytes());
            }
        }
    }
    fn reset(&mut self) {
        self.keys.clear();
        self.by_end.clear();
        self.dirty.clear();
        self.deleted.clear();
        self.entries = 0;
    }
    fn load_entry(&mut self, k: &[u8], v: &[u8]) -> Result<(), CodecError> {
        let mut r = Reader::new(k);
        let end = u64::decode_from(&mut r)?;
        let start = u64::decode_from(&mut r)?;
        let key = K::decode(r.rest())?;
        let agg = A::decode(v)?;
        self.put(key, start, end, agg, Some((start, end)), false);
        Ok(())
    }
    fn next_deadline(&self) -> u64 {
        self.by_end
            .keys()
            .next()
            .map_or(u64::MAX, |&end| self.windows.close_ms(end))
    }
    fn len(&self) -> usize {
        self.entries
    }
}
