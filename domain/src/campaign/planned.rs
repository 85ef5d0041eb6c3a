//! The binary payload of `BatchPlanned` at schemas 2 and 3.
//!
//! A planned batch holds up to a budget's worth of decisions (users,
//! creatives, propensities), and is most of a campaign log's bytes. As JSON
//! (schema 1) it costs about 35 bytes a decision and a number parser to
//! read; this layout costs 10 and reads with straight copies, which is what
//! makes replay run at the log's read rate. Every other kind stays JSON.
//!
//! A batch of more than [`MAX_PART_DECISIONS`] decisions is recorded as
//! several `BatchPlanned` events, its [`Part`]s, appended in one
//! transaction (so a reader sees all of them or none): each stays under
//! the engine's default 1 MiB event limit, the whole batch under its 8 MiB
//! transaction limit. A batch in one part is written at schema 2, exactly
//! as before parts existed; a part of a larger batch at schema 3, which
//! adds the part's index and the number of parts.
//!
//! Layout, little-endian, nothing after the last column:
//!
//! ```text
//! u32 len, command id (UTF-8)
//! u64      command fingerprint
//! u32      batch
//! u32      part index   (schema 3 only)
//! u32      parts        (schema 3 only; 2 or more, above the index)
//! u32 len, policy (UTF-8)
//! u32 n    decisions
//! n × u32  users
//! n × u16  creatives
//! n × f32  propensities
//! ```
//!
//! The encoding is canonical (one byte string per value) and `decode`
//! refuses anything else, so a decode → encode round trip gives back the
//! same bytes.

use crate::campaign::types::CommandStamp;
use crate::data::Decisions;
use smartmsg_engine::bytes_in::{Input, InputError};

/// What a schema 2 `BatchPlanned` payload holds. Its JSON form (serde) is
/// the schema 1 payload's shape, which portable logs use to show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Planned {
    /// The command.
    pub command: CommandStamp,
    /// The batch number.
    pub batch: u32,
    /// Which part of the batch these decisions are (absent in the JSON
    /// form of a batch in one part).
    #[serde(default, skip_serializing_if = "Part::is_whole")]
    pub part: Part,
    /// The policy that decided.
    pub policy: String,
    /// The decisions.
    pub decisions: Decisions,
}

/// Most decisions in one `BatchPlanned` event: 100,000 rows of 10 bytes
/// plus the header stay under the engine's default 1 MiB event limit (a
/// test checks the worst case).
pub const MAX_PART_DECISIONS: usize = 100_000;

/// Which part of a planned batch one `BatchPlanned` event holds: part
/// `index` of `count`, in order, all in one transaction. A batch of at
/// most [`MAX_PART_DECISIONS`] decisions is one part, [`Part::WHOLE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// This part's index, from 0.
    pub index: u32,
    /// How many parts the batch has (at least 1, above `index`).
    pub count: u32,
}

impl Part {
    /// The only part of a batch in one part.
    pub const WHOLE: Part = Part { index: 0, count: 1 };

    /// Whether this is the only part of its batch.
    pub fn is_whole(&self) -> bool {
        *self == Part::WHOLE
    }

    /// Whether this is the first part (the one that starts the batch).
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    /// Whether this is the last part (after it the batch is complete).
    pub fn is_last(&self) -> bool {
        self.index.saturating_add(1) >= self.count
    }

    /// The schema a part is written at: 2 for a whole batch, 3 for a part
    /// of a larger one.
    pub fn schema(&self) -> u16 {
        if self.is_whole() {
            2
        } else {
            3
        }
    }

    /// How many parts a batch of `decisions` decisions is recorded in.
    pub fn count_for(decisions: usize) -> u32 {
        u32::try_from(decisions.div_ceil(MAX_PART_DECISIONS).max(1)).unwrap_or(u32::MAX)
    }
}

impl Default for Part {
    fn default() -> Self {
        Part::WHOLE
    }
}

/// Bytes per decision.
const ROW: usize = 4 + 2 + 4;

/// Encodes one part of a batch, at [`Part::schema`]. The columns of
/// `decisions` must agree in length (the aggregate checks that before it
/// emits the event, and portable import checks it too); otherwise every
/// column is cut to the shortest one so the layout stays self-consistent
/// (a debug build panics instead).
pub fn encode(
    command: &CommandStamp,
    batch: u32,
    part: Part,
    policy: &str,
    d: &Decisions,
) -> Vec<u8> {
    debug_assert!(d.check_shape().is_ok(), "decision columns differ in length");
    let n = d
        .users
        .len()
        .min(d.creatives.len())
        .min(d.propensities.len());
    let mut b =
        Vec::with_capacity(4 + command.id.len() + 8 + 4 + 8 + 4 + policy.len() + 4 + n * ROW);
    put_str(&mut b, &command.id);
    b.extend_from_slice(&command.fingerprint.to_le_bytes());
    b.extend_from_slice(&batch.to_le_bytes());
    if !part.is_whole() {
        b.extend_from_slice(&part.index.to_le_bytes());
        b.extend_from_slice(&part.count.to_le_bytes());
    }
    put_str(&mut b, policy);
    b.extend_from_slice(&(n as u32).to_le_bytes());
    for u in &d.users[..n] {
        b.extend_from_slice(&u.to_le_bytes());
    }
    for c in &d.creatives[..n] {
        b.extend_from_slice(&c.to_le_bytes());
    }
    for p in &d.propensities[..n] {
        b.extend_from_slice(&p.to_le_bytes());
    }
    b
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Ids and policy names are short (the engine limits ids to a few
    // hundred bytes); saturate rather than wrap for anything absurd, and
    // decode then refuses the payload.
    b.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Decodes a schema 2 or 3 payload; the error says what is wrong and
/// where. Never panics, never allocates more than the payload justifies.
pub fn decode(schema: u16, payload: &[u8]) -> Result<Planned, String> {
    if !(2..=3).contains(&schema) {
        return Err(format!("schema {schema} is not a binary schema (2 or 3)"));
    }
    let mut r = Input::new(payload);
    let id = string(&mut r, "command id")?;
    let fingerprint = r.u64_le("command fingerprint").map_err(err)?;
    let batch = r.u32_le("batch").map_err(err)?;
    let part = if schema == 3 {
        let index = r.u32_le("part index").map_err(err)?;
        let count = r.u32_le("part count").map_err(err)?;
        if count < 2 || index >= count {
            return Err(format!(
                "part {index} of {count}: a schema 3 part needs 2 or more parts and an index below them"
            ));
        }
        Part { index, count }
    } else {
        Part::WHOLE
    };
    let policy = string(&mut r, "policy")?;
    let n = r.u32_le("decision count").map_err(err)? as usize;
    let rest = r.remaining();
    if n.checked_mul(ROW) != Some(rest) {
        return Err(format!(
            "{n} decisions need {} bytes after byte {}, found {rest}",
            n.saturating_mul(ROW),
            r.position()
        ));
    }
    let users = r.take(n * 4, "users").map_err(err)?;
    let creatives = r.take(n * 2, "creatives").map_err(err)?;
    let propensities = r.take(n * 4, "propensities").map_err(err)?;
    Ok(Planned {
        command: CommandStamp { id, fingerprint },
        batch,
        part,
        policy,
        decisions: Decisions {
            users: users
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            creatives: creatives
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
            propensities: propensities
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        },
    })
}

fn err(e: InputError) -> String {
    e.to_string()
}

fn string(r: &mut Input<'_>, what: &'static str) -> Result<String, String> {
    let s = r.prefixed_u32_le(what).map_err(err)?;
    String::from_utf8(s.to_vec()).map_err(|e| format!("{what}: not UTF-8: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaign::{CampaignEvent, PLANNED_SCHEMA};
    use proptest::prelude::*;
    use smartmsg_engine::EventCodec;

    #[test]
    fn schema_1_json_payloads_still_decode_and_schema_2_is_written() {
        let (c, b, p, d) = sample();
        let json = serde_json::to_vec(&Planned {
            command: c.clone(),
            batch: b,
            part: Part::WHOLE,
            policy: p.clone(),
            decisions: d.clone(),
        })
        .unwrap();
        let old = CampaignEvent::decode("BatchPlanned", 1, &json).unwrap();
        let new = CampaignEvent::BatchPlanned {
            command: c,
            batch: b,
            part: Part::WHOLE,
            policy: p,
            decisions: d,
        };
        assert_eq!(old, new);
        assert_eq!(new.schema(), PLANNED_SCHEMA);
        assert_eq!(
            CampaignEvent::decode("BatchPlanned", PLANNED_SCHEMA, &new.encode()).unwrap(),
            new
        );
        assert!(CampaignEvent::decode("BatchPlanned", 2, &json).is_err());
        assert!(CampaignEvent::decode("BatchPlanned", 3, &new.encode()).is_err());
    }

    fn sample() -> (CommandStamp, u32, String, Decisions) {
        let mut d = Decisions::with_capacity(3);
        d.push(7, 0, 0.25);
        d.push(300_000, 3, 1.0);
        d.push(u32::MAX, u16::MAX, f32::MIN_POSITIVE);
        (
            CommandStamp {
                id: "plan-3".into(),
                fingerprint: 0xfeed_beef,
            },
            3,
            "integrated".into(),
            d,
        )
    }

    #[test]
    fn round_trip_is_exact_and_ten_bytes_a_decision() {
        let (c, b, p, d) = sample();
        let bytes = encode(&c, b, Part::WHOLE, &p, &d);
        assert_eq!(bytes.len(), 4 + 6 + 8 + 4 + 4 + 10 + 4 + 3 * 10);
        let got = decode(2, &bytes).unwrap();
        assert_eq!(got.command, c);
        assert_eq!(got.batch, b);
        assert_eq!(got.policy, p);
        assert_eq!(got.decisions, d);
        assert_eq!(got.part, Part::WHOLE);
        assert_eq!(
            encode(
                &got.command,
                got.batch,
                got.part,
                &got.policy,
                &got.decisions
            ),
            bytes
        );
        // A schema 2 payload is not a schema 3 one, nor the reverse.
        assert!(decode(3, &bytes).is_err());
        let part = Part { index: 1, count: 3 };
        let three = encode(&c, b, part, &p, &d);
        assert_eq!(three.len(), bytes.len() + 8);
        assert_eq!(decode(3, &three).unwrap().part, part);
        assert!(decode(2, &three).is_err());
        assert!(decode(4, &three).is_err());
    }

    #[test]
    fn schema_3_refuses_parts_that_cannot_be() {
        let (c, b, p, d) = sample();
        for (index, count) in [(0, 0), (3, 3), (7, 2)] {
            let bytes = encode(&c, b, Part { index, count }, &p, &d);
            let err = decode(3, &bytes).unwrap_err();
            assert!(err.contains("part"), "{index}/{count}: {err}");
        }
    }

    #[test]
    fn parts_split_a_batch_at_the_part_limit() {
        assert_eq!(Part::count_for(0), 1);
        assert_eq!(Part::count_for(MAX_PART_DECISIONS), 1);
        assert_eq!(Part::count_for(MAX_PART_DECISIONS + 1), 2);
        assert_eq!(Part::count_for(4 * MAX_PART_DECISIONS), 4);
        assert_eq!(Part::WHOLE.schema(), 2);
        assert_eq!(Part { index: 0, count: 2 }.schema(), 3);
        assert!(Part { index: 1, count: 2 }.is_last());
        assert!(!Part { index: 0, count: 2 }.is_last());
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let (c, b, p, d) = sample();
        for (schema, part) in [(2, Part::WHOLE), (3, Part { index: 1, count: 2 })] {
            let bytes = encode(&c, b, part, &p, &d);
            for cut in 0..bytes.len() {
                assert!(decode(schema, &bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = bytes;
            longer.push(0);
            assert!(decode(schema, &longer).is_err());
        }
    }

    #[test]
    fn a_huge_count_is_refused_without_allocating() {
        let (c, b, p, _) = sample();
        let mut bytes = encode(&c, b, Part::WHOLE, &p, &Decisions::default());
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(2, &bytes).unwrap_err();
        assert!(err.contains("decisions need"), "{err}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(2, &bytes);
            let _ = decode(3, &bytes);
        }

        #[test]
        fn any_batch_round_trips(
            id in "[a-z0-9:-]{0,40}",
            fp in any::<u64>(),
            batch in any::<u32>(),
            (index, count) in (2u32..10).prop_flat_map(|n| (0..n, Just(n))),
            whole in any::<bool>(),
            policy in "[a-z-]{0,20}",
            rows in proptest::collection::vec((any::<u32>(), any::<u16>(), 0.0f32..=1.0), 0..64),
        ) {
            let mut d = Decisions::with_capacity(rows.len());
            for (u, c, p) in rows {
                d.push(u, c, p);
            }
            let c = CommandStamp { id, fingerprint: fp };
            let part = if whole { Part::WHOLE } else { Part { index, count } };
            let bytes = encode(&c, batch, part, &policy, &d);
            let got = decode(part.schema(), &bytes).unwrap();
            prop_assert_eq!(&got.decisions, &d);
            prop_assert_eq!(got.part, part);
            prop_assert_eq!(encode(&got.command, got.batch, got.part, &got.policy, &got.decisions), bytes);
        }
    }
}
