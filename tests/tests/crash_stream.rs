//! Exactly-once stream processing under SIGKILL.
//!
//! The parent appends input events (profiles and reactions, with
//! out-of-order timestamps) to the embedded log in chunks; after each chunk
//! it starts the child processor (`stream_child`: the crash topology on a
//! `StreamRunner` with a redb store, outputs appended to the same log),
//! lets it run a random while and kills it with SIGKILL — mid-batch,
//! mid-commit, mid-delivery, wherever. At the end a last child runs to
//! completion, and the parent checks against a reference computed in
//! memory with plain code:
//!
//! - every kept reaction appears exactly once in `echo`, with its join;
//! - `totals` holds, per creative, exactly the running counts 1, 2, …, N
//!   (a duplicate or lost input would repeat or skip one);
//! - `windows` holds each closed window exactly once with the right count;
//! - `late` holds each late reaction exactly once;
//! - the state in redb (totals, metrics) counts each input exactly once.
//!
//! `SMARTMSG_CRASH_KILLS` sets the number of kills (default 100).

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{
    envelope, EventLogSink, EventLogSource, LateRecord, RunnerConfig, StateCodec, StreamRunner,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use smartmsg_tests::plan::CrashPlan;
use smartmsg_tests::stream_crash::{topology, Echo, Reference, WindowKey, RUNNER};

const SEGMENT_BYTES: u64 = 1 << 20;

fn open_log(dir: &std::path::Path) -> EmbeddedLog {
    EmbeddedLog::open_with(dir.join("log"), {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = SEGMENT_BYTES;
        built
    })
    .expect("open log")
}

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

struct Inputs {
    rng: rand_chacha::ChaCha8Rng,
    next_id: u64,
    clock: u64,
}

impl Inputs {
    /// Appends `n` input events in a few transactions.
    fn append(&mut self, log: &EmbeddedLog, rt: &tokio::runtime::Runtime, n: usize) {
        let mut left = n;
        while left > 0 {
            let k = left.min(self.rng.random_range(1..=64));
            left -= k;
            let mut events = Vec::with_capacity(k);
            for _ in 0..k {
                self.clock += self.rng.random_range(0..20);
                // Mostly in order; some far behind (late), some a little
                // (within grace).
                let ts = match self.rng.random_range(0..20) {
                    0 => self
                        .clock
                        .saturating_sub(self.rng.random_range(1_300..3_000)),
                    1..=4 => self.clock.saturating_sub(self.rng.random_range(0..1_150)),
                    _ => self.clock,
                };
                let user = self.rng.random_range(0..60u32);
                if self.rng.random_range(0..8) == 0 {
                    let seg = self.rng.random_range(0..4u32);
                    events.push(NewEvent::new("Profile", 1, ts, format!("{user} {seg}")));
                } else {
                    self.next_id += 1;
                    let c = self.rng.random_range(0..3u32);
                    events.push(NewEvent::new(
                        "Reaction",
                        1,
                        ts,
                        format!("{} {user} {c}", self.next_id),
                    ));
                }
            }
            rt.block_on(log.append(AppendTx::single(
                StreamId::new("inputs").unwrap(),
                ExpectedVersion::Any,
                events,
            )))
            .expect("append inputs");
        }
    }
}

#[test]
fn sigkill_never_duplicates_or_loses_a_stream_effect() {
    let mut plan = CrashPlan::from_env("stream runner", 0x57ea_0001, 100);
    let kills = plan.kills;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut inputs = Inputs {
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(plan.seed.wrapping_add(1)),
        next_id: 0,
        clock: 10_000,
    };
    let started = Instant::now();
    let child = |args: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_stream_child"))
            .arg(&dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn stream_child")
    };
    let rng = &mut plan.rng;
    let mut exited_early = 0;
    for round in 0..kills {
        {
            let log = open_log(&dir);
            let n = rng.random_range(50..600);
            inputs.append(&log, &rt, n);
        }
        let batch = rng.random_range(1..=400usize);
        let mut c = child(&[batch.to_string()]);
        let after = Duration::from_micros(rng.random_range(3_000..60_000));
        std::thread::sleep(after);
        c.kill().expect("SIGKILL");
        eprintln!(
            "kill {} of {kills} (batch {batch}) after {after:?}",
            round + 1
        );
        let status = c.wait().unwrap();
        if status.success() {
            exited_early += 1;
        }
    }
    // The last run processes everything and exits.
    let status = child(&["97".to_string(), "idle".to_string()])
        .wait()
        .unwrap();
    assert!(status.success(), "the final child failed: {status}");
    assert_eq!(exited_early, 0, "a killed child exited by itself");

    let log = open_log(&dir);
    let events = read_everything(&log, &rt);
    let reference = Reference::compute(
        events
            .iter()
            .filter(|e| e.kind == "Profile" || e.kind == "Reaction")
            .map(|e| (e.kind.as_str(), &e.payload[..], e.timestamp_ms)),
    );
    let outputs = |kind: &str| -> Vec<(bytes::Bytes, bytes::Bytes)> {
        events
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| envelope::decode(&e.payload).expect("an envelope"))
            .collect()
    };

    // echo: every kept reaction exactly once, with its join.
    let mut echo: BTreeMap<u64, (u32, u32, u32)> = BTreeMap::new();
    for (k, v) in outputs("echo") {
        let id = u64::decode(&k).unwrap();
        let Echo { 0: row } = Echo::decode(&v).unwrap();
        assert!(echo.insert(id, row).is_none(), "reaction {id} echoed twice");
    }
    assert_eq!(echo.len(), reference.echo.len(), "echo count");
    assert_eq!(echo, reference.echo, "echo contents");

    // totals: exactly 1..=N per creative, in order.
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for (k, v) in outputs("totals") {
        let c = u32::decode(&k).unwrap();
        let n = u64::decode(&v).unwrap();
        let prev = last.insert(c, n).unwrap_or(0);
        assert_eq!(n, prev + 1, "creative {c}: total {n} after {prev}");
    }
    assert_eq!(last, reference.totals, "final totals");

    // windows: each closed window once, with its count.
    let mut windows = BTreeMap::new();
    for (k, v) in outputs("windows") {
        let w = WindowKey::decode(&k).unwrap();
        let key = (w.key.0, w.key.1, w.window.start_ms);
        assert!(
            windows.insert(key, u64::decode(&v).unwrap()).is_none(),
            "window {key:?} emitted twice"
        );
    }
    assert_eq!(windows, reference.windows, "closed windows");

    // late: each late reaction once.
    let mut late: Vec<u64> = outputs("late")
        .into_iter()
        .map(|(_, v)| LateRecord::<u64>::decode(&v).unwrap().value)
        .collect();
    let n_late = late.len();
    late.sort_unstable();
    late.dedup();
    assert_eq!(late.len(), n_late, "a late record was output twice");
    let mut want_late = reference.late.clone();
    want_late.sort_unstable();
    assert_eq!(late, want_late, "late records");

    // The committed state counts each input once.
    let log: Arc<dyn EventLog> = Arc::new(log);
    let store = Arc::new(RedbStore::open(dir.join("state.redb")).unwrap());
    let runner = StreamRunner::open(
        topology(),
        store,
        EventLogSource::new(log.clone()),
        EventLogSink::new(log.clone()),
        RunnerConfig::new(RUNNER),
    )
    .unwrap();
    let task = runner.task();
    for (c, n) in &reference.totals {
        assert_eq!(task.table_get::<u32, u64>("totals", c).unwrap(), Some(*n));
    }
    let inputs_total = events
        .iter()
        .filter(|e| e.kind == "Profile" || e.kind == "Reaction")
        .count() as u64;
    assert_eq!(task.metrics().processed, inputs_total, "processed count");
    assert_eq!(
        task.metrics().late_records,
        reference.late.len() as u64,
        "late count"
    );
    assert_eq!(task.stream_time(), reference.stream_time);
    eprintln!(
        "{kills} kills in {:.1?}: {inputs_total} inputs, {} echoed, {} windows, {} late; \
         {} commits",
        started.elapsed(),
        echo.len(),
        windows.len(),
        late.len(),
        runner.next_commit()
    );
    assert!(!reference.late.is_empty() && !reference.windows.is_empty());
}
