//! Global tables: examples, a reference model under proptest (random
//! global updates and tombstones, stream records, a crash whose restart
//! rebuilds the table from its source), and the runner on the in-memory
//! log: the bootstrap before any stream record, updates between steps,
//! reopens.

mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use common::{crash_and_reopen, open_on_log, replay_with_crash};
use proptest::prelude::*;
use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{
    envelope, scan_all, BuildError, EventLogSource, InMemoryStore, KeyValueStore, RunnerConfig,
    StateCodec, TestDriver, Topology,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Orders (key: order id, value: product id) joined with the global table
/// of products (product id → price, `None` deletes): the inner join to
/// "priced", the left join to "all".
fn shop() -> Topology {
    let t = Topology::new();
    let products = t.global_table_with_deletes::<u8, u8>("products", "products");
    let orders = t.stream::<u8, u8>("orders");
    orders
        .join_global(
            &products,
            |_, product| *product,
            |product, price| (product, *price),
        )
        .to("priced");
    orders
        .left_join_global(
            &products,
            |_, product| *product,
            |product, price| (product, price.copied()),
        )
        .to("all");
    t
}

#[test]
fn a_stream_joins_the_global_table_by_a_key_it_computes() {
    let mut d = TestDriver::new(shop()).unwrap();
    d.pipe("products", 7u8, Some(70u8), 1_000).unwrap();
    // A global update does not move stream time nor count as processed.
    assert_eq!(d.stream_time(), 0);
    assert_eq!(d.metrics().processed, 0);
    d.pipe("orders", 1u8, 7u8, 10).unwrap();
    d.pipe("orders", 2u8, 8u8, 11).unwrap(); // no product 8
    d.pipe("products", 8u8, Some(80u8), 5).unwrap();
    d.pipe("orders", 3u8, 8u8, 12).unwrap();
    d.pipe("products", 7u8, None::<u8>, 6).unwrap(); // tombstone
    d.pipe("orders", 4u8, 7u8, 13).unwrap();
    assert_eq!(
        d.read_key_values::<u8, (u8, u8)>("priced").unwrap(),
        vec![(1, (7, 70)), (3, (8, 80))]
    );
    assert_eq!(
        d.read_key_values::<u8, (u8, Option<u8>)>("all").unwrap(),
        vec![
            (1, (7, Some(70))),
            (2, (8, None)),
            (3, (8, Some(80))),
            (4, (7, None))
        ]
    );
    assert_eq!(d.stream_time(), 13);
    assert_eq!(d.task().global_updates(), 3);
    // The global table is never committed: no keyspace, no changelog.
    d.commit().unwrap();
    assert!(scan_all(d.store(), "products").unwrap().is_empty());
    assert_eq!(
        d.table_entries::<u8, u8>("products").unwrap(),
        vec![(8, 80)]
    );
    // A restart rebuilds it from its source.
    let mut d = d.restart(shop()).unwrap();
    assert_eq!(
        d.table_entries::<u8, u8>("products").unwrap(),
        vec![(8, 80)]
    );
    d.pipe("orders", 5u8, 8u8, 14).unwrap();
    assert_eq!(
        d.read_key_values::<u8, (u8, u8)>("priced").unwrap(),
        vec![(5, (8, 80))]
    );
}

#[test]
fn global_sources_are_checked_at_build() {
    // A global source may not also be a stream input.
    let t = Topology::new();
    t.stream::<u8, u8>("x").to("out");
    t.global_table::<u8, u8>("x", "g");
    assert!(matches!(t.build(), Err(BuildError::DuplicateInput(n)) if n == "x"));
    let t = Topology::new();
    t.global_table::<u8, u8>("x", "g");
    t.stream::<u8, u8>("x").to("out");
    assert!(matches!(t.build(), Err(BuildError::DuplicateInput(n)) if n == "x"));
    // A global table of another topology.
    let other = Topology::new();
    let g = other.global_table::<u8, u8>("p", "g");
    let t = Topology::new();
    t.stream::<u8, u8>("s")
        .join_global(&g, |k, _| *k, |v, _| v)
        .to("out");
    assert!(matches!(t.build(), Err(BuildError::ForeignTable(n)) if n == "g"));
    // Its store name is checked like any store's.
    let t = Topology::new();
    t.add_state_store::<u8, u8>("g");
    t.global_table::<u8, u8>("p", "g");
    assert!(matches!(t.build(), Err(BuildError::DuplicateStore(n)) if n == "g"));
    // A tombstone (what a Kafka topic holds) removes its key from a plain
    // global table too.
    let t = Topology::new();
    t.global_table::<u8, u8>("p", "g");
    let mut d = TestDriver::new(t).unwrap();
    d.pipe("p", 1u8, 10u8, 0).unwrap();
    d.pipe("p", 2u8, 20u8, 0).unwrap();
    assert!(d
        .task()
        .delete_global_encoded("p", &1u8.to_bytes())
        .unwrap());
    assert!(!d
        .task()
        .delete_global_encoded("nope", &1u8.to_bytes())
        .unwrap());
    assert!(d.task().delete_global_encoded("p", &[]).is_err()); // bad key
    assert_eq!(d.table_entries::<u8, u8>("g").unwrap(), vec![(2, 20)]);
    // Wrong types when piping are typed errors.
    let mut d = TestDriver::new(shop()).unwrap();
    assert!(d.pipe("products", 1u8, 2u8, 0).is_err());
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A global update of `product` (`None`: a tombstone).
    Global { product: u8, price: Option<u8> },
    /// An order for `product`.
    Order { product: u8, ts: u64 },
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        (0u8..5, proptest::option::weighted(0.7, 0u8..100))
            .prop_map(|(product, price)| Ev::Global { product, price }),
        (0u8..5, 0u64..1_000).prop_map(|(product, ts)| Ev::Order { product, ts }),
    ]
}

/// What a step output: (order id, product, price) for "priced" and "all".
type Priced = Vec<(usize, u8, u8, u8)>;
type All = Vec<(usize, u8, u8, Option<u8>)>;

#[derive(Debug, Default, PartialEq)]
struct Got {
    priced: Priced,
    all: All,
    /// The global table after each step.
    tables: Vec<Vec<(u8, u8)>>,
}

fn fold(table: &mut std::collections::BTreeMap<u8, u8>, e: Ev) {
    if let Ev::Global { product, price } = e {
        match price {
            Some(p) => table.insert(product, p),
            None => table.remove(&product),
        };
    }
}

/// The model: the global table is the fold of the global updates piped so
/// far; an order joins it as it is. A crash before event `commit_at`
/// after `lost` more events: the lost events' global updates stay in the
/// global source (and the restart applies them), the lost orders'
/// outputs are lost, and the events from `commit_at` are piped again.
fn model(events: &[Ev], commit_at: usize, lost: usize) -> Got {
    let mut got = Got::default();
    let mut table = std::collections::BTreeMap::new();
    let mut id = 0u8;
    let mut step = 0;
    let mut crashed = false;
    while step < events.len() {
        if step == commit_at && !crashed {
            crashed = true;
            let mut lost_id = id;
            for &e in events.iter().skip(step).take(lost) {
                fold(&mut table, e);
                if let Ev::Order { .. } = e {
                    lost_id += 1;
                }
            }
            let _ = lost_id;
            continue;
        }
        let e = events[step];
        fold(&mut table, e);
        if let Ev::Order { product, .. } = e {
            let price = table.get(&product).copied();
            if let Some(p) = price {
                got.priced.push((step, id, product, p));
            }
            got.all.push((step, id, product, price));
            id += 1;
        }
        got.tables
            .push(table.iter().map(|(k, v)| (*k, *v)).collect());
        step += 1;
    }
    got
}

fn apply(d: &mut TestDriver, e: Ev, id: &mut u8) {
    match e {
        Ev::Global { product, price } => d.pipe("products", product, price, 0).unwrap(),
        Ev::Order { product, ts } => {
            d.pipe("orders", *id, product, ts).unwrap();
            *id += 1;
        }
    }
}

fn run(events: &[Ev], commit_at: usize, lost: usize) -> Got {
    let mut got = Got::default();
    replay_with_crash(events, shop, commit_at, lost, apply, |d, step| {
        for (id, (product, price)) in d.read_key_values::<u8, (u8, u8)>("priced").unwrap() {
            got.priced.push((step, id, product, price));
        }
        for (id, (product, price)) in d.read_key_values::<u8, (u8, Option<u8>)>("all").unwrap() {
            got.all.push((step, id, product, price));
        }
        got.tables
            .push(d.table_entries::<u8, u8>("products").unwrap());
    });
    got
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random global updates and tombstones and orders, and a crash
    /// mid-stream: the joins give exactly the model's outputs at the same
    /// steps, and the global table is the model's after every step,
    /// rebuilt from its source by the restart (the updates piped after
    /// the commit included).
    #[test]
    fn global_joins_match_the_reference_model(
        events in proptest::collection::vec(ev(), 0..80),
        commit_at in 0usize..80,
        lost in 0usize..10,
    ) {
        let want = model(&events, commit_at, lost);
        let got = run(&events, commit_at, lost);
        prop_assert_eq!(&got.priced, &want.priced);
        prop_assert_eq!(&got.all, &want.all);
        prop_assert_eq!(&got.tables, &want.tables);
    }
}

// ---------------------------------------------------------------------------
// The runner on the in-memory log.

fn event(kind: &str, key: u8, value: &impl StateCodec, ts: u64) -> NewEvent {
    NewEvent::new(
        kind,
        1,
        ts,
        envelope::encode(&key.to_bytes(), &value.to_bytes()),
    )
}

async fn append(log: &InMemoryLog, stream: &str, events: Vec<NewEvent>) {
    log.append(AppendTx::single(
        StreamId::new(stream).unwrap(),
        ExpectedVersion::Any,
        events,
    ))
    .await
    .unwrap();
}

/// Every "priced" output in the log, in order.
async fn priced(log: &InMemoryLog) -> Vec<(u8, (u8, u8))> {
    log.read_all(0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == "priced")
        .map(|e| {
            let (k, v) = envelope::decode(&e.payload).unwrap();
            (u8::decode(&k).unwrap(), <(u8, u8)>::decode(&v).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn the_runner_bootstraps_the_global_table_before_any_stream_record() {
    let log = Arc::new(InMemoryLog::new());
    // Orders come first in the log, their products after: a runner that
    // read the global source in log order with the stream would join
    // nothing; the bootstrap reads the whole global source first.
    append(
        &log,
        "orders",
        vec![event("orders", 1, &7u8, 10), event("orders", 2, &8u8, 11)],
    )
    .await;
    append(
        &log,
        "products",
        vec![
            event("products", 7, &Some(70u8), 1),
            event("products", 8, &Some(80u8), 2),
        ],
    )
    .await;
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            shop(),
            &store,
            &log,
            &fail,
            RunnerConfig::new("shop").with_batch(1),
        )
        .with_global_source(EventLogSource::with_envelopes(log.clone()))
    };
    let mut r = open();
    assert!(!r.is_bootstrapped());
    let first = r.step().await.unwrap();
    assert!(r.is_bootstrapped());
    assert_eq!(first.global, 2);
    r.run_until_idle().await.unwrap();
    assert_eq!(priced(&log).await, vec![(1, (7, 70)), (2, (8, 80))]);
    // The main source's product records were skipped, not joined twice
    // (one skipped per product; the outputs are skipped too).
    assert_eq!(r.task().metrics().processed, 2);

    // Updates after the bootstrap reach the table at the next step, before
    // its stream records.
    append(
        &log,
        "products",
        vec![
            event("products", 7, &Some(71u8), 3),
            event("products", 8, &None::<u8>, 4),
        ],
    )
    .await;
    append(
        &log,
        "orders",
        vec![event("orders", 3, &7u8, 12), event("orders", 4, &8u8, 13)],
    )
    .await;
    r.run_until_idle().await.unwrap();
    assert_eq!(
        priced(&log).await,
        vec![(1, (7, 70)), (2, (8, 80)), (3, (7, 71))]
    );
    // Nothing of the global table was committed.
    assert!(scan_all(&*store, "products").unwrap().is_empty());
    drop(r);

    // A reopen rebuilds it from its source, from position 0, before the
    // first stream record.
    append(&log, "orders", vec![event("orders", 5, &7u8, 14)]).await;
    let mut r = open();
    assert_eq!(r.global_position(), 0);
    assert!(r
        .task()
        .table_entries::<u8, u8>("products")
        .unwrap()
        .is_empty());
    r.run_until_idle().await.unwrap();
    assert_eq!(
        r.task().table_entries::<u8, u8>("products").unwrap(),
        vec![(7, 71)]
    );
    assert_eq!(
        priced(&log).await,
        vec![(1, (7, 70)), (2, (8, 80)), (3, (7, 71)), (5, (7, 71))]
    );
}

#[tokio::test]
async fn the_runner_is_exactly_once_with_a_global_table_across_reopens() {
    let log = Arc::new(InMemoryLog::new());
    // Orders first: each step's outputs come from its orders.
    append(
        &log,
        "orders",
        (0..30u8)
            .map(|i| event("orders", i, &(i % 5), u64::from(i)))
            .collect(),
    )
    .await;
    append(
        &log,
        "products",
        (0..4u8)
            .map(|p| event("products", p, &Some(p * 10), 0))
            .collect(),
    )
    .await;
    let store: Arc<dyn KeyValueStore> = Arc::new(InMemoryStore::new());
    let fail = Arc::new(AtomicUsize::new(0));
    let open = || {
        open_on_log(
            shop(),
            &store,
            &log,
            &fail,
            RunnerConfig::new("shop").with_batch(2),
        )
        .with_global_source(EventLogSource::with_envelopes(log.clone()))
    };
    let mut r = crash_and_reopen(open, &fail).await;
    r.run_until_idle().await.unwrap();
    // The products did not change: every order joined the same table
    // whatever the crashes, exactly once.
    let want: Vec<(u8, (u8, u8))> = (0..30u8)
        .filter(|i| i % 5 < 4)
        .map(|i| (i, (i % 5, (i % 5) * 10)))
        .collect();
    assert_eq!(priced(&log).await, want);
    assert_eq!(r.task().metrics().processed, 30);
}
