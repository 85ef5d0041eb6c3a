//! Issue 18's acceptance check: a Kafka Streams application ported by hand
//! (`examples/reactions_app/app.rs`: validation with dead letters, a
//! GlobalKTable join, one-minute windowed counts emitted on close with
//! late records out, a punctuated Processor-API step) run on generated
//! input — out-of-order timestamps, late records, invalid records, profile
//! updates — (a) on the `TestDriver` and (b) on a broker through
//! `KafkaStreamProcessor` (`SMARTMSG_KAFKA_BOOTSTRAP`; skipped when unset)
//! with a restart in the middle, every output compared with a reference
//! computed here by brute force: plain loops over the input, no DSL, no
//! code of the application.

#[path = "../examples/reactions_app/app.rs"]
mod app;
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use smartmsg_engine::stream::{Json, LateReason, LateRecord, StateCodec, TestDriver, Windowed};
use smartmsg_kafka::stream::ensure_topics;
use smartmsg_kafka::{KafkaStreamProcessor, ProcessorConfig};

use app::{AppConfig, CountKey, DeadLetter, Enriched, Profile};

/// The settings the reference assumes (written out, not taken from
/// `AppConfig::default()`).
const GRACE_MS: u64 = 10_000;
const FLUSH_MS: u64 = 30_000;
const WINDOW_MS: u64 = 60_000;

fn config() -> AppConfig {
    AppConfig {
        grace_ms: 10_000,
        flush_ms: 30_000,
    }
}

/// One generated reaction: the raw input and what the generator made it
/// (`Ok((campaign, creative, kind))` or `Err(reason)`).
#[derive(Debug, Clone)]
struct In {
    user: String,
    raw: Vec<u8>,
    ts: u64,
    made: Result<(String, String, String), &'static str>,
}

/// One phase of input: profile updates (user, segment), then reactions.
struct Phase {
    profiles: Vec<(String, String)>,
    reactions: Vec<In>,
}

const SEGMENTS: [&str; 3] = ["students", "parents", "retirees"];

fn generate(seed: u64) -> Vec<Phase> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let user = |i: usize| format!("u{i}");
    let mut cursor: u64 = 1_700_000_013_000;
    let mut phases = Vec::new();
    for (p, n) in [(0, 110), (1, 90), (2, 90)] {
        // Phase 0: profiles of u0..u13 (u14..u19 have none); later phases
        // change four and add one.
        let profiles: Vec<(String, String)> = if p == 0 {
            (0..14)
                .map(|i| (user(i), SEGMENTS[rng.random_range(0..3)].to_owned()))
                .collect()
        } else {
            let mut v: Vec<(String, String)> = (0..4)
                .map(|_| {
                    (
                        user(rng.random_range(0..14)),
                        SEGMENTS[rng.random_range(0..3)].to_owned(),
                    )
                })
                .collect();
            v.push((user(13 + p), SEGMENTS[rng.random_range(0..3)].to_owned()));
            v
        };
        let mut reactions = Vec::new();
        for _ in 0..n {
            cursor += rng.random_range(0..3_000);
            let roll = rng.random_range(0..100);
            let ts = if roll < 8 {
                // Far behind: mostly late.
                cursor.saturating_sub(rng.random_range(60_000..150_000))
            } else {
                cursor.saturating_sub(rng.random_range(0..15_000))
            };
            let campaign = format!("c{}", rng.random_range(1..3));
            let creative = ["a", "b", "c"][rng.random_range(0..3)].to_owned();
            let kind = app::KINDS[rng.random_range(0..3)].to_owned();
            let u = user(rng.random_range(0..20));
            let json = |c: &str, cr: &str, k: &str| {
                format!(r#"{{"campaign":"{c}","creative":"{cr}","kind":"{k}"}}"#).into_bytes()
            };
            let r = match rng.random_range(0..100) {
                0..=2 => In {
                    user: String::new(),
                    raw: json(&campaign, &creative, &kind),
                    ts,
                    made: Err("empty-user"),
                },
                3..=5 => In {
                    user: u,
                    raw: br#"{"campaign":"c1","#.to_vec(),
                    ts,
                    made: Err("bad-json"),
                },
                6..=7 => In {
                    user: u,
                    raw: format!(r#"{{"campaign":"{campaign}","kind":"{kind}"}}"#).into_bytes(),
                    ts,
                    made: Err("missing-field"),
                },
                8 => In {
                    user: u,
                    raw: json("", &creative, &kind),
                    ts,
                    made: Err("empty-campaign"),
                },
                9..=11 => In {
                    user: u,
                    raw: json(&campaign, &creative, "shout"),
                    ts,
                    made: Err("unknown-kind"),
                },
                _ => In {
                    user: u,
                    raw: json(&campaign, &creative, &kind),
                    ts,
                    made: Ok((campaign, creative, kind)),
                },
            };
            reactions.push(r);
        }
        phases.push(Phase {
            profiles,
            reactions,
        });
    }
    // A last valid reaction far ahead closes every earlier window.
    cursor += 300_000;
    phases[2].reactions.push(In {
        user: "u0".into(),
        raw: br#"{"campaign":"c1","creative":"a","kind":"click"}"#.to_vec(),
        ts: cursor,
        made: Ok(("c1".into(), "a".into(), "click".into())),
    });
    phases
}

/// Every output, normalised for comparison.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outputs {
    /// (user, reason, raw), in input order.
    dead: Vec<(String, String, String)>,
    /// (key, window start, window end, count), sorted.
    counts: Vec<(CountKey, u64, u64, u64)>,
    /// (key, user, kind, window start, closed at, stream time), in input
    /// order.
    late: Vec<(CountKey, String, String, u64, u64, u64)>,
    /// (timestamp, campaign, total), in output order.
    totals: Vec<(u64, String, u64)>,
}

/// The reference: plain loops over the input.
fn reference(phases: &[Phase]) -> Outputs {
    let mut out = Outputs::default();
    let mut profiles: BTreeMap<String, String> = BTreeMap::new();
    let mut stream_time = 0u64;
    let mut next_flush = FLUSH_MS; // scheduled at stream time 0
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    let mut counts: BTreeMap<(CountKey, u64), u64> = BTreeMap::new();
    for phase in phases {
        for (u, s) in &phase.profiles {
            profiles.insert(u.clone(), s.clone());
        }
        for r in &phase.reactions {
            if r.ts > stream_time {
                stream_time = r.ts;
                if stream_time >= next_flush {
                    for (c, n) in &totals {
                        out.totals.push((stream_time, c.clone(), *n));
                    }
                    next_flush = (stream_time / FLUSH_MS + 1) * FLUSH_MS;
                }
            }
            let (campaign, creative, kind) = match &r.made {
                Err(reason) => {
                    out.dead.push((
                        r.user.clone(),
                        reason.to_string(),
                        String::from_utf8_lossy(&r.raw).into_owned(),
                    ));
                    continue;
                }
                Ok(v) => v.clone(),
            };
            let segment = profiles
                .get(&r.user)
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            *totals.entry(campaign.clone()).or_default() += 1;
            let start = r.ts - r.ts % WINDOW_MS;
            let close = start + WINDOW_MS + GRACE_MS;
            let key = (campaign, creative, segment);
            if close <= stream_time {
                out.late
                    .push((key, r.user.clone(), kind, start, close, stream_time));
            } else {
                *counts.entry((key, start)).or_default() += 1;
            }
        }
    }
    for ((key, start), n) in counts {
        if start + WINDOW_MS + GRACE_MS <= stream_time {
            out.counts.push((key, start, start + WINDOW_MS, n));
        }
    }
    out
}

/// Adds decoded outputs to `out` (counts are sorted by [`finish`]).
fn add_dead(out: &mut Outputs, user: String, d: DeadLetter) {
    out.dead.push((user, d.reason, d.raw));
}

fn add_count(out: &mut Outputs, w: Windowed<CountKey>, n: u64) {
    out.counts
        .push((w.key, w.window.start_ms, w.window.end_ms, n));
}

fn add_late(out: &mut Outputs, key: CountKey, l: LateRecord<Json<Enriched>>) {
    let LateReason::WindowClosed {
        window,
        closed_at_ms,
        stream_time_ms,
    } = l.reason
    else {
        panic!("unexpected late reason {:?}", l.reason);
    };
    let e = l.value.0;
    assert_eq!(
        (e.campaign.as_str(), e.creative.as_str(), e.segment.as_str()),
        (key.0.as_str(), key.1.as_str(), key.2.as_str())
    );
    out.late.push((
        key,
        e.user,
        e.kind,
        window.start_ms,
        closed_at_ms,
        stream_time_ms,
    ));
}

fn finish(mut out: Outputs) -> Outputs {
    out.counts.sort();
    out
}

/// Compares field by field, for readable failures.
fn check(what: &str, got: &Outputs, want: &Outputs) {
    assert_eq!(got.dead, want.dead, "{what}: dead letters");
    assert_eq!(got.late, want.late, "{what}: late records");
    assert_eq!(got.counts, want.counts, "{what}: windowed counts");
    assert_eq!(got.totals, want.totals, "{what}: punctuated totals");
}

/// The input has what the check needs to mean something.
fn check_input(want: &Outputs) {
    eprintln!(
        "reference: {} dead letters, {} late, {} window counts, {} totals",
        want.dead.len(),
        want.late.len(),
        want.counts.len(),
        want.totals.len()
    );
    assert!(want.dead.len() >= 20, "{} dead letters", want.dead.len());
    assert!(want.late.len() >= 5, "{} late", want.late.len());
    assert!(want.counts.len() >= 30, "{} counts", want.counts.len());
    assert!(want.totals.len() >= 10, "{} totals", want.totals.len());
    assert!(
        want.counts.iter().any(|c| c.0 .2 == "unknown")
            && want.counts.iter().any(|c| c.0 .2 != "unknown"),
        "both joined and unjoined users"
    );
}

fn drain(d: &mut TestDriver, out: &mut Outputs) {
    for r in d
        .read_output::<String, Json<DeadLetter>>(app::DEAD_LETTERS)
        .unwrap()
    {
        add_dead(out, r.key, r.value.0);
    }
    for r in d
        .read_output::<Windowed<CountKey>, u64>(app::COUNTS)
        .unwrap()
    {
        add_count(out, r.key, r.value);
    }
    for r in d
        .read_output::<CountKey, LateRecord<Json<Enriched>>>(app::LATE)
        .unwrap()
    {
        add_late(out, r.key, r.value);
    }
    for r in d.read_output::<String, u64>(app::TOTALS).unwrap() {
        out.totals.push((r.timestamp_ms, r.key, r.value));
    }
}

#[test]
fn the_ported_application_on_the_test_driver_matches_the_reference() {
    for seed in [1, 2, 3] {
        let phases = generate(seed);
        let want = reference(&phases);
        check_input(&want);
        let mut d = TestDriver::new(app::topology(config()).unwrap()).unwrap();
        let mut got = Outputs::default();
        for (i, phase) in phases.iter().enumerate() {
            for (u, s) in &phase.profiles {
                let p = Json(Profile { segment: s.clone() });
                d.pipe(app::PROFILES, u.clone(), p, 0).unwrap();
            }
            for r in &phase.reactions {
                d.pipe(
                    app::REACTIONS,
                    r.user.clone(),
                    Bytes::from(r.raw.clone()),
                    r.ts,
                )
                .unwrap();
            }
            drain(&mut d, &mut got);
            if i == 0 {
                // A restart in the middle: state and stream time from the
                // store, profiles from their source.
                d.commit().unwrap();
                d = d.restart(app::topology(config()).unwrap()).unwrap();
            }
        }
        check(&format!("TestDriver, seed {seed}"), &finish(got), &want);
    }
}

// ---------------------------------------------------------------- Kafka

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

fn produce_profiles(bootstrap: &str, topic: &str, profiles: &[(String, String)]) {
    let p = producer(bootstrap);
    for (u, s) in profiles {
        let v = Json(Profile { segment: s.clone() }).to_bytes();
        p.send(
            BaseRecord::to(topic)
                .key(u.as_str())
                .payload(&v)
                .partition(0),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn produce_reactions(bootstrap: &str, topic: &str, reactions: &[In]) {
    let p = producer(bootstrap);
    for r in reactions {
        let rec = BaseRecord::to(topic)
            .key(r.user.as_str())
            .payload(&r.raw)
            .partition(0)
            .timestamp(r.ts as i64);
        p.send(rec).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Steps until `n` input records were processed.
fn step_until(p: &mut KafkaStreamProcessor, n: usize) {
    let mut done = 0;
    let start = Instant::now();
    while done < n {
        assert!(start.elapsed() < Duration::from_secs(120), "{done} of {n}");
        done += p.step(Duration::from_secs(1)).unwrap().records;
    }
    assert_eq!(done, n);
}

/// Steps (with no stream input waiting) until the processor's global
/// table holds every profile of `profiles`.
fn await_profiles(p: &mut KafkaStreamProcessor, profiles: &BTreeMap<String, String>) {
    let start = Instant::now();
    loop {
        let table: BTreeMap<String, String> = p
            .task()
            .table_entries::<String, Json<Profile>>("profiles")
            .unwrap()
            .into_iter()
            .map(|(u, p)| (u, p.0.segment))
            .collect();
        if &table == profiles {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "profiles not caught up"
        );
        assert_eq!(p.step(Duration::from_millis(300)).unwrap().records, 0);
    }
}

/// Every committed record of partition 0 of `topic` as (key, value,
/// timestamp), once `want` came and nothing more for 2 s.
fn read_all(bootstrap: &str, topic: &str, want: usize) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
    common::read_committed(bootstrap, topic, want, Duration::from_secs(60))
        .into_iter()
        .map(|r| (r.key, r.value, r.timestamp_ms.max(0) as u64))
        .collect()
}

#[test]
fn the_ported_application_on_kafka_matches_the_reference_across_a_restart() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let rt = runtime();
    let phases = generate(7);
    let want = reference(&phases);
    check_input(&want);

    let application = common::unique_log("ported");
    let topic = |name: &str| format!("{application}.{name}");
    let mut all = vec![topic(app::REACTIONS), topic(app::PROFILES)];
    for o in [app::DEAD_LETTERS, app::COUNTS, app::LATE, app::TOTALS] {
        all.push(topic(o));
    }
    let refs: Vec<(&str, i32)> = all.iter().map(|t| (t.as_str(), 1)).collect();
    rt.block_on(ensure_topics(&bootstrap, &refs)).unwrap();
    let cfg = ProcessorConfig::new(&bootstrap, &application)
        .with_input(topic(app::REACTIONS), app::REACTIONS)
        .with_global_input(topic(app::PROFILES), app::PROFILES)
        .with_output_prefix(format!("{application}."))
        .with_batch(7);
    let open = || {
        rt.block_on(KafkaStreamProcessor::open(
            app::topology(config()).unwrap(),
            cfg.clone(),
        ))
        .unwrap()
    };
    let (reactions, profiles) = (topic(app::REACTIONS), topic(app::PROFILES));
    let mut known = BTreeMap::new();

    // Phase 0 on a first processor, bootstrapping the profiles.
    produce_profiles(&bootstrap, &profiles, &phases[0].profiles);
    known.extend(phases[0].profiles.iter().cloned());
    produce_reactions(&bootstrap, &reactions, &phases[0].reactions);
    let mut p = open();
    await_profiles(&mut p, &known);
    step_until(&mut p, phases[0].reactions.len());
    drop(p);

    // Restart: phase 1's profiles are read by the new processor's
    // bootstrap, its state comes from the changelog.
    produce_profiles(&bootstrap, &profiles, &phases[1].profiles);
    known.extend(phases[1].profiles.iter().cloned());
    produce_reactions(&bootstrap, &reactions, &phases[1].reactions);
    let mut p = open();
    assert!(
        p.restored().records > 0,
        "state restored from the changelog"
    );
    await_profiles(&mut p, &known);
    step_until(&mut p, phases[1].reactions.len());

    // Phase 2's profile updates reach the running processor before its
    // reactions are produced.
    produce_profiles(&bootstrap, &profiles, &phases[2].profiles);
    known.extend(phases[2].profiles.iter().cloned());
    await_profiles(&mut p, &known);
    produce_reactions(&bootstrap, &reactions, &phases[2].reactions);
    step_until(&mut p, phases[2].reactions.len());
    drop(p);

    let mut got = Outputs::default();
    for (k, v, _) in read_all(&bootstrap, &topic(app::DEAD_LETTERS), want.dead.len()) {
        let user = String::decode(&k).unwrap();
        add_dead(&mut got, user, Json::<DeadLetter>::decode(&v).unwrap().0);
    }
    for (k, v, _) in read_all(&bootstrap, &topic(app::COUNTS), want.counts.len()) {
        let w = Windowed::<CountKey>::decode(&k).unwrap();
        add_count(&mut got, w, u64::decode(&v).unwrap());
    }
    for (k, v, _) in read_all(&bootstrap, &topic(app::LATE), want.late.len()) {
        let key = CountKey::decode(&k).unwrap();
        add_late(&mut got, key, LateRecord::decode(&v).unwrap());
    }
    for (k, v, ts) in read_all(&bootstrap, &topic(app::TOTALS), want.totals.len()) {
        got.totals
            .push((ts, String::decode(&k).unwrap(), u64::decode(&v).unwrap()));
    }
    check("KafkaStreamProcessor", &finish(got), &want);
}
