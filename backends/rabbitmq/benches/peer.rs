//! # Embedded delay queue vs RabbitMQ, on the same machine
//!
//! Measures, in one run, and prints a markdown table of medians (with
//! min–max over the repeats) and the ratios embedded / RabbitMQ:
//!
//! - **durable schedule rate**, one job per awaited `schedule` call (the
//!   call returns once the job is durable: one synced redb commit on the
//!   embedded queue; two persistent publishes, the job and its journal
//!   record, each awaited for its publisher confirm on RabbitMQ). Far-future
//!   jobs (due in 24 h, 16-byte payloads). First with one caller, then with
//!   [`Mode::concurrency`] tasks scheduling at once on the same queue. Each
//!   repeat schedules for [`Mode::window`]; jobs/s = jobs / elapsed.
//! - **firing lag** with the real clock ([`SystemClock`]): a poller task
//!   calls `poll_due(now, 100)` in a loop, sleeping 1 ms whenever nothing
//!   was due, and acks every lease; [`Mode::lag_jobs`] jobs are scheduled
//!   while it runs, each due a pseudo-random 50–2,000 ms after the moment
//!   it is scheduled (embedded: all in one `schedule_many`; RabbitMQ:
//!   [`Mode::concurrency`] tasks calling `schedule`). Lag = the wall-clock
//!   ms when the `poll_due` that returned a job returned, minus the job's
//!   due time. p50 / p99 / max of each repeat; the table shows their
//!   medians. The embedded queue runs with its defaults (durable polls),
//!   RabbitMQ with the crate's defaults (levels of 8 ms × 2^k).
//!
//! Repeats are interleaved (embedded, RabbitMQ, embedded, …) so drift on a
//! shared machine hits both alike. Nothing is asserted (timings are never
//! asserted, DESIGN.md).
//!
//! ```text
//! scripts/services.sh start && source .services/env
//! cargo bench -p smartmsg-rabbitmq --bench peer              # about 45 s
//! cargo bench -p smartmsg-rabbitmq --bench peer -- --quick   # about 15 s
//! scripts/services.sh stop
//! ```
//!
//! Without `SMARTMSG_RABBITMQ_URL` it prints a skip line and exits 0. The
//! RabbitMQ queues use a fresh prefix (`smbench.peer.<pid>.<ns>`) and are
//! deleted at the end. The embedded queues live in a temporary directory
//! under cargo's target directory (the real disk), or under
//! `$SMARTMSG_BENCH_DIR`, removed at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use smartmsg_embedded::EmbeddedDelayQueue;
use smartmsg_engine::{Clock, DelayQueue, Job, JobId, Scheduled, SystemClock};
use smartmsg_rabbitmq::{delete_queues, QueueNames, RabbitConfig, RabbitDelayQueue};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

const PAYLOAD: &[u8] = b"0123456789abcdef";

struct Mode {
    quick: bool,
    /// Repeats of each schedule-rate measurement.
    rate_reps: usize,
    /// Repeats of each firing-lag measurement.
    lag_reps: usize,
    /// How long one schedule-rate repeat schedules.
    window: Duration,
    /// Concurrent schedulers.
    concurrency: usize,
    /// Jobs per firing-lag repeat.
    lag_jobs: usize,
    /// Shortest and longest delay of a firing-lag job, in ms.
    lag_delay_ms: (u64, u64),
}

impl Mode {
    fn from_env() -> Self {
        let quick = std::env::args().skip(1).any(|a| a == "--quick")
            || std::env::var("SMARTMSG_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Self {
                quick,
                rate_reps: 3,
                lag_reps: 3,
                window: Duration::from_millis(300),
                concurrency: 16,
                lag_jobs: 100,
                lag_delay_ms: (50, 1_000),
            }
        } else {
            Self {
                quick,
                rate_reps: 5,
                lag_reps: 3,
                window: Duration::from_secs(1),
                concurrency: 16,
                lag_jobs: 200,
                lag_delay_ms: (50, 2_000),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// statistics and formatting

/// Median, min and max of samples.
fn stats(v: Vec<f64>) -> (f64, f64, f64) {
    smartmsg_engine::testkit::stats::median_min_max(&v)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    smartmsg_engine::testkit::stats::percentile(sorted, p).unwrap_or(0)
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

fn fmt_ms(x: f64) -> String {
    format!("{x:.0}")
}

fn cell((med, min, max): (f64, f64, f64), f: fn(f64) -> String) -> String {
    format!("{} ({} – {})", f(med), f(min), f(max))
}

fn ratio(embedded: f64, rabbit: f64) -> String {
    if rabbit > 0.0 {
        format!("{:.2}×", embedded / rabbit)
    } else {
        "n/a (RabbitMQ 0)".into()
    }
}

// ---------------------------------------------------------------------------
// helpers

fn job(id: String, due_ms: u64, payload: &'static [u8]) -> Res<Job> {
    Ok(Job {
        id: JobId::new(id)?,
        due_ms,
        payload: Bytes::from_static(payload),
    })
}

/// Cheap deterministic pseudo-random numbers (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `lo..=hi`.
    fn between(&mut self, (lo, hi): (u64, u64)) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The URL without its credentials, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn bench_root() -> Res<PathBuf> {
    if let Some(d) = std::env::var_os("SMARTMSG_BENCH_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            "the bench binary is not inside a cargo target directory; set SMARTMSG_BENCH_DIR".into()
        })
}

// ---------------------------------------------------------------------------
// durable schedule rate

/// Jobs/s of one caller scheduling one job per awaited call for `window`.
async fn single_rate(q: &dyn DelayQueue, tag: &str, window: Duration) -> Res<f64> {
    let far = SystemClock.now_ms() + 86_400_000;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < window {
        let s = q
            .schedule(job(format!("{tag}-{n}"), far + n, PAYLOAD)?)
            .await?;
        if s != Scheduled::New {
            return Err(format!("job {tag}-{n} was not new: {s:?}").into());
        }
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Jobs/s of `tasks` callers each scheduling one job per awaited call, at
/// once, for `window`.
async fn concurrent_rate(
    q: Arc<dyn DelayQueue>,
    tag: &str,
    tasks: usize,
    window: Duration,
) -> Res<f64> {
    let far = SystemClock.now_ms() + 86_400_000;
    let t0 = Instant::now();
    let deadline = t0 + window;
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let q = Arc::clone(&q);
            let tag = format!("{tag}-t{t}");
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let s = q
                        .schedule(job(format!("{tag}-{n}"), far + n, PAYLOAD)?)
                        .await?;
                    if s != Scheduled::New {
                        return Err(format!("job {tag}-{n} was not new: {s:?}").into());
                    }
                    n += 1;
                }
                Res::Ok(n)
            })
        })
        .collect();
    let mut total = 0u64;
    for h in handles {
        total += h.await??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// firing lag

/// Polls with the wall clock until `want` jobs whose id starts with `tag`
/// fired (or `limit` passed), acking every lease; returns their lags in ms.
async fn poller(
    q: Arc<dyn DelayQueue>,
    tag: String,
    want: usize,
    limit: Duration,
) -> Res<Vec<u64>> {
    let start = Instant::now();
    let mut lags = Vec::with_capacity(want);
    while lags.len() < want && start.elapsed() < limit {
        let leases = q.poll_due(SystemClock.now_ms(), 100).await?;
        let returned_ms = SystemClock.now_ms();
        if leases.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for l in &leases {
            if l.job.id.as_str().starts_with(tag.as_str()) {
                lags.push(returned_ms.saturating_sub(l.job.due_ms));
            }
        }
        for l in leases {
            q.ack(&l.token).await?;
        }
    }
    if lags.len() != want {
        return Err(format!("only {} of {want} jobs fired within {limit:?}", lags.len()).into());
    }
    Ok(lags)
}

fn lag_limit(mode: &Mode) -> Duration {
    Duration::from_millis(mode.lag_delay_ms.1 + 15_000)
}

/// Firing lags on the embedded queue: all jobs in one `schedule_many`.
async fn embedded_lag(dir: &Path, mode: &Mode, rep: usize) -> Res<Vec<u64>> {
    let q = Arc::new(EmbeddedDelayQueue::open(dir)?);
    let tag = format!("lag-e{rep}-");
    let poll = tokio::spawn(poller(
        q.clone(),
        tag.clone(),
        mode.lag_jobs,
        lag_limit(mode),
    ));
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ rep as u64);
    let now = SystemClock.now_ms();
    let jobs = (0..mode.lag_jobs)
        .map(|i| {
            job(
                format!("{tag}{i}"),
                now + rng.between(mode.lag_delay_ms),
                b"x",
            )
        })
        .collect::<Res<Vec<Job>>>()?;
    for r in q.schedule_many(jobs).await? {
        r?;
    }
    poll.await?
}

/// Firing lags on RabbitMQ: `concurrency` tasks call `schedule`, each job
/// due its delay after the moment it is scheduled.
async fn rabbit_lag(q: &Arc<RabbitDelayQueue>, mode: &Mode, rep: usize) -> Res<Vec<u64>> {
    let tag = format!("lag-r{rep}-");
    let poll = tokio::spawn(poller(
        q.clone(),
        tag.clone(),
        mode.lag_jobs,
        lag_limit(mode),
    ));
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ rep as u64);
    let delays: Vec<u64> = (0..mode.lag_jobs)
        .map(|_| rng.between(mode.lag_delay_ms))
        .collect();
    let delays = Arc::new(delays);
    let handles: Vec<_> = (0..mode.concurrency)
        .map(|t| {
            let q = Arc::clone(q);
            let delays = Arc::clone(&delays);
            let (tag, step) = (tag.clone(), mode.concurrency);
            tokio::spawn(async move {
                for i in (t..delays.len()).step_by(step) {
                    let due = SystemClock.now_ms() + delays[i];
                    q.schedule(job(format!("{tag}{i}"), due, b"x")?).await?;
                }
                Res::Ok(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    poll.await?
}

/// p50, p99 and max of one repeat's lags.
fn lag_figures(mut lags: Vec<u64>) -> [f64; 3] {
    lags.sort_unstable();
    [
        percentile(&lags, 0.5) as f64,
        percentile(&lags, 0.99) as f64,
        *lags.last().unwrap_or(&0) as f64,
    ]
}

// ---------------------------------------------------------------------------

#[derive(Default)]
struct Samples {
    emb_single: Vec<f64>,
    rmq_single: Vec<f64>,
    emb_conc: Vec<f64>,
    rmq_conc: Vec<f64>,
    /// [p50, p99, max] per repeat.
    emb_lag: Vec<[f64; 3]>,
    rmq_lag: Vec<[f64; 3]>,
}

async fn measure(
    mode: &Mode,
    dir: &Path,
    rate_q: &Arc<RabbitDelayQueue>,
    lag_q: &Arc<RabbitDelayQueue>,
) -> Res<Samples> {
    let mut s = Samples::default();

    // Warm-up (not counted): connections, page cache, allocator.
    {
        let e = EmbeddedDelayQueue::open(dir.join("warmup"))?;
        single_rate(&e, "warm-e", Duration::from_millis(100)).await?;
        single_rate(&**rate_q, "warm-r", Duration::from_millis(100)).await?;
    }

    for r in 0..mode.rate_reps {
        let e = Arc::new(EmbeddedDelayQueue::open(dir.join(format!("rate-{r}")))?);
        s.emb_single
            .push(single_rate(&*e, &format!("s{r}"), mode.window).await?);
        s.rmq_single
            .push(single_rate(&**rate_q, &format!("s{r}"), mode.window).await?);
        s.emb_conc.push(
            concurrent_rate(e.clone(), &format!("c{r}"), mode.concurrency, mode.window).await?,
        );
        s.rmq_conc.push(
            concurrent_rate(
                rate_q.clone(),
                &format!("c{r}"),
                mode.concurrency,
                mode.window,
            )
            .await?,
        );
    }

    for r in 0..mode.lag_reps {
        s.emb_lag.push(lag_figures(
            embedded_lag(&dir.join(format!("lag-{r}")), mode, r).await?,
        ));
        s.rmq_lag
            .push(lag_figures(rabbit_lag(lag_q, mode, r).await?));
    }
    Ok(s)
}

/// Closes and deletes a RabbitMQ queue's queues (by name if something still
/// holds the queue object).
async fn teardown(url: &str, q: Arc<RabbitDelayQueue>) -> Res<()> {
    let names: QueueNames = q.names().clone();
    match Arc::try_unwrap(q) {
        Ok(q) => q.destroy().await?,
        Err(q) => {
            drop(q);
            delete_queues(url, &names).await?;
        }
    }
    Ok(())
}

fn print_report(mode: &Mode, s: Samples) {
    let es = stats(s.emb_single);
    let rs = stats(s.rmq_single);
    let ec = stats(s.emb_conc);
    let rc = stats(s.rmq_conc);
    let lag = |v: &[[f64; 3]], k: usize| stats(v.iter().map(|x| x[k]).collect());
    println!("| measurement | embedded (redb) | RabbitMQ (confirms) | embedded / RabbitMQ |");
    println!("|---|---|---|---|");
    println!(
        "| durable schedule, 1 caller, 1 job per awaited call (jobs/s) | {} | {} | {} |",
        cell(es, fmt_rate),
        cell(rs, fmt_rate),
        ratio(es.0, rs.0)
    );
    println!(
        "| durable schedule, {} concurrent callers, 1 job per awaited call (jobs/s) | {} | {} | {} |",
        mode.concurrency,
        cell(ec, fmt_rate),
        cell(rc, fmt_rate),
        ratio(ec.0, rc.0)
    );
    let mut lag_ratios = Vec::new();
    for (k, name) in ["p50", "p99", "max"].iter().enumerate() {
        let (e, r) = (lag(&s.emb_lag, k), lag(&s.rmq_lag, k));
        println!(
            "| firing lag {name} (ms) | {} | {} | {} |",
            cell(e, fmt_ms),
            cell(r, fmt_ms),
            ratio(e.0, r.0)
        );
        lag_ratios.push((name, e.0, r.0));
    }
    println!(
        "\nratios embedded / RabbitMQ (medians): durable schedule rate {} with 1 caller, {} with {} \
         concurrent callers; firing lag {}",
        ratio(es.0, rs.0),
        ratio(ec.0, rc.0),
        mode.concurrency,
        lag_ratios
            .iter()
            .map(|(n, e, r)| format!("{n} {e:.0} ms vs {r:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

async fn run(url: String, mode: Mode) -> Res<()> {
    let t_run = Instant::now();
    let root = bench_root()?;
    std::fs::create_dir_all(&root)?;
    let tmp = tempfile::Builder::new()
        .prefix("smartmsg-bench-peer-")
        .tempdir_in(&root)?;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let prefix = format!("smbench.peer.{}.{nanos}", std::process::id());

    println!(
        "# embedded delay queue vs RabbitMQ{}\n\n\
         broker: {}; queue prefix: {prefix}\nembedded directory: {}\n\
         schedule rate: {} repeats of {:?} each; firing lag: {} repeats of {} jobs due \
         {}–{} ms ahead, polled every 1 ms; medians (min – max over the repeats)\n",
        if mode.quick { " (quick)" } else { "" },
        redact(&url),
        tmp.path().display(),
        mode.rate_reps,
        mode.window,
        mode.lag_reps,
        mode.lag_jobs,
        mode.lag_delay_ms.0,
        mode.lag_delay_ms.1,
    );

    let rate_q = Arc::new(
        RabbitDelayQueue::open(RabbitConfig::new(url.clone(), format!("{prefix}.rate"))).await?,
    );
    let lag_q =
        match RabbitDelayQueue::open(RabbitConfig::new(url.clone(), format!("{prefix}.lag"))).await
        {
            Ok(q) => Arc::new(q),
            Err(e) => {
                let _ = teardown(&url, rate_q).await;
                return Err(e.into());
            }
        };

    let result = measure(&mode, tmp.path(), &rate_q, &lag_q).await;
    let clean_rate = teardown(&url, rate_q).await;
    let clean_lag = teardown(&url, lag_q).await;
    let samples = result?;
    clean_rate?;
    clean_lag?;

    print_report(&mode, samples);
    println!("\nwhole run: {:.1} s", t_run.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> Res<()> {
    let url = match std::env::var("SMARTMSG_RABBITMQ_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            println!("skipping the peer benchmark: SMARTMSG_RABBITMQ_URL not set");
            return Ok(());
        }
    };
    let mode = Mode::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(url, mode))
}
