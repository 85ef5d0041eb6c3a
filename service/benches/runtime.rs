//! Runtime benchmarks (`cargo bench -p smartmsg-service --bench runtime`):
//!
//! (a) a 100,000-message batch at 300,000 users × 8 features, from its job
//!     coming due to the outbox file written and the batch recorded as
//!     sent (`Runtime::step`), for the first batch (uniform) and the
//!     second (the integrated model, 100 posterior draws for the
//!     propensities); the peer is the same plan by the bare policy plus the
//!     same outbox write, in this process;
//! (b) resume: opening a runtime on a campaign whose log holds 1,000,000
//!     events (reactions, pipeline outputs), until it can step again.
//!
//! Medians of `REPEATS` runs (fresh directories); `--quick` runs once.

use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use smartmsg_domain::{
    BatchSchedule, BatchSizing, CampaignSpec, Candidates, ModelConfig, OutgoingBatch, PolicySpec,
};
use smartmsg_engine::ManualClock;
use smartmsg_service::{
    embedded_ports, CampaignSetup, OutboxSender, Runtime, RuntimeOptions, Sender,
};

const START: u64 = 1_700_000_000_000;
const DAY: u64 = 86_400_000;

fn audience(n: u32, dim: usize, seed: u64) -> Candidates {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut c = Candidates::with_capacity(dim, n as usize).unwrap();
    let mut x = vec![0f32; dim];
    for u in 0..n {
        for v in &mut x {
            *v = rng.random_range(-1.5..1.5);
        }
        c.push(u, &x).unwrap();
    }
    c
}

fn spec(budget: u64, batches: u32) -> CampaignSpec {
    CampaignSpec {
        channel: "bench".into(),
        audience: "bench".into(),
        creatives: (0..4).map(|c| format!("creative-{c}")).collect(),
        budget,
        schedule: BatchSchedule {
            start_ms: START,
            interval_ms: DAY,
            sizing: BatchSizing::Count(batches),
        },
    }
}

fn model() -> ModelConfig {
    {
        let mut v = ModelConfig::default();
        v.random_first_batch = true;
        v
    }
}

/// Reactions of every tenth user of `b`, an hour after it was sent.
fn reactions(b: &OutgoingBatch, sent: u64) -> Vec<bytes::Bytes> {
    b.decisions
        .users
        .iter()
        .zip(&b.decisions.creatives)
        .filter(|(u, _)| *u % 10 == 0)
        .map(|(u, c)| {
            format!(
                r#"{{"campaign":"{}","batch":{},"user":{u},"creative":{c},"reaction":"clicked","time_ms":{}}}"#,
                b.campaign,
                b.batch,
                sent + 3_600_000
            )
            .into()
        })
        .collect()
}

/// An outbox that notes when each batch was handed over.
struct Timed(OutboxSender, std::sync::Mutex<Vec<Instant>>);

#[async_trait::async_trait]
impl Sender for Timed {
    fn name(&self) -> &str {
        "timed-outbox"
    }
    async fn send(&self, b: &OutgoingBatch) -> Result<(), smartmsg_service::SendError> {
        self.0.send(b).await?;
        self.1.lock().unwrap().push(Instant::now());
        Ok(())
    }
}

/// (a): seconds from each batch's job coming due to its outbox file
/// written, for the first and the second batch; the same by the peer (bare
/// plan + outbox write); and the second batch's whole step (feedback,
/// planning, sending, then the pipeline learning the batch's users).
async fn big_batch() -> (f64, f64, f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let outbox = Arc::new(Timed(
        OutboxSender::new(dir.path().join("outbox")),
        Default::default(),
    ));
    let ports = embedded_ports(
        &dir.path().join("data"),
        Default::default(),
        Arc::new(clock.clone()),
        outbox.clone(),
    )
    .unwrap();
    let mut rt = Runtime::open(ports, RuntimeOptions::default())
        .await
        .unwrap();
    let aud = audience(300_000, 8, 1);
    let mut setup = CampaignSetup::new(
        "big",
        spec(200_000, 2),
        aud.clone(),
        PolicySpec::Integrated { model: model() },
    );
    setup.seed = 5;
    rt.create_campaign(setup).await.unwrap();
    rt.start("big").await.unwrap();
    let t = Instant::now();
    rt.step(START).await.unwrap();
    let first = (outbox.1.lock().unwrap()[0] - t).as_secs_f64();
    let b0 = rt.driver("big").unwrap().outgoing(0).unwrap();
    assert_eq!(b0.len(), 100_000);
    let rs = reactions(&b0, START);
    rt.inbox().submit_many(rs).await.unwrap();
    clock.set(START + DAY);
    let t = Instant::now();
    rt.step(START + DAY).await.unwrap();
    let whole = t.elapsed().as_secs_f64();
    let second = (outbox.1.lock().unwrap()[1] - t).as_secs_f64();
    let v = rt.view("big").unwrap();
    assert_eq!(v.sent, 200_000, "{v:?}");

    // The peer: the same plans by the bare policies, and the same outbox
    // writes.
    use smartmsg_domain::PlanContext;
    let peer_outbox = OutboxSender::new(dir.path().join("peer"));
    let driver = rt.driver("big").unwrap();
    let mut p = PolicySpec::Integrated { model: model() }
        .build(4, 8, 100_000)
        .unwrap();
    let ctx0 = PlanContext::fresh(4, 2, 200_000);
    let t = Instant::now();
    let d0 = p
        .plan(&ctx0, &aud, 100_000, &mut driver.plan_rng(0))
        .unwrap();
    peer_outbox
        .send(&OutgoingBatch {
            decisions: d0,
            ..b0.clone()
        })
        .await
        .unwrap();
    let peer_first = t.elapsed().as_secs_f64();
    // The model after batch 0's feedback, as the runtime had it.
    let mut o = smartmsg_domain::Outcomes::new(8).unwrap();
    for (u, c, _) in b0.decisions.iter() {
        o.push(c, aud.row(u as usize), 1, u32::from(u % 10 == 0))
            .unwrap();
    }
    p.update(&o).unwrap();
    let mut rest = aud.clone();
    rest.retain_unmessaged(driver.campaign().messaged());
    let ctx1 = PlanContext {
        batch: 1,
        remaining_budget: 100_000,
        planned_per_creative: vec![25_000; 4],
        ..ctx0
    };
    let t = Instant::now();
    let d1 = p
        .plan(&ctx1, &rest, 100_000, &mut driver.plan_rng(1))
        .unwrap();
    peer_outbox
        .send(&OutgoingBatch {
            decisions: d1,
            batch: 1,
            ..b0
        })
        .await
        .unwrap();
    let peer_second = t.elapsed().as_secs_f64();
    (first, second, peer_first, peer_second, whole)
}

/// (b): a campaign with about 1,000,000 events in its log; seconds to
/// open the runtime on it and take one step.
async fn resume(dir: &std::path::Path) -> (u64, f64, f64) {
    let clock = ManualClock::new(START);
    let sender: Arc<dyn Sender> = Arc::new(OutboxSender::new(dir.join("outbox")));
    let open = |clock: &ManualClock| {
        embedded_ports(
            &dir.join("data"),
            Default::default(),
            Arc::new(clock.clone()),
            sender.clone(),
        )
        .unwrap()
    };
    let mut rt = Runtime::open(open(&clock), RuntimeOptions::default())
        .await
        .unwrap();
    let aud = audience(100_000, 8, 2);
    let setup = CampaignSetup::new(
        "long",
        spec(100_000, 10),
        aud,
        PolicySpec::Integrated { model: model() },
    );
    rt.create_campaign(setup).await.unwrap();
    rt.start("long").await.unwrap();
    // Ten batches; every user of each reacts nine times (repeats, opens,
    // clicks): about 900,000 reactions in the log, plus the pipeline's
    // outputs and the campaign.
    for b in 0..10u32 {
        let now = START + u64::from(b) * DAY;
        clock.set(now);
        rt.step(now).await.unwrap();
        let out = rt.driver("long").unwrap().outgoing(b).unwrap();
        let mut all = Vec::new();
        for (u, c, _) in out.decisions.iter() {
            for (i, kind) in [
                "delivered",
                "opened",
                "clicked",
                "clicked",
                "replied",
                "opened",
                "clicked",
                "opened",
                "replied",
            ]
            .iter()
            .enumerate()
            {
                all.push(bytes::Bytes::from(format!(
                    r#"{{"campaign":"long","batch":{b},"user":{u},"creative":{c},"reaction":"{kind}","time_ms":{}}}"#,
                    now + 60_000 * (i as u64 + 1)
                )));
            }
        }
        rt.inbox().submit_many(all).await.unwrap();
    }
    let end = START + 10 * DAY;
    clock.set(end);
    rt.step(end).await.unwrap();
    let head = rt.ports().log.head().await.unwrap();
    drop(rt);
    let mut opens = Vec::new();
    let mut steps = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut rt = Runtime::open(open(&clock), RuntimeOptions::default())
            .await
            .unwrap();
        opens.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        rt.step(end).await.unwrap();
        steps.push(t.elapsed().as_secs_f64());
    }
    (
        head,
        smartmsg_engine::testkit::stats::median(&opens),
        smartmsg_engine::testkit::stats::median(&steps),
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let repeats = if quick { 1 } else { 3 };
    let mut runs = Vec::new();
    for _ in 0..repeats {
        runs.push(big_batch().await);
    }
    let col = |f: fn(&(f64, f64, f64, f64, f64)) -> f64| {
        smartmsg_engine::testkit::stats::median(&runs.iter().map(f).collect::<Vec<_>>())
    };
    let (a, b, pa, pb, w) = (
        col(|r| r.0),
        col(|r| r.1),
        col(|r| r.2),
        col(|r| r.3),
        col(|r| r.4),
    );
    println!("(a) 100,000-message batch at 300,000 users x 8 features, job due -> outbox file written (median of {repeats}):");
    println!("    batch 0 (uniform first batch): runtime {a:.3} s; bare plan + outbox write {pa:.3} s; ratio {:.2}", a / pa);
    println!("    batch 1 (integrated, 100 draws, after feedback): runtime {b:.3} s; bare plan + outbox write {pb:.3} s; ratio {:.2}", b / pb);
    println!("    batch 1's whole step (then the pipeline learns its 100,000 users): {w:.3} s");
    if std::env::args().any(|a| a == "--batch-only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (events, open, step) = resume(dir.path()).await;
    println!("(b) resume: {events} events in the log; open {open:.3} s, first step {step:.3} s (median of 3 reopens)");
}
