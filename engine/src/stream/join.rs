//! Stream-stream joins within a time window: [`JoinWindows`],
//! [`KStream::join_stream`], [`KStream::left_join_stream`] and
//! [`KStream::outer_join_stream`].

use super::codec::StateCodec;
use super::join_store::{Buffered, Expired, JoinState, Left, Pos, Right, Side};
use super::task::{Ctx, Node, StreamError};
use super::topology::{Data, Fanout, KStream, Key};
use super::{Headers, Record};

/// How far apart in time two records of a stream-stream join may be.
///
/// A left record `l` and a right record `r` with the same key join when
/// `l.ts - before <= r.ts <= l.ts + after`. A record's join window closes
/// when stream time passes its window's far end plus the grace period —
/// `l.ts + after + grace` for a left record, `r.ts + before + grace` for a
/// right one; a record whose window has closed when it arrives is late:
/// it is counted in
/// [`TaskMetrics::late_records`](super::TaskMetrics::late_records) and
/// dropped (it joins nothing and is never emitted unmatched).
///
/// A record is kept until no record of the other side can still join it
/// on time: until stream time passes `ts + before + after + grace`
/// ([`JoinWindows::retention_ms`]). That is also when a left or outer
/// join emits it unmatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinWindows {
    before_ms: u64,
    after_ms: u64,
    grace_ms: u64,
}

impl JoinWindows {
    /// Right records from `before_ms` before to `after_ms` after each left
    /// record (both ends included) join it; no grace.
    pub fn of(before_ms: u64, after_ms: u64) -> Self {
        Self {
            before_ms,
            after_ms,
            grace_ms: 0,
        }
    }

    /// Records at most `difference_ms` apart join, either way round (Kafka
    /// Streams' `JoinWindows.ofTimeDifference`); no grace.
    pub fn symmetric(difference_ms: u64) -> Self {
        Self::of(difference_ms, difference_ms)
    }

    /// The same windows with a grace period of `grace_ms`.
    pub fn grace(mut self, grace_ms: u64) -> Self {
        self.grace_ms = grace_ms;
        self
    }

    /// How long before a left record a right record may be.
    pub fn before_ms(&self) -> u64 {
        self.before_ms
    }

    /// How long after a left record a right record may be.
    pub fn after_ms(&self) -> u64 {
        self.after_ms
    }

    /// The grace period.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// How long past its timestamp a record is kept (and a left or outer
    /// join waits before emitting it unmatched): `before + after + grace`.
    pub fn retention_ms(&self) -> u64 {
        self.before_ms
            .saturating_add(self.after_ms)
            .saturating_add(self.grace_ms)
    }
}

/// A record entering a join, tagged with its side.
#[derive(Clone)]
pub(crate) enum JoinIn<L, R> {
    Left(L),
    Right(R),
}

/// Which sides a join emits unmatched.
#[derive(Clone, Copy)]
struct Outer {
    left: bool,
    right: bool,
}

impl Outer {
    /// Whether side `S`, then the other side, is emitted unmatched.
    fn sides<K, VL, VR, S: Side<K, VL, VR>>(self) -> (bool, bool) {
        if S::LEFT {
            (self.left, self.right)
        } else {
            (self.right, self.left)
        }
    }
}

impl<K: Key, V: Data + StateCodec> KStream<K, V> {
    /// Joins this stream with `other` within `windows` (inner join): for
    /// each pair of records with the same key within the windows, sends
    /// `joiner(left, right)` as soon as the second of the two arrives.
    ///
    /// Both sides' records are kept in the store `store` until their
    /// window closes. Both streams must be of this topology and keyed
    /// alike (co-partitioned). A joined record has the later of the two
    /// timestamps and the headers of the record that arrived second (the
    /// one that completed the pair).
    ///
    /// ```
    /// use smartmsg_engine::stream::{JoinWindows, TestDriver, Topology};
    ///
    /// let t = Topology::new();
    /// let views = t.stream::<u32, String>("views");
    /// let clicks = t.stream::<u32, String>("clicks");
    /// views
    ///     .join_stream(&clicks, JoinWindows::of(0, 1_000), "view-click", |v, c| {
    ///         format!("{v}->{c}")
    ///     })
    ///     .to("clicked-views");
    /// let mut d = TestDriver::new(t).unwrap();
    /// d.pipe("views", 7u32, "ad1".to_string(), 10_000).unwrap();
    /// d.pipe("clicks", 7u32, "buy".to_string(), 10_400).unwrap();
    /// d.pipe("clicks", 7u32, "late".to_string(), 12_000).unwrap(); // 2 s after: no
    /// let out = d.read_key_values::<u32, String>("clicked-views").unwrap();
    /// assert_eq!(out, vec![(7, "ad1->buy".to_string())]);
    /// ```
    pub fn join_stream<VO, VR, F>(
        &self,
        other: &KStream<K, VO>,
        windows: JoinWindows,
        store: &str,
        mut joiner: F,
    ) -> KStream<K, VR>
    where
        VO: Data + StateCodec,
        VR: Data,
        F: FnMut(&V, &VO) -> VR + Send + 'static,
    {
        let outer = Outer {
            left: false,
            right: false,
        };
        self.stream_join(other, windows, store, outer, move |l, r| match (l, r) {
            (Some(l), Some(r)) => Some(joiner(l, r)),
            _ => None,
        })
    }

    /// Like [`KStream::join_stream`], and a left record that joined no
    /// right record is sent as `joiner(left, None)` once its window has
    /// closed and no right record can still join it on time (stream time
    /// past `ts + before + after + grace`), with its own timestamp and
    /// headers. A left record that joined is never sent with `None`.
    pub fn left_join_stream<VO, VR, F>(
        &self,
        other: &KStream<K, VO>,
        windows: JoinWindows,
        store: &str,
        mut joiner: F,
    ) -> KStream<K, VR>
    where
        VO: Data + StateCodec,
        VR: Data,
        F: FnMut(&V, Option<&VO>) -> VR + Send + 'static,
    {
        let outer = Outer {
            left: true,
            right: false,
        };
        self.stream_join(other, windows, store, outer, move |l, r| {
            l.map(|l| joiner(l, r))
        })
    }

    /// Like [`KStream::left_join_stream`] on both sides: an unmatched
    /// right record is sent as `joiner(None, Some(right))` in the same way.
    /// The joiner never gets `(None, None)`.
    pub fn outer_join_stream<VO, VR, F>(
        &self,
        other: &KStream<K, VO>,
        windows: JoinWindows,
        store: &str,
        mut joiner: F,
    ) -> KStream<K, VR>
    where
        VO: Data + StateCodec,
        VR: Data,
        F: FnMut(Option<&V>, Option<&VO>) -> VR + Send + 'static,
    {
        let outer = Outer {
            left: true,
            right: true,
        };
        self.stream_join(other, windows, store, outer, move |l, r| Some(joiner(l, r)))
    }

    fn stream_join<VO, VR, J>(
        &self,
        other: &KStream<K, VO>,
        windows: JoinWindows,
        store: &str,
        outer: Outer,
        joiner: J,
    ) -> KStream<K, VR>
    where
        VO: Data + StateCodec,
        VR: Data,
        J: FnMut(Option<&V>, Option<&VO>) -> Option<VR> + Send + 'static,
    {
        let state = self.add_state(|max| {
            Box::new(JoinState::<K, V, VO>::new(
                store,
                windows.retention_ms(),
                max,
            ))
        });
        let left = self.map_values(JoinIn::<V, VO>::Left);
        let both = if self.check_same(other, "join_stream") {
            left.merge(&other.map_values(JoinIn::<V, VO>::Right))
        } else {
            left // the build fails: ForeignStream
        };
        both.child(move |next| StreamJoin {
            state,
            windows,
            outer,
            joiner,
            next,
            hits: Vec::new(),
            pending: Vec::new(),
            expired: (Vec::new(), Vec::new()),
        })
    }
}

/// An unmatched record to send, keyed for order: timestamp, side (`0`
/// left), arrival.
type Unmatched<K, V> = (u64, u8, u64, Record<K, V>);

/// The node of a stream-stream join, fed by both sides (merged).
struct StreamJoin<J, K, VL, VR, VO> {
    state: usize,
    windows: JoinWindows,
    outer: Outer,
    joiner: J,
    next: Fanout<K, VO>,
    hits: Vec<Pos>,
    pending: Vec<Record<K, VO>>,
    expired: Expired<K, VL, VR>,
}

impl<J, K, VL, VR, VO> StreamJoin<J, K, VL, VR, VO>
where
    K: Key,
    VL: Data + StateCodec,
    VR: Data + StateCodec,
    VO: Data,
    J: FnMut(Option<&VL>, Option<&VR>) -> Option<VO> + Send,
{
    /// A record of side `S` arrives: joins the other side's records in
    /// its window, then is kept (unless it is late).
    fn arrive<S: Side<K, VL, VR>>(
        &mut self,
        ctx: &mut Ctx,
        key: K,
        value: S::This,
        ts: u64,
        headers: Headers,
    ) -> Result<(), StreamError> {
        let w = self.windows;
        // How far before and after a record of this side the other side's
        // records join it.
        let (back, ahead) = if S::LEFT {
            (w.before_ms, w.after_ms)
        } else {
            (w.after_ms, w.before_ms)
        };
        let (this_outer, other_outer) = self.outer.sides::<K, VL, VR, S>();
        if ts.saturating_add(ahead).saturating_add(w.grace_ms) < ctx.stream_time {
            ctx.metrics.late_records += 1;
            return Ok(());
        }
        let state = ctx.state_mut::<JoinState<K, VL, VR>>(self.state)?;
        let (lo, hi) = (ts.saturating_sub(back), ts.saturating_add(ahead));
        let other = S::other(state);
        other.find(&key, lo, hi, &mut self.hits);
        for &pos in &self.hits {
            if other_outer {
                other.set_matched(pos);
            }
            let Some(o) = other.get(pos) else {
                continue;
            };
            let (l, r) = S::pair(Some(&value), Some(&o.value));
            if let Some(value) = (self.joiner)(l, r) {
                self.pending.push(Record {
                    key: key.clone(),
                    value,
                    timestamp_ms: ts.max(pos.0),
                    headers: headers.clone(),
                });
            }
        }
        let matched = !self.hits.is_empty();
        let kept = if this_outer { headers } else { Headers::new() };
        state.push::<S>(key, ts, value, kept, matched)?;
        let expiry = state.expiry_ms(ts);
        ctx.next_deadline = ctx.next_deadline.min(expiry);
        Ok(())
    }

    /// The expired records of side `S` that joined nothing, sent by an
    /// outer side, into `out`, each tagged `(timestamp, side, arrival)`
    /// to be sent in that order.
    fn unmatched<S: Side<K, VL, VR>>(
        &mut self,
        expired: &mut Vec<(Pos, Buffered<K, S::This>)>,
        out: &mut Vec<Unmatched<K, VO>>,
    ) {
        let (outer, _) = self.outer.sides::<K, VL, VR, S>();
        let side = u8::from(!S::LEFT);
        for (pos, b) in expired.drain(..) {
            if outer && !b.matched {
                let (l, r) = S::pair(Some(&b.value), None);
                if let Some(value) = (self.joiner)(l, r) {
                    let rec = Record {
                        key: b.key,
                        value,
                        timestamp_ms: pos.0,
                        headers: b.headers,
                    };
                    out.push((pos.0, side, pos.1, rec));
                }
            }
        }
    }
}

impl<J, K, VL, VR, VO> Node<K, JoinIn<VL, VR>> for StreamJoin<J, K, VL, VR, VO>
where
    K: Key,
    VL: Data + StateCodec,
    VR: Data + StateCodec,
    VO: Data,
    J: FnMut(Option<&VL>, Option<&VR>) -> Option<VO> + Send,
{
    fn process(
        &mut self,
        ctx: &mut Ctx,
        rec: Record<K, JoinIn<VL, VR>>,
    ) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms: ts,
            headers,
        } = rec;
        let done = match value {
            JoinIn::Left(value) => self.arrive::<Left>(ctx, key, value, ts, headers),
            JoinIn::Right(value) => self.arrive::<Right>(ctx, key, value, ts, headers),
        };
        let sent = self.next.process_each(ctx, self.pending.drain(..));
        done.and(sent)
    }

    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        let stream_time = ctx.stream_time;
        let mut expired = std::mem::take(&mut self.expired);
        ctx.state_mut::<JoinState<K, VL, VR>>(self.state)?
            .expire(stream_time, &mut expired);
        // Unmatched records of the outer sides, by timestamp, then side
        // (left first), then arrival.
        let mut unmatched = Vec::new();
        self.unmatched::<Left>(&mut expired.0, &mut unmatched);
        self.unmatched::<Right>(&mut expired.1, &mut unmatched);
        self.expired = expired;
        unmatched.sort_unstable_by_key(|u| (u.0, u.1, u.2));
        self.next
            .process_each(ctx, unmatched.into_iter().map(|u| u.3))?;
        self.next.advance(ctx)
    }
}
