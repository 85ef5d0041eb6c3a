//! # Embedded event log benchmark
//!
//! Measures, in one run and on one disk, the embedded event log against the
//! disk's own ceiling and against a peer store, then prints a markdown table
//! and the ratios the log's performance targets are stated in:
//!
//! - **(a) raw ceiling**: 100-byte records written to a plain preallocated
//!   file (zero-filled and synced first, like the log's segments), one
//!   `write_all_at` call and one `fdatasync` per batch, at batch size 1 and
//!   at each mean batch size that (b) reached, and at 64: the largest batch
//!   64 writers can form when each waits for its append, so the ceiling of
//!   (b)@64 on this disk. Records/s.
//! - **(b) embedded appends**: one 100-byte event per [`AppendTx`]
//!   (`ExpectedVersion::Any`, one stream per writer) from 1, 8 and 64
//!   concurrent writers (tokio tasks on a 2-worker multi-thread runtime),
//!   each awaiting its append, which returns only once durable, before the
//!   next. Appends/s, and the mean group-commit size from
//!   [`EmbeddedLog::stats`].
//! - **(c) peer**: the same 100-byte records inserted into redb under
//!   sequential `u64` keys, 1,000 rows per durable write transaction. Rows/s.
//! - **(d) replay**: ~1,000,000 events of 100 bytes appended to one stream
//!   (1,000 per transaction), the log reopened, then the whole stream read
//!   back with `read_stream` in pages of 10,000 on a current-thread runtime
//!   (one core, frames checked and decoded into `RecordedEvent`s; the data is
//!   in the page cache, so this is the CPU cost of replay). Events/s.
//!
//! Every measurement is repeated and reported as the median of the repeats
//! (with min–max), after an untimed warm-up. The repeats of (a), (b) and (c)
//! run interleaved in rounds, so that the disk's drift hits all of them
//! alike. Nothing is asserted: disks drift by several times between runs, so
//! only ratios within one run mean much.
//!
//! ```text
//! cargo bench -p smartmsg-embedded --bench log               # full, about 1 min
//! cargo bench -p smartmsg-embedded --bench log -- --quick    # a few seconds
//! SMARTMSG_BENCH_QUICK=1 cargo bench -p smartmsg-embedded --bench log
//! ```
//!
//! Files go in a temporary directory under cargo's target directory (the
//! real disk: `/tmp` may be a tmpfs), or under `$SMARTMSG_BENCH_DIR` if set,
//! and are removed at the end. Arguments other than `--quick` (such as the
//! `--bench` cargo passes) are ignored.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use redb::{Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, LogStats};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};

/// Bytes per record, event payload and redb value.
const RECORD: usize = 100;
/// Concurrent writers in (b).
const WRITERS: [usize; 3] = [1, 8, 64];
/// Worker threads of the runtime the writers run on.
const WORKER_THREADS: usize = 2;
/// Rows per durable redb transaction in (c).
const REDB_ROWS_PER_TX: u64 = 1_000;
/// Events per append transaction when filling the replay stream in (d).
const REPLAY_TX_EVENTS: usize = 1_000;
/// Events per `read_stream` call in (d).
const REPLAY_PAGE: usize = 10_000;
/// Size of the raw file in (a): the log's default segment size. Writes wrap
/// around to the start when they reach the end.
const RAW_FILE_BYTES: u64 = 64 << 20;
/// redb table for (c).
const REDB_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("bench");

/// How long and how often to measure.
struct Mode {
    quick: bool,
    /// Repeats of each measurement; the median is reported.
    reps: usize,
    /// Length of one timed repeat of (a), (b) and (c).
    run: Duration,
    /// Untimed warm-up before the repeats.
    warmup: Duration,
    /// Events in the replay stream of (d).
    replay_events: usize,
}

impl Mode {
    fn from_env() -> Self {
        let quick = std::env::args().skip(1).any(|a| a == "--quick")
            || std::env::var("SMARTMSG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Self {
                quick,
                reps: 3,
                run: Duration::from_millis(200),
                warmup: Duration::from_millis(50),
                replay_events: 100_000,
            }
        } else {
            Self {
                quick,
                reps: 5,
                run: Duration::from_millis(1_500),
                warmup: Duration::from_millis(300),
                replay_events: 1_000_000,
            }
        }
    }
}

/// Rates of the repeats of one measurement, per second.
struct Rates(Vec<f64>);

impl Rates {
    fn median(&self) -> f64 {
        smartmsg_engine::testkit::stats::median(&self.0)
    }

    fn range(&self) -> String {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(0.0, f64::max);
        format!("{} – {}", human(min), human(max))
    }
}

/// One timed repeat: how much work was done and how long it took.
fn rate(work: u64, elapsed: Duration) -> f64 {
    work as f64 / elapsed.as_secs_f64()
}

/// Result of (b) for one writer count.
struct Embedded {
    writers: usize,
    rates: Rates,
    /// Writer counters over the timed repeats only.
    stats: LogStats,
    /// Segments created (each zero-filled and synced) during the repeats.
    segments_created: usize,
}

/// Result of (d).
struct Replay {
    events: usize,
    append_rate: f64,
    reopen: Duration,
    rates: Rates,
}

fn main() -> Result<()> {
    let mode = Mode::from_env();
    let root = bench_root()?;
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("smartmsg-bench-log-")
        .tempdir_in(&root)
        .with_context(|| format!("create a temporary directory in {}", root.display()))?;
    let fs = filesystem_of(dir.path());
    print_header(&mode, dir.path(), &fs);
    if fs.contains(" type tmpfs ") || fs.contains(" type ramfs ") {
        println!("> **warning**: the bench directory is in memory; set SMARTMSG_BENCH_DIR to a directory on disk.\n");
    }

    // Set up and warm up (a), (b) and (c).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()?;
    let mut writers = Vec::new();
    for n in WRITERS {
        writers.push(Writers::open(
            &dir.path().join(format!("log-{n}")),
            n,
            &rt,
            &mode,
        )?);
    }
    let started = Instant::now();
    let mut raw = RawFile::create(&dir.path().join("raw.dat"))?;
    let preallocated_in = started.elapsed();
    raw.run(1, mode.warmup)?;
    let mut redb = Peer::create(&dir.path().join("peer.redb"))?;
    redb.run(mode.warmup)?;

    // The repeats run in rounds, one repeat of each item per round, so that
    // the disk's slow drift hits every item alike. Batch 1 and the largest
    // batch the most writers can form (each has one append in flight) are
    // known up front; the batches (b) reached are known after it.
    let most_writers = WRITERS.iter().copied().max().unwrap_or(1);
    let mut raw_rates: Vec<(usize, Vec<f64>)> = vec![(1, Vec::new()), (most_writers, Vec::new())];
    let mut redb_rates = Vec::new();
    for round in 1..=mode.reps {
        eprintln!(
            "round {round}/{}: (b) embedded, (a) raw, (c) redb",
            mode.reps
        );
        for w in &mut writers {
            w.run(&rt, mode.run)?;
        }
        for (batch, rates) in &mut raw_rates {
            rates.push(raw.run(*batch, mode.run)?);
        }
        redb_rates.push(redb.run(mode.run)?);
    }
    redb.check()?;
    let embedded: Vec<Embedded> = writers.into_iter().map(Writers::finish).collect();
    let mut reached: Vec<usize> = Vec::new();
    for e in &embedded {
        let b = (e.stats.mean_batch().round() as usize).max(1);
        if !reached.contains(&b) && !raw_rates.iter().any(|(have, _)| *have == b) {
            reached.push(b);
        }
    }
    let first_reached = raw_rates.len();
    raw_rates.extend(reached.iter().map(|&b| (b, Vec::new())));
    for round in 1..=mode.reps {
        if reached.is_empty() {
            break;
        }
        eprintln!(
            "round {round}/{}: (a) raw at the batches (b) reached: {reached:?}",
            mode.reps
        );
        for (batch, rates) in &mut raw_rates[first_reached..] {
            rates.push(raw.run(*batch, mode.run)?);
        }
    }
    drop(raw);
    let mut raw: Vec<(usize, Rates)> = raw_rates.into_iter().map(|(b, r)| (b, Rates(r))).collect();
    raw.sort_by_key(|(b, _)| *b);

    eprintln!("(d) read_stream replay of {} events", mode.replay_events);
    let replay = bench_replay(&dir.path().join("replay"), &mode)?;

    print_results(&embedded, &raw, &Rates(redb_rates), &replay);
    println!(
        "\nZero-filling and syncing one {} MiB file (what a segment roll does, on the writer thread) took {:.0} ms here.",
        RAW_FILE_BYTES >> 20,
        preallocated_in.as_secs_f64() * 1e3
    );
    dir.close().context("remove the bench directory")?;
    Ok(())
}

/// Where the bench directory goes: `$SMARTMSG_BENCH_DIR`, else cargo's
/// target directory (the bench binary is `target/<profile>/deps/log-<hash>`).
fn bench_root() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SMARTMSG_BENCH_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locate the bench binary")?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .context("the bench binary is not inside a cargo target directory; set SMARTMSG_BENCH_DIR")
}

// ---------------------------------------------------------------------------
// (a) raw ceiling

/// A plain preallocated file written in batches; see (a).
struct RawFile {
    path: PathBuf,
    file: File,
    /// Where the next batch goes; wraps to 0 at the end of the file.
    offset: u64,
}

impl RawFile {
    /// Creates the file at [`RAW_FILE_BYTES`], zero-filled and synced (file
    /// and directory), as the log creates its segments.
    fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("create {}", path.display()))?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < RAW_FILE_BYTES {
            let n = ((RAW_FILE_BYTES - at) as usize).min(zeros.len());
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(Self {
            path: path.to_owned(),
            file,
            offset: 0,
        })
    }

    /// Writes batches of `batch` records, one `write_all_at` and one
    /// `fdatasync` each, for `for_how_long`; returns records/s.
    fn run(&mut self, batch: usize, for_how_long: Duration) -> Result<f64> {
        let buf: Vec<u8> = (0..batch * RECORD).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let mut records = 0u64;
        loop {
            if self.offset + buf.len() as u64 > RAW_FILE_BYTES {
                self.offset = 0;
            }
            self.file
                .write_all_at(&buf, self.offset)
                .with_context(|| format!("write {}", self.path.display()))?;
            self.file
                .sync_data()
                .with_context(|| format!("fdatasync {}", self.path.display()))?;
            self.offset += buf.len() as u64;
            records += batch as u64;
            if start.elapsed() >= for_how_long {
                return Ok(rate(records, start.elapsed()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (b) embedded appends

/// One log and its writer count; see (b).
struct Writers {
    writers: usize,
    log: Arc<EmbeddedLog>,
    payload: Bytes,
    rates: Vec<f64>,
    /// Counters after the warm-up.
    before: LogStats,
    segments_before: usize,
}

impl Writers {
    /// Opens a fresh log in `dir` and warms it up.
    fn open(dir: &Path, writers: usize, rt: &tokio::runtime::Runtime, mode: &Mode) -> Result<Self> {
        let log = Arc::new(EmbeddedLog::open_with(dir, EmbeddedConfig::default())?);
        let payload = Bytes::from(vec![0xAB; RECORD]);
        rt.block_on(run_writers(&log, writers, &payload, mode.warmup))?;
        Ok(Self {
            writers,
            before: log.stats(),
            segments_before: log.segment_count(),
            log,
            payload,
            rates: Vec::new(),
        })
    }

    /// One timed repeat.
    fn run(&mut self, rt: &tokio::runtime::Runtime, for_how_long: Duration) -> Result<()> {
        let (appends, elapsed) = rt.block_on(run_writers(
            &self.log,
            self.writers,
            &self.payload,
            for_how_long,
        ))?;
        self.rates.push(rate(appends, elapsed));
        Ok(())
    }

    /// The result over the timed repeats.
    fn finish(self) -> Embedded {
        let (after, before) = (self.log.stats(), self.before);
        Embedded {
            writers: self.writers,
            segments_created: self.log.segment_count() - self.segments_before,
            rates: Rates(self.rates),
            stats: LogStats {
                batches: after.batches - before.batches,
                transactions: after.transactions - before.transactions,
                events: after.events - before.events,
                bytes: after.bytes - before.bytes,
            },
        }
    }
}

/// Runs `writers` tasks, each appending one event at a time to its own
/// stream until `for_how_long` has passed; returns the appends acknowledged
/// and the time until the last one was.
async fn run_writers(
    log: &Arc<EmbeddedLog>,
    writers: usize,
    payload: &Bytes,
    for_how_long: Duration,
) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let deadline = start + for_how_long;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let log = log.clone();
        let payload = payload.clone();
        let stream = StreamId::new(format!("writer-{w}"))?;
        tasks.push(tokio::spawn(async move {
            let mut appends = 0u64;
            while Instant::now() < deadline {
                let event = NewEvent::new("BenchEvent", 1, appends, payload.clone());
                let tx = AppendTx::single(stream.clone(), ExpectedVersion::Any, vec![event]);
                log.append(tx).await?;
                appends += 1;
            }
            anyhow::Ok(appends)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed()))
}

// ---------------------------------------------------------------------------
// (c) redb

/// The peer: a redb table under sequential keys; see (c).
struct Peer {
    db: redb::Database,
    next_key: u64,
}

impl Peer {
    fn create(path: &Path) -> Result<Self> {
        Ok(Self {
            db: redb::Database::create(path)?,
            next_key: 0,
        })
    }

    /// Inserts rows, [`REDB_ROWS_PER_TX`] per durable transaction, for
    /// `for_how_long`; returns rows/s.
    fn run(&mut self, for_how_long: Duration) -> Result<f64> {
        let value = [0xABu8; RECORD];
        let start = Instant::now();
        let mut rows = 0u64;
        loop {
            let mut tx = self.db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut table = tx.open_table(REDB_TABLE)?;
                for _ in 0..REDB_ROWS_PER_TX {
                    table.insert(self.next_key, value.as_slice())?;
                    self.next_key += 1;
                }
            }
            tx.commit()?;
            rows += REDB_ROWS_PER_TX;
            if start.elapsed() >= for_how_long {
                return Ok(rate(rows, start.elapsed()));
            }
        }
    }

    /// Checks that every row inserted is there.
    fn check(&self) -> Result<()> {
        let stored = self.db.begin_read()?.open_table(REDB_TABLE)?.len()?;
        ensure!(
            stored == self.next_key,
            "redb holds {stored} rows, {} were inserted",
            self.next_key
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// (d) replay

fn bench_replay(dir: &Path, mode: &Mode) -> Result<Replay> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = StreamId::new("replay")?;
    let payload = Bytes::from(vec![0xAB; RECORD]);
    let total = mode.replay_events;

    let append_rate = {
        let log = EmbeddedLog::open_with(dir, EmbeddedConfig::default())?;
        let start = Instant::now();
        rt.block_on(async {
            let mut written = 0;
            while written < total {
                let n = REPLAY_TX_EVENTS.min(total - written);
                let events = (written..written + n)
                    .map(|i| NewEvent::new("BenchEvent", 1, i as u64, payload.clone()))
                    .collect();
                log.append(AppendTx::single(
                    stream.clone(),
                    ExpectedVersion::Any,
                    events,
                ))
                .await?;
                written += n;
            }
            anyhow::Ok(())
        })?;
        rate(total as u64, start.elapsed())
    };

    let start = Instant::now();
    let log = EmbeddedLog::open_with(dir, EmbeddedConfig::default())?;
    let reopen = start.elapsed();

    let read_all_of_it = || -> Result<f64> {
        let start = Instant::now();
        let read = rt.block_on(async {
            let mut next = 1u64;
            loop {
                let page = log.read_stream(&stream, next, REPLAY_PAGE).await?;
                let Some(last) = page.last() else { break };
                ensure!(
                    last.version == next + page.len() as u64 - 1,
                    "a page starting at version {next} ends at version {}",
                    last.version
                );
                next = last.version + 1;
                black_box(page);
            }
            anyhow::Ok(next - 1)
        })?;
        let elapsed = start.elapsed();
        ensure!(
            read == total as u64,
            "replay read {read} events, {total} were appended"
        );
        Ok(rate(read, elapsed))
    };
    read_all_of_it()?; // warm-up
    let rates = (0..mode.reps)
        .map(|_| read_all_of_it())
        .collect::<Result<_>>()?;
    Ok(Replay {
        events: total,
        append_rate,
        reopen,
        rates: Rates(rates),
    })
}

// ---------------------------------------------------------------------------
// Report

fn print_header(mode: &Mode, dir: &Path, fs: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!(
        "## smartmsg embedded log benchmark ({})\n",
        if mode.quick { "quick" } else { "full" }
    );
    println!("- machine: {cpus} CPUs (nproc), {cpu}, Linux {kernel}");
    println!("- bench dir: {}", dir.display());
    println!("- filesystem: {fs}");
    println!(
        "- each figure: median of {} runs of {:.1} s (after a {:.1} s warm-up); (d) reads {} events per run",
        mode.reps,
        mode.run.as_secs_f64(),
        mode.warmup.as_secs_f64(),
        mode.replay_events
    );
    println!();
}

fn print_results(embedded: &[Embedded], raw: &[(usize, Rates)], redb: &Rates, replay: &Replay) {
    println!("| | measurement | median | min – max | mean batch | notes |");
    println!("|---|---|---:|---:|---:|---|");
    let most_writers = WRITERS.iter().copied().max().unwrap_or(1);
    for (batch, r) in raw {
        let mut notes = vec![format!("{RECORD} B records")];
        for e in embedded {
            if (e.stats.mean_batch().round() as usize).max(1) == *batch {
                notes.push(format!("the batch of (b)@{}", e.writers));
            }
        }
        if *batch == most_writers {
            notes.push(format!(
                "the largest batch {most_writers} waiting writers can form"
            ));
        }
        println!(
            "| (a) | raw write + fdatasync, batch {batch} | {}/s | {} | {batch} | {} |",
            human(r.median()),
            r.range(),
            notes.join("; ")
        );
    }
    for e in embedded {
        let per_append = e.stats.bytes.checked_div(e.stats.transactions).unwrap_or(0);
        println!(
            "| (b) | embedded append, {} writer{} | {}/s | {} | {:.1} | {per_append} B frame per append, {} group commits, {} segments created |",
            e.writers,
            if e.writers == 1 { "" } else { "s" },
            human(e.rates.median()),
            e.rates.range(),
            e.stats.mean_batch(),
            e.stats.batches,
            e.segments_created
        );
    }
    println!(
        "| (c) | redb insert, sequential u64 keys | {}/s | {} | {REDB_ROWS_PER_TX} | rows per durable transaction |",
        human(redb.median()),
        redb.range()
    );
    println!(
        "| (d) | read_stream replay, pages of {REPLAY_PAGE} | {}/s | {} | | {} events; filled at {}/s, reopened in {:.0} ms |",
        human(replay.rates.median()),
        replay.rates.range(),
        replay.events,
        human(replay.append_rate),
        replay.reopen.as_secs_f64() * 1e3
    );
    println!();

    println!("| target | measured | ratio | wanted | result |");
    println!("|---|---|---:|---:|---|");
    let find = |n: usize| embedded.iter().find(|e| e.writers == n);
    let raw_at = |batch: usize| raw.iter().find(|(b, _)| *b == batch).map(|(_, r)| r);
    if let Some(b64) = find(64) {
        let batch = (b64.stats.mean_batch().round() as usize).max(1);
        if let Some(a) = raw_at(batch) {
            ratio_row(
                &format!("(b)@64 ≥ 0.5 × (a)@batch {batch}"),
                b64.rates.median(),
                a.median(),
                0.5,
            );
        }
        ratio_row("(b)@64 ≥ 2 × (c)", b64.rates.median(), redb.median(), 2.0);
    }
    if let (Some(b1), Some(a1)) = (find(1), raw_at(1)) {
        ratio_row(
            "(b)@1 ≥ 0.8 × (a)@batch 1",
            b1.rates.median(),
            a1.median(),
            0.8,
        );
    }
    let d = replay.rates.median();
    let wanted = 2_000_000.0;
    println!(
        "| (d) ≥ 2 M events/s | {}/s | {:.2} | ≥ 1.00 | {} |",
        human(d),
        d / wanted,
        verdict(d >= wanted)
    );
}

fn ratio_row(name: &str, ours: f64, theirs: f64, wanted: f64) {
    let ratio = ours / theirs;
    println!(
        "| {name} | {}/s vs {}/s | {ratio:.2} | ≥ {wanted:.2} | {} |",
        human(ours),
        human(theirs),
        verdict(ratio >= wanted)
    );
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

/// A rate with a k/M suffix.
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The mount that holds `path`, from `/proc/mounts`: device, mount point,
/// type and options.
fn filesystem_of(path: &Path) -> String {
    let Ok(path) = path.canonicalize() else {
        return "unknown".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown (no /proc/mounts)".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let point = unescape_mount(f[1]);
        // A later mount on the same point hides an earlier one: `>=`.
        if path.starts_with(&point) && best.as_ref().is_none_or(|(l, _)| point.len() >= *l) {
            best = Some((
                point.len(),
                format!("{} on {} type {} ({})", f[0], point, f[2], f[3]),
            ));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, s)| s)
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/mounts`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
