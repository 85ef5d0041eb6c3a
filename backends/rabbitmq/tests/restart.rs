//! RabbitMQ restarts (`rabbitmqctl stop_app` / `start_app`) and crashes
//! (the Erlang VM halted at once, then started again by
//! `scripts/services.sh start`) while jobs are pending in the delay levels:
//! every job still fires, and the queue object reconnects by itself. A test
//! binary of its own, so no other test of this crate runs while the broker
//! is down; its two tests take turns.
//!
//! Needs `rabbitmqctl` (`/usr/lib/rabbitmq/bin/rabbitmqctl`, or
//! `SMARTMSG_RABBITMQCTL`) and the `HOME` holding the node's Erlang cookie
//! (`.services/rabbitmq` of the repository, as `scripts/services.sh` runs
//! it, or `SMARTMSG_RABBITMQ_HOME`); skipped with a printed reason without
//! them.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{collect, config, job, url, wall_ms, Rng};
use smartmsg_engine::DelayQueue;
use smartmsg_rabbitmq::RabbitDelayQueue;

struct Ctl {
    bin: PathBuf,
    home: PathBuf,
}

impl Ctl {
    fn find() -> Result<Self, String> {
        let bin = std::env::var_os("SMARTMSG_RABBITMQCTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/usr/lib/rabbitmq/bin/rabbitmqctl".into());
        if !bin.exists() {
            return Err(format!("{} not found", bin.display()));
        }
        let home = std::env::var_os("SMARTMSG_RABBITMQ_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.services/rabbitmq")
            });
        if !home.join(".erlang.cookie").exists() {
            return Err(format!("no Erlang cookie in {}", home.display()));
        }
        let ctl = Self { bin, home };
        ctl.run(&["status"])?;
        Ok(ctl)
    }

    /// The broker's dead-letter retry interval in ms: a job that expires
    /// while the broker boots waits that long (see `docs/deployment.md`).
    fn dlx_retry_ms(&self) -> String {
        self.output(&[
            "eval",
            "application:get_env(rabbit, dead_letter_worker_publisher_confirm_timeout).",
        ])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
    }

    fn run(&self, args: &[&str]) -> Result<(), String> {
        self.output(args).map(|_| ())
    }

    fn output(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-n")
            .arg("rabbit@localhost")
            .args(args)
            .env("HOME", &self.home)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(&self.home)
            .output()
            .map_err(|e| format!("running rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

/// Starts the app again if the test stops half way.
struct Restart<'a>(&'a Ctl, bool);

impl Drop for Restart<'_> {
    fn drop(&mut self) {
        if self.1 {
            let _ = self.0.run(&["start_app"]);
            let _ = self.0.run(&["await_startup"]);
        }
    }
}

/// The two tests of this binary take turns: each takes the broker down.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the whole server again (after a crash) if the test stops half
/// way.
struct Revive(Option<PathBuf>);

impl Revive {
    fn start(script: &PathBuf) -> Result<(), String> {
        let out = Command::new(script)
            .arg("start")
            .env("SMARTMSG_RABBITMQ_KEEP_STATE", "1")
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} start failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

impl Drop for Revive {
    fn drop(&mut self) {
        if let Some(script) = self.0.take() {
            let _ = Self::start(&script);
        }
    }
}

/// A broker crash while 150 jobs wait in the delay levels (due 1 to 12 s
/// out): the levels are quorum queues with at-least-once dead-lettering and
/// every other message is persistent and confirmed, so every job fires
/// after the broker is back (some may fire twice; none is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_fires_across_a_broker_crash() {
    let Some(url) = url() else { return };
    let _turn = TURN.lock().await;
    let ctl = match Ctl::find() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipping: cannot crash RabbitMQ here: {why}");
            return;
        }
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/services.sh");
    if !script.exists() {
        eprintln!(
            "skipping: {} is needed to start the broker again",
            script.display()
        );
        return;
    }
    let q = RabbitDelayQueue::open(config(&url, "crash")).await.unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);
    let t0 = wall_ms();
    let mut rng = Rng(4242);
    let n = 150;
    let mut due = HashMap::new();
    for i in 0..n {
        let d = 1_000 + rng.below(11_000);
        let id = format!("c{i}");
        q.schedule(job(&id, t0 + d, "x")).await.unwrap();
        due.insert(id, t0 + d);
    }
    let mut fired = collect(
        &q,
        n,
        Duration::from_millis(5),
        Duration::from_millis(1_800),
    )
    .await;
    eprintln!("{} jobs fired before the crash", fired.len());

    let mut revive = Revive(Some(script.clone()));
    // Halt the VM at once: no graceful shutdown, whatever is in flight.
    let _ = tokio::task::block_in_place(|| ctl.run(&["eval", "erlang:halt(137)."]));
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| Revive::start(&script)).unwrap();
    revive.0 = None;
    eprintln!("broker crashed and back after {:?}", down.elapsed());

    let back = Instant::now();
    while !q.is_connected() {
        assert!(back.elapsed() < Duration::from_secs(150), "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "queue reconnected {:?} after the broker was back",
        back.elapsed()
    );
    let rest = collect(
        &q,
        n - fired.len(),
        Duration::from_millis(5),
        Duration::from_secs(60),
    )
    .await;
    fired.extend(rest);
    let mut count: HashMap<String, u32> = HashMap::new();
    for f in &fired {
        *count.entry(f.lease.job.id.to_string()).or_default() += 1;
    }
    let lost: Vec<_> = due.keys().filter(|id| !count.contains_key(*id)).collect();
    assert!(
        lost.is_empty(),
        "lost across the crash: {lost:?} (the broker's dead-letter retry: {})",
        ctl.dlx_retry_ms()
    );
    let twice = count.values().filter(|c| **c > 1).count();
    eprintln!(
        "all {n} jobs fired after the crash ({} deliveries, {twice} jobs twice)",
        fired.len()
    );
    q.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_fires_across_a_broker_restart() {
    let Some(url) = url() else { return };
    let _turn = TURN.lock().await;
    let ctl = match Ctl::find() {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipping: cannot restart RabbitMQ here: {why}");
            return;
        }
    };
    let q = RabbitDelayQueue::open(config(&url, "restart"))
        .await
        .unwrap();
    let _cleanup = common::Cleanup::new(&url, &q);

    // One job leased and not acked when the broker goes down.
    let t0 = wall_ms();
    q.schedule(job("leased", t0, "l")).await.unwrap();
    let leased = q.poll_due(wall_ms(), 1).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].attempt, 1);

    // 40 jobs due over the next 0.5 to 20 s: some fire before the stop,
    // most are in the levels (or due) while the broker is down.
    let mut rng = Rng(99);
    let n = 40;
    let mut due = HashMap::new();
    for i in 0..n {
        let d = 500 + rng.below(19_500);
        let id = format!("r{i}");
        q.schedule(job(&id, t0 + d, "x")).await.unwrap();
        due.insert(id, t0 + d);
    }
    let mut fired = collect(&q, n, Duration::from_millis(5), Duration::from_millis(1500)).await;
    eprintln!("{} jobs fired before the restart", fired.len());

    let mut guard = Restart(&ctl, true);
    let stop = Instant::now();
    tokio::task::block_in_place(|| ctl.run(&["stop_app"])).unwrap();
    eprintln!("broker stopped ({:?})", stop.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !q.is_connected(),
        "the queue did not notice the broker stop"
    );
    assert!(q.poll_due(wall_ms(), 10).await.is_err());
    tokio::task::block_in_place(|| {
        ctl.run(&["start_app"])?;
        ctl.run(&["await_startup"])
    })
    .unwrap();
    guard.1 = false;
    let down_ms = stop.elapsed().as_millis();
    eprintln!("broker back after {down_ms} ms");

    // The queue reconnects by itself.
    let back = Instant::now();
    while !q.is_connected() {
        assert!(back.elapsed() < Duration::from_secs(60), "no reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "queue reconnected {:?} after the broker was back",
        back.elapsed()
    );

    // A job scheduled after the restart fires too.
    let t1 = wall_ms();
    q.schedule(job("after", t1 + 1_000, "a")).await.unwrap();
    due.insert("after".into(), t1 + 1_000);

    let rest = collect(
        &q,
        n + 2 - fired.len(),
        Duration::from_millis(5),
        Duration::from_secs(60),
    )
    .await;
    fired.extend(rest);
    let mut count: HashMap<String, u32> = HashMap::new();
    for f in &fired {
        *count.entry(f.lease.job.id.to_string()).or_default() += 1;
    }
    for id in due.keys() {
        assert!(
            count.contains_key(id),
            "job {id} never fired (the broker's dead-letter retry: {})",
            ctl.dlx_retry_ms()
        );
    }
    // The lease lost with the broker's connection comes back, and the lost
    // delivery counts: attempt 2.
    let again = fired
        .iter()
        .find(|f| f.lease.job.id.as_str() == "leased")
        .expect("the job leased at the stop fired again");
    assert_eq!(again.lease.attempt, 2);
    // Acking the lost lease afterwards is harmless.
    let _ = q.ack(&leased[0].token).await;
    let late: Vec<i64> = fired
        .iter()
        .filter(|f| f.lease.job.id.as_str() == "after")
        .map(|f| f.at_ms as i64 - due["after"] as i64)
        .collect();
    eprintln!(
        "all {} jobs fired ({} deliveries); the job scheduled after the restart was {late:?} ms late",
        due.len() + 1,
        fired.len()
    );
    assert_eq!(q.len().await.unwrap(), 0);
    q.destroy().await.unwrap();
}
