//! A writer for the crash test (`tests/crash.rs`): appends numbered
//! transactions to a Kafka event log until it is killed, printing one line
//! per acknowledged append. Not a tool for anything else.
//!
//! ```text
//! kafka_crash_writer BOOTSTRAP LOG_NAME PARTITIONS FIRST [PAUSE_AFTER_ACKS]
//! ```
//!
//! Transaction `i` (from `FIRST` on) has idempotency key `crash-<i>` and
//! four events over three streams, payloads `tx<i>:<j>`; a restarted writer
//! given the first unacknowledged `i` retries it with the same key. Output:
//! `READY <head>` once open, `ACK <i> <first_position> <next_position>` per
//! acknowledged append, `ERR <i> <error>` (then exit 2) on a failure. With
//! `PAUSE_AFTER_ACKS = n > 0`, once `n` appends were acknowledged, the next
//! Kafka transaction prints `INFLIGHT <batch_seq>` after all its records
//! reached the broker and then sleeps before committing, so the test can
//! kill it exactly there.
//!
//! The writer checkpoints its index every 20 events (every 5 transactions;
//! `SMARTMSG_CRASH_CHECKPOINT_EVERY` overrides, `0` disables), so kills
//! also land while a checkpoint is being written and every restart after
//! the first loads one.
#![forbid(unsafe_code)]

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::{KafkaConfig, KafkaEventLog};

/// The transaction the crash test writes as number `i`.
fn transaction(i: u64) -> AppendTx {
    let s = |n: String| StreamId::new(n).expect("valid stream id");
    let e = |j: u32| NewEvent::new("Crash", 1, i, format!("tx{i}:{j}").into_bytes());
    AppendTx::single(
        s(format!("crash-{}", i % 4)),
        ExpectedVersion::Any,
        vec![e(0), e(1)],
    )
    .with_stream(s("crash-all".into()), ExpectedVersion::Any, vec![e(2)])
    .with_stream(
        s(format!("crash-x{}", i % 3)),
        ExpectedVersion::Any,
        vec![e(3)],
    )
    .with_idempotency_key(format!("crash-{i}"))
}

fn main() {
    // The libraries' warnings (a fenced writer, a torn checkpoint) on
    // stderr, or what RUST_LOG selects.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!(
            "usage: kafka_crash_writer BOOTSTRAP LOG_NAME PARTITIONS FIRST [PAUSE_AFTER_ACKS]"
        );
        std::process::exit(64);
    }
    let partitions: u32 = args[2].parse().expect("PARTITIONS");
    let first: u64 = args[3].parse().expect("FIRST");
    let pause_after: u64 = args
        .get(4)
        .map_or(0, |a| a.parse().expect("PAUSE_AFTER_ACKS"));

    let acks = Arc::new(AtomicU64::new(0));
    let checkpoint_every = std::env::var("SMARTMSG_CRASH_CHECKPOINT_EVERY")
        .ok()
        .map_or(20, |v| v.parse().expect("SMARTMSG_CRASH_CHECKPOINT_EVERY"));
    let mut config = KafkaConfig::new(&args[0], &args[1])
        .with_partitions(partitions)
        .with_checkpoint_every(checkpoint_every);
    if pause_after > 0 {
        let acks = acks.clone();
        config.before_commit = Some(Arc::new(move |seq| {
            if acks.load(Ordering::SeqCst) >= pause_after {
                println!("INFLIGHT {seq}");
                std::io::stdout().flush().ok();
                std::thread::sleep(Duration::from_secs(30));
            }
            true
        }));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let log = match KafkaEventLog::open(config).await {
            Ok(l) => l,
            Err(e) => {
                println!("ERR open {e}");
                std::process::exit(2);
            }
        };
        println!("READY {}", log.head().await.unwrap_or(0));
        std::io::stdout().flush().ok();
        let mut i = first;
        loop {
            match log.append(transaction(i)).await {
                Ok(r) => {
                    acks.fetch_add(1, Ordering::SeqCst);
                    println!("ACK {i} {} {}", r.first_position, r.next_position);
                    std::io::stdout().flush().ok();
                }
                Err(e) => {
                    println!("ERR {i} {e}");
                    std::io::stdout().flush().ok();
                    std::process::exit(2);
                }
            }
            i += 1;
        }
    });
}
