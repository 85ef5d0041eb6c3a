//! Single-writer fencing and aborted transactions on a real Kafka-protocol
//! broker (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smartmsg_engine::{AppendError, AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::{KafkaEventLog, KafkaLogError};

fn sid(s: &str) -> StreamId {
    StreamId::new(s).unwrap()
}

fn tx(stream: &str, payload: &str) -> AppendTx {
    AppendTx::single(
        sid(stream),
        ExpectedVersion::Any,
        vec![NewEvent::new("E", 1, 7, payload.as_bytes().to_vec())],
    )
}

/// Two events on two streams (two partitions of three, for these names).
fn tx2(payload: &str) -> AppendTx {
    tx("left", &format!("{payload}-l")).with_stream(
        sid("right"),
        ExpectedVersion::Any,
        vec![NewEvent::new(
            "E",
            1,
            7,
            format!("{payload}-r").into_bytes(),
        )],
    )
}

async fn payloads(log: &KafkaEventLog) -> Vec<String> {
    log.read_all(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.payload.to_vec()).unwrap())
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_second_writer_fences_the_first() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        let cfg = common::config(&bootstrap, "fence", 3);
        let first = KafkaEventLog::open(cfg.clone()).await.unwrap();
        first.append(tx2("a")).await.unwrap();

        let second = KafkaEventLog::open(cfg.clone()).await.unwrap();
        assert_eq!(payloads(&second).await, ["a-l", "a-r"]);

        // The first writer is fenced: a typed error, and it stays fenced.
        for p in ["b", "c"] {
            match first.append(tx2(p)).await {
                Err(AppendError::Fenced) => {}
                other => panic!("append through the fenced writer returned {other:?}"),
            }
        }
        // Keyed retries and conflicting versions too: nothing gets through.
        let keyed = tx("left", "d").with_idempotency_key("k-d");
        assert!(matches!(
            first.append(keyed).await,
            Err(AppendError::Fenced)
        ));
        // Its reads of what it had still work.
        assert_eq!(first.head().await.unwrap(), 2);
        assert_eq!(payloads(&first).await, ["a-l", "a-r"]);

        // The second writer writes; nothing of the fenced one is there.
        second.append(tx2("e")).await.unwrap();
        assert_eq!(payloads(&second).await, ["a-l", "a-r", "e-l", "e-r"]);
        first.close().await;
        second.close().await;

        let third = KafkaEventLog::open(cfg).await.unwrap();
        assert_eq!(payloads(&third).await, ["a-l", "a-r", "e-l", "e-r"]);
        assert_eq!(third.stream_version(&sid("left")).await.unwrap(), 2);
        third.close().await;
    });
}

/// The first writer is fenced while its transaction is open (every record
/// on the broker, commit not yet sent): its commit must fail with
/// `Fenced`. On Apache Kafka the new writer's `init_transactions` aborts
/// that transaction, so the new writer must not see it; tansu shows aborted
/// records, so there that one assertion is not checked (printed).
#[test]
fn a_writer_fenced_mid_transaction_gets_fenced() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let hides_aborted = common::broker_hides_aborted(&bootstrap);
    runtime().block_on(async {
        let mut base = common::config(&bootstrap, "fencemid", 3);
        // tansu never answers the fenced writer's commit (below): fail fast.
        base.request_timeout = Duration::from_secs(2);
        base.transaction_timeout = Duration::from_secs(10);
        let (reached_tx, reached_rx) = std::sync::mpsc::channel::<u64>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Arc::new(Mutex::new(go_rx));
        let reached_tx = Mutex::new(reached_tx);
        let mut cfg = base.clone();
        cfg.before_commit = Some(Arc::new(move |seq| {
            if seq == 2 {
                reached_tx.lock().unwrap().send(seq).unwrap();
                go_rx.lock().unwrap().recv().unwrap();
            }
            true
        }));
        let first = Arc::new(KafkaEventLog::open(cfg).await.unwrap());
        first.append(tx2("a")).await.unwrap();
        let pending = {
            let first = first.clone();
            tokio::spawn(async move { first.append(tx2("b")).await })
        };
        tokio::task::spawn_blocking(move || reached_rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the first writer reached its commit");

        let second = KafkaEventLog::open(base.clone()).await.unwrap();
        go_tx.send(()).unwrap();
        match pending.await.unwrap() {
            Err(AppendError::Fenced) => {}
            // Never a silent write, on any broker.
            Ok(r) => panic!("the fenced writer's open transaction committed: {r:?}"),
            Err(AppendError::Backend(e)) if !hides_aborted => println!(
                "requires Apache Kafka, not checked here: the fenced writer's commit must fail \
                 with AppendError::Fenced; tansu 0.6 drops the connection instead of answering \
                 the fenced EndTxn with PRODUCER_FENCED, so the writer saw a commit timeout and \
                 reported an unknown outcome: {e}"
            ),
            Err(e) => panic!("the fenced writer's open transaction returned {e:?}"),
        }
        // Either way the first writer accepts nothing more.
        assert!(first.append(tx2("z")).await.is_err());
        let seen = payloads(&second).await;
        if hides_aborted {
            assert_eq!(seen, ["a-l", "a-r"], "the fenced transaction is visible");
        } else {
            println!(
                "requires Apache Kafka, not checked here: the transaction of the fenced writer \
                 must be invisible to the new writer; this broker shows aborted records to \
                 read_committed consumers (tansu 0.6), and the new writer sees {seen:?}"
            );
        }
        // Whatever the new writer counted, it stays consistent after it.
        second.append(tx2("c")).await.unwrap();
        let after = payloads(&second).await;
        assert_eq!(after.len(), seen.len() + 2);
        second.close().await;
        let third = KafkaEventLog::open(base).await.unwrap();
        assert_eq!(payloads(&third).await, after);
        third.close().await;
        drop(first);
    });
}

/// A Kafka transaction that the writer aborts: the append fails, the next
/// one takes the same positions, and the rebuild ignores the aborted
/// records even on a broker that shows them (the committed chain).
#[test]
fn an_aborted_transaction_is_never_counted() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    runtime().block_on(async {
        let base = common::config(&bootstrap, "abort", 3);
        let mut cfg = base.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let c = commits.clone();
        // Abort the second Kafka transaction.
        cfg.before_commit = Some(Arc::new(move |seq| {
            c.fetch_add(1, Ordering::SeqCst);
            seq != 2
        }));
        let log = KafkaEventLog::open(cfg).await.unwrap();
        let a = log.append(tx2("a")).await.unwrap();
        let b = tx2("b").with_idempotency_key("kb");
        match log.append(b.clone()).await {
            Err(AppendError::Backend(e)) => assert!(
                matches!(
                    e.downcast_ref::<KafkaLogError>(),
                    Some(KafkaLogError::Aborted(_))
                ),
                "{e}"
            ),
            other => panic!("the aborted append returned {other:?}"),
        }
        assert_eq!(log.head().await.unwrap(), 2);
        let c = log.append(tx2("c")).await.unwrap();
        assert_eq!(c.first_position, a.next_position);
        // The key of the aborted append is free: the retry writes.
        let b2 = log.append(b.clone()).await.unwrap();
        assert_eq!(b2.first_position, 4);
        assert_eq!(log.stats().aborted_transactions, 1);
        let want = ["a-l", "a-r", "c-l", "c-r", "b-l", "b-r"];
        assert_eq!(payloads(&log).await, want);
        log.close().await;

        let log = KafkaEventLog::open(base).await.unwrap();
        assert_eq!(payloads(&log).await, want);
        assert_eq!(log.stream_version(&sid("left")).await.unwrap(), 3);
        assert_eq!(
            log.append(b).await.unwrap(),
            b2,
            "the key survived the rebuild"
        );
        let rebuild = log.stats().rebuild;
        println!("rebuild after an abort: {rebuild:?}");
        assert_eq!(rebuild.committed_batches, 3);
        log.close().await;
    });
}
