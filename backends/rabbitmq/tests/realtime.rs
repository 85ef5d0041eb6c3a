//! The RabbitMQ delay queue in real time: the TTL ladder, its precision,
//! bad input, leases by the wall clock, process restarts and two processes
//! on one prefix.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use common::{collect, config, job, percentile, url, wall_ms, Rng};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use smartmsg_engine::{DelayQueue, JobId, QueueError, Scheduled};
use smartmsg_rabbitmq::codec::{encode_job, JobMessage};
use smartmsg_rabbitmq::RabbitDelayQueue;

// These tests assert order, completeness and "never early", never how late
// a job fires: on a busy 2-core machine that is noise. Lateness is measured
// (and printed) here and in the peer benchmark (`cargo bench -p
// smartmsg-rabbitmq --bench peer`).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_head_of_line_blocking() {
    let Some(url) = url() else { return };
    let q = RabbitDelayQueue::open(config(&url, "hol")).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let t0 = wall_ms();
    // A one-hour job first, then a one-second job.
    q.schedule(job("hour", t0 + 3_600_000, "h")).await.unwrap();
    q.schedule(job("second", t0 + 1_000, "s")).await.unwrap();
    assert_eq!(q.len().await.unwrap(), 2);
    assert_eq!(q.next_due().await.unwrap(), Some(t0 + 1_000));
    let fired = collect(&q, 1, Duration::from_millis(2), Duration::from_secs(10)).await;
    assert_eq!(fired.len(), 1, "the 1 s job did not fire within 10 s");
    let f = &fired[0];
    assert_eq!(f.lease.job.id.as_str(), "second");
    let late = f.at_ms as i64 - (t0 + 1_000) as i64;
    eprintln!("1 s job behind a 1 h job fired {late} ms after its due time");
    assert!(late >= 0, "fired {} ms early", -late);
    // The hour job is still pending, and nothing else fires.
    assert!(q.poll_due(wall_ms(), 10).await.unwrap().is_empty());
    assert_eq!(q.len().await.unwrap(), 1);
    assert!(q.cancel(&JobId::new("hour").unwrap()).await.unwrap());
    assert_eq!(q.len().await.unwrap(), 0);
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_delays_in_random_order_fire_in_due_order() {
    let Some(url) = url() else { return };
    let q = RabbitDelayQueue::open(config(&url, "order")).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    // 40 jobs due 150 ms apart (from 0.3 s to 6.15 s), scheduled shuffled.
    let mut delays: Vec<u64> = (0..40).map(|i| 300 + 150 * i).collect();
    Rng(7).shuffle(&mut delays);
    let t0 = wall_ms();
    for d in &delays {
        q.schedule(job(&format!("d{d:05}"), t0 + d, "x"))
            .await
            .unwrap();
    }
    let fired = collect(&q, 40, Duration::from_millis(2), Duration::from_secs(20)).await;
    assert_eq!(fired.len(), 40, "not every job fired");
    let mut late = Vec::new();
    for w in fired.windows(2) {
        assert!(
            w[0].lease.job.due_ms < w[1].lease.job.due_ms,
            "fired out of due order: {} then {}",
            w[0].lease.job.id,
            w[1].lease.job.id
        );
    }
    for f in &fired {
        let l = f.at_ms as i64 - f.lease.job.due_ms as i64;
        assert!(l >= 0, "{} fired {l} ms early", f.lease.job.id);
        assert_eq!(f.lease.attempt, 1);
        late.push(l);
    }
    eprintln!(
        "due order kept; lateness p50 {} ms, max {} ms",
        percentile(&mut late, 50.0),
        percentile(&mut late, 100.0)
    );
    assert_eq!(q.len().await.unwrap(), 0);
    q.destroy().await.unwrap();
}

/// Measures how late jobs fire: 300 jobs with random delays from 50 ms to
/// 12 s (so through every level up to 8 s), polled every 2 ms by the wall
/// clock. Prints p50/p99/max lateness (the figures in the crate docs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing_precision() {
    let Some(url) = url() else { return };
    let q = RabbitDelayQueue::open(config(&url, "precision"))
        .await
        .unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let mut rng = Rng(42);
    let n = 300;
    let t0 = wall_ms();
    for i in 0..n {
        let d = 50 + rng.below(12_000);
        q.schedule(job(&format!("p{i}"), t0 + d, "x"))
            .await
            .unwrap();
    }
    let scheduled_in = wall_ms() - t0;
    let fired = collect(&q, n, Duration::from_millis(2), Duration::from_secs(40)).await;
    assert_eq!(fired.len(), n, "not every job fired");
    let ids: HashSet<_> = fired.iter().map(|f| f.lease.job.id.clone()).collect();
    assert_eq!(ids.len(), n, "a job fired twice");
    // Jobs already due when scheduling finished cannot be on time.
    let mut late: Vec<i64> = fired
        .iter()
        .filter(|f| f.lease.job.due_ms > t0 + scheduled_in)
        .map(|f| f.at_ms as i64 - f.lease.job.due_ms as i64)
        .collect();
    assert!(late.iter().all(|l| *l >= 0), "a job fired early");
    let (p50, p99, max) = (
        percentile(&mut late, 50.0),
        percentile(&mut late, 99.0),
        percentile(&mut late, 100.0),
    );
    eprintln!(
        "PRECISION: {} jobs (scheduling took {scheduled_in} ms), lateness p50 {p50} ms, \
         p99 {p99} ms, max {max} ms",
        late.len()
    );
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_or_dead_letters() {
    let Some(url) = url() else { return };
    let mut cfg = config(&url, "bad");
    cfg.limits.max_payload_bytes = 1024;
    cfg.limits.max_id_len = 20;
    cfg.limits.max_poll = 50;
    let q = RabbitDelayQueue::open(cfg).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);

    // A due time in the far past fires at once.
    let t0 = wall_ms();
    assert_eq!(
        q.schedule(job("past", 1, "p")).await.unwrap(),
        Scheduled::New
    );
    // The same job again is a no-op; other content under the id is refused.
    assert_eq!(
        q.schedule(job("past", 1, "p")).await.unwrap(),
        Scheduled::AlreadyPending
    );
    assert!(matches!(
        q.schedule(job("past", 2, "p")).await,
        Err(QueueError::JobIdReused { id }) if id.as_str() == "past"
    ));
    assert!(matches!(
        q.schedule(job("past", 1, "other")).await,
        Err(QueueError::JobIdReused { .. })
    ));
    // Limits.
    let big = smartmsg_engine::Job {
        id: JobId::new("big").unwrap(),
        due_ms: t0,
        payload: Bytes::from(vec![0u8; 1025]),
    };
    assert!(matches!(
        q.schedule(big).await,
        Err(QueueError::PayloadTooLarge {
            size: 1025,
            max: 1024
        })
    ));
    assert!(matches!(
        q.schedule(job(&"x".repeat(21), t0, "")).await,
        Err(QueueError::BadJobId { .. })
    ));
    assert!(matches!(
        JobId::new("a b"),
        Err(QueueError::BadJobId { .. })
    ));
    assert!(matches!(
        q.poll_due(t0, 51).await,
        Err(QueueError::PollTooLarge {
            requested: 51,
            max: 50
        })
    ));
    assert_eq!(q.len().await.unwrap(), 1);

    // Malformed messages published by hand: garbage and a future format
    // version on the due queue, garbage on the hop queue.
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut v2 = encode_job(&JobMessage {
        id: JobId::new("v2").unwrap(),
        due_ms: 1,
        at_ms: 1,
        seq: 1,
        attempts: 0,
        payload: Bytes::from_static(b"future"),
    });
    v2[4] = 2;
    for (queue, body) in [
        (&q.names().due, b"{\"not\": \"a job\"}".to_vec()),
        (&q.names().due, v2.clone()),
        (&q.names().hop, b"\x00garbage".to_vec()),
    ] {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;

    let fired = collect(&q, 1, Duration::from_millis(5), Duration::from_secs(5)).await;
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].lease.job.id.as_str(), "past");
    assert!(
        fired[0].at_ms - t0 < 1_000,
        "a past job should fire at once"
    );

    // The hop consumer files its malformed message in the background.
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead = q.dead_letters(10).await.unwrap();
        if dead.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead.len(), 3, "dead letters: {dead:?}");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    eprintln!("dead-letter reasons: {reasons:#?}");
    let garbage = dead
        .iter()
        .find(|d| d.payload.as_ref() == b"{\"not\": \"a job\"}")
        .expect("the garbage message is a dead letter");
    assert!(garbage.id.is_none());
    assert_eq!(garbage.attempts, 0);
    assert!(garbage
        .reason
        .contains("malformed message on the due queue"));
    assert!(garbage.reason.contains("bad magic"));
    let future = dead
        .iter()
        .find(|d| d.payload.as_ref() == v2.as_slice())
        .expect("the version-2 message is a dead letter");
    assert!(future.reason.contains("unsupported format version 2"));
    let hop = dead
        .iter()
        .find(|d| d.payload.as_ref() == b"\x00garbage")
        .expect("the hop garbage is a dead letter");
    assert!(hop.reason.contains("malformed message on the hop queue"));
    // Reading the dead letters does not consume them.
    assert_eq!(q.dead_letters(10).await.unwrap().len(), 3);
    assert_eq!(q.len().await.unwrap(), 0);
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_by_the_wall_clock_and_dead_letter_after_max_attempts() {
    let Some(url) = url() else { return };
    let mut cfg = config(&url, "lease");
    cfg.limits.lease_ms = 300;
    cfg.limits.max_attempts = 2;
    cfg.sweep_interval = Duration::from_millis(50);
    let q = RabbitDelayQueue::open(cfg).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let t0 = wall_ms();
    q.schedule(job("l", t0, "payload")).await.unwrap();
    q.schedule(job("n", t0, "nacked")).await.unwrap();

    let first = q.poll_due(wall_ms(), 10).await.unwrap();
    assert_eq!(first.len(), 2);
    assert!(first.iter().all(|l| l.attempt == 1));
    let (l1, n1) = if first[0].job.id.as_str() == "l" {
        (&first[0], &first[1])
    } else {
        (&first[1], &first[0])
    };
    // A nack with a retry time: not before it.
    let retry_at = wall_ms() + 800;
    q.nack(&n1.token, Some(retry_at)).await.unwrap();
    assert!(matches!(
        q.nack(&n1.token, None).await,
        Err(QueueError::StaleLease { .. })
    ));

    // `l` is never acked: the background task expires its lease, it comes
    // back with attempt 2, expires again and is dead-lettered.
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        for lease in q.poll_due(wall_ms(), 10).await.unwrap() {
            let now = wall_ms();
            if lease.job.id.as_str() == "n" {
                assert!(
                    now >= retry_at,
                    "nacked job came {} ms early",
                    retry_at - now
                );
                assert_eq!(lease.attempt, 2);
                q.ack(&lease.token).await.unwrap();
            }
            seen.push((lease.job.id.to_string(), lease.attempt));
        }
        if !q.dead_letters(1).await.unwrap().is_empty() && seen.iter().any(|s| s.0 == "n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.contains(&("l".into(), 2)), "seen {seen:?}");
    assert!(seen.contains(&("n".into(), 2)), "seen {seen:?}");
    assert!(matches!(
        q.ack(&l1.token).await,
        Err(QueueError::StaleLease { .. })
    ));
    let dead = q.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id.as_ref().unwrap().as_str(), "l");
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(dead[0].payload.as_ref(), b"payload");
    assert!(
        dead[0].reason.contains("lease expired"),
        "{}",
        dead[0].reason
    );
    assert_eq!(q.len().await.unwrap(), 0);
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_newest_up_to_the_limit() {
    let Some(url) = url() else { return };
    let mut cfg = config(&url, "deadcap");
    cfg.limits.max_attempts = 1;
    cfg.max_dead_letters = 2;
    let q = RabbitDelayQueue::open(cfg).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let t0 = wall_ms();
    for id in ["a", "b", "c"] {
        q.schedule(job(id, t0, id)).await.unwrap();
        let mut leased = Vec::new();
        let start = std::time::Instant::now();
        while leased.is_empty() && start.elapsed() < Duration::from_secs(10) {
            leased = q.poll_due(wall_ms(), 1).await.unwrap();
        }
        assert_eq!(leased.len(), 1, "job {id} was not delivered");
        q.nack(&leased[0].token, None).await.unwrap();
    }
    let dead = q.dead_letters(10).await.unwrap();
    let ids: Vec<_> = dead
        .iter()
        .map(|d| d.id.as_ref().unwrap().as_str().to_owned())
        .collect();
    assert_eq!(ids, ["b", "c"], "the oldest dead letter is dropped first");
    q.destroy().await.unwrap();
}

/// Cross-process idempotency is eventual: two processes that schedule the
/// same job id within the journal's propagation delay (milliseconds) may
/// both publish it. What is guaranteed then, and tested here: both calls
/// succeed, the job fires at least once and at most once per process, every
/// delivery carries the same id and payload (so an idempotent consumer, such
/// as the engine's `Scheduler` with its `job:<id>#<hash>` key, runs it
/// once), and both processes agree afterwards that nothing is pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_schedules_of_one_id_in_two_processes_fire_at_most_twice() {
    let Some(url) = url() else { return };
    let cfg = config(&url, "twins");
    let a = RabbitDelayQueue::open(cfg.clone()).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &a);
    let b = RabbitDelayQueue::open(cfg).await.unwrap();
    let due = wall_ms() + 300;
    let (ra, rb) = tokio::join!(
        a.schedule(job("twin", due, "same")),
        b.schedule(job("twin", due, "same"))
    );
    let outcomes = [ra.unwrap(), rb.unwrap()];
    assert!(
        outcomes.contains(&Scheduled::New),
        "neither process scheduled the job: {outcomes:?}"
    );
    let fired = collect(&a, 2, Duration::from_millis(5), Duration::from_secs(4)).await;
    eprintln!(
        "schedules {outcomes:?}: {} deliveries of one job scheduled by two processes at once",
        fired.len()
    );
    assert!((1..=2).contains(&fired.len()), "{} deliveries", fired.len());
    for f in &fired {
        assert_eq!(f.lease.job.id.as_str(), "twin");
        assert_eq!(f.lease.job.payload.as_ref(), b"same");
        assert_eq!(f.lease.job.due_ms, due);
    }
    let mut settled = false;
    for _ in 0..100 {
        if a.len().await.unwrap() == 0 && b.len().await.unwrap() == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled, "the two processes still see the job pending");
    drop(b);
    a.destroy().await.unwrap();
}

/// A process that dies (the queue dropped, no graceful close) and opens
/// again knows every pending job and every cancellation from the journal;
/// a second process on the same prefix sees the first one's schedules,
/// acks and cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_carries_idempotency_and_cancels_across_processes() {
    let Some(url) = url() else { return };
    let cfg = config(&url, "journal");
    let a = RabbitDelayQueue::open(cfg.clone()).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &a);
    let t0 = wall_ms();
    a.schedule(job("keep", t0 + 1_500, "k")).await.unwrap();
    a.schedule(job("drop", t0 + 1_500, "d")).await.unwrap();
    a.schedule(job("later", t0 + 600_000, "l")).await.unwrap();
    assert!(a.cancel(&JobId::new("drop").unwrap()).await.unwrap());
    drop(a); // a crash, as far as the broker is concerned

    let b = RabbitDelayQueue::open(cfg.clone()).await.unwrap();
    assert_eq!(b.len().await.unwrap(), 2);
    assert_eq!(
        b.schedule(job("keep", t0 + 1_500, "k")).await.unwrap(),
        Scheduled::AlreadyPending
    );
    assert!(matches!(
        b.schedule(job("keep", t0 + 1_500, "changed")).await,
        Err(QueueError::JobIdReused { .. })
    ));
    // The cancelled id is free again: a new incarnation fires, the
    // cancelled one does not.
    assert_eq!(
        b.schedule(job("drop", t0 + 1_500, "again")).await.unwrap(),
        Scheduled::New
    );
    // A second live process sees the same registry.
    let c = RabbitDelayQueue::open(cfg.clone()).await.unwrap();
    assert_eq!(c.len().await.unwrap(), 3);
    assert!(c.cancel(&JobId::new("later").unwrap()).await.unwrap());
    let mut gone = false;
    for _ in 0..100 {
        if b.len().await.unwrap() == 2 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "b did not learn of c's cancel");

    let fired = collect(&b, 3, Duration::from_millis(5), Duration::from_secs(6)).await;
    let got: Vec<(String, String)> = fired
        .iter()
        .map(|f| {
            (
                f.lease.job.id.to_string(),
                String::from_utf8_lossy(&f.lease.job.payload).into_owned(),
            )
        })
        .collect();
    assert_eq!(got.len(), 2, "fired: {got:?}");
    assert!(got.contains(&("keep".into(), "k".into())));
    assert!(got.contains(&("drop".into(), "again".into())));
    // c learns of b's acks.
    let mut empty = false;
    for _ in 0..100 {
        if c.len().await.unwrap() == 0 {
            empty = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(empty, "c did not learn of b's acks");
    drop(c);
    b.destroy().await.unwrap();
}

/// A channel the broker closes under the queue (here: its due queue is
/// deleted, so `basic.get` fails with NOT_FOUND) makes the queue reconnect
/// and declare its queues again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_a_channel_closed_by_the_broker() {
    let Some(url) = url() else { return };
    let q = RabbitDelayQueue::open(config(&url, "chan")).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(q.names().due.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    assert!(q.poll_due(wall_ms(), 10).await.is_err());
    let start = std::time::Instant::now();
    loop {
        assert!(start.elapsed() < Duration::from_secs(30), "no recovery");
        if q.is_connected() && q.poll_due(wall_ms(), 10).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    q.schedule(job("after", wall_ms() + 200, "a"))
        .await
        .unwrap();
    let fired = collect(&q, 1, Duration::from_millis(5), Duration::from_secs(5)).await;
    assert_eq!(fired.len(), 1);
    q.destroy().await.unwrap();
}
