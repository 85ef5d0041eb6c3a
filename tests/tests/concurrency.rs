//! Optimistic concurrency on the embedded log: N tasks race to append to one
//! stream with `Exact` versions. Exactly one wins each version; every loser
//! gets a conflict carrying the actual version; idempotent retries write
//! nothing twice.

use std::sync::Arc;

use smartmsg_embedded::EmbeddedLog;
use smartmsg_engine::{AppendError, AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

const TASKS: u64 = 16;
const ROUNDS: u64 = 20;

#[test]
fn exactly_one_writer_wins_each_version() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(tmp.path()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let stream = StreamId::new("contended").unwrap();
    rt.block_on(async {
        for round in 0..ROUNDS {
            let expected = round; // every round starts at version `round`
            let mut tasks = Vec::new();
            for t in 0..TASKS {
                let log = log.clone();
                let stream = stream.clone();
                tasks.push(tokio::spawn(async move {
                    let tx = AppendTx::single(
                        stream,
                        ExpectedVersion::Exact(expected),
                        vec![NewEvent::new(
                            "Won",
                            1,
                            t,
                            format!("task {t} round {round}").into_bytes(),
                        )],
                    );
                    (t, log.append(tx).await)
                }));
            }
            let mut winners = Vec::new();
            for task in tasks {
                let (t, result) = task.await.unwrap();
                match result {
                    Ok(r) => {
                        assert_eq!(
                            r.versions,
                            vec![(StreamId::new("contended").unwrap(), expected + 1)]
                        );
                        winners.push(t);
                    }
                    Err(AppendError::WrongExpectedVersion {
                        stream: s,
                        expected: e,
                        actual,
                    }) => {
                        assert_eq!(s.as_str(), "contended");
                        assert_eq!(e, ExpectedVersion::Exact(expected));
                        assert_eq!(
                            actual,
                            expected + 1,
                            "a loser must see the winner's version"
                        );
                    }
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
            let events = log.read_stream(&stream, expected + 1, 10).await.unwrap();
            assert_eq!(events.len(), 1);
            assert_eq!(
                events[0].payload,
                format!("task {} round {round}", winners[0]).into_bytes()
            );
        }
        assert_eq!(log.stream_version(&stream).await.unwrap(), ROUNDS);
        assert_eq!(log.head().await.unwrap(), ROUNDS);
    });
}

#[test]
fn concurrent_idempotent_retries_write_once() {
    let tmp = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(tmp.path()).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        for k in 0..10u64 {
            let tx = AppendTx::single(
                StreamId::new(format!("s-{}", k % 3)).unwrap(),
                ExpectedVersion::Any,
                vec![
                    NewEvent::new("Once", 1, k, vec![k as u8; 10]),
                    NewEvent::new("Twice", 1, k, vec![1]),
                ],
            )
            .with_idempotency_key(format!("cmd-{k}"));
            let mut tasks = Vec::new();
            for _ in 0..TASKS {
                let (log, tx) = (log.clone(), tx.clone());
                tasks.push(tokio::spawn(async move { log.append(tx).await.unwrap() }));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap());
            }
            assert!(
                results.windows(2).all(|w| w[0] == w[1]),
                "retries got different results: {results:?}"
            );
            assert_eq!(results[0].first_position, 2 * k);
            // Same key, different content: refused, nothing written.
            let mut other = tx.clone();
            other.streams[0].events[0].payload = vec![99].into();
            assert!(matches!(
                log.append(other).await,
                Err(AppendError::IdempotencyKeyReused { .. })
            ));
        }
        assert_eq!(log.head().await.unwrap(), 20);
    });
    // The keys survive a reopen: a retry after restart is still a no-op.
    drop(log);
    let log = EmbeddedLog::open(tmp.path()).unwrap();
    rt.block_on(async {
        let tx = AppendTx::single(
            StreamId::new("s-0").unwrap(),
            ExpectedVersion::Any,
            vec![
                NewEvent::new("Once", 1, 0, vec![0u8; 10]),
                NewEvent::new("Twice", 1, 0, vec![1]),
            ],
        )
        .with_idempotency_key("cmd-0");
        let r = log.append(tx).await.unwrap();
        assert_eq!(r.first_position, 0);
        assert_eq!(log.head().await.unwrap(), 20);
    });
}
