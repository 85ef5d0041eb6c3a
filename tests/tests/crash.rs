//! Crash test: a child process appends in a loop (several writers, several
//! streams) and is killed with SIGKILL at random moments, many times. After
//! each kill the log reopens and:
//!
//! - every append acknowledged before the kill is there, at its position,
//!   with its contents;
//! - positions are gap-free from 0 and versions gap-free per stream;
//! - only whole transactions are visible (no partial record or transaction).
//!
//! `SMARTMSG_CRASH_KILLS` sets the number of kills (default 200).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog};
use smartmsg_engine::{EventLog, RecordedEvent};
use smartmsg_tests::crash::parse_payload;
use smartmsg_tests::plan::CrashPlan;

const SEGMENT_BYTES: u64 = 256 << 10;

fn read_everything(log: &EmbeddedLog, rt: &tokio::runtime::Runtime) -> Vec<RecordedEvent> {
    rt.block_on(async {
        let mut out = Vec::new();
        loop {
            let page = log.read_all(out.len() as u64, 50_000).await.unwrap();
            if page.is_empty() {
                return out;
            }
            out.extend(page);
        }
    })
}

#[test]
fn sigkill_never_loses_an_acknowledged_append() {
    let mut plan = CrashPlan::from_env("event log", 0x5eed, 200);
    let kills = plan.kills;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let rng = &mut plan.rng;
    // position -> event count of every acknowledged transaction so far.
    let mut acked: HashMap<u64, u32> = HashMap::new();
    let mut torn_recoveries = 0u32;
    let started = Instant::now();
    for round in 0..kills {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(&dir)
            .arg(rng.random_range(1..=6u32).to_string())
            .arg(rng.random::<u64>().to_string())
            .arg(SEGMENT_BYTES.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn crash_writer");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut it = line.split(' ');
                assert_eq!(it.next(), Some("ack"), "unexpected child output {line:?}");
                let pos: u64 = it.next().unwrap().parse().unwrap();
                let n: u32 = it.next().unwrap().parse().unwrap();
                acks.push((pos, n));
            }
            acks
        });
        // Let it run a random while (it needs a few ms to open the log).
        let after = Duration::from_micros(rng.random_range(2_000..40_000));
        std::thread::sleep(after);
        child.kill().expect("SIGKILL");
        eprintln!("kill {} of {kills} after {after:?}", round + 1);
        let status = child.wait().unwrap();
        assert!(!status.success(), "child exited by itself: {status}");
        for (pos, n) in reader.join().unwrap() {
            acked.insert(pos, n);
        }

        let log = EmbeddedLog::open_with(&dir, {
            let mut built = EmbeddedConfig::default();
            built.segment_bytes = SEGMENT_BYTES;
            built
        })
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        if log.torn_bytes_recovered() > 0 {
            torn_recoveries += 1;
        }
        let events = read_everything(&log, &rt);
        let head = rt.block_on(log.head()).unwrap();
        assert_eq!(
            events.len() as u64,
            head,
            "round {round}: read_all disagrees with head"
        );
        // Gap-free positions, gap-free versions per stream.
        let mut versions: HashMap<String, u64> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.position, i as u64, "round {round}: position gap");
            let v = versions.entry(e.stream.to_string()).or_insert(0);
            *v += 1;
            assert_eq!(
                e.version, *v,
                "round {round}: version gap in {} at {}",
                e.stream, e.position
            );
        }
        for (s, v) in &versions {
            let sid = smartmsg_engine::StreamId::new(s).unwrap();
            assert_eq!(rt.block_on(log.stream_version(&sid)).unwrap(), *v);
        }
        // Whole transactions only: walk the log transaction by transaction.
        let mut at = 0usize;
        let mut starts = HashMap::new();
        while at < events.len() {
            let (w, tx, part, n) = parse_payload(&events[at].payload)
                .unwrap_or_else(|| panic!("round {round}: bad payload at {at}"));
            assert_eq!(
                part, 1,
                "round {round}: transaction w{w} tx{tx} starts at part {part} (position {at})"
            );
            assert!(
                at + n as usize <= events.len(),
                "round {round}: partial transaction at the end (position {at})"
            );
            for k in 0..n as usize {
                let got = parse_payload(&events[at + k].payload);
                assert_eq!(
                    got,
                    Some((w, tx, k as u32 + 1, n)),
                    "round {round}: transaction at {at} broken at part {}",
                    k + 1
                );
            }
            starts.insert(at as u64, n);
            at += n as usize;
        }
        // Every acknowledged append is there, whole, where it was acknowledged.
        for (pos, n) in &acked {
            assert_eq!(
                starts.get(pos),
                Some(n),
                "round {round}: acknowledged transaction at {pos} ({n} events) missing"
            );
        }
        // A second process must be refused while this one holds the log.
        drop(log);
    }
    eprintln!(
        "{kills} kills in {:.1?}: {} acknowledged transactions checked, {torn_recoveries} torn tails cut",
        started.elapsed(),
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "the child never acknowledged anything: the test proved nothing"
    );
}
