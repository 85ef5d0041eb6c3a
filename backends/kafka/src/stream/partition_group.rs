//! The processor's input buffers: a bounded queue of fetched records per
//! input partition and the choice of the next record to process by
//! timestamp across them — Kafka Streams' `PartitionGroup`, with its
//! `max.task.idle.ms` rule ([`InputIdle`]).
//!
//! Sans-I/O: the processor fills the buffers from its consumer, tells the
//! group which partitions it owns, and answers, per empty partition,
//! whether the broker holds more of it ([`Lag`]); the group says which
//! partition's head to process next, or that the task must wait.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use smartmsg_engine::stream::Headers;

/// How long the processor may hold back the records it has buffered while
/// another of its input partitions has none, to process them in timestamp
/// order: Kafka Streams' `max.task.idle.ms`.
///
/// Whatever the setting, records are always picked from the partition
/// whose first buffered record has the lowest timestamp; the setting only
/// says what an input partition with nothing buffered does to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputIdle {
    /// Process what is buffered, whatever the empty partitions hold on the
    /// broker (Kafka Streams' `max.task.idle.ms = -1`): lowest latency,
    /// but the order across partitions depends on fetch timing.
    ProcessBuffered,
    /// An empty partition whose consumer position is behind its end on
    /// the broker (the end a `read_committed` consumer can read) holds the
    /// others back until its records are fetched; an empty partition
    /// that is caught up holds them back for this long (measured on the
    /// processor's [`Clock`](smartmsg_engine::Clock)), waiting for its
    /// producers. `Wait(Duration::ZERO)` is Kafka Streams' default
    /// (`max.task.idle.ms = 0`, since KIP-695): records already written
    /// are processed in timestamp order, but nothing waits for records
    /// not yet written.
    Wait(Duration),
}

/// The default is [`InputIdle::ProcessBuffered`]: finding out whether an
/// empty partition is behind costs a fetch round trip per empty partition
/// and step (about a quarter of a second on tansu), which cut the reaction
/// pipeline's throughput from 18,000 to 2,000 records/s in the Kafka stream
/// benchmark, where the tables' topics stay empty after their bootstrap.
impl Default for InputIdle {
    fn default() -> Self {
        Self::ProcessBuffered
    }
}

/// An input partition: the place of its topic in the processor's inputs
/// ([`ProcessorConfig::inputs`](super::ProcessorConfig::inputs)) and its
/// partition number. Its order is the tie-break among equal timestamps.
pub(crate) type PartitionKey = (usize, i32);

/// A fetched input record waiting to be processed.
#[derive(Debug, Clone)]
pub(crate) struct BufferedRecord {
    /// Its offset in its partition.
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub timestamp_ms: u64,
    pub headers: Headers,
}

/// What an empty partition has on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lag {
    /// Records the consumer has not fetched yet.
    Behind,
    /// Nothing beyond the consumer's position.
    CaughtUp,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Process the head of this partition.
    Process(PartitionKey),
    /// Records are buffered, but an empty partition holds them back.
    Wait,
    /// Nothing is buffered.
    Empty,
}

#[derive(Debug, Default)]
struct PartitionBuffer {
    records: VecDeque<BufferedRecord>,
    /// Since when (clock ms) the buffer has been empty while others held
    /// records.
    empty_since_ms: Option<u64>,
}

/// The buffers of the partitions the processor owns.
#[derive(Debug)]
pub(crate) struct PartitionGroup {
    partitions: BTreeMap<PartitionKey, PartitionBuffer>,
    capacity: usize,
}

impl PartitionGroup {
    /// Buffers of at most `capacity` records each (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            partitions: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The partition is owned (from now on an empty buffer of it counts).
    pub fn assign(&mut self, k: PartitionKey) {
        self.partitions.entry(k).or_default();
    }

    /// Appends a fetched record; true when the buffer is now full (the
    /// caller stops polling until it has processed some).
    pub fn push(&mut self, k: PartitionKey, record: BufferedRecord) -> bool {
        let b = self.partitions.entry(k).or_default();
        b.records.push_back(record);
        b.empty_since_ms = None;
        b.records.len() >= self.capacity
    }

    /// Takes the head of partition `k`.
    pub fn pop(&mut self, k: PartitionKey) -> Option<BufferedRecord> {
        self.partitions.get_mut(&k)?.records.pop_front()
    }

    /// The offset of the first record of `k` not processed yet, when some
    /// is buffered.
    pub fn head_offset(&self, k: PartitionKey) -> Option<i64> {
        self.partitions
            .get(&k)
            .and_then(|b| b.records.front())
            .map(|r| r.offset)
    }

    /// Whether some owned partition has nothing buffered.
    pub fn any_empty(&self) -> bool {
        self.partitions.values().any(|b| b.records.is_empty())
    }

    /// Records buffered in all.
    pub fn len(&self) -> usize {
        self.partitions.values().map(|b| b.records.len()).sum()
    }

    /// The partition whose head has the lowest timestamp (ties: the
    /// lowest [`PartitionKey`]).
    fn lowest_head(&self) -> Option<PartitionKey> {
        self.partitions
            .iter()
            .filter_map(|(k, b)| b.records.front().map(|r| (r.timestamp_ms, *k)))
            .min()
            .map(|(_, k)| k)
    }

    /// What to process next at clock time `now_ms` under `idle`, asking
    /// `lag` about each empty partition. An empty partition holds the
    /// others back while it is [`Lag::Behind`] (at most `idle +
    /// lag_bound`: a safety bound, should its position never reach the
    /// end), or, caught up, until it has been empty for `idle`.
    pub fn choose<E>(
        &mut self,
        now_ms: u64,
        idle: InputIdle,
        lag_bound: Duration,
        mut lag: impl FnMut(PartitionKey) -> Result<Lag, E>,
    ) -> Result<Choice, E> {
        let Some(head) = self.lowest_head() else {
            return Ok(Choice::Empty);
        };
        let InputIdle::Wait(idle) = idle else {
            return Ok(Choice::Process(head));
        };
        let idle_ms = idle.as_millis() as u64;
        let bound_ms = idle_ms.saturating_add(lag_bound.as_millis() as u64);
        let mut wait = false;
        for (k, b) in &mut self.partitions {
            if !b.records.is_empty() {
                continue;
            }
            let since = *b.empty_since_ms.get_or_insert(now_ms);
            let waited = now_ms.saturating_sub(since);
            let held = match lag(*k)? {
                Lag::Behind if waited >= bound_ms => {
                    tracing::warn!(
                        partition = ?k,
                        waited_ms = waited,
                        "an empty input partition is still behind its end: processing the others"
                    );
                    false
                }
                Lag::Behind => true,
                Lag::CaughtUp => waited < idle_ms,
            };
            wait |= held;
        }
        Ok(if wait {
            Choice::Wait
        } else {
            Choice::Process(head)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(offset: i64, ts: u64) -> BufferedRecord {
        BufferedRecord {
            offset,
            key: Vec::new(),
            value: Vec::new(),
            timestamp_ms: ts,
            headers: Headers::new(),
        }
    }

    fn caught_up(_: PartitionKey) -> Result<Lag, ()> {
        Ok(Lag::CaughtUp)
    }

    /// Drains `g` (everything caught up), giving (partition, offset).
    fn drain(g: &mut PartitionGroup) -> Vec<(PartitionKey, i64)> {
        let mut out = Vec::new();
        while let Choice::Process(k) = g
            .choose(0, InputIdle::ProcessBuffered, Duration::ZERO, caught_up)
            .unwrap()
        {
            out.push((k, g.pop(k).unwrap().offset));
        }
        out
    }

    #[test]
    fn picks_the_lowest_head_timestamp_ties_by_partition_order() {
        let mut g = PartitionGroup::new(10);
        for (o, ts) in [(0, 5), (1, 3), (2, 9)] {
            g.push((1, 0), rec(o, ts));
        }
        for (o, ts) in [(0, 5), (1, 8)] {
            g.push((0, 0), rec(o, ts));
        }
        // Heads 5 (topic 0) and 5 (topic 1): topic 0 first; a partition
        // keeps its own order (3 after 5).
        assert_eq!(
            drain(&mut g),
            vec![
                ((0, 0), 0),
                ((1, 0), 0),
                ((1, 0), 1),
                ((0, 0), 1),
                ((1, 0), 2)
            ]
        );
        assert_eq!(
            g.choose(0, InputIdle::default(), Duration::ZERO, caught_up),
            Ok(Choice::Empty)
        );
    }

    #[test]
    fn an_empty_partition_holds_the_others_back() {
        let mut g = PartitionGroup::new(10);
        g.assign((0, 0));
        g.push((1, 0), rec(0, 1));
        let behind = |_: PartitionKey| Ok::<_, ()>(Lag::Behind);
        let idle = InputIdle::Wait(Duration::from_millis(100));
        let bound = Duration::from_secs(30);
        // Behind: waits up to idle + bound.
        assert_eq!(g.choose(1_000, idle, bound, behind), Ok(Choice::Wait));
        assert_eq!(g.choose(31_099, idle, bound, behind), Ok(Choice::Wait));
        assert_eq!(
            g.choose(31_100, idle, bound, behind),
            Ok(Choice::Process((1, 0)))
        );
        // Caught up: waits for `idle` from when it was first found empty.
        let mut g = PartitionGroup::new(10);
        g.assign((0, 0));
        g.push((1, 0), rec(0, 1));
        assert_eq!(g.choose(1_000, idle, bound, caught_up), Ok(Choice::Wait));
        assert_eq!(g.choose(1_099, idle, bound, caught_up), Ok(Choice::Wait));
        assert_eq!(
            g.choose(1_100, idle, bound, caught_up),
            Ok(Choice::Process((1, 0)))
        );
        // Zero idle: a caught-up partition holds nothing back.
        let zero = InputIdle::Wait(Duration::ZERO);
        g.push((1, 0), rec(1, 2));
        assert_eq!(
            g.choose(5_000, zero, bound, caught_up),
            Ok(Choice::Process((1, 0)))
        );
        assert_eq!(g.choose(5_000, zero, bound, behind), Ok(Choice::Wait));
        // Data arriving resets the timer.
        g.push((0, 0), rec(0, 7));
        assert_eq!(
            g.choose(5_000, zero, bound, behind),
            Ok(Choice::Process((1, 0)))
        );
    }

    #[test]
    fn a_full_buffer_says_so_and_pops_in_offset_order() {
        let mut g = PartitionGroup::new(4);
        assert!(!g.push((0, 0), rec(0, 1)));
        assert!(!g.push((0, 0), rec(1, 1)));
        assert!(!g.push((0, 0), rec(2, 1)));
        assert!(g.push((0, 0), rec(3, 1)));
        assert_eq!(g.head_offset((0, 0)), Some(0));
        assert_eq!(g.pop((0, 0)).map(|r| r.offset), Some(0));
        assert_eq!(g.pop((0, 0)).map(|r| r.offset), Some(1));
        assert_eq!(g.head_offset((0, 0)), Some(2));
        assert!(!g.push((0, 0), rec(4, 1)));
        assert_eq!(g.pop((0, 0)).map(|r| r.offset), Some(2));
        assert_eq!(g.len(), 2);
        assert_eq!(g.pop((0, 0)).map(|r| r.offset), Some(3));
        assert_eq!(g.pop((0, 0)).map(|r| r.offset), Some(4));
        assert_eq!(g.len(), 0);
        assert!(g.any_empty());
        assert_eq!(g.head_offset((0, 0)), None);
    }
}
