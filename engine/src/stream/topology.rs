//! The DSL: [`Topology`], [`KStream`], [`KTable`], [`GlobalKTable`], [`KGroupedStream`] and
//! [`TimeWindowedStream`], and the nodes they build.
//!
//! Each operator is a node that owns its user closure (monomorphised) and
//! its children; a record travels down the tree by one dynamic call per
//! node. Building is fluent and never fails midway: mistakes (a duplicate
//! store, a bad name) are collected and reported by [`Topology::build`].

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use super::codec::StateCodec;
use super::processor::{Lifecycle, ProcNode, Processor};
use super::store::{check_keyspace, StoreError};
use super::task::{
    Ctx, GlobalRoot, InputAny, KvState, Node, OutputAny, OutputBuf, Root, Signal, StateSlot,
    StreamError, Task, TaskLimits, TaskMetrics, WindowState,
};
use super::window::{EmitStrategy, LateReason, LateRecord, Windowed, Windows};
use super::{Headers, Record};

/// What the DSL's keys and values must be: owned, clonable (a record that
/// fans out to several children is cloned) and sendable.
pub trait Data: Clone + Send + 'static {}
impl<T: Clone + Send + 'static> Data for T {}

/// What grouping and table keys must be: [`Data`], hashable, encodable.
pub trait Key: Data + Eq + Hash + StateCodec {}
impl<T: Data + Eq + Hash + StateCodec> Key for T {}

/// Why a topology could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two inputs with the same name.
    #[error("input {0:?} is declared twice")]
    DuplicateInput(String),
    /// Two state stores with the same name.
    #[error("state store {0:?} is declared twice")]
    DuplicateStore(String),
    /// The same output name with different key/value types.
    #[error("output {0:?} is used with different key/value types")]
    OutputType(String),
    /// A store or output name is not a valid keyspace name.
    #[error("bad name {name:?}: {source}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        source: StoreError,
    },
    /// A table used by a join belongs to another topology.
    #[error("table {0:?} belongs to another topology")]
    ForeignTable(String),
    /// A stream merged or joined with this one belongs to another
    /// topology (the name is the operator's).
    #[error("{0}: the other stream belongs to another topology")]
    ForeignStream(String),
    /// Two processors with the same name.
    #[error("processor {0:?} is declared twice")]
    DuplicateProcessor(String),
    /// A processor is attached to a store that was not declared (before
    /// it).
    #[error("processor {processor:?} is attached to undeclared store {store:?}")]
    UnknownStore {
        /// The processor.
        processor: String,
        /// The store.
        store: String,
    },
    /// An input or output name ends with [`REPARTITION_SUFFIX`], which
    /// names the internal streams of repartitions
    /// ([`KStream::repartition`], [`KStream::group_by`]).
    #[error("{0:?}: names ending with \"-repartition\" are reserved for repartitions")]
    ReservedName(String),
    /// A broken internal invariant (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// What ends the name of a repartition's internal stream: repartition
/// `name` ([`KStream::repartition`]) writes to and reads from the internal
/// stream `<name>-repartition` (on Kafka, the topic
/// `<application>-<name>-repartition`). User inputs and outputs may not end
/// with it ([`BuildError::ReservedName`]).
pub const REPARTITION_SUFFIX: &str = "-repartition";

type BuiltAny = Box<dyn Any>;
type MakeFn = Box<dyn FnOnce(Vec<Vec<BuiltAny>>) -> Result<BuiltAny, BuildError>>;
type WrapFn = Box<dyn FnOnce(BuiltAny) -> Result<Box<dyn InputAny>, BuildError>>;

struct NodeSpec {
    ports: Vec<Vec<usize>>,
    make: Option<MakeFn>,
}

struct InputSpec {
    name: String,
    node: usize,
    ty: TypeId,
    wrap: Option<WrapFn>,
}

#[derive(Default)]
struct Graph {
    nodes: Vec<NodeSpec>,
    inputs: Vec<InputSpec>,
    /// The sources of global tables.
    global_inputs: Vec<InputSpec>,
    states: Vec<Box<dyn StateSlot>>,
    outputs: Vec<(TypeId, Box<dyn OutputAny>)>,
    processors: Vec<String>,
    /// The internal streams of repartitions (each an output and an input).
    repartitions: Vec<String>,
    errors: Vec<BuildError>,
    limits: TaskLimits,
}

impl Graph {
    /// Records a build error if `name` is already an input or a global
    /// source.
    fn check_input_name(&mut self, name: &str) {
        if self
            .inputs
            .iter()
            .chain(&self.global_inputs)
            .any(|i| i.name == name)
        {
            self.errors
                .push(BuildError::DuplicateInput(name.to_owned()));
        }
    }

    fn add_state(&mut self, slot: Box<dyn StateSlot>) -> usize {
        let name = slot.name().to_owned();
        if let Err(source) = check_keyspace(&name) {
            self.errors.push(BuildError::BadName { name, source });
        } else if self.states.iter().any(|s| s.name() == name) {
            self.errors.push(BuildError::DuplicateStore(name));
        }
        self.states.push(slot);
        self.states.len() - 1
    }

    fn add_output<K: StateCodec + Send + 'static, V: StateCodec + Send + 'static>(
        &mut self,
        name: &str,
    ) -> usize {
        let ty = TypeId::of::<(K, V)>();
        if let Some(i) = self.outputs.iter().position(|(_, o)| o.name() == name) {
            if self.outputs[i].0 != ty {
                self.errors.push(BuildError::OutputType(name.to_owned()));
            }
            return i;
        }
        if let Err(source) = check_keyspace(name) {
            self.errors.push(BuildError::BadName {
                name: name.to_owned(),
                source,
            });
        }
        self.outputs.push((
            ty,
            Box::new(OutputBuf::<K, V> {
                name: name.to_owned(),
                records: Vec::new(),
            }),
        ));
        self.outputs.len() - 1
    }

    fn add_node(&mut self, parent: Option<(usize, usize)>, ports: usize, make: MakeFn) -> usize {
        let id = self.nodes.len();
        self.nodes.push(NodeSpec {
            ports: vec![Vec::new(); ports],
            make: Some(make),
        });
        if let Some((p, port)) = parent {
            if let Some(children) = self.nodes[p].ports.get_mut(port) {
                children.push(id);
            } else {
                self.errors.push(BuildError::Internal("no such port"));
            }
        }
        id
    }
}

/// A topology under construction: declare inputs with
/// [`Topology::stream`], chain operators on the [`KStream`]s, then
/// [`Topology::build`] a [`Task`].
///
/// ```
/// use smartmsg_engine::stream::{EmitStrategy, Record, TestDriver, Topology, Windows};
///
/// let t = Topology::new();
/// let users = t.stream::<u32, String>("users").to_table("users");
/// t.stream::<u32, u64>("clicks")
///     .filter(|_, v| *v > 0)
///     .join(&users, |clicks, country| (country.clone(), clicks))
///     .map(|_, (country, _)| (country, ()))
///     .group_by_key()
///     .windowed_by(Windows::tumbling(60_000).unwrap().grace(5_000))
///     .emit(EmitStrategy::OnWindowClose)
///     .count("clicks-per-country")
///     .to("counts");
/// let mut d = TestDriver::new(t).unwrap();
/// d.pipe("users", 1u32, "fr".to_string(), 0).unwrap();
/// d.pipe("clicks", 1u32, 3u64, 1_000).unwrap();
/// d.advance_time(65_000).unwrap();
/// let out = d.read_output::<smartmsg_engine::stream::Windowed<String>, u64>("counts").unwrap();
/// assert_eq!(out.len(), 1);
/// assert_eq!((out[0].key.key.as_str(), out[0].value), ("fr", 1));
/// ```
pub struct Topology {
    g: Rc<RefCell<Graph>>,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.g.borrow();
        f.debug_struct("Topology")
            .field("nodes", &g.nodes.len())
            .field(
                "inputs",
                &g.inputs.iter().map(|i| &i.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Declares the input `name` of `(K, V)` records (a user input or a
/// repartition's internal input).
fn add_input<K, V>(graph: &Rc<RefCell<Graph>>, name: &str) -> KStream<K, V>
where
    K: Data + StateCodec,
    V: Data + StateCodec,
{
    let mut g = graph.borrow_mut();
    g.check_input_name(name);
    let id = g.add_node(
        None,
        1,
        Box::new(|ports| {
            let next = Fanout::<K, V>::from_ports(ports)?;
            Ok(Box::new(Box::new(Pass { next }) as Box<dyn Node<K, V>>) as BuiltAny)
        }),
    );
    let input_name = name.to_owned();
    g.inputs.push(InputSpec {
        name: name.to_owned(),
        node: id,
        ty: TypeId::of::<(K, V)>(),
        wrap: Some(Box::new(move |built| {
            let node = *built
                .downcast::<Box<dyn Node<K, V>>>()
                .map_err(|_| BuildError::Internal("input node type"))?;
            Ok(Box::new(Root {
                name: input_name,
                node,
            }) as Box<dyn InputAny>)
        })),
    });
    drop(g);
    KStream {
        g: graph.clone(),
        node: id,
        port: 0,
        _t: PhantomData,
    }
}

impl Topology {
    /// An empty topology with default [`TaskLimits`].
    pub fn new() -> Self {
        Self::with_limits(TaskLimits::default())
    }

    /// An empty topology whose task enforces `limits`.
    pub fn with_limits(limits: TaskLimits) -> Self {
        let g = Graph {
            limits,
            ..Graph::default()
        };
        Self {
            g: Rc::new(RefCell::new(g)),
        }
    }

    /// Declares the input `name` (a source's topic, e.g. an event kind):
    /// records of key `K` and value `V`, decoded with [`StateCodec`] when
    /// they come as bytes.
    pub fn stream<K, V>(&self, name: &str) -> KStream<K, V>
    where
        K: Data + StateCodec,
        V: Data + StateCodec,
    {
        if name.ends_with(REPARTITION_SUFFIX) {
            self.g
                .borrow_mut()
                .errors
                .push(BuildError::ReservedName(name.to_owned()));
        }
        add_input(&self.g, name)
    }

    /// Declares a key-value state store `name` for processors to attach
    /// (see [`KStream::process`]). Its working set lives in the task, is
    /// written behind to the [`KeyValueStore`](super::KeyValueStore) at
    /// each commit (keyspace `name`, with its changelog) and restored from
    /// it on start, like the DSL's tables.
    pub fn add_state_store<K, V>(&self, name: &str)
    where
        K: Key,
        V: Data + StateCodec,
    {
        let mut g = self.g.borrow_mut();
        let max = g.limits.max_state_entries;
        g.add_state(Box::new(KvState::<K, V>::new(name, max)));
    }

    /// Declares a **global table**: the latest value per key of the source
    /// `source`, kept in the store `store` and fully replicated to every
    /// task of the topology, for [`KStream::join_global`] and
    /// [`KStream::left_join_global`] (Kafka Streams' `globalTable`).
    ///
    /// `source` is not a stream input: its records never move stream time,
    /// are not counted as processed and are skipped by
    /// [`Task::process_encoded`]; they go to
    /// [`Task::process_global_encoded`] (the
    /// [`StreamRunner`](super::StreamRunner) reads them from its global
    /// source, [`with_global_source`](super::StreamRunner::with_global_source);
    /// [`TestDriver::pipe`](super::TestDriver::pipe) applies them at once).
    ///
    /// The table has **no changelog**: commits do not write it and a
    /// restore does not read it. It is rebuilt by reading its source again
    /// from the beginning when a runner starts (or a
    /// [`TestDriver::restart`](super::TestDriver::restart) replays what was
    /// piped into it).
    pub fn global_table<K, V>(&self, source: &str, store: &str) -> GlobalKTable<K, V>
    where
        K: Key,
        V: Data + StateCodec,
    {
        self.global_node::<K, V, V, _>(source, store, Some)
    }

    /// A global table whose source carries `Option<V>`: `Some` sets the
    /// key's value, `None` (a tombstone) removes the key (see
    /// [`Topology::global_table`]).
    pub fn global_table_with_deletes<K, V>(&self, source: &str, store: &str) -> GlobalKTable<K, V>
    where
        K: Key,
        V: Data + StateCodec,
    {
        self.global_node::<K, Option<V>, V, _>(source, store, |v| v)
    }

    fn global_node<K, V, VT, F>(&self, source: &str, store: &str, f: F) -> GlobalKTable<K, VT>
    where
        K: Key,
        V: Data + StateCodec,
        VT: Data + StateCodec,
        F: FnMut(V) -> Option<VT> + Send + 'static,
    {
        let mut g = self.g.borrow_mut();
        g.check_input_name(source);
        let max = g.limits.max_state_entries;
        let state = g.add_state(Box::new(KvState::<K, VT>::global(store, max)));
        let id = g.add_node(
            None,
            0,
            Box::new(move |_| {
                let node = TableWrite {
                    state,
                    f,
                    _t: PhantomData::<fn(VT)>,
                };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        let input_name = source.to_owned();
        g.global_inputs.push(InputSpec {
            name: source.to_owned(),
            node: id,
            ty: TypeId::of::<(K, V)>(),
            wrap: Some(Box::new(move |built| {
                let node = *built
                    .downcast::<Box<dyn Node<K, V>>>()
                    .map_err(|_| BuildError::Internal("global source node type"))?;
                Ok(Box::new(GlobalRoot {
                    root: Root {
                        name: input_name,
                        node,
                    },
                    state,
                    _t: PhantomData::<fn(VT)>,
                }) as Box<dyn InputAny>)
            })),
        });
        drop(g);
        GlobalKTable {
            g: self.g.clone(),
            state,
            name: store.to_owned(),
            source: source.to_owned(),
            _t: PhantomData,
        }
    }

    /// Builds the task. The topology is consumed: build a new one (call the
    /// function that declares it again) for another task.
    pub fn build(self) -> Result<Task, BuildError> {
        let g = std::mem::take(&mut *self.g.borrow_mut());
        if let Some(e) = g.errors.into_iter().next() {
            return Err(e);
        }
        let mut nodes = g.nodes;
        let mut built: Vec<Option<BuiltAny>> = (0..nodes.len()).map(|_| None).collect();
        // Children are always declared after their parent: build backwards.
        for id in (0..nodes.len()).rev() {
            let spec = &mut nodes[id];
            let mut ports = Vec::with_capacity(spec.ports.len());
            for children in &spec.ports {
                let mut v = Vec::with_capacity(children.len());
                for &c in children {
                    v.push(
                        built
                            .get_mut(c)
                            .and_then(Option::take)
                            .ok_or(BuildError::Internal("child built twice"))?,
                    );
                }
                ports.push(v);
            }
            let make = spec
                .make
                .take()
                .ok_or(BuildError::Internal("node made twice"))?;
            built[id] = Some(make(ports)?);
        }
        let mut inputs = Vec::with_capacity(g.inputs.len());
        let mut input_names = HashMap::new();
        let mut input_types = Vec::new();
        for mut spec in g.inputs {
            let node = built[spec.node]
                .take()
                .ok_or(BuildError::Internal("input node missing"))?;
            let wrap = spec
                .wrap
                .take()
                .ok_or(BuildError::Internal("input wrapped twice"))?;
            input_names.insert(spec.name, inputs.len());
            input_types.push(spec.ty);
            inputs.push(wrap(node)?);
        }
        let mut global_inputs = Vec::with_capacity(g.global_inputs.len());
        let mut global_names = HashMap::new();
        let mut global_types = Vec::new();
        for mut spec in g.global_inputs {
            let node = built[spec.node]
                .take()
                .ok_or(BuildError::Internal("global source node missing"))?;
            let wrap = spec
                .wrap
                .take()
                .ok_or(BuildError::Internal("global source wrapped twice"))?;
            global_names.insert(spec.name, global_inputs.len());
            global_types.push(spec.ty);
            global_inputs.push(wrap(node)?);
        }
        let mut task = Task {
            ctx: Ctx {
                stream_time: 0,
                next_deadline: u64::MAX,
                states: g.states,
                outputs: g.outputs.into_iter().map(|(_, o)| o).collect(),
                pending_outputs: 0,
                metrics: TaskMetrics::default(),
                limits: g.limits,
                signal: Signal::StreamTime,
                wall_time: None,
                next_wall: u64::MAX,
                punct_deadline: u64::MAX,
                punctuations: 0,
            },
            inputs,
            input_names,
            input_types,
            global_inputs,
            global_names,
            global_types,
            global_updates: 0,
            repartitions: g.repartitions,
            initialized: false,
            closed: false,
        };
        task.set_meta(task.meta());
        Ok(task)
    }
}

// ---------------------------------------------------------------------------
// Fan-out

/// A node's children.
pub(crate) enum Fanout<K, V> {
    None,
    One(Box<dyn Node<K, V>>),
    Many(Vec<Box<dyn Node<K, V>>>),
}

impl<K: Data, V: Data> Fanout<K, V> {
    pub(crate) fn from_any(children: Vec<BuiltAny>) -> Result<Self, BuildError> {
        let mut v = Vec::with_capacity(children.len());
        for c in children {
            v.push(
                *c.downcast::<Box<dyn Node<K, V>>>()
                    .map_err(|_| BuildError::Internal("child node type"))?,
            );
        }
        Ok(match v.len() {
            0 => Fanout::None,
            1 => Fanout::One(v.pop().ok_or(BuildError::Internal("empty"))?),
            _ => Fanout::Many(v),
        })
    }

    fn from_ports(mut ports: Vec<Vec<BuiltAny>>) -> Result<Self, BuildError> {
        match ports.pop() {
            Some(children) if ports.is_empty() => Self::from_any(children),
            _ => Err(BuildError::Internal("expected one port")),
        }
    }

    #[inline]
    pub(crate) fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        match self {
            Fanout::None => Ok(()),
            Fanout::One(n) => n.process(ctx, rec),
            Fanout::Many(ns) => {
                let (last, rest) = ns
                    .split_last_mut()
                    .ok_or(StreamError::Internal("empty fan-out"))?;
                for n in rest {
                    n.process(ctx, rec.clone())?;
                }
                last.process(ctx, rec)
            }
        }
    }

    /// Sends `recs` in order, stopping at the first error (the rest of
    /// `recs` is dropped: a drain is emptied either way).
    pub(crate) fn process_each(
        &mut self,
        ctx: &mut Ctx,
        recs: impl IntoIterator<Item = Record<K, V>>,
    ) -> Result<(), StreamError> {
        for rec in recs {
            self.process(ctx, rec)?;
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        match self {
            Fanout::None => Ok(()),
            Fanout::One(n) => n.advance(ctx),
            Fanout::Many(ns) => {
                for n in ns {
                    n.advance(ctx)?;
                }
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Streams

/// A stream of records of key `K` and value `V` (a handle on a node of the
/// topology under construction).
pub struct KStream<K, V> {
    g: Rc<RefCell<Graph>>,
    node: usize,
    port: usize,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for KStream<K, V> {
    fn clone(&self) -> Self {
        Self {
            g: self.g.clone(),
            node: self.node,
            port: self.port,
            _t: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for KStream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KStream")
            .field("node", &self.node)
            .field("port", &self.port)
            .finish()
    }
}

impl<K: Data, V: Data> KStream<K, V> {
    /// Declares a state store (checked for its name at build).
    pub(crate) fn add_state(&self, make: impl FnOnce(usize) -> Box<dyn StateSlot>) -> usize {
        let mut g = self.g.borrow_mut();
        let max = g.limits.max_state_entries;
        g.add_state(make(max))
    }

    /// Declares (or finds) the output `name` of `(K2, V2)` records.
    pub(crate) fn add_output<K2, V2>(&self, name: &str) -> usize
    where
        K2: StateCodec + Send + 'static,
        V2: StateCodec + Send + 'static,
    {
        self.g.borrow_mut().add_output::<K2, V2>(name)
    }

    /// Whether `other` is of this topology; records a build error if not.
    pub(crate) fn check_same<K2, V2>(&self, other: &KStream<K2, V2>, operator: &str) -> bool {
        let same = Rc::ptr_eq(&self.g, &other.g);
        if !same {
            self.g
                .borrow_mut()
                .errors
                .push(BuildError::ForeignStream(operator.to_owned()));
        }
        same
    }

    /// Adds a child node with one output port of `(K2, V2)`.
    pub(crate) fn child<K2: Data, V2: Data, N>(
        &self,
        make: impl FnOnce(Fanout<K2, V2>) -> N + 'static,
    ) -> KStream<K2, V2>
    where
        N: Node<K, V> + 'static,
    {
        let id = self.g.borrow_mut().add_node(
            Some((self.node, self.port)),
            1,
            Box::new(move |ports| {
                let next = Fanout::<K2, V2>::from_ports(ports)?;
                Ok(Box::new(Box::new(make(next)) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        KStream {
            g: self.g.clone(),
            node: id,
            port: 0,
            _t: PhantomData,
        }
    }

    /// Adds a terminal child node (no output port).
    fn terminal<N: Node<K, V> + 'static>(&self, node: N) {
        self.g.borrow_mut().add_node(
            Some((self.node, self.port)),
            0,
            Box::new(move |_| Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)),
        );
    }

    /// Keeps the records for which `pred` holds.
    pub fn filter<F>(&self, pred: F) -> KStream<K, V>
    where
        F: FnMut(&K, &V) -> bool + Send + 'static,
    {
        self.child(move |next| Filter { pred, next })
    }

    /// Replaces each record's key and value.
    pub fn map<K2: Data, V2: Data, F>(&self, f: F) -> KStream<K2, V2>
    where
        F: FnMut(K, V) -> (K2, V2) + Send + 'static,
    {
        self.child(move |next| Map { f, next })
    }

    /// Replaces each record's value.
    pub fn map_values<V2: Data, F>(&self, f: F) -> KStream<K, V2>
    where
        F: FnMut(V) -> V2 + Send + 'static,
    {
        self.child(move |next| MapValues { f, next })
    }

    /// Sets each record's timestamp (e.g. to the event time inside its
    /// value); windows then use it. Stream time still moves only with the
    /// timestamps of input records.
    pub fn with_timestamp<F>(&self, f: F) -> KStream<K, V>
    where
        F: FnMut(&K, &V, u64) -> u64 + Send + 'static,
    {
        self.child(move |next| Stamp { f, next })
    }

    /// Replaces each record by zero or more records (with its timestamp).
    pub fn flat_map<K2: Data, V2: Data, I, F>(&self, f: F) -> KStream<K2, V2>
    where
        I: IntoIterator<Item = (K2, V2)>,
        F: FnMut(K, V) -> I + Send + 'static,
    {
        self.child(move |next| FlatMap { f, next })
    }

    /// Splits the stream: each record goes to the branch of the first
    /// predicate that holds, or nowhere. One stream per predicate.
    pub fn branch(&self, preds: Vec<Predicate<K, V>>) -> Vec<KStream<K, V>> {
        let n = preds.len();
        let id = self.g.borrow_mut().add_node(
            Some((self.node, self.port)),
            n,
            Box::new(move |ports| {
                let mut outs = Vec::with_capacity(ports.len());
                for p in ports {
                    outs.push(Fanout::<K, V>::from_any(p)?);
                }
                let node = Branch { preds, outs };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        (0..n)
            .map(|port| KStream {
                g: self.g.clone(),
                node: id,
                port,
                _t: PhantomData,
            })
            .collect()
    }

    /// Joins each record with the table's current value for its key; a
    /// record whose key the table lacks is dropped (inner join).
    pub fn join<VT, VR, F>(&self, table: &KTable<K, VT>, joiner: F) -> KStream<K, VR>
    where
        K: Key,
        VT: Data + StateCodec,
        VR: Data,
        F: FnMut(V, &VT) -> VR + Send + 'static,
    {
        self.check_table(table);
        let state = table.state;
        self.child(move |next| Join {
            state,
            joiner,
            next,
            _t: PhantomData::<fn(VT)>,
        })
    }

    /// Joins each record with the table's current value for its key, or
    /// `None` (left join).
    pub fn left_join<VT, VR, F>(&self, table: &KTable<K, VT>, joiner: F) -> KStream<K, VR>
    where
        K: Key,
        VT: Data + StateCodec,
        VR: Data,
        F: FnMut(V, Option<&VT>) -> VR + Send + 'static,
    {
        self.check_table(table);
        let state = table.state;
        self.child(move |next| LeftJoin {
            state,
            joiner,
            next,
            _t: PhantomData::<fn(VT)>,
        })
    }

    /// Joins each record with a [`GlobalKTable`]: `key_mapper(key, value)`
    /// gives the table key to look up (any type: no repartitioning, every
    /// task holds the whole table), and `joiner(value, table_value)` the
    /// result, keyed by the record's key, with its timestamp and headers.
    /// A record whose table key the table lacks is dropped (inner join;
    /// Kafka Streams' `join(GlobalKTable, KeyValueMapper, ValueJoiner)`).
    ///
    /// The record sees the table as it is when the record is processed:
    /// see [`GlobalKTable`] for what that is while the table catches up.
    pub fn join_global<GK, GV, VR, M, F>(
        &self,
        global: &GlobalKTable<GK, GV>,
        key_mapper: M,
        joiner: F,
    ) -> KStream<K, VR>
    where
        GK: Key,
        GV: Data + StateCodec,
        VR: Data,
        M: FnMut(&K, &V) -> GK + Send + 'static,
        F: FnMut(V, &GV) -> VR + Send + 'static,
    {
        self.check_global(global);
        let state = global.state;
        self.child(move |next| GlobalJoin {
            state,
            key_mapper,
            joiner,
            next,
            _t: PhantomData::<fn(GK, GV)>,
        })
    }

    /// Joins each record with a [`GlobalKTable`], or `None` when the table
    /// lacks the key `key_mapper(key, value)` (left join; see
    /// [`KStream::join_global`]).
    pub fn left_join_global<GK, GV, VR, M, F>(
        &self,
        global: &GlobalKTable<GK, GV>,
        key_mapper: M,
        joiner: F,
    ) -> KStream<K, VR>
    where
        GK: Key,
        GV: Data + StateCodec,
        VR: Data,
        M: FnMut(&K, &V) -> GK + Send + 'static,
        F: FnMut(V, Option<&GV>) -> VR + Send + 'static,
    {
        self.check_global(global);
        let state = global.state;
        self.child(move |next| GlobalLeftJoin {
            state,
            key_mapper,
            joiner,
            next,
            _t: PhantomData::<fn(GK, GV)>,
        })
    }

    fn check_global<GK, GV>(&self, global: &GlobalKTable<GK, GV>) {
        if !Rc::ptr_eq(&self.g, &global.g) {
            let name = global.name.clone();
            self.g
                .borrow_mut()
                .errors
                .push(BuildError::ForeignTable(name));
        }
    }

    fn check_table<VT>(&self, table: &KTable<K, VT>) {
        if !Rc::ptr_eq(&self.g, &table.g) {
            let name = table.name.clone();
            self.g
                .borrow_mut()
                .errors
                .push(BuildError::ForeignTable(name));
        }
    }

    /// Adds the [`Processor`] `processor`, named `name`, fed by this
    /// stream, with the state stores `stores` attached (declared before
    /// with [`Topology::add_state_store`], or a DSL table or aggregate
    /// store). Its children are the streams of [`ProcessorStream::child`].
    pub fn process<KO, VO, P>(
        &self,
        name: &str,
        processor: P,
        stores: &[&str],
    ) -> ProcessorStream<KO, VO>
    where
        KO: Data,
        VO: Data,
        P: Processor<K, V, KO, VO>,
    {
        let names: Rc<RefCell<Vec<String>>> = Rc::default();
        let mut g = self.g.borrow_mut();
        if g.processors.iter().any(|p| p == name) {
            g.errors
                .push(BuildError::DuplicateProcessor(name.to_owned()));
        }
        g.processors.push(name.to_owned());
        let mut attached = Vec::with_capacity(stores.len());
        for &store in stores {
            match g.states.iter().position(|s| s.name() == store) {
                Some(i) => attached.push((store.to_owned(), i)),
                None => g.errors.push(BuildError::UnknownStore {
                    processor: name.to_owned(),
                    store: store.to_owned(),
                }),
            }
        }
        let proc_name = name.to_owned();
        let child_names = Rc::clone(&names);
        let id = g.add_node(
            Some((self.node, self.port)),
            0,
            Box::new(move |ports| {
                let names = child_names.borrow().clone();
                if names.len() != ports.len() {
                    return Err(BuildError::Internal("processor ports"));
                }
                let mut children = Vec::with_capacity(ports.len());
                for (n, p) in names.into_iter().zip(ports) {
                    children.push((n, Fanout::<KO, VO>::from_any(p)?));
                }
                let node = ProcNode {
                    name: proc_name,
                    proc: processor,
                    children,
                    stores: attached,
                    puncts: Vec::new(),
                    next_id: 0,
                    state: Lifecycle::New,
                };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        drop(g);
        ProcessorStream {
            g: self.g.clone(),
            node: id,
            names,
            _t: PhantomData,
        }
    }

    /// Merges this stream with `other`: the result has the records of
    /// both, each passed on as it arrives (with its timestamp and
    /// headers). Both must be streams of this topology
    /// ([`BuildError::ForeignStream`] otherwise).
    pub fn merge(&self, other: &KStream<K, V>) -> KStream<K, V> {
        if !self.check_same(other, "merge") {
            return self.clone(); // the build fails: ForeignStream
        }
        // One downstream fan-out, reached from both parents. The node under
        // `self` owns the walk of stream-time signals (`advance`); the one
        // under `other` only passes records (every node is walked once).
        let shared: SharedFanout<K, V> = Arc::new(Mutex::new(None));
        let fill = Arc::clone(&shared);
        let mut g = self.g.borrow_mut();
        let id = g.add_node(
            Some((self.node, self.port)),
            1,
            Box::new(move |ports| {
                let next = Fanout::<K, V>::from_ports(ports)?;
                *fill
                    .lock()
                    .map_err(|_| BuildError::Internal("merge lock"))? = Some(next);
                let node = MergeIn {
                    target: fill,
                    walks: true,
                };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        g.add_node(
            Some((other.node, other.port)),
            0,
            Box::new(move |_| {
                let node = MergeIn {
                    target: shared,
                    walks: false,
                };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, V>>) as BuiltAny)
            }),
        );
        drop(g);
        KStream {
            g: self.g.clone(),
            node: id,
            port: 0,
            _t: PhantomData,
        }
    }

    /// Groups by the record key, for aggregations. No repartition: the
    /// records are already keyed (and, on Kafka, partitioned) by it.
    pub fn group_by_key(&self) -> KGroupedStream<K, V>
    where
        K: Key,
    {
        KGroupedStream {
            stream: self.clone(),
            repartition: None,
        }
    }

    /// Groups by a **new key** `key(k, v)`, for aggregations (Kafka
    /// Streams' `groupBy`): the records are re-keyed, and the aggregation
    /// that follows reads them through a repartition (see
    /// [`KStream::repartition`]) named after its store: `aggregate("s",
    /// ..)` (or `count`, `reduce`, windowed or by session) writes the
    /// re-keyed records to the internal stream `s-repartition` and
    /// aggregates what it reads back from it. Each aggregation of the
    /// grouped stream gets its own repartition.
    pub fn group_by<K2, F>(&self, mut key: F) -> KGroupedStream<K2, V>
    where
        K2: Key,
        V: StateCodec,
        F: FnMut(&K, &V) -> K2 + Send + 'static,
    {
        let stream = self.map(move |k, v| (key(&k, &v), v));
        let rekeyed = stream.clone();
        KGroupedStream {
            stream,
            repartition: Some(Rc::new(move |name: &str| rekeyed.repartition(name))),
        }
    }

    /// Passes the stream through a **repartition** (Kafka Streams'
    /// `repartition()`): every record is written, with its key, value,
    /// timestamp and headers, to the internal stream `<name>-repartition`
    /// (an output of the task) and the returned stream reads it back (an
    /// input of the task), splitting the topology into an upstream and a
    /// downstream sub-topology.
    ///
    /// - On the [`TestDriver`](super::TestDriver) each record goes through
    ///   the internal stream right after the record that produced it, in
    ///   order, as if written and read back at once.
    /// - On the [`StreamRunner`](super::StreamRunner) over an
    ///   [`EventLog`](crate::EventLog) ([`EventLogSink`](super::EventLogSink)
    ///   and [`EventLogSource`](super::EventLogSource) on the same log) the
    ///   internal stream is an event stream of that log: the record is in
    ///   the commit's outbox, appended under an idempotency key, and read
    ///   back by the runner's source in a later step, exactly once.
    /// - On Kafka (`KafkaStreamProcessor`) it is the topic
    ///   `<application>-<name>-repartition`, produced in the step's
    ///   transaction, partitioned by the new key, and consumed by the same
    ///   processor with its offsets committed in a later transaction.
    ///
    /// The record keeps its timestamp and headers. Stream time is the
    /// task's: the records read back do not move it back, and upstream
    /// records processed before them may have moved it on (see the
    /// module docs). `name` must not be used by another repartition.
    pub fn repartition(&self, name: &str) -> KStream<K, V>
    where
        K: StateCodec,
        V: StateCodec,
    {
        let internal = format!("{name}{REPARTITION_SUFFIX}");
        let output = {
            // A second repartition of the same name is a duplicate input.
            let mut g = self.g.borrow_mut();
            g.repartitions.push(internal.clone());
            g.add_output::<K, V>(&internal)
        };
        self.terminal(To {
            output,
            _t: PhantomData::<fn(K, V)>,
        });
        add_input(&self.g, &internal)
    }

    /// Sends every record to the output `name` (several streams may send to
    /// the same output if the types agree). Names ending with
    /// [`REPARTITION_SUFFIX`] are reserved ([`BuildError::ReservedName`]).
    pub fn to(&self, name: &str)
    where
        K: StateCodec,
        V: StateCodec,
    {
        let output = {
            let mut g = self.g.borrow_mut();
            if name.ends_with(REPARTITION_SUFFIX) {
                g.errors.push(BuildError::ReservedName(name.to_owned()));
            }
            g.add_output::<K, V>(name)
        };
        self.terminal(To {
            output,
            _t: PhantomData::<fn(K, V)>,
        });
    }

    /// Materialises the stream as a table in the store `store`: each record
    /// sets its key's value (a changelog stream becomes a table).
    pub fn to_table(&self, store: &str) -> KTable<K, V>
    where
        K: Key,
        V: StateCodec,
    {
        self.table_node(store, Some)
    }

    fn table_node<VT, F>(&self, store: &str, f: F) -> KTable<K, VT>
    where
        K: Key,
        VT: Data + StateCodec,
        F: FnMut(V) -> Option<VT> + Send + 'static,
    {
        let state = {
            let mut g = self.g.borrow_mut();
            let max = g.limits.max_state_entries;
            g.add_state(Box::new(KvState::<K, VT>::new(store, max)))
        };
        self.terminal(TableWrite {
            state,
            f,
            _t: PhantomData::<fn(VT)>,
        });
        KTable {
            g: self.g.clone(),
            state,
            name: store.to_owned(),
            _t: PhantomData,
        }
    }
}

impl<K: Data, V: Data> KStream<K, Option<V>> {
    /// Materialises a changelog stream as a table in `store`: `Some` sets
    /// the key's value, `None` (a tombstone) removes the key.
    pub fn to_table_with_deletes(&self, store: &str) -> KTable<K, V>
    where
        K: Key,
        V: StateCodec,
    {
        self.table_node(store, |v| v)
    }
}

impl<K: Data, T: Data, E: Data> KStream<K, Result<T, E>> {
    /// Splits a stream of results into the `Ok` values and the `Err`
    /// values (e.g. valid records and dead letters).
    pub fn split_result(&self) -> (KStream<K, T>, KStream<K, E>) {
        let id = self.g.borrow_mut().add_node(
            Some((self.node, self.port)),
            2,
            Box::new(|mut ports| {
                let errs = Fanout::<K, E>::from_any(
                    ports.pop().ok_or(BuildError::Internal("split port"))?,
                )?;
                let oks = Fanout::<K, T>::from_any(
                    ports.pop().ok_or(BuildError::Internal("split port"))?,
                )?;
                let node = Split { oks, errs };
                Ok(Box::new(Box::new(node) as Box<dyn Node<K, Result<T, E>>>) as BuiltAny)
            }),
        );
        (
            KStream {
                g: self.g.clone(),
                node: id,
                port: 0,
                _t: PhantomData,
            },
            KStream {
                g: self.g.clone(),
                node: id,
                port: 1,
                _t: PhantomData,
            },
        )
    }
}

/// A [`Processor`] in a topology under construction (from
/// [`KStream::process`]): name its children to route its records onward.
pub struct ProcessorStream<K, V> {
    g: Rc<RefCell<Graph>>,
    node: usize,
    names: Rc<RefCell<Vec<String>>>,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> std::fmt::Debug for ProcessorStream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorStream")
            .field("node", &self.node)
            .field("children", &self.names.borrow())
            .finish()
    }
}

impl<K: Data, V: Data> ProcessorStream<K, V> {
    /// The stream of the processor's child `name`: the records it sends
    /// with [`ProcessorContext::forward_to`](super::ProcessorContext::forward_to)`(name, ..)` and with
    /// [`ProcessorContext::forward`](super::ProcessorContext::forward) (to every child). Asking for the same
    /// name again gives the same child.
    pub fn child(&self, name: &str) -> KStream<K, V> {
        let existing = self.names.borrow().iter().position(|n| n == name);
        let port = match existing {
            Some(p) => p,
            None => {
                let mut g = self.g.borrow_mut();
                let mut names = self.names.borrow_mut();
                match g.nodes.get_mut(self.node) {
                    Some(spec) => spec.ports.push(Vec::new()),
                    None => g.errors.push(BuildError::Internal("no processor node")),
                }
                names.push(name.to_owned());
                names.len() - 1
            }
        };
        KStream {
            g: self.g.clone(),
            node: self.node,
            port,
            _t: PhantomData,
        }
    }
}

/// A branch predicate (see [`KStream::branch`]).
pub type Predicate<K, V> = Box<dyn FnMut(&K, &V) -> bool + Send>;

/// A table: the latest value per key, kept in a state store (with its
/// changelog) and read by stream-table joins.
pub struct KTable<K, V> {
    g: Rc<RefCell<Graph>>,
    state: usize,
    name: String,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> std::fmt::Debug for KTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KTable").field("store", &self.name).finish()
    }
}

impl<K, V> KTable<K, V> {
    /// The name of the table's store.
    pub fn store_name(&self) -> &str {
        &self.name
    }
}

/// A **global table** (from [`Topology::global_table`]): the latest value
/// per key of its own source, replicated whole to every task and joined
/// from any stream by a key the stream computes
/// ([`KStream::join_global`], [`KStream::left_join_global`]), so the
/// stream needs no repartitioning.
///
/// # Feeding and restoring
///
/// The table has no changelog and is never committed. A
/// [`StreamRunner`](super::StreamRunner) rebuilds it on start by reading
/// its global source from position 0 to its head (the *bootstrap*) before
/// it processes any stream record, then, at each step, reads what the
/// global source gained since, before the step's stream records. The
/// global source's position is kept in memory only: it is not part of the
/// runner's checkpoint, so recovery never waits for it or replays it into
/// a commit.
///
/// # What a join sees
///
/// A stream record sees the table as of the global records applied
/// **before it was processed**, whatever their timestamps: global updates
/// are not synchronised with stream time (as in Kafka Streams). After the
/// bootstrap that is at least everything the global source held when the
/// runner started, and at each step everything it held when the step
/// began. So a record processed again after a crash (its first effects
/// were never committed) may join a newer table value than the first
/// time: joins with a global table are exactly-once in effect but not
/// deterministic across restarts when the global source changed in
/// between. In a [`TestDriver`](super::TestDriver) a record piped into
/// the global source is applied at once, and a restart replays the source
/// before the next record.
pub struct GlobalKTable<K, V> {
    g: Rc<RefCell<Graph>>,
    state: usize,
    name: String,
    source: String,
    _t: PhantomData<fn() -> (K, V)>,
}

impl<K, V> std::fmt::Debug for GlobalKTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalKTable")
            .field("store", &self.name)
            .field("source", &self.source)
            .finish()
    }
}

impl<K, V> GlobalKTable<K, V> {
    /// The name of the table's store.
    pub fn store_name(&self) -> &str {
        &self.name
    }

    /// The name of the table's source.
    pub fn source_name(&self) -> &str {
        &self.source
    }
}

/// Passes a grouped stream through a repartition named after a store.
type RepartitionFn<K, V> = Rc<dyn Fn(&str) -> KStream<K, V>>;

/// A stream grouped by key, ready to aggregate ([`KStream::group_by_key`],
/// or [`KStream::group_by`] with a new key and a repartition before each
/// aggregation).
pub struct KGroupedStream<K, V> {
    pub(crate) stream: KStream<K, V>,
    /// Set by [`KStream::group_by`]: each aggregation reads through a
    /// repartition named after its store.
    repartition: Option<RepartitionFn<K, V>>,
}

impl<K, V> Clone for KGroupedStream<K, V> {
    fn clone(&self) -> Self {
        Self {
            stream: self.stream.clone(),
            repartition: self.repartition.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for KGroupedStream<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KGroupedStream")
            .field("stream", &self.stream)
            .field("repartition", &self.repartition.is_some())
            .finish()
    }
}

impl<K: Key, V: Data> KGroupedStream<K, V> {
    /// The stream the aggregation into `store` reads: through the
    /// repartition `<store>-repartition` after a [`KStream::group_by`].
    pub(crate) fn source(&self, store: &str) -> KStream<K, V> {
        match &self.repartition {
            Some(f) => f(store),
            None => self.stream.clone(),
        }
    }

    /// Aggregates over fixed time windows.
    pub fn windowed_by(&self, windows: Windows) -> TimeWindowedStream<K, V> {
        TimeWindowedStream {
            grouped: self.clone(),
            windows,
            emit: EmitStrategy::OnUpdate,
            late: None,
        }
    }

    /// Folds each key's records into an aggregate kept in `store`, starting
    /// from `init()`; every update is sent downstream.
    pub fn aggregate<A, I, F>(&self, store: &str, init: I, agg: F) -> KStream<K, A>
    where
        A: Data + StateCodec,
        I: FnMut() -> A + Send + 'static,
        F: FnMut(&K, V, &mut A) + Send + 'static,
    {
        let state = {
            let mut g = self.stream.g.borrow_mut();
            let max = g.limits.max_state_entries;
            g.add_state(Box::new(KvState::<K, A>::new(store, max)))
        };
        self.source(store).child(move |next| GroupAgg {
            state,
            init,
            agg,
            next,
            _t: PhantomData::<fn(V)>,
        })
    }

    /// Counts each key's records (in `store`).
    pub fn count(&self, store: &str) -> KStream<K, u64> {
        self.aggregate(store, || 0u64, |_, _, c| *c += 1)
    }

    /// Combines each key's values with `f` (the first value starts it).
    pub fn reduce<F>(&self, store: &str, mut f: F) -> KStream<K, V>
    where
        V: StateCodec,
        F: FnMut(&mut V, V) + Send + 'static,
    {
        self.aggregate(
            store,
            || None::<V>,
            move |_, v, acc: &mut Option<V>| match acc {
                Some(a) => f(a, v),
                None => *acc = Some(v),
            },
        )
        .flat_map(|k, v: Option<V>| v.map(|v| (k, v)))
    }
}

/// A grouped stream over time windows, ready to aggregate.
pub struct TimeWindowedStream<K, V> {
    grouped: KGroupedStream<K, V>,
    windows: Windows,
    emit: EmitStrategy,
    late: Option<usize>,
}

impl<K: Key, V: Data> TimeWindowedStream<K, V> {
    /// When results are sent downstream (default: on every update).
    pub fn emit(mut self, emit: EmitStrategy) -> Self {
        self.emit = emit;
        self
    }

    /// Sends records that arrive after their window closed to the output
    /// `name`, with the reason. (They are counted in
    /// [`TaskMetrics::late_records`] either way.)
    pub fn late_records_to(mut self, name: &str) -> Self
    where
        V: StateCodec,
    {
        self.late = Some(
            self.grouped
                .stream
                .g
                .borrow_mut()
                .add_output::<K, LateRecord<V>>(name),
        );
        self
    }

    /// Folds the records of each key and window into an aggregate kept in
    /// the window store `store`, starting from `init()`.
    pub fn aggregate<A, I, F>(&self, store: &str, init: I, agg: F) -> KStream<Windowed<K>, A>
    where
        A: Data + StateCodec,
        I: FnMut() -> A + Send + 'static,
        F: FnMut(&K, V, &mut A) + Send + 'static,
    {
        let state = {
            let mut g = self.grouped.stream.g.borrow_mut();
            let max = g.limits.max_state_entries;
            g.add_state(Box::new(WindowState::<K, A>::new(store, self.windows, max)))
        };
        let (windows, emit, late) = (self.windows, self.emit, self.late);
        self.grouped.source(store).child(move |next| WindowAgg {
            state,
            windows,
            emit,
            late,
            init,
            agg,
            next,
            pending: Vec::new(),
            closed: Vec::new(),
            _t: PhantomData::<fn(V)>,
        })
    }

    /// Counts the records of each key and window (in `store`).
    pub fn count(&self, store: &str) -> KStream<Windowed<K>, u64> {
        self.aggregate(store, || 0u64, |_, _, c| *c += 1)
    }

    /// Combines the values of each key and window with `f`.
    pub fn reduce<F>(&self, store: &str, mut f: F) -> KStream<Windowed<K>, V>
    where
        V: StateCodec,
        F: FnMut(&mut V, V) + Send + 'static,
    {
        self.aggregate(
            store,
            || None::<V>,
            move |_, v, acc: &mut Option<V>| match acc {
                Some(a) => f(a, v),
                None => *acc = Some(v),
            },
        )
        .flat_map(|k, v: Option<V>| v.map(|v| (k, v)))
    }
}

// ---------------------------------------------------------------------------
// Nodes

struct Pass<K, V> {
    next: Fanout<K, V>,
}

impl<K: Data, V: Data> Node<K, V> for Pass<K, V> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        self.next.process(ctx, rec)
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

type SharedFanout<K, V> = Arc<Mutex<Option<Fanout<K, V>>>>;

/// One parent's entry into a merged stream (see [`KStream::merge`]).
struct MergeIn<K, V> {
    target: SharedFanout<K, V>,
    /// Whether this entry passes stream-time signals on (only one does).
    walks: bool,
}

impl<K: Data, V: Data> MergeIn<K, V> {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Fanout<K, V>) -> Result<T, StreamError>,
    ) -> Result<T, StreamError> {
        // A topology is a tree below each merge, so the lock is never held
        // when a record comes back here; `try_lock` turns a bug into an
        // error rather than a deadlock.
        let mut next = self
            .target
            .try_lock()
            .map_err(|_| StreamError::Internal("merge re-entered"))?;
        f(next
            .as_mut()
            .ok_or(StreamError::Internal("merge not built"))?)
    }
}

impl<K: Data, V: Data> Node<K, V> for MergeIn<K, V> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        self.with(|next| next.process(ctx, rec))
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        if self.walks {
            self.with(|next| next.advance(ctx))
        } else {
            Ok(())
        }
    }
}

struct Filter<F, K, V> {
    pred: F,
    next: Fanout<K, V>,
}

impl<K: Data, V: Data, F: FnMut(&K, &V) -> bool + Send> Node<K, V> for Filter<F, K, V> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        if (self.pred)(&rec.key, &rec.value) {
            self.next.process(ctx, rec)
        } else {
            Ok(())
        }
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct Map<F, K2, V2> {
    f: F,
    next: Fanout<K2, V2>,
}

impl<K, V, K2: Data, V2: Data, F> Node<K, V> for Map<F, K2, V2>
where
    F: FnMut(K, V) -> (K2, V2) + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms,
            headers,
        } = rec;
        let (key, value) = (self.f)(key, value);
        self.next.process(
            ctx,
            Record {
                key,
                value,
                timestamp_ms,
                headers,
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct MapValues<F, K, V2> {
    f: F,
    next: Fanout<K, V2>,
}

impl<K: Data, V, V2: Data, F> Node<K, V> for MapValues<F, K, V2>
where
    F: FnMut(V) -> V2 + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms,
            headers,
        } = rec;
        let value = (self.f)(value);
        self.next.process(
            ctx,
            Record {
                key,
                value,
                timestamp_ms,
                headers,
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct Stamp<F, K, V> {
    f: F,
    next: Fanout<K, V>,
}

impl<K: Data, V: Data, F: FnMut(&K, &V, u64) -> u64 + Send> Node<K, V> for Stamp<F, K, V> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, mut rec: Record<K, V>) -> Result<(), StreamError> {
        rec.timestamp_ms = (self.f)(&rec.key, &rec.value, rec.timestamp_ms);
        self.next.process(ctx, rec)
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct FlatMap<F, K2, V2> {
    f: F,
    next: Fanout<K2, V2>,
}

impl<K, V, K2: Data, V2: Data, I, F> Node<K, V> for FlatMap<F, K2, V2>
where
    I: IntoIterator<Item = (K2, V2)>,
    F: FnMut(K, V) -> I + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms,
            headers,
        } = rec;
        for (key, value) in (self.f)(key, value) {
            self.next.process(
                ctx,
                Record {
                    key,
                    value,
                    timestamp_ms,
                    headers: headers.clone(),
                },
            )?;
        }
        Ok(())
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct Branch<K, V> {
    preds: Vec<Predicate<K, V>>,
    outs: Vec<Fanout<K, V>>,
}

impl<K: Data, V: Data> Node<K, V> for Branch<K, V> {
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        for (pred, out) in self.preds.iter_mut().zip(&mut self.outs) {
            if pred(&rec.key, &rec.value) {
                return out.process(ctx, rec);
            }
        }
        Ok(())
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        for out in &mut self.outs {
            out.advance(ctx)?;
        }
        Ok(())
    }
}

struct Split<K, T, E> {
    oks: Fanout<K, T>,
    errs: Fanout<K, E>,
}

impl<K: Data, T: Data, E: Data> Node<K, Result<T, E>> for Split<K, T, E> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, Result<T, E>>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms,
            headers,
        } = rec;
        match value {
            Ok(value) => self.oks.process(
                ctx,
                Record {
                    key,
                    value,
                    timestamp_ms,
                    headers,
                },
            ),
            Err(value) => self.errs.process(
                ctx,
                Record {
                    key,
                    value,
                    timestamp_ms,
                    headers,
                },
            ),
        }
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.oks.advance(ctx)?;
        self.errs.advance(ctx)
    }
}

struct To<K, V> {
    output: usize,
    _t: PhantomData<fn(K, V)>,
}

impl<K: Data, V: Data> Node<K, V> for To<K, V> {
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        ctx.emit(self.output, rec)
    }
    fn advance(&mut self, _: &mut Ctx) -> Result<(), StreamError> {
        Ok(())
    }
}

struct TableWrite<F, VT> {
    state: usize,
    f: F,
    _t: PhantomData<fn(VT)>,
}

impl<K: Key, V, VT: Data + StateCodec, F> Node<K, V> for TableWrite<F, VT>
where
    F: FnMut(V) -> Option<VT> + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let v = (self.f)(rec.value);
        let table = ctx.state_mut::<KvState<K, VT>>(self.state)?;
        match v {
            Some(v) => table.upsert(rec.key, v),
            None => {
                table.remove(&rec.key);
                Ok(())
            }
        }
    }
    fn advance(&mut self, _: &mut Ctx) -> Result<(), StreamError> {
        Ok(())
    }
}

struct Join<F, K, VR, VT> {
    state: usize,
    joiner: F,
    next: Fanout<K, VR>,
    _t: PhantomData<fn(VT)>,
}

impl<K: Key, V, VT: Data + StateCodec, VR: Data, F> Node<K, V> for Join<F, K, VR, VT>
where
    F: FnMut(V, &VT) -> VR + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let joined = {
            let table = ctx.state_mut::<KvState<K, VT>>(self.state)?;
            table.get(&rec.key).map(|tv| (self.joiner)(rec.value, tv))
        };
        match joined {
            Some(value) => self.next.process(
                ctx,
                Record {
                    key: rec.key,
                    value,
                    timestamp_ms: rec.timestamp_ms,
                    headers: rec.headers,
                },
            ),
            None => Ok(()),
        }
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct LeftJoin<F, K, VR, VT> {
    state: usize,
    joiner: F,
    next: Fanout<K, VR>,
    _t: PhantomData<fn(VT)>,
}

impl<K: Key, V, VT: Data + StateCodec, VR: Data, F> Node<K, V> for LeftJoin<F, K, VR, VT>
where
    F: FnMut(V, Option<&VT>) -> VR + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let value = {
            let table = ctx.state_mut::<KvState<K, VT>>(self.state)?;
            (self.joiner)(rec.value, table.get(&rec.key))
        };
        self.next.process(
            ctx,
            Record {
                key: rec.key,
                value,
                timestamp_ms: rec.timestamp_ms,
                headers: rec.headers,
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct GlobalJoin<M, F, K, VR, GK, GV> {
    state: usize,
    key_mapper: M,
    joiner: F,
    next: Fanout<K, VR>,
    _t: PhantomData<fn(GK, GV)>,
}

impl<K: Data, V, GK: Key, GV: Data + StateCodec, VR: Data, M, F> Node<K, V>
    for GlobalJoin<M, F, K, VR, GK, GV>
where
    M: FnMut(&K, &V) -> GK + Send,
    F: FnMut(V, &GV) -> VR + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let gk = (self.key_mapper)(&rec.key, &rec.value);
        let joined = {
            let table = ctx.state_mut::<KvState<GK, GV>>(self.state)?;
            table.get(&gk).map(|tv| (self.joiner)(rec.value, tv))
        };
        match joined {
            Some(value) => self.next.process(
                ctx,
                Record {
                    key: rec.key,
                    value,
                    timestamp_ms: rec.timestamp_ms,
                    headers: rec.headers,
                },
            ),
            None => Ok(()),
        }
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct GlobalLeftJoin<M, F, K, VR, GK, GV> {
    state: usize,
    key_mapper: M,
    joiner: F,
    next: Fanout<K, VR>,
    _t: PhantomData<fn(GK, GV)>,
}

impl<K: Data, V, GK: Key, GV: Data + StateCodec, VR: Data, M, F> Node<K, V>
    for GlobalLeftJoin<M, F, K, VR, GK, GV>
where
    M: FnMut(&K, &V) -> GK + Send,
    F: FnMut(V, Option<&GV>) -> VR + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let gk = (self.key_mapper)(&rec.key, &rec.value);
        let value = {
            let table = ctx.state_mut::<KvState<GK, GV>>(self.state)?;
            (self.joiner)(rec.value, table.get(&gk))
        };
        self.next.process(
            ctx,
            Record {
                key: rec.key,
                value,
                timestamp_ms: rec.timestamp_ms,
                headers: rec.headers,
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct GroupAgg<I, F, K, V, A> {
    state: usize,
    init: I,
    agg: F,
    next: Fanout<K, A>,
    _t: PhantomData<fn(V)>,
}

impl<K: Key, V: Data, A: Data + StateCodec, I, F> Node<K, V> for GroupAgg<I, F, K, V, A>
where
    I: FnMut() -> A + Send,
    F: FnMut(&K, V, &mut A) + Send,
{
    #[inline]
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let value = {
            let table = ctx.state_mut::<KvState<K, A>>(self.state)?;
            let (init, agg) = (&mut self.init, &mut self.agg);
            let v = rec.value;
            table
                .update(&rec.key, init, |a| agg(&rec.key, v, a))?
                .clone()
        };
        // An aggregate is a new record: the input's headers stay behind.
        self.next.process(
            ctx,
            Record {
                key: rec.key,
                value,
                timestamp_ms: rec.timestamp_ms,
                headers: Headers::new(),
            },
        )
    }
    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        self.next.advance(ctx)
    }
}

struct WindowAgg<I, F, K, V, A> {
    state: usize,
    windows: Windows,
    emit: EmitStrategy,
    late: Option<usize>,
    init: I,
    agg: F,
    next: Fanout<Windowed<K>, A>,
    pending: Vec<Record<Windowed<K>, A>>,
    closed: Vec<(Windowed<K>, A, u64)>,
    _t: PhantomData<fn(V)>,
}

impl<K: Key, V: Data, A: Data + StateCodec, I, F> Node<K, V> for WindowAgg<I, F, K, V, A>
where
    I: FnMut() -> A + Send,
    F: FnMut(&K, V, &mut A) + Send,
{
    fn process(&mut self, ctx: &mut Ctx, rec: Record<K, V>) -> Result<(), StreamError> {
        let Record {
            key,
            value,
            timestamp_ms: ts,
            headers,
        } = rec;
        let stream_time = ctx.stream_time;
        let mut value = Some(value);
        let mut starts = self.windows.starts_for(ts).peekable();
        while let Some(start) = starts.next() {
            let last = starts.peek().is_none();
            let v = if last { value.take() } else { value.clone() }
                .ok_or(StreamError::Internal("value used up"))?;
            let close = self.windows.close_ms(start);
            if close <= stream_time {
                ctx.metrics.late_records += 1;
                if let Some(out) = self.late {
                    let late = Record {
                        key: key.clone(),
                        value: LateRecord {
                            value: v,
                            reason: LateReason::WindowClosed {
                                window: self.windows.window_at(start),
                                closed_at_ms: close,
                                stream_time_ms: stream_time,
                            },
                        },
                        timestamp_ms: ts,
                        headers: headers.clone(),
                    };
                    ctx.emit(out, late)?;
                }
                continue;
            }
            let (init, agg) = (&mut self.init, &mut self.agg);
            let state = ctx.state_mut::<WindowState<K, A>>(self.state)?;
            let (slot, new_start) = state.update(start, &key, ts, init, |a| agg(&key, v, a))?;
            if self.emit == EmitStrategy::OnUpdate {
                self.pending.push(Record {
                    key: Windowed {
                        key: key.clone(),
                        window: self.windows.window_at(start),
                    },
                    value: slot.agg.clone(),
                    timestamp_ms: slot.max_ts,
                    headers: Headers::new(),
                });
            }
            if new_start && close < ctx.next_deadline {
                ctx.next_deadline = close;
            }
        }
        self.next.process_each(ctx, self.pending.drain(..))
    }

    fn advance(&mut self, ctx: &mut Ctx) -> Result<(), StreamError> {
        let stream_time = ctx.stream_time;
        let mut closed = std::mem::take(&mut self.closed);
        ctx.state_mut::<WindowState<K, A>>(self.state)?
            .close(stream_time, &mut closed);
        let emit = self.emit == EmitStrategy::OnWindowClose;
        let sent = self.next.process_each(
            ctx,
            closed
                .drain(..)
                .filter(|_| emit)
                .map(|(key, value, ts)| Record {
                    key,
                    value,
                    timestamp_ms: ts,
                    headers: Headers::new(),
                }),
        );
        self.closed = closed;
        sent?;
        self.next.advance(ctx)
    }
}
