//! A repartition on the embedded backend: a `StreamRunner` on an
//! `EmbeddedLog` (source and sink: the internal stream
//! `per-product-repartition` is an event stream of the same log) committing
//! to a `RedbStore`, both reopened from disk before every step, some steps
//! crashing between their commit and the delivery of their outbox: every
//! order is written once to the internal stream and counted once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use smartmsg_embedded::{EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{
    envelope, EventLogSink, EventLogSource, Headers, OutputRecord, RunnerConfig, Sink, SinkError,
    StateCodec, StreamRunner, Topology,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Orders (order id → product id): orders per product, through the
/// repartition `per-product-repartition`.
fn orders() -> Topology {
    let t = Topology::new();
    t.stream::<u32, u8>("orders")
        .group_by(|_, p| *p)
        .count("per-product")
        .to("counts");
    t
}

/// A sink that fails while `fail` counts down (a crash after a commit,
/// before its delivery), then delivers to the log.
struct FlakySink {
    inner: EventLogSink,
    fail: Arc<AtomicUsize>,
}

#[async_trait]
impl Sink for FlakySink {
    async fn send(&mut self, runner: &str, records: &[OutputRecord]) -> Result<(), SinkError> {
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(SinkError::Invalid {
                output: "any".into(),
                reason: "simulated crash".into(),
            });
        }
        self.inner.send(runner, records).await
    }
}

type Runner = StreamRunner<EventLogSource, FlakySink>;

fn open(log: &Arc<EmbeddedLog>, store: &Arc<RedbStore>, fail: &Arc<AtomicUsize>) -> Runner {
    let log_dyn: Arc<dyn EventLog> = log.clone();
    StreamRunner::open(
        orders(),
        store.clone(),
        EventLogSource::with_envelopes(log_dyn.clone()),
        FlakySink {
            inner: EventLogSink::new(log_dyn),
            fail: fail.clone(),
        },
        RunnerConfig::new("orders").with_batch(4),
    )
    .unwrap()
}

fn product(i: u32) -> u8 {
    (i * 7 % 5) as u8
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_by_counts_every_order_once_on_embedded_log_and_redb_across_crashes() {
    const ORDERS: u32 = 30;
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path().join("log")).unwrap();
        // Timestamps out of order; a header on each order.
        let events = (0..ORDERS)
            .map(|i| {
                let h = Headers::new().with("order", i.to_bytes()).unwrap();
                let (schema, payload) =
                    envelope::encode_with_headers(&i.to_bytes(), &product(i).to_bytes(), &h);
                NewEvent::new("orders", schema, 1_000 + u64::from(i * 13 % 17), payload)
            })
            .collect();
        log.append(AppendTx::single(
            StreamId::new("orders").unwrap(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .unwrap();
    }

    let fail = Arc::new(AtomicUsize::new(0));
    let (mut steps, mut crashes) = (0, 0);
    loop {
        // Reopen the log and the store before every step.
        let log = Arc::new(EmbeddedLog::open(dir.path().join("log")).unwrap());
        let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
        let mut r = open(&log, &store, &fail);
        steps += 1;
        assert!(steps < 200, "the runner does not finish");
        if steps % 3 == 0 {
            // Crash between the commit and the delivery: the outbox (with
            // the repartition records) is delivered by the next open. (A
            // step with nothing to deliver does not call the sink.)
            fail.store(1, Ordering::SeqCst);
            match r.step().await {
                Err(_) => crashes += 1,
                Ok(report) => {
                    fail.store(0, Ordering::SeqCst);
                    if report.records == 0 {
                        break;
                    }
                }
            }
            continue;
        }
        if r.step().await.unwrap().records == 0 {
            break;
        }
    }
    assert!(crashes >= 5, "{crashes} crashes");

    let log = EmbeddedLog::open(dir.path().join("log")).unwrap();
    let all = log.read_all(0, 10_000).await.unwrap();
    // Every order written once to the internal stream, in order, keyed by
    // its product, with its timestamp and headers.
    let internal: Vec<(u8, u64, u32)> = all
        .iter()
        .filter(|e| e.kind == "per-product-repartition")
        .map(|e| {
            let (k, _, h) = envelope::decode_event(e).unwrap();
            let order = u32::decode(h.last("order").unwrap()).unwrap();
            (u8::decode(&k).unwrap(), e.timestamp_ms, order)
        })
        .collect();
    let want: Vec<(u8, u64, u32)> = (0..ORDERS)
        .map(|i| (product(i), 1_000 + u64::from(i * 13 % 17), i))
        .collect();
    assert_eq!(internal, want);
    // Every order counted once: the counts output is the model's.
    let counts: Vec<(u8, u64)> = all
        .iter()
        .filter(|e| e.kind == "counts")
        .map(|e| {
            let (k, v, _) = envelope::decode_event(e).unwrap();
            (u8::decode(&k).unwrap(), u64::decode(&v).unwrap())
        })
        .collect();
    let mut seen = HashMap::<u8, u64>::new();
    let model: Vec<(u8, u64)> = (0..ORDERS)
        .map(|i| {
            let c = seen.entry(product(i)).or_default();
            *c += 1;
            (product(i), *c)
        })
        .collect();
    assert_eq!(counts, model);
    let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
    let r = open(&Arc::new(log), &store, &fail);
    let mut table = r.task().table_entries::<u8, u64>("per-product").unwrap();
    table.sort();
    let mut want_table: Vec<(u8, u64)> = seen.into_iter().collect();
    want_table.sort();
    assert_eq!(table, want_table);
}
