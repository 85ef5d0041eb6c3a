//! The [`EventLog`] conformance suite.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::{select, Index};

use super::model::LogModel;
use super::{finish, run_check, run_random_cases, runtime, within, SuiteConfig};
use crate::append::{AppendResult, AppendTx, ExpectedVersion, IdempotencyKey, StreamAppend};
use crate::error::{AppendError, LimitError, ReadError};
use crate::event::{Metadata, NewEvent, RecordedEvent};
use crate::limits::Limits;
use crate::log::EventLog;
use crate::stream_id::StreamId;

/// Makes the event logs the suite checks.
///
/// An in-memory backend implements [`LogHarness::create`] only; a durable
/// one also implements [`LogHarness::reopen`] (closing the log and opening
/// the same storage again), and the suite then checks that everything
/// acknowledged survives, at random points of every case.
#[async_trait]
pub trait LogHarness: Send {
    /// The log under test.
    type Log: EventLog + 'static;

    /// A fresh, empty log.
    async fn create(&mut self) -> Self::Log;

    /// Close `log` (drop it) and open the same log again; durable backends
    /// must then show everything acknowledged before. The default returns
    /// `log` unchanged (in-memory).
    async fn reopen(&mut self, log: Self::Log) -> Self::Log {
        log
    }
}

/// Runs the [`EventLog`] conformance suite against the logs `harness` makes,
/// and panics with a report if any check fails.
///
/// Checks, each on a fresh log:
///
/// - **random operation sequences** (`config.cases` of them, up to
///   `config.max_ops` long), compared step by step with the reference
///   [`model`](super::model): transactions over 1–3 streams of a small pool
///   with 1–4 events each, every kind of [`ExpectedVersion`] (mostly
///   right, sometimes wrong), idempotency keys from a small pool (so genuine
///   retries and key reuse with other content both happen), verbatim
///   retries of earlier transactions, malformed transactions, reads of
///   streams and of the whole log from random places with random `max`
///   (including exactly and just over [`Limits::max_read_events`]),
///   `stream_version`, `head`, and reopening. Every [`AppendResult`], every
///   error (variant and fields) and every [`RecordedEvent`] read back must be
///   what the model says. After each case (and again after a final reopen)
///   the whole log is read: positions `0..head` gap-free, each stream's
///   versions `1..=n` gap-free, every event in exactly one stream, all equal
///   to the model;
/// - **limits**: an event just over [`Limits::max_event_bytes`], a
///   transaction just over [`Limits::max_tx_events`] and
///   [`Limits::max_tx_bytes`], too many streams, too-long kinds and ids, empty
///   and duplicate-stream transactions, reads over
///   [`Limits::max_read_events`]: each a typed [`LimitError`] with nothing
///   written; and values exactly at each limit accepted (sizes are built from
///   the log's own [`EventLog::limits`] and skipped where they would need
///   more than about 64 MiB);
/// - **idempotency content**: a key reused by a transaction that differs in a
///   single detail (a stream, an expected version, a kind, schema, timestamp,
///   id, payload byte, event boundary …) is
///   [`AppendError::IdempotencyKeyReused`];
/// - **head notifications**: a task waiting in
///   [`HeadWatch::wait_beyond`](crate::HeadWatch::wait_beyond) wakes after an
///   append (also one inside a multi-event transaction), not before; a watch
///   of a reopened log starts at its head; a watch outliving its log returns
///   [`ReadError::Closed`];
/// - **concurrency** (`config.concurrency` tasks, `config.concurrent_ops`
///   successes each): optimistic writers on one stream (exactly one winner
///   per version, every conflict's actual version beyond the expected one),
///   writers on distinct streams (no conflicts, positions tile the log),
///   readers racing multi-stream transactions (never see part of one),
///   simultaneous retries of one keyed transaction (one write, identical
///   results) and simultaneous reuse of one key with different content
///   (exactly one winner). Each concurrent history, put in position order,
///   must replay on the model to the same results and the same log.
///
/// What the suite assumes of the log: idempotency keys (like everything
/// acknowledged) survive [`LogHarness::reopen`]; a key used by a refused
/// transaction stays free; and its limits admit what the targeted checks
/// write (kinds of 6 bytes, ids of 5, events of 20 bytes, transactions of 4
/// events over 2 streams). Where the port leaves a choice open the suite
/// accepts every reasonable answer: which of several broken limits, or
/// which of several mismatching streams, an error names; and whether a key
/// reused with other content or a stream at the wrong version is reported
/// when both apply.
///
/// # Panics
///
/// When a check fails (after every check has run), with a report that names
/// each failure, the seed, and the minimal failing operation sequence of the
/// random part. Also when called from inside a tokio runtime: the suite
/// builds its own multi-thread runtime, so call it from a plain `#[test]`.
pub fn event_log_conformance<H: LogHarness>(harness: H, config: SuiteConfig) {
    let rt = runtime("event_log_conformance");
    let seed = config.resolve_seed();
    let mut harness = harness;
    let limit = config.timeout;
    let mut failures = Vec::new();

    macro_rules! check {
        ($name:literal, $check:expr) => {
            failures.extend(run_check(&rt, $name, limit, $check).err())
        };
    }
    let (h, c) = (&mut harness, &config);
    check!("limits", check_limits(h));
    check!("idempotency content", check_idempotency_content(h));
    check!("head watch", check_watch(h, c.wait_limit()));
    check!(
        "concurrent writers on one stream",
        check_concurrent_same_stream(h, c)
    );
    check!(
        "concurrent writers on distinct streams",
        check_concurrent_distinct_streams(h, c)
    );
    check!(
        "readers never see part of a transaction",
        check_atomic_visibility(h, c)
    );
    check!(
        "concurrent retries of one keyed transaction",
        check_concurrent_retries(h, c)
    );
    check!(
        "concurrent reuse of one key",
        check_concurrent_key_reuse(h, c)
    );

    let wait = config.wait_limit();
    if let Err(e) = run_random_cases(&rt, harness, &config, seed, op(), |h, ops| {
        Box::pin(run_case(h, ops, wait))
    }) {
        failures.push(e);
    }
    finish("EventLog", seed, failures);
}

// ---------------------------------------------------------------------------
// Random operation sequences
// ---------------------------------------------------------------------------

const STREAMS: &[&str] = &["s-0", "s-1", "s-2", "acct:7/x@y.z", "s_4"];
const KINDS: &[&str] = &["Created", "Renamed", "Closed", "k", "événement"];
const IDS: &[&str] = &["corr-1", "corr-2", "", "nul\u{0}id"];
const KEYS: &[&str] = &["key-a", "key-b", "key-c", "key-d"];

/// An expected version, resolved against the stream's version at run time.
#[derive(Debug, Clone, Copy)]
enum Exp {
    Any,
    NoStream,
    /// `Exact(current)`.
    Current,
    /// `Exact(current - k)`, or `Exact(current + k)` when that underflows.
    Behind(u64),
    /// `Exact(current + k)`.
    Ahead(u64),
}

#[derive(Debug, Clone)]
struct StreamSpec {
    stream: StreamId,
    expected: Exp,
    events: Vec<NewEvent>,
}

#[derive(Debug, Clone)]
struct TxSpec {
    streams: Vec<StreamSpec>,
    key: Option<&'static str>,
}

/// A transaction no log accepts, built from a valid single-stream one.
#[derive(Debug, Clone, Copy)]
enum Malformed {
    NoStreams,
    StreamWithoutEvents,
    DuplicateStream,
    EmptyKind,
    KindTooLong,
    CorrelationTooLong,
    CausationTooLong,
    KeyTooLong,
    TooManyStreams,
}

/// A read's `max`.
#[derive(Debug, Clone, Copy)]
enum ReadMax {
    N(usize),
    /// Exactly [`Limits::max_read_events`].
    AtLimit,
    /// One over it.
    OverLimit,
}

/// A read_all start.
#[derive(Debug, Clone, Copy)]
enum FromPos {
    Abs(u64),
    /// `head - k` (saturating).
    BeforeHead(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Append(TxSpec),
    /// Resend an earlier transaction of this case verbatim (a keyed one,
    /// if there is one and the flag says so).
    Retry(Index, bool),
    Malformed(Malformed, StreamSpec),
    ReadStream {
        stream: StreamId,
        from_version: u64,
        max: ReadMax,
    },
    ReadAll {
        from: FromPos,
        max: ReadMax,
    },
    StreamVersion(StreamId),
    Head,
    Reopen,
}

fn stream_id() -> impl Strategy<Value = StreamId> {
    select(STREAMS).prop_map(|s| StreamId::new(s).expect("valid pool name"))
}

fn id() -> impl Strategy<Value = Option<String>> {
    proptest::option::weighted(0.3, select(IDS).prop_map(String::from))
}

fn new_event() -> impl Strategy<Value = NewEvent> {
    (
        select(KINDS),
        prop_oneof![4 => 0u16..3, 1 => Just(u16::MAX)],
        prop_oneof![4 => 0u64..2_000_000_000_000, 1 => Just(u64::MAX)],
        id(),
        id(),
        proptest::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(
            |(kind, schema, timestamp_ms, correlation_id, causation_id, payload)| NewEvent {
                kind: kind.to_owned(),
                schema,
                timestamp_ms,
                metadata: Metadata {
                    correlation_id,
                    causation_id,
                },
                payload: Bytes::from(payload),
            },
        )
}

fn exp() -> impl Strategy<Value = Exp> {
    prop_oneof![
        16 => Just(Exp::Current),
        6 => Just(Exp::Any),
        1 => Just(Exp::NoStream),
        1 => (1u64..3).prop_map(Exp::Behind),
        1 => (1u64..3).prop_map(Exp::Ahead),
    ]
}

fn stream_spec() -> impl Strategy<Value = StreamSpec> {
    (
        stream_id(),
        exp(),
        proptest::collection::vec(new_event(), 1..=4),
    )
        .prop_map(|(stream, expected, events)| StreamSpec {
            stream,
            expected,
            events,
        })
}

fn tx_spec() -> impl Strategy<Value = TxSpec> {
    (
        proptest::collection::vec(stream_spec(), 1..=3),
        proptest::option::weighted(0.25, select(KEYS)),
    )
        .prop_map(|(streams, key)| TxSpec { streams, key })
}

fn read_max() -> impl Strategy<Value = ReadMax> {
    prop_oneof![
        6 => (0usize..=4).prop_map(ReadMax::N),
        4 => (0usize..=64).prop_map(ReadMax::N),
        1 => Just(ReadMax::AtLimit),
        1 => Just(ReadMax::OverLimit),
    ]
}

fn malformed() -> impl Strategy<Value = Malformed> {
    const ALL: &[Malformed] = &[
        Malformed::NoStreams,
        Malformed::StreamWithoutEvents,
        Malformed::DuplicateStream,
        Malformed::EmptyKind,
        Malformed::KindTooLong,
        Malformed::CorrelationTooLong,
        Malformed::CausationTooLong,
        Malformed::KeyTooLong,
        Malformed::TooManyStreams,
    ];
    select(ALL)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        40 => tx_spec().prop_map(Op::Append),
        8 => (any::<Index>(), proptest::bool::weighted(0.7)).prop_map(|(i, keyed)| Op::Retry(i, keyed)),
        4 => (malformed(), stream_spec()).prop_map(|(m, s)| Op::Malformed(m, s)),
        12 => (
            stream_id(),
            prop_oneof![8 => 0u64..12, 1 => Just(u64::MAX)],
            read_max()
        )
            .prop_map(|(stream, from_version, max)| Op::ReadStream {
                stream,
                from_version,
                max
            }),
        10 => (
            prop_oneof![
                4 => (0u64..100).prop_map(FromPos::Abs),
                4 => (0u64..6).prop_map(FromPos::BeforeHead),
                1 => Just(FromPos::Abs(u64::MAX)),
            ],
            read_max()
        )
            .prop_map(|(from, max)| Op::ReadAll { from, max }),
        5 => stream_id().prop_map(Op::StreamVersion),
        3 => Just(Op::Head),
        1 => Just(Op::Reopen),
    ]
}

/// One random case: a fresh log, the ops, then full-state checks around a
/// final reopen.
async fn run_case<H: LogHarness>(
    harness: &mut H,
    ops: &[Op],
    limit: Duration,
) -> Result<(), String> {
    let log = harness.create().await;
    let mut case = Case {
        limits: log.limits(),
        log: Some(log),
        harness,
        model: LogModel::new(),
        history: Vec::new(),
        limit,
    };
    for (i, op) in ops.iter().enumerate() {
        case.step(op)
            .await
            .map_err(|e| format!("at op #{i} {op:?}:\n  {e}"))?;
    }
    verify_state(case.log(), &case.model)
        .await
        .map_err(|e| format!("after the last op: {e}"))?;
    case.reopen()
        .await
        .map_err(|e| format!("after the final reopen: {e}"))?;
    verify_state(case.log(), &case.model)
        .await
        .map_err(|e| format!("after the final reopen: {e}"))
}

struct Case<'h, H: LogHarness> {
    harness: &'h mut H,
    /// Always `Some` outside `reopen`.
    log: Option<H::Log>,
    model: LogModel,
    limits: Limits,
    /// Every transaction sent by an `Append` op, for `Retry`.
    history: Vec<AppendTx>,
    limit: Duration,
}

impl<H: LogHarness> Case<'_, H> {
    fn log(&self) -> &H::Log {
        self.log.as_ref().expect("log present")
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Append(spec) => {
                let tx = self.materialize(spec);
                self.history.push(tx.clone());
                self.append(tx).await
            }
            Op::Retry(index, prefer_keyed) => {
                let keyed: Vec<&AppendTx> = self
                    .history
                    .iter()
                    .filter(|tx| tx.idempotency_key.is_some())
                    .collect();
                let pool: Vec<&AppendTx> = if *prefer_keyed && !keyed.is_empty() {
                    keyed
                } else {
                    self.history.iter().collect()
                };
                if pool.is_empty() {
                    return self.check_head().await;
                }
                let tx = pool[index.index(pool.len())].clone();
                self.append(tx).await
            }
            Op::Malformed(kind, base) => match self.malformed(*kind, base) {
                Some(tx) => self.append(tx).await,
                None => self.check_head().await,
            },
            Op::ReadStream {
                stream,
                from_version,
                max,
            } => {
                let Some(max) = self.read_max(*max) else {
                    return Ok(());
                };
                let got = self.log().read_stream(stream, *from_version, max).await;
                let what = format!("read_stream({stream}, from_version {from_version}, max {max})");
                match LogModel::read_violation(max, &self.limits) {
                    Some(limit) => expect_read_limit(&what, got, limit),
                    None => {
                        let want = self.model.read_stream(stream, *from_version, max);
                        compare_events(&what, &want, &got.map_err(|e| format!("{what}: {e:?}"))?)
                    }
                }
            }
            Op::ReadAll { from, max } => {
                let Some(max) = self.read_max(*max) else {
                    return Ok(());
                };
                let from = match *from {
                    FromPos::Abs(p) => p,
                    FromPos::BeforeHead(k) => self.model.head().saturating_sub(k),
                };
                let got = self.log().read_all(from, max).await;
                let what = format!("read_all(from {from}, max {max})");
                match LogModel::read_violation(max, &self.limits) {
                    Some(limit) => expect_read_limit(&what, got, limit),
                    None => {
                        let want = self.model.read_all(from, max);
                        compare_events(&what, &want, &got.map_err(|e| format!("{what}: {e:?}"))?)
                    }
                }
            }
            Op::StreamVersion(stream) => {
                let got = self
                    .log()
                    .stream_version(stream)
                    .await
                    .map_err(|e| format!("stream_version({stream}): {e:?}"))?;
                let want = self.model.version(stream);
                ensure!(
                    got == want,
                    "stream_version({stream}) = {got}; the model says {want}"
                );
                Ok(())
            }
            Op::Head => self.check_head().await,
            Op::Reopen => self.reopen().await,
        }
    }

    fn resolve(&self, stream: &StreamId, exp: Exp) -> ExpectedVersion {
        let v = self.model.version(stream);
        match exp {
            Exp::Any => ExpectedVersion::Any,
            Exp::NoStream => ExpectedVersion::NoStream,
            Exp::Current => ExpectedVersion::Exact(v),
            Exp::Behind(k) => ExpectedVersion::Exact(v.checked_sub(k).unwrap_or(v + k)),
            Exp::Ahead(k) => ExpectedVersion::Exact(v + k),
        }
    }

    fn materialize(&self, spec: &TxSpec) -> AppendTx {
        let mut streams: Vec<StreamAppend> = Vec::new();
        for s in &spec.streams {
            // A stream twice is a malformed transaction, tested on its own.
            if streams.iter().any(|t| t.stream == s.stream) {
                continue;
            }
            streams.push(StreamAppend {
                stream: s.stream.clone(),
                expected: self.resolve(&s.stream, s.expected),
                events: s.events.clone(),
            });
        }
        AppendTx {
            streams,
            idempotency_key: spec.key.map(IdempotencyKey::new),
        }
    }

    /// The malformed transaction, or `None` when the log's limits are too
    /// large to build it cheaply.
    fn malformed(&self, kind: Malformed, base: &StreamSpec) -> Option<AppendTx> {
        const CAP: usize = 1 << 16;
        let l = &self.limits;
        let mut tx = AppendTx {
            streams: vec![StreamAppend {
                stream: base.stream.clone(),
                expected: self.resolve(&base.stream, base.expected),
                events: base.events.clone(),
            }],
            idempotency_key: None,
        };
        let first = &mut tx.streams[0].events[0];
        match kind {
            Malformed::NoStreams => tx.streams.clear(),
            Malformed::StreamWithoutEvents => {
                let other = StreamId::new(format!("{}-empty", base.stream)).ok()?;
                tx.streams.push(StreamAppend {
                    stream: other,
                    expected: ExpectedVersion::Any,
                    events: Vec::new(),
                });
            }
            Malformed::DuplicateStream => {
                let again = tx.streams[0].clone();
                tx.streams.push(again);
            }
            Malformed::EmptyKind => first.kind = String::new(),
            Malformed::KindTooLong if l.max_kind_len < CAP => {
                first.kind = "k".repeat(l.max_kind_len + 1);
            }
            Malformed::CorrelationTooLong if l.max_id_len < CAP => {
                first.metadata.correlation_id = Some("c".repeat(l.max_id_len + 1));
            }
            Malformed::CausationTooLong if l.max_id_len < CAP => {
                first.metadata.causation_id = Some("c".repeat(l.max_id_len + 1));
            }
            Malformed::KeyTooLong if l.max_id_len < CAP => {
                tx.idempotency_key = Some(IdempotencyKey::new("k".repeat(l.max_id_len + 1)));
            }
            Malformed::TooManyStreams if l.max_tx_streams < 4096 => {
                let event = NewEvent::new("E", 0, 0, Bytes::new());
                tx.streams = (0..=l.max_tx_streams)
                    .map(|i| StreamAppend {
                        stream: StreamId::new(format!("many-{i}")).expect("valid name"),
                        expected: ExpectedVersion::Any,
                        events: vec![event.clone()],
                    })
                    .collect();
            }
            _ => return None,
        }
        Some(tx)
    }

    fn read_max(&self, max: ReadMax) -> Option<usize> {
        match max {
            ReadMax::N(n) => Some(n),
            ReadMax::AtLimit => Some(self.limits.max_read_events),
            ReadMax::OverLimit => self.limits.max_read_events.checked_add(1),
        }
    }

    /// Appends `tx` to both the model and the log and compares.
    async fn append(&mut self, tx: AppendTx) -> Result<(), String> {
        let want = self.model.append(&tx, &self.limits);
        let got = self.log().append(tx.clone()).await;
        compare_append(&describe_tx(&tx), &want, &got)?;
        self.check_head().await
    }

    async fn check_head(&self) -> Result<(), String> {
        let got = self
            .log()
            .head()
            .await
            .map_err(|e| format!("head(): {e:?}"))?;
        ensure!(
            got == self.model.head(),
            "head() = {got}; the model says {}",
            self.model.head()
        );
        Ok(())
    }

    async fn reopen(&mut self) -> Result<(), String> {
        let log = self.log.take().expect("log present");
        let log = self.harness.reopen(log).await;
        self.limits = log.limits();
        self.log = Some(log);
        self.check_head().await?;
        check_watch_at_head(self.log(), self.model.head(), self.limit).await
    }
}

// ---------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------

/// A short description of a transaction for failure messages.
fn describe_tx(tx: &AppendTx) -> String {
    let mut out = String::from("append(");
    if let Some(key) = &tx.idempotency_key {
        if key.as_str().len() > 16 {
            out.push_str(&format!("key <{} bytes>, ", key.as_str().len()));
        } else {
            out.push_str(&format!("key {key:?}, "));
        }
    }
    for (i, s) in tx.streams.iter().enumerate() {
        if i == 6 {
            out.push_str(&format!("… {} streams in all", tx.streams.len()));
            break;
        }
        out.push_str(&format!(
            "[{} expecting {}: {} event(s)] ",
            s.stream,
            s.expected,
            s.events.len()
        ));
    }
    out.push(')');
    out
}

fn compare_append(
    what: &str,
    want: &Result<AppendResult, Vec<super::model::Rejection>>,
    got: &Result<AppendResult, AppendError>,
) -> Result<(), String> {
    match (want, got) {
        (Ok(w), Ok(g)) => {
            ensure!(w == g, "{what} returned {g:?}; the model says {w:?}");
        }
        (Err(w), Err(g)) => {
            ensure!(
                w.iter().any(|r| r.accepts(g)),
                "{what} failed with {g:?}; the model accepts only one of {w:?}"
            );
        }
        (Ok(w), Err(g)) => {
            return Err(format!(
                "{what} failed with {g:?}; the model says it succeeds with {w:?}"
            ))
        }
        (Err(w), Ok(g)) => {
            return Err(format!(
                "{what} succeeded with {g:?}; the model says it fails with one of {w:?}"
            ))
        }
    }
    Ok(())
}

fn expect_read_limit(
    what: &str,
    got: Result<Vec<RecordedEvent>, ReadError>,
    want: LimitError,
) -> Result<(), String> {
    match got {
        Err(ReadError::Limit(e)) if e == want => Ok(()),
        Err(e) => Err(format!(
            "{what} failed with {e:?}; expected Limit({want:?})"
        )),
        Ok(events) => Err(format!(
            "{what} returned {} events; expected Limit({want:?})",
            events.len()
        )),
    }
}

fn compare_events(what: &str, want: &[RecordedEvent], got: &[RecordedEvent]) -> Result<(), String> {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        ensure!(
            w == g,
            "{what}: event #{i} is\n    {}\n  the model says\n    {}",
            short_event(g),
            short_event(w)
        );
    }
    ensure!(
        want.len() == got.len(),
        "{what} returned {} events; the model says {} (positions {:?} vs {:?})",
        got.len(),
        want.len(),
        got.iter().map(|e| e.position).take(20).collect::<Vec<_>>(),
        want.iter().map(|e| e.position).take(20).collect::<Vec<_>>()
    );
    Ok(())
}

/// An event's Debug with a long payload cut short.
fn short_event(e: &RecordedEvent) -> String {
    if e.payload.len() <= 64 {
        return format!("{e:?}");
    }
    let mut cut = e.clone();
    cut.payload = e.payload.slice(..32);
    format!("{cut:?} (payload cut; {} bytes in all)", e.payload.len())
}

/// Reads the whole log and checks its structure and its equality with the
/// model.
async fn verify_state<L: EventLog + ?Sized>(log: &L, model: &LogModel) -> Result<(), String> {
    let limits = log.limits();
    let page = limits.max_read_events.clamp(1, 512);
    let head = log.head().await.map_err(|e| format!("head(): {e:?}"))?;
    ensure!(
        head == model.head(),
        "head() = {head}; the model says {}",
        model.head()
    );

    // The whole log, page by page: positions 0..head, gap-free.
    let mut all: Vec<RecordedEvent> = Vec::new();
    loop {
        let from = all.len() as u64;
        let batch = log
            .read_all(from, page)
            .await
            .map_err(|e| format!("read_all({from}, {page}): {e:?}"))?;
        ensure!(
            batch.len() <= page,
            "read_all({from}, {page}) returned {} events, more than asked",
            batch.len()
        );
        if batch.is_empty() {
            break;
        }
        for (i, e) in batch.iter().enumerate() {
            ensure!(
                e.position == from + i as u64,
                "read_all({from}, {page}): event #{i} has position {}; positions must be gap-free",
                e.position
            );
        }
        all.extend(batch);
        ensure!(
            all.len() as u64 <= head,
            "read_all returns events beyond the head {head}"
        );
    }
    ensure!(
        all.len() as u64 == head,
        "read_all from 0 returns {} events; head() is {head}",
        all.len()
    );
    compare_events("read_all over the whole log", model.events(), &all)?;

    // Every stream: versions 1..=n gap-free, matching stream_version; every
    // event in exactly one stream.
    let names: BTreeSet<StreamId> = all
        .iter()
        .map(|e| e.stream.clone())
        .chain(model.streams().cloned())
        .collect();
    let mut seen = vec![0u32; all.len()];
    for stream in &names {
        let version = log
            .stream_version(stream)
            .await
            .map_err(|e| format!("stream_version({stream}): {e:?}"))?;
        let mut events: Vec<RecordedEvent> = Vec::new();
        loop {
            let from = events.len() as u64 + 1;
            let batch = log
                .read_stream(stream, from, page)
                .await
                .map_err(|e| format!("read_stream({stream}, {from}, {page}): {e:?}"))?;
            ensure!(
                batch.len() <= page,
                "read_stream({stream}, {from}, {page}) returned {} events, more than asked",
                batch.len()
            );
            if batch.is_empty() {
                break;
            }
            for (i, e) in batch.iter().enumerate() {
                ensure!(
                    e.stream == *stream && e.version == from + i as u64,
                    "read_stream({stream}, {from}, {page}): event #{i} is {} v{}; versions must be \
                     1-based and gap-free",
                    e.stream,
                    e.version
                );
                let slot = seen.get_mut(e.position as usize).ok_or_else(|| {
                    format!(
                        "read_stream({stream}) returns position {}, beyond the head {head}",
                        e.position
                    )
                })?;
                *slot += 1;
            }
            events.extend(batch);
            ensure!(
                events.len() as u64 <= head,
                "read_stream({stream}) returns more events than the log holds"
            );
        }
        ensure!(
            events.len() as u64 == version,
            "stream {stream}: stream_version() = {version} but read_stream returns {} events",
            events.len()
        );
        compare_events(
            &format!("read_stream({stream}) over the whole stream"),
            &model.read_stream(stream, 1, usize::MAX),
            &events,
        )?;
    }
    if let Some(p) = seen.iter().position(|&n| n != 1) {
        return Err(format!(
            "event at position {p} appears in {} stream reads; it must appear in exactly one",
            seen[p]
        ));
    }
    Ok(())
}

/// With the log quiet at `head`, a new watch must report exactly `head`.
async fn check_watch_at_head<L: EventLog + ?Sized>(
    log: &L,
    head: u64,
    limit: Duration,
) -> Result<(), String> {
    let mut watch = log.watch_head();
    ensure!(
        watch.current() <= head,
        "watch_head().current() = {} is beyond the head {head}",
        watch.current()
    );
    if head == 0 {
        return Ok(());
    }
    // The log is quiet: its watch should already be at the head; `limit`
    // gives a backend that publishes asynchronously a moment to catch up.
    match within(limit, watch.wait_beyond(head - 1)).await {
        Some(Ok(h)) if h == head => Ok(()),
        Some(Ok(h)) => Err(format!(
            "watch_head().wait_beyond({}) returned {h}; the head is {head}",
            head - 1
        )),
        Some(Err(e)) => Err(format!("watch_head().wait_beyond({}): {e:?}", head - 1)),
        None => Err(format!(
            "watch_head().wait_beyond({}) did not return within {limit:?} although the head is \
             {head} (watch value {})",
            head - 1,
            watch.current()
        )),
    }
}

// ---------------------------------------------------------------------------
// Targeted checks
// ---------------------------------------------------------------------------

fn sid(name: &str) -> StreamId {
    StreamId::new(name).expect("valid stream name")
}

fn event(kind: &str, payload: impl Into<Bytes>) -> NewEvent {
    NewEvent::new(kind, 1, 1_700_000_000_000, payload)
}

/// Appends through the model and the log, requiring the log to agree, and
/// returns the result if the append succeeded.
async fn append_both<L: EventLog + ?Sized>(
    log: &L,
    model: &mut LogModel,
    tx: AppendTx,
    what: &str,
) -> Result<Option<AppendResult>, String> {
    let limits = log.limits();
    let want = model.append(&tx, &limits);
    let got = log.append(tx.clone()).await;
    compare_append(&format!("{what}: {}", describe_tx(&tx)), &want, &got)?;
    Ok(got.ok())
}

async fn check_limits<H: LogHarness>(harness: &mut H) -> Result<(), String> {
    const MEM_CAP: usize = 64 << 20;
    let log = harness.create().await;
    let l = log.limits();
    let mut model = LogModel::new();
    let a = sid("limits-a");
    append_both(
        &log,
        &mut model,
        AppendTx::single(a.clone(), ExpectedVersion::NoStream, vec![event("E", "x")]),
        "setup",
    )
    .await?
    .ok_or("the setup append failed")?;

    // Each probe breaks exactly one limit (the model lists what it breaks).
    let mut probes: Vec<(String, AppendTx)> =
        vec![
            ("a transaction with no streams".into(), AppendTx::default()),
            (
                "a stream with no events".into(),
                AppendTx::single(a.clone(), ExpectedVersion::Any, vec![event("E", "x")])
                    .with_stream(sid("limits-b"), ExpectedVersion::Any, vec![]),
            ),
            (
                "the same stream twice".into(),
                AppendTx::single(a.clone(), ExpectedVersion::Any, vec![event("E", "x")])
                    .with_stream(a.clone(), ExpectedVersion::Any, vec![event("E", "y")]),
            ),
            (
                "an empty kind".into(),
                AppendTx::single(a.clone(), ExpectedVersion::Any, vec![event("", "x")]),
            ),
        ];
    let one = |e: NewEvent| AppendTx::single(a.clone(), ExpectedVersion::Any, vec![e]);
    if l.max_kind_len < MEM_CAP {
        probes.push((
            "a kind one byte over max_kind_len".into(),
            one(event(&"k".repeat(l.max_kind_len + 1), "")),
        ));
    }
    if l.max_id_len < MEM_CAP {
        let long = "i".repeat(l.max_id_len + 1);
        probes.push((
            "a correlation id one byte over max_id_len".into(),
            one(event("E", "").with_metadata(Metadata::correlated(long.clone()))),
        ));
        probes.push((
            "a causation id one byte over max_id_len".into(),
            one(event("E", "").with_metadata(Metadata {
                correlation_id: None,
                causation_id: Some(long.clone()),
            })),
        ));
        probes.push((
            "an idempotency key one byte over max_id_len".into(),
            one(event("E", "")).with_idempotency_key(long),
        ));
    }
    if l.max_event_bytes < MEM_CAP {
        let payload = Bytes::from(vec![0xA5u8; l.max_event_bytes]); // + kind "E" = max + 1
        probes.push((
            "an event one byte over max_event_bytes".into(),
            one(event("E", payload)),
        ));
    }
    if l.max_tx_events < 200_000 {
        probes.push((
            "a transaction one event over max_tx_events".into(),
            AppendTx::single(
                a.clone(),
                ExpectedVersion::Any,
                vec![event("E", Bytes::new()); l.max_tx_events + 1],
            ),
        ));
    }
    if l.max_event_bytes > 1 && l.max_event_bytes < MEM_CAP {
        // Events of exactly max_event_bytes (sharing one buffer) until the
        // transaction is one byte or more over max_tx_bytes.
        let each = l.max_event_bytes;
        let n = l.max_tx_bytes / each + 1;
        if n <= l.max_tx_events && n < 100_000 {
            let payload = Bytes::from(vec![0x5Au8; each - 1]);
            probes.push((
                "a transaction over max_tx_bytes".into(),
                AppendTx::single(
                    a.clone(),
                    ExpectedVersion::Any,
                    vec![event("E", payload); n],
                ),
            ));
        }
    }
    if l.max_tx_streams < 100_000 {
        let streams = (0..=l.max_tx_streams)
            .map(|i| StreamAppend {
                stream: sid(&format!("limits-many-{i}")),
                expected: ExpectedVersion::Any,
                events: vec![event("E", "")],
            })
            .collect();
        probes.push((
            "a transaction one stream over max_tx_streams".into(),
            AppendTx {
                streams,
                idempotency_key: None,
            },
        ));
    }

    for (what, tx) in probes {
        let rejected = LogModel::limit_violations(&tx, &l);
        ensure!(
            !rejected.is_empty(),
            "testkit bug: probe `{what}` breaks no limit"
        );
        match log.append(tx).await {
            Err(AppendError::Limit(e)) if rejected.contains(&e) => {}
            Err(e) => {
                return Err(format!(
                    "{what}: failed with {e:?}; expected Limit(one of {rejected:?})"
                ))
            }
            Ok(r) => {
                return Err(format!(
                    "{what}: was accepted ({r:?}); expected Limit(one of {rejected:?})"
                ))
            }
        }
        let head = log.head().await.map_err(|e| format!("head(): {e:?}"))?;
        ensure!(
            head == model.head(),
            "{what}: refused, yet the head moved from {} to {head}",
            model.head()
        );
        let v = log.stream_version(&a).await.map_err(|e| format!("{e:?}"))?;
        ensure!(
            v == model.version(&a),
            "{what}: refused, yet {a} moved to version {v}"
        );
    }

    // Reads over the limit.
    if let Some(over) = l.max_read_events.checked_add(1) {
        let want = LimitError::ReadTooLarge {
            requested: over,
            max: l.max_read_events,
        };
        expect_read_limit(
            "read_all(0, max_read_events + 1)",
            log.read_all(0, over).await,
            want.clone(),
        )?;
        expect_read_limit(
            "read_stream(max_read_events + 1)",
            log.read_stream(&a, 1, over).await,
            want,
        )?;
    }

    // Exactly at each limit is accepted.
    if l.max_read_events < 10_000_000 {
        log.read_all(0, l.max_read_events)
            .await
            .map_err(|e| format!("read_all(0, max_read_events) failed: {e:?}"))?;
        log.read_stream(&a, 1, l.max_read_events)
            .await
            .map_err(|e| format!("read_stream(max_read_events) failed: {e:?}"))?;
    }
    if l.max_kind_len < MEM_CAP && l.max_id_len < MEM_CAP {
        let id = "i".repeat(l.max_id_len);
        let e =
            NewEvent::new("k".repeat(l.max_kind_len.max(1)), 3, 5, "p").with_metadata(Metadata {
                correlation_id: Some(id.clone()),
                causation_id: Some(id.clone()),
            });
        let tx =
            AppendTx::single(a.clone(), ExpectedVersion::Any, vec![e]).with_idempotency_key(&id);
        if LogModel::limit_violations(&tx, &l).is_empty() {
            append_both(&log, &mut model, tx, "kind and ids exactly at their limits").await?;
        }
    }
    if l.max_event_bytes > 1 && l.max_event_bytes <= l.max_tx_bytes && l.max_event_bytes < MEM_CAP {
        let payload = Bytes::from(vec![0xC3u8; l.max_event_bytes - 1]);
        append_both(
            &log,
            &mut model,
            one(event("E", payload)),
            "an event of exactly max_event_bytes",
        )
        .await?;
    }
    if l.max_tx_events < 20_000 && l.max_tx_events <= l.max_tx_bytes {
        let b = sid("limits-full");
        append_both(
            &log,
            &mut model,
            AppendTx::single(
                b,
                ExpectedVersion::NoStream,
                vec![event("E", Bytes::new()); l.max_tx_events],
            ),
            "a transaction of exactly max_tx_events",
        )
        .await?;
    }
    verify_state(&log, &model).await
}

async fn check_idempotency_content<H: LogHarness>(harness: &mut H) -> Result<(), String> {
    let log = harness.create().await;
    let mut model = LogModel::new();
    let (a, b) = (sid("idem-a"), sid("idem-b"));
    let key = "idem";
    let e1 = NewEvent::new("K", 1, 7, "p1");
    let e2 = NewEvent::new("K", 1, 8, "p2");
    let e3 = NewEvent::new("K2", 2, 9, "p3").with_metadata(Metadata {
        correlation_id: Some("corr".into()),
        causation_id: Some("cause".into()),
    });
    let base_streams = vec![
        StreamAppend {
            stream: a.clone(),
            expected: ExpectedVersion::Any,
            events: vec![e1.clone(), e2.clone()],
        },
        StreamAppend {
            stream: b.clone(),
            expected: ExpectedVersion::Any,
            events: vec![e3.clone()],
        },
    ];
    let tx = |streams: Vec<StreamAppend>| AppendTx {
        streams,
        idempotency_key: Some(IdempotencyKey::new(key)),
    };
    let original = append_both(
        &log,
        &mut model,
        tx(base_streams.clone()),
        "the keyed transaction",
    )
    .await?
    .ok_or("the keyed transaction failed")?;

    // Variants that differ from the original in one detail. Every stream
    // expects `Any` (or its current version), so the key is the only reason
    // to refuse them.
    type Edit = fn(&mut Vec<StreamAppend>);
    let variants: &[(&str, Edit)] = &[
        ("another stream name", |s| s[0].stream = sid("idem-c")),
        ("streams in the other order", |s| s.swap(0, 1)),
        ("expected version Exact(current) instead of Any", |s| {
            s[0].expected = ExpectedVersion::Exact(2)
        }),
        ("another kind", |s| s[0].events[0].kind = "K3".into()),
        ("another schema", |s| s[0].events[0].schema = 2),
        ("another timestamp", |s| s[0].events[0].timestamp_ms = 70),
        ("one payload byte changed", |s| {
            s[0].events[0].payload = Bytes::from_static(b"p9")
        }),
        ("a longer payload", |s| {
            s[0].events[0].payload = Bytes::from_static(b"p1\0")
        }),
        ("events in the other order", |s| s[0].events.swap(0, 1)),
        ("one event fewer", |s| {
            s[0].events.pop();
        }),
        ("one event more", |s| {
            let again = s[0].events[0].clone();
            s[0].events.push(again)
        }),
        ("an event moved to the other stream", |s| {
            let moved = s[0].events.pop().expect("two events");
            s[1].events.insert(0, moved)
        }),
        ("correlation id None -> Some(\"\")", |s| {
            s[0].events[0].metadata.correlation_id = Some(String::new())
        }),
        ("correlation id None -> Some(\"\\0\")", |s| {
            s[0].events[0].metadata.correlation_id = Some("\0".into())
        }),
        ("causation id Some(\"cause\") -> None", |s| {
            s[1].events[0].metadata.causation_id = None
        }),
        ("correlation and causation ids swapped", |s| {
            let m = &mut s[1].events[0].metadata;
            std::mem::swap(&mut m.correlation_id, &mut m.causation_id)
        }),
        (
            "two events merged into one whose payload spells out the second",
            |s| {
                // The bytes of event 2's fields, joined by 0xFF: what a hash of
                // the fields without lengths or presence tags would see.
                let mut p = b"p1".to_vec();
                for part in [
                    &b"K"[..],
                    &1u16.to_le_bytes(),
                    &8u64.to_le_bytes(),
                    b"\0",
                    b"\0",
                    b"p2",
                ] {
                    p.push(0xFF);
                    p.extend_from_slice(part);
                }
                s[0].events.truncate(1);
                s[0].events[0].payload = Bytes::from(p);
            },
        ),
    ];
    let mut wrong = Vec::new();
    for (what, edit) in variants {
        let mut streams = base_streams.clone();
        edit(&mut streams);
        let t = tx(streams);
        let want = model.append(&t, &log.limits());
        if let Ok(r) = &want {
            return Err(format!(
                "testkit bug: variant `{what}` is a duplicate for the model ({r:?})"
            ));
        }
        let got = log.append(t).await;
        match &got {
            Err(AppendError::IdempotencyKeyReused { key: k }) if k.as_str() == key => {}
            Ok(r) if *r == original => wrong.push(format!(
                "`{what}`: treated as a retry (returned the original result, wrote nothing)"
            )),
            other => wrong.push(format!("`{what}`: returned {other:?}")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "reusing key {key:?} for a transaction that differs in one detail must fail with \
         IdempotencyKeyReused, but:\n    {}",
        wrong.join("\n    ")
    );
    let retry = log
        .append(tx(base_streams))
        .await
        .map_err(|e| format!("a verbatim retry failed: {e:?}"))?;
    ensure!(
        retry == original,
        "a verbatim retry returned {retry:?}; the original result was {original:?}"
    );
    verify_state(&log, &model).await
}

async fn check_watch<H: LogHarness>(harness: &mut H, limit: Duration) -> Result<(), String> {
    let log = harness.create().await;
    let mut model = LogModel::new();
    let s = sid("watch-a");

    // A waiter on an empty log wakes after the first append, not before.
    let mut watch = log.watch_head();
    ensure!(
        watch.current() == 0,
        "a fresh log's watch_head().current() = {}",
        watch.current()
    );
    let waiter = tokio::spawn(async move { watch.wait_beyond(0).await });
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    ensure!(
        !waiter.is_finished(),
        "wait_beyond(0) returned on an empty log: {:?}",
        waiter.await
    );
    append_both(
        &log,
        &mut model,
        AppendTx::single(s.clone(), ExpectedVersion::NoStream, vec![event("E", "1")]),
        "first append",
    )
    .await?;
    match within(limit, waiter).await {
        Some(Ok(Ok(h))) => ensure!(h == 1, "wait_beyond(0) woke with head {h}; the head is 1"),
        Some(Ok(Err(e))) => return Err(format!("wait_beyond(0) failed: {e:?}")),
        Some(Err(e)) => return Err(format!("the waiting task failed: {e}")),
        None => {
            return Err(format!(
                "wait_beyond(0) did not wake within {limit:?} after an append"
            ))
        }
    }

    // A waiter for the second event of the next transaction.
    let mut watch = log.watch_head();
    let waiter = tokio::spawn(async move { watch.wait_beyond(2).await });
    append_both(
        &log,
        &mut model,
        AppendTx::single(
            s.clone(),
            ExpectedVersion::Exact(1),
            vec![event("E", "2"), event("E", "3")],
        ),
        "a two-event append",
    )
    .await?;
    match within(limit, waiter).await {
        Some(Ok(Ok(h))) => ensure!(h == 3, "wait_beyond(2) woke with head {h}; the head is 3"),
        Some(Ok(Err(e))) => return Err(format!("wait_beyond(2) failed: {e:?}")),
        Some(Err(e)) => return Err(format!("the waiting task failed: {e}")),
        None => {
            return Err(format!(
                "wait_beyond(2) did not wake within {limit:?} after a transaction wrote position 2"
            ))
        }
    }
    check_watch_at_head(&log, 3, limit).await?;

    // A reopened log's watch starts at its head.
    let log = harness.reopen(log).await;
    check_watch_at_head(&log, 3, limit)
        .await
        .map_err(|e| format!("after reopen: {e}"))?;
    verify_state(&log, &model).await?;

    // A watch outliving its log reports Closed.
    let mut watch = log.watch_head();
    drop(log);
    match within(limit, watch.wait_beyond(3)).await {
        Some(Err(ReadError::Closed)) => Ok(()),
        Some(other) => Err(format!(
            "wait_beyond on the watch of a dropped log returned {other:?}; expected Err(Closed)"
        )),
        None => Err(format!(
            "wait_beyond on the watch of a dropped log did not return within {limit:?}; \
             expected Err(Closed)"
        )),
    }
}

/// Awaits every task, turning a panic into an error.
async fn join_all<T>(
    tasks: Vec<tokio::task::JoinHandle<Result<T, String>>>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(tasks.len());
    let mut errors = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => errors.push(format!("task {i}: {e}")),
            Err(e) => errors.push(format!("task {i} panicked: {e}")),
        }
    }
    ensure!(errors.is_empty(), "{}", errors.join("\n  "));
    Ok(out)
}

/// Replays committed transactions in position order on a fresh model; each
/// must land exactly where the log said, and the log must equal the model.
async fn replay_and_verify<L: EventLog + ?Sized>(
    log: &L,
    mut committed: Vec<(AppendTx, AppendResult)>,
    limit: Duration,
) -> Result<(), String> {
    committed.sort_by_key(|(_, r)| r.first_position);
    let mut model = LogModel::new();
    let limits = log.limits();
    for (tx, got) in &committed {
        let want = model.append(tx, &limits);
        ensure!(
            want.as_ref() == Ok(got),
            "put in position order, {} returned {got:?} but replays on the model as {want:?}",
            describe_tx(tx)
        );
    }
    verify_state(log, &model).await?;
    check_watch_at_head(log, model.head(), limit).await
}

async fn check_concurrent_same_stream<H: LogHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let log = Arc::new(harness.create().await);
    let (tasks, wins_each) = (config.concurrency.max(2), config.concurrent_ops.max(1));
    let total = (tasks * wins_each) as u64;
    let s = sid("race");
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (log, s, start) = (log.clone(), s.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            let mut committed = Vec::new();
            let mut expected = log.stream_version(&s).await.map_err(|e| format!("{e:?}"))?;
            let mut attempts = 0u64;
            while committed.len() < wins_each {
                attempts += 1;
                ensure!(
                    attempts <= 100 * total,
                    "no progress after {attempts} attempts (last expected version {expected})"
                );
                // Let other writers in between reading the version and
                // appending, even on a log whose futures never suspend.
                tokio::task::yield_now().await;
                let payload = format!("t{t}-{}", committed.len());
                let tx = AppendTx::single(
                    s.clone(),
                    ExpectedVersion::Exact(expected),
                    vec![event("Raced", payload)],
                );
                match log.append(tx.clone()).await {
                    Ok(r) => {
                        ensure!(
                            r.versions == vec![(s.clone(), expected + 1)]
                                && r.next_position == r.first_position + 1,
                            "append expecting {expected} returned {r:?}"
                        );
                        committed.push((tx, r));
                        expected += 1;
                    }
                    Err(AppendError::WrongExpectedVersion {
                        stream,
                        expected: e,
                        actual,
                    }) => {
                        ensure!(
                            stream == s && e == ExpectedVersion::Exact(expected),
                            "a conflict names {stream} expecting {e}; the append was {s} expecting {expected}"
                        );
                        ensure!(
                            actual > expected,
                            "a conflict expecting version {expected} reports actual version {actual}; \
                             versions only grow, so it must be above {expected}"
                        );
                        // Half the tasks retry from the conflict's actual
                        // version, half read the version again.
                        expected = if t % 2 == 0 {
                            actual
                        } else {
                            let v = log.stream_version(&s).await.map_err(|e| format!("{e:?}"))?;
                            ensure!(
                                v >= actual,
                                "stream_version() = {v} after a conflict reported actual version {actual}"
                            );
                            v
                        };
                    }
                    Err(e) => return Err(format!("append expecting {expected} failed: {e:?}")),
                }
            }
            Ok(committed)
        }));
    }
    let committed: Vec<_> = join_all(handles).await?.into_iter().flatten().collect();
    let mut versions: Vec<u64> = committed.iter().map(|(_, r)| r.versions[0].1).collect();
    versions.sort_unstable();
    ensure!(
        versions == (1..=total).collect::<Vec<_>>(),
        "winning versions are {versions:?}; expected each of 1..={total} exactly once"
    );
    let v = log.stream_version(&s).await.map_err(|e| format!("{e:?}"))?;
    ensure!(
        v == total,
        "stream_version() = {v} after {total} successful appends"
    );
    replay_and_verify(&*log, committed, config.wait_limit()).await
}

async fn check_concurrent_distinct_streams<H: LogHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let log = Arc::new(harness.create().await);
    let (tasks, per_task) = (config.concurrency.max(2), config.concurrent_ops.max(1));
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (log, start) = (log.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            let s = sid(&format!("own-{t}"));
            start.wait().await;
            let mut committed = Vec::new();
            let mut version = 0u64;
            for j in 0..per_task {
                let n = (t + j) % 3 + 1;
                let events = (0..n)
                    .map(|i| event("Own", format!("{t}:{j}:{i}")))
                    .collect();
                let tx = AppendTx::single(s.clone(), ExpectedVersion::Exact(version), events);
                let r = log.append(tx.clone()).await.map_err(|e| {
                    format!("append to its own stream {s} expecting {version}: {e:?}")
                })?;
                version += n as u64;
                ensure!(
                    r.versions == vec![(s.clone(), version)]
                        && r.next_position == r.first_position + n as u64,
                    "append of {n} events to {s} returned {r:?}"
                );
                committed.push((tx, r));
            }
            Ok(committed)
        }));
    }
    let committed: Vec<_> = join_all(handles).await?.into_iter().flatten().collect();
    replay_and_verify(&*log, committed, config.wait_limit()).await
}

async fn check_atomic_visibility<H: LogHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let log = Arc::new(harness.create().await);
    let (writers, per_writer) = (config.concurrency.max(2), config.concurrent_ops.max(1));
    let cap = log
        .limits()
        .max_read_events
        .min(writers * per_writer * 4 + 8)
        .max(1);
    let hub = sid("vis-hub");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut readers = Vec::new();
    for _ in 0..2 {
        let (log, hub, done) = (log.clone(), hub.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut rounds = 0u32;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                let head = log.head().await.map_err(|e| format!("{e:?}"))?;
                let all = log.read_all(0, cap).await.map_err(|e| format!("{e:?}"))?;
                ensure!(
                    all.len() as u64 >= head.min(cap as u64),
                    "read_all after head() = {head} returned only {} events",
                    all.len()
                );
                check_whole_txs("read_all", &all, cap, |tag| tag.total)?;
                let hub_events = log
                    .read_stream(&hub, 1, cap)
                    .await
                    .map_err(|e| format!("{e:?}"))?;
                check_whole_txs("read_stream(vis-hub)", &hub_events, cap, |tag| tag.on_hub)?;
                rounds += 1;
                if finished && rounds >= 2 {
                    return Ok(rounds);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    let mut handles = Vec::new();
    for t in 0..writers {
        let (log, hub) = (log.clone(), hub.clone());
        handles.push(tokio::spawn(async move {
            let own = sid(&format!("vis-{t}"));
            let mut committed = Vec::new();
            for j in 0..per_writer {
                let (on_own, on_hub) = (j % 2 + 1, (t + j) % 2 + 1);
                let total = on_own + on_hub;
                let tag = |i: usize| format!("{t}:{j}:{i}:{total}:{on_hub}");
                let tx = AppendTx::single(
                    own.clone(),
                    ExpectedVersion::Any,
                    (0..on_own).map(|i| event("Vis", tag(i))).collect(),
                )
                .with_stream(
                    hub.clone(),
                    ExpectedVersion::Any,
                    (on_own..total).map(|i| event("Vis", tag(i))).collect(),
                );
                let r = log
                    .append(tx.clone())
                    .await
                    .map_err(|e| format!("append: {e:?}"))?;
                committed.push((tx, r));
                tokio::task::yield_now().await;
            }
            Ok(committed)
        }));
    }
    let written = join_all(handles).await;
    done.store(true, std::sync::atomic::Ordering::Release);
    let read = join_all(readers).await;
    let committed: Vec<_> = written?.into_iter().flatten().collect();
    read?;
    replay_and_verify(&*log, committed, config.wait_limit()).await
}

/// What a payload written by `check_atomic_visibility` says about its
/// transaction.
struct Tag {
    tx: (u32, u32),
    total: usize,
    on_hub: usize,
}

fn parse_tag(payload: &[u8]) -> Option<Tag> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.split(':').map(|p| p.parse::<u32>().ok());
    let (t, j, _i, total, on_hub) = (
        parts.next()??,
        parts.next()??,
        parts.next()??,
        parts.next()??,
        parts.next()??,
    );
    Some(Tag {
        tx: (t, j),
        total: total as usize,
        on_hub: on_hub as usize,
    })
}

/// Every transaction seen in `events` (a read of at most `max` events) must
/// be seen whole, in position order. When the read is full, its last
/// transaction may be cut by `max` and is not checked.
fn check_whole_txs(
    what: &str,
    events: &[RecordedEvent],
    max: usize,
    expected: impl Fn(&Tag) -> usize,
) -> Result<(), String> {
    let mut seen: BTreeMap<(u32, u32), (usize, usize, Vec<u64>)> = BTreeMap::new();
    let mut events = events;
    if events.len() >= max {
        if let Some(last) = events.last().and_then(|e| parse_tag(&e.payload)) {
            while events
                .last()
                .and_then(|e| parse_tag(&e.payload))
                .is_some_and(|t| t.tx == last.tx)
            {
                events = &events[..events.len() - 1];
            }
        }
    }
    for e in events {
        let tag = parse_tag(&e.payload).ok_or_else(|| {
            format!(
                "{what}: event at position {} has a payload the check did not write",
                e.position
            )
        })?;
        let entry = seen
            .entry(tag.tx)
            .or_insert((expected(&tag), 0, Vec::new()));
        entry.1 += 1;
        entry.2.push(e.position);
    }
    for ((t, j), (want, got, positions)) in seen {
        ensure!(
            got == want,
            "{what} shows {got} of the {want} events of writer {t}'s transaction {j} (positions \
             {positions:?}): a read must never show part of a transaction"
        );
        ensure!(
            positions.windows(2).all(|w| w[1] > w[0]),
            "{what}: positions {positions:?} of one transaction are out of order"
        );
    }
    Ok(())
}

async fn check_concurrent_retries<H: LogHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let log = Arc::new(harness.create().await);
    let tasks = config.concurrency.max(2);
    let tx = AppendTx::single(
        sid("retry-a"),
        ExpectedVersion::NoStream,
        vec![event("R", "1"), event("R", "2")],
    )
    .with_stream(
        sid("retry-b"),
        ExpectedVersion::NoStream,
        vec![event("R", "3")],
    )
    .with_idempotency_key("rtry");
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (log, tx, start) = (log.clone(), tx.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            start.wait().await;
            log.append(tx)
                .await
                .map_err(|e| format!("caller {t}: {e:?}"))
        }));
    }
    let results = join_all(handles).await?;
    let first = results[0].clone();
    ensure!(
        results.iter().all(|r| *r == first),
        "simultaneous retries of one keyed transaction got different results: {results:?}"
    );
    let again = log
        .append(tx.clone())
        .await
        .map_err(|e| format!("a later retry failed: {e:?}"))?;
    ensure!(
        again == first,
        "a later retry returned {again:?}; the first callers got {first:?}"
    );
    replay_and_verify(&*log, vec![(tx, first)], config.wait_limit()).await
}

async fn check_concurrent_key_reuse<H: LogHarness>(
    harness: &mut H,
    config: &SuiteConfig,
) -> Result<(), String> {
    let log = Arc::new(harness.create().await);
    let tasks = config.concurrency.max(2);
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (log, start) = (log.clone(), start.clone());
        handles.push(tokio::spawn(async move {
            let tx = AppendTx::single(
                sid(&format!("reuse-{t}")),
                ExpectedVersion::Any,
                vec![event("U", format!("{t}"))],
            )
            .with_idempotency_key("reus");
            start.wait().await;
            Ok((tx.clone(), log.append(tx).await))
        }));
    }
    let outcomes = join_all(handles).await?;
    let mut committed = Vec::new();
    for (tx, outcome) in outcomes {
        match outcome {
            Ok(r) => committed.push((tx, r)),
            Err(AppendError::IdempotencyKeyReused { key }) if key.as_str() == "reus" => {}
            Err(e) => return Err(format!("{}: {e:?}", describe_tx(&tx))),
        }
    }
    ensure!(
        committed.len() == 1,
        "{} of {tasks} different transactions sharing one key succeeded; exactly one must \
         (the others fail with IdempotencyKeyReused): {committed:?}",
        committed.len()
    );
    replay_and_verify(&*log, committed, config.wait_limit()).await
}
