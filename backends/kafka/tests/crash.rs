//! A writer killed with SIGKILL in the middle of its work, restarted, and
//! killed again: no acknowledged append is lost, and nothing is written
//! twice (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).
//!
//! The writer is the `kafka_crash_writer` binary of this crate: it appends
//! numbered, keyed transactions of four events over three streams (several
//! partitions, so each is a multi-partition Kafka transaction) and prints an
//! `ACK` per acknowledged append. Rounds:
//!
//! 1. killed at a pseudo-random moment while appending back to back (most
//!    likely inside a Kafka transaction: producing or committing);
//! 2. killed at exactly the worst moment: every record of a transaction is
//!    on the broker and the commit has not been sent (a test hook pauses
//!    the writer there);
//! 3. like 1.
//!
//! Each restart retries the first unacknowledged transaction with its
//! idempotency key (what a client does after a crash). After every kill the
//! test opens the log itself (fencing the dead writer, rebuilding from the
//! topic) and checks: every acknowledged transaction is there, whole, at the
//! position it was acknowledged with; no transaction appears twice; every
//! transaction seen is whole.
//!
//! One assertion needs Apache Kafka: after round 2 the killed transaction
//! (never committed, aborted when the next writer fences its producer) must
//! be invisible. tansu 0.6 shows aborted records to `read_committed`
//! consumers, so there the rebuild cannot tell it from a committed one and
//! counts it (the writer never acknowledged it; the retry with its key then
//! returns it instead of writing it again). The test probes the broker and
//! runs that assertion only where aborted records are hidden, printing why
//! otherwise.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use smartmsg_engine::EventLog;
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};

const PARTITIONS: u32 = 4;
const EVENTS_PER_TX: usize = 4;

struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn spawn(bootstrap: &str, log: &str, first: u64, pause_after: u64) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kafka_crash_writer"))
        .args([
            bootstrap,
            log,
            &PARTITIONS.to_string(),
            &first.to_string(),
            &pause_after.to_string(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn kafka_crash_writer");
    let out = child.stdout.take().expect("stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Run { child, lines }
}

/// Acknowledged transactions: i -> (first_position, next_position).
type Acks = BTreeMap<u64, (u64, u64)>;

/// Reads the child's lines until `stop` says to kill it, then kills it
/// (SIGKILL) and returns.
fn drive(
    run: &mut Run,
    acks: &mut Acks,
    delay: Duration,
    mut stop: impl FnMut(&str, &Acks) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = run
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the crash writer went quiet");
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["ACK", i, first, next] => {
                let i: u64 = i.parse().unwrap();
                let r = (first.parse().unwrap(), next.parse().unwrap());
                assert!(
                    acks.insert(i, r).is_none_or(|old| old == r),
                    "transaction {i} acknowledged twice with different results"
                );
            }
            ["ERR", ..] => panic!("the crash writer failed: {line}"),
            _ => {}
        }
        if stop(&line, acks) {
            // The writer goes on appending meanwhile: the kill lands at an
            // arbitrary point of its next transactions.
            std::thread::sleep(delay);
            run.child.kill().expect("SIGKILL the crash writer");
            run.child.wait().expect("reap the crash writer");
            return;
        }
    }
}

/// Opens the log (fencing the dead writer), checks it against `acks`, and
/// returns the transactions found: i -> first position.
async fn verify(cfg: &KafkaConfig, acks: &Acks) -> (BTreeMap<u64, u64>, KafkaEventLog) {
    let log = KafkaEventLog::open(cfg.clone())
        .await
        .expect("open after the kill");
    let head = log.head().await.unwrap();
    let mut events = Vec::new();
    while (events.len() as u64) < head {
        let page = log
            .read_all(events.len() as u64, 10_000)
            .await
            .expect("read_all");
        assert!(!page.is_empty(), "read_all stopped before the head");
        events.extend(page);
    }
    // Group by transaction number: each must be whole, contiguous, once.
    let mut found: BTreeMap<u64, Vec<(u64, u32)>> = BTreeMap::new();
    for e in &events {
        let text = std::str::from_utf8(&e.payload).unwrap();
        let (i, j) = text
            .strip_prefix("tx")
            .and_then(|t| t.split_once(':'))
            .unwrap_or_else(|| panic!("unexpected payload {text:?}"));
        found
            .entry(i.parse().unwrap())
            .or_default()
            .push((e.position, j.parse().unwrap()));
    }
    let mut firsts = BTreeMap::new();
    for (i, evs) in &found {
        let js: Vec<u32> = evs.iter().map(|e| e.1).collect();
        assert_eq!(
            js,
            (0..EVENTS_PER_TX as u32).collect::<Vec<_>>(),
            "transaction {i} appears {} time(s) / not whole: events {evs:?} (a duplicate or a \
             partial transaction)",
            evs.len() as f64 / EVENTS_PER_TX as f64
        );
        let first = evs[0].0;
        assert!(
            evs.iter().enumerate().all(|(k, e)| e.0 == first + k as u64),
            "transaction {i} is not contiguous: {evs:?}"
        );
        firsts.insert(*i, first);
    }
    for (i, (first, next)) in acks {
        assert_eq!(
            firsts.get(i),
            Some(first),
            "acknowledged transaction {i} (positions {first}..{next}) is lost or moved"
        );
    }
    (firsts, log)
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

#[test]
fn writer_killed_mid_transaction_loses_and_duplicates_nothing() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = common::config(&bootstrap, "crash", PARTITIONS);
    let hides_aborted = common::broker_hides_aborted(&bootstrap);
    let mut acks = Acks::new();
    let mut next = 0u64;
    let seed = seed();
    println!("crash test: log {} seed {seed}", cfg.log_name);

    for round in 0..3u64 {
        let pause = round == 1;
        let before = acks.len() as u64;
        let kill_after = before + 5 + (seed >> (round * 8)) % 25;
        let mut run = spawn(
            &bootstrap,
            &cfg.log_name,
            next,
            if pause { kill_after } else { 0 },
        );
        let mut inflight_seen = false;
        let delay = if pause {
            Duration::ZERO
        } else {
            Duration::from_micros((seed >> (round * 8 + 4)) % 5_000)
        };
        drive(&mut run, &mut acks, delay, |line, acks| {
            if pause {
                inflight_seen = line.starts_with("INFLIGHT");
                inflight_seen
            } else {
                acks.len() as u64 >= kill_after
            }
        });
        let last_acked = acks.keys().next_back().copied();
        let unacked = last_acked.map_or(0, |i| i + 1);
        println!(
            "round {round}: killed after {} acknowledged appends (last {last_acked:?}){}",
            acks.len() - before as usize,
            if pause {
                " while its next transaction waited to commit"
            } else {
                ""
            }
        );
        let (found, log) = rt.block_on(verify(&cfg, &acks));
        println!("round {round}: rebuild {:?}", log.stats().rebuild);
        if pause {
            assert!(inflight_seen);
            let visible = found.contains_key(&unacked);
            if hides_aborted {
                assert!(
                    !visible,
                    "transaction {unacked} was killed before its commit, yet it is visible"
                );
            } else {
                println!(
                    "requires Apache Kafka, not checked here: the transaction killed before its \
                     commit ({unacked}) must be invisible; this broker shows aborted records to \
                     read_committed consumers (tansu 0.6), so the rebuild counted it \
                     (visible: {visible}); its retry below must still not duplicate it"
                );
            }
        }
        rt.block_on(log.close());
        next = unacked;
    }

    // The last writer was killed too: retry its first unacknowledged
    // transaction as a client would, then check once more.
    let mut retry_run = spawn(&bootstrap, &cfg.log_name, next, 0);
    drive(&mut retry_run, &mut acks, Duration::ZERO, |_, a| {
        a.contains_key(&(next + 2))
    });
    let (found, log) = rt.block_on(verify(&cfg, &acks));
    assert!(
        (0..=next + 2).all(|i| found.contains_key(&i)),
        "every transaction up to {} was retried until acknowledged, yet some are missing: {:?}",
        next + 2,
        (0..=next + 2)
            .filter(|i| !found.contains_key(i))
            .collect::<Vec<_>>()
    );
    println!(
        "crash test: {} transactions acknowledged, {} in the log, rebuild {:?}",
        acks.len(),
        found.len(),
        log.stats().rebuild
    );
    rt.block_on(log.close());
}
