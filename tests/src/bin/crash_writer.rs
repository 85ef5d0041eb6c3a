//! Child process of the crash test: appends in a loop from several writers
//! to several streams until killed, printing one line per acknowledged
//! append (`ack <first_position> <events>`), flushed at once.
//!
//! Usage: `crash_writer DIR WRITERS SEED SEGMENT_BYTES`

use std::io::Write;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_tests::crash::payload;

fn main() -> anyhow::Result<()> {
    smartmsg_tests::init_tracing();
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: crash_writer DIR WRITERS SEED SEGMENT_BYTES"
    );
    let dir = &args[1];
    let writers: u32 = args[2].parse()?;
    let seed: u64 = args[3].parse()?;
    let segment_bytes: u64 = args[4].parse()?;
    let log = Arc::new(EmbeddedLog::open_with(dir, {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = segment_bytes;
        built
    })?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()?;
    let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for w in 0..writers {
            let log = log.clone();
            let stdout = stdout.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (u64::from(w) << 32));
                let streams: Vec<StreamId> = (0..3)
                    .map(|i| StreamId::new(format!("w{w}-s{i}")).unwrap())
                    .collect();
                // Continue the sequence from where the last run stopped:
                // every run writes fresh tx numbers (seed-unique prefix).
                let mut tx_seq: u64 = rng.random::<u32>() as u64 * 1_000_000;
                loop {
                    tx_seq += 1;
                    // 1–3 streams, 1–3 events each; expected versions read
                    // fresh (this writer owns its streams, so Exact holds).
                    let k = rng.random_range(1..=3usize);
                    let mut tx = AppendTx::default();
                    let n_events: Vec<u32> = (0..k).map(|_| rng.random_range(1..=3)).collect();
                    let total: u32 = n_events.iter().sum();
                    let mut part = 0;
                    for (i, n) in n_events.iter().enumerate() {
                        let s = &streams[i];
                        let v = log.stream_version(s).await.expect("version");
                        let events = (0..*n)
                            .map(|_| {
                                part += 1;
                                NewEvent::new("Crash", 1, tx_seq, payload(w, tx_seq, part, total))
                            })
                            .collect();
                        tx = tx.with_stream(s.clone(), ExpectedVersion::Exact(v), events);
                    }
                    let r = log.append(tx).await.expect("append");
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {} {}", r.first_position, total).unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
    });
    Ok(())
}
