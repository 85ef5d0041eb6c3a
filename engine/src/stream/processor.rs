//! The Processor API: record-at-a-time user code in a topology, with named
//! children, state stores attached by name, and punctuators on stream time
//! and on wall-clock time.
//!
//! A [`Processor`] is added with [`KStream::process`](super::KStream::process),
//! which returns a [`ProcessorStream`]; each of its
//! [`ProcessorStream::child`] streams is a named child the processor
//! forwards to, and feeds any DSL operator, another processor or an output.

use std::hash::Hash;

use super::codec::StateCodec;
use super::task::{Ctx, KvState, Node, Signal, StreamError};
use super::topology::{Data, Fanout};
use super::Record;

/// When a punctuator fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PunctuationType {
    /// On stream time (the largest input timestamp): deterministic, replayed
    /// identically after a restart.
    StreamTime,
    /// On wall-clock time, read through the engine's
    /// [`Clock`](crate::Clock) port by whoever drives the task
    /// ([`TestDriver::advance_wall_clock`](super::TestDriver::advance_wall_clock),
    /// [`StreamRunner::with_clock`](super::StreamRunner::with_clock)).
    WallClockTime,
}

/// A scheduled punctuator, as [`ProcessorContext::schedule`] returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PunctuatorId(u32);

/// One firing of a punctuator, passed to [`Processor::punctuate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Punctuation {
    /// Which punctuator.
    pub id: PunctuatorId,
    /// Its type.
    pub kind: PunctuationType,
    /// The stream time (for [`PunctuationType::StreamTime`]) or wall-clock
    /// time (for [`PunctuationType::WallClockTime`]) that made it fire.
    pub timestamp_ms: u64,
}

/// Record-at-a-time user code: Kafka Streams' `Processor<KIn, VIn, KOut,
/// VOut>`.
///
/// The task calls [`Processor::init`] once, before the first record,
/// punctuation or wall-clock tick it handles (so after its state was
/// restored), then [`Processor::process`] for each record reaching the
/// processor, [`Processor::punctuate`] for each due punctuator, and
/// [`Processor::close`] when the task is closed ([`super::Task::close`]).
///
/// A processor reaches the record's key, value, timestamp and
/// [`Headers`](super::Headers) in the [`Record`], and everything else
/// through its [`ProcessorContext`]: forwarding, stores, punctuators, stream
/// and wall-clock time. Errors it returns stop the task like any
/// [`StreamError`] (the runner then restores the last commit); use
/// [`StreamError::processor`] for its own.
///
/// A processor must be deterministic in its records and stream-time
/// punctuations (no clocks, no randomness of its own) for the exactly-once
/// runner's replay after a crash to give the same outputs. Any state that
/// must survive a restart belongs in a state store, not in the processor's
/// fields.
///
/// ```
/// use smartmsg_engine::stream::{
///     Processor, ProcessorContext, PunctuationType, Punctuation, Record, StreamError,
///     TestDriver, Topology,
/// };
///
/// /// Sums values per key in a store; every 10 s of stream time forwards
/// /// the sums.
/// struct Sums;
/// impl Processor<String, u64, String, u64> for Sums {
///     fn init(&mut self, ctx: &mut ProcessorContext<'_, String, u64>) -> Result<(), StreamError> {
///         ctx.schedule(10_000, PunctuationType::StreamTime)?;
///         Ok(())
///     }
///     fn process(
///         &mut self,
///         ctx: &mut ProcessorContext<'_, String, u64>,
///         r: Record<String, u64>,
///     ) -> Result<(), StreamError> {
///         let mut s = ctx.store::<String, u64>("sums")?;
///         let sum = s.get(&r.key).copied().unwrap_or(0) + r.value;
///         s.put(r.key, sum)
///     }
///     fn punctuate(
///         &mut self,
///         ctx: &mut ProcessorContext<'_, String, u64>,
///         p: Punctuation,
///     ) -> Result<(), StreamError> {
///         let sums: Vec<(String, u64)> = ctx
///             .store::<String, u64>("sums")?
///             .entries()
///             .into_iter()
///             .map(|(k, v)| (k.clone(), *v))
///             .collect();
///         for (k, v) in sums {
///             ctx.forward_to("sums", Record::new(k, v, p.timestamp_ms))?;
///         }
///         Ok(())
///     }
/// }
///
/// let t = Topology::new();
/// t.add_state_store::<String, u64>("sums");
/// t.stream::<String, u64>("in")
///     .process("sum", Sums, &["sums"])
///     .child("sums")
///     .to("out");
/// let mut d = TestDriver::new(t).unwrap();
/// d.pipe("in", "a".to_string(), 2u64, 1_000).unwrap();
/// d.pipe("in", "a".to_string(), 3u64, 2_000).unwrap();
/// assert!(d.read_key_values::<String, u64>("out").unwrap().is_empty());
/// d.advance_time(10_000).unwrap();
/// assert_eq!(d.read_key_values::<String, u64>("out").unwrap(), vec![("a".to_string(), 5)]);
/// ```
pub trait Processor<KIn, VIn, KOut, VOut>: Send + 'static {
    /// Called once before anything else: schedule punctuators here.
    fn init(&mut self, ctx: &mut ProcessorContext<'_, KOut, VOut>) -> Result<(), StreamError> {
        let _ = ctx;
        Ok(())
    }

    /// Handles one record.
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_, KOut, VOut>,
        record: Record<KIn, VIn>,
    ) -> Result<(), StreamError>;

    /// A punctuator this processor scheduled is due.
    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_, KOut, VOut>,
        punctuation: Punctuation,
    ) -> Result<(), StreamError> {
        let _ = (ctx, punctuation);
        Ok(())
    }

    /// The task is closing: release what the processor holds.
    fn close(&mut self) {}
}

pub(crate) struct Punct {
    id: PunctuatorId,
    kind: PunctuationType,
    interval: u64,
    /// The next time it fires; `None` for a wall-clock punctuator scheduled
    /// before any wall-clock time was known (armed at the first tick).
    next: Option<u64>,
}

/// The first multiple of `interval` after `t`.
fn next_after(t: u64, interval: u64) -> u64 {
    (t / interval).saturating_add(1).saturating_mul(interval)
}

/// What a [`Processor`] reaches while it runs: forwarding to its children,
/// its state stores, its punctuators, stream and wall-clock time.
pub struct ProcessorContext<'a, K, V> {
    ctx: &'a mut Ctx,
    name: &'a str,
    children: &'a mut [(String, Fanout<K, V>)],
    stores: &'a [(String, usize)],
    puncts: &'a mut Vec<Punct>,
    next_id: &'a mut u32,
}

impl<K, V> std::fmt::Debug for ProcessorContext<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorContext")
            .field("processor", &self.name)
            .field("stream_time", &self.ctx.stream_time)
            .finish_non_exhaustive()
    }
}

impl<K: Data, V: Data> ProcessorContext<'_, K, V> {
    /// The processor's name.
    pub fn processor_name(&self) -> &str {
        self.name
    }

    /// The task's stream time.
    pub fn stream_time_ms(&self) -> u64 {
        self.ctx.stream_time
    }

    /// The last wall-clock time the task was given (`None` before the
    /// first tick). Never read for decisions that must replay identically.
    pub fn wall_clock_ms(&self) -> Option<u64> {
        self.ctx.wall_time
    }

    /// The names of the processor's children, in declaration order.
    pub fn child_names(&self) -> impl Iterator<Item = &str> {
        self.children.iter().map(|(n, _)| n.as_str())
    }

    /// Sends `record` to every child.
    pub fn forward(&mut self, record: Record<K, V>) -> Result<(), StreamError> {
        let Some(((_, last), rest)) = self.children.split_last_mut() else {
            return Ok(());
        };
        for (_, c) in rest {
            c.process(self.ctx, record.clone())?;
        }
        last.process(self.ctx, record)
    }

    /// Sends `record` to the child named `child` only.
    pub fn forward_to(&mut self, child: &str, record: Record<K, V>) -> Result<(), StreamError> {
        match self.children.iter_mut().find(|(n, _)| n == child) {
            Some((_, c)) => c.process(self.ctx, record),
            None => Err(StreamError::UnknownChild {
                processor: self.name.to_owned(),
                child: child.to_owned(),
            }),
        }
    }

    /// The key-value store `name`, which must be attached to this processor
    /// (see [`KStream::process`](super::KStream::process)) and declared
    /// with these types.
    pub fn store<SK, SV>(&mut self, name: &str) -> Result<ProcessorStore<'_, SK, SV>, StreamError>
    where
        SK: Clone + Eq + Hash + StateCodec + Send + 'static,
        SV: StateCodec + Send + 'static,
    {
        let &(_, index) = self.stores.iter().find(|(n, _)| n == name).ok_or_else(|| {
            StreamError::StoreNotAttached {
                processor: self.name.to_owned(),
                store: name.to_owned(),
            }
        })?;
        let state = self
            .ctx
            .states
            .get_mut(index)
            .and_then(|s| s.downcast_mut::<KvState<SK, SV>>())
            .ok_or_else(|| StreamError::WrongType {
                what: "store",
                name: name.to_owned(),
            })?;
        Ok(ProcessorStore { state })
    }

    /// Schedules a punctuator every `interval_ms` of stream time or of
    /// wall-clock time. It fires at the first multiple of `interval_ms`
    /// after the time it was scheduled at, then at the first multiple after
    /// each firing: once per tick that crosses one or more multiples, with
    /// the time of that tick (skipped intervals are not made up).
    ///
    /// Stream-time punctuators fire before the record whose timestamp
    /// moved stream time past them is processed. A wall-clock punctuator
    /// scheduled before the task saw any wall-clock time starts counting
    /// at the first tick.
    pub fn schedule(
        &mut self,
        interval_ms: u64,
        kind: PunctuationType,
    ) -> Result<PunctuatorId, StreamError> {
        if interval_ms == 0 {
            return Err(StreamError::BadPunctuator {
                processor: self.name.to_owned(),
                reason: "the interval must be at least 1 ms".into(),
            });
        }
        let max = self.ctx.limits.max_punctuators;
        if self.puncts.len() >= max {
            return Err(StreamError::BadPunctuator {
                processor: self.name.to_owned(),
                reason: format!("more than {max} punctuators"),
            });
        }
        let id = PunctuatorId(*self.next_id);
        *self.next_id = self.next_id.wrapping_add(1);
        let next = match kind {
            PunctuationType::StreamTime => {
                let n = next_after(self.ctx.stream_time, interval_ms);
                self.ctx.punct_deadline = self.ctx.punct_deadline.min(n);
                self.ctx.next_deadline = self.ctx.next_deadline.min(n);
                Some(n)
            }
            PunctuationType::WallClockTime => {
                let n = self.ctx.wall_time.map(|w| next_after(w, interval_ms));
                self.ctx.next_wall = self.ctx.next_wall.min(n.unwrap_or(0));
                n
            }
        };
        self.puncts.push(Punct {
            id,
            kind,
            interval: interval_ms,
            next,
        });
        Ok(id)
    }

    /// Cancels a punctuator; `false` if it was not scheduled.
    pub fn cancel(&mut self, id: PunctuatorId) -> bool {
        let before = self.puncts.len();
        self.puncts.retain(|p| p.id != id);
        self.puncts.len() != before
    }
}

/// A key-value state store as a [`Processor`] sees it: the task's working
/// set of the store, written behind to the [`KeyValueStore`](super::KeyValueStore)
/// at each commit (with its changelog) and restored from it on start.
pub struct ProcessorStore<'a, K, V> {
    state: &'a mut KvState<K, V>,
}

impl<K, V> std::fmt::Debug for ProcessorStore<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorStore").finish_non_exhaustive()
    }
}

impl<K, V> ProcessorStore<'_, K, V>
where
    K: Clone + Eq + Hash + StateCodec + Send + 'static,
    V: StateCodec + Send + 'static,
{
    /// The value of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.state.get(key)
    }

    /// Sets the value of `key` ([`StreamError::StateFull`] past
    /// [`TaskLimits::max_state_entries`](super::TaskLimits::max_state_entries)).
    pub fn put(&mut self, key: K, value: V) -> Result<(), StreamError> {
        self.state.upsert(key, value)
    }

    /// Removes `key`; returns its value.
    pub fn delete(&mut self, key: &K) -> Option<V> {
        self.state.remove(key)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        super::task::StateSlot::len(self.state)
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry, sorted by encoded key (deterministic).
    pub fn entries(&self) -> Vec<(&K, &V)> {
        let mut v: Vec<(Vec<u8>, &K, &V)> = self
            .state
            .entries()
            .map(|(k, v)| (k.to_bytes(), k, v))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, k, v)| (k, v)).collect()
    }
}

// ---------------------------------------------------------------------------
// The node

pub(crate) struct ProcNode<P, KO, VO> {
    pub(crate) name: String,
    pub(crate) proc: P,
    pub(crate) children: Vec<(String, Fanout<KO, VO>)>,
    pub(crate) stores: Vec<(String, usize)>,
    pub(crate) puncts: Vec<Punct>,
    pub(crate) next_id: u32,
    pub(crate) state: Lifecycle,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    New,
    Running,
    Closed,
}

macro_rules! pctx {
    ($s:ident, $ctx:ident) => {
        ProcessorContext {
            ctx: $ctx,
            name: &$s.name,
            children: &mut $s.children,
            stores: &$s.stores,
            puncts: &mut $s.puncts,
            next_id: &mut $s.next_id,
        }
    };
}

impl<P, KO: Data, VO: Data> ProcNode<P, KO, VO> {
    /// Fires the due punctuators of `kind` at `now`, in schedule order.
    fn fire<KI, VI>(
        &mut self,
        ctx: &mut Ctx,
        kind: PunctuationType,
        now: u64,
    ) -> Result<(), StreamError>
    where
        P: Processor<KI, VI, KO, VO>,
    {
        // Ids first: a punctuation may schedule or cancel punctuators.
        let due: Vec<PunctuatorId> = self
            .puncts
            .iter()
            .filter(|p| p.kind == kind && p.next.is_some_and(|n| n <= now))
            .map(|p| p.id)
            .collect();
        for id in due {
            let Some(p) = self.puncts.iter_mut().find(|p| p.id == id) else {
                continue; // cancelled by an earlier punctuation
            };
            p.next = Some(next_after(now, p.interval));
            ctx.punctuations += 1;
            let punctuation = Punctuation {
                id,
                kind,
                timestamp_ms: now,
            };
            self.proc.punctuate(&mut pctx!(self, ctx), punctuation)?;
        }
        Ok(())
    }
}

impl<KI, VI, KO, VO, P> Node<KI, VI> for ProcNode<P, KO, VO>
where
    KI: Data,
    VI: Data,
    KO: Data,
    VO: Data,
    P: Processor<KI, VI, KO, VO>,
{
    fn process(&mut self, ctx: &mut Ctx, rec: Record<KI, VI>) -> Result<(), StreamError> {
        if self.state != Lifecycle::Running {
            return Err(StreamError::Internal("processor not running"));
        }
        self.proc.process(&mut pctx!(self, ctx), rec)
    }

    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        match ctx.signal {
            Signal::Close => {
                if self.state == Lifecycle::Running {
                    self.proc.close();
                }
                self.state = Lifecycle::Closed;
            }
            signal => {
                if self.state == Lifecycle::New && signal == Signal::Init {
                    self.state = Lifecycle::Running;
                    self.proc.init(&mut pctx!(self, ctx))?;
                }
                if self.state == Lifecycle::Running {
                    let st = ctx.stream_time;
                    self.fire::<KI, VI>(ctx, PunctuationType::StreamTime, st)?;
                    if let Some(w) = ctx.wall_time {
                        for p in &mut self.puncts {
                            if p.kind == PunctuationType::WallClockTime && p.next.is_none() {
                                p.next = Some(next_after(w, p.interval));
                            }
                        }
                        self.fire::<KI, VI>(ctx, PunctuationType::WallClockTime, w)?;
                    }
                }
                for p in &self.puncts {
                    match (p.kind, p.next) {
                        (PunctuationType::StreamTime, Some(n)) => {
                            ctx.punct_deadline = ctx.punct_deadline.min(n);
                        }
                        (PunctuationType::WallClockTime, n) => {
                            ctx.next_wall = ctx.next_wall.min(n.unwrap_or(0));
                        }
                        (PunctuationType::StreamTime, None) => {}
                    }
                }
            }
        }
        for (_, c) in &mut self.children {
            c.advance(ctx)?;
        }
        Ok(())
    }
}
