//! # Stream processing benchmark
//!
//! Three workloads through the engine's stream DSL on one core:
//!
//! - **filter → stream-table join → tumbling-window count** (`fjw`), with
//!   the three state stores below;
//! - **stream-stream join** (`join`): views and clicks, two input streams,
//!   inner-joined per user within a time window, in memory and on redb;
//! - **session windows** (`session`): a sum and count per user session
//!   with a merger, in memory and on redb.
//!
//! The stores:
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
//! Workload `fjw`: 10,000 users in the table (user → segment), input records
//! `(user, amount)` with timestamps 1 ms apart, the filter drops amounts
//! divisible by 8 (12.5 %), the inner join adds the segment, the count
//! groups by user in 1-minute tumbling windows with 1 s grace, emitted once
//! when each window closes (suppress until close): ~10,000 window entries
//! open at a time, about as many dirty entries per commit.
//!
//! Workload `join`: records 1 ms apart, each a view `(user, ad)` or a click
//! `(user, amount)` (half each, pseudo-random), 10,000 users; a click joins
//! the user's views from 10 s before it to the click (`JoinWindows::of(0,
//! 10_000)`, grace 1 s; `view.join_stream(&clicks, ..)`): about 11,000
//! records kept in the join store, 0.4 pairs out per input.
//!
//! Workload `session`: records `(user, amount)` 1 ms apart, up to 1 s out
//! of order, 10,000 users; sessions with a 10 s inactivity gap and 1 s
//! grace, aggregated to `(count, sum)` with a merger, emitted once when
//! each session closes: about 5,000 open sessions, each record re-keys
//! its session (a delete and a put per commit).
//!
//! Each figure is the median of the repeats (min–max shown) after a warm-up;
//! each durable run is a fresh child process (sled keeps memory and threads
//! after its database is dropped, which would slow later runs), redb and
//! sled runs interleaved.
//! Records/s count input records (the filtered ones included; for the join
//! both sides), end to end: 3,000,000 per run in memory and 1,000,000 on
//! disk for `fjw`, 1,000,000 and 500,000 for the join and the sessions.
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
    envelope, EmitStrategy, EventLogSink, EventLogSource, InMemoryStore, JoinWindows,
    KeyValueStore, Record, RunnerConfig, SessionWindows, StateCodec, StreamRunner, Task, Topology,
    Windows, WriteBatch,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_sled::SledStore;

const USERS: u32 = 10_000;
const COMMIT_EVERY: usize = 10_000;

/// A workload: its topology, inputs and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// Filter → stream-table join → tumbling-window count.
    Fjw,
    /// Stream-stream join of views and clicks.
    Join,
    /// Session windows.
    Session,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Fjw => "fjw",
            Workload::Join => "join",
            Workload::Session => "session",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        [Workload::Fjw, Workload::Join, Workload::Session]
            .into_iter()
            .find(|w| w.name() == s)
            .with_context(|| format!("unknown workload {s}"))
    }

    /// Input records per run: `(in memory, on disk)`. Fewer for the join
    /// and the sessions, which are slower per record; their state (11 s of
    /// records, at most one open session per user) reaches its steady size
    /// within the first 20,000 records.
    fn records(self, quick: bool) -> (u64, u64) {
        match (self, quick) {
            (Workload::Fjw, false) => (3_000_000, 1_000_000),
            (Workload::Fjw, true) => (500_000, 200_000),
            (_, false) => (1_000_000, 500_000),
            (_, true) => (200_000, 100_000),
        }
    }

    fn topology(self) -> Topology {
        match self {
            Workload::Fjw => topology(),
            Workload::Join => join_topology(),
            Workload::Session => session_topology(),
        }
    }

    /// The i-th input record: (input, key, encoded value, timestamp).
    fn event(self, i: u64) -> (&'static str, u32, Vec<u8>, u64) {
        match self {
            Workload::Fjw => {
                let (user, amount, ts) = input(i);
                ("Click", user, amount.to_bytes(), ts)
            }
            Workload::Join => match join_input(i) {
                (user, Side::View(ad), ts) => ("View", user, ad.to_bytes(), ts),
                (user, Side::Click(amount), ts) => ("Click", user, amount.to_bytes(), ts),
            },
            Workload::Session => {
                let (user, amount, ts) = session_input(i);
                ("Click", user, amount.to_bytes(), ts)
            }
        }
    }
}

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

/// Views joined with the clicks of the same user from 0 to 10 s after.
fn join_topology() -> Topology {
    let t = Topology::new();
    let views = t.stream::<u32, u32>("View");
    let clicks = t.stream::<u32, u64>("Click");
    views
        .join_stream(
            &clicks,
            JoinWindows::of(0, 10_000).grace(1_000),
            "view-clicks",
            |ad, amount| (*ad, *amount),
        )
        .to("clicked-views");
    t
}

/// A join input's side and value.
enum Side {
    /// A view of an ad.
    View(u32),
    /// A click of an amount.
    Click(u64),
}

/// The i-th join input: (user, side, timestamp).
fn join_input(i: u64) -> (u32, Side, u64) {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let side = if (x >> 33) & 1 == 0 {
        Side::View((x >> 40) as u32 % 100)
    } else {
        Side::Click(x >> 44)
    };
    ((x % u64::from(USERS)) as u32, side, 1_000_000 + i)
}

/// `(count, sum)` per user session (10 s gap, 1 s grace), emitted when
/// each session closes.
fn session_topology() -> Topology {
    let t = Topology::new();
    t.stream::<u32, u64>("Click")
        .group_by_key()
        .windowed_by_session(
            SessionWindows::with_inactivity_gap(10_000)
                .expect("gap")
                .grace(1_000),
        )
        .emit(EmitStrategy::OnWindowClose)
        .aggregate(
            "sessions",
            || (0u64, 0u64),
            |_, amount, (n, sum)| {
                *n += 1;
                *sum += amount;
            },
            |_, (n, sum), (n2, sum2)| {
                *n += n2;
                *sum += sum2;
            },
        )
        .to("session-totals");
    t
}

/// The i-th session input: (user, amount, timestamp up to 1 s early).
fn session_input(i: u64) -> (u32, u64, u64) {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (
        (x % u64::from(USERS)) as u32,
        x >> 40,
        1_000_000 + i - (x >> 20) % 1_000,
    )
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
fn in_memory(w: Workload, records: u64) -> Result<f64> {
    let mut task = w.topology().build()?;
    let store = InMemoryStore::without_changelog_retention();
    let mut out = Vec::new();
    let mut batch = WriteBatch::new();
    let mut commit = |task: &mut Task, i: u64| -> Result<()> {
        if (i + 1).is_multiple_of(COMMIT_EVERY as u64) {
            task.flush(&mut batch);
            task.drain_outputs(&mut out);
            store.write(&batch)?;
            batch = WriteBatch::new();
            out.clear();
        }
        Ok(())
    };
    let started;
    match w {
        Workload::Fjw => {
            let users = task.input::<u32, u32>("User")?;
            for u in 0..USERS {
                task.process(users, Record::new(u, u % 16, 0))?;
            }
            let clicks = task.input::<u32, u64>("Click")?;
            started = Instant::now();
            for i in 0..records {
                let (user, amount, ts) = input(i);
                task.process(clicks, Record::new(user, amount, ts))?;
                commit(&mut task, i)?;
            }
        }
        Workload::Join => {
            let views = task.input::<u32, u32>("View")?;
            let clicks = task.input::<u32, u64>("Click")?;
            started = Instant::now();
            for i in 0..records {
                match join_input(i) {
                    (user, Side::View(ad), ts) => task.process(views, Record::new(user, ad, ts))?,
                    (user, Side::Click(amount), ts) => {
                        task.process(clicks, Record::new(user, amount, ts))?
                    }
                }
                commit(&mut task, i)?;
            }
        }
        Workload::Session => {
            let clicks = task.input::<u32, u64>("Click")?;
            started = Instant::now();
            for i in 0..records {
                let (user, amount, ts) = session_input(i);
                task.process(clicks, Record::new(user, amount, ts))?;
                commit(&mut task, i)?;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(&out);
    Ok(records as f64 / secs)
}

/// Writes `w`'s input (for `fjw` the users, then `records` clicks) into a
/// fresh log at `dir`.
fn prepare_log(w: Workload, dir: &Path, records: u64, rt: &tokio::runtime::Runtime) -> Result<()> {
    let log = EmbeddedLog::open(dir)?;
    rt.block_on(async {
        if w != Workload::Fjw {
            let mut i = 0u64;
            while i < records {
                let n = (records - i).min(5_000);
                let events = (i..i + n)
                    .map(|j| {
                        let (kind, user, value, ts) = w.event(j);
                        NewEvent::new(kind, 1, ts, envelope::encode(&user.to_bytes(), &value))
                    })
                    .collect();
                log.append(AppendTx::single(
                    StreamId::new("inputs")?,
                    ExpectedVersion::Any,
                    events,
                ))
                .await?;
                i += n;
            }
            return anyhow::Ok(());
        }
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
                    let (kind, user, value, ts) = w.event(j);
                    NewEvent::new(kind, 1, ts, envelope::encode(&user.to_bytes(), &value))
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
    w: Workload,
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
            w.topology(),
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

/// A child run: `--one KIND WORKLOAD INPUT_DIR RUN_DIR BATCH`; prints
/// `records_per_s commits`.
fn one(args: &[String]) -> Result<()> {
    let [kind, workload, input_dir, dir, batch] = args else {
        anyhow::bail!("usage: --one KIND WORKLOAD INPUT_DIR RUN_DIR BATCH");
    };
    let w = Workload::parse(workload)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let dir = PathBuf::from(dir);
    let input: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open(input_dir)?);
    let store: Arc<dyn KeyValueStore> = match kind.as_str() {
        "redb" => Arc::new(RedbStore::open(dir.join("state.redb"))?),
        _ => Arc::new(SledStore::open(dir.join("state.sled"))?),
    };
    let (rate, commits) = exactly_once(w, input, store, &dir.join("out"), batch.parse()?, &rt)?;
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
    let repeats = if quick { 3 } else { 5 };
    let (mem_records, durable_records) = Workload::Fjw.records(quick);
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new()
        .prefix("smartmsg-stream-bench")
        .tempdir_in(&root)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let workloads = [Workload::Fjw, Workload::Join, Workload::Session];

    println!("# Stream processing (one core)\n");
    println!(
        "fjw: filter → join with a {USERS}-user table → tumbling count; join: views ⋈ clicks \
         within 10 s (two input streams); session: (count, sum) per user session, gap 10 s. \
         Commits every {COMMIT_EVERY} records; median of {repeats} (min–max)\n"
    );

    // (a)
    let mut mem = Vec::new();
    for w in workloads {
        let records = w.records(quick).0;
        in_memory(w, records / 5)?; // warm-up
        mem.push(stat(
            (0..repeats)
                .map(|_| in_memory(w, records))
                .collect::<Result<Vec<_>>>()?,
        ));
    }

    // (b), (c): each run in a fresh child process (this binary with
    // `--one`): sled leaves memory and threads behind after its database is
    // dropped (epoch-deferred frees), which slows whatever runs after it in
    // the same process; a child per run keeps every run clean and lets the
    // runs interleave, so the disk's drift hits every store and workload
    // alike.
    for w in workloads {
        prepare_log(w, &tmp.path().join(w.name()), w.records(quick).1, &rt)?;
    }
    let run = |kind: &str, w: Workload, n: usize, batch: usize| -> Result<(f64, u64)> {
        let dir = tmp.path().join(format!("{kind}-{}-{n}", w.name()));
        let out = std::process::Command::new(std::env::current_exe()?)
            .args(["--one", kind, w.name()])
            .arg(tmp.path().join(w.name()))
            .arg(&dir)
            .arg(batch.to_string())
            .output()?;
        std::fs::remove_dir_all(&dir).ok();
        anyhow::ensure!(
            out.status.success(),
            "{kind} {} run failed: {}",
            w.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let mut it = text.split_whitespace();
        let rate: f64 = it.next().context("rate")?.parse()?;
        let commits: u64 = it.next().context("commits")?.parse()?;
        Ok((rate, commits))
    };
    for w in workloads {
        run("redb", w, 0, COMMIT_EVERY)?; // warm-up (page cache)
    }
    let (mut redb, mut sled) = (vec![Vec::new(); workloads.len()], Vec::new());
    let mut commits = 0;
    for n in 1..=repeats {
        for (i, w) in workloads.into_iter().enumerate() {
            let (r, c) = run("redb", w, n, COMMIT_EVERY)?;
            redb[i].push(r);
            if w == Workload::Fjw {
                commits = c;
                sled.push(run("sled", w, n, COMMIT_EVERY)?.0);
            }
        }
    }
    let redb_small = stat(
        (1..=repeats.min(3))
            .map(|n| run("redb", Workload::Fjw, 100 + n, 1_000).map(|r| r.0))
            .collect::<Result<Vec<_>>>()?,
    );
    let redb: Vec<Stat> = redb.into_iter().map(stat).collect();
    let sled = stat(sled);

    let row = |workload: &str, store: &str, records: u64, s: &Stat, target: &str| {
        println!(
            "| {workload} | {store} | {records} | **{}** | {}–{} | {target} |",
            fmt(s.median),
            fmt(s.min),
            fmt(s.max)
        );
    };
    println!("| workload | store | records | records/s (median) | min–max | target |");
    println!("|---|---|---:|---:|---:|---:|");
    let fjw = "filter → join → tumbling count";
    row(
        fjw,
        "(a) in memory, typed input",
        mem_records,
        &mem[0],
        "≥ 1 M",
    );
    row(
        fjw,
        "(b) redb, exactly-once, commit/10,000",
        durable_records,
        &redb[0],
        "≥ 200 k",
    );
    row(
        fjw,
        "(b') redb, exactly-once, commit/1,000",
        durable_records,
        &redb_small,
        "",
    );
    row(
        fjw,
        "(c) sled, exactly-once, commit/10,000",
        durable_records,
        &sled,
        "",
    );
    for (i, name) in [
        (1, "stream-stream join, 10 s window"),
        (2, "session windows, gap 10 s"),
    ] {
        let w = workloads[i];
        row(
            name,
            "(a) in memory, typed input",
            w.records(quick).0,
            &mem[i],
            "",
        );
        row(
            name,
            "(b) redb, exactly-once, commit/10,000",
            w.records(quick).1,
            &redb[i],
            "",
        );
    }
    println!(
        "\nredb / sled = **{:.2}×** (fjw); fjw (b) made {commits} durable commits per run. \
         Published Kafka Streams single-thread figure (RocksDB, SimpleBenchmark): ~250 k records/s.",
        redb[0].median / sled.median
    );
    tmp.close()?;
    Ok(())
}
