//! The domain's reaction pipeline (`reaction_topology`) end to end on Kafka
//! topics, run by `KafkaStreamProcessor` against a broker
//! (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset).
//!
//! Campaign infos, user profiles and a few thousand reaction messages
//! (deterministic, seeded; with unparsable bytes, unknown campaigns,
//! reactions outside their campaign's time, unknown creatives and batches,
//! users without a profile, duplicates and late reactions) are produced to
//! input topics with their arrival times as record timestamps. The
//! processor is dropped half-way through the reactions and reopened (state
//! restored from the changelog topic, input resumed from the group's
//! committed offsets). Every output read back from the output topics
//! (`read_committed`) must be exactly what the engine's in-process
//! `TestDriver` produces from the same records in the same order: window
//! results, dead letters with their reasons, late records and per-user
//! outcomes, with their keys, values and timestamps, nothing twice.
//!
//! Ordering: Kafka orders records per partition only. The tables
//! (campaigns, profiles) are produced and processed completely before any
//! reaction is produced, so every reaction sees them (the reference does
//! the same), and the reactions topic has one partition, so the processor
//! sees them in the reference's order (windows, dedupe and lateness depend
//! on it). The profiles topic has three partitions (a user's profiles stay
//! in one, in order): the tables' content does not depend on how the
//! partitions interleave, so only the profile dead letters (emitted while
//! the tables are fed) are compared as a multiset; everything emitted
//! while reactions flow is compared in order.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use smartmsg_domain::reactions::{
    reaction_topology, CampaignInfo, DeadLetter, ReactionConfig, ReactionKind, ReactionMessage,
    ReactionWindow, UserProfile, DEAD_LETTERS, INPUT_CAMPAIGNS, INPUT_PROFILES, INPUT_REACTIONS,
    LATE_REACTIONS, REACTION_WINDOWS, STORE_CAMPAIGNS, USER_OUTCOMES,
};
use smartmsg_engine::stream::{EncodedRecord, Json, StateCodec, TestDriver, Windowed};
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

const SEED: u64 = 0x5eed_2024;
const DIM: usize = 3;
const USERS: u32 = 400;
/// Users at or above this have no profile (their reactions are dead
/// letters).
const PROFILED: u32 = 380;
const REACTIONS: usize = 4_000;
const BATCH: usize = 500;
/// Every campaign starts here (ms since the epoch, a minute boundary).
const T0: u64 = 1_700_000_040_000;
/// The tables' records' timestamp.
const TABLE_TS: u64 = T0 - 60_000;

const OUTPUTS: [&str; 4] = [
    REACTION_WINDOWS,
    DEAD_LETTERS,
    LATE_REACTIONS,
    USER_OUTCOMES,
];

/// One input record: topology input, partition, key, value, timestamp.
#[derive(Debug, Clone)]
struct In {
    input: &'static str,
    partition: i32,
    key: Vec<u8>,
    value: Vec<u8>,
    ts: u64,
}

/// One output record as read back: key, value, timestamp.
type Out = (Vec<u8>, Vec<u8>, u64);

fn campaigns() -> Vec<(String, CampaignInfo)> {
    vec![
        (
            "camp-a".into(),
            CampaignInfo {
                start_ms: T0,
                end_ms: T0 + 60 * 60_000,
                creatives: 3,
                batches: 4,
            },
        ),
        (
            // Starts 5 minutes later: early reactions are outside it.
            "camp-b".into(),
            CampaignInfo {
                start_ms: T0 + 5 * 60_000,
                end_ms: T0 + 40 * 60_000,
                creatives: 2,
                batches: 2,
            },
        ),
        (
            "camp-c".into(),
            CampaignInfo {
                start_ms: T0,
                end_ms: T0 + 90 * 60_000,
                creatives: 4,
                batches: 10,
            },
        ),
    ]
}

/// The tables' records: campaign infos, then profiles (a few updated, a
/// few invalid), profiles spread over three partitions by user.
fn table_inputs(rng: &mut ChaCha8Rng) -> Vec<In> {
    let mut v = Vec::new();
    for (id, info) in campaigns() {
        v.push(In {
            input: INPUT_CAMPAIGNS,
            partition: 0,
            key: id.to_bytes(),
            value: Json(info).to_bytes(),
            ts: TABLE_TS,
        });
    }
    let profile = |user: u32, rng: &mut ChaCha8Rng| {
        let features: Vec<f32> = (0..DIM)
            .map(|_| (rng.random_range(-150i32..=150) as f32) / 100.0)
            .collect();
        serde_json::to_vec(&UserProfile {
            user,
            features,
            batch: None,
            creative: None,
        })
        .unwrap()
    };
    for user in 0..PROFILED {
        v.push(In {
            input: INPUT_PROFILES,
            partition: (user % 3) as i32,
            key: Vec::new(),
            value: profile(user, rng),
            ts: TABLE_TS,
        });
    }
    // Updates: the later profile wins (same partition, so in order).
    for user in (0..PROFILED).step_by(37) {
        v.push(In {
            input: INPUT_PROFILES,
            partition: (user % 3) as i32,
            key: Vec::new(),
            value: profile(user, rng),
            ts: TABLE_TS,
        });
    }
    for bad in [
        &b"{\"user\":7"[..],
        br#"{"user":8}"#,
        br#"{"user":9,"features":[1.0]}"#,
        br#"{"user":10,"features":[1.0,"x",2.0]}"#,
    ] {
        v.push(In {
            input: INPUT_PROFILES,
            partition: 0,
            key: Vec::new(),
            value: bad.to_vec(),
            ts: TABLE_TS,
        });
    }
    v
}

/// The reaction messages, in arrival order, each with its arrival time as
/// its timestamp; the last one is unparsable and arrives ten minutes after
/// the others, closing every window.
fn reaction_inputs(rng: &mut ChaCha8Rng) -> Vec<In> {
    let camps = campaigns();
    let kinds = [
        ReactionKind::Delivered,
        ReactionKind::Delivered,
        ReactionKind::Delivered,
        ReactionKind::Opened,
        ReactionKind::Clicked,
        ReactionKind::Replied,
        ReactionKind::Unsubscribed,
    ];
    let mut now = T0 + 1_000;
    let mut valid: Vec<Vec<u8>> = Vec::new();
    let mut v = Vec::with_capacity(REACTIONS + 1);
    let msg = |m: &ReactionMessage| serde_json::to_vec(m).unwrap();
    while v.len() < REACTIONS {
        now += rng.random_range(0..900u64);
        let (campaign, info) = &camps[rng.random_range(0..camps.len())];
        let mut m = ReactionMessage {
            campaign: campaign.clone(),
            batch: rng.random_range(0..info.batches),
            user: rng.random_range(0..USERS),
            creative: rng.random_range(0..info.creatives),
            reaction: kinds[rng.random_range(0..kinds.len())],
            time_ms: now.saturating_sub(rng.random_range(0..20_000u64)),
        };
        let roll = rng.random_range(0..100u32);
        let value = match roll {
            0..=74 => {
                let b = msg(&m);
                valid.push(b.clone());
                b
            }
            75..=79 if !valid.is_empty() => valid[rng.random_range(0..valid.len())].clone(),
            80..=84 => {
                // Late: long after its window closed.
                m.time_ms = now - rng.random_range(120_000..300_000u64);
                msg(&m)
            }
            85..=87 => {
                let mut b = msg(&m);
                match roll {
                    85 => b.truncate(rng.random_range(0..b.len())),
                    86 => b = (0..rng.random_range(1..40)).map(|_| rng.random()).collect(),
                    _ => b = b"[1,2,3]".to_vec(),
                }
                b
            }
            88..=90 => {
                m.campaign = format!("camp-{}", rng.random_range(100..110));
                msg(&m)
            }
            91..=93 => {
                m.time_ms = info.start_ms - rng.random_range(1..3_600_000u64);
                msg(&m)
            }
            94..=96 => {
                m.creative = info.creatives + rng.random_range(0..3u16);
                msg(&m)
            }
            97 => {
                m.batch = info.batches + 1;
                msg(&m)
            }
            _ => {
                // A missing field.
                let mut j = serde_json::to_value(&m).unwrap();
                j.as_object_mut().unwrap().remove("user");
                serde_json::to_vec(&j).unwrap()
            }
        };
        v.push(In {
            input: INPUT_REACTIONS,
            partition: 0,
            key: Vec::new(),
            value,
            ts: now,
        });
    }
    v.push(In {
        input: INPUT_REACTIONS,
        partition: 0,
        key: Vec::new(),
        value: b"tick".to_vec(),
        ts: now + 10 * 60_000,
    });
    v
}

fn topology() -> smartmsg_engine::stream::Topology {
    reaction_topology(ReactionConfig::new(DIM)).unwrap()
}

/// The reference: the topology run in process by the `TestDriver`, on the
/// same records in the same order (tables first). Returns each output's
/// records (in order) emitted while the tables were fed, and then while
/// the reactions were.
fn reference(
    tables: &[In],
    reactions: &[In],
) -> (BTreeMap<String, Vec<Out>>, BTreeMap<String, Vec<Out>>) {
    let mut d = TestDriver::new(topology()).unwrap();
    let mut run = |records: &[In]| {
        for r in records {
            assert!(d
                .task()
                .process_bytes(r.input, &r.key, &r.value, r.ts)
                .unwrap());
        }
        let mut out = Vec::new();
        d.task().drain_outputs(&mut out);
        by_output(out)
    };
    let first = run(tables);
    let second = run(reactions);
    (first, second)
}

fn by_output(records: Vec<EncodedRecord>) -> BTreeMap<String, Vec<Out>> {
    let mut m: BTreeMap<String, Vec<Out>> = OUTPUTS
        .iter()
        .map(|o| (o.to_string(), Vec::new()))
        .collect();
    for r in records {
        m.get_mut(&r.output)
            .unwrap_or_else(|| panic!("unexpected output {}", r.output))
            .push((r.key, r.value, r.timestamp_ms));
    }
    m
}

fn produce(bootstrap: &str, topics: &BTreeMap<&'static str, String>, records: &[In]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for r in records {
        let mut rec = BaseRecord::<[u8], [u8]>::to(&topics[r.input])
            .payload(r.value.as_slice())
            .partition(r.partition)
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
                Err((e, _)) => panic!("produce: {e}"),
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Steps until at least `n` input records were committed (the group join
/// can take a few seconds on the first poll). Returns how many were.
fn step_until(p: &mut KafkaStreamProcessor, n: usize) -> usize {
    let mut done = 0;
    let start = Instant::now();
    while done < n && start.elapsed() < Duration::from_secs(120) {
        done += p.step(Duration::from_secs(2)).unwrap().records;
    }
    done
}

/// Every record of partition 0 of each output topic (`read_committed`),
/// in offset order: at least `want` in all, then until two quiet seconds.
fn read_outputs(bootstrap: &str, prefix: &str, want: usize) -> BTreeMap<String, Vec<Out>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{prefix}reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for o in OUTPUTS {
        tpl.add_partition_offset(&format!("{prefix}{o}"), 0, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out: BTreeMap<String, Vec<Out>> = OUTPUTS
        .iter()
        .map(|o| (o.to_string(), Vec::new()))
        .collect();
    let mut n = 0;
    let start = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    while start.elapsed() < Duration::from_secs(60) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet_since = None;
                let output = m.topic().strip_prefix(prefix).unwrap().to_owned();
                out.get_mut(&output).unwrap().push((
                    m.key().unwrap_or(&[]).to_vec(),
                    m.payload().unwrap_or(&[]).to_vec(),
                    m.timestamp().to_millis().unwrap_or(-1) as u64,
                ));
                n += 1;
            }
            Some(Err(e)) => panic!("reading outputs: {e}"),
            None => {
                if n >= want {
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                }
            }
        }
    }
    out
}

fn dead_reason(v: &[u8]) -> String {
    let Json(d) = Json::<DeadLetter>::decode(v).unwrap();
    let r = serde_json::to_value(&d.reason).unwrap();
    format!("{}/{}", d.input, r["reason"].as_str().unwrap())
}

/// Asserts two lists of output records are equal, showing the first
/// difference decoded.
fn assert_same(what: &str, got: &[Out], want: &[Out]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(g, w)| g != w)
        .unwrap_or(got.len().min(want.len()));
    let show = |o: Option<&Out>| {
        o.map(|(k, v, ts)| {
            let v = String::from_utf8_lossy(v);
            let v: String = v.chars().take(300).collect();
            format!("key {k:?} value {v:?} ts {ts}")
        })
    };
    panic!(
        "{what}: {} records read back, {} in the reference; first difference at {at}:\n  \
         kafka:     {:?}\n  reference: {:?}",
        got.len(),
        want.len(),
        show(got.get(at)),
        show(want.get(at)),
    );
}

#[test]
fn reaction_pipeline_on_topics_matches_the_test_driver_across_a_restart() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let tables = table_inputs(&mut rng);
    let reactions = reaction_inputs(&mut rng);
    let (want_tables, want_reactions) = reference(&tables, &reactions);

    // The data exercises every path: windows close, reactions are late,
    // each kind of bad message is dead-lettered.
    let windows = &want_reactions[REACTION_WINDOWS];
    let late = &want_reactions[LATE_REACTIONS];
    assert!(windows.len() >= 30, "{} windows", windows.len());
    assert!(late.len() >= 20, "{} late", late.len());
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for (_, v, _) in want_tables[DEAD_LETTERS]
        .iter()
        .chain(&want_reactions[DEAD_LETTERS])
    {
        *reasons.entry(dead_reason(v)).or_default() += 1;
    }
    for r in [
        "Reaction/not_json",
        "Reaction/not_an_object",
        "Reaction/missing_field",
        "Reaction/unknown_campaign",
        "Reaction/outside_campaign",
        "Reaction/unknown_creative",
        "Reaction/unknown_batch",
        "Reaction/unknown_user",
        "UserProfile/not_json",
        "UserProfile/missing_field",
        "UserProfile/feature_dimension",
        "UserProfile/bad_field",
    ] {
        assert!(reasons.contains_key(r), "no {r} dead letter: {reasons:?}");
    }
    let counted: usize = windows
        .iter()
        .map(|(_, v, _)| {
            let Json(w) = Json::<ReactionWindow>::decode(v).unwrap();
            w.cells.iter().map(|c| c.delivered as usize).sum::<usize>()
        })
        .sum();
    assert!(counted > 500, "{counted} deliveries counted");
    // Nothing of the reference is stamped 0 (the producer would replace
    // a 0 timestamp by the current time).
    for o in OUTPUTS {
        for (_, _, ts) in want_tables[o].iter().chain(&want_reactions[o]) {
            assert!(*ts > 0, "{o} record at 0");
        }
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = common::unique_log("reactions");
    let topics: BTreeMap<&'static str, String> = [
        (INPUT_CAMPAIGNS, format!("{app}.campaigns")),
        (INPUT_PROFILES, format!("{app}.profiles")),
        (INPUT_REACTIONS, format!("{app}.reactions")),
    ]
    .into_iter()
    .collect();
    let prefix = format!("{app}.out.");
    let outputs: Vec<String> = OUTPUTS.iter().map(|o| format!("{prefix}{o}")).collect();
    let mut create: Vec<(&str, i32)> = vec![
        (&topics[INPUT_CAMPAIGNS], 1),
        (&topics[INPUT_PROFILES], 3),
        (&topics[INPUT_REACTIONS], 1),
    ];
    create.extend(outputs.iter().map(|o| (o.as_str(), 1)));
    rt.block_on(ensure_topics(&bootstrap, &create)).unwrap();

    let mut cfg = ProcessorConfig::new(&bootstrap, &app)
        .with_output_prefix(&prefix)
        .with_batch(BATCH);
    for (input, topic) in &topics {
        cfg = cfg.with_input(topic, *input);
    }
    let open = |cfg: &ProcessorConfig| {
        rt.block_on(KafkaStreamProcessor::open(topology(), cfg.clone()))
            .unwrap()
    };

    // The tables first, completely.
    produce(&bootstrap, &topics, &tables);
    let mut p = open(&cfg);
    assert_eq!(p.restored().records, 0);
    assert_eq!(step_until(&mut p, tables.len()), tables.len());

    // Then the reactions: about half, then the processor is dropped (after
    // a commit) and reopened.
    produce(&bootstrap, &topics, &reactions);
    let half = step_until(&mut p, reactions.len() / 2);
    assert!(
        half >= reactions.len() / 2 && half < reactions.len(),
        "{half}"
    );
    let processed = p.task().metrics().processed;
    let stream_time = p.task().stream_time();
    drop(p);

    let mut p = open(&cfg);
    assert!(p.restored().records > 0, "{:?}", p.restored());
    assert_eq!(p.task().metrics().processed, processed, "restored counters");
    assert_eq!(p.task().stream_time(), stream_time, "restored stream time");
    for (id, info) in campaigns() {
        assert_eq!(
            p.task()
                .table_get::<String, Json<CampaignInfo>>(STORE_CAMPAIGNS, &id)
                .unwrap()
                .map(|j| j.0),
            Some(info),
            "restored campaign table"
        );
    }
    let rest = reactions.len() - half;
    assert_eq!(step_until(&mut p, rest), rest, "resumed where it committed");
    assert_eq!(
        p.run_until_idle(Duration::from_secs(3)).unwrap().records,
        0,
        "nothing processed twice"
    );
    assert_eq!(
        p.task().metrics().processed,
        (tables.len() + reactions.len()) as u64
    );
    drop(p);

    let want_total: usize = OUTPUTS
        .iter()
        .map(|o| want_tables[*o].len() + want_reactions[*o].len())
        .sum();
    let got = read_outputs(&bootstrap, &prefix, want_total);

    // Emitted while the tables were fed: the profile dead letters, in an
    // order that depends on how the profile partitions interleave.
    for o in OUTPUTS {
        let n = want_tables[o].len();
        let all = &got[o];
        assert!(all.len() >= n, "{o}: {} read back", all.len());
        let mut g = all[..n].to_vec();
        let mut w = want_tables[o].clone();
        g.sort();
        w.sort();
        assert_same(&format!("{o} (tables phase, as a multiset)"), &g, &w);
        assert_same(
            &format!("{o} (reactions phase, in order)"),
            &all[n..],
            &want_reactions[o],
        );
    }

    // Decoded, for the record.
    let windows: Vec<(Windowed<String>, ReactionWindow)> = got[REACTION_WINDOWS]
        .iter()
        .map(|(k, v, _)| {
            (
                Windowed::<String>::decode(k).unwrap(),
                Json::<ReactionWindow>::decode(v).unwrap().0,
            )
        })
        .collect();
    assert!(windows
        .iter()
        .all(|(k, w)| k.key == w.campaign && k.window.start_ms == w.start_ms));
    println!(
        "{} tables records, {} reactions ({half} before the restart): {} windows, \
         {} per-user outcomes, {} late, {} dead letters {reasons:?}; {:.1} s",
        tables.len(),
        reactions.len(),
        windows.len(),
        got[USER_OUTCOMES].len(),
        got[LATE_REACTIONS].len(),
        got[DEAD_LETTERS].len(),
        started.elapsed().as_secs_f64()
    );
}
