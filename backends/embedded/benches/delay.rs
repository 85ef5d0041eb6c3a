//! # Delay queue benchmark
//!
//! Measures, in one run, and prints a markdown table of medians (with
//! min–max over the repeats):
//!
//! - **(a) wheel**: the pure [`TimerWheel`] on one core: 1,000,000 timers
//!   inserted with deadlines spread over the next 10 s (and, second row, the
//!   next 24 h), then expired by advancing the wheel in 1 ms steps (1 s
//!   steps for 24 h) into a reused buffer. Timers/s = timers / (insert +
//!   expire time). Target ≥ 2,000,000/s.
//! - **(b) memory per pending timer** on [`EmbeddedDelayQueue`]: 1,000,000
//!   far-future jobs (16-byte payloads, ids `mem-<n>`) scheduled through
//!   `schedule_many` in 20 transactions; the process's resident set
//!   (`/proc/self/statm`) before, half-way and after: per job over the
//!   whole fill (which includes filling redb's bounded page cache, 32 MiB),
//!   per further job over the second half, and the resident set
//!   extrapolated to 10,000,000 jobs with that marginal cost (target
//!   ≤ 1 GiB); also the database file's bytes per job (on disk).
//! - **(c) durable schedule rate** on the embedded queue: one job per
//!   `schedule` (one durable redb commit, one `fsync`, each), and batches of
//!   1,000 per `schedule_many`. Jobs/s.
//! - **(d) firing lag** on the embedded queue with the real [`SystemClock`]:
//!   2,000 jobs due 1 ms apart starting 100 ms ahead; one loop polls
//!   (`poll_due(now, 100)`), acks every lease, and sleeps 200 µs when nothing
//!   was due. Lag = the poll's `now` − the job's due time. p50 / p99 / max,
//!   with durable polls (the default: the lease commit syncs) and without.
//!
//! Nothing is asserted (timings are never asserted, DESIGN.md).
//!
//! ```text
//! cargo bench -p smartmsg-embedded --bench delay            # about 1 min
//! cargo bench -p smartmsg-embedded --bench delay -- --quick # a few seconds
//! ```
//!
//! Files go in a temporary directory under cargo's target directory (the
//! real disk), or under `$SMARTMSG_BENCH_DIR`, removed at the end.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use smartmsg_embedded::{EmbeddedDelayQueue, EmbeddedQueueConfig};
use smartmsg_engine::wheel::{Expired, TimerWheel};
use smartmsg_engine::{Clock, DelayQueue, Job, JobId, QueueLimits, SystemClock};

struct Mode {
    quick: bool,
    reps: usize,
    wheel_timers: usize,
    memory_jobs: usize,
    single_schedules: usize,
    batches: usize,
    lag_jobs: u64,
}

impl Mode {
    fn from_env() -> Self {
        let quick = std::env::args().skip(1).any(|a| a == "--quick")
            || std::env::var("SMARTMSG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Self {
                quick,
                reps: 3,
                wheel_timers: 200_000,
                memory_jobs: 200_000,
                single_schedules: 200,
                batches: 5,
                lag_jobs: 500,
            }
        } else {
            Self {
                quick,
                reps: 5,
                wheel_timers: 1_000_000,
                memory_jobs: 1_000_000,
                single_schedules: 1_000,
                batches: 20,
                lag_jobs: 2_000,
            }
        }
    }
}

/// Median, min and max of samples.
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn row(what: &str, (med, min, max): (f64, f64, f64), unit: &str, f: fn(f64) -> String) {
    println!("| {what} | {} {unit} | {} – {} |", f(med), f(min), f(max));
}

// ---------------------------------------------------------------------------
// (a) the pure wheel

/// Timers/s of one insert-all-then-expire-all run over `spread_ms`.
fn wheel_run(n: usize, spread_ms: u64, step_ms: u64) -> f64 {
    let start = 1_700_000_000_000u64;
    let mut wheel: TimerWheel<u64> = TimerWheel::with_capacity(start, n);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let t0 = Instant::now();
    for i in 0..n as u64 {
        // xorshift: cheap, spread deadlines.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        wheel.insert(start + 1 + x % spread_ms, i);
    }
    let mut out: Vec<Expired<u64>> = Vec::with_capacity(4096);
    let mut now = start;
    let mut expired = 0usize;
    while expired < n {
        now += step_ms;
        out.clear();
        expired += wheel.advance_into(now, &mut out);
        black_box(&out);
    }
    let secs = t0.elapsed().as_secs_f64();
    n as f64 / secs
}

// ---------------------------------------------------------------------------
// (b) memory

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Memory {
    rss_before: u64,
    rss_half: u64,
    rss_after: u64,
    file_bytes: u64,
    jobs: usize,
    secs: f64,
}

fn memory(dir: &Path, jobs: usize, rt: &tokio::runtime::Runtime) -> Result<Memory> {
    let q = EmbeddedDelayQueue::open(dir)?;
    let far = SystemClock.now_ms() + 86_400_000;
    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut rss_half = 0;
    rt.block_on(async {
        let mut n = 0usize;
        while n < jobs {
            if n == jobs / 2 {
                rss_half = rss_bytes();
            }
            let batch: Vec<Job> = (n..(n + jobs / 20).min(jobs))
                .map(|i| Job {
                    id: JobId::new(format!("mem-{i}")).expect("valid"),
                    due_ms: far + (i as u64 % 3_600_000),
                    payload: Bytes::from_static(b"0123456789abcdef"),
                })
                .collect();
            n += batch.len();
            for r in q.schedule_many(batch).await? {
                r?;
            }
        }
        anyhow::Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    let stats = q.stats();
    anyhow::ensure!(stats.len == jobs as u64, "len {}", stats.len);
    anyhow::ensure!(stats.in_memory == 0, "far-future jobs were loaded");
    let file_bytes = std::fs::metadata(dir.join("queue.redb"))?.len();
    Ok(Memory {
        rss_before,
        rss_half,
        rss_after,
        file_bytes,
        jobs,
        secs,
    })
}

// ---------------------------------------------------------------------------
// (c) durable schedule rate

fn schedule_rate(dir: &Path, mode: &Mode, rt: &tokio::runtime::Runtime) -> Result<(f64, f64)> {
    let q = EmbeddedDelayQueue::open(dir)?;
    let far = SystemClock.now_ms() + 86_400_000;
    let tag = SystemClock.now_ms();
    let single = rt.block_on(async {
        let t0 = Instant::now();
        for i in 0..mode.single_schedules {
            q.schedule(Job {
                id: JobId::new(format!("s-{tag}-{i}")).expect("valid"),
                due_ms: far + i as u64,
                payload: Bytes::from_static(b"0123456789abcdef"),
            })
            .await?;
        }
        anyhow::Ok(mode.single_schedules as f64 / t0.elapsed().as_secs_f64())
    })?;
    let batched = rt.block_on(async {
        let t0 = Instant::now();
        for b in 0..mode.batches {
            let jobs = (0..1_000)
                .map(|i| Job {
                    id: JobId::new(format!("b-{tag}-{b}-{i}")).expect("valid"),
                    due_ms: far + i as u64,
                    payload: Bytes::from_static(b"0123456789abcdef"),
                })
                .collect();
            for r in q.schedule_many(jobs).await? {
                r?;
            }
        }
        anyhow::Ok((mode.batches * 1_000) as f64 / t0.elapsed().as_secs_f64())
    })?;
    Ok((single, batched))
}

// ---------------------------------------------------------------------------
// (d) firing lag

fn firing_lag(
    dir: &Path,
    jobs: u64,
    durable_polls: bool,
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<u64>> {
    let q = EmbeddedDelayQueue::open_with(dir, {
        let mut built = EmbeddedQueueConfig::default();
        built.limits = {
            let mut built = QueueLimits::default();
            built.max_poll = 100;
            built
        };
        built.durable_polls = durable_polls;
        built
    })?;
    rt.block_on(async {
        let start = SystemClock.now_ms() + 100;
        let tag = start;
        let batch: Vec<Job> = (0..jobs)
            .map(|i| Job {
                id: JobId::new(format!("lag-{tag}-{i}")).expect("valid"),
                due_ms: start + i,
                payload: Bytes::from_static(b"x"),
            })
            .collect();
        for r in q.schedule_many(batch).await? {
            r?;
        }
        let mut lags = Vec::with_capacity(jobs as usize);
        let deadline = Instant::now() + Duration::from_millis(jobs + 10_000);
        while (lags.len() as u64) < jobs && Instant::now() < deadline {
            let now = SystemClock.now_ms();
            let leases = q.poll_due(now, 100).await?;
            if leases.is_empty() {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            for l in leases {
                lags.push(now.saturating_sub(l.job.due_ms));
                q.ack(&l.token).await?;
            }
        }
        anyhow::ensure!(lags.len() as u64 == jobs, "only {} jobs fired", lags.len());
        Ok(lags)
    })
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    smartmsg_engine::testkit::stats::percentile(sorted, p).unwrap_or(0)
}

// ---------------------------------------------------------------------------

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

fn main() -> Result<()> {
    let mode = Mode::from_env();
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new()
        .prefix("smartmsg-bench-delay-")
        .tempdir_in(&root)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    println!(
        "# delay queue benchmark{}\n\ndirectory: {}\n",
        if mode.quick { " (quick)" } else { "" },
        tmp.path().display()
    );
    println!("| measurement | median | min – max |");
    println!("|---|---|---|");

    // (a)
    wheel_run(mode.wheel_timers / 10, 10_000, 1);
    let a: Vec<f64> = (0..mode.reps)
        .map(|_| wheel_run(mode.wheel_timers, 10_000, 1))
        .collect();
    row(
        &format!(
            "(a) wheel insert+expire, {} timers over 10 s, 1 ms steps",
            mode.wheel_timers
        ),
        stats(a),
        "timers/s",
        fmt_rate,
    );
    let a2: Vec<f64> = (0..mode.reps)
        .map(|_| wheel_run(mode.wheel_timers, 86_400_000, 1_000))
        .collect();
    row(
        &format!(
            "(a) wheel insert+expire, {} timers over 24 h, 1 s steps",
            mode.wheel_timers
        ),
        stats(a2),
        "timers/s",
        fmt_rate,
    );

    // (c)
    let mut single = Vec::new();
    let mut batched = Vec::new();
    for r in 0..mode.reps.min(3) {
        let (s, b) = schedule_rate(&tmp.path().join(format!("rate-{r}")), &mode, &rt)?;
        single.push(s);
        batched.push(b);
    }
    row(
        "(c) durable schedule, 1 job per commit",
        stats(single),
        "jobs/s",
        fmt_rate,
    );
    row(
        "(c) durable schedule_many, 1,000 jobs per commit",
        stats(batched),
        "jobs/s",
        fmt_rate,
    );

    // (d)
    for durable in [true, false] {
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut max = Vec::new();
        for r in 0..mode.reps.min(3) {
            let mut lags = firing_lag(
                &tmp.path().join(format!("lag-{durable}-{r}")),
                mode.lag_jobs,
                durable,
                &rt,
            )?;
            lags.sort_unstable();
            p50.push(percentile(&lags, 0.5) as f64);
            p99.push(percentile(&lags, 0.99) as f64);
            max.push(*lags.last().unwrap_or(&0) as f64);
        }
        let what = if durable {
            "durable polls"
        } else {
            "unsynced polls"
        };
        let ms = |x: f64| format!("{x:.0}");
        row(&format!("(d) firing lag p50, {what}"), stats(p50), "ms", ms);
        row(&format!("(d) firing lag p99, {what}"), stats(p99), "ms", ms);
        row(&format!("(d) firing lag max, {what}"), stats(max), "ms", ms);
    }

    // (b) last: it leaves the allocator and page cache warm.
    let m = memory(&tmp.path().join("memory"), mode.memory_jobs, &rt)?;
    // The growth over the second half: by then redb's page cache (bounded
    // by `cache_bytes`) is full, so this is what each further job costs.
    let per_job = m.rss_after.saturating_sub(m.rss_half) as f64 / (m.jobs - m.jobs / 2) as f64;
    let overall = m.rss_after.saturating_sub(m.rss_before) as f64 / m.jobs as f64;
    let single = |x: f64| format!("{x:.1}");
    row(
        &format!(
            "(b) resident memory per pending job, all {} far-future jobs",
            m.jobs
        ),
        (overall, overall, overall),
        "bytes",
        single,
    );
    row(
        "(b) resident memory per further pending job (second half)",
        (per_job, per_job, per_job),
        "bytes",
        single,
    );
    let gib = |x: f64| format!("{:.3}", x / (1u64 << 30) as f64);
    let ten_m = m.rss_after as f64 + per_job * (10_000_000 - m.jobs) as f64;
    row(
        "(b) resident set extrapolated to 10,000,000 pending jobs",
        (ten_m, ten_m, ten_m),
        "GiB",
        gib,
    );
    row(
        "(b) database file per pending job (disk)",
        (
            m.file_bytes as f64 / m.jobs as f64,
            m.file_bytes as f64 / m.jobs as f64,
            m.file_bytes as f64 / m.jobs as f64,
        ),
        "bytes",
        single,
    );
    row(
        "(b) bulk schedule_many rate while filling (5% of the jobs per commit)",
        (
            m.jobs as f64 / m.secs,
            m.jobs as f64 / m.secs,
            m.jobs as f64 / m.secs,
        ),
        "jobs/s",
        fmt_rate,
    );
    println!(
        "\nresident set: {:.1} MiB before (b), {:.1} MiB half-way, {:.1} MiB after",
        m.rss_before as f64 / (1 << 20) as f64,
        m.rss_half as f64 / (1 << 20) as f64,
        m.rss_after as f64 / (1 << 20) as f64
    );
    Ok(())
}
