//! # Stream processing benchmark
//!
//! One workload, **filter → stream-table join → tumbling-window count**,
//! through the engine's stream DSL on one core, with three state stores:
//!
//! - **(a) in memory**: typed records piped straight into the built `Task`
//!   (no decoding), state committed to the `InMemoryStore` every 10,000
//!   records (write-behind flush plus changelog). The DSL's own ceiling.
//! - **(b) redb, exactly-once**: a `StreamRunner` reads the input events
//!   from an `EmbeddedLog` (`read_all`, envelope payloads decoded), commits
//!   every `BATCH` records to a durable `RedbStore` — state changes,
//!   outbox and input checkpoint in one redb write transaction with
//!   `fsync` — and appends each commit's outputs to a second
//!   `EmbeddedLog` with idempotency keys (durable too).
//! - **(c) sled, exactly-once**: the same with a durable `SledStore`
//!   (`apply_batch` + `flush` per commit).
//!
//! Workload: 10,000 users in the table (user → segment), input records
//! `(user, amount)` with timestamps 1 ms apart, the filter drops amounts
//! divisible by 8 (12.5 %), the inner join adds the segment, the count
//! groups by user in 1-minute tumbling windows with 1 s grace, emitted once
//! when each window closes (suppress until close): ~10,000 window entries
//! open at a time, about as many dirty entries per commit.
//!
//! Each figure is the median of the repeats (min–max shown) after a warm-up;
//! each durable run is a fresh child process (sled keeps memory and threads
//! after its database is dropped, which would slow later runs), redb and
//! sled runs interleaved.
//! Records/s count input records (the filtered ones included), end to end.
//! Nothing is asserted: timings drift between machines and runs.
//!
//! ```text
//! cargo bench -p smartmsg-embedded --bench stream              # ~1 min
//! cargo bench -p smartmsg-embedded --bench stream -- --quick   # seconds
//! ```
//!
//! Files go under cargo's target directory (the real disk), or under
//! `$SMARTMSG_BENCH_DIR`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{
    envelope, EmitStrategy, EventLogSink, EventLogSource, InMemoryStore, KeyValueStore, Record,
    RunnerConfig, StateCodec, StreamRunner, Topology, Windows, WriteBatch,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_sled::SledStore;

const USERS: u32 = 10_000;
const COMMIT_EVERY: usize = 10_000;

fn topology() -> Topology {
    let t = Topology::new();
    let users = t.stream::<u32, u32>("User").to_table("users");
    t.stream::<u32, u64>("Click")
        .filter(|_, amount| amount % 8 != 0)
        .join(&users, |amount, segment: &u32| (amount, *segment))
        .group_by_key()
        .windowed_by(Windows::tumbling(60_000).expect("window").grace(1_000))
        .emit(EmitStrategy::OnWindowClose)
        .count("clicks-per-user")
        .to("counts");
    t
}

/// The i-th input: (user, amount, timestamp).
fn input(i: u64) -> (u32, u64, u64) {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x % u64::from(USERS)) as u32, x >> 40, 1_000_000 + i)
}

struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(f64::total_cmp);
    Stat {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn fmt(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else {
        format!("{:.0} k", n / 1e3)
    }
}

/// (a): records/s with typed input and the in-memory store.
fn in_memory(records: u64) -> Result<f64> {
    let mut task = topology().build()?;
    let store = InMemoryStore::without_changelog_retention();
    let users = task.input::<u32, u32>("User")?;
    for u in 0..USERS {
        task.process(users, Record::new(u, u % 16, 0))?;
    }
    let clicks = task.input::<u32, u64>("Click")?;
    let mut out = Vec::new();
    let started = Instant::now();
    let mut batch = WriteBatch::new();
    for i in 0..records {
        let (user, amount, ts) = input(i);
        task.process(clicks, Record::new(user, amount, ts))?;
        if (i + 1) % COMMIT_EVERY as u64 == 0 {
            task.flush(&mut batch);
            task.drain_outputs(&mut out);
            store.write(&batch)?;
            batch = WriteBatch::new();
            out.clear();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(&out);
    Ok(records as f64 / secs)
}

/// Writes the users and `records` clicks into a fresh log at `dir`.
fn prepare_log(dir: &Path, records: u64, rt: &tokio::runtime::Runtime) -> Result<()> {
    let log = EmbeddedLog::open(dir)?;
    rt.block_on(async {
        let users: Vec<NewEvent> = (0..USERS)
            .map(|u| {
                NewEvent::new(
                    "User",
                    1,
                    0,
                    envelope::encode(&u.to_bytes(), &(u % 16).to_bytes()),
                )
            })
            .collect();
        for chunk in users.chunks(5_000) {
            log.append(AppendTx::single(
                StreamId::new("users")?,
                ExpectedVersion::Any,
                chunk.to_vec(),
            ))
            .await?;
        }
        let mut i = 0u64;
        while i < records {
            let n = (records - i).min(5_000);
            let events = (i..i + n)
                .map(|j| {
                    let (user, amount, ts) = input(j);
                    NewEvent::new(
                        "Click",
                        1,
                        ts,
                        envelope::encode(&user.to_bytes(), &amount.to_bytes()),
                    )
                })
                .collect();
            log.append(AppendTx::single(
                StreamId::new("clicks")?,
                ExpectedVersion::Any,
                events,
            ))
            .await?;
            i += n;
        }
        anyhow::Ok(())
    })
}

/// (b)/(c): records/s through a StreamRunner reading `input_log`, with
/// `store`, outputs appended to a fresh log in `out_dir`.
fn exactly_once(
    input_log: Arc<dyn EventLog>,
    store: Arc<dyn KeyValueStore>,
    out_dir: &Path,
    batch: usize,
    rt: &tokio::runtime::Runtime,
) -> Result<(f64, u64)> {
    // Small segments: the outputs are few, and a fresh 64 MiB segment per
    // run would leave its write-back competing with the timed fsyncs.
    let out: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open_with(out_dir, {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 1 << 20;
        built
    })?);
    settle();
    rt.block_on(async {
        let mut runner = StreamRunner::open(
            topology(),
            store,
            EventLogSource::with_envelopes(input_log),
            EventLogSink::new(out.clone()),
            RunnerConfig::new("bench").with_batch(batch),
        )?;
        let started = Instant::now();
        let report = runner.run_until_idle().await?;
        let secs = started.elapsed().as_secs_f64();
        let _ = report.outputs;
        Ok((report.records as f64 / secs, runner.next_commit()))
    })
}

/// Flushes the page cache's dirty data (earlier runs' files) before a timed
/// run, so its write-back does not slow this run's fsyncs.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn bench_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SMARTMSG_BENCH_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locate the bench binary")?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .context("not inside a cargo target directory; set SMARTMSG_BENCH_DIR")
}

/// A child run: `--one KIND INPUT_DIR RUN_DIR BATCH`; prints
/// `records_per_s commits`.
fn one(args: &[String]) -> Result<()> {
    let [kind, input_dir, dir, batch] = args else {
        anyhow::bail!("usage: --one KIND INPUT_DIR RUN_DIR BATCH");
    };
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let dir = PathBuf::from(dir);
    let input: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(input_dir)?);
    let store: Arc<dyn KeyValueStore> = match kind.as_str() {
        "redb" => Arc::new(RedbStore::open(dir.join("state.redb"))?),
        _ => Arc::new(SledStore::open(dir.join("state.sled"))?),
    };
    let (rate, commits) = exactly_once(input, store, &dir.join("out"), batch.parse()?, &rt)?;
    println!("{rate} {commits}");
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        return one(&args[i + 1..]);
    }
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("SMARTMSG_BENCH_QUICK").is_some();
    let (mem_records, durable_records, repeats) = if quick {
        (500_000u64, 200_000u64, 3)
    } else {
        (3_000_000, 1_000_000, 5)
    };
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new()
        .prefix("smartmsg-stream-bench")
        .tempdir_in(&root)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;

    println!("# Stream processing: filter → join → tumbling count (one core)\n");
    println!(
        "{USERS} users in the table; commits every {COMMIT_EVERY} records; median of {repeats} (min–max)\n"
    );

    // (a)
    in_memory(mem_records / 5)?; // warm-up
    let mem = stat(
        (0..repeats)
            .map(|_| in_memory(mem_records))
            .collect::<Result<Vec<_>>>()?,
    );

    // (b), (c): each run in a fresh child process (this binary with
    // `--one`): sled leaves memory and threads behind after its database is
    // dropped (epoch-deferred frees), which slows whatever runs after it in
    // the same process; a child per run keeps every run clean and lets the
    // runs interleave, so the disk's drift hits both stores alike.
    let input_dir = tmp.path().join("input");
    prepare_log(&input_dir, durable_records, &rt)?;
    let run = |kind: &str, n: usize, batch: usize| -> Result<(f64, u64)> {
        let dir = tmp.path().join(format!("{kind}-{n}"));
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--one", kind])
            .arg(&input_dir)
            .arg(&dir)
            .arg(batch.to_string())
            .output()?;
        std::fs::remove_dir_all(&dir).ok();
        anyhow::ensure!(
            out.status.success(),
            "{kind} run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let mut it = text.split_whitespace();
        let rate: f64 = it.next().context("rate")?.parse()?;
        let commits: u64 = it.next().context("commits")?.parse()?;
        Ok((rate, commits))
    };
    run("redb", 0, COMMIT_EVERY)?; // warm-up (page cache)
    let (mut redb, mut sled) = (Vec::new(), Vec::new());
    let mut commits = 0;
    for n in 1..=repeats {
        let (r, c) = run("redb", n, COMMIT_EVERY)?;
        redb.push(r);
        commits = c;
        sled.push(run("sled", n, COMMIT_EVERY)?.0);
    }
    let redb_small = stat(
        (1..=repeats.min(3))
            .map(|n| run("redb", 100 + n, 1_000).map(|r| r.0))
            .collect::<Result<Vec<_>>>()?,
    );
    let redb = stat(redb);
    let sled = stat(sled);

    println!("| store | records | records/s (median) | min–max | target |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| (a) in memory, typed input | {mem_records} | **{}** | {}–{} | ≥ 1 M |",
        fmt(mem.median),
        fmt(mem.min),
        fmt(mem.max)
    );
    println!(
        "| (b) redb, exactly-once, commit/10,000 | {durable_records} | **{}** | {}–{} | ≥ 200 k |",
        fmt(redb.median),
        fmt(redb.min),
        fmt(redb.max)
    );
    println!(
        "| (b') redb, exactly-once, commit/1,000 | {durable_records} | **{}** | {}–{} | |",
        fmt(redb_small.median),
        fmt(redb_small.min),
        fmt(redb_small.max)
    );
    println!(
        "| (c) sled, exactly-once, commit/10,000 | {durable_records} | **{}** | {}–{} | |",
        fmt(sled.median),
        fmt(sled.min),
        fmt(sled.max)
    );
    println!(
        "\nredb / sled = **{:.2}×**; (b) made {commits} durable commits per run. \
         Published Kafka Streams single-thread figure (RocksDB, SimpleBenchmark): ~250 k records/s.",
        redb.median / sled.median
    );
    tmp.close()?;
    Ok(())
}
