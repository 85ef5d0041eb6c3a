//! The embedded log under faults SIGKILL cannot make, through the
//! fault-injecting disk layer (`smartmsg_embedded::faults`): short writes
//! and failed `fdatasync`s poison the log (every later append refused until
//! it is reopened), and a power loss that drops, tears or garbles the
//! unsynced suffix loses nothing that was acknowledged: the reopened log
//! cuts the torn tail and holds every acknowledged event, in order.
//!
//! The random runs print their seed; `SMARTMSG_FAULT_SEED=<seed>` reruns one.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use smartmsg_embedded::faults::{FaultyDisk, PowerLoss};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedError, EmbeddedLog};
use smartmsg_engine::{AppendError, AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn small() -> EmbeddedConfig {
    {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 64 << 10;
        built
    }
}

fn tx(stream: u64, n: u64) -> AppendTx {
    AppendTx::single(
        StreamId::new(format!("s-{stream}")).unwrap(),
        ExpectedVersion::Any,
        vec![NewEvent::new(
            "E",
            1,
            n,
            Bytes::from(format!("stream {stream} event {n} {}", "x".repeat(40))),
        )],
    )
}

fn is_poisoned(e: &AppendError) -> bool {
    match e {
        AppendError::Backend(b) => b
            .downcast_ref::<EmbeddedError>()
            .is_some_and(|e| matches!(e, EmbeddedError::Poisoned)),
        _ => false,
    }
}

/// Every stream's payloads, in order.
async fn contents(log: &EmbeddedLog) -> BTreeMap<String, Vec<Bytes>> {
    let mut out = BTreeMap::new();
    for (stream, _) in log.streams() {
        let events = log.read_stream(&stream, 1, 100_000).await.unwrap();
        out.insert(
            stream.as_str().to_owned(),
            events.into_iter().map(|e| e.payload).collect(),
        );
    }
    out
}

#[test]
fn a_short_write_poisons_the_log_and_the_torn_frame_is_cut_at_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FaultyDisk::new());
    let rt = rt();
    let acked = rt.block_on(async {
        let log = EmbeddedLog::open_with_faults(dir.path(), small(), disk.clone()).unwrap();
        for n in 0..20 {
            log.append(tx(n % 3, n)).await.unwrap();
        }
        let acked = contents(&log).await;
        // The next batch's write keeps 30 bytes of its frame, then fails.
        disk.short_write_after(disk.ops(), 30);
        let e = log.append(tx(0, 100)).await.unwrap_err();
        assert!(e.to_string().contains("injected fault"), "{e}");
        let e = log.append(tx(1, 101)).await.unwrap_err();
        assert!(is_poisoned(&e), "after a failed write: {e}");
        acked
    });
    assert_eq!(disk.injected(), 1);
    rt.block_on(async {
        let log = EmbeddedLog::open_with(dir.path(), small()).unwrap();
        assert!(
            log.torn_bytes_recovered() >= 30,
            "the 30-byte torn frame was not cut ({} bytes)",
            log.torn_bytes_recovered()
        );
        assert_eq!(contents(&log).await, acked);
        log.append(tx(0, 102)).await.unwrap();
    });
}

#[test]
fn a_failed_fsync_poisons_the_log_and_nothing_acknowledged_is_lost() {
    for how in [PowerLoss::Dropped, PowerLoss::Torn, PowerLoss::Garbled] {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(FaultyDisk::new());
        let rt = rt();
        let acked = rt.block_on(async {
            let log = EmbeddedLog::open_with_faults(dir.path(), small(), disk.clone()).unwrap();
            for n in 0..30 {
                log.append(tx(n % 4, n)).await.unwrap();
            }
            let acked = contents(&log).await;
            disk.fail_sync_after(disk.ops());
            let e = log.append(tx(0, 200)).await.unwrap_err();
            assert!(e.to_string().contains("fdatasync"), "{e}");
            assert!(is_poisoned(&log.append(tx(0, 201)).await.unwrap_err()));
            // The failed sync's bytes may never reach the disk.
            disk.power_off();
            acked
        });
        let touched = disk.lose_unsynced(how, 7).unwrap();
        assert!(
            touched > 0 || how == PowerLoss::Torn,
            "{how:?}: nothing unsynced"
        );
        rt.block_on(async {
            let log = EmbeddedLog::open_with(dir.path(), small()).unwrap();
            let got = contents(&log).await;
            assert_eq!(got, acked, "{how:?}: the reopened log differs");
        });
    }
}

/// Random appends from concurrent writers with faults armed at random
/// points, then a power loss of a random kind: every acknowledged event is
/// there after reopening, each stream is a gap-free sequence, and anything
/// beyond the acknowledged events was at least submitted.
#[test]
fn random_faults_and_power_loss_lose_nothing_acknowledged() {
    let base: u64 = std::env::var("SMARTMSG_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_fa17);
    let rounds = if std::env::var("SMARTMSG_FAULT_SEED").is_ok() {
        1
    } else {
        12
    };
    let (mut injected, mut lost) = (0, 0);
    for round in 0..rounds {
        let seed = base.wrapping_add(round);
        eprintln!("fault run: SMARTMSG_FAULT_SEED={seed}");
        let (i, l) = run_one(seed);
        injected += i;
        lost += l;
    }
    eprintln!("{injected} faults injected, {lost} unsynced bytes lost in {rounds} runs");
    assert!(injected > 0, "no fault was ever injected");
    assert!(
        lost > 0 || rounds == 1,
        "no power loss ever touched unsynced bytes"
    );
}

/// One run; returns the faults injected and the bytes the power loss
/// touched.
fn run_one(seed: u64) -> (u64, u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FaultyDisk::new());
    let how = [PowerLoss::Dropped, PowerLoss::Torn, PowerLoss::Garbled][rng.random_range(0..3)];
    let fault_at = rng.random_range(2..60u64);
    let fault = rng.random_range(0..3u8);
    match fault {
        0 => disk.fail_sync_after(fault_at),
        1 => disk.fail_write_after(fault_at),
        _ => disk.short_write_after(fault_at, rng.random_range(1..200)),
    }
    let power_at = rng.random_range(fault_at / 2..fault_at + 40);
    let writers = rng.random_range(1..5u64);
    let rt = rt();
    let (acked, submitted) = rt.block_on(async {
        let log =
            Arc::new(EmbeddedLog::open_with_faults(dir.path(), small(), disk.clone()).unwrap());
        let mut tasks = Vec::new();
        for w in 0..writers {
            let log = log.clone();
            let disk = disk.clone();
            tasks.push(tokio::spawn(async move {
                // Each writer owns its stream: acknowledged events of a
                // stream are then a prefix of what it submitted.
                let mut acked = Vec::new();
                let mut submitted = Vec::new();
                for n in 0..80u64 {
                    if disk.ops() >= power_at {
                        disk.power_off();
                    }
                    let t = tx(w, n);
                    let payload = t.streams[0].events[0].payload.clone();
                    submitted.push(payload.clone());
                    match log.append(t).await {
                        Ok(_) => acked.push(payload),
                        Err(_) => break,
                    }
                }
                (format!("s-{w}"), acked, submitted)
            }));
        }
        let mut acked = BTreeMap::new();
        let mut submitted = BTreeMap::new();
        for t in tasks {
            let (s, a, sub) = t.await.unwrap();
            acked.insert(s.clone(), a);
            submitted.insert(s, sub);
        }
        disk.power_off();
        (acked, submitted)
    });
    let lost = disk.lose_unsynced(how, seed).unwrap();
    rt.block_on(async {
        let log = EmbeddedLog::open_with(dir.path(), small()).unwrap_or_else(|e| {
            panic!("seed {seed}: reopening after {how:?} power loss failed: {e}")
        });
        let got = contents(&log).await;
        for (stream, want) in &acked {
            let have = got.get(stream).cloned().unwrap_or_default();
            assert!(
                have.len() >= want.len() && have[..want.len()] == want[..],
                "seed {seed} ({how:?}, fault {fault} at op {fault_at}): stream {stream} \
                 lost acknowledged events: {} acknowledged, {} after reopen",
                want.len(),
                have.len()
            );
            let sub = &submitted[stream];
            assert!(
                have.len() <= sub.len() && have[..] == sub[..have.len()],
                "seed {seed}: stream {stream} holds events never submitted in that order"
            );
        }
        // The reopened log takes appends again.
        log.append(tx(99, 0)).await.unwrap();
    });
    (disk.injected(), lost)
}
