//! Session windows: [`SessionWindows`] (an inactivity gap and a grace
//! period), [`KGroupedStream::windowed_by_session`] and the
//! [`SessionWindowedStream`] aggregations.

use std::marker::PhantomData;

use super::codec::StateCodec;
use super::session_store::SessionState;
use super::task::{Ctx, Node, StreamError};
use super::topology::{Data, Fanout, KGroupedStream, KStream, Key};
use super::window::{EmitStrategy, LateReason, LateRecord, Window, WindowError, Windowed};
use super::{Headers, Record};

/// Session windows: the records of a key whose timestamps are no more
/// than an inactivity gap apart form one session, closed by a grace
/// period.
///
/// A record at `ts` joins every open session of its key with
/// `start - gap <= ts <= end + gap` (`start` and `end` are the session's
/// first and last record timestamps); if it joins several, they merge into
/// one. A session *closes* when stream time passes `end + gap + grace`:
/// its result is then final, it leaves the store, and it is never merged
/// again (a later record within the gap of it starts a new session, as in
/// Kafka Streams, whose closed sessions have left the store too). A record
/// that joins no open session and whose own session would already be
/// closed (`ts + gap + grace < stream time`) is late.
///
/// As a [`Window`], a session is `[start, end + 1)`: half-open like every
/// window, so it closes when stream time reaches
/// `window.end_ms + gap + grace` ([`SessionWindows::close_ms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionWindows {
    gap_ms: u64,
    grace_ms: u64,
}

impl SessionWindows {
    /// Sessions that end after `gap_ms` without a record, no grace.
    /// [`WindowError::ZeroGap`] for a gap of 0.
    pub fn with_inactivity_gap(gap_ms: u64) -> Result<Self, WindowError> {
        if gap_ms == 0 {
            return Err(WindowError::ZeroGap);
        }
        Ok(Self {
            gap_ms,
            grace_ms: 0,
        })
    }

    /// The same sessions with a grace period of `grace_ms`.
    pub fn grace(mut self, grace_ms: u64) -> Self {
        self.grace_ms = grace_ms;
        self
    }

    /// The inactivity gap.
    pub fn gap_ms(&self) -> u64 {
        self.gap_ms
    }

    /// The grace period.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// The window of a session whose first record is at `start_ms` and
    /// last at `end_ms`: `[start_ms, end_ms + 1)`.
    pub fn window(&self, start_ms: u64, end_ms: u64) -> Window {
        Window {
            start_ms,
            end_ms: end_ms.saturating_add(1),
        }
    }

    /// When a session whose last record is at `end_ms` closes (stream
    /// time): `end_ms + 1 + gap + grace`.
    pub fn close_ms(&self, end_ms: u64) -> u64 {
        end_ms
            .saturating_add(1)
            .saturating_add(self.gap_ms)
            .saturating_add(self.grace_ms)
    }
}

impl<K: Key, V: Data> KGroupedStream<K, V> {
    /// Aggregates over session windows (see [`SessionWindows`]).
    pub fn windowed_by_session(&self, windows: SessionWindows) -> SessionWindowedStream<K, V> {
        SessionWindowedStream {
            grouped: self.clone(),
            windows,
            emit: EmitStrategy::OnUpdate,
            late: None,
        }
    }
}

/// A grouped stream over session windows, ready to aggregate.
///
/// The aggregations give a stream of `Windowed<K>` (the key and the
/// session's [`Window`]) to `Option<A>`:
///
/// - [`EmitStrategy::OnUpdate`] (the default): each record sends its
///   session's new aggregate (`Some`). When a record extends a session or
///   merges several, the sessions it replaces are **retracted** first:
///   their old `Windowed` keys are sent with `None`, in start order, then
///   the new session with `Some`. Materialised with
///   [`KStream::to_table_with_deletes`], the stream is exactly the table
///   of current sessions.
/// - [`EmitStrategy::OnWindowClose`]: each session once, `Some(final)`,
///   when it closes (by session end, then encoded key); never `None`.
///
/// Each record's timestamp is its session's last record timestamp (for a
/// retraction, the retracted session's); aggregates carry no headers.
pub struct SessionWindowedStream<K, V> {
    grouped: KGroupedStream<K, V>,
    windows: SessionWindows,
    emit: EmitStrategy,
    late: Option<usize>,
}

impl<K, V> std::fmt::Debug for SessionWindowedStream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionWindowedStream")
            .field("windows", &self.windows)
            .field("emit", &self.emit)
            .finish()
    }
}

impl<K: Key, V: Data> SessionWindowedStream<K, V> {
    /// When results are sent downstream (default: on every update).
    pub fn emit(mut self, emit: EmitStrategy) -> Self {
        self.emit = emit;
        self
    }

    /// Sends late records (see [`SessionWindows`]) to the output `name`,
    /// with a [`LateReason::WindowClosed`] naming the session the record
    /// would have started (`[ts, ts + 1)`). They are counted in
    /// [`TaskMetrics::late_records`](super::TaskMetrics::late_records)
    /// either way.
    pub fn late_records_to(mut self, name: &str) -> Self
    where
        V: StateCodec,
    {
        self.late = Some(self.grouped.stream.add_output::<K, LateRecord<V>>(name));
        self
    }

    /// Folds the records of each key and session into an aggregate kept
    /// in the store `store`: a new session starts from `init()`, each
    /// record is added with `agg`, and when sessions merge, `merger(key,
    /// into, other)` merges each later session's aggregate into the
    /// earliest one's, in start order, before the record is added.
    pub fn aggregate<A, I, F, M>(
        &self,
        store: &str,
        init: I,
        agg: F,
        merger: M,
    ) -> KStream<Windowed<K>, Option<A>>
    where
        A: Data + StateCodec,
        I: FnMut() -> A + Send + 'static,
        F: FnMut(&K, V, &mut A) + Send + 'static,
        M: FnMut(&K, &mut A, A) + Send + 'static,
    {
        self.fold(store, AggFns { init, agg, merger })
    }

    /// Counts the records of each key and session (in `store`).
    pub fn count(&self, store: &str) -> KStream<Windowed<K>, Option<u64>> {
        self.aggregate(
            store,
            || 0u64,
            |_, _, c| *c += 1,
            |_, into, other| *into += other,
        )
    }

    /// Combines the values of each key and session with `f` (the first
    /// value starts a session), which also merges merging sessions:
    /// `f(earliest, next)`, in start order.
    pub fn reduce<F>(&self, store: &str, f: F) -> KStream<Windowed<K>, Option<V>>
    where
        V: StateCodec,
        F: FnMut(&mut V, V) + Send + 'static,
    {
        self.fold(store, ReduceFn(f)).map_values(Option::flatten)
    }

    fn fold<A, S>(&self, store: &str, fns: S) -> KStream<Windowed<K>, Option<A>>
    where
        A: Data + StateCodec,
        S: SessionFold<K, V, A> + 'static,
    {
        let windows = self.windows;
        let state = self
            .grouped
            .stream
            .add_state(|max| Box::new(SessionState::<K, A>::new(store, windows, max)));
        let (emit, late) = (self.emit, self.late);
        self.grouped.source(store).child(move |next| SessionAgg {
            state,
            windows,
            emit,
            late,
            fns,
            next,
            touching: Vec::new(),
            pending: Vec::new(),
            closed: Vec::new(),
            _t: PhantomData::<fn(K, V)>,
        })
    }
}

/// What a session aggregation does with records and sessions.
trait SessionFold<K, V, A>: Send {
    fn init(&mut self) -> A;
    fn add(&mut self, key: &K, value: V, agg: &mut A);
    fn merge(&mut self, key: &K, into: &mut A, other: A);
}

/// [`SessionWindowedStream::aggregate`]'s functions.
struct AggFns<I, F, M> {
    init: I,
    agg: F,
    merger: M,
}

impl<K, V, A, I, F, M> SessionFold<K, V, A> for AggFns<I, F, M>
where
    I: FnMut() -> A + Send,
    F: FnMut(&K, V, &mut A) + Send,
    M: FnMut(&K, &mut A, A) + Send,
{
    fn init(&mut self) -> A {
        (self.init)()
    }
    fn add(&mut self, key: &K, value: V, agg: &mut A) {
        (self.agg)(key, value, agg)
    }
    fn merge(&mut self, key: &K, into: &mut A, other: A) {
        (self.merger)(key, into, other)
    }
}

/// [`SessionWindowedStream::reduce`]'s reducer, as aggregator and merger
/// over `Option<V>`.
struct ReduceFn<F>(F);

impl<K, V, F: FnMut(&mut V, V) + Send> SessionFold<K, V, Option<V>> for ReduceFn<F> {
    fn init(&mut self) -> Option<V> {
        None
    }
    fn add(&mut self, _: &K, value: V, agg: &mut Option<V>) {
        match agg {
            Some(a) => (self.0)(a, value),
            None => *agg = Some(value),
        }
    }
    fn merge(&mut self, key: &K, into: &mut Option<V>, other: Option<V>) {
        if let Some(v) = other {
            self.add(key, v, into)
        }
    }
}

/// The node of a session-windowed aggregation.
struct SessionAgg<S, K, V, A> {
    state: usize,
    windows: SessionWindows,
    emit: EmitStrategy,
    late: Option<usize>,
    fns: S,
    next: Fanout<Windowed<K>, Option<A>>,
    touching: Vec<u64>,
    pending: Vec<Record<Windowed<K>, Option<A>>>,
    closed: Vec<(Windowed<K>, A, u64)>,
    _t: PhantomData<fn(K, V)>,
}

impl<K, V, A, S> SessionAgg<S, K, V, A>
where
    K: Key,
    V: Data,
    A: Data + StateCodec,
    S: SessionFold<K, V, A>,
{
    fn out(&mut self, key: &K, start: u64, end: u64, value: Option<A>) {
        if self.emit == EmitStrategy::OnUpdate {
            self.pending.push(Record {
                key: Windowed {
                    key: key.clone(),
                    window: self.windows.window(start, end),
                },
                value,
                timestamp_ms: end,
                headers: Headers::new(),
            });
        }
    }

    /// Adds the record to its session (creating or merging sessions);
    /// queues what to send.
    fn add(&mut self, ctx: &mut Ctx, key: K, value: V, ts: u64) -> Result<(), StreamError> {
        let state = ctx.state_mut::<SessionState<K, A>>(self.state)?;
        let mut touching = std::mem::take(&mut self.touching);
        state.touching(&key, ts, &mut touching);
        if let [start] = touching[..] {
            if state
                .end_of(&key, start)
                .is_some_and(|end| ts >= start && ts <= end)
            {
                // Inside one session: its bounds stay, update in place.
                let s = state.get_mut(&key, start)?;
                self.fns.add(&key, value, &mut s.agg);
                let (end, agg) = (s.end, s.agg.clone());
                self.touching = touching;
                self.out(&key, start, end, Some(agg));
                return Ok(());
            }
        }
        let (mut start, mut end) = (ts, ts);
        let mut acc: Option<A> = None;
        for &s in &touching {
            let t = state.take(&key, s)?;
            start = start.min(t.start);
            end = end.max(t.end);
            if self.emit == EmitStrategy::OnUpdate {
                self.pending.push(Record {
                    key: Windowed {
                        key: key.clone(),
                        window: self.windows.window(t.start, t.end),
                    },
                    value: None,
                    timestamp_ms: t.end,
                    headers: Headers::new(),
                });
            }
            acc = Some(match acc {
                None => t.agg,
                Some(mut into) => {
                    self.fns.merge(&key, &mut into, t.agg);
                    into
                }
            });
        }
        self.touching = touching;
        let mut acc = match acc {
            Some(a) => a,
            None => self.fns.init(),
        };
        self.fns.add(&key, value, &mut acc);
        let out = (self.emit == EmitStrategy::OnUpdate).then(|| acc.clone());
        state.insert(key.clone(), start, end, acc)?;
        if let Some(agg) = out {
            self.out(&key, start, end, Some(agg));
        }
        let close = self.windows.close_ms(end);
        if close < ctx.next_deadline {
            ctx.next_deadline = close;
        }
        Ok(())
    }
}

impl<K, V, A, S> Node<K, V> for SessionAgg<S, K, V, A>
where
    K: Key,
    V: Data,
    A: Data + StateCodec,
    S: SessionFold<K, V, A>,
{
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms: ts,
            headers,
        } = rec;
        let stream_time = ctx.stream_time;
        let close = self.windows.close_ms(ts);
        if close <= stream_time {
            let state = ctx.state_mut::<SessionState<K, A>>(self.state)?;
            state.touching(&key, ts, &mut self.touching);
            if self.touching.is_empty() {
                ctx.metrics.late_records += 1;
                if let Some(out) = self.late {
                    let late = Record {
                        key,
                        value: LateRecord {
                            value,
                            reason: LateReason::WindowClosed {
                                window: self.windows.window(ts, ts),
                                closed_at_ms: close,
                                stream_time_ms: stream_time,
                            },
                        },
                        timestamp_ms: ts,
                        headers,
                    };
                    ctx.emit(out, late)?;
                }
                return Ok(());
            }
        }
        let added = self.add(ctx, key, value, ts);
        let sent = self.next.process_each(ctx, self.pending.drain(..));
        added.and(sent)
    }

    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        let stream_time = ctx.stream_time;
        let mut closed = std::mem::take(&mut self.closed);
        ctx.state_mut::<SessionState<K, A>>(self.state)?
            .close(stream_time, &mut closed)?;
        let emit = self.emit == EmitStrategy::OnWindowClose;
        let sent = self.next.process_each(
            ctx,
            closed
                .drain(..)
                .filter(|_| emit)
                .map(|(key, value, ts)| Record {
                    key,
                    value: Some(value),
                    timestamp_ms: ts,
                    headers: Headers::new(),
                }),
        );
        self.closed = closed;
        sent?;
        self.next.advance(ctx)
    }
}
