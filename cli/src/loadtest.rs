//! `smartmsg loadtest`: the HTTP service under load, on 127.0.0.1 only,
//! bounded in time.
//!
//! It starts `smartmsg serve` as a child process (this same binary) on a
//! free loopback port with a fresh data directory, or uses `--url` (which
//! must be a loopback address), defines and starts a campaign whose first
//! batch goes out at once, and then runs, each for `--seconds`:
//!
//! 1. **no-op**: `GET /health` on `--connections` keep-alive connections,
//!    the peer every other figure is compared with;
//! 2. **single**: one reaction per `POST /v1/reactions` on as many
//!    connections (each answered only once it is durable);
//! 3. **bulk + reads**: JSON Lines requests of `--bulk-size` reactions on
//!    `--bulk-connections` connections while `--readers` connections read
//!    the campaign (`GET /v1/campaigns/{id}`) in a loop.
//!
//! Latencies go into an HDR histogram per phase; the figures are medians
//! and 99th percentiles of every request completed in the phase. A request
//! that fails or is not fully accepted is counted and makes the command
//! fail. The HTTP client is reqwest (one client, so one connection, per
//! connection task, HTTP/1.1 keep-alive).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// `smartmsg loadtest` options.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// Seconds per phase.
    #[arg(long, default_value_t = 5.0, value_name = "S")]
    pub seconds: f64,
    /// Connections for the no-op and the single-reaction phases.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub connections: usize,
    /// Connections posting bulk JSON Lines requests.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub bulk_connections: usize,
    /// Reactions per bulk request.
    #[arg(long, default_value_t = 1_000, value_name = "N")]
    pub bulk_size: usize,
    /// Connections reading the campaign during the bulk phase.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub readers: usize,
    /// A server already running on this machine (`http://127.0.0.1:PORT`);
    /// default: start one with a fresh data directory.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The phases to run (profiling one of them, say).
    #[arg(long, value_delimiter = ',', default_values = ["noop", "single", "bulk"], value_name = "P,..")]
    pub phases: Vec<PhaseName>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// A phase of the load test.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseName {
    /// `GET /health` on `--connections` connections.
    Noop,
    /// One reaction per request on `--connections` connections.
    Single,
    /// Bulk JSON Lines requests with campaign reads beside them.
    Bulk,
}

/// What one phase measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    /// Its name.
    pub name: String,
    /// Requests completed.
    pub requests: u64,
    /// Requests per second.
    pub requests_per_s: f64,
    /// Reactions made durable per second (0 for reads and the no-op).
    pub reactions_per_s: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Requests that failed or were not fully accepted.
    pub errors: u64,
}

/// A server this command started, stopped (SIGTERM, then SIGKILL) on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Result<(Server, String)> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let child = Command::new(std::env::current_exe()?)
        .current_dir(dir.path())
        .args(["serve", "--data-dir", "data", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting smartmsg serve")?;
    Ok((
        Server { child, _dir: dir },
        format!("http://127.0.0.1:{port}"),
    ))
}

fn loopback_only(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let host = rest.split(['/']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    ensure!(
        matches!(host, "127.0.0.1" | "localhost" | "[::1]"),
        "--url must be a loopback address (127.0.0.1, localhost or [::1]), not {host:?}"
    );
    Ok(())
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()?)
}

async fn get(c: &reqwest::Client, url: &str) -> Result<Value> {
    let r = c.get(url).send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    ensure!(
        status.is_success(),
        "GET {url}: {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

async fn send(r: reqwest::RequestBuilder) -> Result<Value> {
    let r = r.send().await?;
    let status = r.status();
    let body = r.bytes().await?;
    ensure!(
        status.is_success(),
        "{status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Defines, fills and starts the campaign `load`; returns its first
/// batch's messages (user, creative) once sent.
async fn campaign(url: &str) -> Result<Vec<(u64, u64)>> {
    let c = client()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while c
        .get(format!("{url}/ready"))
        .send()
        .await
        .map(|r| r.status().is_success())
        .ok()
        != Some(true)
    {
        ensure!(
            Instant::now() < deadline,
            "the server at {url} is not ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let users = 40_000u32;
    let def = json!({
        "id": "load", "channel": "loadtest", "creatives": ["a", "b", "c"],
        "budget": 20_000, "batches": 2, "interval_ms": 3_600_000,
        "features": ["x", "y"], "reaction_horizon_ms": 86_400_000,
        "pipeline": {"window_ms": 1_000, "grace_ms": 1_000}
    });
    send(
        c.post(format!("{url}/v1/campaigns"))
            .header("content-type", "application/json")
            .body(def.to_string()),
    )
    .await
    .context("defining the campaign")?;
    let mut csv = String::from("user,x,y\n");
    for u in 0..users {
        csv.push_str(&format!("{u},{},{}\n", u % 10, u % 7));
    }
    send(
        c.put(format!("{url}/v1/campaigns/load/audience"))
            .header("content-type", "text/csv")
            .body(csv),
    )
    .await
    .context("uploading the audience")?;
    send(c.post(format!("{url}/v1/campaigns/load/start")))
        .await
        .context("starting the campaign")?;
    loop {
        let v = get(&c, &format!("{url}/v1/campaigns/load")).await?;
        if v["live"]["sent"].as_u64() == Some(10_000) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the first batch was not sent: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut messages = Vec::new();
    let mut offset = 0;
    while messages.len() < 10_000 {
        let page = get(
            &c,
            &format!("{url}/v1/campaigns/load/batches/0/messages?offset={offset}&limit=1000"),
        )
        .await?;
        let got = page["messages"].as_array().context("messages")?;
        ensure!(!got.is_empty(), "a short batch: {page}");
        for m in got {
            messages.push((
                m["user"].as_u64().unwrap_or(0),
                m["creative"].as_u64().unwrap_or(0),
            ));
        }
        offset += got.len();
    }
    Ok(messages)
}

/// Waits for the campaign's reaction pipeline to process everything
/// ingested; returns its backlog when the wait began and how long it took.
async fn drain(url: &str) -> Result<(u64, Duration)> {
    let c = client()?;
    let started = Instant::now();
    let mut backlog = None;
    loop {
        let v = get(&c, &format!("{url}/v1/campaigns/load")).await?;
        let lag = v["pipeline"]["lag"]
            .as_u64()
            .context("no pipeline status")?;
        let first = *backlog.get_or_insert(lag);
        if lag == 0 {
            return Ok((first, started.elapsed()));
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the pipeline did not catch up in 600 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn reaction(m: (u64, u64), kind: &str, t: u64) -> String {
    format!(
        "{{\"campaign\":\"load\",\"batch\":0,\"user\":{},\"creative\":{},\"reaction\":\"{kind}\",\"time_ms\":{t}}}",
        m.0, m.1
    )
}

/// The request a connection task sends next.
#[derive(Clone, Copy)]
enum Kind {
    Noop,
    Single,
    Bulk(usize),
    Read,
}

struct Done {
    requests: u64,
    reactions: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Histogram<u64>,
}

async fn connection(
    url: String,
    kind: Kind,
    messages: Arc<Vec<(u64, u64)>>,
    stride: usize,
    start_at: usize,
    until: Instant,
) -> Result<Done> {
    let c = client()?;
    let mut d = Done {
        requests: 0,
        reactions: 0,
        errors: 0,
        first_error: None,
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    let mut i = start_at;
    const KINDS: [&str; 3] = ["delivered", "opened", "clicked"];
    while Instant::now() < until {
        let (req, n) = match kind {
            Kind::Noop => (c.get(format!("{url}/health")), 0),
            Kind::Read => (c.get(format!("{url}/v1/campaigns/load")), 0),
            Kind::Single => {
                let m = messages[i % messages.len()];
                let k = KINDS[(i / messages.len()) % 3];
                i += stride;
                (
                    c.post(format!("{url}/v1/reactions"))
                        .header("content-type", "application/json")
                        .body(reaction(m, k, now_ms())),
                    1,
                )
            }
            Kind::Bulk(size) => {
                let t = now_ms();
                let mut body = String::with_capacity(size * 110);
                for _ in 0..size {
                    let m = messages[i % messages.len()];
                    body.push_str(&reaction(m, KINDS[(i / messages.len()) % 3], t));
                    body.push('\n');
                    i += 1;
                }
                (
                    c.post(format!("{url}/v1/reactions"))
                        .header("content-type", "application/x-ndjson")
                        .body(body),
                    size as u64,
                )
            }
        };
        let started = Instant::now();
        let outcome = async {
            let r = req.send().await?;
            let status = r.status();
            let body = r.bytes().await?;
            ensure!(
                status.is_success(),
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
            if n > 0 {
                let v: Value = serde_json::from_slice(&body)?;
                ensure!(v["accepted"].as_u64() == Some(n), "not all accepted: {v}");
            }
            Ok(())
        }
        .await;
        let took = started.elapsed();
        match outcome {
            Ok(()) => {
                d.requests += 1;
                d.reactions += n;
                d.hist.saturating_record(took.as_micros().max(1) as u64);
            }
            Err(e) => {
                d.errors += 1;
                d.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Ok(d)
}

fn summarise(name: &str, dones: Vec<Done>, secs: f64) -> Result<Phase> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut reactions, mut errors) = (0, 0, 0);
    let mut first = None;
    for d in dones {
        hist.add(&d.hist)?;
        requests += d.requests;
        reactions += d.reactions;
        errors += d.errors;
        first = first.or(d.first_error);
    }
    if let Some(e) = first {
        eprintln!("{name}: {errors} failed requests, the first: {e}");
    }
    Ok(Phase {
        name: name.into(),
        requests,
        requests_per_s: requests as f64 / secs,
        reactions_per_s: reactions as f64 / secs,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
    })
}

async fn phase(
    url: &str,
    groups: &[(Kind, usize)],
    messages: &Arc<Vec<(u64, u64)>>,
    secs: f64,
) -> Result<Vec<Vec<Done>>> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (g, &(kind, n)) in groups.iter().enumerate() {
        for k in 0..n {
            // Connections walk the batch in disjoint strides.
            let start = k * 1_000 + g * 500_000;
            tasks.push((
                g,
                tokio::spawn(connection(
                    url.to_owned(),
                    kind,
                    messages.clone(),
                    n,
                    start,
                    until,
                )),
            ));
        }
    }
    let mut out: Vec<Vec<Done>> = groups.iter().map(|_| Vec::new()).collect();
    for (g, t) in tasks {
        out[g].push(t.await??);
    }
    Ok(out)
}

fn render(args: &LoadtestArgs, phases: &[Phase]) -> String {
    let mut s = format!(
        "smartmsg loadtest: 127.0.0.1, {} s per phase, {} connections ({} bulk of {} + {} readers), {} CPUs\n\n",
        args.seconds,
        args.connections,
        args.bulk_connections,
        args.bulk_size,
        args.readers,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    s.push_str(&format!(
        "{:<40} {:>12} {:>14} {:>9} {:>9} {:>7}\n",
        "phase", "requests/s", "reactions/s", "p50 ms", "p99 ms", "errors"
    ));
    for p in phases {
        s.push_str(&format!(
            "{:<40} {:>12.0} {:>14.0} {:>9.2} {:>9.2} {:>7}\n",
            p.name, p.requests_per_s, p.reactions_per_s, p.p50_ms, p.p99_ms, p.errors
        ));
    }
    if let [noop, single, bulk, reads] = phases {
        s.push_str(&format!(
            "\nsingle-reaction POSTs: {:.2} x the no-op rate (target >= 0.5), p99 {:.2} ms (target <= 20)\n",
            single.requests_per_s / noop.requests_per_s.max(1e-9),
            single.p99_ms
        ));
        s.push_str(&format!(
            "bulk ingest: {:.0} reactions/s durable (target >= 200,000)\n",
            bulk.reactions_per_s
        ));
        s.push_str(&format!(
            "campaign reads during bulk ingest: p99 {:.2} ms (target <= 5)\n",
            reads.p99_ms
        ));
    }
    s
}

/// Runs the load test; fails if any request failed.
pub fn run(args: LoadtestArgs) -> Result<std::process::ExitCode> {
    ensure!(
        args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    ensure!(
        args.connections > 0 && args.connections <= 1_024,
        "--connections must be in 1..=1024"
    );
    ensure!(
        args.bulk_size > 0 && args.bulk_size <= 20_000,
        "--bulk-size must be in 1..=20000"
    );
    let (server, url) = match &args.url {
        Some(u) => {
            loopback_only(u)?;
            (None, u.trim_end_matches('/').to_owned())
        }
        None => {
            let (s, u) = start_server()?;
            (Some(s), u)
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let phases = rt.block_on(async {
        let messages = Arc::new(campaign(&url).await?);
        let secs = args.seconds;
        // Warm the connections and the server's caches.
        phase(
            &url,
            &[(Kind::Noop, args.connections)],
            &messages,
            0.5_f64.min(secs),
        )
        .await?;
        let mut phases = Vec::new();
        let mut drains = Vec::new();
        if args.phases.contains(&PhaseName::Noop) {
            let noop = phase(&url, &[(Kind::Noop, args.connections)], &messages, secs).await?;
            phases.push(summarise(
                "no-op (GET /health)",
                noop.into_iter().flatten().collect(),
                secs,
            )?);
        }
        if args.phases.contains(&PhaseName::Single) {
            let single = phase(&url, &[(Kind::Single, args.connections)], &messages, secs).await?;
            phases.push(summarise(
                "single reaction (POST /v1/reactions)",
                single.into_iter().flatten().collect(),
                secs,
            )?);
            drains.push(("single", drain(&url).await?));
        }
        if args.phases.contains(&PhaseName::Bulk) {
            let mut mixed = phase(
                &url,
                &[
                    (Kind::Bulk(args.bulk_size), args.bulk_connections),
                    (Kind::Read, args.readers),
                ],
                &messages,
                secs,
            )
            .await?;
            let reads = mixed.pop().unwrap_or_default();
            let bulk = mixed.pop().unwrap_or_default();
            phases.push(summarise(
                &format!("bulk, {} reactions per request", args.bulk_size),
                bulk,
                secs,
            )?);
            phases.push(summarise("campaign reads during bulk", reads, secs)?);
            drains.push(("bulk", drain(&url).await?));
        }
        anyhow::Ok((phases, drains))
    })?;
    let (phases, drains) = phases;
    drop(server);
    let mut text = render(&args, &phases);
    for (name, (backlog, took)) in &drains {
        text.push_str(&format!(
            "after the {name} phase the reaction pipeline had {backlog} events to process; it caught up in {:.2} s\n",
            took.as_secs_f64()
        ));
        if *name == "bulk" {
            if let Some(bulk) = phases.iter().find(|p| p.name.starts_with("bulk")) {
                text.push_str(&format!(
                    "bulk, ingested and processed: {:.0} reactions/s (the phase's reactions over the phase plus the catch-up)\n",
                    bulk.reactions_per_s * args.seconds / (args.seconds + took.as_secs_f64())
                ));
            }
        }
    }
    print!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&phases)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let errors: u64 = phases.iter().map(|p| p.errors).sum();
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_taken() {
        assert!(loopback_only("http://127.0.0.1:8080").is_ok());
        assert!(loopback_only("http://localhost:8080/").is_ok());
        assert!(loopback_only("http://[::1]:8080").is_ok());
        assert!(loopback_only("http://10.0.0.1:8080").is_err());
        assert!(loopback_only("http://example.com").is_err());
        assert!(loopback_only("https://127.0.0.1:8080").is_err());
    }
}
