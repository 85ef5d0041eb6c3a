//! The KeyValueStore conformance suite on `LogStore`: every commit an event
//! transaction of a log stream, reopening reads the stream back.

use std::sync::Arc;

use smartmsg_engine::memory::InMemoryLog;
use smartmsg_engine::stream::{KeyValueStore, LogStore, StoreError, StoreLimits, WriteBatch};
use smartmsg_engine::testkit::{kv_store_conformance, KvHarness, SuiteConfig};
use smartmsg_engine::{EventLog, Limits, StreamId};

/// Opens a store outside whatever runtime the caller is in (the suite's
/// harness is synchronous).
fn open(log: Arc<dyn EventLog>, limits: StoreLimits) -> LogStore {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(LogStore::open_with_limits(
                    log,
                    StreamId::new("pipeline-state").expect("stream id"),
                    limits,
                ))
                .expect("open the log store")
        })
        .join()
        .expect("open thread")
    })
}

struct OnLog {
    event_bytes: usize,
    limits: StoreLimits,
}

impl KvHarness for OnLog {
    type Store = LogStore;
    fn create(&mut self) -> LogStore {
        let mut limits = Limits::default();
        limits.max_event_bytes = self.event_bytes;
        open(Arc::new(InMemoryLog::with_limits(limits)), self.limits)
    }
    fn reopen(&mut self, store: LogStore) -> LogStore {
        let log = Arc::clone(store.log());
        drop(store);
        open(log, self.limits)
    }
}

#[test]
fn log_store_conforms() {
    kv_store_conformance(
        OnLog {
            event_bytes: 1 << 20,
            limits: StoreLimits::default(),
        },
        SuiteConfig::default(),
    );
}

/// Small events: most batches are split into several parts, which must
/// come back whole and in order.
#[test]
fn log_store_with_batches_in_many_parts_conforms() {
    kv_store_conformance(
        OnLog {
            event_bytes: 1_024,
            limits: StoreLimits::default(),
        },
        SuiteConfig::default(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_on_the_stream_cannot_commit_behind_the_first() {
    let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::new());
    let stream = StreamId::new("pipeline-state").unwrap();
    let first = LogStore::open(Arc::clone(&log), stream.clone())
        .await
        .unwrap();
    let second = LogStore::open(Arc::clone(&log), stream.clone())
        .await
        .unwrap();
    let mut b = WriteBatch::new();
    b.put("s", b"k".to_vec(), b"first".to_vec());
    let first = tokio::task::spawn_blocking(move || first.write(&b).map(|()| first))
        .await
        .unwrap()
        .unwrap();
    let mut b = WriteBatch::new();
    b.put("s", b"k".to_vec(), b"second".to_vec());
    let (second, refused) = tokio::task::spawn_blocking(move || {
        let r = second.write(&b);
        (second, r)
    })
    .await
    .unwrap();
    assert!(
        matches!(refused, Err(StoreError::Backend(_))),
        "the stale store's write must fail, got {refused:?}"
    );
    // Nothing of the refused batch is visible, in it or in a reopened store.
    assert_eq!(second.get("s", b"k").unwrap(), None);
    let reopened = LogStore::open(Arc::clone(&log), stream).await.unwrap();
    assert_eq!(reopened.get("s", b"k").unwrap(), Some(b"first".to_vec()));
    assert_eq!(reopened.version(), first.version());
}

#[tokio::test(flavor = "current_thread")]
async fn a_batch_larger_than_a_transaction_is_refused_whole() {
    let mut limits = Limits::default();
    limits.max_event_bytes = 1_024;
    limits.max_tx_bytes = 16 * 1_024;
    let log: Arc<dyn EventLog> = Arc::new(InMemoryLog::with_limits(limits));
    let store = LogStore::open(Arc::clone(&log), StreamId::new("st").unwrap())
        .await
        .unwrap();
    let mut b = WriteBatch::new();
    for i in 0..100u32 {
        b.put("s", i.to_be_bytes().to_vec(), vec![7u8; 500]);
    }
    // Writing from the async thread itself blocks it, but must not panic.
    let refused = store.write(&b);
    assert!(
        matches!(refused, Err(StoreError::EncodedTooLarge { .. })),
        "got {refused:?}"
    );
    assert_eq!(store.version(), 0);
    assert_eq!(log.head().await.unwrap(), 0);
    assert_eq!(store.changelog_bounds().unwrap(), (0, 0));
}
