//! [`TimerWheel`]: a pure, generic hierarchical timing wheel.
//!
//! # Shape
//!
//! - **Tick**: 1 ms. Times are `u64` milliseconds (any epoch; the delay
//!   queues use ms since the Unix epoch).
//! - **Levels**: [`LEVELS`] = 6 levels of [`SLOTS`] = 64 slots. A slot of
//!   level `l` spans `64^l` ms, so level 0 resolves single milliseconds and
//!   the whole wheel spans `64^6` ms = 2^36 ms ≈ 795 days ahead of the
//!   wheel's current time ([`WHEEL_RANGE_MS`]).
//! - **Beyond the range**: timers further ahead go to an overflow list and
//!   are placed into the wheel again whenever the wheel's time enters a new
//!   2^36 ms span. Any `u64` deadline is accepted; nothing is rejected.
//! - **In the past**: a timer whose deadline is at or before the wheel's
//!   current time expires on the next [`TimerWheel::advance`].
//!
//! # Costs
//!
//! Timers live in one slab (`Vec`) with a free list and doubly linked slot
//! lists, so [`insert`](TimerWheel::insert) and
//! [`cancel`](TimerWheel::cancel) are O(1) with no allocation per timer
//! (besides the slab's amortised growth). [`advance`](TimerWheel::advance)
//! finds the next occupied slot with one bitmap scan per level (so a jump of
//! days costs no more than a jump of a millisecond), expires level-0 slots
//! and cascades higher slots down; each timer is moved at most once per
//! level, so expiry is amortised O(1) per timer. Overflow timers cost O(n)
//! each time the wheel enters a new 2^36 ms span (every ~795 days of wheel
//! time).
//!
//! # Order
//!
//! One `advance` returns its expired timers ordered by deadline, ties in
//! insertion order.
//!
//! Modelled on the hierarchical wheels of Varghese & Lauck and tokio's timer
//! driver; like them it is driven by the caller (`advance(now_ms)`), never by
//! a clock.

use std::fmt;

/// Slots per level.
pub const SLOTS: usize = 64;
/// Levels of the wheel.
pub const LEVELS: usize = 6;
/// Milliseconds the wheel's levels span ahead of its current time (64^6 =
/// 2^36 ms, about 795 days); later deadlines wait in the overflow list.
pub const WHEEL_RANGE_MS: u64 = 1 << (6 * LEVELS);

const SLOT_BITS: u32 = 6;
const SLOT_MASK: u64 = (SLOTS as u64) - 1;
const TOP_SHIFT: u32 = SLOT_BITS * LEVELS as u32;
const LISTS: usize = LEVELS * SLOTS + 1;
const OVERFLOW: usize = LISTS - 1;
const NIL: u32 = u32::MAX;

/// Names a timer in its wheel, to cancel it. A key of a timer that has
/// expired or been cancelled is stale: it never names a later timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// A timer that expired: its deadline and its item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired<T> {
    /// The deadline it was inserted with (ms).
    pub due_ms: u64,
    /// The item.
    pub item: T,
}

struct Node<T> {
    item: Option<T>,
    due: u64,
    prev: u32,
    next: u32,
    /// Which list the node is in (meaningless when free).
    list: u16,
    generation: u32,
}

/// A hierarchical timing wheel of items `T` (see the [module docs](self)).
pub struct TimerWheel<T> {
    nodes: Vec<Node<T>>,
    /// Head of the free list (linked through `next`).
    free: u32,
    heads: Box<[u32; LISTS]>,
    tails: Box<[u32; LISTS]>,
    occupied: [u64; LEVELS],
    elapsed: u64,
    len: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("now_ms", &self.elapsed)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T> Default for TimerWheel<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose current time is `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self::with_capacity(now_ms, 0)
    }

    /// An empty wheel at `now_ms` with room for `capacity` timers before
    /// its slab grows.
    pub fn with_capacity(now_ms: u64, capacity: usize) -> Self {
        Self {
            nodes: Vec::with_capacity(capacity),
            free: NIL,
            heads: Box::new([NIL; LISTS]),
            tails: Box::new([NIL; LISTS]),
            occupied: [0; LEVELS],
            elapsed: now_ms,
            len: 0,
        }
    }

    /// The wheel's current time: the largest `now_ms` it was advanced to
    /// (or created at).
    pub fn now_ms(&self) -> u64 {
        self.elapsed
    }

    /// Number of timers pending.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a timer that expires at `due_ms` (at once, on the next
    /// [`advance`](Self::advance), if that is not after
    /// [`now_ms`](Self::now_ms)). O(1).
    ///
    /// The slab indexes timers with `u32`: more than about 4 billion
    /// pending timers at once abort like a failed allocation.
    pub fn insert(&mut self, due_ms: u64, item: T) -> TimerKey {
        let index = if self.free != NIL {
            let index = self.free;
            let node = &mut self.nodes[index as usize];
            self.free = node.next;
            node.item = Some(item);
            node.due = due_ms;
            index
        } else {
            let index = self.nodes.len();
            assert!(index < NIL as usize, "TimerWheel: too many timers");
            self.nodes.push(Node {
                item: Some(item),
                due: due_ms,
                prev: NIL,
                next: NIL,
                list: 0,
                generation: 0,
            });
            index as u32
        };
        self.link(index);
        self.len += 1;
        TimerKey {
            index,
            generation: self.nodes[index as usize].generation,
        }
    }

    /// Removes a pending timer and returns its item; `None` if the key is
    /// stale (the timer expired or was cancelled). O(1).
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        let node = self.nodes.get(key.index as usize)?;
        if node.generation != key.generation || node.item.is_none() {
            return None;
        }
        self.unlink(key.index);
        Some(self.release(key.index).1)
    }

    /// Whether `key` names a pending timer.
    pub fn contains(&self, key: TimerKey) -> bool {
        self.nodes
            .get(key.index as usize)
            .is_some_and(|n| n.generation == key.generation && n.item.is_some())
    }

    /// The pending timer's deadline and item, if `key` names one.
    pub fn get(&self, key: TimerKey) -> Option<(u64, &T)> {
        let n = self.nodes.get(key.index as usize)?;
        if n.generation != key.generation {
            return None;
        }
        n.item.as_ref().map(|item| (n.due, item))
    }

    /// Moves the wheel's time to `now_ms` (an earlier time counts as the
    /// current one) and returns every timer due by then, ordered by deadline
    /// (ties in insertion order).
    pub fn advance(&mut self, now_ms: u64) -> Vec<Expired<T>> {
        let mut out = Vec::new();
        self.advance_into(now_ms, &mut out);
        out
    }

    /// [`advance`](Self::advance) appending to `out` (no allocation when
    /// `out` has room). Returns how many timers expired.
    pub fn advance_into(&mut self, now_ms: u64, out: &mut Vec<Expired<T>>) -> usize {
        let start = out.len();
        let now = now_ms.max(self.elapsed);
        loop {
            if let Some((level, slot, time)) = self.next_expiration() {
                if time <= now {
                    self.elapsed = time;
                    self.process(level, slot, out);
                    continue;
                }
            }
            // Nothing in the levels is due by `now`. If `now` is in a later
            // top span than the wheel, the levels are empty (all their timers
            // lie in the wheel's span, before `now`), so the wheel may jump
            // to the earliest overflow timer (or to `now`) and place the
            // overflow again.
            if self.heads[OVERFLOW] != NIL && (now >> TOP_SHIFT) != (self.elapsed >> TOP_SHIFT) {
                let earliest = self.overflow_min();
                self.elapsed = earliest.min(now).max(self.elapsed);
                self.rehash_overflow();
                continue;
            }
            break;
        }
        if now > self.elapsed {
            // Valid: every remaining timer expires after `now`, within the
            // same top span (see above).
            self.elapsed = now;
        }
        out.len() - start
    }

    /// The earliest deadline among pending timers (exact). Costs a scan of
    /// the first occupied slot: a few timers in the near future, more when
    /// the nearest timer is far away.
    pub fn next_due(&self) -> Option<u64> {
        match self.next_expiration() {
            Some((level, slot, _)) => self.list_min(level * SLOTS + slot),
            None => self.list_min(OVERFLOW),
        }
    }

    /// A lower bound of [`next_due`](Self::next_due) in O(levels): the
    /// start of the first occupied slot. When it is `Some(t)`, advancing to
    /// anything before `t` expires nothing.
    pub fn next_expiration_ms(&self) -> Option<u64> {
        match self.next_expiration() {
            Some((_, _, t)) => Some(t),
            None => self.list_min(OVERFLOW),
        }
    }

    /// Removes every timer, returning their items (in no particular order).
    pub fn drain(&mut self) -> Vec<Expired<T>> {
        let mut out = Vec::with_capacity(self.len);
        for node in &mut self.nodes {
            if let Some(item) = node.item.take() {
                out.push(Expired {
                    due_ms: node.due,
                    item,
                });
            }
        }
        self.nodes.clear();
        self.free = NIL;
        self.heads.fill(NIL);
        self.tails.fill(NIL);
        self.occupied = [0; LEVELS];
        self.len = 0;
        out
    }

    /// Iterates over pending timers' deadlines and items, in no particular
    /// order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.nodes
            .iter()
            .filter_map(|n| n.item.as_ref().map(|item| (n.due, item)))
    }

    // -- internals ----------------------------------------------------------

    /// The list a deadline belongs to, relative to the current time.
    fn list_for(&self, due: u64) -> usize {
        let due = due.max(self.elapsed);
        let masked = (self.elapsed ^ due) | SLOT_MASK;
        let significant = 63 - masked.leading_zeros();
        let level = (significant / SLOT_BITS) as usize;
        if level >= LEVELS {
            OVERFLOW
        } else {
            level * SLOTS + ((due >> (SLOT_BITS * level as u32)) & SLOT_MASK) as usize
        }
    }

    /// Appends node `index` to the tail of the list its deadline belongs to.
    fn link(&mut self, index: u32) {
        let list = self.list_for(self.nodes[index as usize].due);
        let tail = self.tails[list];
        {
            let node = &mut self.nodes[index as usize];
            node.list = list as u16;
            node.prev = tail;
            node.next = NIL;
        }
        if tail == NIL {
            self.heads[list] = index;
            if list != OVERFLOW {
                self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
            }
        } else {
            self.nodes[tail as usize].next = index;
        }
        self.tails[list] = index;
    }

    fn unlink(&mut self, index: u32) {
        let (prev, next, list) = {
            let n = &self.nodes[index as usize];
            (n.prev, n.next, n.list as usize)
        };
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
        if self.heads[list] == NIL && list != OVERFLOW {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
    }

    /// Frees an unlinked node, returning its deadline and item.
    fn release(&mut self, index: u32) -> (u64, T) {
        let node = &mut self.nodes[index as usize];
        let item = node.item.take();
        node.generation = node.generation.wrapping_add(1);
        node.next = self.free;
        self.free = index;
        self.len -= 1;
        match item {
            Some(item) => (node.due, item),
            // Callers only release nodes they found occupied.
            None => unreachable!("TimerWheel: released a free node"),
        }
    }

    /// The next occupied slot: `(level, slot, start time)`. Lower levels
    /// always expire before higher ones.
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS * level as u32;
            let now_slot = (self.elapsed >> shift) & SLOT_MASK;
            let zeros = occupied.rotate_right(now_slot as u32).trailing_zeros() as u64;
            let slot = (zeros + now_slot) & SLOT_MASK;
            let span_bits = shift + SLOT_BITS;
            let level_start = if span_bits >= 64 {
                0
            } else {
                self.elapsed & !((1u64 << span_bits) - 1)
            };
            let time = level_start + (slot << shift);
            return Some((level, slot as usize, time));
        }
        None
    }

    /// Empties slot `(level, slot)`: level 0 expires into `out`, higher
    /// levels cascade into lower ones.
    fn process(&mut self, level: usize, slot: usize, out: &mut Vec<Expired<T>>) {
        let list = level * SLOTS + slot;
        let mut index = self.heads[list];
        self.heads[list] = NIL;
        self.tails[list] = NIL;
        self.occupied[level] &= !(1 << slot);
        if level == 0 {
            let start = out.len();
            let mut sorted = true;
            let mut last = 0u64;
            while index != NIL {
                let next = self.nodes[index as usize].next;
                let (due_ms, item) = self.release(index);
                sorted &= due_ms >= last;
                last = due_ms;
                out.push(Expired { due_ms, item });
                index = next;
            }
            if !sorted {
                // Only timers inserted in the past land out of order here.
                out[start..].sort_by_key(|e| e.due_ms);
            }
        } else {
            while index != NIL {
                let next = self.nodes[index as usize].next;
                self.link(index);
                index = next;
            }
        }
    }

    fn overflow_min(&self) -> u64 {
        self.list_min(OVERFLOW).unwrap_or(u64::MAX)
    }

    fn list_min(&self, list: usize) -> Option<u64> {
        let mut index = self.heads[list];
        let mut min = None;
        while index != NIL {
            let n = &self.nodes[index as usize];
            min = Some(min.map_or(n.due, |m: u64| m.min(n.due)));
            index = n.next;
        }
        min
    }

    /// Places every overflow timer again, relative to the current time.
    fn rehash_overflow(&mut self) {
        let mut index = self.heads[OVERFLOW];
        self.heads[OVERFLOW] = NIL;
        self.tails[OVERFLOW] = NIL;
        while index != NIL {
            let next = self.nodes[index as usize].next;
            self.link(index);
            index = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn dues(v: &[Expired<u32>]) -> Vec<(u64, u32)> {
        v.iter().map(|e| (e.due_ms, e.item)).collect()
    }

    #[test]
    fn expires_in_order_at_each_level() {
        let mut w = TimerWheel::new(0);
        let deadlines = [
            1u64,
            63,
            64,
            65,
            4095,
            4096,
            300_000,
            1 << 24,
            (1 << 30) + 7,
            WHEEL_RANGE_MS - 1,
        ];
        for (i, d) in deadlines.iter().enumerate().rev() {
            w.insert(*d, i as u32);
        }
        assert_eq!(w.len(), deadlines.len());
        assert_eq!(w.next_due(), Some(1));
        for (i, d) in deadlines.iter().enumerate() {
            assert!(w.advance(d - 1).is_empty(), "nothing before {d}");
            assert_eq!(dues(&w.advance(*d)), vec![(*d, i as u32)]);
        }
        assert!(w.is_empty());
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn a_big_jump_expires_everything_in_order() {
        let mut w = TimerWheel::new(1_700_000_000_000);
        let base = w.now_ms();
        let mut expect = Vec::new();
        for i in 0..1000u32 {
            let d = base + (u64::from(i) * 7_919 % 5_000_000);
            w.insert(d, i);
            expect.push((d, i));
        }
        expect.sort();
        assert_eq!(dues(&w.advance(base + 10_000_000)), expect);
        assert_eq!(w.now_ms(), base + 10_000_000);
    }

    #[test]
    fn past_timers_expire_on_the_next_advance_first() {
        let mut w = TimerWheel::new(1000);
        w.insert(1000, 1u32);
        w.insert(5, 2);
        w.insert(0, 3);
        w.insert(1001, 4);
        // Even an advance to an earlier time fires the past ones.
        assert_eq!(dues(&w.advance(10)), vec![(0, 3), (5, 2), (1000, 1)]);
        assert_eq!(w.now_ms(), 1000);
        assert_eq!(dues(&w.advance(1001)), vec![(1001, 4)]);
    }

    #[test]
    fn far_future_timers_overflow_and_come_back() {
        let mut w = TimerWheel::new(0);
        let far = [
            WHEEL_RANGE_MS,
            3 * WHEEL_RANGE_MS + 5,
            u64::MAX - 1,
            u64::MAX,
        ];
        for (i, d) in far.iter().enumerate() {
            w.insert(*d, i as u32);
        }
        w.insert(10, 99);
        assert_eq!(w.next_due(), Some(10));
        assert_eq!(dues(&w.advance(10)), vec![(10, 99)]);
        assert_eq!(w.next_due(), Some(WHEEL_RANGE_MS));
        assert!(w.advance(WHEEL_RANGE_MS - 1).is_empty());
        assert_eq!(dues(&w.advance(WHEEL_RANGE_MS)), vec![(WHEEL_RANGE_MS, 0)]);
        assert_eq!(
            dues(&w.advance(u64::MAX - 2)),
            vec![(3 * WHEEL_RANGE_MS + 5, 1)]
        );
        assert_eq!(
            dues(&w.advance(u64::MAX)),
            vec![(u64::MAX - 1, 2), (u64::MAX, 3)]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_is_exact_and_keys_go_stale() {
        let mut w = TimerWheel::new(0);
        let a = w.insert(100, 1u32);
        let b = w.insert(100, 2);
        let c = w.insert(1 << 40, 3);
        assert_eq!(w.get(a), Some((100, &1)));
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None, "stale");
        assert!(!w.contains(a));
        assert_eq!(w.cancel(c), Some(3));
        // The freed node is reused; the old key must not name the new timer.
        let d = w.insert(50, 4);
        assert_eq!(w.cancel(a), None);
        assert_eq!(w.cancel(c), None);
        assert_eq!(dues(&w.advance(1000)), vec![(50, 4), (100, 2)]);
        assert_eq!(w.cancel(b), None, "expired");
        assert_eq!(w.cancel(d), None, "expired");
        assert!(w.is_empty());
    }

    #[test]
    fn ties_come_out_in_insertion_order() {
        let mut w = TimerWheel::new(0);
        for i in 0..10u32 {
            w.insert(5000, i);
        }
        w.advance(100);
        for i in 10..20u32 {
            w.insert(5000, i);
        }
        let got: Vec<u32> = w.advance(5000).into_iter().map(|e| e.item).collect();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn drain_and_iter() {
        let mut w = TimerWheel::new(0);
        w.insert(1, 1u32);
        w.insert(1 << 50, 2);
        let mut seen: Vec<u32> = w.iter().map(|(_, i)| *i).collect();
        seen.sort();
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(w.drain().len(), 2);
        assert!(w.is_empty());
        assert!(w.advance(u64::MAX).is_empty());
        let k = w.insert(3, 3);
        assert_eq!(w.cancel(k), Some(3));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert at now + offset (offset may be negative: in the past).
        Insert(i64),
        /// Insert at an absolute time.
        InsertAt(u64),
        /// Cancel the n-th live timer (mod count).
        Cancel(usize),
        /// Cancel a key that went stale.
        CancelStale(usize),
        /// Advance by delta.
        Advance(u64),
        /// Advance to an earlier time (a no-op for time).
        AdvanceBack(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (-100i64..200).prop_map(Op::Insert),
            3 => (0i64..100_000).prop_map(Op::Insert),
            2 => (0i64..(1i64 << 40)).prop_map(Op::Insert),
            1 => prop_oneof![
                Just(u64::MAX),
                Just(u64::MAX - 1),
                (0u64..u64::MAX),
                Just(WHEEL_RANGE_MS),
                Just(WHEEL_RANGE_MS * 2 - 1)
            ]
            .prop_map(Op::InsertAt),
            2 => any::<usize>().prop_map(Op::Cancel),
            1 => any::<usize>().prop_map(Op::CancelStale),
            3 => prop_oneof![
                0u64..3,
                0u64..100,
                0u64..10_000,
                0u64..(1 << 38),
                Just(u64::MAX / 4)
            ]
            .prop_map(Op::Advance),
            1 => (0u64..1000).prop_map(Op::AdvanceBack),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Same expiries, in the same order (by deadline, ties by insertion),
        /// as a BTreeMap reference; cancel agrees; stale keys stay stale.
        #[test]
        fn matches_a_btreemap_model(
            start in prop_oneof![Just(0u64), 0u64..(1 << 42), Just(u64::MAX - 1000)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut w = TimerWheel::new(start);
            // (due, seq) -> (key, item)
            let mut model: BTreeMap<(u64, u64), (TimerKey, u64)> = BTreeMap::new();
            let mut now = start;
            let mut seq = 0u64;
            let mut stale: Vec<TimerKey> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(off) => {
                        let due = now.saturating_add_signed(off);
                        let k = w.insert(due, seq);
                        model.insert((due, seq), (k, seq));
                        seq += 1;
                    }
                    Op::InsertAt(due) => {
                        let k = w.insert(due, seq);
                        model.insert((due, seq), (k, seq));
                        seq += 1;
                    }
                    Op::Cancel(i) => {
                        if !model.is_empty() {
                            let key = *model.keys().nth(i % model.len()).unwrap();
                            let (k, item) = model.remove(&key).unwrap();
                            prop_assert_eq!(w.cancel(k), Some(item));
                            stale.push(k);
                        }
                    }
                    Op::CancelStale(i) => {
                        if !stale.is_empty() {
                            let k = stale[i % stale.len()];
                            prop_assert_eq!(w.cancel(k), None);
                        }
                    }
                    Op::Advance(d) => {
                        now = now.saturating_add(d);
                        let got: Vec<(u64, u64)> =
                            w.advance(now).into_iter().map(|e| (e.due_ms, e.item)).collect();
                        let mut expect = Vec::new();
                        while let Some(entry) = model.first_entry() {
                            if entry.key().0 > now {
                                break;
                            }
                            let ((due, _), (k, item)) = entry.remove_entry();
                            stale.push(k);
                            expect.push((due, item));
                        }
                        prop_assert_eq!(got, expect);
                        prop_assert_eq!(w.now_ms(), now);
                    }
                    Op::AdvanceBack(d) => {
                        let got: Vec<(u64, u64)> = w
                            .advance(now.saturating_sub(d))
                            .into_iter()
                            .map(|e| (e.due_ms, e.item))
                            .collect();
                        let mut expect = Vec::new();
                        while let Some(entry) = model.first_entry() {
                            if entry.key().0 > now {
                                break;
                            }
                            let ((due, _), (k, item)) = entry.remove_entry();
                            stale.push(k);
                            expect.push((due, item));
                        }
                        prop_assert_eq!(got, expect);
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                prop_assert_eq!(w.next_due(), model.keys().next().map(|k| k.0));
                if let Some(lb) = w.next_expiration_ms() {
                    prop_assert!(lb <= model.keys().next().unwrap().0.max(now));
                }
            }
        }
    }
}
