//! The registry of pending jobs and tombstones, fed by the journal.
//!
//! Pure data: every process that opens a queue rebuilds it by reading the
//! journal stream from its start, and keeps it current by following the
//! stream (its own writes are applied at once as well). Applying a record is
//! idempotent and commutes with re-reading, so a replay after a reconnect is
//! harmless.

use std::collections::{BTreeSet, HashMap};

use smartmsg_engine::JobId;

use crate::codec::JournalRecord;

/// A pending job incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingEntry {
    /// Its incarnation.
    pub seq: u64,
    /// Revision (a newer one replaces an older one).
    pub rev: u64,
    /// When it is due now: its due time, a retry time, or (in the process
    /// holding it) its lease deadline.
    pub at_ms: u64,
    /// Content hash of what was scheduled.
    pub hash: u64,
}

/// A tombstone: incarnations below `before` are finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tombstone {
    /// Incarnations with a smaller `seq` are gone.
    pub before: u64,
    /// Kept until then (ms since the epoch, wall clock).
    pub keep_until_ms: u64,
}

/// Pending jobs by id and due time, and tombstones by id.
#[derive(Debug, Default)]
pub struct Registry {
    pending: HashMap<JobId, PendingEntry>,
    by_due: BTreeSet<(u64, JobId)>,
    retired: HashMap<JobId, Tombstone>,
}

impl Registry {
    /// Applies one journal record (barriers are ignored).
    pub fn apply(&mut self, rec: &JournalRecord) {
        match rec {
            JournalRecord::Pending {
                id,
                seq,
                rev,
                at_ms,
                hash,
            } => self.pending(
                id,
                PendingEntry {
                    seq: *seq,
                    rev: *rev,
                    at_ms: *at_ms,
                    hash: *hash,
                },
            ),
            JournalRecord::Retired {
                id,
                before,
                keep_until_ms,
            } => self.retire(id, *before, *keep_until_ms),
            JournalRecord::Barrier { .. } => {}
        }
    }

    /// Records a pending incarnation (a newer or equal `(seq, rev)`
    /// replaces the entry; an older or already retired one is ignored).
    pub fn pending(&mut self, id: &JobId, e: PendingEntry) {
        if self.is_retired(id, e.seq) {
            return;
        }
        if let Some(old) = self.pending.get(id).copied() {
            if (e.seq, e.rev) < (old.seq, old.rev) {
                return;
            }
            self.by_due.remove(&(old.at_ms, id.clone()));
        }
        self.pending.insert(id.clone(), e);
        self.by_due.insert((e.at_ms, id.clone()));
    }

    /// Records a tombstone and drops the pending entry it covers.
    pub fn retire(&mut self, id: &JobId, before: u64, keep_until_ms: u64) {
        let t = self.retired.entry(id.clone()).or_insert(Tombstone {
            before,
            keep_until_ms,
        });
        t.before = t.before.max(before);
        t.keep_until_ms = t.keep_until_ms.max(keep_until_ms);
        let before = t.before;
        if let Some(old) = self.pending.get(id).copied() {
            if old.seq < before {
                self.pending.remove(id);
                self.by_due.remove(&(old.at_ms, id.clone()));
            }
        }
    }

    /// Whether incarnation `seq` of `id` is finished (its copies are
    /// dropped on sight).
    pub fn is_retired(&self, id: &JobId, seq: u64) -> bool {
        self.retired.get(id).is_some_and(|t| seq < t.before)
    }

    /// The pending incarnation of `id`, if any.
    pub fn get(&self, id: &JobId) -> Option<PendingEntry> {
        self.pending.get(id).copied()
    }

    /// Number of pending jobs.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether no job is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Number of tombstones kept.
    pub fn tombstones(&self) -> usize {
        self.retired.len()
    }

    /// The earliest `at_ms` among pending jobs.
    pub fn next_due(&self) -> Option<u64> {
        self.by_due.first().map(|(at, _)| *at)
    }

    /// Forgets tombstones whose keep time has passed.
    pub fn prune(&mut self, now_ms: u64) {
        self.retired.retain(|_, t| t.keep_until_ms >= now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> JobId {
        JobId::new(s).unwrap()
    }

    fn p(seq: u64, at_ms: u64) -> PendingEntry {
        PendingEntry {
            seq,
            rev: 0,
            at_ms,
            hash: 0,
        }
    }

    #[test]
    fn pending_retire_and_reschedule() {
        let mut r = Registry::default();
        r.pending(&id("a"), p(10, 500));
        r.pending(&id("b"), p(11, 300));
        assert_eq!(r.len(), 2);
        assert_eq!(r.next_due(), Some(300));
        r.retire(&id("b"), 12, 1000);
        assert_eq!(r.len(), 1);
        assert!(r.is_retired(&id("b"), 11));
        assert!(!r.is_retired(&id("b"), 12));
        // A replayed older pending record stays retired.
        r.pending(&id("b"), p(11, 300));
        assert_eq!(r.len(), 1);
        // A new incarnation after the tombstone is pending.
        r.pending(&id("b"), p(13, 700));
        assert_eq!(r.get(&id("b")).unwrap().at_ms, 700);
        // A newer revision of the same incarnation moves it; an older one
        // does not.
        r.pending(
            &id("a"),
            PendingEntry {
                rev: 5,
                ..p(10, 900)
            },
        );
        r.pending(
            &id("a"),
            PendingEntry {
                rev: 4,
                ..p(10, 100)
            },
        );
        assert_eq!(r.next_due(), Some(700));
        assert_eq!(r.get(&id("a")).unwrap().at_ms, 900);
        r.prune(1001);
        assert_eq!(r.tombstones(), 0);
    }

    #[test]
    fn replay_in_any_order_converges() {
        let recs = vec![
            JournalRecord::Pending {
                id: id("x"),
                seq: 1,
                rev: 1,
                at_ms: 5,
                hash: 1,
            },
            JournalRecord::Retired {
                id: id("x"),
                before: 2,
                keep_until_ms: 99,
            },
            JournalRecord::Pending {
                id: id("x"),
                seq: 3,
                rev: 3,
                at_ms: 6,
                hash: 2,
            },
        ];
        let mut a = Registry::default();
        for r in &recs {
            a.apply(r);
        }
        for r in &recs {
            a.apply(r);
        }
        assert_eq!(a.get(&id("x")).unwrap().seq, 3);
        assert_eq!(a.len(), 1);
    }
}
