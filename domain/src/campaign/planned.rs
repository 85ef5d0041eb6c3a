//! The binary payload of `BatchPlanned` at schema 2.
//!
//! A planned batch holds up to a budget's worth of decisions (users,
//! creatives, propensities), and is most of a campaign log's bytes. As JSON
//! (schema 1) it costs about 35 bytes a decision and a number parser to
//! read; this layout costs 10 and reads with straight copies, which is what
//! makes replay run at the log's read rate. Every other kind stays JSON.
//!
//! Layout, little-endian, nothing after the last column:
//!
//! ```text
//! u32 len, command id (UTF-8)
//! u64      command fingerprint
//! u32      batch
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

/// What a schema 2 `BatchPlanned` payload holds. Its JSON form (serde) is
/// the schema 1 payload's shape, which portable logs use to show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Planned {
    /// The command.
    pub command: CommandStamp,
    /// The batch number.
    pub batch: u32,
    /// The policy that decided.
    pub policy: String,
    /// The decisions.
    pub decisions: Decisions,
}

/// Bytes per decision.
const ROW: usize = 4 + 2 + 4;

/// Encodes a batch. The columns of `decisions` must agree in length (the
/// aggregate checks that before it emits the event, and portable import
/// checks it too); otherwise every column is cut to the shortest one so
/// the layout stays self-consistent (a debug build panics instead).
pub fn encode(command: &CommandStamp, batch: u32, policy: &str, d: &Decisions) -> Vec<u8> {
    debug_assert!(d.check_shape().is_ok(), "decision columns differ in length");
    let n = d
        .users
        .len()
        .min(d.creatives.len())
        .min(d.propensities.len());
    let mut b = Vec::with_capacity(4 + command.id.len() + 8 + 4 + 4 + policy.len() + 4 + n * ROW);
    put_str(&mut b, &command.id);
    b.extend_from_slice(&command.fingerprint.to_le_bytes());
    b.extend_from_slice(&batch.to_le_bytes());
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

/// Decodes a schema 2 payload; the error says what is wrong and where.
/// Never panics, never allocates more than the payload justifies.
pub fn decode(payload: &[u8]) -> Result<Planned, String> {
    let mut r = Reader { b: payload, at: 0 };
    let id = r.string("command id")?;
    let fingerprint = u64::from_le_bytes(r.array("command fingerprint")?);
    let batch = u32::from_le_bytes(r.array("batch")?);
    let policy = r.string("policy")?;
    let n = u32::from_le_bytes(r.array("decision count")?) as usize;
    let rest = payload.len() - r.at;
    if n.checked_mul(ROW) != Some(rest) {
        return Err(format!(
            "{n} decisions need {} bytes after byte {}, found {rest}",
            n.saturating_mul(ROW),
            r.at
        ));
    }
    let users = r.take(n * 4, "users")?;
    let creatives = r.take(n * 2, "creatives")?;
    let propensities = r.take(n * 4, "propensities")?;
    Ok(Planned {
        command: CommandStamp { id, fingerprint },
        batch,
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

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                format!(
                    "{what}: {n} bytes at byte {} run past the end ({} bytes)",
                    self.at,
                    self.b.len()
                )
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = u32::from_le_bytes(self.array(what)?) as usize;
        let s = self.take(len, what)?;
        String::from_utf8(s.to_vec()).map_err(|e| format!("{what}: not UTF-8: {e}"))
    }
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
            policy: p.clone(),
            decisions: d.clone(),
        })
        .unwrap();
        let old = CampaignEvent::decode("BatchPlanned", 1, &json).unwrap();
        let new = CampaignEvent::BatchPlanned {
            command: c,
            batch: b,
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
        let bytes = encode(&c, b, &p, &d);
        assert_eq!(bytes.len(), 4 + 6 + 8 + 4 + 4 + 10 + 4 + 3 * 10);
        let got = decode(&bytes).unwrap();
        assert_eq!(got.command, c);
        assert_eq!(got.batch, b);
        assert_eq!(got.policy, p);
        assert_eq!(got.decisions, d);
        assert_eq!(
            encode(&got.command, got.batch, &got.policy, &got.decisions),
            bytes
        );
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let (c, b, p, d) = sample();
        let bytes = encode(&c, b, &p, &d);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes;
        longer.push(0);
        assert!(decode(&longer).is_err());
    }

    #[test]
    fn a_huge_count_is_refused_without_allocating() {
        let (c, b, p, _) = sample();
        let mut bytes = encode(&c, b, &p, &Decisions::default());
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&bytes).unwrap_err();
        assert!(err.contains("decisions need"), "{err}");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_batch_round_trips(
            id in "[a-z0-9:-]{0,40}",
            fp in any::<u64>(),
            batch in any::<u32>(),
            policy in "[a-z-]{0,20}",
            rows in proptest::collection::vec((any::<u32>(), any::<u16>(), 0.0f32..=1.0), 0..64),
        ) {
            let mut d = Decisions::with_capacity(rows.len());
            for (u, c, p) in rows {
                d.push(u, c, p);
            }
            let c = CommandStamp { id, fingerprint: fp };
            let bytes = encode(&c, batch, &policy, &d);
            let got = decode(&bytes).unwrap();
            prop_assert_eq!(&got.decisions, &d);
            prop_assert_eq!(encode(&got.command, got.batch, &got.policy, &got.decisions), bytes);
        }
    }
}
