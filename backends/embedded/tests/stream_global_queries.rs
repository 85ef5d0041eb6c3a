//! A global table and interactive queries on the embedded backend: a
//! `StreamRunner` on an `EmbeddedLog` (source, global source and sink)
//! committing to a `RedbStore`, reopened from disk: the global table is
//! rebuilt from its source (it is never in redb), and readers of the redb
//! store see committed state, from another thread too.

use std::sync::Arc;

use smartmsg_embedded::{EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{
    envelope, scan_all, EventLogSink, EventLogSource, QueryError, RunnerConfig, StateCodec,
    StreamRunner, Topology, Window, Windows,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Orders (order id → product id) priced by the global table of products
/// (product id → price; `None` deletes): revenue per product, orders per
/// product and 10 ms window.
fn shop() -> Topology {
    let t = Topology::new();
    let products = t.global_table_with_deletes::<u8, u64>("products", "products");
    let orders = t.stream::<u8, u8>("orders");
    let priced = orders.join_global(&products, |_, p| *p, |p, price| (p, *price));
    priced.to("priced");
    priced
        .map(|_, (p, price)| (p, price))
        .group_by_key()
        .aggregate("revenue", || 0u64, |_, price, sum| *sum += price)
        .to("revenue");
    orders
        .map(|_, p| (p, ()))
        .group_by_key()
        .windowed_by(Windows::tumbling(10).unwrap().grace(1_000))
        .count("orders-per-window")
        .to("window-counts");
    t
}

async fn append(log: &EmbeddedLog, kind: &str, records: &[(u8, Vec<u8>, u64)]) {
    let events = records
        .iter()
        .map(|(k, v, ts)| NewEvent::new(kind, 1, *ts, envelope::encode(&k.to_bytes(), v)))
        .collect();
    log.append(AppendTx::single(
        StreamId::new(kind).unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

fn product(p: u8, price: Option<u64>, ts: u64) -> (u8, Vec<u8>, u64) {
    (p, price.to_bytes(), ts)
}

fn order(id: u8, p: u8, ts: u64) -> (u8, Vec<u8>, u64) {
    (id, p.to_bytes(), ts)
}

type Runner = StreamRunner<EventLogSource, EventLogSink>;

fn open(log: &Arc<EmbeddedLog>, store: &Arc<RedbStore>) -> Runner {
    let log_dyn: Arc<dyn EventLog> = log.clone();
    StreamRunner::open(
        shop(),
        store.clone(),
        EventLogSource::with_envelopes(log_dyn.clone()),
        EventLogSink::new(log_dyn.clone()),
        RunnerConfig::new("shop").with_batch(3),
    )
    .unwrap()
    .with_global_source(EventLogSource::with_envelopes(log_dyn))
}

async fn priced(log: &EmbeddedLog) -> Vec<(u8, (u8, u64))> {
    log.read_all(0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "priced")
        .map(|e| {
            let (k, v) = envelope::decode(&e.payload).unwrap();
            (u8::decode(&k).unwrap(), <(u8, u64)>::decode(&v).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_table_and_queries_on_embedded_log_and_redb_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let win = |s: u64| Window {
        start_ms: s,
        end_ms: s + 10,
    };
    {
        let log = Arc::new(EmbeddedLog::open(dir.path().join("log")).unwrap());
        let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
        // Orders before their products in the log: the bootstrap reads the
        // products first.
        append(
            &log,
            "orders",
            &[order(1, 7, 1), order(2, 8, 2), order(3, 7, 11)],
        )
        .await;
        append(
            &log,
            "products",
            &[product(7, Some(70), 0), product(8, Some(80), 0)],
        )
        .await;
        let mut r = open(&log, &store);
        let revenue = r.query_store::<u8, u64>("revenue").unwrap();
        let windows = r
            .query_window_store::<u8, u64>("orders-per-window")
            .unwrap();
        assert_eq!(revenue.get(&7).unwrap(), None);
        r.run_until_idle().await.unwrap();
        assert_eq!(
            priced(&log).await,
            vec![(1, (7, 70)), (2, (8, 80)), (3, (7, 70))]
        );
        assert_eq!(revenue.all(10).unwrap(), vec![(7, 140), (8, 80)]);
        assert_eq!(
            windows.fetch(&7, 0, 100).unwrap(),
            vec![(win(0), 1), (win(10), 1)]
        );
        // Typed errors on redb too.
        assert!(matches!(
            r.query_store::<u8, u64>("products"),
            Err(QueryError::GlobalStore { .. })
        ));
        assert!(matches!(
            r.query_store::<u8, u64>("orders-per-window"),
            Err(QueryError::WrongType { .. })
        ));
        // A price change and a deleted product, then more orders.
        append(
            &log,
            "products",
            &[product(7, Some(75), 0), product(8, None, 0)],
        )
        .await;
        append(&log, "orders", &[order(4, 7, 12), order(5, 8, 13)]).await;
        // Read from another thread while the runner steps: every read is
        // of one commit, so revenue only grows, by whole orders.
        let reader = revenue.clone();
        let watcher = std::thread::spawn(move || {
            let mut last = 0;
            for _ in 0..200 {
                let v = reader.get(&7).unwrap().unwrap_or(0);
                assert!(v >= last && [140, 215].contains(&v), "{v}");
                last = v;
            }
        });
        r.run_until_idle().await.unwrap();
        watcher.join().unwrap();
        assert_eq!(revenue.get(&7).unwrap(), Some(215));
        assert_eq!(revenue.get(&8).unwrap(), Some(80));
        // The global table is not in redb.
        assert!(scan_all(&*store, "products").unwrap().is_empty());
    }
    // Reopen everything from disk: the global table comes back from the
    // log, not from redb.
    let log = Arc::new(EmbeddedLog::open(dir.path().join("log")).unwrap());
    let store = Arc::new(RedbStore::open(dir.path().join("state.redb")).unwrap());
    append(&log, "orders", &[order(6, 7, 14), order(7, 8, 15)]).await;
    let mut r = open(&log, &store);
    assert!(r
        .task()
        .table_entries::<u8, u64>("products")
        .unwrap()
        .is_empty());
    let revenue = r.query_store::<u8, u64>("revenue").unwrap();
    assert_eq!(
        revenue.get(&7).unwrap(),
        Some(215),
        "committed before the reopen"
    );
    r.run_until_idle().await.unwrap();
    assert_eq!(
        r.task().table_entries::<u8, u64>("products").unwrap(),
        vec![(7, 75)]
    );
    assert_eq!(
        priced(&log).await,
        vec![
            (1, (7, 70)),
            (2, (8, 80)),
            (3, (7, 70)),
            (4, (7, 75)),
            (6, (7, 75))
        ]
    );
    assert_eq!(revenue.get(&7).unwrap(), Some(290));
    let windows = r
        .query_window_store::<u8, u64>("orders-per-window")
        .unwrap();
    assert_eq!(
        windows.fetch(&7, 0, 10).unwrap(),
        vec![(win(0), 1), (win(10), 3)]
    );
    assert_eq!(windows.fetch(&8, 10, 10).unwrap(), vec![(win(10), 2)]);
}
