//! Fuzz-style test of every decoder of an on-disk or on-wire format: the
//! embedded log's frames and frame bodies, the engine's index checkpoint,
//! the Kafka log's envelopes, checkpoint bodies and checkpoint chunks, the
//! RabbitMQ queue's job, dead-letter and journal messages, the domain's
//! `BatchPlanned` payload, the stream runner's key/value envelope and
//! changelog blobs, and the portable log's lines.
//!
//! Each decoder is fed valid encodings (the seeds, made by the encoders)
//! mutated in the ways fuzzers mutate (bit flips, byte overwrites with
//! interesting values, insertions, deletions, truncation, splices of two
//! seeds, length fields set to extremes) and plain random bytes:
//! `SMARTMSG_FUZZ_INPUTS` in all (default 6,000,000; about 3 s in release), seeded
//! (`SMARTMSG_FUZZ_SEED`), bounded in time (`SMARTMSG_FUZZ_SECONDS`,
//! default 240: the run stops there, having fed at least a tenth of the
//! inputs, and says so). A panic fails the test; so does an allocation
//! beyond 256 MiB over the start (the global allocator is capped: a decoder
//! that trusts a length field would abort the process).

use std::io::BufReader;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use smartmsg_domain::campaign::planned;
use smartmsg_domain::campaign::{CommandStamp, Part};
use smartmsg_domain::data::Decisions;
use smartmsg_embedded::frame::{self, BodyReader, StreamCache};
use smartmsg_engine::index::{LogIndex, Verdict};
use smartmsg_engine::stream::{changelog_blob, envelope, WriteBatch};
use smartmsg_engine::{
    AppendTx, ExpectedVersion, IdempotencyKey, Limits, Metadata, NewEvent, RecordedEvent, StreamId,
};
use smartmsg_kafka::checkpoint;
use smartmsg_kafka::envelope as kenv;
use smartmsg_rabbitmq::codec;
use smartmsg_simulator::portable;

#[global_allocator]
static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Runs one decoder on one input.
type Decode = Box<dyn Fn(&[u8])>;

/// A decoder under test: takes bytes, must return (anything) without
/// panicking.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: Decode,
}

fn txs() -> Vec<AppendTx> {
    let s = |n: &str| StreamId::new(n).unwrap();
    let e = |k: &str, p: &[u8]| NewEvent::new(k, 1, 1_700_000_000_000, Bytes::copy_from_slice(p));
    let mut with_meta = e("Meta", b"{\"a\":1}");
    with_meta.metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cause-2".into()),
    };
    vec![
        AppendTx::single(
            s("campaign-a"),
            ExpectedVersion::Any,
            vec![e("Created", b"{}")],
        ),
        AppendTx::single(
            s("pipeline-a"),
            ExpectedVersion::Exact(0),
            vec![e("R", b"reaction"), e("R", &[0u8; 300]), with_meta],
        )
        .with_idempotency_key("key-1"),
        AppendTx::single(s("x"), ExpectedVersion::Any, vec![e("Empty", b"")]).with_stream(
            s("y"),
            ExpectedVersion::Any,
            vec![e("Two", b"2"), e("Three", b"33")],
        ),
    ]
}

fn index_of(txs: &[AppendTx]) -> (LogIndex, Vec<smartmsg_engine::AppendResult>) {
    let mut index = LogIndex::new();
    let limits = Limits::default();
    let mut results = Vec::new();
    for tx in txs {
        match index.check(tx, &limits).unwrap() {
            Verdict::Write(r) => {
                index.apply_tx(tx, &r);
                results.push(r);
            }
            Verdict::Duplicate(_) => unreachable!("no duplicates in the seeds"),
        }
    }
    (index, results)
}

fn targets() -> Vec<Target> {
    let txs = txs();
    let (index, results) = index_of(&txs);
    let mut out = Vec::new();

    // Embedded log frames: whole frames (header + CRC) and bare bodies (so
    // that mutations reach the body decoder past the CRC).
    let mut frames = Vec::new();
    let mut bodies = Vec::new();
    for (tx, r) in txs.iter().zip(&results) {
        let mut f = Vec::new();
        frame::encode(&mut f, 7, tx, r);
        bodies.push(f[frame::HEADER_LEN..].to_vec());
        frames.push(f);
    }
    out.push(Target {
        name: "embedded frame",
        seeds: frames,
        run: Box::new(|b| {
            let _ = frame::check_frame(b, 1 << 20);
        }),
    });
    out.push(Target {
        name: "embedded frame body",
        seeds: bodies,
        run: Box::new(|b| {
            if let Ok(mut r) = BodyReader::new(Bytes::copy_from_slice(b)) {
                let mut cache = StreamCache::default();
                while let Ok(Some(_)) = r.next_event(&mut cache) {}
            }
        }),
    });

    out.push(Target {
        name: "index checkpoint",
        seeds: vec![index.to_bytes(), LogIndex::new().to_bytes()],
        run: Box::new(|b| {
            let _ = LogIndex::decode(b);
        }),
    });

    // Kafka: the envelope (key = stream, value = the encoded event).
    let meta = Metadata {
        correlation_id: Some("c".into()),
        causation_id: None,
    };
    let framing = kenv::Framing {
        batch_seq: 9,
        prev_seq: 8,
        batch_index: 1,
        batch_count: 3,
        tx_index: 0,
        tx_count: 2,
        position: 41,
        version: 5,
    };
    let key = IdempotencyKey::new("idem");
    let fields = kenv::EventFields {
        kind: "Planned",
        schema: 2,
        timestamp_ms: 1_700_000_000_000,
        metadata: &meta,
        payload: b"payload bytes",
    };
    let env_seeds = vec![
        kenv::encode(&framing, &fields, Some((&key, 77))),
        kenv::encode(&framing, &fields, None),
    ];
    out.push(Target {
        name: "kafka envelope",
        seeds: env_seeds,
        run: Box::new(|b| {
            let split = b.first().map_or(0, |x| *x as usize % 24).min(b.len());
            let (k, v) = b.split_at(split);
            let _ = kenv::decode(Some(k), Some(v));
            let _ = kenv::decode(None, Some(b));
            let _ = kenv::decode_framing(Some(b"stream-a"), Some(b));
        }),
    });
    let header = checkpoint::Header {
        log_name: "main".into(),
        topic: "smartmsg.events".into(),
        partitions: 2,
        tip: 5,
        next_seq: 6,
        committed_batches: 5,
        ignored_batches: 1,
        next_offsets: vec![10, 4],
    };
    let locations: Vec<u64> = (0..index.head()).map(|p| (p % 2) << 48 | p).collect();
    let body = checkpoint::encode(&header, &locations, &index);
    let chunk = checkpoint::Chunk {
        slot: 1,
        id: 3,
        index: 0,
        count: 1,
        body_len: body.len() as u64,
        body_crc: crc32c::crc32c(&body),
        data: body.clone(),
    };
    out.push(Target {
        name: "kafka checkpoint body",
        seeds: vec![body],
        run: Box::new(|b| {
            let _ = checkpoint::decode(b);
        }),
    });
    out.push(Target {
        name: "kafka checkpoint chunk",
        seeds: vec![chunk.encode()],
        run: Box::new(|b| {
            let _ = checkpoint::Chunk::decode(b);
        }),
    });

    // RabbitMQ messages.
    let job = codec::JobMessage {
        id: smartmsg_engine::JobId::new("campaign-a/batch-3").unwrap(),
        due_ms: 1_000,
        at_ms: 900,
        seq: 2,
        attempts: 1,
        payload: Bytes::from_static(b"job payload"),
    };
    let dead = codec::DeadRecord {
        id: Some(job.id.clone()),
        attempts: 3,
        reason: "lease expired".into(),
        payload: Bytes::from_static(b"x"),
    };
    let journal = [
        codec::JournalRecord::Pending {
            id: job.id.clone(),
            seq: 1,
            rev: 2,
            at_ms: 3,
            hash: 4,
        },
        codec::JournalRecord::Retired {
            id: job.id.clone(),
            before: 2,
            keep_until_ms: 9,
        },
        codec::JournalRecord::Barrier { nonce: 5 },
    ];
    out.push(Target {
        name: "rabbitmq job",
        seeds: vec![codec::encode_job(&job)],
        run: Box::new(|b| {
            let _ = codec::decode_job(b);
        }),
    });
    out.push(Target {
        name: "rabbitmq dead letter",
        seeds: vec![codec::encode_dead(&dead)],
        run: Box::new(|b| {
            let _ = codec::decode_dead(b);
        }),
    });
    out.push(Target {
        name: "rabbitmq journal",
        seeds: journal.iter().map(codec::encode_journal).collect(),
        run: Box::new(|b| {
            let _ = codec::decode_journal(b);
        }),
    });

    // The domain's BatchPlanned payload.
    let decisions = Decisions {
        users: (0..50).map(|u| u * 7).collect(),
        creatives: (0..50).map(|c| (c % 4) as u16).collect(),
        propensities: (0..50).map(|p| 0.1 + p as f32 / 100.0).collect(),
    };
    let stamp = CommandStamp {
        id: "cmd-1".into(),
        fingerprint: 0xfeed,
    };
    out.push(Target {
        name: "BatchPlanned",
        seeds: vec![
            planned::encode(&stamp, 3, Part::WHOLE, "integrated", &decisions),
            planned::encode(
                &stamp,
                3,
                Part { index: 1, count: 4 },
                "integrated",
                &decisions,
            ),
        ],
        run: Box::new(|b| {
            let _ = planned::decode(2, b);
            let _ = planned::decode(3, b);
        }),
    });

    // The stream runner's record envelope and the stores' changelog blobs.
    let mut batch = WriteBatch::new();
    batch.put("users", b"k1".to_vec(), b"v1".to_vec());
    batch.delete("users", b"k2".to_vec());
    batch.put("win:1", vec![0xff; 20], vec![1; 64]);
    out.push(Target {
        name: "stream envelope",
        seeds: vec![
            envelope::encode(b"key", b"value"),
            envelope::encode(b"", b""),
        ],
        run: Box::new(|b| {
            let _ = envelope::decode(&Bytes::copy_from_slice(b));
        }),
    });
    out.push(Target {
        name: "changelog blob",
        seeds: vec![changelog_blob::encode(&batch)],
        run: Box::new(|b| {
            let mut out = Vec::new();
            let _ = changelog_blob::count(b);
            let _ = changelog_blob::decode_into(10, b, 10, 13, 100, &mut out);
        }),
    });

    // Portable log lines (text).
    let mut lines = Vec::new();
    for (i, tx) in txs.iter().enumerate() {
        for s in &tx.streams {
            for (j, e) in s.events.iter().enumerate() {
                let rec = RecordedEvent {
                    stream: s.stream.clone(),
                    version: j as u64 + 1,
                    position: i as u64 * 10 + j as u64,
                    kind: e.kind.clone(),
                    schema: e.schema,
                    timestamp_ms: e.timestamp_ms,
                    metadata: e.metadata.clone(),
                    payload: e.payload.clone(),
                };
                let mut line = Vec::new();
                portable::write_line(&mut line, &rec).unwrap();
                lines.push(line);
            }
        }
    }
    out.push(Target {
        name: "portable log line",
        seeds: lines,
        run: Box::new(|b| {
            let limits = Limits::default();
            let text = String::from_utf8_lossy(b);
            let _ = portable::parse_line(text.trim_end(), &limits);
            let _ = portable::parse_all(BufReader::new(b), &limits);
        }),
    });
    out
}

const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, b'{', b'"'];

/// One mutated input from the seeds (or random bytes).
fn mutate(rng: &mut ChaCha8Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.random_range(0..seeds.len())].clone();
    if rng.random_range(0..16) == 0 {
        let n = rng.random_range(0..256);
        return (0..n).map(|_| rng.random()).collect();
    }
    for _ in 0..rng.random_range(1..=4) {
        match rng.random_range(0..8) {
            0 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                b[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 => {
                let i = rng.random_range(0..=b.len());
                let n = rng.random_range(1..16);
                let fill: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                b.splice(i..i, fill);
            }
            3 if !b.is_empty() => {
                let i = rng.random_range(0..b.len());
                let n = rng.random_range(1..=(b.len() - i).min(16));
                b.drain(i..i + n);
            }
            4 => {
                let n = rng.random_range(0..=b.len());
                b.truncate(n);
            }
            5 => {
                // Splice the tail of another seed.
                let other = &seeds[rng.random_range(0..seeds.len())];
                let at = rng.random_range(0..=b.len());
                let from = rng.random_range(0..=other.len());
                b.truncate(at);
                b.extend_from_slice(&other[from..]);
            }
            6 if b.len() >= 4 => {
                // A length or count field set to an extreme.
                let i = rng.random_range(0..=b.len() - 4);
                let v: u32 =
                    [u32::MAX, u32::MAX / 2, 0x0100_0000, 65_535, 0][rng.random_range(0..5)];
                b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            _ if b.len() >= 8 => {
                let i = rng.random_range(0..=b.len() - 8);
                b[i..i + 8].copy_from_slice(&u64::MAX.to_be_bytes());
            }
            _ => b.push(rng.random()),
        }
    }
    b
}

#[test]
fn decoders_survive_random_and_mutated_input() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seed = env("SMARTMSG_FUZZ_SEED").unwrap_or(0xf022);
    let inputs = env("SMARTMSG_FUZZ_INPUTS").unwrap_or(6_000_000);
    let budget = Duration::from_secs(env("SMARTMSG_FUZZ_SECONDS").unwrap_or(240));
    eprintln!("fuzz: SMARTMSG_FUZZ_SEED={seed}, {inputs} inputs, at most {budget:?}");
    let targets = targets();
    for t in &targets {
        assert!(!t.seeds.is_empty(), "{} has no seeds", t.name);
        // The seeds themselves decode (a decoder that refuses everything
        // would make the fuzzing pointless).
        for s in &t.seeds {
            (t.run)(s);
        }
    }
    ALLOCATOR
        .set_limit(ALLOCATOR.allocated() + (256 << 20))
        .expect("set the allocation cap");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = Instant::now();
    let mut fed = vec![0u64; targets.len()];
    let mut total = 0u64;
    while total < inputs {
        for (i, t) in targets.iter().enumerate() {
            let input = mutate(&mut rng, &t.seeds);
            (t.run)(&input);
            fed[i] += 1;
        }
        total += targets.len() as u64;
        if total % 10_000 < targets.len() as u64 && start.elapsed() > budget {
            break;
        }
    }
    let took = start.elapsed();
    for (t, n) in targets.iter().zip(&fed) {
        eprintln!("fuzz: {:<24} {n} inputs", t.name);
    }
    eprintln!("fuzz: {total} inputs in {took:.1?}");
    assert!(
        total >= inputs.min(inputs / 10 + 1),
        "only {total} inputs within {budget:?}"
    );
    if total < inputs {
        eprintln!("fuzz: stopped by the time budget at {total} of {inputs} inputs");
    }
}
