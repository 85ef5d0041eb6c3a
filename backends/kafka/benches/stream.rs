//! # Stream processing throughput: Kafka vs embedded
//!
//! The domain's reaction pipeline (`reaction_topology`: parse and validate
//! with dead letters, join with the campaign and user tables, count each
//! user once, one-minute windows with grace) on the same input records,
//! in one process, against the broker at `SMARTMSG_KAFKA_BOOTSTRAP`
//! (skipped with a message when unset):
//!
//! - **Kafka**: `KafkaStreamProcessor` over topics, one Kafka transaction
//!   per step of up to `B` input records (outputs, changelog records and
//!   the consumer group's offsets), `read_committed` consumer group.
//! - **embedded**: the engine's `StreamRunner` reading the records from an
//!   `EmbeddedLog`, committing every `B` records to a `RedbStore` (state,
//!   outbox and checkpoint in one durable redb transaction) and appending
//!   the outputs to a second `EmbeddedLog` (durable, idempotency keys), in
//!   cargo's target tmp dir.
//!
//! Inputs: 3 campaigns and 5,000 user profiles (the tables), then 50,000
//! reaction messages (5,000 with `--quick`) with their arrival times as
//! timestamps: about 10 minutes of reactions, 88 % valid, 6 % repeats, 6 %
//! dead letters. Everything is written before the timed region: to topics
//! once (every round reads them with a fresh application and consumer
//! group), to a fresh input log per embedded round.
//!
//! Each round first feeds the tables and processes them (untimed; on Kafka
//! a processor with the tables' topics as inputs; the reaction processor
//! of the same application then restores them from the changelog topic
//! when it opens), then processes the reactions. The first step of the
//! reactions is untimed too (on Kafka it includes joining the consumer
//! group, seconds on tansu); records/s count the reaction records of the
//! remaining steps over their time. Rounds interleave the four
//! configurations; figures are medians of 3 rounds (min–max). Nothing is
//! asserted.
//!
//! ```text
//! cargo bench -p smartmsg-kafka --bench stream             # 70 s (plus build)
//! cargo bench -p smartmsg-kafka --bench stream -- --quick  # fewer records, 1 round
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_domain::reactions::{
    reaction_topology, CampaignInfo, ReactionConfig, ReactionKind, ReactionMessage, UserProfile,
    DEAD_LETTERS, INPUT_CAMPAIGNS, INPUT_PROFILES, INPUT_REACTIONS, LATE_REACTIONS,
    REACTION_WINDOWS, USER_OUTCOMES,
};
use smartmsg_embedded::{EmbeddedConfig, EmbeddedLog, RedbStore};
use smartmsg_engine::stream::{
    envelope, EventLogSink, EventLogSource, Json, KeyValueStore, RunnerConfig, StateCodec,
    StreamRunner, Topology,
};
use smartmsg_engine::{AppendTx, EventLog, ExpectedVersion, NewEvent, StreamId};
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

const DIM: usize = 3;
const USERS: u32 = 5_000;
const BATCHES: [usize; 2] = [500, 5_000];
const T0: u64 = 1_700_000_040_000;

/// One input record: topology input, key, value, timestamp.
#[derive(Clone)]
struct In {
    input: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
    ts: u64,
}

fn topology() -> Topology {
    reaction_topology(ReactionConfig::new(DIM)).expect("valid windows")
}

fn campaigns() -> Vec<(String, CampaignInfo)> {
    (0..3)
        .map(|i| {
            (
                format!("camp-{i}"),
                CampaignInfo {
                    start_ms: T0,
                    end_ms: T0 + 3_600_000,
                    creatives: 4,
                    batches: 10,
                },
            )
        })
        .collect()
}

fn tables(rng: &mut ChaCha8Rng) -> Vec<In> {
    let mut v: Vec<In> = campaigns()
        .into_iter()
        .map(|(id, info)| In {
            input: INPUT_CAMPAIGNS,
            key: id.to_bytes(),
            value: Json(info).to_bytes(),
            ts: T0 - 60_000,
        })
        .collect();
    for user in 0..USERS {
        let features = (0..DIM).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        v.push(In {
            input: INPUT_PROFILES,
            key: Vec::new(),
            value: serde_json::to_vec(&UserProfile {
                user,
                features,
                batch: None,
                creative: None,
            })
            .expect("json"),
            ts: T0 - 60_000,
        });
    }
    v
}

/// `n` reaction messages in arrival order; the last one (unparsable)
/// arrives ten minutes later and closes every window.
fn reactions(rng: &mut ChaCha8Rng, n: usize) -> Vec<In> {
    let camps = campaigns();
    let kinds = [
        ReactionKind::Delivered,
        ReactionKind::Delivered,
        ReactionKind::Opened,
        ReactionKind::Clicked,
        ReactionKind::Replied,
    ];
    let mut now = T0 + 1_000;
    let span = 10 * 60_000 / n as u64 * 2;
    let mut sent: Vec<Vec<u8>> = Vec::new();
    let mut v = Vec::with_capacity(n);
    while v.len() + 1 < n {
        now += rng.random_range(0..=span);
        let (campaign, _) = &camps[rng.random_range(0..camps.len())];
        let m = ReactionMessage {
            campaign: campaign.clone(),
            batch: rng.random_range(0..10),
            user: rng.random_range(0..USERS + 50),
            creative: rng.random_range(0..4),
            reaction: kinds[rng.random_range(0..kinds.len())],
            time_ms: now.saturating_sub(rng.random_range(0..5_000)),
        };
        let value = match rng.random_range(0..100u32) {
            0..=87 => {
                let b = serde_json::to_vec(&m).expect("json");
                sent.push(b.clone());
                b
            }
            88..=93 if !sent.is_empty() => sent[rng.random_range(0..sent.len())].clone(),
            94..=96 => b"{\"campaign\":".to_vec(),
            _ => serde_json::to_vec(&ReactionMessage {
                campaign: "camp-unknown".into(),
                ..m
            })
            .expect("json"),
        };
        v.push(In {
            input: INPUT_REACTIONS,
            key: Vec::new(),
            value,
            ts: now,
        });
    }
    v.push(In {
        input: INPUT_REACTIONS,
        key: Vec::new(),
        value: b"tick".to_vec(),
        ts: now + 10 * 60_000,
    });
    v
}

fn unique(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "bench-{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ------------------------------------------------------------------ Kafka

struct Topics {
    campaigns: String,
    profiles: String,
    reactions: String,
    prefix: String,
}

fn produce(bootstrap: &str, topic: &str, records: &[In]) -> Result<()> {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    for r in records {
        let mut rec = BaseRecord::<[u8], [u8]>::to(topic)
            .payload(r.value.as_slice())
            .partition(0)
            .timestamp(r.ts as i64);
        if !r.key.is_empty() {
            rec = rec.key(r.key.as_slice());
        }
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    p.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    p.flush(Duration::from_secs(60))?;
    Ok(())
}

fn step_until(p: &mut KafkaStreamProcessor, n: usize) -> Result<usize> {
    let mut done = 0;
    let start = Instant::now();
    while done < n {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "only {done} of {n} records processed"
        );
        done += p.step(Duration::from_secs(2))?.records;
    }
    Ok(done)
}

/// One Kafka round: (records/s, timed records, timed steps).
fn kafka_round(
    rt: &tokio::runtime::Runtime,
    bootstrap: &str,
    t: &Topics,
    n_tables: usize,
    n_reactions: usize,
    batch: usize,
) -> Result<(f64, usize, usize)> {
    let app = unique("stream");
    let tables_cfg = ProcessorConfig::new(bootstrap, &app)
        .with_group(format!("{app}.tables"))
        .with_input(&t.campaigns, INPUT_CAMPAIGNS)
        .with_input(&t.profiles, INPUT_PROFILES)
        .with_output_prefix(&t.prefix)
        .with_batch(5_000);
    let mut p = rt.block_on(KafkaStreamProcessor::open(topology(), tables_cfg))?;
    ensure!(step_until(&mut p, n_tables)? == n_tables);
    drop(p);

    let cfg = ProcessorConfig::new(bootstrap, &app)
        .with_group(format!("{app}.reactions"))
        .with_input(&t.reactions, INPUT_REACTIONS)
        .with_output_prefix(&t.prefix)
        .with_batch(batch);
    let mut p = rt.block_on(KafkaStreamProcessor::open(topology(), cfg))?;
    ensure!(p.restored().records > 0, "tables not restored");
    // The first step joins the group: untimed.
    let first = step_until(&mut p, 1)?;
    let started = Instant::now();
    let mut steps = 0;
    let timed = step_until_counting(&mut p, n_reactions - first, &mut steps)?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(p.run_until_idle(Duration::from_millis(500))?.records == 0);
    Ok((timed as f64 / secs, timed, steps))
}

fn step_until_counting(p: &mut KafkaStreamProcessor, n: usize, steps: &mut usize) -> Result<usize> {
    let mut done = 0;
    let start = Instant::now();
    while done < n {
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "only {done} of {n} records processed"
        );
        let s = p.step(Duration::from_secs(2))?.records;
        *steps += usize::from(s > 0);
        done += s;
    }
    Ok(done)
}

// --------------------------------------------------------------- embedded

async fn append(log: &EmbeddedLog, stream: &str, records: &[In]) -> Result<()> {
    for chunk in records.chunks(5_000) {
        let events = chunk
            .iter()
            .map(|r| NewEvent::new(r.input, 1, r.ts, envelope::encode(&r.key, &r.value)))
            .collect();
        log.append(AppendTx::single(
            StreamId::new(stream)?,
            ExpectedVersion::Any,
            events,
        ))
        .await?;
    }
    Ok(())
}

/// One embedded round: (records/s, timed records, timed steps).
fn embedded_round(
    rt: &tokio::runtime::Runtime,
    tables: &[In],
    reactions: &[In],
    batch: usize,
) -> Result<(f64, usize, usize)> {
    let dir = tempfile::Builder::new()
        .prefix("smartmsg-kafka-stream-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let input = Arc::new(EmbeddedLog::open(dir.path().join("input"))?);
    let out: Arc<dyn EventLog> = Arc::new(EmbeddedLog::open_with(dir.path().join("out"), {
        let mut built = EmbeddedConfig::default();
        built.segment_bytes = 4 << 20;
        built
    })?);
    let store: Arc<dyn KeyValueStore> = Arc::new(RedbStore::open(dir.path().join("state.redb"))?);
    let r = rt.block_on(async {
        append(&input, "tables", tables).await?;
        let source_log: Arc<dyn EventLog> = input.clone();
        let mut runner = StreamRunner::open(
            topology(),
            store,
            EventLogSource::with_envelopes(source_log),
            EventLogSink::new(out),
            RunnerConfig::new("bench").with_batch(batch),
        )?;
        let t = runner.run_until_idle().await?;
        ensure!(t.records == tables.len());
        append(&input, "reactions", reactions).await?;
        let first = runner.step().await?.records;
        let started = Instant::now();
        let (mut timed, mut steps) = (0, 0);
        loop {
            let s = runner.step().await?;
            if s.records == 0 {
                break;
            }
            timed += s.records;
            steps += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        ensure!(first + timed == reactions.len());
        anyhow::Ok((timed as f64 / secs, timed, steps))
    })?;
    dir.close()?;
    Ok(r)
}

// ------------------------------------------------------------------- main

fn median(v: Vec<f64>) -> (f64, f64, f64) {
    smartmsg_engine::testkit::stats::median_min_max(&v)
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick")
        || std::env::var_os("SMARTMSG_BENCH_QUICK").is_some();
    let Some(bootstrap) = std::env::var("SMARTMSG_KAFKA_BOOTSTRAP")
        .ok()
        .filter(|b| !b.is_empty())
    else {
        println!("skipping the Kafka stream benchmark: SMARTMSG_KAFKA_BOOTSTRAP not set");
        return Ok(());
    };
    let (n_reactions, rounds) = if quick { (5_000, 1) } else { (50_000, 3) };
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let tables = tables(&mut rng);
    let reactions = reactions(&mut rng, n_reactions);

    // What the pipeline makes of it (in process), for the header.
    let mut task = topology().build()?;
    for r in tables.iter().chain(&reactions) {
        task.process_bytes(r.input, &r.key, &r.value, r.ts)?;
    }
    let mut out = Vec::new();
    task.drain_outputs(&mut out);
    let outputs = out.len();

    // The topics, written once.
    let run = unique("topics");
    let t = Topics {
        campaigns: format!("{run}.campaigns"),
        profiles: format!("{run}.profiles"),
        reactions: format!("{run}.reactions"),
        prefix: format!("{run}.out."),
    };
    let outs: Vec<String> = [
        REACTION_WINDOWS,
        DEAD_LETTERS,
        LATE_REACTIONS,
        USER_OUTCOMES,
    ]
    .iter()
    .map(|o| format!("{}{o}", t.prefix))
    .collect();
    let mut create = vec![
        (t.campaigns.as_str(), 1),
        (t.profiles.as_str(), 1),
        (t.reactions.as_str(), 1),
    ];
    create.extend(outs.iter().map(|o| (o.as_str(), 1)));
    rt.block_on(ensure_topics(&bootstrap, &create))?;
    let (camp, prof): (Vec<In>, Vec<In>) = tables
        .iter()
        .cloned()
        .partition(|r| r.input == INPUT_CAMPAIGNS);
    produce(&bootstrap, &t.campaigns, &camp)?;
    produce(&bootstrap, &t.profiles, &prof)?;
    produce(&bootstrap, &t.reactions, &reactions)?;

    println!("# Stream processing: the reaction pipeline on Kafka vs embedded\n");
    println!(
        "{} table records, then {} reactions ({outputs} outputs); median of {rounds} round(s) \
         (min–max); the first step of each run untimed\n",
        tables.len(),
        reactions.len(),
    );
    let mut kafka: Vec<Vec<f64>> = vec![Vec::new(); BATCHES.len()];
    let mut embedded: Vec<Vec<f64>> = vec![Vec::new(); BATCHES.len()];
    let mut shape = vec![((0, 0), (0, 0)); BATCHES.len()];
    for _ in 0..rounds {
        for (i, &b) in BATCHES.iter().enumerate() {
            let (rk, nk, sk) = kafka_round(&rt, &bootstrap, &t, tables.len(), reactions.len(), b)
                .with_context(|| format!("kafka, batch {b}"))?;
            let (re, ne, se) = embedded_round(&rt, &tables, &reactions, b)
                .with_context(|| format!("embedded, batch {b}"))?;
            kafka[i].push(rk);
            embedded[i].push(re);
            shape[i] = ((nk, sk), (ne, se));
        }
    }

    println!(
        "| path | records per commit | timed records / commits | records/s, median (min–max) |"
    );
    println!("|---|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (i, &b) in BATCHES.iter().enumerate() {
        let k = median(kafka[i].clone());
        let e = median(embedded[i].clone());
        let ((nk, sk), (ne, se)) = shape[i];
        println!(
            "| KafkaStreamProcessor (tansu) | {b} | {nk} / {sk} | {:.0} ({:.0}–{:.0}) |",
            k.0, k.1, k.2
        );
        println!(
            "| StreamRunner + RedbStore + EmbeddedLog | {b} | {ne} / {se} | {:.0} ({:.0}–{:.0}) |",
            e.0, e.1, e.2
        );
        ratios.push(format!("{:.2}× at {b}", k.0 / e.0));
    }
    println!("\nKafka / embedded: {}", ratios.join(", "));
    println!("total bench time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
