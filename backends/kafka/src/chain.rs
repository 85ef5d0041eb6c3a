//! Deciding, from the records on the topic, which Kafka transactions
//! committed, and rebuilding the writer's index from them.
//!
//! # Why a chain
//!
//! On Apache Kafka a `read_committed` consumer never sees records of
//! aborted transactions. Some Kafka-protocol brokers (tansu 0.6) show them
//! anyway, and the rebuild must not count them. Two facts of the envelope
//! make that decidable without help from the broker:
//!
//! - `batch_index`/`batch_count`: a transaction whose writer died while it
//!   was producing lacks some of its records (incomplete);
//! - `prev_seq`: every Kafka transaction names the last transaction its
//!   writer knew to be committed. Transactions are attempted one at a time
//!   (by one writer, then by its successor after a rebuild), with strictly
//!   increasing `batch_seq`.
//!
//! So committed transactions form a chain from `prev_seq = 0`. Given the
//! chain's tip `t`, every attempt made while `t` was the tip carries
//! `prev_seq = t`; a later attempt exists only because every earlier one
//! was aborted, so of the attempts with `prev_seq = t` only the one with the
//! highest `batch_seq` can have committed. If that attempt is complete it
//! is taken as committed and becomes the tip; if it is incomplete, the
//! chain ends at `t`. Everything not on the chain is ignored (aborted).
//!
//! The one case the chain cannot settle on such a broker is the very last
//! attempt, complete on the topic, whose writer died (or was fenced)
//! between producing and committing: it is counted as committed. Its
//! writer never acknowledged it (the caller saw a crash or an error that
//! means "outcome unknown"), a retry with the same idempotency key then
//! returns its result instead of writing it again, and the decision is
//! final: the next writer links to it. On Apache Kafka the aborted attempt
//! is invisible and never counted.

use std::collections::HashMap;

use smartmsg_engine::index::LogIndex;
use smartmsg_engine::{AppendResult, IdempotencyKey, StreamId};

use crate::envelope::Framing;
use crate::error::KafkaLogError;

/// What the rebuild keeps of one record.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub partition: i32,
    pub offset: i64,
    pub framing: Framing,
    pub stream: StreamId,
    pub idempotency: Option<(IdempotencyKey, u64)>,
}

/// The index rebuilt from the committed chain.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    pub index: LogIndex,
    /// Packed (partition, offset) of every position, see [`pack`].
    pub locs: Vec<u64>,
    /// `batch_seq` of the chain's last transaction (0: empty log).
    pub tip: u64,
    /// The next `batch_seq` to use: above every one on the topic.
    pub next_seq: u64,
    /// Kafka transactions on the chain.
    pub committed_batches: u64,
    /// Kafka transactions seen but not on the chain (aborted or incomplete).
    pub ignored_batches: u64,
}

const OFFSET_BITS: u32 = 48;

/// Packs a record's location into one word: partition in the top 16 bits.
pub(crate) fn pack(partition: i32, offset: i64) -> Option<u64> {
    if !(0..=i32::from(u16::MAX)).contains(&partition)
        || !(0..1i64 << OFFSET_BITS).contains(&offset)
    {
        return None;
    }
    Some(((partition as u64) << OFFSET_BITS) | offset as u64)
}

/// The location [`pack`] packed.
pub(crate) fn unpack(loc: u64) -> (i32, i64) {
    (
        (loc >> OFFSET_BITS) as i32,
        (loc & ((1u64 << OFFSET_BITS) - 1)) as i64,
    )
}

struct Group {
    prev: u64,
    count: u32,
    events: Vec<Meta>,
}

/// Resolves the chain of committed transactions among `metas` (every record
/// of the topic, in any order) and rebuilds the index from it.
#[cfg(test)]
pub(crate) fn resolve(topic: &str, metas: Vec<Meta>) -> Result<Resolved, KafkaLogError> {
    resolve_from(topic, Resolved::default(), metas)
}

/// Continues the chain of `base` (the empty state, or a checkpoint's) with
/// `metas`: every record of the topic at or after the offsets `base`
/// covers, in any order. From the tip on this is exactly the full
/// rebuild's logic: every attempt that links to the tip was made after the
/// tip committed, so all of them are among `metas`. Records of older
/// attempts that happen to lie past the covered offsets (aborted, shown by
/// brokers like tansu) link to an earlier transaction and are ignored as
/// they are in a full rebuild.
pub(crate) fn resolve_from(
    topic: &str,
    base: Resolved,
    metas: Vec<Meta>,
) -> Result<Resolved, KafkaLogError> {
    let corrupt = |m: &Meta, reason: String| KafkaLogError::Corrupt {
        topic: topic.to_owned(),
        partition: m.partition,
        offset: m.offset,
        reason,
    };
    let mut groups: HashMap<u64, Group> = HashMap::new();
    for m in metas {
        let f = m.framing;
        let g = groups.entry(f.batch_seq).or_insert_with(|| Group {
            prev: f.prev_seq,
            count: f.batch_count,
            events: Vec::new(),
        });
        if g.prev != f.prev_seq || g.count != f.batch_count {
            return Err(corrupt(
                &m,
                format!(
                    "transaction {} says prev {} and {} events here, prev {} and {} events \
                     elsewhere",
                    f.batch_seq, f.prev_seq, f.batch_count, g.prev, g.count
                ),
            ));
        }
        if g.events.len() >= g.count as usize {
            return Err(corrupt(
                &m,
                format!(
                    "transaction {} has more than its {} events",
                    f.batch_seq, g.count
                ),
            ));
        }
        g.events.push(m);
    }
    let next_seq = groups.keys().max().map_or(1, |m| m + 1).max(base.next_seq);
    let mut latest_by_prev: HashMap<u64, u64> = HashMap::new();
    for (&seq, g) in &groups {
        let e = latest_by_prev.entry(g.prev).or_insert(seq);
        *e = (*e).max(seq);
    }

    let mut out = Resolved { next_seq, ..base };
    while let Some(&seq) = latest_by_prev.get(&out.tip) {
        let mut g = groups.remove(&seq).expect("group of a known seq");
        g.events.sort_by_key(|m| m.framing.batch_index);
        if let Some(w) = g
            .events
            .windows(2)
            .find(|w| w[0].framing.batch_index == w[1].framing.batch_index)
        {
            return Err(corrupt(
                &w[1],
                format!(
                    "event {} of transaction {seq} appears twice",
                    w[1].framing.batch_index
                ),
            ));
        }
        if g.events.len() != g.count as usize {
            // The latest attempt after the tip never completed: the chain
            // ends here.
            groups.insert(seq, g);
            break;
        }
        apply_batch(&mut out, &g.events, &corrupt)?;
        out.tip = seq;
        out.committed_batches += 1;
    }
    out.ignored_batches += groups.len() as u64;
    Ok(out)
}

/// Applies one complete, committed Kafka transaction (events sorted by
/// `batch_index`) to the index.
fn apply_batch(
    out: &mut Resolved,
    events: &[Meta],
    corrupt: &impl Fn(&Meta, String) -> KafkaLogError,
) -> Result<(), KafkaLogError> {
    let mut i = 0;
    while i < events.len() {
        let first = &events[i];
        let f = first.framing;
        if f.tx_index != 0 {
            return Err(corrupt(
                first,
                format!(
                    "transaction starts with event {} of its AppendTx",
                    f.tx_index
                ),
            ));
        }
        let n = f.tx_count as usize;
        let Some(tx) = events.get(i..i + n) else {
            return Err(corrupt(
                first,
                format!("AppendTx of {n} events runs past its Kafka transaction"),
            ));
        };
        let head = out.index.head();
        let mut versions: Vec<(StreamId, u64)> = Vec::new();
        for (j, m) in tx.iter().enumerate() {
            let mf = m.framing;
            if mf.tx_index as usize != j || mf.tx_count as usize != n {
                return Err(corrupt(
                    m,
                    format!("expected event {j} of {n} of its AppendTx"),
                ));
            }
            if mf.position != head + j as u64 {
                return Err(corrupt(
                    m,
                    format!(
                        "position {} where the committed chain is at {}",
                        mf.position,
                        head + j as u64
                    ),
                ));
            }
            if j > 0 && m.idempotency.is_some() {
                return Err(corrupt(
                    m,
                    "idempotency fields after the first event".into(),
                ));
            }
            let expected = match versions.last_mut() {
                Some((s, v)) if *s == m.stream => {
                    *v += 1;
                    *v
                }
                _ => {
                    if versions.iter().any(|(s, _)| *s == m.stream) {
                        return Err(corrupt(
                            m,
                            format!("stream {} appears twice in one AppendTx", m.stream),
                        ));
                    }
                    let v = out.index.version(&m.stream) + 1;
                    versions.push((m.stream.clone(), v));
                    v
                }
            };
            if mf.version != expected {
                return Err(corrupt(
                    m,
                    format!(
                        "stream {} version {} where the committed chain is at {}",
                        m.stream,
                        mf.version,
                        expected - 1
                    ),
                ));
            }
            let loc = pack(m.partition, m.offset)
                .ok_or_else(|| corrupt(m, "partition or offset out of range".into()))?;
            out.locs.push(loc);
        }
        let result = AppendResult {
            first_position: head,
            next_position: head + n as u64,
            versions,
        };
        let key = first.idempotency.as_ref().map(|(k, fp)| (k, *fp));
        out.index.apply(&result, key, tx.iter().map(|m| &m.stream));
        i += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Versions = HashMap<String, u64>;

    /// A Kafka transaction of `txs` (each a list of streams, one event per
    /// entry) written on top of `state` (stream versions at the tip) at
    /// position `first`; returns its metas, the next position and the
    /// versions after it.
    fn batch(
        seq: u64,
        prev: u64,
        first: u64,
        txs: &[&[&str]],
        state: &Versions,
    ) -> (Vec<Meta>, u64, Versions) {
        let count: usize = txs.iter().map(|t| t.len()).sum();
        let mut out = Vec::new();
        let mut pos = first;
        let mut bi = 0u32;
        let mut versions = state.clone();
        for (t, streams) in txs.iter().enumerate() {
            for (j, s) in streams.iter().enumerate() {
                let v = versions.entry((*s).to_owned()).or_insert(0);
                *v += 1;
                out.push(Meta {
                    partition: (pos % 3) as i32,
                    offset: pos as i64 * 2,
                    framing: Framing {
                        batch_seq: seq,
                        prev_seq: prev,
                        batch_index: bi,
                        batch_count: count as u32,
                        tx_index: j as u32,
                        tx_count: streams.len() as u32,
                        position: pos,
                        version: *v,
                    },
                    stream: StreamId::new(s).unwrap(),
                    idempotency: (j == 0)
                        .then(|| (IdempotencyKey::new(format!("k{seq}-{t}")), seq)),
                });
                pos += 1;
                bi += 1;
            }
        }
        (out, pos, versions)
    }

    fn sid(s: &str) -> StreamId {
        StreamId::new(s).unwrap()
    }

    #[test]
    fn empty_topic() {
        let r = resolve("t", Vec::new()).unwrap();
        assert_eq!((r.index.head(), r.tip, r.next_seq), (0, 0, 1));
    }

    #[test]
    fn follows_the_chain_and_skips_aborted_attempts() {
        let v0 = Versions::new();
        let (b1, p1, v1) = batch(1, 0, 0, &[&["a", "a", "b"], &["c"]], &v0);
        // Attempt 2 at p1 was aborted (complete on the topic); 3 then
        // committed at the same position, linking to 1.
        let (b2, _, _) = batch(2, 1, p1, &[&["a"]], &v1);
        let (b3, p3, v3) = batch(3, 1, p1, &[&["b", "d"]], &v1);
        // 4 committed after 3; 5 died half-way (incomplete).
        let (b4, p4, v4) = batch(4, 3, p3, &[&["d"]], &v3);
        let (mut b5, _, _) = batch(5, 4, p4, &[&["e", "e"]], &v4);
        b5.pop();
        let mut all: Vec<Meta> = [b1, b2, b3, b4, b5].concat();
        all.reverse();
        let r = resolve("t", all).unwrap();
        assert_eq!(r.tip, 4);
        assert_eq!(r.next_seq, 6);
        assert_eq!(r.index.head(), p4);
        assert_eq!(r.committed_batches, 3);
        assert_eq!(r.ignored_batches, 2);
        assert_eq!(r.locs.len() as u64, p4);
        assert_eq!(r.index.version(&sid("a")), 2);
        assert_eq!(r.index.version(&sid("b")), 2);
        assert_eq!(r.index.version(&sid("d")), 2);
        assert_eq!(r.index.version(&sid("e")), 0);
        assert_eq!(unpack(r.locs[4]), (1, 8));
    }

    /// Resolving the records after a checkpoint on top of the checkpoint's
    /// state gives what resolving every record gives, even with records of
    /// an old aborted attempt among the later ones.
    #[test]
    fn continuing_from_a_checkpoint_equals_the_full_rebuild() {
        let v0 = Versions::new();
        let (b1, p1, v1) = batch(1, 0, 0, &[&["a", "b"], &["c"]], &v0);
        let (b2, _, _) = batch(2, 1, p1, &[&["a", "x"]], &v1);
        let (b3, p3, v3) = batch(3, 1, p1, &[&["b", "d"]], &v1);
        // The checkpoint: tip 3. Part of aborted attempt 2 lies after it.
        let (b4, p4, v4) = batch(4, 3, p3, &[&["d"], &["a"]], &v3);
        let (b5, _, _) = batch(5, 4, p4, &[&["e", "e"]], &v4);
        let (b6, p6, _) = batch(6, 4, p4, &[&["e"]], &v4);
        let full = resolve("t", [&b1[..], &b2, &b3, &b4, &b5, &b6].concat()).unwrap();
        let base = resolve("t", [&b1[..], &b2[..1], &b3].concat()).unwrap();
        assert_eq!(base.tip, 3);
        let tail = [&b2[1..], &b4[..], &b5, &b6].concat();
        let cont = resolve_from("t", base, tail).unwrap();
        assert_eq!(cont.index, full.index);
        assert_eq!(cont.locs, full.locs);
        assert_eq!((cont.tip, cont.next_seq), (full.tip, full.next_seq));
        assert_eq!((cont.tip, cont.index.head()), (6, p6));
        assert_eq!(cont.committed_batches, full.committed_batches);
    }

    #[test]
    fn a_later_incomplete_attempt_proves_earlier_ones_aborted() {
        let v0 = Versions::new();
        let (b1, _, _) = batch(1, 0, 0, &[&["a"]], &v0);
        let (mut b2, _, _) = batch(2, 0, 0, &[&["b", "b"]], &v0);
        b2.truncate(1);
        let r = resolve("t", [b1, b2].concat()).unwrap();
        assert_eq!((r.index.head(), r.tip, r.next_seq), (0, 0, 3));
    }

    #[test]
    fn the_last_complete_attempt_counts() {
        let (b1, p1, v1) = batch(1, 0, 0, &[&["a"]], &Versions::new());
        let (b2, p2, _) = batch(2, 1, p1, &[&["a"]], &v1);
        let r = resolve("t", [b1, b2].concat()).unwrap();
        assert_eq!((r.index.head(), r.tip), (p2, 2));
        assert_eq!(r.index.version(&sid("a")), 2);
    }

    #[test]
    fn contradictions_are_corruption() {
        let v0 = Versions::new();
        let corrupt = |metas| matches!(resolve("t", metas), Err(KafkaLogError::Corrupt { .. }));
        let (mut b, _, _) = batch(1, 0, 0, &[&["a", "b"]], &v0);
        b[1].framing.position = 5;
        assert!(corrupt(b));
        let (mut b, _, _) = batch(1, 0, 0, &[&["a", "b"]], &v0);
        b[1].framing.batch_index = 0;
        assert!(corrupt(b));
        let (mut b, _, _) = batch(1, 0, 0, &[&["a"], &["a"]], &v0);
        b[1].framing.version = 1;
        assert!(corrupt(b));
        let (mut b, _, _) = batch(1, 0, 0, &[&["a", "b"]], &v0);
        b[1].framing.prev_seq = 0;
        b[1].framing.batch_count = 3;
        assert!(corrupt(b));
    }

    #[test]
    fn rebuilds_idempotency_keys_and_results() {
        use smartmsg_engine::index::Verdict;
        use smartmsg_engine::{AppendError, AppendTx, ExpectedVersion, Limits, NewEvent};
        let (b1, _, _) = batch(1, 0, 0, &[&["a", "b"], &["b"]], &Versions::new());
        let r = resolve("t", b1).unwrap();
        let tx = AppendTx::single(
            sid("zzz"),
            ExpectedVersion::Any,
            vec![NewEvent::new("k", 0, 0, &b""[..])],
        );
        // Same key, other content: reused (the fingerprint stored was 1).
        assert!(matches!(
            r.index
                .check(&tx.clone().with_idempotency_key("k1-1"), &Limits::default()),
            Err(AppendError::IdempotencyKeyReused { .. })
        ));
        match r.index.check(&tx, &Limits::default()).unwrap() {
            Verdict::Write(res) => assert_eq!(res.first_position, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.index.version(&sid("b")), 2);
    }
}
