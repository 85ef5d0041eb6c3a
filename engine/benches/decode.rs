//! Criterion benchmarks of the engine's byte-level helpers, each next to a
//! peer run in the same process:
//!
//! - `decode`: 10,000 records (a `u32`-prefixed 16-byte key, a `u64`, a
//!   LEB128 varint) read with the checked cursor
//!   [`smartmsg_engine::bytes_in::Input`] and with bare [`bytes::Buf`]
//!   calls that panic on short input: the price of never panicking.
//! - `hash`: FNV-1a over 1 KiB against `std`'s SipHash-1-3
//!   (`DefaultHasher`): the stable hash's cost next to the standard one.
//!
//! `cargo bench -p smartmsg-engine --bench decode` (criterion prints each
//! median in `time: [low median high]`, the middle value being its point
//! estimate).

use std::hash::Hasher;
use std::hint::black_box;

use bytes::{Buf, BufMut};
use criterion::{Criterion, Throughput};
use smartmsg_engine::bytes_in::Input;
use smartmsg_engine::fnv::fnv1a;

const RECORDS: u64 = 10_000;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn records() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..RECORDS {
        out.put_u32_le(16);
        out.extend_from_slice(&(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
        out.extend_from_slice(&i.to_le_bytes());
        out.put_u64_le(i * 3);
        put_varint(&mut out, i * i);
    }
    out
}

fn checked(bytes: &[u8]) -> u64 {
    let mut input = Input::new(bytes);
    let mut acc = 0u64;
    while !input.is_empty() {
        let key = input.prefixed_u32_le("key").expect("well-formed");
        acc = acc.wrapping_add(u64::from(key[0]));
        acc ^= input.u64_le("position").expect("well-formed");
        acc = acc.wrapping_add(input.varint("count").expect("well-formed"));
    }
    acc
}

fn bare(mut bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    while bytes.has_remaining() {
        let n = bytes.get_u32_le() as usize;
        acc = acc.wrapping_add(u64::from(bytes[0]));
        bytes.advance(n);
        acc ^= bytes.get_u64_le();
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = bytes.get_u8();
            v |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        acc = acc.wrapping_add(v);
    }
    acc
}

fn decode(c: &mut Criterion) {
    let bytes = records();
    assert_eq!(checked(&bytes), bare(&bytes), "both read the same records");
    let mut g = c.benchmark_group("decode 10,000 records");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("bytes_in::Input (checked)", |b| {
        b.iter(|| checked(black_box(&bytes)))
    });
    g.bench_function("bytes::Buf (panics when short)", |b| {
        b.iter(|| bare(black_box(&bytes)))
    });
    g.finish();
}

fn hash(c: &mut Criterion) {
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let mut g = c.benchmark_group("hash 1 KiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("fnv1a", |b| b.iter(|| fnv1a(black_box(&data))));
    g.bench_function("std DefaultHasher (SipHash-1-3)", |b| {
        b.iter(|| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(black_box(&data));
            h.finish()
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    decode(&mut c);
    hash(&mut c);
    c.final_summary();
}
