//! Kafka record headers ↔ the engine's [`Headers`].
//!
//! Read: every header in order; a null value becomes an empty one (the
//! engine's headers have no null). Headers past the engine's limits
//! ([`Headers::MAX_COUNT`], [`Headers::MAX_BYTES`]) are not cut silently:
//! the record keeps one header, [`REFUSED`], whose value says why, and a
//! warning is logged. Write: every header in order, then the writer's own.

use rdkafka::message::{Header, Headers as KafkaHeaders, OwnedHeaders};
use smartmsg_engine::stream::Headers;

/// The one header a record read from Kafka carries instead of headers past
/// the engine's limits; its value is the reason.
pub const REFUSED: &str = "smartmsg-headers-refused";

/// A Kafka record's headers as the engine's.
pub(crate) fn from_kafka(kafka: Option<&impl KafkaHeaders>) -> Headers {
    let mut out = Headers::new();
    let Some(kafka) = kafka else {
        return out;
    };
    for h in kafka.iter() {
        if let Err(e) = out.add(h.key, h.value.unwrap_or(&[])) {
            let reason = format!("{} Kafka headers refused: {e}", kafka.count());
            tracing::warn!(%reason, "a Kafka record's headers are past the engine's limits");
            let mut only = Headers::new();
            // One short header always fits.
            let _ = only.add(REFUSED, reason.into_bytes());
            return only;
        }
    }
    out
}

/// The engine's headers as Kafka's, followed by `extra`.
pub(crate) fn to_kafka(headers: &Headers, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len() + extra.len());
    for (key, value) in headers.iter() {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    for &(key, value) in extra {
        out = out.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(h: &Headers) -> Vec<(String, Vec<u8>)> {
        h.iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect()
    }

    #[test]
    fn headers_go_both_ways_in_order_with_repeats() {
        let mut h = Headers::new();
        h.add("trace", b"t1".to_vec()).unwrap();
        h.add("bin", vec![0u8, 255, 7]).unwrap();
        h.add("trace", b"t2".to_vec()).unwrap();
        let kafka = to_kafka(&h, &[("smartmsg-runner", "r")]);
        assert_eq!(kafka.count(), 4);
        let back = from_kafka(Some(&kafka));
        let mut want = pairs(&h);
        want.push(("smartmsg-runner".into(), b"r".to_vec()));
        assert_eq!(pairs(&back), want);
        assert_eq!(back.last("trace"), Some(&b"t2"[..]));
    }

    #[test]
    fn none_and_null_values() {
        assert!(from_kafka(None::<&OwnedHeaders>).is_empty());
        let kafka = OwnedHeaders::new().insert(Header::<&[u8]> {
            key: "nothing",
            value: None,
        });
        let h = from_kafka(Some(&kafka));
        assert_eq!(pairs(&h), vec![("nothing".to_owned(), Vec::new())]);
    }

    #[test]
    fn headers_past_the_limits_leave_one_header_saying_why() {
        let mut many = OwnedHeaders::new();
        for i in 0..=Headers::MAX_COUNT {
            many = many.insert(Header {
                key: "h",
                value: Some(&i.to_string()),
            });
        }
        let h = from_kafka(Some(&many));
        assert_eq!(h.len(), 1);
        let why = String::from_utf8(h.last(REFUSED).unwrap().to_vec()).unwrap();
        assert!(why.contains("65 Kafka headers refused"), "{why}");
        assert!(why.contains("too many"), "{why}");

        let big = vec![b'x'; Headers::MAX_BYTES];
        let large = OwnedHeaders::new().insert(Header {
            key: "big",
            value: Some(&big),
        });
        let h = from_kafka(Some(&large));
        assert_eq!(h.len(), 1);
        assert!(h.last(REFUSED).is_some());
    }
}
