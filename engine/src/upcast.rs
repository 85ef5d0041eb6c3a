//! Upcasters: raise old `(kind, schema)` payloads to the current schema on
//! read.
//!
//! Events are never rewritten in the log. When an event's payload format
//! changes, the code that writes it bumps [`crate::EventCodec::schema`] and
//! registers an [`Upcaster`] for the old `(kind, schema)` that turns an event
//! of that schema into the next one. On read, [`Upcasters::upcast`] applies
//! the registered upcasters one after another until none matches, so a v1
//! event goes v1 → v2 → v3 and the codec only ever decodes the current
//! schema. An upcaster may also rename the event (change its kind).
//!
//! Chains are bounded: [`Upcasters::max_chain`] steps at most (default
//! [`Upcasters::DEFAULT_MAX_CHAIN`]), and a chain that comes back to a
//! `(kind, schema)` it already visited is reported as a loop. Both are typed
//! [`UpcastError`]s, never a hang.
//!
//! When no upcaster is registered for an event's kind (the common case),
//! [`Upcasters::upcast`] returns the event as it came, without allocating.
//!
//! ```
//! use bytes::Bytes;
//! use smartmsg_engine::upcast::Upcasters;
//! use smartmsg_engine::{DecodeError, RecordedEvent};
//!
//! let upcasters = Upcasters::new()
//!     // v1 called the field `amt`; v2 calls it `amount`.
//!     .with("Deposited", 1, |mut e: RecordedEvent| {
//!         let text = std::str::from_utf8(&e.payload).map_err(|err| DecodeError::BadPayload {
//!             kind: e.kind.clone(),
//!             schema: e.schema,
//!             reason: err.to_string(),
//!         })?;
//!         e.payload = Bytes::from(text.replace("\"amt\"", "\"amount\""));
//!         e.schema = 2;
//!         Ok(e)
//!     });
//! assert!(upcasters.handles("Deposited", 1));
//! assert!(!upcasters.handles("Deposited", 2));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use crate::aggregate::DecodeError;
use crate::event::RecordedEvent;

/// Raises an event of one `(kind, schema)` by one step.
///
/// The returned event should carry the next schema (and possibly a new
/// kind and payload). Whatever it returns, [`Upcasters`] keeps the event's
/// identity in the log: its `position`, `stream` and `version` are restored
/// after the call. `timestamp_ms` and `metadata` are the upcaster's to keep
/// (normally unchanged).
///
/// Any `Fn(RecordedEvent) -> Result<RecordedEvent, DecodeError>` that is
/// `Send + Sync + 'static` is an upcaster.
pub trait Upcaster: Send + Sync + 'static {
    /// Raises `event` one step; fails with a [`DecodeError`] (usually
    /// [`DecodeError::BadPayload`]) if the old payload is malformed.
    fn upcast(&self, event: RecordedEvent) -> Result<RecordedEvent, DecodeError>;
}

impl<F> Upcaster for F
where
    F: Fn(RecordedEvent) -> Result<RecordedEvent, DecodeError> + Send + Sync + 'static,
{
    fn upcast(&self, event: RecordedEvent) -> Result<RecordedEvent, DecodeError> {
        self(event)
    }
}

/// Why an event could not be upcast. The `kind` and `schema` fields name the
/// event as it was stored, before any step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpcastError {
    /// An upcaster refused the payload.
    #[error("upcasting {kind:?} schema {schema}: step from {at_kind:?} schema {at_schema} failed: {source}")]
    Failed {
        /// The stored kind.
        kind: String,
        /// The stored schema.
        schema: u16,
        /// The kind at the failing step.
        at_kind: String,
        /// The schema at the failing step.
        at_schema: u16,
        /// The upcaster's error.
        source: DecodeError,
    },
    /// The chain came back to a `(kind, schema)` it had already passed.
    #[error("upcasting {kind:?} schema {schema}: loop back to {at_kind:?} schema {at_schema}")]
    Loop {
        /// The stored kind.
        kind: String,
        /// The stored schema.
        schema: u16,
        /// The `(kind, schema)` reached twice.
        at_kind: String,
        /// The schema reached twice.
        at_schema: u16,
    },
    /// The chain is longer than [`Upcasters::max_chain`] steps.
    #[error("upcasting {kind:?} schema {schema}: chain longer than {max} steps")]
    ChainTooLong {
        /// The stored kind.
        kind: String,
        /// The stored schema.
        schema: u16,
        /// The limit.
        max: usize,
    },
}

/// An upcaster is already registered for this `(kind, schema)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an upcaster for {kind:?} schema {schema} is already registered")]
pub struct DuplicateUpcaster {
    /// The kind.
    pub kind: String,
    /// The schema.
    pub schema: u16,
}

/// The upcasters of an application, keyed by the `(kind, schema)` they
/// raise. Cheap to share (hold it in an `Arc`); immutable once built.
#[derive(Clone)]
pub struct Upcasters {
    by_kind: HashMap<String, BTreeMap<u16, Arc<dyn Upcaster>>>,
    max_chain: usize,
}

impl Default for Upcasters {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<(&str, u16)> = self
            .by_kind
            .iter()
            .flat_map(|(k, m)| m.keys().map(move |s| (k.as_str(), *s)))
            .collect();
        keys.sort_unstable();
        f.debug_struct("Upcasters")
            .field("registered", &keys)
            .field("max_chain", &self.max_chain)
            .finish()
    }
}

impl Upcasters {
    /// The default longest chain: 32 steps.
    pub const DEFAULT_MAX_CHAIN: usize = 32;

    /// No upcasters: every event reads as stored.
    pub fn new() -> Self {
        Self {
            by_kind: HashMap::new(),
            max_chain: Self::DEFAULT_MAX_CHAIN,
        }
    }

    /// Sets the longest chain one event may go through (at least 1).
    pub fn with_max_chain(mut self, max_chain: usize) -> Self {
        self.max_chain = max_chain.max(1);
        self
    }

    /// The longest chain one event may go through.
    pub fn max_chain(&self) -> usize {
        self.max_chain
    }

    /// Registers `upcaster` for events of `kind` at `schema`.
    pub fn register(
        &mut self,
        kind: impl Into<String>,
        schema: u16,
        upcaster: impl Upcaster,
    ) -> Result<(), DuplicateUpcaster> {
        let kind = kind.into();
        let by_schema = self.by_kind.entry(kind.clone()).or_default();
        if by_schema.contains_key(&schema) {
            return Err(DuplicateUpcaster { kind, schema });
        }
        by_schema.insert(schema, Arc::new(upcaster));
        Ok(())
    }

    /// Registers `upcaster` for events of `kind` at `schema` (builder form,
    /// for start-up code).
    ///
    /// # Panics
    /// If an upcaster is already registered for `(kind, schema)`: that is a
    /// programming error found at start-up. Use [`Upcasters::register`] to
    /// handle it instead.
    pub fn with(mut self, kind: impl Into<String>, schema: u16, upcaster: impl Upcaster) -> Self {
        if let Err(e) = self.register(kind, schema, upcaster) {
            panic!("{e}");
        }
        self
    }

    /// Whether no upcaster is registered.
    pub fn is_empty(&self) -> bool {
        self.by_kind.is_empty()
    }

    /// Number of registered upcasters.
    pub fn len(&self) -> usize {
        self.by_kind.values().map(BTreeMap::len).sum()
    }

    /// Whether an upcaster is registered for `(kind, schema)`.
    pub fn handles(&self, kind: &str, schema: u16) -> bool {
        self.find(kind, schema).is_some()
    }

    fn find(&self, kind: &str, schema: u16) -> Option<&Arc<dyn Upcaster>> {
        self.by_kind.get(kind)?.get(&schema)
    }

    /// Raises `event` through every matching upcaster until none matches.
    ///
    /// Returns the event unchanged, without allocating, when no upcaster
    /// matches its `(kind, schema)`. Its `position`, `stream` and `version`
    /// are kept whatever the upcasters return.
    pub fn upcast(&self, event: RecordedEvent) -> Result<RecordedEvent, UpcastError> {
        let Some(first) = self.find(&event.kind, event.schema) else {
            return Ok(event);
        };
        let original = (event.kind.clone(), event.schema);
        let mut seen: Vec<(String, u16)> = vec![original.clone()];
        let mut upcaster = first;
        let mut event = event;
        let mut steps = 0usize;
        loop {
            if steps == self.max_chain {
                return Err(UpcastError::ChainTooLong {
                    kind: original.0,
                    schema: original.1,
                    max: self.max_chain,
                });
            }
            steps += 1;
            let (position, stream, version) = (event.position, event.stream.clone(), event.version);
            let (at_kind, at_schema) = (event.kind.clone(), event.schema);
            let mut next = upcaster
                .upcast(event)
                .map_err(|source| UpcastError::Failed {
                    kind: original.0.clone(),
                    schema: original.1,
                    at_kind,
                    at_schema,
                    source,
                })?;
            next.position = position;
            next.stream = stream;
            next.version = version;
            let Some(following) = self.find(&next.kind, next.schema) else {
                return Ok(next);
            };
            if seen
                .iter()
                .any(|(k, s)| *s == next.schema && *k == next.kind)
            {
                return Err(UpcastError::Loop {
                    kind: original.0,
                    schema: original.1,
                    at_kind: next.kind,
                    at_schema: next.schema,
                });
            }
            seen.push((next.kind.clone(), next.schema));
            upcaster = following;
            event = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metadata;
    use crate::stream_id::StreamId;
    use bytes::Bytes;

    fn event(kind: &str, schema: u16, payload: &str) -> RecordedEvent {
        RecordedEvent {
            position: 7,
            stream: StreamId::new("s-1").unwrap(),
            version: 3,
            kind: kind.to_owned(),
            schema,
            timestamp_ms: 1_000,
            metadata: Metadata::correlated("c-1"),
            payload: Bytes::from(payload.to_owned()),
        }
    }

    fn json(e: &RecordedEvent) -> serde_json::Value {
        serde_json::from_slice(&e.payload).unwrap()
    }

    fn bad(e: &RecordedEvent, reason: impl ToString) -> DecodeError {
        DecodeError::BadPayload {
            kind: e.kind.clone(),
            schema: e.schema,
            reason: reason.to_string(),
        }
    }

    /// v1 `Credited {cents}` → v2 `Deposited {amount_cents}` → v3
    /// `Deposited {amount, currency}`.
    fn chain() -> Upcasters {
        Upcasters::new()
            .with("Credited", 1, |mut e: RecordedEvent| {
                let v: serde_json::Value =
                    serde_json::from_slice(&e.payload).map_err(|err| bad(&e, err))?;
                let cents = v["cents"].as_u64().ok_or_else(|| bad(&e, "no cents"))?;
                e.kind = "Deposited".to_owned();
                e.schema = 2;
                e.payload = Bytes::from(serde_json::json!({ "amount_cents": cents }).to_string());
                Ok(e)
            })
            .with("Deposited", 2, |mut e: RecordedEvent| {
                let v: serde_json::Value =
                    serde_json::from_slice(&e.payload).map_err(|err| bad(&e, err))?;
                let cents = v["amount_cents"]
                    .as_u64()
                    .ok_or_else(|| bad(&e, "no amount_cents"))?;
                e.schema = 3;
                e.payload = Bytes::from(
                    serde_json::json!({ "amount": cents, "currency": "EUR" }).to_string(),
                );
                Ok(e)
            })
    }

    #[test]
    fn no_upcaster_returns_the_event_untouched_without_copying() {
        let ups = Upcasters::new();
        assert!(ups.is_empty());
        let e = event("Deposited", 3, "{}");
        let input = e.clone();
        let (payload_ptr, kind_ptr) = (input.payload.as_ptr(), input.kind.as_ptr());
        let out = ups.upcast(input).unwrap();
        assert_eq!(out, e);
        // Same buffers: nothing was copied or re-allocated.
        assert_eq!(out.payload.as_ptr(), payload_ptr);
        assert_eq!(out.kind.as_ptr(), kind_ptr);

        // Registered for other (kind, schema) pairs: still a pass-through.
        let input = e.clone();
        let kind_ptr = input.kind.as_ptr();
        let out = chain().upcast(input).unwrap();
        assert_eq!(out.kind.as_ptr(), kind_ptr);
        assert_eq!(out, e);
    }

    #[test]
    fn chain_v1_to_v3_is_applied_in_order() {
        let ups = chain();
        assert_eq!(ups.len(), 2);
        let out = ups
            .upcast(event("Credited", 1, r#"{"cents":250}"#))
            .unwrap();
        assert_eq!(out.kind, "Deposited");
        assert_eq!(out.schema, 3);
        assert_eq!(
            json(&out),
            serde_json::json!({ "amount": 250, "currency": "EUR" })
        );
        // Identity and metadata kept.
        assert_eq!(out.position, 7);
        assert_eq!(out.version, 3);
        assert_eq!(out.stream.as_str(), "s-1");
        assert_eq!(out.metadata, Metadata::correlated("c-1"));
        assert_eq!(out.timestamp_ms, 1_000);

        // Starting in the middle of the chain works too.
        let out = ups
            .upcast(event("Deposited", 2, r#"{"amount_cents":9}"#))
            .unwrap();
        assert_eq!((out.kind.as_str(), out.schema), ("Deposited", 3));
    }

    #[test]
    fn identity_is_restored_whatever_the_upcaster_returns() {
        let ups = Upcasters::new().with("A", 1, |mut e: RecordedEvent| {
            e.position = 999;
            e.version = 999;
            e.stream = StreamId::new("elsewhere").unwrap();
            e.schema = 2;
            Ok(e)
        });
        let out = ups.upcast(event("A", 1, "{}")).unwrap();
        assert_eq!((out.position, out.version), (7, 3));
        assert_eq!(out.stream.as_str(), "s-1");
        assert_eq!(out.schema, 2);
    }

    #[test]
    fn a_failing_step_names_the_stored_event_and_the_step() {
        let err = chain()
            .upcast(event("Credited", 1, r#"{"nope":1}"#))
            .unwrap_err();
        match err {
            UpcastError::Failed {
                kind,
                schema,
                at_kind,
                at_schema,
                source: DecodeError::BadPayload { .. },
            } => {
                assert_eq!((kind.as_str(), schema), ("Credited", 1));
                assert_eq!((at_kind.as_str(), at_schema), ("Credited", 1));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn loops_are_detected() {
        // A → B → A.
        let ups = Upcasters::new()
            .with("A", 1, |mut e: RecordedEvent| {
                e.kind = "B".to_owned();
                Ok(e)
            })
            .with("B", 1, |mut e: RecordedEvent| {
                e.kind = "A".to_owned();
                Ok(e)
            });
        let err = ups.upcast(event("A", 1, "{}")).unwrap_err();
        assert_eq!(
            err,
            UpcastError::Loop {
                kind: "A".into(),
                schema: 1,
                at_kind: "A".into(),
                at_schema: 1
            }
        );

        // An upcaster that does not change anything is a loop of one.
        let ups = Upcasters::new().with("A", 1, Ok);
        assert!(matches!(
            ups.upcast(event("A", 1, "{}")),
            Err(UpcastError::Loop { .. })
        ));
    }

    #[test]
    fn chains_longer_than_the_limit_fail() {
        let mut ups = Upcasters::new().with_max_chain(3);
        for s in 1..=5u16 {
            ups.register("A", s, |mut e: RecordedEvent| {
                e.schema += 1;
                Ok(e)
            })
            .unwrap();
        }
        assert_eq!(
            ups.upcast(event("A", 1, "{}")),
            Err(UpcastError::ChainTooLong {
                kind: "A".into(),
                schema: 1,
                max: 3
            })
        );
        // Exactly at the limit is fine: 3 → 6 is three steps.
        assert_eq!(ups.upcast(event("A", 3, "{}")).unwrap().schema, 6);
        // The default is generous.
        assert_eq!(Upcasters::new().max_chain(), Upcasters::DEFAULT_MAX_CHAIN);
        assert_eq!(Upcasters::new().with_max_chain(0).max_chain(), 1);
    }

    #[test]
    fn duplicates_are_refused() {
        let mut ups = chain();
        assert_eq!(
            ups.register("Credited", 1, Ok),
            Err(DuplicateUpcaster {
                kind: "Credited".into(),
                schema: 1
            })
        );
        assert_eq!(ups.len(), 2);
        let dbg = format!("{ups:?}");
        assert!(dbg.contains("Credited"), "{dbg}");
    }

    #[test]
    #[should_panic(expected = "already registered")]
    fn with_panics_on_duplicates() {
        let _ = chain().with("Deposited", 2, Ok);
    }
}
